"""Pretrain a GPT on a text corpus: `python train.py` trains a tiny model on the Python standard library.

    python train.py                                   # ~2 minutes on 2 CPU cores: out/tokenizer.json, out/data/,
                                                      # out/pretrain/ (checkpoints, metrics.jsonl), then a sample
    python train.py --depth 6 --steps 2000            # a bigger model (--depth is the one size dial), longer
    python train.py --resume true                     # continue out/pretrain exactly where it stopped
    python train.py --source my_texts/ --tokenizer out/mine/tokenizer.json --out-dir out/mine
    torchrun --standalone --nproc_per_node=8 train.py --strategy fsdp --depth 12 ...   # a GPU node (README)
    torchrun --standalone --nproc_per_node=8 train.py --strategy fsdp --tp 2 --pp 2 --grad-accum 8 ...  # 3-D mesh

With no flags it trains a tokenizer (or reuses out/tokenizer.json), tokenizes the corpus into out/data/,
trains for a few minutes on CPU (or much bigger on a GPU, see README), checkpoints to out/pretrain/ and
prints a sample. Next: `python finetune.py` (chat SFT) and `python serve.py` pick up out/pretrain by default.
Out of memory on a GPU? Lower --batch-size and raise --grad-accum (same global batch), or add
--activation-checkpointing full.
"""
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanostack import checkpoint, data, distributed, download, objectives
from nanostack.distributed import ParallelConfig
from nanostack.cli import add_dataclass_args, dataclass_from_args, given_fields, make_parser, run
from nanostack.model import GPT, ModelConfig, default_learning_rate
from nanostack.tokenizer import Tokenizer
from nanostack.training import TrainConfig, bits_per_byte, resolve_device, train


@dataclass
class PretrainConfig:
    source: str = "stdlib"          # corpus: stdlib (no download) | .txt/.jsonl/.parquet file or dir | fineweb-edu-10bt | fineweb-edu-100b-shuffle | FILE.urls
    max_shards: int = 0             # web corpora: download only the first N shards (0 = all)
    tokenizer: str = "out/tokenizer.json"  # tokenizer file: reused if it exists, else trained and saved here
    vocab_size: int = 4096          # vocabulary size when a tokenizer is trained (ordinary + special tokens)
    tokenizer_max_mb: float = 8.0   # megabytes of corpus text used to train the tokenizer
    data_dir: str = ""              # token shards; empty = data/<source name> beside --tokenizer
    val_fraction: float = 0.02      # share of documents held out for validation (split by document)
    depth: int = 3                  # model size dial: width = 64 * depth, heads of 64 dims, lr scaled to match
    seq_len: int = 256              # tokens per training sequence (the model's context length)
    eval_batches: int = 16          # validation batches per evaluation
    sample_tokens: int = 48         # tokens in each printed sample


# The tokenizer sets the vocabulary and --seq-len the context, so they are not model flags.
MODEL_FIELDS_SET_ELSEWHERE = ("vocab_size", "max_seq_len")


def parse_args(argv=None):
    """Flags come from PretrainConfig, TrainConfig and ModelConfig (model fields override the depth dial)."""
    parser = make_parser(__doc__)
    add_dataclass_args(parser, PretrainConfig, "data and size")
    add_dataclass_args(parser, TrainConfig, "training")
    add_dataclass_args(parser, ParallelConfig, "parallelism (under torchrun)")
    add_dataclass_args(parser, ModelConfig, "model (each overrides what --depth derives)", defaults_to_none=True,
                       skip=MODEL_FIELDS_SET_ELSEWHERE)
    return parser.parse_args(argv)


def load_or_train_tokenizer(path, source: str, vocab_size: int, max_mb: float) -> Tokenizer:
    """Reuse the tokenizer file if it exists; otherwise train one on the first `max_mb` MB of `source` and save it.
    Either way its vocabulary is `vocab_size` tokens, or this raises before anything is written."""
    path = Path(path)
    if path.exists():
        tokenizer = Tokenizer.load(path)
        if tokenizer.vocab_size != vocab_size:
            raise ValueError(f"{path} holds a {tokenizer.vocab_size}-token tokenizer, but --vocab-size is "
                             f"{vocab_size}: pass --vocab-size {tokenizer.vocab_size} to use it, or another "
                             f"--tokenizer path (or delete {path}) to train a {vocab_size}-token one")
        return tokenizer
    budget, texts = int(max_mb * 1e6), []
    for document in data.iter_documents(source):
        texts.append(document.text)
        budget -= len(document.text)
        if budget <= 0:
            break
    megabytes = sum(map(len, texts)) / 1e6
    if not megabytes:
        raise ValueError(f"source {source!r} holds no text to train a tokenizer on ({len(texts)} empty documents)")
    start = time.time()
    print(f"training a {vocab_size}-token tokenizer on {megabytes:.1f} MB of {source}", flush=True)
    tokenizer = Tokenizer.train(texts, vocab_size)
    if tokenizer.vocab_size != vocab_size:
        raise ValueError(f"{megabytes:.2f} MB of {source} hold too few distinct pairs for a {vocab_size}-token "
                         f"vocabulary (they make {tokenizer.vocab_size}): lower --vocab-size, or give more text")
    tokenizer.save(path)
    print(f"tokenizer trained in {time.time() - start:.0f}s: {path}")
    return tokenizer


def default_data_dir(tokenizer_path, source: str) -> Path:
    """Where the token shards of `source` go: beside the tokenizer, in data/<source name>."""
    return Path(tokenizer_path).parent / "data" / Path(source).name


def main(argv=None) -> int:
    args = parse_args(argv)
    config = dataclass_from_args(PretrainConfig, args)
    train_config = dataclass_from_args(TrainConfig, args)
    parallel = dataclass_from_args(ParallelConfig, args)
    rank = distributed.setup(resolve_device(train_config.device), parallel)
    say = print if rank.is_main else (lambda *a, **k: None)
    device = rank.device
    torch.manual_seed(train_config.seed)
    # A run to resume must exist: read its config (cheap) before any download, tokenizer or data work.
    resumed_config = checkpoint.read_config(train_config.out_dir)[0] if train_config.resume else None

    # Rank 0 downloads, trains the tokenizer and tokenizes the corpus; the others wait, then read what it wrote.
    download_dir = Path(config.tokenizer).parent / "download" / Path(config.source).stem
    if rank.is_main:
        config.source = download.download_source(config.source, download_dir, config.max_shards or None)
        tokenizer = load_or_train_tokenizer(config.tokenizer, config.source, config.vocab_size,
                                            config.tokenizer_max_mb)
    distributed.barrier()
    if not rank.is_main:
        config.source = download.download_source(config.source, download_dir, config.max_shards or None)  # now on disk
        tokenizer = Tokenizer.load(config.tokenizer)
    data_dir = Path(config.data_dir or default_data_dir(config.tokenizer, config.source))
    if rank.is_main:
        data.prepare_tokens(config.source, tokenizer, data_dir, val_fraction=config.val_fraction)
    distributed.barrier()
    train_shards = data.TokenShards(data_dir, "train", tokenizer)
    val_shards = data.TokenShards(data_dir, "val", tokenizer)

    def loader_of(split: str, shards, shuffle: bool) -> data.BatchLoader:
        """A loader over one split; building it checks the split holds a batch, so a split too small (validation
        included) fails here, before step 1, not when training is over."""
        try:
            return data.BatchLoader(shards, train_config.batch_size, config.seq_len, seed=train_config.seed,
                                    rank=rank.dp_rank, world_size=rank.size("dp"), shuffle=shuffle)
        except ValueError as error:
            raise ValueError(f"the {split} split of {data_dir} ({shards.num_documents:,} documents) is too small: "
                             f"{error}; documents are split whole (--val-fraction {config.val_fraction}), so a "
                             f"corpus of few documents can leave a split empty: add documents or change "
                             f"--val-fraction") from None
    loader = loader_of("train", train_shards, shuffle=True)
    loader_of("validation", val_shards, shuffle=False)
    say(f"data: {len(train_shards):,} train tokens, {len(val_shards):,} val tokens in {data_dir}")

    if resumed_config is not None:
        model_config = resumed_config
    else:
        model_config = ModelConfig.from_depth(config.depth, vocab_size=tokenizer.vocab_size,
                                              max_seq_len=config.seq_len,
                                              **given_fields(ModelConfig, args, skip=MODEL_FIELDS_SET_ELSEWHERE))
    model = GPT(model_config).to(device)
    if not train_config.lr:
        train_config.lr = default_learning_rate(model_config)
    say(f"model: {model.num_params():,} parameters ({model.num_params(non_embedding=True):,} non-embedding), "
        f"{model_config.n_layer} layers x {model_config.n_embd} wide; lr {train_config.lr:.2e}; "
        f"device {device} x {rank.world_size} (dp {rank.size('dp')} {parallel.strategy}, tp {parallel.tp}, "
        f"pp {parallel.pp})")
    model_parallel = parallel.tp > 1 or parallel.pp > 1
    if model_parallel:
        say("samples are off under --tp/--pp (no rank holds the whole model): serve the checkpoint instead")

    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)

    def evaluate(model):
        # A pipeline evaluates a step's worth of micro-batches at a time.
        batch_size = train_config.batch_size * (train_config.grad_accum if parallel.pp > 1 else 1)
        batches = data.eval_batches(val_shards, batch_size, config.seq_len, config.eval_batches,
                                    rank=rank.dp_rank, world_size=rank.size("dp"))
        return bits_per_byte(model, batches, token_bytes)

    def sample(model):
        prompt = torch.tensor([tokenizer.bos_prefix + tokenizer.encode("def ")], device=device)
        generator = torch.Generator(device=device).manual_seed(train_config.seed)
        new_tokens = min(config.sample_tokens, model_config.max_seq_len - prompt.shape[1])
        out = model.generate(prompt, new_tokens, temperature=0.8, top_k=50, generator=generator)
        return tokenizer.decode(out[0, len(tokenizer.bos_prefix):].tolist())

    start = time.time()
    metrics = train(model, objectives.next_token, loader, train_config, model_config=model_config,
                    tokenizer=tokenizer, evaluate=evaluate, sample=None if model_parallel else sample,
                    parallel=parallel, rank=rank)
    say(f"done in {time.time() - start:.0f}s: val loss {metrics.get('loss', float('nan')):.4f}, "
        f"val bits/byte {metrics.get('bpb', float('nan')):.4f}; checkpoint in "
        f"{checkpoint.resolve_checkpoint(train_config.out_dir)}")
    if not model_parallel:
        say("sample:", repr(sample(model)))
    distributed.teardown()
    return 0


if __name__ == "__main__":
    run(main)

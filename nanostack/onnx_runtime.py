"""Run an exported model with ONNX Runtime: numpy, onnxruntime and the tokenizer, no torch.

    python -m nanostack.onnx_runtime --model out/onnx --prompt "def fib(n):"
    python -m nanostack.onnx_runtime --model out/onnx/model.int8.onnx --chat true --prompt "what does json.dumps do?"
    python -m nanostack.onnx_runtime --model out/onnx --prompt "import" --temperature 0.8 --top-p 0.95 --seed 1

`python -m nanostack.onnx_export` writes the directory: model.onnx (fp32), model.int8.onnx (int8 weights),
the tokenizer files and onnx_config.json. The graph is one decoder step over a KV cache:

    input_ids (B, T) int64, attention_mask (B, P + T) int64, past_keys / past_values (n_layer, B, P, n_kv_head, hd)
      -> logits (B, T, vocab) fp32, present_keys / present_values (n_layer, B, P + T, n_kv_head, hd)

A prompt is the step with an empty past (P = 0); each generated token is a step with T = 1 whose past is the
previous step's present. Prompts of different lengths share a batch left-padded: attention_mask is 0 on the
padding, which no real token attends to, and positions count from each row's first real token.

The graph carries the fingerprint of the tokenizer it was exported with (its metadata), and a tokenizer whose
vocabulary differs is refused by name rather than producing wrong tokens. Sampling follows nanostack/sampling.py:
temperature 0 is greedy; top_k and top_p cut the distribution the same way, ties kept together.
"""
import hashlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime

from nanostack.cli import add_dataclass_args, dataclass_from_args, make_parser, run
from nanostack.tokenizer import Tokenizer

GRAPH_FORMAT = "nanostack-onnx-decoder"  # the graph's metadata "format": written by onnx_export.py, read here
FP32_GRAPH, INT8_GRAPH = "model.onnx", "model.int8.onnx"


def tokenizer_fingerprint(tokenizer: Tokenizer) -> str:
    """A short sha256 of what decides the token ids, whatever file format they came in: the split pattern and
    normalizer, each token's bytes and rank, the ids of the ranks (Hugging Face's), the special tokens."""
    digest = hashlib.sha256(json.dumps([tokenizer.pattern, tokenizer.normalizer, tokenizer.token_ids,
                                        sorted(tokenizer.special_tokens.items())]).encode())
    for token, rank in sorted(tokenizer.mergeable_ranks.items(), key=lambda item: item[1]):
        digest.update(rank.to_bytes(4, "little") + len(token).to_bytes(4, "little") + token)
    return digest.hexdigest()[:16]


def resolve_graph(path) -> Path:
    """The .onnx file at `path`, or the fp32 graph of an export directory."""
    path = Path(path)
    graph = path / FP32_GRAPH if path.is_dir() else path
    if not graph.is_file():
        raise ValueError(f"no ONNX graph at {graph}: `python -m nanostack.onnx_export --model CHECKPOINT --out DIR` "
                         f"writes DIR/{FP32_GRAPH} and DIR/{INT8_GRAPH}; pass DIR or one of those files")
    return graph


class OnnxDecoder:
    """An exported decoder graph in an ONNX Runtime session, with the tokenizer it was exported with."""

    def __init__(self, path, tokenizer_path=None, threads: int = 0):
        self.graph = resolve_graph(path)
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads  # 0 = ONNX Runtime's choice (one per physical core)
        try:
            self.session = onnxruntime.InferenceSession(self.graph, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # ONNX Runtime's errors (InvalidProtobuf, Fail, ...) derive from Exception only
            raise ValueError(f"ONNX Runtime {onnxruntime.__version__} cannot load {self.graph}: {error}") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("format") != GRAPH_FORMAT:
            raise ValueError(f"{self.graph} is not a graph of python -m nanostack.onnx_export (metadata format "
                             f"{meta.get('format')!r}, expected {GRAPH_FORMAT!r})")
        tokenizer_path = Path(tokenizer_path) if tokenizer_path else self.graph.parent / "tokenizer.json"
        if not tokenizer_path.is_file():
            raise ValueError(f"no tokenizer at {tokenizer_path}: the export writes tokenizer.json beside the graphs; "
                             f"pass --tokenizer with the tokenizer.json the model was exported with")
        self.tokenizer = Tokenizer.load(tokenizer_path)
        given = tokenizer_fingerprint(self.tokenizer)
        if given != meta["tokenizer_fingerprint"]:
            raise ValueError(
                f"{self.graph} was exported with tokenizer {meta['tokenizer_name']!r} (vocab_size "
                f"{meta['tokenizer_vocab_size']}, fingerprint {meta['tokenizer_fingerprint']}, from "
                f"{meta['tokenizer_source']}), but {tokenizer_path} is tokenizer {self.tokenizer.name!r} (vocab_size "
                f"{self.tokenizer.vocab_size}, fingerprint {given}): pass the tokenizer.json exported beside the graph")
        self.max_seq_len = int(meta["max_seq_len"])
        n_layer, _, _, n_kv_head, head_dim = self.session.get_inputs()[2].shape  # past_keys
        self.kv_shape = (n_layer, n_kv_head, head_dim)

    def step(self, input_ids, attention_mask, past_keys, past_values):
        """One graph run: (logits (B, T, vocab), present_keys, present_values), shapes as the module docstring says."""
        return self.session.run(None, {"input_ids": input_ids, "attention_mask": attention_mask,
                                       "past_keys": past_keys, "past_values": past_values})

    def empty_past(self, batch: int) -> np.ndarray:
        """The past of a prompt: (n_layer, batch, 0, n_kv_head, head_dim), no positions yet."""
        n_layer, n_kv_head, head_dim = self.kv_shape
        return np.zeros((n_layer, batch, 0, n_kv_head, head_dim), dtype=np.float32)

    def check_length(self, prompt_len: int, max_new_tokens: int = 0) -> None:
        """Raise a ValueError if the positions would pass the model's max_seq_len (the end of its RoPE tables)."""
        if prompt_len + max_new_tokens > self.max_seq_len:
            raise ValueError(f"a {prompt_len}-token prompt + {max_new_tokens} new tokens exceeds the model's "
                             f"max_seq_len={self.max_seq_len}; shorten the prompt or lower --max-tokens")

    def logits(self, prompts: list[list[int]]) -> list[np.ndarray]:
        """Logits (len(prompt), vocab) of every position of each prompt, all prompts in one left-padded batch."""
        ids, mask = left_pad(prompts)
        self.check_length(ids.shape[1])
        logits = self.step(ids, mask, self.empty_past(len(prompts)), self.empty_past(len(prompts)))[0]
        return [row[ids.shape[1] - len(prompt):] for row, prompt in zip(logits, prompts)]

    def generate(self, prompts: list[list[int]], max_new_tokens: int, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop_ids=()) -> list[list[int]]:
        """The new tokens of each prompt (one batch, left-padded), up to max_new_tokens or to the first of
        stop_ids (not included); temperature 0 is greedy."""
        ids, mask = left_pad(prompts)
        self.check_length(ids.shape[1], max_new_tokens)
        check_sampling(temperature, top_k, top_p)
        rng = np.random.default_rng(seed)
        keys = values = self.empty_past(len(prompts))
        new_tokens, running = [[] for _ in prompts], np.ones(len(prompts), dtype=bool)
        for _ in range(max_new_tokens):
            logits, keys, values = self.step(ids, mask, keys, values)
            next_ids = sample_next(logits[:, -1], temperature, top_k, top_p, rng)  # (B,)
            for row in np.flatnonzero(running):  # a stopped row still runs (the batch is one tensor), unread
                if int(next_ids[row]) in stop_ids:
                    running[row] = False
                else:
                    new_tokens[row].append(int(next_ids[row]))
            if not running.any():
                break
            ids, mask = next_ids[:, None], np.concatenate([mask, np.ones_like(mask[:, :1])], axis=1)
        return new_tokens


def left_pad(prompts: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    """Prompts of different lengths as one batch: ids (B, longest) int64 padded on the left, and the mask that is
    1 on the real tokens."""
    if not prompts or any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("every prompt needs at least one token")
    longest = max(len(prompt) for prompt in prompts)
    ids = np.zeros((len(prompts), longest), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = 1
    return ids, mask


def check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    """Raise a ValueError naming a sampling setting out of its range."""
    if temperature < 0 or top_k < 0 or not 0 < top_p <= 1:
        raise ValueError(f"temperature={temperature}, top_k={top_k}, top_p={top_p}: expected temperature >= 0 "
                         f"(0 = greedy), top_k >= 0 (0 = off) and top_p in (0, 1] (1 = off)")


def filtered_logits(logits: np.ndarray, temperature: float, top_k: int, top_p: float) -> np.ndarray:
    """Temperature-scaled float64 logits (B, vocab) with the tokens that top_k / top_p cut set to -inf."""
    logits = logits.astype(np.float64) / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth_largest = np.sort(logits, axis=-1)[:, vocab - top_k, None]  # (B, 1)
        logits = np.where(logits < kth_largest, -np.inf, logits)
    if top_p < 1:
        sorted_logits = -np.sort(-logits, axis=-1)  # (B, vocab), most likely first
        probs = softmax(sorted_logits)
        mass_before = np.cumsum(probs, axis=-1) - probs  # of the strictly more likely tokens
        last_kept = (mass_before < top_p).sum(axis=-1) - 1  # the first token always stays (its mass_before is 0)
        threshold = sorted_logits[np.arange(len(logits)), last_kept][:, None]
        logits = np.where(logits < threshold, -np.inf, logits)
    return logits


def softmax(logits: np.ndarray) -> np.ndarray:
    """softmax over the last axis, -inf entries getting probability 0."""
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


def sample_next(logits: np.ndarray, temperature: float, top_k: int, top_p: float, rng) -> np.ndarray:
    """One token id per row of logits (B, vocab): the argmax at temperature 0, else a draw from `rng`."""
    if temperature == 0:
        return logits.argmax(axis=-1)
    probs = softmax(filtered_logits(logits, temperature, top_k, top_p))
    return np.array([rng.choice(len(row), p=row) for row in probs])


# ----------------------------------------------------------------------------------------------------------
# Command line

@dataclass
class RunConfig:
    model: str = "out/onnx"         # export directory (its model.onnx) or a .onnx file (e.g. DIR/model.int8.onnx)
    tokenizer: str = ""             # tokenizer.json to use; empty = the one beside the graph
    prompt: str = "def "            # text to continue (with --chat: the user's message)
    chat: bool = False              # wrap the prompt in the chat template and stop at the end of the reply
    max_tokens: int = 64            # new tokens at most
    temperature: float = 0.0        # 0 = greedy
    top_k: int = 0                  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0              # nucleus sampling mass; 1 = off
    seed: int = 0                   # sampling seed (the same seed gives the same tokens)
    threads: int = 0                # ONNX Runtime intra-op threads; 0 = one per physical core


def main(argv=None) -> int:
    parser = make_parser(__doc__, prog="python -m nanostack.onnx_runtime")
    add_dataclass_args(parser, RunConfig, "ONNX Runtime generation")
    config = dataclass_from_args(RunConfig, parser.parse_args(argv))
    if config.max_tokens < 1:
        raise ValueError(f"--max-tokens {config.max_tokens}; expected >= 1")
    decoder = OnnxDecoder(config.model, config.tokenizer or None, config.threads)
    tokenizer = decoder.tokenizer
    if config.chat:
        prompt = tokenizer.render_prompt([{"role": "user", "content": config.prompt}])
    else:  # as every training document started
        prompt = ([] if tokenizer.bos_id is None else [tokenizer.bos_id]) + tokenizer.encode(config.prompt)
    start = time.perf_counter()
    new_tokens = decoder.generate([prompt], config.max_tokens, temperature=config.temperature, top_k=config.top_k,
                                  top_p=config.top_p, seed=config.seed, stop_ids=tokenizer.stop_ids)[0]
    seconds = time.perf_counter() - start
    print(("" if config.chat else config.prompt) + tokenizer.decode(new_tokens))
    print(f"{len(new_tokens)} tokens in {seconds:.2f} s ({len(new_tokens) / seconds:.1f} tokens/s) with "
          f"{decoder.graph} on ONNX Runtime {onnxruntime.__version__}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    run(main)

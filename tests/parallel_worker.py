"""Several parallel layouts in one job, for tests/test_parallel.py: `torchrun ... parallel_worker.py WORK SPECS`.

Each spec names a layout (ParallelConfig fields), its per-rank batch and, optionally, a run whose step-3
checkpoint it resumes from. Every layout trains the same tiny model for STEPS steps with training.train() on the
same token stream and writes its run directory WORK/<name>; the test compares them with `run_layout` called in
one process. One torchrun launch serves many layouts, since starting one costs seconds on a small CPU.
"""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from nanostack import data, distributed, objectives
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer
from nanostack.training import TrainConfig, bits_per_byte, train

STEPS, SEQ_LEN, VOCAB = 5, 32, 320
MODEL = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=SEQ_LEN)
# grad_clip below the gradient norms of these steps, so every update depends on the global norm being right.
TRAIN = dict(steps=STEPS, batch_size=4, lr=3e-3, warmup_steps=2, grad_clip=0.5, log_every=1, eval_every=0,
             sample_every=0, save_every=3, keep=3)
TOKENS = np.random.default_rng(0).integers(0, VOCAB, 40 * SEQ_LEN + 1)
VAL_TOKENS = np.random.default_rng(1).integers(0, VOCAB, 8 * SEQ_LEN + 1)


def interrupted_copy(work: Path, source: str, dest: str, at_step: int = 3) -> None:
    """A copy of run `source` as if it had stopped right after its step-`at_step` checkpoint."""
    shutil.rmtree(work / dest, ignore_errors=True)
    shutil.copytree(work / source, work / dest)
    for later in (work / dest).glob("step_*"):
        if int(later.name.split("_")[1]) > at_step:
            shutil.rmtree(later)
    (work / dest / "latest").write_text(f"step_{at_step:06d}\n")


def run_layout(work: Path, spec: dict) -> None:
    """Train one layout (or, outside torchrun, the single-process reference) into work/<name>."""
    parallel = distributed.ParallelConfig(**spec.get("parallel", {}))
    rank = distributed.setup(torch.device("cpu"), parallel)
    config = TrainConfig(out_dir=str(work / spec["name"]), **{**TRAIN, **spec.get("train", {})})
    if spec.get("resume_from"):
        if rank.is_main:
            interrupted_copy(work, spec["resume_from"], spec["name"])
        distributed.barrier()
        config.resume = True
    torch.manual_seed(config.seed)
    model = GPT(ModelConfig(**{**MODEL, **spec.get("model", {})}))
    tokenizer = Tokenizer.load(work / "tokenizer.json")
    token_bytes = torch.tensor(tokenizer.token_bytes())
    loader = data.BatchLoader(TOKENS, config.batch_size, SEQ_LEN, seed=config.seed, rank=rank.dp_rank,
                              world_size=rank.size("dp"))
    eval_rows = config.batch_size * (config.grad_accum if parallel.pp > 1 else 1)

    def evaluate(model):
        batches = data.eval_batches(VAL_TOKENS, eval_rows, SEQ_LEN, 8 // (eval_rows * rank.size("dp")),
                                    rank=rank.dp_rank, world_size=rank.size("dp"))
        return bits_per_byte(model, batches, token_bytes)

    train(model, objectives.next_token, loader, config, model_config=model.config, tokenizer=tokenizer,
          evaluate=evaluate, parallel=parallel, rank=rank)


if __name__ == "__main__":
    work = Path(sys.argv[1])
    for spec in json.loads(sys.argv[2]):
        run_layout(work, spec)
    distributed.teardown()

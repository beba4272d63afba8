"""Distributed training: what each strategy costs per rank, side by side in one run.

    python bench/bench_distributed.py                       # CPU: per-rank parameter + optimizer bytes, 2 and 4 ranks
    python bench/bench_distributed.py --device cuda         # GPU: tokens/s and peak memory per strategy and AC mode

Each configuration runs as its own `torchrun` job of this same file in worker mode; the parent collects the
results, prints a table and writes bench/results/distributed-<device>.json. On CPU the point is the memory
accounting (FSDP2 should hold ~1/N of what DDP holds per rank); on a GPU it is throughput and peak memory.
Targets on H100: FSDP2 within 5% of DDP's tokens/s at one GPU; activation checkpointing costs <= 30% of
throughput for >= 40% less activation memory.
"""
import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import local_bytes, print_table, run_job, write_result  # noqa: E402
from nanostack import distributed  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402
from nanostack.training import TrainConfig, make_optimizer  # noqa: E402


@dataclass
class BenchConfig:
    device: str = "cpu"             # cpu (memory accounting) | cuda (throughput and peak memory)
    depth: int = 0                  # model depth; 0 = 6 on CPU, 12 (~124M parameters with vocab 50304) on GPU
    vocab_size: int = 50304         # GPT-2 vocabulary, padded to a multiple of 64
    seq_len: int = 0                # 0 = 128 on CPU, 1024 on GPU
    batch_size: int = 0             # per-rank micro-batch; 0 = 2 on CPU, 16 on GPU
    steps: int = 0                  # timed steps after 2 warmup steps; 0 = 2 on CPU, 20 on GPU
    compile: bool = False           # torch.compile the blocks (GPU)
    worker: str = ""                # internal: run one configuration and write its result here


def run_worker(config: BenchConfig, strategy: str, ac: str) -> None:
    """One configuration, under torchrun (or alone for strategy none); rank 0 writes the result."""
    rank = distributed.setup(torch.device(config.device))
    device = rank.device
    torch.manual_seed(0)
    model_config = ModelConfig.from_depth(config.depth, vocab_size=config.vocab_size, max_seq_len=config.seq_len)
    model = GPT(model_config).to(device)
    on_gpu = device.type == "cuda"
    step_model = distributed.parallelize(model, distributed.ParallelConfig(strategy=strategy, activation_checkpointing=ac),
                                         rank, compile=config.compile,
                                         param_dtype=torch.bfloat16 if on_gpu else torch.float32)
    optimizer = make_optimizer(model, TrainConfig(), lr=1e-4)
    x = torch.randint(0, config.vocab_size, (config.batch_size, config.seq_len + 1), device=device)
    # As in training.py: bf16 autocast on GPU (FSDP2 also casts parameters with its mixed-precision policy).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu)

    def step():
        with autocast:
            loss = step_model(x[:, :-1], x[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(config.steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    param_bytes = local_bytes(model.parameters())
    optimizer_bytes = local_bytes(v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v))
    result = {"strategy": strategy, "activation_checkpointing": ac, "ranks": rank.world_size,
              "params_mb_per_rank": param_bytes / 2**20, "optimizer_mb_per_rank": optimizer_bytes / 2**20,
              "tokens_per_s": config.steps * config.batch_size * config.seq_len * rank.world_size / elapsed}
    if on_gpu:
        result["peak_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    if rank.is_main:
        Path(config.worker).write_text(json.dumps(result))
    distributed.teardown()


def launch(config: BenchConfig, strategy: str, ac: str, ranks: int) -> dict:
    """Run one configuration as its own job and return its result."""
    flags = [f"--device={config.device}", f"--depth={config.depth}", f"--vocab-size={config.vocab_size}",
             f"--seq-len={config.seq_len}", f"--batch-size={config.batch_size}", f"--steps={config.steps}",
             f"--compile={config.compile}"]
    return run_job(__file__, ranks, flags, f"{strategy}:{ac}", torchrun=strategy != "none")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    on_gpu = config.device != "cpu"
    config.depth = config.depth or (12 if on_gpu else 6)
    config.seq_len = config.seq_len or (1024 if on_gpu else 128)
    config.batch_size = config.batch_size or (16 if on_gpu else 2)
    config.steps = config.steps or (20 if on_gpu else 2)
    if config.worker:
        path, strategy, ac = config.worker.rsplit(":", 2)
        config.worker = path
        run_worker(config, strategy, ac)
        return
    if on_gpu:
        runs = [(s, ac, 1) for s in ("none", "ddp", "fsdp") for ac in ("none", "selective", "full")]
        runs += [(s, "none", torch.cuda.device_count()) for s in ("ddp", "fsdp") if torch.cuda.device_count() > 1]
    else:
        runs = [("none", "none", 1)] + [(s, "none", n) for n in (2, 4) for s in ("ddp", "fsdp")]
    rows = [launch(config, strategy, ac, ranks) for strategy, ac, ranks in runs]
    print_table(rows, f"depth {config.depth}, seq {config.seq_len}, batch {config.batch_size} per rank, {config.device}")
    write_result("distributed", {"config": vars(config), "rows": rows}, device=config.device)


if __name__ == "__main__":
    main()

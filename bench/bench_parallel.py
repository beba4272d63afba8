"""Model-parallel training: what each mesh layout costs per rank, and the pipeline bubble, side by side in one run.

    python bench/bench_parallel.py                  # CPU (gloo): layouts of 1, 2 and 4 ranks, and the bubble
    python bench/bench_parallel.py --device cuda    # GPU: the layouts that fit the visible GPUs, with MFU

Each layout runs as its own torchrun job of this same file in worker mode (so memory counts start from zero),
with the same global batch of sequences per step. For the rank holding the most, it reports parameter, gradient
and optimizer-state bytes (its shards only: FSDP2 keeps ~1/dp, tp ~1/tp of every split matrix, pp ~1/pp of the
layers), the peak memory (the CUDA allocator's peak; on CPU the process's peak RSS, which includes ~0.4 GB of
libraries) and the job's tokens/s (and MFU on GPU). Under tp the gradients exceed the parameters by
vocab x n_embd x (1 - 1/tp): DTensor's embedding backward produces the table's gradient whole on every tp rank
(from the sequence-split activations), and the optimizer reads its own rows of it.

The pipeline bubble is measured with the real schedules (torch.distributed.pipelining over gloo) running stages
whose compute is a fixed wait, FORWARD_S per micro-batch forward and twice that backward: waiting costs no CPU,
so what is measured is the schedule's idle time and not the shared machine's. bubble = 1 - m * (f + b) / step
time, against the formula (p - 1) / (v m + p - 1) for p ranks, m micro-batches and v stages per rank: GPipe
and 1F1B (v = 1), interleaved 1F1B (v = 2, each stage half a rank's wait). It also counts the most micro-batches
whose activations rank 0 holds at once (m for GPipe, p for 1F1B, a little more interleaved: a chunk's count 1/v).
"""
import argparse
import json
import os
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from bench.common import local_bytes, print_table, run_job, write_result  # noqa: E402
from nanostack import distributed  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402
from nanostack.parallel import Pipeline, clip_grad_norm_, rank_stages, vocab_parallel_loss  # noqa: E402
from nanostack.training import TrainConfig, make_optimizer, peak_flops  # noqa: E402

FORWARD_S = 0.02
# (name, ranks, ParallelConfig fields, micro-batches per step); the global batch is the same for every layout.
LAYOUTS = [
    ("single", 1, {}, 1),
    ("fsdp dp4", 4, {"strategy": "fsdp"}, 1),
    ("tp2", 2, {"tp": 2}, 1),
    ("tp4", 4, {"tp": 4}, 1),
    ("fsdp dp2 x tp2", 4, {"strategy": "fsdp", "tp": 2}, 1),
    ("pp2 1f1b", 2, {"pp": 2}, 4),
    ("pp4 1f1b", 4, {"pp": 4}, 4),
    ("pp2 x fsdp dp2", 4, {"strategy": "fsdp", "pp": 2}, 4),
    ("pp2 x tp2", 4, {"tp": 2, "pp": 2}, 4),
]


@dataclass
class BenchConfig:
    device: str = "cpu"             # cpu (gloo: memory table, tokens/s, bubble) | cuda (NCCL: also MFU)
    depth: int = 0                  # model depth (= heads; width 64 * depth); 0 = 4 on CPU, 12 on GPU
    vocab_size: int = 0             # 0 = 4096 on CPU, 50304 (GPT-2's, padded) on GPU
    seq_len: int = 0                # 0 = 128 on CPU, 1024 on GPU
    global_batch: int = 0           # sequences per optimizer step over all ranks; 0 = 16 on CPU, 64 on GPU
    steps: int = 0                  # timed steps after one warmup step; 0 = 3 on CPU, 10 on GPU
    worker: str = ""                # internal: run one layout (or the bubble, "bubble:P") and write its result here


def run_layout(config: BenchConfig, layout: dict) -> dict:
    """One layout under torchrun: a few training steps, then the per-rank byte counts (max over ranks)."""
    parallel = distributed.ParallelConfig(**layout["parallel"])
    rank = distributed.setup(torch.device(config.device), parallel)
    device, micro_batches, dp = rank.device, layout["micro_batches"], rank.size("dp")
    torch.manual_seed(0)
    model_config = ModelConfig.from_depth(config.depth, vocab_size=config.vocab_size, max_seq_len=config.seq_len)
    model = GPT(model_config).to(device)
    flops_per_token = model.flops_per_token()
    on_gpu = device.type == "cuda"
    step_model = distributed.parallelize(model, parallel, rank, param_dtype=torch.bfloat16 if on_gpu else torch.float32,
                                         micro_batches=micro_batches)
    optimizer = make_optimizer(model, TrainConfig(), lr=1e-4)
    rows = config.global_batch // (dp * micro_batches)  # sequences per micro-batch on this rank
    batch = torch.randint(0, config.vocab_size, (micro_batches, rows, config.seq_len + 1), device=device)
    micro = [(b[:, :-1], b[:, 1:]) for b in batch]
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu)
    sizes = {}

    def step():
        with autocast:
            if isinstance(step_model, Pipeline):
                step_model.step(micro)
            else:
                for x, y in micro:
                    with vocab_parallel_loss(rank.size("tp")):
                        (step_model(x, y) / micro_batches).backward()
        sizes["grads"] = local_bytes(p.grad for p in model.parameters() if p.grad is not None)
        clip_grad_norm_(model.parameters(), 1.0, rank.mesh)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    distributed.barrier()
    start = time.perf_counter()
    for _ in range(config.steps):
        step()
    if on_gpu:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    per_rank = torch.tensor([local_bytes(model.parameters()), sizes["grads"],
                             local_bytes(v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)),
                             peak], dtype=torch.float64, device=device)
    if dist.is_initialized():
        dist.all_reduce(per_rank, op=dist.ReduceOp.MAX)
    params, grads, optimizer_bytes, peak = (float(v) / 2**20 for v in per_rank)
    tokens_per_s = config.steps * config.global_batch * config.seq_len / elapsed
    result = {"layout": layout["name"], "ranks": rank.world_size, "micro_batches": micro_batches,
              "params_mb": params, "grads_mb": grads, "optimizer_mb": optimizer_bytes,
              ("peak_memory_mb" if on_gpu else "peak_rss_mb"): peak, "tokens_per_s": tokens_per_s}
    if on_gpu and peak_flops(device):
        result["mfu"] = flops_per_token * tokens_per_s / (peak_flops(device) * rank.world_size)
    distributed.teardown()
    return result


class Wait(torch.autograd.Function):
    """A stage's stand-in compute: `seconds` forward, twice that backward; counts the activations held, in
    micro-batches of a whole rank's layers (an interleaved chunk's count as 1/v)."""
    in_flight = most_in_flight = 0

    @staticmethod
    def forward(ctx, x, seconds, share):
        ctx.seconds, ctx.share = seconds, share
        time.sleep(seconds)
        Wait.in_flight += share
        Wait.most_in_flight = max(Wait.most_in_flight, Wait.in_flight)
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        time.sleep(2 * ctx.seconds)
        Wait.in_flight -= ctx.share
        return grad.clone(), None, None


class WaitStage(torch.nn.Module):
    """One of a rank's v stages: 1/v of its FORWARD_S."""

    def __init__(self, virtual: int):
        super().__init__()
        self.scale, self.virtual = torch.nn.Parameter(torch.ones(())), virtual

    def forward(self, x):
        return Wait.apply(x * self.scale, FORWARD_S / self.virtual, 1 / self.virtual)


def run_bubble(steps: int) -> list[dict]:
    """Under torchrun with p ranks on CPU: each schedule and micro-batch count, its step time and bubble."""
    from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe, ScheduleInterleaved1F1B
    dist.init_process_group("gloo")
    rank, p = dist.get_rank(), dist.get_world_size()
    rows = []
    for kind, schedule_class, v in (("gpipe", ScheduleGPipe, 1), ("1f1b", Schedule1F1B, 1),
                                    ("interleaved-1f1b", ScheduleInterleaved1F1B, 2)):
        for m in (1, 2, 4, 8, 16):
            if (kind == "1f1b" and m < p) or (v > 1 and m % p):  # what the schedules (and distributed.py) refuse
                continue
            stages = [PipelineStage(WaitStage(v), s, v * p, torch.device("cpu")) for s in rank_stages(p, rank, v)]
            schedule = schedule_class(stages if v > 1 else stages[0], m, loss_fn=lambda out, target: out.mean())
            x = torch.ones(m, 4)

            def step():
                if rank == 0:
                    schedule.step(x)
                elif rank == p - 1:
                    schedule.step(target=x)
                else:
                    schedule.step()

            step()  # the first step also infers the stages' shapes, with a forward that has no backward
            dist.barrier()
            Wait.in_flight = Wait.most_in_flight = 0
            start = time.perf_counter()
            for _ in range(steps):
                step()
            step_s = (time.perf_counter() - start) / steps
            held = torch.tensor([Wait.most_in_flight])
            dist.broadcast(held, src=0)  # rank 0's count: it holds the most
            rows.append({"schedule": kind, "stages": p, "virtual": v, "micro_batches": m, "step_s": step_s,
                         "bubble": 1 - m * 3 * FORWARD_S / step_s, "formula": (p - 1) / (v * m + p - 1),
                         "stage0_most_in_flight": float(held)})
    dist.destroy_process_group()
    return rows


def launch(config: BenchConfig, ranks: int, worker: str) -> dict | list:
    """Run one worker as its own torchrun job (or one process) and return its result."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in vars(config).items() if name != "worker"]
    return run_job(__file__, ranks, flags, worker)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    on_gpu = config.device != "cpu"
    config.depth = config.depth or (12 if on_gpu else 4)
    config.vocab_size = config.vocab_size or (50304 if on_gpu else 4096)
    config.seq_len = config.seq_len or (1024 if on_gpu else 128)
    config.global_batch = config.global_batch or (64 if on_gpu else 16)
    config.steps = config.steps or (10 if on_gpu else 3)
    if config.worker:
        path, worker = config.worker.split(":", 1)
        if worker.startswith("bubble"):
            result = run_bubble(config.steps)
        else:
            result = run_layout(config, json.loads(worker))
        if int(os.environ.get("RANK", "0")) == 0:
            Path(path).write_text(json.dumps(result))
        return
    available = torch.cuda.device_count() if on_gpu else 4
    rows = [launch(config, ranks, json.dumps({"name": name, "parallel": parallel, "micro_batches": m}))
            for name, ranks, parallel, m in LAYOUTS if ranks <= available]
    print_table(rows, f"depth {config.depth}, seq {config.seq_len}, {config.global_batch} sequences per step, "
                      f"{config.device}; bytes and peak memory of the rank holding the most")
    bubble = [row for p in (2, 4) for row in launch(config, p, "bubble")]
    print_table(bubble, f"pipeline bubble, stages of {FORWARD_S * 1e3:.0f} ms forward + {2 * FORWARD_S * 1e3:.0f} ms "
                        f"backward per micro-batch")
    write_result("parallel", {"config": vars(config), "layouts": rows, "bubble": bubble,
                              "notes": "CPU: 2 cores shared with other jobs, up to 4 ranks on 2 cores, so tokens/s "
                                       "compare poorly; the bytes are exact, and the bubble is measured with "
                                       "waits that cost no CPU"}, device=config.device)


if __name__ == "__main__":
    main()

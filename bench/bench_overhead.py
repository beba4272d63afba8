"""Host overhead of the serving engine: the time of one Engine.step() outside the model forward.

    python bench/bench_overhead.py                       # batches 1, 64, 256, three sampling modes, this CPU
    python bench/bench_overhead.py --modes greedy --profile 256   # and a cProfile of the steps at batch 256

On a GPU the model forward of a decode step is a few milliseconds at batch 256 for a 0.6B model, and every
microsecond the host spends around it (scheduling, block tables, building the step's tensors, sampling,
detokenizing, stop-string checks, building the outputs) is time the GPU waits, unless CUDA graphs and
asynchronous scheduling hide it. This measures that host time with a forward that costs nothing.

The stand-in forward (benchmark-only, never in the library) returns rows of a preallocated random logits table
instead of running a model, so a step's time minus the stand-in's own (timed inside the step and subtracted)
is the engine's host overhead. The vocabulary is kept small (--vocab-size 512): the argmax over the logits is
device arithmetic on a GPU, not host time, and on this CPU a 32k vocabulary would turn it into the largest
term. A real tokenizer of that size detokenizes the sampled tokens and every request streams its text.

Modes: `greedy` (temperature 0), `stop` (greedy, and every request has two stop strings, so each token goes
through the stop-string hold-back), `temperature` (temperature 1: the filtered softmax and exponential-race
sampling of sampling.py). Sampling is mostly arithmetic over (batch, vocab) logits that a GPU does in
microseconds but this CPU does slowly (an argmax over 256 x 512 logits takes ~0.3 ms; the exponential noise
of temperature sampling ~15 ns per value): `sample_ms` times sampling.sample alone on such logits, and
`host_ms` = step CPU time - sample_ms is what the target is judged on (sample_ms also holds sample's own
Python, so host_ms is if anything an underestimate by a few microseconds; the total is shown beside it).

Every request has a 16-token prompt and decodes for the whole run (ignore_eos, a max_tokens past the end);
the timed steps are those in which all `batch` requests decode one token each. Figures: median host time per
step as this thread's CPU time (the machine may be shared: other processes stretch wall time, not CPU time)
and as wall time, and per request. Targets (issue 16): <= 0.3 ms at batch 1, <= 1.5 ms at batch 256.
"""
import argparse
import cProfile
import dataclasses
import pstats
import random
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.bench_serving import made_up_tokenizer  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402
from nanostack.sampling import SamplingParams, sample  # noqa: E402
from nanostack.serving.engine import Engine, EngineConfig  # noqa: E402

TARGET_MS = {1: 0.3, 256: 1.5}


@dataclass
class BenchConfig:
    """Engine.step() time outside the model forward."""
    batches: str = "1,64,256"        # comma-separated numbers of decoding requests
    modes: str = "greedy,stop,temperature"  # comma-separated sampling modes (see the module docstring)
    steps: int = 200                 # timed steps per batch size
    vocab_size: int = 512            # logits width and tokenizer size (see the module docstring)
    device: str = "cpu"
    profile: int = 0                 # print a cProfile of the timed steps at this batch size (0 = none), each mode
    seed: int = 0


class StandInForward:
    """A forward that costs nothing: rows of a preallocated random logits table, timed so it can be subtracted."""

    def __init__(self, max_rows: int, vocab_size: int, device, seed: int):
        generator = torch.Generator().manual_seed(seed)
        self.tables = torch.randn(8, max_rows, vocab_size, generator=generator).to(device)  # a few, so tokens vary
        self.calls, self.wall, self.cpu = 0, 0.0, 0.0

    def __call__(self, token_ids, batch, k_pools, v_pools):
        wall, cpu = time.perf_counter(), time.thread_time()
        logits = self.tables[self.calls % len(self.tables), :batch.logits_indices.shape[0]]  # (rows, vocab)
        self.calls += 1
        self.wall += time.perf_counter() - wall
        self.cpu += time.thread_time() - cpu
        return logits


def sample_ms(logits: torch.Tensor, params: SamplingParams) -> float:
    """Median CPU milliseconds of sampling.sample alone on logits (batch, vocab), every row with params."""
    times = []
    for _ in range(20):
        start = time.thread_time()
        sample(logits, [params] * logits.shape[0], [None] * logits.shape[0])
        times.append(1e3 * (time.thread_time() - start))
    return statistics.median(times)


def measure(config: BenchConfig, batch_size: int, mode: str) -> dict:
    """Fill the engine with batch_size decoding requests, then time config.steps steps one by one."""
    tokenizer = made_up_tokenizer(config.vocab_size)
    # The model only provides what the engine reads off it (config, K/V layout, dtype); it never runs.
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=1, n_kv_head=1, n_embd=8,
                            max_seq_len=4096)).to(config.device)
    forward = StandInForward(batch_size, tokenizer.vocab_size, config.device, config.seed)
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=batch_size, max_num_batched_tokens=max(256, batch_size),
                                                   num_blocks=batch_size * (4096 // 16)), forward=forward)
    rng = random.Random(config.seed)
    stop = ["\n\n\n\n", "<|stop here|>"] if mode == "stop" else []
    for i in range(batch_size):
        params = SamplingParams(max_tokens=4000, temperature=1.0 if mode == "temperature" else 0.0, ignore_eos=True,
                                stop=stop)
        engine.add_request(f"r{i}", [rng.randrange(256) for _ in range(16)], params)
    while len(engine.scheduler.running) < batch_size or any(s.num_computed_tokens < len(s.token_ids) - 1
                                                            for s in engine.scheduler.running):
        engine.step()
    for _ in range(20):  # warm up the decode path
        engine.step()
    profiler = cProfile.Profile() if config.profile == batch_size else None
    wall_ms, cpu_ms = [], []
    for _ in range(config.steps):
        forward_wall, forward_cpu = forward.wall, forward.cpu
        if profiler:
            profiler.enable()
        wall, cpu = time.perf_counter(), time.thread_time()
        outputs = engine.step()
        wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
        if profiler:
            profiler.disable()
        if len(outputs) != batch_size:
            raise RuntimeError(f"a timed step moved {len(outputs)} requests, not {batch_size}")
        wall_ms.append(1e3 * (wall - (forward.wall - forward_wall)))
        cpu_ms.append(1e3 * (cpu - (forward.cpu - forward_cpu)))
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
    sampling = sample_ms(forward.tables[0, :batch_size], params)
    total = statistics.median(cpu_ms)
    target = TARGET_MS.get(batch_size)
    return {"mode": mode, "batch": batch_size, "cpu_median_ms": total, "sample_ms": sampling,
            "host_ms": total - sampling, "cpu_p90_ms": sorted(cpu_ms)[int(0.9 * len(cpu_ms))],
            "wall_median_ms": statistics.median(wall_ms), "us_per_request": 1e3 * (total - sampling) / batch_size,
            "target_ms": target, "meets_target": None if target is None else total - sampling <= target}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    torch.set_num_threads(1)  # host overhead is single-threaded Python; one thread keeps torch's ops comparable
    rows = [measure(config, int(batch), mode) for mode in config.modes.split(",") for batch in config.batches.split(",")]
    print_table(rows, title=f"Engine.step() host time outside the forward, ms (vocab {config.vocab_size}, "
                            f"{config.device}); host_ms = step CPU time - sample_ms, judged against the target")
    write_result("overhead", {"config": dataclasses.asdict(config), "rows": rows,
                              "note": "times are this thread's CPU time (the machine may be shared with other work; "
                                      "wall_median_ms shows how much it stretched wall time)"}, config.device)


if __name__ == "__main__":
    main()

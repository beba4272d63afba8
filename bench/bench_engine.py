"""Serving throughput: our engine against Hugging Face `transformers` generate on the same model, offline
(every request at once) or online (requests arriving over time, a cap on the requests in flight).

    python bench/bench_engine.py                                        # CPU-sized: depth 4, 16 requests
    python bench/bench_engine.py --device cuda --dtype bfloat16 --depth 12 --num-requests 256 \\
        --min-len 100 --max-len 1024 --cuda-graphs true                 # the nano-vllm workload on a GPU
    python bench/bench_engine.py --workload online --threads 1          # online, concurrency 16 (below)

Workload (nano-vllm's / mini-sglang's offline benchmark, scaled by flags): N requests of random token ids,
prompt and output lengths each uniform in [min_len, max_len], ignore_eos so every request generates exactly
its output length, greedy decoding. Output tokens/s = the requested output tokens / wall time.

The model is a random-weight GPT from `--depth`, saved as a checkpoint and exported with
`hf.export_hf`, so both sides run the same weights in the same dtype. HF runs the whole batch in one
`generate` call, left-padded: every row decodes until the longest output is done, and only each request's own
output counts. Its raw rate (every generated token, padding work included) is reported too.

`--tp 2` adds the engine split over two ranks (serving/tensor_parallel.py; GPUs cuda:0 and cuda:1, or two CPU
processes on gloo) beside the one-rank engine: wall time, decode-step time and whether the tokens agree. On a CPU
the ranks share the same cores (each gets half the threads), so only a GPU node shows what the split buys.

Online (`--workload online`; defaults: 64 requests, prompts 16..512 tokens, outputs 8..256, concurrency 16,
Poisson arrivals at --request-rate, 0 = all at time 0, seeded). A client keeps at most `concurrency` requests
in flight (vLLM's --max-concurrency); a request enters when it has arrived and a slot is free. The engine
(max_num_seqs = concurrency) takes each one at its next step. transformers serves the way one serves with
`generate`: static batches, i.e. whenever the model is free the requests that have arrived (up to
`concurrency`, waiting for the next one if none has) form one left-padded batch that decodes until its longest
output is done, and every request of the batch is answered then. Reported: output tokens/s and requests/s over
the span from the first arrival to the last answer, and latency (arrival to last token) p50/p99, with each
system's best of --repeats runs. The padding bound: HF computes every row of a batch up to the batch's longest
prompt and longest output; the padded tokens over the useful ones is the speedup an engine exactly as
efficient per token as HF's batched matmuls would get from padding alone (the batches are the ones HF ran).

Time in online runs is wall time on a GPU; on a CPU it is process CPU time with idle gaps skipped (see
ServingClock): the machine may be shared, and other processes must not stretch one system's run and not the
other's. Use --threads 1 there (CPU time of several threads would add up).

Prefix caching is off on this benchmark's engine: the prompts are random, so it could only hit when a repeat
run sends the same prompts again, which no real workload would give it.

The decode-step table times the engine's steps in which every request decodes one token. On CUDA it adds
the memory-bandwidth bound of such a step: each step has to read every weight and the whole KV context
once, so (weight bytes + KV bytes) / measured bandwidth (a large device-to-device copy) is a floor.
"""
import argparse
import dataclasses
import random
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from nanostack.checkpoint import save_checkpoint  # noqa: E402
from nanostack.hf import export_hf  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402
from nanostack.sampling import SamplingParams  # noqa: E402
from nanostack.serving.engine import Engine, EngineConfig  # noqa: E402
from nanostack.serving.kv_cache import kv_bytes_per_block  # noqa: E402
from nanostack.tokenizer import Tokenizer, merges_to_ranks  # noqa: E402

TARGETS = {"cpu": 3.0, "cuda": 10.0}  # engine tokens/s over HF tokens/s (offline: issue 8; online on CPU: issue 16)


@dataclass
class BenchConfig:
    """Serving throughput of the engine vs transformers generate, offline or online."""
    device: str = "cpu"
    dtype: str = "float32"           # float32, bfloat16 or float16 (both sides)
    depth: int = 4                   # model size dial (ModelConfig.from_depth)
    vocab_size: int = 8192
    workload: str = "offline"        # offline: every request at once | online: arrivals over time, a concurrency cap
    num_requests: int = 0            # 0 = 16 offline, 64 online
    min_len: int = 0                 # prompt lengths are uniform in [min_len, max_len]; 0 = 16 (offline and online)
    max_len: int = 0                 # 0 = 128 offline, 512 online
    min_output: int = 0              # output lengths are uniform in [min_output, max_output]; 0 = the prompt range
    max_output: int = 0              # offline, 8..256 online
    concurrency: int = 16            # online: requests in flight at most (the engine's max_num_seqs, HF's batch)
    request_rate: float = 0.0        # online: Poisson arrivals per second; 0 = all arrive at once (the cap paces them)
    cuda_graphs: bool = False        # the engine replays decode steps as CUDA graphs (GPU only)
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    seed: int = 0
    threads: int = 0                 # torch CPU threads, 0 = torch's default
    repeats: int = 1                 # timed runs per system; the best is kept (other load on the machine skews)
    skip_hf: bool = False            # engine only (e.g. when HF would not fit in memory)
    tp: int = 0                      # also run the engine tensor-parallel over this many ranks (GPUs, or CPU processes)


def with_defaults(config: BenchConfig) -> BenchConfig:
    """The zeros of the config replaced by the workload's defaults (see BenchConfig)."""
    online = config.workload == "online"
    if config.workload not in ("offline", "online"):
        raise ValueError(f"--workload {config.workload!r}: choose offline or online")
    config = dataclasses.replace(config, num_requests=config.num_requests or (64 if online else 16),
                                 min_len=config.min_len or 16, max_len=config.max_len or (512 if online else 128))
    return dataclasses.replace(config, min_output=config.min_output or (8 if online else config.min_len),
                               max_output=config.max_output or (256 if online else config.max_len))


def workload(config: BenchConfig):
    """Random prompts and output lengths, the same for both systems."""
    rng = random.Random(config.seed)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(rng.randint(config.min_len, config.max_len))]
               for _ in range(config.num_requests)]
    output_lens = [rng.randint(config.min_output, config.max_output) for _ in range(config.num_requests)]
    return prompts, output_lens


def warmup_workload(config: BenchConfig):
    """Two short requests that run every code path once before timing."""
    short = dict(num_requests=2, max_len=config.min_len + 8, max_output=config.min_output + 8)
    return workload(dataclasses.replace(config, **short))


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def clock() -> tuple[float, float]:
    """(wall, process CPU) seconds now. On a CPU shared with other work, CPU time is the steadier measure."""
    return time.perf_counter(), time.process_time()


def since(start: tuple[float, float]) -> tuple[float, float]:
    """(wall, CPU) seconds elapsed since a clock() reading."""
    wall, cpu = clock()
    return wall - start[0], cpu - start[1]


def run_engine(engine: Engine, prompts, output_lens, device: str):
    """Generate everything; returns ((wall, CPU) seconds, outputs, decode-step records (wall, CPU, context, seqs))."""
    for i, (prompt, output_len) in enumerate(zip(prompts, output_lens)):
        engine.add_request(f"bench-{i}", prompt, SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True))
    outputs, decode_steps = {}, []
    synchronize(device)
    start = clock()
    while engine.has_unfinished():
        running = engine.scheduler.running
        pure_decode = (not engine.scheduler.waiting and running
                       and all(len(s.token_ids) - s.num_computed_tokens == 1 for s in running))
        context = sum(len(s.token_ids) for s in running)
        step_start = clock()
        for out in engine.step():  # sampling reads the tokens back, so the step has finished on the device
            outputs.setdefault(out.request_id, []).extend(out.new_token_ids)
        if pure_decode:
            decode_steps.append((*since(step_start), context, len(running)))
    synchronize(device)
    return since(start), outputs, decode_steps


@torch.inference_mode()
def run_hf(hf_model, prompts, output_lens, device: str):
    """One padded batch through transformers generate; returns ((wall, CPU) seconds, generated ids per request)."""
    longest = max(len(p) for p in prompts)
    pad_id = 0
    input_ids = torch.tensor([[pad_id] * (longest - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
    max_new = max(output_lens)
    synchronize(device)
    start = clock()
    generated = hf_model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                  max_new_tokens=max_new, min_new_tokens=max_new, pad_token_id=pad_id)
    synchronize(device)
    elapsed = since(start)
    return elapsed, [row[longest:longest + n].tolist() for row, n in zip(generated, output_lens)]


def measured_bandwidth(device: str) -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write), best of 5."""
    source = torch.empty(2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(6):
        synchronize(device)
        start = time.perf_counter()
        target.copy_(source)
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * source.numel() / best


def decode_step_report(decode_steps, model: GPT, dtype: torch.dtype, config: BenchConfig) -> dict:
    """Mean time of the pure-decode steps, and on CUDA their memory-bandwidth floor."""
    if not decode_steps:
        return {}
    wall, cpu, context, batch = (sum(column) / len(decode_steps) for column in zip(*decode_steps))
    report = {"decode_steps": len(decode_steps), "mean_batch": batch, "mean_context_tokens": context,
              "decode_step_ms": 1e3 * wall, "decode_step_cpu_ms": 1e3 * cpu}
    if config.device.startswith("cuda"):
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        kv_bytes = context * kv_bytes_per_block(model.kv_layout(), 1, dtype)
        bandwidth = measured_bandwidth(config.device)
        floor = (weight_bytes + kv_bytes) / bandwidth
        report.update({"weight_bytes": weight_bytes, "kv_bytes": kv_bytes, "bandwidth_gb_s": bandwidth / 1e9,
                       "bandwidth_floor_ms": 1e3 * floor, "fraction_of_bound": floor / wall})
    return report


def save_as_checkpoint(model: GPT, directory) -> Path:
    """The model as a checkpoint directory under `directory`."""
    byte_tokenizer = Tokenizer(merges_to_ranks([]))  # a checkpoint needs one; the benchmark feeds ids
    weights = {name: tensor.cpu() for name, tensor in model.state_dict().items()}
    return save_checkpoint(Path(directory) / "ckpt", weights, model.config, byte_tokenizer)


def load_hf_twin(model: GPT, dtype: torch.dtype, device: str):
    """The same weights as a transformers model: saved as a checkpoint, exported with export_hf, loaded back."""
    from transformers import AutoModelForCausalLM
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(save_as_checkpoint(model, tmp), Path(tmp) / "hf")
        return AutoModelForCausalLM.from_pretrained(Path(tmp) / "hf", dtype=dtype,
                                                    attn_implementation="sdpa").to(device).eval()


def run_tensor_parallel(model: GPT, config: BenchConfig, prompts, output_lens, engine_config: EngineConfig):
    """The same workload on an engine split over config.tp ranks (rank 0 here, the others spawned)."""
    from nanostack.serving.tensor_parallel import ModelSpec, Workers, broadcasting_forward, load_model
    with tempfile.TemporaryDirectory() as tmp:
        spec = ModelSpec(str(save_as_checkpoint(model, tmp)), config.device, getattr(torch, config.dtype))
        workers = Workers(spec, config.tp)
        try:
            split = load_model(spec, 0, config.tp)["model"]
            engine = Engine(split, None, engine_config, forward=broadcasting_forward(split))
            workers.start(engine.blocks.num_blocks, engine.config.block_size, config.device)
            run_engine(engine, *warmup_workload(config), config.device)
            runs = [run_engine(engine, prompts, output_lens, config.device) for _ in range(config.repeats)]
        finally:
            workers.stop(config.device)
    best = min(runs, key=lambda run: run[0][0])
    return best[0], best[1], decode_step_report(best[2], split, split.norm.weight.dtype, config)


def arrival_times(config: BenchConfig) -> list[float]:
    """When each request arrives, in seconds from the start: a seeded Poisson process, or all at 0."""
    if config.request_rate <= 0:
        return [0.0] * config.num_requests
    rng, now, times = random.Random(config.seed + 1), 0.0, []
    for _ in range(config.num_requests):
        times.append(now)
        now += rng.expovariate(config.request_rate)
    return times


class ServingClock:
    """Seconds since the start of an online run. On a GPU: wall time. On a CPU, which other work may share: this
    process's CPU time plus the idle gaps until the next arrival, which are skipped rather than slept through, so
    other processes cannot stretch either system's time (with one torch thread, CPU time is busy wall time)."""

    def __init__(self, device: str):
        self.read = time.perf_counter if device.startswith("cuda") else time.process_time
        self.start, self.skipped = self.read(), 0.0

    def now(self) -> float:
        return self.read() - self.start + self.skipped

    def wait_until(self, moment: float) -> None:
        """Idle until `moment`."""
        gap = moment - self.now()
        if gap > 0 and self.read is time.perf_counter:
            time.sleep(gap)
        elif gap > 0:
            self.skipped += gap


def serve_engine_online(engine: Engine, prompts, output_lens, arrivals, concurrency: int, device: str) -> dict:
    """Online serving on the engine: a request is added once it has arrived and fewer than `concurrency` are in
    flight. Returns {request: {arrival, first, finish (ServingClock seconds), tokens}}."""
    waiting, records, in_flight = deque(range(len(prompts))), {}, 0
    synchronize(device)
    clock = ServingClock(device)
    while waiting or engine.has_unfinished():
        now = clock.now()
        while waiting and in_flight < concurrency and arrivals[waiting[0]] <= now:
            i = waiting.popleft()
            engine.add_request(str(i), prompts[i], SamplingParams(max_tokens=output_lens[i], temperature=0,
                                                                  ignore_eos=True))
            records[i], in_flight = {"arrival": arrivals[i], "tokens": []}, in_flight + 1
        if not engine.has_unfinished():  # idle until the next arrival
            clock.wait_until(arrivals[waiting[0]])
            continue
        for out in engine.step():  # sampling reads the tokens back, so the step has finished on the device
            record, now = records[int(out.request_id)], clock.now()
            record["tokens"] += out.new_token_ids
            record.setdefault("first", now)
            if out.finished:
                record["finish"], in_flight = now, in_flight - 1
    return records


def serve_hf_online(hf_model, prompts, output_lens, arrivals, concurrency: int, device: str):
    """Static batching with transformers generate: whenever the model is free, the requests that have arrived (up
    to `concurrency`; if none has, the next one is waited for) run as one padded batch to its longest output, and
    all of them are answered at its end. Returns (records as serve_engine_online's, the batches run)."""
    waiting, records, batches = deque(range(len(prompts))), {}, []
    clock = ServingClock(device)
    while waiting:
        now = clock.now()
        if arrivals[waiting[0]] > now:
            clock.wait_until(arrivals[waiting[0]])
            continue
        batch = []
        while waiting and len(batch) < concurrency and arrivals[waiting[0]] <= now:
            batch.append(waiting.popleft())
        _, generated = run_hf(hf_model, [prompts[i] for i in batch], [output_lens[i] for i in batch], device)
        done = clock.now()
        for i, tokens in zip(batch, generated):
            records[i] = {"arrival": arrivals[i], "first": done, "finish": done, "tokens": tokens}
        batches.append(batch)
    return records, batches


def online_metrics(records: dict) -> dict:
    """Throughput over the span from the first arrival to the last answer; latency from arrival to last token
    (ServingClock seconds)."""
    span = max(r["finish"] for r in records.values()) - min(r["arrival"] for r in records.values())
    latency = np.array([r["finish"] - r["arrival"] for r in records.values()])
    first_token = np.array([r["first"] - r["arrival"] for r in records.values()])
    return {"seconds": span, "output_tokens_per_s": sum(len(r["tokens"]) for r in records.values()) / span,
            "requests_per_s": len(records) / span, "p50_latency_s": float(np.percentile(latency, 50)),
            "p99_latency_s": float(np.percentile(latency, 99)), "p50_first_token_s": float(np.median(first_token)),
            "p99_first_token_s": float(np.percentile(first_token, 99))}


def online(config: BenchConfig, engine: Engine, hf_model) -> None:
    """Online serving at a concurrency cap: the engine against transformers' static batches (module docstring)."""
    prompts, output_lens = workload(config)
    arrivals = arrival_times(config)
    engine_runs, hf_runs = [], []
    for _ in range(config.repeats):  # alternating, so both systems meet the same background load
        engine_runs.append(serve_engine_online(engine, prompts, output_lens, arrivals, config.concurrency, config.device))
        if hf_model is not None:
            hf_runs.append(serve_hf_online(hf_model, prompts, output_lens, arrivals, config.concurrency, config.device))
    engine_records = max(engine_runs, key=lambda records: online_metrics(records)["output_tokens_per_s"])
    results = {"config": dataclasses.asdict(config), "model": dataclasses.asdict(engine.model.config),
               "torch_threads": torch.get_num_threads(), "output_tokens": sum(output_lens),
               "clock": "wall time" if config.device.startswith("cuda") else
                        "process CPU time plus the skipped idle gaps (ServingClock): the machine may be shared",
               "prompt_tokens": sum(len(p) for p in prompts), "engine": online_metrics(engine_records),
               "engine_runs_output_tokens_per_s": [online_metrics(r)["output_tokens_per_s"] for r in engine_runs]}
    rows = [{"system": "nanostack engine", **results["engine"]}]
    if hf_runs:
        hf_records, batches = max(hf_runs, key=lambda run: online_metrics(run[0])["output_tokens_per_s"])
        # HF computes every row of a batch up to the batch's longest prompt and longest output.
        padded_prompt = sum(len(b) * max(len(prompts[i]) for i in b) for b in batches)
        padded_output = sum(len(b) * max(output_lens[i] for i in b) for b in batches)
        target = TARGETS["cuda" if config.device.startswith("cuda") else "cpu"]
        speedup = results["engine"]["output_tokens_per_s"] / online_metrics(hf_records)["output_tokens_per_s"]
        results.update({
            "hf": online_metrics(hf_records), "hf_batch_sizes": [len(b) for b in batches],
            "hf_runs_output_tokens_per_s": [online_metrics(r[0])["output_tokens_per_s"] for r in hf_runs],
            "padding_bound": (padded_prompt + padded_output) / (results["prompt_tokens"] + results["output_tokens"]),
            "output_padding_bound": padded_output / results["output_tokens"],
            "speedup": speedup, "target_speedup": target, "meets_target": speedup >= target,
            "greedy_agreement": greedy_agreement([engine_records[i]["tokens"] for i in range(len(prompts))],
                                                 [hf_records[i]["tokens"] for i in range(len(prompts))])})
        rows.append({"system": "transformers static batches", **results["hf"]})
    rate = "all at once" if config.request_rate <= 0 else f"Poisson {config.request_rate:g}/s"
    print_table(rows, title=f"online serving, concurrency {config.concurrency}, {config.num_requests} requests "
                            f"({rate}), depth {config.depth}, {config.dtype} on {config.device}")
    if hf_runs:
        print(f"output tokens/s {results['speedup']:.2f}x transformers (target >= {results['target_speedup']}x); "
              f"padding bound {results['padding_bound']:.2f}x (outputs alone {results['output_padding_bound']:.2f}x); "
              f"greedy outputs agree on {100 * results['greedy_agreement']:.1f}% of tokens")
    write_result("engine-online", results, config.device)


def greedy_agreement(engine_outputs: list[list[int]], hf_outputs: list[list[int]]) -> float:
    """Share of output tokens before each request's first disagreement (greedy on both sides: a check on the
    export and the engine; random weights give near-ties in the logits, so a few late divergences can happen)."""
    agreeing = sum(next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), len(ours))
                   for ours, theirs in zip(engine_outputs, hf_outputs))
    return agreeing / sum(len(ours) for ours in engine_outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = with_defaults(dataclass_from_args(BenchConfig, parser.parse_args()))
    if config.threads:
        torch.set_num_threads(config.threads)
    torch.manual_seed(config.seed)
    dtype = getattr(torch, config.dtype)
    model_config = ModelConfig.from_depth(config.depth, config.vocab_size, max_seq_len=config.max_len + config.max_output)
    model = GPT(model_config).to(device=config.device, dtype=dtype)
    engine_config = EngineConfig(
        block_size=config.block_size, max_num_batched_tokens=config.max_num_batched_tokens,
        max_num_seqs=config.concurrency if config.workload == "online" else config.num_requests,
        enable_prefix_caching=False, cuda_graphs=config.cuda_graphs)
    engine = Engine(model, None, engine_config)
    hf_model = None if config.skip_hf else load_hf_twin(model, dtype, config.device)
    run_engine(engine, *warmup_workload(config), config.device)
    if hf_model is not None:
        run_hf(hf_model, *warmup_workload(config), config.device)
    if config.workload == "online":
        online(config, engine, hf_model)
    else:
        offline(config, model, engine, hf_model, engine_config)


def offline(config: BenchConfig, model: GPT, engine: Engine, hf_model, engine_config: EngineConfig) -> None:
    """Every request at once: wall time of the whole batch on each system, decode-step times, and --tp."""
    dtype = model.norm.weight.dtype
    prompts, output_lens = workload(config)
    total_output = sum(output_lens)
    # Alternate the systems so that both meet the same background load; keep each one's best run.
    engine_runs, hf_runs = [], []
    for _ in range(config.repeats):
        engine_runs.append(run_engine(engine, prompts, output_lens, config.device))
        if hf_model is not None:
            hf_runs.append(run_hf(hf_model, prompts, output_lens, config.device))
    # Best wall and best CPU time of each system, taken separately; greedy runs repeat the same tokens.
    engine_wall, engine_cpu = (min(run[0][i] for run in engine_runs) for i in (0, 1))
    engine_outputs, decode_steps = engine_runs[0][1], min(engine_runs, key=lambda run: run[0][0])[2]
    rows = [{"system": "nanostack engine", "requests": config.num_requests, "output tokens": total_output,
             "seconds": engine_wall, "tokens/s": total_output / engine_wall, "CPU seconds": engine_cpu,
             "tokens/CPU-s": total_output / engine_cpu}]
    results = {"config": dataclasses.asdict(config), "model": dataclasses.asdict(model.config),
               "num_params": model.num_params(), "torch_threads": torch.get_num_threads(),
               "output_tokens": total_output, "prompt_tokens": sum(len(p) for p in prompts),
               "engine": {"seconds": engine_wall, "cpu_seconds": engine_cpu, "tokens_per_s": total_output / engine_wall,
                          "runs_wall_cpu_seconds": [run[0] for run in engine_runs],
                          "preemptions": engine.stats().num_preemptions}}
    if hf_runs:
        hf_wall, hf_cpu = (min(run[0][i] for run in hf_runs) for i in (0, 1))
        hf_outputs = hf_runs[0][1]
        padded_tokens = config.num_requests * max(output_lens)
        rows.append({"system": "transformers generate", "requests": config.num_requests,
                     "output tokens": total_output, "seconds": hf_wall, "tokens/s": total_output / hf_wall,
                     "CPU seconds": hf_cpu, "tokens/CPU-s": total_output / hf_cpu})
        target = TARGETS["cuda" if config.device.startswith("cuda") else "cpu"]
        results["hf"] = {"seconds": hf_wall, "cpu_seconds": hf_cpu, "tokens_per_s": total_output / hf_wall,
                         "runs_wall_cpu_seconds": [run[0] for run in hf_runs],
                         "raw_tokens_per_s": padded_tokens / hf_wall, "padded_tokens": padded_tokens}
        # Where every matmul is compute-bound (a CPU), HF's only handicap is the padding it computes: an engine
        # exactly as efficient per token would reach padded / useful tokens, no more.
        results.update({"padding_bound": padded_tokens / total_output,
                        "speedup": hf_wall / engine_wall, "speedup_cpu_time": hf_cpu / engine_cpu,
                        "target_speedup": target, "meets_target": hf_wall / engine_wall >= target,
                        "greedy_agreement": greedy_agreement(
                            [engine_outputs[f"bench-{r}"] for r in range(config.num_requests)], hf_outputs)})
    print_table(rows, title=f"offline throughput, depth {config.depth}, {config.dtype} on {config.device}")
    if hf_runs:
        print(f"speedup {results['speedup']:.2f}x in wall time, {results['speedup_cpu_time']:.2f}x in CPU time "
              f"(target >= {results['target_speedup']}x); "
              f"HF raw rate incl. padding {results['hf']['raw_tokens_per_s']:.1f} tok/s (padding alone would allow "
              f"{results['padding_bound']:.2f}x at equal per-token cost); "
              f"greedy outputs agree on {100 * results['greedy_agreement']:.1f}% of tokens")
    results["decode"] = decode_step_report(decode_steps, model, dtype, config)
    if results["decode"]:
        print_table([results["decode"]], title="engine steps where every request decodes")
    if config.tp > 1:
        (tp_wall, tp_cpu), tp_outputs, tp_decode = run_tensor_parallel(model, config, prompts, output_lens, engine_config)
        same = sum(tp_outputs[r] == engine_outputs[r] for r in engine_outputs)
        results["tensor_parallel"] = {"tp": config.tp, "seconds": tp_wall, "cpu_seconds_rank0": tp_cpu,
                                      "tokens_per_s": total_output / tp_wall, "speedup_vs_tp1": engine_wall / tp_wall,
                                      "identical_requests": same, "decode": tp_decode}
        step_rows = [{"ranks": 1, **{k: results["decode"].get(k) for k in ("decode_step_ms", "mean_batch")},
                      "tokens/s": total_output / engine_wall},
                     {"ranks": config.tp, **{k: tp_decode.get(k) for k in ("decode_step_ms", "mean_batch")},
                      "tokens/s": total_output / tp_wall}]
        print_table(step_rows, title=f"tensor parallel: 1 vs {config.tp} ranks ({same}/{len(engine_outputs)} "
                                     "requests with identical greedy tokens)")
    write_result("engine", results, config.device)


if __name__ == "__main__":
    main()

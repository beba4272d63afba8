"""Offline serving throughput: our engine against Hugging Face `transformers` generate on the same model.

    python bench/bench_engine.py                                        # CPU-sized: depth 4, 16 requests
    python bench/bench_engine.py --device cuda --dtype bfloat16 --depth 12 --num-requests 256 \\
        --min-len 100 --max-len 1024                                    # the nano-vllm workload on a GPU

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
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

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

TARGETS = {"cpu": 3.0, "cuda": 10.0}  # engine tokens/s over HF tokens/s


@dataclass
class BenchConfig:
    """Offline throughput of the serving engine vs transformers generate."""
    device: str = "cpu"
    dtype: str = "float32"           # float32, bfloat16 or float16 (both sides)
    depth: int = 4                   # model size dial (ModelConfig.from_depth)
    vocab_size: int = 8192
    num_requests: int = 16
    min_len: int = 16                # prompt and output lengths are uniform in [min_len, max_len]
    max_len: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    seed: int = 0
    threads: int = 0                 # torch CPU threads, 0 = torch's default
    repeats: int = 1                 # timed runs per system; the best is kept (other load on the machine skews)
    skip_hf: bool = False            # engine only (e.g. when HF would not fit in memory)
    tp: int = 0                      # also run the engine tensor-parallel over this many ranks (GPUs, or CPU processes)


def workload(config: BenchConfig):
    """Random prompts and output lengths, the same for both systems."""
    rng = random.Random(config.seed)
    prompts = [[rng.randrange(config.vocab_size) for _ in range(rng.randint(config.min_len, config.max_len))]
               for _ in range(config.num_requests)]
    output_lens = [rng.randint(config.min_len, config.max_len) for _ in range(config.num_requests)]
    return prompts, output_lens


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
            warmup = workload(dataclasses.replace(config, num_requests=2, max_len=config.min_len + 8))
            run_engine(engine, *warmup, config.device)
            runs = [run_engine(engine, prompts, output_lens, config.device) for _ in range(config.repeats)]
        finally:
            workers.stop(config.device)
    best = min(runs, key=lambda run: run[0][0])
    return best[0], best[1], decode_step_report(best[2], split, split.norm.weight.dtype, config)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    dtype = getattr(torch, config.dtype)
    if config.threads:
        torch.set_num_threads(config.threads)
    prompts, output_lens = workload(config)
    total_output = sum(output_lens)

    torch.manual_seed(config.seed)
    model_config = ModelConfig.from_depth(config.depth, config.vocab_size, max_seq_len=2 * config.max_len)
    model = GPT(model_config).to(device=config.device, dtype=dtype)
    engine_config = EngineConfig(block_size=config.block_size, max_num_seqs=config.num_requests,
                                 max_num_batched_tokens=config.max_num_batched_tokens)
    engine = Engine(model, None, engine_config)
    hf_model = None if config.skip_hf else load_hf_twin(model, dtype, config.device)
    warmup = workload(dataclasses.replace(config, num_requests=2, max_len=config.min_len + 8))
    run_engine(engine, *warmup, config.device)
    if hf_model is not None:
        run_hf(hf_model, *warmup, config.device)
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
    results = {"config": dataclasses.asdict(config), "model": dataclasses.asdict(model_config),
               "num_params": model.num_params(), "torch_threads": torch.get_num_threads(),
               "output_tokens": total_output, "prompt_tokens": sum(len(p) for p in prompts),
               "engine": {"seconds": engine_wall, "cpu_seconds": engine_cpu, "tokens_per_s": total_output / engine_wall,
                          "runs_wall_cpu_seconds": [run[0] for run in engine_runs],
                          "preemptions": engine.stats().num_preemptions}}
    if hf_runs:
        hf_wall, hf_cpu = (min(run[0][i] for run in hf_runs) for i in (0, 1))
        hf_outputs = hf_runs[0][1]
        padded_tokens = config.num_requests * max(output_lens)
        # Greedy on both sides: the share of output tokens before the first disagreement (a check on the export
        # and the engine; random weights give near-ties in the logits, so a few late divergences can happen).
        agreeing = sum(next((i for i, (a, b) in enumerate(zip(engine_outputs[f"bench-{r}"], hf_outputs[r]))
                             if a != b), output_lens[r]) for r in range(config.num_requests))
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
                        "greedy_agreement": agreeing / total_output})
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

"""All GPU evidence in one call: the GPU-only tests, then every GPU benchmark in bench/, then one table with each
figure beside its target.

    bench/gpu.sh                              # everything: about 8 minutes on one H100/H200
    bench/gpu.sh --dry-run                    # what would run and each step's time budget (works without a GPU)
    bench/gpu.sh --only engine,overhead       # some steps (a rerun); --skip leaves some out

Every step runs as its own process, with the repository root as working directory, under a timeout of 1.5x its
budget (and never past --deadline-s, counted from the start, so that the whole call fits the slot it was given:
a step that no longer fits is skipped and recorded as such). A step that fails or times out is recorded with
the tail of its output, and the next one runs. Each benchmark writes its usual bench/results/<name>-cuda.json;
this runner writes every step's log to bench/results/gpu-logs/<step>.log and its summary (status, seconds,
figures against targets) to bench/results/gpu-summary-cuda.json, and prints the table last.

The sizes are chosen for one H100/H200 and these budgets; the benchmarks' own defaults sweep more. Left out, to
keep the call inside 8 minutes: bench_parallel.py (on one GPU its only layout is the single process, whose MFU the
train step measures), bench_structured.py (its target is a CPU one; the masks are host work on a GPU too) and
bench_onnx.py (ONNX Runtime's CPU provider).

Adding a benchmark (another branch's): one `Step` row in STEPS: its command, its budget in seconds, the result
file it writes, and its targets, each a figure read from that file, the bound it should meet, and the issue
that set the bound.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import RESULTS_DIR, print_table, write_result  # noqa: E402

LOG_DIR = RESULTS_DIR / "gpu-logs"


@dataclass
class Target:
    """One figure of a step, read from its result JSON, and the bound the issues set for it."""
    figure: str                             # what is measured, as printed
    read: Callable[[dict], float | None]    # the figure from the step's result JSON (None where it is missing)
    bound: str = ""                         # ">= 0.45", "<= 1.5"; empty: reported, no target
    issue: int | None = None                # the issue that set the bound

    def met(self, value: float | None) -> bool | None:
        """Whether value meets the bound (None without a bound or a value)."""
        if not self.bound or value is None:
            return None
        op, limit = self.bound.split()
        return value >= float(limit) if op == ">=" else value <= float(limit)


@dataclass
class Step:
    """One GPU-only test run or benchmark."""
    name: str
    command: list[str]                      # "python" is this interpreter; run from the repository root
    budget_s: int                           # expected wall time on one H100/H200
    result: str = ""                        # the bench/results/<result>-cuda.json it writes
    targets: list[Target] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Reading figures out of the result files

def rows_where(rows, **match):
    """The rows whose keys equal every value in match."""
    return [row for row in rows or [] if all(row.get(key) == value for key, value in match.items())]


def smallest(values):
    """min of the values, None when there are none or one is missing (a missing peer must not pass a target)."""
    values = list(values)
    return None if not values or None in values else min(values)


def ratio(row: dict, ours: str, peer: str):
    return None if row.get(ours) is None or not row.get(peer) else row[ours] / row[peer]


def attention_rows(result: dict) -> list[dict]:
    """The sweep rows the attention targets are set on: head dim 128, sequence length >= 4096."""
    return [r for r in result["results"] if r["head_dim"] == 128 and r["seqlen"] >= 4096]


def fsdp_vs_ddp(result: dict):
    """FSDP2 tokens/s over DDP's, one GPU, no activation checkpointing."""
    fsdp, ddp = (rows_where(result["rows"], strategy=s, activation_checkpointing="none", ranks=1)
                 for s in ("fsdp", "ddp"))
    return fsdp[0]["tokens_per_s"] / ddp[0]["tokens_per_s"] if fsdp and ddp else None


def activation_checkpointing(result: dict, mode: str) -> tuple[float | None, float | None]:
    """(throughput cost, peak-memory saving) of an AC mode against none, one GPU, no data parallelism."""
    base = rows_where(result["rows"], strategy="none", activation_checkpointing="none")
    ac = rows_where(result["rows"], strategy="none", activation_checkpointing=mode)
    if not base or not ac:
        return None, None
    return (1 - ac[0]["tokens_per_s"] / base[0]["tokens_per_s"],
            1 - ac[0]["peak_memory_gb"] / base[0]["peak_memory_gb"])


def train_row(result: dict, model: str) -> dict:
    rows = rows_where(result["rows"], model=model)
    return rows[-1] if rows else {}


def overhead_ms(result: dict, batch: int, mode: str = "greedy"):
    rows = rows_where(result["rows"], batch=batch, mode=mode)
    return rows[0]["host_ms"] if rows else None


def quant_decode(result: dict, variant: str):
    rows = rows_where(result.get("decode"), variant=variant)
    return rows[0]["speedup_vs_bf16"] if rows else None


def quant_bpb_increase(result: dict, variant: str):
    """|bits-per-byte increase| in percent of a variant, with the default layers kept in high precision."""
    rows = [r for r in result["quality"]["rows"] if r["variant"].startswith(variant)
            and r.get("bpb_increase_percent") is not None and "lm_head w8a8" not in r["variant"]]
    return abs(rows[0]["bpb_increase_percent"]) if rows else None


def serving_run(result: dict, rate: str) -> dict:
    runs = [r for r in result["runs"] if r["request_rate"] == rate]
    return runs[0] if runs else {}


# ----------------------------------------------------------------------------------------------------------
# The steps, in the order they run: tests first, then the benchmarks whose figures matter most.

PYTHON = "python"
STEPS = [
    Step("tests", [PYTHON, "-m", "pytest", "-m", "cuda", "-q", "-p", "no:cacheprovider", "tests"], 60, "",
         [Target("GPU-only tests failed", lambda r: r["failures"] + r["errors"], "<= 0", 16),
          Target("GPU-only tests passed", lambda r: r["passed"])]),
    Step("engine", [PYTHON, "bench/bench_engine.py", "--device", "cuda", "--dtype", "bfloat16", "--depth", "12",
                    "--num-requests", "128", "--min-len", "100", "--max-len", "512", "--cuda-graphs", "true",
                    "--max-num-batched-tokens", "8192"], 45, "engine",
         [Target("output tokens/s vs transformers generate", lambda r: r.get("speedup"), ">= 10", 8),
          Target("decode step / bandwidth floor", lambda r: r["decode"].get("fraction_of_bound"), ">= 0.7", 8),
          Target("greedy tokens agreeing with transformers", lambda r: r.get("greedy_agreement"))]),
    Step("overhead", [PYTHON, "bench/bench_overhead.py", "--device", "cuda", "--modes", "greedy,temperature"], 15,
         "overhead",
         [Target("host ms per step outside the forward, batch 1", lambda r: overhead_ms(r, 1), "<= 0.3", 16),
          Target("host ms per step outside the forward, batch 256", lambda r: overhead_ms(r, 256), "<= 1.5", 16),
          Target("host ms, batch 256, temperature sampling", lambda r: overhead_ms(r, 256, "temperature"))]),
    Step("engine-online", [PYTHON, "bench/bench_engine.py", "--workload", "online", "--device", "cuda", "--dtype",
                           "bfloat16", "--depth", "12", "--num-requests", "96", "--cuda-graphs", "true"], 35,
         "engine-online",
         [Target("online output tokens/s vs transformers static batches, concurrency 16", lambda r: r.get("speedup")),
          Target("its padding bound", lambda r: r.get("padding_bound")),
          Target("engine p99 latency (s)", lambda r: r["engine"]["p99_latency_s"])]),
    Step("attention", [PYTHON, "bench/bench_attention.py", "--seqlens", "4096,16384", "--head-dims", "128"], 30,
         "attention",
         [Target("flash fwd TFLOP/s, D=128, T>=4k (lowest)",
                 lambda r: smallest(x["ours_fwd_tflops"] for x in attention_rows(r)), ">= 450", 7),
          Target("flash fwd vs SDPA flash, D=128, T>=4k (lowest)",
                 lambda r: smallest(ratio(x, "ours_fwd_tflops", "sdpa_flash_fwd_tflops") for x in attention_rows(r)),
                 ">= 1.0", 7),
          Target("flash bwd vs SDPA flash (lowest)",
                 lambda r: smallest(ratio(x, "ours_bwd_tflops", "sdpa_flash_bwd_tflops") for x in r["results"]),
                 ">= 0.9", 7)]),
    Step("kernels", [PYTHON, "bench/bench_kernels.py", "--contexts", "4096,16384", "--batches", "1,32",
                     "--matmul-ms", "16,4096", "--matmul-nks", "4096x4096", "--decode-ms", "1,16"], 30, "kernels",
         [Target("paged decode, share of copy bandwidth, context >= 4k, batch 32 (lowest)",
                 lambda r: smallest(x["of_copy_bw"] for x in rows_where(r["paged_attention"], batch=32)), ">= 0.8", 8),
          Target("int8 W8A8 vs bf16 matmul, M=4096",
                 lambda r: smallest(x["ours_vs_bf16"] for x in rows_where(r["int8_matmul"], M=4096)), ">= 1.5", 11),
          Target("int8 vs torch._int_mm, M=4096",
                 lambda r: smallest(x["ours_vs_int_mm"] for x in rows_where(r["int8_matmul"], M=4096)), ">= 0.9", 11)]),
    Step("train", [PYTHON, "bench/bench_train.py", "--device", "cuda", "--depths", "12", "--steps", "15",
                   "--repeats", "2"], 60, "train",
         [Target("MFU, d12 (~124M) bf16 + compile", lambda r: train_row(r, "nanostack+compile").get("mfu"),
                 ">= 0.45", 4),
          Target("tokens/s vs transformers, both compiled",
                 lambda r: train_row(r, "nanostack+compile").get("vs_reference"), ">= 1.15", 4)]),
    Step("quant", [PYTHON, "bench/bench_quant.py", "--matmul-ms", "4096", "--matmul-nks", "4096x4096",
                   "--decode-tokens", "128", "--repeats", "2"], 75, "quant",
         [Target("W8A16 batch-1 decode vs bf16 tokens/s", lambda r: quant_decode(r, "int8-wo"), ">= 1.4", 11),
          Target("W8A16 bits-per-byte increase, %", lambda r: quant_bpb_increase(r, "int8-wo"), "<= 0.5", 11),
          Target("W8A8+SmoothQuant bits-per-byte increase, %", lambda r: quant_bpb_increase(r, "w8a8+smoothquant"),
                 "<= 2", 11)]),
    Step("lowprec", [PYTHON, "bench/bench_lowprec.py", "--device", "cuda", "--decode-ms", "1,4,16"], 35, "lowprec",
         [Target("W4A16 batch-1 decode vs bf16 tokens/s, Llama-3-8B-shaped stack",
                 lambda r: r["decode"][1]["speedup_vs_bf16"], ">= 2", 18),
          Target("W4A16 vs torch's int4 matmul (tinygemm), M=1..16 (lowest)",
                 lambda r: smallest(x["ours_vs_tinygemm"] for x in r["w4a16_matmul"]), ">= 0.9", 18)]),
    Step("speculative", [PYTHON, "bench/bench_speculative.py", "--device", "cuda", "--dtype", "bfloat16",
                         "--repeats", "1"], 30, "speculative",
         [Target("batch-1 decode speedup, draft model (a truncated copy of the target)",
                 lambda r: r["greedy"]["batch1/draft model"]["speedup"], ">= 2", 10),
          Target("batch-1 decode speedup, n-gram", lambda r: r["greedy"]["batch1/ngram"]["speedup"])]),
    Step("serving", [PYTHON, "bench/bench_serving.py", "--device", "cuda", "--depth", "12", "--num-requests", "100",
                     "--input-len", "512", "--output-len", "128", "--request-rates", "16,inf"], 30, "serving",
         [Target("HTTP output tokens/s, all at once", lambda r: serving_run(r, "inf").get("output_throughput")),
          Target("HTTP median TTFT ms at 16 req/s", lambda r: serving_run(r, "16.0").get("median_ttft_ms"))]),
    Step("hf", [PYTHON, "bench/bench_hf.py", "--device", "cuda", "--models", "Qwen3-0.6B", "--repeats", "1"], 45,
         "bench_hf",
         [Target("Qwen3-0.6B shape: peak host memory of a load / weight bytes",
                 lambda r: r["models"]["Qwen3-0.6B"]["nanostack"]["memory_ratio"], "<= 1.2", 15),
          Target("Qwen3-0.6B shape: engine output tokens/s (64 x 256 tokens)",
                 lambda r: r["models"]["Qwen3-0.6B"]["serving"]["output_tokens_per_s"])]),
    Step("distributed", [PYTHON, "bench/bench_distributed.py", "--device", "cuda", "--steps", "8"], 50,
         "distributed",
         [Target("FSDP2 / DDP tokens/s, one GPU", fsdp_vs_ddp, ">= 0.95", 5),
          Target("selective AC throughput cost", lambda r: activation_checkpointing(r, "selective")[0], "<= 0.3", 5),
          Target("selective AC peak-memory saving", lambda r: activation_checkpointing(r, "selective")[1],
                 ">= 0.4", 5),
          Target("full AC peak-memory saving", lambda r: activation_checkpointing(r, "full")[1])]),
]


# ----------------------------------------------------------------------------------------------------------
# Running

def run_step(step: Step, timeout: float) -> dict:
    """Run one step; returns its record (status, seconds, returncode, output tail, figures)."""
    LOG_DIR.mkdir(parents=True, exist_ok=True)
    log_path = LOG_DIR / f"{step.name}.log"
    command = [sys.executable if part == PYTHON else part for part in step.command]
    junit = None
    if step.name == "tests":  # pytest reports its counts in a JUnit file, read below
        junit = Path(tempfile.mkdtemp()) / "junit.xml"
        command += [f"--junitxml={junit}"]
    result_path = RESULTS_DIR / f"{step.result}-cuda.json"
    started_at = time.time()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n")
        log.flush()
        try:
            process = subprocess.run(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                     timeout=timeout, start_new_session=True)
            status = "ok" if process.returncode == 0 else "failed"
            returncode = process.returncode
        except subprocess.TimeoutExpired:
            status, returncode = "timeout", None
    seconds = time.perf_counter() - start
    record = {"step": step.name, "status": status, "returncode": returncode, "seconds": seconds,
              "budget_s": step.budget_s, "timeout_s": timeout, "log": os.path.relpath(log_path, ROOT),
              "output_tail": log_path.read_text(errors="replace")[-3000:] if status != "ok" else None}
    data = None
    if junit is not None and junit.exists():
        suite = ElementTree.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
        data = {**counts, "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]}
    elif step.result and result_path.exists() and result_path.stat().st_mtime >= started_at:
        data = json.loads(result_path.read_text())
    record["figures"] = [figure(target, data) for target in step.targets]
    return record


def figure(target: Target, data: dict | None) -> dict:
    """A target's value from a step's data (None when the step wrote none or the figure is not in it)."""
    try:
        value = None if data is None else target.read(data)
    except (KeyError, IndexError, TypeError, ZeroDivisionError):
        value = None
    return {"figure": target.figure, "value": value, "bound": target.bound or None, "issue": target.issue,
            "met": target.met(value)}


def selected(names: str, all_names: list[str], flag: str) -> list[str]:
    """The comma-separated step names of a flag, checked against the known ones."""
    chosen = [name for name in names.split(",") if name]
    unknown = sorted(set(chosen) - set(all_names))
    if unknown:
        raise ValueError(f"{flag} names unknown steps {unknown}; the steps are {all_names}")
    return chosen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="list the steps and their budgets; run nothing")
    parser.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    parser.add_argument("--skip", default="", help="comma-separated steps to leave out")
    parser.add_argument("--deadline-s", type=float, default=570.0,
                        help="start no step that could not end within this many seconds of the start")
    args = parser.parse_args(argv)
    names = [step.name for step in STEPS]
    try:
        only, skip = selected(args.only, names, "--only"), selected(args.skip, names, "--skip")
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    steps = [step for step in STEPS if (not only or step.name in only) and step.name not in skip]
    if args.dry_run:
        print_table([{"step": s.name, "budget s": s.budget_s, "timeout s": round(1.5 * s.budget_s),
                      "writes": f"bench/results/{s.result}-cuda.json" if s.result else "-"} for s in steps],
                    title="bench/gpu.sh would run, in order")
        for step in steps:
            print(f"  {step.name}: {' '.join(step.command)}")
        print_table([{"step": s.name, "figure": t.figure, "target": t.bound or "-", "issue": t.issue}
                     for s in steps for t in s.targets], title="figures it reports")
        print(f"\ntotal budget {sum(s.budget_s for s in steps)} s; deadline {args.deadline_s:.0f} s")
        return 0
    import torch
    if not torch.cuda.is_available():
        print("error: no CUDA GPU here (torch.cuda.is_available() is False); bench/gpu.sh runs GPU-only tests and "
              "benchmarks and ran nothing (--dry-run lists them)", file=sys.stderr)
        return 1

    start, records = time.perf_counter(), []
    for step in steps:
        left = args.deadline_s - (time.perf_counter() - start)
        if left < step.budget_s:
            records.append({"step": step.name, "status": "skipped", "seconds": 0.0, "budget_s": step.budget_s,
                            "reason": f"{left:.0f} s left before the deadline, budget {step.budget_s} s",
                            "figures": [figure(target, None) for target in step.targets]})
            continue
        print(f"[{time.perf_counter() - start:5.0f} s] {step.name}: budget {step.budget_s} s", flush=True)
        records.append(run_step(step, min(1.5 * step.budget_s, left)))
        print(f"        {records[-1]['status']} in {records[-1]['seconds']:.0f} s", flush=True)

    rows = [{"step": r["step"], "status": r["status"], "seconds": r["seconds"], "figure": f["figure"],
             "value": f["value"], "target": f["bound"] or "-", "met": f["met"], "issue": f["issue"]}
            for r in records for f in (r["figures"] or [{"figure": "-", "value": None, "bound": None, "met": None,
                                                         "issue": None}])]
    write_result("gpu-summary", {"steps": records, "total_seconds": time.perf_counter() - start,
                                 "commands": {s.name: s.command for s in steps}}, "cuda")
    print_table(rows, title=f"GPU evidence on {torch.cuda.get_device_name()}, "
                            f"{time.perf_counter() - start:.0f} s (logs in {os.path.relpath(LOG_DIR, ROOT)})")
    failed = [r["step"] for r in records if r["status"] != "ok"]
    if failed:
        print(f"steps not ok: {failed}; their output tails are in the summary JSON")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

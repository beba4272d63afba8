"""The whole stack in one run: tokenizer -> pretraining -> SFT -> DPO / GRPO -> int8 -> serving, then a report.

    python -m nanostack.speedrun                               # 2 CPU cores, embedded corpus: about 5 minutes
    python -m nanostack.speedrun --tiny true                   # toy sizes, the same path in under a minute (tests)
    python -m nanostack.speedrun --preset gpt2 --dry-run true  # print the 8-GPU GPT-2-class commands

The default sizes are each stage's own defaults, so the speedrun is exactly the commands a newcomer types one by
one, but for post-training: SFT, DPO and GRPO learn 2-digit addition (nanostack/tasks.py), with the flags that
make that work in a minute or two each (SIZES["cpu"], from bench/bench_posttrain.py's measurements). It took 290 s
on 2 idle CPU cores (AMD EPYC, torch 2.13 CPU): tokenizer and shards 5 s, pretraining 120 s (600 steps, val 1.80
bits/byte), SFT 85 s, DPO 29 s, GRPO 37 s, int8 11 s, serving 4 s. --tiny shrinks every stage (23 s).

Each stage is the command a user would type (data/prepare.py, train.py, finetune.py, python -m nanostack.quant,
serve.py), run from the repo root as a subprocess, so the report shows it and any one can be re-run alone.
Its output streams to the console and to logs/<stage>.log. Everything lands in one run directory (--out-dir):

    tokenizer.json, data/<corpus>/   the tokenizer and the token shards            stage "tokenizer"
    pretrain/  sft/  dpo/  grpo/     checkpoints, metrics.jsonl, eval.json         stages "pretrain" ... "grpo"
    int8/                            int8 weight-only checkpoint, quant_report.json stage "int8"
    serving.json                     every request the serving stage sent and what came back
    stages.json, report.md, plots/   each stage's command, time and exit code; the tables; loss curves

The serving stage starts serve.py with the int8 checkpoint on a free port of 127.0.0.1, waits for /health, sends
chat and completion requests (every other one streaming, --concurrency at a time, with aiohttp), measures
requests/s, tokens/s, time to first token and latency, then stops the server with SIGTERM and checks that it
exits 0. Requests set `ignore_eos`, so each generates exactly --max-tokens tokens and throughput compares
between runs. A stage that fails stops the run; the report still covers the stages before it.

The report is rebuilt from the files alone, so `--report-only true` redraws it (and the loss-curve PNGs, which
need matplotlib: pip install -e ".[plots]") for an existing run directory.

Preset gpt2 is the README's 8-GPU node run: `torchrun --nproc_per_node=8 train.py --strategy fsdp` at --depth 12
(135M parameters with the 32768-token vocabulary), 5000 steps of 8 GPUs x 32 x 1024 tokens = 1.31B tokens.
Its time and cost are an estimate, not a measurement:
    FLOPs per token   7.7e8  (GPT.flops_per_token(): 6 x parameters + attention)
    per H100          989e12 dense bf16 FLOP/s x 40% MFU / 7.7e8 = 0.51M tokens/s
    pretraining       1.31e9 tokens / (8 x 0.51M tokens/s) = 320 s, about 5.5 minutes
    data              download 60 shards (~5.4 GB), a tokenizer on 500 MB, tokenize ~3B tokens: ~15-20 minutes
    the rest          SFT, DPO, int8 and serving on one GPU of the node: a few minutes
    total             about 30 minutes of the node; at an assumed $2.50 per H100-hour, 8 x 0.5 h x $2.50 = ~$10
"""
import asyncio
import json
import math
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import aiohttp
import numpy as np
import torch
from safetensors import safe_open

from nanostack import tasks
from nanostack.atomic import atomic_file, write_json
from nanostack.cli import add_dataclass_args, dataclass_from_args, make_parser, run
from nanostack.data import jsonl_records

ROOT = Path(__file__).resolve().parent.parent
STAGES = ("tokenizer", "pretrain", "sft", "dpo", "grpo", "int8", "serve")
# Post-training is measured on a verifiable task (nanostack/tasks.py): SFT on its answers, then DPO on pairs of the
# SFT model's right and wrong samples, and GRPO on its rewards; each scored by pass@k on held-out problems.
TASK, TASK_DIGITS = "addition", 2
PRESETS = ("cpu", "gpt2")
# The corpus of each size, and the flags that size each stage on top of the paths that chain the stages together.
# --tiny reads one 380 kB stdlib package (email/) and trains a 512-token vocabulary and a 1-layer model.
SOURCES = {"cpu": "stdlib", "tiny": str(Path(sysconfig.get_paths()["stdlib"]) / "email"),
           "gpt2": "fineweb-edu-100b-shuffle"}
# Post-training on the task (bench/bench_posttrain.py measured these): DPO and GRPO start from the SFT run's
# checkpoint at step RL_FROM_STEP, while it is still learning the task; from a converged SFT model neither moves
# pass@1 by more than a few points at this size. DPO adds the chosen reply's cross-entropy (RPO).
RL_FROM_STEP = {"cpu": 250, "gpt2": 250, "tiny": 10}
POST_TRAINING = {"sft": "--packing true --steps 400 --lr 2.4e-3 --eval-examples 200",
                 "dpo": "--steps 100 --batch-size 16 --lr 5e-5 --dpo-nll-weight 1 --eval-examples 200",
                 "grpo": "--steps 60 --batch-size 16 --lr 1e-4 --eval-examples 200"}
SIZES = {
    "cpu": POST_TRAINING,  # and every other stage's own defaults: what a newcomer gets by typing the commands
    "tiny": {
        "tokenizer": "--vocab-size 512 --tokenizer-max-mb 1 --val-fraction 0.1",
        "pretrain": "--vocab-size 512 --val-fraction 0.1 --depth 1 --seq-len 64 --steps 40 --warmup-steps 5 "
                    "--eval-batches 4 --sample-every 0 --sample-tokens 16",
        "sft": "--steps 20 --warmup-steps 2 --eval-examples 40 --log-every 5 --pass-k 2 --max-new-tokens 8",
        "dpo": "--steps 10 --warmup-steps 2 --eval-examples 40 --log-every 5 --pass-k 2 --max-new-tokens 8",
        "grpo": "--steps 4 --warmup-steps 1 --eval-examples 40 --log-every 2 --pass-k 2 --max-new-tokens 8 "
                "--batch-size 4 --group-size 4",
        "int8": "--eval-batches 4 --calibration-batches 2",
    },
    "gpt2": {  # the README's GPT-2-class flags; post-training as on the CPU; int8 and serving keep their defaults
        **POST_TRAINING,
        "tokenizer": "--max-shards 60 --vocab-size 32768 --tokenizer-max-mb 500",
        "pretrain": "--strategy fsdp --max-shards 60 --vocab-size 32768 --tokenizer-max-mb 500 --depth 12 "
                    "--seq-len 1024 --batch-size 32 --steps 5000 --warmup-steps 200 --compile true",
    },
}
GPT2_LAUNCHER = ["torchrun", "--standalone", "--nproc_per_node=8"]


@dataclass
class SpeedrunConfig:
    out_dir: str = "out/speedrun"   # run directory: every stage's output, logs/, report.md, plots/
    tiny: bool = False              # toy sizes everywhere: the whole run in under a minute (what the tests run)
    preset: str = "cpu"             # cpu (the embedded corpus on CPU or one GPU) | gpt2 (an 8-GPU node; see above)
    dry_run: bool = False           # print every stage's command and exit without running anything
    report_only: bool = False       # rebuild report.md and plots/ from an existing run directory, run nothing
    stage_args: str = ""            # extra flags per stage, e.g. "sft: --lora-rank 8; dpo: --dpo-beta 0.2"
    requests: int = 16              # serving: requests sent, half chat and half completions
    concurrency: int = 4            # serving: requests in flight at once
    max_tokens: int = 32            # serving: tokens generated per request
    server_timeout: float = 300.0   # serving: seconds to wait for the server to load and answer /health


# ----------------------------------------------------------------------------------------------------------
# The commands

def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 now: the kernel picks one when we bind port 0."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def parse_stage_args(text: str) -> dict[str, list[str]]:
    """'sft: --lora-rank 8; dpo: --dpo-beta 0.2' -> {"sft": ["--lora-rank", "8"], "dpo": [...]}."""
    extra: dict[str, list[str]] = {}
    for part in filter(str.strip, text.split(";")):
        name, colon, flags = part.partition(":")
        if not colon or name.strip() not in STAGES:
            raise ValueError(f"--stage-args entry {part.strip()!r}: expected 'STAGE: --flag value' with STAGE one of "
                             f"{', '.join(STAGES)}")
        extra.setdefault(name.strip(), []).extend(shlex.split(flags))
    return extra


def display_path(path: Path) -> str:
    """`path` relative to the repo root (where the commands run) when inside it, else absolute."""
    path = path.absolute()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def stage_commands(config: SpeedrunConfig, port: int) -> dict[str, list[str]]:
    """Each stage's command line (argv, run from the repo root), in the order they run."""
    if config.preset not in PRESETS:
        raise ValueError(f"--preset {config.preset!r}: expected one of {', '.join(PRESETS)}")
    if config.tiny and config.preset != "cpu":
        raise ValueError("--tiny true shrinks the cpu preset; it cannot be combined with --preset gpt2")
    size = "tiny" if config.tiny else config.preset
    extra = parse_stage_args(config.stage_args)
    run_dir = display_path(Path(config.out_dir))
    tokenizer, source = f"{run_dir}/tokenizer.json", SOURCES[size]
    corpus = ["--source", source] if source != "stdlib" else []
    shards = source
    if config.preset == "gpt2":
        # Where train.py downloads a web corpus, so that it finds the shards this stage fetched and tokenized.
        shards = f"{run_dir}/download/{source}"
        corpus += ["--download-dir", shards]
    data_dir = f"{run_dir}/data/{Path(shards).name}"
    rl_from = f"{run_dir}/sft/step_{RL_FROM_STEP[size]:06d}"
    python = sys.executable
    launcher = GPT2_LAUNCHER if config.preset == "gpt2" else [python]
    commands = {
        "tokenizer": [python, "data/prepare.py", *corpus, "--tokenizer", tokenizer, "--out-dir", data_dir],
        "pretrain": [*launcher, "train.py", *corpus[:2], "--tokenizer", tokenizer, "--out-dir", f"{run_dir}/pretrain"],
        "sft": [python, "finetune.py", "--mode", "sft", "--task", TASK, "--digits", str(TASK_DIGITS), "--init",
                f"{run_dir}/pretrain", "--out-dir", f"{run_dir}/sft", "--save-every", str(RL_FROM_STEP[size])],
        "dpo": [python, "finetune.py", "--mode", "dpo", "--pairs-from-task", TASK, "--digits", str(TASK_DIGITS),
                "--init", rl_from, "--out-dir", f"{run_dir}/dpo"],
        "grpo": [python, "finetune.py", "--mode", "grpo", "--task", TASK, "--digits", str(TASK_DIGITS), "--init",
                 rl_from, "--out-dir", f"{run_dir}/grpo"],
        "int8": [python, "-m", "nanostack.quant", "--model", f"{run_dir}/grpo", "--mode", "int8-wo", "--out",
                 f"{run_dir}/int8", "--data-dir", data_dir, "--report", "true"],
        "serve": [python, "serve.py", "--model", f"{run_dir}/int8", "--host", "127.0.0.1", "--port", str(port)],
    }
    return {name: command + shlex.split(SIZES[size].get(name, "")) + extra.get(name, [])
            for name, command in commands.items()}


def shell_line(command: list[str]) -> str:
    """The command as one would type it: `python` for this interpreter when that is what `python` runs."""
    on_path = shutil.which("python")
    same = on_path is not None and os.path.realpath(on_path) == os.path.realpath(sys.executable)
    return shlex.join(["python" if same and word == sys.executable else word for word in command])


# ----------------------------------------------------------------------------------------------------------
# Running the stages

def subprocess_env() -> dict:
    """The environment of every stage: unbuffered output (it streams live) and the checkout importable."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def tee(stream, log) -> None:
    """Copy a process's output to the console and its log as it arrives."""
    for chunk in iter(lambda: stream.read1(1 << 16), b""):
        sys.stdout.buffer.write(chunk)
        sys.stdout.flush()
        log.write(chunk)
        log.flush()


def start_stage(command: list[str], log) -> tuple[subprocess.Popen, threading.Thread]:
    """Start a stage's command with its output teed to `log` by a thread."""
    process = subprocess.Popen(command, cwd=ROOT, env=subprocess_env(), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT)
    copier = threading.Thread(target=tee, args=(process.stdout, log), daemon=True)
    copier.start()
    return process, copier


# Held-out questions of the task the model was tuned on: the chat requests ask them, as a user of the chat page would.
TASK_PROBLEMS = tasks.problems(tasks.get_task(TASK, TASK_DIGITS), "heldout", 4)
CHAT_QUESTIONS = [problem.question for problem in TASK_PROBLEMS]
COMPLETION_PROMPTS = ["def fib(n):", "import os\n", "class Stack:", "for i in range("]


async def one_request(session, base_url: str, index: int, max_tokens: int) -> dict:
    """Send request `index` (even: chat, odd: completion; every other pair streaming); time it."""
    chat, stream = index % 2 == 0, (index // 2) % 2 == 0
    prompt = CHAT_QUESTIONS[index // 2 % 4] if chat else COMPLETION_PROMPTS[index // 2 % 4]
    body = {"model": "nanostack", "max_tokens": max_tokens, "temperature": 0.8, "seed": index, "ignore_eos": True,
            "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {}),
            **({"messages": [{"role": "user", "content": prompt}]} if chat else {"prompt": prompt})}
    url = f"{base_url}/v1/{'chat/completions' if chat else 'completions'}"
    start, first_token, text, usage = time.perf_counter(), None, "", {}
    async with session.post(url, json=body) as response:
        if response.status != 200:
            raise ValueError(f"POST {url} answered {response.status}: {await response.text()}")
        if not stream:
            reply = await response.json()
            choice, usage = reply["choices"][0], reply["usage"]
            text = choice["message"]["content"] if chat else choice["text"]
        else:
            async for line in response.content:
                if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                usage = chunk.get("usage") or usage
                for choice in chunk["choices"]:
                    piece = choice["delta"].get("content", "") if chat else choice["text"]
                    if piece and first_token is None:
                        first_token = time.perf_counter() - start
                    text += piece
    return {"kind": "chat" if chat else "completion", "stream": stream, "prompt": prompt, "text": text,
            "completion_tokens": usage.get("completion_tokens", 0), "latency_s": time.perf_counter() - start,
            "ttft_s": first_token}


async def query_server(base_url: str, config: SpeedrunConfig) -> dict:
    """Send config.requests requests, config.concurrency at a time, then the task questions (greedy, each ending
    at its end of turn); the per-request records, the summary and the answers."""
    limit = asyncio.Semaphore(config.concurrency)

    async def limited(session, index):
        async with limit:
            return await one_request(session, base_url, index, config.max_tokens)

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as session:
        start = time.perf_counter()
        records = await asyncio.gather(*(limited(session, i) for i in range(config.requests)))
        wall = time.perf_counter() - start
        answers = await asyncio.gather(*(ask_task_question(session, base_url, p) for p in TASK_PROBLEMS))
    latencies = [r["latency_s"] for r in records]
    ttfts = [r["ttft_s"] for r in records if r["ttft_s"] is not None]
    tokens = sum(r["completion_tokens"] for r in records)
    summary = {"requests": len(records), "concurrency": config.concurrency, "max_tokens": config.max_tokens,
               "wall_s": wall, "requests_per_s": len(records) / wall, "completion_tokens": tokens,
               "tokens_per_s": tokens / wall, "latency_p50_s": float(np.percentile(latencies, 50)),
               "latency_p90_s": float(np.percentile(latencies, 90))}
    if ttfts:
        summary.update(ttft_p50_s=float(np.percentile(ttfts, 50)), ttft_p90_s=float(np.percentile(ttfts, 90)))
    return {"summary": summary, "requests": records, "task_answers": answers}


async def ask_task_question(session, base_url: str, problem) -> dict:
    """Ask a held-out task question through the chat API, greedily and ending at <|end|> as the chat page does."""
    body = {"model": "nanostack", "messages": problem.messages(), "temperature": 0, "max_tokens": 16}
    async with session.post(f"{base_url}/v1/chat/completions", json=body) as response:
        reply = (await response.json())["choices"][0]["message"]["content"]
    return {"question": problem.question, "reference": problem.answer, "reply": reply,
            "right": tasks.reward(tasks.get_task(TASK, TASK_DIGITS), problem, reply) == 1.0}


def wait_healthy(base_url: str, process: subprocess.Popen, timeout: float) -> None:
    """Poll /health until it answers 200; fail early if the server exits, or after `timeout` seconds."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise ValueError(f"the server exited with status {process.returncode} before answering /health")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            pass  # not listening yet
        time.sleep(0.5)
    raise ValueError(f"the server did not answer {base_url}/health within {timeout:.0f}s (--server-timeout)")


def serve_and_query(command: list[str], config: SpeedrunConfig, run_dir: Path, log) -> int:
    """Start the server, query it, stop it with SIGTERM; its exit status (1 if querying failed)."""
    base_url = f"http://127.0.0.1:{command[command.index('--port') + 1]}"
    process, copier = start_stage(command, log)
    failed = None
    try:
        wait_healthy(base_url, process, config.server_timeout)
        results = asyncio.run(query_server(base_url, config))
        process.send_signal(signal.SIGTERM)
        results["server_exit_code"] = process.wait(timeout=120)
        write_json(run_dir / "serving.json", results)
    except Exception as error:  # any failure to serve or to answer fails the stage, with the reason in its log
        failed = f"serving failed: {type(error).__name__}: {error}\n"
    finally:
        if process.poll() is None:  # whatever happened, no server outlives the run
            process.kill()
            process.wait()
        copier.join(timeout=10)
    if failed:
        sys.stdout.write(failed)
        log.write(failed.encode())
        return 1
    return process.returncode


def run_stages(config: SpeedrunConfig, commands: dict[str, list[str]], run_dir: Path) -> None:
    """Run the stages in order, recording each in stages.json; stop at the first that fails."""
    state = {"preset": config.preset + (" (tiny)" if config.tiny else ""), "repo": str(ROOT),
             "started": datetime.now(timezone.utc).isoformat(timespec="seconds"), "commit": git_commit(),
             "device": device_description(), "torch": torch.__version__, "total_seconds": 0.0, "stages": {}}
    write_json(run_dir / "stages.json", state)  # marks the directory as a speedrun's, which a re-run may clear
    # SIGTERM becomes an exception, so the `finally` below stops the running stage instead of orphaning it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"error: speedrun stopped by signal {signum}"))
    run_start = time.time()
    for number, (name, command) in enumerate(commands.items(), start=1):
        log_path = run_dir / "logs" / f"{name}.log"
        header = f"==> [{number}/{len(commands)}] {name}: {shell_line(command)}\n"
        sys.stdout.write(header)
        sys.stdout.flush()
        start = time.time()
        with open(log_path, "wb") as log:
            log.write(header.encode())
            if name == "serve":
                code = serve_and_query(command, config, run_dir, log)
            else:
                process, copier = start_stage(command, log)
                try:
                    code = process.wait()
                finally:  # Ctrl-C reaches the stage too; whatever stopped us, the stage stops with us
                    if process.poll() is None:
                        process.terminate()
                        process.wait()
                copier.join()
        state["stages"][name] = {"command": shell_line(command), "seconds": time.time() - start, "exit_code": code,
                                 "log": f"logs/{name}.log"}
        state["total_seconds"] = time.time() - run_start
        write_json(run_dir / "stages.json", state)
        if code != 0:
            write_report(run_dir)
            raise ValueError(f"stage {name} failed (exit {code}), see {log_path} (report so far in "
                             f"{run_dir / 'report.md'})")


def prepare_run_dir(run_dir: Path) -> None:
    """Start from an empty run directory: clear an earlier speedrun's, refuse to touch anything else."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / "stages.json").exists():
            raise ValueError(f"--out-dir {run_dir} is not empty and holds no earlier speedrun (no stages.json): "
                             f"choose a new --out-dir")
        print(f"clearing the earlier speedrun in {run_dir}")
        shutil.rmtree(run_dir)
    (run_dir / "logs").mkdir(parents=True)


# ----------------------------------------------------------------------------------------------------------
# The report: read from the files the stages wrote, nothing re-evaluated

def read_jsonl(path: Path) -> list[dict]:
    """The records of a metrics.jsonl file (none if it does not exist)."""
    return [record for _, record in jsonl_records(path)] if path.exists() else []


def last_value(records: list[dict], key: str):
    """The value of `key` in the last record that has it, or None."""
    return next((record[key] for record in reversed(records) if key in record), None)


def cell(value) -> str:
    """A table cell: integers with thousands separators, floats to 4 decimals (large ones to units)."""
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4f}"
    return "n/a" if value is None else f"{value:,}" if isinstance(value, int) else str(value)


def seconds_cell(seconds: float) -> str:
    """A duration in seconds to one decimal."""
    return f"{seconds:.1f}"


def table(header: list[str], rows: list[list]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows])


def tokenizer_table(run_dir: Path, seconds: float) -> str:
    """Vocabulary, corpus tokens and bytes per token, from the shards' index.json."""
    index = json.loads(sorted(run_dir.glob("data/*/index.json"))[0].read_text())
    train, val = index["splits"]["train"], index["splits"]["val"]
    return table(["vocab size", "documents", "train tokens", "val tokens", "bytes/token (train)", "time (s)"],
                 [[index["vocab_size"], train["documents"] + val["documents"], train["tokens"], val["tokens"],
                   train["utf8_bytes"] / max(1, train["tokens"]), seconds_cell(seconds)]])


def pretrain_table(run_dir: Path, seconds: float) -> str:
    """Steps, tokens, throughput, final losses and val bits per byte, from metrics.jsonl and the checkpoint."""
    run = run_dir / "pretrain"
    records = read_jsonl(run / "metrics.jsonl")
    directory = run / (run / "latest").read_text().strip()
    state = json.loads((directory / "trainer_state.json").read_text())
    seq_len = json.loads((directory / "config.json").read_text())["model"]["max_seq_len"]
    train = state["train_config"]
    tokens = state["step"] * train["batch_size"] * train["grad_accum"] * state["world_size"] * seq_len
    with safe_open(directory / "model.safetensors", framework="pt") as weights:
        params = sum(math.prod(weights.get_slice(name).get_shape()) for name in weights.keys())
    speeds = [record["tokens_per_s"] for record in records if "tokens_per_s" in record]
    return table(["steps", "parameters", "tokens", "time (s)", "tokens/s", "final train loss", "val loss",
                  "val bits/byte"],
                 [[state["step"], params, tokens, seconds_cell(seconds), sum(speeds) / len(speeds) if speeds else None,
                   last_value(records, "loss"), last_value(records, "eval/loss"), last_value(records, "eval/bpb")]])


def finetune_table(run_dir: Path, stage: str, seconds: float) -> str:
    """Held-out metrics before and after, from finetune.py's eval.json."""
    report = json.loads((run_dir / stage / "eval.json").read_text())
    rows = [[name, report["before"].get(name), report["after"].get(name)] for name in report["after"]]
    if "dpo_reward_accuracy" in report:
        rows.append(["dpo_reward_accuracy", None, report["dpo_reward_accuracy"]])
    summary = (f"{report['steps']} steps, {report['trainable_params']:,} trainable parameters, "
               f"{report['train_seconds']:.1f} s training, {seconds:.1f} s the whole stage")
    return table(["held-out metric", "before", "after"], rows) + f"\n\n{summary}"


def int8_table(run_dir: Path, seconds: float) -> str:
    """The quality rows of the quant report: bits per byte, perplexity, top-1 agreement, weight bytes."""
    report = json.loads((run_dir / "int8" / "quant_report.json").read_text())
    rows = [[row["variant"], row["bpb"], f"{row['bpb_increase_percent']:+.3f}", row["perplexity"],
             row["top1_agreement"], row["weight_bytes"], row["vs_bf16_bytes"]] for row in report["rows"]]
    return (table(["variant", "val bits/byte", "bpb increase (%)", "perplexity", "top-1 agreement", "weight bytes",
                   "bytes vs bf16"], rows)
            + f"\n\n{report['eval_tokens']:,} validation tokens; {seconds:.1f} s the whole stage")


def serve_table(run_dir: Path, seconds: float) -> str:
    """Throughput and latency of the requests the serving stage sent, from serving.json."""
    results = json.loads((run_dir / "serving.json").read_text())
    s = results["summary"]
    return (table(["requests", "concurrency", "completion tokens", "requests/s", "tokens/s", "TTFT p50 (s)",
                   "TTFT p90 (s)", "latency p50 (s)", "latency p90 (s)", "server exit"],
                  [[s["requests"], s["concurrency"], s["completion_tokens"], s["requests_per_s"], s["tokens_per_s"],
                    s.get("ttft_p50_s"), s.get("ttft_p90_s"), s["latency_p50_s"], s["latency_p90_s"],
                    results["server_exit_code"]]])
            + f"\n\nFirst reply (ignore_eos lets it run on past <|end|>): {results['requests'][0]['prompt']!r} -> "
              f"{results['requests'][0]['text']!r}\n\nHeld-out {TASK} questions asked through the chat API (greedy, as "
              f"the chat page asks): "
              + "; ".join(f"{a['question']!r} -> {a['reply']!r} ({'right' if a['right'] else 'wrong'})"
                          for a in results["task_answers"]))


def posttraining_table(run_dir: Path, seconds: float) -> str:
    """base -> SFT -> {DPO, GRPO} on the task's held-out problems, from the eval.json files and stage times. DPO and
    GRPO start from an SFT checkpoint (their "before"); the SFT run's end is shown too."""
    stages = json.loads((run_dir / "stages.json").read_text())["stages"]
    reports = {stage: json.loads((run_dir / stage / "eval.json").read_text()) for stage in ("sft", "dpo", "grpo")}
    start = Path(reports["grpo"]["init"]).name
    models = [("base (pretrained)", reports["sft"]["before"], "pretrain"),
              (f"SFT {start}", reports["grpo"]["before"], None),
              ("SFT -> DPO", reports["dpo"]["after"], "dpo"), ("SFT -> GRPO", reports["grpo"]["after"], "grpo"),
              (f"SFT, all {reports['sft']['steps']} steps", reports["sft"]["after"], "sft")]
    k = reports["sft"]["config"]["pass_k"]
    rows = [[name, *(metrics.get(f"{TASK}/{m}") for m in ("pass@1", f"pass@{k}", "reward", "kl_to_reference")),
             seconds_cell(stages[stage]["seconds"]) if stage else "in SFT"] for name, metrics, stage in models]
    return (finetune_table(run_dir, "grpo", seconds) + f"\n\nPost-training compared on held-out {TASK} problems "
            f"(pass@1 greedy, pass@{k} and reward sampled at temperature 1; DPO and GRPO start from SFT {start}, and "
            f"their KL is to it, on their own samples):\n\n"
            + table(["model", "pass@1", f"pass@{k}", "reward", "KL to reference", "stage time (s)"], rows))


SECTIONS = {"tokenizer": ("Tokenizer and data", tokenizer_table), "pretrain": ("Pretraining", pretrain_table),
            "sft": ("SFT", lambda run_dir, seconds: finetune_table(run_dir, "sft", seconds)),
            "dpo": ("DPO", lambda run_dir, seconds: finetune_table(run_dir, "dpo", seconds)),
            "grpo": ("GRPO, and post-training compared", posttraining_table),
            "int8": ("int8 quantization (weight-only)", int8_table), "serve": ("Serving", serve_table)}
# metrics.jsonl keys drawn for each training stage, and their labels.
CURVES = {"pretrain": {"loss": "train", "eval/loss": "validation"},
          "sft": {"loss": "train", "eval/heldout_loss": "held-out"}, "dpo": {"loss": "train (DPO loss)"},
          "grpo": {"loss": "train (GRPO loss)"}}


def draw_plots(run_dir: Path) -> list[str]:
    """Loss curves of the training stages as plots/<stage>.png; the stages drawn ([] without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    drawn = []
    for stage, keys in CURVES.items():
        records = read_jsonl(run_dir / stage / "metrics.jsonl")
        if not records:
            continue
        figure, axes = plt.subplots(figsize=(6, 3.5))
        for key, label in keys.items():
            points = [(record["step"], record[key]) for record in records if key in record]
            if points:
                axes.plot(*zip(*points), marker="o" if len(points) < 5 else None, label=label)
        axes.set(xlabel="step", ylabel="loss", title=f"{stage} loss")
        axes.legend()
        (run_dir / "plots").mkdir(exist_ok=True)
        figure.savefig(run_dir / "plots" / f"{stage}.png", dpi=100, bbox_inches="tight")
        plt.close(figure)
        drawn.append(stage)
    return drawn


def device_description() -> str:
    """The GPUs this machine has, or its CPU core count."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}"
    return f"CPU, {os.cpu_count()} cores"


def git_commit() -> str:
    """The checkout's commit, marked when it has local changes; 'unknown' outside git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + (" (with local changes)" if dirty.strip() else "")


def write_report(run_dir: Path) -> Path:
    """report.md (and plots/) for the stages recorded in run_dir/stages.json, written atomically."""
    if not (run_dir / "stages.json").exists():
        raise ValueError(f"{run_dir} holds no speedrun (no stages.json): pass the --out-dir of an earlier run")
    state = json.loads((run_dir / "stages.json").read_text())
    header = [["date", state["started"]], ["commit", state["commit"]], ["device", state["device"]],
              ["torch", state["torch"]], ["preset", state["preset"]],
              ["total time (s)", seconds_cell(state["total_seconds"])], ["stages", ", ".join(state["stages"])]]
    lines = ["# nanostack speedrun", "", table(["", ""], header), "",
             f"Every command runs from the repo root ({state['repo']}); re-run any one alone."]
    drawn = draw_plots(run_dir)
    for name, record in state["stages"].items():
        title, make_table = SECTIONS[name]
        lines += ["", f"## {title}", "", f"`{record['command']}`", ""]
        if record["exit_code"] != 0:
            lines.append(f"**Failed** (exit {record['exit_code']}) after {record['seconds']:.1f} s: "
                         f"see {record['log']}.")
            continue
        lines.append(make_table(run_dir, record["seconds"]))
        if name in drawn:
            lines += ["", f"![{name} loss](plots/{name}.png)"]
        elif name in CURVES:
            lines += ["", 'Loss curves need matplotlib: `pip install -e ".[plots]"`, then '
                          f"`python -m nanostack.speedrun --out-dir {display_path(run_dir)} --report-only true`."]
    with atomic_file(run_dir / "report.md", "w") as f:
        f.write("\n".join(lines) + "\n")
    return run_dir / "report.md"


def main(argv=None) -> int:
    """Run the stages (or print them, or rebuild the report) as the flags say; 0 when every stage passed."""
    parser = make_parser(__doc__, prog="python -m nanostack.speedrun")
    add_dataclass_args(parser, SpeedrunConfig, "speedrun")
    config = dataclass_from_args(SpeedrunConfig, parser.parse_args(argv))
    run_dir = Path(config.out_dir)
    if config.report_only:
        print(f"wrote {write_report(run_dir)}")
        return 0
    if config.requests < 1 or config.concurrency < 1 or config.max_tokens < 1:
        raise ValueError(f"--requests {config.requests}, --concurrency {config.concurrency} and --max-tokens "
                         f"{config.max_tokens} must all be at least 1")
    commands = stage_commands(config, free_port())
    if config.dry_run:
        print(f"# from {ROOT}")
        for name, command in commands.items():
            print(f"{name}: {shell_line(command)}")
        return 0
    prepare_run_dir(run_dir)
    run_stages(config, commands, run_dir)
    report_path = write_report(run_dir)
    total = json.loads((run_dir / "stages.json").read_text())["total_seconds"]
    print(f"speedrun done in {total:.0f}s: report in {report_path}")
    return 0


if __name__ == "__main__":
    run(main)

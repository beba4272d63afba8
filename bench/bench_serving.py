"""Online serving benchmark: an aiohttp load generator against the OpenAI-compatible server, vLLM's metrics.

    python bench/bench_serving.py                                     # CPU-sized: starts serve.py on a random model
    python bench/bench_serving.py --device cuda --depth 12 --num-requests 500 --input-len 1024 --output-len 128 \\
        --request-rates 4,16,64,inf
    python bench/bench_serving.py --url http://127.0.0.1:8000 --vocab-size 4096   # a server that is already running

Workload (vLLM's `random` dataset, like bench_engine): every request is a prompt of `input_len` random token ids
sent to /v1/completions with stream, temperature 0 and ignore_eos, so it generates exactly `output_len` tokens.
Arrivals are a Poisson process at each request rate: exponential gaps with mean 1/rate; `inf` sends all at once.
Without --url the script saves a random-weight GPT of --depth (and a tokenizer of made-up tokens, since prompts
are ids) as a checkpoint and starts serve.py on it on 127.0.0.1.

Metrics, with the definitions of vLLM's serving benchmark so the figures compare:
    TTFT   time to first token: from sending the request to the first streamed chunk with a choice
    TPOT   time per output token after the first, per request: (e2e - TTFT) / (output tokens - 1)
    ITL    inter-token latency: every gap between consecutive streamed chunks, pooled over all requests
    E2EL   end-to-end latency: from sending the request to its last chunk
each as mean, median and p99 in ms; throughput over the duration from the first send to the last completion:
requests/s, output tokens/s, and total (prompt + output) tokens/s. Output tokens come from the server's usage.
"""
import argparse
import asyncio
import dataclasses
import json
import math
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiohttp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from nanostack.checkpoint import save_checkpoint  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402
from nanostack.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402


@dataclass
class ServingBenchConfig:
    """Latency and throughput of the HTTP server under Poisson load."""
    url: str = ""                    # server to load; empty = start serve.py here on a random-weight model
    request_rates: str = "2,8,inf"   # requests per second, comma-separated; inf = every request at once
    num_requests: int = 32           # requests per rate
    input_len: int = 64              # prompt tokens (random ids)
    output_len: int = 32             # generated tokens per request
    depth: int = 4                   # model size of the started server (ModelConfig.from_depth)
    vocab_size: int = 8192           # token ids are drawn below this (the vocabulary of the model served)
    device: str = "cpu"              # where the started server runs
    dtype: str = "auto"              # dtype of the started server
    max_num_seqs: int = 64           # the started server's running batch
    seed: int = 0


@dataclass
class RequestResult:
    """What the client saw of one request."""
    ttft: float                      # seconds
    itl: list[float]                 # gaps between consecutive chunks, seconds
    e2e: float
    output_tokens: int


async def send_request(session: aiohttp.ClientSession, url: str, prompt: list[int], output_len: int) -> RequestResult:
    """One streaming completion, timed chunk by chunk."""
    body = {"prompt": prompt, "max_tokens": output_len, "temperature": 0, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, itl, last, output_tokens = None, [], start, 0
    async with session.post(url + "/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"the server answered {response.status}: {await response.text()}")
        async for line in response.content:  # server-sent events: one `data: ...` line per event
            if not line.startswith(b"data: {"):
                continue
            chunk = json.loads(line[len(b"data: "):])
            now = time.perf_counter()
            if "error" in chunk:
                raise RuntimeError(f"the server failed a request: {chunk['error']['message']}")
            if chunk["choices"]:
                if ttft is None:
                    ttft = now - start
                else:
                    itl.append(now - last)
                last = now
            elif chunk.get("usage"):
                output_tokens = chunk["usage"]["completion_tokens"]
    return RequestResult(ttft, itl, last - start, output_tokens)


async def run_rate(url: str, prompts: list[list[int]], output_len: int, rate: float, rng: random.Random):
    """Send the prompts with Poisson arrivals at `rate`; returns (results, duration in seconds)."""
    connector = aiohttp.TCPConnector(limit=0)  # no client-side cap on concurrent connections
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None)) as session:
        tasks = []
        start = time.perf_counter()
        for prompt in prompts:
            tasks.append(asyncio.create_task(send_request(session, url, prompt, output_len)))
            if math.isfinite(rate):
                await asyncio.sleep(rng.expovariate(rate))
        results = await asyncio.gather(*tasks)
        return results, time.perf_counter() - start


def summarize(results: list[RequestResult], duration: float, input_len: int) -> dict:
    """vLLM's serving metrics: throughputs, and mean/median/p99 (ms) of TTFT, TPOT, ITL and E2EL."""
    output_tokens = sum(r.output_tokens for r in results)
    samples = {
        "ttft": [r.ttft for r in results],
        "tpot": [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in results if r.output_tokens > 1],
        "itl": [gap for r in results for gap in r.itl],
        "e2el": [r.e2e for r in results],
    }
    summary = {"completed": len(results), "duration_s": duration, "request_throughput": len(results) / duration,
               "output_throughput": output_tokens / duration,
               "total_token_throughput": (output_tokens + input_len * len(results)) / duration,
               "output_tokens": output_tokens}
    for name, values in samples.items():
        milliseconds = 1e3 * np.asarray(values or [float("nan")])
        summary.update({f"mean_{name}_ms": float(milliseconds.mean()),
                        f"median_{name}_ms": float(np.median(milliseconds)),
                        f"p99_{name}_ms": float(np.percentile(milliseconds, 99))})
    return summary


def made_up_tokenizer(vocab_size: int) -> Tokenizer:
    """A tokenizer of vocab_size tokens (the 256 bytes, then distinct byte pairs): the prompts are ids, but the
    server decodes what it streams, so every id the model can produce needs bytes."""
    num_pairs = vocab_size - 256 - len(SPECIAL_TOKENS)
    if not 0 <= num_pairs <= 256 * 256:
        raise ValueError(f"vocab_size must be in [{256 + len(SPECIAL_TOKENS)}, {256 * 257 + len(SPECIAL_TOKENS)}], "
                         f"got {vocab_size}")
    ranks = {bytes([i]): i for i in range(256)}
    ranks.update({bytes([i // 256, i % 256]): 256 + i for i in range(num_pairs)})
    return Tokenizer(ranks)


def start_server(config: ServingBenchConfig, directory: Path) -> tuple[subprocess.Popen, str]:
    """Save a random model as a checkpoint and run serve.py on it; returns (process, url) once /health answers."""
    torch.manual_seed(config.seed)
    tokenizer = made_up_tokenizer(config.vocab_size)
    model_config = ModelConfig.from_depth(config.depth, tokenizer.vocab_size,
                                          max_seq_len=config.input_len + config.output_len)
    save_checkpoint(directory / "model", GPT(model_config).state_dict(), model_config, tokenizer)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "serve.py"), "--model", str(directory / "model"), "--port", str(port),
         "--device", config.device, "--dtype", config.dtype, "--max-num-seqs", str(config.max_num_seqs),
         "--max-waiting", str(config.num_requests), "--max-num-batched-tokens",
         str(max(2048, config.max_num_seqs))], cwd=ROOT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while not asyncio.run(_healthy(url)):
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError(f"serve.py did not come up (exit code {process.poll()})")
        time.sleep(0.5)
    return process, url


async def _healthy(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session, session.get(url + "/health") as response:
            return response.status == 200
    except aiohttp.ClientError:
        return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, ServingBenchConfig)
    config = dataclass_from_args(ServingBenchConfig, parser.parse_args())
    rates = [float(rate) for rate in config.request_rates.split(",")]
    rng = random.Random(config.seed)
    with tempfile.TemporaryDirectory() as tmp:
        process, url = (None, config.url.rstrip("/")) if config.url else start_server(config, Path(tmp))
        try:
            warmup = [[rng.randrange(config.vocab_size) for _ in range(config.input_len)] for _ in range(2)]
            asyncio.run(run_rate(url, warmup, config.output_len, math.inf, rng))
            runs = []
            for rate in rates:
                prompts = [[rng.randrange(config.vocab_size) for _ in range(config.input_len)]
                           for _ in range(config.num_requests)]
                results, duration = asyncio.run(run_rate(url, prompts, config.output_len, rate, rng))
                runs.append({"request_rate": rate, **summarize(results, duration, config.input_len)})
        finally:
            if process is not None:
                process.send_signal(signal.SIGTERM)
                process.wait(60)

    print_table([{"rate (req/s)": r["request_rate"], "completed": r["completed"], "seconds": r["duration_s"],
                  "req/s": r["request_throughput"], "output tok/s": r["output_throughput"],
                  "total tok/s": r["total_token_throughput"]} for r in runs],
                title=f"throughput: {config.num_requests} requests x ({config.input_len} in, {config.output_len} out)")
    print_table([{"rate (req/s)": r["request_rate"], "metric": name.upper(), "mean ms": r[f"mean_{name}_ms"],
                  "median ms": r[f"median_{name}_ms"], "p99 ms": r[f"p99_{name}_ms"]}
                 for r in runs for name in ("ttft", "tpot", "itl", "e2el")], title="latency")
    write_result("serving", {"config": dataclasses.asdict(config), "started_server": not config.url,
                             "runs": [{**r, "request_rate": str(r["request_rate"])} for r in runs]}, config.device)


if __name__ == "__main__":
    main()

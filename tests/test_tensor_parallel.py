"""Tensor parallel serving on CPU (gloo, two processes): the split model's logits equal the whole model's, the
engine over two ranks gives the same tokens as over one for a mixed batch, and `serve.py --tp 2` answers over
HTTP, stops cleanly on SIGTERM, and ends with a clear error when a worker dies."""
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing

from nanostack.checkpoint import save_checkpoint
from nanostack.model import GPT, ModelConfig
from nanostack.quant import copy_model
from nanostack.sampling import SamplingParams
from nanostack.serving.engine import Engine, EngineConfig
from nanostack.serving.tensor_parallel import (ModelSpec, Workers, broadcasting_forward, check_shardable, load_model,
                                               shard_model)

# conftest.py: `tokenizer` (tiny BPE), `sharpened_model` (fixed-seed random GPT factory), `one_thread`.
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 160
VARIANTS = {"gqa": dict(n_head=4, n_kv_head=2), "moe": dict(n_expert=4, n_expert_active=2, n_kv_head=2),
            "tied": dict(n_head=4, n_kv_head=4, tie_embeddings=True),
            "qwen": dict(n_head=4, n_kv_head=2, head_dim=24, qkv_bias=True, qk_norm=True, sliding_window=8)}
ENGINE = dict(block_size=8, num_blocks=64, max_num_seqs=6, max_num_batched_tokens=48)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint_dir(tokenizer, sharpened_model, tmp_path_factory):
    model = sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN)
    return save_checkpoint(tmp_path_factory.mktemp("tp") / "ckpt", model.state_dict(), model.config, tokenizer)


def test_only_even_splits_of_full_precision_models_are_accepted():
    config = ModelConfig(vocab_size=64, n_head=4, n_kv_head=1, n_embd=64, mlp_hidden=100)
    with pytest.raises(ValueError, match=r"n_kv_head=1 is not divisible by 2"):
        check_shardable(config, 2)
    with pytest.raises(ValueError, match=r"n_head=4, n_kv_head=1, mlp_hidden=100 are not divisible by 8"):
        check_shardable(config, 8)
    with pytest.raises(ValueError, match="full-precision"):
        check_shardable(ModelConfig(vocab_size=64, n_embd=64), 2, quantized=True)
    with pytest.raises(ValueError, match=">= 1"):
        check_shardable(config, 0)
    check_shardable(config, 1, quantized=True)  # one rank: nothing to split


def test_workers_refuse_an_uneven_split_before_spawning(checkpoint_dir):
    # The checkpoint has n_head=4, n_kv_head=2: three ranks cannot share them.
    with pytest.raises(ValueError, match="not divisible by 3"):
        Workers(ModelSpec(str(checkpoint_dir), "cpu", torch.float32), 3)
    assert not dist.is_initialized()


# ----------------------------------------------------------------------------------------------------------
# The split itself: two ranks under gloo, each computing the full forward of its shard

def _split_logits_rank(rank: int, world_size: int, port: int, results_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    results = {}
    for name, overrides in VARIANTS.items():
        torch.manual_seed(0)
        whole = GPT(ModelConfig(vocab_size=96, n_layer=2, n_embd=64, max_seq_len=32, **overrides)).eval()
        with torch.no_grad():  # biases and q/k norms start at 0 and 1: make them count (split with their heads)
            for param_name, param in whole.named_parameters():
                if param_name.endswith((".bias", "q_norm.weight", "k_norm.weight")):
                    param.normal_(0.0, 0.5)
        idx = torch.randint(96, (2, 24), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = whole(idx)
            split = shard_model(copy_model(whole).eval(), rank, world_size)
            got = split(idx)
        results[name] = {"max_abs_diff": (got - expected).abs().max().item(),
                         "logit_scale": expected.abs().max().item(),
                         "params": [whole.num_params(), split.num_params()],
                         "kv_layout": [list(whole.kv_layout()), list(split.kv_layout())]}
    if rank == 0:
        Path(results_path).write_text(json.dumps(results))
    dist.destroy_process_group()


def test_two_ranks_compute_the_logits_of_the_whole_model(tmp_path):
    results_path = tmp_path / "results.json"
    torch.multiprocessing.spawn(_split_logits_rank, args=(2, free_port(), str(results_path)), nprocs=2)
    results = json.loads(results_path.read_text())
    assert set(results) == set(VARIANTS)
    for name, result in results.items():
        assert result["max_abs_diff"] <= 1e-5 * max(1.0, result["logit_scale"]), (name, result)
        whole, split = result["params"]
        assert split < whole, (name, result)  # the rank really holds less
        (layers, kv_heads, head_dim), split_layout = result["kv_layout"]
        assert split_layout == [layers, kv_heads // 2, head_dim], name


# ----------------------------------------------------------------------------------------------------------
# The engine over two ranks (rank 0 in a child process, which spawns rank 1 through Workers: the real path)

PROMPTS_SEED = 3


def _mixed_requests(vocab: int):
    generator = torch.Generator().manual_seed(PROMPTS_SEED)
    prompts = [torch.randint(vocab, (int(n),), generator=generator).tolist() for n in (5, 40, 17, 3, 64, 29, 11)]
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)] * 5 + [
        SamplingParams(max_tokens=10, temperature=0.8, top_k=20, seed=7, ignore_eos=True),
        SamplingParams(max_tokens=14, temperature=1.0, seed=11, logprobs=2, ignore_eos=True)]
    return prompts, params


def _engine_tokens(engine: Engine, vocab: int) -> list:
    prompts, params = _mixed_requests(vocab)
    return [[out.new_token_ids, out.logprobs] for out in engine.generate(prompts, params)]


def _engine_rank0(rank: int, checkpoint: str, results_path: str) -> None:
    torch.set_num_threads(1)
    spec = ModelSpec(checkpoint, "cpu", torch.float32)
    workers = Workers(spec, 2)
    try:
        model = load_model(spec, 0, 2)["model"]
        engine = Engine(model, None, EngineConfig(**ENGINE), forward=broadcasting_forward(model))
        workers.start(engine.blocks.num_blocks, engine.config.block_size, "cpu")
        split = _engine_tokens(engine, model.config.vocab_size)
    finally:
        workers.stop("cpu")
    whole = Engine.from_checkpoint(checkpoint, **ENGINE)
    Path(results_path).write_text(json.dumps({"split": split, "whole": _engine_tokens(whole, whole.model.config.vocab_size),
                                              "exit_codes": [p.exitcode for p in workers.processes]}))


def test_engine_over_two_ranks_matches_one(checkpoint_dir, tmp_path):
    results_path = tmp_path / "results.json"
    torch.multiprocessing.spawn(_engine_rank0, args=(str(checkpoint_dir), str(results_path)), nprocs=1)
    results = json.loads(results_path.read_text())
    assert results["exit_codes"] == [0]
    for i, ((split_tokens, split_logprobs), (whole_tokens, whole_logprobs)) in enumerate(
            zip(results["split"], results["whole"])):
        assert split_tokens == whole_tokens and len(whole_tokens) >= 10, i
        if whole_logprobs is not None:
            assert split_logprobs == pytest.approx(whole_logprobs, abs=1e-4), i


# ----------------------------------------------------------------------------------------------------------
# serve.py --tp 2 end to end

def _start_server(checkpoint_dir, port):
    command = [sys.executable, str(ROOT / "serve.py"), "--model", str(checkpoint_dir), "--port", str(port),
               "--device", "cpu", "--tp", "2", "--shutdown-timeout", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    while not any("listening on" in line for line in lines):
        assert process.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.05)
    pids = re.search(r"worker pids \[(\d+)\]", "".join(lines))
    assert pids, "".join(lines)
    return process, lines, reader, int(pids.group(1))


def _complete(port: int, prompt: str) -> str:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps({
        "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())["choices"][0]["text"]


@pytest.mark.slow
def test_serve_py_tp2_answers_like_one_rank_and_stops_cleanly(checkpoint_dir):
    prompts = ["def fib(n):", "The quick brown fox", "Grüße aus Köln! 你好"]
    one_rank = Engine.from_checkpoint(checkpoint_dir)
    tokenizer = one_rank.tokenizer  # the API puts <|bos|> before a string prompt, as in training
    expected = [out.text for out in one_rank.generate([[tokenizer.bos_id] + tokenizer.encode(p) for p in prompts],
                                                      SamplingParams(max_tokens=16, temperature=0, ignore_eos=True))]
    port = free_port()
    process, lines, reader, _ = _start_server(checkpoint_dir, port)
    try:
        answers = [None] * len(prompts)
        threads = [threading.Thread(target=lambda i=i: answers.__setitem__(i, _complete(port, prompts[i])))
                   for i in range(len(prompts))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(90)
        assert answers == expected
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=60) == 0, "".join(lines)
        reader.join(10)
        assert "split over 2 ranks, " in "".join(lines)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
def test_a_dead_worker_takes_the_server_down_with_a_clear_error(checkpoint_dir):
    port = free_port()
    process, lines, reader, worker_pid = _start_server(checkpoint_dir, port)
    try:
        assert _complete(port, "hello")  # the pair works ...
        os.kill(worker_pid, signal.SIGKILL)  # ... until rank 1 dies
        assert process.wait(timeout=60) == 1
        reader.join(10)
        assert re.search(r"error: tensor-parallel worker tp-rank-1 \(pid \d+\) exited with code -9", "".join(lines))
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()

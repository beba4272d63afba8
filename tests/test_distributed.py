"""DDP and FSDP2 on CPU (gloo) under torchrun: equivalence with one process, resume, two nodes, failures.

Every distributed run is the real `train.py` under `torchrun --nproc_per_node=2`, on a tiny corpus. The
reference is one process with the same global batch: the same windows per step, so the same losses.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanostack import distributed
from nanostack.model import GPT, ModelConfig

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
STEPS = 6


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    work = tmp_path_factory.mktemp("dist")
    (work / "corpus").mkdir()
    stdlib = Path(json.__file__).parent.parent
    for name in ("bisect.py", "heapq.py", "textwrap.py", "shlex.py", "colorsys.py", "fnmatch.py", "glob.py"):
        shutil.copy(stdlib / name, work / "corpus" / name)
    return work


def train_args(work: Path, out: str, *extra: str) -> list[str]:
    return [str(ROOT / "train.py"), "--source", str(work / "corpus"), "--tokenizer", str(work / "tok.json"),
            "--vocab-size", "320", "--depth", "1", "--seq-len", "32", "--steps", str(STEPS), "--log-every", "1",
            "--eval-every", "0", "--sample-every", "0", "--save-every", "3", "--keep", "3", "--val-fraction", "0.3",
            "--eval-batches", "2", "--lr", "3e-3", "--warmup-steps", "2", "--out-dir", str(work / out), *extra]


def run(command: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)
    assert result.returncode == 0, f"{command}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


def single(work, out, *extra):
    return run([sys.executable] + train_args(work, out, *extra))


def torchrun(work, out, *extra):
    return run(TORCHRUN + ["--nproc_per_node=2", f"--master_port={free_port()}"] + train_args(work, out, *extra))


def losses(work: Path, out: str) -> list[float]:
    records = [json.loads(line) for line in (work / out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def weights(work: Path, out: str, step: int = STEPS) -> dict:
    return load_file(work / out / f"step_{step:06d}" / "model.safetensors")


def interrupted_copy(work: Path, source: str, dest: str, at_step: int = 3) -> None:
    """A copy of a finished run as if it had crashed right after its step-`at_step` checkpoint."""
    shutil.copytree(work / source, work / dest)
    for later in (work / dest).glob("step_*"):
        if int(later.name.split("_")[1]) > at_step:
            shutil.rmtree(later)
    (work / dest / "latest").write_text(f"step_{at_step:06d}\n")


def assert_same_weights(a: dict, b: dict, atol=1e-5):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-4, msg=name)


@pytest.fixture(scope="module")
def reference(workdir):
    """One process, global batch 4: the run every distributed run must reproduce."""
    single(workdir, "single", "--batch-size", "4")
    return losses(workdir, "single")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_ranks_match_one_process_with_the_same_global_batch(workdir, reference, strategy):
    torchrun(workdir, strategy, "--batch-size", "2", "--strategy", strategy)
    assert losses(workdir, strategy) == pytest.approx(reference, abs=1e-5)
    assert_same_weights(weights(workdir, strategy), weights(workdir, "single"))

    # Exact resume under the same strategy: the interrupted run continues bit for bit.
    interrupted_copy(workdir, strategy, f"{strategy}-resumed")
    torchrun(workdir, f"{strategy}-resumed", "--batch-size", "2", "--strategy", strategy, "--resume", "true")
    assert losses(workdir, f"{strategy}-resumed") == losses(workdir, strategy)
    assert_same_weights(weights(workdir, f"{strategy}-resumed"), weights(workdir, strategy), atol=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (NCCL)")
def test_fsdp2_on_nccl_with_one_process_matches_plain_training(workdir):
    on_gpu = ("--device", "cuda", "--dtype", "float32")
    single(workdir, "cuda-single", *on_gpu)
    run(TORCHRUN + ["--nproc_per_node=1", f"--master_port={free_port()}"]
        + train_args(workdir, "cuda-fsdp", "--strategy", "fsdp", *on_gpu))
    assert losses(workdir, "cuda-fsdp") == pytest.approx(losses(workdir, "cuda-single"), rel=1e-4)


@pytest.mark.slow
def test_gradient_accumulation_under_ddp_matches_one_big_batch(workdir, reference):
    torchrun(workdir, "ddp-accum", "--batch-size", "1", "--grad-accum", "2", "--strategy", "ddp")
    assert losses(workdir, "ddp-accum") == pytest.approx(reference, abs=1e-5)


@pytest.mark.slow
def test_resume_across_world_sizes(workdir, reference):
    # saved by 1 process, resumed by 2 ranks
    interrupted_copy(workdir, "single", "one-to-two")
    torchrun(workdir, "one-to-two", "--batch-size", "2", "--strategy", "ddp", "--resume", "true")
    assert losses(workdir, "one-to-two") == pytest.approx(reference, abs=1e-5)
    # saved by 2 FSDP ranks, resumed by 1 process
    if not (workdir / "fsdp").exists():
        torchrun(workdir, "fsdp", "--batch-size", "2", "--strategy", "fsdp")
    interrupted_copy(workdir, "fsdp", "two-to-one")
    single(workdir, "two-to-one", "--batch-size", "4", "--resume", "true")
    assert losses(workdir, "two-to-one") == pytest.approx(reference, abs=1e-5)


@pytest.mark.slow
def test_sharded_checkpoints_resume_on_another_world_size_and_consolidate(workdir, reference):
    torchrun(workdir, "sharded", "--batch-size", "2", "--strategy", "fsdp", "--sharded-checkpoint", "true")
    step3 = workdir / "sharded" / "step_000003"
    assert (step3 / "shards").is_dir() and not (step3 / "model.safetensors").exists()
    interrupted_copy(workdir, "sharded", "sharded-resumed")
    single(workdir, "sharded-resumed", "--batch-size", "4", "--resume", "true", "--sharded-checkpoint", "true")
    assert losses(workdir, "sharded-resumed") == pytest.approx(reference, abs=1e-5)
    run([sys.executable, "-m", "nanostack.distributed", "consolidate", str(workdir / "sharded")])
    assert_same_weights(weights(workdir, "sharded"), weights(workdir, "single"))


@pytest.mark.slow
def test_two_nodes_on_loopback_match_one_node(workdir, reference):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    nodes = [subprocess.Popen(TORCHRUN + ["--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                                          "--master_addr=127.0.0.1", f"--master_port={port}"]
                              + train_args(workdir, "two-nodes", "--batch-size", "2", "--strategy", "ddp"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
             for node in (0, 1)]
    for node in nodes:
        _, err = node.communicate(timeout=240)
        assert node.returncode == 0, err[-3000:]
    assert losses(workdir, "two-nodes") == pytest.approx(reference, abs=1e-5)


FAILING_WORKER = """
import sys, torch
from nanostack import distributed, objectives
from nanostack.model import GPT, ModelConfig
from nanostack.training import TrainConfig, train
rank = distributed.setup(torch.device("cpu"))
torch.manual_seed(0)
model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=16))
class Batches:
    def next_batch(self):
        x = torch.randint(0, 64, (2, 17))
        return x[:, :-1], x[:, 1:]
def objective(model, batch):
    if rank.rank == 1:  # rank 1 fails while rank 0 waits in the gradient all-reduce
        raise RuntimeError("rank 1 failed on purpose")
    return objectives.next_token(model, batch)
train(model, objective, Batches(), TrainConfig(out_dir=sys.argv[1], steps=100, lr=1e-3, save_every=1000),
      model_config=model.config, tokenizer=None, parallel=distributed.ParallelConfig(strategy="ddp"), rank=rank)
"""


@pytest.mark.slow
def test_a_failing_rank_ends_the_whole_job_promptly(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(FAILING_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    result = subprocess.run(TORCHRUN + ["--nproc_per_node=2", f"--master_port={free_port()}", str(script),
                                        str(tmp_path / "out")],
                            capture_output=True, text=True, timeout=120, env=env)
    assert result.returncode != 0
    assert "rank 1 failed on purpose" in result.stderr + result.stdout
    assert time.monotonic() - start < 90


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_gives_the_same_gradients(mode):
    config = ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=16)
    torch.manual_seed(0)
    plain = GPT(config).double()
    checkpointed = GPT(config).double()
    checkpointed.load_state_dict(plain.state_dict())
    distributed.apply_activation_checkpointing(checkpointed, mode)
    idx = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(1))
    for model in (plain, checkpointed):
        model(idx, idx).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(b.grad, a.grad, atol=1e-12, rtol=1e-10, msg=name)


def test_parallelize_rejects_bad_settings():
    model = GPT(ModelConfig(vocab_size=64, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=16))
    with pytest.raises(ValueError, match="strategy"):
        distributed.parallelize(model, distributed.ParallelConfig(strategy="zero3"), distributed.Rank())
    with pytest.raises(ValueError, match="torchrun"):
        distributed.parallelize(model, distributed.ParallelConfig(strategy="ddp"), distributed.Rank())
    with pytest.raises(ValueError, match="activation_checkpointing"):
        distributed.apply_activation_checkpointing(model, "some")

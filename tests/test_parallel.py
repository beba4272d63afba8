"""Tensor, pipeline and 2-D parallel training on CPU (gloo) under torchrun, each layout checked against one process.

Two torchrun jobs (4 ranks, then 2) run tests/parallel_worker.py, which trains several layouts in turn; the
reference is the same `run_layout` in this process with the same global batch. Every fp32 layout must reproduce
the reference's per-step losses and gradient norms (gradients are clipped every step, so a wrong global norm
would change every update), its evaluation, and after consolidation its final weights; the bf16 layout its
losses within bf16 rounding. Some layouts recompute activations (full or selective checkpointing). Checkpoints
saved at (dp 2, tp 2) resume at (dp 4), (pp 2) and in one process. The interleaved-1f1b layouts (alone, with
FSDP2 and with tp) train a 4-layer model (the "-deep" reference), so each of the 2 pp ranks runs 2 stages of one
layer; the (pp 2, dp 2) one's sharded checkpoint resumes in one process.
"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from nanostack import checkpoint, distributed, hf, parallel
from nanostack.cli import SettingsError
from nanostack.model import GPT, ModelConfig
from parallel_worker import STEPS, run_layout

ROOT = Path(__file__).resolve().parent.parent
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"}

FOUR_RANKS = [  # (name, ParallelConfig fields, per-rank batch settings, run to resume from)
    ("fsdp-tp", {"strategy": "fsdp", "tp": 2, "sharded_checkpoint": True}, {"batch_size": 2}, None),
    ("pp-fsdp", {"strategy": "fsdp", "pp": 2}, {"batch_size": 1, "grad_accum": 2}, None),
    ("pp-tp", {"tp": 2, "pp": 2}, {"batch_size": 2, "grad_accum": 2}, None),
    ("dp4-from-fsdp-tp", {"strategy": "fsdp", "sharded_checkpoint": True}, {"batch_size": 1}, "fsdp-tp"),
    ("pp-fsdp-bf16", {"strategy": "fsdp", "pp": 2, "activation_checkpointing": "selective"},
     {"batch_size": 1, "grad_accum": 2, "dtype": "bfloat16"}, None),
    ("pp-fsdp-interleaved-deep", {"strategy": "fsdp", "pp": 2, "pp_schedule": "interleaved-1f1b"},
     {"batch_size": 1, "grad_accum": 2}, None),
    ("pp-tp-interleaved-deep", {"tp": 2, "pp": 2, "pp_schedule": "interleaved-1f1b"},
     {"batch_size": 2, "grad_accum": 2}, None),
]
TWO_RANKS = [
    ("tp", {"tp": 2, "activation_checkpointing": "selective"}, {}, None),
    ("pp-gpipe", {"pp": 2, "pp_schedule": "gpipe"}, {"batch_size": 2, "grad_accum": 2}, None),
    ("pp-1f1b", {"pp": 2, "activation_checkpointing": "full"}, {"batch_size": 2, "grad_accum": 2}, None),
    ("pp-from-fsdp-tp", {"pp": 2, "pp_schedule": "gpipe"}, {}, "fsdp-tp"),  # sharded (dp 2, tp 2) -> (pp 2)
    ("pp-from-tp", {"pp": 2, "pp_schedule": "gpipe"}, {}, "tp"),  # a full checkpoint into pipeline stages
    ("tp-moe", {"tp": 2}, {}, None),
    ("pp-interleaved-deep", {"pp": 2, "pp_schedule": "interleaved-1f1b", "activation_checkpointing": "full"},
     {"batch_size": 2, "grad_accum": 2}, None),
]
# The models of layouts named "...-moe" (with Qwen's attention) and "...-deep" (2 layers per pipeline rank).
MODELS = {"moe": {"n_expert": 2, "qkv_bias": True, "qk_norm": True}, "deep": {"n_layer": 4}}
BF16 = {"dtype": "bfloat16"}  # the single-bf16 reference: bf16 autocast (the layout: autocast, FSDP2 casts weights)


def specs(layouts) -> str:
    return json.dumps([{"name": name, "parallel": par, "train": batch, "resume_from": source,
                        **({"model": MODELS[kind]} if (kind := name.rsplit("-", 1)[-1]) in MODELS else {})}
                       for name, par, batch, source in layouts])


def torchrun(ranks: int, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(TORCHRUN + ["--standalone", f"--nproc_per_node={ranks}", *args],
                          capture_output=True, text=True, timeout=timeout, env=ENV, cwd=ROOT)


def succeeded(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"


@pytest.fixture(scope="module")
def work(tmp_path_factory, tokenizer):
    work = tmp_path_factory.mktemp("parallel")
    tokenizer.save(work / "tokenizer.json")
    return work


@pytest.fixture(scope="module")
def runs(work):
    """Every layout's run directory, in `work`: the references, then the 4-rank job, then the 2-rank job."""
    run_layout(work, {"name": "single"})
    for kind, model in MODELS.items():
        run_layout(work, {"name": f"single-{kind}", "model": model})
    run_layout(work, {"name": "single-bf16", "train": BF16})
    succeeded(torchrun(4, "tests/parallel_worker.py", str(work), specs(FOUR_RANKS)))
    succeeded(torchrun(2, "tests/parallel_worker.py", str(work), specs(TWO_RANKS)))
    run_layout(work, {"name": "one-from-fsdp-tp", "resume_from": "fsdp-tp"})  # (dp 2, tp 2) -> one process
    run_layout(work, {"name": "one-from-pp-fsdp-interleaved-deep", "model": MODELS["deep"],  # 2 stages a rank ->
                      "train": {"batch_size": 2, "grad_accum": 2}, "resume_from": "pp-fsdp-interleaved-deep"})  # one
    return work


def metrics(run: Path) -> tuple[list[dict], dict]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], next(r for r in records if "eval/loss" in r)


def final_weights_at(directory: Path) -> dict:
    """A checkpoint's weights, consolidated first when they were saved as shards."""
    if not (directory / "model.safetensors").exists():
        distributed.consolidate(directory)
    return load_file(directory / "model.safetensors")


def final_weights(run: Path) -> dict:
    return final_weights_at(run / f"step_{STEPS:06d}")


@pytest.mark.slow
@pytest.mark.parametrize("name", [name for name, *_ in FOUR_RANKS + TWO_RANKS]
                         + ["one-from-fsdp-tp", "one-from-pp-fsdp-interleaved-deep"])
def test_layout_matches_one_process(runs, name):
    kind = name.rsplit("-", 1)[-1]
    reference = runs / ("single-" + kind if kind in ("bf16", *MODELS) else "single")
    (steps, evaluation), (ref_steps, ref_evaluation) = metrics(runs / name), metrics(reference)
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    if kind == "bf16":  # bf16 rounds differently where FSDP2 casts the weights and autocast the matmul inputs
        assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in ref_steps], abs=2e-3)
        assert evaluation["eval/loss"] == pytest.approx(ref_evaluation["eval/loss"], abs=2e-3)
        return
    for key in ("loss", "grad_norm"):
        assert [s[key] for s in steps] == pytest.approx([s[key] for s in ref_steps], abs=1e-5), key
    assert evaluation["eval/loss"] == pytest.approx(ref_evaluation["eval/loss"], abs=1e-5)
    assert_same_weights(final_weights(runs / name), final_weights(reference))


def assert_same_weights(weights: dict, reference: dict) -> None:
    # 1e-4, not 1e-5: AdamW divides by sqrt(v), so an element whose gradients are all near zero moves by
    # lr-sized steps on rounding noise (one embedding element of the MoE run differs by 8e-5).
    assert weights.keys() == reference.keys()
    for key in weights:
        torch.testing.assert_close(weights[key], reference[key], atol=1e-4, rtol=1e-4, msg=key)


@pytest.mark.slow
def test_a_consolidated_pipeline_checkpoint_serves_and_exports(runs, tmp_path):
    from nanostack.quant import load_for_serving
    directory = runs / "pp-tp" / f"step_{STEPS:06d}"
    assert (directory / "shards").is_dir()
    final_weights(runs / "pp-tp")
    model = load_for_serving(directory, "cpu")["model"]  # what serve.py loads
    reference = checkpoint.load_checkpoint(runs / "single")["model"]
    prompt = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(prompt), reference(prompt), atol=1e-4, rtol=1e-4)
    round_trip = hf.import_hf(hf.export_hf(directory, tmp_path / "hf"))
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(round_trip.state_dict()[name], tensor, atol=0, rtol=0, msg=name)


def train_args(work: Path, out: str, *extra: str) -> list[str]:
    return ["train.py", "--source", str(work / "corpus"), "--tokenizer", str(work / "tokenizer.json"),
            "--vocab-size", "320", "--depth", "1", "--n-layer", "2", "--n-head", "2", "--n-kv-head", "2", "--seq-len", "32", "--steps", "4",
            "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1", "--eval-every", "0", "--sample-every", "0",
            "--save-every", "4", "--val-fraction", "0.3", "--eval-batches", "2", "--out-dir", str(work / out), *extra]


@pytest.mark.slow
def test_train_py_pipelines_like_one_process(work):
    (work / "corpus").mkdir()
    stdlib = Path(json.__file__).parent.parent
    for name in ("bisect.py", "heapq.py", "textwrap.py", "shlex.py", "colorsys.py"):
        (work / "corpus" / name).write_text((stdlib / name).read_text())
    single = subprocess.run([sys.executable] + train_args(work, "train-single", "--batch-size", "4"),
                            capture_output=True, text=True, timeout=300, env=ENV, cwd=ROOT)
    succeeded(single)
    result = torchrun(2, *train_args(work, "train-pp", "--pp", "2", "--batch-size", "2", "--grad-accum", "2"))
    succeeded(result)
    assert "samples are off under --tp/--pp" in result.stdout
    (steps, evaluation), (ref_steps, ref_evaluation) = metrics(work / "train-pp"), metrics(work / "train-single")
    assert [s["loss"] for s in steps] == pytest.approx([s["loss"] for s in ref_steps], abs=1e-5)
    assert evaluation["eval/bpb"] == pytest.approx(ref_evaluation["eval/bpb"], abs=1e-5)
    assert_same_weights(load_file(work / "train-single" / "step_000004" / "model.safetensors"),
                        final_weights_at(work / "train-pp" / "step_000004"))


# ----------------------------------------------------------------------------------------------------------
# Bad layouts and failures

def test_mesh_sizes_must_multiply_to_the_world_size():
    with pytest.raises(SettingsError, match="must equal the world size 4"):
        parallel.build_mesh("cpu", 4, dp=2, tp=2, pp=2)
    with pytest.raises(SettingsError, match="must divide the world size 4"):
        parallel.build_mesh("cpu", 4, dp=0, tp=3, pp=1)
    with pytest.raises(SettingsError, match="--pp must be >= 1"):
        parallel.build_mesh("cpu", 4, dp=0, tp=1, pp=0)


def test_the_model_must_split_evenly():
    config = ModelConfig(vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=16)
    parallel.check_model_fits(config, tp=2, pp=2)
    with pytest.raises(SettingsError, match="n_kv_head=2"):
        parallel.check_model_fits(config, tp=4, pp=1)
    with pytest.raises(SettingsError, match=r"n_head=4, n_kv_head=2"):
        parallel.check_model_fits(config, tp=3, pp=1)
    with pytest.raises(SettingsError, match="--pp 3 is larger than the model's 2 layers"):
        parallel.check_model_fits(config, tp=1, pp=3)
    with pytest.raises(SettingsError, match="untied"):
        parallel.check_model_fits(ModelConfig(**{**vars(config), "tie_embeddings": True}), tp=1, pp=2)


def test_parallelize_refuses_model_parallel_without_torchrun():
    model = GPT(ModelConfig(vocab_size=64, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=16))
    with pytest.raises(ValueError, match="--tp 2 needs torchrun"):
        distributed.parallelize(model, distributed.ParallelConfig(tp=2), distributed.Rank())


@pytest.mark.parametrize("n_layer", range(1, 9))
def test_stages_cover_the_layers_in_order_evenly(n_layer):
    for n_stages in range(1, n_layer + 1):
        stages = [parallel.stage_layers(n_layer, n_stages, s) for s in range(n_stages)]
        assert [i for stage in stages for i in stage] == list(range(n_layer))
        assert max(map(len, stages)) - min(map(len, stages)) <= 1


@pytest.mark.parametrize("pp,virtual", [(1, 2), (2, 1), (2, 2), (3, 2), (4, 2)])
def test_interleaved_stages_go_round_robin_and_cover_the_layers_once(pp, virtual):
    n_stages = pp * virtual
    owners = {stage: rank for rank in range(pp) for stage in parallel.rank_stages(pp, rank, virtual)}
    assert sorted(owners) == list(range(n_stages)) and all(owners[s] == s % pp for s in owners)
    for n_layer in range(n_stages, 9):
        in_stage_order = [i for stage in range(n_stages) for i in parallel.stage_layers(n_layer, n_stages, stage)]
        assert in_stage_order == list(range(n_layer))


def test_a_ranks_chunks_share_its_model_and_chain_into_the_whole_forward():
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=16)
    whole = GPT(config)
    ranks = [GPT(config) for _ in range(2)]
    for model in ranks:
        model.load_state_dict(whole.state_dict())
    chunks = {}
    for rank, model in enumerate(ranks):
        own = parallel.pipeline_stage(model, rank, pp=2, virtual=2)
        assert [c.stage for c in own] == [rank, rank + 2]
        assert list(model.layers) == [str(rank), str(rank + 2)]  # one layer per stage, under its own name
        assert (model.tok_emb is not None, model.norm is not None) == (rank == 0, rank == 1)
        shared = [p for c in own for p in c.parameters()]
        assert len(shared) == len({id(p) for p in shared}) == len(list(model.parameters()))  # each once, none copied
        assert {id(p) for p in shared} == {id(p) for p in model.parameters()}
        chunks.update({c.stage: c for c in own})
    x = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        out = x
        for stage in range(4):
            out = chunks[stage](out)
        torch.testing.assert_close(out, whole(x))


def test_interleaving_refuses_micro_batch_counts_it_cannot_group_and_too_few_layers():
    model = GPT(ModelConfig(vocab_size=64, n_layer=4, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=16))
    interleaved = distributed.ParallelConfig(pp=2, pp_schedule="interleaved-1f1b")
    with pytest.raises(SettingsError, match="--grad-accum is 3: make --grad-accum a multiple of 2"):
        distributed.parallelize(model, interleaved, distributed.Rank(), micro_batches=3)
    with pytest.raises(SettingsError, match="2 x --pp 4 = 8 stages of at least one layer each, but it has 4"):
        distributed.parallelize(model, distributed.ParallelConfig(pp=4, pp_schedule="interleaved-1f1b"),
                                distributed.Rank(), micro_batches=4)


def test_clip_grad_norm_matches_torch_on_one_process():
    torch.manual_seed(0)
    grads = [torch.randn(5, 3), torch.randn(7)]
    ours, theirs = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads], [torch.nn.Parameter(torch.zeros_like(g))
                                                                              for g in grads]
    for a, b, g in zip(ours, theirs, grads):
        a.grad, b.grad = g.clone(), g.clone()
    norm = parallel.clip_grad_norm_(ours, 0.5)
    torch.testing.assert_close(norm, torch.nn.utils.clip_grad_norm_(theirs, 0.5))
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad)


@pytest.mark.slow
def test_a_bad_layout_under_torchrun_is_one_error_line_and_every_rank_fails(tmp_path):
    start = time.monotonic()
    result = torchrun(2, "train.py", "--tp", "4", "--out-dir", str(tmp_path / "out"), timeout=120)
    assert result.returncode != 0 and time.monotonic() - start < 120
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --tp 4 x --pp 1 = 4 ranks per model replica must divide the world size 2 "
                      "(torchrun's ranks); change --nproc_per_node/--nnodes, --tp or --pp"]
    # torchrun's summary lists every rank that failed: status 1, or SIGTERM when its peer failed first
    assert "rank      : 0 (" in result.stderr and "rank      : 1 (" in result.stderr


KILLED_WORKER = """
import os, signal, sys, time
sys.path.insert(0, sys.argv[2])
from parallel_worker import run_layout
import nanostack.objectives as objectives
next_token, calls = objectives.next_token, []
def dying(model, batch):
    calls.append(1)
    if len(calls) == 3 and os.environ["RANK"] == "1":  # mid-run, while rank 0 waits in a tp collective
        open(sys.argv[3], "w").write(repr(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
    return next_token(model, batch)
objectives.next_token = dying
run_layout(__import__("pathlib").Path(sys.argv[1]), {"name": "killed", "parallel": {"tp": 2}})
"""
# torchrun polls its workers every 0.1 s (--monitor-interval); on a dead one it SIGTERMs the others, which end at
# once even inside a collective. Measured: about 2 s on a loaded 2-core machine; the bound leaves room.
KILL_BOUND_S = 10


@pytest.mark.slow
def test_a_killed_rank_ends_the_job_promptly(work, tmp_path):
    script = tmp_path / "killed.py"
    script.write_text(KILLED_WORKER)
    killed_at = tmp_path / "killed_at"
    result = torchrun(2, str(script), str(work), str(ROOT / "tests"), str(killed_at), timeout=120)
    ended_at = time.time()
    assert result.returncode != 0
    assert "Signal 9 (SIGKILL)" in result.stderr or "exitcode  : -9" in result.stderr
    assert ended_at - float(killed_at.read_text()) < KILL_BOUND_S

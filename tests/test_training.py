"""The training loop: schedule, optimizer groups, accumulation, bits per byte, exact resume, divergence, fp16
loss scaling."""
import json
import math
import re
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from nanostack import checkpoint, objectives, training
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer
from nanostack.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["def f(x):\n    return x * 2\n" * 10, "for i in range(3):\n    print(i)\n" * 10], 300)


def tiny_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=32),
                            **overrides})
    return GPT(config), config


class RandomBatches:
    """A resumable batch source: batch i is a pure function of (seed, i). Optionally fails at one batch."""

    def __init__(self, vocab_size, batch_size=2, seq_len=16, seed=0, fail_at=None):
        self.vocab_size, self.batch_size, self.seq_len, self.seed = vocab_size, batch_size, seq_len, seed
        self.position, self.fail_at = 0, fail_at

    def next_batch(self):
        if self.position == self.fail_at:
            raise KeyboardInterrupt("simulated crash")
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.position)
        self.position += 1
        x = torch.randint(0, self.vocab_size, (self.batch_size, self.seq_len + 1), generator=g)
        return x[:, :-1], x[:, 1:]

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def read_losses(run_dir):
    lines = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in lines if "loss" in r}


def test_learning_rate_schedules():
    config = TrainConfig(steps=100, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [training.learning_rate(s, config, 1.0) for s in range(100)]
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    assert lrs[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    wsd = replace(config, schedule="wsd", decay_ratio=0.2)
    lrs = [training.learning_rate(s, wsd, 1.0) for s in range(100)]
    assert lrs[10:80] == [1.0] * 70
    assert lrs[80:] == pytest.approx([1.0 - 0.9 * (s - 80) / 20 for s in range(80, 100)])
    with pytest.raises(ValueError, match="schedule"):
        training.learning_rate(50, replace(config, schedule="linear"), 1.0)


def test_no_weight_decay_on_norms_and_embeddings(tokenizer):
    model, _ = tiny_model(tokenizer)
    optimizer = training.make_optimizer(model, TrainConfig(weight_decay=0.1), lr=1e-3)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in optimizer.param_groups[0]["params"]}
    undecayed = {names[id(p)] for p in optimizer.param_groups[1]["params"]}
    assert optimizer.param_groups[1]["weight_decay"] == 0.0
    assert "tok_emb.weight" in undecayed and "norm.weight" in undecayed
    assert "layers.0.attn.wq.weight" in decayed and "lm_head.weight" in decayed
    assert decayed | undecayed == set(names.values())


def test_bits_per_byte_matches_a_naive_count(tokenizer):
    model, config = tiny_model(tokenizer)
    model.eval()
    batches = [RandomBatches(config.vocab_size, seed=s).next_batch() for s in range(2)]
    token_bytes = torch.tensor(tokenizer.token_bytes())
    got = training.bits_per_byte(model, batches, token_bytes)
    nats, counted_nats, n_bytes, n_tokens = 0.0, 0.0, 0, 0
    specials = set(tokenizer.special_tokens.values())
    for x, y in batches:
        logp = torch.log_softmax(model(x).double(), dim=-1)
        for b in range(y.shape[0]):
            for t in range(y.shape[1]):
                loss = -logp[b, t, y[b, t]].item()
                nats += loss
                n_tokens += 1
                token = int(y[b, t])
                nb = 0 if token in specials else len(tokenizer.decode_bytes([token]))
                counted_nats += loss if nb else 0.0
                n_bytes += nb
    assert got["loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
    assert got["bpb"] == pytest.approx(counted_nats / math.log(2) / n_bytes, rel=1e-5)


def test_gradient_accumulation_equals_one_big_batch(tokenizer, tmp_path):
    """k micro-batches of b rows give the same update as one batch of k*b rows (float64, equal sizes)."""
    results = []
    for accum, batch_size in ((1, 4), (2, 2), (4, 1)):
        model, config = tiny_model(tokenizer)
        model.double()
        source = RandomBatches(config.vocab_size, batch_size=4, seed=3)
        big_x, big_y = source.next_batch()
        chunks = [(big_x[i:i + batch_size], big_y[i:i + batch_size]) for i in range(0, 4, batch_size)]

        class Fixed:
            def __init__(self):
                self.items = list(chunks)

            def next_batch(self):
                return self.items.pop(0)

            def state_dict(self):
                return {}

        cfg = TrainConfig(out_dir=str(tmp_path / f"acc{accum}"), steps=1, grad_accum=accum, lr=1e-2, warmup_steps=1,
                          grad_clip=0.0, save_every=1000, log_every=1)
        training.train(model, objectives.next_token, Fixed(), cfg, model_config=config, tokenizer=tokenizer)
        results.append(torch.cat([p.detach().flatten() for p in model.parameters()]))
    torch.testing.assert_close(results[1], results[0], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(results[2], results[0], atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("overrides", [{}, {"n_expert": 4, "n_expert_active": 2, "n_kv_head": 1}])
def test_resume_reproduces_the_uninterrupted_run_bit_for_bit(tokenizer, tmp_path, overrides):
    def run(run_dir, fail_at=None, resume=False):
        model, config = tiny_model(tokenizer, **overrides)
        cfg = TrainConfig(out_dir=str(run_dir), steps=8, lr=3e-3, warmup_steps=2, save_every=3, log_every=1,
                          resume=resume, keep=3)
        batches = RandomBatches(config.vocab_size, fail_at=fail_at)
        training.train(model, objectives.next_token, batches, cfg, model_config=config, tokenizer=tokenizer)
        return model

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", fail_at=4)  # dies during step 5, after the step-3 checkpoint
    assert checkpoint.resolve_checkpoint(tmp_path / "cut").name == "step_000003"
    resumed = run(tmp_path / "cut", resume=True)
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "full")
    assert len(read_losses(tmp_path / "full")) == 8
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_diverging_loss_stops_and_keeps_the_last_good_checkpoint(tokenizer, tmp_path):
    model, config = tiny_model(tokenizer)
    calls = {"n": 0}

    def explodes_at_step_5(model, batch):
        calls["n"] += 1
        loss, metrics = objectives.next_token(model, batch)
        return (loss * float("nan") if calls["n"] == 5 else loss), metrics

    cfg = TrainConfig(out_dir=str(tmp_path), steps=10, lr=1e-3, save_every=2, log_every=1)
    with pytest.raises(training.TrainingDiverged, match="step 5"):
        training.train(model, explodes_at_step_5, RandomBatches(config.vocab_size), cfg, model_config=config,
                       tokenizer=tokenizer)
    last = checkpoint.load_checkpoint(tmp_path)
    assert checkpoint.read_trainer_state(tmp_path)["step"] == 4
    assert all(torch.isfinite(p).all() for p in last["model"].parameters())


def test_diverging_without_a_checkpoint_names_none(tokenizer, tmp_path):
    model, config = tiny_model(tokenizer)

    def nan_loss(model, batch):
        loss, metrics = objectives.next_token(model, batch)
        return loss * float("nan"), metrics
    cfg = TrainConfig(out_dir=str(tmp_path), steps=4, save_every=2, log_every=1)
    with pytest.raises(training.TrainingDiverged) as raised:
        training.train(model, nan_loss, RandomBatches(config.vocab_size), cfg, model_config=config, tokenizer=tokenizer)
    assert "step 1; no checkpoint was saved before it" in str(raised.value)


def run_with_crash(tokenizer, run_dir, steps, fail_at=None, resume=False):
    """Train the tiny model for `steps` (checkpoints every 3), optionally dying while fetching batch `fail_at`."""
    model, config = tiny_model(tokenizer)
    cfg = TrainConfig(out_dir=str(run_dir), steps=steps, lr=3e-3, warmup_steps=2, save_every=3, log_every=1,
                      resume=resume, keep=3)
    training.train(model, objectives.next_token, RandomBatches(config.vocab_size, fail_at=fail_at), cfg,
                   model_config=config, tokenizer=tokenizer)


def test_a_run_killed_mid_write_resumes_from_its_newest_complete_checkpoint(tokenizer, tmp_path, capsys):
    run_with_crash(tokenizer, tmp_path / "full", 6)
    with pytest.raises(KeyboardInterrupt):
        run_with_crash(tokenizer, tmp_path / "cut", 6, fail_at=4)
    cut = tmp_path / "cut"
    # What kills leave behind: `latest` not yet written for the first step_*, a half-written newer checkpoint and
    # a temp pointer, a damaged step_* (no manifest), and a half-written last line in the metrics log.
    (cut / "latest").unlink()
    (cut / ".step_000006.x1y2.tmp").mkdir()
    (cut / ".step_000006.x1y2.tmp" / "model.safetensors").write_bytes(b"\0" * 1000)
    (cut / ".latest.tmp").write_text("step_000006")
    (cut / "step_000005").mkdir()
    (cut / "step_000005" / "config.json").write_text("{}")
    with open(cut / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 2.')
    capsys.readouterr()
    run_with_crash(tokenizer, cut, 6, resume=True)
    printed = "".join(capsys.readouterr())
    assert f"resumed from {cut / 'step_000003'} at step 3" in printed
    assert "dropped its torn last line" in printed and "removed 0.0 MB of unfinished checkpoint writes" in printed
    assert not list(cut.glob(".*.tmp"))
    assert read_losses(cut) == read_losses(tmp_path / "full")  # the resumed run is the uninterrupted one
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(lines[:2] + ["{torn"] + lines[2:]) + "\n")
    with pytest.raises(ValueError, match=f"{cut / 'metrics.jsonl'}:3: not valid JSON"):
        run_with_crash(tokenizer, cut, 6, resume=True)


def test_a_one_document_corpus_fails_before_step_1(tmp_path):
    import train
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    shutil.copy(Path(json.__file__).parent.parent / "textwrap.py", corpus / "textwrap.py")
    with pytest.raises(ValueError) as raised:
        train.main(["--source", str(corpus), "--tokenizer", str(tmp_path / "tok.json"), "--vocab-size", "300",
                    "--depth", "1", "--seq-len", "32", "--batch-size", "2", "--steps", "2", "--device", "cpu",
                    "--out-dir", str(tmp_path / "run")])
    message = str(raised.value)
    assert re.search(r"the (train|validation) split of .* \(\d documents\) is too small", message), message
    assert "--val-fraction" in message and not (tmp_path / "run").exists()  # nothing trained, nothing written


@pytest.mark.slow
def test_train_script_end_to_end_and_resume(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    stdlib = Path(json.__file__).parent.parent
    for name in ("bisect.py", "heapq.py", "textwrap.py", "shlex.py", "colorsys.py", "fnmatch.py", "glob.py"):
        shutil.copy(stdlib / name, corpus / name)
    common = [sys.executable, str(ROOT / "train.py"), "--source", str(corpus), "--tokenizer",
              str(tmp_path / "tok.json"), "--vocab-size", "320", "--depth", "1", "--seq-len", "32",
              "--batch-size", "4", "--out-dir", str(tmp_path / "run"), "--eval-every", "3", "--save-every", "3",
              "--sample-every", "3", "--val-fraction", "0.3", "--eval-batches", "2"]
    first = subprocess.run(common + ["--steps", "4"], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert "sample:" in first.stdout and "val bits/byte" in first.stdout
    second = subprocess.run(common + ["--steps", "6", "--resume", "true"], capture_output=True, text=True,
                            timeout=300, cwd=tmp_path)
    assert second.returncode == 0, second.stderr
    assert checkpoint.read_trainer_state(tmp_path / "run")["step"] == 6
    missing = subprocess.run([sys.executable, str(ROOT / "train.py"), "--resume", "true", "--out-dir",
                              str(tmp_path / "nowhere"), "--tokenizer", str(tmp_path / "tok.json"), "--source",
                              str(corpus)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert missing.returncode != 0 and "no checkpoint" in missing.stderr


# ----------------------------------------------------------------------------------------------------------
# fp16 with loss scaling

class BoostedBatches(RandomBatches):
    """RandomBatches whose batch at `boost_at` multiplies the loss by 1e8: its fp16 gradients overflow."""

    def __init__(self, *args, boost_at=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.boost_at = boost_at

    def next_batch(self):
        boost = torch.tensor(1e8 if self.position == self.boost_at else 1.0)
        return (*super().next_batch(), boost)


def boosted_next_token(model, batch):
    inputs, targets, boost = batch
    loss, metrics = objectives.next_token(model, (inputs, targets))
    return loss * boost, metrics


def fp16_run(tokenizer, run_dir, steps, fail_at=None, resume=False, boost_at=None):
    model, config = tiny_model(tokenizer)
    cfg = TrainConfig(out_dir=str(run_dir), steps=steps, lr=3e-3, warmup_steps=2, save_every=1, log_every=1,
                      resume=resume, keep=10, dtype="float16")
    batches = BoostedBatches(config.vocab_size, fail_at=fail_at, boost_at=boost_at)
    training.train(model, boosted_next_token, batches, cfg, model_config=config, tokenizer=tokenizer)
    return model


def test_fp16_overflowing_step_is_skipped_and_counted(tokenizer, tmp_path):
    fp16_run(tokenizer, tmp_path, steps=4, boost_at=1)  # the batch of step 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped_steps"] for r in records] == [0, 1, 1, 1]
    assert [r["loss_scale"] for r in records] == [65536.0, 32768.0, 32768.0, 32768.0]
    weights = [checkpoint.load_checkpoint(tmp_path / f"step_{s:06d}")["model"].state_dict() for s in (1, 2, 3)]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])  # step 2 changed nothing
    assert not all(torch.equal(weights[1][k], weights[2][k]) for k in weights[1])
    state = checkpoint.read_trainer_state(tmp_path)
    assert state["skipped_steps"] == 1 and state["grad_scaler"]["scale"] == 32768.0


def test_fp16_resume_restores_the_loss_scaler_bitwise(tokenizer, tmp_path):
    full = fp16_run(tokenizer, tmp_path / "full", steps=6, boost_at=1)
    with pytest.raises(KeyboardInterrupt):
        fp16_run(tokenizer, tmp_path / "cut", steps=6, fail_at=4, boost_at=1)
    resumed = fp16_run(tokenizer, tmp_path / "cut", steps=6, resume=True, boost_at=1)
    assert read_losses(tmp_path / "cut") == read_losses(tmp_path / "full")
    states = [checkpoint.read_trainer_state(tmp_path / run) for run in ("full", "cut")]
    assert states[0]["grad_scaler"] == states[1]["grad_scaler"] and states[0]["skipped_steps"] == 1
    assert states[0]["grad_scaler"]["_growth_tracker"] == 4  # good steps since the skip: a live state, restored
    for (name, a), b in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(a, b), name


def test_why_bf16_fp16_gradients_underflow_without_loss_scaling(tokenizer):
    # A loss scaled by 2^-14 stands for a mean over ~16k tokens: per-element gradients near fp16's smallest values.
    model, _ = tiny_model(tokenizer)
    ids = torch.randint(0, tokenizer.vocab_size, (4, 33), generator=torch.Generator().manual_seed(1))

    def gradients(dtype, loss_scale=1.0):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(ids[:, :-1], ids[:, 1:]) * 2**-14
        (loss * loss_scale).backward()
        return torch.cat([p.grad.flatten() / loss_scale for p in model.parameters()])

    reference = gradients(torch.float32)

    def underflowed(g):
        return ((g == 0) & (reference != 0)).float().mean().item()

    def relative_error(g):
        return ((g - reference).norm() / reference.norm()).item()
    fp16, scaled, bf16 = gradients(torch.float16), gradients(torch.float16, 2**16), gradients(torch.bfloat16)
    assert underflowed(fp16) > 0.3 and relative_error(fp16) > 0.3  # measured: 80% of entries lost
    assert underflowed(scaled) < 1e-3 and relative_error(scaled) < 2e-3  # with loss scaling: fp32's gradients
    assert underflowed(bf16) == 0 and relative_error(bf16) < 2e-2  # bf16: no underflow, coarser mantissa

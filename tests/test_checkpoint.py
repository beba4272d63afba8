"""Checkpoints: round trips, integrity checks, atomicity, retention."""
import json

import pytest
import torch
from safetensors.torch import load_file

from nanostack import checkpoint, distributed
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    texts = ["def add(x, y):\n    return x + y\n" * 10, "héllo wörld 🙂 " * 5, "class A:\n    pass\n" * 5]
    return Tokenizer.train(texts, 300)


def tiny_config(tokenizer, **overrides):
    shape = dict(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64)
    return ModelConfig(**{**shape, **overrides})


def make_model(config, seed=0):
    torch.manual_seed(seed)
    return GPT(config)


def tokens(config, batch=2, length=12, seed=1):
    return torch.randint(0, config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"n_expert": 4, "n_expert_active": 2}])
def test_round_trip_gives_identical_model_and_tokenizer(tmp_path, tokenizer, overrides):
    config = tiny_config(tokenizer, **overrides)
    model = make_model(config)
    checkpoint.save_checkpoint(tmp_path / "ckpt", model.state_dict(), config, tokenizer)
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert loaded["config"] == config
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded["model"].state_dict()[name]), name
    idx = tokens(config)
    assert torch.equal(model(idx), loaded["model"](idx))
    text = "def héllo(): 🙂"
    assert loaded["tokenizer"].encode(text) == tokenizer.encode(text)


def test_truncated_tampered_and_incomplete_checkpoints_are_refused(tmp_path, tokenizer):
    config = tiny_config(tokenizer)
    directory = checkpoint.save_checkpoint(tmp_path / "ckpt", make_model(config).state_dict(), config, tokenizer)
    weights = directory / "model.safetensors"
    original = weights.read_bytes()

    weights.write_bytes(original[: len(original) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load_checkpoint(directory)

    tampered = bytearray(original)
    tampered[-10] ^= 0xFF
    weights.write_bytes(bytes(tampered))
    with pytest.raises(checkpoint.CheckpointError, match="altered"):
        checkpoint.load_checkpoint(directory)

    weights.write_bytes(original)
    checkpoint.load_checkpoint(directory)  # intact again
    (directory / "manifest.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match="manifest"):
        checkpoint.load_checkpoint(directory)


def test_foreign_and_missing_directories_give_clear_errors(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.resolve_checkpoint(tmp_path / "nothing")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(checkpoint.CheckpointError, match="neither a nanostack-checkpoint config"):
        checkpoint.read_config(tmp_path / "hf")
    (tmp_path / "hf" / "config.json").write_text('{"format": "nanostack-checkpoint", "vers')
    with pytest.raises(checkpoint.CheckpointError, match="not valid JSON"):
        checkpoint.read_config(tmp_path / "hf")


def test_failed_save_leaves_the_previous_checkpoint_untouched(tmp_path, tokenizer, monkeypatch):
    config = tiny_config(tokenizer)
    old_model = make_model(config, seed=0)
    checkpoint.save_checkpoint(tmp_path / "ckpt", old_model.state_dict(), config, tokenizer)

    def broken_save(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(checkpoint, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_checkpoint(tmp_path / "ckpt", make_model(config, seed=1).state_dict(), config, tokenizer)
    monkeypatch.undo()
    loaded = checkpoint.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(loaded["model"].tok_emb.weight, old_model.tok_emb.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temporary directory left behind


def test_run_directory_keeps_the_newest_checkpoints(tmp_path, tokenizer):
    config = tiny_config(tokenizer)
    model = make_model(config)
    for step in (10, 20, 30, 40):
        checkpoint.save_run_checkpoint(tmp_path, step, keep=2, weights=model.state_dict(), config=config,
                                       tokenizer=tokenizer)
    assert sorted(p.name for p in tmp_path.glob("step_*")) == ["step_000030", "step_000040"]
    assert checkpoint.resolve_checkpoint(tmp_path) == tmp_path / "step_000040"


def test_optimizer_and_rng_state_round_trip(tokenizer, tmp_path):
    """Optimizer moments saved by name and loaded into a fresh optimizer continue the same trajectory."""
    config = tiny_config(tokenizer)
    model_a, model_b = make_model(config), make_model(config, seed=5)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=1e-2)
    opt_b = torch.optim.AdamW(model_b.parameters(), lr=1e-2)
    idx = tokens(config)
    for _ in range(2):
        model_a(idx, idx).backward()
        opt_a.step()
        opt_a.zero_grad()
    checkpoint.save_checkpoint(tmp_path / "ckpt", distributed.full_model_state(model_a), config, tokenizer,
                               optimizer_state=distributed.full_optimizer_state(model_a, opt_a))
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    distributed.load_full_state(model_b, opt_b, weights, checkpoint.read_optimizer_state(tmp_path / "ckpt"))
    for model, opt in ((model_a, opt_a), (model_b, opt_b)):
        model(idx, idx).backward()
        opt.step()
    for (name, a), b in zip(model_a.named_parameters(), model_b.parameters()):
        assert torch.equal(a, b), name

    state = json.loads(json.dumps(checkpoint.rng_state()))
    expected = torch.rand(5)
    checkpoint.set_rng_state(state)
    assert torch.equal(torch.rand(5), expected)


def test_serving_quant_and_export_read_only_the_model_files(tmp_path, tokenizer):
    """A damaged optimizer or trainer state does not stop serve.py, quant or export: they need the weights,
    the config and the tokenizer only (issue 22, item 8)."""
    from nanostack import hf, quant
    from nanostack.serving.tensor_parallel import ModelSpec, load_model
    config = tiny_config(tokenizer)
    model = make_model(config)
    optimizer = torch.optim.AdamW(model.parameters())
    model(tokens(config), tokens(config)).backward()
    optimizer.step()
    directory = checkpoint.save_checkpoint(
        tmp_path / "ckpt", distributed.full_model_state(model), config, tokenizer,
        optimizer_state=distributed.full_optimizer_state(model, optimizer), trainer_state={"step": 1})
    (directory / "optimizer.safetensors").write_bytes(b"\0" * 100)
    (directory / "trainer_state.json").write_text('{"step": ')
    served = load_model(ModelSpec(str(directory), "cpu", torch.float32))["model"]
    assert torch.equal(served.tok_emb.weight, model.tok_emb.weight)
    assert quant.main(["--model", str(directory), "--out", str(tmp_path / "q")]) == 0
    hf.export_hf(directory, tmp_path / "hf")
    with pytest.raises(checkpoint.CheckpointError, match="optimizer.safetensors has 100 bytes"):
        checkpoint.verify_manifest(directory)  # resuming training still refuses it


def test_serve_names_the_missing_config_json(tmp_path, tokenizer):
    import serve
    config = tiny_config(tokenizer)
    directory = checkpoint.save_checkpoint(tmp_path / "ckpt", make_model(config).state_dict(), config, tokenizer)
    (directory / "config.json").unlink()
    with pytest.raises(checkpoint.CheckpointError, match=r"ckpt/config.json is missing: .* holds manifest.json, "
                                                         r"model.safetensors, tokenizer.json"):
        serve.main(["--model", str(directory)])

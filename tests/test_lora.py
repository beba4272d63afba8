"""LoRA: identity at init, merge == unmerged, only adapters train, adapter files, exact resume of a LoRA run."""
import json

import pytest
import torch

from nanostack import chat_data, checkpoint, lora, objectives, training
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer
from nanostack.training import TrainConfig

CONVERSATIONS = [[{"role": "user", "content": f"What is {a} plus {b}?"},
                  {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}] for a in range(6) for b in range(4)]


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([" ".join(m["content"] for c in CONVERSATIONS for m in c)], 290)


def tiny_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                   max_seq_len=48), **overrides})
    return GPT(config), config


def batch_of(tokenizer, count=6):
    rows = [chat_data.sft_example(tokenizer, c, 48) for c in CONVERSATIONS[:count]]
    inputs, targets = chat_data.pad_rows(rows, tokenizer.eos_id)
    return {"inputs": inputs, "targets": targets}


def test_zero_b_leaves_the_model_unchanged_and_counts_trainable_params(tokenizer):
    model, config = tiny_model(tokenizer)
    inputs = batch_of(tokenizer)["inputs"]
    base_logits = model(inputs)
    trainable = lora.apply_lora(model, "all", rank=4, alpha=8.0)
    kv_width = config.n_kv_head * config.head_dim
    per_layer = sum(4 * (i + o) for i, o in [(32, 32), (32, kv_width), (32, kv_width), (32, 32),
                                             (32, config.mlp_hidden), (32, config.mlp_hidden),
                                             (config.mlp_hidden, 32)])
    assert trainable == config.n_layer * per_layer
    assert torch.equal(model(inputs), base_logits)
    assert all(m.lora_b.abs().sum() == 0 and m.lora_a.abs().sum() > 0 for m in lora.lora_modules(model).values())


def test_only_adapter_parameters_get_gradients_and_optimizer_slots(tokenizer):
    model, _ = tiny_model(tokenizer)
    lora.apply_lora(model, "qv", rank=2, alpha=4.0)
    loss, _ = objectives.sft(model, batch_of(tokenizer))
    loss.backward()
    for name, param in model.named_parameters():
        is_adapter = name.endswith((".lora_a", ".lora_b"))
        assert (param.grad is not None) == is_adapter, name
        assert param.requires_grad == is_adapter, name
    assert {n.rsplit(".", 2)[-2] for n, p in model.named_parameters() if p.requires_grad} == {"wq", "wv"}
    optimizer = training.make_optimizer(model, TrainConfig(), lr=1e-3)
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n.endswith((".lora_a", ".lora_b"))}


@pytest.mark.parametrize("targets", ["qv", "all,lm_head"])
def test_merged_model_equals_the_unmerged_one_after_training(tokenizer, targets):
    model, _ = tiny_model(tokenizer)
    model.double()
    lora.apply_lora(model, targets, rank=4, alpha=8.0, dropout=0.1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = batch_of(tokenizer)
    for _ in range(2):
        objectives.sft(model, batch)[0].backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()  # dropout off: the merged layer has none
    unmerged = model(batch["inputs"])
    assert any(m.lora_b.abs().sum() > 0 for m in lora.lora_modules(model).values())
    lora.merge_lora(model)
    assert not lora.lora_modules(model) and all(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == set(GPT(model.config).state_dict())
    torch.testing.assert_close(model(batch["inputs"]), unmerged, rtol=1e-10, atol=1e-10)
    # The merged weights differ from the base: the adapters did change something.
    base, _ = tiny_model(tokenizer)
    assert not torch.allclose(model.layers[0].attn.wq.weight.float(), base.layers[0].attn.wq.weight)


def test_adapter_file_round_trip_and_base_check(tokenizer, tmp_path):
    model, config = tiny_model(tokenizer)
    checkpoint.save_checkpoint(tmp_path / "base", model.state_dict(), config, tokenizer)
    base = lora.checkpoint_identity(tmp_path / "base")
    lora.apply_lora(model, "attn", rank=3, alpha=6.0)
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_b.normal_()
    lora.save_adapter(tmp_path / "adapter", lora.lora_state_dict(model), lora.lora_config(model), base=base)
    meta = json.loads((tmp_path / "adapter" / "adapter.json").read_text())
    assert meta["rank"] == 3 and meta["alpha"] == 6.0 and meta["targets"] == ["wq", "wk", "wv", "wo"]
    assert meta["base"] == base and len(base["model_sha256"]) == 64
    weights = (tmp_path / "adapter" / "adapter.safetensors").stat().st_size
    assert weights < (tmp_path / "base" / "model.safetensors").stat().st_size / 5

    fresh = checkpoint.load_checkpoint(tmp_path / "base")["model"]
    lora.load_adapter(fresh, tmp_path / "adapter", base=base)
    inputs = batch_of(tokenizer)["inputs"]
    torch.testing.assert_close(fresh(inputs), model(inputs), rtol=0, atol=0)
    other = {"checkpoint": "elsewhere", "model_sha256": "0" * 64}
    with pytest.raises(ValueError, match="trained on"):
        lora.load_adapter(tiny_model(tokenizer)[0], tmp_path / "adapter", base=other)
    mismatched, _ = tiny_model(tokenizer)
    lora.apply_lora(mismatched, "qv", rank=3, alpha=6.0)
    with pytest.raises(ValueError, match="differ"):
        lora.load_adapter(mismatched, tmp_path / "adapter")


def test_bad_targets_and_settings_are_value_errors(tokenizer):
    with pytest.raises(ValueError, match="wq"):
        lora.apply_lora(tiny_model(tokenizer)[0], "q_proj")
    with pytest.raises(ValueError, match="rank"):
        lora.apply_lora(tiny_model(tokenizer)[0], "qv", rank=0)
    moe, _ = tiny_model(tokenizer, n_expert=4)
    with pytest.raises(ValueError, match="Mixture-of-Experts"):
        lora.apply_lora(moe, "w_up")
    assert lora.apply_lora(moe, "all", rank=2) > 0  # the attention projections of an MoE model
    assert {n.rsplit(".", 1)[1] for n in lora.lora_modules(moe)} == {"wq", "wk", "wv", "wo"}
    with pytest.raises(ValueError, match="already"):
        lora.apply_lora(moe, "qv")
    with pytest.raises(ValueError, match="ties"):
        lora.apply_lora(tiny_model(tokenizer, tie_embeddings=True)[0], "qv,lm_head")
    assert lora.parse_targets("lm_head, qv,wv") == ("wq", "wv", "lm_head")


class CrashingBatches:
    """Wraps a batch source; raises KeyboardInterrupt when asked for batch number `fail_at`."""

    def __init__(self, source, fail_at=None):
        self.source, self.fail_at, self.served = source, fail_at, 0

    def next_batch(self):
        if self.served == self.fail_at:
            raise KeyboardInterrupt("simulated crash")
        self.served += 1
        return self.source.next_batch()

    def state_dict(self):
        return self.source.state_dict()

    def load_state_dict(self, state):
        self.source.load_state_dict(state)


def test_a_resumed_lora_run_continues_exactly(tokenizer, tmp_path):
    """Crash after the step-3 checkpoint, resume: same losses and adapters as the run that never stopped."""
    rows = [chat_data.sft_example(tokenizer, c, 48) for c in CONVERSATIONS]

    def run(run_dir, fail_at=None, resume=False):
        model, config = tiny_model(tokenizer)
        lora.apply_lora(model, "all", rank=2, alpha=4.0, dropout=0.2)  # dropout draws from the saved RNG
        batches = CrashingBatches(chat_data.chat_batches(rows, 4, 48, tokenizer.eos_id, packing=True, seed=3), fail_at)
        cfg = TrainConfig(out_dir=str(run_dir), steps=6, lr=3e-3, warmup_steps=2, save_every=3, log_every=1,
                          resume=resume)
        training.train(model, objectives.sft, batches, cfg, model_config=config, tokenizer=tokenizer)
        return model

    def losses(run_dir):
        return [json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]

    full = run(tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "cut", fail_at=4)
    resumed = run(tmp_path / "cut", resume=True)
    assert losses(tmp_path / "cut") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 6
    full_state, resumed_state = full.state_dict(), resumed.state_dict()
    assert any(name.endswith("lora_b") for name in full_state)
    for name, tensor in full_state.items():
        assert torch.equal(tensor, resumed_state[name]), name

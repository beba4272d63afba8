"""Tests for nanostack/qat.py: the fake quantizers are the PTQ quantize-dequantize in the forward and the identity
in the backward, a model under QAT computes what PTQ then serves, QAT comes off cleanly, and bad settings are
refused (here and in finetune.py's flags)."""
import pytest
import torch
from torch.nn.utils import parametrize

import finetune
from kernels.int8_matmul import quantize_per_row
from nanostack import qat, quant, quant4
from nanostack.model import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    shape = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64)
    return GPT(ModelConfig(**{**shape, **overrides})).eval()


def random_ids(seed, batch=2, length=16):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("kind", ["w8a8", "int8-wo", "int4", "embedding"])
def test_fake_weight_is_quantize_dequantize_forward_and_identity_backward(kind):
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(24, 80, generator=generator, requires_grad=True)
    fake = qat.FakeQuantizedWeight(kind, group_size=32)(weight)
    if kind == "int4":
        packed, scale, zero = quant4.quantize_int4(weight, 32)
        expected = quant4.dequantize_int4(packed, scale, zero)[:, :80]
    elif kind == "embedding":
        expected = quant.dequantize(*quant.quantize_rows(weight, weight.dtype))
    else:
        expected = quant.dequantize(*quant.quantize_weight(weight))
    assert torch.equal(fake, expected)
    assert not torch.equal(fake, weight)  # it really rounded
    upstream = torch.randn(24, 80, generator=generator)
    (fake * upstream).sum().backward()
    assert torch.equal(weight.grad, upstream)  # straight through: the scales cover each range, nothing clips


def test_fake_activation_is_per_token_int8_with_a_straight_through_gradient():
    x = torch.randn(3, 5, 40, generator=torch.Generator().manual_seed(2), requires_grad=True)
    fake = qat.fake_quantize_activation(x)
    assert torch.equal(fake, quant.dequantize(*quantize_per_row(x.detach().reshape(-1, 40))).view(3, 5, 40))
    fake.sum().backward()
    assert torch.equal(x.grad, torch.ones_like(x))


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", qat.MODES)
def test_the_model_under_qat_is_the_model_ptq_serves(mode, tie):
    model = random_model(seed=3, tie_embeddings=tie)
    ids = random_ids(4)
    with torch.no_grad():
        full = model(ids)
    qat.apply_qat(model, mode, group_size=32)
    assert len([m for m in model.modules() if parametrize.is_parametrized(m, "weight")]) == 2 * 7 + 1 + (not tie)
    with torch.no_grad():
        trained = model(ids)
    settings = qat.remove_qat(model)
    assert settings == {"mode": mode, "group_size": 32, "skip": list(quant.DEFAULT_SKIP)}
    assert set(model.state_dict()) == set(random_model(tie_embeddings=tie).state_dict())  # plain names again
    with torch.no_grad():
        assert torch.equal(model(ids), full)  # the float weights were never changed, only read through rounding
        served = qat.quantize_trained(quant.copy_model(model), settings)(ids)
    assert (served - trained).abs().max() <= 1e-5 * trained.abs().max()
    assert (served - full).abs().max() > 1e-3 * full.abs().max()  # while quantization did change the logits


def test_qat_refuses_unknown_modes_moe_models_and_a_second_application():
    with pytest.raises(ValueError, match="QAT mode 'int2'"):
        qat.apply_qat(random_model(), "int2")
    with pytest.raises(ValueError, match="MoE"):
        qat.apply_qat(random_model(n_expert=4), "w8a8")
    model = qat.apply_qat(random_model(), "int4")
    with pytest.raises(ValueError, match="already on"):
        qat.apply_qat(model, "int4")


@pytest.mark.parametrize("flags,message", [
    (["--qat", "int3"], "--qat 'int3'"),
    (["--base-quant", "nf4"], "add --lora-rank"),
    (["--base-quant", "int4", "--lora-rank", "4"], "--base-quant 'int4'"),
    (["--qat", "w8a8", "--lora-rank", "4"], "drop --lora-rank"),
    (["--qat", "w8a8", "--qat-group-size", "64"], "--qat int4 only"),
])
def test_finetune_refuses_low_precision_flags_that_cannot_work(flags, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        finetune.main(["--init", str(tmp_path), *flags])  # refused before anything is loaded

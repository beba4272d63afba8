"""Tests for nanostack/quant4.py: int4 rounding bounds and padding, GPTQ against RTN on a layer with outlier input
channels, Int4Linear (CPU path and interpreted kernel) and int4 models and checkpoints, NF4 levels against the
normal quantiles that define them, NF4 and double quantization bounds and bytes, and QLoRA: only the adapters
train, the base is never saved for the backward, and a QLoRA step equals a LoRA step on the dequantized base."""
import math
import statistics

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.int4_matmul import dequantize_int4
from nanostack import checkpoint, lora, quant, quant4
from nanostack.model import GPT, ModelConfig
from nanostack.serving.tensor_parallel import ModelSpec, load_model
from nanostack.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def random_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    shape = dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64)
    return GPT(ModelConfig(**{**shape, **overrides})).eval()


def random_ids(seed, batch=2, length=16, vocab=96):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def linear_with(weight: torch.Tensor) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False)
    with torch.no_grad():
        linear.weight.copy_(weight)
    return linear


# ----------------------------------------------------------------------------------------------------------
# int4: rounding, padding, GPTQ

@settings(max_examples=40, deadline=None, derandomize=True)
@given(rows=st.integers(1, 6), cols=st.integers(1, 100), group_size=st.sampled_from([32, 64]),
       log_scale=st.floats(-4, 3), shift=st.floats(-3, 3), bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_int4_error_is_at_most_half_a_step_and_padding_is_exactly_zero(rows, cols, group_size, log_scale, shift,
                                                                        bf16, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = ((torch.randn(rows, cols, generator=generator) + shift) * 10**log_scale)
    weight = weight.to(torch.bfloat16 if bf16 else torch.float32)
    packed, scale, zero = quant4.quantize_int4(weight, group_size)
    stored = math.ceil(cols / group_size) * group_size  # a width that is not a multiple of G is padded
    assert packed.shape == (rows, stored // 2) and scale.shape == zero.shape == (rows, stored // group_size)
    assert scale.dtype == weight.dtype and zero.max() <= 15
    # Independent float64 check of the grid: the range [min(w, 0), max(w, 0)] of each group over 15 steps.
    groups = torch.nn.functional.pad(weight.double(), (0, stored - cols)).view(rows, -1, group_size)
    expected_scale = (groups.amax(-1).clamp(min=0) - groups.amin(-1).clamp(max=0)) / 15
    assert torch.allclose(scale.double(), expected_scale, rtol=2**-8 if bf16 else 1e-6, atol=0)
    dequantized = dequantize_int4(packed, scale, zero).double()
    assert (dequantized[:, cols:] == 0).all()  # 0 is a level, so the padding costs nothing
    step = scale.double().repeat_interleave(group_size, dim=-1)[:, :cols]
    # Half a step, plus a scale rounded down to bf16 clipping the top of the range by a fraction of a step.
    assert ((dequantized[:, :cols] - weight.double()).abs() <= step * (0.5 + (0.04 if bf16 else 2e-5))).all()


def test_group_sizes_that_the_kernel_cannot_step_through_are_refused():
    for bad in (16, 48, 100):
        with pytest.raises(ValueError, match="power of two"):
            quant4.quantize_int4(torch.randn(4, 64), bad)
    with pytest.raises(ValueError, match="power of two"):
        quant.quantize_model(random_model(), "int4", group_size=48)


def gptq_and_rtn_errors(seed: int):
    """Output error of RTN and GPTQ int4 on a layer whose inputs have a few 20x outlier channels that also
    correlate with their neighbours, as trained LLMs' activations do."""
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(48, 96, generator=generator)
    mix = torch.eye(96) + 0.3 * torch.randn(96, 96, generator=generator)  # correlated channels
    x = torch.randn(512, 96, generator=generator) @ mix
    x[:, [5, 40, 77]] *= 20
    hessian = x.T @ x / x.shape[0]
    errors = {}
    for name, (packed, scale, zero) in {"rtn": quant4.quantize_int4(weight, 32),
                                        "gptq": quant4.gptq_quantize(weight, hessian, 32)}.items():
        assert packed.shape == (48, 48) and scale.shape == zero.shape == (48, 3)
        dequantized = dequantize_int4(packed, scale, zero).double()
        errors[name] = (x.double() @ (dequantized - weight.double()).T).pow(2).mean().sqrt().item()
    return errors


@pytest.mark.parametrize("seed", [0, 1])
def test_gptq_lowers_the_layer_output_error_against_rtn_on_outlier_channels(seed):
    errors = gptq_and_rtn_errors(seed)
    assert errors["gptq"] < 0.8 * errors["rtn"], errors  # measured: 0.65-0.75x over six seeds


def test_gptq_on_a_model_quantizes_every_block_linear_and_stays_close():
    model = random_model(seed=1)
    calibration = [random_ids(2, batch=4, length=32), random_ids(3, batch=4, length=32)]
    quantized = quant.quantize_model(quant.copy_model(model), "int4", group_size=32, int4_method="gptq",
                                     calibration_batches=calibration)
    assert quantized.quantization == {"mode": "int4", "skip": ["router"], "smooth_alpha": None, "group_size": 32,
                                      "int4_method": "gptq"}
    for layer in quantized.layers:
        assert all(type(m) is quant4.Int4Linear for m in (layer.attn.wq, layer.attn.wo, layer.mlp.w_down))
    assert type(quantized.lm_head) is quant.Int8WeightOnlyLinear and type(quantized.tok_emb) is quant.Int8Embedding
    ids = random_ids(4)
    with torch.no_grad():
        full, got = model(ids), quantized(ids)
    assert (got - full).pow(2).mean().sqrt() < 0.05 * full.std()
    with pytest.raises(ValueError, match="calibration"):
        quant.quantize_model(quant.copy_model(model), "int4", int4_method="gptq")
    with pytest.raises(ValueError, match="gptq only with mode int4"):
        quant.quantize_model(quant.copy_model(model), "int8-wo", int4_method="gptq")


def test_int4_refuses_moe_experts_unless_they_are_kept():
    model = random_model(n_expert=4)
    with pytest.raises(ValueError, match="experts"):
        quant.quantize_model(quant.copy_model(model), "int4")
    kept = quant.quantize_model(quant.copy_model(model), "int4", skip=("router", "experts"))
    assert type(kept.layers[0].mlp.experts).__name__ == "Experts" and type(kept.layers[0].attn.wq) is quant4.Int4Linear


# ----------------------------------------------------------------------------------------------------------
# Int4Linear and int4 models

@pytest.mark.parametrize("on_kernel", [False, True], ids=["cpu-reference", "triton"])
def test_int4_linear_with_padding_and_bias_matches_float64(on_kernel, monkeypatch):
    monkeypatch.setattr(quant, "KERNELS_ON_CPU", on_kernel)
    generator = torch.Generator().manual_seed(5)
    linear = nn.Linear(72, 24)  # 72 input channels: not a multiple of G = 32, padded to 96
    with torch.no_grad():
        linear.weight.copy_(torch.randn(24, 72, generator=generator))
    dtype = torch.bfloat16 if on_kernel else torch.float32  # the kernel serves 16-bit activations
    module = quant4.Int4Linear.from_linear(linear.to(dtype), group_size=32)
    assert module.weight_packed.shape == (24, 48) and module.bias.dtype == dtype
    x = torch.randn(3, 5, 72, generator=generator).to(dtype)
    out = module(x)
    assert out.shape == (3, 5, 24) and out.dtype == dtype
    weight = dequantize_int4(module.weight_packed, module.weight_scale, module.weight_zero)[:, :72]
    expected = x.double() @ weight.double().T + linear.bias.double()
    tolerance = 2e-2 if on_kernel else 1e-5
    assert (out.double() - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train(["def f(x):\n    return x * 2\n" * 20], 300)


def test_int4_checkpoint_round_trip_and_serving_load(tmp_path, tokenizer):
    model = random_model(seed=6, vocab_size=tokenizer.vocab_size, n_embd=96, n_head=3, n_kv_head=1)
    calibration = [random_ids(7, vocab=tokenizer.vocab_size)]
    float_path = tmp_path / "float"
    checkpoint.save_checkpoint(float_path, model.state_dict(), model.config, tokenizer)
    quant.quantize_model(model, "int4", group_size=64, int4_method="gptq", calibration_batches=calibration)
    quant.save_quantized(model, tokenizer, tmp_path / "int4", source="here")
    ids = random_ids(8, vocab=tokenizer.vocab_size)
    for loaded in (quant.load_quantized(tmp_path / "int4"), quant.load_for_serving(tmp_path / "int4")):
        assert loaded["model"].quantization["int4_method"] == "gptq"
        with torch.no_grad():
            assert torch.equal(loaded["model"](ids), model(ids))
    # `serve.py --quant int4` quantizes a float checkpoint on the fly (RTN, groups of 128: 96 columns padded).
    served = load_model(ModelSpec(str(float_path), "cpu", torch.float32, "int4"))["model"]
    assert type(served.layers[0].attn.wq) is quant4.Int4Linear and served.layers[0].attn.wq.group_size == 128


# ----------------------------------------------------------------------------------------------------------
# NF4

def test_nf4_levels_are_the_normal_quantiles_that_define_them():
    levels = quant4.nf4_levels().double()
    normal = statistics.NormalDist()
    offset = 1 - (1 / 32 + 1 / 30) / 2
    positive = [normal.inv_cdf(0.5 + (offset - 0.5) * i / 8) for i in range(1, 9)]
    negative = [-normal.inv_cdf(0.5 + (offset - 0.5) * i / 7) for i in range(1, 8)]
    expected = sorted([v / positive[-1] for v in positive + negative] + [0.0])
    assert torch.allclose(levels, torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    # Values published with QLoRA (bitsandbytes' NF4 table).
    for published in (-1.0, -0.6961928, -0.0910500, 0.0, 0.0795803, 0.7229568, 1.0):
        assert (levels - published).abs().min() < 1e-6


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_rounds_each_weight_to_its_nearest_level(double_quant):
    generator = torch.Generator().manual_seed(9)
    weight = torch.randn(6, 100, generator=generator)  # 100 columns: two blocks of 64, the second padded
    tensors = quant4.quantize_nf4(weight, double_quant)
    dequantized = quant4.dequantize_nf4(tensors)
    assert dequantized.shape == (6, 128) and (dequantized[:, 100:] == 0).all()
    blocks = weight.double().view(6, -1)  # brute force: the block absmax, then the nearest of 16 scaled levels
    levels = quant4.nf4_levels().double()
    for block in range(2):
        part = blocks[:, 64 * block:64 * (block + 1)]
        absmax = part.abs().amax(-1, keepdim=True)
        nearest = levels[(part[..., None] / absmax[..., None] - levels).abs().argmin(-1)] * absmax
        got = dequantized[:, 64 * block:64 * block + part.shape[1]].double()
        # Double quantization moves each absmax by at most half of its own int8 step.
        slack = 0 if not double_quant else tensors["absmax_scale"].double().max() / 2 + 1e-6
        assert ((got - nearest).abs() <= slack * levels.abs().max() + 1e-6).all()
    if double_quant:
        assert tensors["absmax_int8"].dtype == torch.int8 and tensors["absmax_scale"].numel() == 1


def test_nf4_linear_is_about_a_quarter_of_bf16_bytes():
    linear = nn.Linear(1024, 512, bias=False)
    bf16_bytes = 2 * linear.weight.numel()
    double = quant.weight_bytes(quant4.NF4Linear.from_linear(linear))
    single = quant.weight_bytes(quant4.NF4Linear.from_linear(linear, double_quant=False))
    # 4 bits + an int8 absmax per 64 weights (+ a scale per 256 blocks): 4.127 of 16 bits; without double
    # quantization the absmax costs 16 / 64 bits (counted at bf16 like every float).
    assert double / bf16_bytes == pytest.approx((4 + 8 / 64) / 16, rel=0.01)
    assert single / bf16_bytes == pytest.approx((4 + 16 / 64) / 16, rel=0.01)


# ----------------------------------------------------------------------------------------------------------
# QLoRA

def qlora_and_lora_models(seed=10):
    """A QLoRA model (NF4 base + adapters) and a LoRA model on its dequantized base, with equal adapters."""
    base = random_model(seed=seed)
    qlora_model = quant.copy_model(base)
    assert quant4.quantize_base_nf4(qlora_model) == 2 * 7
    lora_model = quant.copy_model(base)
    state = lora_model.state_dict()
    for name, module in qlora_model.named_modules():
        if isinstance(module, quant4.NF4Linear):
            state[f"{name}.weight"] = module.dequantize()
    lora_model.load_state_dict(state)
    for model in (qlora_model, lora_model):
        torch.manual_seed(seed)  # the same A initialisation in both
        lora.apply_lora(model, "all", rank=4, alpha=8)
        with torch.no_grad():
            for module in lora.lora_modules(model).values():
                module.lora_b.normal_(0, 0.05, generator=torch.Generator().manual_seed(seed))
    return qlora_model, lora_model


def test_qlora_trains_only_the_adapters_and_matches_lora_on_the_dequantized_base():
    qlora_model, lora_model = qlora_and_lora_models()
    ids = random_ids(11, batch=3, length=24)
    losses = []
    for model in (qlora_model, lora_model):
        model.train()
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        step_losses = []
        for _ in range(2):
            loss = model(ids[:, :-1], ids[:, 1:])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            step_losses.append(loss.item())
        losses.append(step_losses)
        with_grad = {name for name, p in model.named_parameters() if p.grad is not None}
        assert with_grad and all(name.endswith(("lora_a", "lora_b")) for name in with_grad)
    assert losses[0] == pytest.approx(losses[1], rel=1e-5)  # both steps, so the updates agree too
    # Merging dequantizes the base first: the result is the LoRA model merged.
    merged_q, merged = lora.merge_lora(qlora_model), lora.merge_lora(lora_model)
    for name, tensor in merged.state_dict().items():
        torch.testing.assert_close(merged_q.state_dict()[name], tensor, rtol=1e-5, atol=1e-6)


def test_the_frozen_base_is_dequantized_again_in_the_backward_not_saved():
    module = quant4.NF4Linear.from_linear(nn.Linear(128, 64, bias=False))
    x = torch.randn(5, 128, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = module(x)
    assert (64, 128) not in saved  # autograd keeps no full-precision copy of the weight
    out.sum().backward()
    torch.testing.assert_close(x.grad, module.dequantize().sum(0).expand(5, 128))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the compute dtype is autocast's
        assert module(x).dtype == torch.bfloat16

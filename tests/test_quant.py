"""Tests for nanostack/quant.py: int8 rounding bounds, the int8 embedding and quantized linears against float64
references built from the same int8 values and scales (CPU path and the Triton kernels through the
interpreter), SmoothQuant folding (exact in float64, balancing ranges, helping on outlier channels), which
modules are quantized (tied embeddings included), checkpoints, bits per byte of a briefly trained model, weight
bytes against a count from the parameter shapes, generation (model.generate and the serving engine) and the
command line."""
import inspect
import json
import textwrap

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from kernels import int8_matmul as int8_module
from kernels.int8_matmul import quantize_per_row
from nanostack import checkpoint, data, quant, smoothquant
from nanostack.model import GPT, ModelConfig
from nanostack.sampling import SamplingParams
from nanostack.serving.engine import Engine, EngineConfig
from nanostack.tokenizer import Tokenizer
from nanostack.training import bits_per_byte

CAN_RUN_KERNELS = int8_module.INTERPRET or torch.cuda.is_available()
# Small matmuls on a shared 2-core machine: a second torch thread only contends (conftest.py's `one_thread`).
pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_config(**overrides) -> ModelConfig:
    # Grouped-query attention (2 query heads per kv head) so the wo smoothing has groups to respect.
    return ModelConfig(**{**dict(vocab_size=96, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, max_seq_len=64),
                          **overrides})


def random_model(seed=0, dtype=torch.float32, **overrides) -> GPT:
    torch.manual_seed(seed)
    return GPT(tiny_config(**overrides)).to(dtype).eval()


def random_ids(seed, batch=3, length=24, vocab=96):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def same_weights(model: GPT) -> GPT:
    twin = GPT(model.config).to(model.tok_emb.weight.dtype)
    twin.load_state_dict(model.state_dict())
    return twin.eval()


# ----------------------------------------------------------------------------------------------------------
# Rounding and the quantized linears

@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.integers(1, 6), cols=st.integers(1, 70), log_scale=st.floats(-6, 4), outlier=st.booleans(),
       zero_row=st.booleans(), seed=st.integers(0, 2**16))
def test_quantize_dequantize_error_is_at_most_half_a_step(rows, cols, log_scale, outlier, zero_row, seed):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator) * 10**log_scale
    if outlier:
        weight[0, cols // 2] *= 80
    if zero_row:
        weight[-1] = 0
    q, scale = quant.quantize_weight(weight)
    assert q.dtype == torch.int8 and q.shape == weight.shape and scale.shape == (rows,)
    assert q.abs().max() <= 127
    expected_scale = weight.double().abs().amax(1) / 127  # independent float64 scale
    assert torch.allclose(scale.double(), expected_scale, rtol=1e-6, atol=0)
    error = (quant.dequantize(q, scale).double() - weight.double()).abs()
    # Half a step, plus fp32 rounding of w / s and of s itself (a few ulps of a 127-step range).
    assert (error <= scale.double()[:, None] * (0.5 + 2e-5)).all()
    if zero_row:
        assert scale[-1] == 0 and (q[-1] == 0).all()


def test_quantize_weight_handles_stacked_experts_row_by_row():
    weight = torch.randn(3, 5, 7, generator=torch.Generator().manual_seed(0))  # (n_expert, out, in)
    q, scale = quant.quantize_weight(weight)
    assert scale.shape == (3, 5)
    for e in range(3):
        q_e, scale_e = quant.quantize_weight(weight[e])
        assert torch.equal(q[e], q_e) and torch.equal(scale[e], scale_e)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(vocab=st.integers(1, 40), dim=st.integers(1, 48), log_scale=st.floats(-6, 4), outlier=st.booleans(),
       zero_row=st.booleans(), bf16=st.booleans(), ids_shape=st.sampled_from([(7,), (2, 5)]),
       seed=st.integers(0, 2**16))
def test_int8_embedding_lookup_is_the_dequantized_row_within_half_a_step(vocab, dim, log_scale, outlier, zero_row,
                                                                         bf16, ids_shape, seed):
    generator = torch.Generator().manual_seed(seed)
    dtype = torch.bfloat16 if bf16 else torch.float32
    embedding = nn.Embedding(vocab, dim)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn(vocab, dim, generator=generator) * 10**log_scale)
        if outlier:
            embedding.weight[0, dim // 2] *= 80
        if zero_row:
            embedding.weight[-1] = 0
    embedding = embedding.to(dtype)
    module = quant.Int8Embedding.from_embedding(embedding)
    table, scale = module.weight_int8, module.weight_scale
    assert table.dtype == torch.int8 and table.shape == (vocab, dim) and scale.shape == (vocab,)
    assert scale.dtype == dtype  # the scale lives in the activation dtype, which the lookup returns

    ids = torch.randint(0, vocab, ids_shape, generator=generator)  # repeats included
    looked_up = module(ids)
    assert looked_up.shape == (*ids_shape, dim) and looked_up.dtype == dtype
    assert torch.equal(looked_up, quant.dequantize(table, scale)[ids].to(dtype))

    weight = embedding.weight.detach().double()
    expected_scale = weight.abs().amax(1) / 127  # independent float64 scale, then rounded to the stored dtype
    assert torch.allclose(scale.double(), expected_scale, rtol=2**-8 if bf16 else 1e-6, atol=0)
    error = (quant.dequantize(table, scale).double() - weight).abs()
    # Half a step of the scale as stored, plus fp32 rounding of w / s (a few ulps of a 127-step range).
    assert (error <= scale.double()[:, None] * (0.5 + 2e-5)).all()
    if zero_row:
        assert scale[-1] == 0 and (table[-1] == 0).all()


def quantization_error_bound(x, weight_int8, weight_scale, x_scale=None):
    """|x W^T - x' W'^T| <= sum_k |x_k| dw + |w'_k| dx + dx dw, with dw, dx half a step (float64)."""
    w = quant.dequantize(weight_int8, weight_scale).double()
    dw = weight_scale.double()[None, :] / 2  # (1, out)
    bound = x.double().abs() @ torch.ones_like(w).T * dw
    if x_scale is not None:
        dx = x_scale.double()[:, None] / 2  # (tokens, 1)
        bound = bound + dx * w.abs().sum(1)[None, :] + dx * dw * w.shape[1]
    return bound


@pytest.mark.parametrize("on_kernels", [False, True], ids=["cpu-reference", "triton"])
@pytest.mark.parametrize("mode", quant.INT8_MODES)
def test_quantized_linear_matches_float64_reference(mode, on_kernels, monkeypatch):
    if on_kernels and not CAN_RUN_KERNELS:
        pytest.skip("the Triton path needs CUDA or TRITON_INTERPRET=1")
    monkeypatch.setattr(quant, "KERNELS_ON_CPU", on_kernels)
    # Break the path that must not run, so the test proves which one did.
    def must_not_run(*args, **kwargs):
        raise AssertionError("the wrong matmul path ran")
    if on_kernels:
        monkeypatch.setattr(quant, "int8_weight_only_matmul_reference", must_not_run)
        monkeypatch.setattr(quant, "int8_matmul_reference", must_not_run)
    else:
        monkeypatch.setattr(quant, "int8_weight_only_matmul", must_not_run)
        monkeypatch.setattr(quant, "int8_matmul", must_not_run)

    generator = torch.Generator().manual_seed(1)
    device = "cuda" if torch.cuda.is_available() and on_kernels else "cpu"
    linear = nn.Linear(72, 40, bias=False).to(device)  # odd sizes: partial tiles in every direction
    with torch.no_grad():
        linear.weight.copy_(torch.randn(40, 72, generator=generator))
    module = quant.quantize_linear(linear, mode)
    assert isinstance(module, quant.LINEAR_CLASSES[mode])
    x = torch.randn(3, 5, 72, generator=generator).to(device)
    out = module(x)
    assert out.shape == (3, 5, 40) and out.dtype == x.dtype

    x_rows = x.reshape(-1, 72).cpu()
    w = quant.dequantize(module.weight_int8, module.weight_scale).cpu().double()
    if mode == "int8-wo":
        reference, x_scale = x_rows.double() @ w.T, None
    else:
        x_int8, x_scale = quantize_per_row(x_rows)  # the activations' int8 values and per-token scales
        reference = quant.dequantize(x_int8, x_scale).double() @ w.T
    out = out.reshape(-1, 40).cpu().double()
    assert torch.allclose(out, reference, rtol=1e-5, atol=1e-5 * reference.abs().max().item())
    # And against the unquantized product: within the rounding bound of the int8 operands.
    exact = x_rows.double() @ linear.weight.detach().cpu().double().T
    bound = quantization_error_bound(x_rows, module.weight_int8.cpu(), module.weight_scale.cpu(), x_scale)
    assert ((out - exact).abs() <= bound * (1 + 1e-4) + 1e-5).all()


@pytest.mark.parametrize("overrides", [{}, {"n_expert": 4}, {"tie_embeddings": True}])
def test_weight_only_model_matches_dequantized_float64_model(overrides):
    # Second code path: a float64 GPT whose weights are the dequantized int8 ones, no int8 arithmetic. Tied,
    # its one table is both the embedding and the head, so the head's scales are the embedding's row scales.
    model = random_model(seed=2, **overrides)
    quantized = quant.quantize_model(same_weights(model), "int8-wo", skip=())
    reference = same_weights(model).double()
    state = {}
    for name, module in quantized.named_modules():
        if isinstance(module, (quant.Int8WeightOnlyLinear, quant.Int8Embedding)):
            state[f"{name}.weight"] = quant.dequantize(module.weight_int8, module.weight_scale)
        elif isinstance(module, quant.QuantizedExperts):
            for matrix in module.MATRICES:
                state[f"{name}.{matrix}"] = quant.dequantize(getattr(module, f"{matrix}_int8"),
                                                             getattr(module, f"{matrix}_scale"))
    assert "tok_emb.weight" in state and ("lm_head.weight" in state) != model.config.tie_embeddings
    reference.load_state_dict({**reference.state_dict(), **{k: v.double() for k, v in state.items()}})
    ids = random_ids(3)
    with torch.no_grad():
        expected, got, full = reference(ids), quantized(ids).double(), model(ids).double()
    assert (got - expected).abs().max() <= 1e-4 * expected.std()  # fp32 rounding only
    assert (got - full).abs().max() > 1e-3 * expected.std()  # while int8 rounding really changed the model


@pytest.mark.parametrize("mode", quant.INT8_MODES)
def test_quantized_experts_match_float64_reference(mode):
    generator = torch.Generator().manual_seed(3)
    model = random_model(seed=3, n_expert=4)
    experts = quant.QuantizedExperts.from_experts(model.layers[0].mlp.experts, mode)
    tokens_per_expert = [5, 0, 7, 2]  # expert 1 gets no tokens
    x_sorted = torch.randn(sum(tokens_per_expert), 64, generator=generator)
    out = experts(x_sorted, torch.tensor(tokens_per_expert))

    def reference_linear(x, matrix, e):  # float64, from the same int8 values and scales
        weight = quant.dequantize(getattr(experts, f"{matrix}_int8")[e], getattr(experts, f"{matrix}_scale")[e])
        if mode == "w8a8":
            x = quant.dequantize(*quantize_per_row(x.float()))
        return x.double() @ weight.double().T
    expected = []
    for e, chunk in enumerate(x_sorted.split(tokens_per_expert)):
        hidden = torch.nn.functional.silu(reference_linear(chunk, "w_gate", e)) * reference_linear(chunk, "w_up", e)
        expected.append(reference_linear(hidden, "w_down", e))
    expected = torch.cat(expected)
    # W8A8 re-quantizes the hidden activations, where fp32-vs-float64 differences can move a value across a
    # rounding boundary: allow one activation step on a few elements' worth of the output.
    tolerance = 1e-5 if mode == "int8-wo" else 2e-2
    assert out.shape == expected.shape
    assert (out.double() - expected).abs().max() <= tolerance * expected.abs().max()


# ----------------------------------------------------------------------------------------------------------
# SmoothQuant

@pytest.mark.parametrize("n_expert", [0, 4])
def test_smoothing_leaves_the_full_precision_function_unchanged(n_expert):
    model = random_model(seed=3, dtype=torch.float64, n_expert=n_expert)
    smoothed = same_weights(model)
    smoothquant.smooth_model(smoothed, [random_ids(4), random_ids(5)], alpha=0.5)
    ids = random_ids(6)
    with torch.no_grad():
        assert torch.allclose(smoothed(ids), model(ids), rtol=0, atol=1e-10)
    # ...although the weights did change (every fold moved something).
    for name, tensor in smoothed.state_dict().items():
        if "norm" in name and name != "norm.weight" or name.endswith(("wv.weight", "wo.weight")):
            assert not torch.allclose(tensor, model.state_dict()[name]), name


@pytest.mark.parametrize("n_expert", [0, 4])
def test_smoothing_at_alpha_half_equalises_activation_and_weight_ranges(n_expert):
    # s = sqrt(max|X| / max|W|) makes max|X / s| = max|W * s| = sqrt(max|X| max|W|) in every channel.
    model = random_model(seed=4, dtype=torch.float64, n_expert=n_expert)
    batches = [random_ids(7), random_ids(8)]
    smoothquant.smooth_model(model, batches, alpha=0.5)
    after = smoothquant.activation_absmax(model, batches)
    config, group = model.config, model.config.n_head // model.config.n_kv_head
    for i, layer in enumerate(model.layers):
        attn, mlp = layer.attn, layer.mlp

        def column_absmax(*weights):
            return torch.stack([w.detach().abs().reshape(-1, w.shape[-1]).amax(0) for w in weights]).amax(0)
        pairs = [(after[f"layers.{i}.attn_norm"], column_absmax(attn.wq.weight, attn.wk.weight, attn.wv.weight))]
        if n_expert:
            pairs.append((after[f"layers.{i}.mlp_norm"],
                          column_absmax(mlp.router.weight, mlp.experts.w_gate, mlp.experts.w_up)))
        else:
            pairs.append((after[f"layers.{i}.mlp_norm"], column_absmax(mlp.w_gate.weight, mlp.w_up.weight)))
            pairs.append((after[f"layers.{i}.mlp.w_down"], column_absmax(mlp.w_down.weight)))
        grouped = (config.n_kv_head, group, config.head_dim)
        pairs.append((after[f"layers.{i}.attn.wo"].view(grouped).amax(1),
                      column_absmax(attn.wo.weight).view(grouped).amax(1)))
        for activation, weight in pairs:
            assert torch.allclose(activation, weight, rtol=1e-9, atol=0)


def outlier_model():
    """A model whose norm outputs carry a few 100x outlier channels, as trained LLMs' activations do."""
    model = random_model(seed=5)
    with torch.no_grad():
        for layer in model.layers:
            for norm in (layer.attn_norm, layer.mlp_norm):
                norm.weight[[3, 17, 40]] *= 100
    return model


def test_smoothing_reduces_w8a8_error_on_outlier_channels():
    model = outlier_model()
    calibration, ids = [random_ids(9), random_ids(10)], random_ids(11)
    plain = quant.quantize_model(same_weights(model), "w8a8")
    smooth = quant.quantize_model(same_weights(model), "w8a8", smooth_alpha=0.5, calibration_batches=calibration)
    with torch.no_grad():
        full = model(ids)
        plain_error = (plain(ids) - full).pow(2).mean().sqrt()
        smooth_error = (smooth(ids) - full).pow(2).mean().sqrt()
    assert smooth_error < 0.5 * plain_error, (smooth_error, plain_error)  # measured: about 3x smaller


# ----------------------------------------------------------------------------------------------------------
# quantize_model: what gets quantized, and errors

@pytest.mark.parametrize("mode", quant.INT8_MODES)
def test_quantize_model_by_default_keeps_only_the_router(mode):
    dense = quant.quantize_model(random_model(), mode)
    int8_class = quant.LINEAR_CLASSES[mode]
    assert type(dense.tok_emb) is quant.Int8Embedding
    assert type(dense.lm_head) is quant.Int8WeightOnlyLinear  # weight-only in both modes
    for layer in dense.layers:
        for module in (layer.attn.wq, layer.attn.wk, layer.attn.wv, layer.attn.wo,
                       layer.mlp.w_gate, layer.mlp.w_up, layer.mlp.w_down):
            assert type(module) is int8_class
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in dense.modules())

    moe = quant.quantize_model(random_model(n_expert=4), mode)
    for layer in moe.layers:
        assert type(layer.mlp.router) is nn.Linear
        assert isinstance(layer.mlp.experts, quant.QuantizedExperts) and layer.mlp.experts.mode == mode
    assert moe.quantization == {"mode": mode, "skip": list(quant.DEFAULT_SKIP), "smooth_alpha": None}

    kept = quant.quantize_model(random_model(), mode, skip=("tok_emb", "lm_head", "router"))
    assert type(kept.tok_emb) is nn.Embedding and type(kept.lm_head) is nn.Linear


@pytest.mark.parametrize("skip,table_quantized", [((), True), (("router",), True), (("lm_head",), False),
                                                  (("tok_emb",), False), (("tok_emb", "lm_head", "router"), False)])
def test_tied_table_is_quantized_only_when_neither_name_is_kept(skip, table_quantized):
    # A tied model has no lm_head module: "lm_head" is still an accepted skip entry, and it keeps the table.
    model = quant.quantize_model(random_model(tie_embeddings=True), "w8a8", skip=skip)
    assert not hasattr(model, "lm_head")
    assert type(model.tok_emb) is (quant.Int8Embedding if table_quantized else nn.Embedding)


def test_quantize_model_honours_custom_skip():
    model = quant.quantize_model(random_model(n_expert=4), "int8-wo", skip=("wo", "layers.1", "experts"))
    kept = {name for name, m in model.named_modules() if type(m) is nn.Linear}
    # A custom skip replaces the default one, so the LM head and layer 0's router are quantized too.
    assert kept == {"layers.0.attn.wo", "layers.1.attn.wq", "layers.1.attn.wk", "layers.1.attn.wv",
                    "layers.1.attn.wo", "layers.1.mlp.router"}
    assert type(model.lm_head) is quant.Int8WeightOnlyLinear
    assert type(model.layers[0].mlp.experts).__name__ == "Experts"
    assert type(model.layers[0].attn.wq) is quant.Int8WeightOnlyLinear


def test_quantize_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        quant.quantize_model(random_model(), "int3")
    with pytest.raises(ValueError, match="match no module"):
        quant.quantize_model(random_model(), "w8a8", skip=("lm_haed",))
    with pytest.raises(ValueError, match="w8a8 only"):
        quant.quantize_model(random_model(), "int8-wo", smooth_alpha=0.5, calibration_batches=[random_ids(0)])
    with pytest.raises(ValueError, match="calibration_batches"):
        quant.quantize_model(random_model(), "w8a8", smooth_alpha=0.5)
    with pytest.raises(ValueError, match="smooth_alpha"):
        quant.quantize_model(random_model(), "w8a8", smooth_alpha=1.5, calibration_batches=[random_ids(0)])
    with pytest.raises(ValueError, match="empty"):
        quant.quantize_model(random_model(), "w8a8", smooth_alpha=0.5, calibration_batches=[])
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize_model(quant.quantize_model(random_model(), "w8a8"), "w8a8")


@pytest.mark.parametrize("tie", [False, True])
def test_whole_model_weight_bytes_are_at_most_055_of_bf16_with_a_large_embedding(tie):
    # A 1024-token vocabulary on a 1-layer, 64-wide model: the embedding (and head) hold most of the weights.
    model = random_model(vocab_size=1024, n_layer=1, tie_embeddings=tie)
    table_share = model.tok_emb.weight.numel() * (1 if tie else 2) / model.num_params()
    assert table_share > 0.5

    def expected_bytes(skip) -> int:
        """From the float model's parameter shapes: a quantized matrix is 1 byte per entry plus one 2-byte scale
        per row (output channel, or token for the embedding); everything else 2 bytes per entry. Tied
        parameters appear once in named_parameters."""
        total = 0
        for name, param in model.named_parameters():
            kept = param.dim() == 1 or any(entry in name.split(".") for entry in skip)
            rows = param.numel() // param.shape[-1]
            total += 2 * param.numel() if kept else param.numel() + 2 * rows
        return total

    bf16_bytes = 2 * model.num_params()
    assert quant.weight_bytes(model) == bf16_bytes
    new_default = quant.quantize_model(same_weights(model), "int8-wo")
    old_default = quant.quantize_model(same_weights(model), "int8-wo", skip=("tok_emb", "lm_head", "router"))
    assert quant.weight_bytes(new_default) == expected_bytes(quant.DEFAULT_SKIP)
    assert quant.weight_bytes(old_default) == expected_bytes(("tok_emb", "lm_head"))
    assert quant.weight_bytes(new_default) <= 0.55 * bf16_bytes
    assert quant.weight_bytes(old_default) > 0.7 * bf16_bytes  # what keeping the table in bf16 costs here


# ----------------------------------------------------------------------------------------------------------
# Generation and checkpoints

@pytest.mark.parametrize("mode", quant.MODES)
def test_quantized_generate_matches_full_recompute_greedy(mode):
    model = quant.quantize_model(random_model(seed=6), mode)
    prompt = random_ids(12, batch=2, length=5)
    generated = model.generate(prompt, 12, temperature=0)
    tokens = prompt
    with torch.no_grad():
        for _ in range(12):
            next_token = model(tokens)[:, -1].argmax(-1, keepdim=True)  # (B, 1)
            tokens = torch.cat([tokens, next_token], dim=1)
    assert torch.equal(generated, tokens)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mode", quant.MODES)
def test_fully_quantized_model_served_by_the_engine_matches_naive_greedy(mode, tie):
    # Everything quantized: the engine reaches the embedding and the head through forward_serving.
    model = random_model(seed=17, max_seq_len=48, tie_embeddings=tie)
    calibration = [random_ids(18)] if mode == "w8a8" else None
    quant.quantize_model(model, mode, skip=(), smooth_alpha=0.5 if calibration else None,
                         calibration_batches=calibration)
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    prompts = [random_ids(19 + i, batch=1, length=length)[0].tolist() for i, length in enumerate((5, 11, 3))]
    engine = Engine(model, config=EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=16))
    outputs = engine.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    for prompt, output in zip(prompts, outputs):
        tokens = torch.tensor([prompt])
        with torch.no_grad():
            for _ in range(10):  # full recompute: no KV cache, no batching with other requests
                tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert output.new_token_ids == tokens[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.train([inspect.getsource(textwrap)] * 2, 300)


@pytest.mark.parametrize("mode,smooth_alpha", [("int8-wo", None), ("w8a8", 0.5)])
def test_quantized_checkpoint_round_trip(tmp_path, tokenizer, mode, smooth_alpha):
    model = random_model(seed=7, vocab_size=tokenizer.vocab_size, n_expert=4)
    calibration = [random_ids(13, vocab=tokenizer.vocab_size)] if smooth_alpha else None
    quant.quantize_model(model, mode, smooth_alpha=smooth_alpha, calibration_batches=calibration)
    quant.save_quantized(model, tokenizer, tmp_path / "q", source="somewhere")
    assert json.loads((tmp_path / "q" / "config.json").read_text())["quantization"] == {
        "mode": mode, "skip": list(quant.DEFAULT_SKIP), "smooth_alpha": smooth_alpha, "source": "somewhere"}

    loaded = quant.load_quantized(tmp_path / "q")
    ids = random_ids(14, vocab=tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded["model"](ids), model(ids))
    assert loaded["model"].quantization["mode"] == mode
    assert loaded["tokenizer"].encode("def f(): pass") == tokenizer.encode("def f(): pass")
    served = quant.load_for_serving(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(served["model"](ids), model(ids))
    # Training and fine-tuning load through checkpoint.load_checkpoint: a quantized checkpoint must not load.
    with pytest.raises(checkpoint.CheckpointError):
        checkpoint.load_checkpoint(tmp_path / "q")


@pytest.mark.parametrize("mode,smooth_alpha", [("int8-wo", None), ("w8a8", 0.5)])
def test_tied_quantized_checkpoint_stores_one_table(tmp_path, tokenizer, mode, smooth_alpha):
    model = random_model(seed=9, vocab_size=tokenizer.vocab_size, tie_embeddings=True)
    calibration = [random_ids(10, vocab=tokenizer.vocab_size)] if smooth_alpha else None
    quant.quantize_model(model, mode, smooth_alpha=smooth_alpha, calibration_batches=calibration)
    quant.save_quantized(model, tokenizer, tmp_path / "tied")
    stored = load_file(tmp_path / "tied" / "model.safetensors")
    tables = [name for name, t in stored.items() if t.shape == (tokenizer.vocab_size, model.config.n_embd)]
    assert tables == ["tok_emb.weight_int8"] and stored["tok_emb.weight_int8"].dtype == torch.int8
    assert not any(name.startswith("lm_head") for name in stored)

    ids = random_ids(11, vocab=tokenizer.vocab_size)
    for loaded in (quant.load_quantized(tmp_path / "tied"), quant.load_for_serving(tmp_path / "tied")):
        assert loaded["model"].config.tie_embeddings
        with torch.no_grad():
            assert torch.equal(loaded["model"](ids), model(ids))


def test_load_for_serving_reads_plain_checkpoints(tmp_path, tokenizer):
    model = random_model(seed=8, vocab_size=tokenizer.vocab_size)
    checkpoint.save_checkpoint(tmp_path / "plain", model.state_dict(), model.config, tokenizer)
    served = quant.load_for_serving(tmp_path / "plain")
    ids = random_ids(15, vocab=tokenizer.vocab_size)
    with torch.no_grad():
        assert torch.equal(served["model"](ids), model(ids))
    with pytest.raises(checkpoint.CheckpointError, match="not a quantized checkpoint"):
        quant.load_quantized(tmp_path / "plain")
    with pytest.raises(ValueError, match="not quantized"):
        quant.save_quantized(model, tokenizer, tmp_path / "nope")


# ----------------------------------------------------------------------------------------------------------
# A briefly trained model (conftest.py's `trained`): quality report and command line

def test_report_on_a_trained_model_stays_close_to_full_precision(trained):
    model, tokenizer = trained["model"], trained["tokenizer"]
    report = quant.quality_report(model, tokenizer, trained["data"], eval_batches=4, batch_size=8, seq_len=64,
                                  calibration_batches=2)
    rows = {row["variant"]: row for row in report["rows"]}
    assert list(rows) == ["full precision", "int8-wo", "w8a8", "w8a8+smoothquant(0.5)", "int4-rtn(g128)",
                          "int4-gptq(g128)"]
    # The full-precision row is bits_per_byte itself, on the same unshuffled val batches.
    val = data.eval_batches(data.TokenShards(trained["data"], "val"), 8, 64, 4)
    with torch.no_grad():
        direct = bits_per_byte(model, val, torch.tensor(tokenizer.token_bytes()))
    assert rows["full precision"]["bpb"] == pytest.approx(direct["bpb"], rel=1e-9)
    assert rows["full precision"]["top1_agreement"] == 1.0
    assert direct["bpb"] < 4.0, "the model should have learned something in 120 steps"
    # The brief's targets: W8A16 within 0.5% bits per byte, W8A8 + SmoothQuant within 2%. This small model
    # meets them by orders of magnitude (~1e-3 percent measured); a wrong scale or layout misses them by far.
    assert abs(rows["int8-wo"]["bpb_increase_percent"]) < 0.5
    assert abs(rows["w8a8+smoothquant(0.5)"]["bpb_increase_percent"]) < 2
    for row in rows.values():  # in percent, as the speedrun shows it
        assert row["bpb_increase_percent"] == pytest.approx(100 * (row["bpb"] / rows["full precision"]["bpb"] - 1))
    assert rows["int8-wo"]["top1_agreement"] > 0.98
    assert rows["w8a8+smoothquant(0.5)"]["top1_agreement"] > 0.95
    for row in report["rows"][1:]:
        assert row["weight_bytes"] < report["bf16_weight_bytes"]


def test_command_line_quantizes_saves_and_reports(trained, capsys):
    out = trained["root"] / "w8a8"
    quant.main(["--model", str(trained["checkpoint"]), "--mode", "w8a8", "--out", str(out), "--data-dir",
                str(trained["data"]), "--report", "true", "--eval-batches", "2", "--batch-size", "4",
                "--seq-len", "64", "--calibration-batches", "2", "--device", "cpu"])
    report = json.loads((out / "quant_report.json").read_text())
    assert "w8a8+smoothquant(0.5)" in [row["variant"] for row in report["rows"]]
    assert "w8a8+smoothquant(0.5)" in capsys.readouterr().out
    # The saved model is what quantize_model makes from the same checkpoint and calibration batches.
    loaded = quant.load_quantized(out)
    assert loaded["raw_config"]["quantization"]["smooth_alpha"] == 0.5
    expected = checkpoint.load_checkpoint(trained["checkpoint"])["model"].eval()
    calibration = quant.calibration_batches_from(data.TokenShards(trained["data"], "train"), 2, 4, 64)
    quant.quantize_model(expected, "w8a8", smooth_alpha=0.5, calibration_batches=calibration)
    ids = random_ids(16, vocab=trained["tokenizer"].vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded["model"](ids), expected(ids))
    with pytest.raises(ValueError, match="mode"):
        quant.main(["--model", str(trained["checkpoint"]), "--mode", "int3"])

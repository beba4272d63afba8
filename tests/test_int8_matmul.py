"""Tests for kernels/int8_matmul.py: the Triton kernels (the interpreter on CPU) against exact int64 products and
float64 references built from the same int8 values and scales; quantize_per_row against its error bound."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import int8_matmul as int8_module
from kernels.int8_matmul import (MAX_K, int8_matmul, int8_matmul_reference, int8_weight_only_matmul,
                                 int8_weight_only_matmul_reference, quantize_per_row)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The interpreter converts fp32 to bf16 by truncation, where the GPU (and torch) round to nearest: its bf16
# results may be one ulp (2^-7 relative) away from the nearest value instead of half an ulp.
BF16_TRUNCATED = int8_module.INTERPRET and DEVICE == "cpu"
# Relative error allowed per output element, from the rounding of the output dtype (half an ulp) plus a margin.
OUTPUT_RTOL = {torch.float32: 5e-7, torch.float16: 6e-4, torch.bfloat16: 8e-3 if BF16_TRUNCATED else 4.5e-3}


def random_int8(generator, *shape):
    return torch.randint(-128, 128, shape, dtype=torch.int8, generator=generator)


def exact_product(a, b):
    """a @ b.T in int64 on the CPU: no rounding, no overflow."""
    return a.cpu().long() @ b.cpu().long().T


@settings(max_examples=25, deadline=None, derandomize=True)
@given(M=st.integers(1, 40), N=st.integers(1, 40), K=st.integers(1, 80), seed=st.integers(0, 2**16))
def test_int8_product_is_bit_exact_on_odd_shapes(M, N, K, seed):
    # The interpreter's tiles are 16x16x32, so these shapes cover partial M, N and K tails and several K steps.
    generator = torch.Generator().manual_seed(seed)
    a, b = random_int8(generator, M, K), random_int8(generator, N, K)
    out = int8_matmul(a.to(DEVICE), b.to(DEVICE))
    assert out.dtype == torch.int32
    assert torch.equal(out.cpu().long(), exact_product(a, b))


def test_int8_product_is_exact_beyond_float32_integers():
    # Sums above 2^24 that are odd: float32 accumulation would round them, int32 must not.
    K = 2100
    a = torch.full((17, K), 127, dtype=torch.int8)
    b = torch.full((18, K), 127, dtype=torch.int8)
    b[:, 5] = torch.arange(-9, 9, dtype=torch.int8)
    expected = exact_product(a, b)
    assert expected.abs().min() > 2**24 and (expected % 2 == 1).any()
    assert torch.equal(int8_matmul(a.to(DEVICE), b.to(DEVICE)).cpu().long(), expected)


def test_int8_product_of_strided_views():
    generator = torch.Generator().manual_seed(1)
    a_t = random_int8(generator, 50, 19)  # a = a_t.T is (19, 50) with stride 1 along M
    b_wide = random_int8(generator, 23, 100)  # b = every other column: stride 2 along K
    a, b = a_t.T, b_wide[:, ::2]
    assert torch.equal(int8_matmul(a.to(DEVICE), b.to(DEVICE)).cpu().long(), exact_product(a, b))


def test_row_offsets_past_2_31_do_not_wrap():
    # Row 2 of a starts 2^31 + 128 bytes after row 0. With int32 offsets that product wraps to -2^31 + 128 and
    # the kernel reads the zeros planted there; the rows sit 2 GB into a 4 GB allocation, so even the wrapped
    # address is mapped. The memory is reserved, not touched: only the pages written below become resident.
    K, row_stride = 32, 2**30 + 64
    try:
        storage = torch.empty(2**32 + 4096, dtype=torch.int8)
    except RuntimeError as error:
        pytest.skip(f"cannot reserve 4 GB of address space: {error}")
    storage[:4096] = 0
    a = storage[2**31:].as_strided((3, K), (row_stride, 1))
    generator = torch.Generator().manual_seed(6)
    a.copy_(random_int8(generator, 3, K))
    b = random_int8(generator, 16, K)
    expected = exact_product(a, b)
    assert (expected[2] != 0).all()
    assert torch.equal(int8_matmul(a, b).long(), expected)


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scaled_int8_matches_float64_and_the_reference(out_dtype):
    generator = torch.Generator().manual_seed(2)
    x, w = torch.randn(37, 70, generator=generator), torch.randn(45, 70, generator=generator)
    (a, a_scale), (b, b_scale) = quantize_per_row(x), quantize_per_row(w)
    a_scale = a_scale[:, None]  # the (M, 1) form is accepted too
    out = int8_matmul(a.to(DEVICE), b.to(DEVICE), a_scale.to(DEVICE), b_scale.to(DEVICE), out_dtype=out_dtype)
    assert out.dtype == out_dtype and out.shape == (37, 45)
    expected = exact_product(a, b).double() * a_scale.double() * b_scale.double()[None, :]
    error = (out.cpu().double() - expected).abs()
    assert (error <= OUTPUT_RTOL[out_dtype] * expected.abs() + 1e-30).all(), error.max()
    # The reference applies the same fp32 multiplies in the same order: the two paths agree to the bit, up to
    # the interpreter's bf16 truncation.
    reference = int8_matmul_reference(a, b, a_scale, b_scale, out_dtype=out_dtype)
    if out_dtype == torch.bfloat16 and BF16_TRUNCATED:
        assert ((out.double() - reference.double()).abs() <= 2**-7 * reference.double().abs()).all()
    else:
        assert torch.equal(out.cpu(), reference)


def test_quantized_matmul_error_within_the_quantisation_bound():
    # |x.w - xq.wq| <= sum_k |x_k| |w_k - wq_k| + |wq_k| |x_k - xq_k| <= sum_k |x_k| s_w / 2 + |wq_k| s_x / 2.
    generator = torch.Generator().manual_seed(3)
    x, w = torch.randn(9, 64, generator=generator), torch.randn(20, 64, generator=generator) * 0.05
    (xq, x_scale), (wq, w_scale) = quantize_per_row(x), quantize_per_row(w)
    out = int8_matmul(xq.to(DEVICE), wq.to(DEVICE), x_scale.to(DEVICE), w_scale.to(DEVICE),
                      out_dtype=torch.float32).cpu().double()
    exact = x.double() @ w.double().T
    w_dequant = wq.double() * w_scale.double()[:, None]
    bound = (x.double().abs().sum(1, keepdim=True) * w_scale.double()[None, :] / 2
             + x_scale.double()[:, None] * w_dequant.abs().sum(1)[None, :] / 2)
    assert ((out - exact).abs() <= bound * (1 + 1e-5)).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_weight_only_matches_float64(dtype, with_bias):
    generator = torch.Generator().manual_seed(4)
    M, N, K = 19, 37, 75
    x = torch.randn(M, K, generator=generator).to(dtype)
    w_int8 = random_int8(generator, N, K)
    w_scale = torch.rand(N, generator=generator) * 0.02 + 0.001
    bias = torch.randn(2 * N, generator=generator).to(dtype)[::2] if with_bias else None  # a strided view
    out = int8_weight_only_matmul(x.to(DEVICE), w_int8.to(DEVICE), w_scale.to(DEVICE),
                                  bias=None if bias is None else bias.to(DEVICE))
    assert out.dtype == dtype and out.shape == (M, N)
    w_dequant = w_int8.double() * w_scale.double()[:, None]  # the float64 weight the kernel never builds
    expected = x.double() @ w_dequant.T + (0 if bias is None else bias.double())
    # Output rounding relative to the value, plus fp32 accumulation relative to the sum of |terms|.
    magnitude = x.double().abs() @ w_dequant.abs().T
    allowed = OUTPUT_RTOL[dtype] * expected.abs() + 1e-5 * magnitude
    error = (out.cpu().double() - expected).abs()
    assert (error <= allowed).all(), (error - allowed).max()
    reference = int8_weight_only_matmul_reference(x, w_int8, w_scale, bias=bias).double()
    assert ((reference - expected).abs() <= allowed).all()


@pytest.mark.parametrize("M, N, K", [(0, 5, 8), (4, 0, 8), (3, 5, 0)])
def test_empty_shapes(M, N, K):
    generator = torch.Generator().manual_seed(5)
    a, b = random_int8(generator, M, K).to(DEVICE), random_int8(generator, N, K).to(DEVICE)
    assert torch.equal(int8_matmul(a, b).cpu(), torch.zeros(M, N, dtype=torch.int32))
    x, bias = torch.ones(M, K, device=DEVICE), torch.arange(N, dtype=torch.float32, device=DEVICE)
    out = int8_weight_only_matmul(x, b, torch.ones(N, device=DEVICE), bias=bias)
    assert torch.equal(out.cpu(), bias.cpu().expand(M, N))


def test_off_gpu_without_interpreter_runs_the_references(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the dispatch to the references only happens off-GPU")
    monkeypatch.setattr(int8_module, "INTERPRET", False)
    generator = torch.Generator().manual_seed(6)
    a, b = random_int8(generator, 5, 33), random_int8(generator, 7, 33)
    assert torch.equal(int8_matmul(a, b).long(), exact_product(a, b))
    x, scale = torch.randn(5, 33, generator=generator, dtype=torch.bfloat16), torch.rand(7, generator=generator)
    assert torch.equal(int8_weight_only_matmul(x, b, scale), int8_weight_only_matmul_reference(x, b, scale))


finite_floats = st.floats(-1e6, 1e6, allow_nan=False, allow_subnormal=False, width=32)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.lists(st.one_of(st.lists(finite_floats, min_size=7, max_size=7), st.just([0.0] * 7)),
                     min_size=1, max_size=6))
def test_quantize_per_row_error_is_at_most_half_a_step(rows):
    x = torch.tensor(rows, dtype=torch.float32)
    q, scale = quantize_per_row(x)
    assert q.dtype == torch.int8 and scale.shape == (len(rows),) and torch.isfinite(scale).all()
    assert q.abs().max() <= 127
    # x / scale is rounded once in fp32 (relative error 2^-24 of at most 127) before the rounding to integers.
    error = (q.double() * scale.double()[:, None] - x.double()).abs()
    assert (error <= scale.double()[:, None] * (0.5 + 127 * 2**-24)).all()
    # The largest magnitude of a nonzero row uses the full range; a zero row stays exactly zero.
    nonzero = x.abs().amax(1) > 0
    assert (q[nonzero].abs().amax(1) == 127).all()
    assert (q[~nonzero] == 0).all() and (scale[~nonzero] == 0).all()


def test_quantize_per_row_keeps_leading_dims_and_half_inputs():
    x = torch.randn(2, 3, 16, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    q, scale = quantize_per_row(x)
    assert q.shape == x.shape and scale.shape == (2, 3) and scale.dtype == torch.float32
    q_flat, scale_flat = quantize_per_row(x.reshape(6, 16).float())
    assert torch.equal(q.reshape(6, 16), q_flat) and torch.equal(scale.reshape(6), scale_flat)


def _spoiled(**overrides):
    """A valid int8_matmul call with some arguments replaced."""
    generator = torch.Generator().manual_seed(8)
    args = dict(a=random_int8(generator, 4, 8), b=random_int8(generator, 3, 8), a_scale=torch.ones(4),
                b_scale=torch.ones(3), out_dtype=torch.float16)
    return {**args, **overrides}


@pytest.mark.parametrize("overrides, message", [
    (dict(a=torch.zeros(4, 8)), "a must be a 2-D int8"),
    (dict(b=torch.zeros(3, 9, dtype=torch.int8)), "nn.Linear layout"),
    (dict(b_scale=None), "together"),
    (dict(a_scale=torch.ones(5)), "a_scale"),
    (dict(b_scale=torch.ones(3, 1)), "b_scale"),
    (dict(out_dtype=torch.int32), "rescaled product"),
    (dict(a_scale=None, b_scale=None), "exact int32"),
    (dict(a=torch.zeros(1, MAX_K + 1, dtype=torch.int8), b=torch.zeros(1, MAX_K + 1, dtype=torch.int8)),
     "overflow"),
])
def test_int8_matmul_rejects_bad_input(overrides, message):
    with pytest.raises(ValueError, match=message):
        int8_matmul(**_spoiled(**overrides))


@pytest.mark.parametrize("args, message", [
    ((torch.ones(2, 8, dtype=torch.float64), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3)), "x must be"),
    ((torch.ones(2, 8), torch.zeros(3, 8), torch.ones(3)), "w_int8"),
    ((torch.ones(2, 8), torch.zeros(3, 7, dtype=torch.int8), torch.ones(3)), "K=8"),
    ((torch.ones(2, 8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(4)), "w_scale"),
])
def test_weight_only_rejects_bad_input(args, message):
    with pytest.raises(ValueError, match=message):
        int8_weight_only_matmul(*args)


def test_bad_bias_and_integer_quantize_input_are_rejected():
    with pytest.raises(ValueError, match="bias"):
        int8_weight_only_matmul(torch.ones(2, 8), torch.zeros(3, 8, dtype=torch.int8), torch.ones(3),
                                bias=torch.ones(4))
    with pytest.raises(ValueError, match="floating"):
        quantize_per_row(torch.zeros(3, 4, dtype=torch.int8))


@pytest.mark.cuda
def test_gpu_real_sizes_match_the_references():
    # Prefill (M = 4096, the big tiles) and decode (M = 8) shapes of a 4096-wide projection: the exact int32
    # product, and W8A16 in bf16 and fp32 (three tf32 passes) against float64.
    generator = torch.Generator().manual_seed(9)
    for M in (4096, 8):
        a, b = random_int8(generator, M, 4096).cuda(), random_int8(generator, 4096, 4096).cuda()
        assert torch.equal(int8_matmul(a, b), int8_matmul_reference(a, b))
        w_scale = (torch.rand(4096, generator=generator) * 0.02 + 0.001).cuda()
        for dtype, rtol in ((torch.bfloat16, 8e-3), (torch.float32, 1e-5)):
            x = torch.randn(M, 4096, generator=generator).cuda().to(dtype)
            out = int8_weight_only_matmul(x, b, w_scale).double()
            expected = x.double() @ (b.double() * w_scale.double()[:, None]).T
            magnitude = x.double().abs() @ (b.double().abs() * w_scale.double()[:, None]).T
            assert ((out - expected).abs() <= rtol * expected.abs() + 1e-5 * magnitude).all()

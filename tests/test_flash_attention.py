"""Tests for kernels/flash_attention.py: the Triton kernels (the interpreter on CPU) and attention_reference
against an independent float64 attention written out per sequence and per head, gradients by autograd."""

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.flash_attention import (_tile, attention_reference, flash_attention, flash_attention_backward,
                                     flash_attention_forward)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max error allowed, relative to the largest reference value (at least 1): fp32 is exact up to summation
# order on CPU (on GPU its dots run in tf32); half precision loses bits where P and dS are rounded to the
# input dtype for the tensor-core matmuls.
TOLERANCE = {torch.float32: 2e-5 if DEVICE == "cpu" else 3e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def naive_attention_float64(q, k, v, lengths_q, lengths_k, causal, softmax_scale):
    """Packed (total, H, D) attention in float64, one (sequence, head) at a time; rows seeing no key give 0."""
    num_heads, num_kv_heads, head_dim = q.shape[1], k.shape[1], q.shape[2]
    softmax_scale = head_dim ** -0.5 if softmax_scale is None else softmax_scale
    q, k, v = q.double(), k.double(), v.double()
    outputs, q_start, k_start = [], 0, 0
    for length_q, length_k in zip(lengths_q, lengths_k):
        heads = []
        for head in range(num_heads):
            kv_head = head * num_kv_heads // num_heads
            q_seq = q[q_start:q_start + length_q, head]  # (Tq, D)
            k_seq = k[k_start:k_start + length_k, kv_head]  # (Tk, D)
            v_seq = v[k_start:k_start + length_k, kv_head]
            query_pos = torch.arange(length_q, device=q.device)[:, None] + (length_k - length_q)
            key_pos = torch.arange(length_k, device=q.device)[None, :]
            visible = key_pos <= query_pos if causal else torch.ones(length_q, length_k, dtype=torch.bool,
                                                                     device=q.device)
            if length_k == 0:
                heads.append(q_seq * 0.0)
                continue
            scores = (q_seq @ k_seq.T * softmax_scale).masked_fill(~visible, float("-inf"))
            row_max = scores.max(dim=1, keepdim=True).values
            row_max = torch.where(torch.isfinite(row_max), row_max, 0.0).detach()
            weights = (scores - row_max).exp()  # masked entries are exp(-inf) = 0
            probs = weights / weights.sum(dim=1, keepdim=True).clamp_min(1e-300)
            heads.append(probs @ v_seq)
        outputs.append(torch.stack(heads, dim=1) if heads else q[q_start:q_start + length_q] * 0.0)
        q_start, k_start = q_start + length_q, k_start + length_k
    return torch.cat(outputs)


def reference_and_grads(q, k, v, dout, lengths_q, lengths_k, causal, softmax_scale=None):
    """The float64 reference output and its (dq, dk, dv) for the upstream gradient dout."""
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = naive_attention_float64(*leaves, lengths_q, lengths_k, causal, softmax_scale)
    grads = torch.autograd.grad(out, leaves, dout.double(), allow_unused=True)
    return out.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves)]


def assert_close(actual, expected, dtype, name):
    """Max abs error within TOLERANCE[dtype] of max(1, max |expected|), and no NaN/inf anywhere."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values"
    error = (actual.double() - expected).abs().max().item() if actual.numel() else 0.0
    bound = TOLERANCE[dtype] * max(1.0, expected.abs().max().item() if expected.numel() else 0.0)
    assert error <= bound, f"{name}: max error {error:.3g} > {bound:.3g}"


def random_qkv(generator, total_q, total_k, num_heads, num_kv_heads, head_dim, dtype, batch=None):
    """Random q, k, v (packed, or dense when batch is given) and an upstream gradient, on DEVICE."""
    def sample(*shape):
        return torch.randn(*shape, generator=generator).to(DEVICE, dtype)
    if batch is None:
        return (sample(total_q, num_heads, head_dim), sample(total_k, num_kv_heads, head_dim),
                sample(total_k, num_kv_heads, head_dim), sample(total_q, num_heads, head_dim))
    return (sample(batch, total_q, num_heads, head_dim), sample(batch, total_k, num_kv_heads, head_dim),
            sample(batch, total_k, num_kv_heads, head_dim), sample(batch, total_q, num_heads, head_dim))


def cu_seqlens(lengths):
    """[0, l0, l0 + l1, ...] as int32 on DEVICE."""
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(DEVICE, torch.int32)


def run_flash(q, k, v, dout, **kwargs):
    """flash_attention output and its (dq, dk, dv) for dout."""
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = flash_attention(*leaves, **kwargs)
    return out.detach(), torch.autograd.grad(out, leaves, dout)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dense_gqa_matches_float64(dtype, causal):
    generator = torch.Generator().manual_seed(0)
    batch, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim = 2, 37, 45, 4, 2, 32
    q, k, v, dout = random_qkv(generator, seqlen_q, seqlen_k, num_heads, num_kv_heads, head_dim, dtype, batch)
    out, grads = run_flash(q, k, v, dout, causal=causal)
    flat = [x.reshape(-1, *x.shape[2:]) for x in (q, k, v, dout)]
    expected, expected_grads = reference_and_grads(*flat, [seqlen_q] * batch, [seqlen_k] * batch, causal)
    assert_close(out.reshape(-1, num_heads, head_dim), expected, dtype, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad.reshape(expected_grad.shape), expected_grad, dtype, name)


@pytest.mark.parametrize("head_dim", [16, 64, 128])
def test_head_dims(head_dim):
    generator = torch.Generator().manual_seed(head_dim)
    q, k, v, dout = random_qkv(generator, 21, 34, 2, 1, head_dim, torch.float16)
    lengths_q, lengths_k = [21], [34]
    kwargs = dict(causal=True, cu_seqlens_q=cu_seqlens(lengths_q), cu_seqlens_k=cu_seqlens(lengths_k))
    out, grads = run_flash(q, k, v, dout, **kwargs)
    expected, expected_grads = reference_and_grads(q, k, v, dout, lengths_q, lengths_k, True)
    assert_close(out, expected, torch.float16, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad, expected_grad, torch.float16, name)


@st.composite
def attention_problems(draw):
    """Lengths (odd, not block multiples, sometimes empty), heads, GQA ratio, causal flag, dense or varlen."""
    causal = draw(st.booleans())
    num_kv_heads = draw(st.integers(1, 2))
    num_heads = num_kv_heads * draw(st.sampled_from([1, 2, 3]))
    if draw(st.booleans()):  # varlen
        lengths_k = draw(st.lists(st.integers(0, 40), min_size=1, max_size=3))
        lengths_q = [draw(st.integers(0, length_k if causal else 40)) for length_k in lengths_k]
        batch = None
    else:
        batch = draw(st.integers(1, 2))
        seqlen_k = draw(st.integers(1, 40))
        seqlen_q = draw(st.integers(1, seqlen_k if causal else 40))
        lengths_q, lengths_k = [seqlen_q] * batch, [seqlen_k] * batch
    return dict(causal=causal, num_heads=num_heads, num_kv_heads=num_kv_heads, batch=batch,
                lengths_q=lengths_q, lengths_k=lengths_k, head_dim=draw(st.sampled_from([16, 32])),
                softmax_scale=draw(st.sampled_from([None, 0.3, 1.7])), seed=draw(st.integers(0, 2**16)))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(problem=attention_problems())
def test_random_problems_match_float64(problem):
    generator = torch.Generator().manual_seed(problem["seed"])
    lengths_q, lengths_k, batch = problem["lengths_q"], problem["lengths_k"], problem["batch"]
    kwargs = dict(causal=problem["causal"], softmax_scale=problem["softmax_scale"])
    if batch is None:
        q, k, v, dout = random_qkv(generator, sum(lengths_q), sum(lengths_k), problem["num_heads"],
                                   problem["num_kv_heads"], problem["head_dim"], torch.float32)
        kwargs.update(cu_seqlens_q=cu_seqlens(lengths_q), cu_seqlens_k=cu_seqlens(lengths_k))
    else:
        q, k, v, dout = random_qkv(generator, lengths_q[0], lengths_k[0], problem["num_heads"],
                                   problem["num_kv_heads"], problem["head_dim"], torch.float32, batch)
    out, grads = run_flash(q, k, v, dout, **kwargs)
    flat = [x.reshape(-1, *x.shape[-2:]) for x in (q, k, v, dout)]
    expected, expected_grads = reference_and_grads(*flat, lengths_q, lengths_k, problem["causal"],
                                                   problem["softmax_scale"])
    assert_close(out.reshape(expected.shape), expected, torch.float32, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad.reshape(expected_grad.shape), expected_grad, torch.float32, name)


def run_kernels_into(q, k, v, dout, lengths_q, lengths_k, causal, fill, max_seqlens=None):
    """Call the launchers with every output buffer pre-filled with `fill`; returns out, lse, dq, dk, dv.
    max_seqlens: the (q, k) length hints passed to the launchers (default: the true maxima)."""
    max_seqlens = (max(lengths_q), max(lengths_k)) if max_seqlens is None else max_seqlens
    meta = (cu_seqlens(lengths_q), cu_seqlens(lengths_k), *max_seqlens)
    scale = q.shape[-1] ** -0.5
    out, lse = flash_attention_forward(q, k, v, *meta, causal=causal, softmax_scale=scale,
                                       out=torch.full_like(q, fill),
                                       lse=torch.full((q.shape[1], q.shape[0]), fill, device=DEVICE))
    dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, *meta, causal=causal, softmax_scale=scale,
                                          dq=torch.full_like(q, fill), dk=torch.full_like(k, fill),
                                          dv=torch.full_like(v, fill))
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("causal", [True, False])
def test_kernels_overwrite_nan_poisoned_buffers(causal):
    # Includes a sequence with no queries (its dK/dV must still be written, as zeros) and tails off the blocks.
    generator = torch.Generator().manual_seed(1)
    lengths_q, lengths_k = [17, 0, 33], [29, 5, 33]
    q, k, v, dout = random_qkv(generator, sum(lengths_q), sum(lengths_k), 4, 2, 32, torch.float16)
    out, lse, dq, dk, dv = run_kernels_into(q, k, v, dout, lengths_q, lengths_k, causal, float("nan"))
    assert not torch.isnan(lse).any()
    expected, expected_grads = reference_and_grads(q, k, v, dout, lengths_q, lengths_k, causal)
    assert_close(out, expected, torch.float16, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), (dq, dk, dv), expected_grads):
        assert_close(grad, expected_grad, torch.float16, name)


def test_rows_without_visible_keys_are_zero_not_nan():
    # The public API rejects causal seqlen_q > seqlen_k; the launchers do not check values, so the kernels' own
    # guard is exercised here: with 40 queries on 7 keys, bottom-right alignment leaves rows 0..32 keyless
    # (a whole query block's worth, so key ranges computed from the diagonal go negative), and a sequence with
    # no keys at all leaves every row keyless.
    generator = torch.Generator().manual_seed(2)
    lengths_q, lengths_k = [40, 3, 9], [7, 0, 9]
    q, k, v, dout = random_qkv(generator, sum(lengths_q), sum(lengths_k), 2, 1, 16, torch.float32)
    out, _, dq, dk, dv = run_kernels_into(q, k, v, dout, lengths_q, lengths_k, True, float("nan"))
    expected, expected_grads = reference_and_grads(q, k, v, dout, lengths_q, lengths_k, True)
    keyless_rows = torch.cat([torch.arange(33), torch.arange(40, 43)])
    assert (out[keyless_rows] == 0).all() and (dq[keyless_rows] == 0).all()
    assert_close(out, expected, torch.float32, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), (dq, dk, dv), expected_grads):
        assert_close(grad, expected_grad, torch.float32, name)


def test_too_small_max_seqlen_hints_still_write_every_row():
    # The hints size the grid and are not checked (that would read cu_seqlens: a GPU sync). With hints of 8 the
    # grid covers one 32-row query block and one 32-key block; the kernels' stride loops must reach the rest.
    generator = torch.Generator().manual_seed(4)
    lengths_q, lengths_k = [70, 5], [75, 5]
    q, k, v, dout = random_qkv(generator, sum(lengths_q), sum(lengths_k), 2, 1, 16, torch.float32)
    out, lse, dq, dk, dv = run_kernels_into(q, k, v, dout, lengths_q, lengths_k, True, float("nan"),
                                            max_seqlens=(8, 8))
    expected, expected_grads = reference_and_grads(q, k, v, dout, lengths_q, lengths_k, True)
    assert_close(out, expected, torch.float32, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), (dq, dk, dv), expected_grads):
        assert_close(grad, expected_grad, torch.float32, name)


@triton.jit
def _tile_offsets_probe(X, Out, first_row, stride_t, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Store the byte offsets from X of _tile's (BLOCK, HEAD_DIM) pointers, without touching that memory."""
    offsets = _tile(X, 0, 0, first_row, stride_t, BLOCK, HEAD_DIM).to(tl.int64) - X.to(tl.int64)
    tl.store(Out + tl.arange(0, BLOCK)[:, None] * HEAD_DIM + tl.arange(0, HEAD_DIM)[None, :], offsets)


def test_tile_row_offsets_do_not_wrap_past_2_31():
    # Token 600000 of heads packed H * D = 4096 wide starts 2.46e9 elements in: an int32 product wraps there.
    first_row, stride_t = 600_000, 4096
    x = torch.zeros(1, dtype=torch.float16, device=DEVICE)
    out = torch.zeros(4, 16, dtype=torch.int64, device=DEVICE)
    _tile_offsets_probe[(1,)](x, out, first_row, stride_t, BLOCK=4, HEAD_DIM=16)
    rows = first_row + torch.arange(4, dtype=torch.int64)
    expected = (rows[:, None] * stride_t + torch.arange(16)) * x.element_size()
    assert torch.equal(out.cpu(), expected)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes_match_the_reference(dtype):
    # Forward and backward of a varlen batch at D = 128 with GQA (on an H100 the forward is the Hopper kernel's).
    generator = torch.Generator().manual_seed(11)
    lengths_q, lengths_k = [2048, 1000, 300], [2048, 1500, 300]
    q, k, v, dout = random_qkv(generator, sum(lengths_q), sum(lengths_k), 16, 4, 128, dtype)
    kwargs = dict(causal=True, cu_seqlens_q=cu_seqlens(lengths_q), cu_seqlens_k=cu_seqlens(lengths_k))
    out, grads = run_flash(q, k, v, dout, **kwargs)
    leaves = [x.float().requires_grad_() for x in (q, k, v)]
    expected = attention_reference(*leaves, **kwargs)
    expected_grads = torch.autograd.grad(expected, leaves, dout.float())
    for name, actual, reference in zip(("out", "dq", "dk", "dv"), (out, *grads), (expected, *expected_grads)):
        assert_close(actual, reference.double(), dtype, name)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("varlen", [True, False])
def test_attention_reference_matches_float64(causal, varlen):
    generator = torch.Generator().manual_seed(3)
    if varlen:
        lengths_q, lengths_k = [5, 0, 12, 7], [9, 3, 12, 7] if causal else [2, 3, 12, 0]
        q, k, v, dout = random_qkv(generator, sum(lengths_q), sum(lengths_k), 6, 2, 8, torch.float32)
        kwargs = dict(cu_seqlens_q=cu_seqlens(lengths_q), cu_seqlens_k=cu_seqlens(lengths_k))
    else:
        lengths_q, lengths_k = [11] * 3, [14] * 3
        q, k, v, dout = random_qkv(generator, 11, 14, 6, 2, 8, torch.float32, batch=3)
        kwargs = {}
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    out = attention_reference(*leaves, causal=causal, softmax_scale=0.5, **kwargs)
    grads = torch.autograd.grad(out, leaves, dout)
    flat = [x.reshape(-1, *x.shape[-2:]) for x in (q, k, v, dout)]
    expected, expected_grads = reference_and_grads(*flat, lengths_q, lengths_k, causal, 0.5)
    assert_close(out.reshape(expected.shape), expected, torch.float32, "out")
    for name, grad, expected_grad in zip(("dq", "dk", "dv"), grads, expected_grads):
        assert_close(grad.reshape(expected_grad.shape), expected_grad, torch.float32, name)


def _dense(batch=1, seqlen_q=4, seqlen_k=4, num_heads=2, num_kv_heads=1, head_dim=16, dtype=torch.float32):
    return (torch.zeros(batch, seqlen_q, num_heads, head_dim, dtype=dtype, device=DEVICE),
            torch.zeros(batch, seqlen_k, num_kv_heads, head_dim, dtype=dtype, device=DEVICE),
            torch.zeros(batch, seqlen_k, num_kv_heads, head_dim, dtype=dtype, device=DEVICE))


def _packed(total_q=6, total_k=6, head_dim=16):
    return (torch.zeros(total_q, 2, head_dim, device=DEVICE), torch.zeros(total_k, 1, head_dim, device=DEVICE),
            torch.zeros(total_k, 1, head_dim, device=DEVICE))


INVALID_CALLS = {
    "causal Tq > Tk": (lambda: _dense(seqlen_q=5, seqlen_k=4), {}, "Tq <= Tk"),
    "heads not a multiple": (lambda: _dense(num_heads=3, num_kv_heads=2), {}, "not a multiple"),
    "k/v shapes differ": (lambda: (*_dense()[:2], _dense(seqlen_k=5)[2]), {}, "v shape"),
    "dtypes differ": (lambda: (_dense()[0].half(), *_dense()[1:]), {}, "dtypes"),
    "integer inputs": (lambda: tuple(x.long() for x in _dense()), {}, "floating"),
    "batch differs": (lambda: (_dense(batch=2)[0], *_dense()[1:]), {}, "batch"),
    "dense rank": (lambda: _packed(), {}, r"\(B, T, H, D\)"),
    "only cu_seqlens_q": (lambda: _packed(), dict(cu_seqlens_q=cu_seqlens([6])), "together"),
    "int64 cu_seqlens": (lambda: _packed(), dict(cu_seqlens_q=cu_seqlens([6]).long(),
                                                 cu_seqlens_k=cu_seqlens([6]).long()), "int32"),
    "cu_seqlens counts differ": (lambda: _packed(), dict(cu_seqlens_q=cu_seqlens([6]),
                                                         cu_seqlens_k=cu_seqlens([3, 3])), "entries"),
    "cu_seqlens wrong total": (lambda: _packed(), dict(cu_seqlens_q=cu_seqlens([5]),
                                                       cu_seqlens_k=cu_seqlens([6])), "end at 6"),
    "cu_seqlens decreasing": (lambda: _packed(), dict(cu_seqlens_q=cu_seqlens([8, -2]),
                                                      cu_seqlens_k=cu_seqlens([3, 3])), "never decrease"),
    "varlen causal q > k": (lambda: _packed(), dict(cu_seqlens_q=cu_seqlens([4, 2]),
                                                    cu_seqlens_k=cu_seqlens([3, 3])), "sequence 0"),
    "negative softmax_scale": (lambda: _dense(), dict(softmax_scale=-0.5), "softmax_scale"),
}


@pytest.mark.parametrize("case", sorted(INVALID_CALLS))
@pytest.mark.parametrize("function", [flash_attention, attention_reference])
def test_invalid_inputs_raise_value_error(function, case):
    make_inputs, kwargs, message = INVALID_CALLS[case]
    with pytest.raises(ValueError, match=message):
        function(*make_inputs(), causal=True, **kwargs)


def test_kernel_only_limits_raise_value_error():
    # Head dim 24 and fp64 have no kernel: flash_attention refuses them while the reference computes them.
    for inputs in (_dense(head_dim=24), _dense(dtype=torch.float64)):
        with pytest.raises(ValueError, match="no kernel"):
            flash_attention(*inputs)
        assert torch.isfinite(attention_reference(*inputs)).all()
    q, k, v = _packed()
    meta = (cu_seqlens([6]), cu_seqlens([6]), 6, 6)
    with pytest.raises(ValueError, match="out buffer"):
        flash_attention_forward(q, k, v, *meta, causal=True, softmax_scale=0.25, out=torch.empty(6, 2, 8))

"""Tests for kernels/flash_attention_hopper.py: the sm_90 forward under TRITON_INTERPRET=1 (tensor descriptors run
there; fp16, since the interpreter's tl.dot misreads bf16) against the float64 attention of
test_flash_attention.py, and on an H100 (`pytest -m cuda`) in bf16/fp16 at real sizes against the reference and
the sm_80 kernel. What only the compiler shows (TMA copies, wgmma overlap) is in test_kernels_compile.py."""

import pytest
import torch

from kernels.flash_attention import LOG2_E, attention_reference, flash_attention, flash_attention_forward
from kernels.flash_attention_hopper import hopper_forward, uses_hopper_forward
from test_flash_attention import assert_close, cu_seqlens, naive_attention_float64, random_qkv

HOPPER = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter check; on a GPU the cuda tests below run")
@pytest.mark.parametrize("causal", [True, False])
def test_interpreted_forward_matches_float64(causal):
    # GQA (4 query heads on 2 kv heads), a sequence without queries, lengths off the 32x16 interpreter blocks so
    # that key tiles run into the next sequence's rows, and a max_seqlen hint below the longest sequence.
    generator = torch.Generator().manual_seed(7)
    lengths_q, lengths_k = ([37, 0, 5, 20], [45, 3, 5, 20]) if causal else ([37, 0, 5, 20], [45, 3, 0, 33])
    q, k, v, _ = random_qkv(generator, sum(lengths_q), sum(lengths_k), 4, 2, 32, torch.float16)
    out = torch.full_like(q, float("nan"))
    lse = torch.full((4, q.shape[0]), float("nan"))
    hopper_forward(q, k, v, out, lse, cu_seqlens(lengths_q), cu_seqlens(lengths_k), 20, causal=causal,
                   qk_scale=32 ** -0.5 * LOG2_E)
    assert_close(out, naive_attention_float64(q, k, v, lengths_q, lengths_k, causal, None), torch.float16, "out")
    # The lse the backward reads must equal the sm_80 kernel's (log2 units, +inf for rows without keys).
    _, expected_lse = flash_attention_forward(q.float(), k.float(), v.float(), cu_seqlens(lengths_q),
                                              cu_seqlens(lengths_k), 37, 45, causal=causal, softmax_scale=None)
    torch.testing.assert_close(lse, expected_lse, rtol=0, atol=2e-3)
    assert not uses_hopper_forward(q, k, v)  # on the CPU the launcher never picks it


def _gpu_case(dtype, head_dim, causal):
    generator = torch.Generator().manual_seed(head_dim)
    lengths_k = [1024, 777, 3000, 1]
    lengths_q = [1024, 500, 3000, 1] if causal else [900, 777, 64, 5]
    q, k, v, _ = random_qkv(generator, sum(lengths_q), sum(lengths_k), 16, 4, head_dim, dtype)
    return q, k, v, dict(causal=causal, cu_seqlens_q=cu_seqlens(lengths_q), cu_seqlens_k=cu_seqlens(lengths_k))


@pytest.mark.cuda
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_forward_matches_reference_and_the_sm80_kernel(dtype, head_dim, causal, monkeypatch):
    q, k, v, kwargs = _gpu_case(dtype, head_dim, causal)
    assert uses_hopper_forward(q, k, v)
    out = flash_attention(q, k, v, **kwargs)  # dispatches to hopper_forward
    expected = attention_reference(q.float(), k.float(), v.float(), **kwargs)
    tolerance = {torch.float16: 5e-3, torch.bfloat16: 3e-2}[dtype]
    assert torch.isfinite(out).all()
    assert (out.float() - expected).abs().max() <= tolerance * max(1.0, expected.abs().max().item())
    monkeypatch.setattr("kernels.flash_attention_hopper.uses_hopper_forward", lambda *args: False)
    sm80_out = flash_attention(q, k, v, **kwargs)
    assert (out.float() - sm80_out.float()).abs().max() <= tolerance


@pytest.mark.cuda
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_backward_through_the_hopper_forward_matches_reference():
    q, k, v, kwargs = _gpu_case(torch.bfloat16, 128, True)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    grads = torch.autograd.grad(flash_attention(*leaves, **kwargs), leaves, torch.ones_like(q))
    reference_leaves = [x.float().requires_grad_() for x in (q, k, v)]
    expected = torch.autograd.grad(attention_reference(*reference_leaves, **kwargs), reference_leaves,
                                   torch.ones_like(q, dtype=torch.float32))
    for grad, expected_grad in zip(grads, expected):
        assert (grad.float() - expected_grad).abs().max() <= 5e-2 * max(1.0, expected_grad.abs().max().item())


@pytest.mark.cuda
@pytest.mark.skipif(not HOPPER, reason="needs an sm_90 GPU")
def test_gpu_inputs_tma_cannot_take_stay_on_the_sm80_kernel():
    q, k, v, _ = _gpu_case(torch.bfloat16, 64, True)
    assert not uses_hopper_forward(q.float(), k.float(), v.float())  # fp32
    heads_apart = torch.zeros(q.shape[0], q.shape[1], 2 * q.shape[2], dtype=q.dtype, device=q.device)[..., :64]
    assert not uses_hopper_forward(heads_apart, k, v)  # heads not adjacent within a token row
    assert not uses_hopper_forward(q, k[:0], v[:0])  # no keys: no descriptor can describe them

"""Tests for kernels/int4_matmul.py: nibble packing, dequantization against a per-element float64 formula, and the
W4A16 Triton kernel (the interpreter on CPU) against a float64 product of the same dequantized weights, on odd K,
several groups, partial tiles and a bias."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import int4_matmul as int4_module
from kernels.int4_matmul import dequantize_int4, int4_matmul, int4_matmul_reference, pack_int4, unpack_int4

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
CAN_RUN_KERNEL = int4_module.INTERPRET or torch.cuda.is_available()
pytestmark = pytest.mark.usefixtures("one_thread")


def random_weight(generator, N, K, group_size, scale_dtype=torch.float32):
    """Random codes, scales and zero points in the stored layout: K padded up to whole groups."""
    groups = -(-K // group_size)
    codes = torch.randint(0, 16, (N, groups * group_size), generator=generator)
    scale = (torch.rand(N, groups, generator=generator) * 0.2 + 0.01).to(scale_dtype)
    zero = torch.randint(0, 16, (N, groups), generator=generator).to(torch.uint8)
    return codes, pack_int4(codes), scale, zero


@settings(max_examples=30, deadline=None, derandomize=True)
@given(rows=st.integers(1, 5), half_k=st.integers(1, 40), seed=st.integers(0, 2**16))
def test_pack_unpack_round_trips_exactly(rows, half_k, seed):
    codes = torch.randint(0, 16, (rows, 2 * half_k), generator=torch.Generator().manual_seed(seed))
    packed = pack_int4(codes)
    assert packed.dtype == torch.uint8 and packed.shape == (rows, half_k)
    assert torch.equal(unpack_int4(packed).long(), codes)
    # Column 2j is the low nibble, 2j + 1 the high one: the layout the kernel reads.
    assert torch.equal(packed.long(), codes[:, 0::2] + 16 * codes[:, 1::2])
    with pytest.raises(ValueError, match="even"):
        pack_int4(codes[:, :-1])


def test_dequantize_follows_the_per_element_formula():
    generator = torch.Generator().manual_seed(0)
    codes, packed, scale, zero = random_weight(generator, 3, 96, 32)
    expected = torch.empty(3, 96, dtype=torch.float64)
    for n in range(3):
        for k in range(96):
            expected[n, k] = (codes[n, k].item() - zero[n, k // 32].item()) * scale[n, k // 32].double().item()
    assert torch.allclose(dequantize_int4(packed, scale, zero).double(), expected, rtol=1e-6, atol=0)


@pytest.mark.skipif(not CAN_RUN_KERNEL, reason="the Triton kernel needs CUDA or TRITON_INTERPRET=1")
@settings(max_examples=12, deadline=None, derandomize=True)
@given(M=st.integers(1, 20), N=st.integers(1, 40), K=st.integers(1, 140), group_size=st.sampled_from([32, 64]),
       dtype=st.sampled_from([torch.float16, torch.bfloat16]), bias=st.booleans(), split_k=st.sampled_from([1, 3]),
       seed=st.integers(0, 2**16))
def test_kernel_matches_float64_product_on_odd_shapes(M, N, K, group_size, dtype, bias, split_k, seed):
    # The interpreter's tiles are 16 x 16 with 32-wide K steps: these shapes leave partial M, N and K tiles, an
    # odd K (a half-used last byte) and several groups, with several K steps per group at G = 64; split K, some
    # programs get an empty K range.
    generator = torch.Generator().manual_seed(seed)
    _, packed, scale, zero = random_weight(generator, N, K, group_size, scale_dtype=dtype)
    x = torch.randn(M, K, generator=generator).to(dtype)
    b = torch.randn(N, generator=generator).to(dtype) if bias else None
    out = int4_matmul(*(t.to(DEVICE) for t in (x, packed, scale, zero)), bias=None if b is None else b.to(DEVICE),
                      split_k=split_k)
    assert out.shape == (M, N) and out.dtype == dtype
    weight = dequantize_int4(packed, scale, zero).double()[:, :K]
    expected = x.double() @ weight.T + (0 if b is None else b.double())
    # Rounding of the dequantized weight to the activation dtype (at most half an ulp of |x| |w| summed over K)
    # and of the output; the interpreter's bf16 conversion truncates (one ulp).
    ulp = {torch.float16: 2**-10, torch.bfloat16: 2**-7}[dtype]
    bound = ulp * ((x.double().abs() @ weight.abs().T) + expected.abs()) + 1e-6
    assert ((out.cpu().double() - expected).abs() <= bound).all()
    reference = int4_matmul_reference(x, packed, scale, zero, bias=b)
    assert ((reference.double() - expected).abs() <= bound).all()


def test_fp32_activations_and_empty_shapes_take_the_reference():
    generator = torch.Generator().manual_seed(1)
    _, packed, scale, zero = random_weight(generator, 8, 40, 32)
    x = torch.randn(3, 40, generator=generator)
    weight = dequantize_int4(packed, scale, zero)[:, :40]
    torch.testing.assert_close(int4_matmul(x, packed, scale, zero), x @ weight.T, rtol=1e-5, atol=1e-5)
    assert int4_matmul(x[:0], packed, scale, zero).shape == (0, 8)


def test_bad_inputs_are_refused_with_the_shapes():
    generator = torch.Generator().manual_seed(2)
    _, packed, scale, zero = random_weight(generator, 8, 64, 32)
    x = torch.randn(2, 64, generator=generator)
    with pytest.raises(ValueError, match="K rounded up"):
        int4_matmul(torch.randn(2, 20), packed, scale, zero)  # 20 columns cannot need 64 stored ones
    with pytest.raises(ValueError, match="power of two"):
        int4_matmul(x[:, :48], packed[:, :24], scale[:, :1], zero[:, :1])  # a group of 48
    with pytest.raises(ValueError, match="uint8"):
        int4_matmul(x, packed.to(torch.int8), scale, zero)
    with pytest.raises(ValueError, match="bias"):
        int4_matmul(x, packed, scale, zero, bias=torch.zeros(7))

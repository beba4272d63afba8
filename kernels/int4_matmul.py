"""W4A16 in Triton: 4-bit group-wise weights, fp16/bf16/fp32 activations, dequantized in registers.

Format. A weight W (N, K) in the nn.Linear layout is cut along K into groups of G consecutive input channels
(G a power of two >= 32). Each group of each output row has its own scale s and integer zero point z in 0..15,
and its values are stored as 4-bit codes q in 0..15 with w ~ (q - z) * s (asymmetric: the grid covers the
group's [min, max], which need not be centred on zero). Two codes share a byte: column 2j in the low nibble,
column 2j + 1 in the high one, so `packed` is (N, Kp / 2) uint8, with scales (N, Kp / G) and zeros (N, Kp / G)
uint8. Kp is K rounded up to a multiple of G: a width that is not a multiple of the group size is padded with
zero columns, and since every group's range includes 0 (see nanostack/quant4.py) those dequantize to exactly 0.
The matmuls below also mask x beyond K, so the padding is never read as data either way.

Kernel. Decoding is bound by reading the weights, and a 4-bit weight is a quarter of a bf16 one. Each program
computes one (BLOCK_M, BLOCK_N) output tile and walks K in BLOCK_K steps, BLOCK_K dividing G so one step sees
one scale and zero per column. A step loads (BLOCK_K / 2, BLOCK_N) bytes, splits each into its low and high
nibble with a mask and a shift, subtracts the zero point and multiplies by the scale in fp32, all in
registers, and runs two tensor-core dots: x's even columns with the low nibbles and x's odd columns with the
high ones (no interleaving shuffle). A full-precision copy of W never exists in memory. The scale cannot be
pulled out of the sum over K as in the int8 kernels, since it changes every G columns.

Split-K. At decode sizes there are too few output tiles to keep every SM streaming weights (N = 1024 in
32-wide tiles is 32 programs for an H100's 132 SMs), and a single program per SM has too few bytes in flight
to approach the memory bandwidth. So small M splits the K range over SPLIT_K programs per tile (`_split_k`:
about four programs per SM, each at least four K steps long); each writes an fp32 partial tile, and one more
small kernel sums them in a fixed order (so results do not depend on scheduling), adds the bias and casts.

`int4_matmul_reference` is the same computation in plain torch (dequantize, then one matmul in fp32): the CPU
path, and what the kernel is tested against.
"""
import functools

import torch
import triton
import triton.language as tl

from kernels.int8_matmul import ACTIVATION_DTYPES, INTERPRET, _m_bucket, _tile_offsets, dot_dtype_and_precision

KERNEL_DTYPES = (torch.float16, torch.bfloat16)
SUM_BLOCK = 1024  # outputs per program of the split-K sum
MIN_GROUP_SIZE = 32  # two dots of BLOCK_K / 2 each need BLOCK_K / 2 >= 16, the smallest tl.dot
# Under the interpreter 32-wide steps give the tests' small shapes several steps per group.
MAX_BLOCK_K = 32 if INTERPRET else 64

# GPU candidates as (BLOCK_M, BLOCK_N, GROUP_M, num_warps, num_stages); BLOCK_K is min(G, MAX_BLOCK_K), set by
# the launcher. Decode (M = 1..16) reads a quarter of the bf16 bytes per weight, so more bytes must be in flight
# per SM to reach bandwidth: narrow BLOCK_N tiles (N / 32 programs fill the SMs at N >= 4096) and 4-5 stages.
# The larger tiles are for prefill, where each dequantized tile is reused over more rows.
_GPU_CONFIGS = [(16, 32, 1, 4, 4), (16, 64, 1, 4, 4), (16, 32, 1, 2, 5), (16, 128, 1, 4, 3), (64, 64, 8, 8, 3),
                (64, 128, 8, 8, 3), (128, 64, 8, 8, 3)]
_W4A16_CONFIGS = ([triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "GROUP_M": 2})] if INTERPRET else
                  [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "GROUP_M": group}, num_warps=warps, num_stages=stages)
                   for m, n, group, warps, stages in _GPU_CONFIGS])


@triton.autotune(configs=_W4A16_CONFIGS, key=["M_BUCKET", "N", "K", "GROUP_SIZE", "BLOCK_K", "SPLIT_K", "HAS_BIAS"])
@triton.jit
def _w4a16_matmul_kernel(X, W, Scale, Zero, Bias, C, M, N, K, M_BUCKET, SPLIT_K,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sg, stride_ck, stride_cm,
                         stride_cn, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """C[split] = X[:, K range of split] @ dequantize(W)[:, K range]^T (+ bias), W read as packed 4-bit codes and
    dequantized per K step; with SPLIT_K = 1 the range is all of K and C is the output."""
    rows, cols, rows_in, cols_in = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    split_len = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K  # whole K steps, so whole groups' steps
    k_begin = split * split_len
    offs_byte = tl.arange(0, BLOCK_K // 2)
    # x's even columns (BLOCK_M, BLOCK_K / 2) and W's bytes transposed (BLOCK_K / 2, BLOCK_N), from k_begin on.
    x_ptrs = X + rows_in[:, None] * stride_xm + (k_begin + 2 * offs_byte)[None, :] * stride_xk
    w_ptrs = W + (k_begin // 2 + offs_byte)[:, None] * stride_wk + cols_in[None, :] * stride_wn
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(k_begin, tl.minimum(K, k_begin + split_len), BLOCK_K):
        even = 2 * offs_byte
        x_even = tl.load(x_ptrs, mask=(even < K - k_start)[None, :], other=0.0)
        x_odd = tl.load(x_ptrs + stride_xk, mask=(even + 1 < K - k_start)[None, :], other=0.0)
        packed = tl.load(w_ptrs)  # no mask: the stored width Kp is a multiple of G, so a step never leaves it
        group = k_start // GROUP_SIZE
        scale = tl.load(Scale + cols_in * stride_sn + group * stride_sg).to(DOT_DTYPE)[None, :]
        zero = tl.load(Zero + cols_in * stride_sn + group * stride_sg).to(DOT_DTYPE)[None, :]
        low = ((packed & 0xF).to(DOT_DTYPE) - zero) * scale  # (BLOCK_K / 2, BLOCK_N): rows k = 2j
        high = ((packed >> 4).to(DOT_DTYPE) - zero) * scale  # rows k = 2j + 1
        acc = tl.dot(x_even.to(DOT_DTYPE), low, acc, input_precision=DOT_PRECISION)
        acc = tl.dot(x_odd.to(DOT_DTYPE), high, acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += (BLOCK_K // 2) * stride_wk
    if HAS_BIAS:
        acc += tl.load(Bias + cols_in).to(tl.float32)[None, :]
    store_mask = (rows[:, None] < M) & (cols[None, :] < N)
    c_ptrs = C + split * stride_ck + rows[:, None] * stride_cm + cols[None, :] * stride_cn
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=store_mask)


@triton.jit
def _sum_splits_kernel(P, Bias, C, N, SPLIT_K, TOTAL, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr):
    """C (M, N) = the sum over splits of the fp32 partials P (SPLIT_K, M, N), in split order (+ bias), in C's dtype."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # flat indices m * N + n
    mask = offs < TOTAL
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for split in range(SPLIT_K):
        acc += tl.load(P + split * TOTAL + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(Bias + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(C + offs, acc.to(C.dtype.element_ty), mask=mask)


@functools.lru_cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _split_k(M: int, N: int, K: int, block_k: int, device: torch.device) -> int:
    """K splits for a (M, N, K) product: doubled while there are fewer than ~4 programs per SM (at 16 x 32 tiles)
    and each split keeps at least 4 K steps; 1 for large M, which has output tiles enough."""
    if INTERPRET or M > 64:
        return 1
    tiles, steps, split = triton.cdiv(M, 16) * triton.cdiv(N, 32), triton.cdiv(K, block_k), 1
    while tiles * split < 4 * _sm_count(device.index or 0) and steps // (2 * split) >= 4:
        split *= 2
    return split


def int4_matmul(x, packed, scale, zero, *, bias=None, split_k: int | None = None):
    """W4A16: x (M, K) fp16/bf16 @ dequantize(packed, scale, zero)[:, :K].T (+ bias) -> (M, N) in x.dtype (fp32 x
    runs the reference). split_k: programs per output tile along K; None picks it from the shape and the GPU."""
    group_size = _check_inputs(x, packed, scale, zero, bias)
    (M, K), N = x.shape, packed.shape[0]
    # fp32 activations have no tensor-core dot (an fp32 FMA tile spills registers): the reference serves them,
    # and empty products.
    if x.dtype not in KERNEL_DTYPES or not (x.is_cuda or INTERPRET) or 0 in (M, N, K):
        return int4_matmul_reference(x, packed, scale, zero, bias=bias)
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    dot_dtype, dot_precision = dot_dtype_and_precision(x.dtype)
    block_k = min(group_size, MAX_BLOCK_K)
    split_k = split_k or _split_k(M, N, K, block_k, x.device)
    # Split, every program writes an fp32 partial tile: (split_k, M, N), summed below.
    target = out if split_k == 1 else torch.empty(split_k, M, N, dtype=torch.float32, device=x.device)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)  # noqa: E731
    _w4a16_matmul_kernel[grid](x, packed, scale, zero, out if bias is None else bias, target, M, N, K, _m_bucket(M),
                               split_k, x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), scale.stride(0),
                               scale.stride(1), target.stride(0) if split_k > 1 else 0, target.stride(-2),
                               target.stride(-1), GROUP_SIZE=group_size, BLOCK_K=block_k,
                               HAS_BIAS=bias is not None and split_k == 1, DOT_DTYPE=dot_dtype,
                               DOT_PRECISION=dot_precision)
    if split_k > 1:
        _sum_splits_kernel[(triton.cdiv(M * N, SUM_BLOCK),)](target, out if bias is None else bias, out, N, split_k,
                                                             M * N, HAS_BIAS=bias is not None, BLOCK=SUM_BLOCK)
    return out


def int4_matmul_reference(x, packed, scale, zero, *, bias=None):
    """int4_matmul in plain torch (the CPU path): the dequantized weight in fp32, one matmul."""
    _check_inputs(x, packed, scale, zero, bias)
    weight = dequantize_int4(packed, scale, zero)[:, :x.shape[1]]  # (N, K): the padding dropped
    out = torch.nn.functional.linear(x.float(), weight)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (..., K) of any integer dtype, K even -> bytes (..., K / 2): column 2j low nibble, 2j + 1 high."""
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got {tuple(codes.shape)}")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Bytes (..., K / 2) -> codes 0..15 (..., K) as uint8: the inverse of pack_int4."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2)


def dequantize_int4(packed, scale, zero) -> torch.Tensor:
    """The fp32 (N, Kp) weight that packed codes stand for: (q - z) * s, one s and z per group of Kp / groups."""
    codes = unpack_int4(packed).float()  # (N, Kp)
    group_size = codes.shape[-1] // scale.shape[-1]
    offsets = codes - zero.float().repeat_interleave(group_size, dim=-1)
    return offsets * scale.float().repeat_interleave(group_size, dim=-1)


def _check_inputs(x, packed, scale, zero, bias) -> int:
    """Validate int4_matmul's arguments; returns the group size."""
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor of one of {ACTIVATION_DTYPES}, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(packed, torch.Tensor) or packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be a 2-D uint8 (N, Kp / 2) tensor, got {getattr(packed, 'dtype', packed)!r}")
    N, stored_k = packed.shape[0], 2 * packed.shape[1]
    groups = scale.shape[-1] if scale.dim() == 2 else 0
    if scale.shape != (N, groups) or zero.shape != (N, groups) or not groups or stored_k % groups:
        raise ValueError(f"scale and zero must be (N={N}, groups) with groups dividing Kp={stored_k}, got "
                         f"{tuple(scale.shape)} and {tuple(zero.shape)}")
    group_size = stored_k // groups
    if group_size < MIN_GROUP_SIZE or group_size & (group_size - 1):
        raise ValueError(f"group size {group_size} (Kp={stored_k} / {groups} groups) must be a power of two "
                         f">= {MIN_GROUP_SIZE}")
    if not scale.is_floating_point() or zero.dtype != torch.uint8:
        raise ValueError(f"scale must be floating and zero uint8, got {scale.dtype} and {zero.dtype}")
    if not x.shape[1] <= stored_k < x.shape[1] + group_size:
        raise ValueError(f"x is (M, K={x.shape[1]}) but the weight stores Kp={stored_k} columns: need K rounded up "
                         f"to a multiple of the group size {group_size}")
    if any(t.device != x.device for t in (packed, scale, zero)):
        raise ValueError(f"x, packed, scale and zero must share one device, x is on {x.device}")
    if bias is not None and (bias.shape != (N,) or bias.device != x.device or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating ({N},) tensor on {x.device}, got {bias!r:.80}")
    return group_size

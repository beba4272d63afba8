"""INT8 matmuls in Triton: W8A8 (int8 x int8 -> int32, rescaled in the epilogue) and W8A16 (int8 weights only).

Symmetric per-row quantisation. A row r of a float matrix is stored as int8 values q_r and one float scale
s_r = max|x_r| / 127, with q_r = round(x_r / s_r), so x_r ~ q_r * s_r and the rounding error is at most
s_r / 2 per element. Activations get one scale per token (row of a), weights one per output channel (row of
the (N, K) weight, the nn.Linear layout). A zero row gets scale 0 and stores zeros.

W8A8: both operands int8. Because the scales belong to rows of a and rows of b, they factor out of the dot
product: sum_k (qa_mk sa_m)(qb_nk sb_n) = sa_m sb_n * sum_k qa_mk qb_nk. The inner sum is an exact int32 dot
product, which the tensor cores run at twice the bf16 rate, and the two scales are applied once per output
element in the epilogue (the code after the K loop, while the tile is still in registers). Without scales the
kernel returns the exact int32 product. int32 cannot overflow for K <= (2^31 - 1) / 128^2 = 131071.

W8A16: weights int8, activations stay fp16/bf16/fp32. For decoding (a handful of tokens per step) a matmul is
bound by reading the weights, so halving their bytes nearly halves the time. The kernel loads int8 weight
tiles, converts them to the activation dtype in registers (every int8 value is exact in fp16 and bf16), and
accumulates in fp32; the per-channel scale factors out of the sum over K just as above, so it is applied once
in the epilogue. A full-precision copy of W never exists in memory.

Tiling. Each program computes one (BLOCK_M, BLOCK_N) output tile, looping over K in BLOCK_K steps. Rows past
M and columns past N are wrapped with a modulo rather than masked: the loads stay in bounds, the extra rows
are computed and then dropped by the masked store. Only the K tail needs a load mask (zeros add nothing).
Programs are ordered in groups of GROUP_M row-tiles so that consecutive programs share columns of b and the
tiles they read stay in L2 ("grouped ordering", as in Triton's matmul tutorial).
"""

import os

import torch
import triton
import triton.language as tl

# The interpreter runs kernels on CPU with numpy; it must be chosen before kernels are defined (tests/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_K = (2**31 - 1) // (128 * 128)  # beyond this an all -128 row pair could overflow the int32 accumulator
SCALED_OUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ACTIVATION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_TRITON_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def _configs(gpu_configs):
    """Autotune candidates on GPU; one fixed small config under the interpreter, where timing means nothing."""
    if INTERPRET:
        # Tiny tiles so that the tests' shapes of a few dozen span several tiles and K steps, with tails.
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 32, "GROUP_M": 2})]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": group}, num_warps=warps,
                          num_stages=stages)
            for m, n, k, group, warps, stages in gpu_configs]


# GPU candidates as (BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages).
# Large M (prefill, training-size batches) is compute-bound: big 128x256 / 256x128 tiles maximise reuse of each
# loaded byte, and int8 takes BLOCK_K = 128 (128 bytes per row, the same as fp16 at 64) for full-width loads.
# Small M (decode, M = 1..16) is bound by reading b: a 16-row tile wastes little, narrow BLOCK_N tiles give
# N / BLOCK_N >= 128 programs at N = 4096 so every SM streams weights, and long BLOCK_K with 4-5 stages keeps
# enough bytes in flight. Split-K would add programs for small N too, but LLM projections have N >= 4096, so
# narrow tiles already fill an H100's 132 SMs without the cost of a second reduction pass.
# The tiles over 64 accumulator registers per thread are for sm_90 only (configs_for_arch); 128x128 at 8 warps
# is sm_80's large tile.
_INT8_CONFIGS = _configs([(128, 256, 128, 8, 8, 3), (256, 128, 128, 8, 8, 3), (128, 128, 128, 8, 4, 4),
                          (128, 128, 128, 8, 8, 3), (128, 64, 128, 8, 4, 4), (64, 128, 128, 8, 4, 4),
                          (64, 64, 256, 8, 4, 3), (32, 64, 256, 8, 4, 4), (16, 64, 256, 1, 4, 4),
                          (16, 32, 256, 1, 4, 5), (16, 128, 128, 1, 4, 4)])
# W8A16 multiplies in fp16/bf16 (BLOCK_K = 64 is 128 bytes of activations per row); its weight tiles are int8.
_W8A16_CONFIGS = _configs([(128, 256, 64, 8, 8, 3), (128, 128, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3),
                           (64, 128, 64, 8, 4, 4), (64, 64, 128, 8, 4, 3), (32, 64, 128, 8, 4, 4),
                           (16, 64, 128, 1, 4, 4), (16, 32, 256, 1, 4, 5), (16, 128, 128, 1, 4, 4)])
# fp32 activations (three tf32 passes per product, see dot_dtype_and_precision) hold 4-byte tiles and the split
# halves of each operand: shorter K steps. In full-fp32 FMA ("ieee"), every tile down to 16x32 spilled registers.
_W8A16_FP32_CONFIGS = _configs([(128, 128, 32, 8, 8, 3), (64, 64, 32, 8, 4, 3), (16, 64, 64, 1, 4, 3),
                                (16, 64, 128, 1, 4, 4)])
_FP32_ONLY = {id(config) for config in _W8A16_FP32_CONFIGS}


def configs_for_arch(configs: list, capability: int, dtype: torch.dtype = torch.bfloat16) -> list:
    """The autotune candidates kept on a GPU of compute capability `capability` (80, 90) for `dtype` inputs.

    sm_80's mma.sync holds operand fragments in registers beside the accumulator, so tiles over 64 accumulator
    registers per thread (BLOCK_M x BLOCK_N / threads), which sm_90's wgmma (operands in shared memory) handles,
    spill there (ptxas). fp32 activations take their own list."""
    fp32 = dtype == torch.float32 and any(id(config) in _FP32_ONLY for config in configs)
    kept = [config for config in configs if (id(config) in _FP32_ONLY) == fp32]
    if capability < 90 and not INTERPRET:
        kept = [config for config in kept
                if config.kwargs["BLOCK_M"] * config.kwargs["BLOCK_N"] <= 64 * 32 * config.num_warps]
    return kept


def _prune_for_this_gpu(configs, named_args, **kwargs):
    """early_config_prune: configs_for_arch for the GPU and dtype of the first argument (A or X)."""
    first = next(iter(named_args.values()))
    major, minor = torch.cuda.get_device_capability(first.device) if first.is_cuda else (9, 0)
    return configs_for_arch(configs, 10 * major + minor, first.dtype)


_PRUNE = {"early_config_prune": _prune_for_this_gpu}


@triton.jit
def _tile_offsets(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's row and column indices, in grouped order, wrapped into range (see module docstring).

    All int64: row x stride products pass 2^31 once M x N or M x K does (an int8 LM head with a 128k vocabulary
    writes a (M, 131072) output, so from M = 16384 tokens on)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    programs_per_group = GROUP_M * tiles_n
    first_m = (pid // programs_per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)  # the last group may be short
    tile_m = first_m + (pid % programs_per_group) % group_rows
    tile_n = (pid % programs_per_group) // group_rows
    rows = tile_m.to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tile_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    return rows, cols, rows % M, cols % N


# The autotune key, decided: N and K are fixed per projection, and M enters only as a bucket (only the autotuner
# reads M_BUCKET), so a model tunes once per projection shape and bucket, not at every new batch size. Serving
# meets new buckets as its batch grows; decode's many sizes up to 16 rows share one (see _m_bucket).
@triton.autotune(configs=_INT8_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_SCALES"], prune_configs_by=_PRUNE)
@triton.jit
def _int8_matmul_kernel(A, B, C, AScale, BScale, M, N, K, M_BUCKET,
                        stride_am, stride_ak, stride_bn, stride_bk, stride_cm, stride_cn,
                        HAS_SCALES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = A @ B^T with int32 accumulation; with scales C = acc * a_scale[:, None] * b_scale[None, :]."""
    rows, cols, rows_in, cols_in = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows_in[:, None] * stride_am + offs_k[None, :] * stride_ak  # (BLOCK_M, BLOCK_K)
    b_ptrs = B + offs_k[:, None] * stride_bk + cols_in[None, :] * stride_bn  # (BLOCK_K, BLOCK_N): b transposed
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k_start
        a = tl.load(a_ptrs, mask=k_ok[None, :], other=0)
        b = tl.load(b_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)  # named: Triton before 3.9 defaults to float32 and refuses
        a_ptrs += BLOCK_K * stride_ak
        b_ptrs += BLOCK_K * stride_bk
    if HAS_SCALES:
        a_scale = tl.load(AScale + rows_in)
        b_scale = tl.load(BScale + cols_in)
        result = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    else:
        result = acc
    store_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, result.to(C.dtype.element_ty),
             mask=store_mask)


@triton.autotune(configs=_W8A16_CONFIGS + _W8A16_FP32_CONFIGS, key=["M_BUCKET", "N", "K", "HAS_BIAS"],
                 prune_configs_by=_PRUNE)
@triton.jit
def _w8a16_matmul_kernel(X, W, WScale, Bias, C, M, N, K, M_BUCKET,
                         stride_xm, stride_xk, stride_wn, stride_wk, stride_cm, stride_cn, stride_bias,
                         HAS_BIAS: tl.constexpr, DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C = (X @ W^T) * w_scale[None, :] (+ bias), with W read as int8 and widened in registers."""
    rows, cols, rows_in, cols_in = _tile_offsets(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = X + rows_in[:, None] * stride_xm + offs_k[None, :] * stride_xk  # (BLOCK_M, BLOCK_K)
    w_ptrs = W + offs_k[:, None] * stride_wk + cols_in[None, :] * stride_wn  # (BLOCK_K, BLOCK_N): W transposed
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k_start
        x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None], other=0)
        acc = tl.dot(x.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=DOT_PRECISION)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk
    result = acc * tl.load(WScale + cols_in)[None, :]
    if HAS_BIAS:
        result += tl.load(Bias + cols_in * stride_bias).to(tl.float32)[None, :]
    store_mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(C + rows[:, None] * stride_cm + cols[None, :] * stride_cn, result.to(C.dtype.element_ty),
             mask=store_mask)


def dot_dtype_and_precision(dtype: torch.dtype):
    """The dtype tiles are multiplied in, and tl.dot's input_precision, for activations of `dtype`.

    fp32 multiplies in three tf32 passes ("tf32x3": each operand split into a tf32 head and tail, products
    accurate to about 2^-21) rather than Triton's default single tf32 pass (10-bit mantissa): fp32 results match
    the reference to a few fp32 ulps while staying on the tensor cores; full-fp32 FMA dots ("ieee") spill
    registers on every useful tile (tests/test_kernels_compile.py). The interpreter computes in numpy fp32
    ("ieee"), and its tl.dot reads bf16 as raw integer bits, so there bf16 tiles are widened to fp32 first.
    """
    if INTERPRET and dtype in (torch.float32, torch.bfloat16):
        return tl.float32, "ieee"
    if dtype == torch.float32:
        return tl.float32, "tf32x3"
    return _TRITON_DTYPES[dtype], "tf32"


def _m_bucket(m: int) -> int:
    """Power-of-two bucket of M for the autotune key; every M up to 16 fits one 16-row tile, so they share one."""
    return max(16, 1 << max(m - 1, 0).bit_length())


def int8_matmul(a, b, a_scale=None, b_scale=None, *, out_dtype=torch.int32):
    """a (M, K) int8 @ b (N, K) int8 transposed. Without scales: the exact int32 product. With a_scale (M,)
    per token and b_scale (N,) per channel: acc * a_scale[:, None] * b_scale[None, :] in a float out_dtype."""
    a_scale, b_scale = _check_int8_inputs(a, b, a_scale, b_scale, out_dtype)
    if not (a.is_cuda or INTERPRET):
        return int8_matmul_reference(a, b, a_scale, b_scale, out_dtype=out_dtype)
    (M, K), N = a.shape, b.shape[0]
    out = torch.empty(M, N, dtype=out_dtype, device=a.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    has_scales = a_scale is not None
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _int8_matmul_kernel[grid](a, b, out, a_scale if has_scales else out, b_scale if has_scales else out,
                              M, N, K, _m_bucket(M), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                              out.stride(0), out.stride(1), HAS_SCALES=has_scales)
    return out


def int8_matmul_reference(a, b, a_scale=None, b_scale=None, *, out_dtype=torch.int32):
    """int8_matmul in plain torch (the CPU path): torch._int_mm where it applies, the rescale in fp32."""
    a_scale, b_scale = _check_int8_inputs(a, b, a_scale, b_scale, out_dtype)
    (M, K), N = a.shape, b.shape[0]
    # CPU _int_mm takes any shape; cuBLAS's int8 path needs M > 16 and K, N multiples of 8.
    if not a.is_cuda or (M > 16 and K % 8 == 0 and N % 8 == 0):
        acc = torch._int_mm(a, b.t())  # (M, N) int32
    else:
        # Exact: every partial sum is an integer below 2^31, far inside float64's 2^53 of exact integers.
        acc = (a.double() @ b.double().t()).to(torch.int32)
    if a_scale is None:
        return acc
    return (acc.float() * a_scale[:, None] * b_scale[None, :]).to(out_dtype)


def int8_weight_only_matmul(x, w_int8, w_scale, *, bias=None):
    """W8A16: x (M, K) fp16/bf16/fp32 @ (w_int8 (N, K) * w_scale[:, None]).T (+ bias) in x.dtype, W widened
    in registers."""
    w_scale, bias = _check_weight_only_inputs(x, w_int8, w_scale, bias)
    if not (x.is_cuda or INTERPRET):
        return int8_weight_only_matmul_reference(x, w_int8, w_scale, bias=bias)
    (M, K), N = x.shape, w_int8.shape[0]
    out = torch.empty(M, N, dtype=x.dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:
        return out.copy_(torch.zeros_like(out) if bias is None else bias.expand(M, N))
    dot_dtype, dot_precision = dot_dtype_and_precision(x.dtype)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)  # noqa: E731
    _w8a16_matmul_kernel[grid](x, w_int8, w_scale, out if bias is None else bias, out, M, N, K, _m_bucket(M),
                               x.stride(0), x.stride(1), w_int8.stride(0), w_int8.stride(1),
                               out.stride(0), out.stride(1), 0 if bias is None else bias.stride(0),
                               HAS_BIAS=bias is not None, DOT_DTYPE=dot_dtype,
                               DOT_PRECISION=dot_precision)
    return out


def int8_weight_only_matmul_reference(x, w_int8, w_scale, *, bias=None):
    """int8_weight_only_matmul in plain torch (the CPU path): fp32 math, the scale applied after the product."""
    w_scale, bias = _check_weight_only_inputs(x, w_int8, w_scale, bias)
    out = torch.nn.functional.linear(x.float(), w_int8.float()) * w_scale  # (M, N)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def quantize_per_row(x):
    """Symmetric int8 per row of the last dim: returns (q int8 like x, scale fp32 x.shape[:-1]), scale = amax/127."""
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 1:
        raise ValueError(f"quantize_per_row needs a floating tensor with at least one dim, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    x32 = x.float()
    scale = x32.abs().amax(dim=-1) / 127.0 if x.shape[-1] else x32.new_zeros(x.shape[:-1])
    # A zero row keeps scale 0 (it dequantises to exact zeros); dividing it by 1 instead avoids 0 / 0.
    divisor = torch.where(scale > 0, scale, 1.0)
    q = torch.round(x32 / divisor[..., None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def _check_int8_inputs(a, b, a_scale, b_scale, out_dtype):
    """Validate int8_matmul arguments; returns the scales as contiguous fp32 (M,) and (N,) tensors, or Nones."""
    for name, x in (("a", a), ("b", b)):
        if not isinstance(x, torch.Tensor) or x.dtype != torch.int8 or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D int8 tensor, got {getattr(x, 'dtype', type(x).__name__)} "
                             f"{tuple(getattr(x, 'shape', ()))}")
    if a.device != b.device:
        raise ValueError(f"a is on {a.device}, b on {b.device}: need one device")
    (M, K), (N, K_b) = a.shape, b.shape
    if K != K_b:
        raise ValueError(f"a is (M={M}, K={K}) but b is (N={N}, K={K_b}): b must be (N, K), the nn.Linear layout")
    if K > MAX_K:
        raise ValueError(f"K={K} could overflow the int32 accumulator; need K <= {MAX_K}")
    if (a_scale is None) != (b_scale is None):
        raise ValueError("pass a_scale and b_scale together (W8A8 with rescale) or neither (exact int32 product)")
    if a_scale is None:
        if out_dtype != torch.int32:
            raise ValueError(f"out_dtype={out_dtype}: without scales the product is exact int32; pass "
                             "out_dtype=torch.int32 or give a_scale and b_scale")
        return None, None
    if out_dtype not in SCALED_OUT_DTYPES:
        raise ValueError(f"out_dtype={out_dtype}: a rescaled product needs one of {SCALED_OUT_DTYPES}")
    a_scale = _check_scale("a_scale", a_scale, M, a.device, allow_column=True)
    return a_scale, _check_scale("b_scale", b_scale, N, a.device, allow_column=False)


def _check_weight_only_inputs(x, w_int8, w_scale, bias):
    """Validate int8_weight_only_matmul arguments; returns w_scale as contiguous fp32 (N,) and the bias."""
    if not isinstance(x, torch.Tensor) or x.dtype not in ACTIVATION_DTYPES or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor of one of {ACTIVATION_DTYPES}, got "
                         f"{getattr(x, 'dtype', type(x).__name__)} {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(w_int8, torch.Tensor) or w_int8.dtype != torch.int8 or w_int8.dim() != 2:
        raise ValueError(f"w_int8 must be a 2-D int8 (N, K) tensor, got {getattr(w_int8, 'dtype', w_int8)!r}")
    if w_int8.device != x.device:
        raise ValueError(f"x is on {x.device}, w_int8 on {w_int8.device}: need one device")
    if w_int8.shape[1] != x.shape[1]:
        raise ValueError(f"x is (M, K={x.shape[1]}) but w_int8 is (N={w_int8.shape[0]}, K={w_int8.shape[1]})")
    N = w_int8.shape[0]
    w_scale = _check_scale("w_scale", w_scale, N, x.device, allow_column=False)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (N,) or bias.device != x.device
                             or not bias.is_floating_point()):
        raise ValueError(f"bias must be a floating ({N},) tensor on {x.device}, got {bias!r:.80}")
    return w_scale, bias


def _check_scale(name, scale, length, device, allow_column):
    """A per-row scale: floating, (length,) or, if allowed, (length, 1), on `device`; returned as fp32 (length,)."""
    shapes = [(length,), (length, 1)] if allow_column else [(length,)]
    if not isinstance(scale, torch.Tensor) or not scale.is_floating_point() or tuple(scale.shape) not in shapes:
        raise ValueError(f"{name} must be a floating tensor of shape {' or '.join(map(str, shapes))}, got "
                         f"{getattr(scale, 'dtype', type(scale).__name__)} {tuple(getattr(scale, 'shape', ()))}")
    if scale.device != device:
        raise ValueError(f"{name} is on {scale.device}, need {device}")
    return scale.reshape(length).float().contiguous()

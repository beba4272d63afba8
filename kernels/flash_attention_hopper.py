"""The flash attention forward for Hopper (sm_90): TMA loads and QK^T overlapped with the softmax.

Same math, layouts and outputs as the forward in flash_attention.py (read that first); that kernel stays the
path for sm_80, for fp32, for layouts TMA cannot read and for the backward. On an H100 that kernel runs near
FlashAttention-2 speed: every `tl.dot`
lowers to Hopper's asynchronous `wgmma`, but the kernel waits for each one before using its result, so the
tensor cores idle while the warps compute exponentials, and the softmax's exp2 throughput, not the tensor
cores, sets the pace. Two changes here, both expressible in Triton 3.9:

1. TMA loads. Q, K and V tiles come through tensor descriptors (2-D views (tokens, heads x D) of the packed
   tensors), which on sm_90 lower to `cp.async.bulk.tensor`: one thread issues a whole tile copy into shared
   memory, the hardware computes the addresses and signals an mbarrier when it lands. Triton's pipeliner keeps
   `num_stages` K/V tiles in flight. A tile may run past its sequence into the next one (or into the zero fill
   past the tensor's end): those query rows are never stored, those keys are masked like the tail of any
   sequence, and output rows go out through a masked pointer store, never a TMA store that could write another
   sequence's rows.

2. QK^T one block ahead. The key loop is software-pipelined by hand: iteration j first runs P_{j-1} V_{j-1}
   (the accumulator needs it, so the kernel waits for it), then issues S_{j+1} = Q K_{j+1}^T and, while the
   tensor cores work on it, computes the softmax of S_j, issued one iteration earlier. Triton keeps a wgmma
   in flight across loop iterations only when its result is merely carried to the next iteration (then its
   `wgmma.wait_group` comes after the next synchronous dot), which is exactly the shape of S_{j+1} here. This
   is FlashAttention-3's intra-warpgroup overlap; tests/test_kernels_compile.py checks the PTX: TMA copies,
   and exp2 instructions between a wgmma commit and the wait for it.

Not used: `tl.range(..., warp_specialize=True)`. Triton 3.9's Hopper warp specialisation does split the plain
loop (with descriptors made in the kernel) into a TMA producer warpgroup and two consumer warpgroups of 64
query rows each, the "ping-pong" between two Q tiles; but each consumer then still waits for every wgmma
before its softmax, and the pass fails (WSDataPartition: UNREACHABLE) on the pipelined loop above, so one
cannot have both; the overlap above is the one the compiled code shows. The pipelining costs one extra QK^T per key range (block hi, discarded).
"""

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.flash_attention import (INTERPRET, _first_block, _key_ranges, _sequence_span, _softmax_step,
                                     _store_output)

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by head dim, fp16/bf16 only: two warpgroups share 128 query rows.
# Registers bound BLOCK_N: each warpgroup holds its (64, D) fp32 accumulator, two (64, BLOCK_N) fp32 score
# blocks (the one in flight and the one in the softmax) and P. At D = 64 and 128 that allows 64 keys per block
# without spilling (ptxas: about 180 and 220 of the 255 registers); 128 keys spill. 3 stages of K/V tiles take
# 160 KB of the 227 KB of shared memory at D = 128.
HOPPER_BLOCKS = {16: (128, 128, 8, 3), 32: (128, 128, 8, 3), 64: (128, 64, 8, 3), 128: (128, 64, 8, 3)}
HOPPER_DTYPES = (torch.float16, torch.bfloat16)


@triton.jit
def _pipelined_range(acc, row_sum, row_max, q, desc_k, desc_v, k_start, kv_col, rows, lo, hi, seqlen_k,
                     causal_offset, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update over the key blocks in [lo, hi), QK^T issued one block ahead (module docstring)."""
    if lo < hi:
        scores = tl.dot(q, desc_k.load([k_start + lo, kv_col]).T)  # (BLOCK_M, BLOCK_N)
        p, correction, row_max, row_sum = _softmax_step(scores, row_max, row_sum, rows, lo + tl.arange(0, BLOCK_N),
                                                        seqlen_k, causal_offset, qk_scale, MASKED, CAUSAL)
        scores = tl.dot(q, desc_k.load([k_start + lo + BLOCK_N, kv_col]).T)
        for start_n in tl.range(lo + BLOCK_N, hi, BLOCK_N):
            v = desc_v.load([k_start + start_n - BLOCK_N, kv_col])
            acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None])
            next_scores = tl.dot(q, desc_k.load([k_start + start_n + BLOCK_N, kv_col]).T)  # in flight ...
            p, correction, row_max, row_sum = _softmax_step(scores, row_max, row_sum, rows,  # ... during this
                                                            start_n + tl.arange(0, BLOCK_N), seqlen_k,
                                                            causal_offset, qk_scale, MASKED, CAUSAL)
            scores = next_scores
        v = desc_v.load([k_start + lo + (tl.cdiv(hi - lo, BLOCK_N) - 1) * BLOCK_N, kv_col])
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None])
    return acc, row_sum, row_max


@triton.jit
def _hopper_fwd_kernel(desc_q, desc_k, desc_v, Out, Lse, cu_seqlens_q, cu_seqlens_k, stride_ot, stride_oh,
                       stride_lse_h, qk_scale, GROUP_SIZE,
                       HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: query blocks of one (sequence, query head), grid-strided as in _attn_fwd_kernel."""
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start, seqlen_q = _sequence_span(cu_seqlens_q, seq)
    k_start, seqlen_k = _sequence_span(cu_seqlens_k, seq)
    kv_col = head // GROUP_SIZE * HEAD_DIM
    causal_offset = seqlen_k - seqlen_q
    # Hoisting loop invariants (offset tiles) out of this loop, which runs once unless max_seqlen_q was too
    # small, would keep them live across the whole body and spill registers.
    for start_m in tl.range(_first_block(BLOCK_M), seqlen_q, tl.num_programs(0) * BLOCK_M, disable_licm=True):
        rows = start_m + tl.arange(0, BLOCK_M)
        q = desc_q.load([q_start + start_m, head * HEAD_DIM])  # (BLOCK_M, D); rows past the sequence unused
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        row_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: see _attn_fwd_kernel
        full_end, masked_end = _key_ranges(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
        acc, row_sum, row_max = _pipelined_range(acc, row_sum, row_max, q, desc_k, desc_v, k_start, kv_col, rows,
                                                 0, full_end, seqlen_k, causal_offset, qk_scale, False, CAUSAL,
                                                 BLOCK_N)
        acc, row_sum, row_max = _pipelined_range(acc, row_sum, row_max, q, desc_k, desc_v, k_start, kv_col, rows,
                                                 full_end, masked_end, seqlen_k, causal_offset, qk_scale, True,
                                                 CAUSAL, BLOCK_N)
        _store_output(acc, row_sum, row_max, Out, Lse, head, stride_ot, stride_oh, stride_lse_h, q_start, start_m,
                      rows, rows < seqlen_q, HEAD_DIM, BLOCK_M)


def uses_hopper_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether flash_attention_forward takes this kernel: an sm_90 GPU, fp16/bf16, and the layout TMA needs (heads
    adjacent within a token row, rows and base 16-byte aligned)."""
    if not q.is_cuda or q.dtype not in HOPPER_DTYPES or torch.cuda.get_device_capability(q.device)[0] != 9:
        return False
    # A descriptor needs at least one row: with no keys at all the other kernel writes the zeros.
    return k.shape[0] > 0 and all(x.stride(1) == x.shape[2] and x.stride(0) * x.element_size() % 16 == 0
                                  and x.data_ptr() % 16 == 0 for x in (q, k, v))


def _rows_descriptor(x: torch.Tensor, block_rows: int) -> TensorDescriptor:
    """(block_rows, D) tiles of the (tokens, heads x D) view of a packed (tokens, heads, D) tensor."""
    return TensorDescriptor(x, [x.shape[0], x.shape[1] * x.shape[2]], [x.stride(0), 1], [block_rows, x.shape[2]])


def hopper_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, *, causal, qk_scale):
    """Fill out (total_q, Hq, D) and lse (Hq, total_q) like _attn_fwd_kernel; flash_attention_forward checks the
    arguments, and uses_hopper_forward (or a test under TRITON_INTERPRET=1) decides this kernel runs."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    # Under the interpreter, tiny unequal blocks as for the other kernels (flash_attention._INTERPRETER_BLOCKS).
    block_m, block_n, num_warps, num_stages = (32, 16, 4, 1) if INTERPRET else HOPPER_BLOCKS[head_dim]
    grid = (triton.cdiv(max_seqlen_q, block_m), cu_seqlens_q.numel() - 1, num_heads)
    _hopper_fwd_kernel[grid](_rows_descriptor(q, block_m), _rows_descriptor(k, block_n),
                             _rows_descriptor(v, block_n), out, lse, cu_seqlens_q, cu_seqlens_k, out.stride(0),
                             out.stride(1), lse.stride(0), qk_scale, num_heads // k.shape[1], HEAD_DIM=head_dim,
                             CAUSAL=causal, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                             num_stages=num_stages)

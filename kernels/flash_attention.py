"""Flash attention in Triton: forward and backward, dense and variable-length, with grouped-query heads.

Attention is `softmax(Q K^T * scale) V`. Done naively it materialises the (T, T) score matrix per head, which
is memory-bound and O(T^2) in memory. Flash attention never builds it: each program owns a block of query rows
and streams over blocks of keys, keeping only a (BLOCK_M, D) output accumulator and two numbers per row.

Online softmax (forward). For one query row, softmax(s) @ V = sum_j exp(s_j - m) v_j / sum_j exp(s_j - m) for
any constant m; the usual choice m = max_j s_j keeps every exp <= 1. We do not know the max until we have seen
every key, so we keep a running max `row_max`, a running denominator `row_sum` and an unnormalised accumulator
`acc`. When a new block raises the max from m_old to m_new, everything accumulated so far was scaled by
exp(-m_old) instead of exp(-m_new), so we multiply `row_sum` and `acc` by exp(m_old - m_new) and carry on.
After the last block, out = acc / row_sum. Scores are pre-multiplied by log2(e) so the GPU's native exp2 can be
used: exp(x) = exp2(x * log2(e)), and the scale folds into the same multiply.

Saved log-sum-exp. The forward also stores, per row, lse = row_max + log2(row_sum) (in log2 units). The
backward needs the probabilities P again; with the lse it recomputes them block by block as
P = exp2(scores - lse) in one step, with no second pass for the max or the sum. That is the whole memory trick:
O(T) saved numbers instead of the O(T^2) matrix.

Backward. With dO the gradient of the output, and delta_i = sum_d dO_id * O_id (a cheap preprocess kernel):
    dV = P^T dO,    dP = dO V^T,    dS = P * (dP - delta),    dQ = scale * dS K,    dK = scale * dS^T Q.
dK and dV sum over query rows, dQ sums over key columns. One kernel producing all three would have to add
into one of them from many programs at once (atomics: contention and run-to-run nondeterminism). Instead
one kernel owns a block of keys and loops over query blocks (it writes dK, dV), and another owns a block of
queries and loops over key blocks (it writes dQ). Each recomputes P, which costs one extra matmul but keeps
every output written by exactly one program, deterministically.

Layouts. Dense q is (B, Tq, Hq, D) and k/v are (B, Tk, Hkv, D). Varlen packs sequences of different lengths
back to back: q is (total_q, Hq, D) with int32 `cu_seqlens_q` = [0, len_0, len_0 + len_1, ...]. The kernels
only know the varlen form; a dense batch is the special case cu_seqlens = [0, T, 2T, ...].

Causal alignment is bottom-right: with Tq <= Tk, query i sits at key position Tk - Tq + i and sees keys
0..Tk - Tq + i. That is what prefill on top of a cached prefix needs (the new tokens come last).

Grouped-query attention: Hkv divides Hq, query head h reads kv head h // (Hq // Hkv). K and V are never
repeated in memory; the dK/dV kernel loops over the query heads of its group.

Causal block skipping: key blocks entirely above the diagonal are never visited, and blocks entirely below
it run without any masking; only the few blocks that straddle the diagonal or the sequence end pay for masks.
"""

import os

import torch
import triton
import triton.language as tl

# The interpreter runs kernels on CPU with numpy; it must be chosen before kernels are defined (tests/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_HEAD_DIMS = (16, 32, 64, 128)
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2_E = 1.4426950408889634


# Tiles are chosen by rule, not by autotuning. An autotuner benchmarks every candidate the first time it sees a
# key: during serving that is a latency spike at each new key (keyed on a length bucket, every longer prompt
# retuned mid-serving), and without the length in the key the choice is whatever suited the first call's shape.
# FlashAttention also fixes its tiles per head dim and architecture. Entries are (BLOCK_M, BLOCK_N, num_warps,
# num_stages) by kernel, head dim (up to 64, or 128) and element size, each the largest tile that compiles for
# sm_80 and sm_90 without register spills (ptxas 13, tests/test_kernels_compile.py checks every entry):
# - forward and dQ hold a block of 128 query rows (amortising each K/V tile over many rows) and its fp32
#   accumulator, which at 8 warps leaves room for 64-key tiles (32 keys for dQ at D=128, beside dO and dQ).
# - dK/dV holds two fp32 (BLOCK_N, D) accumulators: 128 keys with 32-row query blocks at D=64, 64 keys at D=128.
# - fp32 (the testing path; its dots run as tf32 on the tensor cores) has twice the bytes per tile: fewer rows.
#   At D=128 its dK/dV tiles of 32 keys are below wgmma's 64 rows; 64-key tiles spill there.
_GPU_BLOCKS = {
    ("fwd", 64, 2): (128, 64, 8, 2), ("fwd", 128, 2): (128, 64, 8, 3),
    ("fwd", 64, 4): (128, 32, 8, 3), ("fwd", 128, 4): (64, 32, 8, 2),
    ("dkdv", 64, 2): (32, 128, 8, 3), ("dkdv", 128, 2): (16, 64, 8, 3),
    ("dkdv", 64, 4): (16, 64, 8, 3), ("dkdv", 128, 4): (16, 32, 4, 2),
    ("dq", 64, 2): (128, 64, 8, 3), ("dq", 128, 2): (128, 32, 8, 3),
    ("dq", 64, 4): (64, 32, 4, 3), ("dq", 128, 4): (64, 16, 4, 2),
}
# Under the interpreter the blocks are deliberately unequal (32x16 and 16x32) so the tests cover diagonals that
# do not line up with block edges, and tiny so that lengths of a few dozen already span several blocks.
_INTERPRETER_BLOCKS = {"fwd": (32, 16, 4, 1), "dkdv": (16, 32, 4, 1), "dq": (32, 16, 4, 1)}


def kernel_blocks(kernel: str, head_dim: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) the launchers use for `kernel` ("fwd", "dkdv" or "dq")."""
    if INTERPRET:
        return _INTERPRETER_BLOCKS[kernel]
    return _GPU_BLOCKS[kernel, 64 if head_dim <= 64 else 128, dtype.itemsize]


@triton.jit
def _sequence_span(cu_seqlens, seq):
    """(first token, length) of sequence `seq` in a packed batch."""
    start = tl.load(cu_seqlens + seq)
    return start, tl.load(cu_seqlens + seq + 1) - start


@triton.jit
def _tile(ptr, head, stride_h, first_row, stride_t, BLOCK: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Pointers to the (BLOCK, HEAD_DIM) tile of token rows first_row.. of one head.

    The row offset is int64 (a token index times the token stride passes 2^31 at 524k tokens of H*D = 4096);
    within the tile, BLOCK x stride stays far below, and int32 offsets cost fewer registers."""
    base = ptr + first_row.to(tl.int64) * stride_t + head * stride_h
    return base + tl.arange(0, BLOCK)[:, None] * stride_t + tl.arange(0, HEAD_DIM)[None, :]


@triton.jit
def _load_tile(ptr, head, stride_h, seq_start, start, stride_t, length, MASKED: tl.constexpr, BLOCK: tl.constexpr,
               HEAD_DIM: tl.constexpr):
    """Rows start.. of a sequence beginning at token seq_start, as a (BLOCK, HEAD_DIM) tile; with MASKED, rows at or
    past `length` read as zeros."""
    ptrs = _tile(ptr, head, stride_h, seq_start + start, stride_t, BLOCK, HEAD_DIM)
    if MASKED:
        tile = tl.load(ptrs, mask=(start + tl.arange(0, BLOCK) < length)[:, None], other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def _first_block(BLOCK: tl.constexpr):
    """Start of this program's first block along grid axis 0, launched last-first: under a causal mask the last
    query blocks have the most keys, and starting the longest programs first leaves less idle time at the end."""
    return (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK


@triton.jit
def _key_ranges(start_m, seqlen_q, seqlen_k, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """For the query block at start_m: keys [0, full_end) need no mask, keys [full_end, masked_end) do."""
    causal_offset = seqlen_k - seqlen_q
    if CAUSAL:
        # Row start_m (the block's first) sees keys <= start_m + causal_offset, so every row sees those keys.
        full_end = tl.maximum((start_m + causal_offset + 1) // BLOCK_N * BLOCK_N, 0)
        masked_end = tl.minimum(seqlen_k, start_m + BLOCK_M + causal_offset)
    else:
        full_end = seqlen_k // BLOCK_N * BLOCK_N
        masked_end = seqlen_k
    return full_end, masked_end


@triton.jit
def _softmax_step(scores, row_max, row_sum, rows, cols, seqlen_k, causal_offset, qk_scale,
                  MASKED: tl.constexpr, CAUSAL: tl.constexpr):
    """Online softmax over one (BLOCK_M, BLOCK_N) block of unscaled q.k: returns (p, correction, new row_max,
    new row_sum), where correction rescales what was accumulated under the old max."""
    if MASKED:
        visible = cols[None, :] < seqlen_k
        if CAUSAL:
            visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
        scores = tl.where(visible, scores, float("-inf"))
    # qk_scale > 0, so scaling commutes with the max; scaling inside the exponent then compiles to one
    # fused multiply-add per score, and the exponent is in log2 units for exp2.
    new_max = tl.maximum(row_max, tl.max(scores, 1) * qk_scale)
    p = tl.exp2(scores * qk_scale - new_max[:, None])
    correction = tl.exp2(row_max - new_max)
    return p, correction, new_max, row_sum * correction + tl.sum(p, 1)


@triton.jit
def _fwd_inner(acc, row_sum, row_max, q, K, V, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, k_start, rows,
               key_lo, key_hi, seqlen_k, causal_offset, qk_scale,
               MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Online-softmax update of (acc, row_sum, row_max) over the key blocks in [key_lo, key_hi)."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv_head, stride_kh, k_start, start_n, stride_kt, seqlen_k, MASKED, BLOCK_N, HEAD_DIM)
        p, correction, row_max, row_sum = _softmax_step(tl.dot(q, tl.trans(k)), row_max, row_sum, rows, cols,
                                                        seqlen_k, causal_offset, qk_scale, MASKED, CAUSAL)
        v = _load_tile(V, kv_head, stride_vh, k_start, start_n, stride_vt, seqlen_k, MASKED, BLOCK_N, HEAD_DIM)
        # P goes into the tensor cores in the input precision; the accumulator stays fp32.
        acc = tl.dot(p.to(v.dtype), v, acc * correction[:, None])
    return acc, row_sum, row_max


@triton.jit
def _attn_fwd_kernel(Q, K, V, Out, Lse, cu_seqlens_q, cu_seqlens_k,
                     stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                     stride_lse_h, qk_scale, GROUP_SIZE,
                     HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: query blocks of one (sequence, query head), grid-strided; writes their output rows and lse.

    The grid covers max_seqlen_q rows, a number the caller may pass without reading cu_seqlens; the stride loop
    still reaches every row of a longer sequence, so a wrong hint costs time, never unwritten rows. The loop runs
    once otherwise, and disable_licm keeps the compiler from hoisting offset tiles out of it, where they would
    stay live across the whole body and spill registers."""
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start, seqlen_q = _sequence_span(cu_seqlens_q, seq)
    k_start, seqlen_k = _sequence_span(cu_seqlens_k, seq)
    kv_head = head // GROUP_SIZE
    causal_offset = seqlen_k - seqlen_q
    for start_m in tl.range(_first_block(BLOCK_M), seqlen_q, tl.num_programs(0) * BLOCK_M, disable_licm=True):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen_q
        q = _load_tile(Q, head, stride_qh, q_start, start_m, stride_qt, seqlen_q, True, BLOCK_M, HEAD_DIM)
        acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        row_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
        # A finite floor instead of -inf: a row that has so far seen only masked keys then gets
        # exp2(-inf - floor) = 0 rather than exp2(-inf + inf) = NaN.
        row_max = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
        full_end, masked_end = _key_ranges(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
        acc, row_sum, row_max = _fwd_inner(acc, row_sum, row_max, q, K, V, kv_head, stride_kt, stride_kh,
                                           stride_vt, stride_vh, k_start, rows, 0, full_end, seqlen_k,
                                           causal_offset, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N)
        acc, row_sum, row_max = _fwd_inner(acc, row_sum, row_max, q, K, V, kv_head, stride_kt, stride_kh,
                                           stride_vt, stride_vh, k_start, rows, full_end, masked_end, seqlen_k,
                                           causal_offset, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N)
        _store_output(acc, row_sum, row_max, Out, Lse, head, stride_ot, stride_oh, stride_lse_h, q_start, start_m,
                      rows, row_ok, HEAD_DIM, BLOCK_M)


@triton.jit
def _store_output(acc, row_sum, row_max, Out, Lse, head, stride_ot, stride_oh, stride_lse_h, q_start, start_m, rows,
                  row_ok, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Normalise and store one query block's output rows and their lse (log2 units)."""
    # A row with no visible key (empty key sequence) outputs zeros; lse = +inf makes its backward P zero too.
    empty_row = row_sum == 0.0
    out = acc / tl.where(empty_row, 1.0, row_sum)[:, None]
    lse = tl.where(empty_row, float("inf"), row_max + tl.log2(tl.where(empty_row, 1.0, row_sum)))
    tl.store(_tile(Out, head, stride_oh, q_start + start_m, stride_ot, BLOCK_M, HEAD_DIM),
             out.to(Out.dtype.element_ty), mask=row_ok[:, None])
    tl.store(Lse + tl.cast(head, tl.int64) * stride_lse_h + q_start + rows, lse, mask=row_ok)


@triton.jit
def _attn_bwd_delta_kernel(Out, dOut, Delta, total_q, stride_ot, stride_oh, stride_dot, stride_doh, stride_delta_h,
                           HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O): the term that softmax's Jacobian subtracts from every dP entry of a row."""
    start = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    rows = start + tl.arange(0, BLOCK_M)
    row_ok = rows < total_q
    out = _load_tile(Out, head, stride_oh, 0, start, stride_ot, total_q, True, BLOCK_M, HEAD_DIM).to(tl.float32)
    dout = _load_tile(dOut, head, stride_doh, 0, start, stride_dot, total_q, True, BLOCK_M, HEAD_DIM).to(tl.float32)
    tl.store(Delta + tl.cast(head, tl.int64) * stride_delta_h + rows, tl.sum(out * dout, 1), mask=row_ok)


@triton.jit
def _dkdv_inner(dk, dv, k, v, Q, dOut, head, stride_qt, stride_qh, stride_dot, stride_doh, q_start, lse_row,
                delta_row, cols, row_lo, row_hi, seqlen_q, causal_offset, qk_scale,
                MASKED: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
    """Accumulate dK, dV of one key block over the query blocks in [row_lo, row_hi), working in transposed form."""
    for start_m in range(row_lo, row_hi, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen_q
        q = _load_tile(Q, head, stride_qh, q_start, start_m, stride_qt, seqlen_q, True, BLOCK_M, HEAD_DIM)
        # Padding rows get lse = +inf, so their recomputed probabilities are exp2(-inf) = 0.
        lse = tl.load(lse_row + rows, mask=row_ok, other=float("inf"))
        p_t = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse[None, :])  # (BLOCK_N, BLOCK_M) = P^T
        if MASKED:
            p_t = tl.where(cols[:, None] <= rows[None, :] + causal_offset, p_t, 0.0)
        do = _load_tile(dOut, head, stride_doh, q_start, start_m, stride_dot, seqlen_q, True, BLOCK_M, HEAD_DIM)
        dv = tl.dot(p_t.to(do.dtype), do, dv)
        delta = tl.load(delta_row + rows, mask=row_ok, other=0.0)
        dp_t = tl.dot(v, tl.trans(do))  # (BLOCK_N, BLOCK_M) = dP^T
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(Q, K, V, dOut, Lse, Delta, dK, dV, cu_seqlens_q, cu_seqlens_k,
                          stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                          stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_lse_h, stride_delta_h,
                          qk_scale, softmax_scale, GROUP_SIZE,
                          HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: key blocks of one (sequence, kv head), grid-strided like the forward's query blocks; loops
    over every query head of the group."""
    seq = tl.program_id(1)
    kv_head = tl.program_id(2)
    k_start, seqlen_k = _sequence_span(cu_seqlens_k, seq)
    q_start, seqlen_q = _sequence_span(cu_seqlens_q, seq)
    causal_offset = seqlen_k - seqlen_q
    # In order: under a causal mask the first key blocks are seen by the most queries, so they start first.
    for start_n in tl.range(tl.program_id(0) * BLOCK_N, seqlen_k, tl.num_programs(0) * BLOCK_N, disable_licm=True):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < seqlen_k
        k = _load_tile(K, kv_head, stride_kh, k_start, start_n, stride_kt, seqlen_k, True, BLOCK_N, HEAD_DIM)
        v = _load_tile(V, kv_head, stride_vh, k_start, start_n, stride_vt, seqlen_k, True, BLOCK_N, HEAD_DIM)
        dk = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, HEAD_DIM], dtype=tl.float32)
        if CAUSAL:
            # Query i sees key j iff j <= i + causal_offset. Rows before the first that sees key start_n are
            # skipped; from the first row that sees the block's last key on, no mask is needed.
            row_lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
            row_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
            row_full = tl.minimum(row_full, seqlen_q)
        else:
            row_lo = 0
            row_full = 0
        for head in range(kv_head * GROUP_SIZE, (kv_head + 1) * GROUP_SIZE):
            lse_row = Lse + tl.cast(head, tl.int64) * stride_lse_h + q_start
            delta_row = Delta + tl.cast(head, tl.int64) * stride_delta_h + q_start
            dk, dv = _dkdv_inner(dk, dv, k, v, Q, dOut, head, stride_qt, stride_qh, stride_dot, stride_doh,
                                 q_start, lse_row, delta_row, cols, row_lo, row_full, seqlen_q, causal_offset,
                                 qk_scale, True, HEAD_DIM, BLOCK_M)
            dk, dv = _dkdv_inner(dk, dv, k, v, Q, dOut, head, stride_qt, stride_qh, stride_dot, stride_doh,
                                 q_start, lse_row, delta_row, cols, row_full, seqlen_q, seqlen_q, causal_offset,
                                 qk_scale, False, HEAD_DIM, BLOCK_M)
        # Scores were q.k * scale, so the chain rule puts one factor of scale on dK (dV has none).
        tl.store(_tile(dK, kv_head, stride_dkh, k_start + start_n, stride_dkt, BLOCK_N, HEAD_DIM),
                 (dk * softmax_scale).to(dK.dtype.element_ty), mask=col_ok[:, None])
        tl.store(_tile(dV, kv_head, stride_dvh, k_start + start_n, stride_dvt, BLOCK_N, HEAD_DIM),
                 dv.to(dV.dtype.element_ty), mask=col_ok[:, None])


@triton.jit
def _dq_inner(dq, q, do, lse, delta, K, V, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, k_start, rows,
              key_lo, key_hi, seqlen_k, causal_offset, qk_scale,
              MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """Accumulate dQ of one query block over the key blocks in [key_lo, key_hi)."""
    for start_n in range(key_lo, key_hi, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(K, kv_head, stride_kh, k_start, start_n, stride_kt, seqlen_k, MASKED, BLOCK_N, HEAD_DIM)
        v = _load_tile(V, kv_head, stride_vh, k_start, start_n, stride_vt, seqlen_k, MASKED, BLOCK_N, HEAD_DIM)
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse[:, None])  # (BLOCK_M, BLOCK_N)
        if MASKED:
            visible = cols[None, :] < seqlen_k
            if CAUSAL:
                visible = visible & (cols[None, :] <= rows[:, None] + causal_offset)
            p = tl.where(visible, p, 0.0)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(Q, K, V, dOut, Lse, Delta, dQ, cu_seqlens_q, cu_seqlens_k,
                        stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                        stride_dqt, stride_dqh, stride_lse_h, stride_delta_h, qk_scale, softmax_scale, GROUP_SIZE,
                        HEAD_DIM: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: query blocks of one (sequence, query head), grid-strided; visits keys like the forward."""
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start, seqlen_q = _sequence_span(cu_seqlens_q, seq)
    k_start, seqlen_k = _sequence_span(cu_seqlens_k, seq)
    kv_head = head // GROUP_SIZE
    causal_offset = seqlen_k - seqlen_q
    for start_m in tl.range(_first_block(BLOCK_M), seqlen_q, tl.num_programs(0) * BLOCK_M, disable_licm=True):
        rows = start_m + tl.arange(0, BLOCK_M)
        row_ok = rows < seqlen_q
        q = _load_tile(Q, head, stride_qh, q_start, start_m, stride_qt, seqlen_q, True, BLOCK_M, HEAD_DIM)
        do = _load_tile(dOut, head, stride_doh, q_start, start_m, stride_dot, seqlen_q, True, BLOCK_M, HEAD_DIM)
        lse = tl.load(Lse + tl.cast(head, tl.int64) * stride_lse_h + q_start + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(Delta + tl.cast(head, tl.int64) * stride_delta_h + q_start + rows, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)
        full_end, masked_end = _key_ranges(start_m, seqlen_q, seqlen_k, CAUSAL, BLOCK_M, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, k_start,
                       rows, 0, full_end, seqlen_k, causal_offset, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N)
        dq = _dq_inner(dq, q, do, lse, delta, K, V, kv_head, stride_kt, stride_kh, stride_vt, stride_vh, k_start,
                       rows, full_end, masked_end, seqlen_k, causal_offset, qk_scale, True, CAUSAL, HEAD_DIM,
                       BLOCK_N)
        tl.store(_tile(dQ, head, stride_dqh, q_start + start_m, stride_dqt, BLOCK_M, HEAD_DIM),
                 (dq * softmax_scale).to(dQ.dtype.element_ty), mask=row_ok[:, None])


def _launch(kernel, name, blocks_along, batch, heads, head_dim, dtype, *args, **constexprs):
    """Launch `kernel` with kernel_blocks(name, ...) over (blocks along one sequence axis, sequences, heads)."""
    block_m, block_n, num_warps, num_stages = kernel_blocks(name, head_dim, dtype)
    blocks = triton.cdiv(blocks_along, block_n if name == "dkdv" else block_m)
    kernel[(blocks, batch, heads)](*args, HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n,
                                   num_warps=num_warps, num_stages=num_stages, **constexprs)


def flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal,
                            softmax_scale, out=None, lse=None):
    """Run the forward kernel on varlen-packed inputs; returns (out (total_q, Hq, D), lse (Hq, total_q) fp32, log2).

    max_seqlen_q only sizes the grid (too small costs time, see _attn_fwd_kernel); on sm_90 fp16/bf16 inputs take
    the Hopper kernel (flash_attention_hopper.py)."""
    _check_kernel_inputs(q, k, v)
    total_q, num_heads, head_dim = q.shape
    batch = cu_seqlens_q.numel() - 1
    softmax_scale = _softmax_scale(head_dim, softmax_scale)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    out = torch.empty_like(q) if out is None else out  # (total_q, Hq, D)
    lse = torch.empty(num_heads, total_q, dtype=torch.float32, device=q.device) if lse is None else lse
    _check_buffer("out", out, q.shape, q.dtype)
    _check_buffer("lse", lse, (num_heads, total_q), torch.float32)
    if out.numel() == 0 or batch == 0:
        return out, lse
    from kernels.flash_attention_hopper import hopper_forward, uses_hopper_forward  # it imports this module
    if uses_hopper_forward(q, k, v):
        hopper_forward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, causal=causal,
                       qk_scale=softmax_scale * LOG2_E)
        return out, lse
    _launch(_attn_fwd_kernel, "fwd", max_seqlen_q, batch, num_heads, head_dim, q.dtype,
            q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            v.stride(0), v.stride(1), out.stride(0), out.stride(1), lse.stride(0), softmax_scale * LOG2_E,
            num_heads // k.shape[1], CAUSAL=causal)
    return out, lse


def flash_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
                             causal, softmax_scale, dq=None, dk=None, dv=None):
    """Run the three backward kernels (delta, dK/dV, dQ) on varlen-packed inputs; returns (dq, dk, dv)."""
    _check_kernel_inputs(q, k, v)
    total_q, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    batch = cu_seqlens_q.numel() - 1
    softmax_scale = _softmax_scale(head_dim, softmax_scale)
    cu_seqlens_q, cu_seqlens_k = cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous()
    dout = dout if dout.stride(-1) == 1 else dout.contiguous()
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    for name, buffer, like in (("dq", dq, q), ("dk", dk, k), ("dv", dv, v)):
        _check_buffer(name, buffer, like.shape, like.dtype)
    if batch == 0:
        return dq, dk, dv
    delta = torch.empty(num_heads, total_q, dtype=torch.float32, device=q.device)  # (Hq, total_q)
    qk_scale = softmax_scale * LOG2_E
    group_size = num_heads // num_kv_heads
    if total_q > 0:
        delta_block = 16 if INTERPRET else 64
        _attn_bwd_delta_kernel[(triton.cdiv(total_q, delta_block), num_heads)](
            out, dout, delta, total_q, out.stride(0), out.stride(1), dout.stride(0), dout.stride(1),
            delta.stride(0), HEAD_DIM=head_dim, BLOCK_M=delta_block)
    if dk.numel() > 0:
        _launch(_attn_bwd_dkdv_kernel, "dkdv", max_seqlen_k, batch, num_kv_heads, head_dim, q.dtype,
                q, k, v, dout, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
                dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), lse.stride(0),
                delta.stride(0), qk_scale, softmax_scale, group_size, CAUSAL=causal)
    if dq.numel() > 0:
        _launch(_attn_bwd_dq_kernel, "dq", max_seqlen_q, batch, num_heads, head_dim, q.dtype,
                q, k, v, dout, lse, delta, dq, cu_seqlens_q, cu_seqlens_k,
                q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), dout.stride(0),
                dout.stride(1), dq.stride(0), dq.stride(1), lse.stride(0), delta.stride(0), qk_scale,
                softmax_scale, group_size, CAUSAL=causal)
    return dq, dk, dv


class _FlashAttentionFunction(torch.autograd.Function):
    """Autograd glue: the forward saves q, k, v, out and the lse; the backward replays the kernels above."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, softmax_scale):
        out, lse = flash_attention_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                           causal=causal, softmax_scale=softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k)
        ctx.lengths_and_flags = (max_seqlen_q, max_seqlen_k, causal, softmax_scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k = ctx.saved_tensors
        max_seqlen_q, max_seqlen_k, causal, softmax_scale = ctx.lengths_and_flags
        dq, dk, dv = flash_attention_backward(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                              max_seqlen_k, causal=causal, softmax_scale=softmax_scale)
        return dq, dk, dv, None, None, None, None, None, None


def flash_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                    softmax_scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
                    cu_seqlens_k: torch.Tensor | None = None, max_seqlen_q: int | None = None,
                    max_seqlen_k: int | None = None) -> torch.Tensor:
    """Attention with the Triton kernels (differentiable); dense (B, T, H, D) or varlen (total, H, D) + cu_seqlens.

    Off-GPU without TRITON_INTERPRET=1 it runs attention_reference. Passing max_seqlen_q/k for varlen input
    skips reading cu_seqlens on the host (a GPU sync), and with it the checks of their values; the hints only
    size the grid (one too small costs time, not rows). fp32 inputs (there for the interpreter) get Triton's
    default tf32 tensor-core dots on GPU, about 1e-3 relative error. On sm_90, fp16/bf16 take the Hopper forward.
    """
    varlen = _check_inputs(q, k, v, causal, cu_seqlens_q, cu_seqlens_k)
    softmax_scale = _softmax_scale(q.shape[-1], softmax_scale)
    if not (q.is_cuda or INTERPRET):
        return attention_reference(q, k, v, causal=causal, softmax_scale=softmax_scale,
                                   cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k)
    _check_kernel_support(q)
    if INTERPRET and q.dtype == torch.bfloat16:
        # The interpreter's tl.dot reads bf16 as its raw uint16 bits, so there the same kernels run in fp32.
        out = flash_attention(q.float(), k.float(), v.float(), causal=causal, softmax_scale=softmax_scale,
                              cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                              max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k)
        return out.to(torch.bfloat16)
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    if varlen:
        if max_seqlen_q is None or max_seqlen_k is None or not q.is_cuda:
            max_seqlen_q, max_seqlen_k = _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0],
                                                                  k.shape[0], causal)
        return _FlashAttentionFunction.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                             causal, softmax_scale)
    batch, seqlen_q, num_heads, head_dim = q.shape
    seqlen_k = k.shape[1]
    # A dense batch is the varlen case with equal lengths; reshape is a view for (B, T, H, D)-strided inputs.
    steps = torch.arange(batch + 1, dtype=torch.int32, device=q.device)
    out = _FlashAttentionFunction.apply(q.reshape(batch * seqlen_q, num_heads, head_dim),
                                        k.reshape(batch * seqlen_k, k.shape[2], head_dim),
                                        v.reshape(batch * seqlen_k, v.shape[2], head_dim),
                                        steps * seqlen_q, steps * seqlen_k, seqlen_q, seqlen_k, causal, softmax_scale)
    return out.view(batch, seqlen_q, num_heads, head_dim)


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool = True,
                        softmax_scale: float | None = None, cu_seqlens_q: torch.Tensor | None = None,
                        cu_seqlens_k: torch.Tensor | None = None) -> torch.Tensor:
    """Plain-torch attention with the same layouts and semantics as flash_attention; the CPU path (fp32+ math)."""
    varlen = _check_inputs(q, k, v, causal, cu_seqlens_q, cu_seqlens_k)
    softmax_scale = _softmax_scale(q.shape[-1], softmax_scale)
    if not varlen:
        return _dense_reference(q, k, v, causal, softmax_scale)
    _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, q.shape[0], k.shape[0], causal)
    bounds = zip(cu_seqlens_q.tolist(), cu_seqlens_q.tolist()[1:], cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])
    outs = [_dense_reference(q[None, q0:q1], k[None, k0:k1], v[None, k0:k1], causal, softmax_scale)[0]
            for q0, q1, k0, k1 in bounds]
    return torch.cat(outs) if outs else q.new_zeros(q.shape)


def _dense_reference(q, k, v, causal, softmax_scale):
    """softmax(q k^T * scale) v for (B, T, H, D) inputs, GQA by repeating kv heads, bottom-right causal mask."""
    seqlen_q, num_heads = q.shape[1], q.shape[2]
    seqlen_k, num_kv_heads = k.shape[1], k.shape[2]
    group_size = num_heads // num_kv_heads
    math_dtype = torch.promote_types(q.dtype, torch.float32)  # half precision inputs, fp32 (or fp64) math
    qh = q.transpose(1, 2).to(math_dtype)  # (B, Hq, Tq, D)
    kh = k.transpose(1, 2).to(math_dtype).repeat_interleave(group_size, dim=1)  # (B, Hq, Tk, D)
    vh = v.transpose(1, 2).to(math_dtype).repeat_interleave(group_size, dim=1)
    scores = qh @ kh.transpose(-1, -2) * softmax_scale  # (B, Hq, Tq, Tk)
    if causal:
        query_pos = torch.arange(seqlen_q, device=q.device) + (seqlen_k - seqlen_q)
        visible = torch.arange(seqlen_k, device=q.device)[None, :] <= query_pos[:, None]  # (Tq, Tk)
        scores = scores.masked_fill(~visible, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vh  # (B, Hq, Tq, D)
    return out.transpose(1, 2).to(q.dtype)


def _check_inputs(q, k, v, causal, cu_seqlens_q, cu_seqlens_k):
    """Validate shapes, dtypes and devices; returns True for varlen input. Does not read cu_seqlens values."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not (q.dtype == k.dtype == v.dtype) or not q.dtype.is_floating_point:
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one floating dtype for all")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v are on {q.device}, {k.device}, {v.device}: need one device")
    if k.shape != v.shape:
        raise ValueError(f"k shape {tuple(k.shape)} != v shape {tuple(v.shape)}")
    if (cu_seqlens_q is None) != (cu_seqlens_k is None):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must be given together (varlen) or both left None (dense)")
    varlen = cu_seqlens_q is not None
    rank = 3 if varlen else 4
    layout = "(total, H, D) with cu_seqlens" if varlen else "(B, T, H, D)"
    if q.dim() != rank or k.dim() != rank:
        raise ValueError(f"q {tuple(q.shape)}, k {tuple(k.shape)}: expected {layout}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q head dim {q.shape[-1]} != k head dim {k.shape[-1]}")
    num_heads, num_kv_heads = q.shape[-2], k.shape[-2]
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if varlen:
        for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
            if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 1:
                raise ValueError(f"{name} must be a 1-D int32 tensor [0, len_0, len_0 + len_1, ...], got {cu!r}")
            if cu.device != q.device:
                raise ValueError(f"{name} is on {cu.device}, q on {q.device}: need one device")
        if cu_seqlens_q.numel() != cu_seqlens_k.numel():
            raise ValueError(f"cu_seqlens_q has {cu_seqlens_q.numel()} entries, cu_seqlens_k "
                             f"{cu_seqlens_k.numel()}: need one entry per sequence boundary in both")
    else:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"q batch {q.shape[0]} != k batch {k.shape[0]}")
        if causal and q.shape[1] > k.shape[1]:
            raise ValueError(f"causal attention needs Tq <= Tk (bottom-right aligned), got Tq={q.shape[1]}, "
                             f"Tk={k.shape[1]}")
    return varlen


def _check_cu_seqlens_values(cu_seqlens_q, cu_seqlens_k, total_q, total_k, causal):
    """Check cu_seqlens start at 0, never decrease and end at the token counts; returns (max_seqlen_q, max_seqlen_k)."""
    lengths = []
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, total_q), ("cu_seqlens_k", cu_seqlens_k, total_k)):
        bounds = cu.tolist()
        lengths.append([end - start for start, end in zip(bounds, bounds[1:])])
        if bounds[0] != 0 or bounds[-1] != total or min(lengths[-1], default=0) < 0:
            raise ValueError(f"{name}={bounds} must start at 0, never decrease and end at {total} tokens")
    lengths_q, lengths_k = lengths
    if causal:
        for index, (length_q, length_k) in enumerate(zip(lengths_q, lengths_k)):
            if length_q > length_k:
                raise ValueError(f"sequence {index}: causal attention needs seqlen_q <= seqlen_k "
                                 f"(bottom-right aligned), got {length_q} > {length_k}")
    return max(lengths_q, default=0), max(lengths_k, default=0)


def _softmax_scale(head_dim, softmax_scale):
    """The default 1/sqrt(D), or the given scale; the kernels need it positive (it is folded into a max)."""
    if softmax_scale is None:
        return head_dim ** -0.5
    if not 0 < softmax_scale < float("inf"):
        raise ValueError(f"softmax_scale={softmax_scale}: need a positive finite number (default 1/sqrt(head_dim))")
    return float(softmax_scale)


def _check_kernel_inputs(q, k, v):
    """What the kernel launchers themselves need: varlen rank, unit stride on the head dim, a kernel head dim."""
    if q.dim() != 3 or k.dim() != 3 or k.shape != v.shape:
        raise ValueError(f"kernels take varlen (total, H, D) tensors, got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"v {tuple(v.shape)}")
    if any(x.stride(-1) != 1 for x in (q, k, v)):
        raise ValueError("q, k, v need stride 1 on the head dim (call .contiguous())")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v dtypes {q.dtype}, {k.dtype}, {v.dtype}: need one dtype for all")
    _check_kernel_support(q)
    if INTERPRET and q.dtype == torch.bfloat16:
        raise ValueError("bf16 under TRITON_INTERPRET=1: the interpreter's tl.dot misreads bf16; pass fp32 "
                         "(flash_attention does this for you)")


def _check_kernel_support(q):
    """Head dims and dtypes the kernels are built for; attention_reference has no such limits."""
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS or q.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"head dim {q.shape[-1]}, dtype {q.dtype} have no kernel; supported: head dims "
                         f"{SUPPORTED_HEAD_DIMS}, dtypes {SUPPORTED_DTYPES} (attention_reference takes any)")


def _check_buffer(name, buffer, shape, dtype):
    """A caller-supplied output buffer must match exactly and be writable with unit head-dim stride."""
    if tuple(buffer.shape) != tuple(shape) or buffer.dtype != dtype or buffer.stride(-1) != 1:
        raise ValueError(f"{name} buffer {tuple(buffer.shape)} {buffer.dtype} stride {buffer.stride()}: need "
                         f"{tuple(shape)} {dtype} with stride 1 on the last dim")

"""Paged decode attention in Triton: one new query token per sequence attends to its whole cached context.

The paged KV cache. A server holds many sequences whose lengths grow one token per step and are not known in
advance. Giving each a contiguous (max_len, ...) slab wastes most of it, so the cache is a pool of fixed-size
blocks (pages) per layer: `k_cache`, `v_cache` of shape (num_blocks, block_size, n_kv_head, head_dim). A
sequence owns a list of block ids, its block table; its token t lives in block `block_table[t // block_size]`
at offset `t % block_size`. Sequences with a common prefix may share blocks. `write_kv` stores each new
token's key and value at its slot `block_id * block_size + offset` before attention reads them.

Decode is memory-bound. A decode step does one (1, head_dim) x (head_dim, context) product per head: every
byte of K and V is read once and used for only a few flops, so the kernel's speed is the speed at which it
streams K/V from memory. Three choices follow from that:

1. Grouped-query attention reads each kv head once. One program owns a (sequence, kv head) pair and all the
   query heads that share it (GROUP_SIZE = n_head / n_kv_head of them), so K/V tiles are loaded once and used
   by the whole group. The group's queries form the rows of a small matrix, padded to 16 rows because the
   tensor-core `tl.dot` needs at least 16; the wasted rows cost compute, which is free here, not bandwidth.

2. Tiles are gathered through the block table. The program walks its context in tiles of BLOCK_N tokens; for
   each token it looks up the block id, so a tile may span several blocks, and BLOCK_N need not equal
   block_size. Within a tile it runs the online softmax of flash attention (see flash_attention.py): a
   running max, a running denominator and an unnormalised output, rescaled whenever the max grows.

3. Split-KV ("flash-decoding") for long contexts. With a small batch there are few (sequence, kv head) pairs,
   say 1 x 8, and a GPU with 132 streaming multiprocessors would sit mostly idle while 8 programs each stream
   32k tokens. So the context is cut into `num_splits` chunks handled by separate programs. Each writes its
   partial output o_s (normalised over its own chunk) and its log-sum-exp lse_s = log(sum_j exp(score_j)).
   The exact result is then a weighted mean: out = sum_s exp(lse_s - L) o_s with L = log(sum_s exp(lse_s)),
   because exp(lse_s) is exactly the softmax denominator of chunk s. A second small kernel does that merge.
   With one split the first kernel writes the final output directly. Scores are kept in log2 units (the
   scale is pre-multiplied by log2(e)) so the GPU's native exp2 is used throughout.
"""

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.int8_matmul import dot_dtype_and_precision

# The interpreter runs kernels on CPU with numpy; it must be chosen before kernels are defined (tests/conftest.py).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
LOG2_E = 1.4426950408889634


@dataclass(frozen=True)
class SplitPolicy:
    """How num_splits is chosen when the caller leaves it None (see auto_num_splits)."""
    programs_per_sm: int = 2           # aim for this many (sequence, kv head, split) programs per multiprocessor
    min_tokens_per_split: int = 256    # below this a split's fixed cost (q load, merge) outweighs its work
    max_splits: int = 32


# Tiles by rule, not by autotuning: decode streams K/V and is bound by memory bandwidth, so what matters is enough
# loads in flight per program, not the exact tile, and an autotuner keyed without the context length (which is
# on the GPU: reading it would cost a sync) would keep whatever suited the first decode step's short contexts,
# while one keyed with a length bucket would pause serving to benchmark at every new bucket. Each tile is a
# gather of BLOCK_N rows of head_dim contiguous elements (256 bytes at D=128 in bf16): 64 rows with 3 stages keep
# the next tiles' gathers in flight during this tile's math, and 4 warps leave room for more programs per SM.
# fp32 rows are twice as wide: at D >= 128, 64-row tiles spill registers, 32-row tiles with 8 warps do not
# (tests/test_kernels_compile.py checks every choice for sm_80 and sm_90).
def kernel_config(head_dim_pad: int, dtype: torch.dtype) -> dict:
    """BLOCK_N, num_warps and num_stages of the decode kernel for a padded head dim and the cache dtype."""
    if INTERPRET:
        # Tiles of 16 tokens with the tests' block sizes of 1..16 make tiles straddle several blocks.
        return dict(BLOCK_N=16, num_warps=4, num_stages=1)
    if dtype == torch.float32 and head_dim_pad >= 128:
        return dict(BLOCK_N=32, num_warps=8, num_stages=3)
    return dict(BLOCK_N=64, num_warps=4, num_stages=3)


@triton.jit
def _paged_decode_kernel(Q, KCache, VCache, BlockTables, ContextLens, Out, PartialOut, PartialLse, stride_lens,
                         stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                         stride_table_s, stride_table_b, stride_os, stride_oh,
                         stride_part_s, stride_part_h, stride_part_split, stride_lse_s, stride_lse_h, qk_scale,
                         GROUP_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
                         QUERY_ROWS: tl.constexpr, KV_BLOCK_SIZE: tl.constexpr, SPLIT: tl.constexpr,
                         DOT_DTYPE: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """One program: one (sequence, kv head, split); attends the group's query heads to the split's tokens."""
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    context_len = tl.load(ContextLens + seq * stride_lens)
    # Each sequence divides its own context evenly (in whole tiles), so short and long sequences in one batch
    # both spread over all splits; a short sequence may leave trailing splits empty.
    tokens_per_split = tl.cdiv(tl.cdiv(context_len, tl.num_programs(2)), BLOCK_N) * BLOCK_N
    split_start = split * tokens_per_split
    split_end = tl.minimum(split_start + tokens_per_split, context_len)

    rows = tl.arange(0, QUERY_ROWS)
    row_ok = rows < GROUP_SIZE
    heads = kv_head * GROUP_SIZE + rows
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = offs_d < HEAD_DIM
    q = tl.load(Q + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & dim_ok[None, :], other=0.0).to(DOT_DTYPE)  # (QUERY_ROWS, HEAD_DIM_PAD)

    acc = tl.zeros([QUERY_ROWS, HEAD_DIM_PAD], dtype=tl.float32)
    row_sum = tl.zeros([QUERY_ROWS], dtype=tl.float32)
    # -inf is safe: every visited tile holds at least one real token, so the first max is finite.
    row_max = tl.full([QUERY_ROWS], float("-inf"), dtype=tl.float32)
    table_row = BlockTables + seq * stride_table_s
    for tile_start in range(split_start, split_end, BLOCK_N):
        tokens = tile_start + tl.arange(0, BLOCK_N)
        token_ok = tokens < split_end
        # Unused table entries may hold -1: masked tokens read block 0's address but load nothing.
        block_ids = tl.load(table_row + (tokens // KV_BLOCK_SIZE) * stride_table_b, mask=token_ok, other=0)
        block_ids = block_ids.to(tl.int64)  # a large pool's byte offsets overflow int32
        offset_in_block = tokens % KV_BLOCK_SIZE
        tile_mask = token_ok[:, None] & dim_ok[None, :]
        k_rows = block_ids * stride_kb + offset_in_block * stride_kt + kv_head * stride_kh
        k = tl.load(KCache + k_rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)  # (BLOCK_N, D_PAD)
        # (QUERY_ROWS, BLOCK_N) scores in log2 units
        scores = tl.dot(q, tl.trans(k.to(DOT_DTYPE)), input_precision=DOT_PRECISION) * qk_scale
        scores = tl.where(token_ok[None, :], scores, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(scores, 1))
        p = tl.exp2(scores - new_max[:, None])
        correction = tl.exp2(row_max - new_max)  # rescales what was summed under the old max
        row_sum = row_sum * correction + tl.sum(p, 1)
        v_rows = block_ids * stride_vb + offset_in_block * stride_vt + kv_head * stride_vh
        v = tl.load(VCache + v_rows[:, None] + offs_d[None, :], mask=tile_mask, other=0.0)
        acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc * correction[:, None], input_precision=DOT_PRECISION)
        row_max = new_max

    # An empty split (row_sum == 0) writes zeros and lse = -inf: the merge then gives it weight exp2(-inf) = 0.
    has_tokens = row_sum > 0.0
    safe_sum = tl.where(has_tokens, row_sum, 1.0)
    out = acc / safe_sum[:, None]
    store_mask = row_ok[:, None] & dim_ok[None, :]
    if SPLIT:
        lse = tl.where(has_tokens, row_max + tl.log2(safe_sum), float("-inf"))
        part_base = seq * stride_part_s + split * stride_part_split
        tl.store(PartialOut + part_base + heads[:, None] * stride_part_h + offs_d[None, :], out, mask=store_mask)
        tl.store(PartialLse + seq * stride_lse_s + heads * stride_lse_h + split, lse, mask=row_ok)
    else:
        tl.store(Out + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(Out.dtype.element_ty), mask=store_mask)


@triton.jit
def _merge_splits_kernel(PartialOut, PartialLse, Out, num_splits,
                         stride_part_s, stride_part_h, stride_part_split, stride_lse_s, stride_lse_h,
                         stride_os, stride_oh,
                         HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr):
    """One program per (sequence, query head): out = sum_s o_s * exp2(lse_s) / sum_s exp2(lse_s), stably."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    splits = tl.arange(0, SPLITS_PAD)
    split_ok = splits < num_splits
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    dim_ok = offs_d < HEAD_DIM
    lse = tl.load(PartialLse + seq * stride_lse_s + head * stride_lse_h + splits,
                  mask=split_ok, other=float("-inf"))  # (SPLITS_PAD,)
    # An empty split (lse = -inf) gets weight exp2(-inf) = 0. Split 0 holds the first token, so the max is finite
    # unless the sequence has no tokens at all (context length 0, a padding slot): then subtracting 0 instead of
    # -inf keeps every weight 0 (not NaN), and out is 0.
    max_lse = tl.max(lse, 0)
    weights = tl.exp2(lse - tl.where(max_lse > float("-inf"), max_lse, 0.0))
    partial = tl.load(PartialOut + seq * stride_part_s + head * stride_part_h + splits[:, None] * stride_part_split
                      + offs_d[None, :], mask=split_ok[:, None] & dim_ok[None, :], other=0.0)  # (SPLITS_PAD, D_PAD)
    total = tl.sum(weights, 0)
    out = tl.sum(weights[:, None] * partial, 0) / tl.where(total > 0.0, total, 1.0)
    tl.store(Out + seq * stride_os + head * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=dim_ok)


def auto_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, num_sms: int,
                    policy: SplitPolicy = SplitPolicy()) -> int:
    """Splits per sequence: enough programs to fill the GPU, but never splits shorter than the policy allows."""
    programs = num_seqs * num_kv_heads
    wanted = -(-policy.programs_per_sm * num_sms // programs)  # ceil division
    worthwhile = max_context_len // policy.min_tokens_per_split
    return max(1, min(wanted, worthwhile, policy.max_splits))


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; under the interpreter a small stand-in GPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def _next_power_of_2(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum): Triton block shapes must be powers of two."""
    return max(minimum, 1 << (n - 1).bit_length())


def paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, *, softmax_scale=None,
                           num_splits: int | None = None, out=None):
    """Decode attention over a paged KV cache: q (num_seqs, n_head, head_dim) -> out of the same shape and dtype.

    num_splits=None picks a split count from the batch and the block table's capacity (known on the host, so no
    GPU sync; pass num_splits yourself if tables are much wider than the longest context). `out`, if given,
    receives the result (for preallocated buffers). A context length of 0 (a padding slot) gives zeros.
    Off-GPU without TRITON_INTERPRET=1 this runs paged_decode_attention_reference.
    """
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    if out is not None and (out.shape != q.shape or out.dtype != q.dtype or out.device != q.device
                            or out.stride(-1) != 1):
        raise ValueError(f"out is {tuple(out.shape)} {out.dtype} on {out.device} with strides {out.stride()}: "
                         f"need {tuple(q.shape)} {q.dtype} on {q.device} with stride 1 on the head dim")
    if num_splits is not None and (not isinstance(num_splits, int) or num_splits < 1):
        raise ValueError(f"num_splits={num_splits!r}: need a positive int, or None to choose automatically")
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    if not (q.is_cuda or INTERPRET):
        result = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens,
                                                  softmax_scale=softmax_scale)
        return result if out is None else out.copy_(result)
    if k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("k_cache and v_cache need stride 1 on the head dim; copying the whole pool per call "
                         "would defeat the kernel")
    if not q.is_cuda:
        _check_context_values(block_tables, context_lens, k_cache.shape[0], k_cache.shape[1])  # no sync off-GPU
    num_seqs, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    out = torch.empty_like(q) if out is None else out
    if num_seqs == 0:
        return out
    q = q if q.stride(-1) == 1 else q.contiguous()
    if num_splits is None:
        # The table's capacity bounds every context length and is known on the host, unlike context_lens.
        num_splits = auto_num_splits(num_seqs, num_kv_heads, block_tables.shape[1] * block_size, _num_sms(q.device))
    group_size = num_heads // num_kv_heads
    head_dim_pad = _next_power_of_2(head_dim, 16)
    dot_dtype, dot_precision = dot_dtype_and_precision(q.dtype)
    partial_out = torch.empty(num_seqs, num_heads, num_splits, head_dim, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(num_seqs, num_heads, num_splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, block_tables, context_lens, out, partial_out, partial_lse, context_lens.stride(0),
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), block_tables.stride(0), block_tables.stride(1),
        out.stride(0), out.stride(1), partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
        partial_lse.stride(0), partial_lse.stride(1), softmax_scale * LOG2_E,
        GROUP_SIZE=group_size, HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad,
        QUERY_ROWS=_next_power_of_2(group_size, 16), KV_BLOCK_SIZE=block_size, SPLIT=num_splits > 1,
        DOT_DTYPE=dot_dtype, DOT_PRECISION=dot_precision, **kernel_config(head_dim_pad, q.dtype))
    if num_splits > 1:
        _merge_splits_kernel[(num_seqs, num_heads)](
            partial_out, partial_lse, out, num_splits, partial_out.stride(0), partial_out.stride(1),
            partial_out.stride(2), partial_lse.stride(0), partial_lse.stride(1), out.stride(0), out.stride(1),
            HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, SPLITS_PAD=_next_power_of_2(num_splits, 2))
    return out


def paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens, *, softmax_scale=None):
    """Plain-torch paged decode attention (gather every context, masked softmax); the CPU path, fp32+ math."""
    _check_inputs(q, k_cache, v_cache, block_tables, context_lens)
    _check_context_values(block_tables, context_lens, k_cache.shape[0], k_cache.shape[1])
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_context = int(context_lens.max()) if num_seqs else 0
    positions = torch.arange(max_context, device=q.device)
    visible = positions[None, :] < context_lens[:, None].long()  # (num_seqs, max_context)
    block_ids = block_tables.long()[:, positions // block_size]  # (num_seqs, max_context)
    block_ids = torch.where(visible, block_ids, 0)  # unused table entries may be -1
    offsets = (positions % block_size).expand_as(block_ids)
    math_dtype = torch.promote_types(q.dtype, torch.float32)
    keys = k_cache[block_ids, offsets].to(math_dtype)  # (num_seqs, max_context, n_kv_head, head_dim)
    values = v_cache[block_ids, offsets].to(math_dtype)
    grouped_q = q.to(math_dtype).view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.einsum("skgd,stkd->skgt", grouped_q, keys) * softmax_scale  # (num_seqs, n_kv, group, ctx)
    scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
    # A context of length 0 has every score -inf, whose softmax is NaN: its weights are zeros instead.
    weights = torch.softmax(scores, dim=-1).masked_fill(~visible.any(1)[:, None, None, None], 0.0)
    out = torch.einsum("skgt,stkd->skgd", weights, values)
    return out.reshape(num_seqs, num_heads, head_dim).to(q.dtype)


@triton.jit
def _write_kv_kernel(K, V, KCache, VCache, SlotMapping, stride_k, stride_v,
                     ROW: tl.constexpr, ROW_PAD: tl.constexpr):
    """One program per token: copy its k and v rows (n_kv_head * head_dim values) to its slot, unless it is -1."""
    token = tl.program_id(0)
    slot = tl.load(SlotMapping + token).to(tl.int64)  # slot * ROW passes 2^31 in a pool of a few GiB
    if slot >= 0:
        cols = tl.arange(0, ROW_PAD)
        mask = cols < ROW
        tl.store(KCache + slot * ROW + cols, tl.load(K + token * stride_k + cols, mask=mask), mask=mask)
        tl.store(VCache + slot * ROW + cols, tl.load(V + token * stride_v + cols, mask=mask), mask=mask)


def write_kv(k_cache, v_cache, k, v, slot_mapping, *, use_kernel: bool | None = None):
    """Store k, v (num_tokens, n_kv_head, head_dim) at slots block_id * block_size + offset; slot -1 is skipped.

    Slots must be distinct. The kernel (default: on CUDA) skips -1 slots itself, so it never waits for the GPU
    and CUDA graphs can capture it (padded decode rows use slot -1). The torch path selects the kept slots first:
    on a GPU that would be a host sync, on the CPU it is the cheaper path.
    """
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if not isinstance(cache, torch.Tensor) or cache.dim() != 4 or not cache.is_contiguous():
            raise ValueError(f"{name} must be a contiguous (num_blocks, block_size, n_kv_head, head_dim) tensor, "
                             f"got {getattr(cache, 'shape', cache)!r}")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} must match")
    for name, new, cache in (("k", k, k_cache), ("v", v, v_cache)):
        if new.dim() != 3 or new.shape[1:] != cache.shape[2:] or new.dtype != cache.dtype:
            raise ValueError(f"{name} is {tuple(new.shape)} {new.dtype}: need (num_tokens, {cache.shape[2]}, "
                             f"{cache.shape[3]}) {cache.dtype} like the cache")
    num_tokens = k.shape[0]
    if v.shape[0] != num_tokens or slot_mapping.shape != (num_tokens,) or slot_mapping.is_floating_point():
        raise ValueError(f"slot_mapping {tuple(slot_mapping.shape)} {slot_mapping.dtype}, v {tuple(v.shape)}: need "
                         f"one integer slot per token of k ({num_tokens})")
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if not slot_mapping.is_cuda and num_tokens:  # on GPU this check would cost a sync
        lowest, highest = int(slot_mapping.min()), int(slot_mapping.max())
        if lowest < -1 or highest >= num_slots:
            raise ValueError(f"slot_mapping values must lie in [-1, {num_slots}), got {lowest}..{highest}")
    if k.is_cuda if use_kernel is None else use_kernel:
        if num_tokens:
            row = k_cache.shape[2] * k_cache.shape[3]
            k, v = (x if x[0].is_contiguous() else x.contiguous() for x in (k, v))  # each token's row in one piece
            _write_kv_kernel[(num_tokens,)](k, v, k_cache, v_cache, slot_mapping, k.stride(0), v.stride(0),
                                            ROW=row, ROW_PAD=triton.next_power_of_2(row))
        return
    kept = (slot_mapping >= 0).nonzero().squeeze(1)  # (num_kept,)
    slots = slot_mapping[kept].long()
    k_cache.view(num_slots, *k_cache.shape[2:]).index_copy_(0, slots, k[kept])
    v_cache.view(num_slots, *v_cache.shape[2:]).index_copy_(0, slots, v[kept])


def _check_inputs(q, k_cache, v_cache, block_tables, context_lens):
    """Validate shapes, dtypes and devices (not values: on GPU those would cost a host sync)."""
    tensors = (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("block_tables", block_tables),
               ("context_lens", context_lens))
    for name, x in tensors:
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device}, q on {q.device}: need one device")
    if q.dtype not in SUPPORTED_DTYPES or k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise ValueError(f"q, k_cache, v_cache dtypes {q.dtype}, {k_cache.dtype}, {v_cache.dtype}: need one of "
                         f"{SUPPORTED_DTYPES} for all three")
    if q.dim() != 3 or k_cache.dim() != 4 or k_cache.shape != v_cache.shape:
        raise ValueError(f"q {tuple(q.shape)}, k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}: need "
                         "q (num_seqs, n_head, head_dim), caches (num_blocks, block_size, n_kv_head, head_dim)")
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        raise ValueError(f"cache head_dim {k_cache.shape[3]} != q head_dim {head_dim}")
    if num_kv_heads == 0 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{num_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    if block_tables.dim() != 2 or block_tables.shape[0] != num_seqs or block_tables.dtype not in (torch.int32,
                                                                                                  torch.int64):
        raise ValueError(f"block_tables {tuple(block_tables.shape)} {block_tables.dtype}: need ({num_seqs}, "
                         "max_blocks_per_seq) int32")
    if context_lens.shape != (num_seqs,) or context_lens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"context_lens {tuple(context_lens.shape)} {context_lens.dtype}: need ({num_seqs},) int32")


def _check_context_values(block_tables, context_lens, num_blocks, block_size):
    """Every context length in [0, table capacity], every block id it uses in [0, num_blocks)."""
    capacity = block_tables.shape[1] * block_size
    lengths = context_lens.long()
    bad_length = (lengths < 0) | (lengths > capacity)
    if bad_length.any():
        seq = int(bad_length.nonzero()[0])
        raise ValueError(f"context_lens[{seq}] = {int(lengths[seq])}: need 0 <= length <= {capacity} "
                         f"(block table width {block_tables.shape[1]} x block_size {block_size})")
    blocks_used = -(-lengths // block_size)  # (num_seqs,)
    used = torch.arange(block_tables.shape[1], device=lengths.device)[None, :] < blocks_used[:, None]
    bad_id = used & ((block_tables < 0) | (block_tables >= num_blocks))  # (num_seqs, max_blocks_per_seq)
    if bad_id.any():
        seq = int(bad_id.any(1).nonzero()[0])
        raise ValueError(f"block_tables[{seq}] uses block ids {block_tables[seq, :int(blocks_used[seq])].tolist()}: "
                         f"need ids in [0, {num_blocks})")

"""Tests for kernels/paged_attention.py: the Triton decode kernel (the interpreter on CPU), its torch reference
and write_kv, against a float64 attention that rebuilds each context by concatenating its blocks."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import paged_attention as paged_module
from kernels.paged_attention import (SplitPolicy, auto_num_splits, paged_decode_attention,
                                     paged_decode_attention_reference, write_kv)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Max error allowed: ATOL + RTOL * |reference|. Outputs are weighted means of unit-normal values (so O(1));
# half precision loses bits where q, K, V, P are rounded and the output is stored in the input dtype.
TOLERANCE = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.5e-2, 1e-2)}


def naive_paged_attention_float64(q, k_cache, v_cache, block_tables, context_lens, softmax_scale):
    """Per sequence: concatenate its blocks into contiguous K/V, cut to length; per head a float64 softmax."""
    num_seqs, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for seq in range(num_seqs):
        length = int(context_lens[seq])
        blocks = block_tables[seq, :math.ceil(length / block_size)].tolist()
        keys = torch.cat([k_cache[block].cpu() for block in blocks]).double()[:length]  # (length, n_kv, D)
        values = torch.cat([v_cache[block].cpu() for block in blocks]).double()[:length]
        for head in range(num_heads):
            kv_head = head // (num_heads // num_kv_heads)
            weights = torch.softmax(keys[:, kv_head] @ q[seq, head].cpu().double() * softmax_scale, dim=0)
            out[seq, head] = weights @ values[:, kv_head]
    return out


def make_case(seed, context_lens, num_kv_heads, group_size, head_dim, block_size, dtype, spare_blocks=3):
    """Random caches and queries; each table row is an independent random permutation of the pool, so blocks
    are shared between sequences, and one unused column of -1 follows the longest sequence's blocks."""
    generator = torch.Generator().manual_seed(seed)
    max_blocks = max(math.ceil(length / block_size) for length in context_lens)
    num_blocks = max_blocks + spare_blocks
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, generator=generator).to(dtype)
    v_cache = torch.randn(cache_shape, generator=generator).to(dtype)
    # Scaled up so the softmax is peaked rather than nearly uniform over the context.
    q = (2 * torch.randn(len(context_lens), num_kv_heads * group_size, head_dim, generator=generator)).to(dtype)
    block_tables = torch.full((len(context_lens), max_blocks + 1), -1, dtype=torch.int32)
    for seq, length in enumerate(context_lens):
        used = math.ceil(length / block_size)
        block_tables[seq, :used] = torch.randperm(num_blocks, generator=generator)[:used].int()
    context_lens = torch.tensor(context_lens, dtype=torch.int32)
    return [x.to(DEVICE) for x in (q, k_cache, v_cache, block_tables, context_lens)]


def assert_matches_float64(out, q, k_cache, v_cache, block_tables, context_lens, softmax_scale=None):
    """out (in q's dtype) against the float64 naive attention, within the dtype's tolerance."""
    softmax_scale = q.shape[-1] ** -0.5 if softmax_scale is None else softmax_scale
    expected = naive_paged_attention_float64(q, k_cache, v_cache, block_tables, context_lens, softmax_scale)
    assert out.dtype == q.dtype and out.shape == q.shape
    atol, rtol = TOLERANCE[q.dtype]
    error = (out.cpu().double() - expected).abs()
    allowed = atol + rtol * expected.abs()
    assert (error <= allowed).all(), f"max error {error.max().item():.3g}, worst excess {(error - allowed).max():.3g}"


# An orthogonal array over (group size, head_dim, dtype, num_splits): every pair of levels of any two factors
# appears in some row, so 9 kernel runs cover all pairwise interactions that 54 would.
GROUPS, HEAD_DIMS = (1, 2, 4), (16, 32, 64)
DTYPES, SPLITS = (torch.float32, torch.float16, torch.bfloat16), (1, 2, 5)
ORTHOGONAL_ROWS = [(0, 0, 0, 0), (0, 1, 1, 1), (0, 2, 2, 2), (1, 0, 1, 2), (1, 1, 2, 0), (1, 2, 0, 1),
                   (2, 0, 2, 1), (2, 1, 0, 2), (2, 2, 1, 0)]


@pytest.mark.parametrize("row", ORTHOGONAL_ROWS)
def test_kernel_matches_float64_over_groups_head_dims_dtypes_splits(row):
    group_size, head_dim = GROUPS[row[0]], HEAD_DIMS[row[1]]
    dtype, num_splits = DTYPES[row[2]], SPLITS[row[3]]
    block_size = (16, 4, 8)[row[0]]
    # Lengths 1, a non-multiple of the block size and one spanning several 16-token tiles.
    case = make_case(sum(row), [1, 2 * block_size + 3, 45], num_kv_heads=2, group_size=group_size,
                     head_dim=head_dim, block_size=block_size, dtype=dtype)
    out = paged_decode_attention(*case, num_splits=num_splits)
    assert_matches_float64(out, *case)


@settings(max_examples=12, deadline=None, derandomize=True)
@given(context_lens=st.lists(st.integers(1, 70), min_size=1, max_size=3), num_kv_heads=st.integers(1, 2),
       group_size=st.sampled_from([1, 3, 8]), head_dim=st.sampled_from([16, 24, 40]),
       block_size=st.sampled_from([1, 5, 16, 32]), num_splits=st.integers(1, 7), seed=st.integers(0, 2**16))
def test_kernel_matches_float64_on_random_shapes(context_lens, num_kv_heads, group_size, head_dim, block_size,
                                                 num_splits, seed):
    # Group sizes and head dims that are not powers of two exercise the padded query rows and head lanes.
    case = make_case(seed, context_lens, num_kv_heads, group_size, head_dim, block_size, torch.float32)
    out = paged_decode_attention(*case, num_splits=num_splits, softmax_scale=0.3)
    assert_matches_float64(out, *case, softmax_scale=0.3)


def test_reference_matches_float64():
    case = make_case(7, [1, 9, 33, 64], num_kv_heads=2, group_size=3, head_dim=24, block_size=8,
                     dtype=torch.float32)
    assert_matches_float64(paged_decode_attention_reference(*case), *case)


def test_off_gpu_without_interpreter_runs_the_reference(monkeypatch):
    if DEVICE == "cuda":
        pytest.skip("the dispatch to the reference only happens off-GPU")
    monkeypatch.setattr(paged_module, "INTERPRET", False)
    case = make_case(3, [5, 20], num_kv_heads=1, group_size=2, head_dim=16, block_size=4, dtype=torch.float32)
    out = torch.empty_like(case[0])
    assert paged_decode_attention(*case, out=out) is out
    torch.testing.assert_close(out, paged_decode_attention_reference(*case), rtol=0, atol=0)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Fresh float tensors from torch.empty / empty_like come filled with NaN, so any element a kernel forgets
    to write (an empty split's partial output, say) shows up in the result instead of hiding as stale memory."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(tensor):
        return tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *args, **kwargs: poison(real_empty(*args, **kwargs)))
    monkeypatch.setattr(torch, "empty_like", lambda *args, **kwargs: poison(real_empty_like(*args, **kwargs)))


@pytest.mark.parametrize("num_splits", [1, 6])
def test_poisoned_buffers_are_fully_overwritten(poisoned_allocations, num_splits):
    # With 6 splits the length-1 and length-3 sequences leave most splits empty.
    q, k_cache, v_cache, block_tables, context_lens = make_case(
        11, [1, 3, 40], num_kv_heads=2, group_size=2, head_dim=32, block_size=4, dtype=torch.float16)
    assert_matches_float64(paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens,
                                                  num_splits=num_splits), q, k_cache, v_cache, block_tables,
                           context_lens)
    # A caller's buffer with a NaN margin: the view is fully written, the margin beyond it untouched.
    wide = torch.full((*q.shape[:2], q.shape[2] + 8), float("nan"), dtype=q.dtype, device=DEVICE)
    out = wide[..., :q.shape[2]]
    result = paged_decode_attention(q, k_cache, v_cache, block_tables, context_lens, num_splits=num_splits,
                                    out=out)
    assert result.data_ptr() == wide.data_ptr()
    assert_matches_float64(out, q, k_cache, v_cache, block_tables, context_lens)
    assert wide[..., q.shape[2]:].isnan().all()


@pytest.mark.parametrize("num_splits", [1, 4])
def test_zero_length_context_gives_zeros_and_lengths_may_be_strided(poisoned_allocations, num_splits):
    # A padding slot (context length 0) once gave NaN with split-K (the merge took exp2(-inf - -inf)); context
    # lengths that are a strided view (every other entry of a wider tensor) were read as if contiguous.
    q, k_cache, v_cache, block_tables, context_lens = make_case(
        12, [9, 1, 20], num_kv_heads=2, group_size=2, head_dim=16, block_size=4, dtype=torch.float32)
    context_lens[1] = 0
    interleaved = torch.stack([context_lens, torch.full_like(context_lens, 99)], dim=1)  # (num_seqs, 2)
    out = paged_decode_attention(q, k_cache, v_cache, block_tables, interleaved[:, 0], num_splits=num_splits)
    assert (out[1] == 0).all()
    keep = torch.tensor([0, 2], device=DEVICE)
    assert_matches_float64(out[keep], q[keep], k_cache, v_cache, block_tables[keep], context_lens[keep])
    reference = paged_decode_attention_reference(q, k_cache, v_cache, block_tables, context_lens)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=2e-5)


def test_auto_num_splits_policy():
    policy = SplitPolicy(programs_per_sm=2, min_tokens_per_split=256, max_splits=32)
    # A full batch already gives every SM two programs: no split.
    assert auto_num_splits(64, 8, 32768, num_sms=132, policy=policy) == 1
    # One sequence, 8 kv heads, 32k tokens: ceil(264 / 8) = 33 splits wanted, capped at 32.
    assert auto_num_splits(1, 8, 32768, num_sms=132, policy=policy) == 32
    # Short context: each split must keep at least 256 tokens.
    assert auto_num_splits(1, 8, 1000, num_sms=132, policy=policy) == 1000 // 256
    assert auto_num_splits(1, 1, 100, num_sms=132, policy=policy) == 1


def test_automatic_splits_on_a_long_context_match_float64():
    case = make_case(5, [600, 37], num_kv_heads=1, group_size=4, head_dim=16, block_size=16, dtype=torch.float32)
    capacity = case[3].shape[1] * 16
    assert auto_num_splits(2, 1, capacity, paged_module._num_sms(case[0].device)) > 1  # the split path runs
    assert_matches_float64(paged_decode_attention(*case), *case)


@pytest.mark.parametrize("use_kernel", [False, True])
def test_write_kv_round_trip_and_skipped_slots(use_kernel):
    generator = torch.Generator().manual_seed(0)
    num_blocks, block_size, num_kv_heads, head_dim = 6, 4, 2, 8
    k_cache = torch.randn(num_blocks, block_size, num_kv_heads, head_dim, generator=generator).to(DEVICE)
    v_cache = torch.randn(k_cache.shape, generator=generator).to(DEVICE)
    k_before, v_before = k_cache.clone(), v_cache.clone()
    slots = torch.randperm(num_blocks * block_size, generator=generator)[:10]
    slots[[1, 4, 7]] = -1
    k = torch.randn(10, num_kv_heads, head_dim, generator=generator).to(DEVICE)
    v = torch.randn(10, num_kv_heads, head_dim, generator=generator).to(DEVICE)
    write_kv(k_cache, v_cache, k, v, slots.to(DEVICE), use_kernel=use_kernel)
    expected_k, expected_v = k_before.clone(), v_before.clone()
    for token, slot in enumerate(slots.tolist()):
        if slot >= 0:  # spelled out as (block, offset) rather than the flat slot the function uses
            expected_k[slot // block_size, slot % block_size] = k[token]
            expected_v[slot // block_size, slot % block_size] = v[token]
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0)


def test_write_kv_then_attention_equals_attention_over_the_written_tokens():
    # Tokens are written one sequence after another into blocks taken from a shuffled free list; attention
    # through the block tables must then equal plain attention over each sequence's tokens in order.
    generator = torch.Generator().manual_seed(1)
    num_kv_heads, group_size, head_dim, block_size, lengths = 2, 2, 16, 4, [7, 1, 13]
    num_blocks = 10
    k_cache = torch.zeros(num_blocks, block_size, num_kv_heads, head_dim, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    free_blocks = torch.randperm(num_blocks, generator=generator).tolist()
    block_tables = torch.full((len(lengths), 4), -1, dtype=torch.int32)
    all_k, all_v, slots = [], [], []
    for seq, length in enumerate(lengths):
        for position in range(length):
            if position % block_size == 0:
                block_tables[seq, position // block_size] = free_blocks.pop()
            slots.append(int(block_tables[seq, position // block_size]) * block_size + position % block_size)
        all_k.append(torch.randn(length, num_kv_heads, head_dim, generator=generator))
        all_v.append(torch.randn(length, num_kv_heads, head_dim, generator=generator))
    write_kv(k_cache, v_cache, torch.cat(all_k).to(DEVICE), torch.cat(all_v).to(DEVICE),
             torch.tensor(slots, device=DEVICE))
    q = torch.randn(len(lengths), num_kv_heads * group_size, head_dim, generator=generator)
    out = paged_decode_attention(q.to(DEVICE), k_cache, v_cache, block_tables.to(DEVICE),
                                 torch.tensor(lengths, dtype=torch.int32, device=DEVICE), num_splits=2)
    for seq in range(len(lengths)):
        keys = all_k[seq].double().repeat_interleave(group_size, dim=1)  # (length, n_head, D)
        values = all_v[seq].double().repeat_interleave(group_size, dim=1)
        weights = torch.softmax(torch.einsum("hd,thd->ht", q[seq].double(), keys) / head_dim ** 0.5, dim=-1)
        expected = torch.einsum("ht,thd->hd", weights, values)
        torch.testing.assert_close(out[seq].cpu().double(), expected, rtol=1e-5, atol=2e-5)


def test_write_kv_rejects_bad_input():
    k_cache = torch.zeros(2, 4, 1, 8)
    v_cache = torch.zeros_like(k_cache)
    k = torch.ones(2, 1, 8)
    with pytest.raises(ValueError, match="slot_mapping values"):
        write_kv(k_cache, v_cache, k, k, torch.tensor([0, 8]))
    with pytest.raises(ValueError, match="slot_mapping values"):
        write_kv(k_cache, v_cache, k, k, torch.tensor([-2, 0]))
    with pytest.raises(ValueError, match="like the cache"):
        write_kv(k_cache, v_cache, k.half(), k, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="contiguous"):
        write_kv(k_cache.transpose(0, 1), v_cache, k, k, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="one integer slot per token"):
        write_kv(k_cache, v_cache, k, k, torch.tensor([0]))


def valid_args():
    """A small valid call, as keyword arguments, for the validation test to spoil one at a time."""
    case = make_case(0, [5, 9], num_kv_heads=2, group_size=2, head_dim=16, block_size=4, dtype=torch.float32)
    return dict(zip(("q", "k_cache", "v_cache", "block_tables", "context_lens"), case))


def lengths(*values):
    """context_lens as the launcher expects them: int32 on the test device."""
    return torch.tensor(values, dtype=torch.int32, device=DEVICE)


FIRST_COLUMN = torch.tensor([0], device=DEVICE)
# (spoiled arguments, expected message fragment, checked on GPU too?)
BAD_INPUTS = {
    "heads not a multiple": (lambda a: dict(q=a["q"][:, :3]), "not a multiple", True),
    "dtype mismatch": (lambda a: dict(k_cache=a["k_cache"].half()), "dtypes", True),
    "head dim mismatch": (lambda a: dict(q=a["q"][..., :8]), "head_dim", True),
    "table rows": (lambda a: dict(block_tables=a["block_tables"][:1]), "block_tables", True),
    "float lengths": (lambda a: dict(context_lens=a["context_lens"].float()), "context_lens", True),
    "bad num_splits": (lambda a: dict(num_splits=0), "num_splits", True),
    "bad out": (lambda a: dict(out=torch.empty_like(a["q"]).half()), "out is", True),
    "negative length": (lambda a: dict(context_lens=lengths(-1, 9)), "need 0 <= length", False),
    "too long": (lambda a: dict(context_lens=lengths(5, 17)), "<= 16", False),
    "bad block id": (lambda a: dict(block_tables=a["block_tables"].index_fill(1, FIRST_COLUMN, 99)), "block ids",
                     False),
}


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_rejects_bad_input(name):
    spoil, message, checked_on_gpu = BAD_INPUTS[name]
    if DEVICE == "cuda" and not checked_on_gpu:
        pytest.skip("values are not checked on GPU (that would cost a host sync)")
    args = valid_args()
    args.update(spoil(args))
    with pytest.raises(ValueError, match=message):
        paged_decode_attention(**args)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_real_sizes_match_float64(dtype):
    # 32 decoding sequences of up to 4k tokens, Llama-like heads (32 on 8 kv heads, D = 128), blocks of 16.
    lengths = torch.randint(1, 4096, (32,), generator=torch.Generator().manual_seed(10)).tolist()
    case = make_case(10, lengths, num_kv_heads=8, group_size=4, head_dim=128, block_size=16, dtype=dtype)
    assert_matches_float64(paged_decode_attention(*case), *case)

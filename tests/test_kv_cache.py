"""Block allocator and prefix cache: invariants under random operation sequences (hypothesis state machine),
with a shadow copy of what each pool slot holds so every prefix hit is checked against the real tokens."""
import pytest
import torch
from hypothesis import settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, rule

from nanostack.model import GPT, ModelConfig
from nanostack.serving.kv_cache import (BlockManager, allocate_kv_pools, block_hash, kv_bytes_per_block,
                                        num_blocks_for_budget)

NUM_BLOCKS, BLOCK_SIZE = 10, 3
# Tiny alphabet and a shared stem so that random sequences share prefixes and the cache gets hits.
tokens_strategy = st.tuples(st.sampled_from([(), (7, 7, 7), (7, 7, 7, 1, 2, 3)]),
                            st.lists(st.integers(0, 2), min_size=1, max_size=12)).map(lambda t: list(t[0]) + t[1])


def slot_mapping(manager, seq_id, start, end):
    """Pool slots (block_id * block_size + offset) of positions start..end-1 of a sequence."""
    table = manager.block_tables[seq_id]
    return [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, end)]


class BlockManagerMachine(RuleBasedStateMachine):
    """Drives admit / allocate / compute / append / free like a scheduler would, in random orders."""
    seqs = Bundle("seqs")

    def __init__(self):
        super().__init__()
        self.manager = BlockManager(NUM_BLOCKS, BLOCK_SIZE, enable_prefix_caching=True)
        self.tokens = {}      # seq id -> token ids
        self.computed = {}    # seq id -> positions whose K/V are written
        self.slot_holds = {}  # pool slot -> (token id at that position, the whole prefix up to it): a fake K/V
        self.next_id = 0
        self.expected_queries = self.expected_hits = 0

    @rule(target=seqs, token_ids=tokens_strategy, budget=st.integers(1, 8))
    def admit(self, token_ids, budget):
        seq_id, self.next_id = self.next_id, self.next_id + 1
        free_before = self.manager.num_free_blocks
        num_cached = self.manager.admit(seq_id, token_ids, budget)
        if num_cached is None:
            assert self.manager.num_free_blocks == free_before and seq_id not in self.manager.block_tables
            return multiple()  # refused: no sequence to track
        assert num_cached % BLOCK_SIZE == 0 and num_cached <= len(token_ids) - 1
        # A hit must hand over blocks that really hold this very prefix (the hash chain + exact compare).
        for position, slot in enumerate(slot_mapping(self.manager, seq_id, 0, num_cached)):
            assert self.slot_holds[slot] == tuple(token_ids[:position + 1])
        table = self.manager.block_tables[seq_id]
        assert len(table) == self.manager.blocks_for(num_cached + min(len(token_ids) - num_cached, budget))
        self.tokens[seq_id], self.computed[seq_id] = list(token_ids), num_cached
        self.expected_queries += len(token_ids)
        self.expected_hits += num_cached
        return seq_id

    @rule(seq_id=seqs, num_tokens=st.integers(1, 6))
    def compute(self, seq_id, num_tokens):
        """Write K/V for pending positions that have blocks, then register full blocks in the cache."""
        if seq_id not in self.tokens:
            return
        capacity = len(self.manager.block_tables[seq_id]) * BLOCK_SIZE
        start = self.computed[seq_id]
        end = min(start + num_tokens, len(self.tokens[seq_id]), capacity)
        for position, slot in zip(range(start, end), slot_mapping(self.manager, seq_id, start, end)):
            assert self.manager.ref_counts[slot // BLOCK_SIZE] == 1, "writing into a shared block"
            self.slot_holds[slot] = tuple(self.tokens[seq_id][:position + 1])
        self.computed[seq_id] = end
        self.manager.cache_full_blocks(seq_id, self.tokens[seq_id], end)

    @rule(seq_id=seqs, extra=st.integers(1, 5))
    def grow(self, seq_id, extra):
        """Allocate blocks for the next chunk, or append sampled tokens and make room for them (decode)."""
        if seq_id not in self.tokens:
            return
        tokens = self.tokens[seq_id]
        if self.computed[seq_id] == len(tokens):
            tokens.append(extra % 3)
        free_before, table_before = self.manager.num_free_blocks, list(self.manager.block_tables[seq_id])
        wanted = min(len(tokens), self.computed[seq_id] + extra)
        if self.manager.allocate(seq_id, wanted):
            assert len(self.manager.block_tables[seq_id]) >= self.manager.blocks_for(wanted)
        else:
            assert self.manager.num_free_blocks == free_before
            assert self.manager.block_tables[seq_id] == table_before

    @rule(seq_id=seqs, keep=st.integers(0, 4))
    def truncate(self, seq_id, keep):
        """Drop the blocks past computed + keep positions (rejected draft tokens)."""
        if seq_id in self.tokens:
            self.manager.truncate(seq_id, self.computed[seq_id] + keep)

    @rule(seq_id=consumes(seqs))
    def free(self, seq_id):
        """A request finishes, is aborted or preempted: all the same to the allocator."""
        if seq_id in self.tokens:
            self.manager.free(seq_id)
            del self.tokens[seq_id], self.computed[seq_id]
        self.manager.free(seq_id)  # freeing twice is a no-op, never a double free

    @invariant()
    def refcounts_match_tables(self):
        held = [0] * NUM_BLOCKS
        for table in self.manager.block_tables.values():
            assert len(set(table)) == len(table)
            for block in table:
                held[block] += 1
        assert self.manager.ref_counts == held  # never negative, and exactly the number of holders

    @invariant()
    def table_array_mirrors_the_tables(self):
        rows = [self.manager.table_rows[seq_id] for seq_id in self.manager.block_tables]
        assert len(set(rows)) == len(rows) and set(self.manager.table_rows) == set(self.manager.block_tables)
        assert not set(rows) & set(self.manager.free_rows)
        for seq_id, table in self.manager.block_tables.items():
            assert self.manager.table_array[self.manager.table_rows[seq_id], :len(table)].tolist() == table

    @invariant()
    def each_block_is_free_or_referenced(self):
        empty, evictable = list(self.manager.empty_blocks), list(self.manager.evictable)
        assert len(set(empty)) == len(empty) and not set(empty) & set(evictable)
        free = set(empty) | set(evictable)
        for block in range(NUM_BLOCKS):
            assert (block in free) == (self.manager.ref_counts[block] == 0)
        assert self.manager.num_free_blocks == len(free)

    @invariant()
    def cache_index_is_consistent(self):
        for digest, block in self.manager.cached.items():
            assert self.manager.block_hashes[block] == digest
        for block in self.manager.evictable:
            assert self.manager.block_hashes[block] is not None
        assert sum(h is not None for h in self.manager.block_hashes) == len(self.manager.cached)
        assert (self.manager.prefix_queries, self.manager.prefix_hits) == (self.expected_queries, self.expected_hits)

    def teardown(self):
        for seq_id in list(self.tokens):
            self.manager.free(seq_id)
        assert self.manager.num_free_blocks == NUM_BLOCKS
        assert all(count == 0 for count in self.manager.ref_counts)


BlockManagerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestBlockManager = BlockManagerMachine.TestCase


def test_prefix_hit_reuses_blocks_and_lru_eviction_order():
    manager = BlockManager(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5]
    assert manager.admit("a", prompt, max_new_tokens=5) == 0
    manager.cache_full_blocks("a", prompt, 5)
    first_blocks = list(manager.block_tables["a"])
    manager.free("a")
    assert manager.num_free_blocks == 4 and len(manager.evictable) == 2

    # Same first block, different second block: one block (2 tokens) is reused.
    assert manager.admit("b", [1, 2, 9, 9, 9], max_new_tokens=5) == 2
    assert manager.block_tables["b"][0] == first_blocks[0]
    assert (manager.prefix_queries, manager.prefix_hits) == (10, 2)
    # "b" took both empty blocks; the next allocation must evict the cached block [3, 4] (the only free one).
    assert manager.admit("c", [5, 6], max_new_tokens=2) == 0
    assert manager.block_tables["c"] == [first_blocks[1]]
    assert manager.lookup(prompt)[0] == [first_blocks[0]]  # [1, 2] still cached, [3, 4] gone
    assert manager.admit("d", [8], max_new_tokens=1) is None  # nothing left: refused, nothing changed
    assert manager.num_free_blocks == 0


def test_hash_chain_distinguishes_equal_blocks_with_different_prefixes():
    assert block_hash(b"", [1, 2]) != block_hash(block_hash(b"", [3, 4]), [1, 2])
    manager = BlockManager(num_blocks=8, block_size=2)
    manager.admit("a", [3, 4, 1, 2, 0], max_new_tokens=5)
    manager.cache_full_blocks("a", [3, 4, 1, 2, 0], 5)
    assert manager.lookup([1, 2, 0])[0] == []  # block [1, 2] is cached only after [3, 4]
    manager.free("a")
    disabled = BlockManager(num_blocks=8, block_size=2, enable_prefix_caching=False)
    disabled.admit("a", [3, 4, 1], 3)
    disabled.cache_full_blocks("a", [3, 4, 1], 3)
    disabled.free("a")
    assert disabled.admit("b", [3, 4, 1], 3) == 0 and disabled.prefix_queries == 0


def test_pool_size_follows_the_memory_budget():
    config = ModelConfig(vocab_size=64, n_layer=3, n_head=4, n_kv_head=2, n_embd=64)
    layout = GPT(config).kv_layout()
    assert layout == (3, 2, 16)
    per_block = kv_bytes_per_block(layout, block_size=16, dtype=torch.bfloat16)
    assert per_block == 2 * 3 * 16 * 2 * 16 * 2  # K and V, layers, positions, kv heads, head_dim, bytes
    assert num_blocks_for_budget(layout, 10 * per_block + per_block - 1, 16, torch.bfloat16) == 10
    with pytest.raises(ValueError, match="holds no block"):
        num_blocks_for_budget(layout, per_block - 1, 16, torch.bfloat16)
    k_pools, v_pools = allocate_kv_pools(layout, 10, 16, torch.bfloat16, "cpu")
    assert len(k_pools) == 3 and k_pools[0].shape == (10, 16, 2, 16) and v_pools[2].dtype == torch.bfloat16
    assert sum(p.numel() * p.element_size() for p in k_pools + v_pools) == 10 * per_block


def test_hash_collision_is_caught_by_the_token_comparison(monkeypatch):
    # A deliberately weak hash (the sum of the tokens) makes [1, 2] and [2, 1] collide.
    monkeypatch.setattr("nanostack.serving.kv_cache.block_hash", lambda parent, tokens: bytes([sum(tokens) % 256]))
    manager = BlockManager(num_blocks=4, block_size=2)
    manager.admit("a", [1, 2, 0], 3)
    manager.cache_full_blocks("a", [1, 2, 0], 3)
    assert manager.lookup([1, 2, 5])[0] == manager.block_tables["a"][:1]
    assert manager.lookup([2, 1, 5])[0] == []

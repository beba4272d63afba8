"""The paged KV cache: preallocated K/V pools, a block allocator with refcounts, and prefix caching.

Decoding one token needs the keys and values of every earlier token, per layer. Giving each request one
contiguous buffer of max_seq_len positions wastes most of it (requests end early) and fragments memory.
Paging, as in vLLM, instead cuts the cache into fixed-size blocks of `block_size` token positions:

    pool per layer   k_pool, v_pool: (num_blocks, block_size, n_kv_head, head_dim), allocated once
    block table      per sequence, the block ids holding its positions 0..: position p lives in
                     block_table[p // block_size] at offset p % block_size
    slot             block_id * block_size + offset: where a new token's K/V are written

The pool size comes from a memory budget: each block costs 2 (K and V) * n_layer * block_size * n_kv_head *
head_dim * bytes per element. The functions take that layout, (n_layer, n_kv_head, head_dim), from
`GPT.kv_layout()`, which counts the K/V heads a model holds: under tensor parallelism, its rank's share.

Prefix caching. Requests often start with the same tokens (a system prompt, a chat history). A *full* block
is identified by a hash chained over its parent block's hash and its own token ids, so equal hashes mean
equal whole prefixes (sha256; the block's tokens are also compared on a hit). A new sequence walks its full
blocks through `hash -> block id` and reuses every leading block that is there, taking a reference instead
of recomputing it; the shared blocks are full and never written again, so no copy-on-write is needed. When
the last reference to a cached block goes away the block is free, yet keeps its contents and stays findable,
in least-recently-used order, until an allocation needs its memory and evicts it.

Block tables live twice: as a list per sequence (what the allocator reasons with) and as rows of one array,
`table_array` (row `table_rows[seq_id]`), updated whenever a table grows, so that the engine gathers a step's
tables with one indexing operation instead of building a Python list per sequence per step.

Counters: `prefix_queries` and `prefix_hits` are in tokens: every sequence admitted with a lookup adds its token
count to the queries and its reused tokens to the hits (a recomputed, preempted sequence is looked up again).
"""
import hashlib
import math
from array import array
from collections import OrderedDict, deque

import numpy as np
import torch


def kv_bytes_per_block(layout: tuple[int, int, int], block_size: int, dtype: torch.dtype) -> int:
    """Bytes one block takes over all layers, K and V together; layout = (n_layer, n_kv_head, head_dim)."""
    n_layer, n_kv_head, head_dim = layout
    return 2 * n_layer * block_size * n_kv_head * head_dim * torch.empty((), dtype=dtype).element_size()


def num_blocks_for_budget(layout: tuple[int, int, int], memory_bytes: int, block_size: int, dtype: torch.dtype) -> int:
    """How many blocks fit in memory_bytes of K/V pools."""
    per_block = kv_bytes_per_block(layout, block_size, dtype)
    num_blocks = memory_bytes // per_block
    if num_blocks < 1:
        raise ValueError(f"a KV budget of {memory_bytes} bytes holds no block; one block of {block_size} "
                         f"tokens needs {per_block} bytes")
    return num_blocks


def allocate_kv_pools(layout: tuple[int, int, int], num_blocks: int, block_size: int, dtype: torch.dtype, device):
    """Zeroed K and V pools, one (num_blocks, block_size, n_kv_head, head_dim) tensor per layer each."""
    n_layer, n_kv_head, head_dim = layout
    shape = (n_layer, num_blocks, block_size, n_kv_head, head_dim)
    k_pools, v_pools = torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device)
    return list(k_pools.unbind(0)), list(v_pools.unbind(0))


def block_hash(parent_hash: bytes, token_ids) -> bytes:
    """The chained hash of a full block: sha256 over the parent block's hash and this block's token ids."""
    return hashlib.sha256(parent_hash + array("q", token_ids).tobytes()).digest()


class BlockManager:
    """Block tables per sequence, refcounted blocks, a free list, and the prefix cache over full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks and block_size must be >= 1, got {num_blocks} and {block_size}")
        self.num_blocks, self.block_size = num_blocks, block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks    # set while the block is in the cache
        self.block_tokens: list[tuple | None] = [None] * num_blocks    # its token ids, compared on every hit
        self.cached: dict[bytes, int] = {}                             # hash -> block id
        self.empty_blocks = deque(range(num_blocks))                   # free and holding nothing reusable
        self.evictable: OrderedDict[int, None] = OrderedDict()         # free cached blocks, least recently used first
        self.block_tables: dict[object, list[int]] = {}
        self.hash_chains: dict[object, list[bytes]] = {}               # hashes of each sequence's leading full blocks
        self.table_array = np.zeros((8, 8), dtype=np.int32)           # row r: a table's block ids (grows on demand)
        self.table_rows: dict[object, int] = {}                        # seq_id -> its row in table_array
        self.free_rows = list(range(8))
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation can take now: empty ones plus cached ones nobody references."""
        return len(self.empty_blocks) + len(self.evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some sequence."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold num_tokens positions."""
        return math.ceil(num_tokens / self.block_size)

    def lookup(self, token_ids) -> tuple[list[int], list[bytes]]:
        """Cached blocks holding a leading run of token_ids' full blocks, and their hashes. Changes nothing.

        The last token is never covered, so the sequence always has a token to compute for its next logits."""
        blocks, hashes = [], []
        if not self.enable_prefix_caching:
            return blocks, hashes
        parent = b""
        for i in range((len(token_ids) - 1) // self.block_size):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            parent = block_hash(parent, tokens)
            block = self.cached.get(parent)
            if block is None or self.block_tokens[block] != tokens:
                break
            blocks.append(block)
            hashes.append(parent)
        return blocks, hashes

    def admit(self, seq_id, token_ids, max_new_tokens: int, use_prefix_cache: bool = True) -> int | None:
        """Start a sequence: reuse its cached prefix (if allowed) and allocate blocks for up to max_new_tokens more
        tokens. Returns the number of cached tokens, or None (and nothing changes) if free blocks do not suffice."""
        if seq_id in self.block_tables:
            raise ValueError(f"sequence {seq_id!r} already holds blocks; free it before admitting it again")
        prefix, hashes = self.lookup(token_ids) if use_prefix_cache else ([], [])
        num_cached = len(prefix) * self.block_size
        num_tokens = num_cached + min(len(token_ids) - num_cached, max_new_tokens)
        revived = sum(1 for block in prefix if self.ref_counts[block] == 0)  # free now, taken by the hit
        if self.blocks_for(num_tokens) - len(prefix) > self.num_free_blocks - revived:
            return None
        for block in prefix:
            if self.ref_counts[block] == 0:
                del self.evictable[block]
            self.ref_counts[block] += 1
        self.block_tables[seq_id] = []
        self.table_rows[seq_id] = self._take_row()
        self._extend_table(seq_id, prefix)
        self.hash_chains[seq_id] = hashes
        self.allocate(seq_id, num_tokens)
        if use_prefix_cache and self.enable_prefix_caching:
            self.prefix_queries += len(token_ids)
            self.prefix_hits += num_cached
        return num_cached

    def allocate(self, seq_id, num_tokens: int) -> bool:
        """Grow a sequence's block table to hold num_tokens positions; False (nothing changes) if blocks run out."""
        missing = -(-num_tokens // self.block_size) - len(self.block_tables[seq_id])  # ceil: called per token
        if missing <= 0:
            return True
        if missing > self.num_free_blocks:
            return False
        self._extend_table(seq_id, [self._take_free_block() for _ in range(missing)])
        return True

    def _extend_table(self, seq_id, blocks: list[int]) -> None:
        """Append blocks to a sequence's table, in its list and in its row of table_array."""
        table, row = self.block_tables[seq_id], self.table_rows[seq_id]
        start = len(table)
        table += blocks
        if len(table) > self.table_array.shape[1]:  # widen to the next power of two
            wider = np.zeros((self.table_array.shape[0], 1 << (len(table) - 1).bit_length()), dtype=np.int32)
            wider[:, :self.table_array.shape[1]] = self.table_array
            self.table_array = wider
        self.table_array[row, start:len(table)] = blocks

    def _take_row(self) -> int:
        """A free row of table_array, doubling its rows when none is left."""
        if not self.free_rows:
            rows = self.table_array.shape[0]
            self.table_array = np.concatenate([self.table_array, np.zeros_like(self.table_array)])
            self.free_rows = list(range(rows, 2 * rows))
        return self.free_rows.pop()

    def _take_free_block(self) -> int:
        """An empty block if there is one, else the least recently used cached block, evicted."""
        if self.empty_blocks:
            block = self.empty_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.cached[self.block_hashes[block]]
            self.block_hashes[block] = self.block_tokens[block] = None
        self.ref_counts[block] = 1
        return block

    def cache_full_blocks(self, seq_id, token_ids, num_computed: int) -> None:
        """Enter the sequence's blocks that are full of computed K/V (the first num_computed positions) in the
        prefix cache. A block whose content is already cached elsewhere stays private."""
        if not self.enable_prefix_caching:
            return
        table, chain = self.block_tables[seq_id], self.hash_chains[seq_id]
        for i in range(len(chain), num_computed // self.block_size):
            tokens = tuple(token_ids[i * self.block_size:(i + 1) * self.block_size])
            chain.append(block_hash(chain[-1] if chain else b"", tokens))
            block = table[i]
            if chain[-1] not in self.cached and self.block_hashes[block] is None:
                self.cached[chain[-1]] = block
                self.block_hashes[block], self.block_tokens[block] = chain[-1], tokens

    def clear_prefix_cache(self) -> None:
        """Forget every cached block: their K/V came from weights that have since changed. A sequence still
        holding blocks would keep stale K/V, so the engine calls this only when none is in flight."""
        for block in self.cached.values():
            self.block_hashes[block] = self.block_tokens[block] = None
        self.cached.clear()
        self.empty_blocks.extend(self.evictable)
        self.evictable.clear()

    def free(self, seq_id) -> None:
        """Drop a sequence's references (a no-op for one holding none); cached blocks stay findable until evicted."""
        self.hash_chains.pop(seq_id, None)
        if seq_id in self.table_rows:
            self.free_rows.append(self.table_rows.pop(seq_id))
        self._release(self.block_tables.pop(seq_id, []))

    def truncate(self, seq_id, num_tokens: int) -> None:
        """Give back a sequence's blocks past its first num_tokens positions (e.g. rejected draft tokens)."""
        table = self.block_tables[seq_id]
        keep = self.blocks_for(num_tokens)
        self._release(table[keep:])
        del table[keep:]

    def _release(self, blocks: list[int]) -> None:
        # Tail first, so the LRU order evicts the ends of a shared prefix before its more widely shared start.
        for block in reversed(blocks):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] > 0:
                continue
            if self.block_hashes[block] is not None:
                self.evictable[block] = None
            else:
                self.empty_blocks.append(block)

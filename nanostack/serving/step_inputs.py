"""A serving step's inputs as one int32 buffer: built on the host with numpy, moved to the device in one copy,
and unpacked there into the token ids and the PagedBatch that GPT.forward_serving reads.

Why one buffer: a step has nine index tensors (token ids, positions, KV slots, prefill offsets, block tables, ...).
Building each from a Python list with torch.tensor and copying each to the GPU costs tens of microseconds apiece
on the host, at every step; the block tables alone are a list per sequence. Here the per-sequence work is a few
list appends in the engine, the arithmetic (slots from block tables and positions) is whole-array numpy, and
the device gets one pinned, non-blocking copy. The CUDA graphs of decode steps (cuda_graphs.py) keep static
device buffers in this same layout, so a step reaches a graph by one copy into them as well.

Everything is int32: token ids, positions and slots stay far below 2^31 (a pool of 2^31 token slots would be
hundreds of GiB), and the kernels read int32 offsets and tables.
"""
from dataclasses import dataclass

import numpy as np
import torch

from nanostack.model import PagedBatch


# The array fields of StepArrays, in the order the buffer holds them.
ARRAY_FIELDS = ("token_ids", "positions", "slot_mapping", "cu_seqlens_q", "cu_seqlens_k", "prefill_key_slots",
                "decode_block_tables", "decode_context_lens", "logits_indices")


@dataclass
class StepArrays:
    """Host-side inputs of one step (numpy int32); see PagedBatch for what each one means."""
    token_ids: np.ndarray              # (N,)
    positions: np.ndarray              # (N,)
    slot_mapping: np.ndarray           # (N,) -1 = write no K/V (padding)
    cu_seqlens_q: np.ndarray           # (P + 1,)
    cu_seqlens_k: np.ndarray           # (P + 1,)
    prefill_key_slots: np.ndarray      # (total prefill keys,)
    decode_block_tables: np.ndarray    # (D, max_blocks)
    decode_context_lens: np.ndarray    # (D,)
    logits_indices: np.ndarray         # (L,)
    num_prefill_tokens: int
    max_seqlen_q: int
    max_seqlen_k: int

    @classmethod
    def padding(cls, num_seqs: int, table_width: int) -> "StepArrays":
        """A decode-only step of padding rows alone (what the decode CUDA graphs are captured on)."""
        empty, zero = np.zeros(0, dtype=np.int32), np.zeros(1, dtype=np.int32)
        no_step = cls(empty, empty, empty, zero, zero, empty, np.zeros((0, 0), dtype=np.int32), empty, empty, 0, 0, 0)
        return no_step.padded(num_seqs, table_width)

    @property
    def is_decode_only(self) -> bool:
        """One token per sequence, every one with logits (the steps a decode CUDA graph can replay)."""
        return self.num_prefill_tokens == 0 and len(self.logits_indices) == len(self.token_ids)

    def padded(self, num_seqs: int, table_width: int) -> "StepArrays":
        """A decode-only step grown to num_seqs rows and table_width table columns. Padding rows write no K/V
        (slot -1) and attend to one key of block 0; their logits are computed and thrown away."""
        real = len(self.token_ids)
        def grown(values, fill):
            out = np.full(num_seqs, fill, dtype=np.int32)
            out[:real] = values
            return out
        tables = np.zeros((num_seqs, table_width), dtype=np.int32)
        tables[:real, :self.decode_block_tables.shape[1]] = self.decode_block_tables
        return StepArrays(grown(self.token_ids, 0), grown(self.positions, 0), grown(self.slot_mapping, -1),
                          self.cu_seqlens_q, self.cu_seqlens_k, self.prefill_key_slots, tables,
                          grown(self.decode_context_lens, 1), np.arange(num_seqs, dtype=np.int32), 0, 0, 0)

    def flat(self, pinned: bool = False) -> torch.Tensor:
        """The arrays laid end to end in one int32 host tensor (the layout `unpack` reads). Pinned memory comes
        from torch's caching host allocator, which holds a buffer back until a non-blocking copy from it ran."""
        flat = torch.from_numpy(np.concatenate([getattr(self, name).ravel() for name in ARRAY_FIELDS]))
        return flat.pin_memory() if pinned else flat

    def to_device(self, device) -> torch.Tensor:
        """`flat` on `device`: a pinned, non-blocking copy on CUDA, no copy at all on the CPU."""
        if torch.device(device).type != "cuda":
            return self.flat().to(device)
        return self.flat(pinned=True).to(device, non_blocking=True)

    def unpack(self, flat: torch.Tensor) -> tuple[torch.Tensor, PagedBatch]:
        """Views of a to_device buffer (or a graph's static copy of one): (token_ids, PagedBatch)."""
        arrays = [getattr(self, name) for name in ARRAY_FIELDS]
        pieces = flat.split([array.size for array in arrays])
        tensors = {name: piece.view(array.shape) for name, piece, array in zip(ARRAY_FIELDS, pieces, arrays)}
        token_ids = tensors.pop("token_ids")
        return token_ids, PagedBatch(**tensors, num_prefill_tokens=self.num_prefill_tokens,
                                     max_seqlen_q=self.max_seqlen_q, max_seqlen_k=self.max_seqlen_k)

"""CUDA graphs for decode steps: the decode-only serving forward, captured once per batch-size bucket and
replayed, so a decode step costs one graph launch instead of hundreds of kernel launches from Python.

A decode forward launches about ten kernels per layer. From Python each launch costs several microseconds of
host time, which at small batches is longer than the kernel itself, so the GPU idles between them. A CUDA
graph records the launches once and replays them all with one call; nano-vllm and vLLM capture decode so.

How. For each bucket size b (1, 2, 4, 8, then multiples of 16 up to max_num_seqs) a static device buffer holds
a decode step's inputs in the StepArrays layout (step_inputs.py) for b sequences, with block tables wide
enough for max_model_len. The forward over it runs once eagerly (Triton autotuning and lazy initialisation
happen there, outside the capture) and is then captured. A decode-only step of n <= max_num_seqs sequences is
padded to the smallest bucket b >= n, copied into that bucket's buffer (one non-blocking copy), replayed, and
the first n rows of the bucket's logits are its logits. Steps with prefill or draft tokens run eagerly.

Why a replay computes what the eager forward computes:
- The same kernels read the same values. The graph holds exactly the launches of GPT.forward_serving on a
  decode-only batch of b rows. Before each replay the step's inputs are copied into the buffer the capture
  read from; the K/V pools and the weights are the very tensors captured (update weights in place, with
  copy_, never by replacing the tensors).
- Nothing that varies between steps is frozen on the host. What the forward decides in Python for a
  decode-only step (no prefill tokens, the shapes b and table width) is fixed per bucket; everything that
  varies (tokens, positions, slots, block tables, context lengths) is read from device memory by the kernels.
  That needs a forward that never reads a device value back to the host: write_kv skips padding slots inside
  its kernel, and MoE counts and groups its tokens on the device (a host read would make the capture fail).
- Padding rows are inert: slot -1, so they write no K/V; they attend to one key of block 0 (finite values);
  their logits are dropped. Every op treats rows independently (matmuls per token, attention per sequence,
  MoE routing per token with no capacity limit), so padding rows change no real row.
- A wider block table changes only the split count. The paged kernel reads the first ceil(context /
  block_size) entries of each table; the width decides how many splits it uses, which reorders floating-point
  sums. Graph and eager logits therefore agree to rounding, not bit for bit.
- Outputs are consumed before they are overwritten: a bucket's logits live in graph memory that the next
  replay overwrites, and the engine samples from them (reading the tokens back) within the same step.

On a GPU, tests/test_cuda_graphs.py (run by bench/gpu.sh) checks that decoding with graphs gives the tokens of
decoding without, and that a decode step synchronises with the host once, to read the sampled tokens. Cost to
know: the padded block tables are as wide as max_model_len allows, so a long max_model_len makes each step copy
a wider table to the device.
"""
import functools

import torch

from nanostack.serving.step_inputs import StepArrays


def bucket_sizes(max_num_seqs: int) -> list[int]:
    """Batch sizes that get a graph: 1, 2, 4, 8, every multiple of 16, and max_num_seqs itself."""
    return sorted({s for s in (1, 2, 4, 8, *range(16, max_num_seqs, 16)) if s < max_num_seqs} | {max_num_seqs})


class DecodeGraphs:
    """One captured decode-only forward per bucket size; see the module docstring."""

    @torch.inference_mode()
    def __init__(self, model, k_pools, v_pools, max_num_seqs: int, table_width: int):
        self.sizes, self.table_width = bucket_sizes(max_num_seqs), table_width
        self.graphs, self.inputs, self.logits = {}, {}, {}
        self.memory_pool = None
        for size in reversed(self.sizes):  # largest first: the smaller graphs reuse its memory
            arrays = StepArrays.padding(size, table_width)
            self.inputs[size] = arrays.to_device(k_pools[0].device)  # the static input buffer of this bucket
            token_ids, batch = arrays.unpack(self.inputs[size])
            try:
                self.graphs[size], self.logits[size] = self._capture(  # logits (size, vocab)
                    functools.partial(model.forward_serving, token_ids, batch, k_pools, v_pools))
            except RuntimeError as error:
                raise RuntimeError(f"capturing the decode forward for {size} sequences failed: {error}. Something "
                                   "in it reads the GPU back to the host; serve with cuda_graphs off") from error

    def _capture(self, forward):
        """Warm forward() up, then capture it into a CUDA graph; returns (graph, the outputs it writes)."""
        side_stream = torch.cuda.Stream()  # warm up off the capturing stream, as torch.cuda.graphs asks
        side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side_stream):
            forward()  # Triton autotuning and lazy initialisation happen here, not under capture
        torch.cuda.current_stream().wait_stream(side_stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.memory_pool):
            outputs = forward()
        self.memory_pool = graph.pool()
        return graph, outputs

    def replay(self, arrays: StepArrays) -> torch.Tensor | None:
        """The logits (n, vocab) of a decode-only step of n sequences, or None when no graph fits the step."""
        num_seqs = len(arrays.token_ids)
        if not arrays.is_decode_only or num_seqs > self.sizes[-1]:
            return None
        size = next(s for s in self.sizes if s >= num_seqs)
        inputs = self.inputs[size]
        inputs.copy_(arrays.padded(size, self.table_width).flat(pinned=inputs.is_cuda), non_blocking=True)
        self.graphs[size].replay()
        return self.logits[size][:num_seqs]

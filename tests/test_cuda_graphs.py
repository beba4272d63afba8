"""CUDA graphs of decode steps (serving/cuda_graphs.py), and what they rest on: a decode step reads nothing
back from the device except the sampled tokens.

On the CPU: the padded replay through static buffers, with a stand-in for the capture that runs the captured
forward eagerly on the same buffers, gives the plain engine's tokens; and every host read of tensor values in
a decode step is recorded. On a GPU (`pytest -m cuda`, run by bench/gpu.sh): real graphs against eager
decoding, and torch's sync debug mode counting the synchronisations of one step.
"""
import copy
import sys
import warnings
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

from nanostack.sampling import SamplingParams
from nanostack.serving.cuda_graphs import DecodeGraphs, bucket_sizes
from nanostack.serving.engine import Engine, EngineConfig

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parent.parent
MAX_SEQ_LEN = 96
VARIANTS = {"gqa": {}, "moe": {"n_expert": 4, "n_expert_active": 2}}
on_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, tokenizer, sharpened_model):
    return sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN, **VARIANTS[request.param])


def requests(vocab: int, count: int = 7, all_seeded: bool = True):
    """Prompts of several lengths, greedy and sampled rows (seeded; or every other one unseeded), outputs of
    several lengths so that the decoding batch shrinks through the buckets."""
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(vocab, (3 + 5 * i,), generator=generator).tolist() for i in range(count)]
    params = [SamplingParams(max_tokens=6 + 3 * i, temperature=0 if i % 3 else 0.8,
                             seed=i if all_seeded or i % 2 else None, ignore_eos=True, logprobs=0) for i in range(count)]
    return prompts, params


def test_bucket_sizes():
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 32, 48, 64]
    assert bucket_sizes(40) == [1, 2, 4, 8, 16, 32, 40]


def test_cuda_graphs_on_the_cpu_are_ignored_with_a_notice(model):
    with pytest.warns(UserWarning, match="cuda_graphs is ignored on cpu"):
        engine = Engine(model, None, EngineConfig(cuda_graphs=True))
    assert engine.graphs is None


class EagerReplay:
    """Stands in for a captured CUDA graph off-GPU: replay() runs the forward on the bucket's static input buffer
    and writes the bucket's static logits, which is all a graph replay does."""

    def __init__(self, forward, logits):
        self.forward, self.logits, self.replays = forward, logits, 0

    def replay(self):
        self.logits.copy_(self.forward())
        self.replays += 1


class EagerDecodeGraphs(DecodeGraphs):
    """DecodeGraphs with everything but the capture: buckets, static buffers, padding, slicing."""

    def _capture(self, forward):
        logits = forward()
        return EagerReplay(forward, logits), logits


def test_padded_replays_through_static_buffers_give_the_plain_engine_tokens(model, tokenizer):
    prompts, params = requests(tokenizer.vocab_size)
    config = EngineConfig(block_size=4, max_num_seqs=6, max_num_batched_tokens=64)
    plain = Engine(model, tokenizer, config).generate(prompts, params)
    engine = Engine(model, tokenizer, config)
    engine.graphs = EagerDecodeGraphs(model, engine.k_pools, engine.v_pools, config.max_num_seqs,
                                      engine.blocks.blocks_for(engine.max_model_len))
    replayed = engine.generate(prompts, params)
    for got, want in zip(replayed, plain):
        assert got.new_token_ids == want.new_token_ids
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=1e-5, atol=1e-5)
    replays = {size: graph.replays for size, graph in engine.graphs.graphs.items()}
    assert sum(replays.values()) > 10 and sum(count > 0 for count in replays.values()) >= 3, replays


# ----------------------------------------------------------------------------------------------------------
# Host reads of device values

# Tensor methods and torch functions that need a tensor's values on the host: on a GPU each one waits for it.
READS = {"item", "tolist", "numpy", "cpu", "__bool__", "__int__", "__float__", "__index__", "nonzero", "bincount",
         "masked_select", "unique", "unique_consecutive"}


class HostReads(TorchFunctionMode):
    """Records (what, where) for every torch call that reads tensor values back to the host; `where` is the
    nanostack or kernels function that made it."""

    def __init__(self):
        super().__init__()
        self.reads = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        boolean_index = name == "__getitem__" and any(
            isinstance(index, torch.Tensor) and index.dtype == torch.bool
            for index in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in READS or boolean_index:
            self.reads.append((name, _caller()))
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.is_relative_to(ROOT / "nanostack") or path.is_relative_to(ROOT / "kernels"):
            return f"{path.stem}.{frame.f_code.co_name}"
        frame = frame.f_back
    return "?"


def test_a_decode_step_reads_back_only_the_sampled_tokens(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(block_size=4))
    prompts, params = requests(tokenizer.vocab_size, count=4, all_seeded=False)
    for i, (prompt, request_params) in enumerate(zip(prompts, params)):
        request_params.logprobs = None  # logprobs are read back too, by request
        engine.add_request(str(i), prompt, request_params)
    while any(s.num_computed_tokens < len(s.token_ids) - 1 for s in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    with HostReads() as recorder:
        assert len(engine.step()) == 4  # one decode step: greedy, seeded and unseeded sampling rows
    # write_kv's torch path selects the kept slots on the host; it is the CPU's path only (a kernel on CUDA).
    assert [read for read in recorder.reads if read[1] != "paged_attention.write_kv"] == [("tolist", "sampling.sample")]


# ----------------------------------------------------------------------------------------------------------
# On a GPU

@pytest.mark.cuda
@on_gpu
def test_cuda_graph_decoding_equals_eager_decoding(model, tokenizer):
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    prompts, params = requests(tokenizer.vocab_size, count=12)
    config = dict(block_size=16, max_num_seqs=12, max_num_batched_tokens=256)
    eager = Engine(model, tokenizer, EngineConfig(**config)).generate(prompts, params)
    engine = Engine(model, tokenizer, EngineConfig(**config, cuda_graphs=True))
    replays = []
    replay = engine.graphs.replay
    engine.graphs.replay = lambda arrays: replays.append(len(arrays.token_ids)) or replay(arrays)
    graphed = engine.generate(prompts, params)
    assert len(replays) > 10
    for got, want in zip(graphed, eager):
        # Greedy and seeded rows must agree token for token; the bf16 logits may differ in rounding only.
        assert got.new_token_ids == want.new_token_ids
        torch.testing.assert_close(got.logprobs, want.logprobs, rtol=0, atol=0.05)


@pytest.mark.cuda
@on_gpu
@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_a_gpu_decode_step_synchronizes_once(model, tokenizer, cuda_graphs):
    model = copy.deepcopy(model).to("cuda", torch.bfloat16)
    engine = Engine(model, tokenizer, EngineConfig(block_size=16, max_num_seqs=8, cuda_graphs=cuda_graphs))
    prompts, params = requests(tokenizer.vocab_size, count=4, all_seeded=False)
    for i, (prompt, request_params) in enumerate(zip(prompts, params)):
        request_params.logprobs = None
        engine.add_request(str(i), prompt, request_params)
    for _ in range(3):  # prefill, then decode steps past the warm-up of any lazy initialisation
        engine.step()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            outputs = engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert len(outputs) == 4
    syncs = [str(w.message) for w in caught if "synchroniz" in str(w.message).lower()]
    assert len(syncs) == 1, syncs  # sampling's read of the tokens

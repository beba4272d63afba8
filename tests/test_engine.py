"""Serving engine against a naive full-recompute greedy loop: mixed batches with staggered arrivals and aborts,
preemption, prefix caching, chunked prefill; stop handling, streamed UTF-8 text and logprobs."""
import copy
import math
import random
from collections import defaultdict

import pytest
import torch

from nanostack.model import GPT, ModelConfig
from nanostack.sampling import SamplingParams
from nanostack.serving.engine import Engine, EngineConfig, merge_outputs

from greedy_reference import naive_greedy

# conftest.py: `tokenizer` (tiny BPE), `sharpened_model` (fixed-seed random GPT factory), `one_thread`.
pytestmark = pytest.mark.usefixtures("one_thread")
MAX_SEQ_LEN = 160
VARIANTS = {"gqa": {}, "moe": {"n_expert": 4, "n_expert_active": 2, "n_kv_head": 1}}


@pytest.fixture(scope="module", params=list(VARIANTS))
def model(request, tokenizer, sharpened_model):
    return sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN, **VARIANTS[request.param])


def random_prompts(count, vocab, min_len, max_len, seed):
    rng = random.Random(seed)
    return [[rng.randrange(vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(count)]


def run(engine, arrivals, aborts=None):
    """Drive the engine: arrivals[step] = [(request_id, prompt, params)], aborts[step] = [request_id].
    Returns request_id -> [(step, RequestOutput)]."""
    aborts = aborts or {}
    outputs, step = defaultdict(list), 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request_id, prompt, params in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        for request_id in aborts.get(step, []):
            engine.abort(request_id)
        for out in engine.step():
            outputs[out.request_id].append((step, out))
        step += 1
        assert step < 2000, "engine made no progress"
    return outputs


def check_against_naive(model, outputs, prompts, max_tokens, skip=()):
    for request_id, prompt in prompts.items():
        if request_id in skip:
            continue
        merged = merge_outputs([out for _, out in outputs[request_id]])
        assert merged.new_token_ids == naive_greedy(model, prompt, max_tokens), request_id
        assert merged.finished and merged.finish_reason == "length"
        assert merged.completion_tokens == len(merged.new_token_ids) == len(merged.token_times)


GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


def staggered(prompts, params=GREEDY, every=2):
    arrivals = defaultdict(list)
    for i, (request_id, prompt) in enumerate(prompts.items()):
        arrivals[(i // 3) * every].append((request_id, prompt, params))
    return arrivals


def test_mixed_batch_with_arrivals_and_aborts_matches_naive(model, tokenizer):
    prompts = {f"r{i}": p for i, p in enumerate(random_prompts(10, tokenizer.vocab_size, 1, 60, seed=1))}
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, max_num_seqs=6, max_num_batched_tokens=64))
    aborts = {3: ["r1"], 6: ["r7"], 9: ["r8"]}  # running, still waiting for a slot, decoding
    outputs = run(engine, staggered(prompts), aborts)
    check_against_naive(model, outputs, prompts, GREEDY.max_tokens, skip={"r1", "r7", "r8"})
    for request_id in ("r1", "r7", "r8"):
        assert outputs[request_id][-1][1].finish_reason == "abort"
    assert not engine.has_unfinished() and engine.blocks.num_free_blocks == engine.blocks.num_blocks
    assert engine.stats().generation_tokens_total >= 7 * GREEDY.max_tokens


def test_tiny_block_pool_forces_preemption_with_same_outputs(model, tokenizer):
    prompts = {f"r{i}": p for i, p in enumerate(random_prompts(8, tokenizer.vocab_size, 10, 40, seed=2))}
    # 10 blocks of 8 = 80 positions for 8 requests of up to 52 tokens: preemption is unavoidable.
    engine = Engine(model, tokenizer, EngineConfig(block_size=8, num_blocks=10, max_num_seqs=8,
                                                   max_num_batched_tokens=32))
    outputs = run(engine, staggered(prompts, every=1))
    assert engine.stats().num_preemptions > 0
    check_against_naive(model, outputs, prompts, GREEDY.max_tokens)
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_shared_system_prompt_with_and_without_prefix_caching(model, tokenizer, prefix_caching):
    block_size, system = 8, random_prompts(1, tokenizer.vocab_size, 40, 40, seed=3)[0]
    suffixes = random_prompts(6, tokenizer.vocab_size, 1, 10, seed=4)
    prompts = {f"r{i}": system + suffix for i, suffix in enumerate(suffixes)}
    engine = Engine(model, tokenizer, EngineConfig(block_size=block_size, enable_prefix_caching=prefix_caching,
                                                   max_num_batched_tokens=64))
    # The first request runs alone, so its blocks are cached before the others arrive together.
    arrivals = {0: [("r0", prompts["r0"], GREEDY)], 20: [(rid, p, GREEDY) for rid, p in prompts.items() if rid != "r0"]}
    outputs = run(engine, arrivals)
    check_against_naive(model, outputs, prompts, GREEDY.max_tokens)
    stats = engine.stats()
    cached = {rid: outs[-1][1].cached_prompt_tokens for rid, outs in outputs.items()}
    if prefix_caching:
        # The system prompt is 5 full blocks; each later prompt is longer, so all 5 are reused.
        expected = {rid: 0 if rid == "r0" else (len(system) // block_size) * block_size for rid in prompts}
        assert cached == expected
        assert stats.prefix_cache_hits == sum(expected.values())
        assert stats.prefix_cache_queries == sum(len(p) for p in prompts.values())
    else:
        assert set(cached.values()) == {0} and stats.prefix_cache_hits == stats.prefix_cache_queries == 0


def test_chunked_prefill_keeps_decoding_and_matches_naive(model, tokenizer):
    prompts = dict(zip(["short", "long", "mid"], random_prompts(3, tokenizer.vocab_size, 5, 5, seed=5)))
    prompts["long"] = random_prompts(1, tokenizer.vocab_size, 100, 100, seed=6)[0]
    prompts["mid"] = prompts["mid"] * 6
    budget = 8
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=budget))
    params = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)
    arrivals = {0: [("short", prompts["short"], params)], 2: [("long", prompts["long"], params)],
                3: [("mid", prompts["mid"], params)]}
    outputs = run(engine, arrivals)
    check_against_naive(model, outputs, prompts, params.max_tokens)
    short_steps = [step for step, _ in outputs["short"]]
    assert short_steps == list(range(short_steps[0], short_steps[0] + params.max_tokens))  # a token every step
    # The long prompt needed at least 100 / (budget - 1) steps of prefill beside the decoding short request.
    assert outputs["long"][0][0] >= 2 + math.ceil(100 / (budget - 1)) - 1
    assert outputs["long"][0][0] < short_steps[-1]  # and those steps overlapped the short request's decoding


def test_stop_token_ids_stop_strings_and_ignore_eos(tokenizer, sharpened_model):
    model = sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN)
    prompt = random_prompts(1, tokenizer.vocab_size, 12, 12, seed=7)[0]
    reference = naive_greedy(model, prompt, 40)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))

    # Stop id: the first token of the reference that did not occur before it.
    index = next(i for i in range(3, 40) if reference[i] not in reference[:i])
    out = engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                                   stop_token_ids=[reference[index]]))[0]
    assert (out.finish_reason, out.new_token_ids) == ("stop", reference[:index + 1])
    assert out.text == tokenizer.decode(reference[:index])  # the stop token's own text is not emitted

    # The tokenizer's end-of-sequence ids stop generation unless ignore_eos (stop_token_ids stop it regardless).
    eos_tokenizer = copy.copy(tokenizer)
    eos_tokenizer.stop_ids = {reference[index]}
    eos_engine = Engine(model, eos_tokenizer, EngineConfig(block_size=8))
    out = eos_engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0))[0]
    assert (out.finish_reason, out.new_token_ids) == ("stop", reference[:index + 1])
    out = eos_engine.generate([prompt], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert (out.finish_reason, out.new_token_ids) == ("length", reference)

    # Stop string: a piece of the reference text; generation ends on the token that completes it, text cut before.
    full_text = tokenizer.decode(reference)
    start = next(i for i in range(5, len(full_text) - 3) if "\ufffd" not in full_text[i:i + 3])
    stop = full_text[start:start + 3]
    tokens_needed = next(n for n in range(1, 41) if stop in tokenizer.decode(reference[:n]))
    for params in (SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop, "\x00never"]),
                   SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=stop, logprobs=1)):
        outs = [o for _, o in run(engine, {0: [("s", prompt, params)]})["s"]]
        merged = merge_outputs(outs)
        assert merged.finish_reason == "stop" and merged.new_token_ids == reference[:tokens_needed]
        assert merged.text == full_text[:full_text.find(stop)]


def chain_model(vocab_size: int, chain: list[int]) -> GPT:
    """A real GPT rigged to continue a fixed token chain: output projections zero (each block is the identity),
    one-hot embeddings, and lm_head mapping each chain token to its successor; off-chain tokens lead to 0."""
    n_embd = 8 * math.ceil(vocab_size / 8)  # >= vocab_size, and 4 heads of even head_dim
    model = GPT(ModelConfig(vocab_size=vocab_size, n_layer=1, n_head=4, n_kv_head=4, n_embd=n_embd,
                            max_seq_len=64)).eval()
    with torch.no_grad():
        model.layers[0].attn.wo.weight.zero_()
        model.layers[0].mlp.w_down.weight.zero_()
        model.tok_emb.weight.copy_(torch.eye(vocab_size, n_embd))
        model.lm_head.weight.zero_()
        for token, successor in zip(chain, chain[1:]):
            model.lm_head.weight[successor, token] = 1.0
    return model


def stream(tokenizer, chain_text: bytes, params: SamplingParams):
    """Deltas and final output of a chain model emitting chain_text byte by byte, then <|eos|>, after '>'."""
    chain = [ord(">")] + list(chain_text) + [tokenizer.eos_id]
    assert len(set(chain)) == len(chain), "a chain token may appear once"
    engine = Engine(chain_model(tokenizer.vocab_size, chain), tokenizer, EngineConfig(block_size=4))
    outs = [o for _, o in run(engine, {0: [("c", [ord(">")], params)]})["c"]]
    return [o.text for o in outs], outs[-1]


def test_utf8_split_across_tokens_is_held_back(tokenizer):
    deltas, last = stream(tokenizer, " 🙂é!".encode(), SamplingParams(max_tokens=20, temperature=0))
    # Byte tokens: ' ', then the 4 bytes of 🙂, the 2 of é, '!', then <|eos|>.
    assert deltas == [" ", "", "", "", "🙂", "", "é", "!", ""]
    assert last.finish_reason == "stop" and "\ufffd" not in "".join(deltas)
    # Cut off inside a character: the unfinished bytes become one U+FFFD at the end, as decode() renders them.
    deltas, last = stream(tokenizer, "a🙂".encode(), SamplingParams(max_tokens=3, temperature=0))
    assert deltas == ["a", "", "\ufffd"] and last.finish_reason == "length"
    assert "".join(deltas) == tokenizer.decode(list("a🙂".encode())[:3])


@pytest.mark.parametrize("stop, expected_deltas, reason", [
    (["yq"], ["x", "", "yz", "w"], "length"),     # "y" could start "yq": held back until "z" rules it out
    (["yz"], ["x", "", ""], "stop"),              # the stop string and what follows are never emitted
    (["zw", "y"], ["x", ""], "stop"),             # the earliest match wins
    (["é"], ["x", "y", "z", "w"], "length"),      # never matched: nothing is held
])
def test_stop_string_prefixes_are_held_back(tokenizer, stop, expected_deltas, reason):
    deltas, last = stream(tokenizer, b"xyzw", SamplingParams(max_tokens=4, temperature=0, stop=stop))
    assert deltas == expected_deltas and last.finish_reason == reason


def test_stop_string_made_of_a_split_character(tokenizer):
    deltas, last = stream(tokenizer, "aéb".encode(), SamplingParams(max_tokens=10, temperature=0, stop=["é"]))
    assert deltas == ["a", "", ""] and last.finish_reason == "stop"


def test_streamed_text_concatenates_to_the_decoded_output(model, tokenizer):
    prompts = random_prompts(4, tokenizer.vocab_size, 3, 20, seed=8)
    engine = Engine(model, tokenizer, EngineConfig(block_size=8))
    params = SamplingParams(max_tokens=48, temperature=1.0, seed=11, ignore_eos=True)
    outputs = run(engine, {0: [(f"r{i}", p, params) for i, p in enumerate(prompts)]})
    for request_id, outs in outputs.items():
        merged = merge_outputs([o for _, o in outs])
        assert merged.text == tokenizer.decode(merged.new_token_ids)


def test_prompt_logprobs_and_token_logprobs_equal_full_forward(model, tokenizer):
    prompt = random_prompts(1, tokenizer.vocab_size, 30, 30, seed=9)[0]
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True, prompt_logprobs=3, logprobs=2)
    # A small budget splits the prompt into chunks: the logprobs must be stitched across them.
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_num_batched_tokens=8, max_num_seqs=2))
    first, second = engine.generate([prompt, prompt], [params, params])
    with torch.no_grad():
        reference = model(torch.tensor([prompt + first.new_token_ids]))[0].double().log_softmax(-1)
    for out in (first, second):  # the second must not take its prompt from the cache: its logprobs are needed
        assert out.cached_prompt_tokens == 0 and out.new_token_ids == first.new_token_ids
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        for j in range(1, len(prompt)):
            row = reference[j - 1]
            entry = out.prompt_logprobs[j]
            assert entry[prompt[j]] == pytest.approx(row[prompt[j]].item(), abs=1e-4)
            top_ids = row.topk(3).indices.tolist()
            assert set(top_ids) <= set(entry) and len(entry) <= 4
            assert [entry[t] for t in top_ids] == pytest.approx(row[top_ids].tolist(), abs=1e-4)
        for i, token in enumerate(out.new_token_ids):
            row = reference[len(prompt) - 1 + i]
            assert out.logprobs[i] == pytest.approx(row[token].item(), abs=1e-4)
            assert list(out.top_logprobs[i]) == row.topk(2).indices.tolist()


def test_seeded_request_is_independent_of_the_batch(model, tokenizer):
    prompt = random_prompts(1, tokenizer.vocab_size, 10, 10, seed=10)[0]
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=99, ignore_eos=True)
    alone = Engine(model, tokenizer).generate([prompt], seeded)[0].new_token_ids
    others = random_prompts(5, tokenizer.vocab_size, 2, 30, seed=11)
    noise = SamplingParams(max_tokens=20, temperature=1.2, ignore_eos=True)
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_num_batched_tokens=16, max_num_seqs=4))
    batched = engine.generate(others[:3] + [prompt] + others[3:], [noise] * 3 + [seeded] + [noise] * 2)
    assert batched[3].new_token_ids == alone


def test_requests_that_can_never_fit_finish_with_an_error(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, num_blocks=8, max_model_len=64))
    engine.add_request("too-long", list(range(64)), GREEDY)
    engine.add_request("too-big", list(range(20)), SamplingParams(max_tokens=40))  # 60 tokens > 32 slots
    engine.add_request("fine", list(range(20)), SamplingParams(max_tokens=5, ignore_eos=True))
    outputs = run(engine, {0: []})
    for request_id in ("too-long", "too-big"):
        (_, out), = outputs[request_id]
        assert out.finished and out.finish_reason == "error" and out.error and out.new_token_ids == []
    assert merge_outputs([o for _, o in outputs["fine"]]).completion_tokens == 5


def test_generation_is_capped_at_max_model_len(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_model_len=24))
    out = engine.generate([list(range(20))], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and out.completion_tokens == 4


def test_add_request_validation(model, tokenizer):
    engine = Engine(model, tokenizer)
    engine.add_request("a", [1, 2, 3])
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("a", [1])
    with pytest.raises(ValueError, match="empty"):
        engine.add_request("b", [])
    with pytest.raises(ValueError, match="must lie in"):
        engine.add_request("c", [tokenizer.vocab_size])
    with pytest.raises(ValueError, match="tokenizer"):
        Engine(model, None).add_request("d", [1], SamplingParams(stop=["x"]))
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(model, tokenizer, EngineConfig(max_model_len=MAX_SEQ_LEN + 1))
    assert engine.abort("a") and not engine.abort("a")
    assert [o.finish_reason for o in engine.step()] == ["abort"] and not engine.has_unfinished()


def test_from_checkpoint_serves_the_saved_model(model, tokenizer, tmp_path):
    from nanostack.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)
    engine = Engine.from_checkpoint(tmp_path / "ckpt", block_size=8)
    out = engine.generate(["def fib(n):"], GREEDY)[0]  # a string prompt goes through the saved tokenizer
    assert out.new_token_ids == naive_greedy(model, tokenizer.encode("def fib(n):"), GREEDY.max_tokens)


def test_triton_kernel_path_matches_the_torch_path(tokenizer, sharpened_model, monkeypatch):
    """The CUDA branch of paged_attention (flash varlen prefill + paged decode kernels, run here by the Triton
    interpreter) on the engine's real metadata: prefix hits, chunked prefill and decode tokens in one step."""
    import nanostack.model as model_module
    model = sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN)
    torch_path = model_module.paged_attention
    compared = []

    def both_paths(q, k, v, k_pool, v_pool, batch, window=0):
        expected = torch_path(q, k, v, k_pool, v_pool, batch, use_kernels=False, window=window)
        got = torch_path(q, k, v, k_pool, v_pool, batch, use_kernels=True, window=window)
        torch.testing.assert_close(got, expected, atol=2e-5, rtol=1e-4)
        compared.append((batch.num_prefill_tokens, q.shape[0] - batch.num_prefill_tokens))
        return expected

    monkeypatch.setattr(model_module, "paged_attention", both_paths)
    system = random_prompts(1, tokenizer.vocab_size, 16, 16, seed=13)[0]
    engine = Engine(model, tokenizer, EngineConfig(block_size=4, max_num_batched_tokens=12, max_num_seqs=3))
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    run(engine, {0: [("a", system + [1, 2, 3], params)],
                 5: [("b", system + [4, 5], params), ("c", system + list(range(6, 20)), params)]})
    assert engine.stats().prefix_cache_hits > 0
    assert any(prefill and decode for prefill, decode in compared)


def test_after_a_weight_update_the_engine_samples_like_a_fresh_one(tokenizer, sharpened_model):
    """Training changes the weights in place under a live engine (GRPO rollouts): the prefix cache's K/V are then
    stale, and weights_updated() must drop them so the next rollout equals a fresh engine's."""
    model = sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN)
    prompts = [[7, 8, 9, 10, 11, 12, 13, 14, 15] + [i] for i in range(4)]  # two full shared blocks of 4
    params = [SamplingParams(max_tokens=6, temperature=1.0, seed=i, logprobs=0, ignore_eos=True) for i in range(4)]
    engine = Engine(model, tokenizer, EngineConfig(block_size=4))
    engine.generate(prompts, params)  # fills the prefix cache with the old weights' K/V
    with torch.no_grad():  # an optimizer step, in place
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(1)) * 0.02)
    fresh = Engine(model, tokenizer, EngineConfig(block_size=4)).generate(prompts, params)
    stale = engine.generate(prompts, params)
    assert stale[0].cached_prompt_tokens == 8 and [o.logprobs for o in stale] != [o.logprobs for o in fresh]
    engine.weights_updated()
    updated = engine.generate(prompts, params)
    assert updated[0].cached_prompt_tokens == 0
    assert [o.new_token_ids for o in updated] == [o.new_token_ids for o in fresh]
    assert [o.logprobs for o in updated] == [o.logprobs for o in fresh]
    engine.add_request("in-flight", prompts[0], params[0])
    with pytest.raises(ValueError, match="1 requests in flight"):
        engine.weights_updated()

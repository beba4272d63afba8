"""Speculative decoding: the accept/resample rule gives exactly the target's distribution (float64 enumeration and
chi-square on samples), greedy output with drafts equals greedy without (n-gram and draft model, mixed batches,
staggered arrivals, prefix caching, preemption, stops), and rolled-back K/V leave no leaked or stale blocks."""
import random
from collections import Counter, defaultdict

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanostack.checkpoint import CheckpointError, save_checkpoint
from nanostack.model import GPT, ModelConfig
from nanostack.sampling import SamplingParams
from nanostack.serving.engine import Engine, EngineConfig, merge_outputs
from nanostack.serving.speculative import (SpeculativeConfig, Speculator, acceptance_probability, greedy_accept,
                                           ngram_propose, rejection_sample, residual_distribution)
from nanostack.tokenizer import Tokenizer, merges_to_ranks

from greedy_reference import naive_greedy

# conftest.py: `tokenizer` (tiny BPE), `sharpened_model` (fixed-seed random GPT factory), `one_thread`.
pytestmark = pytest.mark.usefixtures("one_thread")
MAX_SEQ_LEN = 160
ALWAYS = dict(max_batch_size=64, min_acceptance_rate=0.0)  # the off-switch never fires


def chi_square_p_value(counts: Counter, expected_probs: dict, num_samples: int) -> float:
    """Pearson's chi-square test of counts against expected probabilities; cells expecting < 5 are pooled."""
    big = sorted(cell for cell, prob in expected_probs.items() if prob * num_samples >= 5)
    observed = [counts[cell] for cell in big] + [num_samples - sum(counts[cell] for cell in big)]
    pooled_prob = 1 - sum(expected_probs[cell] for cell in big)
    expected = [expected_probs[cell] * num_samples for cell in big] + [pooled_prob * num_samples]
    if expected[-1] < 5:  # too few expected even pooled: fold the pool into the least likely big cell
        smallest = min(range(len(big)), key=lambda i: expected[i])
        observed[smallest] += observed.pop()
        expected[smallest] += expected.pop()
    statistic = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    dof = len(observed) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(statistic / 2, dtype=torch.float64)))


def truncated_draft(target: GPT, n_layer: int) -> GPT:
    """The target's first n_layer blocks with its embeddings, norm and head: a draft that often agrees."""
    draft = GPT(ModelConfig(**{**vars(target.config), "n_layer": n_layer})).eval()
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    return draft


# ----------------------------------------------------------------------------------------------------------
# The acceptance rule on distributions

def random_distributions(generator, vocab, kind):
    logits = torch.randn(2, vocab, generator=generator, dtype=torch.float64) * 2
    p, q = logits.softmax(dim=-1)
    if kind == "sparse":  # supports overlap only partly: some proposals have p = 0, some targets q = 0
        p[: vocab // 3] = 0
        q[vocab - vocab // 3:] = 0
    elif kind == "point mass":  # the n-gram proposer
        q = torch.zeros(vocab, dtype=torch.float64)
        q[int(torch.randint(vocab, (1,), generator=generator))] = 1
    elif kind == "equal":
        q = p.clone()
    return p / p.sum(), q / q.sum()


@pytest.mark.parametrize("kind", ["dense", "sparse", "point mass", "equal"])
def test_accept_or_resample_gives_exactly_p_by_enumeration(kind):
    generator = torch.Generator().manual_seed(0)
    for vocab in (2, 5, 11):
        p, q = random_distributions(generator, vocab, kind)
        accept = acceptance_probability(p, q)  # (vocab,)
        residual = residual_distribution(p, q)
        # Draw x ~ q; keep it with probability accept[x], else draw from the residual.
        output = q * accept + (q * (1 - accept)).sum() * residual
        torch.testing.assert_close(output, p, rtol=0, atol=1e-12)
        assert float(accept.min()) >= 0 and float(accept.max()) <= 1


def test_rejection_sample_chi_square_on_mismatched_distributions():
    vocab, num_draft, num_rounds = 5, 3, 6000
    generator = torch.Generator().manual_seed(1)
    target = (torch.randn(num_draft + 1, vocab, generator=generator, dtype=torch.float64) * 1.5).softmax(-1)
    draft = (torch.randn(num_draft, vocab, generator=generator, dtype=torch.float64) * 1.5).softmax(-1)
    draft_generator, verify_generator = torch.Generator().manual_seed(2), torch.Generator().manual_seed(3)
    at_position = [Counter() for _ in range(num_draft + 1)]
    for _ in range(num_rounds):
        proposals = [int(torch.multinomial(row, 1, generator=draft_generator)) for row in draft]
        for position, token in enumerate(rejection_sample(target, proposals, draft, verify_generator)):
            at_position[position][token] += 1
    # The token emitted at position i (when the round got that far) follows the target's row i.
    for position, counts in enumerate(at_position):
        total = sum(counts.values())
        assert total > 300, f"position {position} reached only {total} times: the test lost its power"
        expected = {token: float(target[position, token]) for token in range(vocab)}
        assert chi_square_p_value(counts, expected, total) > 1e-3, (position, counts)
    # Power check: the first position's tokens are clearly not the draft's distribution.
    total = sum(at_position[0].values())
    assert chi_square_p_value(at_position[0], {t: float(draft[0, t]) for t in range(vocab)}, total) < 1e-6


def test_greedy_accept_stops_at_first_disagreement():
    logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 0.0, 9.0], [7.0, 0.0, 0.0]])
    best = [1, 0, 2, 0]
    for drafts in ([1, 0, 2], [1, 2, 2], [0, 0, 2], [1, 0]):
        run = next((i for i, (d, b) in enumerate(zip(drafts, best)) if d != b), len(drafts))
        assert greedy_accept(logits[:len(drafts) + 1], drafts) == drafts[:run] + [best[run]]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=30), st.integers(1, 5), st.integers(1, 4), st.integers(0, 3))
def test_ngram_proposal_continues_the_latest_longest_match(tokens, num_tokens, ngram_max, shorter):
    ngram_min = max(1, ngram_max - shorter)
    proposal = ngram_propose(tokens, num_tokens, ngram_max, ngram_min)
    # Reference: every (n, start) match, longest n first, latest start first.
    matches = [(n, start) for n in range(ngram_min, ngram_max + 1) for start in range(len(tokens) - n)
               if n < len(tokens) and tokens[start:start + n] == tokens[len(tokens) - n:]]
    if not matches:
        assert proposal == []
        return
    n, start = max(matches)
    assert proposal == tokens[start + n:start + n + num_tokens]


def test_config_and_draft_validation(sharpened_model):
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="ngram_min"):
        SpeculativeConfig(ngram_min=3, ngram_max=2)
    target = sharpened_model(64, MAX_SEQ_LEN)
    with pytest.raises(ValueError, match="vocab_size"):
        Engine(target, None, EngineConfig(), Speculator(draft_model=sharpened_model(65, MAX_SEQ_LEN)))
    with pytest.raises(ValueError, match="max_seq_len"):
        Engine(target, None, EngineConfig(), Speculator(draft_model=sharpened_model(64, 32)))


def test_a_draft_checkpoint_with_another_tokenizer_is_refused(tokenizer, sharpened_model, tmp_path):
    bytes_only = Tokenizer(merges_to_ranks([]))  # byte-level, no merges: other ids for the same text
    draft = sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN)
    same = save_checkpoint(tmp_path / "same", draft.state_dict(), draft.config, tokenizer)
    other = save_checkpoint(tmp_path / "other", draft.state_dict(), draft.config, bytes_only)
    assert Speculator.from_checkpoint(same, target_tokenizer=tokenizer).draft_model is not None
    with pytest.raises(CheckpointError, match=r"draft model uses a different tokenizer: .*other.*tokenizer.json "
                                              r"differs from target.json in its vocabulary size, merges"):
        Speculator.from_checkpoint(other, target_tokenizer=tokenizer, target_path="target.json")


# ----------------------------------------------------------------------------------------------------------
# In the engine: greedy equality, rollback invariants, stops, the off-switch

def repetitive_prompts(count, vocab, seed):
    """Prompts that repeat pieces of themselves, so n-gram lookup finds matches; some share a long prefix."""
    rng = random.Random(seed)
    shared = [rng.randrange(vocab) for _ in range(24)]
    prompts = []
    for i in range(count):
        piece = [rng.randrange(vocab) for _ in range(rng.randint(2, 8))]
        body = piece * rng.randint(1, 4) + [rng.randrange(vocab) for _ in range(rng.randint(0, 10))]
        prompts.append(shared + body if i % 2 else body)
    return prompts


def check_block_invariants(engine):
    """Refcounts match the block tables; cached blocks hold exactly the tokens of whoever references them and
    lie within computed positions; no sequence holds blocks past its tokens (rejected drafts were given back)."""
    blocks, size = engine.blocks, engine.blocks.block_size
    references = Counter(block for table in blocks.block_tables.values() for block in table)
    assert all(blocks.ref_counts[b] == references[b] for b in range(blocks.num_blocks))
    held = len(references)
    assert blocks.num_free_blocks == blocks.num_blocks - held
    for seq in engine.scheduler.running:
        table = blocks.block_tables[seq.request_id]
        assert len(table) <= blocks.blocks_for(len(seq.token_ids))
        assert len(blocks.hash_chains[seq.request_id]) * size <= seq.num_computed_tokens < len(seq.token_ids)
        for i, block in enumerate(table):
            if blocks.block_hashes[block] is not None:
                assert blocks.block_tokens[block] == tuple(seq.token_ids[i * size:(i + 1) * size])


def run_staggered(engine, prompts, params, check_invariants=True):
    """Three requests arrive every other step; returns request_id -> merged output."""
    arrivals = defaultdict(list)
    for i, prompt in enumerate(prompts):
        arrivals[(i // 3) * 2].append((f"r{i}", prompt))
    pieces, step = defaultdict(list), 0
    while step <= max(arrivals) or engine.has_unfinished():
        for request_id, prompt in arrivals.get(step, []):
            engine.add_request(request_id, prompt, params)
        for out in engine.step():
            pieces[out.request_id].append(out)
        if check_invariants:
            check_block_invariants(engine)
        step += 1
        assert step < 1000, "engine made no progress"
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks and not engine.blocks.block_tables
    return {request_id: merge_outputs(outs) for request_id, outs in pieces.items()}


@pytest.fixture(scope="module")
def target(tokenizer, sharpened_model):
    return sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN)


@pytest.mark.parametrize("proposer", ["ngram", "draft"])
@pytest.mark.parametrize("num_blocks", [0, 20])  # 20 blocks of 4 for 9 requests: preemption with drafts in flight
def test_greedy_with_speculation_equals_naive_greedy(target, tokenizer, proposer, num_blocks):
    prompts = repetitive_prompts(9, tokenizer.vocab_size, seed=1)
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)
    draft = truncated_draft(target, 1) if proposer == "draft" else None
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=3, **ALWAYS), draft)
    engine = Engine(target, tokenizer, EngineConfig(block_size=4, num_blocks=num_blocks, max_num_seqs=6,
                                                    max_num_batched_tokens=40), speculator)
    outputs = run_staggered(engine, prompts, params)
    for i, prompt in enumerate(prompts):
        out = outputs[f"r{i}"]
        assert out.new_token_ids == naive_greedy(target, prompt, params.max_tokens), f"r{i}"
        assert out.finish_reason == "length" and len(out.token_times) == out.completion_tokens == params.max_tokens
    stats = engine.stats()
    spec = stats.speculative
    # Both outcomes happened, so acceptance and rollback were both exercised; the counters add up.
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    assert sum(spec.accepted_per_position) == spec.num_accepted_tokens
    assert spec.accepted_per_position == sorted(spec.accepted_per_position, reverse=True)
    assert stats.generation_tokens_total == sum(len(o.new_token_ids) for o in outputs.values())
    assert stats.prefix_cache_hits > 0
    if num_blocks:
        assert stats.num_preemptions > 0
    engine.step()  # an idle step lets the speculator drop the draft caches of finished requests
    assert not speculator.states


def test_stops_inside_an_accepted_run_and_logprobs_match_plain_decoding(target, tokenizer):
    # The draft is the target itself: every draft is accepted, so stops land inside accepted runs.
    prompts = repetitive_prompts(4, tokenizer.vocab_size, seed=2)
    references = [naive_greedy(target, prompt, 24) for prompt in prompts]
    params = [SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=2,
                             stop_token_ids=[reference[5 + i]]) for i, reference in enumerate(references)]
    params[0].stop_token_ids, params[0].stop = [], [tokenizer.decode(references[0][6:8])]
    plain = Engine(target, tokenizer, EngineConfig(block_size=4)).generate(prompts, params)
    engine = Engine(target, tokenizer, EngineConfig(block_size=4),
                    Speculator(SpeculativeConfig(num_speculative_tokens=4, **ALWAYS), target))
    fast = engine.generate(prompts, params)
    for expected, got in zip(plain, fast):
        assert (got.new_token_ids, got.text, got.finish_reason) == (expected.new_token_ids, expected.text, "stop")
        torch.testing.assert_close(got.logprobs, expected.logprobs, rtol=0, atol=1e-4)
        assert [sorted(top) for top in got.top_logprobs] == [sorted(top) for top in expected.top_logprobs]
    spec = engine.stats().speculative
    assert spec.num_accepted_tokens == spec.num_draft_tokens > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


def test_off_switch_for_large_batches_and_poor_acceptance(target, tokenizer):
    prompts = repetitive_prompts(4, tokenizer.vocab_size, seed=3)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    big_batch = Engine(target, tokenizer, EngineConfig(block_size=4),
                       Speculator(SpeculativeConfig(max_batch_size=3, min_acceptance_rate=0.0)))
    outputs = big_batch.generate(prompts, params)  # 4 running > 3: speculation stays off until one finishes
    spec = big_batch.stats().speculative
    assert spec.num_drafts == 0 and spec.num_skipped_steps > 0
    assert [o.new_token_ids for o in outputs] == [naive_greedy(target, p, 16) for p in prompts]

    # A draft of random weights is nearly always wrong: after the window fills, only probe steps speculate.
    config = SpeculativeConfig(num_speculative_tokens=2, max_batch_size=8, min_acceptance_rate=0.9, window=4,
                               probe_every=4)
    torch.manual_seed(5)
    random_draft = GPT(target.config).eval()
    poor = Engine(target, tokenizer, EngineConfig(block_size=4), Speculator(config, random_draft))
    output = poor.generate([prompts[0]], SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    assert output.new_token_ids == naive_greedy(target, prompts[0], 40)
    spec = poor.stats().speculative
    assert spec.num_skipped_steps > 0 and spec.num_drafts <= 2 + (40 - 1) // config.probe_every + 1


# ----------------------------------------------------------------------------------------------------------
# In the engine: sampled tokens follow the target's distribution

def exact_sequence_probs(model, prompt, num_tokens, temperature, top_k):
    """P(first num_tokens sampled tokens = s) for every s, by enumeration with full forwards in float64."""
    probs = {(): 1.0}
    for _ in range(num_tokens):
        longer = {}
        for prefix, prob in probs.items():
            with torch.no_grad():
                logits = model(torch.tensor([prompt + list(prefix)]))[0, -1].double()
            if top_k:
                logits[logits < logits.sort(descending=True).values[top_k - 1]] = float("-inf")
            for token, p in enumerate((logits / temperature).softmax(-1).tolist()):
                longer[prefix + (token,)] = prob * p
        probs = longer
    return probs


@pytest.mark.parametrize("proposer, temperature, top_k", [("ngram", 0.9, 0), ("draft", 0.9, 0), ("draft", 1.5, 2)])
def test_sampled_tokens_follow_the_target_distribution(proposer, temperature, top_k):
    vocab, num_tokens, num_requests = 3, 4, 1500
    torch.manual_seed(11)
    config = ModelConfig(vocab_size=vocab, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, max_seq_len=32)
    target = GPT(config).eval()
    torch.manual_seed(12)
    mismatched = GPT(config).eval()
    with torch.no_grad():  # logits of a few nats: distributions that are neither uniform nor one-hot
        target.lm_head.weight.mul_(10)
        mismatched.lm_head.weight.mul_(10)
    prompt = [0, 1, 2, 0, 1, 2, 0, 1]
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=3, **ALWAYS),
                            mismatched if proposer == "draft" else None)
    engine = Engine(target, None, EngineConfig(block_size=4, max_num_seqs=64, max_num_batched_tokens=256),
                    speculator)
    all_params = [SamplingParams(max_tokens=num_tokens, temperature=temperature, top_k=top_k, seed=i)
                  for i in range(num_requests)]
    outputs = engine.generate([prompt] * num_requests, all_params)
    counts = Counter(tuple(out.new_token_ids) for out in outputs)
    expected = exact_sequence_probs(target, prompt, num_tokens, temperature, top_k)
    assert chi_square_p_value(counts, expected, num_requests) > 1e-3, counts
    spec = engine.stats().speculative
    assert 0 < spec.num_accepted_tokens < spec.num_draft_tokens  # both accepts and resamples happened
    # Seeded requests are reproducible: the same seeds give the same tokens again.
    again = engine.generate([prompt] * 20, all_params[:20])
    assert [o.new_token_ids for o in again] == [o.new_token_ids for o in outputs[:20]]

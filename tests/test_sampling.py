"""Sampling: filters against a float64 reference, seeded rows independent of the batch, chi-square fits."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from nanostack.sampling import (SamplingParams, adjusted_logits, filtered_logits, make_generator, sample,
                                token_logprobs)

# Upper 0.1% points of the chi-square distribution by degrees of freedom (standard tables): a correct
# sampler fails a test at a fixed seed with probability 1e-3, and the seeds are fixed, so the result is stable.
CHI2_CRITICAL_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322}


def reference_allowed(logits: list[float], params: SamplingParams, margin: float = 1e-4):
    """float64 reference of the filters. Returns (certainly kept, certainly excluded) token sets; tokens within
    `margin` of a threshold are in neither, since float32 rounding may put them on either side."""
    scaled = torch.tensor(logits, dtype=torch.float64) / (params.temperature or 1.0)
    vocab = len(logits)
    kept = torch.ones(vocab, dtype=torch.bool)
    if 0 < params.top_k < vocab:
        kept &= scaled >= scaled.sort(descending=True).values[params.top_k - 1]
    probs = torch.where(kept, scaled, -math.inf).softmax(0)
    # top_p: the mass of tokens strictly more likely than t must be < top_p (ties kept or dropped together).
    mass_above = torch.stack([probs[probs > probs[t]].sum() for t in range(vocab)])
    nucleus_in = kept & (mass_above < params.top_p - margin)
    nucleus_out = ~kept | (mass_above >= params.top_p + margin)
    # min_p: probability >= min_p * max probability, i.e. log prob >= max log prob + log(min_p).
    log_ratio = (probs / probs.max()).log()
    min_p_log = math.log(params.min_p) if params.min_p > 0 else -math.inf
    min_in = log_ratio >= min_p_log + margin
    min_out = log_ratio < min_p_log - margin
    certainly_kept = nucleus_in & min_in
    certainly_kept[scaled.argmax()] = True  # the most likely token always survives
    return set(certainly_kept.nonzero().flatten().tolist()), set((nucleus_out | min_out).nonzero().flatten().tolist())


def chi_square(counts: torch.Tensor, expected_probs: torch.Tensor) -> float:
    expected = expected_probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def filtered_probs_reference(logits, params):
    """The distribution sampling should follow: softmax(logits / T) renormalised over the kept tokens (float64)."""
    kept, excluded = reference_allowed(logits, params, margin=0.0)
    mask = torch.tensor([t in kept for t in range(len(logits))])
    scaled = torch.tensor(logits, dtype=torch.float64) / params.temperature
    return torch.where(mask, scaled, -math.inf).softmax(0)


# Unique integers * 0.25: no ties and no near-ties, so the reference and the float32 code agree on ranks.
distinct_logits = st.lists(st.integers(-40, 40), min_size=2, max_size=40, unique=True).map(
    lambda xs: [0.25 * x for x in xs])
filter_params = st.builds(
    SamplingParams, temperature=st.sampled_from([0.3, 0.7, 1.0, 1.5]), top_k=st.integers(0, 12),
    top_p=st.sampled_from([0.05, 0.3, 0.6, 0.9, 1.0]), min_p=st.sampled_from([0.0, 0.01, 0.1, 0.5]))


@settings(max_examples=60, deadline=None)
@given(logits=distinct_logits, params=filter_params, seed=st.integers(0, 2**31))
def test_filters_never_emit_an_excluded_token(logits, params, seed):
    certainly_kept, excluded = reference_allowed(logits, params)
    filtered = filtered_logits(torch.tensor([logits]), [params])[0]
    kept = set(torch.isfinite(filtered).nonzero().flatten().tolist())
    assert certainly_kept <= kept and not kept & excluded
    draws = 64
    batch = torch.tensor([logits] * draws)
    torch.manual_seed(seed)
    unseeded = sample(batch, [params] * draws, [None] * draws).token_ids
    seeded = sample(batch, [params] * draws, [make_generator(seed + i, "cpu") for i in range(draws)]).token_ids
    assert not excluded & (set(unseeded) | set(seeded))


@settings(max_examples=40, deadline=None)
@given(logits=st.lists(st.floats(-30, 30, width=32), min_size=1, max_size=50), params=filter_params,
       seed=st.integers(0, 1000))
def test_temperature_zero_is_argmax(logits, params, seed):
    params = SamplingParams(temperature=0, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, seed=seed)
    row = torch.tensor([logits])
    # argmax of a row with ties: torch picks the first maximum, as does a plain Python scan.
    expected = max(range(len(logits)), key=lambda i: (row[0, i].item(), -i))
    assert sample(row, [params], [make_generator(seed, "cpu")]).token_ids == [expected]


def test_tied_tokens_survive_top_k_together():
    logits = torch.tensor([[1.0, 3.0, 0.5, 3.0, 2.0]])
    params = SamplingParams(temperature=1.0, top_k=1)
    torch.manual_seed(0)
    tokens = sample(logits.repeat(400, 1), [params] * 400, [None] * 400).token_ids
    assert set(tokens) == {1, 3}


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    torch.manual_seed(0)
    vocab, steps = 50, 20
    target = SamplingParams(temperature=0.8, top_k=20, top_p=0.9, seed=1234)
    others = [SamplingParams(temperature=1.0), SamplingParams(temperature=0), SamplingParams(temperature=1.3, seed=7),
              SamplingParams(temperature=0.5, min_p=0.05)]
    logits_per_step = [torch.randn(vocab) * 2 for _ in range(steps)]

    alone_generator = make_generator(target.seed, "cpu")
    alone = [sample(step_logits[None], [target], [alone_generator]).token_ids[0] for step_logits in logits_per_step]

    batched_generator = make_generator(target.seed, "cpu")
    other_generators = [make_generator(p.seed, "cpu") for p in others]
    batched = []
    for step, step_logits in enumerate(logits_per_step):
        # A different batch composition every step: the target's row moves and its neighbours change.
        chosen = [i for i in range(len(others)) if (step + i) % 3]
        position = step % (len(chosen) + 1)
        rows = [torch.randn(vocab) for _ in chosen]
        rows.insert(position, step_logits)
        params = [others[i] for i in chosen]
        params.insert(position, target)
        generators = [other_generators[i] for i in chosen]
        generators.insert(position, batched_generator)
        batched.append(sample(torch.stack(rows), params, generators).token_ids[position])
    assert alone == batched
    assert len(set(alone)) > 1  # it really sampled


@pytest.mark.parametrize("params", [SamplingParams(temperature=0.7), SamplingParams(temperature=1.3, top_k=4),
                                    SamplingParams(temperature=1.0, top_p=0.8),
                                    SamplingParams(temperature=1.0, min_p=0.2)])
def test_sampled_distribution_matches_tempered_softmax(params):
    logits = [0.3, -1.2, 1.1, 0.0, 0.8, -0.4, 2.0]
    expected = filtered_probs_reference(logits, params)
    support = expected > 0
    df = int(support.sum()) - 1

    torch.manual_seed(0)
    draws = 40_000
    tokens = torch.tensor(sample(torch.tensor([logits] * draws), [params] * draws, [None] * draws).token_ids)
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert counts[~support].sum() == 0
    assert chi_square(counts[support], expected[support]) < CHI2_CRITICAL_999[df]

    # The seeded path draws its noise differently (one row at a time from its own generator); same law.
    generator = make_generator(42, "cpu")
    row = torch.tensor([logits])
    tokens = torch.tensor([sample(row, [params], [generator]).token_ids[0] for _ in range(3000)])
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    assert counts[~support].sum() == 0
    assert chi_square(counts[support], expected[support]) < CHI2_CRITICAL_999[df]


def test_logprobs_are_the_models_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(3, 30) * 3
    params = [SamplingParams(temperature=0.5, logprobs=4), SamplingParams(temperature=0), SamplingParams(logprobs=0)]
    out = sample(logits, params, [None] * 3)
    reference = logits.double().log_softmax(-1)
    for row in (0, 2):
        assert out.logprobs[row] == pytest.approx(reference[row, out.token_ids[row]].item(), abs=1e-5)
    assert out.logprobs[1] is None and out.top_logprobs[1] is None
    assert out.top_logprobs[2] == {}
    top_values, top_ids = reference[0].topk(4)
    assert list(out.top_logprobs[0]) == top_ids.tolist()
    assert list(out.top_logprobs[0].values()) == pytest.approx(top_values.tolist(), abs=1e-5)

    chosen, tops = token_logprobs(logits, torch.tensor([5, 6, 7]), [None, 2, None])
    assert chosen == pytest.approx(reference[[0, 1, 2], [5, 6, 7]].tolist(), abs=1e-5)
    assert tops[0] is None and list(tops[1]) == reference[1].topk(2).indices.tolist()


@pytest.mark.parametrize("field, value", [("max_tokens", 0), ("temperature", -0.1), ("top_k", -1), ("top_p", 0.0),
                                          ("top_p", 1.5), ("min_p", 1.5), ("logprobs", -1), ("prompt_logprobs", -2),
                                          ("stop", [""]), ("stop_token_ids", [-3])])
def test_params_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sample_rejects_mismatched_batch():
    with pytest.raises(ValueError, match="one params"):
        sample(torch.zeros(2, 5), [SamplingParams()], [None, None])
    assert SamplingParams(stop="###").stop == ["###"]


def naive_adjusted(logits: list[float], params: SamplingParams, token_ids: list[int], num_prompt: int) -> list[float]:
    """float64, token by token: logit bias, then the repetition penalty over prompt and output, then the presence and
    frequency penalties over the output."""
    scores = [float(x) for x in logits]
    for token, bias in params.logit_bias.items():
        scores[token] += bias
    for token in set(token_ids):
        p = params.repetition_penalty
        scores[token] = scores[token] / p if scores[token] > 0 else scores[token] * p
    output = token_ids[num_prompt:]
    for token in set(output):
        scores[token] -= params.frequency_penalty * output.count(token) + params.presence_penalty
    return scores


@settings(max_examples=25, deadline=None, derandomize=True, database=None)
@given(st.lists(st.integers(0, 11), min_size=1, max_size=12), st.integers(0, 12),
       st.dictionaries(st.integers(0, 11), st.floats(-100, 100), max_size=3), st.floats(-2, 2), st.floats(-2, 2),
       st.sampled_from([1.0, 0.5, 1.3, 2.0]), st.integers(0, 2**31))
def test_logit_bias_and_penalties_match_a_naive_reference(history, num_prompt, bias, presence, frequency, repetition,
                                                          seed):
    torch.manual_seed(seed)
    logits = torch.randn(2, 12) * 3
    params = SamplingParams(logit_bias=bias, presence_penalty=presence, frequency_penalty=frequency,
                            repetition_penalty=repetition, temperature=0)
    num_prompt = min(num_prompt, len(history))
    allowed = torch.rand(12) < 0.5
    allowed[history[0]] = True
    adjusted = adjusted_logits(logits, [params, SamplingParams()], [(history, num_prompt), (history, 0)],
                               [allowed.numpy(), None])
    expected = torch.tensor(naive_adjusted(logits[0].tolist(), params, history, num_prompt), dtype=torch.float64)
    expected[~allowed] = -math.inf
    torch.testing.assert_close(adjusted[0].double(), expected, rtol=1e-5, atol=1e-4)
    assert torch.equal(adjusted[1], logits[1])  # a row without adjustments is left alone
    out = sample(logits, [params, SamplingParams(temperature=0, logprobs=0)], [None, None],
                 [(history, num_prompt), (history, 0)], [allowed.numpy(), None])
    assert allowed[out.token_ids[0]] and out.token_ids[0] == int(expected.argmax())
    assert out.logprobs[1] == pytest.approx(float(logits[1].log_softmax(0).max()), abs=1e-5)  # from raw logits


def test_adjusting_params_need_histories():
    with pytest.raises(ValueError, match="histories"):
        sample(torch.zeros(1, 4), [SamplingParams(presence_penalty=1.0)], [None])
    for field, value in (("presence_penalty", 2.5), ("frequency_penalty", -3), ("repetition_penalty", 0),
                         ("logit_bias", {1: 101})):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**{field: value})

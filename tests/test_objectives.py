"""Post-training objectives against naive float64 formulas: masked SFT, packing, distillation, DPO."""
import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nanostack import chat_data, objectives
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer

CONVERSATIONS = [
    [{"role": "user", "content": "What does `json.dumps` do?"},
     {"role": "assistant", "content": "Serialize obj to a JSON formatted str."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is `heapq`?"},
     {"role": "assistant", "content": "Heap queue algorithm."}, {"role": "user", "content": "And `bisect`?"},
     {"role": "assistant", "content": "Bisection algorithms for sorted lists."}],
    [{"role": "user", "content": "Name a sort."}, {"role": "assistant", "content": "Merge sort, stable."}],
    [{"role": "user", "content": "What does `textwrap.dedent` do?"},
     {"role": "assistant", "content": "Remove any common leading whitespace from every line in text."}],
]


@pytest.fixture(scope="module")
def tokenizer():
    text = " ".join(m["content"] for c in CONVERSATIONS for m in c)
    return Tokenizer.train([text * 4, "def f(x):\n    return x\n" * 8], 300)


def tiny_model(tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    config = ModelConfig(**{**dict(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=32,
                                   max_seq_len=128), **overrides})
    return GPT(config).double()


def sft_rows(tokenizer, seq_len=128):
    return [chat_data.sft_example(tokenizer, c, seq_len) for c in CONVERSATIONS]


def naive_masked_loss(model, tokenizer, conversations) -> float:
    """Mean -log p over the template's masked-in positions, one conversation at a time, in float64."""
    total, count = 0.0, 0
    for messages in conversations:
        ids, mask = tokenizer.render_chat(messages)
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]])).double()[0], dim=-1)
        for t in range(len(ids) - 1):
            if mask[t + 1]:
                total -= logp[t, ids[t + 1]].item()
                count += 1
    return total / count


def test_sft_loss_is_the_masked_mean_over_assistant_tokens(tokenizer):
    model = tiny_model(tokenizer)
    inputs, targets = chat_data.pad_rows(sft_rows(tokenizer), tokenizer.eos_id)
    loss, metrics = objectives.sft(model, {"inputs": inputs, "targets": targets})
    assert loss.item() == pytest.approx(naive_masked_loss(model, tokenizer, CONVERSATIONS), rel=1e-10)
    assert int(metrics["assistant_tokens"]) == sum(sum(tokenizer.render_chat(c)[1][1:]) for c in CONVERSATIONS)


def test_sft_loss_ignores_what_the_model_predicts_at_non_assistant_positions(tokenizer):
    """Scrambling the logits wherever the target is masked changes nothing; at one assistant token it does."""
    model = tiny_model(tokenizer)
    inputs, targets = chat_data.pad_rows(sft_rows(tokenizer), tokenizer.eos_id)
    batch = {"inputs": inputs, "targets": targets}
    reference, _ = objectives.sft(model, batch)
    generator = torch.Generator().manual_seed(0)

    def scrambled(positions):
        def forward(idx, targets=None, **kwargs):
            logits = model(idx, **kwargs)
            noise = torch.randn(logits.shape, generator=generator, dtype=logits.dtype)
            logits = logits + 50 * noise * positions[..., None]
            if targets is None:
                return logits
            return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return forward

    masked_out = (targets == -1).double()
    assert objectives.sft(scrambled(masked_out), batch)[0].item() == pytest.approx(reference.item(), rel=1e-12)
    one_assistant = torch.zeros_like(masked_out)
    one_assistant[0, (targets[0] != -1).nonzero()[0, 0]] = 1.0
    assert objectives.sft(scrambled(one_assistant), batch)[0].item() != pytest.approx(reference.item(), rel=1e-6)


def test_packed_rows_give_the_unpacked_token_weighted_loss(tokenizer):
    model = tiny_model(tokenizer)
    rows = sft_rows(tokenizer)
    unpacked = chat_data.chat_batches(rows, len(rows), 128, tokenizer.eos_id, packing=False).next_batch()
    num_rows = chat_data.chat_batches(rows, 1, 128, tokenizer.eos_id, packing=True).steps_in_epoch()
    assert num_rows < len(rows)  # some row holds two conversations or more
    packed_batch = chat_data.chat_batches(rows, num_rows, 128, tokenizer.eos_id, packing=True).next_batch()
    unpacked_loss, unpacked_metrics = objectives.sft(model, unpacked)
    packed_loss, packed_metrics = objectives.sft(model, packed_batch)
    assert packed_metrics["assistant_tokens"] == unpacked_metrics["assistant_tokens"]
    assert packed_loss.item() == pytest.approx(unpacked_loss.item(), rel=1e-10)
    # Without doc_ids the conversations would see each other and count positions across the row.
    leaky = {k: v for k, v in packed_batch.items() if k != "doc_ids"}
    assert objectives.sft(model, leaky)[0].item() != pytest.approx(unpacked_loss.item(), rel=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Distillation

def naive_kd(student_logits, teacher_logits, targets, temperature, alpha, kind) -> float:
    """Hinton's loss written out position by position in float64 numpy."""
    kls, ces = [], []
    for b, t in (targets != -1).nonzero().tolist():
        s, q = student_logits[b, t].double().numpy(), teacher_logits[b, t].double().numpy()
        p_s = np.exp(s / temperature) / np.exp(s / temperature).sum()
        p_t = np.exp(q / temperature) / np.exp(q / temperature).sum()
        first, second = (p_t, p_s) if kind == "forward" else (p_s, p_t)
        kls.append(float((first * np.log(first / second)).sum()))
        ces.append(-math.log(np.exp(s)[targets[b, t]] / np.exp(s).sum()))
    return alpha * temperature ** 2 * sum(kls) / len(kls) + (1 - alpha) * sum(ces) / len(ces)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
def test_distillation_matches_a_naive_formula(tokenizer, kind):
    student, teacher = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    inputs, targets = chat_data.pad_rows(sft_rows(tokenizer)[:2], tokenizer.eos_id)
    objective = objectives.distillation(teacher, temperature=2.0, alpha=0.7, kind=kind)
    loss, metrics = objective(student, {"inputs": inputs, "targets": targets})
    with torch.no_grad():
        expected = naive_kd(student(inputs), teacher(inputs), targets, 2.0, 0.7, kind)
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["kd_kl"] > 0


def test_forward_and_reverse_kl_differ_and_vanish_for_identical_models(tokenizer):
    student = tiny_model(tokenizer, seed=0)
    inputs, targets = chat_data.pad_rows(sft_rows(tokenizer), tokenizer.eos_id)
    batch = {"inputs": inputs, "targets": targets}
    for kind in ("forward", "reverse"):
        loss, _ = objectives.distillation(copy.deepcopy(student), 3.0, alpha=1.0, kind=kind)(student, batch)
        assert abs(loss.item()) < 1e-12
    other = tiny_model(tokenizer, seed=5)
    with torch.no_grad():
        other.lm_head.weight.mul_(30)  # a confident teacher, so the two directions of KL clearly differ
    forward = objectives.distillation(other, 1.0, 1.0, "forward")(student, batch)[0].item()
    reverse = objectives.distillation(other, 1.0, 1.0, "reverse")(student, batch)[0].item()
    assert forward > 0 and reverse > 0 and forward != pytest.approx(reverse, rel=1e-3)


def test_distillation_freezes_the_teacher_and_trains_the_student(tokenizer):
    student, teacher = tiny_model(tokenizer, seed=0), tiny_model(tokenizer, seed=1)
    teacher.train()
    inputs, targets = chat_data.pad_rows(sft_rows(tokenizer), tokenizer.eos_id)
    objective = objectives.distillation(teacher, 2.0, 0.5, "forward")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    objective(student, {"inputs": inputs, "targets": targets})[0].backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert student.tok_emb.weight.grad is not None
    with pytest.raises(ValueError, match="kind"):
        objectives.distillation(teacher, kind="sideways")


# ----------------------------------------------------------------------------------------------------------
# DPO

PAIRS = [
    chat_data.PreferenceExample([{"role": "user", "content": "What does `json.dumps` do?"}],
                                "Serialize obj to a JSON formatted str.", "Heap queue algorithm."),
    chat_data.PreferenceExample([{"role": "user", "content": "What is `heapq`?"}],
                                "Heap queue algorithm.", "Remove any common leading whitespace."),
    chat_data.PreferenceExample([{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What does `textwrap.dedent` do?"}],
                                "Remove any common leading whitespace from every line.", "Merge sort, stable."),
]


def test_sequence_logprobs_sum_the_response_tokens(tokenizer):
    model = tiny_model(tokenizer)
    rows = chat_data.preference_rows(tokenizer, PAIRS, 128)
    got = objectives.sequence_logprobs(model, rows["chosen_inputs"], rows["chosen_targets"])
    for i, pair in enumerate(PAIRS):
        prompt_ids = tokenizer.render_chat(pair.prompt, add_generation_prompt=True)[0]
        response_ids = tokenizer.encode(pair.chosen) + [tokenizer.end_id]
        ids = prompt_ids + response_ids
        logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
        expected = sum(logp[t - 1, ids[t]].item() for t in range(len(prompt_ids), len(ids)))
        assert got[i].item() == pytest.approx(expected, rel=1e-10)


def test_dpo_starts_at_log_2_and_a_step_widens_the_margin(tokenizer):
    policy = tiny_model(tokenizer)
    objective = objectives.dpo(copy.deepcopy(policy), beta=0.5)
    batch = chat_data.preference_rows(tokenizer, PAIRS, 128)
    loss, metrics = objective(policy, batch)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-12)
    assert metrics["reward_margin"].item() == pytest.approx(0.0, abs=1e-12)
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    loss.backward()
    optimizer.step()
    after, after_metrics = objective(policy, batch)
    assert after_metrics["reward_margin"] > 0.01 and after.item() < math.log(2)
    assert after_metrics["chosen_reward"] - after_metrics["rejected_reward"] == pytest.approx(
        after_metrics["reward_margin"].item(), rel=1e-9)


def test_dpo_nll_term_is_the_chosen_replies_mean_cross_entropy(tokenizer):
    policy = tiny_model(tokenizer)
    batch = chat_data.preference_rows(tokenizer, PAIRS, 128)
    loss, metrics = objectives.dpo(copy.deepcopy(policy), beta=0.5, nll_weight=0.3)(policy, batch)
    per_token = []  # the chosen replies' mean cross-entropy, reply by reply
    for i, pair in enumerate(PAIRS):
        count = int((batch["chosen_targets"][i] != -1).sum())
        logp = objectives.sequence_logprobs(policy, batch["chosen_inputs"][i:i + 1], batch["chosen_targets"][i:i + 1])
        per_token.append(-logp.item() / count)
    expected = sum(per_token) / len(per_token)
    assert metrics["chosen_nll"].item() == pytest.approx(expected, rel=1e-10)
    assert loss.item() == pytest.approx(math.log(2) + 0.3 * expected, rel=1e-10)  # DPO starts at log 2


def test_precomputed_reference_equals_the_live_reference(tokenizer):
    reference = tiny_model(tokenizer, seed=0)
    policy = tiny_model(tokenizer, seed=3)  # a different policy, so the rewards are not all zero
    rows = chat_data.preference_rows(tokenizer, PAIRS, 128)
    live_loss, live_metrics = objectives.dpo(reference, beta=0.2)(policy, rows)
    precomputed = objectives.precompute_reference(reference, rows, batch_size=2)
    cached_loss, cached_metrics = objectives.dpo(None, beta=0.2)(policy, precomputed)
    assert cached_loss.item() == pytest.approx(live_loss.item(), rel=1e-6)
    for name in live_metrics:
        assert cached_metrics[name].item() == pytest.approx(live_metrics[name].item(), rel=1e-5, abs=1e-9)
    assert live_metrics["reward_margin"].abs() > 1e-3
    with pytest.raises(ValueError, match="precompute"):
        objectives.dpo(None, beta=0.2)(policy, rows)


def test_moe_auxiliary_loss_is_added_by_every_objective(tokenizer):
    model = tiny_model(tokenizer, n_expert=4, n_expert_active=2)
    rows = chat_data.preference_rows(tokenizer, PAIRS, 128)
    loss, _ = objectives.dpo(copy.deepcopy(model), beta=0.1)(model, rows)
    aux = model.moe_aux_loss.item()
    assert aux > 0 and loss.item() == pytest.approx(math.log(2) + aux, rel=1e-10)
    inputs, targets = chat_data.pad_rows(sft_rows(tokenizer), tokenizer.eos_id)
    twin = tiny_model(tokenizer, n_expert=4, n_expert_active=2)  # same seed: identical, so the KL is zero
    kd, _ = objectives.distillation(twin, 2.0, 1.0)(model, {"inputs": inputs, "targets": targets})
    assert kd.item() == pytest.approx(model.moe_aux_loss.item(), rel=1e-10)


# ----------------------------------------------------------------------------------------------------------
# GRPO

def naive_grpo_loss(logprobs, old, ref, rewards, lengths, group_size, clip, beta) -> float:
    """The DeepSeekMath objective written out in Python floats: group-normalised advantages, per-token clipped
    surrogate minus beta * k3 KL, mean over each completion's tokens, then over completions; negated."""
    total = 0.0
    for i, length in enumerate(lengths):
        group = rewards[i // group_size * group_size:(i // group_size + 1) * group_size]
        mean = sum(group) / group_size
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / (group_size - 1))
        advantage = (rewards[i] - mean) / (std + 1e-4)
        per_token = 0.0
        for t in range(length):
            ratio = math.exp(logprobs[i][t] - old[i][t])
            surrogate = min(ratio * advantage, min(max(ratio, 1 - clip), 1 + clip) * advantage)
            kl = math.exp(ref[i][t] - logprobs[i][t]) - (ref[i][t] - logprobs[i][t]) - 1
            per_token += surrogate - beta * kl
        total += per_token / length
    return -total / len(lengths)


def test_grpo_loss_matches_a_naive_float64_formula():
    generator = torch.Generator().manual_seed(0)
    group_size, lengths, width = 4, [3, 5, 1, 4, 2, 5, 5, 3], 5
    logprobs = -torch.rand(8, width, generator=generator, dtype=torch.float64) * 3
    old = logprobs + torch.randn(8, width, generator=generator, dtype=torch.float64) * 0.3  # ratios beyond the clip
    ref = logprobs + torch.randn(8, width, generator=generator, dtype=torch.float64) * 0.5
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.9, 0.5, 0.0], dtype=torch.float64)
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    advantages = objectives.group_advantages(rewards.view(2, group_size)).flatten()
    logprobs.requires_grad_(True)
    loss, metrics = objectives.grpo_loss(logprobs, old, ref, advantages, mask, clip=0.2, kl_beta=0.1)
    expected = naive_grpo_loss(logprobs.tolist(), old.tolist(), ref.tolist(), rewards.tolist(), lengths, group_size,
                               0.2, 0.1)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    ratio = (logprobs - old).exp()
    clipped = ((ratio - 1).abs() > 0.2) & mask
    assert 0 < clipped.sum() < mask.sum() and metrics["clip_fraction"].item() == clipped.sum() / mask.sum()
    # Gradient: zero where the clip is active on the side the advantage pushes to, and at padded positions.
    loss.backward()
    beyond = ((ratio > 1.2) & (advantages[:, None] > 0)) | ((ratio < 0.8) & (advantages[:, None] < 0))
    kl_grad = 0.1 * (1 - (ref - logprobs).exp()) / torch.tensor(lengths)[:, None] / len(lengths)  # d(beta k3)/dlogp
    torch.testing.assert_close(logprobs.grad[beyond & mask], kl_grad.detach()[beyond & mask], rtol=1e-10, atol=1e-12)
    assert (logprobs.grad[~mask] == 0).all()


def test_group_advantages_are_zero_when_a_group_agrees():
    rewards = torch.tensor([[1.0, 1.0, 1.0], [0.0, 1.0, 0.5]])
    advantages = objectives.group_advantages(rewards)
    assert (advantages[0] == 0).all()
    torch.testing.assert_close(advantages[1], torch.tensor([-0.5, 0.5, 0.0]) / (0.5 + 1e-4))


def test_completion_rows_target_the_completion_only():
    inputs, targets = objectives.completion_rows([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]])
    assert inputs.tolist() == [[5, 6, 7, 1], [8, 3, 4, 0]]
    assert targets.tolist() == [[-1, -1, 1, 2], [3, 4, 9, -1]]


def test_one_grpo_step_raises_the_probability_of_rewarded_tokens(tokenizer):
    from nanostack.serving.engine import Engine, EngineConfig
    prompt = tokenizer.render_chat([{"role": "user", "content": "What is `heapq`?"}], add_generation_prompt=True)[0]
    # The rewarded tokens: those whose text starts with a letter in the first half of the alphabet.
    rewarded = [t for t in range(tokenizer.vocab_size) if tokenizer.decode([t])[:1].lower() in "abcdefghijklm"]

    def first_half(index, text):
        return float(text[:1].lower() in "abcdefghijklm")

    def step(reward):
        """The rewarded tokens' mass after one GRPO step of a fresh policy with `reward`, and the step's metrics."""
        policy = tiny_model(tokenizer).float()
        engine = Engine(policy, tokenizer, EngineConfig(max_num_seqs=16, max_model_len=64, block_size=4))
        objective = objectives.grpo(engine, [prompt], reward, reference=copy.deepcopy(policy), group_size=16,
                                    kl_beta=0.04, max_tokens=1)
        torch.manual_seed(0)
        loss, metrics = objective(policy.train(), {"prompt_index": torch.tensor([0])})
        loss.backward()
        torch.optim.SGD(policy.parameters(), lr=0.5).step()
        with torch.no_grad():
            mass = policy(torch.tensor([prompt]))[0, -1].softmax(-1)[rewarded].sum().item()
        return mass, metrics

    with torch.no_grad():
        before = tiny_model(tokenizer).float()(torch.tensor([prompt]))[0, -1].softmax(-1)[rewarded].sum().item()
    raised, metrics = step(first_half)
    lowered, _ = step(lambda index, text: 1.0 - first_half(index, text))  # the opposite reward
    assert 0 < metrics["reward"] < 1 and metrics["kl"].item() == pytest.approx(0.0, abs=1e-6)
    assert raised > before * 1.01 and lowered < before / 1.01


def test_grpo_refuses_a_group_of_one(tokenizer):
    with pytest.raises(ValueError, match="group size must be >= 2, got 1: with one completion per prompt every "
                                         "advantage"):
        objectives.grpo(None, [[1]], lambda i, text: 0.0, reference=None, group_size=1, kl_beta=0.0)

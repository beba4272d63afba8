"""Training objectives: functions `(model, batch) -> (loss, metrics)`.

The loop in training.py calls whichever objective it is given and knows nothing else about it, so
pretraining and every post-training method share one loop (resume, logging, distributed strategies).

    next_token     pretraining: cross-entropy of every next token
    sft            supervised fine-tuning: the same loss, only on the assistant's tokens (targets != -1)
    distillation   a factory: KL between temperature-softened teacher and student distributions, mixed
                   with the hard-label loss (Hinton et al. 2015)
    dpo            a factory: Direct Preference Optimisation (Rafailov et al. 2023), which trains on
                   (prompt, chosen, rejected) triples with no reward model
    grpo           a factory: Group Relative Policy Optimisation (Shao et al. 2024), reinforcement learning
                   from a reward function, with rollouts sampled by the serving Engine on the policy's weights

Batches for the post-training objectives are dicts of tensors built by nanostack/chat_data.py. Every
objective adds the MoE auxiliary loss when the model has experts (it is zero for a dense model).
"""
import torch
import torch.nn.functional as F

from nanostack.sampling import SamplingParams

KD_KINDS = ("forward", "reverse")


def next_token(model, batch) -> tuple[torch.Tensor, dict]:
    """Pretraining: mean cross-entropy of each next token (plus the MoE auxiliary losses the model adds)."""
    inputs, targets = batch
    loss = model(inputs, targets)
    return loss, {}


def moe_aux_loss(model) -> torch.Tensor:
    """The auxiliary loss of the model's last forward (zero when dense); sees through a DDP wrapper."""
    return getattr(model, "module", model).moe_aux_loss


def sft(model, batch) -> tuple[torch.Tensor, dict]:
    """Supervised fine-tuning: mean cross-entropy over the assistant tokens only.

    batch: "inputs", "targets" (B, T) with -1 wherever the chat template's loss mask is 0, and for packed
    rows "doc_ids" (B, T), which keeps attention and positions inside each conversation. The model's own
    loss already skips -1 targets and adds the MoE auxiliary loss.
    """
    loss = model(batch["inputs"], batch["targets"], doc_ids=batch.get("doc_ids"))
    return loss, {"assistant_tokens": (batch["targets"] != -1).sum()}


# ----------------------------------------------------------------------------------------------------------
# Distillation

def kd_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                  kind: str) -> torch.Tensor:
    """Per-position KL divergence (..., V) -> (...) between the temperature-softened distributions.

    forward = KL(teacher || student): the student must cover every token the teacher likes (mean-seeking).
    reverse = KL(student || teacher): the student may drop some of them but not invent others (mode-seeking).
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r}")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 logits lose too much in softmax
    log_student = F.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_teacher = F.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    if kind == "forward":
        return (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    return (log_student.exp() * (log_student - log_teacher)).sum(-1)


def distillation(teacher, temperature: float = 2.0, alpha: float = 0.5, kind: str = "forward"):
    """An objective that trains the model towards `teacher`'s softened distribution on the assistant tokens.

    loss = alpha * T^2 * KL + (1 - alpha) * cross-entropy on the hard labels. The T^2 keeps the soft
    term's gradient scale independent of T (the softened gradients shrink as 1/T^2). The teacher is frozen
    and in eval mode; it must share the student's tokenizer, so the two distributions are over one vocabulary.
    """
    if temperature <= 0:
        raise ValueError(f"distillation temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")
    if kind not in KD_KINDS:
        raise ValueError(f"distillation kind must be one of {KD_KINDS}, got {kind!r}")
    teacher.eval()
    teacher.requires_grad_(False)

    def objective(model, batch) -> tuple[torch.Tensor, dict]:
        inputs, targets, doc_ids = batch["inputs"], batch["targets"], batch.get("doc_ids")
        student_logits = model(inputs, doc_ids=doc_ids)  # (B, T, V)
        with torch.no_grad():
            teacher_logits = teacher(inputs, doc_ids=doc_ids)
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                             f"{tuple(student_logits.shape)} differ: the two need the same vocabulary")
        trained = targets != -1  # (B, T): the assistant tokens, the only ones either loss looks at
        kl = kd_divergence(student_logits[trained], teacher_logits[trained], temperature, kind).mean()
        hard = F.cross_entropy(student_logits[trained], targets[trained])
        loss = alpha * temperature ** 2 * kl + (1 - alpha) * hard + moe_aux_loss(model)
        return loss, {"kd_kl": kl.detach(), "kd_ce": hard.detach()}

    return objective


# ----------------------------------------------------------------------------------------------------------
# Direct Preference Optimisation

def target_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position, (B, T) -> (B, T), zero where the target is -1."""
    logits = model(inputs)  # (B, T, V)
    return -F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                            reduction="none").view(targets.shape)


def sequence_logprobs(model, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each row's targets != -1: (B, T) -> (B,), the log-probability of the response."""
    return target_logprobs(model, inputs, targets).sum(dim=1)


def pair_logprobs(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probabilities of the chosen and of the rejected responses, (B,) each, in one forward of 2B rows."""
    inputs = torch.cat([batch["chosen_inputs"], batch["rejected_inputs"]])  # (2B, T)
    targets = torch.cat([batch["chosen_targets"], batch["rejected_targets"]])
    return sequence_logprobs(model, inputs, targets).chunk(2)


@torch.no_grad()
def precompute_reference(reference, rows: dict, batch_size: int = 32) -> dict:
    """`rows` plus "ref_chosen_logps" and "ref_rejected_logps" (N,), the reference's log-probs in one pass.

    With these in every batch, DPO needs no second model in memory during training. `rows` holds
    "chosen_inputs", "chosen_targets", "rejected_inputs", "rejected_targets", each (N, T).
    """
    was_training = reference.training
    reference.eval()
    device = next(reference.parameters()).device
    chosen, rejected = [], []
    for start in range(0, len(rows["chosen_inputs"]), batch_size):
        chunk = {k: v[start:start + batch_size].to(device) for k, v in rows.items()}
        chosen_logps, rejected_logps = pair_logprobs(reference, chunk)
        chosen.append(chosen_logps.float().cpu())
        rejected.append(rejected_logps.float().cpu())
    reference.train(was_training)
    return {**rows, "ref_chosen_logps": torch.cat(chosen), "ref_rejected_logps": torch.cat(rejected)}


def dpo(reference=None, beta: float = 0.1, nll_weight: float = 0.0):
    """The DPO objective against a frozen `reference` model, or, with reference=None, against reference
    log-probs that `precompute_reference` put in the batch ("ref_chosen_logps", "ref_rejected_logps").

    loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), pi/ref the summed log-probs of the
    chosen (c) and rejected (r) responses. beta * (pi - ref) is the implicit reward: beta sets how far
    the policy may move from the reference. DPO can lower the chosen reply's likelihood too, as long as the
    rejected one falls faster; `nll_weight` adds that weight times the chosen reply's mean cross-entropy per
    token, which keeps it up (RPO, Pang et al. 2024, who found it needed for DPO to help on math).
    """
    if beta <= 0 or nll_weight < 0:
        raise ValueError(f"dpo needs beta > 0 and nll_weight >= 0, got {beta} and {nll_weight}")
    if reference is not None:
        reference.eval()
        reference.requires_grad_(False)

    def objective(model, batch) -> tuple[torch.Tensor, dict]:
        policy_chosen, policy_rejected = pair_logprobs(model, batch)
        aux = moe_aux_loss(model)  # read now: the reference forward below would overwrite a shared model's
        if reference is None:
            if "ref_chosen_logps" not in batch:
                raise ValueError("dpo(reference=None) needs batches with precomputed reference log-probs; "
                                 "build them with objectives.precompute_reference")
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        else:
            with torch.no_grad():
                ref_chosen, ref_rejected = pair_logprobs(reference, batch)
        chosen_reward = beta * (policy_chosen - ref_chosen)  # (B,)
        rejected_reward = beta * (policy_rejected - ref_rejected)
        margin = chosen_reward - rejected_reward
        chosen_nll = -(policy_chosen / (batch["chosen_targets"] != -1).sum(dim=1).clamp(min=1)).mean()
        loss = -F.logsigmoid(margin).mean() + nll_weight * chosen_nll + aux
        return loss, {"reward_margin": margin.detach().mean(), "reward_accuracy": (margin > 0).float().mean(),
                      "chosen_reward": chosen_reward.detach().mean(),
                      "rejected_reward": rejected_reward.detach().mean(), "chosen_nll": chosen_nll.detach()}

    return objective


# ----------------------------------------------------------------------------------------------------------
# Group Relative Policy Optimisation

def rollouts(engine, prompts: list[list[int]], group_size: int, *, temperature: float, max_tokens: int,
             seeds: list[int], logprobs: bool = False) -> list:
    """`group_size` completions of each prompt (the engine's merged RequestOutputs, prompt by prompt), sampled
    in one continuous batch by `engine` on the model's current weights; one seed per completion makes each
    independent of the batch it ran in. `logprobs` asks for the sampled tokens' log-probabilities."""
    if len(seeds) != len(prompts) * group_size:
        raise ValueError(f"{len(prompts)} prompts x {group_size} completions need as many seeds, got {len(seeds)}")
    engine.weights_updated()  # the weights may have changed since the engine last ran: no K/V from before
    was_training = engine.model.training
    engine.model.eval()
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed,
                             logprobs=0 if logprobs else None) for seed in seeds]
    outputs = engine.generate([prompt for prompt in prompts for _ in range(group_size)], params)
    engine.model.train(was_training)
    return outputs


def completion_rows(prompts: list[list[int]], completions: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs and targets (N, T) that score each completion after its prompt: targets are the completion's
    tokens where the model predicts them, -1 elsewhere (the prompt and the padding)."""
    width = max(len(p) + len(c) - 1 for p, c in zip(prompts, completions))
    inputs = torch.zeros(len(prompts), width, dtype=torch.long)  # (N, T); padding is never a target
    targets = torch.full((len(prompts), width), -1, dtype=torch.long)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        tokens = prompt + completion
        inputs[row, :len(tokens) - 1] = torch.tensor(tokens[:-1])
        # Target t predicts token t + 1, so the completion's first target sits at len(prompt) - 1.
        targets[row, len(prompt) - 1:len(tokens) - 1] = torch.tensor(completion)
    return inputs, targets


def group_advantages(rewards: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Rewards (prompts, G) -> advantages (prompts, G): each reward minus its group's mean, over its group's
    (unbiased) standard deviation. A group whose rewards are all equal gets zeros: it says nothing."""
    return (rewards - rewards.mean(dim=1, keepdim=True)) / (rewards.std(dim=1, keepdim=True) + eps)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, clip: float, kl_beta: float) -> tuple[torch.Tensor, dict]:
    """The GRPO loss over completions: per token, -(min(ratio A, clip(ratio, 1 - clip, 1 + clip) A) - beta KL),
    averaged over each completion's tokens, then over completions (DeepSeekMath's normalisation).

    logprobs (N, T) are the policy's, with gradient; old_logprobs those of the policy that sampled (ratio =
    exp(logprobs - old)); ref_logprobs the frozen reference's; advantages (N,); mask (N, T) marks completion
    tokens. KL is the k3 estimator exp(ref - logp) - (ref - logp) - 1: unbiased for KL(policy || reference)
    on the policy's own samples, and never negative.
    """
    zero = torch.zeros_like(logprobs)
    logprobs, old_logprobs, ref_logprobs = (torch.where(mask, x, zero) for x in (logprobs, old_logprobs, ref_logprobs))
    ratio = torch.exp(logprobs - old_logprobs)
    advantage = advantages[:, None].to(logprobs.dtype)
    surrogate = torch.minimum(ratio * advantage, ratio.clamp(1 - clip, 1 + clip) * advantage)
    log_ref_ratio = ref_logprobs - logprobs
    kl = torch.exp(log_ref_ratio) - log_ref_ratio - 1
    tokens = mask.sum(dim=1).clamp(min=1)
    loss = (-(surrogate - kl_beta * kl) * mask).sum(dim=1) / tokens
    clipped = ((ratio - 1).abs() > clip) & mask
    return loss.mean(), {"kl": ((kl * mask).sum(dim=1) / tokens).mean().detach(),
                         "clip_fraction": clipped.sum() / mask.sum().clamp(min=1)}


def grpo(engine, prompts: list[list[int]], reward, reference=None, group_size: int = 8, clip: float = 0.2,
         kl_beta: float = 0.04, temperature: float = 1.0, max_tokens: int = 16):
    """The GRPO objective (Shao et al. 2024). Batches are {"prompt_index": (B,)} into `prompts` (token ids);
    for each prompt `engine` (a serving Engine over the policy itself, so rollouts see every update) samples
    `group_size` completions, `reward(prompt_index, text) -> float` scores them, and the advantages are the
    rewards normalised within each group: no value model, the group is the baseline.

    The old log-probabilities are the ones the engine reported while sampling, so the ratio is 1 up to the
    numerics of the two forwards and clipping guards against their mismatch. `reference` (frozen; None with
    kl_beta 0) holds the policy near where it started. Seeds come from torch's global RNG, which checkpoints
    save, so a resumed run samples the same completions.
    """
    if group_size < 2:
        raise ValueError(f"grpo group size must be >= 2, got {group_size}: with one completion per prompt every "
                         f"advantage (reward minus the group's mean) is 0 and nothing is learned")
    if kl_beta < 0 or clip <= 0:
        raise ValueError(f"grpo needs kl_beta >= 0 and clip > 0, got {kl_beta} and {clip}")
    if reference is None and kl_beta > 0:
        raise ValueError(f"grpo with kl_beta={kl_beta} needs a reference model (or kl_beta 0)")
    if reference is not None:
        reference.eval()
        reference.requires_grad_(False)

    def objective(model, batch) -> tuple[torch.Tensor, dict]:
        indices = batch["prompt_index"].tolist()
        seeds = torch.randint(0, 2**62, (len(indices) * group_size,)).tolist()
        outputs = rollouts(engine, [prompts[i] for i in indices], group_size, temperature=temperature,
                           max_tokens=max_tokens, seeds=seeds, logprobs=True)
        groups = [indices[n // group_size] for n in range(len(outputs))]
        rewards = torch.tensor([float(reward(i, out.text)) for i, out in zip(groups, outputs)])
        advantages = group_advantages(rewards.view(len(indices), group_size)).flatten()
        completions = [out.new_token_ids for out in outputs]
        inputs, targets = completion_rows([prompts[i] for i in groups], completions)
        mask = targets != -1
        old_logprobs = torch.zeros(targets.shape)
        old_logprobs[mask] = torch.tensor([lp for out in outputs for lp in out.logprobs])
        device = batch["prompt_index"].device
        inputs, targets, mask, old_logprobs = (x.to(device) for x in (inputs, targets, mask, old_logprobs))
        logprobs = target_logprobs(model, inputs, targets)
        aux = moe_aux_loss(model)
        with torch.no_grad():
            ref_logprobs = target_logprobs(reference, inputs, targets) if reference is not None else logprobs
        loss, metrics = grpo_loss(logprobs, old_logprobs, ref_logprobs.detach(), advantages.to(device), mask, clip,
                                  kl_beta)
        return loss + aux, {**metrics, "reward": rewards.mean(), "completion_tokens": mask.sum(1).float().mean(),
                            "tokens": inputs.numel()}

    return objective

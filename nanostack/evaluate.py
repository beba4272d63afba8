"""How often a model solves a verifiable task: pass@1 (greedy) and pass@k (sampled) on held-out problems.

    python -m nanostack.evaluate --model out/grpo --task addition            # any checkpoint, any task
    python -m nanostack.evaluate --model out/sft --task addition,subtraction --k 16 --out eval.json

Every completion comes from the serving Engine (nanostack/serving/engine.py), the code that answers users, in
continuous batches over its paged KV cache; each sampled completion has its own seed, so the figures do not
depend on batching and a re-run gives the same numbers.

    pass@1      the greedy completion is right (temperature 0: what a user gets by default)
    pass@k      at least one of k completions sampled at --temperature is right: the unbiased estimator of
                Chen et al. (2021), 1 - C(n - c, k) / C(n, k) for c right out of n = k samples
    reward      the mean reward of those samples (the sampled pass@1, what reinforcement learning raises)

With a reference model, `kl_to_reference` adds how far the model has moved: the mean over its own samples of
log p(completion) - log p_ref(completion), a sampled estimate of KL(model || reference) in nats per completion.
"""
from dataclasses import asdict, dataclass
from math import comb
from pathlib import Path

import torch

from nanostack import checkpoint, objectives, tasks
from nanostack.atomic import write_json
from nanostack.cli import add_dataclass_args, dataclass_from_args, make_parser, run
from nanostack.serving.engine import Engine, EngineConfig
from nanostack.training import resolve_device

MAX_BATCH = 256  # sequences the evaluation engine runs together


@dataclass
class EvalConfig:
    model: str = "out/sft"          # checkpoint or run directory
    task: str = "addition"          # task names, comma-separated: addition | subtraction | stdlib_module
    digits: int = 3                 # arithmetic tasks: operands below 10**digits
    problems: int = 300             # held-out problems per task
    k: int = 8                      # samples per problem for pass@k
    temperature: float = 1.0        # sampling temperature of the pass@k samples
    max_tokens: int = 16            # tokens per completion at most
    seed: int = 0                   # seeds the samples (the held-out problems are fixed by the task)
    device: str = "auto"            # auto | cpu | cuda
    out: str = ""                   # also write the results as JSON here


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that k of n samples, c of them right, include a right one: 1 - C(n - c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - comb(n - c, k) / comb(n, k)


def prompt_ids(tokenizer, problems: list[tasks.Problem]) -> list[list[int]]:
    """The chat prompt of each problem, ending where the assistant's reply starts (<|assistant|>)."""
    return [tokenizer.render_prompt(p.messages()) for p in problems]


def task_engine(model, tokenizer, prompts: list[list[int]], max_tokens: int, max_num_seqs: int = MAX_BATCH) -> Engine:
    """An Engine over `model` itself (no copy: it sees every update), its KV pool sized for these prompts."""
    longest = max(map(len, prompts)) + max_tokens
    if longest > model.config.max_seq_len:
        raise ValueError(f"the longest prompt is {longest - max_tokens} tokens, which with {max_tokens} new tokens "
                         f"exceeds the model's max_seq_len={model.config.max_seq_len}: lower the new tokens")
    return Engine(model, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=4096,
                                                 max_model_len=longest))


def evaluate_task(model, tokenizer, task: tasks.Task, problems: list[tasks.Problem], k: int = 8,
                  temperature: float = 1.0, max_tokens: int = 16, seed: int = 0, reference=None) -> dict:
    """{"pass@1", "pass@k", "reward"} of `model` on `problems` (and "kl_to_reference" given a reference)."""
    if not problems:
        raise ValueError(f"task {task.name!r} has no held-out problems to score: raise its --digits")
    prompts = prompt_ids(tokenizer, problems)
    engine = task_engine(model, tokenizer, prompts, max_tokens)
    greedy = objectives.rollouts(engine, prompts, 1, temperature=0.0, max_tokens=max_tokens, seeds=[0] * len(prompts))
    seeds = [seed * 1_000_003 + i for i in range(len(prompts) * k)]
    sampled = objectives.rollouts(engine, prompts, k, temperature=temperature, max_tokens=max_tokens, seeds=seeds)
    right = torch.tensor([tasks.reward(task, problems[i // k], out.text) for i, out in enumerate(sampled)])
    right_per_problem = right.view(len(problems), k).sum(dim=1).long().tolist()
    metrics = {"pass@1": sum(tasks.reward(task, p, out.text) for p, out in zip(problems, greedy)) / len(problems),
               f"pass@{k}": sum(pass_at_k(k, c, k) for c in right_per_problem) / len(problems),
               "reward": float(right.mean())}
    if reference is not None:
        metrics["kl_to_reference"] = kl_to_reference(model, reference, [p for p in prompts for _ in range(k)],
                                                     [out.new_token_ids for out in sampled])
    return metrics


@torch.no_grad()
def kl_to_reference(model, reference, prompts: list[list[int]], completions: list[list[int]],
                    batch_size: int = 64) -> float:
    """Mean of log p_model - log p_reference over completions the model sampled: KL(model || reference), nats."""
    device = model.norm.weight.device
    total = 0.0
    for start in range(0, len(prompts), batch_size):
        inputs, targets = objectives.completion_rows(prompts[start:start + batch_size],
                                                     completions[start:start + batch_size])
        inputs, targets = inputs.to(device), targets.to(device)
        log_ratio = objectives.target_logprobs(model, inputs, targets) - objectives.target_logprobs(reference, inputs,
                                                                                                   targets)
        total += float(log_ratio.sum())
    return total / len(prompts)


def evaluate_tasks(model, tokenizer, heldout: list[tuple[tasks.Task, list[tasks.Problem]]], **settings) -> dict:
    """evaluate_task for each (task, held-out problems): {"<task>/<metric>": value}; the model in eval mode."""
    was_training = model.training
    model.eval()
    metrics = {}
    for task, problems in heldout:
        for name, value in evaluate_task(model, tokenizer, task, problems, **settings).items():
            metrics[f"{task.name}/{name}"] = value
    model.train(was_training)
    return metrics


def main(argv=None) -> int:
    """Evaluate a checkpoint on held-out task problems; print a table and optionally write JSON."""
    parser = make_parser(__doc__, prog="python -m nanostack.evaluate")
    add_dataclass_args(parser, EvalConfig, "evaluation")
    config = dataclass_from_args(EvalConfig, parser.parse_args(argv))
    if config.problems < 1 or config.k < 1:
        raise ValueError(f"--problems {config.problems} and --k {config.k} must be at least 1")
    task_list = tasks.parse_tasks(config.task, config.digits)
    device = resolve_device(config.device)
    if not Path(config.model).exists():
        raise checkpoint.CheckpointError(f"no checkpoint at {config.model}: pass --model CHECKPOINT_DIR "
                                         f"(finetune.py writes out/sft, out/grpo, ...)")
    loaded = checkpoint.load_checkpoint(config.model, device)
    heldout = [(task, tasks.problems(task, "heldout", config.problems)) for task in task_list]
    metrics = evaluate_tasks(loaded["model"], loaded["tokenizer"], heldout, k=config.k,
                             temperature=config.temperature, max_tokens=config.max_tokens, seed=config.seed)
    print(f"{'held-out metric':<32}{'value':>10}")
    for name, value in metrics.items():
        print(f"{name:<32}{value:>10.4f}")
    if config.out:
        write_json(Path(config.out), {"checkpoint": str(loaded["directory"]), "config": asdict(config),
                                      "metrics": metrics})
    return 0


if __name__ == "__main__":
    run(main)

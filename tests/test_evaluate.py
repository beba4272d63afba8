"""Task evaluation through the Engine: the pass@k estimator against brute force, pass@1/pass@k against an
independent decoding path, KL to a reference against a naive float64 sum, and the `python -m` command."""
import copy
import itertools
import json
import random

import pytest
import torch

from nanostack import checkpoint, evaluate, tasks
from nanostack.sampling import SamplingParams
from nanostack.serving.engine import Engine, EngineConfig

from greedy_reference import naive_greedy

pytestmark = pytest.mark.usefixtures("one_thread")
MAX_TOKENS = 4


@pytest.fixture(scope="module")
def model(tokenizer, sharpened_model):
    return sharpened_model(tokenizer.vocab_size, 96)


def even_length(problem, completion: str) -> bool:
    """A checker a random model passes now and then, so the counts are neither all right nor all wrong."""
    return len(completion) % 2 == 0


TOY_TASK = tasks.Task("even_length", tasks.get_task("addition", 2).sample, even_length)


@pytest.mark.parametrize("n", [1, 4, 6])
def test_pass_at_k_is_the_share_of_k_subsets_with_a_right_answer(n):
    for c in range(n + 1):
        right = [True] * c + [False] * (n - c)
        for k in range(1, n + 1):
            subsets = list(itertools.combinations(right, k))
            assert evaluate.pass_at_k(n, c, k) == pytest.approx(sum(map(any, subsets)) / len(subsets), abs=1e-12)
    with pytest.raises(ValueError, match="k=0"):
        evaluate.pass_at_k(4, 1, 0)


def test_task_metrics_equal_one_request_at_a_time(model, tokenizer):
    problems = tasks.problems(TOY_TASK, "heldout", 6)
    k, seed = 3, 5
    metrics = evaluate.evaluate_task(model, tokenizer, TOY_TASK, problems, k=k, max_tokens=MAX_TOKENS, seed=seed)
    prompts = evaluate.prompt_ids(tokenizer, problems)
    greedy_right, sampled_right, any_right = 0, 0, 0
    for i, prompt in enumerate(prompts):
        greedy = naive_greedy(model, prompt, MAX_TOKENS, stop_ids=tokenizer.stop_ids)
        greedy_right += even_length(None, tokenizer.decode([t for t in greedy if t not in tokenizer.stop_ids]))
        texts = []
        for j in range(k):  # each sample alone in a fresh engine: its seed alone decides it
            params = SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=seed * 1_000_003 + i * k + j)
            texts.append(Engine(model, tokenizer, EngineConfig(max_model_len=64)).generate([prompt], params)[0].text)
        sampled_right += sum(map(lambda t: even_length(None, t), texts))
        any_right += any(even_length(None, t) for t in texts)
    assert 0 < sampled_right < k * len(problems) and 0 < greedy_right < len(problems)
    assert metrics == pytest.approx({"pass@1": greedy_right / len(problems), f"pass@{k}": any_right / len(problems),
                                     "reward": sampled_right / (k * len(problems))})


def test_kl_to_reference_is_the_mean_log_ratio_of_the_samples(model, tokenizer):
    reference = copy.deepcopy(model)
    with torch.no_grad():
        reference.lm_head.weight.mul_(0.8)
    rng = random.Random(0)
    prompts = [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(2, 9))] for _ in range(5)]
    completions = [[rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(1, 4))] for _ in range(5)]
    expected = 0.0
    for prompt, completion in zip(prompts, completions):
        ids = torch.tensor([prompt + completion])
        for net, sign in ((model, 1), (reference, -1)):
            logp = net(ids)[0].double().log_softmax(-1)
            expected += sign * sum(logp[len(prompt) - 1 + t, c].item() for t, c in enumerate(completion))
    got = evaluate.kl_to_reference(model, reference, prompts, completions, batch_size=2)
    assert got == pytest.approx(expected / len(prompts), rel=1e-5) and abs(got) > 1e-3
    assert evaluate.kl_to_reference(model, model, prompts, completions) == 0.0


def test_evaluate_command_on_a_checkpoint(model, tokenizer, tmp_path, capsys):
    checkpoint.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)
    out = tmp_path / "eval.json"
    assert evaluate.main(["--model", str(tmp_path / "ckpt"), "--task", "addition,subtraction", "--digits", "2",
                          "--problems", "4", "--k", "2", "--max-tokens", str(MAX_TOKENS), "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert set(metrics) == {f"{t}/{m}" for t in ("addition", "subtraction") for m in ("pass@1", "pass@2", "reward")}
    assert "addition/pass@1" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown task 'division'"):
        evaluate.main(["--model", str(tmp_path / "ckpt"), "--task", "division"])
    with pytest.raises(checkpoint.CheckpointError, match="no checkpoint at"):
        evaluate.main(["--model", str(tmp_path / "nowhere")])
    with pytest.raises(ValueError, match="exceeds the model's max_seq_len=96"):
        evaluate.main(["--model", str(tmp_path / "ckpt"), "--problems", "2", "--max-tokens", "90"])

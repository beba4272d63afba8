"""finetune.py end to end: every mode from a tiny checkpoint, its evaluation, LoRA merge and exact resume."""
import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import finetune
from nanostack import chat_data, checkpoint, lora, qat, quant, quant4, tasks
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parent.parent
MODULES = ("json", "textwrap", "shlex", "fnmatch", "glob", "bisect", "heapq", "colorsys", "string", "csv", "calendar")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A tiny random checkpoint, a second one (the teacher), and chat / preference jsonl files."""
    root = tmp_path_factory.mktemp("finetune")
    entries = chat_data.stdlib_docstrings(MODULES)
    tokenizer = Tokenizer.train([" ".join(chat_data.question(e) + " " + e.answer for e in entries)], 360)
    for name, seed, width in (("init", 0, 32), ("teacher", 1, 48)):
        torch.manual_seed(seed)
        config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=2, n_kv_head=1, n_embd=width,
                             max_seq_len=160)
        checkpoint.save_checkpoint(root / name, GPT(config).state_dict(), config, tokenizer)
    with open(root / "chat.jsonl", "w") as f:
        for entry in entries:
            f.write(json.dumps({"messages": chat_data.chat_messages(entry)}) + "\n")
    with open(root / "pairs.jsonl", "w") as f:
        for pair in chat_data.preference_examples(entries):
            f.write(json.dumps({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}) + "\n")
    return root


def common_flags(workdir, out):
    return ["--init", str(workdir / "init"), "--out-dir", str(workdir / out), "--steps", "4", "--batch-size", "4",
            "--warmup-steps", "1", "--save-every", "2", "--log-every", "1", "--eval-examples", "12"]


def run_script(args, cwd):
    # One thread: these models are tiny, and two OpenMP threads on a busy 2-core machine spin-wait each other.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(ROOT / "finetune.py"), *args], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env=env)


def test_defaults_are_fine_tuning_defaults():
    args = finetune.parse_args([])
    assert (args.mode, args.init, args.steps, args.weight_decay, args.out_dir) == ("sft", "out/pretrain", 200, 0.0, "")
    assert args.lora_rank == 0 and args.lora_targets == "qv" and args.merge_lora is True


def test_missing_init_says_to_run_train_py(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match="run `python train.py` first"):
        finetune.main(["--init", str(tmp_path / "nowhere"), "--out-dir", str(tmp_path / "out")])


def test_a_teacher_with_another_tokenizer_is_refused(workdir, tmp_path):
    other = Tokenizer.train(["completely different text " * 20], 300)
    config = ModelConfig(vocab_size=other.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, max_seq_len=64)
    checkpoint.save_checkpoint(tmp_path / "foreign", GPT(config).state_dict(), config, other)
    student_tokenizer = checkpoint.load_checkpoint(workdir / "init")["tokenizer"]
    with pytest.raises(ValueError, match="different tokenizer"):
        finetune.load_teacher(str(tmp_path / "foreign"), student_tokenizer, torch.device("cpu"))
    assert finetune.load_teacher(str(workdir / "teacher"), student_tokenizer, torch.device("cpu")) is not None


def test_distillation_without_a_teacher_is_refused(workdir):
    with pytest.raises(ValueError, match="--teacher"):
        finetune.main(["--mode", "distill", "--init", str(workdir / "init"), "--out-dir", str(workdir / "x"),
                       "--data", str(workdir / "chat.jsonl")])


def test_data_is_checked_before_any_model_loads(workdir, tmp_path, monkeypatch):
    def no_loading(*args, **kwargs):
        raise AssertionError("a checkpoint was loaded before the data was checked")
    monkeypatch.setattr(checkpoint, "load_checkpoint", no_loading)
    bad = tmp_path / "latin1.jsonl"
    first = (workdir / "chat.jsonl").read_bytes().splitlines(keepends=True)[0]
    bad.write_bytes(first + '{"messages": [{"role": "user", "content": "caf\u00e9"}]}\n'.encode("latin-1"))
    with pytest.raises(ValueError) as raised:
        finetune.main(["--init", str(workdir / "init"), "--data", str(bad), "--out-dir", str(tmp_path / "out")])
    offset = bad.read_bytes().index(b"\xe9")
    assert str(raised.value).startswith(f"{bad}:2: byte 0xe9 at byte offset {offset} is not UTF-8; re-encode")
    (tmp_path / "blank.jsonl").write_text("\n  \n")
    with pytest.raises(ValueError, match=f"{tmp_path / 'blank.jsonl'} holds no JSON lines"):
        finetune.main(["--init", str(workdir / "init"), "--data", str(tmp_path / "blank.jsonl"), "--mode", "dpo"])
    with pytest.raises(ValueError, match="LoRA targets"):
        finetune.main(["--init", str(workdir / "init"), "--lora-rank", "4", "--lora-targets", "nothing"])


def test_conversations_longer_than_the_context_are_cut_or_dropped_never_nan(workdir, tmp_path, capsys):
    long_prompt = {"role": "user", "content": "what does this do? " * 80}  # far over the model's 160 tokens
    conversations = [json.loads(line)["messages"] for line in (workdir / "chat.jsonl").read_text().splitlines()]
    with open(tmp_path / "long.jsonl", "w") as f:  # every training line long, the held-out ones as they were
        for i, messages in enumerate(conversations):
            heldout = chat_data.is_heldout(f"line {i}", 0.2)
            f.write(json.dumps({"messages": messages if heldout else [long_prompt, messages[-1]]}) + "\n")
    flags = common_flags(workdir, "long") + ["--data", str(tmp_path / "long.jsonl"), "--heldout-fraction", "0.2"]
    with pytest.raises(ValueError, match="keeps an assistant token within --seq-len 160"):
        finetune.main(flags)  # each is cut before its answer: nothing to learn (it was a NaN loss at step 1)
    with open(tmp_path / "mixed.jsonl", "w") as f:
        for i, messages in enumerate(conversations):
            f.write(json.dumps({"messages": [long_prompt, messages[-1]] if i % 2 else messages}) + "\n")
    flags = common_flags(workdir, "mixed") + ["--data", str(tmp_path / "mixed.jsonl"), "--heldout-fraction", "0.2"]
    capsys.readouterr()
    assert finetune.main(flags) == 0
    printed = capsys.readouterr().out
    cut = re.search(r"(\d+) of (\d+) training conversations do not fit in --seq-len 160 tokens: cut to fit, and "
                    r"(\d+) of them, cut before any assistant token, dropped", printed)
    assert cut and 0 < int(cut[3]) <= int(cut[1]) < int(cut[2]), printed
    losses = [json.loads(line)["loss"] for line in (workdir / "mixed" / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses and all(math.isfinite(loss) for loss in losses)
    assert re.search(r"done in \d+s \(\d+s of it training\)", printed)


def test_stdlib_data_run_reports_every_metric_before_and_after(workdir, monkeypatch):
    """In-process on a few stdlib modules (the full library takes seconds to parse)."""
    subset = chat_data.stdlib_docstrings(MODULES + ("gettext", "fractions", "operator"))
    monkeypatch.setattr(chat_data, "stdlib_docstrings", lambda: subset)
    out = workdir / "stdlib_sft"
    assert finetune.main(common_flags(workdir, "stdlib_sft") + ["--heldout-fraction", "0.4"]) == 0
    report = json.loads((out / "eval.json").read_text())
    for metrics in (report["before"], report["after"]):
        assert set(metrics) == {"heldout_loss", "multiple_choice_accuracy", "multiple_choice_accuracy_calibrated",
                                "preference_accuracy"}
        assert 0.0 <= metrics["multiple_choice_accuracy_calibrated"] <= 1.0
    assert report["after"]["heldout_loss"] < report["before"]["heldout_loss"]  # 4 steps on the same format
    loaded = checkpoint.load_checkpoint(out)
    assert loaded["raw_config"]["mode"] == "sft" and loaded["raw_config"]["finetune"]["lora"] is None


@pytest.mark.slow
def test_sft_with_packing_end_to_end(workdir):
    result = run_script(common_flags(workdir, "sft") + ["--data", str(workdir / "chat.jsonl"), "--packing", "true"],
                        workdir)
    assert result.returncode == 0, result.stderr
    assert "heldout_loss" in result.stdout and "100.00%" in result.stdout  # full fine-tuning
    report = json.loads((workdir / "sft" / "eval.json").read_text())
    assert report["trainable_params"] == report["total_params"] and report["steps"] == 4
    loaded = checkpoint.load_checkpoint(workdir / "sft")
    assert loaded["raw_config"]["mode"] == "sft" and checkpoint.read_trainer_state(workdir / "sft")["step"] == 4


@pytest.mark.slow
def test_distillation_with_lora_and_a_no_teacher_baseline_end_to_end(workdir):
    flags = common_flags(workdir, "distill") + ["--mode", "distill", "--data", str(workdir / "chat.jsonl"),
                                                "--teacher", str(workdir / "teacher"), "--kd-baseline", "true",
                                                "--kd-kind", "reverse", "--lora-rank", "2", "--lora-targets", "all"]
    result = run_script(flags, workdir)
    assert result.returncode == 0, result.stderr
    report = json.loads((workdir / "distill" / "eval.json").read_text())
    assert {"teacher_heldout_loss", "no_teacher_heldout_loss"} <= set(report)
    assert report["no_teacher_heldout_loss"] != report["after"]["heldout_loss"]  # the teacher made a difference
    assert report["trainable_params"] < report["total_params"] / 5
    assert (workdir / "distill" / "baseline" / "latest").exists()


@pytest.mark.slow
def test_dpo_with_lora_merges_for_serving_and_resumes_exactly(workdir):
    flags = common_flags(workdir, "dpo") + ["--mode", "dpo", "--data", str(workdir / "pairs.jsonl"), "--lora-rank", "4",
                                            "--lora-dropout", "0.1", "--dpo-precompute-reference", "true"]
    result = run_script(flags, workdir)
    assert result.returncode == 0, result.stderr
    out = workdir / "dpo"
    report = json.loads((out / "eval.json").read_text())
    assert "preference_accuracy" in report["after"] and 0.0 <= report["dpo_reward_accuracy"] <= 1.0

    # The served checkpoint is the base with the saved adapter merged in.
    served = checkpoint.load_checkpoint(out)
    assert served["raw_config"]["finetune"]["lora_merged"] and served["raw_config"]["mode"] == "dpo"
    base = checkpoint.load_checkpoint(workdir / "init")["model"]
    lora.load_adapter(base, out / "adapter", base=lora.checkpoint_identity(workdir / "init"))
    lora.merge_lora(base)
    for name, tensor in served["model"].state_dict().items():
        torch.testing.assert_close(tensor, base.state_dict()[name], rtol=0, atol=0)

    # Simulate a crash after the step-2 checkpoint of the training run, then resume it.
    finished = load_file(checkpoint.resolve_checkpoint(out) / "model.safetensors")
    shutil.rmtree(out / "lora_run" / "step_000004")
    (out / "lora_run" / "latest").write_text("step_000002\n")
    resumed = run_script(flags + ["--resume", "true"], workdir)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr + resumed.stdout
    again = load_file(checkpoint.resolve_checkpoint(out) / "model.safetensors")
    assert again.keys() == finished.keys()
    for name in finished:
        assert torch.equal(again[name], finished[name]), name


def test_task_settings_the_mode_would_not_use_are_refused(workdir):
    init = ["--init", str(workdir / "init"), "--out-dir", str(workdir / "refused")]
    for flags, message in ((["--mode", "grpo"], "--mode grpo learns from a reward: pass --task"),
                           (["--mode", "grpo", "--task", "addition", "--group-size", "1"],
                            "--group-size must be >= 2 for grpo, got 1: with one completion per prompt every "
                            "advantage"),
                           (["--mode", "grpo", "--task", "multiplication"], "unknown task 'multiplication'"),
                           (["--mode", "dpo", "--task", "addition"], "use --pairs-from-task addition"),
                           (["--pairs-from-task", "addition"], "--pairs-from-task builds DPO pairs"),
                           (["--task", "addition", "--data", str(workdir / "chat.jsonl")], "pass one of them")):
        with pytest.raises(ValueError, match=message):
            finetune.main(init + flags)


@pytest.mark.slow
def test_grpo_with_lora_evaluates_pass_at_k_and_resumes_exactly(workdir, monkeypatch):
    """In-process, with a toy task a random model sometimes passes (so the rewards, and the updates, are not all 0)."""
    even = tasks.Task("even_length", tasks.get_task("addition", 2).sample, lambda problem, text: len(text) % 2 == 0)
    monkeypatch.setitem(tasks.TASKS, "even_length", lambda digits: even)
    flags = common_flags(workdir, "grpo") + ["--mode", "grpo", "--task", "even_length", "--group-size", "4",
                                             "--max-new-tokens", "3", "--pass-k", "2", "--lora-rank", "2",
                                             "--lora-dropout", "0.1", "--batch-size", "2"]
    assert finetune.main(flags) == 0
    out = workdir / "grpo"
    report = json.loads((out / "eval.json").read_text())
    assert {"even_length/pass@1", "even_length/pass@2", "even_length/reward"} <= set(report["before"])
    assert report["after"]["even_length/kl_to_reference"] != 0  # the adapters moved the policy
    logged = [json.loads(line) for line in (out / "lora_run" / "metrics.jsonl").read_text().splitlines()]
    assert all({"reward", "kl", "clip_fraction"} <= set(r) and 0 < r["reward"] < 1 for r in logged if "loss" in r)

    # Simulate a crash after the step-2 checkpoint, then resume: the rollouts' seeds come from the saved RNG.
    finished = load_file(checkpoint.resolve_checkpoint(out / "lora_run") / "model.safetensors")
    shutil.rmtree(out / "lora_run" / "step_000004")
    (out / "lora_run" / "latest").write_text("step_000002\n")
    assert finetune.main(flags + ["--resume", "true"]) == 0
    again = load_file(checkpoint.resolve_checkpoint(out / "lora_run") / "model.safetensors")
    assert any(finished[name].abs().sum() > 0 for name in finished if name.endswith("lora_b"))  # B starts at 0
    for name in finished:
        assert torch.equal(again[name], finished[name]), name


def test_on_policy_pairs_prefer_a_right_sample_or_the_reference_answer(workdir):
    """Pairs from the model's own samples, scored by the task: chosen right, rejected wrong, and the reference
    answer as the chosen reply where no sample was right."""
    loaded = checkpoint.load_checkpoint(workdir / "init")
    config = finetune.FinetuneConfig(mode="dpo", pairs_from_task="even_length", group_size=4, max_new_tokens=3)
    even = tasks.Task("even_length", tasks.get_task("addition", 2).sample, lambda problem, text: len(text) % 2 == 0)
    problems = [(even, p) for p in tasks.problems(even, "train", 40)]
    pairs = finetune.on_policy_pairs(loaded["model"], loaded["tokenizer"], problems, config, 30, lambda *a: None)
    assert len(pairs) == 30
    answers = {p.question: p.answer for _, p in problems}
    from_samples = [pair for pair in pairs if pair.chosen != answers[pair.prompt[0]["content"]]]
    assert 0 < len(from_samples) < len(pairs)  # some chosen replies are samples, some the reference answer
    assert all(len(pair.chosen) % 2 == 0 for pair in from_samples) and all(len(pair.rejected) % 2 for pair in pairs)


@pytest.mark.slow
def test_qlora_end_to_end_merges_the_dequantized_base_and_reports_memory(workdir):
    flags = common_flags(workdir, "qlora") + ["--lora-rank", "4", "--base-quant", "nf4", "--data",
                                              str(workdir / "chat.jsonl")]
    result = run_script(flags, workdir)
    assert result.returncode == 0, result.stderr
    out = workdir / "qlora"
    report = json.loads((out / "eval.json").read_text())
    memory = report["memory_bytes"]
    assert memory["frozen_base"] < memory["bf16_lora_frozen_base"]
    assert memory["training_state"] - memory["frozen_base"] == 16 * report["trainable_params"]
    served = checkpoint.load_checkpoint(out)
    assert served["raw_config"]["finetune"]["base_quant"] == "nf4"
    # The served model is the NF4 base, dequantized, with the saved adapter merged in.
    base = checkpoint.load_checkpoint(workdir / "init")["model"]
    quant4.quantize_base_nf4(base)
    lora.load_adapter(base, out / "adapter")
    lora.merge_lora(base)
    for name, tensor in served["model"].state_dict().items():
        torch.testing.assert_close(tensor, base.state_dict()[name], rtol=0, atol=0)


@pytest.mark.slow
def test_qat_end_to_end_saves_the_model_it_trained_quantized(workdir):
    result = run_script(common_flags(workdir, "qat") + ["--qat", "int4", "--qat-group-size", "32", "--data",
                                                        str(workdir / "chat.jsonl")], workdir)
    assert result.returncode == 0, result.stderr
    out = workdir / "qat"
    plain = checkpoint.load_checkpoint(out)  # the float weights that trained under fake quantization
    assert plain["raw_config"]["finetune"]["qat"] == "int4"
    quantized = quant.load_quantized(out / "quantized")["model"]
    assert quantized.quantization["group_size"] == 32
    expected = qat.quantize_trained(plain["model"], {"mode": "int4", "group_size": 32, "skip": ["router"]})
    ids = torch.randint(0, plain["config"].vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(quantized(ids), expected(ids))

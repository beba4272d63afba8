"""What a newcomer meets first: every script's --help (examples, defaults, how flags are written), and the
commonest mistakes ending in one line that says what to do: a missing checkpoint, a teacher with another
tokenizer, a training step that runs out of memory (the checkpoints saved before it stay intact)."""
import argparse
from dataclasses import dataclass
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from nanostack import checkpoint, objectives, training
from nanostack.cli import FLAG_NOTE, add_dataclass_args, dataclass_from_args
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer
from nanostack.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent
TEXT = "def f(x):\n    return x * 2\n" * 10 + "for i in range(3):\n    print(i)\n" * 10


HELP_COMMANDS = {  # script -> (argv, an example its description shows, a flag with its default)
    "train": (["train.py"], "python train.py --resume true", "(default: 600)"),
    "finetune": (["finetune.py"], "python finetune.py --mode dpo --init out/sft", "(default: 'sft')"),
    "prepare": (["data/prepare.py"], "python data/prepare.py --source my_corpus/", "(default: 4096)"),
    "speedrun": (["-m", "nanostack.speedrun"], "python -m nanostack.speedrun --tiny true", "(default: 'out/speedrun')"),
}


@pytest.mark.parametrize("script", sorted(HELP_COMMANDS))
def test_help_shows_examples_defaults_and_how_flags_are_written(script):
    argv, example, default = HELP_COMMANDS[script]
    result = subprocess.run([sys.executable, *argv, "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    usage = result.stdout.splitlines()[0]
    assert usage.startswith("usage: ") and usage.endswith("[--flag VALUE ...]")  # one line, not every flag
    assert example in result.stdout and default in result.stdout
    assert " ".join(FLAG_NOTE.split()) in " ".join(result.stdout.split())


@dataclass
class Switches:
    compile: bool = False           # compile the model
    resume: bool = True             # continue the run


def test_a_bare_boolean_flag_means_true():
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Switches)
    assert dataclass_from_args(Switches, parser.parse_args(["--compile"])) == Switches(compile=True)
    assert dataclass_from_args(Switches, parser.parse_args(["--resume", "false", "--compile"])) == Switches(True, False)
    assert dataclass_from_args(Switches, parser.parse_args([])) == Switches()


def small_checkpoint(directory: Path, tokenizer: Tokenizer) -> Path:
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, max_seq_len=16)
    return checkpoint.save_checkpoint(directory, GPT(config).state_dict(), config, tokenizer)


def test_a_missing_checkpoint_names_the_paths_tried_and_the_command_that_writes_one(tmp_path):
    result = subprocess.run([sys.executable, "finetune.py", "--init", str(tmp_path / "nothing")], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stdout == ""
    message = result.stderr.strip()
    assert message.startswith("error: no checkpoint at") and "\n" not in message  # one line, no traceback
    assert "python train.py" in message
    with pytest.raises(checkpoint.CheckpointError) as raised:
        checkpoint.resolve_checkpoint(tmp_path / "nothing")
    assert str(tmp_path / "nothing" / "config.json") in str(raised.value)
    assert str(tmp_path / "nothing" / "latest") in str(raised.value)

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "latest").write_text("step_000100\n")  # points at a checkpoint someone deleted
    with pytest.raises(checkpoint.CheckpointError, match="step_000100 is missing"):
        checkpoint.resolve_checkpoint(tmp_path / "run")


def test_a_teacher_with_another_tokenizer_names_both_files_and_what_differs(tmp_path):
    import finetune
    student_tokenizer = Tokenizer.train([TEXT], 300, num_workers=1)
    other_tokenizer = Tokenizer.train([TEXT], 280, num_workers=1)
    student = small_checkpoint(tmp_path / "student", student_tokenizer)
    small_checkpoint(tmp_path / "teacher", other_tokenizer)
    with pytest.raises(ValueError) as raised:
        finetune.load_teacher(str(tmp_path / "teacher"), student_tokenizer, torch.device("cpu"),
                              student / "tokenizer.json")
    message = str(raised.value)
    assert str(tmp_path / "teacher" / "tokenizer.json") in message and str(student / "tokenizer.json") in message
    vocab_sizes = f"vocabulary {other_tokenizer.vocab_size} vs {student_tokenizer.vocab_size}"
    assert other_tokenizer.vocab_size != student_tokenizer.vocab_size and vocab_sizes in message
    assert "vocabulary size, merges" in message
    assert f"--tokenizer {student / 'tokenizer.json'}" in message
    # The same tokenizer passes (the comparison is by content, not by file).
    small_checkpoint(tmp_path / "twin", Tokenizer.train([TEXT], 300, num_workers=1))
    assert finetune.load_teacher(str(tmp_path / "twin"), student_tokenizer, torch.device("cpu")) is not None


def test_out_of_memory_says_what_to_change_and_keeps_the_last_checkpoint(tmp_path):
    tokenizer = Tokenizer.train([TEXT], 300, num_workers=1)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=16, max_seq_len=16)
    torch.manual_seed(0)
    model = GPT(config)
    calls = {"count": 0}

    def objective_that_runs_out_at_step_3(model, batch):
        calls["count"] += 1
        if calls["count"] == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return objectives.next_token(model, batch)

    class Batches:
        position = 0

        def next_batch(self):
            self.position += 1
            x = torch.randint(0, tokenizer.vocab_size, (2, 17), generator=torch.Generator().manual_seed(self.position))
            return x[:, :-1], x[:, 1:]

        def state_dict(self):
            return {"position": self.position}

    train_config = TrainConfig(out_dir=str(tmp_path / "run"), steps=5, save_every=2, log_every=1, warmup_steps=1,
                               batch_size=2, eval_every=0)
    with pytest.raises(ValueError) as raised:
        training.train(model, objective_that_runs_out_at_step_3, Batches(), train_config, model_config=config,
                       tokenizer=tokenizer)
    message = str(raised.value)
    assert isinstance(raised.value, training.OutOfMemory)
    for advice in ("out of memory", "at step 3", "--batch-size 2", "--grad-accum", "--activation-checkpointing",
                   "--seq-len", str(tmp_path / "run")):
        assert advice in message
    # The step-2 checkpoint, saved before the failure, is intact and loads.
    assert checkpoint.resolve_checkpoint(tmp_path / "run").name == "step_000002"
    assert checkpoint.read_trainer_state(tmp_path / "run")["step"] == 2

    def objective_with_a_bug(model, batch):
        raise KeyError("a bug, not a setting")
    with pytest.raises(KeyError):  # other errors pass through untouched
        training.train(GPT(config), objective_with_a_bug, Batches(), train_config, model_config=config,
                       tokenizer=tokenizer)

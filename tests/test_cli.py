"""Flags generated from config dataclasses: names, types, defaults and help text from field comments."""
import argparse
import subprocess
import sys
from dataclasses import dataclass, fields
from pathlib import Path

import pytest

from nanostack.cli import add_dataclass_args, dataclass_from_args, field_comments, given_fields
from nanostack.training import TrainConfig

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Example:
    learning_rate: float = 3e-4     # peak step size
    name: str = "run"               # what to call it
    use_fast_path: bool = False     # take the fast path
    limit: int | None = None


def parse(argv, **kwargs):
    parser = argparse.ArgumentParser()
    add_dataclass_args(parser, Example, **kwargs)
    return parser.parse_args(argv)


def test_flags_types_defaults_and_comments():
    assert field_comments(Example) == {"learning_rate": "peak step size", "name": "what to call it",
                                       "use_fast_path": "take the fast path"}
    assert dataclass_from_args(Example, parse([])) == Example()
    args = parse(["--learning-rate", "0.1", "--name", "x", "--use-fast-path", "yes", "--limit", "7"])
    assert dataclass_from_args(Example, args) == Example(0.1, "x", True, 7)
    with pytest.raises(SystemExit):
        parse(["--use-fast-path", "maybe"])
    with pytest.raises(SystemExit):
        parse(["--learning-rate", "fast"])


def test_defaults_to_none_reports_only_given_flags():
    args = parse(["--name", "y"], defaults_to_none=True)
    assert given_fields(Example, args) == {"name": "y"}


def test_train_script_help_documents_every_training_flag():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    comments = field_comments(TrainConfig)
    for field in fields(TrainConfig):
        assert "--" + field.name.replace("_", "-") in out.stdout
        assert comments[field.name], f"TrainConfig.{field.name} has no help comment"
    assert "--depth" in out.stdout and "--n-expert" in out.stdout


def test_run_turns_bad_input_into_one_error_line_and_passes_exit_codes():
    from nanostack.checkpoint import CheckpointError
    from nanostack.cli import run
    with pytest.raises(SystemExit) as done:
        run(lambda: 3)
    assert done.value.code == 3

    def bad_input():
        raise CheckpointError("no checkpoint at out/x")
    with pytest.raises(SystemExit) as failed:
        run(bad_input)
    assert failed.value.code == "error: no checkpoint at out/x"  # printed to stderr, exit status 1

    def bug():
        raise KeyError("not user input")
    with pytest.raises(KeyError):  # real bugs keep their traceback
        run(bug)

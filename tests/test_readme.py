"""The README's quick start, followed literally: the CPU build of PyTorch first (for a machine without a GPU), then
install-and-train, then the tests, which is what CI runs; the main job (`python train.py`, no flags) does what the
README promises in a fresh copy of the repo.

The `pip install -e ".[test]"` half of the first command is not re-run here: CI (.ci/run) has just run it to
create the environment this test runs in."""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_start_commands() -> list[str]:
    """The commands of the first fenced block under '## Quick start', comments stripped."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


def test_quick_start_installs_the_cpu_build_first_and_its_last_command_is_what_ci_runs():
    commands = quick_start_commands()
    assert len(commands) == 3, commands
    cpu_torch, install, run_tests = commands
    # The CPU wheel index, before the project pulls torch in: a plain `pip install torch` fetches the CUDA build.
    assert cpu_torch == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert [part.strip() for part in install.split("&&")] == ['pip install -e ".[test]"', "python train.py"]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert run_tests in ci_lines  # the README's test command is the one CI runs, word for word


def repo_copy(destination: Path) -> Path:
    """The repo's files as a fresh clone would have them (tracked, plus new files not ignored), nothing else."""
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, listed):
        if (ROOT / name).is_file():  # a tracked file deleted in the working tree is not there to copy
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)
    return destination


@pytest.mark.slow
def test_python_train_py_does_what_the_quick_start_promises(tmp_path):
    if shutil.which("git") is None or not (ROOT / ".git").exists():
        pytest.skip("needs a git checkout to know which files a fresh clone has")
    main_job = quick_start_commands()[1].split("&&")[1].strip()
    argv = shlex.split(main_job)
    assert argv == ["python", "train.py"]  # literally, no extra flags
    copy = repo_copy(tmp_path / "nanostack")
    assert not (copy / "out").exists()
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "PYTHONPATH")}  # as a user has it
    result = subprocess.run([sys.executable, *argv[1:]], cwd=copy, env=env, capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    # What the README says it does: tokenizer, token shards, checkpoints with a `latest` pointer, a sample.
    out = copy / "out"
    assert (out / "tokenizer.json").stat().st_size > 0
    assert (out / "data" / "stdlib" / "index.json").exists()
    newest = out / "pretrain" / (out / "pretrain" / "latest").read_text().strip()
    assert {"config.json", "model.safetensors", "tokenizer.json", "manifest.json"} <= {p.name for p in newest.iterdir()}
    sample = re.search(r"^sample: '(.+)'$", result.stdout, re.M)
    assert sample and len(sample.group(1)) > 10

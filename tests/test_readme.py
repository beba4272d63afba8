"""The README's quick start, followed literally: the CPU build of PyTorch first (for a machine without a GPU), then
install-and-train, then the tests, which is what CI runs; the main job (`python train.py`, no flags) does what the
README promises in a fresh copy of the repo. The Chinese README (README.zh-CN.md) has the same commands and code.

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


READMES = {"README.md": "## Quick start", "README.zh-CN.md": "## 快速开始"}  # each README and its quick-start heading
FENCED_BLOCK = re.compile(r"^```(\w*)\n(.*?)^```", re.M | re.S)  # (language, body) of each fenced block
COMMENT = re.compile(r"(^|\s)#.*")  # a `#` at the start of a line or after a space, to the end of the line


def quick_start_commands(name: str = "README.md") -> list[str]:
    """The commands of the first fenced block under the README's quick-start heading, comments stripped."""
    readme = (ROOT / name).read_text()
    section = readme.split(READMES[name], 1)[1]
    block = re.search(r"```(?:bash)?\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.split("#", 1)[0].strip()]


@pytest.mark.parametrize("name", READMES)
def test_quick_start_installs_the_cpu_build_first_and_its_last_command_is_what_ci_runs(name):
    commands = quick_start_commands(name)
    assert len(commands) == 3, commands
    cpu_torch, install, run_tests = commands
    # The CPU wheel index, before the project pulls torch in: a plain `pip install torch` fetches the CUDA build.
    assert cpu_torch == "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert [part.strip() for part in install.split("&&")] == ['pip install -e ".[test]"', "python train.py"]
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert run_tests in ci_lines  # the README's test command is the one CI runs, word for word


def readme_code(markdown: str) -> dict[str, set[str]]:
    """A README's shell commands and Python lines: {"bash": ..., "python": ...}.

    A shell command is a non-empty line of a ```bash block with its `# comment` stripped and trailing whitespace
    removed, a line ending in a backslash joined to the next with one space. A Python line is a non-empty line of a
    ```python block, comment stripped, its indentation kept. (A `#` inside a string would count as a comment:
    the READMEs have none.)"""
    code = {"bash": set(), "python": set()}
    for language, body in FENCED_BLOCK.findall(markdown):
        if language not in code:
            continue
        pending = ""  # a command continued by a trailing backslash, so far
        for line in body.splitlines():
            line = COMMENT.sub("", line).rstrip()
            if pending:
                line = pending + " " + line.strip()
            if language == "bash" and line.endswith("\\"):
                pending = line[:-1].rstrip()
            elif line:
                code[language].add(line)
                pending = ""
    return code


def test_readme_code_joins_continued_commands_and_strips_comments():
    markdown = ("```bash\nhf download R \\\n    --include \"*.json\"   # weights\n# a note\n\n"
                "pip install x  \n```\n```python\nfor x in y:  # loop\n    f(x)\n```\n```\nnot code\n```\n")
    assert readme_code(markdown) == {"bash": {'hf download R --include "*.json"', "pip install x"},
                                     "python": {"for x in y:", "    f(x)"}}


def test_readme_and_its_chinese_translation_have_the_same_commands():
    english, chinese = (readme_code((ROOT / name).read_text()) for name in READMES)
    assert len(english["bash"]) > 30 and len(english["python"]) > 10  # the parser found the README's code
    missing = []
    for language in ("bash", "python"):
        for name, has, lacks in (("README.zh-CN.md", english, chinese), ("README.md", chinese, english)):
            missing += [f"{name} lacks this {language} line: {line}" for line in sorted(has[language] - lacks[language])]
    assert not missing, "the two READMEs' code differs:\n" + "\n".join(missing)
    for name, other in (("README.md", "README.zh-CN.md"), ("README.zh-CN.md", "README.md")):
        top = (ROOT / name).read_text().split("\n## ", 1)[0]
        assert f"]({other})" in top, f"{name} should link to {other} before its first section"


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

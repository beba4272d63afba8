"""The speedrun end to end at --tiny size: every stage runs, the report's numbers are the stage files' numbers,
the server answered and stopped; the GPT-2 preset's commands; a failing stage's error and partial report."""
import json
import os
import re
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from nanostack import speedrun

ROOT = Path(__file__).resolve().parent.parent
TABLE_HEADERS = {  # section title -> the first cells of its table's header row
    "Tokenizer and data": "| vocab size | documents | train tokens |",
    "Pretraining": "| steps | parameters | tokens |",
    "SFT": "| held-out metric | before | after |",
    "DPO": "| held-out metric | before | after |",
    "GRPO, and post-training compared": "| held-out metric | before | after |",
    "int8 quantization (weight-only)": "| variant | val bits/byte |",
    "Serving": "| requests | concurrency | completion tokens |",
}
REQUESTS, MAX_TOKENS = 6, 8


def run_speedrun(out_dir: Path, *flags: str) -> subprocess.CompletedProcess:
    """`python -m nanostack.speedrun --tiny true` as a user runs it, on one torch thread."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "nanostack.speedrun", "--tiny", "true", "--out-dir", str(out_dir),
                           *flags], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def sections(report: str) -> dict[str, str]:
    """report.md split into {'## title': body}."""
    parts = re.split(r"^## (.+)$", report, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def table_rows(body: str) -> list[dict[str, str]]:
    """The first markdown table in `body` as a list of {column: cell}."""
    lines = [line for line in body.splitlines() if line.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(header, (c.strip() for c in line.strip("|").split("|")))) for line in lines[2:]]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("speedrun") / "run"
    result = run_speedrun(out_dir, "--requests", str(REQUESTS), "--max-tokens", str(MAX_TOKENS))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out_dir, result


@pytest.mark.slow
def test_report_has_a_table_for_every_stage(tiny_run):
    out_dir, result = tiny_run
    report = (out_dir / "report.md").read_text()
    found = sections(report)
    for title, header in TABLE_HEADERS.items():
        assert title in found, f"no '## {title}' section"
        assert header in found[title], f"the {title} section has no table"
    stages = json.loads((out_dir / "stages.json").read_text())["stages"]
    assert list(stages) == list(speedrun.STAGES) and all(s["exit_code"] == 0 for s in stages.values())
    for name, stage in stages.items():  # the exact command of each stage is in the report and its log
        assert f"`{stage['command']}`" in report
        assert (out_dir / "logs" / f"{name}.log").read_text().startswith(f"==> [")
    # matplotlib is an optional extra: the PNGs where it is installed, the way to get them where not.
    try:
        import matplotlib  # noqa: F401
        assert (out_dir / "plots" / "pretrain.png").stat().st_size > 0
    except ImportError:
        assert 'pip install -e ".[plots]"' in report


@pytest.mark.slow
def test_report_numbers_are_the_stage_files_numbers(tiny_run):
    out_dir, _ = tiny_run
    found = sections((out_dir / "report.md").read_text())

    metrics = [json.loads(line) for line in (out_dir / "pretrain" / "metrics.jsonl").read_text().splitlines()]
    bpb = [m["eval/bpb"] for m in metrics if "eval/bpb" in m][-1]
    train_loss = [m["loss"] for m in metrics if "loss" in m][-1]
    pretrain = table_rows(found["Pretraining"])[0]
    assert pretrain["val bits/byte"] == f"{bpb:.4f}" and pretrain["final train loss"] == f"{train_loss:.4f}"
    assert pretrain["steps"] == "40"  # the tiny preset's --steps
    assert pretrain["tokens"] == f"{40 * 8 * 64:,}"  # steps x default batch 8 x tiny --seq-len 64

    index = json.loads((out_dir / "data" / "email" / "index.json").read_text())
    tokenizer_row = table_rows(found["Tokenizer and data"])[0]
    assert tokenizer_row["val tokens"] == f"{index['splits']['val']['tokens']:,}"
    assert tokenizer_row["vocab size"] == "512"

    for stage, title in (("sft", "SFT"), ("dpo", "DPO"), ("grpo", "GRPO, and post-training compared")):
        evaluation = json.loads((out_dir / stage / "eval.json").read_text())
        rows = {row["held-out metric"]: row for row in table_rows(found[title])}
        for name in ("heldout_loss", "addition/pass@1", "addition/pass@2", "addition/reward"):
            assert rows[name]["before"] == f"{evaluation['before'][name]:.4f}"
            assert rows[name]["after"] == f"{evaluation['after'][name]:.4f}"
    # DPO and GRPO start from the SFT run's checkpoint at step 10 (of 20): the same model, scored alike.
    sft, dpo, grpo = (json.loads((out_dir / s / "eval.json").read_text()) for s in ("sft", "dpo", "grpo"))
    assert Path(dpo["init"]).name == Path(grpo["init"]).name == "step_000010" and sft["steps"] == 20
    assert dpo["before"] == pytest.approx(grpo["before"], rel=1e-6) and grpo["before"] != sft["after"]
    # The comparison table: one row per model, its numbers those of the eval.json files.
    body = found["GRPO, and post-training compared"]
    compared = table_rows(body[body.index("| model |"):])
    assert [row["model"] for row in compared] == ["base (pretrained)", "SFT step_000010", "SFT -> DPO", "SFT -> GRPO",
                                                  "SFT, all 20 steps"]
    for row, metrics in zip(compared, (sft["before"], grpo["before"], dpo["after"], grpo["after"], sft["after"])):
        assert row["pass@1"] == f"{metrics['addition/pass@1']:.4f}"
        assert row["reward"] == f"{metrics['addition/reward']:.4f}"
    assert compared[3]["KL to reference"] == f"{grpo['after']['addition/kl_to_reference']:.4f}"

    quant = json.loads((out_dir / "int8" / "quant_report.json").read_text())
    int8_rows = {row["variant"]: row for row in table_rows(found["int8 quantization (weight-only)"])}
    for row in quant["rows"]:
        assert int8_rows[row["variant"]]["val bits/byte"] == f"{row['bpb']:.4f}"
        assert int8_rows[row["variant"]]["top-1 agreement"] == f"{row['top1_agreement']:.4f}"
        assert int8_rows[row["variant"]]["bpb increase (%)"] == f"{row['bpb_increase_percent']:+.3f}"  # one unit


@pytest.mark.slow
def test_the_server_answered_every_request_and_stopped(tiny_run):
    out_dir, _ = tiny_run
    serving = json.loads((out_dir / "serving.json").read_text())
    requests = serving["requests"]
    assert len(requests) == REQUESTS and serving["server_exit_code"] == 0
    assert {r["kind"] for r in requests} == {"chat", "completion"} and {r["stream"] for r in requests} == {True, False}
    assert all(r["text"] and r["completion_tokens"] == MAX_TOKENS for r in requests)  # ignore_eos: all tokens
    # Held-out task questions asked through the chat API the chat page uses, each scored against its answer.
    answers = serving["task_answers"]
    assert [a["question"] for a in answers] == [p.question for p in speedrun.TASK_PROBLEMS]
    assert all(a["right"] == (a["reply"].replace(" ", "") == a["reference"].replace(" ", "")) for a in answers)
    assert all(r["ttft_s"] is not None and 0 < r["ttft_s"] <= r["latency_s"] for r in requests if r["stream"])
    # The report's latency cells are the percentiles of the per-request latencies serving.json recorded.
    row = table_rows(sections((out_dir / "report.md").read_text())["Serving"])[0]
    latencies = [r["latency_s"] for r in requests]
    assert row["latency p50 (s)"] == f"{np.percentile(latencies, 50):.4f}"
    assert row["latency p90 (s)"] == f"{np.percentile(latencies, 90):.4f}"
    assert row["completion tokens"] == str(REQUESTS * MAX_TOKENS)
    # Stopped: nothing listens on its port any more.
    command = json.loads((out_dir / "stages.json").read_text())["stages"]["serve"]["command"]
    port = int(shlex.split(command)[shlex.split(command).index("--port") + 1])
    with socket.socket() as probe, pytest.raises(ConnectionRefusedError):
        probe.connect(("127.0.0.1", port))


def readme_gpt2_command() -> list[str]:
    """The flags of the README's single-node GPT-2-class torchrun command."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"```bash\n(torchrun --standalone --nproc_per_node=8 train\.py.*?)```", readme, re.S).group(1)
    return shlex.split(block.replace("\\\n", " "))


def test_gpt2_preset_runs_the_readme_command_under_torchrun():
    result = subprocess.run([sys.executable, "-m", "nanostack.speedrun", "--preset", "gpt2", "--dry-run", "true",
                             "--out-dir", "out/gpt2run"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = dict(line.split(": ", 1) for line in result.stdout.splitlines() if not line.startswith("#"))
    assert list(lines) == list(speedrun.STAGES)
    pretrain = shlex.split(lines["pretrain"])
    readme = readme_gpt2_command()
    launcher = readme[:readme.index("train.py") + 1]
    assert pretrain[:len(launcher)] == launcher == ["torchrun", "--standalone", "--nproc_per_node=8", "train.py"]

    def flags(words):
        return {words[i]: words[i + 1] for i in range(len(words) - 1) if words[i].startswith("--")}
    expected = {k: v for k, v in flags(readme).items() if k != "--out-dir"}
    assert expected.items() <= flags(pretrain).items()
    assert flags(pretrain)["--out-dir"] == "out/gpt2run/pretrain"
    # The stages chain through the run directory: each reads what the one before wrote.
    assert flags(shlex.split(lines["sft"]))["--init"] == "out/gpt2run/pretrain"
    assert flags(shlex.split(lines["dpo"]))["--init"] == "out/gpt2run/sft/step_000250"
    assert flags(shlex.split(lines["grpo"]))["--init"] == "out/gpt2run/sft/step_000250"
    assert flags(shlex.split(lines["int8"]))["--model"] == "out/gpt2run/grpo"
    assert flags(shlex.split(lines["serve"]))["--model"] == "out/gpt2run/int8"
    # train.py finds the corpus the tokenizer stage downloaded and tokenized (the same directories).
    tokenizer_stage = flags(shlex.split(lines["tokenizer"]))
    assert tokenizer_stage["--download-dir"] == "out/gpt2run/download/fineweb-edu-100b-shuffle"
    assert tokenizer_stage["--out-dir"] == flags(shlex.split(lines["int8"]))["--data-dir"] \
        == "out/gpt2run/data/fineweb-edu-100b-shuffle"
    assert not (ROOT / "out" / "gpt2run").exists()  # a dry run writes nothing


def test_bad_settings_are_refused_before_anything_runs(tmp_path):
    for flags, message in ((["--preset", "gpt2", "--tiny", "true"], "cannot be combined"),
                           (["--stage-args", "train: --steps 5"], "STAGE one of"),
                           (["--preset", "gpt3"], "expected one of cpu, gpt2")):
        with pytest.raises(ValueError, match=message):
            speedrun.main([*flags, "--out-dir", str(tmp_path / "run"), "--dry-run", "true"])
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="holds no earlier speedrun"):
        speedrun.main(["--out-dir", str(tmp_path / "mine")])
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_a_failing_stage_stops_the_run_with_a_clear_error_and_a_partial_report(tmp_path):
    # The user-facing way to break SFT: point its --init at a directory that does not exist.
    out_dir = tmp_path / "run"
    result = run_speedrun(out_dir, "--stage-args", f"sft: --init {tmp_path / 'missing'}")
    assert result.returncode == 1
    log = out_dir / "logs" / "sft.log"
    assert f"error: stage sft failed (exit 1), see {log}" in result.stderr
    assert "no checkpoint at" in log.read_text() and "python train.py" in log.read_text()
    found = sections((out_dir / "report.md").read_text())
    assert TABLE_HEADERS["Pretraining"] in found["Pretraining"]
    assert "**Failed** (exit 1)" in found["SFT"]
    assert not {"DPO", "Serving"} & set(found) and not (out_dir / "dpo").exists()

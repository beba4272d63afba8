"""bench/run_gpu.py (what bench/gpu.sh runs), checked without a GPU: the dry run, the refusal on a machine
without CUDA, and the runner's own logic on stand-in steps (a failure or a timeout never stops the run, a
step that no longer fits before the deadline is skipped, figures are read and judged against their bounds)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import run_gpu
from bench.run_gpu import Step, Target

ROOT = Path(__file__).resolve().parent.parent


def test_dry_run_lists_every_step_with_its_budget():
    result = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], capture_output=True, text=True,
                            env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    for step in run_gpu.STEPS:
        assert f"  {step.name}: " in result.stdout
        assert all((ROOT / part).exists() for part in step.command if part.endswith(".py")), step.command
    total = sum(step.budget_s for step in run_gpu.STEPS)
    assert f"total budget {total} s" in result.stdout
    benchmarks = total - next(step.budget_s for step in run_gpu.STEPS if step.name == "tests")
    assert benchmarks <= 8 * 60 and total <= 570  # the 8 minutes; one device call of 10 minutes at most


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_it_says_so_in_one_line_and_runs_nothing(monkeypatch, capsys):
    monkeypatch.setattr(run_gpu, "run_step", lambda *args: pytest.fail("a step ran without CUDA"))
    assert run_gpu.main([]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no CUDA GPU" in err


def test_failures_and_timeouts_do_not_stop_the_run(monkeypatch, tmp_path, capsys):
    results = tmp_path / "results"
    results.mkdir()
    writes = ("import json, pathlib; pathlib.Path(r'{}').write_text(json.dumps({{'speedup': 12.5, 'rows': []}}))"
              .format(results / "fake-cuda.json"))
    steps = [Step("crashes", [run_gpu.PYTHON, "-c", "raise SystemExit(3)"], 5, "fake",
                  [Target("speedup", lambda r: r["speedup"], ">= 10", 8)]),
             Step("hangs", [run_gpu.PYTHON, "-c", "import time; time.sleep(60)"], 1),
             Step("works", [run_gpu.PYTHON, "-c", writes], 5, "fake",
                  [Target("speedup", lambda r: r["speedup"], ">= 10", 8),
                   Target("missing figure", lambda r: r["nothing"], "<= 1")]),
             Step("too long", [run_gpu.PYTHON, "-c", "pass"], 10_000)]
    summary = {}
    monkeypatch.setattr(run_gpu, "STEPS", steps)
    monkeypatch.setattr(run_gpu, "RESULTS_DIR", results)
    monkeypatch.setattr(run_gpu, "LOG_DIR", tmp_path / "logs")
    monkeypatch.setattr(run_gpu, "write_result", lambda name, payload, device: summary.update(payload))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args: "a stand-in GPU")
    assert run_gpu.main(["--deadline-s", "60"]) == 1
    records = {record["step"]: record for record in summary["steps"]}
    assert [records[name]["status"] for name in ("crashes", "hangs", "works", "too long")] == \
        ["failed", "timeout", "ok", "skipped"]
    assert records["crashes"]["returncode"] == 3 and records["crashes"]["figures"][0]["value"] is None
    assert records["hangs"]["seconds"] < 10  # killed at 1.5x its budget
    speedup, missing = records["works"]["figures"]
    assert (speedup["value"], speedup["met"], speedup["issue"]) == (12.5, True, 8)
    assert (missing["value"], missing["met"]) == (None, None)
    assert (tmp_path / "logs" / "crashes.log").exists()
    json.dumps(summary)  # the summary is plain JSON
    assert "a stand-in GPU" in capsys.readouterr().out

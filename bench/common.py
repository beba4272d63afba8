"""Shared by the benchmarks: a printed table and the JSON result file, with where it was measured, and a launcher
for benchmarks that run each configuration as its own (torchrun) job.

Every result file records where it was measured: device (CPU model or GPU name), library versions, date,
git commit and the command line, so a number in bench/results/ can be traced and reproduced.
"""
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


def device_name(device="cpu") -> str:
    """The CPU model for "cpu", the GPU's name for "cuda[:N]" (a str or torch.device), else the device."""
    device = str(device)
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    if device != "cpu":
        return device
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def environment(device="cpu") -> dict:
    """Where and how a benchmark ran."""
    return {
        "device": device_name(device),
        "cpus": os.cpu_count(),
        # Other work on the machine skews wall times; the 1-minute load average says how busy it was.
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "python": platform.python_version(),
        "torch": _version("torch"),
        "triton": _version("triton"),
        "platform": platform.platform(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git_commit": _git_commit(),
        "command": shlex.join([os.path.basename(sys.executable), *sys.argv]),
    }


def device_tag(device="cpu") -> str:
    """Short file-name tag: "cpu" or "cuda" (the GPU's name is in the file's environment), else a slug."""
    device = str(device)
    if device == "cpu" or device.startswith("cuda"):
        return device.split(":")[0]
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def print_table(rows: list[dict], title: str | None = None) -> None:
    """Rows of {column: value} as an aligned text table; floats get 3 significant digits."""
    if not rows:
        return
    columns = list(dict.fromkeys(key for row in rows for key in row))
    cells = [[_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max(len(column), *(len(line[i]) for line in cells)) for i, column in enumerate(columns)]
    if title:
        print(f"\n{title}")
    print("  ".join(column.ljust(width) for column, width in zip(columns, widths)))
    print("  ".join("-" * width for width in widths))
    for line in cells:
        print("  ".join(cell.rjust(width) for cell, width in zip(line, widths)))


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def write_result(name: str, results: dict, device="cpu") -> Path:
    """Write {"benchmark", "environment", **results} to bench/results/<name>-<device tag>.json."""
    path = RESULTS_DIR / f"{name}-{device_tag(device)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": name, "environment": environment(device), **results}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"\nwrote {path.relative_to(ROOT)}")
    return path


def run_job(script, ranks: int, flags: list[str], payload: str, *, torchrun: bool | None = None):
    """Run `script *flags --worker=RESULT:payload` as one plain process or a torchrun job of `ranks` processes on
    this machine, and return the JSON the job's rank 0 wrote to RESULT. torchrun defaults to ranks > 1; DDP and
    FSDP2 need it (their process group) on one rank too."""
    torchrun = ranks > 1 if torchrun is None else torchrun
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        launcher = [sys.executable] if not torchrun else [
            sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        subprocess.run(launcher + [str(script), *flags, f"--worker={out}:{payload}"], check=True, env=env)
        return json.loads(out.read_text())


def local_bytes(tensors) -> int:
    """Bytes this rank holds for these tensors (its shard only, for DTensors: FSDP2 and tensor parallel)."""
    return sum(t.to_local().nbytes if hasattr(t, "to_local") else t.nbytes for t in tensors)

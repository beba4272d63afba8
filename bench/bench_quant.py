"""Quantization benchmark: quality of W8A16 / W8A8 / W8A8+SmoothQuant, and on GPU the int8 speed-ups.

    python bench/bench_quant.py                        # trains a small model with train.py first if needed
    python bench/bench_quant.py --model out/pretrain   # any checkpoint, with the shards it was trained on

Quality (any device). `quant.quality_report` on the validation split of the embedded corpus (out/data/stdlib):
bits per byte, perplexity and top-1 next-token agreement of full precision, W8A16, W8A8 and W8A8+SmoothQuant,
plus weight bytes against the bf16 bytes of the same model. It runs twice: with the default `skip` (only the
MoE router stays high precision: embedding and LM head are int8) and with the old default that also kept the
embedding and LM head in bf16; the "keep" column says which. A last row puts the LM head in W8A8 too (it is
weight-only in both modes by default), the evidence for that choice. Without --model, `train.py` trains the
default small model for --train-steps into out/bench_quant (reused when it is already there).

Speed (CUDA only; the script skips it elsewhere). (1) int8 matmul TOPS at Llama projection shapes: our W8A8
kernel against torch.matmul in bf16 and torch._int_mm (cuBLAS int8), measured by bench_kernels.int8_rows.
(2) decode tokens/s at batch 1 through model.generate, greedy, for bf16, W8A16 and W8A8 of one random-weight
Llama-like model (speed does not depend on the weight values): at batch 1 every linear reads its whole
weight for one token, so W8A16's halved bytes are the expected win.

Targets (from the brief): W8A16 bpb within 0.5% of full precision, W8A8+SmoothQuant within 2%, whole-model
weights at most 0.55x the bf16 bytes; `targets_met` says which `skip` setting meets which.
"""
import argparse
import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, write_result  # noqa: E402
from nanostack import checkpoint, data, quant  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402

TARGETS = {"w8a16_bpb_increase_percent_max": 0.5, "w8a8_smoothquant_bpb_increase_percent_max": 2.0,
           "weight_bytes_ratio_max": 0.55}
# The default `skip` before the int8 embedding and LM head existed, measured alongside the current one.
OLD_DEFAULT_SKIP = ("tok_emb", "lm_head", "router")


@dataclass
class BenchConfig:
    """Quantization quality on the embedded corpus; int8 matmul and decode speed on a GPU."""
    model: str = ""                  # checkpoint to evaluate (relative to the repo root); empty = train one
    train_steps: int = 150           # train.py --steps when training the model
    train_batch_size: int = 8        # train.py --batch-size when training the model
    data_dir: str = "out/data/stdlib"  # token shards the model was trained on (relative to the repo root)
    eval_batches: int = 16           # validation batches per variant
    batch_size: int = 8              # sequences per evaluation / calibration batch
    calibration_batches: int = 8     # training batches for SmoothQuant statistics
    smooth_alpha: float = 0.5        # SmoothQuant migration strength
    matmul_ms: str = "1,16,256,4096"  # GPU: comma-separated M (tokens) for the W8A8 TOPS sweep
    matmul_nks: str = "4096x4096,14336x4096,4096x14336"  # GPU: comma-separated NxK weight shapes
    decode_depth: int = 16           # GPU decode model: layers (width 128 * depth, 128-wide heads)
    decode_kv_heads: int = 4         # GPU decode model: key/value heads (grouped-query attention)
    decode_vocab: int = 32000        # GPU decode model: vocabulary size
    prompt_tokens: int = 16          # GPU decode: prompt length
    decode_tokens: int = 256         # GPU decode: tokens generated per timed run
    repeats: int = 3                 # GPU decode: timed runs per variant (the median is kept)
    threads: int = 0                 # torch CPU threads, 0 = torch's default


def train_default_model(config: BenchConfig) -> Path:
    """The checkpoint in out/bench_quant, trained by train.py with default settings unless already there."""
    run_dir = ROOT / "out" / "bench_quant"
    if not (run_dir / "latest").exists():
        command = [sys.executable, "train.py", "--out-dir", str(run_dir), "--steps", str(config.train_steps),
                   "--batch-size", str(config.train_batch_size), "--eval-every", "0", "--sample-every", "0"]
        print("training:", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return checkpoint.resolve_checkpoint(run_dir)


def quality(config: BenchConfig, device: str) -> dict:
    """The quality table at the default skip and at OLD_DEFAULT_SKIP (a "keep" column tells them apart), plus
    a W8A8+SmoothQuant row with the LM head in W8A8 too."""
    directory = ROOT / config.model if config.model else train_default_model(config)
    loaded = checkpoint.load_checkpoint(directory, device)
    model, tokenizer = loaded["model"].eval(), loaded["tokenizer"]
    data_dir = ROOT / config.data_dir
    reports = [quant.quality_report(model, tokenizer, data_dir, eval_batches=config.eval_batches,
                                    batch_size=config.batch_size, calibration_batches=config.calibration_batches,
                                    smooth_alpha=config.smooth_alpha, skip=skip)
               for skip in (quant.DEFAULT_SKIP, OLD_DEFAULT_SKIP)]
    full_row = reports[0]["rows"][0]  # the same in both: one model, the same val batches
    report = {**reports[0], "model": str(directory), "old_default_skip": list(OLD_DEFAULT_SKIP),
              "rows": [{"variant": full_row["variant"], "keep": "all", **full_row}]}
    for part in reports:
        report["rows"] += [{"variant": row["variant"], "keep": ",".join(part["skip"]), **row}
                           for row in part["rows"][1:]]
    if model.config.tie_embeddings:
        return report  # the tied table is the head: there is no separate LM head to put in W8A8

    val = list(data.eval_batches(data.TokenShards(data_dir, "val", tokenizer), config.batch_size,
                                 model.config.max_seq_len, config.eval_batches))
    calibration = quant.calibration_batches_from(data.TokenShards(data_dir, "train", tokenizer),
                                                 config.calibration_batches, config.batch_size,
                                                 model.config.max_seq_len)
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    full = quant.evaluate(model, val, token_bytes)
    head_w8a8 = quant.copy_model(model)
    float_head = head_w8a8.lm_head  # SmoothQuant leaves the final norm and the head alone
    quant.quantize_model(head_w8a8, "w8a8", smooth_alpha=config.smooth_alpha, calibration_batches=calibration)
    head_w8a8.lm_head = quant.quantize_linear(float_head, "w8a8")
    metrics = quant.evaluate(head_w8a8, val, token_bytes, full["top1"])
    report["rows"].append({"variant": f"w8a8+smoothquant({config.smooth_alpha:g}), lm_head w8a8",
                           "keep": ",".join(quant.DEFAULT_SKIP), "bpb": metrics["bpb"],
                           "perplexity": metrics["perplexity"], "loss": metrics["loss"],
                           "top1_agreement": metrics["top1_agreement"], "weight_bytes": quant.weight_bytes(head_w8a8),
                           "vs_bf16_bytes": quant.weight_bytes(head_w8a8) / report["bf16_weight_bytes"],
                           "bpb_increase_percent": 100 * (metrics["bpb"] / full["bpb"] - 1)})
    return report


def synchronize(device: str) -> None:
    """Wait for queued GPU work, so wall-clock times cover it."""
    if device == "cuda":
        torch.cuda.synchronize()


def decode_tokens_per_second(config: BenchConfig, device: str) -> list[dict]:
    """Batch-1 greedy decode speed through model.generate for bf16, W8A16 and W8A8 of one random model."""
    model_config = ModelConfig.from_depth(config.decode_depth, vocab_size=config.decode_vocab,
                                          max_seq_len=config.prompt_tokens + config.decode_tokens,
                                          n_embd=128 * config.decode_depth, n_kv_head=config.decode_kv_heads)
    prompt = torch.randint(0, config.decode_vocab, (1, config.prompt_tokens),
                           generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    for mode in (None, "int8-wo", "w8a8"):
        torch.manual_seed(0)
        with torch.device(device):
            model = GPT(model_config).to(torch.bfloat16).eval()
        if mode:
            quant.quantize_model(model, mode)
        model.generate(prompt, 8, temperature=0)  # autotune and warm caches outside the timing
        elapsed = []
        for _ in range(config.repeats):
            synchronize(device)
            start = time.perf_counter()
            model.generate(prompt, config.decode_tokens, temperature=0)
            synchronize(device)
            elapsed.append(time.perf_counter() - start)
        seconds = sorted(elapsed)[len(elapsed) // 2]
        rows.append({"variant": mode or "bf16", "layers": model_config.n_layer, "width": model_config.n_embd,
                     "weight_gb": quant.weight_bytes(model) / 1e9, "tokens_per_s": config.decode_tokens / seconds})
        print(f"decode {rows[-1]['variant']}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
        del model
    for row in rows:
        row["speedup_vs_bf16"] = row["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def int8_matmul_rows(config: BenchConfig) -> list[dict]:
    """W8A8 TOPS against bf16 torch.matmul and torch._int_mm (bench_kernels' sweep, restricted to matmuls)."""
    from bench import bench_kernels  # imports Triton's timing tools; only on a GPU
    kernel_config = bench_kernels.BenchConfig(matmul_ms=config.matmul_ms, matmul_nks=config.matmul_nks)
    return bench_kernels.int8_rows(kernel_config, "cuda")


def targets_met(report: dict, smooth_alpha: float) -> dict:
    """The brief's quality and size targets, for each `skip` setting ("keep ...") of this run's rows."""
    met = {}
    for keep in dict.fromkeys(row["keep"] for row in report["rows"][1:]):
        rows = {row["variant"]: row for row in report["rows"] if row["keep"] == keep}
        smooth = rows[f"w8a8+smoothquant({smooth_alpha:g})"]
        met[f"keep {keep}"] = {
            "w8a16_bpb": abs(rows["int8-wo"]["bpb_increase_percent"]) <= TARGETS["w8a16_bpb_increase_percent_max"],
            "w8a8_smoothquant_bpb": (abs(smooth["bpb_increase_percent"])
                                     <= TARGETS["w8a8_smoothquant_bpb_increase_percent_max"]),
            "weight_bytes_whole_model": rows["int8-wo"]["vs_bf16_bytes"] <= TARGETS["weight_bytes_ratio_max"]}
    return met


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if config.threads:
        torch.set_num_threads(config.threads)

    report = quality(config, device)
    met = targets_met(report, config.smooth_alpha)
    matmuls = int8_matmul_rows(config) if device == "cuda" else None
    decode = decode_tokens_per_second(config, device) if device == "cuda" else None

    print_table([{k: v for k, v in row.items() if k != "loss"} for row in report["rows"]],
                title=f"quantization quality, {report['eval_tokens']:,} val tokens of {report['data_dir']}")
    if matmuls:
        print_table(matmuls, title="W8A8 int8 matmul, TOPS (bf16 matmul: TFLOP/s)")
    if decode:
        print_table(decode, title=f"batch-1 greedy decode, {config.decode_tokens} tokens")
    if device != "cuda":
        print("no CUDA GPU: int8 matmul TOPS and decode tokens/s skipped")
    print(f"targets met: {met}")
    write_result("quant", {"config": dataclasses.asdict(config), "targets": TARGETS, "targets_met": met,
                           "quality": report, "int8_matmul": matmuls, "decode": decode}, device=device)


if __name__ == "__main__":
    main()

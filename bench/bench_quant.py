"""Quantization benchmark: quality of W8A16 / W8A8 / W8A8+SmoothQuant, and on GPU the int8 speed-ups.

    python bench/bench_quant.py                        # trains a small model with train.py first if needed
    python bench/bench_quant.py --model out/pretrain   # any checkpoint, with the shards it was trained on

Quality (any device). `quant.quality_report` on the validation split of the embedded corpus (out/data/stdlib):
bits per byte, perplexity and top-1 next-token agreement of full precision, W8A16, W8A8 and W8A8+SmoothQuant,
plus weight bytes against the bf16 bytes of the same model. Embeddings, LM head and router stay high
precision by default; a small model's embedding and head are a large share of its weights, so the table
also gives the ratio for the quantized linears alone and a W8A16 row with the LM head quantized too.
Without --model, `train.py` trains the default small model for --train-steps into out/bench_quant (reused
when it is already there).

Speed (CUDA only; the script skips it elsewhere). (1) int8 matmul TOPS at Llama projection shapes: our W8A8
kernel against torch.matmul in bf16 and torch._int_mm (cuBLAS int8), measured by bench_kernels.int8_rows.
(2) decode tokens/s at batch 1 through model.generate, greedy, for bf16, W8A16 and W8A8 of one random-weight
Llama-like model (speed does not depend on the weight values): at batch 1 every linear reads its whole
weight for one token, so W8A16's halved bytes are the expected win.

Targets (from the brief): W8A16 bpb within 0.5% of full precision, W8A8+SmoothQuant within 2%, weights at
most 0.55x the bf16 bytes (met by the quantized linears; the whole small model is judged as it is).
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

TARGETS = {"w8a16_bpb_increase_max": 0.005, "w8a8_smoothquant_bpb_increase_max": 0.02, "weight_bytes_ratio_max": 0.55}


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


def train_default_model(config: BenchConfig) -> Path:
    """The checkpoint in out/bench_quant, trained by train.py with default settings unless already there."""
    run_dir = ROOT / "out" / "bench_quant"
    if not (run_dir / "latest").exists():
        command = [sys.executable, "train.py", "--out-dir", str(run_dir), "--steps", str(config.train_steps),
                   "--batch-size", str(config.train_batch_size), "--eval-every", "0", "--sample-every", "0"]
        print("training:", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return checkpoint.resolve_checkpoint(run_dir)


def linear_bytes_ratio(model) -> float:
    """Bytes of the int8 modules (int8 values + bf16 scales) over the bf16 bytes of the weights they replace."""
    int8_bytes = scale_bytes = 0
    for name, buffer in model.named_buffers():
        if buffer.dtype == torch.int8:
            int8_bytes += buffer.numel()
        elif name.endswith("_scale"):
            scale_bytes += 2 * buffer.numel()
    return (int8_bytes + scale_bytes) / (2 * int8_bytes)


def quality(config: BenchConfig, device: str) -> dict:
    """The quality table, plus the linears-only byte ratio and a W8A16 row with the LM head quantized."""
    directory = ROOT / config.model if config.model else train_default_model(config)
    loaded = checkpoint.load_checkpoint(directory, device)
    model, tokenizer = loaded["model"].eval(), loaded["tokenizer"]
    data_dir = ROOT / config.data_dir
    report = quant.quality_report(model, tokenizer, data_dir, eval_batches=config.eval_batches,
                                  batch_size=config.batch_size, calibration_batches=config.calibration_batches,
                                  smooth_alpha=config.smooth_alpha)
    report["model"] = str(directory)

    # Everything but the embedding (and router) in int8: what the 0.55x bound means for a small-vocab-heavy model.
    val = list(data.eval_batches(data.TokenShards(data_dir, "val", tokenizer), config.batch_size,
                                 model.config.max_seq_len, config.eval_batches))
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    full = quant.evaluate(model, val, token_bytes)
    head_too = quant.quantize_model(quant.copy_model(model), "int8-wo", skip=("tok_emb", "router"))
    metrics = quant.evaluate(head_too, val, token_bytes, full["top1"])
    report["rows"].append({"variant": "int8-wo, lm_head too", "bpb": metrics["bpb"],
                           "perplexity": metrics["perplexity"], "loss": metrics["loss"],
                           "top1_agreement": metrics["top1_agreement"], "weight_bytes": quant.weight_bytes(head_too),
                           "vs_bf16_bytes": quant.weight_bytes(head_too) / report["bf16_weight_bytes"],
                           "bpb_increase": metrics["bpb"] / full["bpb"] - 1})
    report["quantized_linears_vs_bf16_bytes"] = linear_bytes_ratio(head_too)
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


def targets_met(report: dict) -> dict:
    """The brief's quality and size targets on this run's rows."""
    rows = {row["variant"]: row for row in report["rows"]}
    smooth = next(row for name, row in rows.items() if name.startswith("w8a8+smoothquant"))
    return {"w8a16_bpb": abs(rows["int8-wo"]["bpb_increase"]) <= TARGETS["w8a16_bpb_increase_max"],
            "w8a8_smoothquant_bpb": abs(smooth["bpb_increase"]) <= TARGETS["w8a8_smoothquant_bpb_increase_max"],
            "weight_bytes_linears": report["quantized_linears_vs_bf16_bytes"] <= TARGETS["weight_bytes_ratio_max"],
            "weight_bytes_whole_model": rows["int8-wo"]["vs_bf16_bytes"] <= TARGETS["weight_bytes_ratio_max"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    device = "cuda" if torch.cuda.is_available() else "cpu"

    report = quality(config, device)
    met = targets_met(report)
    matmuls = int8_matmul_rows(config) if device == "cuda" else None
    decode = decode_tokens_per_second(config, device) if device == "cuda" else None

    print_table([{k: v for k, v in row.items() if k != "loss"} for row in report["rows"]],
                title=f"quantization quality, {report['eval_tokens']:,} val tokens of {report['data_dir']}")
    print(f"quantized linears alone: {report['quantized_linears_vs_bf16_bytes']:.3f}x their bf16 bytes")
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

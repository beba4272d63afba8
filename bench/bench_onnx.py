"""ONNX Runtime against PyTorch on the CPU: quality, file sizes and tokens/s of fp32 and int8, in one run.

    python bench/bench_onnx.py                         # trains bench_quant's small model first if needed
    python bench/bench_onnx.py --model out/pretrain    # any checkpoint, with the shards it was trained on

Variants: PyTorch eager fp32 (the model as trained), nanostack's own int8 in PyTorch (quant.py: W8A16 weight-only
and W8A8), and the exported graphs in ONNX Runtime (nanostack/onnx_export.py): fp32, and int8 from ONNX Runtime's
dynamic quantization (int8 weights per output channel, activations quantized per call: a W8A8 scheme, closest
to nanostack's w8a8 without SmoothQuant).

Quality: bits per byte and top-1 next-token agreement with PyTorch fp32 on the validation split, and the bytes
on disk (model.safetensors of a nanostack checkpoint, the .onnx file of a graph). Speed, batch 1, greedy: prefill
tokens/s (one forward over a --prompt-tokens prompt) and decode tokens/s (--decode-tokens generated after it, the
prefill's time taken out), on the trained model and on a larger random-weight one (--speed-depth; speed does not
depend on the weights). torch and ONNX Runtime get the same number of threads (--threads). ONNX Runtime runs on
its CPU provider only (the onnxruntime package): there is no GPU half.
"""
import argparse
import dataclasses
import importlib.metadata
import logging
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import bench_quant  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402
from nanostack import checkpoint, data, onnx_export, onnx_runtime, quant  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402


@dataclass
class BenchConfig:
    """PyTorch vs ONNX Runtime, fp32 and int8, on the CPU."""
    model: str = ""                  # checkpoint (relative to the repo root); empty = bench_quant's trained model
    data_dir: str = "out/data/stdlib"  # token shards the model was trained on (relative to the repo root)
    eval_batches: int = 8            # validation batches for bits per byte
    batch_size: int = 8              # sequences per validation batch
    speed_depth: int = 8             # the random-weight speed model: depth (width 64 * depth)
    prompt_tokens: int = 128         # prefill length
    decode_tokens: int = 64          # tokens generated per decode timing
    repeats: int = 5                 # timed runs per variant (the median is kept)
    threads: int = 1                 # torch and ONNX Runtime intra-op threads (the same for both)
    out_dir: str = "out/bench_onnx"  # where the graphs and int8 checkpoints are written (relative to the repo root)


def variants(model: GPT, tokenizer, directory: Path, threads: int) -> dict:
    """name -> (forward: ids (B, T) tensor -> logits tensor, greedy: (prompt list, n) -> new tokens, file bytes)."""
    def torch_variant(variant, file_bytes):
        def greedy(prompt, n):
            return variant.generate(torch.tensor([prompt]), n, temperature=0)[0, len(prompt):].tolist()
        return variant, greedy, file_bytes

    def onnx_variant(graph):
        decoder = onnx_runtime.OnnxDecoder(directory / graph, threads=threads)
        forward = lambda ids: torch.from_numpy(np.stack(decoder.logits(ids.tolist())))  # noqa: E731
        return forward, lambda prompt, n: decoder.generate([prompt], n)[0], (directory / graph).stat().st_size

    checkpoint.save_checkpoint(directory / "fp32", model.state_dict(), model.config, tokenizer)
    found = {"pytorch fp32": torch_variant(model, (directory / "fp32" / "model.safetensors").stat().st_size)}
    for mode in ("int8-wo", "w8a8"):
        int8 = quant.quantize_model(quant.copy_model(model), mode).eval()
        quant.save_quantized(int8, tokenizer, directory / mode)
        int8_bytes = (directory / mode / "model.safetensors").stat().st_size
        found[f"pytorch {mode} (quant.py)"] = torch_variant(int8, int8_bytes)
    onnx_export.export_onnx(model, tokenizer, directory)
    found["onnxruntime fp32"] = onnx_variant(onnx_runtime.FP32_GRAPH)
    found["onnxruntime int8"] = onnx_variant(onnx_runtime.INT8_GRAPH)
    return found


def median_seconds(run, repeats: int) -> float:
    """Median wall time of `run()` over `repeats` calls, after one untimed warm-up call."""
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def speed_rows(model_name: str, found: dict, config: BenchConfig, vocab_size: int) -> list[dict]:
    """Batch-1 prefill and decode tokens/s of every variant, and whether its greedy tokens equal PyTorch fp32's."""
    prompt = torch.randint(0, vocab_size, (config.prompt_tokens,), generator=torch.Generator().manual_seed(0)).tolist()
    rows, reference = [], None
    for name, (forward, greedy, _) in found.items():
        with torch.no_grad():
            prefill = median_seconds(lambda: forward(torch.tensor([prompt])), config.repeats)
            generate = median_seconds(lambda: greedy(prompt, config.decode_tokens), config.repeats)
            tokens = greedy(prompt, config.decode_tokens)
        reference = reference or tokens
        rows.append({"model": model_name, "variant": name, "prefill_tokens_per_s": config.prompt_tokens / prefill,
                     "decode_tokens_per_s": config.decode_tokens / max(generate - prefill, 1e-9),
                     "greedy_matches_fp32": sum(a == b for a, b in zip(tokens, reference)) / len(reference)})
        print(f"{model_name} {name}: prefill {rows[-1]['prefill_tokens_per_s']:.0f} tokens/s, decode "
              f"{rows[-1]['decode_tokens_per_s']:.0f} tokens/s", flush=True)
    for row in rows:
        row["decode_vs_pytorch_fp32"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
        row["prefill_vs_pytorch_fp32"] = row["prefill_tokens_per_s"] / rows[0]["prefill_tokens_per_s"]
    return rows


def quality_rows(found: dict, val: list, token_bytes: torch.Tensor) -> list[dict]:
    """Bits per byte, top-1 agreement with PyTorch fp32 and bytes on disk of every variant."""
    rows, reference = [], None
    for name, (forward, _, file_bytes) in found.items():
        with torch.no_grad():
            metrics = quant.evaluate(forward, val, token_bytes, reference["top1"] if reference else None)
        reference = reference or {**metrics, "file_bytes": file_bytes}
        rows.append({"variant": name, "bpb": metrics["bpb"], "bpb_increase": metrics["bpb"] / reference["bpb"] - 1,
                     "top1_agreement": metrics.get("top1_agreement", 1.0), "file_mb": file_bytes / 1e6,
                     "vs_fp32_file": file_bytes / reference["file_bytes"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    logging.disable(logging.WARNING)  # the exporter's and the quantizer's notes
    torch.set_num_threads(config.threads)
    out_dir = ROOT / config.out_dir
    shutil.rmtree(out_dir, ignore_errors=True)
    directory = ROOT / config.model if config.model else bench_quant.train_default_model(bench_quant.BenchConfig())
    loaded = checkpoint.load_checkpoint(directory)
    model, tokenizer = loaded["model"].eval(), loaded["tokenizer"]
    val = list(data.eval_batches(data.TokenShards(ROOT / config.data_dir, "val", tokenizer), config.batch_size,
                                 model.config.max_seq_len, config.eval_batches))

    found = variants(model, tokenizer, out_dir / "trained", config.threads)
    quality = quality_rows(found, val, torch.tensor(tokenizer.token_bytes()))
    speed = speed_rows(f"trained ({model.num_params() / 1e6:.1f}M)", found, config, tokenizer.vocab_size)
    torch.manual_seed(0)
    big = GPT(ModelConfig.from_depth(config.speed_depth, tokenizer.vocab_size,
                                     config.prompt_tokens + config.decode_tokens)).eval()
    speed += speed_rows(f"random depth {config.speed_depth} ({big.num_params() / 1e6:.1f}M)",
                        variants(big, tokenizer, out_dir / "random", config.threads), config, tokenizer.vocab_size)

    print_table(quality, title=f"quality on {sum(x.numel() for x, _ in val):,} val tokens of {config.data_dir} "
                               f"({directory})")
    print_table(speed, title=f"batch 1, greedy: prefill {config.prompt_tokens} tokens, decode "
                             f"{config.decode_tokens} tokens, {config.threads} thread(s)")
    int8 = {row["variant"]: row for row in quality}["onnxruntime int8"]
    print(f"onnxruntime int8: bits per byte {int8['bpb_increase']:+.2%} vs fp32 (target within 2%)")
    write_result("bench_onnx", {
        "config": dataclasses.asdict(config), "model": str(directory), "machine": "shared CPU: other jobs ran "
        "alongside, so compare the ratios of one run, not the absolute tokens/s",
        "versions": {name: importlib.metadata.version(name) for name in ("onnx", "onnxscript", "onnxruntime")},
        "int8_bpb_within_2_percent": abs(int8["bpb_increase"]) <= 0.02, "quality": quality, "speed": speed})


if __name__ == "__main__":
    main()

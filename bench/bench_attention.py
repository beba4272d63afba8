"""Attention benchmark: our Triton flash attention against PyTorch SDPA with its backend pinned, on one GPU.

    python bench/bench_attention.py                      # the full sweep on CUDA (bf16)
    python bench/bench_attention.py --seqlens 4096       # one sequence length
    python bench/bench_attention.py --smoke true         # no GPU: tiny shapes through the Triton interpreter

Sweep: sequence length T in --seqlens with batch = total_tokens / T (the same tokens per step everywhere),
heads = model_dim / head_dim, head dims 64 and 128, causal and not. Dense (B, T, H, D) inputs for ours; the
SDPA peers get their own contiguous (B, H, T, D) copies, their native layout. Peers: SDPA with
SDPBackend.FLASH_ATTENTION and with CUDNN_ATTENTION (each pinned with sdpa_kernel, so a missing backend shows
as "-" instead of silently falling back to another).

FLOPs are the standard count: forward 4 * B * H * T^2 * D (two matmuls of 2 * T^2 * D each per head), halved
when causal; backward 2.5x forward (five matmuls instead of two), so forward+backward is 3.5x. The backward
column is derived as (fwd+bwd time) - (fwd time). Times are medians of triton.testing.do_bench (CUDA events,
warmup first, gradients reset between runs); the first call of each shape compiles our kernels outside timing.
Accuracy: max abs error of output and gradients against a float64 attention on one small odd-length case.

Smoke mode exists to check the script end to end without a GPU: interpreter timings mean nothing.
"""
import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    # Off-GPU the kernels can only run in the interpreter, which must be chosen before they are defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import triton  # noqa: E402
import triton.testing  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.functional import scaled_dot_product_attention  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from kernels.flash_attention import attention_reference, flash_attention  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402

# From the brief, for H100 at D=128 and T >= 4096 (forward), and every shape (backward).
TARGETS = {"fwd_vs_sdpa_flash_min": 1.0, "fwd_tflops_min": 450.0, "bwd_vs_sdpa_flash_min": 0.9,
           "target_head_dim": 128, "target_min_seqlen": 4096}


@dataclass
class BenchConfig:
    """Flash attention forward / backward TFLOP/s against SDPA (flash, cuDNN) and accuracy vs float64."""
    total_tokens: int = 16384                         # batch x seqlen, held constant across the sweep
    seqlens: str = "512,1024,2048,4096,8192,16384"    # comma-separated sequence lengths
    head_dims: str = "64,128"                         # comma-separated head dims
    model_dim: int = 2048                             # heads = model_dim // head_dim
    dtype: str = "bfloat16"                           # bfloat16 or float16
    warmup_ms: int = 25                               # do_bench warmup per measurement
    rep_ms: int = 100                                 # do_bench timed repetitions per measurement
    smoke: bool = False                               # tiny shapes on CPU through the Triton interpreter


def attention_flops(batch, heads, seqlen, head_dim, causal):
    """Forward FLOPs of attention: 2 matmuls x 2 * T^2 * D per head, half of it when causal."""
    flops = 4 * batch * heads * seqlen * seqlen * head_dim
    return flops / 2 if causal else flops


def time_ms(fn, config, grad_to_none):
    """Median milliseconds of fn(): do_bench with CUDA events on GPU, a perf_counter loop in smoke mode."""
    if not config.smoke:
        return triton.testing.do_bench(fn, warmup=config.warmup_ms, rep=config.rep_ms, grad_to_none=grad_to_none,
                                       return_mode="median")
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return sorted(times)[1]


def peers(device):
    """name -> SDPA backend pinned for it; on CPU (smoke) only the math backend exists."""
    if device == "cpu":
        return {"sdpa_math": SDPBackend.MATH}
    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def measure(name, forward, inputs, config, flops):
    """Forward and forward+backward times and TFLOP/s of forward(*inputs); None where the backend refuses."""
    try:
        out = forward(*inputs)  # first call: compilation / backend selection, kept out of the timings
        dout = torch.randn_like(out)
        out.backward(dout)
        fwd_ms = time_ms(lambda: forward(*inputs), config, grad_to_none=list(inputs))
        fwd_bwd_ms = time_ms(lambda: forward(*inputs).backward(dout), config, grad_to_none=list(inputs))
    except RuntimeError as error:  # e.g. a pinned SDPA backend that does not support this shape or device
        print(f"  {name}: unavailable ({str(error).splitlines()[0][:100]})")
        return {f"{name}_fwd_tflops": None, f"{name}_bwd_tflops": None, f"{name}_fwd_bwd_tflops": None}
    bwd_ms = max(fwd_bwd_ms - fwd_ms, 1e-9)
    return {f"{name}_fwd_ms": fwd_ms, f"{name}_fwd_bwd_ms": fwd_bwd_ms,
            f"{name}_fwd_tflops": flops / fwd_ms / 1e9, f"{name}_bwd_tflops": 2.5 * flops / bwd_ms / 1e9,
            f"{name}_fwd_bwd_tflops": 3.5 * flops / fwd_bwd_ms / 1e9}


def sdpa_forward(backend, causal):
    """SDPA on (B, H, T, D) with only `backend` allowed."""
    def forward(q, k, v):
        with sdpa_kernel(backend):
            return scaled_dot_product_attention(q, k, v, is_causal=causal)
    return forward


def sweep_row(config, device, dtype, seqlen, head_dim, causal):
    """One table row: ours and every peer at one (T, D, causal)."""
    batch, heads = max(config.total_tokens // seqlen, 1), config.model_dim // head_dim
    flops = attention_flops(batch, heads, seqlen, head_dim, causal)
    generator = torch.Generator(device=device).manual_seed(0)
    shape = (batch, seqlen, heads, head_dim)  # (B, T, H, D)
    q, k, v = (torch.randn(shape, generator=generator, device=device, dtype=dtype).requires_grad_()
               for _ in range(3))
    row = {"seqlen": seqlen, "batch": batch, "heads": heads, "head_dim": head_dim, "causal": causal}
    row.update(measure("ours", lambda q, k, v: flash_attention(q, k, v, causal=causal), (q, k, v), config, flops))
    peer_inputs = tuple(x.detach().transpose(1, 2).contiguous().requires_grad_() for x in (q, k, v))  # (B, H, T, D)
    for name, backend in peers(device).items():
        row.update(measure(name, sdpa_forward(backend, causal), peer_inputs, config, flops))
    return row


def accuracy(device, dtype, head_dim, causal):
    """Max abs error of ours and each SDPA peer (output, dq, dk, dv) against float64, B=2, T=301, H=4."""
    generator = torch.Generator(device=device).manual_seed(1)
    seqlen = 37 if device == "cpu" else 301  # odd, so the last blocks are partial
    q, k, v, dout = (torch.randn((2, seqlen, 4, head_dim), generator=generator, device=device, dtype=dtype)
                     for _ in range(4))

    def out_and_grads(forward, tensors, grad_out):
        leaves = [x.detach().clone().requires_grad_() for x in tensors]
        out = forward(*leaves)
        return [out, *torch.autograd.grad(out, leaves, grad_out)]

    expected = out_and_grads(lambda *x: attention_reference(*x, causal=causal), [x.double() for x in (q, k, v)],
                             dout.double())
    errors = {"head_dim": head_dim, "causal": causal}
    candidates = {"ours": (lambda *x: flash_attention(*x, causal=causal), (q, k, v), dout)}
    for name, backend in peers(device).items():  # SDPA wants (B, H, T, D); transpose results back to compare
        forward = sdpa_forward(backend, causal)
        candidates[name] = (lambda *x, forward=forward: forward(*(y.transpose(1, 2) for y in x)).transpose(1, 2),
                            (q, k, v), dout)
    for name, (forward, tensors, grad_out) in candidates.items():
        try:
            actual = out_and_grads(forward, tensors, grad_out)
        except RuntimeError:
            actual = None
        for label, index in (("out", 0), ("dq", 1), ("dk", 2), ("dv", 3)):
            errors[f"{name}_{label}_err"] = (None if actual is None else
                                            (actual[index].double() - expected[index]).abs().max().item())
    return errors


def targets_met(rows):
    """Check the brief's targets on the rows they apply to (None when no row applies or a peer is missing)."""
    def ratio(row, ours, peer):
        return None if row.get(ours) is None or row.get(peer) is None else row[ours] / row[peer]
    target_rows = [r for r in rows if r["head_dim"] == TARGETS["target_head_dim"]
                   and r["seqlen"] >= TARGETS["target_min_seqlen"]]
    fwd_ratios = [ratio(r, "ours_fwd_tflops", "sdpa_flash_fwd_tflops") for r in target_rows]
    bwd_ratios = [ratio(r, "ours_bwd_tflops", "sdpa_flash_bwd_tflops") for r in rows]

    def all_at_least(values, bound):
        return None if not values or None in values else all(value >= bound for value in values)
    return {"fwd_vs_sdpa_flash": all_at_least(fwd_ratios, TARGETS["fwd_vs_sdpa_flash_min"]),
            "fwd_tflops": all_at_least([r["ours_fwd_tflops"] for r in target_rows], TARGETS["fwd_tflops_min"]),
            "bwd_vs_sdpa_flash": all_at_least(bwd_ratios, TARGETS["bwd_vs_sdpa_flash_min"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    if not torch.cuda.is_available() and not config.smoke:
        sys.exit("bench_attention: no CUDA GPU here. The sweep needs one; `--smoke true` runs tiny shapes through "
                 "the Triton interpreter to check the script end to end.")
    if config.smoke:
        config = dataclasses.replace(config, total_tokens=64, seqlens="32,64", head_dims="16", model_dim=32)
    device = "cuda" if torch.cuda.is_available() and not config.smoke else "cpu"
    dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(config.dtype)
    if dtype is None:
        raise ValueError(f"--dtype {config.dtype!r}: choose bfloat16 or float16")
    head_dims = [int(d) for d in config.head_dims.split(",")]

    rows = []
    for head_dim in head_dims:
        for causal in (True, False):
            for seqlen in [int(t) for t in config.seqlens.split(",")]:
                rows.append(sweep_row(config, device, dtype, seqlen, head_dim, causal))
                print(f"D={head_dim} causal={causal} T={seqlen}: " + ", ".join(
                    f"{key.removesuffix('_tflops')} {value:.4g}" for key, value in rows[-1].items()
                    if key.endswith("_tflops") and value is not None) + " TFLOP/s", flush=True)
    errors = [accuracy(device, dtype, head_dim, causal) for head_dim in head_dims for causal in (True, False)]
    met = targets_met(rows)

    summary = [{"D": r["head_dim"], "causal": r["causal"], "T": r["seqlen"], "B": r["batch"], "H": r["heads"],
                "fwd ours": r["ours_fwd_tflops"], **{f"fwd {p}": r[f"{p}_fwd_tflops"] for p in peers(device)},
                "bwd ours": r["ours_bwd_tflops"], **{f"bwd {p}": r[f"{p}_bwd_tflops"] for p in peers(device)},
                "f+b ours": r["ours_fwd_bwd_tflops"]} for r in rows]
    print_table(summary, title=f"TFLOP/s, {config.dtype}, {config.total_tokens} tokens per shape"
                               + (" (interpreter smoke run: timings meaningless)" if config.smoke else ""))
    print_table(errors, title=f"max abs error vs float64 ({config.dtype} inputs)")
    print(f"targets met: {met}")
    write_result("attention-smoke" if config.smoke else "attention",
                 {"config": dataclasses.asdict(config), "dtype": config.dtype, "targets": TARGETS,
                  "targets_met": met, "results": rows, "errors": errors}, device=device)


if __name__ == "__main__":
    main()

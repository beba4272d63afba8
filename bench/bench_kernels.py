"""Kernel micro-benchmarks: paged decode attention against memory bandwidth, the int8 matmuls against torch.

    python bench/bench_kernels.py                     # the full sweep on CUDA
    python bench/bench_kernels.py --contexts 4096     # one context length
    python bench/bench_kernels.py --smoke true        # no GPU: tiny shapes through the Triton interpreter

Paged decode attention. A decode step reads every cached key and value once, so the figure of merit is
achieved bandwidth: bytes read and written per call (K and V of every context token, q, out) divided by the
time. The ceiling is measured, not taken from a data sheet: a large device-to-device copy, counted as bytes
read plus bytes written. Shapes are a Llama-8B-like layer (32 query heads, 8 kv heads, head_dim 128, bf16,
blocks of 16 tokens) at contexts 1k..32k and batches 1..64; every sequence in a batch has the same length and
block tables are random permutations of the pool, as in a fragmented cache. num_splits is automatic. The
peer is torch: gather each sequence's blocks into a contiguous (B, T, n_kv, D) copy, then SDPA with GQA (the
equal lengths spare it a mask). At batch 1 and context 4k a call moves ~17 MB, about 6 us at full bandwidth,
which is the same order as launch latency: small-batch rows fall short of the ceiling for that reason, and
CUDA graphs in the engine are the remedy rather than the kernel.

INT8 matmuls. W8A8 TOPS (2 M N K per call) of int8_matmul, exact int32 output and fused-scale bf16 output,
against torch.matmul in bf16 and torch._int_mm (cuBLAS int8; it needs M > 16, shown "-" below that), at
M in 1..4096 and (N, K) of Llama projections. The ratios compare like with like: our bf16-out W8A8 against
the bf16 matmul, our int32-out product against _int_mm. W8A16 against bf16 torch.matmul at decode sizes M = 1..16,
where both are bound by reading the weight: the int8 weight is half the bytes, so the ideal speedup is ~2x;
the table gives weight GB/s for each.

Times are medians of triton.testing.do_bench (CUDA events, L2 flushed between runs); the first call of each
shape compiles (the int8 matmuls also autotune) outside timing. Accuracy: max abs error against the torch
references on one shape.
Smoke mode only checks the script end to end: interpreter timings mean nothing and no targets are judged.
"""
import argparse
import dataclasses
import os
import statistics
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

import triton.testing  # noqa: E402
from torch.nn.functional import scaled_dot_product_attention  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from kernels.int8_matmul import (int8_matmul, int8_matmul_reference, int8_weight_only_matmul,  # noqa: E402
                                 int8_weight_only_matmul_reference)
from kernels.paged_attention import paged_decode_attention, paged_decode_attention_reference  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402

# From the brief, for an H100.
TARGETS = {"paged_vs_copy_bandwidth_min": 0.8, "paged_target_min_context": 4096,
           "int8_vs_bf16_min": 1.5, "int8_vs_int_mm_min": 0.9, "int8_target_min_m": 4096}


@dataclass
class BenchConfig:
    """Paged decode attention bandwidth and int8 matmul throughput against torch, on one GPU."""
    contexts: str = "1024,4096,16384,32768"      # comma-separated context lengths (tokens per sequence)
    batches: str = "1,8,32,64"                   # comma-separated decode batch sizes
    n_head: int = 32                             # query heads
    n_kv_head: int = 8                           # kv heads (GQA groups of n_head / n_kv_head)
    head_dim: int = 128                          # per-head dimension
    block_size: int = 16                         # tokens per KV cache block
    max_cache_gib: float = 16.0                  # skip paged shapes whose K/V pool would exceed this
    matmul_ms: str = "1,16,256,4096"             # comma-separated M (tokens) for the W8A8 sweep
    matmul_nks: str = "4096x4096,11008x4096"     # comma-separated NxK weight shapes
    decode_ms: str = "1,2,4,8,16"                # comma-separated M for the W8A16 sweep
    warmup_ms: int = 25                          # do_bench warmup per measurement
    rep_ms: int = 100                            # do_bench timed repetitions per measurement
    smoke: bool = False                          # tiny shapes on CPU through the Triton interpreter


SMOKE_OVERRIDES = dict(contexts="40,75", batches="1,3", n_head=4, n_kv_head=2, head_dim=16, block_size=4,
                       matmul_ms="1,17", matmul_nks="48x32", decode_ms="1,4")


def time_ms(fn, config):
    """Median milliseconds of fn(): do_bench with CUDA events on GPU, a perf_counter loop in smoke mode."""
    if not config.smoke:
        return triton.testing.do_bench(fn, warmup=config.warmup_ms, rep=config.rep_ms, return_mode="median")
    elapsed = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        elapsed.append((time.perf_counter() - start) * 1e3)
    return statistics.median(elapsed)


def copy_bandwidth_gbs(config, device):
    """The measured memory ceiling: GB/s of a large device-to-device copy, bytes read plus bytes written."""
    num_bytes = (1 << 20) if config.smoke else (1 << 30)
    source = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    return 2 * num_bytes / time_ms(lambda: target.copy_(source), config) / 1e6


def paged_case(config, device, batch, context, generator):
    """Random q and caches, block tables as random permutations of the pool, equal context lengths."""
    blocks_per_seq = -(-context // config.block_size)
    cache_shape = (batch * blocks_per_seq, config.block_size, config.n_kv_head, config.head_dim)
    k_cache = torch.randn(cache_shape, generator=generator, device=device, dtype=torch.bfloat16)
    v_cache = torch.randn(cache_shape, generator=generator, device=device, dtype=torch.bfloat16)
    q = torch.randn(batch, config.n_head, config.head_dim, generator=generator, device=device, dtype=torch.bfloat16)
    block_tables = torch.randperm(batch * blocks_per_seq, generator=generator, device=device)
    block_tables = block_tables.view(batch, blocks_per_seq).int()  # (batch, blocks_per_seq)
    context_lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return q, k_cache, v_cache, block_tables, context_lens


def gather_then_sdpa(q, k_cache, v_cache, block_tables, context):
    """The torch peer: copy every context out of the pool, then one SDPA call (all lengths are `context`)."""
    keys = k_cache[block_tables.long()].flatten(1, 2)[:, :context]  # (B, T, n_kv, D)
    values = v_cache[block_tables.long()].flatten(1, 2)[:, :context]
    out = scaled_dot_product_attention(q[:, :, None], keys.transpose(1, 2), values.transpose(1, 2),
                                       enable_gqa=True)  # (B, n_head, 1, D)
    return out[:, :, 0]


def paged_rows(config, device, copy_gbs):
    """One row per (context, batch): ours and the gather+SDPA peer, in ms and achieved GB/s."""
    generator = torch.Generator(device=device).manual_seed(0)
    element = torch.finfo(torch.bfloat16).bits // 8
    rows = []
    for context in [int(c) for c in config.contexts.split(",")]:
        for batch in [int(b) for b in config.batches.split(",")]:
            kv_bytes = 2 * batch * context * config.n_kv_head * config.head_dim * element
            if kv_bytes > config.max_cache_gib * 2**30:
                print(f"  context {context} batch {batch}: K/V of {kv_bytes / 2**30:.1f} GiB over --max-cache-gib")
                continue
            case = paged_case(config, device, batch, context, generator)
            moved = kv_bytes + 2 * batch * config.n_head * config.head_dim * element  # K, V + q in, out
            paged_decode_attention(*case)  # compile outside the timing
            ours_ms = time_ms(lambda: paged_decode_attention(*case), config)
            peer_ms = time_ms(lambda: gather_then_sdpa(*case[:4], context), config)
            rows.append({"context": context, "batch": batch, "ours_ms": ours_ms, "ours_gbs": moved / ours_ms / 1e6,
                         "of_copy_bw": moved / ours_ms / 1e6 / copy_gbs, "gather_sdpa_ms": peer_ms,
                         "gather_sdpa_gbs": moved / peer_ms / 1e6, "speedup_vs_peer": peer_ms / ours_ms})
            print(f"paged context={context} batch={batch}: {rows[-1]['ours_gbs']:.0f} GB/s "
                  f"({rows[-1]['of_copy_bw']:.0%} of copy), peer {rows[-1]['gather_sdpa_gbs']:.0f} GB/s", flush=True)
            del case
    return rows


def int_mm_or_none(a, b, config):
    """torch._int_mm time in ms, or None where cuBLAS refuses the shape (M <= 16, K or N not multiples of 8)."""
    if a.is_cuda and not (a.shape[0] > 16 and a.shape[1] % 8 == 0 and b.shape[0] % 8 == 0):
        return None
    return time_ms(lambda: torch._int_mm(a, b.t()), config)


def weights(config, device, generator):
    """Per N x K in --matmul-nks: (N, K, int8 weight, its per-channel scales, a bf16 weight of the same shape)."""
    for shape in config.matmul_nks.split(","):
        N, K = (int(v) for v in shape.split("x"))
        yield (N, K, torch.randint(-128, 128, (N, K), generator=generator, device=device, dtype=torch.int8),
               torch.rand(N, generator=generator, device=device) / 127,
               torch.randn(N, K, generator=generator, device=device, dtype=torch.bfloat16))


def int8_rows(config, device):
    """W8A8 rows per (M, N, K): TOPS of ours (int32 and fused-scale bf16 out), torch._int_mm, bf16 matmul."""
    generator = torch.Generator(device=device).manual_seed(1)
    rows = []
    for N, K, b, b_scale, w in weights(config, device, generator):
        for M in [int(m) for m in config.matmul_ms.split(",")]:
            a = torch.randint(-128, 128, (M, K), generator=generator, device=device, dtype=torch.int8)
            a_scale = torch.rand(M, generator=generator, device=device) / 127
            x = torch.randn(M, K, generator=generator, device=device, dtype=torch.bfloat16)
            int8_matmul(a, b)  # autotune outside the timing
            int8_matmul(a, b, a_scale, b_scale, out_dtype=torch.bfloat16)
            tera_ops = 2 * M * N * K / 1e9  # per ms -> TOPS
            times = {"ours_int32": time_ms(lambda: int8_matmul(a, b), config),
                     "ours_scaled_bf16": time_ms(lambda: int8_matmul(a, b, a_scale, b_scale,
                                                                     out_dtype=torch.bfloat16), config),
                     "int_mm": int_mm_or_none(a, b, config),
                     "bf16_matmul": time_ms(lambda: x @ w.t(), config)}
            row = {"M": M, "N": N, "K": K}
            row.update({f"{name}_tops": None if ms is None else tera_ops / ms for name, ms in times.items()})
            # Like for like: bf16 out against the bf16 matmul, int32 out against cuBLAS's int32 out.
            row["ours_vs_bf16"] = times["bf16_matmul"] / times["ours_scaled_bf16"]
            row["ours_vs_int_mm"] = None if times["int_mm"] is None else times["int_mm"] / times["ours_int32"]
            rows.append(row)
            print(f"int8 M={M} N={N} K={K}: ours {row['ours_scaled_bf16_tops']:.1f} TOPS, "
                  f"{row['ours_vs_bf16']:.2f}x bf16", flush=True)
    return rows


def weight_only_rows(config, device):
    """W8A16 rows per (M, N, K): time and weight GB/s of ours against a bf16 matmul on the full weight."""
    generator = torch.Generator(device=device).manual_seed(2)
    rows = []
    for N, K, w_int8, w_scale, w in weights(config, device, generator):
        for M in [int(m) for m in config.decode_ms.split(",")]:
            x = torch.randn(M, K, generator=generator, device=device, dtype=torch.bfloat16)
            int8_weight_only_matmul(x, w_int8, w_scale)  # autotune outside the timing
            ours_ms = time_ms(lambda: int8_weight_only_matmul(x, w_int8, w_scale), config)
            bf16_ms = time_ms(lambda: x @ w.t(), config)
            rows.append({"M": M, "N": N, "K": K, "ours_ms": ours_ms, "ours_weight_gbs": N * K / ours_ms / 1e6,
                         "bf16_ms": bf16_ms, "bf16_weight_gbs": 2 * N * K / bf16_ms / 1e6,
                         "speedup": bf16_ms / ours_ms})
    return rows


def accuracy(config, device):
    """Max abs errors of the kernels against their torch references on one small odd shape each."""
    generator = torch.Generator(device=device).manual_seed(3)
    case = paged_case(config, device, batch=3, context=int(config.contexts.split(",")[0]) + 5, generator=generator)
    paged_error = (paged_decode_attention(*case).float()
                   - paged_decode_attention_reference(*[x.float() if x.is_floating_point() else x for x in case]))
    a = torch.randint(-128, 128, (37, 200), generator=generator, device=device, dtype=torch.int8)
    b = torch.randint(-128, 128, (45, 200), generator=generator, device=device, dtype=torch.int8)
    int8_error = (int8_matmul(a, b) - int8_matmul_reference(a, b)).abs().max().item()
    x = torch.randn(5, 200, generator=generator, device=device, dtype=torch.bfloat16)
    scale = torch.rand(45, generator=generator, device=device) / 127
    weight_only_error = (int8_weight_only_matmul(x, b, scale).float()
                         - int8_weight_only_matmul_reference(x.float(), b, scale)).abs().max().item()
    return {"paged_max_abs_err": paged_error.abs().max().item(), "int8_int32_max_abs_err": int8_error,
            "w8a16_max_abs_err": weight_only_error}


def targets_met(paged, int8):
    """The brief's targets on the rows they apply to (None where no row applies or a peer is missing)."""
    def all_at_least(values, bound):
        return None if not values or None in values else all(value >= bound for value in values)
    long_rows = [r for r in paged if r["context"] >= TARGETS["paged_target_min_context"]]
    large_m = [r for r in int8 if r["M"] >= TARGETS["int8_target_min_m"]]
    return {"paged_vs_copy_bandwidth": all_at_least([r["of_copy_bw"] for r in long_rows],
                                                    TARGETS["paged_vs_copy_bandwidth_min"]),
            "int8_vs_bf16": all_at_least([r["ours_vs_bf16"] for r in large_m], TARGETS["int8_vs_bf16_min"]),
            "int8_vs_int_mm": all_at_least([r["ours_vs_int_mm"] for r in large_m], TARGETS["int8_vs_int_mm_min"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    if not torch.cuda.is_available() and not config.smoke:
        sys.exit("bench_kernels: no CUDA GPU here. The sweep needs one; `--smoke true` runs tiny shapes through "
                 "the Triton interpreter to check the script end to end.")
    if config.smoke:
        config = dataclasses.replace(config, **SMOKE_OVERRIDES)
    device = "cuda" if torch.cuda.is_available() and not config.smoke else "cpu"

    copy_gbs = copy_bandwidth_gbs(config, device)
    print(f"device-to-device copy: {copy_gbs:.0f} GB/s", flush=True)
    paged = paged_rows(config, device, copy_gbs)
    int8 = int8_rows(config, device)
    weight_only = weight_only_rows(config, device)
    errors = accuracy(config, device)
    met = None if config.smoke else targets_met(paged, int8)

    note = " (interpreter smoke run: timings meaningless)" if config.smoke else ""
    print_table(paged, title=f"paged decode attention, bf16, {config.n_head}/{config.n_kv_head} heads, "
                             f"D={config.head_dim}, copy ceiling {copy_gbs:.0f} GB/s" + note)
    print_table(int8, title="W8A8 int8 matmul, TOPS (bf16 matmul: TFLOP/s)" + note)
    print_table(weight_only, title="W8A16 (int8 weights, bf16 activations) vs bf16 matmul" + note)
    print_table([errors], title="max abs error vs torch references")
    print(f"targets met: {met}")
    write_result("kernels-smoke" if config.smoke else "kernels",
                 {"config": dataclasses.asdict(config), "targets": TARGETS, "targets_met": met,
                  "copy_bandwidth_gbs": copy_gbs, "paged_attention": paged, "int8_matmul": int8,
                  "w8a16_matmul": weight_only, "errors": errors}, device=device)


if __name__ == "__main__":
    main()

"""Low-precision benchmark: int4 (RTN vs GPTQ), QAT vs PTQ, QLoRA vs LoRA, fp16 vs bf16 gradients; W4A16 speed on GPU.

    python bench/bench_lowprec.py                     # CPU quality half (trains the default model first if needed)
    python bench/bench_lowprec.py --device cuda       # GPU half: W4A16 kernel and decode speed (~1-2 min on an H100)
    python bench/bench_lowprec.py --device cuda --smoke true   # no GPU: the GPU half on tiny shapes, interpreted

CPU half, on the default pretrained model (`python train.py` with its defaults, into out/bench_lowprec; reused
when there):
  int4      quant.quality_report: bits per byte of full precision, int8, W8A8 and int4 by round-to-nearest and by
            GPTQ (groups of --group-size), and NF4 on the blocks' linears. Target: GPTQ removes >= 30% of RTN's
            bits-per-byte increase.
  QAT       finetune.py SFT on the stdlib docstring chat data, once in full precision, once with --qat w8a8 and
            once with --qat int4 (same steps, data and seed). Held-out SFT loss of the full-precision run
            quantized after training (PTQ) against the QAT runs' quantized models. Target: QAT removes >= 50% of
            PTQ W8A8's increase over full precision. The runs share seed and data order, so they differ only by
            the fake quantization; the full-precision run repeated with another seed shows how far apart two
            equally good models land (reported as the noise floor beside the paired figures).
  QLoRA     the same SFT with LoRA adapters on every block linear, on the float base and on an NF4 base: held-out
            loss, and bytes of the frozen base and of the whole training state (floats counted at bf16, as a
            bf16 LoRA would hold them). Target: QLoRA's held-out loss within 2% of LoRA's.
  fp16      why bf16: the gradients of one pretraining batch under fp32, fp16 autocast without loss scaling,
            fp16 with GradScaler's scale (2^16), and bf16: the share of nonzero fp32 gradient entries that became
            0 (underflow) and the relative error of the whole gradient.

GPU half (CUDA only): the W4A16 Triton kernel against torch's bf16 matmul and against
torch.ops.aten._weight_int4pack_mm (tinygemm, the kernel behind torchao's int4 weight-only layout; same groups,
scales and zero points) at M = 1..16 on Llama-3-8B projection shapes; and batch-1 decode of a Llama-3-8B-shaped
stack of projections (32 layers of q, k, v, o, gate, up, down; attention itself and the 0.5 GB embedding and
head are left out, being the same in both), bf16 nn.Linear vs Int4Linear, each step captured in one CUDA graph
so that launch overhead does not hide the weight traffic. Target: >= 2x bf16 tokens/s; the kernel >= 0.9x
tinygemm at M = 1..16.
"""
import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
if not torch.cuda.is_available():
    # Off-GPU (--smoke) the kernel can only run in the interpreter, which must be chosen before it is defined.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import finetune  # noqa: E402
from bench.bench_kernels import time_ms  # noqa: E402
from bench.common import print_table, write_result  # noqa: E402
from kernels.int4_matmul import int4_matmul, int4_matmul_reference, unpack_int4  # noqa: E402
from nanostack import checkpoint, data, quant, quant4  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.training import autocast_context  # noqa: E402

TARGETS = {"gptq_removes_of_rtn_increase_min": 0.30, "qat_removes_of_ptq_w8a8_increase_min": 0.50,
           "qlora_vs_lora_heldout_loss_max": 0.02, "w4a16_decode_vs_bf16_min": 2.0, "w4a16_vs_tinygemm_min": 0.9}
# Llama-3-8B: width 4096, 32 query and 8 key/value heads of 128, SwiGLU hidden 14336, 32 layers.
LLAMA3_8B = dict(hidden=4096, kv_out=1024, ffn=14336, layers=32)


@dataclass
class BenchConfig:
    """int4 / QAT / QLoRA / fp16 quality on CPU; the W4A16 kernel and decode speed on a GPU."""
    device: str = "cpu"              # cpu: the quality half | cuda: the speed half
    model: str = ""                  # pretrained checkpoint (relative to the repo root); empty = train the default one
    data_dir: str = "out/data/stdlib"  # token shards the model was trained on
    work_dir: str = "out/bench_lowprec_runs"  # fine-tuning runs (reused when there: delete to start over)
    group_size: int = 128            # int4 group size (input channels per scale and zero point)
    eval_batches: int = 16           # validation batches for bits per byte
    calibration_batches: int = 8     # training batches for GPTQ and SmoothQuant
    steps: int = 200                 # optimizer steps of every fine-tuning run
    lora_rank: int = 8               # LoRA / QLoRA rank
    lora_targets: str = "all"        # LoRA / QLoRA targets (QLoRA puts adapters on every block linear)
    eval_examples: int = 300         # held-out conversations per evaluation
    threads: int = 1                 # torch CPU threads (1 avoids spin-waits on a busy machine)
    decode_ms: str = "1,2,4,8,16"    # GPU: M (tokens) of the kernel sweep
    matmul_nks: str = "4096x4096,14336x4096,4096x14336"  # GPU: NxK weight shapes of the kernel sweep
    decode_layers: int = 32          # GPU: layers in the decode stack
    decode_steps: int = 50           # GPU: timed graph replays per variant
    warmup_ms: int = 25              # GPU: do_bench warmup per kernel measurement
    rep_ms: int = 100                # GPU: do_bench timed repetitions per kernel measurement
    smoke: bool = False              # the GPU half on tiny shapes through the Triton interpreter (no GPU needed)


SMOKE_OVERRIDES = dict(decode_ms="1,3", matmul_nks="64x256", decode_layers=2, decode_steps=2)
SMOKE_SHAPE = dict(hidden=256, kv_out=64, ffn=512, layers=2)


def run(command: list[str], log: Path, threads: int) -> None:
    """Run a repo script to completion, its output in `log`."""
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        result = subprocess.run([sys.executable, *command], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env)
    if result.returncode:
        sys.exit(f"{' '.join(command[:3])}... failed; see {log}:\n{log.read_text()[-3000:]}")


# ----------------------------------------------------------------------------------------------------------
# CPU half

def default_model(config: BenchConfig) -> Path:
    """The checkpoint `python train.py` makes with its defaults, in out/bench_lowprec (trained if missing)."""
    if config.model:
        return checkpoint.resolve_checkpoint(ROOT / config.model)
    run_dir = ROOT / "out" / "bench_lowprec"
    if not (run_dir / "latest").exists():
        print("training the default model: train.py --out-dir out/bench_lowprec", flush=True)
        run(["train.py", "--out-dir", str(run_dir), "--eval-every", "0", "--sample-every", "0"],
            ROOT / "out" / "bench_lowprec.log", config.threads)
    return checkpoint.resolve_checkpoint(run_dir)


def int4_quality(config: BenchConfig, model, tokenizer) -> dict:
    """quality_report with the int4 rows, plus NF4 on the blocks' linears (QLoRA's base) on the same batches."""
    data_dir = ROOT / config.data_dir
    report = quant.quality_report(model, tokenizer, data_dir, eval_batches=config.eval_batches,
                                  calibration_batches=config.calibration_batches, group_size=config.group_size)
    val = list(data.eval_batches(data.TokenShards(data_dir, "val", tokenizer), 8, model.config.max_seq_len,
                                 config.eval_batches))
    token_bytes = torch.tensor(tokenizer.token_bytes())
    full = quant.evaluate(model, val, token_bytes)
    nf4 = quant.copy_model(model)
    quant4.quantize_base_nf4(nf4)
    metrics = quant.evaluate(nf4, val, token_bytes, full["top1"])
    nf4_bytes = quant.weight_bytes(nf4)
    report["rows"].append({"variant": "nf4 blocks (embedding, head bf16)", "bpb": metrics["bpb"],
                           "perplexity": metrics["perplexity"], "loss": metrics["loss"],
                           "top1_agreement": metrics["top1_agreement"], "weight_bytes": nf4_bytes,
                           "vs_bf16_bytes": nf4_bytes / report["bf16_weight_bytes"],
                           "bpb_increase_percent": 100 * (metrics["bpb"] / full["bpb"] - 1)})
    rows = {row["variant"]: row for row in report["rows"]}
    rtn, gptq = (rows[f"int4-{m}(g{config.group_size})"]["bpb_increase_percent"] for m in ("rtn", "gptq"))
    report["gptq_removes_of_rtn_increase"] = (rtn - gptq) / rtn if rtn > 0 else None
    return report


def finetune_run(config: BenchConfig, init: Path, name: str, flags: list[str]) -> dict:
    """One finetune.py SFT run (reused when its eval.json exists); its eval.json and output directory."""
    out = ROOT / config.work_dir / name
    if not (out / "eval.json").exists():
        print(f"fine-tuning {name}: {' '.join(flags)}", flush=True)
        run(["finetune.py", "--init", str(init), "--out-dir", str(out), "--steps", str(config.steps),
             "--eval-examples", str(config.eval_examples), "--save-every", str(config.steps), "--device", "cpu",
             *flags], out.parent / f"{name}.log", config.threads)
    return {**json.loads((out / "eval.json").read_text()), "out_dir": out}


def qat_and_qlora(config: BenchConfig, init: Path) -> dict:
    """SFT in full precision, with QAT (w8a8, int4), with LoRA and with QLoRA; held-out losses after PTQ."""
    runs = {"sft": finetune_run(config, init, "sft", []),
            "sft_other_seed": finetune_run(config, init, "sft_other_seed", ["--seed", "1"]),
            "qat_w8a8": finetune_run(config, init, "qat_w8a8", ["--qat", "w8a8"]),
            "qat_int4": finetune_run(config, init, "qat_int4", ["--qat", "int4", "--qat-group-size",
                                                                str(config.group_size)])}
    lora_flags = ["--lora-rank", str(config.lora_rank), "--lora-targets", config.lora_targets]
    runs["lora"] = finetune_run(config, init, "lora", lora_flags)
    runs["qlora"] = finetune_run(config, init, "qlora", lora_flags + ["--base-quant", "nf4"])

    # The held-out SFT loss of every model on the same conversations finetune.py evaluated on.
    finetune_config = finetune.FinetuneConfig(eval_examples=config.eval_examples)
    datasets = finetune.load_datasets(finetune_config)
    sft = checkpoint.load_checkpoint(runs["sft"]["out_dir"])
    evaluator = finetune.Evaluator(sft["tokenizer"], datasets, sft["config"].max_seq_len, 8,
                                   autocast_context("float32", torch.device("cpu")), False, finetune_config)

    def heldout(model):
        return evaluator.heldout_loss(model.eval())["heldout_loss"]

    calibration = quant.calibration_batches_from(data.TokenShards(ROOT / config.data_dir, "train"),
                                                 config.calibration_batches, 8, sft["config"].max_seq_len)
    full = heldout(sft["model"])
    ptq = {"w8a8": dict(mode="w8a8"), "w8a8+smoothquant(0.5)": dict(mode="w8a8", smooth_alpha=0.5),
           "int4-rtn": dict(mode="int4", group_size=config.group_size),
           "int4-gptq": dict(mode="int4", group_size=config.group_size, int4_method="gptq")}
    rows = [{"model": "sft, full precision", "heldout_loss": full},
            {"model": "sft, another seed (noise floor)",
             "heldout_loss": heldout(checkpoint.load_checkpoint(runs["sft_other_seed"]["out_dir"])["model"])}]
    for name, settings in ptq.items():
        model = quant.quantize_model(quant.copy_model(sft["model"]), calibration_batches=calibration, **settings)
        rows.append({"model": f"sft, then PTQ {name}", "heldout_loss": heldout(model)})
    for mode in ("w8a8", "int4"):
        quantized = quant.load_quantized(runs[f"qat_{mode}"]["out_dir"] / "quantized")["model"]
        rows.append({"model": f"QAT {mode}, quantized", "heldout_loss": heldout(quantized)})
    for row in rows:
        row["increase_percent"] = 100 * (row["heldout_loss"] / full - 1)
    by_model = {row["model"]: row["increase_percent"] for row in rows}


    def removed(ptq_name, qat_name):
        ptq_increase = by_model[ptq_name]
        return (ptq_increase - by_model[qat_name]) / ptq_increase if ptq_increase > 0 else None

    lora, qlora = runs["lora"], runs["qlora"]
    qlora_row = {run: {"heldout_loss": runs[run]["after"]["heldout_loss"], **runs[run]["memory_bytes"],
                       "step_seconds": runs[run]["step_seconds"]} for run in ("lora", "qlora")}
    return {"qat": {"rows": rows, "noise_floor_percent": abs(by_model["sft, another seed (noise floor)"]),
                    "qat_removes_of_ptq_w8a8_increase": removed("sft, then PTQ w8a8", "QAT w8a8, quantized"),
                    "qat_removes_of_ptq_int4_increase": removed("sft, then PTQ int4-rtn", "QAT int4, quantized")},
            "qlora": {**qlora_row, "qlora_vs_lora_heldout_loss": qlora["after"]["heldout_loss"]
                      / lora["after"]["heldout_loss"] - 1}}


def fp16_gradients(model, tokenizer, data_dir: Path) -> list[dict]:
    """Gradient underflow and error of fp16 (with and without loss scaling) and bf16 against fp32, one batch."""
    inputs, targets = next(iter(data.eval_batches(data.TokenShards(data_dir, "val", tokenizer), 8,
                                                  model.config.max_seq_len, 1)))
    model.train()

    def gradients(dtype, loss_scale=1.0):
        model.zero_grad()
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = model(inputs, targets)
        (loss * loss_scale).backward()
        return torch.cat([p.grad.flatten() / loss_scale for p in model.parameters()])

    reference = gradients(torch.float32)
    rows = []
    for name, dtype, scale in (("fp16, no loss scaling", torch.float16, 1.0),
                               ("fp16, loss scale 2^16 (GradScaler)", torch.float16, 2.0**16),
                               ("bf16, no loss scaling", torch.bfloat16, 1.0)):
        grads = gradients(dtype, scale)
        rows.append({"variant": name, "underflowed_share": ((grads == 0) & (reference != 0)).float().mean().item(),
                     "relative_error": ((grads - reference).norm() / reference.norm()).item()})
    model.zero_grad()
    return rows


def cpu_half(config: BenchConfig) -> dict:
    """Every CPU measurement and the targets they meet."""
    directory = default_model(config)
    loaded = checkpoint.load_checkpoint(directory)
    model, tokenizer = loaded["model"].eval(), loaded["tokenizer"]
    timings, start = {}, time.time()
    int4 = int4_quality(config, model, tokenizer)
    timings["int4_s"], start = time.time() - start, time.time()
    fp16 = fp16_gradients(model, tokenizer, ROOT / config.data_dir)
    timings["fp16_s"], start = time.time() - start, time.time()
    posttrain = qat_and_qlora(config, directory)
    timings["qat_qlora_s"] = time.time() - start

    def at_least(value, bound):
        return None if value is None else value >= bound
    met = {"gptq_vs_rtn": at_least(int4["gptq_removes_of_rtn_increase"], TARGETS["gptq_removes_of_rtn_increase_min"]),
           "qat_vs_ptq_w8a8": at_least(posttrain["qat"]["qat_removes_of_ptq_w8a8_increase"],
                                       TARGETS["qat_removes_of_ptq_w8a8_increase_min"]),
           "qlora_vs_lora": abs(posttrain["qlora"]["qlora_vs_lora_heldout_loss"])
           <= TARGETS["qlora_vs_lora_heldout_loss_max"]}
    print_table([{k: v for k, v in row.items() if k != "loss"} for row in int4["rows"]],
                title=f"int4 quality, {int4['eval_tokens']:,} val tokens of {directory}")
    print(f"GPTQ removes {int4['gptq_removes_of_rtn_increase']} of RTN's bits-per-byte increase")
    print_table(posttrain["qat"]["rows"], title="held-out SFT loss: PTQ after SFT vs QAT")
    print_table([{"run": run, **values} for run, values in posttrain["qlora"].items() if isinstance(values, dict)],
                title="LoRA vs QLoRA (bytes with floats at bf16)")
    print_table(fp16, title="one batch's gradients against fp32")
    print(f"targets met: {met}")
    return {"model": str(directory), "targets_met": met, "int4": int4, **posttrain, "fp16_gradients": fp16,
            "seconds": timings}


# ----------------------------------------------------------------------------------------------------------
# GPU half

def tinygemm_operands(packed, scale, zero, group_size: int):
    """Our int4 weight in the layout of aten._weight_int4pack_mm (tinygemm): the same codes, and per group a
    (scale, offset) pair with w = (q - 8) * scale + offset, i.e. offset = (8 - z) * scale. None where torch lacks it."""
    codes = unpack_int4(packed)  # (N, K)
    scales_and_zeros = torch.stack([scale.float(), (8 - zero.float()) * scale.float()], dim=-1)
    scales_and_zeros = scales_and_zeros.transpose(0, 1).contiguous().to(torch.bfloat16)  # (K / G, N, 2)
    if codes.is_cuda:  # the CUDA packer takes two codes per byte, the even column in the high nibble
        weight = torch.ops.aten._convert_weight_to_int4pack(codes[:, 0::2] << 4 | codes[:, 1::2], 8)
        return lambda x: torch.ops.aten._weight_int4pack_mm(x, weight, group_size, scales_and_zeros)
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 2)
    return lambda x: torch.ops.aten._weight_int4pack_mm_for_cpu(x, weight, group_size, scales_and_zeros)


def kernel_rows(config: BenchConfig, device: str) -> list[dict]:
    """Per (M, N, K): ours, tinygemm and a bf16 matmul; times, weight GB/s, ratios, max error against the reference."""
    generator = torch.Generator(device=device).manual_seed(0)
    rows = []
    for shape in config.matmul_nks.split(","):
        N, K = (int(v) for v in shape.split("x"))
        weight = torch.randn(N, K, generator=generator, device=device, dtype=torch.bfloat16)
        packed, scale, zero = quant4.quantize_int4(weight, config.group_size)
        tinygemm = tinygemm_operands(packed, scale, zero, config.group_size)
        for M in [int(m) for m in config.decode_ms.split(",")]:
            x = torch.randn(M, K, generator=generator, device=device, dtype=torch.bfloat16)
            reference = int4_matmul_reference(x, packed, scale, zero).float()
            ours = int4_matmul(x, packed, scale, zero)  # autotunes outside the timing
            times = {"ours": time_ms(lambda: int4_matmul(x, packed, scale, zero), config),
                     "tinygemm": time_ms(lambda: tinygemm(x), config),
                     "bf16": time_ms(lambda: x @ weight.t(), config)}
            scale_of = reference.abs().max().item()
            rows.append({"M": M, "N": N, "K": K, **{f"{name}_us": ms * 1e3 for name, ms in times.items()},
                         "ours_weight_gbs": (packed.numel() + 3 * scale.numel()) / times["ours"] / 1e6,
                         "ours_vs_tinygemm": times["tinygemm"] / times["ours"],
                         "ours_vs_bf16": times["bf16"] / times["ours"],
                         "ours_rel_error": (ours.float() - reference).abs().max().item() / scale_of,
                         "tinygemm_rel_error": (tinygemm(x).float() - reference).abs().max().item() / scale_of})
            print(f"W4A16 M={M} N={N} K={K}: {rows[-1]['ours_vs_tinygemm']:.2f}x tinygemm, "
                  f"{rows[-1]['ours_vs_bf16']:.2f}x bf16", flush=True)
    return rows


def decode_stack_rows(config: BenchConfig, device: str) -> list[dict]:
    """Batch-1 decode through a Llama-3-8B-shaped stack of projections: bf16 vs W4A16 tokens/s (CUDA graphs)."""
    shape = SMOKE_SHAPE if config.smoke else {**LLAMA3_8B, "layers": config.decode_layers}
    hidden, kv_out, ffn = shape["hidden"], shape["kv_out"], shape["ffn"]
    projections = {"wq": (hidden, hidden), "wk": (kv_out, hidden), "wv": (kv_out, hidden), "wo": (hidden, hidden),
                   "w_gate": (ffn, hidden), "w_up": (ffn, hidden), "w_down": (hidden, ffn)}
    torch.manual_seed(0)
    with torch.device(device):
        layers = [torch.nn.ModuleDict({name: torch.nn.Linear(k, n, bias=False, dtype=torch.bfloat16)
                                       for name, (n, k) in projections.items()}) for _ in range(shape["layers"])]
    int4_layers = [torch.nn.ModuleDict({name: quant4.Int4Linear.from_linear(linear, config.group_size)
                                        for name, linear in layer.items()}) for layer in layers]

    def decode_step(stack, h):
        for layer in stack:
            q, _, _ = layer["wq"](h), layer["wk"](h), layer["wv"](h)
            h = h + layer["wo"](q)
            h = h + layer["w_down"](torch.nn.functional.silu(layer["w_gate"](h)) * layer["w_up"](h))
        return h

    x = torch.randn(1, hidden, device=device, dtype=torch.bfloat16)
    rows = []
    for name, stack in (("bf16", layers), ("w4a16", int4_layers)):
        with torch.no_grad():
            decode_step(stack, x)  # autotune and warm up outside the graph
            if config.smoke:
                step = lambda: decode_step(stack, x)  # noqa: E731
            else:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    decode_step(stack, x)
                step = graph.replay
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(config.decode_steps):
                step()
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = (time.perf_counter() - start) / config.decode_steps
        weight_bytes = sum(quant.weight_bytes(layer) for layer in stack)
        rows.append({"variant": name, "layers": shape["layers"], "weight_gb": weight_bytes / 1e9,
                     "ms_per_token": seconds * 1e3, "tokens_per_s": 1 / seconds,
                     "weight_gbs": weight_bytes / seconds / 1e9})
        print(f"decode {name}: {rows[-1]['tokens_per_s']:.0f} tokens/s", flush=True)
    rows[1]["speedup_vs_bf16"] = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def gpu_half(config: BenchConfig) -> dict:
    """The kernel sweep and the decode stack on CUDA (or tiny and interpreted in smoke mode)."""
    device = "cpu" if config.smoke else "cuda"
    kernels = kernel_rows(config, device)
    decode = decode_stack_rows(config, device)
    met = None if config.smoke else {
        "w4a16_decode_vs_bf16": decode[1]["speedup_vs_bf16"] >= TARGETS["w4a16_decode_vs_bf16_min"],
        "w4a16_vs_tinygemm": all(row["ours_vs_tinygemm"] >= TARGETS["w4a16_vs_tinygemm_min"] for row in kernels)}
    note = " (interpreter smoke run: timings meaningless)" if config.smoke else ""
    print_table(kernels, title=f"W4A16 (g{config.group_size}) vs tinygemm and bf16 matmul" + note)
    print_table(decode, title="batch-1 decode through a Llama-3-8B-shaped projection stack" + note)
    print(f"targets met: {met}")
    return {"targets_met": met, "w4a16_matmul": kernels, "decode": decode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    if config.device not in ("cpu", "cuda"):
        sys.exit(f"bench_lowprec: --device {config.device!r}; expected cpu (quality) or cuda (speed)")
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.device == "cpu":
        results = cpu_half(config)
    elif config.smoke or torch.cuda.is_available():
        config = dataclasses.replace(config, **SMOKE_OVERRIDES) if config.smoke else config
        results = gpu_half(config)
    else:
        sys.exit("bench_lowprec --device cuda: no CUDA GPU here; `--smoke true` runs the GPU half on tiny shapes "
                 "through the Triton interpreter")
    name = "lowprec-smoke" if config.smoke else "lowprec"
    write_result(name, {"config": dataclasses.asdict(config), "targets": TARGETS,
                        "note": "CPU half on a 2-core machine shared with other jobs: compare rows, not seconds",
                        **results}, device="cuda" if config.device == "cuda" and not config.smoke else "cpu")


if __name__ == "__main__":
    main()

"""Training throughput: nanostack's GPT vs `transformers`' LlamaForCausalLM of the same shape, in one run.

    python bench/bench_train.py                   # CPU: small models, fp32
    python bench/bench_train.py --device cuda     # GPU: bf16 autocast, GPT-2-class sizes, with and without compile

Both models get the same config (the HF one is built from `hf.hf_config`, the layout nanostack
exports to), the same random batch, the same dtype, SDPA attention, and the same AdamW step; only the model
code differs. Reports tokens/s, the ratio to the reference, and MFU (model FLOPs from `flops_per_token()` over
the GPU's peak; none on CPU). Targets: >= 1.0x the reference on CPU; on an H100, MFU >= 45% for ~124M
parameters in bf16 with compile and >= 1.15x the reference's tokens/s.
"""
import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from nanostack.hf import hf_config  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402
from nanostack.training import peak_flops  # noqa: E402


@dataclass
class BenchConfig:
    device: str = "cpu"             # cpu | cuda
    depths: str = ""                # comma-separated model depths; empty = 2,4,6 on CPU, 6,12,16 on GPU
    vocab_size: int = 0             # 0 = 8192 on CPU, 50304 on GPU
    seq_len: int = 0                # 0 = 256 on CPU, 1024 on GPU
    batch_size: int = 0             # 0 = 8 on CPU, 16 on GPU
    steps: int = 0                  # timed steps after warmup; 0 = 5 on CPU, 30 on GPU
    compile: bool = True            # on GPU also time both models under torch.compile
    repeats: int = 3                # timing rounds, models alternating; the best round of each counts
    threads: int = 0                # CPU threads for torch; 0 = torch's default


def hf_model(config: ModelConfig):
    """The same architecture as a transformers LlamaForCausalLM (or Mixtral), SDPA attention."""
    import transformers
    fields = hf_config(config)
    kind = transformers.MixtralConfig if config.n_expert else transformers.LlamaConfig
    hf = kind(**{k: v for k, v in fields.items() if k not in ("architectures", "model_type", "torch_dtype")})
    hf._attn_implementation = "sdpa"
    cls = transformers.MixtralForCausalLM if config.n_expert else transformers.LlamaForCausalLM
    return cls(hf)


def training_step(model, forward_loss, batch, device: torch.device):
    """A function running one optimizer step (forward, backward, AdamW) of `model`, warmed up twice."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step():
        with autocast:
            loss = forward_loss(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    return step


def seconds_per_step(step, steps: int, device: torch.device) -> float:
    """Mean wall time of `steps` calls of `step`."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def ours_loss(model, batch):
    return model(batch[:, :-1], batch[:, 1:])


def hf_loss(model, batch):
    logits = model(input_ids=batch[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    device = torch.device(config.device)
    on_gpu = device.type == "cuda"
    if config.threads:
        torch.set_num_threads(config.threads)
    depths = [int(d) for d in (config.depths or ("6,12,16" if on_gpu else "2,4,6")).split(",")]
    vocab = config.vocab_size or (50304 if on_gpu else 8192)
    seq_len = config.seq_len or (1024 if on_gpu else 256)
    batch_size = config.batch_size or (16 if on_gpu else 8)
    steps = config.steps or (30 if on_gpu else 5)
    peak = peak_flops(device)
    rows = []
    for depth in depths:
        model_config = ModelConfig.from_depth(depth, vocab_size=vocab, max_seq_len=seq_len)
        torch.manual_seed(0)
        batch = torch.randint(0, vocab, (batch_size, seq_len + 1), device=device)
        tokens = batch_size * seq_len
        variants = [("nanostack", GPT, ours_loss, False), ("transformers", hf_model, hf_loss, False)]
        if on_gpu and config.compile:
            variants += [("nanostack+compile", GPT, ours_loss, True), ("transformers+compile", hf_model, hf_loss, True)]
        step_fns = {}
        for name, build, loss_fn, compiled in variants:
            torch.manual_seed(0)
            model = build(model_config).to(device).train()
            step_fns[name] = training_step(torch.compile(model) if compiled else model, loss_fn, batch, device)
        # Rounds alternate between the models, so a slow phase of the machine hits both alike.
        best = dict.fromkeys(step_fns, float("inf"))
        for _ in range(config.repeats):
            for name in step_fns:
                best[name] = min(best[name], seconds_per_step(step_fns[name], steps, device))
        results = {name: tokens / seconds for name, seconds in best.items()}
        del step_fns
        shape = GPT(model_config)
        for name, tokens_per_s in results.items():
            reference = results["transformers+compile" if "compile" in name else "transformers"]
            row = {"depth": depth, "params_m": round(shape.num_params() / 1e6, 1), "model": name,
                   "tokens_per_s": tokens_per_s, "vs_reference": tokens_per_s / reference}
            if peak:
                row["mfu"] = shape.flops_per_token() * tokens_per_s / peak
            rows.append(row)
    print_table(rows, f"training step (fwd+bwd+AdamW), batch {batch_size} x {seq_len}, "
                      f"{'bf16 autocast' if on_gpu else 'fp32'}, {device}")
    write_result("train", {"config": {"depths": depths, "vocab_size": vocab, "seq_len": seq_len,
                                      "batch_size": batch_size, "steps": steps}, "rows": rows}, device=config.device)


if __name__ == "__main__":
    main()

"""The training loop shared by pretraining and every post-training method.

    for each step:
        lr = schedule(step)
        for each micro-batch (gradient accumulation):
            loss, metrics = objective(model, batch)      # the loop does not know which objective it runs
            (loss / grad_accum).backward()
        clip gradients, optimizer step
        every N steps: log, evaluate, sample, checkpoint

Everything a resumed run needs to continue *exactly* is in the checkpoint: weights, optimizer moments, the
step, the batch source's position and the RNG states. On CPU in fp32 a resumed run reproduces the losses
of an uninterrupted one bit for bit (tests/test_training.py checks it).

fp16 (`--dtype float16`) needs loss scaling, bf16 does not. fp16 keeps 5 exponent bits: values below 6e-8
flush to zero, and small gradients (a mean over thousands of tokens makes many) vanish in the backward.
torch.amp.GradScaler multiplies the loss by a large factor S (65536 to start) so the backward's values sit in
fp16's range, divides the gradients by S before clipping and the optimizer step, and skips any step whose
gradients overflowed, halving S (it doubles S again after 2000 good steps). Skipped steps are counted in the
log and the checkpoint, which also holds the scaler's state. bf16 has fp32's 8 exponent bits, so nothing
underflows and no scaling is needed, at the price of 3 fewer mantissa bits (bench/bench_lowprec.py measures
both).
"""
import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from safetensors.torch import load_file

from nanostack import checkpoint, distributed, objectives
from nanostack import model as model_module
from nanostack.distributed import ParallelConfig, Rank
from nanostack.parallel import Pipeline, clip_grad_norm_, vocab_parallel_loss

# Dense bf16 peak FLOP/s, for MFU. CPUs have no meaningful single figure, so no MFU is shown there.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "H800": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}


@dataclass
class TrainConfig:
    out_dir: str = "out/pretrain"   # run directory: step_*/ checkpoints, latest, metrics.jsonl
    steps: int = 600                # optimizer steps in the whole run
    batch_size: int = 8             # sequences per micro-batch (per rank)
    grad_accum: int = 1             # micro-batches per optimizer step
    lr: float = 0.0                 # peak learning rate; 0 = derived from the model's width
    min_lr_ratio: float = 0.1       # final learning rate as a fraction of the peak
    warmup_steps: int = 20          # linear warmup from 0 to the peak
    schedule: str = "cosine"        # cosine | wsd (warmup-stable-decay: flat, then linear decay at the end)
    decay_ratio: float = 0.2        # wsd only: fraction of the steps spent in the final decay
    weight_decay: float = 0.1       # AdamW decay on matrices (never on norms, biases or embeddings)
    beta1: float = 0.9              # AdamW first-moment decay
    beta2: float = 0.95             # AdamW second-moment decay
    grad_clip: float = 1.0          # clip the global gradient norm to this; 0 = off
    dtype: str = "auto"             # auto (bf16 autocast on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    compile: bool = False           # torch.compile the model (GPU; slow to start on CPU)
    flash_kernel: bool = True       # attention through the Triton flash kernel on CUDA (false = PyTorch SDPA)
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    seed: int = 1337                # seeds weights, data order and sampling
    eval_every: int = 100           # evaluate every N steps (and at the end); 0 = only at the end
    sample_every: int = 100         # print a sample every N steps; 0 = never
    save_every: int = 100           # checkpoint every N steps (and at the end)
    keep: int = 2                   # checkpoints kept in the run directory
    log_every: int = 10             # one metrics line every N steps
    resume: bool = False            # continue from the newest checkpoint in out_dir


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


class OutOfMemory(ValueError):
    """A training step did not fit in the device's memory: a setting to change, so the CLIs print one line."""


def out_of_memory_advice(step: int, device: torch.device, config: TrainConfig, run_dir: Path) -> str:
    """What to change when step `step` ran out of memory; the checkpoints already in run_dir stay as they are."""
    return (f"out of memory on {device} at step {step} with --batch-size {config.batch_size} --grad-accum "
            f"{config.grad_accum}: halve --batch-size and double --grad-accum (the same global batch in less "
            f"memory), or add --activation-checkpointing full, or lower --seq-len; the checkpoints saved so far "
            f"are kept in {run_dir}")


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype matmuls run in: `auto` is bf16 on GPU and fp32 on CPU."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def autocast_context(dtype: str, device: torch.device):
    """bf16/fp16 autocast for the forward pass, or nothing for fp32."""
    dtype = compute_dtype(dtype, device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def learning_rate(step: int, config: TrainConfig, peak: float) -> float:
    """Linear warmup, then cosine to min_lr_ratio * peak, or (wsd) flat then linear decay at the end."""
    if step < config.warmup_steps:
        return peak * (step + 1) / config.warmup_steps
    floor = peak * config.min_lr_ratio
    if config.schedule == "cosine":
        progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    if config.schedule == "wsd":
        decay_start = config.steps - int(config.decay_ratio * config.steps)
        if step < decay_start:
            return peak
        return peak - (peak - floor) * (step - decay_start) / max(1, config.steps - decay_start)
    raise ValueError(f"schedule must be 'cosine' or 'wsd', got {config.schedule!r}")


def make_optimizer(model: torch.nn.Module, config: TrainConfig, lr: float) -> torch.optim.AdamW:
    """AdamW with two groups: weight decay on matrices, none on norms and embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim < 2 or "emb" in name else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=(config.beta1, config.beta2), fused=fused)


def peak_flops(device: torch.device) -> float | None:
    """The bf16 peak FLOP/s of a known GPU, or None."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def to_device(batch, device):
    """Move a batch (tensor, tuple/list or dict of them) to `device`."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (tuple, list)):
        return type(batch)(to_device(b, device) for b in batch)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    return batch


def batch_tokens(batch) -> int:
    """Tokens in a batch: the size of its first tensor (the input ids)."""
    if torch.is_tensor(batch):
        return batch.numel()
    first = next(iter(batch.values() if isinstance(batch, dict) else batch))
    return batch_tokens(first)


@torch.no_grad()
def bits_per_byte(model, batches, token_bytes: torch.Tensor) -> dict:
    """Mean next-token loss (nats) and bits per byte of text over (inputs, targets) batches.

    Bits per byte divides the summed loss by the UTF-8 bytes the targets decode to, so models with
    different tokenizers compare fairly; zero-byte tokens (specials such as <|bos|>) count in neither sum.
    """
    device = token_bytes.device
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, loss on text tokens, tokens, bytes
    for inputs, targets in batches:
        inputs, targets = inputs.to(device), targets.to(device)
        logits = model(inputs)
        if logits is None:  # a pipeline stage before the last: the last stage counts these tokens
            continue
        nats = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), reduction="none")
        target_bytes = token_bytes[targets.flatten()]
        sums += torch.stack([nats.sum(), (nats * (target_bytes > 0)).sum(), torch.tensor(nats.numel(), device=device),
                             target_bytes.sum()]).double()
    # Over every rank's share; tp ranks add the same sums, which leaves both ratios as they are.
    loss_sum, byte_nats, tokens, text_bytes = distributed.all_reduce_sum(sums).tolist()
    if tokens == 0:
        raise ValueError("no evaluation batches: the validation split is smaller than one batch")
    return {"loss": loss_sum / tokens, "bpb": byte_nats / (math.log(2) * max(1.0, text_bytes))}


class MetricsLog:
    """metrics.jsonl in the run directory: one JSON object per line, cut back to `step` on resume."""

    def __init__(self, run_dir: Path, resume_step: int | None):
        self.path = run_dir / "metrics.jsonl"
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        elif self.path.exists():
            lines, kept = self.path.read_text().splitlines(), []
            for number, line in enumerate(lines, start=1):
                try:
                    if line and json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError as error:
                    if number < len(lines):
                        raise ValueError(f"{self.path}:{number}: not valid JSON ({error.msg}); the log is damaged "
                                         f"before its last line: delete or repair that line") from None
                    # A kill in the middle of a write leaves the last line half written: drop it, and say so.
                    tqdm.write(f"{self.path}: dropped its torn last line ({len(line)} characters), left by an "
                               f"interrupted write")
            self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def resume_state(run_dir: Path, model, optimizer) -> dict:
    """Load the newest checkpoint of a run into `model` and `optimizer` (sharded or not); its trainer state."""
    directory = checkpoint.resolve_checkpoint(run_dir)
    checkpoint.verify_manifest(directory)
    if (directory / "shards").exists():
        distributed.load_sharded(directory / "shards", model, optimizer)
    else:
        weights = checkpoint.with_tied_aliases(model, load_file(directory / "model.safetensors"))
        distributed.load_full_state(model, optimizer, weights, checkpoint.read_optimizer_state(directory))
    return {**json.loads((directory / "trainer_state.json").read_text()), "directory": str(directory)}


def train(model, objective, batches, config: TrainConfig, *, model_config, tokenizer, evaluate=None, sample=None,
          extra_config: dict | None = None, parallel: ParallelConfig | None = None, rank: Rank | None = None) -> dict:
    """Run `objective` over `batches` for `config.steps` optimizer steps; returns the last eval metrics.

    `model` is the bare model on its device; `parallel` says how to wrap it (DDP, FSDP2, tensor and pipeline
    parallel, activation checkpointing) when `rank` comes from `distributed.setup()` under torchrun. `batches`
    has `next_batch()`, `state_dict()` and `load_state_dict()`; `evaluate(model)` returns a dict of metrics
    (every rank calls it; under --pp `model` is the Pipeline, which returns logits on the last stage only);
    `sample(model)` returns a string to print. Checkpoints go to config.out_dir, written by rank 0.
    """
    parallel, rank = parallel or ParallelConfig(), rank or Rank(device=next(model.parameters()).device)
    model_module.USE_FLASH_KERNEL = config.flash_kernel
    device, run_dir, peak_lr = rank.device, Path(config.out_dir), config.lr
    flops_per_token, peak = model.flops_per_token(), peak_flops(device)
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype(config.dtype, device) == torch.float16)
    if scaler.is_enabled() and (parallel.strategy == "fsdp" or parallel.tp > 1 or parallel.pp > 1):
        raise ValueError("--dtype float16 with --strategy fsdp, --tp or --pp: loss scaling of sharded or "
                         "pipelined gradients is not supported here; use --dtype bfloat16 (no scaling needed), or "
                         "--strategy ddp")
    step_model = distributed.parallelize(model, parallel, rank, compile=config.compile, micro_batches=config.grad_accum,
                                         param_dtype=compute_dtype(config.dtype, device))
    pipeline = step_model if isinstance(step_model, Pipeline) else None
    if pipeline is not None and objective is not objectives.next_token:
        raise ValueError(f"--pp trains the next-token objective only (its loss runs on the last stage), "
                         f"not {getattr(objective, '__name__', objective)}")
    optimizer = make_optimizer(model, config, peak_lr)  # after sharding: FSDP2 turns parameters into DTensors
    start_step, last_good, skipped_steps = 0, None, 0  # last_good: what a divergence leaves to go back to
    if config.resume:
        trainer_state = resume_state(run_dir, model, optimizer)
        start_step, last_good = trainer_state["step"], trainer_state["directory"]
        skipped_steps = trainer_state.get("skipped_steps", 0)
        if trainer_state.get("grad_scaler"):  # empty when the run was not fp16
            scaler.load_state_dict(trainer_state["grad_scaler"])
        batches.load_state_dict(trainer_state["loader"])
        checkpoint.set_rng_state(trainer_state["rng"])
        if rank.is_main:
            tqdm.write(f"resumed from {trainer_state['directory']} at step {start_step}")
    if rank.is_main and (freed := checkpoint.remove_unfinished_writes(run_dir)):
        tqdm.write(f"removed {freed / 1e6:.1f} MB of unfinished checkpoint writes from {run_dir} (a killed run's)")
    log = MetricsLog(run_dir, start_step if config.resume else None) if rank.is_main else None
    autocast = autocast_context(config.dtype, device)
    eval_metrics: dict = {}

    def save(step: int) -> None:
        nonlocal last_good
        sharded = parallel.sharded_checkpoint or pipeline is not None  # no rank holds every stage's weights
        # Gathering is a collective under FSDP: every rank takes part, rank 0 writes.
        weights = None if sharded else distributed.full_model_state(model)
        optimizer_state = None if sharded else distributed.full_optimizer_state(model, optimizer)
        shards = run_dir / f".shards_{step:06d}.tmp"
        if sharded:
            distributed.save_sharded(shards, model, optimizer)
        if rank.is_main:
            trainer_state = {"step": step, "loader": batches.state_dict(), "rng": checkpoint.rng_state(),
                             "train_config": asdict(config), "parallel": asdict(parallel),
                             "world_size": rank.world_size, "eval": eval_metrics,
                             "grad_scaler": scaler.state_dict(), "skipped_steps": skipped_steps}
            checkpoint.save_run_checkpoint(run_dir, step, config.keep, weights=weights, config=model_config,
                                           tokenizer=tokenizer, optimizer_state=optimizer_state,
                                           trainer_state=trainer_state, extra_config=extra_config,
                                           extra_files={"shards": shards} if sharded else None)
        distributed.barrier()
        last_good = run_dir / f"step_{step:06d}"

    model.train()
    bar = tqdm(range(start_step, config.steps), initial=start_step, total=config.steps, desc="train",
               dynamic_ncols=True, disable=not rank.is_main)
    window_start, window_tokens = time.perf_counter(), 0
    for step in bar:
        lr = learning_rate(step, config, peak_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Summed on the device: reading a GPU value every micro-step would stall the launch queue.
        step_loss, step_metrics = torch.zeros((), device=device), {}
        try:
            if pipeline is not None:  # the schedule runs every micro-batch's forward and backward, in its order
                micro_batches = [to_device(batches.next_batch(), device) for _ in range(config.grad_accum)]
                with autocast:
                    step_loss = pipeline.step(micro_batches)
                window_tokens += sum(map(batch_tokens, micro_batches)) * rank.size("dp")
            for micro in range(config.grad_accum if pipeline is None else 0):
                batch = to_device(batches.next_batch(), device)
                with distributed.gradient_sync(step_model, sync=micro == config.grad_accum - 1), \
                        vocab_parallel_loss(rank.size("tp")), autocast:
                    loss, metrics = objective(step_model, batch)
                    scaler.scale(loss / config.grad_accum).backward()
                step_loss += loss.detach() / config.grad_accum
                # An objective that generates its own tokens (grpo) says how many it trained on.
                window_tokens += (metrics.pop("tokens", None) or batch_tokens(batch)) * rank.size("dp")
                for k, v in metrics.items():
                    step_metrics[k] = step_metrics.get(k, 0.0) + v / config.grad_accum
        except torch.OutOfMemoryError:
            raise OutOfMemory(out_of_memory_advice(step + 1, device, config, run_dir)) from None
        scaler.unscale_(optimizer)  # clip the true gradients (a no-op unless fp16)
        grad_norm = clip_grad_norm_(model.parameters(), config.grad_clip or float("inf"), rank.mesh)
        scale = scaler.get_scale()
        scaler.step(optimizer)  # skipped if a gradient overflowed
        scaler.update()
        if scaler.get_scale() < scale:  # the scale is lowered exactly when the step was skipped
            skipped_steps += 1
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        logging = done % config.log_every == 0 or done == config.steps
        saving = done % config.save_every == 0 or done == config.steps
        evaluating = evaluate is not None and ((config.eval_every and done % config.eval_every == 0)
                                               or done == config.steps)
        sampling = sample is not None and config.sample_every and done % config.sample_every == 0
        if not (logging or saving or evaluating or sampling):
            continue
        # Every rank agrees on the mean loss, so every rank stops together, and a diverged run never
        # overwrites a good checkpoint: the check comes before any save.
        step_loss = float(distributed.all_reduce_sum(step_loss)) / rank.world_size
        if not math.isfinite(step_loss):
            kept = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was saved before it"
            raise TrainingDiverged(f"loss became {step_loss} at step {done}; {kept} (try a lower --lr, a longer "
                                   f"--warmup-steps, or --grad-clip 1.0)")
        if logging and rank.is_main:
            tokens_per_s = window_tokens / (time.perf_counter() - window_start)
            record = {"step": done, "loss": step_loss, "lr": lr, "grad_norm": float(grad_norm),
                      "tokens_per_s": tokens_per_s, **{k: float(v) for k, v in step_metrics.items()}}
            if scaler.is_enabled():
                record.update(loss_scale=scaler.get_scale(), skipped_steps=skipped_steps)
            postfix = {"loss": f"{step_loss:.4f}", "tok/s": f"{tokens_per_s:,.0f}"}
            if peak:
                record["mfu"] = flops_per_token * tokens_per_s / (peak * rank.world_size)
                postfix["mfu"] = f"{record['mfu']:.1%}"
            log.write(record)
            bar.set_postfix(postfix)
        if logging:
            window_start, window_tokens = time.perf_counter(), 0
        if evaluating:
            model.eval()
            with torch.no_grad(), autocast:
                eval_metrics = evaluate(pipeline or model)
            model.train()
            if rank.is_main:
                log.write({"step": done, **{f"eval/{k}": v for k, v in eval_metrics.items()}})
                tqdm.write(f"step {done}: " + ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items()))
        if sampling:
            model.eval()
            text = sample(model)  # every rank runs it: under FSDP the forward is a collective
            model.train()
            if rank.is_main:
                tqdm.write(f"sample at step {done}: {text!r}")
        if saving:
            save(done)
    bar.close()
    return eval_metrics

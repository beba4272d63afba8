"""Quantization of a trained GPT: int8 weight-only (W8A16), int8 weights + activations (W8A8), 4-bit weights (W4A16).

An int8 tensor stores each row as 8-bit integers plus one float scale: q = round(w / s), s = max|w_row| / 127,
so w ~ q * s with an error of at most s / 2 per element (symmetric: no zero point, since weights and
activations are roughly centred on zero). Weights get one scale per output channel (row of the (out, in)
nn.Linear weight), so one large row does not coarsen the others.

W8A16 ("int8-wo", weight-only). Weights are int8, activations stay in fp16/bf16/fp32. Decoding a few tokens
at a time is bound by reading the weights from memory, so halving their bytes nearly halves the time; the
kernel widens int8 tiles to the activation dtype in registers and applies the per-channel scale once per
output. Quality is almost free: the only error is the weight rounding.

W8A8 ("w8a8"). Activations are quantized too, per token (one scale per row of x, computed on the fly, hence
"dynamic"), so the matmul runs int8 x int8 -> int32 on integer tensor cores at twice the bf16 rate, and both
scales are applied in the epilogue. The catch is activation outliers: LLM activations have a few channels
(columns of x) that are 10-100x larger than the rest in every token. A per-token scale is set by the outlier,
and all the ordinary channels of that token round to a handful of levels.

SmoothQuant (nanostack/smoothquant.py) moves that difficulty into the weights before quantizing: it scales
outlier channels of X down and the matching columns of W up, folded into the preceding norms and linears.

int4 (W4A16, nanostack/quant4.py). 4-bit weights with a scale and zero point per group of 128 input channels,
rounded to nearest or by GPTQ (calibrated on the training corpus), a quarter of the bf16 bytes; the Triton
kernel dequantizes them in registers. Its embedding and LM head are int8, like in the other modes.

What stays high precision (`skip`, default: the MoE router only). The embedding is an int8 table with one
scale per row, i.e. per token, so a rare token with large entries does not coarsen the others; a lookup
gathers the int8 rows of its ids and scales only those. The LM head is int8 weight-only in every mode: its
input is the final norm's output and its logits go straight to the sampler, so per-token activation rounding
there buys prefill speed on one layer at the price of the logits the sampler sees. W8A8 would save no bytes
(the stored weight is the same); measured, it left bits per byte unchanged within noise and lowered top-1
agreement with full precision a little in every model tried (bench/results/quant-cpu.json). With tied
embeddings one int8 table is both: the head's per-output-channel scales are the embedding's per-row scales,
and it is stored once; it stays high precision if either name is in `skip`. (GPT.lm_logits reads
`tok_emb.weight`, which Int8Embedding dequantizes on access, so a tied head multiplies by a transient float
copy rather than through the int8 kernel.) The MoE router is tiny and its top-k choice flips on small logit
differences. MoE experts ARE quantized to int8: they hold most of an MoE model's weights, and each expert is
an ordinary SwiGLU over its tokens (int4 leaves them to `skip`: GPTQ would need each expert's routed tokens).
In a small model the embedding and head are a large share of the weights (40% of the benchmark's), so
quantizing them takes the whole model from 0.70x to 0.50x of its bf16 bytes, for a bits-per-byte change of a
few 1e-4 or less.

On CUDA the linears call the Triton kernels in kernels/int8_matmul.py and kernels/int4_matmul.py; elsewhere
their plain-torch references. A quantized checkpoint stores the quantized weights + their scales (smoothing
already folded) and a "quantization" entry in config.json; `load_quantized` rebuilds it, `load_for_serving`
takes either kind.

    python -m nanostack.quant --model out/pretrain --mode w8a8 --out out/w8a8 --report true
    python -m nanostack.quant --model out/pretrain --mode int4 --group-size 64   # GPTQ, calibrated on the corpus
"""
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from tqdm import tqdm

from kernels.int8_matmul import (int8_matmul, int8_matmul_reference, int8_weight_only_matmul,
                                 int8_weight_only_matmul_reference, quantize_per_row)
from nanostack import checkpoint, data
from nanostack.atomic import write_json
from nanostack.cli import add_dataclass_args, dataclass_from_args, make_parser, run
from nanostack.model import GPT, Experts
from nanostack.smoothquant import smooth_model
from nanostack.tokenizer import Tokenizer
from nanostack.training import bits_per_byte, resolve_device

INT8_MODES = ("int8-wo", "w8a8")
MODES = (*INT8_MODES, "int4")
INT4_METHODS = ("rtn", "gptq")
# Modules left in high precision by default (see the module docstring for why each of these may stay).
DEFAULT_SKIP = ("router",)
# Names `skip` accepts even where the model lacks them (a tied model has no lm_head module, a dense one no router).
SKIPPABLE = ("tok_emb", "lm_head", "router", "experts")
# The LM head is weight-only int8 in every mode: see the module docstring.
LM_HEAD_MODE = "int8-wo"
# The Triton kernels run on CUDA. On CPU the plain-torch references run, even under TRITON_INTERPRET=1, where
# the kernel module would interpret Triton in numpy (far too slow for a whole model). Tests set this to True
# to send the CPU path through the interpreted kernels.
KERNELS_ON_CPU = False


# ----------------------------------------------------------------------------------------------------------
# Int8 tensors and linears

def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: weight (..., out, in) -> (int8 (..., out, in), fp32 scale (..., out))."""
    return quantize_per_row(weight.detach())


def dequantize(weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float tensor an int8 tensor stands for: q * scale per row, in fp32."""
    return weight_int8.float() * scale.float()[..., None]


def _use_kernels(x: torch.Tensor) -> bool:
    return x.is_cuda or KERNELS_ON_CPU


def weight_only_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A16: x (..., in) @ (weight_int8 (out, in) * scale[:, None]).T -> (..., out) in x.dtype."""
    matmul = int8_weight_only_matmul if _use_kernels(x) else int8_weight_only_matmul_reference
    out = matmul(x.reshape(-1, x.shape[-1]), weight_int8, scale)  # (tokens, out)
    return out.view(*x.shape[:-1], weight_int8.shape[0])


def w8a8_linear(x: torch.Tensor, weight_int8: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8: quantize x (..., in) per token, int8 x int8 matmul, both scales applied to the int32 sums."""
    x_int8, x_scale = quantize_per_row(x.reshape(-1, x.shape[-1]))  # (tokens, in), (tokens,)
    matmul = int8_matmul if _use_kernels(x) else int8_matmul_reference
    out = matmul(x_int8, weight_int8, x_scale, scale, out_dtype=x.dtype)  # (tokens, out)
    return out.view(*x.shape[:-1], weight_int8.shape[0])


LINEAR_FUNCTIONS = {"int8-wo": weight_only_linear, "w8a8": w8a8_linear}


def _register_int8_weight(module: nn.Module, in_features: int, out_features: int, bias: bool) -> None:
    module.in_features, module.out_features = in_features, out_features
    module.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
    module.register_buffer("weight_scale", torch.zeros(out_features))
    module.register_buffer("bias", torch.zeros(out_features) if bias else None)  # kept in the activation dtype


def _add_bias(out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return out if bias is None else out + bias


class Int8WeightOnlyLinear(nn.Module):
    """W8A16 stand-in for an nn.Linear: int8 (out, in) weight, one fp scale per output channel, optional fp bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        _register_int8_weight(self, in_features, out_features, bias)

    def forward(self, x):
        return _add_bias(weight_only_linear(x, self.weight_int8, self.weight_scale), self.bias)


class W8A8Linear(nn.Module):
    """W8A8 stand-in for an nn.Linear: the same stored weight, activations quantized per token."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        _register_int8_weight(self, in_features, out_features, bias)

    def forward(self, x):
        return _add_bias(w8a8_linear(x, self.weight_int8, self.weight_scale), self.bias)


LINEAR_CLASSES = {"int8-wo": Int8WeightOnlyLinear, "w8a8": W8A8Linear}


def quantize_linear(linear: nn.Linear, mode: str) -> nn.Module:
    """An Int8WeightOnlyLinear ("int8-wo") or W8A8Linear ("w8a8") holding linear's weight in int8 (its bias as is)."""
    module = LINEAR_CLASSES[mode](linear.in_features, linear.out_features, linear.bias is not None)
    module = module.to(linear.weight.device)
    module.weight_int8, module.weight_scale = quantize_weight(linear.weight)
    if linear.bias is not None:
        module.bias = linear.bias.detach().clone()
    return module


def quantize_rows(weight: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 with the scale stored in scale_dtype: weight (rows, cols) -> (int8 (rows, cols), scale (rows,)).

    The values are rounded against the stored (possibly bf16-rounded) scale, so q * scale is within scale / 2
    of every weight; a scale rounded down by bf16 only clamps the largest entry, by less than a quarter step."""
    scale = (weight.detach().float().abs().amax(-1) / 127).to(scale_dtype)
    divisor = torch.where(scale > 0, scale.float(), 1.0)  # a zero row keeps scale 0 and stores zeros
    weight_int8 = torch.round(weight.detach().float() / divisor[..., None]).clamp_(-127, 127).to(torch.int8)
    return weight_int8, scale


class Int8Embedding(nn.Module):
    """Int8 stand-in for nn.Embedding: an int8 (vocab, dim) table with one scale per row (one token's vector).

    The scale is kept in the activation dtype (it is cast along with the model), which is the dtype a lookup
    returns. A lookup gathers the int8 rows of its ids and scales only those, never the whole table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.register_buffer("weight_int8", torch.zeros(num_embeddings, embedding_dim, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.zeros(num_embeddings, dtype=dtype))

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding) -> "Int8Embedding":
        """Quantize an nn.Embedding's table per row; the scales keep the table's dtype."""
        weight = embedding.weight
        module = cls(*weight.shape, dtype=weight.dtype).to(weight.device)
        module.weight_int8, module.weight_scale = quantize_rows(weight, weight.dtype)
        return module

    def forward(self, ids):
        rows = self.weight_int8[ids].to(self.weight_scale.dtype)  # (..., dim): int8 values, exact in any float
        return rows * self.weight_scale[ids].unsqueeze(-1)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized (vocab, dim) table, built anew on each access, for code that reads `tok_emb.weight`:
        GPT.lm_logits with tied embeddings; generate, speculative drafting and the engine (its dtype/device)."""
        return self.weight_int8.to(self.weight_scale.dtype) * self.weight_scale[:, None]


class QuantizedExperts(nn.Module):
    """model.Experts with int8 (n_expert, out, in) weights and (n_expert, out) scales; same dispatch interface."""

    MATRICES = ("w_gate", "w_up", "w_down")

    def __init__(self, n_expert: int, n_embd: int, hidden: int, mode: str):
        super().__init__()
        self.mode = mode
        shapes = {"w_gate": (hidden, n_embd), "w_up": (hidden, n_embd), "w_down": (n_embd, hidden)}
        for name, (out_features, in_features) in shapes.items():
            self.register_buffer(f"{name}_int8", torch.zeros(n_expert, out_features, in_features, dtype=torch.int8))
            self.register_buffer(f"{name}_scale", torch.zeros(n_expert, out_features))

    @classmethod
    def from_experts(cls, experts: Experts, mode: str) -> "QuantizedExperts":
        """Quantize every expert's matrices per output channel."""
        n_expert, hidden, n_embd = experts.w_gate.shape
        module = cls(n_expert, n_embd, hidden, mode).to(experts.w_gate.device)
        for name in cls.MATRICES:
            weight_int8, scale = quantize_weight(getattr(experts, name))
            setattr(module, f"{name}_int8", weight_int8)
            setattr(module, f"{name}_scale", scale)
        return module

    def forward(self, x_sorted, tokens_per_expert: torch.Tensor):
        """x_sorted (N*k, n_embd) grouped by expert, tokens_per_expert[e] rows each -> (N*k, n_embd).
        The group sizes are read back to the host (int8 has no grouped matmul here)."""
        linear = LINEAR_FUNCTIONS[self.mode]
        outputs = []
        for e, chunk in enumerate(x_sorted.split(tokens_per_expert.tolist())):
            gate = linear(chunk, self.w_gate_int8[e], self.w_gate_scale[e])
            up = linear(chunk, self.w_up_int8[e], self.w_up_scale[e])
            outputs.append(linear(F.silu(gate) * up, self.w_down_int8[e], self.w_down_scale[e]))
        return torch.cat(outputs)


# ----------------------------------------------------------------------------------------------------------
# Whole models

def is_skipped(name: str, skip) -> bool:
    """Whether module `name` stays high precision: a skip entry is its full name, a prefix of it ("layers.0")
    or one of its dotted parts ("wo", "router", "experts")."""
    return any(name == entry or name.startswith(entry + ".") or entry in name.split(".") for entry in skip)


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name), child, module)


def quantization_targets(model: GPT, mode: str, skip) -> list[tuple[str, nn.Module, str]]:
    """(name, module, kind) for every module quantize_model replaces, in model order: kind is "embedding" (int8
    rows), "experts", or for a linear the mode it gets (the LM head's is LM_HEAD_MODE). QAT fakes the same."""
    # With tied embeddings one table is both the embedding and the LM head: keeping either keeps it.
    keep_table = model.config.tie_embeddings and is_skipped("lm_head", skip)
    targets = []
    for name, module in model.named_modules():
        if is_skipped(name, skip):
            continue
        if isinstance(module, nn.Embedding) and not keep_table:
            targets.append((name, module, "embedding"))
        elif isinstance(module, nn.Linear):
            targets.append((name, module, LM_HEAD_MODE if name == "lm_head" else mode))
        elif isinstance(module, Experts):
            targets.append((name, module, "experts"))
    return targets


def check_skip(model: nn.Module, skip) -> tuple[str, ...]:
    """`skip` as a tuple, refused if an entry matches no module of the model (and is not in SKIPPABLE)."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    names = [name for name, _ in model.named_modules()]
    unknown = [entry for entry in skip if entry not in SKIPPABLE and not any(is_skipped(n, [entry]) for n in names)]
    if unknown:
        raise ValueError(f"skip entries {unknown} match no module; use names such as {SKIPPABLE}, 'wo' "
                         f"or 'layers.0'")
    return skip


def quantize_model(model: GPT, mode: str, *, skip=DEFAULT_SKIP, smooth_alpha: float | None = None,
                   calibration_batches=None, group_size: int = 128, int4_method: str = "rtn") -> GPT:
    """Swap the model's embedding, linears and MoE experts for quantized ones in place, except modules matched by
    `skip`.

    mode "int8-wo" (W8A16), "w8a8" or "int4" (W4A16; the LM head is int8 weight-only in all). For w8a8,
    `smooth_alpha` first folds SmoothQuant scales calibrated on `calibration_batches` (token ids (B, T) or
    (inputs, targets) pairs from the training corpus); for int4, `group_size` input channels share a scale and
    `int4_method` "gptq" rounds the blocks' linears by GPTQ on `calibration_batches` instead of to nearest.
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}; expected one of {MODES}")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is already quantized ({model.quantization}); start from full precision")
    skip = check_skip(model, skip)
    if smooth_alpha is not None:
        if mode != "w8a8":
            raise ValueError(f"smooth_alpha={smooth_alpha} applies to w8a8 only: {mode} keeps activations in "
                             "high precision, so there is nothing to smooth")
        if calibration_batches is None:
            raise ValueError("smooth_alpha needs calibration_batches (a few batches of the training corpus)")
        smooth_model(model, calibration_batches, smooth_alpha)
    if int4_method not in INT4_METHODS or (mode != "int4" and int4_method != "rtn"):
        raise ValueError(f"int4_method={int4_method!r}: expected one of {INT4_METHODS}, and gptq only with mode int4")
    targets = quantization_targets(model, mode, skip)
    if mode == "int4":
        from nanostack import quant4  # quant4 builds on this module's helpers, so it is imported when needed
        quant4.check_group_size(group_size)
        if any(kind == "experts" for _, _, kind in targets):
            raise ValueError("int4 does not quantize MoE experts (GPTQ would need each expert's routed tokens): "
                             "keep them high precision with skip 'experts' (--keep-high-precision router,experts), "
                             "or use int8-wo / w8a8")
        if int4_method == "gptq":
            quant4.gptq_quantize_layers(model, calibration_batches or [], group_size, skip)
            targets = quantization_targets(model, mode, skip)  # the blocks' linears are Int4Linears now

    for name, module, kind in targets:
        if kind == "embedding":
            _set_module(model, name, Int8Embedding.from_embedding(module))
        elif kind == "experts":
            _set_module(model, name, QuantizedExperts.from_experts(module, mode))
        elif kind == "int4":
            _set_module(model, name, quant4.Int4Linear.from_linear(module, group_size))
        else:
            _set_module(model, name, quantize_linear(module, kind))
    model.quantization = {"mode": mode, "skip": list(skip), "smooth_alpha": smooth_alpha}
    if mode == "int4":
        model.quantization.update(group_size=group_size, int4_method=int4_method)
    return model


def weight_bytes(model: nn.Module, float_dtype: torch.dtype = torch.bfloat16) -> int:
    """Bytes of the model's saved tensors with every floating one (scales, norms, kept layers) in float_dtype."""
    float_size = torch.finfo(float_dtype).bits // 8
    tensors = checkpoint.unique_tensors(model.state_dict())
    return sum(t.numel() * (float_size if t.is_floating_point() else t.element_size()) for t in tensors.values())


# ----------------------------------------------------------------------------------------------------------
# Quantized checkpoints

def save_quantized(model: GPT, tokenizer: Tokenizer, directory, *, source: str | None = None) -> Path:
    """Write a quantized model as a checkpoint: quantized weights + scales, settings in config.json["quantization"]."""
    info = getattr(model, "quantization", None)
    if not info:
        raise ValueError("the model is not quantized; call quantize_model first (or checkpoint.save_checkpoint)")
    return checkpoint.save_checkpoint(directory, model.state_dict(), model.config, tokenizer,
                                      extra_config={"quantization": {**info, "source": source}})


def load_quantized(path, device="cpu") -> dict:
    """Rebuild a quantized checkpoint: {"model", "config", "raw_config", "tokenizer", "directory"}."""
    directory = checkpoint.resolve_checkpoint(path)
    checkpoint.verify_manifest(directory)
    config, raw = checkpoint.read_config(directory)
    info = raw.get("quantization")
    if not info:
        raise checkpoint.CheckpointError(f"{directory} is not a quantized checkpoint (no 'quantization' in "
                                         "config.json); load it with checkpoint.load_checkpoint")
    model = GPT(config)
    # Same structure as when it was saved; the values quantized from these random weights are then replaced.
    quantize_model(model, info["mode"], skip=tuple(info["skip"]), group_size=info.get("group_size", 128))
    model.quantization = {key: value for key, value in info.items() if key != "source"}
    checkpoint.load_weights(model, load_file(directory / "model.safetensors"))
    model.to(device)
    return {"model": model, "config": config, "raw_config": raw, "directory": directory,
            "tokenizer": Tokenizer.load(directory / raw.get("tokenizer", "tokenizer.json"))}


def load_for_serving(path, device="cpu", dtype: torch.dtype | None = None) -> dict:
    """Load a plain or a quantized checkpoint (or a Hugging Face model directory) for inference, plain weights in
    `dtype`; same keys as `load_quantized`."""
    _, raw = checkpoint.read_config(path)
    if raw.get("quantization"):
        return load_quantized(path, device)
    return checkpoint.load_checkpoint(path, device, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# Quality report

def calibration_batches_from(shards, num_batches: int, batch_size: int, seq_len: int, seed: int = 0) -> list:
    """num_batches random (inputs, targets) windows of the training split for calibration."""
    loader = data.BatchLoader(shards, batch_size, seq_len, seed=seed)
    return [loader.next_batch() for _ in range(num_batches)]


@torch.no_grad()
def evaluate(model, batches: list, token_bytes: torch.Tensor, reference_top1: list | None = None) -> dict:
    """Loss, bits per byte and perplexity on `batches`, top-1 agreement with `reference_top1`, and "top1",
    the model's own argmax per position (B, T) per batch, for later comparisons."""
    top1 = []

    def forward_keeping_argmax(inputs):
        logits = model(inputs)
        top1.append(logits.argmax(-1))
        return logits

    metrics = bits_per_byte(forward_keeping_argmax, batches, token_bytes)
    metrics["perplexity"] = math.exp(metrics["loss"])
    if reference_top1 is not None:
        agree = sum((mine == theirs).sum().item() for mine, theirs in zip(top1, reference_top1))
        metrics["top1_agreement"] = agree / sum(t.numel() for t in top1)
    metrics["top1"] = top1
    return metrics


def copy_model(model: GPT) -> GPT:
    """A separate full-precision GPT with the same weights, dtype and device (deepcopy trips over MoE's graph)."""
    twin = GPT(model.config)
    twin.load_state_dict(model.state_dict())
    return twin.to(model.norm.weight)


def quality_report(model: GPT, tokenizer: Tokenizer, data_dir, *, eval_batches: int = 16, batch_size: int = 8,
                   seq_len: int = 0, calibration_batches: int = 8, smooth_alpha: float = 0.5,
                   skip=DEFAULT_SKIP, group_size: int = 128) -> dict:
    """Full precision vs W8A16, W8A8, W8A8 + SmoothQuant, int4 by RTN and by GPTQ on the val split of data_dir:
    bits per byte (and how much higher than full precision's, in percent), perplexity, top-1 agreement with full
    precision, weight bytes and their ratio to bf16 bytes. The int4 rows keep MoE experts (if any) high precision."""
    device = model.tok_emb.weight.device
    seq_len = seq_len or model.config.max_seq_len
    val = list(data.eval_batches(data.TokenShards(data_dir, "val", tokenizer), batch_size, seq_len, eval_batches))
    calibration = calibration_batches_from(data.TokenShards(data_dir, "train", tokenizer), calibration_batches,
                                           batch_size, seq_len)
    token_bytes = torch.tensor(tokenizer.token_bytes(), device=device)
    bf16_bytes = weight_bytes(model)
    variants = {"full precision": None, "int8-wo": dict(mode="int8-wo"), "w8a8": dict(mode="w8a8"),
                f"w8a8+smoothquant({smooth_alpha:g})": dict(mode="w8a8", smooth_alpha=smooth_alpha,
                                                             calibration_batches=calibration)}
    for method in INT4_METHODS:
        variants[f"int4-{method}(g{group_size})"] = dict(mode="int4", group_size=group_size, int4_method=method,
                                                          calibration_batches=calibration, skip=(*skip, "experts"))
    rows, reference_top1 = [], None
    for name, settings in variants.items():
        variant = model if settings is None else quantize_model(copy_model(model), **{"skip": skip, **settings})
        progress = tqdm(val, desc=f"quality report: {name}", unit="batch", leave=False)  # minutes on a CPU
        metrics = evaluate(variant.eval(), progress, token_bytes, reference_top1)
        if reference_top1 is None:
            reference_top1 = metrics["top1"]
        variant_bytes = weight_bytes(variant)
        rows.append({"variant": name, "bpb": metrics["bpb"], "perplexity": metrics["perplexity"],
                     "loss": metrics["loss"], "top1_agreement": metrics.get("top1_agreement", 1.0),
                     "weight_bytes": variant_bytes, "vs_bf16_bytes": variant_bytes / bf16_bytes})
    full = rows[0]["bpb"]
    for row in rows:
        row["bpb_increase_percent"] = 100 * (row["bpb"] / full - 1)
    return {"data_dir": str(data_dir), "eval_tokens": sum(x.numel() for x, _ in val), "seq_len": seq_len,
            "calibration_batches": calibration_batches, "skip": list(skip), "bf16_weight_bytes": bf16_bytes,
            "rows": rows}


def format_rows(rows: list[dict]) -> str:
    """Rows of {column: value} as an aligned text table (floats to 4 significant digits)."""
    columns = list(rows[0])
    cells = [[f"{row[c]:.4g}" if isinstance(row[c], float) else str(row[c]) for c in columns] for row in rows]
    widths = [max(len(c), *(len(line[i]) for line in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths)), "  ".join("-" * w for w in widths)]
    return "\n".join(lines + ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in cells])


# ----------------------------------------------------------------------------------------------------------
# Command line

@dataclass
class QuantConfig:
    model: str = "out/pretrain"     # full-precision checkpoint (or run) directory to quantize
    mode: str = "int8-wo"           # int8-wo (W8A16: int8 weights) | w8a8 (int8 weights and activations) | int4 (W4A16)
    out: str = ""                   # output checkpoint directory; empty = out/quant-<mode>
    smooth_alpha: float = 0.5       # w8a8 only: SmoothQuant migration strength in (0, 1]; 0 = no smoothing
    calibration_batches: int = 8    # training-split batches for SmoothQuant's activation statistics and GPTQ's Hessians
    group_size: int = 128           # int4 only: input channels per scale and zero point (a power of two >= 32)
    int4_method: str = "gptq"       # int4 only: gptq (calibrated on the training split) | rtn (round to nearest)
    keep_high_precision: str = ",".join(DEFAULT_SKIP)  # modules kept high precision, e.g. tok_emb,lm_head,router
    data_dir: str = "out/data/stdlib"  # token shards the model was trained on (calibration and --report)
    batch_size: int = 8             # sequences per calibration / evaluation batch
    seq_len: int = 0                # tokens per sequence; 0 = the model's max_seq_len
    report: bool = False            # also compare full precision, W8A16, W8A8, W8A8+SmoothQuant, int4 on the val split
    eval_batches: int = 16          # --report: validation batches per variant
    device: str = "auto"            # auto | cpu | cuda | cuda:N


def main(argv=None) -> int:
    parser = make_parser(__doc__, prog="python -m nanostack.quant")
    add_dataclass_args(parser, QuantConfig, "quantization")
    config = dataclass_from_args(QuantConfig, parser.parse_args(argv))
    if config.mode not in MODES:
        raise ValueError(f"--mode {config.mode!r}; expected one of {MODES}")
    if config.smooth_alpha < 0:
        raise ValueError(f"--smooth-alpha {config.smooth_alpha}; expected 0 (off) or a value in (0, 1]")
    int4_method = config.int4_method if config.mode == "int4" else "rtn"
    if config.mode != "int4" and (config.group_size, config.int4_method) != (128, "gptq"):
        raise ValueError(f"--group-size and --int4-method apply to --mode int4, not {config.mode}")
    skip = tuple(entry for entry in config.keep_high_precision.split(",") if entry)
    loaded = checkpoint.load_checkpoint(config.model, resolve_device(config.device))
    model, tokenizer = loaded["model"].eval(), loaded["tokenizer"]
    seq_len = config.seq_len or model.config.max_seq_len
    smooth_alpha = config.smooth_alpha if config.mode == "w8a8" and config.smooth_alpha > 0 else None

    if config.report:
        report = quality_report(model, tokenizer, config.data_dir, eval_batches=config.eval_batches,
                                batch_size=config.batch_size, seq_len=seq_len,
                                calibration_batches=config.calibration_batches,
                                smooth_alpha=config.smooth_alpha or 0.5, skip=skip, group_size=config.group_size)
    calibration = None
    if smooth_alpha is not None or int4_method == "gptq":
        shards = data.TokenShards(config.data_dir, "train", tokenizer)
        calibration = calibration_batches_from(shards, config.calibration_batches, config.batch_size, seq_len)
    bf16_bytes = weight_bytes(model)
    quantize_model(model, config.mode, skip=skip, smooth_alpha=smooth_alpha, calibration_batches=calibration,
                   group_size=config.group_size, int4_method=int4_method)
    out = Path(config.out or f"out/quant-{config.mode}")
    save_quantized(model, tokenizer, out, source=str(loaded["directory"]))
    print(f"{config.mode}: {weight_bytes(model) / 1e6:.2f} MB of weights ({weight_bytes(model) / bf16_bytes:.2f}x "
          f"the bf16 {bf16_bytes / 1e6:.2f} MB); quantized checkpoint in {out}")
    if config.report:
        report.update(model=str(loaded["directory"]), quantized_checkpoint=str(out))
        print(format_rows([{k: v for k, v in row.items() if k != "loss"} for row in report["rows"]]))
        write_json(out / "quant_report.json", report)
        print(f"wrote {out / 'quant_report.json'}")
    return 0


if __name__ == "__main__":
    run(main)

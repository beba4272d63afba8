"""4-bit weights: group-wise int4 (round-to-nearest and GPTQ) for serving, NF4 for QLoRA's frozen base.

int4. Each row of a weight (out, in) is cut into groups of G input channels (default 128) and each group gets
its own scale s and integer zero point z: q = clamp(round(w / s) + z, 0, 15), w ~ (q - z) * s. Sixteen levels
are too few for one scale per row (a single large weight would coarsen the whole row), hence groups; and
asymmetric, because a group of 128 weights is rarely centred on zero and a zero point spends the 16 levels
on the range it really has. The range is [min(w, 0), max(w, 0)]: it always contains 0, which is then a
level exactly, so zero padding costs nothing. That is how a width that is not a multiple of G is handled:
padded with zero columns up to one (kernels/int4_matmul.py stores Kp = K rounded up). Scales are stored in
the weight's dtype and codes rounded against the stored scale, so the error is at most s / 2 per weight.

Round-to-nearest (RTN) rounds every weight on its own. GPTQ (Frantar et al. 2022) rounds the columns of a
weight one at a time and, after each, moves the rounding error onto the columns not yet rounded, weighted
by how the layer's inputs correlate: with H = X^T X over calibration inputs X, the output error ||X (W - Q)^T||
is what is minimised, not ||W - Q||. Its update uses the Cholesky factor of H^-1 (plus 1% damping), and the
group scales are set from the already-updated weights when a group starts. GPTQ is chosen over AWQ (Lin et
al. 2023, which rescales input channels by activation size before RTN) because it corrects the rounding
itself rather than which weights round well, needs no fold point for its scales (AWQ would repeat
SmoothQuant's folding into norms and neighbouring layers, smoothquant.py), and treats every linear the same.
The layers are processed in order, each calibrated on the outputs of the already-quantized layers before it,
so later layers also correct the error of earlier ones ("sequential" GPTQ). The cost: an (in, in) matrix per
linear and a column-by-column sweep, a few seconds for the benchmark model.

NF4 (Dettmers et al. 2023, QLoRA). Trained weights are roughly normal, so levels at equal-probability
quantiles of N(0, 1) waste none of the 16 codes: each block of 64 weights is scaled by its absmax into
[-1, 1] and every weight takes the nearest NormalFloat level (`nf4_levels`, derived below from normal
quantiles). Double quantization stores the absmax values themselves in int8, in blocks of 256 around their
mean, which takes the scale cost from 32 / 64 = 0.5 to about 8 / 64 + 32 / (64 * 256) = 0.127 bits per weight
(the paper uses an 8-bit float there; int8 with a shared mean is the same idea). QLoRA trains LoRA adapters
on a frozen NF4 base: the base is dequantized to the compute dtype layer by layer, in the forward and again in
the backward (`_DequantizedLinear`), so only one layer's full-precision weight exists at any moment.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kernels.int4_matmul import (MIN_GROUP_SIZE, dequantize_int4, int4_matmul, int4_matmul_reference, pack_int4,
                                 unpack_int4)
from nanostack.model import GPT
from nanostack.quant import _set_module, _use_kernels, is_skipped, quantize_rows

GPTQ_DAMPING = 0.01       # fraction of the mean diagonal of H added to it, so that H is safely invertible
GPTQ_BLOCK = 128          # columns updated together before their error is pushed to the rest (lazy batch update)
NF4_BLOCK = 64            # weights per NF4 absmax
DOUBLE_QUANT_BLOCK = 256  # absmax values per int8 scale in double quantization


def padded_columns(weight: torch.Tensor, multiple: int) -> torch.Tensor:
    """weight (..., K) with zero columns appended up to a multiple of `multiple`, in fp32."""
    pad = -weight.shape[-1] % multiple
    return F.pad(weight.detach().float(), (0, pad))


# ----------------------------------------------------------------------------------------------------------
# int4, round to nearest

def check_group_size(group_size: int) -> None:
    """Raise unless group_size is a power of two >= MIN_GROUP_SIZE (what the kernel's K steps need)."""
    if group_size < MIN_GROUP_SIZE or group_size & (group_size - 1):
        raise ValueError(f"int4 group size {group_size}: expected a power of two >= {MIN_GROUP_SIZE}, e.g. 64 or 128")


def int4_group_params(groups: torch.Tensor, scale_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (in scale_dtype) and zero point (float, 0..15) per group of groups (..., G), its range [min, max] grown
    to contain 0."""
    low, high = groups.amin(-1).clamp(max=0), groups.amax(-1).clamp(min=0)
    scale = ((high - low) / 15).to(scale_dtype)
    zero = torch.round(-low / _divisor(scale)).clamp(0, 15)
    return scale, zero


def _divisor(scale: torch.Tensor) -> torch.Tensor:
    """The stored scale in fp32, with 1 where it is 0 (an all-zero group stores codes equal to its zero point)."""
    return torch.where(scale > 0, scale.float(), 1.0)


def int4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Round w to its 4-bit codes given the scale and zero point that apply to each element (broadcast)."""
    return (torch.round(w / _divisor(scale)) + zero).clamp(0, 15)


def quantize_int4(weight: torch.Tensor, group_size: int = 128):
    """RTN int4: weight (N, K) -> packed (N, Kp / 2) uint8, scale (N, Kp / G) in weight's dtype, zero (N, Kp / G)."""
    check_group_size(group_size)
    groups = padded_columns(weight, group_size).unflatten(-1, (-1, group_size))  # (N, Kp / G, G)
    scale, zero = int4_group_params(groups, weight.dtype)
    codes = int4_codes(groups, scale[..., None], zero[..., None]).flatten(-2)  # (N, Kp)
    return pack_int4(codes), scale, zero.to(torch.uint8)


def fake_quantize_int4(weight: torch.Tensor, group_size: int = 128) -> torch.Tensor:
    """What RTN int4 turns weight into, as a float tensor of weight's shape and dtype (for QAT)."""
    return dequantize_int4(*quantize_int4(weight, group_size))[..., :weight.shape[-1]].to(weight.dtype)


class Int4Linear(nn.Module):
    """W4A16 stand-in for an nn.Linear: 4-bit codes with a scale and zero point per group of input channels."""

    def __init__(self, in_features: int, out_features: int, group_size: int = 128, bias: bool = False):
        super().__init__()
        check_group_size(group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        stored = math.ceil(in_features / group_size) * group_size  # Kp: padded to whole groups
        self.register_buffer("weight_packed", torch.zeros(out_features, stored // 2, dtype=torch.uint8))
        self.register_buffer("weight_scale", torch.zeros(out_features, stored // group_size))
        self.register_buffer("weight_zero", torch.zeros(out_features, stored // group_size, dtype=torch.uint8))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, hessian: torch.Tensor | None = None):
        """Quantize linear's weight by RTN, or by GPTQ when the (in, in) input Hessian X^T X is given."""
        module = cls(linear.in_features, linear.out_features, group_size, linear.bias is not None)
        module.to(linear.weight.device)
        quantize = quantize_int4 if hessian is None else lambda w, g: gptq_quantize(w, hessian, g)
        module.weight_packed, module.weight_scale, module.weight_zero = quantize(linear.weight, group_size)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x):
        matmul = int4_matmul if _use_kernels(x) else int4_matmul_reference
        out = matmul(x.reshape(-1, self.in_features), self.weight_packed, self.weight_scale, self.weight_zero,
                     bias=self.bias)  # (tokens, out)
        return out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, group_size={self.group_size}"


# ----------------------------------------------------------------------------------------------------------
# GPTQ

@torch.no_grad()
def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, group_size: int = 128):
    """GPTQ int4 of weight (N, K) against the input Hessian (K, K) = X^T X / tokens: quantize_int4's format."""
    check_group_size(group_size)
    w = padded_columns(weight, group_size)  # (N, Kp), updated in place as errors are fed forward
    stored = w.shape[1]
    h = torch.zeros(stored, stored, device=w.device)
    h[:weight.shape[1], :weight.shape[1]] = hessian.float()
    dead = h.diagonal() == 0  # channels never active in calibration (and the padding): nothing to correct for
    h[dead, dead] = 1
    h.diagonal().add_(GPTQ_DAMPING * h.diagonal().mean())
    # Upper Cholesky factor of H^-1: row j holds how column j's error spreads over the columns after it.
    h_inv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    codes = torch.zeros_like(w)
    scale = torch.zeros(w.shape[0], stored // group_size, dtype=weight.dtype, device=w.device)
    zero = torch.zeros(w.shape[0], stored // group_size, device=w.device)
    block = max(GPTQ_BLOCK, group_size)  # a multiple of group_size (both powers of two): groups never straddle
    for start in range(0, stored, block):
        end = min(start + block, stored)
        errors = torch.zeros(w.shape[0], end - start, device=w.device)  # (N, block): scaled errors of the block
        for col in range(start, end):
            group = col // group_size
            if col % group_size == 0:
                scale[:, group], zero[:, group] = int4_group_params(w[:, col:col + group_size], weight.dtype)
            codes[:, col] = int4_codes(w[:, col], scale[:, group], zero[:, group])
            rounded = (codes[:, col] - zero[:, group]) * scale[:, group].float()
            error = (w[:, col] - rounded) / h_inv[col, col]
            w[:, col:end] -= error[:, None] * h_inv[col, col:end][None, :]
            errors[:, col - start] = error
        w[:, end:] -= errors @ h_inv[start:end, end:]
    return pack_int4(codes), scale, zero.to(torch.uint8)


class _StopForward(Exception):
    """Raised by a hook once the layer being calibrated has run: the rest of the forward is not needed."""


@torch.no_grad()
def gptq_quantize_layers(model: GPT, calibration_batches, group_size: int = 128, skip=()) -> None:
    """Replace the linears of every transformer block, in order, by GPTQ Int4Linears (except those in `skip`).

    Each block's input Hessians come from running `calibration_batches` (token ids (B, T) or (inputs, targets)
    pairs) through the model with the earlier blocks already quantized."""
    batches = [batch[0] if isinstance(batch, (tuple, list)) else batch for batch in calibration_batches]
    if not batches:
        raise ValueError("GPTQ needs calibration_batches (a few batches of the training corpus); got none")
    device = model.tok_emb.weight.device
    for i, layer in enumerate(model.layers):
        linears = {name: module for name, module in layer.named_modules()
                   if isinstance(module, nn.Linear) and not is_skipped(f"layers.{i}.{name}", skip)}
        hessians = {name: torch.zeros(m.in_features, m.in_features, device=device) for name, m in linears.items()}
        tokens = {name: 0 for name in linears}

        def accumulate(name):
            def hook(module, args):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # (tokens, in)
                hessians[name] += x.T @ x
                tokens[name] += x.shape[0]
            return hook

        def stop(module, args, output):
            raise _StopForward
        hooks = [m.register_forward_pre_hook(accumulate(name)) for name, m in linears.items()]
        hooks.append(layer.register_forward_hook(stop))
        for ids in batches:
            try:
                model(ids.to(device))
            except _StopForward:
                pass
        for hook in hooks:
            hook.remove()
        for name, module in linears.items():
            # A linear that saw no token (an MoE router's unused path) has no Hessian to follow: plain RTN.
            hessian = hessians[name] / tokens[name] if tokens[name] else None
            _set_module(layer, name, Int4Linear.from_linear(module, group_size, hessian))


# ----------------------------------------------------------------------------------------------------------
# NF4 and QLoRA's frozen base

def nf4_levels() -> torch.Tensor:
    """The 16 NormalFloat4 levels in [-1, 1], ascending: normal quantiles with 0 exactly representable.

    8 levels for the positive half and 7 for the negative (so that 0 is one of the 16): the quantiles at
    probabilities evenly spaced from 1/2 to 1 - delta, where delta = (1/32 + 1/30) / 2 keeps the outermost
    quantile finite (halfway between the choices for 16 and 15 levels), each half divided by the largest."""
    offset = 1 - (1 / 32 + 1 / 30) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values
    levels = torch.cat([negative, torch.zeros(1, dtype=torch.float64), positive]) / positive.max()
    return levels.sort().values.float()


def quantize_nf4(weight: torch.Tensor, double_quant: bool = True) -> dict[str, torch.Tensor]:
    """NF4 of weight (N, K) in blocks of NF4_BLOCK along K: {"weight_packed" (N, Kp / 2) uint8, and either
    "absmax" (N, Kp / 64) fp32, or with double_quant "absmax_int8", "absmax_scale", "absmax_mean"}."""
    blocks = padded_columns(weight, NF4_BLOCK).unflatten(-1, (-1, NF4_BLOCK))  # (N, Kp / 64, 64)
    absmax = blocks.abs().amax(-1)  # (N, Kp / 64)
    levels = nf4_levels().to(weight.device)
    normalized = blocks / torch.where(absmax > 0, absmax, 1.0)[..., None]
    codes = torch.bucketize(normalized, (levels[1:] + levels[:-1]) / 2)  # the nearest level's index
    tensors = {"weight_packed": pack_int4(codes.flatten(-2))}
    if not double_quant:
        return {**tensors, "absmax": absmax}
    mean = absmax.mean()
    centred = padded_columns(absmax.flatten() - mean, DOUBLE_QUANT_BLOCK).view(-1, DOUBLE_QUANT_BLOCK)
    absmax_int8, absmax_scale = quantize_rows(centred, torch.float32)  # int8 per block of 256 absmax values
    return {**tensors, "absmax_int8": absmax_int8.flatten()[:absmax.numel()].view(absmax.shape),
            "absmax_scale": absmax_scale, "absmax_mean": mean}


def dequantize_nf4(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fp32 (N, Kp) weight that quantize_nf4's tensors stand for."""
    codes = unpack_int4(tensors["weight_packed"]).long()  # (N, Kp)
    if "absmax" in tensors:
        absmax = tensors["absmax"].float()
    else:
        absmax_int8 = tensors["absmax_int8"]
        scales = tensors["absmax_scale"].float().repeat_interleave(DOUBLE_QUANT_BLOCK)[:absmax_int8.numel()]
        absmax = absmax_int8.float() * scales.view(absmax_int8.shape) + tensors["absmax_mean"].float()
    levels = nf4_levels().to(codes.device)
    return levels[codes] * absmax.repeat_interleave(NF4_BLOCK, dim=-1)


class _DequantizedLinear(torch.autograd.Function):
    """y = x W^T + b with W rebuilt from a frozen 4-bit module in the compute dtype, in the forward and again in
    the backward, instead of being saved: autograd would otherwise keep every layer's full weight until the
    backward. W gets no gradient (it is frozen); x does, so the adapters before and beside it train."""

    @staticmethod
    def forward(ctx, x, module):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        ctx.module, ctx.dtype, ctx.input_dtype = module, dtype, x.dtype
        bias = None if module.bias is None else module.bias.to(dtype)
        return F.linear(x.to(dtype), module.dequantize(dtype), bias)

    @staticmethod
    def backward(ctx, grad_output):
        weight = ctx.module.dequantize(ctx.dtype)  # (out, in)
        return (grad_output.to(ctx.dtype) @ weight).to(ctx.input_dtype), None


class NF4Linear(nn.Module):
    """A frozen NF4 stand-in for an nn.Linear (QLoRA's base): dequantized per call, in forward and backward.
    `dtype` is the dtype of the weight it stands for, what `dequantize` and `to_linear` return by default."""

    def __init__(self, in_features: int, out_features: int, double_quant: bool = True, bias: bool = False,
                 dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features, self.out_features, self.double_quant = in_features, out_features, double_quant
        self.dtype = dtype
        blocks = math.ceil(in_features / NF4_BLOCK)
        self.register_buffer("weight_packed", torch.zeros(out_features, blocks * NF4_BLOCK // 2, dtype=torch.uint8))
        if double_quant:
            self.register_buffer("absmax_int8", torch.zeros(out_features, blocks, dtype=torch.int8))
            self.register_buffer("absmax_scale", torch.zeros(math.ceil(out_features * blocks / DOUBLE_QUANT_BLOCK)))
            self.register_buffer("absmax_mean", torch.zeros(()))
        else:
            self.register_buffer("absmax", torch.zeros(out_features, blocks))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, double_quant: bool = True) -> "NF4Linear":
        """Quantize linear's weight to NF4 (its bias, if any, is kept as it is)."""
        module = cls(linear.in_features, linear.out_features, double_quant, linear.bias is not None,
                     linear.weight.dtype)
        module.to(linear.weight.device)
        for name, tensor in quantize_nf4(linear.weight, double_quant).items():
            setattr(module, name, tensor)
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The (out, in) weight in `dtype` (default: self.dtype)."""
        tensors = {name: buffer for name, buffer in self.named_buffers() if buffer is not None and name != "bias"}
        return dequantize_nf4(tensors)[:, :self.in_features].to(dtype or self.dtype)

    def to_linear(self) -> nn.Linear:
        """A frozen nn.Linear holding the dequantized weight (and the bias)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.weight_packed.device, dtype=self.dtype)
        linear.weight.data = self.dequantize()
        if self.bias is not None:
            linear.bias.data = self.bias.to(self.dtype)
        return linear.requires_grad_(False)

    def forward(self, x):
        return _DequantizedLinear.apply(x, self)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, double_quant={self.double_quant}"


def quantize_base_nf4(model: GPT, double_quant: bool = True) -> int:
    """QLoRA's base: every linear inside the transformer blocks becomes a frozen NF4Linear, in place; the
    embedding, LM head, norms, MoE router and experts stay as they are. Returns how many were replaced."""
    replaced = 0
    for layer in model.layers:
        for name, module in list(layer.named_modules()):
            if isinstance(module, nn.Linear) and not name.endswith("router"):
                _set_module(layer, name, NF4Linear.from_linear(module, double_quant))
                replaced += 1
    return replaced

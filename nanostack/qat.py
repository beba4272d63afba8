"""Quantization-aware training (QAT): train through the quantizer, so that the quantized model is the trained one.

Post-training quantization (PTQ) rounds a finished model once. QAT runs the training forward with every
weight replaced by quantize-then-dequantize ("fake quantization"), and for W8A8 every linear's input too, so
the loss sees the rounding and the float weights settle where rounding costs least. Rounding has a zero
gradient almost everywhere, so the backward uses the straight-through estimator (Bengio et al. 2013):
d fake(w) / dw = 1, written as w + (fake(w) - w).detach(). The quantizers here scale to each row's or group's
own range, so nothing is ever clipped and the identity is exact everywhere; a quantizer with a fixed range
would pass no gradient to the values it clips.

The fake quantizers are the PTQ quantizers themselves (quant.quantize_weight, quant.quantize_rows,
kernels.int8_matmul.quantize_per_row, quant4.quantize_int4), applied to the modules quant.quantization_targets
names, the same list quantize_model replaces: w8a8 fakes int8 weights per output channel and int8 activations
per token on every linear of the blocks, the int8 embedding table per row, and the LM head weight-only; int4
fakes RTN int4 weights in the blocks with the same int8 embedding and head. After training,
`quant.quantize_model(model, mode)` (no SmoothQuant, RTN for int4) gives the model that was trained, logits
equal up to float rounding.

Weights go through torch's parametrizations: while QAT is on, `module.weight` returns the fake-quantized
weight (a tied LM head reading `tok_emb.weight` included) and the float weight is stored as
`...parametrizations.weight.original`; activations go through a forward pre-hook. `remove_qat` takes both
off, leaving plain modules holding the trained float weights.
"""
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from kernels.int8_matmul import quantize_per_row
from nanostack import quant, quant4
from nanostack.model import GPT

MODES = ("w8a8", "int4")


def straight_through(x: torch.Tensor, fake: torch.Tensor) -> torch.Tensor:
    """fake in the forward, the identity in the backward."""
    return x + (fake - x).detach()


def fake_quantize_weight(weight: torch.Tensor, kind: str, group_size: int = 128) -> torch.Tensor:
    """What PTQ makes of `weight` for a module of this kind (quant.quantization_targets), as a float tensor."""
    if kind == "embedding":
        return quant.dequantize(*quant.quantize_rows(weight, weight.dtype)).to(weight.dtype)
    if kind == "int4":
        return quant4.fake_quantize_int4(weight, group_size)
    return quant.dequantize(*quant.quantize_weight(weight)).to(weight.dtype)


def fake_quantize_activation(x: torch.Tensor) -> torch.Tensor:
    """W8A8's dynamic per-token int8 of x (..., in), dequantized, with a straight-through gradient."""
    x_int8, scale = quantize_per_row(x.reshape(-1, x.shape[-1]))  # (tokens, in), (tokens,)
    return straight_through(x, quant.dequantize(x_int8, scale).view_as(x).to(x.dtype))


class FakeQuantizedWeight(nn.Module):
    """A parametrization: the weight as PTQ would store it, with a straight-through gradient."""

    def __init__(self, kind: str, group_size: int):
        super().__init__()
        self.kind, self.group_size = kind, group_size

    def forward(self, weight):
        return straight_through(weight, fake_quantize_weight(weight, self.kind, self.group_size))


def _quantize_input(module, args):
    return (fake_quantize_activation(args[0]), *args[1:])


def apply_qat(model: GPT, mode: str, group_size: int = 128, skip=quant.DEFAULT_SKIP) -> GPT:
    """Turn on fake quantization for `mode` ("w8a8" or "int4") on the modules PTQ would quantize, in place."""
    if mode not in MODES:
        raise ValueError(f"QAT mode {mode!r}; expected one of {MODES}")
    if model.config.n_expert:
        raise ValueError(f"QAT covers dense models; this one has n_expert={model.config.n_expert} MoE experts, "
                         "whose hidden activations no hook can reach: quantize it after training instead")
    if getattr(model, "qat", None):
        raise ValueError(f"QAT is already on ({model.qat}); remove_qat first")
    if mode == "int4":
        quant4.check_group_size(group_size)
    hooks = []
    for _, module, kind in quant.quantization_targets(model, mode, quant.check_skip(model, skip)):
        parametrize.register_parametrization(module, "weight", FakeQuantizedWeight(kind, group_size))
        if kind == "w8a8":
            hooks.append(module.register_forward_pre_hook(_quantize_input))
    model.qat = {"mode": mode, "group_size": group_size, "skip": list(skip), "hooks": hooks}
    return model


def remove_qat(model: GPT) -> dict:
    """Take fake quantization off, leaving plain modules with the trained float weights under their usual names;
    returns the settings it trained under ({"mode", "group_size", "skip"}), for quantize_trained."""
    settings, model.qat = model.qat, None
    for hook in settings.pop("hooks"):
        hook.remove()
    for module in model.modules():
        if parametrize.is_parametrized(module, "weight"):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
    return settings


def quantize_trained(model: GPT, settings: dict) -> GPT:
    """Quantize a model trained with QAT (after remove_qat) with the settings it trained under: the same model."""
    return quant.quantize_model(model, settings["mode"], skip=tuple(settings["skip"]),
                                group_size=settings["group_size"])

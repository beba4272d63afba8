"""SmoothQuant (Xiao et al. 2022): make W8A8 activations easy to quantize by moving their outliers into the weights.

W8A8 quantizes activations per token (nanostack/quant.py), and LLM activations have a few channels that are
10-100x larger than the rest in every token: the token's scale is set by the outlier and every ordinary
channel rounds to a handful of levels. SmoothQuant moves that difficulty from activations to weights, where
it is harmless. For a linear y = X W^T and any positive per-input-channel vector s, y = (X / s)(W * s)^T
exactly. Choosing

    s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha)

shrinks outlier channels of X and grows the matching columns of W; alpha = 0.5 balances the two ranges.
max|X_j| is measured on a few calibration batches with forward hooks. The division X / s is free when it
can be folded into whatever produced X:

    q/k/v     read attn_norm's output: divide the RMSNorm weight by s (one s shared by wq, wk, wv)
    gate/up   read mlp_norm's output: the same (the MoE router and every expert read it too)
    wo        reads softmax-weighted sums of v's rows, so scaling v's output channels passes straight
              through attention: divide wv's rows by s. With grouped-query attention the query heads of
              one group read the same v channels, so s is shared across the group.
    w_down    (dense MLP) reads silu(gate) * up, linear in up: divide w_up's rows by s. MoE experts are
              not smoothed here: their hidden activations are only seen inside the expert loop.

So every smoothed linear is folded into weights and no extra multiply runs at inference. Dividing rows of
wv or w_up by s does not change their own int8 error: their per-output-channel scales absorb it.
"""
import torch
import torch.nn as nn

from nanostack.model import GPT, MLP

# Floor for max|X_j| and max|W_:,j| in the SmoothQuant formula: a channel that is never active gets a finite s.
SMOOTH_EPS = 1e-5


def _absmax_per_channel(x: torch.Tensor) -> torch.Tensor:
    """max |x| over every dim but the last, in at least fp32: (..., C) -> (C,)."""
    return x.detach().abs().reshape(-1, x.shape[-1]).amax(0).to(torch.promote_types(x.dtype, torch.float32))


@torch.no_grad()
def activation_absmax(model: GPT, batches) -> dict[str, torch.Tensor]:
    """Per-channel max |activation| over `batches` (token ids (B, T), or (inputs, targets) pairs) at every
    smoothable input: "layers.{i}.attn_norm" / ".mlp_norm" outputs, ".attn.wo" inputs, and for dense MLPs
    ".mlp.w_down" inputs (the SwiGLU hidden)."""
    stats: dict[str, torch.Tensor] = {}

    def record(name, x):
        absmax = _absmax_per_channel(x)
        stats[name] = torch.maximum(stats[name], absmax) if name in stats else absmax

    hooks = []
    for i, layer in enumerate(model.layers):
        prefix = f"layers.{i}"
        hooks += [
            layer.attn_norm.register_forward_hook(lambda m, inp, out, p=prefix: record(f"{p}.attn_norm", out)),
            layer.attn.wo.register_forward_pre_hook(lambda m, inp, p=prefix: record(f"{p}.attn.wo", inp[0])),
            layer.mlp_norm.register_forward_hook(lambda m, inp, out, p=prefix: record(f"{p}.mlp_norm", out)),
        ]
        if isinstance(layer.mlp, MLP):
            hooks.append(layer.mlp.w_down.register_forward_pre_hook(
                lambda m, inp, p=prefix: record(f"{p}.mlp.w_down", inp[0])))
    try:
        for batch in batches:
            inputs = batch[0] if isinstance(batch, (tuple, list)) else batch
            model(inputs.to(model.tok_emb.weight.device))
    finally:
        for hook in hooks:
            hook.remove()
    if not stats:
        raise ValueError("calibration_batches is empty: SmoothQuant needs at least one batch of token ids")
    return stats


def smoothing_scales(act_absmax: torch.Tensor, weight_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha), both maxima floored at SMOOTH_EPS."""
    return act_absmax.clamp(min=SMOOTH_EPS).pow(alpha) / weight_absmax.clamp(min=SMOOTH_EPS).pow(1 - alpha)


def _input_absmax(weights: list[torch.Tensor]) -> torch.Tensor:
    """max |W_:,j| per input channel j over several (..., out, in) weights that read the same input."""
    return torch.stack([_absmax_per_channel(w) for w in weights]).amax(0)


def _fold_into_norm(norm: nn.Module, readers: list[torch.Tensor], act_absmax: torch.Tensor, alpha: float) -> None:
    """X / s folded into the RMSNorm weight, W * s into the columns of every weight that reads its output."""
    s = smoothing_scales(act_absmax, _input_absmax(readers), alpha)  # (n_embd,)
    norm.weight.div_(s.to(norm.weight.dtype))
    for weight in readers:
        weight.mul_(s.to(weight.dtype))


@torch.no_grad()
def smooth_model(model: GPT, calibration_batches, alpha: float) -> dict[str, torch.Tensor]:
    """Fold SmoothQuant scales into the weights in place (the model's function is unchanged up to rounding);
    returns the activation maxima it calibrated on. See the module docstring for where each s goes."""
    if not 0 < alpha <= 1:
        raise ValueError(f"smooth_alpha={alpha}; expected a migration strength in (0, 1], e.g. 0.5")
    act = activation_absmax(model, calibration_batches)
    config = model.config
    group = config.n_head // config.n_kv_head
    for i, layer in enumerate(model.layers):
        attn, mlp, prefix = layer.attn, layer.mlp, f"layers.{i}"
        # Row folds first: they change wv's and w_up's columns, which the norm folds below then measure.
        # wo's input channel (head h, dim d) is a mix of v channel (h // group, d): one s per kv channel.
        kv_shape = (config.n_kv_head, group, config.head_dim)
        wo_act = act[f"{prefix}.attn.wo"].view(kv_shape).amax(1)  # (n_kv_head, head_dim)
        wo_weight = _input_absmax([attn.wo.weight]).view(kv_shape).amax(1)
        s = smoothing_scales(wo_act, wo_weight, alpha)  # (n_kv_head, head_dim)
        attn.wv.weight.div_(s.reshape(-1, 1).to(attn.wv.weight.dtype))
        if attn.wv.bias is not None:  # (Qwen2) v's bias is part of v's output channels
            attn.wv.bias.div_(s.reshape(-1).to(attn.wv.bias.dtype))
        attn.wo.weight.mul_(s[:, None, :].expand(kv_shape).reshape(-1).to(attn.wo.weight.dtype))
        if isinstance(mlp, MLP):
            s = smoothing_scales(act[f"{prefix}.mlp.w_down"], _input_absmax([mlp.w_down.weight]), alpha)  # (hidden,)
            mlp.w_up.weight.div_(s[:, None].to(mlp.w_up.weight.dtype))
            mlp.w_down.weight.mul_(s.to(mlp.w_down.weight.dtype))

        _fold_into_norm(layer.attn_norm, [attn.wq.weight, attn.wk.weight, attn.wv.weight],
                        act[f"{prefix}.attn_norm"], alpha)
        if isinstance(mlp, MLP):
            mlp_readers = [mlp.w_gate.weight, mlp.w_up.weight]
        else:
            mlp_readers = [mlp.router.weight, mlp.experts.w_gate, mlp.experts.w_up]
        _fold_into_norm(layer.mlp_norm, mlp_readers, act[f"{prefix}.mlp_norm"], alpha)
    return act

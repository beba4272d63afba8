"""Rotary position embeddings (Su et al. 2021): each pair of dimensions (i, i + head_dim/2) of q and k is rotated
by an angle proportional to the token's position, so q.k depends only on how far apart the two tokens are.

The rotation speeds can be rescaled to stretch a model past the context it was pretrained on ("rope_scaling",
named and parameterised as Hugging Face configs name them): "linear" position interpolation, Llama 3.1's "llama3"
blend, and YaRN. The scaled speeds are computed once, in float64, into cos/sin tables that the model gathers by
position (model.py).
"""
import math

import torch


# rope_type -> (the keys its rope_scaling dict needs, the optional ones with defaults), named as Hugging Face does.
ROPE_SCALINGS = {
    "linear": (("factor",), {}),
    "llama3": (("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"), {}),
    "yarn": (("factor", "original_max_position_embeddings"),
             {"beta_fast": 32.0, "beta_slow": 1.0, "attention_factor": None, "truncate": True}),
}


def rope_frequencies(head_dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """The (head_dim / 2,) float64 rotation speeds of RoPE, scaled as `scaling` says, and the factor YaRN puts on
    cos/sin (1 otherwise). Raises a ValueError naming what is wrong with `scaling`."""
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    if scaling is None:
        return inv_freq, 1.0
    kind = scaling.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"rope_scaling rope_type {kind!r} is not supported; expected one of {sorted(ROPE_SCALINGS)}")
    required, optional = ROPE_SCALINGS[kind]
    if any(scaling.get(key) is None for key in required) or set(scaling) - {"rope_type", *required, *optional}:
        raise ValueError(f"rope_scaling {scaling}: rope_type {kind!r} needs {list(required)} and may have "
                         f"{list(optional)}, nothing else")
    settings = {**optional, **{key: value for key, value in scaling.items() if value is not None}}
    factor = settings["factor"]
    if kind == "linear":  # position interpolation (Chen et al. 2023): every position divided by factor
        return inv_freq / factor, 1.0
    original = settings["original_max_position_embeddings"]  # the context the model was pretrained on
    if kind == "llama3":
        # Llama 3.1: rotations slower than `low_freq_factor` turns over the original context are interpolated by
        # factor, faster than `high_freq_factor` turns kept as they are, and a linear blend in between.
        low, high = settings["low_freq_factor"], settings["high_freq_factor"]
        keep = ((original * inv_freq / (2 * math.pi) - low) / (high - low)).clamp(0, 1)
        return keep * inv_freq + (1 - keep) * inv_freq / factor, 1.0
    # YaRN (Peng et al. 2023): the same blend, by dimension: dims turning more than beta_fast times over the
    # original context are kept, fewer than beta_slow interpolated; cos/sin grow by the attention factor.
    def dim_turning(turns):
        return head_dim * math.log(original / (turns * 2 * math.pi)) / (2 * math.log(theta))
    low, high = dim_turning(settings["beta_fast"]), dim_turning(settings["beta_slow"])
    if settings["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    interpolate = ((torch.arange(head_dim // 2, dtype=torch.float64) - low) / ((high - low) or 1e-3)).clamp(0, 1)
    attention_factor = settings["attention_factor"] or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return (1 - interpolate) * inv_freq + interpolate * inv_freq / factor, attention_factor


def rope_cos_sin(head_dim: int, max_seq_len: int, theta: float, dtype=torch.float32, device=None,
                 scaling: dict | None = None):
    """cos/sin tables, each (max_seq_len, head_dim), for positions 0..max_seq_len-1 in rotate_half layout."""
    # Built in float64 so the angles at large positions are exact before rounding to `dtype`.
    inv_freq, scale = rope_frequencies(head_dim, theta, scaling)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), inv_freq)  # (max_seq_len, head_dim / 2)
    cos, sin = (scale * angles.cos()).to(dtype), (scale * angles.sin()).to(dtype)
    # (max_seq_len, head_dim): dims i and i + hd/2 share an angle
    return torch.cat((cos, cos), dim=-1).to(device), torch.cat((sin, sin), dim=-1).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (i, i + hd/2) of x (..., n_heads, hd) by the angles in cos/sin (..., hd) at its positions."""
    cos, sin = cos.unsqueeze(-2).to(x.dtype), sin.unsqueeze(-2).to(x.dtype)  # broadcast over heads
    first, second = x.chunk(2, dim=-1)
    rotated_half = torch.cat((-second, first), dim=-1)
    return x * cos + rotated_half * sin

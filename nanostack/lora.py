"""LoRA: fine-tune a few low-rank matrices beside each frozen weight instead of the weights themselves.

A linear layer y = x W^T (W is out x in) becomes

    y = x W^T + (alpha / rank) * dropout(x) A^T B^T        A: rank x in, B: out x rank, rank << in, out

W is frozen; only A and B train, so the optimizer state and the saved adapter are tiny (Hu et al. 2021).
B starts at zero, so the adapted model is exactly the base model at step 0; A starts random so that B's
gradient is not zero. alpha / rank scales the update so that changing the rank needs no new learning rate.
For serving, `merge_lora` folds the update into the weight, W' = W + (alpha / rank) B A, and the model is
a plain GPT again: no extra latency and no LoRA code in the server.

The adapted layer keeps the frozen base weight under its original name (`...attn.wq.weight`) and adds
`...attn.wq.lora_a` / `lora_b`, so a LoRA model's state dict is the base's plus the adapter, and
`lora_state_dict` is what an adapter file holds. The dense MLP calls its Linear modules, so its
projections can be targets too; the MoE experts' stacked weights cannot.

In a training run (finetune.py) the loop's checkpoints hold this unmerged state dict plus the adapters'
optimizer moments, which is what an exact resume needs; the merged model is written beside them for serving.

QLoRA (Dettmers et al. 2023): the frozen base may be a 4-bit quant4.NF4Linear instead of an nn.Linear. It is
kept as the `base` submodule and dequantized on each call; merging dequantizes it first (`dequantize_bases`, which
also turns the base's unadapted NF4 layers back into nn.Linear), so the merged model is a plain full-precision one.
"""
import json
import math
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from nanostack import checkpoint
from nanostack.atomic import atomic_dir
from nanostack.quant import _set_module
from nanostack.quant4 import NF4Linear

ATTENTION_PROJECTIONS = ("wq", "wk", "wv", "wo")
MLP_PROJECTIONS = ("w_gate", "w_up", "w_down")
# lm_head is never in a preset: adapt it when fine-tuning teaches tokens that pretraining never predicted
# (the chat template's <|end|>), whose output rows a frozen head cannot raise.
KNOWN_TARGETS = ATTENTION_PROJECTIONS + MLP_PROJECTIONS + ("lm_head",)
TARGET_PRESETS = {"qv": ("wq", "wv"), "attn": ATTENTION_PROJECTIONS, "all": ATTENTION_PROJECTIONS + MLP_PROJECTIONS}
ADAPTER_FORMAT = "nanostack-lora-adapter"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter.json"


class LoRALinear(nn.Module):
    """A frozen nn.Linear weight (or frozen NF4Linear, QLoRA) plus a trainable low-rank update (alpha / rank) * B A."""

    def __init__(self, base: nn.Linear | NF4Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout_p = rank, alpha, dropout
        self.scale = alpha / rank
        if isinstance(base, NF4Linear):
            self.base, self.bias = base, None  # QLoRA: dequantized on each call (bias included), never kept whole
            device, dtype = base.weight_packed.device, base.dtype
        else:
            self.base = None
            self.weight, self.bias = base.weight, base.bias  # the same Parameters: state-dict keys stay `weight`, `bias`
            self.requires_grad_(False)
            device, dtype = base.weight.device, base.weight.dtype
        # Kaiming-uniform A, as nn.Linear initialises its weight, gives the update a sensible scale once B moves.
        self.lora_a = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))
        self.lora_b = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        update = F.linear(F.linear(self.dropout(x), self.lora_a), self.lora_b)  # (..., out) through (..., rank)
        frozen = F.linear(x, self.weight, self.bias) if self.base is None else self.base(x)
        return frozen + self.scale * update

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.rank}, alpha={self.alpha}"


def parse_targets(targets) -> tuple[str, ...]:
    """Presets ("qv", "attn", "all") and names ("wq", ..., "lm_head"), comma-separated or as a sequence ->
    the projection names, in model order."""
    if isinstance(targets, str):
        targets = [t.strip() for t in targets.split(",") if t.strip()]
    names = [name for t in targets for name in TARGET_PRESETS.get(t, (t,))]
    unknown = [t for t in names if t not in KNOWN_TARGETS]
    if unknown or not names:
        raise ValueError(f"LoRA targets {list(targets)}: expected presets {sorted(TARGET_PRESETS)} or names from "
                         f"{list(KNOWN_TARGETS)}")
    return tuple(sorted(set(names), key=KNOWN_TARGETS.index))


def apply_lora(model: nn.Module, targets="qv", rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> int:
    """Freeze `model` and put a LoRA adapter on each target projection of every layer; returns the number
    of trainable parameters (the adapters')."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
    targets = parse_targets(targets)
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA adapters; merge_lora() them first")
    model.requires_grad_(False)
    wrapped = 0
    for layer in model.layers:
        for parent in (layer.attn, layer.mlp):
            for name in targets:
                base = getattr(parent, name, None)
                if isinstance(base, (nn.Linear, NF4Linear)):
                    setattr(parent, name, LoRALinear(base, rank, alpha, dropout))
                    wrapped += 1
    if "lm_head" in targets:
        if not isinstance(getattr(model, "lm_head", None), nn.Linear):
            raise ValueError("LoRA target lm_head: this model ties its output head to the embedding; drop lm_head")
        model.lm_head = LoRALinear(model.lm_head, rank, alpha, dropout)
        wrapped += 1
    if not wrapped:
        raise ValueError(f"no linear layer named {list(targets)} in the model (a Mixture-of-Experts MLP has "
                         f"stacked expert weights, not linears: target the attention projections)")
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear in the model, by qualified name."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_config(model: nn.Module) -> dict:
    """{"rank", "alpha", "dropout", "targets"} of the adapters in the model (read from the modules)."""
    modules = lora_modules(model)
    if not modules:
        raise ValueError("the model has no LoRA adapters (apply_lora first)")
    first = next(iter(modules.values()))
    return {"rank": first.rank, "alpha": first.alpha, "dropout": first.dropout_p,
            "targets": list(parse_targets(sorted({name.rsplit(".", 1)[-1] for name in modules})))}


def merge_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A LoRA model's state dict as a plain one: each `X.weight` becomes W + scale * B A, adapters dropped.

    Works on a gathered full state dict too (distributed.full_model_state), so sharded runs merge the same way.
    """
    merged = {name: tensor for name, tensor in state.items() if not name.endswith((".lora_a", ".lora_b"))}
    for name in state:
        if name.endswith(".lora_a"):
            prefix = name[:-len(".lora_a")]
            lora_a, lora_b = state[name], state[prefix + ".lora_b"]
            merged[prefix + ".weight"] = state[prefix + ".weight"] + scale * (lora_b @ lora_a)
    return merged


@torch.no_grad()
def dequantize_bases(model: nn.Module) -> None:
    """QLoRA's 4-bit base back in full precision, in place: every adapter's NF4 base becomes its plain frozen
    `weight`, every other NF4Linear an nn.Linear."""
    for module in lora_modules(model).values():
        if module.base is not None:
            linear = module.base.to_linear()
            module.weight, module.bias, module.base = linear.weight, linear.bias, None
    for name, module in list(model.named_modules()):
        if isinstance(module, NF4Linear):
            _set_module(model, name, module.to_linear())


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (W += (alpha / rank) B A; a 4-bit base is dequantized first), remove the
    adapters, unfreeze the model."""
    modules = lora_modules(model)
    if not modules:
        return model
    dequantize_bases(model)
    settings = lora_config(model)
    merged = merge_state_dict(model.state_dict(), settings["alpha"] / settings["rank"])
    for name, module in modules.items():
        parent_name, _, child = name.rpartition(".")  # "" for lm_head: the model itself
        setattr(model.get_submodule(parent_name), child,
                nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                          device=module.weight.device, dtype=module.weight.dtype))
    model.load_state_dict(merged)
    model.requires_grad_(True)
    return model


def adapter_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Only the adapter entries (`...lora_a`, `...lora_b`) of a state dict, detached and on CPU."""
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()
            if name.endswith((".lora_a", ".lora_b"))}


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's adapter tensors: all that an adapter file holds."""
    return adapter_tensors(model.state_dict())


def checkpoint_identity(path) -> dict:
    """What identifies a base checkpoint: its directory and the sha256 of its weights (checkpoint.weights_sha256)."""
    return {"checkpoint": str(checkpoint.resolve_checkpoint(path)), "model_sha256": checkpoint.weights_sha256(path)}


def save_adapter(directory, tensors: dict[str, torch.Tensor], settings: dict, base: dict | None = None) -> Path:
    """Write an adapter alone: adapter.safetensors (the lora_a/lora_b tensors) and adapter.json
    ({rank, alpha, dropout, targets} from lora_config, and `base`, the checkpoint_identity it was trained on)."""
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        save_file(adapter_tensors(tensors), tmp / ADAPTER_WEIGHTS)
        meta = {"format": ADAPTER_FORMAT, **settings, "base": base}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return directory


def read_adapter_config(directory) -> dict:
    """adapter.json of an adapter directory, checked to be one."""
    path = Path(directory) / ADAPTER_CONFIG
    if not path.exists():
        raise ValueError(f"no {ADAPTER_CONFIG} in {directory}: not a LoRA adapter directory")
    meta = json.loads(path.read_text())
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{path} has format {meta.get('format')!r}, expected {ADAPTER_FORMAT!r}")
    return meta


def load_adapter(model: nn.Module, directory, base: dict | None = None) -> dict:
    """Put the saved adapter on `model` (applying LoRA with its settings if needed); returns adapter.json.

    With `base`, the adapter must have been trained on that checkpoint (compared on its model sha256).
    """
    meta = read_adapter_config(directory)
    saved_base = meta.get("base") or {}
    if base is not None and saved_base.get("model_sha256") != base.get("model_sha256"):
        raise ValueError(f"adapter in {directory} was trained on {saved_base.get('checkpoint')!r} "
                         f"(model sha256 {saved_base.get('model_sha256')}), not on {base.get('checkpoint')!r} "
                         f"(sha256 {base.get('model_sha256')})")
    if not lora_modules(model):
        apply_lora(model, meta["targets"], meta["rank"], meta["alpha"], meta["dropout"])
    elif lora_config(model) != {k: meta[k] for k in ("rank", "alpha", "dropout", "targets")}:
        raise ValueError(f"the model's adapters {lora_config(model)} differ from the saved ones in {directory}")
    tensors = load_file(Path(directory) / ADAPTER_WEIGHTS)
    expected = lora_state_dict(model)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"adapter in {directory} does not fit the model: missing {missing[:4]}, extra {extra[:4]}")
    model.load_state_dict(tensors, strict=False)
    return meta

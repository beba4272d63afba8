"""Hugging Face interop: model directories of the Hub in (every tool loads them) and out (`transformers` loads them).

A Hugging Face model directory is a config.json with a `model_type`, the weights in one or more .safetensors
files (sharded ones listed by model.safetensors.index.json) and the tokenizer files. These families map onto
nanostack's one model (model.py) field by field, with no weight permuted:

    llama      the base layout: GQA, SwiGLU, RMSNorm, RoPE (scaled: "llama3" for Llama 3.1/3.2, "linear", "yarn")
    mistral    + a sliding attention window (Mistral 7B v0.1; null in later ones)
    qwen2      + biases on q/k/v (Qwen2, Qwen2.5)
    qwen3      + an RMSNorm over each head of q and k, a head_dim of its own
    mixtral    a Mixture-of-Experts MLP: softmax router, top-k experts, gates renormalised
    qwen3_moe  Qwen3 attention + MoE whose gates are renormalised only when norm_topk_prob says so

Anything else in a config (another model_type, an o_proj bias, dynamic RoPE, layers of mixed attention kinds,
a pre-quantized checkpoint) is refused with an error naming the file and the field, never approximated.

Loading is lazy and lean: the model is built on the meta device (no memory, no initialisation), materialised in
the target dtype on the target device, and each tensor is read from its shard straight into its parameter with
`readinto` (a temporary of one tensor only when the dtype differs). safetensors' own `safe_open` maps the file,
and the mapped pages count in the process's resident memory until it closes: a single-shard model would peak at
twice its size. Reading the format's JSON header ourselves (8 bytes of length, then the JSON) keeps the peak at
the model plus one tensor. Every name, shape and dtype is checked before the first byte of weights is read.
Pickled `.bin` / `.pt` weights are never opened.

`export_hf` writes any nanostack checkpoint in the layout its fields call for (a Qwen3 config is exported as
qwen3, a sliding window as mistral, ...), and `export_peft_adapter` a LoRA adapter in PEFT's layout.
"""
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from nanostack.atomic import atomic_dir
from nanostack.checkpoint import CheckpointError, load_checkpoint, read_json, unique_tensors
from nanostack.lora import ADAPTER_WEIGHTS, read_adapter_config
from nanostack.model import GPT, ModelConfig

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "mixtral", "qwen3_moe")
INDEX = "model.safetensors.index.json"
SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# RoPE base when a config leaves it out: each family's default in transformers.
DEFAULT_ROPE_THETA = {"mixtral": 1e6}
# nanostack config field <- Hugging Face key, for the keys every family shares.
SHARED_FIELDS = {"vocab_size": "vocab_size", "n_embd": "hidden_size", "n_layer": "num_hidden_layers",
                 "n_head": "num_attention_heads", "norm_eps": "rms_norm_eps"}
# Where each MoE family keeps its experts, and its names for the three SwiGLU matrices of one expert.
EXPERT_LAYOUTS = {"mixtral": ("block_sparse_moe", {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}),
                  "qwen3_moe": ("mlp", {"w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj"})}
PROJECTIONS = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj",
               "w_gate": "gate_proj", "w_up": "up_proj", "w_down": "down_proj", "lm_head": "lm_head"}


def is_hf_config(raw: dict) -> bool:
    """Whether a parsed config.json is a Hugging Face model's (a model_type) rather than a nanostack checkpoint's."""
    return "model_type" in raw and "format" not in raw


# ----------------------------------------------------------------------------------------------------------
# Configs

def _refuse(path, field, value, why: str):
    raise CheckpointError(f"{path}: {field}={value!r} is not supported: {why}")


def _rope_settings(hf: dict, path) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from transformers 5's `rope_parameters` or 4's `rope_theta` + `rope_scaling`."""
    field = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    rope = dict(hf.get(field) or {})
    theta = rope.pop("rope_theta", None) or hf.get("rope_theta") or DEFAULT_ROPE_THETA.get(hf["model_type"], 1e4)
    kind = rope.pop("rope_type", None) or rope.get("type") or "default"
    rope.pop("type", None)
    partial = rope.pop("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        _refuse(path, "partial_rotary_factor", partial, "nanostack rotates every dimension of a head")
    if kind == "default":
        return theta, None
    if kind in ("llama3", "yarn"):  # transformers' defaults for what a config may leave out
        rope.setdefault("original_max_position_embeddings", hf.get("max_position_embeddings"))
    if kind == "yarn" and rope.get("factor") is None:
        rope["factor"] = hf["max_position_embeddings"] / rope["original_max_position_embeddings"]
    return theta, {"rope_type": kind, **rope}


def _sliding_window(hf: dict, n_layer: int, path) -> int:
    """The one attention window of every layer (0 = full attention); refuse configs that mix the two kinds."""
    window = hf.get("sliding_window") or 0
    if hf["model_type"] in ("qwen2", "qwen3", "qwen3_moe") and not hf.get("use_sliding_window"):
        window = 0  # Qwen configs carry a sliding_window that only use_sliding_window turns on
    layer_types = hf.get("layer_types")
    if layer_types is None and window and hf["model_type"] in ("qwen2", "qwen3"):
        first_sliding = hf.get("max_window_layers", 28)  # Qwen2/3: layers from max_window_layers on slide
        layer_types = ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(n_layer)]
    expected = "sliding_attention" if window else "full_attention"
    if layer_types is not None and set(layer_types) != {expected}:
        _refuse(path, "layer_types", sorted(set(layer_types)), f"nanostack runs {expected} in every layer "
                f"(sliding_window={window or None})")
    return window


def config_from_hf(hf: dict, path) -> ModelConfig:
    """The ModelConfig of a Hugging Face config.json (parsed into `hf`, read from `path`), or a CheckpointError
    naming the file and the field that nanostack cannot run."""
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED:
        _refuse(path, "model_type", model_type, f"supported model types are {', '.join(SUPPORTED)}")
    required = [*SHARED_FIELDS.values(), "moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"]
    missing = [key for key in required if hf.get(key) is None]
    if missing:
        raise CheckpointError(f"{path}: {', '.join(missing)} missing; a {model_type} config.json needs {required}")
    checks = [("quantization_config", hf.get("quantization_config"), None, "a pre-quantized checkpoint; load its "
               "full-precision original (nanostack quantizes it: python -m nanostack.quant)"),
              ("hidden_act", hf.get("hidden_act", "silu"), "silu", "nanostack's MLP is SwiGLU"),
              ("mlp_bias", hf.get("mlp_bias", False), False, "nanostack's MLP has no biases"),
              ("router_jitter_noise", hf.get("router_jitter_noise") or 0, 0, "the router has no noise"),
              ("decoder_sparse_step", hf.get("decoder_sparse_step", 1), 1, "nanostack puts an MoE in every layer"),
              ("mlp_only_layers", hf.get("mlp_only_layers") or [], [], "nanostack puts an MoE in every layer")]
    if model_type != "qwen2":  # Qwen2 always has q/k/v biases; elsewhere attention_bias puts one on o_proj too
        checks.append(("attention_bias", hf.get("attention_bias", False), False, "nanostack's o_proj has no bias"))
    for field, value, expected, why in checks:
        if value != expected:
            _refuse(path, field, value, why)

    theta, scaling = _rope_settings(hf, path)
    moe = model_type in EXPERT_LAYOUTS
    fields = {ours: hf[theirs] for ours, theirs in SHARED_FIELDS.items()}
    try:
        return ModelConfig(
            **fields, n_kv_head=hf.get("num_key_value_heads") or hf["num_attention_heads"],
            head_dim=hf.get("head_dim") or 0, max_seq_len=hf.get("max_position_embeddings", 2048),
            mlp_hidden=hf["moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"],
            rope_theta=theta, rope_scaling=scaling, tie_embeddings=hf.get("tie_word_embeddings", False),
            qkv_bias=model_type == "qwen2", qk_norm=model_type in ("qwen3", "qwen3_moe"),
            sliding_window=_sliding_window(hf, hf["num_hidden_layers"], path),
            n_expert=(hf.get("num_local_experts") or hf.get("num_experts") or 0) if moe else 0,
            n_expert_active=hf.get("num_experts_per_tok", 2),
            moe_renormalize=hf.get("norm_topk_prob", False) if model_type == "qwen3_moe" else True,
            moe_aux_loss_coef=hf.get("router_aux_loss_coef", 0.01))
    except ValueError as error:  # the ModelConfig's own checks (rope_scaling, head counts)
        raise CheckpointError(f"{path}: {error}") from None


def hf_model_type(config: ModelConfig) -> str:
    """The Hugging Face family whose layout holds this config (see the module docstring), or a CheckpointError."""
    if config.n_expert:
        if config.qkv_bias:
            raise CheckpointError("no Hugging Face MoE family has q/k/v biases: this model cannot be exported")
        if config.qk_norm:
            return "qwen3_moe"
        if not config.moe_renormalize:
            raise CheckpointError("an MoE without qk_norm and with moe_renormalize=false has no Hugging Face layout")
        return "mixtral"
    if config.qk_norm and config.qkv_bias:
        raise CheckpointError("qk_norm with qkv_bias has no Hugging Face layout (Qwen3's attention_bias also puts a "
                              "bias on o_proj)")
    if config.qk_norm:
        return "qwen3"
    if config.qkv_bias:
        return "qwen2"
    return "mistral" if config.sliding_window else "llama"


def hf_config(config: ModelConfig) -> dict:
    """The Hugging Face config.json for a nanostack ModelConfig, in the family `hf_model_type` picks."""
    model_type = hf_model_type(config)
    architecture = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2", "qwen3": "Qwen3", "mixtral": "Mixtral",
                    "qwen3_moe": "Qwen3Moe"}[model_type] + "ForCausalLM"
    out = {theirs: getattr(config, ours) for ours, theirs in SHARED_FIELDS.items()}
    out.update(architectures=[architecture], model_type=model_type, num_key_value_heads=config.n_kv_head,
               head_dim=config.head_dim, max_position_embeddings=config.max_seq_len, rope_theta=config.rope_theta,
               rope_scaling=config.rope_scaling, tie_word_embeddings=config.tie_embeddings, hidden_act="silu",
               torch_dtype="float32")
    out["moe_intermediate_size" if model_type == "qwen3_moe" else "intermediate_size"] = config.mlp_hidden
    if model_type in ("llama", "qwen3", "qwen3_moe"):
        out["attention_bias"] = False
    if model_type == "llama":
        out["mlp_bias"] = False
    if model_type in ("mistral", "mixtral"):
        out["sliding_window"] = config.sliding_window or None
    elif config.sliding_window:  # Qwen: every layer slides (max_window_layers 0)
        out.update(use_sliding_window=True, sliding_window=config.sliding_window, max_window_layers=0,
                   layer_types=["sliding_attention"] * config.n_layer)
    if config.n_expert:
        out.update(num_local_experts=config.n_expert, num_experts_per_tok=config.n_expert_active,
                   router_aux_loss_coef=config.moe_aux_loss_coef)
    if model_type == "qwen3_moe":
        out.update(norm_topk_prob=config.moe_renormalize, decoder_sparse_step=1, mlp_only_layers=[])
    return out


def tensor_names(config: ModelConfig, model_type: str) -> dict[str, str | list[str]]:
    """nanostack parameter name -> Hugging Face tensor name, or the per-expert names stacked into it."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not config.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(config.n_layer):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        names[f"{ours}.attn_norm.weight"] = f"{theirs}.input_layernorm.weight"
        names[f"{ours}.mlp_norm.weight"] = f"{theirs}.post_attention_layernorm.weight"
        for a in ("wq", "wk", "wv", "wo"):
            names[f"{ours}.attn.{a}.weight"] = f"{theirs}.self_attn.{PROJECTIONS[a]}.weight"
            if config.qkv_bias and a != "wo":
                names[f"{ours}.attn.{a}.bias"] = f"{theirs}.self_attn.{PROJECTIONS[a]}.bias"
        if config.qk_norm:
            for a in ("q_norm", "k_norm"):
                names[f"{ours}.attn.{a}.weight"] = f"{theirs}.self_attn.{a}.weight"
        if config.n_expert:
            module, expert_names = EXPERT_LAYOUTS[model_type]
            names[f"{ours}.mlp.router.weight"] = f"{theirs}.{module}.gate.weight"
            for a, b in expert_names.items():
                names[f"{ours}.mlp.experts.{a}"] = [f"{theirs}.{module}.experts.{e}.{b}.weight"
                                                    for e in range(config.n_expert)]
        else:
            for a in ("w_gate", "w_up", "w_down"):
                names[f"{ours}.mlp.{a}.weight"] = f"{theirs}.mlp.{PROJECTIONS[a]}.weight"
    return names


# ----------------------------------------------------------------------------------------------------------
# Loading

def read_safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a .safetensors file (tensor name -> dtype, shape, data_offsets) and the byte offset
    where the tensor data starts: the file is an 8-byte little-endian header length, the header, the data."""
    try:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(length))
    except (OSError, ValueError) as error:
        raise CheckpointError(f"{path} is not a readable safetensors file ({error}): truncated or corrupted?") from None
    header.pop("__metadata__", None)
    return header, 8 + length


def weight_files(directory: Path) -> dict[str, Path]:
    """Hugging Face tensor name -> the file holding it, from model.safetensors.index.json or every *.safetensors."""
    index = directory / INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index} has no weight_map: not a safetensors index")
        for shard in sorted(set(weight_map.values())):
            if not (directory / shard).exists():
                tensor = next(name for name, file in weight_map.items() if file == shard)
                raise CheckpointError(f"{index} names the shard {shard} (holding {tensor}, ...), but "
                                      f"{directory / shard} is missing: download it again")
        return {name: directory / shard for name, shard in weight_map.items()}
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        pickled = sorted(p.name for pattern in ("*.bin", "*.pt", "*.pth") for p in directory.glob(pattern))
        raise CheckpointError(f"{directory} has no *.safetensors weights{f' (it has {pickled})' if pickled else ''}: "
                              "nanostack never unpickles weights; convert them to safetensors first (e.g. "
                              "transformers' from_pretrained(dir).save_pretrained(new_dir), in an environment "
                              "you trust with that pickle)")
    return {name: shard for shard in shards for name in read_safetensors_header(shard)[0]}


def _read_into(file, data_start: int, entry: dict, destination: torch.Tensor) -> None:
    """Read one tensor's bytes from an open safetensors file into `destination` (converted if dtype or device
    differ)."""
    begin, end = entry["data_offsets"]
    direct = (destination.dtype == SAFETENSORS_DTYPES[entry["dtype"]] and destination.device.type == "cpu"
              and destination.is_contiguous())
    buffer = destination if direct else torch.empty(entry["shape"], dtype=SAFETENSORS_DTYPES[entry["dtype"]])
    file.seek(data_start + begin)
    if file.readinto(buffer.detach().reshape(-1).view(torch.uint8).numpy()) != end - begin:
        raise CheckpointError(f"{file.name} ends inside its tensors: truncated")
    if not direct:
        destination.copy_(buffer)


def _shape_fields(config: ModelConfig) -> str:
    return (f"hidden_size={config.n_embd}, num_attention_heads={config.n_head}, num_key_value_heads="
            f"{config.n_kv_head}, head_dim={config.head_dim}, intermediate_size={config.mlp_hidden}, "
            f"vocab_size={config.vocab_size}, experts={config.n_expert}")


@torch.no_grad()
def import_hf(directory, device="cpu", dtype: torch.dtype = torch.float32) -> GPT:
    """A nanostack GPT holding a Hugging Face model directory's weights in `dtype` on `device`, read shard by
    shard straight into the parameters (see the module docstring). Raises a CheckpointError naming the file and
    the field or tensor for anything that does not fit, before reading any weights."""
    directory = Path(directory)
    config_path = directory / "config.json"
    hf = read_json(config_path)
    config = config_from_hf(hf, config_path)
    files = weight_files(directory)
    headers = {file: read_safetensors_header(file) for file in sorted(set(files.values()))}

    with torch.device("meta"):  # shapes only: nothing allocated, nothing initialised
        model = GPT(config).to(dtype)
    parameters, names = model.state_dict(), tensor_names(config, hf["model_type"])
    plan: dict[Path, list] = {file: [] for file in headers}  # file -> [(header entry, parameter name, expert)]
    for ours, theirs in names.items():
        for expert, name in enumerate(theirs) if isinstance(theirs, list) else [(None, theirs)]:
            where = files.get(name)
            if where is None:
                listing = INDEX if (directory / INDEX).exists() else ", ".join(sorted({f.name for f in headers}))
                raise CheckpointError(f"{directory}: {name} (nanostack's {ours}) is in none of the weight files "
                                      f"({listing}), yet {config_path} calls for it")
            entry = headers[where][0].get(name)
            if entry is None:
                raise CheckpointError(f"{where} has no tensor {name}, though {directory / INDEX} places it there")
            shape = parameters[ours].shape[1:] if expert is not None else parameters[ours].shape
            stored = SAFETENSORS_DTYPES.get(entry["dtype"])
            begin, end = entry["data_offsets"]
            if (tuple(entry["shape"]) != tuple(shape) or stored is None
                    or end - begin != shape.numel() * stored.itemsize):
                raise CheckpointError(f"{where}: {name} is {entry['dtype']} {entry['shape']}, but {config_path} "
                                      f"({_shape_fields(config)}) gives a float {list(shape)}")
            plan[where].append((entry, ours, expert))
    # Derived buffers some exports include, and a tied head that transformers ignores too.
    unused = sorted(set(files) - {name for theirs in names.values() for name in
                                  (theirs if isinstance(theirs, list) else [theirs])}
                    - ({"lm_head.weight"} if config.tie_embeddings else set()))
    unused = [name for name in unused if not name.endswith("rotary_emb.inv_freq")]
    if unused:
        raise CheckpointError(f"{directory}: tensors {unused[:4]} (of {len(unused)}) have no place in the "
                              f"{hf['model_type']} model that {config_path} describes")

    model.to_empty(device=device)
    model.reset_rope(dtype, device)
    parameters = model.state_dict()
    for where, items in plan.items():
        with open(where, "rb") as file:
            for entry, ours, expert in sorted(items, key=lambda item: item[0]["data_offsets"][0]):
                destination = parameters[ours] if expert is None else parameters[ours][expert]
                _read_into(file, headers[where][1], entry, destination)
    return model


# ----------------------------------------------------------------------------------------------------------
# Export

def export_hf(path, out_dir) -> Path:
    """Write a checkpoint as a Hugging Face model directory (config.json + model.safetensors) in the family its
    config calls for, which `transformers.AutoModelForCausalLM.from_pretrained(out_dir)` loads."""
    loaded = load_checkpoint(path)
    config = loaded["config"]
    model_type = hf_model_type(config)
    state = unique_tensors(loaded["model"].state_dict())
    hf_state = {}
    for ours, theirs in tensor_names(config, model_type).items():
        if isinstance(theirs, list):  # (n_expert, out, in) stack -> one tensor per expert
            hf_state.update({name: expert.clone() for name, expert in zip(theirs, state[ours].unbind(0))})
        else:
            hf_state[theirs] = state[ours]
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
        save_file(hf_state, tmp / "model.safetensors", metadata={"format": "pt"})
    return Path(out_dir)


def export_peft_adapter(adapter_dir, out_dir, base_model_name_or_path: str = "") -> Path:
    """Write a nanostack LoRA adapter (lora.save_adapter's directory) in PEFT's layout: adapter_config.json +
    adapter_model.safetensors, so `peft.PeftModel.from_pretrained(base, out_dir)` puts it on the exported base."""
    from safetensors.torch import load_file
    meta = read_adapter_config(adapter_dir)
    tensors = {}
    for name, tensor in load_file(Path(adapter_dir) / ADAPTER_WEIGHTS).items():
        # layers.3.attn.wq.lora_a -> base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight
        prefix, kind = name.rsplit(".", 1)
        module, _, projection = prefix.rpartition(".")
        module = module.replace(".attn", ".self_attn")
        path = f"model.{module}.{PROJECTIONS[projection]}" if module else PROJECTIONS[projection]
        tensors[f"base_model.model.{path}.lora_{kind[-1].upper()}.weight"] = tensor
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": meta["rank"], "lora_alpha": meta["alpha"],
              "lora_dropout": meta["dropout"], "target_modules": [PROJECTIONS[t] for t in meta["targets"]],
              "bias": "none", "fan_in_fan_out": False, "inference_mode": True,
              "base_model_name_or_path": base_model_name_or_path}
    with atomic_dir(out_dir) as tmp:
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, tmp / "adapter_model.safetensors", metadata={"format": "pt"})
    return Path(out_dir)

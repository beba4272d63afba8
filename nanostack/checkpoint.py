"""Checkpoints: safetensors + JSON, written atomically, verified on load, readable by every later stage.

A checkpoint directory is self-contained:

    config.json            {"format", "version", "model": ModelConfig fields, "tokenizer": "tokenizer.json", ...}
    model.safetensors      the weights (tied tensors stored once)
    tokenizer.json         the tokenizer the model was trained with
    trainer_state.json     (training only) step, data-loader position, RNG states, metrics
    optimizer.safetensors  (training only) optimizer moments; param groups in the safetensors metadata
    manifest.json          size and sha256 of every file above, written last

A training run directory holds `step_000100/`-style checkpoints, the newest `keep` of them, plus a `latest`
file naming the newest one; anywhere a checkpoint is expected, the run directory works too.

Nothing here unpickles: tensors go through safetensors, everything else through JSON, and the manifest
catches truncated or tampered files before anything is loaded. The Hugging Face interop at the bottom maps
the weights onto the Llama (dense) and Mixtral (MoE) layouts so models move in and out of that ecosystem.
"""
import base64
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanostack.atomic import atomic_dir, fsync_dir, write_json
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer

FORMAT = "nanostack-checkpoint"
VERSION = 1
MANIFEST = "manifest.json"


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete, tampered with or of the wrong kind."""


# ----------------------------------------------------------------------------------------------------------
# Tensors and RNG state <-> files

def unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict with tied tensors (e.g. embedding = LM head) kept once, contiguous, on CPU."""
    seen, out = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape)
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


def with_tied_aliases(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add back the names of tied tensors that `unique_tensors` stored once (e.g. lm_head = tok_emb)."""
    # Parameter identity, not data pointers: sharded (FSDP) parameters have no single storage to point at.
    owner = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    stored = {owner[name]: name for name in state if name in owner}
    aliases = {name: state[stored[pid]] for name, pid in owner.items() if name not in state and pid in stored}
    return {**state, **aliases}


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a saved state dict strictly, with a clear error when it does not fit the model."""
    try:
        model.load_state_dict(with_tied_aliases(model, state))
    except RuntimeError as e:
        raise CheckpointError(f"weights do not fit the model: {e}") from None


def optimizer_to_tensors(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a full optimizer state dict keyed by parameter name (`distributed.full_optimizer_state`) into flat
    tensors `state.<param name>.<key>` for safetensors and the JSON-able param groups."""
    tensors = {}
    for name, values in state["state"].items():
        for key, value in values.items():
            value = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{name}.{key}"] = value.detach().to("cpu").contiguous()
    return tensors, {"param_groups": state["param_groups"]}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Rebuild the state dict that `optimizer_to_tensors` split apart."""
    state: dict[str, dict] = {}
    for flat_name, value in tensors.items():
        name, key = flat_name.removeprefix("state.").rsplit(".", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_state() -> dict:
    """Every RNG the training loop draws from, JSON-able."""
    def encode(t):
        return base64.b64encode(t.numpy().tobytes()).decode()
    state = {"torch": encode(torch.get_rng_state())}
    if torch.cuda.is_available():
        state["cuda"] = [encode(s) for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict) -> None:
    """Restore what `rng_state` captured."""
    def decode(s):
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record the size and hash of every file, so loading can refuse a truncated or altered checkpoint."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(directory / MANIFEST, {"format": FORMAT, "files": files})


def verify_manifest(directory: Path) -> None:
    """Raise CheckpointError if any file listed in the manifest is missing, truncated or altered."""
    path = directory / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{directory} has no {MANIFEST}: not a complete nanostack checkpoint")
    manifest = _read_json(path)
    for name, entry in manifest.get("files", {}).items():
        file = directory / name
        if not file.exists():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST})")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, expected {entry['bytes']}: truncated?")
        if _sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in {MANIFEST}: the file was altered")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): truncated or corrupted") from None


# ----------------------------------------------------------------------------------------------------------
# Saving and loading

def save_checkpoint(directory, weights: dict[str, torch.Tensor], config: ModelConfig, tokenizer: Tokenizer, *,
                    optimizer_state: dict | None = None, trainer_state: dict | None = None,
                    extra_config: dict | None = None, extra_files: dict | None = None) -> Path:
    """Write a complete checkpoint directory atomically (it appears whole or not at all).

    `weights` is a full state dict (`model.state_dict()`, or `distributed.full_model_state` when sharded);
    `extra_files` maps names to paths moved into the directory before it is published.
    """
    directory = Path(directory)
    with atomic_dir(directory) as tmp:
        config_json = {"format": FORMAT, "version": VERSION, "model": dataclasses.asdict(config),
                       "tokenizer": "tokenizer.json", **(extra_config or {})}
        (tmp / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        if weights is not None:
            save_file(unique_tensors(weights), tmp / "model.safetensors")
        tokenizer.save(tmp / "tokenizer.json")
        if optimizer_state is not None:
            tensors, meta = optimizer_to_tensors(optimizer_state)
            save_file(tensors, tmp / "optimizer.safetensors", metadata={"meta": json.dumps(meta)})
        if trainer_state is not None:
            (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2) + "\n")
        for name, path in (extra_files or {}).items():
            os.replace(path, tmp / name)
        write_manifest(tmp)
    return directory


def save_run_checkpoint(run_dir, step: int, keep: int, **kwargs) -> Path:
    """Save `run_dir/step_<step>`, point `run_dir/latest` at it, and delete all but the newest `keep`."""
    run_dir = Path(run_dir)
    directory = save_checkpoint(run_dir / f"step_{step:06d}", **kwargs)
    with open(run_dir / ".latest.tmp", "w") as f:
        f.write(directory.name + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(run_dir / ".latest.tmp", run_dir / "latest")
    fsync_dir(run_dir)
    for old in sorted(run_dir.glob("step_*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return directory


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory (its `latest` file)."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / "latest").exists():
        newest = path / (path / "latest").read_text().strip()
        if not newest.exists():
            raise CheckpointError(f"{path / 'latest'} names {newest.name}, but {newest} is missing (deleted?): "
                                  f"point to another step_* directory in {path}, or re-run the command that wrote it")
        return newest
    tried = f"looked for {path / 'config.json'} (a checkpoint) and {path / 'latest'} (a run directory)"
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} ({tried}): `python train.py` writes out/pretrain, "
                              f"`python finetune.py` out/sft (--mode dpo: out/dpo), `python -m nanostack.quant` "
                              f"out/quant-<mode>; run the stage that writes it first, or pass the right directory")
    raise CheckpointError(f"{path} holds neither a checkpoint nor a run: {tried}; pass the directory that the "
                          f"training command's --out-dir named")


def read_config(path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the whole config.json of a checkpoint (or run) directory."""
    directory = resolve_checkpoint(path)
    raw = _read_json(directory / "config.json")
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{directory}/config.json is not a {FORMAT} config (format={raw.get('format')!r}); "
                              "for a Hugging Face model use import_hf()")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{directory} has checkpoint version {raw.get('version')}, this code reads {VERSION}")
    return ModelConfig(**raw["model"]), raw


def load_checkpoint(path, device="cpu", *, verify: bool = True) -> dict:
    """Load a checkpoint into a fresh model: {"model", "config", "raw_config", "tokenizer", "directory",
    "trainer_state" (or None), "optimizer_state" (or None)}."""
    directory = resolve_checkpoint(path)
    if verify:
        verify_manifest(directory)
    config, raw = read_config(directory)
    if raw.get("quantization"):
        quantization = raw["quantization"]
        raise CheckpointError(f"{directory} holds a quantized model (mode {quantization.get('mode')}): serve it "
                              f"(python serve.py --model {directory}) but train or fine-tune its full-precision "
                              f"source instead ({quantization.get('source')})")
    if not (directory / "model.safetensors").exists():
        raise CheckpointError(f"{directory} holds sharded weights only (shards/); consolidate them with "
                              f"`python -m nanostack.distributed consolidate {directory}`")
    model = GPT(config)
    load_weights(model, load_file(directory / "model.safetensors"))
    model.to(device)
    out = {"model": model, "config": config, "raw_config": raw, "directory": directory,
           "tokenizer": Tokenizer.load(directory / raw.get("tokenizer", "tokenizer.json")),
           "trainer_state": None, "optimizer_state": None}
    if (directory / "trainer_state.json").exists():
        out["trainer_state"] = _read_json(directory / "trainer_state.json")
    if (directory / "optimizer.safetensors").exists():
        out["optimizer_state"] = read_optimizer_state(directory)
    return out


def require_same_tokenizer(tokenizer: Tokenizer, tokenizer_path, other: Tokenizer, other_path, role: str) -> None:
    """Refuse a `role` model (a draft, a teacher) whose tokenizer `other` (from `other_path`) is not `tokenizer`
    (from `tokenizer_path`) token for token; the error names both files and what differs."""
    differences = [what for what, a, b in (("vocabulary size", tokenizer.vocab_size, other.vocab_size),
                                           ("merges", tokenizer.mergeable_ranks, other.mergeable_ranks),
                                           ("special tokens", tokenizer.special_tokens, other.special_tokens),
                                           ("split pattern", tokenizer.pattern, other.pattern)) if a != b]
    if differences:
        raise CheckpointError(
            f"the {role} uses a different tokenizer: {other_path} differs from {tokenizer_path} in its "
            f"{', '.join(differences)} (vocabulary {other.vocab_size} vs {tokenizer.vocab_size}), so the same token "
            f"ids mean different text; train the {role} with this tokenizer "
            f"(python train.py --tokenizer {tokenizer_path} ...)")


def read_optimizer_state(directory) -> dict:
    """The optimizer state (keyed by parameter name) that `save_checkpoint` split into tensors and JSON."""
    path = Path(directory) / "optimizer.safetensors"
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
    return optimizer_from_tensors(load_file(path), meta)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face interop: Llama (dense) and Mixtral (MoE) layouts, as stored on the Hub

def _hf_names(config: ModelConfig) -> dict[str, str]:
    """nanostack parameter name -> Hugging Face name, for every tensor except per-expert ones."""
    names = {"tok_emb.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "lm_head.weight": "lm_head.weight"}
    for i in range(config.n_layer):
        ours, theirs = f"layers.{i}", f"model.layers.{i}"
        names[f"{ours}.attn_norm.weight"] = f"{theirs}.input_layernorm.weight"
        names[f"{ours}.mlp_norm.weight"] = f"{theirs}.post_attention_layernorm.weight"
        for a, b in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            names[f"{ours}.attn.{a}.weight"] = f"{theirs}.self_attn.{b}.weight"
        if config.n_expert:
            names[f"{ours}.mlp.router.weight"] = f"{theirs}.block_sparse_moe.gate.weight"
        else:
            for a, b in (("w_gate", "gate_proj"), ("w_up", "up_proj"), ("w_down", "down_proj")):
                names[f"{ours}.mlp.{a}.weight"] = f"{theirs}.mlp.{b}.weight"
    return names


# Mixtral's per-expert names: w1 = gate, w3 = up, w2 = down.
_EXPERT_NAMES = {"w_gate": "w1", "w_up": "w3", "w_down": "w2"}


def hf_config(config: ModelConfig) -> dict:
    """The Hugging Face config.json for a nanostack ModelConfig."""
    common = {"vocab_size": config.vocab_size, "hidden_size": config.n_embd, "intermediate_size": config.mlp_hidden,
              "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
              "num_key_value_heads": config.n_kv_head, "head_dim": config.n_embd // config.n_head,
              "max_position_embeddings": config.max_seq_len, "rms_norm_eps": config.norm_eps,
              "rope_theta": config.rope_theta, "tie_word_embeddings": config.tie_embeddings,
              "hidden_act": "silu", "attention_bias": False, "torch_dtype": "float32"}
    if config.n_expert:
        return {**common, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
                "num_local_experts": config.n_expert, "num_experts_per_tok": config.n_expert_active,
                "router_aux_loss_coef": config.moe_aux_loss_coef}
    return {**common, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "mlp_bias": False}


def export_hf(path, out_dir) -> Path:
    """Write a checkpoint as a Hugging Face Llama/Mixtral model directory (config.json + model.safetensors)."""
    loaded = load_checkpoint(path)
    config, state = loaded["config"], unique_tensors(loaded["model"].state_dict())
    names, hf_state = _hf_names(config), {}
    for name, tensor in state.items():
        if name in names:
            hf_state[names[name]] = tensor
            continue
        # per-expert weights: layers.{i}.mlp.experts.{w_gate|w_up|w_down}, shaped (n_expert, out, in)
        layer, kind = name.split(".")[1], name.split(".")[-1]
        for e in range(config.n_expert):
            hf_state[f"model.layers.{layer}.block_sparse_moe.experts.{e}.{_EXPERT_NAMES[kind]}.weight"] = tensor[e].clone()
    with atomic_dir(out_dir) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
        save_file(hf_state, tmp / "model.safetensors", metadata={"format": "pt"})
    return Path(out_dir)


def import_hf(hf_dir) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read a Hugging Face Llama/Mixtral directory (config.json + *.safetensors) as a nanostack config and weights."""
    hf_dir = Path(hf_dir)
    hf = _read_json(hf_dir / "config.json")
    if hf.get("model_type") not in ("llama", "mixtral"):
        raise CheckpointError(f"{hf_dir}: model_type {hf.get('model_type')!r} is not supported (llama or mixtral)")
    if hf.get("rope_scaling") or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{hf_dir}: rope_scaling and biases are not supported by nanostack's model")
    n_embd, n_head = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim", n_embd // n_head) != n_embd // n_head:
        raise CheckpointError(f"{hf_dir}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    config = ModelConfig(
        vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], n_head=n_head,
        n_kv_head=hf.get("num_key_value_heads", n_head), n_embd=n_embd, mlp_hidden=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=hf.get("rope_theta", 10000.0),
        norm_eps=hf.get("rms_norm_eps", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", False),
        n_expert=hf.get("num_local_experts", 0) if hf["model_type"] == "mixtral" else 0,
        n_expert_active=hf.get("num_experts_per_tok", 2))
    hf_state = {}
    for file in sorted(hf_dir.glob("*.safetensors")):
        hf_state.update(load_file(file))
    if not hf_state:
        raise CheckpointError(f"{hf_dir} has no *.safetensors weights (pickled .bin files are not read)")
    state = {ours: hf_state[theirs] for ours, theirs in _hf_names(config).items() if theirs in hf_state}
    for i in range(config.n_layer if config.n_expert else 0):
        for kind, hf_kind in _EXPERT_NAMES.items():
            prefix = f"model.layers.{i}.block_sparse_moe.experts"
            state[f"layers.{i}.mlp.experts.{kind}"] = torch.stack(
                [hf_state[f"{prefix}.{e}.{hf_kind}.weight"] for e in range(config.n_expert)])
    return config, state

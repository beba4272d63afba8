"""Checkpoints: safetensors + JSON, written atomically, verified on load, readable by every later stage.

A checkpoint directory is self-contained:

    config.json            {"format", "version", "model": ModelConfig fields, "tokenizer": "tokenizer.json", ...}
    model.safetensors      the weights (tied tensors stored once)
    tokenizer.json         the tokenizer the model was trained with (one of Hugging Face's brings its
                           tokenizer_config.json and generation_config.json: chat template and stop ids)
    trainer_state.json     (training only) step, data-loader position, RNG states, metrics
    optimizer.safetensors  (training only) optimizer moments; param groups in the safetensors metadata
    manifest.json          size and sha256 of every file above, written last

A training run directory holds `step_000100/`-style checkpoints, the newest `keep` of them, plus a `latest`
file naming the newest one; anywhere a checkpoint is expected, the run directory works too.

Nothing here unpickles: tensors go through safetensors, everything else through JSON, and the manifest
catches truncated or tampered files before anything is loaded. Loading for inference or export checks and reads
only the config, weights and tokenizer, so a damaged optimizer or trainer state does not stand in its way.

Anywhere a checkpoint is expected, a Hugging Face model directory works too (a config.json with a `model_type`
and *.safetensors weights): `read_config` and `load_checkpoint` hand it to nanostack/hf.py, so every tool loads
both through this one door.
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

from nanostack import hf_tokenizer
from nanostack.atomic import atomic_dir, file_sha256, fsync_dir, write_json
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


def write_manifest(directory: Path) -> None:
    """Record the size and hash of every file, so loading can refuse a truncated or altered checkpoint."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
             for p in sorted(directory.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(directory / MANIFEST, {"format": FORMAT, "files": files})


def verify_manifest(directory: Path, names=None) -> None:
    """Raise CheckpointError if any file listed in the manifest (or those of `names` it lists) is missing,
    truncated or altered, or a file of `names` is present but not listed."""
    path = directory / MANIFEST
    if not path.exists():
        raise CheckpointError(f"{directory} has no {MANIFEST}: not a complete nanostack checkpoint")
    listed = read_json(path).get("files", {})
    unlisted = sorted(name for name in names or () if name not in listed and (directory / name).exists())
    if unlisted:
        raise CheckpointError(f"{directory / unlisted[0]} is not listed in {MANIFEST}, so it was added after the "
                              f"checkpoint was saved: remove it, or save the checkpoint again")
    for name, entry in listed.items():
        if names is not None and name not in names:
            continue
        file = directory / name
        if not file.exists():
            raise CheckpointError(f"{file} is missing (listed in {MANIFEST})")
        if file.stat().st_size != entry["bytes"]:
            raise CheckpointError(f"{file} has {file.stat().st_size} bytes, expected {entry['bytes']}: truncated?")
        if file_sha256(file) != entry["sha256"]:
            raise CheckpointError(f"{file} does not match its sha256 in {MANIFEST}: the file was altered")


def read_json(path: Path) -> dict:
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


def remove_unfinished_writes(run_dir) -> int:
    """Delete what killed checkpoint writes left in a run directory (`.step_*.tmp`, `.shards_*.tmp` directories and
    `.latest.tmp`; a published checkpoint never has these names); returns how many bytes that freed."""
    run_dir = Path(run_dir)
    leftovers = [*run_dir.glob(".step_*.tmp"), *run_dir.glob(".shards_*.tmp"), run_dir / ".latest.tmp"]
    freed = 0
    for leftover in leftovers:
        if leftover.is_dir():
            freed += sum(f.stat().st_size for f in leftover.rglob("*") if f.is_file())
            shutil.rmtree(leftover, ignore_errors=True)
        elif leftover.exists():
            freed += leftover.stat().st_size
            leftover.unlink()
    return freed


def resolve_checkpoint(path) -> Path:
    """A checkpoint directory, or the newest checkpoint of a run directory: the one its `latest` file names, or
    without one (a run killed between publishing its first step_* and writing `latest`), the newest step_* whose
    manifest verifies."""
    path = Path(path)
    if (path / "config.json").exists():
        return path
    if (path / "latest").exists():
        newest = path / (path / "latest").read_text().strip()
        if not newest.exists():
            raise CheckpointError(f"{path / 'latest'} names {newest.name}, but {newest} is missing (deleted?): "
                                  f"point to another step_* directory in {path}, or re-run the command that wrote it")
        return newest
    steps = sorted(path.glob("step_*"), reverse=True)  # zero-padded step numbers: newest first
    for candidate in steps:
        try:
            verify_manifest(candidate)
            return candidate
        except CheckpointError:
            continue
    tried = (f"looked for {path / 'config.json'} (a checkpoint), {path / 'latest'} (a run directory) and a complete "
             f"step_* directory ({len(steps)} found, none complete)")
    present = sorted(p.name for p in path.glob("*") if p.name in ("model.safetensors", "tokenizer.json", MANIFEST)
                     or p.suffix == ".safetensors") if path.is_dir() else []
    if present:
        raise CheckpointError(f"{path / 'config.json'} is missing: {path} holds {', '.join(present)} but a "
                              "checkpoint also needs its config.json; restore it (or re-run the command that wrote "
                              "the directory)")
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path} ({tried}): `python train.py` writes out/pretrain, "
                              f"`python finetune.py` out/sft (--mode dpo: out/dpo), `python -m nanostack.quant` "
                              f"out/quant-<mode>; run the stage that writes it first, or pass the right directory")
    raise CheckpointError(f"{path} holds neither a checkpoint nor a run: {tried}; pass the directory that the "
                          f"training command's --out-dir named")


def read_config(path) -> tuple[ModelConfig, dict]:
    """The ModelConfig and the whole config.json of a checkpoint (or run, or Hugging Face model) directory."""
    directory = resolve_checkpoint(path)
    raw = read_json(directory / "config.json")
    from nanostack import hf  # hf.py builds on this module
    if hf.is_hf_config(raw):
        return hf.config_from_hf(raw, directory / "config.json"), raw
    if raw.get("format") != FORMAT:
        raise CheckpointError(f"{directory}/config.json is neither a {FORMAT} config (format={raw.get('format')!r}) "
                              "nor a Hugging Face model's (model_type)")
    if raw.get("version") != VERSION:
        raise CheckpointError(f"{directory} has checkpoint version {raw.get('version')}, this code reads {VERSION}")
    return ModelConfig(**raw["model"]), raw


def load_checkpoint(path, device="cpu", *, dtype: torch.dtype | None = None, verify: bool = True) -> dict:
    """Load a checkpoint, or a Hugging Face model directory, into a fresh model in `dtype` (default float32):
    {"model", "config", "raw_config", "tokenizer", "directory"}. Only those files are checked and read; the
    training state is `read_trainer_state`'s and training.py's business."""
    directory = resolve_checkpoint(path)
    config, raw = read_config(directory)
    tokenizer_path = directory / raw.get("tokenizer", "tokenizer.json")
    from nanostack import hf
    if hf.is_hf_config(raw):
        if not tokenizer_path.exists():
            raise CheckpointError(f"{tokenizer_path} is missing: a Hugging Face model directory needs its tokenizer "
                                  "files beside the weights (huggingface-cli download fetches them together)")
        tokenizer = Tokenizer.load(tokenizer_path)  # before the weights: a bad tokenizer fails at once
        model = hf.import_hf(directory, device, dtype or torch.float32)
    else:
        if verify:
            verify_manifest(directory, {"config.json", "model.safetensors", tokenizer_path.name,
                                        *hf_tokenizer.CONFIG_FILES})
        if raw.get("quantization"):
            quantization = raw["quantization"]
            raise CheckpointError(f"{directory} holds a quantized model (mode {quantization.get('mode')}): serve "
                                  f"it (python serve.py --model {directory}) but train or fine-tune its full-precision "
                                  f"source instead ({quantization.get('source')})")
        if not (directory / "model.safetensors").exists():
            raise CheckpointError(f"{directory} holds sharded weights only (shards/); consolidate them with "
                                  f"`python -m nanostack.distributed consolidate {directory}`")
        tokenizer = Tokenizer.load(tokenizer_path)
        model = GPT(config)
        load_weights(model, load_file(directory / "model.safetensors"))
        model.to(device=device, dtype=dtype)
    return {"model": model, "config": config, "raw_config": raw, "directory": directory, "tokenizer": tokenizer}


def read_trainer_state(path) -> dict:
    """trainer_state.json of a checkpoint (or run) directory: step, loader position, RNG states."""
    return read_json(resolve_checkpoint(path) / "trainer_state.json")


def weights_sha256(path) -> str:
    """What identifies a model's weights: the sha256 of model.safetensors from the manifest of a nanostack
    checkpoint; for a Hugging Face directory, of the sha256s of its *.safetensors files in name order."""
    directory = resolve_checkpoint(path)
    if (directory / MANIFEST).exists():
        return read_json(directory / MANIFEST)["files"]["model.safetensors"]["sha256"]
    digests = "".join(file_sha256(file) for file in sorted(directory.glob("*.safetensors")))
    return hashlib.sha256(digests.encode()).hexdigest()


def require_same_tokenizer(tokenizer: Tokenizer, tokenizer_path, other: Tokenizer, other_path, role: str) -> None:
    """Refuse a `role` model (a draft, a teacher) whose tokenizer `other` (from `other_path`) is not `tokenizer`
    (from `tokenizer_path`) token for token; the error names both files and what differs."""
    differences = tokenizer.differences(other)
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

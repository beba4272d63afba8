"""Distributed training with PyTorch's own engines under torchrun: DDP or FSDP2 over the data-parallel ranks,
composed with tensor and pipeline parallelism (nanostack/parallel.py) on one (pp, dp, tp) DeviceMesh.

The model code knows nothing of parallelism; `parallelize()` wraps it, in torchtitan's order: tensor parallel,
activation checkpointing (it rewraps each block's forward), torch.compile, the pipeline split, then FSDP/DDP.

    torchrun --nproc_per_node=8 train.py --strategy fsdp                 # one node, 8-way data parallel
    torchrun --nproc_per_node=8 train.py --strategy fsdp --tp 2 --pp 2   # dp 2 x tp 2 x pp 2
    torchrun --nnodes=2 --node_rank=0 --rdzv-endpoint=HOST:29500 ...     # and the same with node_rank=1

- DDP keeps a full replica per rank and all-reduces gradients (skipped with `no_sync` on all but the last
  micro-batch of a step, so accumulation costs one all-reduce per step).
- FSDP2 shards parameters, gradients and optimizer state over the dp ranks (each holds ~1/dp); each block's
  weights are all-gathered just before use and freed after (`reshard_after_forward`), gradients
  reduce-scattered. Its mixed-precision policy computes in bf16 on GPU while reductions and the master weights
  stay fp32. Under tp its shards are 2-D: a tp slice of each weight, sharded again over dp.
Checkpoints go through `torch.distributed.checkpoint.state_dict`, which speaks the same plain (fully
qualified name -> tensor) language for a bare model, DDP, FSDP2, tp and pipeline stages: that is what lets a run
saved with one layout resume with another.
"""
import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import DeviceMesh
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from nanostack import parallel
from nanostack.cli import SettingsError


@dataclass
class ParallelConfig:
    strategy: str = "none"          # data parallelism over the dp ranks: none (one process, or tp/pp only) | ddp | fsdp
    dp: int = 0                     # data-parallel ranks; 0 = world size / (tp * pp)
    tp: int = 1                     # tensor-parallel ranks: each layer's heads and hidden units split over them
    pp: int = 1                     # pipeline stages: layers cut in pp runs that pass the --grad-accum micro-batches on
    pp_schedule: str = "1f1b"       # gpipe | 1f1b (needs --grad-accum >= --pp) | interleaved-1f1b (2 stages a rank)
    activation_checkpointing: str = "none"  # none | full (recompute each block) | selective (keep matmul outputs)
    reshard_after_forward: bool = True  # fsdp: free gathered weights after forward (less memory, one more gather)
    sharded_checkpoint: bool = False  # save torch.distributed.checkpoint shards (models too big for a host; --pp: on)


@dataclass
class Rank:
    """Where this process sits in the job."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    mesh: DeviceMesh | None = None  # the (pp, dp, tp) mesh under torchrun

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def size(self, dim: str) -> int:
        """Ranks along a mesh dimension: "dp", "tp" or "pp" (1 in a world of one)."""
        return self.mesh[dim].size() if self.mesh is not None else 1

    @property
    def dp_rank(self) -> int:
        """This rank's index among the data-parallel ranks: which share of each batch it reads."""
        return self.mesh.get_local_rank("dp") if self.mesh is not None else 0


def setup(device: torch.device, config: ParallelConfig | None = None) -> Rank:
    """Join the torchrun process group (NCCL on CUDA, gloo on CPU) and lay the ranks out on the (pp, dp, tp)
    mesh of `config`, or a world of one without torchrun."""
    if "RANK" not in os.environ:
        return Rank(device=device)
    config = config or ParallelConfig()
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", device_id=device if device.type == "cuda" else None)
    mesh = parallel.build_mesh(device.type, world_size, config.dp, config.tp, config.pp)
    return Rank(rank, local_rank, world_size, device, mesh)


def teardown() -> None:
    """Leave the process group (only on success: after an error a peer may never answer, so just exit)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity in a world of one)."""
    if dist.is_initialized():
        values = values.clone()
        dist.all_reduce(values)
    return values


def _save_matmuls_policy(ctx, op, *args, **kwargs):
    """Selective checkpointing: keep the outputs of matmuls and attention (costly to redo), recompute the rest."""
    saved = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
             torch.ops.aten._scaled_dot_product_flash_attention.default,
             torch.ops.aten._scaled_dot_product_efficient_attention.default}
    return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE


def apply_activation_checkpointing(model: torch.nn.Module, mode: str) -> None:
    """Recompute each block's activations in the backward instead of storing them (full or selective)."""
    if mode == "none":
        return
    if mode not in ("full", "selective"):
        raise ValueError(f"activation_checkpointing must be none, full or selective, got {mode!r}")
    context_fn = (lambda: create_selective_checkpoint_contexts(_save_matmuls_policy)) if mode == "selective" else None
    for block in model.layers:
        forward = block.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            if not torch.is_grad_enabled():  # eval / generation: nothing to save, nothing to recompute
                return _forward(*args, **kwargs)
            extra = {"context_fn": context_fn} if context_fn else {}
            return checkpoint(_forward, *args, use_reentrant=False, **extra, **kwargs)
        block.forward = checkpointed


def parallelize(model: torch.nn.Module, config: ParallelConfig, rank: Rank, *, compile: bool = False,
                param_dtype: torch.dtype = torch.float32, micro_batches: int = 1):
    """Wrap `model` for training: tensor parallel, activation checkpointing, compile, pipeline split, FSDP2/DDP.

    Returns what the training step calls: `model` itself (sharded in place by tp and FSDP2), a DDP wrapper
    around it, or with --pp a parallel.Pipeline running this rank's stages (`model` is cut down to their layers).
    `micro_batches` (the gradient accumulation) is the number of micro-batches a pipeline step carries.
    """
    if config.strategy not in ("none", "ddp", "fsdp"):
        raise ValueError(f"strategy must be none, ddp or fsdp, got {config.strategy!r}")
    if config.pp_schedule not in parallel.PIPELINE_SCHEDULES:
        raise SettingsError(f"pp_schedule must be one of {parallel.PIPELINE_SCHEDULES}, got {config.pp_schedule!r}")
    if config.pp > 1 and config.pp_schedule == "1f1b" and micro_batches < config.pp:
        raise SettingsError(f"--pp-schedule 1f1b keeps --pp {config.pp} micro-batches in flight, but --grad-accum is "
                         f"{micro_batches}: raise --grad-accum to at least {config.pp} (the bubble is (pp-1)/"
                         f"(grad_accum+pp-1) of a step) or use --pp-schedule gpipe")
    virtual = parallel.VIRTUAL_STAGES[config.pp_schedule]  # pipeline stages per pp rank
    # Megatron's rule for interleaving: micro-batches go round in groups of pp (torch's schedule refuses some
    # other counts, and with fewer than pp there is nothing to interleave).
    if config.pp > 1 and virtual > 1 and micro_batches % config.pp:
        raise SettingsError(f"--pp-schedule interleaved-1f1b sends micro-batches round in groups of --pp {config.pp}, "
                            f"but --grad-accum is {micro_batches}: make --grad-accum a multiple of {config.pp}, or "
                            f"use --pp-schedule 1f1b")
    if config.pp > 1 and virtual * config.pp > model.config.n_layer:
        raise SettingsError(f"--pp-schedule interleaved-1f1b cuts the model into {virtual} x --pp {config.pp} = "
                            f"{virtual * config.pp} stages of at least one layer each, but it has "
                            f"{model.config.n_layer}: use --pp-schedule 1f1b or a smaller --pp")
    if (config.strategy != "none" or config.tp > 1 or config.pp > 1) and not dist.is_initialized():
        flags = " ".join(f"--{name} {value}" for name, value in (("strategy", config.strategy), ("tp", config.tp),
                                                                  ("pp", config.pp)) if value not in ("none", 1))
        raise ValueError(f"{flags} needs torchrun, e.g. `torchrun --nproc_per_node=2 train.py {flags}`")
    if (config.tp, config.pp) != (rank.size("tp"), rank.size("pp")):
        raise SettingsError(f"--tp {config.tp} --pp {config.pp}, but the ranks were laid out for tp {rank.size('tp')} "
                         f"pp {rank.size('pp')}: pass the same ParallelConfig to distributed.setup")
    if config.strategy == "none" and rank.size("dp") > 1:
        raise SettingsError(f"{rank.size('dp')} data-parallel ranks need --strategy ddp or fsdp to share gradients "
                         f"(or make --tp x --pp the world size)")
    if config.strategy == "ddp" and (config.tp > 1 or config.pp > 1):
        raise SettingsError("DDP keeps whole replicas: with --tp or --pp use --strategy fsdp (or none) over dp")
    parallel.check_model_fits(model.config, config.tp, config.pp)
    if config.tp > 1:
        parallel.apply_tensor_parallel(model, rank.mesh["tp"], plain_outputs=config.pp == 1)
    apply_activation_checkpointing(model, config.activation_checkpointing)
    if compile:
        for block in model.layers:
            block.compile()
    stages = [model]  # what runs as a whole: the model, or this rank's pipeline stages (sharing its modules)
    if config.pp > 1:
        stages = parallel.pipeline_stage(model, rank.mesh.get_local_rank("pp"), config.pp, virtual,
                                         sequence_shards=config.tp)
    if config.strategy == "fsdp":
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
        # Each block is a unit; the outer ones (the model, or its pipeline stages: what a step calls) also hold
        # the embedding, norm and LM head.
        for module in parallel.blocks(model) + stages:
            fully_shard(module, mesh=rank.mesh["dp"], mp_policy=policy,
                        reshard_after_forward=config.reshard_after_forward)
    if config.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        device_ids = [rank.device.index] if rank.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)
    if config.pp > 1:
        return parallel.Pipeline(stages, rank.mesh, config.pp_schedule, micro_batches, rank.device)
    return model


@contextlib.contextmanager
def gradient_sync(model: torch.nn.Module, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter for micro-batches that are not the last of a step."""
    if hasattr(model, "no_sync") and not sync:  # DDP
        with model.no_sync():
            yield
        return
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP2
        model.set_requires_gradient_sync(sync)
    yield


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU (gathered from all ranks under FSDP; a collective: call on every rank)."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The whole optimizer state on CPU, keyed by parameter name rather than position (a collective)."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model, optimizer, model_state: dict, optimizer_state: dict | None) -> None:
    """Load full (unsharded) states into a possibly sharded model and its optimizer, on every rank (a pipeline
    stage takes its own parameters' entries)."""
    if isinstance(model.layers, torch.nn.ModuleDict):
        own = model.state_dict().keys()
        model_state = {name: value for name, value in model_state.items() if name in own}
    set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True))
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))


def save_sharded(directory, model, optimizer) -> None:
    """Each rank writes its own shards with torch.distributed.checkpoint (no rank holds the whole model)."""
    import torch.distributed.checkpoint as dcp
    state = {"model": get_model_state_dict(model),
             "optimizer": get_optimizer_state_dict(model, optimizer,
                                                   options=StateDictOptions(flatten_optimizer_state_dict=True))}
    dcp.save(state, checkpoint_id=str(directory))


def load_sharded(directory, model, optimizer) -> None:
    """Read torch.distributed.checkpoint shards back, resharding to the current world size if it changed."""
    import torch.distributed.checkpoint as dcp
    flat = StateDictOptions(flatten_optimizer_state_dict=True)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer, options=flat)}
    dcp.load(state, checkpoint_id=str(directory))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"], options=flat)


def consolidate(directory) -> None:
    """Give a sharded checkpoint the portable single-file weights (model.safetensors), in one process."""
    import torch.distributed.checkpoint as dcp
    from safetensors.torch import save_file

    from nanostack import checkpoint
    from nanostack.model import GPT

    directory = checkpoint.resolve_checkpoint(directory)
    config, _ = checkpoint.read_config(directory)
    if not (directory / "shards").exists():
        raise ValueError(f"{directory} has no shards/ directory: it is not a sharded checkpoint")
    state = {"model": GPT(config).state_dict()}
    dcp.load(state, checkpoint_id=str(directory / "shards"))  # reads only the model's entries
    save_file(checkpoint.unique_tensors(state["model"]), directory / "model.safetensors")
    checkpoint.write_manifest(directory)


def main(argv=None) -> int:
    """`python -m nanostack.distributed consolidate DIR`."""
    import argparse
    parser = argparse.ArgumentParser(description="Distributed-training utilities.")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("consolidate", help="write model.safetensors for a sharded checkpoint (or run) directory") \
        .add_argument("directory")
    args = parser.parse_args(argv)
    consolidate(args.directory)
    print(f"wrote {args.directory}/model.safetensors")
    return 0


if __name__ == "__main__":
    from nanostack.cli import run
    run(main)

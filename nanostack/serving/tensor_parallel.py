"""Tensor parallel serving: one model split over the GPUs of a node, every rank computing a slice of every layer
(the Megatron-LM split, Shoeybi et al. 2019).

A linear y = x W^T can be cut two ways over W ranks:

    column-parallel  each rank holds a slice of W's rows (output features) and computes its slice of y from the
                     whole x: no communication
    row-parallel     each rank holds a slice of W's columns (input features) and computes a partial y from its
                     slice of x; the sum over the ranks (an all-reduce) is the whole y

A column-parallel layer followed by a row-parallel one needs a single all-reduce, at the end:

    attention   wq, wk, wv column-parallel: each rank owns n_head/W query heads and n_kv_head/W K/V heads, whole
                heads and whole GQA groups, so attention runs locally on them (q/k/v biases split with their
                heads; the per-head q/k norms are one weight shared by every head, kept whole); wo row-parallel,
                all-reduce
    dense MLP   w_gate, w_up column-parallel (a slice of the hidden units: SwiGLU is elementwise on them);
                w_down row-parallel, all-reduce
    MoE         the router is replicated, so every rank routes every token identically; each expert is split like
                the dense MLP over its hidden units; the gated sum over experts is partial: one all-reduce after it

So a block costs two all-reduces of (tokens, n_embd). The paged KV pools of a rank hold only its K/V heads: a node
of W GPUs holds W times the context of one.

Kept whole on every rank (the simpler choice): the norms, the token embedding and the LM head. The residual stream
is replicated, so only rank 0 computes logits (the other ranks are sent no logits rows). The two tables cost
vocab * n_embd per rank; for a Llama-3-8B shape about 1 GB per GPU in bf16, which a vocabulary-parallel head would
split at the price of gathering the logits. Full-precision checkpoints only: a quantized model is quantized after
it is split (`--quant`), since a row-parallel slice needs its own scales.

Processes. `serve.py --tp W` is rank 0: it spawns W - 1 workers (torch.multiprocessing, spawn), each loads the same
checkpoint, keeps its shard and waits in `run_worker`. Rank 0 runs the HTTP server, scheduler and sampler as
without TP; the only difference is its Engine's `forward`, which first broadcasts the step: a fixed-size header of
sizes, then one int64 tensor with the token ids and the PagedBatch's tensors. Then every rank runs the same forward
over its shard and they meet at the all-reduces. NCCL on CUDA (rank r on cuda:r), gloo on CPU.

Failures. A dead worker would leave rank 0 blocked in a collective for ever, so rank 0 watches its workers and ends
the server with an error naming the rank; a worker whose rank 0 has gone exits too.
"""
import dataclasses
import multiprocessing.connection
import os
import signal
import socket
import sys
import threading
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn as nn

from nanostack.checkpoint import read_config
from nanostack.model import GPT, MoE, PagedBatch
from nanostack.parallel import TP_SPLIT
from nanostack.serving.kv_cache import allocate_kv_pools

STOP, STEP = 0, 1
_DTYPES = (torch.int64, torch.int32)  # what a step's tensors may be; the header names one per tensor
_HEADER_LEN = 1 + 3 * (1 + len(dataclasses.fields(PagedBatch)))  # command + (kind, dim 0, dim 1) per item
# An idle server waits in a broadcast until the next request; liveness is the watchdogs' job, not a timeout.
_COLLECTIVE_TIMEOUT = timedelta(days=365)


@dataclasses.dataclass
class ModelSpec:
    """What every rank loads: the checkpoint, where and in which dtype, and an optional on-the-fly int8 mode."""
    path: str
    device: str          # rank 0's device; worker r uses cuda:r on CUDA, the CPU otherwise
    dtype: torch.dtype
    quant: str = ""


def check_shardable(config, world_size: int, quantized: bool = False) -> None:
    """Raise a ValueError unless this model can be split over world_size ranks: full precision, and heads, K/V
    heads and MLP hidden units that divide evenly."""
    if world_size < 1:
        raise ValueError(f"tensor parallel size must be >= 1, got {world_size}")
    if quantized and world_size > 1:
        raise ValueError("tensor parallel splits a full-precision checkpoint: serve the float checkpoint with "
                         "--quant to quantize each rank's shard")
    uneven = [f"{name}={getattr(config, name)}" for name in ("n_head", "n_kv_head", "mlp_hidden")
              if getattr(config, name) % world_size]
    if uneven:
        raise ValueError(f"tensor parallel over {world_size} ranks splits whole heads and hidden units, but "
                         f"{', '.join(uneven)} {'is' if len(uneven) == 1 else 'are'} not divisible by {world_size}")


def _keep_slice(module: nn.Module, name: str, dim: int, rank: int, world_size: int) -> None:
    """Replace parameter `name` of module by this rank's contiguous 1/world_size of it along dim."""
    piece = getattr(module, name).chunk(world_size, dim)[rank]
    setattr(module, name, nn.Parameter(piece.clone(), requires_grad=False))


def _sum_over_ranks(module, inputs, output):
    """Forward hook ending a row-parallel computation: the rank's partial output becomes the full sum."""
    dist.all_reduce(output)
    return output


@torch.no_grad()
def shard_model(model: GPT, rank: int, world_size: int) -> GPT:
    """Keep this rank's share of every attention and MLP layer of a full-precision model (in place)."""
    check_shardable(model.config, world_size, quantized=bool(getattr(model, "quantization", None)))
    if world_size == 1:
        return model
    for layer in model.layers:
        attn, mlp = layer.attn, layer.mlp
        for name, kind in TP_SPLIT.items():  # the split tensor-parallel training uses too
            if name.startswith("attn.") or not isinstance(mlp, MoE):  # colwise rows are head-major: whole heads
                linear = layer.get_submodule(name)
                _keep_slice(linear, "weight", 0 if kind == "colwise" else 1, rank, world_size)
                if kind == "colwise" and linear.bias is not None:  # (row-parallel projections have none)
                    _keep_slice(linear, "bias", 0, rank, world_size)
        attn.n_head, attn.n_kv_head = attn.n_head // world_size, attn.n_kv_head // world_size
        # On the Attention and MLP/MoE modules, not their linears: quantization may replace those afterwards.
        attn.register_forward_hook(_sum_over_ranks)
        if isinstance(mlp, MoE):
            for name, dim in (("w_gate", 1), ("w_up", 1), ("w_down", 2)):  # (n_expert, out, in) stacks
                _keep_slice(mlp.experts, name, dim, rank, world_size)
        mlp.register_forward_hook(_sum_over_ranks)
    for module in model.modules():  # keep the Linear reprs truthful
        if isinstance(module, nn.Linear):
            module.out_features, module.in_features = module.weight.shape
    return model


def load_model(spec: ModelSpec, rank: int = 0, world_size: int = 1) -> dict:
    """Load a checkpoint for serving as rank `rank` of `world_size`: cast, shard, quantize, move to the device.

    Returns load_for_serving's dict with "model" replaced by this rank's model."""
    from nanostack.quant import load_for_serving, quantize_model  # quant imports the serving engine's neighbours
    device = spec.device if rank == 0 else (f"cuda:{rank}" if torch.device(spec.device).type == "cuda" else "cpu")
    loaded = load_for_serving(spec.path, "cpu" if world_size > 1 else device, spec.dtype)
    model = loaded["model"].to(spec.dtype)  # cast first: quantization reads the weights in the dtype they will be served in
    model = shard_model(model, rank, world_size)
    if spec.quant:
        model = quantize_model(model, spec.quant)
    loaded["model"] = model.to(device).eval()
    return loaded


# ----------------------------------------------------------------------------------------------------------
# One step's inputs, from rank 0 to every rank

def _broadcast_ints(values: list[int] | None, length: int, device) -> list[int]:
    """Rank 0 sends `values` (length ints); the other ranks pass None and receive them."""
    tensor = (torch.tensor(values, dtype=torch.int64, device=device) if values is not None
              else torch.empty(length, dtype=torch.int64, device=device))
    dist.broadcast(tensor, src=0)
    return tensor.tolist()


def send_step(token_ids: torch.Tensor, batch: PagedBatch) -> None:
    """Rank 0: broadcast a step (its header of sizes and dtypes, then every tensor in one int64 tensor)."""
    header, parts = [STEP], []
    for item in [token_ids] + [getattr(batch, f.name) for f in dataclasses.fields(PagedBatch)]:
        if isinstance(item, torch.Tensor):
            header += [_DTYPES.index(item.dtype), item.shape[0], item.shape[1] if item.dim() == 2 else -1]
            parts.append(item.flatten().to(torch.int64))
        else:
            header += [-1, item, 0]  # a plain int field
    _broadcast_ints(header, _HEADER_LEN, token_ids.device)
    dist.broadcast(torch.cat(parts), src=0)


def receive_step(device) -> tuple[torch.Tensor, PagedBatch] | None:
    """Other ranks: the next step's (token_ids, batch), or None when rank 0 says stop."""
    header = _broadcast_ints(None, _HEADER_LEN, device)
    if header[0] == STOP:
        return None
    items = [header[i:i + 3] for i in range(1, _HEADER_LEN, 3)]
    sizes = [rows * max(cols, 1) for kind, rows, cols in items if kind >= 0]
    body = torch.empty(sum(sizes), dtype=torch.int64, device=device)
    dist.broadcast(body, src=0)
    pieces, values = iter(body.split(sizes)), []
    for kind, rows, cols in items:
        if kind < 0:
            values.append(rows)
        else:
            piece = next(pieces).to(_DTYPES[kind])
            values.append(piece.view(rows, cols) if cols >= 0 else piece)
    return values[0], PagedBatch(*values[1:])


def broadcasting_forward(model: GPT):
    """Rank 0's Engine forward: send the step to the other ranks, then run this rank's share of it."""
    def forward(token_ids, batch: PagedBatch, k_pools, v_pools):
        send_step(token_ids, dataclasses.replace(batch, logits_indices=batch.logits_indices[:0]))
        return model.forward_serving(token_ids, batch, k_pools, v_pools)
    return forward


@torch.inference_mode()
def run_worker(model: GPT, device) -> None:
    """Ranks 1..: allocate the K/V pools rank 0 announces, then run every step it sends until it says stop."""
    num_blocks, block_size = _broadcast_ints(None, 2, device)
    k_pools, v_pools = allocate_kv_pools(model.kv_layout(), num_blocks, block_size, model.norm.weight.dtype, device)
    while (step := receive_step(device)) is not None:
        model.forward_serving(*step, k_pools, v_pools)


# ----------------------------------------------------------------------------------------------------------
# Processes

def _backend(device: str) -> str:
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _exit_with_parent(parent_pid: int) -> None:
    """A worker's watchdog: rank 0 gone (killed, crashed) means nobody will send a step again."""
    while os.getppid() == parent_pid:
        time.sleep(0.5)
    os._exit(1)


def _join_group(rank: int, world_size: int, port: int, device: str) -> None:
    """Join the ranks' process group (rendezvous on 127.0.0.1:port), each rank with its share of the CPU threads."""
    torch.set_num_threads(max(1, torch.get_num_threads() // world_size))
    dist.init_process_group(_backend(device), init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size, timeout=_COLLECTIVE_TIMEOUT)


def _worker_main(rank: int, world_size: int, port: int, spec: ModelSpec, parent_pid: int) -> None:
    # Ctrl-C reaches the whole process group; rank 0 alone decides when to stop (then it sends STOP).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_exit_with_parent, args=(parent_pid,), daemon=True).start()
    if torch.device(spec.device).type == "cuda":
        torch.cuda.set_device(rank)
    _join_group(rank, world_size, port, spec.device)
    loaded = load_model(spec, rank, world_size)
    run_worker(loaded["model"], next(loaded["model"].parameters()).device)
    # Done after STOP: exit at once. Tearing down the interpreter (or the gloo group) here sometimes destroyed a
    # communication thread still joinable, and C++'s std::terminate made a clean stop exit -6 (1 run in ~4).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


class Workers:
    """Rank 0's handle on ranks 1..world_size-1: spawn and join the group, watch them, stop them."""

    def __init__(self, spec: ModelSpec, world_size: int):
        config, raw_config = read_config(spec.path)  # refuse before spawning anything
        check_shardable(config, world_size, quantized=bool(raw_config.get("quantization")))
        device = torch.device(spec.device)
        if device.type == "cuda" and (device.index or 0) != 0:
            raise ValueError(f"--tp runs rank r on cuda:r, so rank 0 is cuda:0, not {spec.device}; choose the GPUs "
                             "with CUDA_VISIBLE_DEVICES")
        if device.type == "cuda" and torch.cuda.device_count() < world_size:
            raise ValueError(f"--tp {world_size} needs {world_size} GPUs; {torch.cuda.device_count()} visible")
        with socket.socket() as probe:  # a free loopback port for the rendezvous
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        context = torch.multiprocessing.get_context("spawn")
        self.processes = [context.Process(target=_worker_main, args=(rank, world_size, port, spec, os.getpid()),
                                          name=f"tp-rank-{rank}") for rank in range(1, world_size)]
        for process in self.processes:
            process.start()
        self.started = self.stopped = False
        threading.Thread(target=self._watch, name="tp-watchdog", daemon=True).start()
        _join_group(0, world_size, port, spec.device)

    @property
    def pids(self) -> list[int]:
        """The worker processes' ids (serve.py prints them: `kill` one and the server must stop)."""
        return [process.pid for process in self.processes]

    def _watch(self) -> None:
        """Wait on the workers; one that fails (not an exit 0 after STOP) ends the whole server with the reason."""
        running = list(self.processes)
        while running:
            multiprocessing.connection.wait([process.sentinel for process in running])
            for dead in [p for p in running if p.exitcode is not None]:
                running.remove(dead)
                if dead.exitcode != 0 and not self.stopped:
                    print(f"error: tensor-parallel worker {dead.name} (pid {dead.pid}) exited with code "
                          f"{dead.exitcode}; the model cannot run without it, so the server stops. The worker's "
                          "own error, if it printed one, is above.", file=sys.stderr, flush=True)
                    for process in running:
                        process.kill()
                    os._exit(1)  # the engine thread may be blocked in a collective that can never complete

    def start(self, num_blocks: int, block_size: int, device) -> None:
        """Tell the workers the KV pool size chosen by rank 0's engine, so every rank allocates the same blocks."""
        _broadcast_ints([num_blocks, block_size], 2, device)
        self.started = True

    def stop(self, device, timeout: float = 30.0) -> None:
        """Send the stop command, wait for the workers to exit, leave the process group."""
        if not self.started:  # (rank 0 failed before its engine existed) the workers wait for a pool size first
            self.start(0, 1, device)
        _broadcast_ints([STOP] + [0] * (_HEADER_LEN - 1), _HEADER_LEN, device)
        self.stopped = True
        for process in self.processes:
            process.join(timeout)
            if process.exitcode is None:
                process.kill()
        dist.destroy_process_group()

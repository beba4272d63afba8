"""Model parallelism on a DeviceMesh: tensor parallel (Megatron-LM, with DTensor) and pipeline parallel (GPipe, 1F1B,
interleaved 1F1B).

The world of `dp x tp x pp` ranks is one `DeviceMesh` with dims (pp, dp, tp); tp is innermost, so a tensor-parallel
group is neighbouring ranks (one node's fast links), and a pipeline hop is the rarest message, so it may cross
nodes. With 8 ranks as pp 2 x dp 2 x tp 2 (rank = 4 pp + 2 dp + tp):

                 stage 0: embedding, layers [0, L/2)        stage 1: layers [L/2, L), norm, lm_head
    dp 0   |  rank 0 | rank 1  |  -- activations -->   |  rank 4 | rank 5  |    each box: one tp group, every
    dp 1   |  rank 2 | rank 3  |  <-- gradients ----   |  rank 6 | rank 7  |    layer's heads split between two

and FSDP2 shards each stage over its dp column (ranks 0 and 2, 1 and 3, ...). The model code knows none of it:
`apply_tensor_parallel` and `pipeline_stage` rewrite a built GPT, and distributed.parallelize applies them in
torchtitan's order: tensor parallel, activation checkpointing, compile, pipeline split, then FSDP2 over dp.

Tensor parallel (Shoeybi et al. 2019), as PyTorch's `parallelize_module` plans:
    attention   wq, wk, wv column-parallel (each rank owns n_head/tp query heads and n_kv_head/tp K/V heads:
                whole GQA groups, so attention runs locally); wo row-parallel
    dense MLP   w_gate, w_up column-parallel (SwiGLU is elementwise over the hidden units); w_down row-parallel
    norms       sequence parallel: between blocks the residual stream is split along the sequence, so the
                norms (and the residual adds) run on T/tp positions; each block all-gathers the sequence before
                its column-parallel matmuls and reduce-scatters after its row-parallel ones, which moves the
                same bytes as Megatron's all-reduce but keeps 1/tp of the activations per rank
    embedding   vocabulary-parallel: each rank holds vocab/tp rows of the table (and of the LM head, which
                leaves its logits split along the vocabulary); `loss_parallel` computes the cross-entropy
                from the split logits, so the (B, T, vocab) logits are never gathered in training
    MoE         replicated: every tp rank runs the router and all experts on the whole sequence (the same
                work, no communication, identical gradients). Splitting experts along their hidden units
                would make the router's gradient a partial sum while its load-balancing term is whole on every
                rank; expert parallelism is the scalable answer and is not built here
`TP_SPLIT` names the column/row split once; serving/tensor_parallel.py reads it to hand-split the same weights.

Pipeline parallel (torch.distributed.pipelining): the layers are cut into pp contiguous stages of nearly equal
count; a step's gradient-accumulation micro-batches flow through them in the GPipe order (all forwards, then
all backwards) or 1F1B (one forward, one backward, once the pipe is full: the same bubble, fewer live
activations). The bubble is (pp - 1) / (m + pp - 1) of the step for m micro-batches. Interleaved 1F1B (Narayanan
et al. 2021, Megatron-LM's virtual stages) cuts the layers into 2 pp stages instead, rank r running stages r and
r + pp: a micro-batch passes every rank twice, each pass half as long, so the bubble shrinks to
(pp - 1) / (2 m + pp - 1), for twice the point-to-point messages. The loss is computed on the last stage and
broadcast to the others for logging.
"""
import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, loss_parallel, parallelize_module)

from nanostack.cli import SettingsError

MESH_DIMS = ("pp", "dp", "tp")
# Which way tensor parallelism cuts each projection of a block: column-parallel (dim 0 of the (out, in) weight:
# output features, and the bias with them) or row-parallel (dim 1: input features; the outputs are partial sums,
# so a bias there would be added once, after the sum: the model has none).
TP_SPLIT = {"attn.wq": "colwise", "attn.wk": "colwise", "attn.wv": "colwise", "attn.wo": "rowwise",
            "mlp.w_gate": "colwise", "mlp.w_up": "colwise", "mlp.w_down": "rowwise"}
VIRTUAL_STAGES = {"gpipe": 1, "1f1b": 1, "interleaved-1f1b": 2}  # each schedule's stages (model chunks) per pp rank
PIPELINE_SCHEDULES = tuple(VIRTUAL_STAGES)


def build_mesh(device_type: str, world_size: int, dp: int, tp: int, pp: int) -> DeviceMesh:
    """The (pp, dp, tp) mesh over all ranks; dp = 0 takes what tp and pp leave. Raises on a product != world."""
    for name, size in (("tp", tp), ("pp", pp)):
        if size < 1:
            raise SettingsError(f"--{name} must be >= 1, got {size}")
    if dp < 0:
        raise SettingsError(f"--dp must be >= 0 (0 = world size / (tp * pp)), got {dp}")
    if dp == 0:
        if world_size % (tp * pp):
            raise SettingsError(f"--tp {tp} x --pp {pp} = {tp * pp} ranks per model replica must divide the world "
                                f"size {world_size} (torchrun's ranks); change --nproc_per_node/--nnodes, --tp or --pp")
        dp = world_size // (tp * pp)
    if dp * tp * pp != world_size:
        raise SettingsError(f"the mesh --dp {dp} x --tp {tp} x --pp {pp} = {dp * tp * pp} ranks must equal the world "
                            f"size {world_size} (torchrun's ranks); change the sizes (--dp 0 takes what tp and pp "
                            f"leave) or --nproc_per_node/--nnodes")
    mesh = init_device_mesh(device_type, (pp, dp, tp), mesh_dim_names=MESH_DIMS)
    if dp > 1 and tp > 1:  # one dp x tp group: DTensor then sums a 2-D partial (the gradient norm) in one all-reduce
        mesh["dp", "tp"]._flatten()
    return mesh


def check_model_fits(config, tp: int, pp: int) -> None:
    """Raise unless the model splits evenly: whole heads, K/V heads, hidden units, vocabulary rows and sequence
    positions per tp rank; at least one layer per pipeline stage, and no layer or loss shared across stages."""
    if tp > 1:
        sizes = {"n_head": config.n_head, "n_kv_head": config.n_kv_head, "mlp_hidden": config.mlp_hidden,
                 "vocab_size": config.vocab_size, "seq_len": config.max_seq_len}
        uneven = [f"{name}={size}" for name, size in sizes.items() if size % tp]
        if uneven:
            raise SettingsError(f"--tp {tp} must divide the heads, K/V heads, MLP hidden units, vocabulary and "
                             f"sequence length, but {', '.join(uneven)} (pick a --tp that divides them)")
    if pp > 1:
        if pp > config.n_layer:
            raise SettingsError(f"--pp {pp} is larger than the model's {config.n_layer} layers: every pipeline "
                             f"stage needs at least one layer (use --pp <= {config.n_layer})")
        if config.tie_embeddings:
            raise SettingsError("--pp > 1 needs untied embeddings (the first stage's table would also be the last "
                             "stage's LM head): use --tie-embeddings false")
        if config.n_expert:
            raise SettingsError(f"--pp > 1 trains dense models only: the MoE load-balancing loss of n_expert="
                             f"{config.n_expert} would live on every stage; use --tp/--dp for MoE models")


# ----------------------------------------------------------------------------------------------------------
# Tensor parallel

def _plain_output(module, inputs, output):
    """Forward hook: the model's outputs leave as plain tensors (the loss as it is, logits gathered for eval)."""
    if not isinstance(output, DTensor):
        return output
    output = output.full_tensor()
    return output.clone() if output.dim() == 0 else output  # the loss: not a view (FSDP2 warns about those)


def _replicated_aux_loss(tp_mesh):
    """Forward hook of a replicated MoE: its auxiliary loss, identical on every rank, joins the DTensor loss."""
    def hook(module, inputs, output):
        module.aux_loss = DTensor.from_local(module.aux_loss, tp_mesh, [Replicate()])
    return hook


def apply_tensor_parallel(model: nn.Module, tp_mesh: DeviceMesh, *, plain_outputs: bool = True) -> None:
    """Shard a GPT's blocks, embedding and LM head over `tp_mesh` in place (the Megatron split, sequence parallel
    norms, vocabulary-parallel embedding and head). With plain_outputs the model returns plain tensors (the
    loss is computed from vocabulary-split logits under `loss_parallel`); without, its logits stay DTensors
    (a pipeline's last stage hands them to its loss)."""
    tp = tp_mesh.size()
    parallelize_module(model, tp_mesh, {
        "tok_emb": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),  # -> (B, T/tp, n_embd)
        "norm": SequenceParallel(),
        **({} if model.config.tie_embeddings else {  # tied: the embedding's split rows serve as the head's
            "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)}),
    })
    split = {"colwise": ColwiseParallel(), "rowwise": RowwiseParallel(output_layouts=Shard(1))}
    gather_sequence = dict(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),))
    for block in model.layers:
        plan = {"attn_norm": SequenceParallel(), "mlp_norm": SequenceParallel(),
                # attn(x, cos, sin, doc_ids, kv_cache): only x is split (along the sequence)
                "attn": PrepareModuleInput(input_layouts=(Shard(1), None, None, None, None),
                                           desired_input_layouts=(Replicate(), None, None, None, None))}
        if model.config.qk_norm:  # per-head norms over this rank's heads, q/k (B, T, heads, hd): the weight is
            # whole on every rank and its gradient sums over them, like a sequence-parallel norm's over positions
            plan.update({f"attn.{name}": SequenceParallel(sequence_dim=2, use_local_output=True)
                         for name in ("q_norm", "k_norm")})
        if model.config.n_expert:
            plan["mlp"] = PrepareModuleInput(**gather_sequence, use_local_output=True)
            block.mlp.register_forward_hook(_replicated_aux_loss(tp_mesh))
        else:
            plan["mlp"] = PrepareModuleInput(**gather_sequence)
        plan.update({name: split[kind] for name, kind in TP_SPLIT.items()
                     if name.startswith("attn.") or not model.config.n_expert})
        parallelize_module(block, tp_mesh, plan)
        if model.config.n_expert:  # whole-sequence output, identical on every rank: keep this rank's positions
            parallelize_module(block.mlp, tp_mesh, PrepareModuleOutput(output_layouts=Replicate(),
                                                                       desired_output_layouts=Shard(1)))
        block.attn.n_head //= tp  # the heads this rank computes (the projections now give n_head/tp of them)
        block.attn.n_kv_head //= tp
    if plain_outputs:
        model.register_forward_hook(_plain_output)


def vocab_parallel_loss(tp: int):
    """The context a tensor-parallel forward and backward run in: cross-entropy over vocabulary-split logits."""
    return loss_parallel() if tp > 1 else contextlib.nullcontext()


# ----------------------------------------------------------------------------------------------------------
# Pipeline parallel

def stage_layers(n_layer: int, n_stages: int, stage: int) -> range:
    """The contiguous layers of `stage`: n_layer split into n_stages runs whose lengths differ by at most one."""
    bounds = [round(i * n_layer / n_stages) for i in range(n_stages + 1)]
    return range(bounds[stage], bounds[stage + 1])


def rank_stages(pp: int, rank: int, virtual: int = 1) -> list[int]:
    """The stages pp rank `rank` runs, of virtual * pp: one, or with interleaving `virtual` of them round-robin
    (rank r: r, r + pp, ...), so a micro-batch visits every rank `virtual` times on its way through."""
    return [rank + chunk * pp for chunk in range(virtual)]


class StageChunk(nn.Module):
    """One pipeline stage, as a PipelineStage runs it: its layers, plus the embedding on the first stage and the
    final norm and LM head on the last. It holds the model's own modules (nothing is copied), so the optimizer,
    FSDP2 and checkpoints keep seeing one model per rank. Token ids (B, T) go into the first stage, hidden states
    (B, T/tp, n_embd) between stages, logits out of the last; under sequence parallelism each rank holds T/tp
    positions of the stream."""

    def __init__(self, model: nn.Module, stage: int, n_stages: int, sequence_shards: int):
        super().__init__()
        self.stage, self.n_stages, self.sequence_shards = stage, n_stages, sequence_shards
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in stage_layers(len(model.layers), n_stages, stage)})
        self.tok_emb = model.tok_emb if stage == 0 else None
        last = stage == n_stages - 1
        self.norm, self.lm_head = (model.norm, model.lm_head) if last else (None, None)  # registered: their weights
        self.lm_logits = model.lm_logits if last else None  # a bound method, not a submodule: computed as GPT does
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)

    def forward(self, x):
        if self.tok_emb is not None:
            x = self.tok_emb(x)
        seq_len = x.shape[1] * self.sequence_shards
        cos, sin = self.rope_cos[:seq_len], self.rope_sin[:seq_len]  # (T, hd): attention sees whole sequences
        for layer in self.layers.values():
            x = layer(x, cos, sin)
        return x if self.lm_logits is None else self.lm_logits(x)


def pipeline_stage(model: nn.Module, rank: int, pp: int, virtual: int = 1, sequence_shards: int = 1) -> list:
    """Cut a GPT down in place to pp rank `rank`'s stages (see rank_stages) and return them as StageChunks.
    The model keeps their layers under the whole model's names (layers.<i>...), and the embedding or the final
    norm and LM head only where its stages use them, so sharded checkpoints reshard between pipeline layouts."""
    chunks = [StageChunk(model, stage, pp * virtual, sequence_shards) for stage in rank_stages(pp, rank, virtual)]
    model.layers = nn.ModuleDict({name: layer for chunk in chunks for name, layer in chunk.layers.items()})
    if chunks[0].tok_emb is None:  # stage 0 is the first chunk of rank 0, the last stage the last chunk of pp - 1
        model.tok_emb = None
    if chunks[-1].norm is None:
        model.norm = model.lm_head = None
    return chunks


def blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks this rank holds (all of them, or its pipeline stages')."""
    return list(model.layers.values() if isinstance(model.layers, nn.ModuleDict) else model.layers)


def next_token_loss(logits, targets):
    """The last stage's loss: mean cross-entropy over targets != -1 (vocabulary-split logits under tp)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)


class Pipeline:
    """This rank's stages (one, or two chunks when interleaved) and their schedule. `step(micro_batches)` runs
    one optimizer step's forward and backward passes in the schedule's order; calling it on inputs runs forward
    only (logits on the last stage)."""

    def __init__(self, chunks: list[StageChunk], mesh: DeviceMesh, schedule: str, n_microbatches: int,
                 device: torch.device):
        from torch.distributed.pipelining import (PipelineStage, Schedule1F1B, ScheduleGPipe,
                                                  ScheduleInterleaved1F1B)
        pp_mesh = mesh["pp"]
        self.group, self.tp = pp_mesh.get_group(), mesh["tp"].size()
        self.is_first, self.is_last = chunks[0].stage == 0, chunks[-1].stage == chunks[-1].n_stages - 1
        self.last_stage_rank = dist.get_global_rank(self.group, pp_mesh.size() - 1)
        self.device = device
        stages = [PipelineStage(chunk, chunk.stage, chunk.n_stages, device, group=self.group) for chunk in chunks]
        # scale_grads: gradients are divided by the micro-batch count, as `loss / grad_accum` does without pp.
        # The single-stage schedules take one stage, the multi-stage one the list.
        kind = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B, "interleaved-1f1b": ScheduleInterleaved1F1B}[schedule]
        self.schedule = kind(stages if len(stages) > 1 else stages[0], n_microbatches, loss_fn=next_token_loss,
                             scale_grads=True)

    def _run(self, run, inputs, targets, losses, **kwargs):
        args = (inputs,) if self.is_first else ()
        if self.is_last:
            kwargs.update(target=targets, losses=losses)
        with vocab_parallel_loss(self.tp):
            return run(*args, **kwargs)

    def step(self, micro_batches: list) -> torch.Tensor:
        """Forward and backward of every (inputs, targets) micro-batch; their mean loss, on every rank."""
        inputs = torch.cat([x for x, _ in micro_batches])  # (m * B, T): the schedule cuts it back into m
        targets = torch.cat([y for _, y in micro_batches])
        losses = []
        self._run(self.schedule.step, inputs, targets, losses, return_outputs=False)
        loss = torch.zeros((), device=self.device)
        if self.is_last:
            loss = torch.stack([_plain_output(None, None, x) for x in losses]).mean().detach()
        dist.broadcast(loss, src=self.last_stage_rank, group=self.group)
        return loss

    def __call__(self, inputs: torch.Tensor) -> torch.Tensor | None:
        """Forward only: logits (B, T, vocab) on the last stage (gathered under tp), None on the others."""
        placeholder = torch.zeros_like(inputs)  # the schedule always computes a loss on the last stage
        logits = self._run(self.schedule.eval, inputs, placeholder, None)
        return _plain_output(None, None, logits) if self.is_last else None


# ----------------------------------------------------------------------------------------------------------
# Gradient clipping over the whole mesh

def clip_grad_norm_(parameters, max_norm: float, mesh: DeviceMesh | None = None) -> torch.Tensor:
    """Scale gradients down to a global L2 norm of at most max_norm; return the norm before clipping.

    The norm covers every rank's share: DTensor gradients (FSDP2 and tp shards) reduce over their own mesh,
    plain ones (replicated) count once, and pipeline stages, which hold different parameters, add their
    squared norms over the pp dimension of `mesh`."""
    by_mesh: dict = {}  # foreach ops take DTensors of one mesh, or plain tensors, at a time
    for p in parameters:
        if p.grad is not None:
            by_mesh.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p)
    norms = []
    for group in by_mesh.values():
        norm = torch.nn.utils.get_total_norm([p.grad for p in group])
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = norms[0] if len(norms) == 1 else torch.linalg.vector_norm(torch.stack(norms))
    if mesh is not None and mesh["pp"].size() > 1:
        squared = total.square()
        dist.all_reduce(squared, group=mesh["pp"].get_group())
        total = squared.sqrt()
    for group in by_mesh.values():
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total

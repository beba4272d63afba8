"""A decoder-only transformer in the Llama / Mixtral mould, small enough to read in one sitting.

The token stream goes: embedding -> n_layer x Block -> RMSNorm -> lm_head. Each Block is pre-norm:

    x = x + attn(attn_norm(x))      causal self-attention, RoPE on q/k, grouped-query K/V heads
    x = x + mlp(mlp_norm(x))        SwiGLU MLP, or a Mixture-of-Experts of SwiGLU MLPs

Conventions follow Hugging Face Llama/Mixtral (RMSNorm computed in fp32, RoPE in the "rotate_half" layout
where dimension i pairs with i + head_dim/2), so a checkpoint maps onto LlamaForCausalLM / MixtralForCausalLM by
renaming parameters, with no permutation (nanostack/hf.py). The config fields that default off cover the other
families: biases on q/k/v (Qwen2), an RMSNorm per head on q and k (Qwen3), a head_dim of its own (Qwen3), scaled
RoPE (Llama 3.1's "llama3", "linear", YaRN), a sliding attention window (Mistral) and un-renormalised top-k
gates (Qwen3-MoE).

`attention()` is the one place that picks the attention backend (Triton flash kernel on CUDA, torch SDPA
elsewhere), and `paged_attention()` its twin for serving. RoPE is applied from cos/sin tables gathered by
position, and `Attention.project_qkv` is separate from the attention itself, so the serving forward reuses the
same blocks: `GPT.forward_serving` runs the tokens of many sequences flattened into one row, each at its own
position, with a `kv_cache` (a `PagedKV`) whose `attend()` writes K/V into a paged pool and reads it back. The
attention metadata rides in that object (nano-vllm keeps it in a global context instead) so that no forward
signature grows a serving-only argument.
"""
import math
from dataclasses import dataclass, fields

import torch
import torch.nn as nn
import torch.nn.functional as F

from nanostack.rope import apply_rope, rope_cos_sin, rope_frequencies
from nanostack.sampling import SamplingParams, sample

# Turn off to force the torch SDPA path on CUDA too (debugging, or comparing against the kernel).
USE_FLASH_KERNEL = True


@dataclass
class ModelConfig:
    """Shape of the model. `mlp_hidden=0` is replaced by the derived width, so a saved config is explicit."""
    vocab_size: int = 8192          # token ids the embedding and LM head cover (the tokenizer's vocab_size)
    n_layer: int = 4                # transformer blocks
    n_head: int = 4                 # query heads per attention layer
    n_kv_head: int = 4              # key/value heads (grouped-query attention): must divide n_head
    n_embd: int = 256               # residual width
    head_dim: int = 0               # width of one attention head; 0 = n_embd // n_head
    mlp_hidden: int = 0             # SwiGLU hidden width; 0 = ~8/3 * n_embd rounded up to a multiple of 64
    max_seq_len: int = 512          # longest sequence (RoPE tables and KV caches are sized for it)
    rope_theta: float = 10000.0     # RoPE base: larger stretches the positions a rotation period covers
    rope_scaling: dict | None = None  # scaled RoPE in Hugging Face's words: {"rope_type": "linear", "factor": 2.0}
    qkv_bias: bool = False          # biases on the q/k/v projections (Qwen2)
    qk_norm: bool = False           # RMSNorm over each head of q and k before RoPE (Qwen3)
    sliding_window: int = 0         # 0 = full causal attention; W = each token sees itself and the W - 1 before it
    norm_eps: float = 1e-5          # RMSNorm epsilon
    tie_embeddings: bool = False    # share the token embedding with the LM head
    n_expert: int = 0               # 0 = dense SwiGLU MLP; >0 = Mixture-of-Experts MLP in every block
    n_expert_active: int = 2        # experts each token is routed to (top-k)
    moe_renormalize: bool = True    # rescale the top-k gates to sum to 1 (Mixtral; Qwen3-MoE's norm_topk_prob)
    moe_aux_loss_coef: float = 0.01  # weight of the load-balancing loss (keeps experts evenly used)
    moe_z_loss_coef: float = 0.001  # weight of the router z-loss (keeps router logits small and stable)

    def __post_init__(self):
        for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "n_embd", "max_seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("head_dim", "mlp_hidden", "sliding_window", "n_expert", "moe_aux_loss_coef", "moe_z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.rope_theta <= 0 or self.norm_eps <= 0:
            raise ValueError(f"rope_theta and norm_eps must be > 0, got {self.rope_theta} and {self.norm_eps}")
        if self.head_dim == 0:
            if self.n_embd % self.n_head:
                raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} (or set head_dim)")
            self.head_dim = self.n_embd // self.n_head
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        rope_frequencies(self.head_dim, self.rope_theta, self.rope_scaling)  # raises on a bad rope_scaling
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head={self.n_kv_head} must divide n_head={self.n_head}")
        if self.n_expert and not 1 <= self.n_expert_active <= self.n_expert:
            raise ValueError(f"n_expert_active={self.n_expert_active} must be in 1..n_expert={self.n_expert}")
        if self.mlp_hidden == 0:
            # SwiGLU has three matrices instead of two, so 8/3 * n_embd keeps the 4 * n_embd MLP's parameter
            # count; a multiple of 64 keeps matmul tiles full.
            self.mlp_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)

    @classmethod
    def from_depth(cls, depth: int, vocab_size: int, max_seq_len: int = 512, **overrides) -> "ModelConfig":
        """One dial: depth layers, width 64 * depth, 64-wide heads; any field can still be overridden."""
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields are {sorted(known)}")
        shape = dict(n_layer=depth, n_embd=64 * depth, n_head=depth, n_kv_head=depth)
        return cls(**{**shape, "vocab_size": vocab_size, "max_seq_len": max_seq_len, **overrides})


def default_learning_rate(config: ModelConfig) -> float:
    """AdamW peak LR for this width: 6e-4 at n_embd=768, scaled as 1/n_embd, capped at 3e-3.

    The 1/width rule fits the GPT-3 paper's table (Brown et al. 2020, Table 2.1) within ~1.5x from 125M to
    6.7B parameters; the cap keeps tiny CPU models (n_embd < 154) out of the unstable region.
    """
    return min(6e-4 * 768 / config.n_embd, 3e-3)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) * weight, normalised in at least fp32 (bf16 squares lose too much) like HF Llama."""
    compute_dtype = torch.promote_types(x.dtype, torch.float32)
    x32 = x.to(compute_dtype)
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learnable per-channel weight (no mean subtraction, no bias)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms_norm(x, self.weight, self.eps)


def attention(q, k, v, *, causal: bool = True, doc_ids=None, window: int = 0) -> torch.Tensor:
    """Softmax attention: q (B, T, n_head, hd), k/v (B, S, n_kv_head, hd) -> (B, T, n_head, hd).

    T <= S; query i sits at key position S - T + i (a decode step sees the whole cache). doc_ids (B, S), one
    id per key position, keeps attention inside contiguous runs of equal id; queries take the last T ids.
    window > 0 (causal only) lets each query see only the `window` key positions ending at its own.
    """
    batch, q_len, n_head, head_dim = q.shape
    k_len, n_kv_head = k.shape[1], k.shape[2]
    if n_head % n_kv_head:
        raise ValueError(f"query heads {n_head} must be a multiple of key/value heads {n_kv_head}")
    if q_len > k_len:
        raise ValueError(f"query length {q_len} must be <= key length {k_len}")
    if doc_ids is not None and doc_ids.shape != (batch, k_len):
        raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} must be (batch, key length) = {(batch, k_len)}")
    if window and not causal:
        raise ValueError(f"a sliding window ({window}) needs causal attention")
    # A window as long as every key masks nothing; an export keeps it, as its key length is not fixed yet.
    window = window if torch.compiler.is_exporting() or k_len > window else 0
    # The Triton kernel has no document or window masks: those fall back to SDPA with an explicit mask.
    if USE_FLASH_KERNEL and q.is_cuda and doc_ids is None and not window:
        from kernels.flash_attention import flash_attention  # Triton: imported only where it can run
        return flash_attention(q, k, v, causal=causal)

    mask = None
    if doc_ids is not None or window or (causal and q_len != k_len):
        key_pos = torch.arange(k_len, device=q.device)
        query_pos = key_pos[k_len - q_len:]
        mask = torch.ones(1, 1, q_len, k_len, dtype=torch.bool, device=q.device)  # (B or 1, 1, T, S)
        if causal:
            mask = mask & (key_pos[None, :] <= query_pos[:, None])
        if window:
            mask = mask & (key_pos[None, :] > query_pos[:, None] - window)
        if doc_ids is not None:
            mask = mask & (doc_ids[:, None, k_len - q_len:, None] == doc_ids[:, None, None, :])
    # SDPA wants heads before length: (B, heads, len, hd). enable_gqa shares each K/V head across its group.
    y = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
        is_causal=causal and mask is None, enable_gqa=n_kv_head != n_head)
    return y.transpose(1, 2)


class KVCache:
    """Contiguous K/V for incremental decoding: k and v are (n_layer, B, max_len, n_kv_head, head_dim)."""

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (config.n_layer, batch_size, max_len, config.n_kv_head, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.length = 0  # positions filled; advanced once per model forward, after every layer wrote

    def update(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Append k/v (B, T, n_kv_head, hd) at the current length; return all K/V so far, (B, length+T, ...)."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} would be needed")
        self.k[layer_idx, :, self.length:end] = k
        self.v[layer_idx, :, self.length:end] = v
        return self.k[layer_idx, :, :end], self.v[layer_idx, :, :end]

    def advance(self, n_tokens: int):
        """Mark n_tokens more positions as filled (call once per forward)."""
        self.length += n_tokens

    def attend(self, layer_idx: int, q, k, v, window: int = 0) -> torch.Tensor:
        """Append this step's k/v, then attend from q (B, T, n_head, hd) over everything cached so far."""
        k, v = self.update(layer_idx, k, v)  # (B, S, n_kv_head, hd), S = cached + T
        return attention(q, k, v, causal=True, window=window)


@dataclass
class PagedBatch:
    """Where the flattened tokens of one serving step sit in the paged KV cache (built by serving/engine.py).

    Tokens [0, num_prefill_tokens) are prefill chunks, one sequence after another: each chunk attends causally
    to its sequence's cached prefix and to itself. The remaining tokens are single (decode) tokens, one per
    sequence, each attending to its whole context through its block table."""
    positions: torch.Tensor            # (N,) position of each token in its sequence, for RoPE
    slot_mapping: torch.Tensor         # (N,) pool slot (block_id * block_size + offset) taking each token's K/V
    num_prefill_tokens: int
    cu_seqlens_q: torch.Tensor         # (P + 1,) int32 offsets of the prefill chunks among the tokens
    cu_seqlens_k: torch.Tensor         # (P + 1,) int32 offsets of their keys: cached prefix + the chunk
    max_seqlen_q: int
    max_seqlen_k: int
    prefill_key_slots: torch.Tensor    # (total keys,) pool slot of every prefill key, in cu_seqlens_k order
    decode_block_tables: torch.Tensor  # (D, max_blocks) int32 block ids of each decoding sequence
    decode_context_lens: torch.Tensor  # (D,) int32 keys each decode token sees, itself included
    logits_indices: torch.Tensor       # (L,) the tokens whose logits are wanted


def paged_attention(q, k, v, k_pool, v_pool, batch: PagedBatch, *, use_kernels: bool | None = None,
                    window: int = 0) -> torch.Tensor:
    """Serving attention: store this step's k/v (N, n_kv_head, hd) in the layer's pools, then attend from q
    (N, n_head, hd): prefill chunks over their cached prefix + themselves, decode tokens over their blocks;
    with a sliding `window`, over the last `window` positions only.

    The Triton kernels (default: on CUDA) read the pools directly. Otherwise each sequence's keys are gathered
    out of the pools and torch SDPA runs on them (for decode ~3x faster on CPU than the kernel's reference).
    The kernels have no window, so a windowed model always takes the SDPA path with the window as a mask: exact,
    but no cheaper (every block stays in the pool and the masked scores are still computed)."""
    from kernels.paged_attention import paged_decode_attention, write_kv
    write_kv(k_pool, v_pool, k, v, batch.slot_mapping)
    use_kernels = USE_FLASH_KERNEL and q.is_cuda if use_kernels is None else use_kernels
    use_kernels = use_kernels and not window
    num_prefill = batch.num_prefill_tokens
    k_slots, v_slots = k_pool.flatten(0, 1), v_pool.flatten(0, 1)  # (num_blocks * block_size, n_kv_head, hd)
    out = torch.empty_like(q)  # (N, n_head, hd)
    if num_prefill:
        keys = k_slots.index_select(0, batch.prefill_key_slots)  # (total keys, n_kv_head, hd)
        values = v_slots.index_select(0, batch.prefill_key_slots)
        if use_kernels:
            from kernels.flash_attention import flash_attention
            out[:num_prefill] = flash_attention(
                q[:num_prefill], keys, values, causal=True, cu_seqlens_q=batch.cu_seqlens_q,
                cu_seqlens_k=batch.cu_seqlens_k, max_seqlen_q=batch.max_seqlen_q, max_seqlen_k=batch.max_seqlen_k)
        else:
            cu_q, cu_k = batch.cu_seqlens_q.tolist(), batch.cu_seqlens_k.tolist()
            for q0, q1, k0, k1 in zip(cu_q, cu_q[1:], cu_k, cu_k[1:]):
                out[q0:q1] = attention(q[None, q0:q1], keys[None, k0:k1], values[None, k0:k1], window=window)[0]
    if num_prefill < q.shape[0]:
        q_decode, tables, context_lens = q[num_prefill:], batch.decode_block_tables, batch.decode_context_lens
        if use_kernels:
            paged_decode_attention(q_decode, k_pool, v_pool, tables, context_lens, out=out[num_prefill:])
        else:
            # Whole blocks in table order; the padding entries of the tables gather block 0, which is masked.
            num_seqs, max_context = tables.shape[0], tables.shape[1] * k_pool.shape[1]
            keys = k_pool.index_select(0, tables.flatten()).view(num_seqs, max_context, *k_pool.shape[2:])
            values = v_pool.index_select(0, tables.flatten()).view(num_seqs, max_context, *v_pool.shape[2:])
            key_pos = torch.arange(max_context, device=q.device)[None, :]
            visible = key_pos < context_lens[:, None]  # (D, max ctx)
            if window:
                visible &= key_pos >= context_lens[:, None] - window
            y = F.scaled_dot_product_attention(  # one query per sequence: (D, n_head, 1, hd)
                q_decode[:, :, None], keys.transpose(1, 2), values.transpose(1, 2), attn_mask=visible[:, None, None],
                enable_gqa=keys.shape[2] != q.shape[1])
            out[num_prefill:] = y[:, :, 0]
    return out


@dataclass
class PagedKV:
    """Every layer's K/V pools plus this step's PagedBatch: the `kv_cache` of a serving forward."""
    k_pools: list
    v_pools: list
    batch: PagedBatch

    def attend(self, layer_idx: int, q, k, v, window: int = 0) -> torch.Tensor:
        """Attention of one layer over the paged cache, see paged_attention."""
        return paged_attention(q, k, v, self.k_pools[layer_idx], self.v_pools[layer_idx], self.batch, window=window)


class Attention(nn.Module):
    """Grouped-query self-attention: n_head query heads share n_kv_head K/V heads; RoPE on q and k (after a
    per-head RMSNorm with qk_norm)."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx, self.window = layer_idx, config.sliding_window
        self.n_head, self.n_kv_head, self.head_dim = config.n_head, config.n_kv_head, config.head_dim
        self.wq = nn.Linear(config.n_embd, config.n_head * config.head_dim, bias=config.qkv_bias)
        self.wk = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.wv = nn.Linear(config.n_embd, config.n_kv_head * config.head_dim, bias=config.qkv_bias)
        self.wo = nn.Linear(config.n_head * config.head_dim, config.n_embd, bias=False)
        if config.qk_norm:  # one weight per head dimension, shared by every head (so tensor parallel keeps it whole)
            self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def project_qkv(self, x, cos, sin):
        """x (..., n_embd) -> q (..., n_head, hd), k and v (..., n_kv_head, hd), RoPE applied to q and k."""
        q = self.wq(x).unflatten(-1, (self.n_head, self.head_dim))
        k = self.wk(x).unflatten(-1, (self.n_kv_head, self.head_dim))
        v = self.wv(x).unflatten(-1, (self.n_kv_head, self.head_dim))
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin), v

    def forward(self, x, cos, sin, doc_ids=None, kv_cache=None):
        q, k, v = self.project_qkv(x, cos, sin)  # (B, T, heads, hd), or (N, heads, hd) when serving
        if kv_cache is None:
            y = attention(q, k, v, causal=True, doc_ids=doc_ids, window=self.window)
        else:  # a KVCache or a PagedKV: each knows where its keys live
            y = kv_cache.attend(self.layer_idx, q, k, v, self.window)
        return self.wo(y.flatten(-2))


def swiglu(x, w_gate, w_up, w_down):
    """w_down(silu(w_gate(x)) * w_up(x)) with weights in nn.Linear's (out, in) layout."""
    return F.linear(F.silu(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


class MLP(nn.Module):
    """Dense SwiGLU feed-forward."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.w_gate = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.w_up = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.w_down = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)

    def forward(self, x):
        # Calls the Linear modules (not swiglu on their weights), so int8 or LoRA linears can stand in for them.
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Experts(nn.Module):
    """n_expert SwiGLU MLPs stacked into (n_expert, out, in) tensors so dispatch can index them."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        n_expert, n_embd, hidden = config.n_expert, config.n_embd, config.mlp_hidden
        # Left uninitialised here: GPT.init_weights fills every parameter by name.
        self.w_gate = nn.Parameter(torch.empty(n_expert, hidden, n_embd))
        self.w_up = nn.Parameter(torch.empty(n_expert, hidden, n_embd))
        self.w_down = nn.Parameter(torch.empty(n_expert, n_embd, hidden))

    def forward(self, x_sorted, tokens_per_expert: torch.Tensor):
        """x_sorted (N*k, n_embd) grouped by expert, tokens_per_expert[e] rows each -> (N*k, n_embd).

        For inference, torch._grouped_mm runs each weight's n_expert matmuls in one call that reads the group
        offsets on the device (with bf16 on Hopper, a CUTLASS grouped GEMM: no host sync, so CUDA graphs can
        capture it). Otherwise (training: its backward is not supported everywhere; autocast; an older torch;
        rows not 16-byte aligned) each expert runs on its slice, whose size is read back to the host."""
        w_gate, w_up, w_down = self.w_gate, self.w_up, self.w_down
        if _grouped_mm_applies(x_sorted, w_gate, w_down):
            offsets = tokens_per_expert.cumsum(0).to(torch.int32)  # (n_expert,) end row of each expert's group
            gate = torch._grouped_mm(x_sorted, w_gate.transpose(1, 2), offs=offsets)  # (N*k, hidden)
            up = torch._grouped_mm(x_sorted, w_up.transpose(1, 2), offs=offsets)
            return torch._grouped_mm(F.silu(gate) * up, w_down.transpose(1, 2), offs=offsets)
        chunks = x_sorted.split(tokens_per_expert.tolist())
        return torch.cat([swiglu(chunk, w_gate[e], w_up[e], w_down[e]) for e, chunk in enumerate(chunks)])


def _grouped_mm_applies(x, w_in, w_out) -> bool:
    """Whether Experts can use torch._grouped_mm: inference outside autocast, one 16/32-bit float dtype,
    16-byte-aligned rows."""
    aligned = all(w.shape[-1] * w.element_size() % 16 == 0 for w in (w_in, w_out))
    return (hasattr(torch, "_grouped_mm") and not torch.is_grad_enabled() and x.dtype == w_in.dtype
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16)
            and not torch.is_autocast_enabled(x.device.type) and aligned)


class MoE(nn.Module):
    """Mixtral-style MoE: softmax router, top-k experts per token with renormalised gates (or, as Qwen3-MoE may,
    the top-k softmax probabilities as they are), dropless dispatch."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_expert, self.n_active, self.renormalize = config.n_expert, config.n_expert_active, config.moe_renormalize
        self.aux_coef, self.z_coef = config.moe_aux_loss_coef, config.moe_z_loss_coef
        self.router = nn.Linear(config.n_embd, config.n_expert, bias=False)
        self.experts = Experts(config)
        self.aux_loss = None     # scalar, set by forward: weighted balance + z loss
        self.expert_load = None  # (n_expert,), set by forward: share of routed (token, slot) pairs per expert

    def route(self, x_flat):
        """x_flat (N, n_embd) -> router logits and probabilities (N, n_expert) in fp32 (or wider), and each
        token's top-k gates and experts (N, k). Separate from the dispatch so the ONNX export routes the same way."""
        router_logits = self.router(x_flat)  # (N, n_expert)
        router_logits = router_logits.to(torch.promote_types(router_logits.dtype, torch.float32))
        router_probs = router_logits.softmax(dim=-1)
        # Renormalised, this is Mixtral's softmax over the top-k logits; without, Qwen3-MoE's norm_topk_prob=false.
        gates, chosen = router_probs.topk(self.n_active, dim=-1)  # (N, k) each
        if self.renormalize:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return router_logits, router_probs, gates, chosen

    def forward(self, x):
        x_flat = x.reshape(-1, x.shape[-1])  # (N, n_embd)
        router_logits, router_probs, gates, chosen = self.route(x_flat)

        # Dropless dispatch: sort the N*k (token, slot) assignments by expert so each expert runs one matmul
        # on a contiguous slice, then scatter-add the gated outputs back to their tokens.
        expert_of_slot = chosen.flatten()  # (N*k,)
        order = expert_of_slot.argsort(stable=True)
        token_of_sorted = order // self.n_active  # (N*k,) row in x_flat of each sorted assignment
        # Counted on the device: bincount would read the largest id back to the host to size its output.
        expert_ids = torch.arange(self.n_expert, device=x.device)
        tokens_per_expert = (expert_of_slot[:, None] == expert_ids).sum(dim=0)  # (n_expert,)
        expert_out = self.experts(x_flat[token_of_sorted], tokens_per_expert)  # (N*k, n_embd)
        expert_out = expert_out * gates.flatten()[order, None].to(expert_out.dtype)
        # expert_out's dtype, not x's: under autocast the experts run in bf16 while x is still fp32.
        y = torch.zeros_like(x_flat, dtype=expert_out.dtype).index_add_(0, token_of_sorted, expert_out)

        # Switch/Mixtral balance loss n_expert * sum_e f_e * P_e (1.0 when uniform), f_e the share of
        # assignments, P_e the mean router probability; z-loss keeps router logits small (ST-MoE).
        load = tokens_per_expert.to(router_probs.dtype) / expert_of_slot.numel()
        balance_loss = self.n_expert * (load * router_probs.mean(dim=0)).sum()
        z_loss = torch.logsumexp(router_logits, dim=-1).square().mean()
        self.aux_loss = self.aux_coef * balance_loss + self.z_coef * z_loss
        self.expert_load = load.detach()
        return y.view_as(x)


class Block(nn.Module):
    """One pre-norm transformer layer: attention then MLP, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.attn = Attention(config, layer_idx)
        self.mlp_norm = RMSNorm(config.n_embd, config.norm_eps)
        self.mlp = MoE(config) if config.n_expert else MLP(config)

    def forward(self, x, cos, sin, doc_ids=None, kv_cache=None):
        x = x + self.attn(self.attn_norm(x), cos, sin, doc_ids, kv_cache)
        return x + self.mlp(self.mlp_norm(x))


def positions_in_documents(doc_ids: torch.Tensor):
    """For packed rows doc_ids (B, T): each token's position inside its document, and a document index per
    contiguous run (so an id reused later in the row still starts a new document). Both (B, T)."""
    new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
    new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    token_idx = torch.arange(doc_ids.shape[1], device=doc_ids.device).expand_as(doc_ids)
    doc_start = torch.where(new_doc, token_idx, 0).cummax(dim=1).values
    return token_idx - doc_start, new_doc.cumsum(dim=1)


class GPT(nn.Module):
    """The decoder: token embedding, n_layer Blocks, final norm, lm_head (or the tied embedding)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layer))
        self.norm = RMSNorm(config.n_embd, config.norm_eps)
        if not config.tie_embeddings:
            self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Not saved: derived from the config. Cast along with the model (bf16 tables are coarse but cheap).
        self.register_buffer("rope_cos", None, persistent=False)
        self.register_buffer("rope_sin", None, persistent=False)
        self.reset_rope()
        self.moe_aux_loss = torch.zeros(())
        self.init_weights()

    def reset_rope(self, dtype=torch.float32, device=None) -> None:
        """(Re)build the RoPE tables from the config: a model materialised from the meta device needs this."""
        c = self.config
        self.rope_cos, self.rope_sin = rope_cos_sin(c.head_dim, c.max_seq_len, c.rope_theta, dtype, device,
                                                    scaling=c.rope_scaling)

    @torch.no_grad()
    def init_weights(self):
        """Normal(0, 0.02) matrices, with the residual-stream outputs (wo, w_down) scaled by 1/sqrt(2 n_layer)
        so the residual's variance does not grow with depth (GPT-2); norm weights start at 1, biases at 0."""
        residual_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, param in self.named_parameters():
            if name.endswith(".bias"):
                param.zero_()
            elif param.dim() == 1:
                param.fill_(1.0)
            elif name.endswith(("wo.weight", "w_down.weight", "experts.w_down")):
                param.normal_(0.0, residual_std)
            else:
                param.normal_(0.0, 0.02)

    def forward(self, idx, targets=None, *, doc_ids=None, kv_cache=None, final_hidden=False):
        """idx (B, T) -> logits (B, T, vocab) in fp32 (or wider), or, given targets, the mean cross-entropy
        over targets != -1 plus the MoE auxiliary loss. doc_ids (B, T) packs documents; kv_cache decodes;
        final_hidden returns the normed last hidden states (B, T, n_embd) instead of logits (embeddings)."""
        if idx.dim() != 2:
            raise ValueError(f"idx must be (batch, seq_len), got shape {tuple(idx.shape)}")
        batch, seq_len = idx.shape
        if doc_ids is not None and kv_cache is not None:
            raise ValueError("doc_ids and kv_cache cannot be combined: packed rows are a training-time layout")
        start = kv_cache.length if kv_cache is not None else 0
        if start + seq_len > self.config.max_seq_len:  # positions inside packed documents are smaller still
            raise ValueError(f"positions up to {start + seq_len - 1} exceed max_seq_len={self.config.max_seq_len}")
        if doc_ids is not None:
            if doc_ids.shape != idx.shape:
                raise ValueError(f"doc_ids shape {tuple(doc_ids.shape)} must match idx {tuple(idx.shape)}")
            positions, doc_ids = positions_in_documents(doc_ids)  # (B, T) each
        else:
            positions = torch.arange(start, start + seq_len, device=idx.device)  # (T,)
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # (T, hd) or (B, T, hd)

        x = self.tok_emb(idx)  # (B, T, n_embd)
        for layer in self.layers:
            x = layer(x, cos, sin, doc_ids, kv_cache)
        if kv_cache is not None:
            kv_cache.advance(seq_len)
        if final_hidden:
            return self.norm(x)
        logits = self.lm_logits(x)  # (B, T, vocab)

        if self.config.n_expert:
            # Mean over layers, so the coefficients need no retuning when the depth changes.
            self.moe_aux_loss = torch.stack([layer.mlp.aux_loss for layer in self.layers]).mean()
        else:
            self.moe_aux_loss = torch.zeros((), device=idx.device)
        if targets is None:
            return logits
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} must match idx {tuple(idx.shape)}")
        loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
        return loss + self.moe_aux_loss

    def lm_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head: hidden states (..., n_embd) -> logits (..., vocab) in fp32 (or wider)."""
        x = self.norm(x)
        logits = self.lm_head(x) if not self.config.tie_embeddings else F.linear(x, self.tok_emb.weight)
        return logits.to(torch.promote_types(logits.dtype, torch.float32))

    def forward_serving(self, token_ids: torch.Tensor, batch: PagedBatch, k_pools, v_pools) -> torch.Tensor:
        """Serving forward: token_ids (N,) of many sequences laid end to end (prefill chunks, then decode tokens)
        at batch.positions, K/V written into and read from the paged pools (one per layer). Returns logits
        (len(batch.logits_indices), vocab) for the tokens that need them only."""
        cos, sin = self.rope_cos[batch.positions], self.rope_sin[batch.positions]  # (N, hd)
        paged_kv = PagedKV(k_pools, v_pools, batch)
        x = self.tok_emb(token_ids)  # (N, n_embd): no batch dimension, each token carries its own position
        for layer in self.layers:
            x = layer(x, cos, sin, kv_cache=paged_kv)
        return self.lm_logits(x[batch.logits_indices])

    def kv_layout(self) -> tuple[int, int, int]:
        """(n_layer, n_kv_head, head_dim) of the K/V this model computes: with tensor parallelism, its rank's heads."""
        attn = self.layers[0].attn
        return len(self.layers), attn.n_kv_head, attn.head_dim

    def moe_expert_load(self):
        """(n_layer, n_expert) share of the last forward's routed (token, slot) pairs per expert; None if dense."""
        if not self.config.n_expert:
            return None
        return torch.stack([layer.mlp.expert_load for layer in self.layers])

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (tied weights once); non_embedding drops the token embedding and lm_head tables."""
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            if not self.config.tie_embeddings:
                total -= self.lm_head.weight.numel()
        return total

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training (forward + backward) FLOPs per token at seq_len (default max_seq_len), for MFU.

        6 per weight multiply-add (2 forward, 4 backward) over every matmul a token touches: projections,
        the router and its k active experts, lm_head (the embedding lookup is not a matmul). Attention adds
        QK^T and AV over the full seq_len keys, as PaLM/nanoGPT count it, although causal masking wastes half.
        """
        c = self.config
        seq_len = c.max_seq_len if seq_len is None else seq_len
        attn_weights = c.n_embd * c.head_dim * (2 * c.n_head + 2 * c.n_kv_head)  # wq, wo, wk, wv
        if c.n_expert:
            mlp_weights = c.n_embd * c.n_expert + c.n_expert_active * 3 * c.n_embd * c.mlp_hidden
        else:
            mlp_weights = 3 * c.n_embd * c.mlp_hidden
        matmul_weights = c.n_layer * (attn_weights + mlp_weights) + c.vocab_size * c.n_embd
        attn_score_macs = c.n_layer * 2 * c.n_head * c.head_dim * seq_len  # QK^T + AV per query token
        return 6.0 * (matmul_weights + attn_score_macs)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, stop_ids=None, generator=None):
        """Append up to max_new_tokens sampled tokens to idx (B, T) using a KV cache; temperature 0 is greedy.

        A row that emits a token in stop_ids is padded with that token; decoding ends once every row stopped.
        """
        batch, prompt_len = idx.shape
        total_len = prompt_len + max_new_tokens
        if total_len > self.config.max_seq_len:
            raise ValueError(f"prompt {prompt_len} + max_new_tokens {max_new_tokens} exceeds "
                             f"max_seq_len={self.config.max_seq_len}")
        # The same sampler as the server (it validates temperature and top_k); every row shares `generator`.
        params = SamplingParams(max_tokens=max(max_new_tokens, 1), temperature=temperature, top_k=top_k or 0)
        kv_cache = KVCache(self.config, batch, total_len, idx.device, self.norm.weight.dtype)
        stop_ids = torch.tensor(sorted(stop_ids or []), dtype=idx.dtype, device=idx.device)
        stopped = torch.zeros(batch, dtype=torch.bool, device=idx.device)
        tokens = [idx]
        logits = self(idx, kv_cache=kv_cache)[:, -1]  # (B, vocab)
        for step in range(max_new_tokens):
            if step:
                logits = self(tokens[-1], kv_cache=kv_cache)[:, -1]
            sampled = sample(logits, [params] * batch, [generator] * batch).token_ids
            next_token = torch.tensor(sampled, dtype=idx.dtype, device=idx.device)  # (B,)
            next_token = torch.where(stopped, tokens[-1][:, -1], next_token)
            tokens.append(next_token[:, None])
            stopped |= torch.isin(next_token, stop_ids)
            if stopped.all():
                break
        return torch.cat(tokens, dim=1)

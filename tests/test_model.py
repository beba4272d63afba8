"""Tests for nanostack/model.py: every piece against a naive float64 twin written here, and whole-model
identities (causality, GQA = repeated MHA, one-expert MoE = dense MLP, packing = separate documents,
KV-cache decoding = full forward, flops_per_token = torch's FLOP counter)."""
import functools
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from nanostack import model as model_module
from nanostack.model import (GPT, KVCache, MoE, MLP, ModelConfig, RMSNorm, attention, default_learning_rate,
                             positions_in_documents)
from nanostack.rope import apply_rope, rope_cos_sin
from nanostack.sampling import SamplingParams, sample

VOCAB = 61


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core machine OpenMP's thread handoffs
    made each forward ~50x slower; restore the setting for the other test files."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def tiny_config(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, mlp_hidden=48, max_seq_len=64)
    return ModelConfig(**{**base, **overrides})


def make_model(seed=0, **overrides) -> GPT:
    torch.manual_seed(seed)
    model = GPT(tiny_config(**overrides)).double().eval()
    with torch.no_grad():  # biases start at zero: make them count (no draw at all for bias-free models)
        for name, param in model.named_parameters():
            if name.endswith(".bias"):
                param.normal_(0.0, 0.5)
    return model


@functools.lru_cache(maxsize=None)
def cached_model(**overrides) -> GPT:
    """One model per config for hypothesis tests, which must not rebuild it for every example."""
    return make_model(**overrides)


# ----------------------------------------------------------------------------------------------------------
# Naive float64 references

def naive_attention(q, k, v, causal, doc_ids=None, window=0):
    """Row by row: query i of T sits at key position S - T + i and sees keys allowed by causality, doc and the
    sliding window (its own position and the window - 1 before it)."""
    batch, q_len, n_head, head_dim = q.shape
    k_len, n_kv_head = k.shape[1], k.shape[2]
    group = n_head // n_kv_head
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(n_head):
            kv_head = h // group
            for i in range(q_len):
                query_pos = k_len - q_len + i
                allowed = [j for j in range(k_len)
                           if (not causal or j <= query_pos) and (not window or query_pos - j < window)
                           and (doc_ids is None or doc_ids[b, j] == doc_ids[b, query_pos])]
                scores = [float(q[b, i, h].double() @ k[b, j, kv_head].double()) / math.sqrt(head_dim)
                          for j in allowed]
                top = max(scores)
                weights = [math.exp(s - top) for s in scores]
                total = sum(weights)
                for w, j in zip(weights, allowed):
                    out[b, i, h] += w / total * v[b, j, kv_head].double()
    return out


def naive_rope(x, positions, theta):
    """Rotate each pair (i, i + hd/2) of x (T, n_heads, hd) by angle position * theta^(-2i/hd)."""
    out = x.double().clone()
    half = x.shape[-1] // 2
    for t, pos in enumerate(positions):
        for i in range(half):
            angle = pos * theta ** (-2 * i / x.shape[-1])
            a, b = x[t, :, i].double(), x[t, :, i + half].double()
            out[t, :, i] = a * math.cos(angle) - b * math.sin(angle)
            out[t, :, i + half] = a * math.sin(angle) + b * math.cos(angle)
    return out


def naive_swiglu(x, w_gate, w_up, w_down):
    gate = x @ w_gate.T
    return ((gate / (1 + torch.exp(-gate))) * (x @ w_up.T)) @ w_down.T


@torch.no_grad()
def naive_moe(moe: MoE, x):
    """Token by token: softmax router, top-k by sorting, renormalised gates, gated sum of chosen experts."""
    x_flat = x.reshape(-1, x.shape[-1])
    experts = moe.experts
    out, chosen_count = torch.zeros_like(x_flat), [0] * moe.n_expert
    for n, token in enumerate(x_flat):
        probs = torch.softmax(moe.router.weight @ token, dim=0)
        ranked = sorted(range(moe.n_expert), key=lambda e: -float(probs[e]))[:moe.n_active]
        gate_total = sum(float(probs[e]) for e in ranked)
        for e in ranked:
            chosen_count[e] += 1
            expert_out = naive_swiglu(token[None], experts.w_gate[e], experts.w_up[e], experts.w_down[e])[0]
            out[n] += float(probs[e]) / gate_total * expert_out
    load = torch.tensor(chosen_count, dtype=torch.float64) / (len(x_flat) * moe.n_active)
    return out.view_as(x), load


# ----------------------------------------------------------------------------------------------------------
# Pieces

@pytest.mark.parametrize("q_len, k_len, n_kv_head, causal, with_docs, window", [
    (7, 7, 4, True, False, 0), (7, 7, 4, False, False, 0), (6, 6, 2, True, False, 0),
    (3, 8, 2, True, False, 0), (1, 8, 1, True, False, 0), (3, 8, 2, False, False, 0),
    (8, 8, 2, True, True, 0), (3, 8, 4, True, True, 0),
    (8, 8, 2, True, False, 3), (3, 8, 2, True, False, 2), (1, 8, 1, True, False, 4), (8, 8, 2, True, True, 2),
    (6, 6, 2, True, False, 6)])
def test_attention_matches_naive(q_len, k_len, n_kv_head, causal, with_docs, window):
    torch.manual_seed(1)
    q = torch.randn(2, q_len, 4, 8, dtype=torch.float64)
    k, v = (torch.randn(2, k_len, n_kv_head, 8, dtype=torch.float64) for _ in range(2))
    doc_ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2], [5, 5, 5, 5, 5, 7, 7, 7]])[:, :k_len] if with_docs else None
    got = attention(q, k, v, causal=causal, doc_ids=doc_ids, window=window)
    torch.testing.assert_close(got, naive_attention(q, k, v, causal, doc_ids, window), rtol=1e-10, atol=1e-10)


def test_attention_rejects_bad_shapes():
    q = torch.randn(1, 4, 6, 8)
    with pytest.raises(ValueError, match="multiple"):
        attention(q, torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8))
    with pytest.raises(ValueError, match="query length"):
        attention(q, torch.randn(1, 3, 2, 8), torch.randn(1, 3, 2, 8))
    with pytest.raises(ValueError, match="doc_ids"):
        attention(q, torch.randn(1, 4, 2, 8), torch.randn(1, 4, 2, 8), doc_ids=torch.zeros(1, 3))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton flash kernel path runs on CUDA only")
def test_flash_kernel_path_matches_sdpa(monkeypatch):
    torch.manual_seed(0)
    q = torch.randn(2, 5, 4, 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(2, 9, 2, 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kernel_out = attention(q, k, v, causal=True)
    monkeypatch.setattr(model_module, "USE_FLASH_KERNEL", False)
    torch.testing.assert_close(kernel_out, attention(q, k, v, causal=True), rtol=2e-2, atol=2e-2)


def test_rope_matches_explicit_pair_rotation():
    torch.manual_seed(2)
    head_dim, theta = 16, 500.0
    x = torch.randn(6, 3, head_dim, dtype=torch.float64)
    positions = torch.tensor([0, 1, 5, 17, 40, 63])
    cos, sin = rope_cos_sin(head_dim, 64, theta, dtype=torch.float64)
    got = apply_rope(x, cos[positions], sin[positions])
    torch.testing.assert_close(got, naive_rope(x, positions.tolist(), theta), rtol=1e-12, atol=1e-12)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(3)
    q, k = torch.randn(2, 1, 1, 32, dtype=torch.float64)
    cos, sin = rope_cos_sin(32, 100, 10000.0, dtype=torch.float64)

    def score(query_pos, key_pos):
        rq = apply_rope(q, cos[[query_pos]], sin[[query_pos]])
        rk = apply_rope(k, cos[[key_pos]], sin[[key_pos]])
        return float((rq * rk).sum())
    assert score(9, 4) == pytest.approx(score(90, 85), rel=1e-10)
    assert score(9, 4) != pytest.approx(score(9, 5), rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_rms_norm_matches_naive(dtype):
    torch.manual_seed(4)
    norm = RMSNorm(24, eps=1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 5, 24, dtype=dtype) * 7
    x64, w64 = x.double(), norm.weight.double()
    expected = x64 / torch.sqrt((x64 ** 2).mean(-1, keepdim=True) + 1e-5) * w64
    tolerance = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(norm(x).double(), expected, rtol=tolerance, atol=tolerance)


def test_swiglu_mlp_matches_naive():
    torch.manual_seed(5)
    mlp = MLP(tiny_config()).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    expected = naive_swiglu(x, mlp.w_gate.weight, mlp.w_up.weight, mlp.w_down.weight)
    torch.testing.assert_close(mlp(x), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n_expert, n_active, n_tokens", [(4, 2, 14), (8, 1, 3), (3, 3, 6)])
def test_moe_dispatch_matches_per_token_loop(n_expert, n_active, n_tokens):
    torch.manual_seed(6)
    moe = MoE(tiny_config(n_expert=n_expert, n_expert_active=n_active)).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, n_tokens, 32, dtype=torch.float64)
    expected, expected_load = naive_moe(moe, x)
    torch.testing.assert_close(moe(x), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(moe.expert_load, expected_load)


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="this torch has no _grouped_mm")
def test_moe_grouped_matmul_inference_path_matches_per_token_loop():
    """Under no_grad in float32 the experts run as torch._grouped_mm (the path serving and CUDA graphs use)."""
    torch.manual_seed(8)
    moe = MoE(tiny_config(n_expert=4, n_expert_active=2)).double()
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(1, 13, 32, dtype=torch.float64)
    expected, _ = naive_moe(moe, x)
    moe.float()
    with torch.no_grad():
        assert model_module._grouped_mm_applies(x.float(), moe.experts.w_gate, moe.experts.w_down)
        got = moe(x.float())
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aux_coef, z_coef", [(1.0, 0.0), (0.0, 1.0), (0.3, 0.05)])
def test_moe_aux_losses_match_formulas(aux_coef, z_coef):
    torch.manual_seed(7)
    config = tiny_config(n_expert=4, n_expert_active=2, moe_aux_loss_coef=aux_coef, moe_z_loss_coef=z_coef)
    moe = MoE(config).double()
    torch.nn.init.normal_(moe.router.weight, std=0.5)
    x = torch.randn(20, 32, dtype=torch.float64)
    with torch.no_grad():
        moe(x)
    router = moe.router.weight.detach()
    logits = [[float(router[e] @ token) for e in range(4)] for token in x]
    probs = [[math.exp(l) / sum(math.exp(m) for m in row) for l in row] for row in logits]
    chosen = [sorted(range(4), key=lambda e: -row[e])[:2] for row in probs]
    share = [sum(e in c for c in chosen) / (20 * 2) for e in range(4)]      # f_e
    mean_prob = [sum(row[e] for row in probs) / 20 for e in range(4)]      # P_e
    balance = 4 * sum(f * p for f, p in zip(share, mean_prob))
    z_loss = sum(math.log(sum(math.exp(l) for l in row)) ** 2 for row in logits) / 20
    assert float(moe.aux_loss) == pytest.approx(aux_coef * balance + z_coef * z_loss, rel=1e-10)


# ----------------------------------------------------------------------------------------------------------
# Whole-model identities

@settings(max_examples=25, deadline=None)
@given(tokens=st.lists(st.integers(0, VOCAB - 1), min_size=2, max_size=16), data=st.data())
def test_future_tokens_never_change_past_logits(tokens, data):
    model = cached_model(n_expert=4)
    changed_at = data.draw(st.integers(0, len(tokens) - 1))
    new_token = data.draw(st.integers(0, VOCAB - 1).filter(lambda t: t != tokens[changed_at]))
    edited = tokens.copy()
    edited[changed_at] = new_token
    before = model(torch.tensor([tokens]))
    after = model(torch.tensor([edited]))
    torch.testing.assert_close(after[:, :changed_at], before[:, :changed_at], rtol=0, atol=1e-12)
    assert not torch.allclose(after[:, changed_at], before[:, changed_at])


def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = make_model(seed=8, n_kv_head=2)
    mha = make_model(seed=9, n_kv_head=4)
    state = gqa.state_dict()
    for name in list(state):
        if name.endswith(("attn.wk.weight", "attn.wv.weight")):
            per_head = state[name].view(2, 8, 32)  # (n_kv_head, head_dim, n_embd)
            state[name] = per_head.repeat_interleave(2, dim=0).reshape(32, 32)
    mha.load_state_dict(state)
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(mha(idx), gqa(idx), rtol=1e-10, atol=1e-10)


def test_one_expert_top1_moe_equals_dense_mlp():
    dense = make_model(seed=10)
    moe = make_model(seed=11, n_expert=1, n_expert_active=1)
    state = {name: tensor for name, tensor in dense.state_dict().items() if ".mlp." not in name}
    for i in range(2):
        for kind in ("w_gate", "w_up", "w_down"):
            state[f"layers.{i}.mlp.experts.{kind}"] = dense.state_dict()[f"layers.{i}.mlp.{kind}.weight"][None]
        state[f"layers.{i}.mlp.router.weight"] = moe.state_dict()[f"layers.{i}.mlp.router.weight"]
    moe.load_state_dict(state)
    idx = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(moe(idx), dense(idx), rtol=1e-10, atol=1e-10)


# The Qwen/Mistral options together: biases, per-head q/k norms, a head_dim of its own, a sliding window.
NEW_OPTIONS = {"qkv_bias": True, "qk_norm": True, "head_dim": 12, "sliding_window": 4}


@pytest.mark.parametrize("overrides", [{}, {"n_expert": 4}, NEW_OPTIONS])
def test_packed_row_equals_documents_run_alone(overrides):
    model = make_model(seed=12, **overrides)
    doc_lengths = [[5, 3, 8], [7, 4, 5]]
    # Row 1 reuses id 0 for its third document: a new contiguous run is a new document.
    doc_id_values = [[0, 1, 2], [0, 9, 0]]
    generator = torch.Generator().manual_seed(2)
    docs = [[torch.randint(0, VOCAB, (1, n), generator=generator) for n in row] for row in doc_lengths]
    idx = torch.cat([torch.cat(row, dim=1) for row in docs])  # (2, 16)
    doc_ids = torch.tensor([[d for d, n in zip(ids, row) for _ in range(n)]
                            for ids, row in zip(doc_id_values, doc_lengths)])
    packed = model(idx, doc_ids=doc_ids)
    for b, row in enumerate(docs):
        start = 0
        for doc in row:
            alone = model(doc)[0]
            torch.testing.assert_close(packed[b, start:start + doc.shape[1]], alone, rtol=1e-10, atol=1e-10)
            start += doc.shape[1]


def test_positions_restart_at_each_document():
    # RoPE scores depend only on relative positions, so logits alone cannot see the restart: check it directly.
    doc_ids = torch.tensor([[3, 3, 3, 1, 1, 3, 3, 0], [7, 7, 7, 7, 7, 7, 7, 7]])
    expected_pos, expected_doc = [], []
    for row in doc_ids.tolist():
        pos, doc = [], []
        for t, d in enumerate(row):
            new = t == 0 or d != row[t - 1]
            pos.append(0 if new else pos[-1] + 1)
            doc.append((doc[-1] if doc else 0) + new)
        expected_pos.append(pos)
        expected_doc.append(doc)
    positions, doc_index = positions_in_documents(doc_ids)
    assert positions.tolist() == expected_pos and doc_index.tolist() == expected_doc


@pytest.mark.parametrize("overrides", [{}, {"n_expert": 4, "n_expert_active": 2}, {"n_kv_head": 1}, NEW_OPTIONS])
def test_kv_cache_decoding_equals_full_forward(overrides):
    model = make_model(seed=13, **overrides)
    idx = torch.randint(0, VOCAB, (2, 14), generator=torch.Generator().manual_seed(3))
    full = model(idx)
    cache = KVCache(model.config, batch_size=2, max_len=20, dtype=torch.float64)
    chunks, start = [], 0
    for size in (5, 1, 1, 3, 2, 1, 1):  # prefill, single steps, and multi-token chunks (T < S)
        chunks.append(model(idx[:, start:start + size], kv_cache=cache))
        start += size
    assert cache.length == 14
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, rtol=1e-10, atol=1e-10)


def test_forward_rejects_bad_inputs():
    model = make_model()
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="cannot be combined"):
        model(torch.zeros(1, 4, dtype=torch.long), doc_ids=torch.zeros(1, 4, dtype=torch.long),
              kv_cache=KVCache(model.config, 1, 8))
    cache = KVCache(model.config, 1, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=cache)


@torch.no_grad()
def test_loss_is_masked_cross_entropy_plus_aux():
    model = make_model(seed=14, n_expert=4)
    generator = torch.Generator().manual_seed(4)
    idx = torch.randint(0, VOCAB, (2, 9), generator=generator)
    targets = torch.randint(0, VOCAB, (2, 9), generator=generator)
    targets[0, :4] = -1
    targets[1, 7] = -1
    loss = model(idx, targets)
    logits, aux = model(idx), model.moe_aux_loss
    kept = [(b, t) for b in range(2) for t in range(9) if targets[b, t] != -1]
    nll = [-(logits[b, t, targets[b, t]] - torch.logsumexp(logits[b, t], 0)) for b, t in kept]
    assert float(loss) == pytest.approx(float(sum(nll)) / len(kept) + float(aux), rel=1e-10)
    per_layer = [layer.mlp.aux_loss for layer in model.layers]
    assert float(aux) == pytest.approx(float(sum(per_layer)) / 2, rel=1e-12)
    assert float(aux) > 0
    assert float(make_model()(idx, targets)) > 0 and float(make_model().moe_aux_loss) == 0


def test_moe_expert_load():
    moe_model, dense_model = make_model(seed=15, n_expert=4, n_expert_active=2), make_model()
    idx = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))
    moe_model(idx)
    load = moe_model.moe_expert_load()
    assert load.shape == (2, 4)
    torch.testing.assert_close(load.sum(dim=1), torch.ones(2, dtype=torch.float64))
    torch.testing.assert_close(load[1], naive_moe(moe_model.layers[1].mlp,
                                                  moe_model.layers[1].mlp_norm(_residual_before_mlp(moe_model, idx)))[1])
    dense_model(idx)
    assert dense_model.moe_expert_load() is None


def _residual_before_mlp(model, idx):
    """The residual stream entering layer 1's MLP, recomputed through the public pieces."""
    cos, sin = model.rope_cos[:idx.shape[1]], model.rope_sin[:idx.shape[1]]
    x = model.layers[0](model.tok_emb(idx), cos, sin)
    return x + model.layers[1].attn(model.layers[1].attn_norm(x), cos, sin)


# ----------------------------------------------------------------------------------------------------------
# Generation and sampling

def greedy_without_cache(model, idx, max_new_tokens):
    for _ in range(max_new_tokens):
        idx = torch.cat([idx, model(idx)[:, -1].argmax(-1, keepdim=True)], dim=1)
    return idx


@pytest.mark.parametrize("overrides", [{}, {"n_expert": 4}])
def test_greedy_generate_equals_full_forward_argmax(overrides):
    model = make_model(seed=16, **overrides)
    prompt = torch.randint(0, VOCAB, (2, 4), generator=torch.Generator().manual_seed(6))
    torch.testing.assert_close(model.generate(prompt, 10, temperature=0), greedy_without_cache(model, prompt, 10))
    torch.testing.assert_close(model.generate(prompt, 10, top_k=1), greedy_without_cache(model, prompt, 10))


def test_generate_stops_when_every_row_hit_a_stop_id():
    model = make_model(seed=17)
    prompt = torch.randint(0, VOCAB, (2, 3), generator=torch.Generator().manual_seed(7))
    free_run = greedy_without_cache(model, prompt, 12)[:, 3:].tolist()
    stop_ids = {free_run[0][2], free_run[1][5]}
    # Expected: each row runs to its first stop id, then repeats it; the output ends when all rows stopped.
    first_stop = [next((i for i, t in enumerate(row) if t in stop_ids), len(row) - 1) for row in free_run]
    length = max(first_stop) + 1
    expected = [row[:s + 1] + [row[s]] * (length - s - 1) for row, s in zip(free_run, first_stop)]
    got = model.generate(prompt, 12, temperature=0, stop_ids=stop_ids)
    assert got[:, 3:].tolist() == expected
    assert torch.equal(got[:, :3], prompt)


def test_sampled_generate_equals_full_forward_with_same_noise():
    model = make_model(seed=18, n_expert=4)
    prompt = torch.randint(0, VOCAB, (3, 4), generator=torch.Generator().manual_seed(8))
    got = model.generate(prompt, 8, temperature=0.8, top_k=20, generator=torch.Generator().manual_seed(9))
    # Second path: no cache, the whole sequence re-run every step, the sampler fed an identically seeded generator.
    generator, params, idx = torch.Generator().manual_seed(9), SamplingParams(temperature=0.8, top_k=20), prompt
    for _ in range(8):
        next_token = sample(model(idx)[:, -1], [params] * 3, [generator] * 3).token_ids
        idx = torch.cat([idx, torch.tensor(next_token)[:, None]], dim=1)
    assert torch.equal(got, idx)
    assert not torch.equal(got, model.generate(prompt, 8, temperature=0))


def test_generate_validates_arguments():
    model = make_model()
    prompt = torch.zeros(1, 60, dtype=torch.long)
    with pytest.raises(ValueError, match="max_seq_len"):
        model.generate(prompt, 5)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(prompt[:, :2], 2, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(prompt[:, :2], 2, top_k=-1)


# ----------------------------------------------------------------------------------------------------------
# Accounting, initialisation, configuration

@pytest.mark.parametrize("overrides", [{}, {"n_expert": 4, "n_expert_active": 2}, {"tie_embeddings": True}])
def test_flops_per_token_matches_flop_counter(overrides):
    """FlopCounterMode counts every matmul of forward + backward, and with SDPA's math backend also QK^T and
    AV over the full T x T scores; it ignores the embedding lookup, norms, softmax and elementwise ops, as
    flops_per_token() does. The two should agree exactly; tolerance 1e-9 relative."""
    torch.manual_seed(18)
    model = GPT(tiny_config(**overrides))
    batch, seq_len = 2, 16
    idx = torch.randint(0, VOCAB, (batch, seq_len))
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(idx, idx).backward()
    measured = counter.get_total_flops() / (batch * seq_len)
    assert model.flops_per_token(seq_len) == pytest.approx(measured, rel=1e-9)


@pytest.mark.parametrize("tie", [False, True])
def test_num_params_matches_config_formula(tie):
    c = tiny_config(tie_embeddings=tie, n_expert=3)
    model = GPT(c)
    per_layer = (2 * c.n_embd + c.n_embd * c.head_dim * (2 * c.n_head + 2 * c.n_kv_head)
                 + c.n_expert * c.n_embd + c.n_expert * 3 * c.n_embd * c.mlp_hidden)
    embeddings = c.vocab_size * c.n_embd * (1 if tie else 2)
    assert model.num_params() == c.n_layer * per_layer + c.n_embd + embeddings
    assert model.num_params(non_embedding=True) == c.n_layer * per_layer + c.n_embd


def test_init_is_seeded_and_scales_residual_projections():
    torch.manual_seed(19)
    first = GPT(tiny_config(n_embd=64, n_head=4, n_layer=3, n_expert=2))
    torch.manual_seed(19)
    second = GPT(tiny_config(n_embd=64, n_head=4, n_layer=3, n_expert=2))
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), name
    residual_std = 0.02 / math.sqrt(2 * 3)
    for name, param in first.named_parameters():
        if param.dim() == 1:
            assert torch.all(param == 1), name
            continue
        if param.numel() < 2000:  # too few samples for a 10% check on the standard deviation
            continue
        expected = residual_std if name.endswith(("wo.weight", "experts.w_down")) else 0.02
        assert param.std().item() == pytest.approx(expected, rel=0.1), name


def test_from_depth_and_learning_rate():
    assert ModelConfig.from_depth(4, vocab_size=8192) == ModelConfig()
    config = ModelConfig.from_depth(6, vocab_size=100, max_seq_len=128, n_kv_head=2)
    assert (config.n_layer, config.n_embd, config.head_dim, config.n_kv_head) == (6, 384, 64, 2)
    assert config.mlp_hidden % 64 == 0 and 8 / 3 * 384 <= config.mlp_hidden < 8 / 3 * 384 + 64
    assert default_learning_rate(ModelConfig(n_embd=768, n_head=12)) == pytest.approx(6e-4)
    rates = [default_learning_rate(ModelConfig.from_depth(d, 100)) for d in range(1, 12)]
    assert rates == sorted(rates, reverse=True) and max(rates) <= 3e-3


@pytest.mark.parametrize("kwargs", [
    dict(n_head=4, n_kv_head=3), dict(n_embd=30, n_head=4), dict(n_embd=12, n_head=4),
    dict(n_expert=2, n_expert_active=3), dict(n_expert=2, n_expert_active=0), dict(n_layer=0),
    dict(vocab_size=0), dict(mlp_hidden=-1), dict(rope_theta=0.0), dict(norm_eps=-1e-5),
    dict(moe_z_loss_coef=-0.1), dict(head_dim=7), dict(sliding_window=-1),
    dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}), dict(rope_scaling={"rope_type": "linear"}),
    dict(rope_scaling={"rope_type": "linear", "factor": 2.0, "beta_fast": 8})])
def test_config_validation_raises_value_error(kwargs):
    with pytest.raises(ValueError):
        ModelConfig(**kwargs)


def test_from_depth_validation():
    with pytest.raises(ValueError, match="depth"):
        ModelConfig.from_depth(0, vocab_size=10)
    with pytest.raises(ValueError, match="unknown"):
        ModelConfig.from_depth(2, vocab_size=10, n_heads=4)

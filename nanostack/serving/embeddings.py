"""Embeddings: one vector per text from the model's final hidden states, for retrieval (POST /v1/embeddings).

The decoder runs over each input as in training (no KV cache) and a pooling turns its T hidden states, after the
final norm, into one vector: "mean" over the tokens, or "last", the last token's (in a causal model the only one that
has seen the whole text; embedding models trained that way name it in their sentence-transformers
1_Pooling/config.json). Vectors are L2-normalised, so a dot product is the cosine similarity. Inputs are packed end to
end into rows of at most `tokens_per_forward` tokens; document ids keep each input's attention and positions to itself
(GPT.forward's doc_ids), so a vector does not depend on what it was packed with, beyond float rounding.
"""
import json
from pathlib import Path

import torch
import torch.nn.functional as F

POOLINGS = ("mean", "last")


@torch.inference_mode()
def embed(model, inputs: list[list[int]], pooling: str = "mean", tokens_per_forward: int = 1024) -> torch.Tensor:
    """(len(inputs), n_embd) float32 unit vectors of token-id inputs (each at most tokens_per_forward long)."""
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    device, vectors, start = model.norm.weight.device, [], 0
    while start < len(inputs):
        end, total = start + 1, len(inputs[start])
        while end < len(inputs) and total + len(inputs[end]) <= tokens_per_forward:
            total += len(inputs[end])
            end += 1
        lengths = torch.tensor([len(ids) for ids in inputs[start:end]], device=device)
        doc_ids = torch.repeat_interleave(torch.arange(end - start, device=device), lengths)  # (T,)
        row = torch.tensor([[t for ids in inputs[start:end] for t in ids]], device=device)  # (1, T)
        hidden = model(row, doc_ids=doc_ids[None], final_hidden=True)[0].float()  # (T, n_embd)
        if pooling == "mean":
            pooled = torch.zeros(end - start, hidden.shape[1], device=device).index_add_(0, doc_ids, hidden)
            pooled /= lengths[:, None]
        else:
            pooled = hidden[lengths.cumsum(0) - 1]
        vectors.append(F.normalize(pooled, dim=-1))
        start = end
    return torch.cat(vectors)


def named_pooling(model_dir) -> str:
    """The pooling a sentence-transformers model directory names in 1_Pooling/config.json; "mean" without one."""
    path = Path(model_dir) / "1_Pooling" / "config.json"
    if not path.exists():
        return "mean"
    modes = [mode for mode, on in json.loads(path.read_text()).items() if mode.startswith("pooling_mode") and on]
    pooling = {"pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "last"}.get(modes[0] if modes else None)
    if len(modes) != 1 or pooling is None:
        raise ValueError(f"{path} names the pooling {modes}; the server pools by one of pooling_mode_mean_tokens or "
                         f"pooling_mode_lasttoken")
    return pooling

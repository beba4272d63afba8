"""Training objectives: functions `(model, batch) -> (loss, metrics)`.

The loop in training.py calls whichever objective it is given and knows nothing else about it, so
pretraining and every post-training method share one loop (resume, logging, distributed strategies).
"""
import torch


def next_token(model, batch) -> tuple[torch.Tensor, dict]:
    """Pretraining: mean cross-entropy of each next token (plus the MoE auxiliary losses the model adds)."""
    inputs, targets = batch
    loss = model(inputs, targets)
    return loss, {}

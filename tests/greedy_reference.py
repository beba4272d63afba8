"""The obviously correct greedy loop the serving tests compare against: full forward over everything so far,
argmax, append, repeat."""
import weakref

import torch

# Keyed by the model object itself: an id() key could be reused by a later model once the first is freed.
_cache: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


@torch.no_grad()
def naive_greedy(model, prompt, max_tokens, stop_ids=()):
    """Greedy continuation of `prompt` (at most `max_tokens` new tokens, never past the model's context),
    ending early after any token in `stop_ids`."""
    per_model = _cache.setdefault(model, {})
    key = (tuple(prompt), max_tokens, tuple(sorted(stop_ids)))
    if key not in per_model:
        ids, out = list(prompt), []
        while len(out) < max_tokens and len(ids) < model.config.max_seq_len:
            token = int(model(torch.tensor([ids]))[0, -1].argmax())
            ids.append(token)
            out.append(token)
            if token in stop_ids:
                break
        per_model[key] = out
    return per_model[key]

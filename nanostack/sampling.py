"""Turning logits into tokens: temperature, top-k, top-p, min-p, seeded sampling and logprobs.

A language model outputs one score (logit) per vocabulary entry; sampling picks the next token from
softmax(logits / temperature). Temperature 0 means greedy: always the argmax. The filters cut the tail of
the distribution before sampling, each keeping a set of tokens and renormalising over it:

    top_k   keep the k most likely tokens (every token tied with the k-th is kept too)
    top_p   nucleus: keep the most likely tokens until their mass reaches p; precisely, keep token t when the
            mass of the tokens strictly more likely than t is < p (so ties are kept or dropped together)
    min_p   keep tokens whose probability is >= min_p * (probability of the most likely token)

They apply in that order to the temperature-scaled distribution (top_p sees the top_k survivors renormalised;
min_p compares ratios, so its order does not matter).

Sampling by exponential race: if E_i ~ Exp(1) independently, argmax_i p_i / E_i is a draw from p (the same
trick as Gumbel-max, since -log E is Gumbel). It turns sampling into noise + argmax, and the noise of a row can
come from that row's own `torch.Generator`, so a request with a seed gets the same tokens whether it is
decoded alone or batched with any other requests. Rows without a seed share one draw from the global RNG.

Before all that, a request's logits may be adjusted (`adjusted_logits`): `logit_bias` adds to chosen tokens (OpenAI),
`presence_penalty` subtracts from every token the output already holds and `frequency_penalty` once per time it holds
it (OpenAI, as vLLM counts them: over the output only), `repetition_penalty` divides the positive logits and
multiplies the negative ones of every token in the prompt or output (CTRL, Keskar et al. 2019; vLLM), and a
constraint (serving/constrained.py) sets the tokens it does not allow to -inf.

Logprobs are reported from the model's own distribution, log_softmax(logits), before adjustments, temperature and
filters, as the OpenAI API does: they say how likely the model found a token, not how it was picked.
"""
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 = greedy; top_k 0 = off; top_p 1 and min_p 0 = off."""
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None                # own generator: tokens independent of the rest of the batch
    stop: list[str] = field(default_factory=list)        # strings that end generation (cut from the text)
    stop_token_ids: list[int] = field(default_factory=list)  # ids that end generation, even with ignore_eos
    ignore_eos: bool = False               # keep going past the tokenizer's end-of-sequence ids
    logprobs: int | None = None            # None: no logprobs; k >= 0: chosen token's logprob + top k
    prompt_logprobs: int | None = None     # same, for every prompt token after the first
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit, in [-100, 100]
    presence_penalty: float = 0.0          # in [-2, 2]: subtracted from each token already in the output
    frequency_penalty: float = 0.0         # in [-2, 2]: subtracted once per occurrence in the output
    repetition_penalty: float = 1.0        # > 0: logits of tokens seen in prompt or output divided (if > 0) or times it
    constraint: object = None              # a serving.constrained.Constraint: only the tokens it allows

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop, self.stop_token_ids = list(self.stop), list(self.stop_token_ids)
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop must be non-empty strings, got {self.stop!r}")
        if any(not isinstance(t, int) or t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be non-negative ints, got {self.stop_token_ids!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {self.repetition_penalty}")
        self.logit_bias = {int(token): float(bias) for token, bias in self.logit_bias.items()}
        if any(token < 0 or not -100 <= bias <= 100 for token, bias in self.logit_bias.items()):
            raise ValueError(f"logit_bias must map token ids >= 0 to biases in [-100, 100], got {self.logit_bias}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"{name} must be None or a count >= 0 of top alternatives, got {value}")

    @property
    def greedy(self) -> bool:
        """Temperature 0: always the most likely token."""
        return self.temperature == 0

    @property
    def adjusts_logits(self) -> bool:
        """Logit bias, a penalty or a constraint changes the logits before sampling."""
        return bool(self.logit_bias or self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.constraint is not None)


@dataclass
class SampleOutput:
    """Result of `sample` for a batch of rows; the logprob fields are None where a row did not ask."""
    token_ids: list[int]
    logprobs: list[float | None]
    top_logprobs: list[dict[int, float] | None]


def small_tensor(values: list, device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A tensor of a few host values on `device`. On CUDA it goes through pinned memory with a non-blocking copy:
    torch.tensor(values, device=...) would make the host wait until the GPU has finished its queued work."""
    tensor = torch.tensor(values, dtype=dtype)
    return tensor.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else tensor


def make_generator(seed: int | None, device) -> torch.Generator | None:
    """A generator seeded for one request, on the device its noise is drawn on; None without a seed."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)


def filtered_logits(logits: torch.Tensor, params_list: list[SamplingParams]) -> torch.Tensor:
    """Temperature-scaled logits (B, vocab) with the tokens cut by top_k/top_p/min_p set to -inf.

    Greedy rows are left unscaled (their argmax is taken directly)."""
    logits = logits.float()
    device = logits.device
    vocab = logits.shape[-1]
    temperature = small_tensor([p.temperature if p.temperature > 0 else 1.0 for p in params_list], device)
    logits = logits / temperature[:, None]
    top_k = [p.top_k for p in params_list]
    top_p = [p.top_p for p in params_list]
    min_p = [p.min_p for p in params_list]
    if any(0 < k < vocab for k in top_k) or any(p < 1 for p in top_p):
        sorted_logits = logits.sort(dim=-1, descending=True).values  # (B, vocab)
        if any(0 < k < vocab for k in top_k):
            kth_index = small_tensor([min(k, vocab) - 1 if k > 0 else vocab - 1 for k in top_k], device)
            kth_largest = sorted_logits.gather(1, kth_index[:, None])  # (B, 1)
            logits = logits.masked_fill(logits < kth_largest, float("-inf"))
            sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
        if any(p < 1 for p in top_p):
            cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
            # Mass of the strictly earlier tokens, as a shifted cumsum: non-decreasing even in float rounding, and
            # exactly 0 for the most likely token, which therefore always survives (top_p > 0).
            mass_before = torch.cat([torch.zeros_like(cumulative[:, :1]), cumulative[:, :-1]], dim=-1)
            keep_sorted = mass_before < small_tensor(top_p, device)[:, None]
            # The kept tokens are a prefix of the sorted order; keeping every logit >= the last kept one also
            # keeps the tokens tied with it, which is the order-independent definition in the module docstring.
            last_kept = keep_sorted.sum(dim=-1, keepdim=True) - 1
            threshold = sorted_logits.gather(1, last_kept)  # (B, 1)
            logits = logits.masked_fill(logits < threshold, float("-inf"))
    if any(p > 0 for p in min_p):
        log_min_p = small_tensor(min_p, device).log()[:, None]  # log 0 = -inf keeps everything
        log_probs = logits.log_softmax(dim=-1)
        max_log_prob = log_probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(log_probs < max_log_prob + log_min_p, float("-inf"))
    return logits


def adjusted_logits(logits: torch.Tensor, params_list: list[SamplingParams], histories, allowed=None) -> torch.Tensor:
    """Logits (B, vocab) as float32 with each row's logit_bias, penalties and allowed-token mask applied (see the
    module docstring). histories[i] = (token ids so far, how many of them are the prompt); allowed[i] a (vocab,)
    bool array or None (allowed None: no row is constrained)."""
    logits = logits.float().clone()
    vocab = logits.shape[-1]
    for row, params in enumerate(params_list):
        token_ids, num_prompt = histories[row]
        if params.logit_bias:
            ids = torch.tensor([t for t in params.logit_bias if t < vocab], dtype=torch.long, device=logits.device)
            logits[row, ids] += torch.tensor([params.logit_bias[t] for t in ids.tolist()], device=logits.device)
        if params.repetition_penalty != 1:
            seen = torch.tensor(token_ids, device=logits.device).unique()
            scores = logits[row, seen]
            logits[row, seen] = torch.where(scores > 0, scores / params.repetition_penalty,
                                            scores * params.repetition_penalty)
        if params.presence_penalty or params.frequency_penalty:
            counts = torch.bincount(torch.tensor(token_ids[num_prompt:], dtype=torch.long, device=logits.device),
                                    minlength=vocab)[:vocab]  # (vocab,)
            logits[row] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
        if allowed is not None and allowed[row] is not None:
            logits[row].masked_fill_(~torch.as_tensor(allowed[row][:vocab], device=logits.device), float("-inf"))
    return logits


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, num_top: list[int | None]):
    """log_softmax(logits) (N, vocab) at token_ids (N,), and per row a {token: logprob} dict of its num_top[i]
    best tokens (None where num_top[i] is None). Returns (chosen logprobs list, top dicts list)."""
    log_probs = logits.float().log_softmax(dim=-1)
    chosen = log_probs.gather(1, token_ids[:, None].long()).squeeze(1).tolist()
    most = max((k for k in num_top if k is not None), default=0)
    top_values, top_ids = log_probs.topk(min(most, log_probs.shape[-1]), dim=-1) if most else (None, None)
    top_values = top_values.tolist() if most else None
    top_ids = top_ids.tolist() if most else None
    tops = []
    for row, k in enumerate(num_top):
        if k is None:
            tops.append(None)
        else:
            tops.append(dict(zip(top_ids[row][:k], top_values[row][:k])) if k else {})
    return chosen, tops


def sample(logits: torch.Tensor, params_list: list[SamplingParams], generators: list[torch.Generator | None],
           histories=None, allowed=None) -> SampleOutput:
    """One token per row of logits (B, vocab), row i decoded with params_list[i], its noise drawn from
    generators[i] (or the global RNG where None); logprobs for the rows whose params ask for them. Rows whose
    params adjust the logits need `histories` (and constrained rows `allowed`): see adjusted_logits."""
    if logits.dim() != 2 or logits.shape[0] != len(params_list) or len(generators) != len(params_list):
        raise ValueError(f"logits {tuple(logits.shape)} must be (batch, vocab) with one params and one generator "
                         f"per row; got {len(params_list)} params and {len(generators)} generators")
    scores = logits
    if allowed is not None or any(p.adjusts_logits for p in params_list):
        if histories is None:
            raise ValueError("logit_bias, penalties and constraints need the rows' token histories")
        scores = adjusted_logits(logits, params_list, histories, allowed)
    # Decided from the params on the host: asking the device (greedy.all()) would wait for it.
    greedy = [p.greedy for p in params_list]
    if all(greedy):
        token_ids = scores.argmax(dim=-1)  # (B,)
    else:
        probs = filtered_logits(scores, params_list).softmax(dim=-1)  # (B, vocab), zero outside the kept set
        noise = torch.empty_like(probs)
        unseeded = [i for i, g in enumerate(generators) if g is None]
        if len(unseeded) == len(generators):
            noise.exponential_()
        elif unseeded:
            noise[small_tensor(unseeded, probs.device)] = torch.empty(len(unseeded), probs.shape[1],
                                                                      device=probs.device).exponential_()
        for row, generator in enumerate(generators):
            if generator is not None:
                noise[row].exponential_(generator=generator)
        # exponential_ can return exactly 0; 0/0 would be NaN, which argmax picks, even for a cut token.
        sampled = probs.div_(noise.clamp_(min=torch.finfo(noise.dtype).tiny)).argmax(dim=-1)
        token_ids = (torch.where(small_tensor(greedy, logits.device), scores.argmax(dim=-1), sampled) if any(greedy)
                     else sampled)
    num_top = [p.logprobs for p in params_list]
    if all(k is None for k in num_top):
        return SampleOutput(token_ids.tolist(), [None] * len(num_top), [None] * len(num_top))
    chosen, tops = token_logprobs(logits, token_ids, num_top)
    chosen = [lp if k is not None else None for lp, k in zip(chosen, num_top)]
    return SampleOutput(token_ids.tolist(), chosen, tops)

"""Speculative decoding: a cheap proposer guesses K tokens, the target model checks them all in one forward.

Decoding is memory-bound: one forward for one token reads every weight. Scoring K+1 tokens of a sequence
costs about the same as scoring one, so if something cheap can guess the next K tokens, the target verifies
them in a single forward and keeps the longest run it agrees with, plus one token of its own. Each engine
step then yields 1 to K+1 tokens per sequence instead of exactly 1.

    propose   per running sequence, K draft tokens d_1..d_K (and, for a draft model, its distributions q_i)
    verify    the engine appends them to the sequence; the scheduler schedules the K+1 tokens
              t_last, d_1..d_K as one prefill-like chunk over the paged cache; the forward returns K+1 rows
              of logits, row i being the target's distribution p_{i+1} after d_1..d_i
    accept    exact rejection sampling (Leviathan et al. 2023, Chen et al. 2023), position by position:
              accept d_i with probability min(1, p_i(d_i) / q_i(d_i)); on the first rejection, draw the
              replacement from the residual max(0, p_i - q_i), renormalised, and stop; if all K pass,
              draw a bonus token from p_{K+1}
    rollback  the K/V written for rejected tokens stay in the pool but are beyond the sequence's computed
              length, so the next forward overwrites them; blocks past the new length are given back, and
              only blocks full of *accepted* tokens enter the prefix cache

Why the output is exactly the target's distribution: a token y comes out of one position either as an
accepted proposal, with probability q(y) min(1, p(y)/q(y)) = min(q(y), p(y)), or as a residual draw, with
probability (1 - sum_x min(q(x), p(x))) * max(0, p(y) - q(y)) / sum_x max(0, p(x) - q(x)). The two
normalisers are equal (both are the total variation distance), so the sum is min(p, q) + max(0, p - q) = p(y).
p and q are the *filtered* distributions of the request's SamplingParams (temperature, top-k, top-p, min-p),
so a request samples from exactly what it would sample from without speculation. Greedy (temperature 0)
reduces to: accept while the proposal equals the target's argmax, then emit the target's argmax, so greedy
output is token for token what plain decoding gives.

Two proposers:

    n-gram      prompt lookup: find the latest earlier occurrence of the sequence's last n tokens (n from
                ngram_max down to ngram_min) and propose the tokens that followed it. No model; q is a point
                mass on the proposal (q(x) = 1), so acceptance is simply p(x). Shines on text that repeats
                its context (code edits, summaries, quoting).
    draft model a smaller nanostack model with the same vocabulary samples K tokens autoregressively. Each
                sequence keeps a contiguous KVCache of its own in the draft (model.KVCache, batch 1) plus the
                tokens it holds; before proposing, the cache is cut back to the longest common prefix with
                the sequence's tokens, which is the draft's rollback. Sequences are drafted one after the
                other: simple, and fine at the small batches where speculation is worth it.

Adaptive off-switch. Speculation trades extra compute for fewer forwards. At large batches a step is no
longer memory-bound (and on a CPU it never is much), so the K extra tokens per sequence cost real time;
and with poor acceptance the work is wasted. So the engine speculates only while at most `max_batch_size`
requests run, and pauses when the acceptance rate over the last `window` draft tokens falls below
`min_acceptance_rate`; while paused it still speculates one step in `probe_every`, to notice recovery.

Seeded requests stay reproducible: verification draws from the request's generator, and a draft model
samples from a second generator seeded from the same seed.
"""
from collections import deque
from dataclasses import dataclass, field

import torch

from nanostack.model import KVCache
from nanostack.sampling import SamplingParams, filtered_logits, make_generator

DRAFT_SEED_OFFSET = 0x9E3779B97F4A7C15  # keeps the draft's random stream apart from the verifier's


@dataclass
class SpeculativeConfig:
    """How many tokens to propose, with what, and when to stop bothering."""
    num_speculative_tokens: int = 4        # K: draft tokens per sequence per step
    ngram_max: int = 4                     # n-gram proposer: longest suffix to match
    ngram_min: int = 1                     # ... and the shortest
    max_batch_size: int = 4                # speculate only while at most this many requests run
    min_acceptance_rate: float = 0.25      # pause below this share of accepted draft tokens ...
    window: int = 128                      # ... over the last this many draft tokens
    probe_every: int = 16                  # while paused, speculate one step in this many to re-measure

    def __post_init__(self):
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {self.ngram_min} and {self.ngram_max}")
        if not 0 <= self.min_acceptance_rate <= 1:
            raise ValueError(f"min_acceptance_rate must be in [0, 1], got {self.min_acceptance_rate}")
        if self.window < 1 or self.probe_every < 1 or self.max_batch_size < 1:
            raise ValueError(f"window, probe_every and max_batch_size must be >= 1, got {self.window}, "
                             f"{self.probe_every} and {self.max_batch_size}")


@dataclass
class SpecStats:
    """Counters since the engine started. Acceptance length = accepted draft tokens per verification."""
    num_drafts: int = 0                    # sequences verified with at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts whose token i+1 was accepted
    num_skipped_steps: int = 0             # steps the off-switch ran without speculation

    @property
    def acceptance_rate(self) -> float:
        """Share of draft tokens accepted."""
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Draft tokens accepted per verification (the target's own token comes on top)."""
        return self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


@dataclass
class Proposal:
    """Draft tokens appended to a sequence for verification, and the draft's distributions (None: point masses)."""
    tokens: list[int]
    draft_probs: torch.Tensor | None       # (len(tokens), vocab) filtered draft distributions, or None


# ----------------------------------------------------------------------------------------------------------
# Acceptance: exact rejection sampling

def acceptance_probability(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """min(1, p / q) for every token (..., vocab); 0 where the draft gives no mass (it never proposes those)."""
    ratio = target_probs / draft_probs.clamp(min=torch.finfo(draft_probs.dtype).tiny)
    return torch.where(draft_probs > 0, ratio.clamp(max=1.0), torch.zeros_like(ratio))


def residual_distribution(target_probs: torch.Tensor, draft_probs: torch.Tensor) -> torch.Tensor:
    """max(0, p - q) renormalised (vocab,): where a rejected position draws from. p itself if p == q."""
    residual = (target_probs - draft_probs).clamp(min=0)
    total = residual.sum()
    # p == q leaves nothing, but then every proposal is accepted and this is never drawn from; rounding aside.
    return residual / total if total > 0 else target_probs


def rejection_sample(target_probs: torch.Tensor, draft_tokens: list[int], draft_probs: torch.Tensor | None,
                     generator: torch.Generator | None) -> list[int]:
    """Accept a leading run of draft_tokens and add one token: the output is distributed as the target's.

    target_probs (K+1, vocab): row i is the target's distribution after draft tokens 0..i-1. draft_probs
    (K, vocab) or None for point masses on the proposals. Returns accepted tokens + one drawn token."""
    num_draft = len(draft_tokens)
    if target_probs.shape[0] != num_draft + 1:
        raise ValueError(f"target_probs has {target_probs.shape[0]} rows; {num_draft} draft tokens need "
                         f"{num_draft + 1}")
    if draft_probs is None:  # a point mass on each proposal
        draft_probs = torch.zeros_like(target_probs[:num_draft])
        draft_probs[torch.arange(num_draft), torch.tensor(draft_tokens, dtype=torch.long)] = 1.0
    draft_probs = draft_probs.to(target_probs.dtype)
    accepted = []
    for i, token in enumerate(draft_tokens):
        keep = acceptance_probability(target_probs[i, token], draft_probs[i, token])
        uniform = torch.rand((), generator=generator, dtype=target_probs.dtype, device=target_probs.device)
        if uniform < keep:
            accepted.append(token)
            continue
        residual = residual_distribution(target_probs[i], draft_probs[i])
        return accepted + [int(torch.multinomial(residual, 1, generator=generator))]
    return accepted + [int(torch.multinomial(target_probs[num_draft], 1, generator=generator))]


def greedy_accept(target_logits: torch.Tensor, draft_tokens: list[int]) -> list[int]:
    """Temperature 0: accept while a draft token is the target's argmax, then add the target's argmax."""
    best = target_logits.argmax(dim=-1).tolist()  # (K+1,)
    num_accepted = 0
    while num_accepted < len(draft_tokens) and draft_tokens[num_accepted] == best[num_accepted]:
        num_accepted += 1
    return draft_tokens[:num_accepted] + [best[num_accepted]]


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution (rows, vocab) a request samples from, in float64: temperature and filters applied."""
    return filtered_logits(logits, [params] * logits.shape[0]).double().softmax(dim=-1)


# ----------------------------------------------------------------------------------------------------------
# Proposers

def ngram_propose(token_ids: list[int], num_tokens: int, ngram_max: int, ngram_min: int) -> list[int]:
    """Prompt lookup: the up-to-num_tokens tokens that followed the latest earlier occurrence of the longest
    matching suffix (ngram_max down to ngram_min tokens); [] when no suffix recurs."""
    length = len(token_ids)
    for n in range(min(ngram_max, length - 1), ngram_min - 1, -1):
        suffix = token_ids[length - n:]
        # Latest start first: recent context predicts best. Start < length - n excludes the suffix itself.
        for start in range(length - n - 1, -1, -1):
            if token_ids[start:start + n] == suffix:
                return token_ids[start + n:start + n + num_tokens]
    return []


@dataclass
class _DraftState:
    """One sequence's draft-model cache: the tokens whose K/V it holds, and its own random stream."""
    cache: KVCache
    tokens: list[int]
    generator: torch.Generator | None


class Speculator:
    """Proposes draft tokens for the engine's running sequences and verifies them; see the module docstring.

    draft_model None -> n-gram prompt lookup; else a GPT with the target's vocabulary."""

    def __init__(self, config: SpeculativeConfig | None = None, draft_model=None):
        self.config = config or SpeculativeConfig()
        self.draft_model = draft_model.eval() if draft_model is not None else None
        # Positions of a draft's KV cache: set by check_target from the engine's max_model_len, as a Hub model's
        # max_seq_len (32k-128k) would make every request's contiguous cache gigabytes.
        self.cache_len = draft_model.config.max_seq_len if draft_model is not None else 0
        self.states: dict[object, _DraftState] = {}
        self.stats = SpecStats(accepted_per_position=[0] * self.config.num_speculative_tokens)
        self.recent = deque(maxlen=self.config.window)  # 1 per accepted draft token, 0 per rejected one
        self.paused_steps = 0

    @classmethod
    def from_checkpoint(cls, path, config: SpeculativeConfig | None = None, device="cpu",
                        dtype: torch.dtype | None = None, target_tokenizer=None, target_path=None) -> "Speculator":
        """A draft-model speculator over a (smaller) checkpoint, which must share `target_tokenizer` if given
        (read from `target_path`, named in the error)."""
        from nanostack.checkpoint import load_checkpoint, require_same_tokenizer
        loaded = load_checkpoint(path, device, dtype=dtype)
        if target_tokenizer is not None:
            require_same_tokenizer(target_tokenizer, target_path or "the target's tokenizer.json", loaded["tokenizer"],
                                   loaded["directory"] / "tokenizer.json", "draft model")
        return cls(config, loaded["model"])

    def check_target(self, target_config, max_model_len: int) -> None:
        """Refuse a draft model that cannot stand in for the target: other vocabulary or shorter context."""
        if self.draft_model is None:
            return
        draft_config = self.draft_model.config
        if draft_config.vocab_size != target_config.vocab_size:
            raise ValueError(f"draft vocab_size={draft_config.vocab_size} differs from the target's "
                             f"{target_config.vocab_size}; the draft must share the target's tokenizer")
        if draft_config.max_seq_len < max_model_len:
            raise ValueError(f"draft max_seq_len={draft_config.max_seq_len} is shorter than max_model_len="
                             f"{max_model_len}; use a draft with a longer context or lower max_model_len")
        # The draft sees a sequence (<= max_model_len tokens) plus its own K - 1 fed-back guesses at most.
        self.cache_len = min(draft_config.max_seq_len, max_model_len + self.config.num_speculative_tokens)

    def enabled(self, num_running: int) -> bool:
        """The off-switch: speculate this step? No above max_batch_size, rarely while acceptance is poor."""
        config = self.config
        poor = len(self.recent) == config.window and sum(self.recent) < config.min_acceptance_rate * config.window
        if num_running > config.max_batch_size or (poor and self.paused_steps % config.probe_every != 0):
            self.paused_steps += poor
            self.stats.num_skipped_steps += 1
            return False
        self.paused_steps = 1 if poor else 0
        return True

    def retain(self, running_ids) -> None:
        """Drop the draft caches of requests no longer running (finished, aborted or preempted)."""
        for request_id in list(self.states):
            if request_id not in running_ids:
                del self.states[request_id]

    @torch.inference_mode()
    def propose(self, seqs_and_counts) -> dict[object, Proposal]:
        """Draft up to num_tokens tokens for each (Sequence, num_tokens); sequences with nothing to propose
        are left out."""
        proposals = {}
        for seq, num_tokens in seqs_and_counts:
            if self.draft_model is None:
                tokens = ngram_propose(seq.token_ids, num_tokens, self.config.ngram_max, self.config.ngram_min)
                proposal = Proposal(tokens, None) if tokens else None
            else:
                proposal = self._draft(seq, num_tokens)
            if proposal is not None:
                proposals[seq.request_id] = proposal
        return proposals

    def _draft(self, seq, num_tokens: int) -> Proposal:
        """Sample num_tokens tokens from the draft model, continuing its cache for this sequence."""
        model, params, tokens = self.draft_model, seq.params, seq.token_ids
        device = model.norm.weight.device
        state = self.states.get(seq.request_id)
        if state is None:
            seed = None if params.seed is None else (params.seed + DRAFT_SEED_OFFSET) % 2**63
            state = _DraftState(KVCache(model.config, 1, self.cache_len, device, model.norm.weight.dtype),
                                [], make_generator(seed, device))
            self.states[seq.request_id] = state
        # Rollback: keep the longest prefix the cache shares with the sequence (at least one token is fed).
        common = 0
        limit = min(len(state.tokens), len(tokens) - 1)
        while common < limit and state.tokens[common] == tokens[common]:
            common += 1
        state.cache.length, state.tokens = common, tokens[:common]
        feed = tokens[common:]
        draft_tokens, draft_probs = [], []
        for _ in range(num_tokens):
            logits = model(torch.tensor([feed], device=device), kv_cache=state.cache)[0, -1:]  # (1, vocab)
            state.tokens += feed
            if params.greedy:
                token = int(logits.argmax())
            else:
                probs = filtered_probs(logits, params)  # (1, vocab)
                token = int(torch.multinomial(probs[0], 1, generator=state.generator))
                draft_probs.append(probs[0])
            draft_tokens.append(token)
            feed = [token]
        return Proposal(draft_tokens, torch.stack(draft_probs) if draft_probs else None)

    def verify(self, target_logits: torch.Tensor, proposal: Proposal, params: SamplingParams,
               generator: torch.Generator | None) -> list[int]:
        """Accepted draft tokens + one token of the target's, from its logits (K+1, vocab); counts the stats."""
        if params.greedy:
            new_tokens = greedy_accept(target_logits, proposal.tokens)
        else:
            new_tokens = rejection_sample(filtered_probs(target_logits, params), proposal.tokens,
                                          proposal.draft_probs, generator)
        num_accepted = len(new_tokens) - 1
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += len(proposal.tokens)
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
        self.recent.extend([1] * num_accepted + [0] * (len(proposal.tokens) - num_accepted))
        return new_tokens

"""The scheduler: which requests run in the next model forward, and how many of their tokens.

Continuous batching. A request is `waiting` until admitted, then `running` until it finishes; every step
re-forms the batch, so requests join and leave between any two forward passes instead of waiting for a
whole batch to drain (what padded static batching does).

One token budget per step (`max_num_batched_tokens`) covers everything the forward computes: one token per
decoding request plus prompt chunks. A prompt longer than what is left of the budget is prefilled in
chunks over several steps (chunked prefill), so a long prompt never stalls the requests that are decoding.
Order within a step: running requests, oldest first, then waiting requests in arrival order while budget,
sequence slots and KV blocks last. A request whose prompt is still being chunked took all the budget left when
it was admitted, so it is always the newest running one: the decodes ahead of it are never stalled.

Preemption. When a running request needs a new block and none is free, the newest running request is
preempted: its blocks are freed and it goes back to the front of the waiting queue, to be recomputed from
prompt + generated tokens later (the prefix cache usually still holds most of it). The oldest request is
never preempted for a newer one, so it always makes progress. A request that could not fit even alone in
the pool (or within max_model_len) is refused by `add` with an error message instead of waiting forever.
"""
from collections import deque
from dataclasses import dataclass, field

from nanostack.sampling import SamplingParams
from nanostack.serving.kv_cache import BlockManager

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass
class SchedulerConfig:
    """Batch limits per step."""
    max_num_seqs: int = 64                 # requests in the running batch at most
    max_num_batched_tokens: int = 1024     # tokens per forward: decode tokens + prefill chunks
    max_model_len: int = 512               # prompt + output tokens of one request at most

    def __post_init__(self):
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= max_num_seqs="
                             f"{self.max_num_seqs}, so every running request can decode in every step")
        if self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2 (a prompt token and an output), got {self.max_model_len}")


@dataclass(eq=False)
class Sequence:
    """Scheduling state of one request: its tokens and how many of them have K/V in the cache."""
    request_id: str
    token_ids: list[int]                   # prompt followed by the generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    status: str = WAITING
    num_computed_tokens: int = 0           # leading tokens whose K/V are in the cache
    num_cached_prompt_tokens: int | None = None  # prefix-cache hit at first admission
    reuse_prefix_cache: bool = True        # off for prompt logprobs, which need every prompt position computed

    @property
    def num_output_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self.token_ids) - self.num_prompt_tokens


@dataclass(slots=True)  # one per running request per step
class ScheduledChunk:
    """Positions start .. start + num_tokens - 1 of seq are computed in this step."""
    seq: Sequence
    start: int
    num_tokens: int


@dataclass
class Scheduler:
    """Waiting and running queues over one BlockManager."""
    config: SchedulerConfig
    blocks: BlockManager
    waiting: deque = field(default_factory=deque)
    running: list = field(default_factory=list)  # in admission order: the last one is the newest
    num_preemptions: int = 0

    def add(self, seq: Sequence) -> str | None:
        """Queue a request; returns why it can never run (and does not queue it), or None."""
        max_len = self.config.max_model_len
        if seq.num_prompt_tokens >= max_len:
            return f"prompt of {seq.num_prompt_tokens} tokens leaves no room to generate within max_model_len={max_len}"
        most_tokens = min(seq.num_prompt_tokens + seq.params.max_tokens, max_len)
        if self.blocks.blocks_for(most_tokens) > self.blocks.num_blocks:
            return (f"prompt + max_tokens = {most_tokens} tokens need {self.blocks.blocks_for(most_tokens)} KV blocks, "
                    f"the pool has {self.blocks.num_blocks}: lower max_tokens or give the KV cache more memory")
        self.waiting.append(seq)
        return None

    def has_unfinished(self) -> bool:
        """True while a request waits or runs."""
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        """Pick this step's chunks within the token budget, allocating blocks and preempting as needed."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledChunk] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status != RUNNING:  # preempted earlier in this loop
                continue
            num_tokens = min(len(seq.token_ids) - seq.num_computed_tokens, budget)
            while not self.blocks.allocate(seq.request_id, seq.num_computed_tokens + num_tokens):
                # The newest is at or after seq in this loop, so nothing scheduled so far is taken back.
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            else:
                scheduled.append(ScheduledChunk(seq, seq.num_computed_tokens, num_tokens))
                budget -= num_tokens
        # Admitting after a preemption would take back the blocks just freed for the running requests.
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs and not preempted:
            seq = self.waiting[0]
            num_cached = self.blocks.admit(seq.request_id, seq.token_ids, budget, seq.reuse_prefix_cache)
            if num_cached is None:
                break
            self.waiting.popleft()
            seq.status, seq.num_computed_tokens = RUNNING, num_cached
            if seq.num_cached_prompt_tokens is None:
                seq.num_cached_prompt_tokens = num_cached
            self.running.append(seq)
            num_tokens = min(len(seq.token_ids) - num_cached, budget)
            scheduled.append(ScheduledChunk(seq, num_cached, num_tokens))
            budget -= num_tokens
        return scheduled

    def _preempt(self, seq: Sequence) -> None:
        """Free a running request's blocks and put it first in line, to be recomputed from its tokens."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.status, seq.num_computed_tokens = WAITING, 0
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def release_blocks_beyond(self, seq: Sequence, num_tokens: int) -> None:
        """Give back the blocks past seq's first num_tokens positions (those held rejected draft tokens).

        They were allocated for this step and never entered the prefix cache (only computed, accepted
        positions do), so dropping the reference returns them to the free list."""
        self.blocks.truncate(seq.request_id, num_tokens)

    def finish(self, seq: Sequence) -> None:
        """Retire a running request and free its blocks."""
        self.running.remove(seq)
        self.blocks.free(seq.request_id)
        seq.status = FINISHED

    def abort(self, request_id) -> Sequence | None:
        """Remove a request wherever it is and free its blocks at once; returns it, or None if unknown."""
        for queue in (self.waiting, self.running):
            for seq in queue:
                if seq.request_id == request_id:
                    queue.remove(seq)
                    self.blocks.free(request_id)
                    seq.status = FINISHED
                    return seq
        return None

"""The serving engine: continuous batching over a paged KV cache, one model forward per step.

    engine = Engine.from_checkpoint("out/run")
    engine.add_request("a", engine.tokenizer.encode("def fib("), SamplingParams(max_tokens=32, temperature=0))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.text, end="")

`step()` is the whole loop body:

    schedule   the scheduler picks this step's chunks: one token per decoding request, prompt chunks for the
               others, within one token budget (scheduler.py); blocks are allocated, or requests preempted
    forward    ONE model forward over all those tokens flattened into a single row, K/V written into the
               paged pools, attention reading each sequence's blocks (GPT.forward_serving in model.py)
    sample     the rows that ended a sequence's pending tokens get a next token (sampling.py)
    append     the token joins its sequence; finished requests free their blocks (full ones stay cached)
    stream     one RequestOutput per request that moved: new token ids, the text they add, logprobs, timings

With a Speculator (speculative.py), decoding requests first get up to K draft tokens appended; the scheduler
then schedules each such request's last token + drafts as one chunk, the forward returns logits for all of
them, and `_accept_drafts` keeps the accepted run plus one target token and rolls the rest back. Requests whose
logits are adjusted (logit bias, penalties, a constraint: see sampling.py) are not speculated on: the verifier
samples from the model's plain distribution.

A constrained request (params.constraint, from serving/constrained.py) keeps its automaton state in the engine:
each step the constraint masks the tokens that cannot continue a match within the tokens the request has left,
and the sampled token moves the state on.

Text is streamed safely. Token bytes go through an incremental UTF-8 decoder, so a character whose bytes span
two tokens is held back until it is complete (never emitted as U+FFFD); and the tail of the text that could
still turn into a stop string is held back until it either does (the stop string is cut, never partly shown)
or cannot. Concatenating every `text` of a request gives exactly its final text.

The engine is synchronous and single-threaded: api.py runs it on a thread of its own. All timestamps are
`time.monotonic()` seconds.
"""
import codecs
import itertools
import math
import os
import time
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

from nanostack.sampling import SamplingParams, make_generator, sample, small_tensor, token_logprobs
from nanostack.serving.kv_cache import BlockManager, allocate_kv_pools, kv_bytes_per_block, num_blocks_for_budget
from nanostack.serving.scheduler import Scheduler, SchedulerConfig, Sequence
from nanostack.serving.speculative import Proposal, SpecStats, Speculator
from nanostack.serving.step_inputs import StepArrays


@dataclass
class EngineConfig:
    """KV cache size and batch limits. The zeros mean: derive from the model and the other fields."""
    block_size: int = 16                   # token positions per KV block
    num_blocks: int = 0                    # KV blocks in the pool; 0 -> from kv_cache_memory
    kv_cache_memory: int = 0               # bytes for the K/V pools; 0 -> room for max_num_seqs full-length requests
    max_num_seqs: int = 64                 # requests decoding together at most
    max_num_batched_tokens: int = 1024     # tokens per forward: decode tokens + chunked prefill
    max_model_len: int = 0                 # prompt + output tokens per request; 0 -> the model's max_seq_len
    enable_prefix_caching: bool = True     # reuse the K/V of full blocks shared with earlier requests
    cuda_graphs: bool = False              # replay decode-only steps as CUDA graphs (cuda_graphs.py); CUDA only


@dataclass(slots=True)  # one per request per step: slots make them cheaper to build
class RequestOutput:
    """What one step produced for one request: the new tokens and text, and, once finished, why."""
    request_id: str
    new_token_ids: list[int]
    text: str                              # text these tokens add (held-back bytes and stop prefixes excluded)
    finished: bool
    finish_reason: str | None = None       # "stop" (stop id or string), "length", "abort" or "error"
    error: str | None = None
    logprobs: list[float] | None = None    # of each new token, from the model's distribution
    top_logprobs: list[dict[int, float]] | None = None  # per new token, its `logprobs` most likely alternatives
    prompt_logprobs: list[dict[int, float] | None] | None = None  # first output only; None for the first token
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0          # prompt tokens whose K/V came from the prefix cache
    arrival_time: float = 0.0
    first_token_time: float | None = None
    token_times: list[float] = field(default_factory=list)  # when each new token was sampled


@dataclass
class EngineStats:
    """A snapshot for /metrics. Prefix-cache counters are in tokens (see kv_cache.py)."""
    num_running: int
    num_waiting: int
    kv_cache_usage: float                  # fraction of KV blocks held by requests
    num_kv_blocks: int
    prefix_cache_queries: int
    prefix_cache_hits: int
    prompt_tokens_total: int               # prompt tokens of accepted requests
    generation_tokens_total: int           # tokens sampled
    num_preemptions: int
    speculative: SpecStats | None = None   # draft/acceptance counters when the engine speculates


@dataclass(eq=False, slots=True)
class _Request:
    """Engine-side state of a request besides its scheduling (sampling, detokenizing, timing)."""
    seq: Sequence
    generator: torch.Generator | None
    stop_ids: set[int]
    arrival_time: float
    decoder: codecs.IncrementalDecoder = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    unsent: str = ""                       # decoded text held back because a stop string may begin in it
    stop_first_chars: frozenset = frozenset()  # text holding none of these cannot start a stop string
    first_token_time: float | None = None
    prompt_logprobs: list | None = None    # collected across prefill chunks, sent with the first token
    prompt_logprobs_sent: bool = False
    constraint_state: int = 0              # the automaton state of a constrained request


class Engine:
    """Continuous-batching inference over a paged KV cache; see the module docstring."""

    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None,
                 speculator: Speculator | None = None, forward=None):
        """`forward(token_ids, batch, k_pools, v_pools) -> logits` runs a step's forward: by default
        model.forward_serving; tensor_parallel.py passes one that first sends the step to the other ranks."""
        self.config = config = config or EngineConfig()
        self.model, self.tokenizer = model.eval(), tokenizer
        self.forward = forward or model.forward_serving
        weight = model.norm.weight  # a norm stays in the compute dtype even when the linears are int8
        self.device, self.dtype = weight.device, weight.dtype
        max_len = config.max_model_len or model.config.max_seq_len
        if not 2 <= max_len <= model.config.max_seq_len:
            raise ValueError(f"max_model_len={config.max_model_len} must be in [2, model max_seq_len="
                             f"{model.config.max_seq_len}] (0 = the model's)")
        if config.block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {config.block_size}")
        self.max_model_len = max_len
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, max_len),
            BlockManager(self._num_blocks(max_len), config.block_size, config.enable_prefix_caching))
        self.blocks = self.scheduler.blocks
        self.k_pools, self.v_pools = allocate_kv_pools(model.kv_layout(), self.blocks.num_blocks, config.block_size,
                                                       self.dtype, self.device)
        self.speculator = speculator
        if speculator is not None:
            speculator.check_target(model.config, max_len)
        self.graphs = None
        if config.cuda_graphs:
            if self.device.type != "cuda":
                warnings.warn(f"cuda_graphs is ignored on {self.device}: CUDA graphs need a CUDA device", stacklevel=2)
            elif forward is not None:
                raise ValueError("cuda_graphs needs the engine's own model forward; an engine given `forward` "
                                 "(tensor parallelism) runs eagerly: turn cuda_graphs off")
            else:
                from nanostack.serving.cuda_graphs import DecodeGraphs
                self.graphs = DecodeGraphs(model, self.k_pools, self.v_pools, config.max_num_seqs,
                                           self.blocks.blocks_for(max_len))
        self.requests: dict[str, _Request] = {}
        self.token_bytes: dict[int, bytes] = {}  # each sampled token id's bytes, decoded once
        self.pending_outputs: list[RequestOutput] = []  # aborts and refusals, reported by the next step
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.num_step_tokens = 0  # tokens the last step's forward computed (vLLM's iteration tokens, for /metrics)
        self._generate_ids = itertools.count()

    def _num_blocks(self, max_len: int) -> int:
        """Pool size: explicit, from the memory budget, or room for max_num_seqs full-length requests."""
        config = self.config
        if config.num_blocks:
            return config.num_blocks
        if config.kv_cache_memory:
            return num_blocks_for_budget(self.model.kv_layout(), config.kv_cache_memory, config.block_size, self.dtype)
        wanted = config.max_num_seqs * math.ceil(max_len / config.block_size)
        # Hub models have 32k-128k contexts: max_num_seqs of them rarely fit, on a GPU or in a laptop's memory.
        if self.device.type == "cuda":
            free_bytes, _ = torch.cuda.mem_get_info(self.device)
        else:
            free_bytes = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        # Leave room for activations and logits; the rest of the free memory may hold K/V.
        affordable = int(0.8 * free_bytes) // kv_bytes_per_block(self.model.kv_layout(), config.block_size, self.dtype)
        return max(min(wanted, affordable), 1)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", dtype: torch.dtype | None = None,
                        speculator: Speculator | None = None, **config_fields) -> "Engine":
        """An engine over a checkpoint's model and tokenizer; config_fields are EngineConfig fields."""
        from nanostack.quant import load_for_serving  # plain or int8-quantized checkpoints alike
        loaded = load_for_serving(path, device, dtype)
        model = loaded["model"] if dtype is None else loaded["model"].to(dtype)
        return cls(model, loaded["tokenizer"], EngineConfig(**config_fields), speculator)

    # ------------------------------------------------------------------------------------------------------
    # Requests in and out

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | None = None,
                    arrival_time: float | None = None) -> None:
        """Queue a request; a request that can never fit is answered by the next step with reason "error"."""
        params = params or SamplingParams()
        vocab = self.model.config.vocab_size
        if request_id in self.requests:
            raise ValueError(f"request_id {request_id!r} is already in use")
        prompt_token_ids = [int(t) for t in prompt_token_ids]
        if not prompt_token_ids:
            raise ValueError(f"request {request_id!r}: the prompt is empty; at least one token is needed")
        if not all(0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"request {request_id!r}: prompt token ids must lie in [0, {vocab}), got "
                             f"{[t for t in prompt_token_ids if not 0 <= t < vocab][:5]}")
        if params.stop and self.tokenizer is None:
            raise ValueError(f"request {request_id!r}: stop strings {params.stop} need an engine with a tokenizer")
        if params.constraint is not None and params.ignore_eos:
            raise ValueError(f"request {request_id!r}: ignore_eos cannot be combined with a constraint, which ends "
                             f"its output with a stop token")
        stop_ids = set(params.stop_token_ids)
        if self.tokenizer is not None and not params.ignore_eos:
            stop_ids |= self.tokenizer.stop_ids
        seq = Sequence(request_id, list(prompt_token_ids), len(prompt_token_ids), params,
                       reuse_prefix_cache=params.prompt_logprobs is None)
        request = _Request(seq, make_generator(params.seed, self.device), stop_ids,
                           time.monotonic() if arrival_time is None else arrival_time,
                           stop_first_chars=frozenset(s[0] for s in params.stop),
                           prompt_logprobs=[None] if params.prompt_logprobs is not None else None)
        error = self.scheduler.add(seq)
        if error:
            self.pending_outputs.append(self._output(request, [], "", finish_reason="error", error=error))
            return
        self.requests[request_id] = request
        self.prompt_tokens_total += len(prompt_token_ids)

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its blocks; the next step reports it with reason "abort"."""
        if self.scheduler.abort(request_id) is None:
            return False
        request = self.requests.pop(request_id)
        self.pending_outputs.append(self._output(request, [], "", finish_reason="abort"))
        return True

    def weights_updated(self) -> None:
        """Call after changing the model's weights in place (a training step): the prefix cache's K/V were
        computed by the old weights, so they are dropped. Requests in flight would mix old and new K/V: refused."""
        if self.scheduler.has_unfinished():
            raise ValueError(f"weights_updated() with {len(self.scheduler.running) + len(self.scheduler.waiting)} "
                             f"requests in flight: finish or abort them before changing the weights")
        self.blocks.clear_prefix_cache()

    def has_unfinished(self) -> bool:
        """True while a request is queued or running, or an output is still to be reported."""
        return self.scheduler.has_unfinished() or bool(self.pending_outputs)

    def stats(self) -> EngineStats:
        """Queue lengths, KV usage and token counters now."""
        return EngineStats(len(self.scheduler.running), len(self.scheduler.waiting), self.blocks.usage,
                           self.blocks.num_blocks, self.blocks.prefix_queries, self.blocks.prefix_hits,
                           self.prompt_tokens_total, self.generation_tokens_total, self.scheduler.num_preemptions,
                           self.speculator.stats if self.speculator is not None else None)

    # ------------------------------------------------------------------------------------------------------
    # One step

    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward over the whole batch, sample, and report what each request gained."""
        outputs, self.pending_outputs = self.pending_outputs, []
        self.num_step_tokens = 0
        proposals = self._propose()
        chunks = self.scheduler.schedule()
        if proposals:
            self._fit_proposals(chunks, proposals)
        if not chunks:
            return outputs
        if any(chunk.num_tokens > 1 for chunk in chunks):
            # Prefill chunks first, then single tokens: the two attention paths each take one contiguous slice.
            chunks.sort(key=lambda c: c.num_tokens == 1)
        arrays, sample_rows, prompt_rows, draft_rows = self._prepare(chunks, proposals)
        self.num_step_tokens = len(arrays.token_ids)
        logits = self._forward(arrays)  # (rows, vocab)

        for chunk in chunks:
            seq = chunk.seq
            if proposals and seq.request_id in proposals:  # computed length and caching wait for the acceptance
                continue
            seq.num_computed_tokens += chunk.num_tokens
            self.blocks.cache_full_blocks(seq.request_id, seq.token_ids, seq.num_computed_tokens)
        if prompt_rows:
            self._record_prompt_logprobs(logits, prompt_rows)
        now = time.monotonic()
        for chunk, first_row in draft_rows:
            proposal = proposals[chunk.seq.request_id]
            rows = logits[first_row:first_row + len(proposal.tokens) + 1]  # (K+1, vocab)
            outputs.append(self._accept_drafts(self.requests[chunk.seq.request_id], proposal, rows, now))
        if not sample_rows:
            return outputs
        requests = [self.requests[chunk.seq.request_id] for chunk, _ in sample_rows]
        rows = [row for _, row in sample_rows]
        # The rows increase, so as many rows as logits means all of them in order (every plain decode step).
        sample_logits = logits if len(rows) == logits.shape[0] else logits[small_tensor(rows, logits.device)]
        allowed = None
        if any(r.seq.params.constraint is not None for r in requests):
            allowed = [self._allowed_tokens(r) for r in requests]
        sampled = sample(sample_logits, [r.seq.params for r in requests], [r.generator for r in requests],
                         [(r.seq.token_ids, r.seq.num_prompt_tokens) for r in requests], allowed)
        for request, token, logprob, top in zip(requests, sampled.token_ids, sampled.logprobs, sampled.top_logprobs):
            if request.seq.params.constraint is not None:
                request.constraint_state = request.seq.params.constraint.advance(request.constraint_state, token)
            outputs.append(self._append_token(request, token, logprob, top, now))
        return outputs

    def _forward(self, arrays: StepArrays) -> torch.Tensor:
        """The step's logits rows: a CUDA graph replay for a decode-only step one fits, else the eager forward."""
        if self.graphs is not None and (logits := self.graphs.replay(arrays)) is not None:
            return logits
        token_ids, batch = arrays.unpack(arrays.to_device(self.device))
        return self.forward(token_ids, batch, self.k_pools, self.v_pools)

    def _prepare(self, chunks, proposals):
        """Flatten the chunks into one token row and locate it in the KV pools: a StepArrays (step_inputs.py).

        Per chunk only a few list appends happen here; slots and block tables come from whole-array numpy over
        the block manager's table_array. Returns (arrays, sample_rows [(chunk, logits row)], prompt_rows
        [(request, logits row, target prompt index)], draft_rows [(chunk, first of its K+1 logits rows)])."""
        table_rows = self.blocks.table_rows
        token_ids, positions, rows = [], [], []  # per token: id, position, its sequence's row of the table array
        cu_q, cu_k, key_positions, key_rows = [0], [0], [], []  # prefill chunks, and the keys each one reads
        logits_indices, sample_rows, prompt_rows, draft_rows = [], [], [], []
        for chunk in chunks:
            seq, start, num_tokens = chunk.seq, chunk.start, chunk.num_tokens
            end, row, offset = start + num_tokens, table_rows[seq.request_id], len(token_ids)
            if num_tokens == 1:  # most chunks: a decoding request's one token
                token_ids.append(seq.token_ids[start])
                positions.append(start)
                rows.append(row)
            else:
                token_ids += seq.token_ids[start:end]
                positions += range(start, end)
                rows += [row] * num_tokens
                cu_q.append(cu_q[-1] + num_tokens)
                cu_k.append(cu_k[-1] + end)
                key_positions += range(end)
                key_rows += [row] * end
            if seq.params.prompt_logprobs is not None and start < seq.num_prompt_tokens - 1:
                request = self.requests[seq.request_id]
                # Logits at position p score prompt token p + 1; take the ones not recorded yet.
                for p in range(max(start, len(request.prompt_logprobs) - 1), min(end, seq.num_prompt_tokens - 1)):
                    prompt_rows.append((request, len(logits_indices), p + 1))
                    logits_indices.append(offset + p - start)
            if proposals and seq.request_id in proposals:  # the last real token and every draft token are scored
                draft_rows.append((chunk, len(logits_indices)))
                num_drafts = len(proposals[seq.request_id].tokens)
                logits_indices += range(offset + num_tokens - 1 - num_drafts, offset + num_tokens)
            elif end == len(seq.token_ids):  # the chunk reaches the last token: its logits give the next one
                sample_rows.append((chunk, len(logits_indices)))
                logits_indices.append(offset + num_tokens - 1)

        table, block_size = self.blocks.table_array, self.config.block_size
        def as_array(values):
            return np.array(values, dtype=np.int32)
        def slots(positions, rows):  # block id * block_size + offset in the block
            return table[rows, positions // block_size] * block_size + positions % block_size
        num_prefill = cu_q[-1]
        positions, rows, key_positions = as_array(positions), as_array(rows), as_array(key_positions)
        decode_positions = positions[num_prefill:]
        table_width = int(decode_positions.max()) // block_size + 1 if len(decode_positions) else 0
        arrays = StepArrays(
            token_ids=as_array(token_ids), positions=positions, slot_mapping=slots(positions, rows),
            cu_seqlens_q=as_array(cu_q), cu_seqlens_k=as_array(cu_k),
            prefill_key_slots=slots(key_positions, as_array(key_rows)),
            decode_block_tables=table[rows[num_prefill:], :table_width], decode_context_lens=decode_positions + 1,
            logits_indices=as_array(logits_indices), num_prefill_tokens=num_prefill,
            max_seqlen_q=max((b - a for a, b in zip(cu_q, cu_q[1:])), default=0),
            max_seqlen_k=max((b - a for a, b in zip(cu_k, cu_k[1:])), default=0))
        return arrays, sample_rows, prompt_rows, draft_rows

    def _allowed_tokens(self, request: _Request):
        """A constrained request's allowed next tokens (None if unconstrained): those whose match can still finish
        within the tokens it has left (max_tokens and the context)."""
        seq = request.seq
        if seq.params.constraint is None:
            return None
        budget = min(seq.params.max_tokens - seq.num_output_tokens,
                     self.scheduler.config.max_model_len - len(seq.token_ids))
        return seq.params.constraint.allowed(request.constraint_state, budget, request.stop_ids)

    def _record_prompt_logprobs(self, logits, prompt_rows) -> None:
        """Score the prompt tokens these logits predict: {token: logprob} with the request's top alternatives."""
        rows = [row for _, row, _ in prompt_rows]
        targets = torch.tensor([r.seq.token_ids[j] for r, _, j in prompt_rows], device=logits.device)
        chosen, tops = token_logprobs(logits[rows], targets, [r.seq.params.prompt_logprobs for r, _, _ in prompt_rows])
        for (request, _, j), logprob, top in zip(prompt_rows, chosen, tops):
            request.prompt_logprobs.append({**top, request.seq.token_ids[j]: logprob})

    # ------------------------------------------------------------------------------------------------------
    # Speculative decoding: propose before scheduling, verify after the forward

    def _propose(self) -> dict[str, Proposal]:
        """Append draft tokens to the decoding requests (if the speculator is on this step); returns them."""
        if self.speculator is None:
            return {}
        running = self.scheduler.running
        self.speculator.retain({s.request_id for s in running})
        if not running or not self.speculator.enabled(len(running)):
            return {}
        decoding = [s for s in running if s.num_computed_tokens == len(s.token_ids) - 1 and not s.params.adjusts_logits]
        # Leave every running request at least its one token of the step's budget.
        per_seq = (self.scheduler.config.max_num_batched_tokens - len(running)) // max(len(decoding), 1)
        max_len = self.scheduler.config.max_model_len
        wanted = []
        for seq in decoding:
            # Drafts past max_tokens or max_model_len would be thrown away: positions must stay < max_len.
            room = min(seq.params.max_tokens - seq.num_output_tokens - 1, max_len - len(seq.token_ids))
            num_tokens = min(self.speculator.config.num_speculative_tokens, per_seq, room)
            if num_tokens > 0:
                wanted.append((seq, num_tokens))
        proposals = self.speculator.propose(wanted)
        for seq, _ in wanted:
            if seq.request_id in proposals:
                seq.token_ids += proposals[seq.request_id].tokens
        return proposals

    def _fit_proposals(self, chunks, proposals: dict[str, Proposal]) -> None:
        """Cut the drafts to what the scheduler fitted in this step; drop those of requests it did not schedule."""
        scheduled = {chunk.seq.request_id: chunk for chunk in chunks}
        for request_id, proposal in list(proposals.items()):
            seq = self.requests[request_id].seq
            chunk = scheduled.get(request_id)
            # A preempted request must be recomputed from real tokens only; a cut chunk verifies fewer drafts.
            base_len = len(seq.token_ids) - len(proposal.tokens)
            keep = 0 if chunk is None else chunk.start + chunk.num_tokens - base_len
            del seq.token_ids[base_len + keep:]
            if keep > 0:
                proposal.tokens = proposal.tokens[:keep]
                if proposal.draft_probs is not None:
                    proposal.draft_probs = proposal.draft_probs[:keep]
            else:
                del proposals[request_id]

    def _accept_drafts(self, request: _Request, proposal: Proposal, logits: torch.Tensor, now: float) -> RequestOutput:
        """Verify a request's drafts against the target's logits (K+1, vocab), keep the accepted run + one token,
        roll the K/V of the rest back, and append the new tokens as in plain decoding (stops cut the run)."""
        seq, params = request.seq, request.seq.params
        new_tokens = self.speculator.verify(logits, proposal, params, request.generator)
        del seq.token_ids[len(seq.token_ids) - len(proposal.tokens):]
        # K/V are valid for the last real token and the accepted drafts; the final new token is still pending.
        seq.num_computed_tokens = len(seq.token_ids) + len(new_tokens) - 1
        self.blocks.cache_full_blocks(seq.request_id, seq.token_ids + new_tokens, seq.num_computed_tokens)
        self.scheduler.release_blocks_beyond(seq, len(seq.token_ids) + len(new_tokens))
        chosen, tops = [None] * len(new_tokens), [None] * len(new_tokens)
        if params.logprobs is not None:
            chosen, tops = token_logprobs(logits[:len(new_tokens)], torch.tensor(new_tokens, device=logits.device),
                                          [params.logprobs] * len(new_tokens))
        pieces = []
        for token, logprob, top in zip(new_tokens, chosen, tops):
            pieces.append(self._append_token(request, token, logprob, top, now))
            if pieces[-1].finished:
                break
        return merge_outputs(pieces)

    # ------------------------------------------------------------------------------------------------------
    # Appending a token: finish detection and streamed text

    def _append_token(self, request: _Request, token: int, logprob, top_logprobs, now: float) -> RequestOutput:
        """Add a sampled token, decide whether the request is done, and build its output for this step."""
        seq, params = request.seq, request.seq.params
        seq.token_ids.append(token)
        self.generation_tokens_total += 1
        if request.first_token_time is None:
            request.first_token_time = now
        text, finish_reason, stop_string_found = "", None, False
        if token in request.stop_ids:
            finish_reason = "stop"  # the stop token's own text is not part of the output
        elif self.tokenizer is not None:
            token_bytes = self.token_bytes.get(token)
            if token_bytes is None:
                # A model may have more rows than the tokenizer has tokens (padded vocab); those ids have no text.
                token_bytes = self.tokenizer.decode_bytes([token]) if token < self.tokenizer.vocab_size else b""
                self.token_bytes[token] = token_bytes
            text = request.decoder.decode(token_bytes)
            if params.stop:
                text, stop_string_found = self._hold_back_stop_strings(request, text)
                finish_reason = "stop" if stop_string_found else None
        if finish_reason is None and params.constraint is not None and params.constraint.complete(
                request.constraint_state):
            finish_reason = "stop"  # the output is a whole match that no token can extend
        if finish_reason is None and (seq.num_output_tokens >= params.max_tokens
                                      or len(seq.token_ids) >= self.max_model_len):
            finish_reason = "length"
        if finish_reason is not None:
            if not stop_string_found:  # what was held back goes out; an unfinished character becomes U+FFFD
                text += request.unsent + request.decoder.decode(b"", final=True)
            self.scheduler.finish(seq)
            del self.requests[seq.request_id]
        return self._output(request, [token], text, finish_reason=finish_reason, token_time=now,
                            logprobs=None if logprob is None else [logprob],
                            top_logprobs=None if top_logprobs is None else [top_logprobs])

    def _hold_back_stop_strings(self, request: _Request, new_text: str) -> tuple[str, bool]:
        """The part of the unsent text + new_text that can go out now, and whether a stop string matched.

        A stop string that matches now starts inside that text: text before it went out only once no stop
        string could begin there. After a match the text is cut where the earliest stop string starts; otherwise
        its longest end that begins some stop string is held back (it may still become one)."""
        stops = request.seq.params.stop
        text = request.unsent + new_text
        if request.stop_first_chars.isdisjoint(text):  # the common case: no stop string can start in the text
            request.unsent = ""
            return text, False
        search_from = max(0, len(request.unsent) - max(len(s) for s in stops) + 1)  # a match ends in new_text
        found = [i for i in (text.find(s, search_from) for s in stops) if i >= 0]
        if found:
            request.unsent = ""
            return text[:min(found)], True
        held = self._stop_prefix_len(text, stops)
        request.unsent = text[len(text) - held:]
        return text[:len(text) - held], False

    @staticmethod
    def _stop_prefix_len(text: str, stops: list[str]) -> int:
        """Length of the longest end of text that begins some stop string (it must be held back)."""
        for length in range(min(len(text), max(len(s) for s in stops) - 1), 0, -1):
            if any(s.startswith(text[-length:]) for s in stops):
                return length
        return 0

    def _output(self, request: _Request, token_ids, text, *, finish_reason=None, error=None, token_time=None,
                logprobs=None, top_logprobs=None) -> RequestOutput:
        """A RequestOutput with the request's usage and timing; prompt logprobs ride on its first output."""
        seq = request.seq
        prompt_logprobs = None
        if request.prompt_logprobs is not None and not request.prompt_logprobs_sent and token_ids:
            prompt_logprobs, request.prompt_logprobs_sent = request.prompt_logprobs, True
        return RequestOutput(
            seq.request_id, token_ids, text, finished=finish_reason is not None, finish_reason=finish_reason,
            error=error, logprobs=logprobs, top_logprobs=top_logprobs, prompt_logprobs=prompt_logprobs,
            prompt_tokens=seq.num_prompt_tokens, completion_tokens=seq.num_output_tokens,
            cached_prompt_tokens=seq.num_cached_prompt_tokens or 0, arrival_time=request.arrival_time,
            first_token_time=request.first_token_time, token_times=[token_time] if token_time is not None else [])

    # ------------------------------------------------------------------------------------------------------
    # Offline use

    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run prompts (strings, with a tokenizer, or token id lists) to completion; one merged output each."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(params_list)} SamplingParams for {len(prompts)} prompts; pass one or one each")
        request_ids = []
        for prompt, prompt_params in zip(prompts, params_list):
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise ValueError("string prompts need an engine with a tokenizer; pass token id lists instead")
                prompt = self.tokenizer.encode(prompt)
            request_ids.append(f"generate-{next(self._generate_ids)}")
            self.add_request(request_ids[-1], prompt, prompt_params)
        pieces: dict[str, list[RequestOutput]] = {rid: [] for rid in request_ids}
        while any(not p or not p[-1].finished for p in pieces.values()):
            if not self.has_unfinished():
                raise RuntimeError("the engine went idle with requests of generate() unfinished")
            for out in self.step():
                if out.request_id in pieces:
                    pieces[out.request_id].append(out)
        return [merge_outputs(pieces[rid]) for rid in request_ids]


def merge_outputs(outputs: list[RequestOutput]) -> RequestOutput:
    """One output holding a request's successive outputs together (tokens, text, logprobs, times)."""
    last = outputs[-1]
    def joined(name):
        parts = [getattr(o, name) for o in outputs if getattr(o, name) is not None]
        return [x for part in parts for x in part] if parts else None
    prompt_logprobs = next((o.prompt_logprobs for o in outputs if o.prompt_logprobs is not None), None)
    return RequestOutput(
        last.request_id, joined("new_token_ids"), "".join(o.text for o in outputs), last.finished,
        last.finish_reason, last.error, joined("logprobs"), joined("top_logprobs"), prompt_logprobs,
        last.prompt_tokens, last.completion_tokens, last.cached_prompt_tokens, last.arrival_time,
        last.first_token_time, joined("token_times") or [])

"""The OpenAI-compatible HTTP server: aiohttp routes in front of the engine.

    python serve.py                # the newest checkpoint under out/ on http://127.0.0.1:8000
    curl localhost:8000/v1/completions -d '{"prompt": "def fib(", "max_tokens": 32, "temperature": 0}'

Routes: /v1/models, /v1/completions, /v1/chat/completions and /v1/embeddings in the shapes of the OpenAI API
(streamed as server-sent events, one `data: {json}\\n\\n` per chunk and a final `data: [DONE]`), /tokenize,
/detokenize and /tokenizer_info in vLLM's shapes, /health, /metrics (Prometheus text, metrics.py) and / (a one-file
chat page). protocol.py holds the wire format: errors as JSON in OpenAI's shape `{"error": {"message", "type",
"param", "code"}}`, strict body parsing (a lone surrogate anywhere is a 400 naming the field), the event-stream
writer; openai_requests.py reads request bodies (every field implemented or refused by name).

Structured outputs and tools. A request's output constraint (response_format, structured_outputs, a required tool
call) is compiled by openai_requests.ConstraintCache and masks the tokens of each engine step; tool calls are parsed
out of the finished reply (tools.py), a stream holding text back from where a call may begin. Embeddings
(embeddings.py) run the model's plain forward on a worker thread, one request at a time.

Threads. The engine is synchronous, so it runs on one thread of its own (`EngineLoop` in engine_loop.py), stepping
while there is work and sleeping on its command queue otherwise; nothing else touches it. Handlers on the asyncio
loop put "add" and "abort" commands on that queue, and the engine thread hands every RequestOutput back through
`loop.call_soon_threadsafe` into the asyncio.Queue of the HTTP request it belongs to. A completion with n
choices, or several prompts, is several engine requests feeding one queue. /metrics is rendered by metrics.py.

Lifetimes. A client that disconnects cancels its handler (aiohttp's `handler_cancellation`), and the handler's
`finally` aborts its engine requests, which frees their KV blocks on the engine's next step. On shutdown the
server stops accepting, waits up to `shutdown_timeout` for the requests in flight, then aborts the rest, whose
clients get an `aborted` error (and `[DONE]` when streaming); each later phase has a budget of its own (ABORT_GRACE,
HANDLER_GRACE, ENGINE_STOP_GRACE), so the whole shutdown ends within `shutdown_timeout` + 2 s. If the engine
thread dies, /health answers 503, requests in flight get a 500 and new ones a 503: nothing hangs.

Prompts. A string prompt is encoded after the tokenizer's bos token (<|bos|>, Llama 3's <|begin_of_text|>; Qwen
has none), as Hugging Face's tokenizer(text) does; token-id prompts are used as given. Chat messages are rendered
with the checkpoint's own chat template. Log-likelihood scoring (lm-eval's `local-completions`) sends `echo: true`
with `logprobs`: the prompt's tokens come back with their logprobs (the first is null: nothing precedes it), from
the engine's prompt logprobs.
lm-eval also sends `max_tokens: 0`, which the engine cannot run (it always samples), so with echo one token is
generated and dropped: it is in the engine's generation counter but not in `usage`.
lm-eval's remote tokenizer (`tokenizer_backend=remote`) reads /tokenizer_info (the special tokens and the chat
template) and finds the special ids by sending their text to /tokenize, which therefore reads special-token text
("<|eos|>") as the special token, as vLLM's does; the text of a completion or chat request never becomes one.
"""
import asyncio
import base64
import codecs
import dataclasses
import hmac
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from nanostack.sampling import SamplingParams
from nanostack.serving.embeddings import POOLINGS, embed
from nanostack.serving.engine import Engine, RequestOutput
from nanostack.serving.engine_loop import EngineLoop
from nanostack.serving.metrics import Metrics
from nanostack.serving.openai_requests import (CHAT_FIELDS, COMPLETION_FIELDS, EMBEDDING_FIELDS, ConstraintCache,
                                               Prompt, Tools, chat_messages, chat_tools, check_fields, constraint_spec,
                                               sampling_params, text_prompts, token_ids)
from nanostack.serving.protocol import ApiError, get_field, parse_json_body, write_event_stream
from nanostack.serving.tools import parse_tool_calls, streamable_length

CHAT_PAGE = Path(__file__).with_name("chat.html")
# Shutdown after shutdown_timeout, in seconds: aborted requests report back (the engine ends its current step first),
# handlers write their last event (aiohttp waits up to twice this), the engine thread ends.
ABORT_GRACE, HANDLER_GRACE, ENGINE_STOP_GRACE = 1.0, 0.25, 0.25
CONSTRAINT_CACHE_SIZE = 64                 # compiled output constraints kept (with their token masks)
log = logging.getLogger("nanostack.api")


@dataclass
class ServerConfig:
    """What the HTTP layer accepts; the engine's own limits are EngineConfig."""
    served_model_name: str = "nanostack"   # the model id clients name in requests and see in /v1/models
    api_key: str = ""                      # if set, /v1/*, /tokenize and /detokenize need `Authorization: Bearer KEY`
    max_body_bytes: int = 1 << 20          # larger request bodies get 413
    max_waiting: int = 256                 # sequences queued beyond the engine's running batch; more get 429
    max_n: int = 16                        # choices per prompt (n) at most
    max_logprobs: int = 20                 # alternatives per token (logprobs, top_logprobs) at most
    max_stop: int = 16                     # stop strings per request at most (each is checked after every token)
    shutdown_timeout: float = 30.0         # seconds a shutdown waits for requests in flight before aborting them
    pooling: str = ""                      # embeddings: mean or last (token); empty: the model's own (serve.py reads it)

    def __post_init__(self):
        if self.pooling not in ("", *POOLINGS):
            raise ValueError(f"pooling must be one of {POOLINGS} (or empty: the model's own), got {self.pooling!r}")
        for name, low in (("max_body_bytes", 1), ("max_n", 1), ("max_waiting", 0), ("max_logprobs", 0),
                          ("max_stop", 0), ("shutdown_timeout", 0)):
            if getattr(self, name) < low:
                raise ValueError(f"{name} must be >= {low}, got {getattr(self, name)}")


@dataclass
class Choice:
    """One engine request of an HTTP request, and what it has produced so far."""
    index: int
    request_id: str
    prompt: Prompt
    params: SamplingParams
    decoder: codecs.IncrementalDecoder = dataclasses.field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    started: bool = False                  # an output has arrived (the echoed prompt rides on the first)
    num_chars: int = 0                     # characters sent so far (echoed prompt included): the next text_offset
    text: str = ""
    completion_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list = dataclasses.field(default_factory=list)


class Submission:
    """The engine requests of one HTTP request: admitted and queued on creation, outputs read with `outputs()`,
    the unfinished ones aborted by `close()` (which the handler calls in a `finally`, also on a disconnect)."""

    def __init__(self, server: "Server", choices: list[Choice]):
        engine_loop = server.engine_loop
        if engine_loop is None or not engine_loop.healthy:
            raise ApiError(503, f"the engine is not running ({engine_loop and engine_loop.failure})",
                           code="engine_unavailable")
        if server.draining:
            raise ApiError(503, "the server is shutting down", code="shutting_down")
        if server.active + len(choices) > server.max_sequences:
            raise ApiError(429, f"the server is at capacity ({server.active} sequences in flight, at most "
                                f"{server.max_sequences}): retry later", code="queue_full",
                           headers={"Retry-After": "1"})
        self.server, self.engine_loop = server, engine_loop
        self.by_id = {choice.request_id: choice for choice in choices}
        self.unfinished = set(self.by_id)
        self.sink: asyncio.Queue = asyncio.Queue()
        server.track(len(choices))
        arrival = time.monotonic()
        for choice in choices:
            engine_loop.add(choice.request_id, choice.prompt.ids, choice.params, arrival, self.sink)

    async def outputs(self):
        """Yield (choice, output) as the engine produces them, until every choice has finished."""
        while self.unfinished:
            output = await self.sink.get()
            if output is None:
                raise ApiError(500, f"the engine failed: {self.engine_loop.failure}", code="engine_failed")
            if output.finished:
                self.unfinished.discard(output.request_id)
                self.server.track(-1)
                if output.finish_reason == "error":
                    raise ApiError(400, output.error or "the engine refused the request")
                if output.finish_reason == "abort":
                    raise ApiError(503, "the request was aborted: the server is shutting down", code="aborted")
            yield self.by_id[output.request_id], output

    def close(self) -> None:
        """Abort the choices that have not finished (a no-op once all have)."""
        for request_id in self.unfinished:
            self.engine_loop.abort(request_id)
        self.server.track(-len(self.unfinished))
        self.unfinished = set()


# ----------------------------------------------------------------------------------------------------------
# The server

class Server:
    """Routes and the state they share; `create_app` wires it into an aiohttp application."""

    def __init__(self, engine: Engine, config: ServerConfig):
        if engine.tokenizer is None:
            raise ValueError("the server needs an engine with a tokenizer (Engine(model, tokenizer, ...))")
        self.engine, self.config, self.tokenizer = engine, config, engine.tokenizer
        self.max_model_len = engine.scheduler.config.max_model_len
        self.max_sequences = engine.scheduler.config.max_num_seqs + config.max_waiting
        self.metrics = Metrics(self.max_model_len, engine.config.block_size)
        self.engine_loop: EngineLoop | None = None
        self.active = 0                    # engine requests submitted and not finished
        self.idle = asyncio.Event()
        self.draining = False
        self.created = int(time.time())
        self.constraints = ConstraintCache(self.tokenizer, engine.model.config.vocab_size, CONSTRAINT_CACHE_SIZE)
        self.embedding_lock = asyncio.Lock()

    # --- lifecycle -------------------------------------------------------------------------------------

    async def start(self, app) -> None:
        """Start the engine thread (on startup: it needs the running event loop)."""
        self.idle.set()
        self.engine_loop = EngineLoop(self.engine, asyncio.get_running_loop(), self._on_output,
                                      self.metrics.observe_step)
        self.engine_loop.thread.start()

    async def drain(self, app) -> None:
        """Refuse new requests, give those in flight shutdown_timeout seconds, then abort what is left."""
        self.draining = True
        try:
            await asyncio.wait_for(self.idle.wait(), self.config.shutdown_timeout)
        except asyncio.TimeoutError:
            log.warning("aborting %d requests still running after %.1fs", self.active, self.config.shutdown_timeout)
            self.engine_loop.abort()
            try:
                await asyncio.wait_for(self.idle.wait(), ABORT_GRACE)
            except asyncio.TimeoutError:
                log.error("requests did not finish after their abort; closing anyway")

    async def stop(self, app) -> None:
        """Stop the engine thread (on cleanup, after drain); a step still running ends with the process."""
        self.engine_loop.stop(ENGINE_STOP_GRACE)

    def _on_output(self, sink: asyncio.Queue, output: RequestOutput | None, scheduled_time: float | None) -> None:
        if output is not None:
            self.metrics.observe(output, scheduled_time)
        sink.put_nowait(output)

    def track(self, change: int) -> None:
        """Count engine requests in flight; `idle` is set when none is."""
        self.active += change
        if self.active:
            self.idle.clear()
        else:
            self.idle.set()

    # --- middleware ------------------------------------------------------------------------------------

    @web.middleware
    async def middleware(self, request: web.Request, handler):
        """API-key check, and every error answered as OpenAI-shaped JSON (aiohttp's own 404/405/413 included)."""
        try:
            if self.config.api_key and request.path.startswith(("/v1", "/tokenize", "/detokenize")):
                given = request.headers.get("Authorization", "")
                if not hmac.compare_digest(given.encode(), f"Bearer {self.config.api_key}".encode()):
                    raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer <key>`",
                                   code="invalid_api_key")
            return await handler(request)
        except ApiError as error:
            return error.response()
        except web.HTTPException as error:
            if error.status < 400:
                raise
            return ApiError(error.status, error.text or error.reason, code=error.reason.lower().replace(" ", "_")
                            ).response()
        except (ConnectionResetError, asyncio.CancelledError):
            raise
        except Exception as error:
            log.exception("unexpected error on %s", request.path)
            return ApiError(500, f"internal error: {type(error).__name__}: {error}").response()

    # --- request helpers -------------------------------------------------------------------------------

    async def _json_body(self, request: web.Request) -> dict:
        body = parse_json_body(await request.read())  # over client_max_size -> aiohttp raises 413
        model = get_field(body, "model", str)
        if model is not None and model != self.config.served_model_name:
            raise ApiError(404, f"the model '{model[:100]}' does not exist; this server serves "
                                f"'{self.config.served_model_name}'", param="model", code="model_not_found")
        return body

    def _chat_prompt(self, body: dict, tools: Tools) -> Prompt:
        """The messages (and tools) rendered with the chat template, ending in the assistant's generation prompt."""
        try:
            return Prompt(self.tokenizer.render_prompt(chat_messages(body), tools.definitions), "")
        except ValueError as error:  # the template refused the conversation
            raise ApiError(400, str(error), param="messages") from None

    def _sampling(self, body: dict, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None):
        return sampling_params(body, max_tokens, logprobs, prompt_logprobs, self.config.max_stop,
                               self.tokenizer.vocab_size)

    def _check_fits(self, prompt: Prompt, max_tokens: int) -> None:
        needed = len(prompt.ids) + max_tokens
        if needed > self.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens, but the request "
                                f"needs {needed} ({len(prompt.ids)} in the prompt + {max_tokens} to generate): shorten "
                                f"the prompt or lower max_tokens", param="max_tokens", code="context_length_exceeded")
        blocks = self.engine.blocks  # its size never changes, so reading it from this thread is safe
        if blocks.blocks_for(needed) > blocks.num_blocks:
            raise ApiError(400, f"{needed} tokens need {blocks.blocks_for(needed)} KV blocks; the server's cache has "
                                f"{blocks.num_blocks}: lower max_tokens", param="max_tokens")

    def _choices(self, prefix: str, prompts: list[Prompt], n: int, params: SamplingParams) -> list[Choice]:
        """n choices per prompt; with a seed, choice j uses seed + j so the choices differ yet repeat."""
        choices = []
        for index in range(len(prompts) * n):
            j = index % n
            seed = None if params.seed is None else (params.seed + j) % 2**64
            choices.append(Choice(index, f"{prefix}-{index}", prompts[index // n],
                                  dataclasses.replace(params, seed=seed) if j else params))
        if len(choices) > self.max_sequences:
            raise ApiError(400, f"{len(choices)} prompts x choices exceed what the server queues at once "
                                f"({self.max_sequences}): send fewer prompts or a smaller n", param="n")
        return choices

    @staticmethod
    def _usage(prompts: list[Prompt], choices: list[Choice]) -> dict:
        prompt_tokens = sum(len(p.ids) for p in prompts)
        completion_tokens = sum(c.completion_tokens for c in choices)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    @staticmethod
    def _stream_options(body: dict) -> tuple[bool, bool]:
        stream = get_field(body, "stream", bool, False)
        options = get_field(body, "stream_options", dict, {})
        return stream, get_field(options, "include_usage", bool, False)

    def _token_text(self, token: int) -> str:
        """A token's text; one that is not whole UTF-8 (part of a character) is "bytes:\\xe4\\xbd" as OpenAI writes it,
        so distinct tokens never share a name in the top-logprob dicts."""
        data = self.tokenizer.decode_bytes([token])
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)

    # --- routes ----------------------------------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/completions."""
        body = await self._json_body(request)
        check_fields(body, COMPLETION_FIELDS)
        echo = get_field(body, "echo", bool, False)
        logprobs = get_field(body, "logprobs", int, None, 0, self.config.max_logprobs)
        max_tokens = get_field(body, "max_tokens", int, 16, 0 if echo else 1)
        n = get_field(body, "n", int, 1, 1, self.config.max_n)
        stream, include_usage = self._stream_options(body)
        prompts = text_prompts(body, "prompt", self.tokenizer)
        params = self._sampling(body, max(max_tokens, 1), logprobs, logprobs if echo and logprobs is not None else None)
        await self.constraints.constrain(params, constraint_spec(body, Tools()))
        for prompt in prompts:
            self._check_fits(prompt, max(max_tokens, 1))
        response_id = f"cmpl-{uuid.uuid4().hex}"
        choices = self._choices(response_id, prompts, n, params)
        head = {"id": response_id, "object": "text_completion", "created": int(time.time()),
                "model": self.config.served_model_name}

        def piece(choice: Choice, output: RequestOutput) -> dict:
            """This output's part of a choice: text (the prompt first, with echo) and logprobs."""
            text, entries = "", []
            if echo and not choice.started:
                text = choice.prompt.text
                scored = output.prompt_logprobs or [None] * len(choice.prompt.ids)
                for position, (token, scores) in enumerate(zip(choice.prompt.ids, scored)):
                    data = b"" if position == 0 and choice.prompt.bos_added else self.tokenizer.decode_bytes([token])
                    entries.append((token, None if scores is None else scores[token], scores, data))
            if max_tokens > 0:
                text += output.text
                for i, token in enumerate(output.new_token_ids):
                    top = (output.top_logprobs or [None] * len(output.new_token_ids))[i]
                    logprob = output.logprobs[i] if output.logprobs else None
                    entries.append((token, logprob, None if top is None else {**top, token: logprob},
                                    self.tokenizer.decode_bytes([token])))
                choice.completion_tokens = output.completion_tokens
            choice.text += text
            choice.started = True
            if output.finished:
                choice.finish_reason = "length" if max_tokens == 0 else output.finish_reason
            part = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
            for token, logprob, scores, data in entries:
                part["tokens"].append(self._token_text(token))
                part["token_logprobs"].append(logprob)
                part["top_logprobs"].append(None if scores is None else
                                            {self._token_text(t): lp for t, lp in scores.items()})
                part["text_offset"].append(choice.num_chars)
                choice.num_chars += len(choice.decoder.decode(data))
            return {"text": text, "index": choice.index, "logprobs": part if logprobs is not None else None,
                    "finish_reason": choice.finish_reason}

        async def chunks(submission: Submission):
            async for choice, output in submission.outputs():
                delta = piece(choice, output)
                if delta["text"] or logprobs is not None or output.finished:
                    yield {**head, "choices": [delta], **({"usage": None} if include_usage else {})}
            if include_usage:
                yield {**head, "choices": [], "usage": self._usage(prompts, choices)}

        parts = {choice.index: [] for choice in choices}
        submission = Submission(self, choices)
        try:
            if stream:
                return await write_event_stream(request, chunks(submission))
            async for choice, output in submission.outputs():
                parts[choice.index].append(piece(choice, output))
        finally:
            submission.close()
        result = []
        for choice in choices:
            merged = None
            if logprobs is not None:
                merged = {key: [x for part in parts[choice.index] for x in part["logprobs"][key]]
                          for key in ("tokens", "token_logprobs", "top_logprobs", "text_offset")}
            result.append({"text": choice.text, "index": choice.index, "logprobs": merged,
                           "finish_reason": choice.finish_reason})
        return web.json_response({**head, "choices": result, "usage": self._usage(prompts, choices)})

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/chat/completions."""
        body = await self._json_body(request)
        check_fields(body, CHAT_FIELDS)
        tools = chat_tools(body)
        prompt = self._chat_prompt(body, tools)
        want_logprobs = get_field(body, "logprobs", bool, False)
        top_logprobs = get_field(body, "top_logprobs", int, None, 0, self.config.max_logprobs)
        if top_logprobs is not None and not want_logprobs:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        room = max(self.max_model_len - len(prompt.ids), 1)
        max_tokens = get_field(body, "max_completion_tokens", int, None, 1)
        max_tokens = max_tokens or get_field(body, "max_tokens", int, room, 1)
        n = get_field(body, "n", int, 1, 1, self.config.max_n)
        stream, include_usage = self._stream_options(body)
        params = self._sampling(body, max_tokens, (top_logprobs or 0) if want_logprobs else None, None)
        await self.constraints.constrain(params, constraint_spec(body, tools))
        self._check_fits(prompt, max_tokens)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        choices = self._choices(response_id, [prompt], n, params)
        kind = "chat.completion.chunk" if stream else "chat.completion"
        head = {"id": response_id, "object": kind, "created": int(time.time()), "model": self.config.served_model_name}

        def token_logprobs(output: RequestOutput) -> list[dict]:
            """OpenAI's per-token logprob entries: token text, its UTF-8 bytes, the top alternatives."""
            def entry(token, logprob):
                data = self.tokenizer.decode_bytes([token])
                return {"token": self._token_text(token), "logprob": logprob, "bytes": list(data)}
            return [{**entry(token, logprob), "top_logprobs": [entry(t, lp) for t, lp in sorted(
                        top.items(), key=lambda item: -item[1])]}
                    for token, logprob, top in zip(output.new_token_ids, output.logprobs or [],
                                                   output.top_logprobs or [])]

        def record(choice: Choice, output: RequestOutput) -> list[dict]:
            choice.text += output.text
            choice.completion_tokens = output.completion_tokens
            choice.finish_reason = output.finish_reason if output.finished else None
            entries = token_logprobs(output) if want_logprobs else []
            choice.logprobs += entries
            return entries

        def message(choice: Choice) -> tuple[str | None, list[dict]]:
            """A finished choice's content and tool calls (OpenAI's shape, JSON arguments)."""
            if tools.choice == "none":
                return choice.text, []
            content, calls = parse_tool_calls(choice.text, tools.functions)
            if calls and choice.finish_reason == "stop":
                choice.finish_reason = "tool_calls"
            return content, [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function", "function": call}
                             for call in calls]

        async def chunks(submission: Submission):
            usage = {"usage": None} if include_usage else {}
            yield {**head, "choices": [{"index": c.index, "delta": {"role": "assistant", "content": ""},
                                        "logprobs": None, "finish_reason": None} for c in choices], **usage}
            async for choice, output in submission.outputs():
                entries, delta = record(choice, output), {}
                if tools.choice == "none":
                    visible = choice.text
                elif output.finished:  # the held-back text becomes content or calls
                    visible, calls = message(choice)
                    visible = visible or ""
                    if calls:
                        delta["tool_calls"] = [{"index": k, **call} for k, call in enumerate(calls)]
                else:
                    visible = choice.text[:streamable_length(choice.text)]
                if len(visible) > choice.num_chars:
                    delta["content"], choice.num_chars = visible[choice.num_chars:], len(visible)
                if delta or entries or output.finished:
                    yield {**head, "choices": [{
                        "index": choice.index, "delta": delta,
                        "logprobs": {"content": entries, "refusal": None} if want_logprobs else None,
                        "finish_reason": choice.finish_reason}], **usage}
            if include_usage:
                yield {**head, "choices": [], "usage": self._usage([prompt], choices)}

        submission = Submission(self, choices)
        try:
            if stream:
                return await write_event_stream(request, chunks(submission))
            async for choice, output in submission.outputs():
                record(choice, output)
        finally:
            submission.close()
        replies = []
        for c in choices:
            content, calls = message(c)
            replies.append({"index": c.index, "message": {"role": "assistant", "content": content,
                                                          **({"tool_calls": calls} if calls else {})},
                            "logprobs": {"content": c.logprobs, "refusal": None} if want_logprobs else None,
                            "finish_reason": c.finish_reason})
        return web.json_response({**head, "choices": replies, "usage": self._usage([prompt], choices)})

    async def embeddings(self, request: web.Request) -> web.Response:
        """POST /v1/embeddings: one L2-normalised vector per input (a string, strings, token ids or lists of them)."""
        body = await self._json_body(request)
        check_fields(body, EMBEDDING_FIELDS)
        get_field(body, "user", str)
        encoding = get_field(body, "encoding_format", str, "float")
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"'encoding_format' must be 'float' or 'base64', got {encoding[:20]!r}",
                           param="encoding_format")
        prompts = text_prompts(body, "input", self.tokenizer)
        longest = max(len(p.ids) for p in prompts)
        if longest > self.max_model_len:
            raise ApiError(400, f"this model's maximum context length is {self.max_model_len} tokens, but an input has "
                                f"{longest}", param="input", code="context_length_exceeded")
        if self.engine.forward != self.engine.model.forward_serving:
            raise ApiError(400, "embeddings are not served with tensor parallelism (--tp): the model is split over "
                                "processes that only run engine steps", param="input")
        async with self.embedding_lock:  # one at a time beside the engine thread
            vectors = await asyncio.to_thread(embed, self.engine.model, [p.ids for p in prompts],
                                              self.config.pooling or "mean", self.max_model_len)
        data = [{"object": "embedding", "index": i, "embedding": base64.b64encode(
                    vector.numpy().astype("<f4").tobytes()).decode() if encoding == "base64" else vector.tolist()}
                for i, vector in enumerate(vectors.cpu())]
        tokens = sum(len(p.ids) for p in prompts)
        return web.json_response({"object": "list", "data": data, "model": self.config.served_model_name,
                                  "usage": {"prompt_tokens": tokens, "total_tokens": tokens}})

    async def models(self, request: web.Request) -> web.Response:
        """GET /v1/models: the one model served."""
        return web.json_response({"object": "list", "data": [{
            "id": self.config.served_model_name, "object": "model", "created": self.created, "owned_by": "nanostack",
            "max_model_len": self.max_model_len}]})

    async def tokenize(self, request: web.Request) -> web.Response:
        """POST /tokenize: {"prompt": str, "add_special_tokens": true} or {"messages": [...]} -> token ids.
        Special-token text in the prompt ("<|eos|>") becomes that token, as in vLLM (see the module docstring)."""
        body = await self._json_body(request)
        if "messages" in body:
            ids = self._chat_prompt(body, chat_tools(body)).ids
        else:
            prompt = get_field(body, "prompt", str)
            if prompt is None:
                raise ApiError(400, "send 'prompt' (a string) or 'messages'", param="prompt")
            bos = self.tokenizer.bos_prefix if get_field(body, "add_special_tokens", bool, True) else []
            ids = bos + self.tokenizer.encode(prompt, allow_special=True)
        return web.json_response({"tokens": ids, "count": len(ids), "max_model_len": self.max_model_len})

    async def detokenize(self, request: web.Request) -> web.Response:
        """POST /detokenize: {"tokens": [ids]} -> {"prompt": text}."""
        body = await self._json_body(request)
        return web.json_response({"prompt": self.tokenizer.decode(token_ids(body.get("tokens"), "tokens", self.tokenizer.vocab_size))})

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        """GET /tokenizer_info: the tokenizer's settings as vLLM answers them (the fields of a tokenizer_config.json):
        special tokens, the chat template in Jinja, the context length."""
        specials = self.tokenizer.special_tokens
        text_of = {token_id: text for text, token_id in specials.items()}
        return web.json_response({
            "tokenizer_class": type(self.tokenizer).__name__, "bos_token": text_of.get(self.tokenizer.bos_id),
            "eos_token": text_of.get(self.tokenizer.eos_id),
            "model_max_length": self.max_model_len, "chat_template": self.tokenizer.chat_template,
            "added_tokens_decoder": {str(token_id): {"content": text, "special": True}
                                     for text, token_id in specials.items()}})

    async def health(self, request: web.Request) -> web.Response:
        """GET /health: 200 while the engine thread runs, 503 after it died."""
        if self.engine_loop is None or not self.engine_loop.healthy:
            raise ApiError(503, f"the engine is not running ({self.engine_loop and self.engine_loop.failure})",
                           code="engine_unavailable")
        return web.json_response({"status": "ok"})

    async def prometheus(self, request: web.Request) -> web.Response:
        """GET /metrics in the Prometheus text format."""
        text = self.metrics.render(self.engine_loop.stats, self.config.served_model_name)
        return web.Response(body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    async def chat_page(self, request: web.Request) -> web.FileResponse:
        """GET /: the chat page."""
        return web.FileResponse(CHAT_PAGE, headers={"Content-Type": "text/html; charset=utf-8"})


SERVER = web.AppKey("server", Server)


def create_app(engine: Engine, config: ServerConfig | None = None) -> web.Application:
    """The aiohttp application serving `engine`; its engine thread starts and stops with the app."""
    server = Server(engine, config or ServerConfig())
    app = web.Application(middlewares=[server.middleware], client_max_size=server.config.max_body_bytes)
    app[SERVER] = server
    app.on_startup.append(server.start)
    app.on_shutdown.append(server.drain)
    app.on_cleanup.append(server.stop)
    app.router.add_get("/v1/models", server.models)
    app.router.add_post("/v1/completions", server.completions)
    app.router.add_post("/v1/chat/completions", server.chat_completions)
    app.router.add_post("/v1/embeddings", server.embeddings)
    app.router.add_post("/tokenize", server.tokenize)
    app.router.add_post("/detokenize", server.detokenize)
    app.router.add_get("/tokenizer_info", server.tokenizer_info)
    app.router.add_get("/health", server.health)
    app.router.add_get("/metrics", server.prometheus)
    app.router.add_get("/", server.chat_page)
    return app


async def start_server(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, int]:
    """Listen on host:port (0 = any free port); returns the runner (`await runner.cleanup()` shuts down) and port.

    A disconnecting client cancels its handler, which aborts its engine requests; shutdown drains (see drain), and
    only then does aiohttp wait for the handlers, which by then have little left to write."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=HANDLER_GRACE)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, runner.addresses[0][1]

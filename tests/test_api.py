"""OpenAI-compatible server (serving/api.py, serve.py) on 127.0.0.1, checked against independent references:
texts and logprobs against a full-recompute forward of the same model, the official `openai` client for the
shapes, 64 concurrent streams against the same requests served alone, hypothesis-made hostile bodies, disconnects,
engine death, shutdown, /metrics counters against what was sent, and the chat page in headless Chromium."""
import asyncio
import concurrent.futures
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import aiohttp
import jinja2.sandbox
import openai
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nanostack.checkpoint import load_checkpoint, save_checkpoint
from nanostack.serving.api import SERVER, ServerConfig, create_app, start_server
from nanostack.serving.engine import Engine, EngineConfig
from nanostack.serving.speculative import SpeculativeConfig, Speculator
from prometheus_text import parse_prometheus

# conftest.py: `tokenizer` (tiny BPE), `sharpened_model` (fixed-seed random GPT factory), `one_thread`.
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 160
LIMITS = ServerConfig(max_body_bytes=64 * 1024, max_waiting=64, max_n=4, max_logprobs=5, max_stop=4)


@pytest.fixture(scope="module")
def checkpoint_dir(tokenizer, sharpened_model, tmp_path_factory):
    """A sharpened random model saved as a checkpoint, which the server (and serve.py) loads."""
    model = sharpened_model(tokenizer.vocab_size, MAX_SEQ_LEN)
    return save_checkpoint(tmp_path_factory.mktemp("api") / "ckpt", model.state_dict(), model.config, tokenizer)


@pytest.fixture(scope="module")
def model(checkpoint_dir):
    return load_checkpoint(checkpoint_dir)["model"].eval()


class LiveServer:
    """The app on 127.0.0.1 (any free port), its event loop on a background thread, for synchronous clients."""

    def __init__(self, engine: Engine, config: ServerConfig):
        self.engine, self.app = engine, create_app(engine, config)
        self.server = self.app[SERVER]
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner, port = self.call(start_server(self.app, "127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{port}"

    def call(self, coroutine, timeout=60):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout)

    def close(self):
        self.call(self.runner.cleanup())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def client(self, api_key="unused"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def live(model, tokenizer):
    server = LiveServer(Engine(model, tokenizer, EngineConfig(max_num_seqs=64)), LIMITS)
    yield server
    server.close()


@pytest.fixture
def make_live(model, tokenizer):
    """Fresh servers with their own engine, for tests that patch the engine or need exact counters."""
    servers = []

    def make(config=LIMITS, **engine_fields):
        servers.append(LiveServer(Engine(model, tokenizer, EngineConfig(**engine_fields)), config))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def slow_steps(engine: Engine, seconds: float) -> None:
    """Make each engine step take `seconds` longer, so a request is surely still running when the test acts."""
    step = engine.step
    engine.step = lambda: (time.sleep(seconds), step())[1]


def post(url: str, body, headers=None, timeout=30):
    """POST JSON (or raw bytes) -> (status, headers, parsed JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.headers, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers, json.loads(error.read())


def wait_until(condition, timeout=20.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def assert_openai_error(status, body, expected_status=None):
    assert 400 <= status < 600 and (expected_status is None or status == expected_status), (status, body)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]


# ------------------------------------------------------------------------------------------------------------
# References: the model's plain forward over the whole sequence

@torch.no_grad()
def reference_logprobs(model, ids) -> torch.Tensor:
    """log_softmax of the full forward in float64: row p scores the token at position p + 1. (T, vocab)"""
    return torch.log_softmax(model(torch.tensor([ids]))[0].double(), dim=-1)


@torch.no_grad()
def reference_greedy(model, ids, max_tokens, stop_ids=()) -> list[int]:
    """Full recompute, argmax, append: the obviously correct greedy decoder."""
    ids, out = list(ids), []
    while len(out) < max_tokens and len(ids) < MAX_SEQ_LEN:
        out.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
        ids.append(out[-1])
        if out[-1] in stop_ids:
            break
    return out


def token_name(tokenizer, token: int) -> str:
    """How OpenAI names a token in logprobs: its text, or "bytes:\\x.." when it is not whole UTF-8."""
    data = tokenizer.decode_bytes([token])
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def expected_text(tokenizer, tokens) -> tuple[str, str]:
    """(text, finish_reason) of greedy tokens: a trailing stop token ends the text and is not part of it."""
    stopped = bool(tokens) and tokens[-1] in tokenizer.stop_ids
    text = tokenizer.decode_bytes(tokens[:-1] if stopped else tokens).decode("utf-8", "replace")
    return text, "stop" if stopped else "length"


# ------------------------------------------------------------------------------------------------------------
# The official client: completions and chat, streaming or not, usage, n > 1, logprobs

def test_completions_match_full_recompute(live, model, tokenizer):
    client, prompt = live.client(), "def fib(n):"
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    tokens = reference_greedy(model, ids, 12, tokenizer.stop_ids)
    text, finish = expected_text(tokenizer, tokens)
    reference = reference_logprobs(model, ids + tokens)

    result = client.completions.create(model="nanostack", prompt=prompt, max_tokens=12, temperature=0, logprobs=3)
    assert result.object == "text_completion" and result.id.startswith("cmpl-") and result.model == "nanostack"
    choice = result.choices[0]
    assert (choice.index, choice.text, choice.finish_reason) == (0, text, finish)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), len(tokens))
    assert result.usage.total_tokens == len(ids) + len(tokens)
    logprobs = choice.logprobs
    assert logprobs.tokens == [token_name(tokenizer, t) for t in tokens]
    for i, token in enumerate(tokens):
        assert logprobs.token_logprobs[i] == pytest.approx(reference[len(ids) - 1 + i, token].item(), abs=1e-4)
        top = logprobs.top_logprobs[i]
        assert 3 <= len(top) <= 4 and max(top.values()) == pytest.approx(logprobs.token_logprobs[i])  # greedy: top-1
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0

    pieces, usage, finishes = [], None, []
    for chunk in client.completions.create(model="nanostack", prompt=prompt, max_tokens=12, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        pieces += [c.text for c in chunk.choices]
        finishes += [c.finish_reason for c in chunk.choices if c.finish_reason]
        usage = chunk.usage or usage
        assert chunk.usage is None or not chunk.choices  # usage only on the final, choice-less chunk
    assert "".join(pieces) == text and finishes == [finish] and usage == result.usage


def test_echo_logprobs_score_the_prompt(live, model, tokenizer):
    """lm-eval's log-likelihood request: echo + logprobs + max_tokens 0 returns the prompt's own logprobs."""
    client = live.client()
    prompt_ids = [[5, 77, 140, 33, 200, 9], [tokenizer.bos_id] + tokenizer.encode("fib(n - 1)")]
    result = client.completions.create(model="nanostack", prompt=prompt_ids, echo=True, max_tokens=0, logprobs=1,
                                       temperature=0)
    assert result.usage.completion_tokens == 0 and result.usage.prompt_tokens == sum(map(len, prompt_ids))
    for ids, choice in zip(prompt_ids, result.choices):
        reference = reference_logprobs(model, ids)
        assert choice.text == tokenizer.decode(ids) and choice.finish_reason == "length"
        assert choice.logprobs.tokens == [token_name(tokenizer, t) for t in ids]
        assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
        for j in range(1, len(ids)):
            assert choice.logprobs.token_logprobs[j] == pytest.approx(reference[j - 1, ids[j]].item(), abs=1e-4)
            assert len(choice.logprobs.top_logprobs[j]) in (1, 2)  # the top 1 plus the prompt's own token

    # A string prompt gets <|bos|> (no text of its own), then its tokens at their character offsets; generated
    # tokens follow the echoed prompt.
    prompt = "def fib(n): return n"
    ids = [tokenizer.bos_id] + tokenizer.encode(prompt)
    tokens = reference_greedy(model, ids, 3, tokenizer.stop_ids)
    reference = reference_logprobs(model, ids + tokens)
    choice = client.completions.create(model="nanostack", prompt=prompt, echo=True, max_tokens=3, logprobs=0,
                                       temperature=0).choices[0]
    assert choice.text == prompt + expected_text(tokenizer, tokens)[0]
    assert choice.logprobs.tokens[0] == "<|bos|>" and choice.logprobs.token_logprobs[0] is None
    lengths = [len(tokenizer.decode([t])) for t in ids[1:]]  # the prompt is ASCII: every token decodes alone
    assert choice.logprobs.text_offset[:len(ids)] == [0] + [sum(lengths[:i]) for i in range(len(lengths))]
    assert choice.logprobs.token_logprobs[1:] == pytest.approx(
        [reference[p - 1, t].item() for p, t in enumerate(ids + tokens) if p], abs=1e-4)


def test_chat_matches_full_recompute(live, model, tokenizer):
    client = live.client()
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "what does json.dumps do?"}]
    ids, _ = tokenizer.render_chat(messages, add_generation_prompt=True)
    tokens = reference_greedy(model, ids, 10, tokenizer.stop_ids)
    text, finish = expected_text(tokenizer, tokens)
    reference = reference_logprobs(model, ids + tokens)

    result = client.chat.completions.create(model="nanostack", messages=messages, max_completion_tokens=10,
                                            temperature=0, logprobs=True, top_logprobs=2)
    assert result.object == "chat.completion" and result.id.startswith("chatcmpl-")
    choice = result.choices[0]
    assert (choice.message.role, choice.message.content, choice.finish_reason) == ("assistant", text, finish)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(ids), len(tokens))
    assert len(choice.logprobs.content) == len(tokens)
    for i, (token, entry) in enumerate(zip(tokens, choice.logprobs.content)):
        assert bytes(entry.bytes) == tokenizer.decode_bytes([token])
        assert entry.logprob == pytest.approx(reference[len(ids) - 1 + i, token].item(), abs=1e-4)
        alternatives = [alt.logprob for alt in entry.top_logprobs]
        assert len(alternatives) == 2 and alternatives == sorted(alternatives, reverse=True)
        assert alternatives[0] == pytest.approx(entry.logprob)  # greedy picked the most likely token

    chunks = list(client.chat.completions.create(model="nanostack", messages=messages, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [finish]
    assert chunks[-1].choices == [] and chunks[-1].usage == result.usage


def test_n_choices_and_seeds(live, tokenizer):
    client = live.client()
    request = dict(model="nanostack", prompt="The quick", max_tokens=6, temperature=1.0, seed=7,
                   extra_body={"ignore_eos": True})
    result = client.completions.create(n=3, **request)
    assert [c.index for c in result.choices] == [0, 1, 2] and result.usage.completion_tokens == 18
    assert result.usage.prompt_tokens == 1 + len(tokenizer.encode("The quick"))  # counted once, not per choice
    again = client.completions.create(n=3, **request)
    assert [c.text for c in again.choices] == [c.text for c in result.choices]  # seeded: reproducible
    # Choice j samples with seed + j, whatever else shares the batch.
    assert client.completions.create(**{**request, "seed": 9}).choices[0].text == result.choices[2].text

    seen = {0: [], 1: []}
    for chunk in client.chat.completions.create(model="nanostack", messages=[{"role": "user", "content": "hi"}], n=2,
                                                max_tokens=5, temperature=0.8, stream=True):
        for choice in chunk.choices:
            seen[choice.index].append(choice)
    for choices in seen.values():
        assert choices[0].delta.role == "assistant" and choices[-1].finish_reason in ("stop", "length")


def test_tokenize_detokenize_models(live, tokenizer):
    status, _, body = post(live.url + "/tokenize", {"prompt": "def fib(n):"})
    assert status == 200 and body["tokens"] == [tokenizer.bos_id] + tokenizer.encode("def fib(n):")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_SEQ_LEN
    _, _, body = post(live.url + "/tokenize", {"prompt": "def", "add_special_tokens": False})
    assert body["tokens"] == tokenizer.encode("def")
    messages = [{"role": "user", "content": "hi"}]
    _, _, body = post(live.url + "/tokenize", {"messages": messages})
    assert body["tokens"] == tokenizer.render_chat(messages, add_generation_prompt=True)[0]
    ids = tokenizer.encode("Grüße aus Köln!")
    assert post(live.url + "/detokenize", {"tokens": ids})[2] == {"prompt": "Grüße aus Köln!"}
    assert [m.id for m in live.client().models.list().data] == ["nanostack"]


def test_lm_eval_remote_tokenizer_and_loglikelihood(live, model, tokenizer):
    """The calls lm-evaluation-harness's `local-completions` makes with `tokenizer_backend=remote`: /tokenizer_info
    (it needs `eos_token`), special ids found by sending their text to /tokenize, the chat template rendered with
    Jinja, then token-id prompts scored with echo + logprobs, the continuation's sum taken from `[ctxlen:-1]`."""
    with urllib.request.urlopen(live.url + "/tokenizer_info", timeout=10) as response:
        info = json.loads(response.read())

    def encode(text):
        return post(live.url + "/tokenize", {"prompt": text, "add_special_tokens": False})[2]["tokens"]
    assert encode("test") == tokenizer.encode("test")
    assert [encode(info["bos_token"]), encode(info["eos_token"])] == [[tokenizer.bos_id], [tokenizer.eos_id]]
    assert post(live.url + "/detokenize", {"tokens": encode(info["eos_token"])})[2]["prompt"] == "<|eos|>"
    assert info["model_max_length"] == MAX_SEQ_LEN and info["tokenizer_class"]

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "what does json.dumps do?"}]
    template = jinja2.sandbox.ImmutableSandboxedEnvironment().from_string(info["chat_template"])
    # Rendered as apply_chat_template does: the special tokens' text as variables.
    rendered = template.render(messages=messages, add_generation_prompt=True, bos_token=info["bos_token"],
                               eos_token=info["eos_token"])
    assert encode(rendered) == tokenizer.render_chat(messages, add_generation_prompt=True)[0]

    context, continuation = "def fib(n):", " return fib(n - 1)"
    ids, ctxlen = encode(context + continuation), len(encode(context))
    status, _, reply = post(live.url + "/v1/completions", {"model": "nanostack", "prompt": [ids], "temperature": 0,
                                                           "max_tokens": 1, "logprobs": 1, "seed": 1234, "echo": True})
    assert status == 200
    scored = reply["choices"][0]["logprobs"]
    reference = reference_logprobs(model, ids)
    expected = [float(reference[p - 1, ids[p]]) for p in range(ctxlen, len(ids))]
    assert scored["token_logprobs"][ctxlen:-1] == pytest.approx(expected, abs=1e-4)
    greedy = all(token == max(top.values()) for token, top in zip(scored["token_logprobs"][ctxlen:-1],
                                                                  scored["top_logprobs"][ctxlen:-1]))
    assert greedy == all(int(reference[p - 1].argmax()) == ids[p] for p in range(ctxlen, len(ids)))


def test_lone_surrogates_are_refused_with_the_field_named(live, tokenizer):
    # JSON can spell a lone surrogate; json.dumps writes it as the escape, which is how a client would send it.
    cases = [("/v1/completions", {"prompt": "hi \ud800", "stream": True, "echo": True}, "prompt"),
             ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\udfff"}]}, "messages[0].content"),
             ("/v1/completions", {"prompt": "hi", "stop": ["ok", "\udc00"]}, "stop[1]"),
             ("/tokenize", {"prompt": "hi", "\ud83d": 1}, "\\ud83d")]
    for path, body, field in cases:
        status, _, answer = post(live.url + path, json.dumps(body).encode())
        assert_openai_error(status, answer, 400)
        assert answer["error"]["param"] == field and field in answer["error"]["message"]
    # A surrogate pair is one character (an emoji), not a lone surrogate: accepted.
    status, _, answer = post(live.url + "/tokenize", json.dumps({"prompt": "\U0001f642"}).encode())
    assert status == 200 and answer["tokens"][1:] == tokenizer.encode("\U0001f642")


def test_a_stream_that_fails_after_its_headers_ends_with_an_error_event_and_done(make_live):
    live = make_live()

    def broken_token_text(token):
        raise RuntimeError("simulated bug while building a chunk")
    live.server._token_text = broken_token_text
    request = urllib.request.Request(live.url + "/v1/completions", data=json.dumps({
        "prompt": "hi", "max_tokens": 8, "logprobs": 1, "stream": True}).encode())
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 200
        events = response.read().decode().split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error["type"] == "server_error" and "simulated bug" in error["message"]
    wait_until(lambda: live.server.active == 0 and live.server.engine_loop.stats.kv_cache_usage == 0,
               what="the request aborted and its blocks freed")


# ------------------------------------------------------------------------------------------------------------
# Concurrency: 64 streams at once give what each gives alone

async def stream_completion(session, url, body) -> tuple[str, list[str]]:
    """POST a streaming completion; returns (concatenated text, finish reasons), checking the SSE framing."""
    async with session.post(url + "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status == 200 and response.content_type == "text/event-stream"
        events = (await response.text()).split("\n\n")
    assert events[-2:] == ["data: [DONE]", ""]
    chunks = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
    assert all(event.startswith("data: {") for event in events[:-2])
    return "".join(c["choices"][0]["text"] for c in chunks), [c["choices"][0]["finish_reason"] for c in chunks]


def test_concurrent_streams_equal_alone(live, tokenizer):
    rng = random.Random(0)
    bodies = [{"prompt": [rng.randrange(tokenizer.vocab_size) for _ in range(rng.randint(3, 40))],
               "max_tokens": rng.randint(4, 24), "temperature": 0, "ignore_eos": True} for _ in range(64)]

    async def run(concurrently: bool):
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            if concurrently:
                return await asyncio.gather(*(stream_completion(session, live.url, b) for b in bodies))
            return [await stream_completion(session, live.url, b) for b in bodies]
    together, alone = asyncio.run(run(True)), asyncio.run(run(False))
    assert together == alone
    assert all(finishes[-1] == "length" and finishes.count("length") == 1 for _, finishes in together)
    wait_until(lambda: live.server.engine_loop.stats.kv_cache_usage == 0, what="KV blocks freed")


# ------------------------------------------------------------------------------------------------------------
# Hostile input: always a 4xx JSON error, and the server keeps serving

def _not(*values):
    return st.one_of(st.text(max_size=5), st.lists(st.integers(), max_size=2), st.dictionaries(st.text(max_size=3),
                     st.integers(), max_size=2), *values)


NOT_BOOL = _not(st.integers(), st.floats(allow_nan=False))
NOT_INT = _not(st.booleans(), st.floats(allow_nan=False).filter(lambda x: x != int(x) if abs(x) < 1e300 else True))
BAD_FIELDS = {
    "max_tokens": st.one_of(NOT_INT, st.integers(max_value=0), st.integers(min_value=MAX_SEQ_LEN)),
    "temperature": st.one_of(_not(st.booleans()), st.floats(max_value=-1e-6)),
    "top_p": st.one_of(_not(st.booleans()), st.floats(max_value=0), st.floats(min_value=1.0001, allow_infinity=False)),
    "top_k": st.one_of(NOT_INT, st.integers(max_value=-1)),
    "min_p": st.one_of(_not(st.booleans()), st.floats(max_value=-1e-6), st.floats(min_value=1.0001, max_value=1e9)),
    "n": st.one_of(NOT_INT, st.integers(max_value=0), st.integers(min_value=LIMITS.max_n + 1)),
    "seed": st.one_of(NOT_INT, st.integers(min_value=2**63), st.integers(max_value=-2**63 - 1)),
    "stop": st.one_of(st.just(""), st.lists(st.just(""), min_size=1, max_size=2), st.integers(),
                      st.lists(st.text(min_size=1), min_size=LIMITS.max_stop + 1, max_size=8),
                      st.lists(st.integers(), min_size=1, max_size=3)),
    "model": st.text(max_size=20).filter(lambda name: name != "nanostack"),
    "stream": NOT_BOOL, "ignore_eos": NOT_BOOL,
    "stream_options": st.one_of(st.integers(), st.text(max_size=3), st.fixed_dictionaries({"include_usage": NOT_BOOL})),
}
COMPLETION_FIELDS = {
    **BAD_FIELDS, "echo": NOT_BOOL,
    "logprobs": st.one_of(NOT_INT, st.integers(max_value=-1), st.integers(min_value=LIMITS.max_logprobs + 1)),
    "prompt": st.one_of(st.integers(), st.just([]), st.just([[]]), st.lists(st.integers(max_value=-1), min_size=1),
                        st.lists(st.integers(min_value=320), min_size=1, max_size=3), st.just([[1, "a"]]),
                        st.lists(st.integers(0, 300), min_size=MAX_SEQ_LEN, max_size=MAX_SEQ_LEN + 5),
                        st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                        st.lists(st.booleans(), min_size=1, max_size=3)),
}
MESSAGES = st.one_of(st.just([]), st.text(max_size=5), st.lists(st.integers(), min_size=1, max_size=2),
                     st.lists(st.fixed_dictionaries({"role": st.text(max_size=8).filter(
                         lambda r: r not in ("system", "developer", "user", "assistant")), "content": st.just("hi")}),
                         min_size=1, max_size=2),
                     st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.one_of(
                         st.integers(), st.lists(st.integers(), min_size=1, max_size=2),
                         st.just([{"type": "image_url", "image_url": {"url": "x"}}]))}), min_size=1, max_size=2))
CHAT_FIELDS = {
    **BAD_FIELDS, "logprobs": NOT_BOOL, "messages": MESSAGES,
    "max_completion_tokens": st.one_of(NOT_INT, st.integers(max_value=0), st.integers(min_value=MAX_SEQ_LEN)),
    "top_logprobs": st.one_of(NOT_INT, st.integers(max_value=-1), st.integers(min_value=LIMITS.max_logprobs + 1)),
}
VALID = {"/v1/completions": {"prompt": "hi", "max_tokens": 2}, "/tokenize": {"prompt": "hi"},
         "/v1/chat/completions": {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}
FIELDS = {"/v1/completions": COMPLETION_FIELDS, "/v1/chat/completions": CHAT_FIELDS,
          "/tokenize": {"prompt": st.one_of(st.integers(), st.booleans(), st.lists(st.text(max_size=3), max_size=2)),
                        "add_special_tokens": NOT_BOOL, "messages": MESSAGES,
                        "model": BAD_FIELDS["model"]}}
JSON_VALUES = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
                           lambda children: st.lists(children, max_size=3), max_leaves=8)


@st.composite
def hostile_requests(draw) -> tuple[str, bytes]:
    """A route and a body it must reject: a valid body with one field made wrong, or something not a request."""
    path = draw(st.sampled_from([*VALID, "/detokenize"]))
    kind = draw(st.sampled_from(["field", "field", "field", "not_object", "garbage", "missing"]))
    if kind == "field" and path in FIELDS:
        name = draw(st.sampled_from(sorted(FIELDS[path])))
        return path, json.dumps({**VALID[path], name: draw(FIELDS[path][name])}).encode()
    if kind == "field":  # /detokenize
        bad_ids = st.one_of(st.just([]), st.lists(st.integers(min_value=320), min_size=1, max_size=3),
                            st.lists(st.integers(max_value=-1), min_size=1, max_size=3), st.text(max_size=5),
                            st.booleans(), st.lists(st.text(max_size=2), min_size=1, max_size=2))
        return path, json.dumps({"tokens": draw(bad_ids)}).encode()
    if kind == "not_object":
        return path, json.dumps(draw(JSON_VALUES)).encode()
    if kind == "missing":  # an object without the one required field
        return path, json.dumps(draw(st.dictionaries(st.sampled_from(["max_tokens", "n", "x", "stream"]),
                                                     st.integers(1, 3), max_size=3))).encode()
    garbage = draw(st.one_of(st.binary(max_size=40), st.sampled_from([b"", b"{", b'{"prompt": NaN}', b"[" * 100000,
                                                                       b'{"prompt": "hi", "temperature": Infinity}'])))
    try:
        parsed = json.loads(garbage)
    except (ValueError, RecursionError):
        parsed = None
    if isinstance(parsed, dict) and any(key in parsed for key in ("prompt", "messages", "tokens")):
        garbage = b"{" + garbage
    return path, garbage


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(request=hostile_requests())
def test_hostile_bodies_get_4xx_json(live, request):
    path, body = request
    status, _, answer = post(live.url + path, body)
    assert_openai_error(status, answer)
    assert status < 500, answer


def test_server_serves_after_hostile_bodies_and_frees_blocks(live):
    assert post(live.url + "/v1/completions", b"[" * 60000)[0] == 400  # deeply nested: RecursionError, caught
    status, _, body = post(live.url + "/v1/completions", {"prompt": "hi", "max_tokens": 3, "ignore_eos": True})
    assert status == 200 and body["usage"]["completion_tokens"] == 3
    assert post(live.url + "/health", b"")[0] == 405  # GET only, answered as JSON
    with urllib.request.urlopen(live.url + "/health", timeout=10) as response:
        assert response.status == 200
    wait_until(lambda: live.server.engine_loop.stats.kv_cache_usage == 0 == live.server.engine_loop.stats.num_running,
               what="KV blocks freed")


def test_limits_and_status_codes(live, make_live, tokenizer):
    url = live.url + "/v1/completions"
    status, _, body = post(url, {"prompt": "hi", "max_tokens": 2, "user": "u", "presence_penalty": 0.5})
    assert status == 200 and 1 <= body["usage"]["completion_tokens"] <= 2
    status, _, body = post(url, {"prompt": "hi", "max_tokens": 2, "extra": [1]})
    assert_openai_error(status, body, 400) and body["error"]["param"] == "extra"  # unknown fields are refused
    status, _, body = post(url, b'{"prompt": "' + b"x" * LIMITS.max_body_bytes + b'"}')
    assert_openai_error(status, body, 413)
    status, _, body = post(url, {"model": "gpt-4", "prompt": "hi"})
    assert_openai_error(status, body, 404) and body["error"]["code"] == "model_not_found"
    status, _, body = post(url, {"prompt": list(range(150)), "max_tokens": 20})
    assert_openai_error(status, body, 400)
    assert body["error"]["code"] == "context_length_exceeded" and "160" in body["error"]["message"]
    status, _, body = post(live.url + "/v1/nothing", {})
    assert_openai_error(status, body, 404)

    keyed = make_live(ServerConfig(api_key="secret"))
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "secret"}):
        status, _, body = post(keyed.url + "/v1/completions", {"prompt": "hi"}, headers)
        assert_openai_error(status, body, 401)
    with pytest.raises(openai.AuthenticationError):
        keyed.client("wrong").models.list()
    assert keyed.client("secret").completions.create(model="nanostack", prompt="hi", max_tokens=2).usage
    with urllib.request.urlopen(keyed.url + "/health", timeout=10) as response:  # health needs no key
        assert response.status == 200


def test_full_queue_gets_429(make_live):
    live = make_live(ServerConfig(max_waiting=1), max_num_seqs=2, max_num_batched_tokens=64)
    gate, step = threading.Event(), live.engine.step
    live.engine.step = lambda: (gate.wait(), step())[1]  # hold the engine until the queue is full
    body = {"prompt": "hi", "max_tokens": 3}
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        admitted = [pool.submit(post, live.url + "/v1/completions", body) for _ in range(3)]
        wait_until(lambda: live.server.active == 3, what="three requests in flight")
        status, headers, answer = post(live.url + "/v1/completions", body)
        assert_openai_error(status, answer, 429)
        assert headers["Retry-After"] == "1"
        gate.set()
        assert [future.result(timeout=30)[0] for future in admitted] == [200] * 3


# ------------------------------------------------------------------------------------------------------------
# Lifetimes: disconnects, engine death, shutdown

def test_disconnect_mid_stream_aborts_and_frees_blocks(make_live):
    live = make_live()
    slow_steps(live.engine, 0.02)  # 140 tokens take seconds: the request is running when the client leaves

    async def read_two_chunks_then_leave():
        async with aiohttp.ClientSession() as session:
            async with session.post(live.url + "/v1/completions", json={
                    "prompt": "hi", "max_tokens": 140, "ignore_eos": True, "stream": True}) as response:
                assert (await response.content.readuntil(b"\n\n")).startswith(b"data: {")
                await response.content.readuntil(b"\n\n")
                assert live.server.engine_loop.stats.kv_cache_usage > 0
                response.close()  # drops the connection mid-stream
    asyncio.run(read_two_chunks_then_leave())
    stats = lambda: live.server.engine_loop.stats  # noqa: E731
    wait_until(lambda: stats().kv_cache_usage == 0 and stats().num_running == 0, timeout=10, what="blocks freed")
    # The abort's output reaches the event loop (and the metrics) a moment after the engine freed the blocks.
    wait_until(lambda: live.server.metrics.finished["abort"] == 1, timeout=10, what="the abort counted")
    assert live.server.metrics.finished["length"] == 0
    assert stats().generation_tokens_total < 140


def test_engine_death_fails_requests_instead_of_hanging(make_live):
    live = make_live()

    def broken_step():
        raise RuntimeError("simulated device failure")
    live.engine.step = broken_step
    status, _, body = post(live.url + "/v1/completions", {"prompt": "hi"}, timeout=10)
    assert_openai_error(status, body, 500)
    assert "simulated device failure" in body["error"]["message"]
    with pytest.raises(urllib.error.HTTPError) as failed:
        urllib.request.urlopen(live.url + "/health", timeout=10)
    assert failed.value.code == 503
    status, _, body = post(live.url + "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                               "stream": True}, timeout=10)
    assert_openai_error(status, body, 503)


def test_shutdown_aborts_requests_after_the_timeout(make_live):
    live = make_live(ServerConfig(shutdown_timeout=0.5))
    slow_steps(live.engine, 0.05)  # 140 tokens would take 7 s
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pending = pool.submit(post, live.url + "/v1/completions", {"prompt": "hi", "max_tokens": 140,
                                                                  "ignore_eos": True})
        wait_until(lambda: live.server.engine_loop.stats.num_running == 1, what="the request running")
        start = time.monotonic()
        live.call(live.runner.cleanup())
        assert time.monotonic() - start < 5.0  # well before the 7 s the request would need
        status, _, body = pending.result(timeout=10)
    assert_openai_error(status, body, 503)
    assert body["error"]["code"] == "aborted" and live.server.active == 0


@pytest.mark.slow
def test_serve_py_sigterm_drains_and_exits_0(checkpoint_dir):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, str(ROOT / "serve.py"), "--model", str(checkpoint_dir), "--port", str(port),
               "--device", "cpu", "--shutdown-timeout", "10", "--quant", "w8a8", "--ngram", "true"]
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _is_up(port) or process.poll() is not None, timeout=90, what="serve.py listening")
        assert process.poll() is None, process.stdout.read()
        second = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=90)
        assert second.returncode == 1
        message = second.stderr.strip()
        assert "\n" not in message and "already in use" in message and "--port" in message

        events = []
        request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps({
            "prompt": "hi", "max_tokens": 100, "ignore_eos": True, "stream": True}).encode())
        with urllib.request.urlopen(request, timeout=30) as response:
            events.append(response.readline())
            process.send_signal(signal.SIGTERM)  # in flight: the server must finish this stream, then exit
            events += response.read().split(b"\n\n")
        assert process.wait(timeout=15) == 0
        assert "(w8a8)" in process.stdout.read()  # served int8, quantized on the fly
        assert events[-2:] == [b"data: [DONE]", b""]
        assert json.loads(events[-3].removeprefix(b"data: "))["choices"][0]["finish_reason"] == "length"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


@pytest.mark.slow
def test_serve_py_exits_within_the_shutdown_timeout_plus_2s_with_streams_open(tokenizer, sharpened_model, tmp_path):
    """SIGTERM with 8 streams that would run for many seconds: each gets `aborted` and [DONE], and the process is
    gone within --shutdown-timeout + 2 s."""
    model = sharpened_model(tokenizer.vocab_size, 1024, n_layer=4, n_embd=256, n_head=4, n_kv_head=4)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(tmp_path / "ckpt"), "--port",
                                str(port), "--device", "cpu", "--shutdown-timeout", "1", "--max-num-seqs", "8"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _is_up(port) or process.poll() is not None, timeout=90, what="serve.py listening")
        started, bodies = threading.Barrier(9), []

        def stream():
            request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/completions", data=json.dumps({
                "prompt": "hi", "max_tokens": 1000, "ignore_eos": True, "stream": True}).encode())
            with urllib.request.urlopen(request, timeout=60) as response:
                first = response.readline()
                started.wait(60)
                bodies.append(first + response.read())
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            streams = [pool.submit(stream) for _ in range(8)]
            started.wait(60)  # every stream has its first token
            sigterm = time.monotonic()
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=30) == 0
            elapsed = time.monotonic() - sigterm
            for future in streams:
                future.result(timeout=10)
        assert elapsed < 1 + 2, f"exited {elapsed:.1f} s after SIGTERM"
        for body in bodies:
            events = body.decode().split("\n\n")
            assert events[-2:] == ["data: [DONE]", ""]
            assert json.loads(events[-3].removeprefix("data: "))["error"]["code"] == "aborted"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()


def _is_up(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------------------
# /metrics: strict Prometheus text, counters equal to what was sent

def test_metrics_count_what_was_sent(make_live, tokenizer):
    live = make_live()
    rng = random.Random(1)
    shared = [rng.randrange(300) for _ in range(40)]  # sent twice: the second time 32 tokens (2 blocks) are cached
    requests = [(shared, 4), ([rng.randrange(300) for _ in range(7)], 5), (shared, 6)]
    for prompt, max_tokens in requests:
        status, _, _ = post(live.url + "/v1/completions", {"prompt": prompt, "max_tokens": max_tokens,
                                                           "ignore_eos": True, "temperature": 0})
        assert status == 200
    messages = [{"role": "user", "content": "hi"}]
    status, _, _ = post(live.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 3, "ignore_eos": True})
    assert status == 200
    chat_ids = tokenizer.render_chat(messages, add_generation_prompt=True)[0]
    wait_until(lambda: live.server.engine_loop.stats.kv_cache_usage == 0, what="blocks freed")

    with urllib.request.urlopen(live.url + "/metrics", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        samples = parse_prometheus(response.read().decode())
    model = ("model_name", "nanostack")

    def value(name, **labels):
        return samples[f"vllm:{name}", frozenset([model, *labels.items()])]
    num_requests, lengths = 4, [4, 5, 6, 3]
    prompt_lengths = [len(p) for p, _ in requests] + [len(chat_ids)]
    assert value("prompt_tokens_total") == sum(prompt_lengths)
    assert value("generation_tokens_total") == sum(lengths)
    assert value("request_success_total", finished_reason="length") == num_requests
    assert value("request_success_total", finished_reason="abort") == 0
    assert value("prefix_cache_hits_total") == 32
    assert value("prefix_cache_queries_total") == sum(prompt_lengths)
    assert value("num_requests_running") == value("num_requests_waiting") == value("kv_cache_usage_perc") == 0
    assert value("cache_config_info", block_size="16", num_gpu_blocks=str(live.engine.blocks.num_blocks)) == 1

    def histogram(name):
        """(cumulative counts by upper bound, sum, count), checking the buckets are cumulative and end at the count."""
        buckets = sorted((float(dict(labels)["le"]), v) for (sample, labels), v in samples.items()
                         if sample == f"vllm:{name}_bucket")
        assert [v for _, v in buckets] == sorted(v for _, v in buckets) and buckets[-1][0] == float("inf")
        assert buckets[-1][1] == value(f"{name}_count")
        return dict(buckets), value(f"{name}_sum"), value(f"{name}_count")
    phases = ("time_to_first_token_seconds", "e2e_request_latency_seconds", "request_queue_time_seconds",
              "request_prefill_time_seconds", "request_decode_time_seconds", "request_inference_time_seconds")
    seconds = {name: histogram(name)[1] for name in phases}
    for name in phases:
        assert histogram(name)[2] == num_requests
    assert histogram("inter_token_latency_seconds")[2] == sum(n - 1 for n in lengths)
    assert seconds["time_to_first_token_seconds"] > 0 and seconds["request_decode_time_seconds"] > 0
    # Each phase ends where the next begins: queue + prefill = TTFT, prefill + decode = inference, TTFT + decode = e2e.
    for whole, first, second in (("time_to_first_token", "request_queue_time", "request_prefill_time"),
                                 ("request_inference_time", "request_prefill_time", "request_decode_time"),
                                 ("e2e_request_latency", "time_to_first_token", "request_decode_time")):
        assert seconds[f"{whole}_seconds"] == pytest.approx(seconds[f"{first}_seconds"] + seconds[f"{second}_seconds"],
                                                            rel=1e-9, abs=1e-9)
    buckets, total, count = histogram("request_prompt_tokens")
    assert (total, count) == (sum(prompt_lengths), num_requests)
    assert [buckets[bound] for bound in (5.0, 10.0, 20.0, 50.0, 100.0)] == [
        sum(n <= bound for n in prompt_lengths) for bound in (5, 10, 20, 50, 100)]  # vLLM's 1-2-5 buckets
    assert histogram("request_generation_tokens")[1:] == (sum(lengths), num_requests)
    # Every step computes the prompt tokens not found in the prefix cache, and each sampled token but the last.
    _, total, count = histogram("iteration_tokens_total")
    assert total == sum(prompt_lengths) - 32 + sum(n - 1 for n in lengths) and count >= max(lengths)


def test_speculative_serving_streams_the_greedy_text_and_exports_its_counters(model, tokenizer):
    engine = Engine(model, tokenizer, EngineConfig(), Speculator(SpeculativeConfig(num_speculative_tokens=3)))
    live = LiveServer(engine, LIMITS)
    try:
        prompt = [5, 6, 7, 8] * 6  # repetitive, so n-gram lookup has something to propose
        stream = live.client().completions.create(model="nanostack", prompt=prompt, max_tokens=24, temperature=0,
                                                  stream=True, extra_body={"ignore_eos": True})
        text = "".join(chunk.choices[0].text for chunk in stream if chunk.choices)
        assert text == tokenizer.decode(reference_greedy(model, prompt, 24))
        with urllib.request.urlopen(live.url + "/metrics", timeout=10) as response:
            samples = parse_prometheus(response.read().decode())
        spec = engine.stats().speculative
        model_label = ("model_name", "nanostack")
        assert spec.num_draft_tokens > 0
        assert samples["vllm:spec_decode_num_draft_tokens_total", frozenset([model_label])] == spec.num_draft_tokens
        assert samples["vllm:spec_decode_num_accepted_tokens_total", frozenset([model_label])] \
            == spec.num_accepted_tokens == sum(spec.accepted_per_position)
    finally:
        live.close()


# ------------------------------------------------------------------------------------------------------------
# The chat page in headless Chromium

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


async def run_page(url: str, timeout: float = 60.0) -> dict:
    """Open url in headless Chromium over the DevTools protocol; wait until the page's reply is done."""
    # Chromium's helper processes can still be writing to the profile as the browser exits; the whole process
    # group is stopped, and whatever they leave behind in the temporary profile is not the test's business.
    with tempfile.TemporaryDirectory(ignore_cleanup_errors=True) as profile:
        browser = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                                    f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        try:
            port_file = Path(profile) / "DevToolsActivePort"
            deadline = time.monotonic() + timeout
            while not (port_file.exists() and port_file.read_text().strip()):
                assert time.monotonic() < deadline and browser.poll() is None, "Chromium did not start"
                await asyncio.sleep(0.1)
            port = int(port_file.read_text().split()[0])
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/json/list") as response:
                    page = next(t for t in await response.json() if t["type"] == "page")
                async with session.ws_connect(page["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                    ids = iter(range(1, 1_000_000))

                    async def call(method, **params):
                        message_id = next(ids)
                        await ws.send_json({"id": message_id, "method": method, "params": params})
                        while True:
                            message = await ws.receive_json(timeout=timeout)
                            if message.get("id") == message_id:
                                return message.get("result", {})
                    await call("Page.navigate", url=url)
                    probe = ("JSON.stringify({state: document.body && document.body.dataset.state, replies: "
                             "[...document.querySelectorAll('#log > div')].map(d => [d.className, d.textContent, "
                             "d.dataset.chunks])})")
                    while time.monotonic() < deadline:
                        result = await call("Runtime.evaluate", expression=probe, returnByValue=True)
                        state = json.loads(result["result"]["value"])
                        if state["state"] in ("done", "error"):
                            return state
                        await asyncio.sleep(0.1)
                    raise AssertionError(f"the page did not finish: {state}")
        finally:
            os.killpg(browser.pid, signal.SIGTERM)
            browser.wait(10)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (Debian: apt-get install -y chromium)")
def test_chat_page_streams_in_headless_chromium(live):
    messages = [{"role": "user", "content": "what does json.dumps do?"}]
    status, _, expected = post(live.url + "/v1/chat/completions", {"messages": messages, "max_tokens": 8,
                                                                  "temperature": 0})
    assert status == 200
    state = asyncio.run(run_page(live.url + "/?" + urllib.parse.urlencode(
        {"prompt": messages[0]["content"], "max_tokens": 8, "temperature": 0})))
    assert state["state"] == "done", state
    (user_class, user_text, _), (reply_class, reply_text, chunks) = state["replies"]
    assert (user_class, user_text) == ("user", messages[0]["content"])
    assert reply_class == "assistant" and reply_text == expected["choices"][0]["message"]["content"]
    assert int(chunks) > 2  # the reply arrived as a stream of events, not in one piece

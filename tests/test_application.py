"""The application layer through the OpenAI API (serving/api.py with openai_requests.py, tools.py, constrained.py,
embeddings.py): the official `openai` SDK for structured outputs, tool calls (streamed too) and embeddings, jsonschema
as the oracle of every reply, bad requests answered with 400s that name the problem, and the examples/ scripts run
against a live serve.py."""
import json
import re
import socket
import subprocess
import sys

import jsonschema
import numpy as np
import pytest
from pydantic import BaseModel

from nanostack.checkpoint import save_checkpoint
from nanostack.serving.api import ServerConfig
from nanostack.serving.engine import Engine, EngineConfig
from test_api import ROOT, LiveServer, _is_up, assert_openai_error, post, wait_until

pytestmark = pytest.mark.usefixtures("one_thread")
TOOLS = [{"type": "function", "function": {"name": "calculate", "parameters": {
             "type": "object", "properties": {"a": {"type": "number"}, "op": {"enum": ["+", "*"]}, "b": {"type": "integer"}},
             "required": ["a", "op", "b"], "additionalProperties": False}}},
         {"type": "function", "function": {"name": "lookup", "parameters": {
             "type": "object", "properties": {"word": {"type": "string", "maxLength": 8}}, "required": ["word"]}}}]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
USER = [{"role": "user", "content": "what is 2 + 3?"}]


class Pet(BaseModel):
    name: str
    legs: int
    tags: list[str]
    owner: "Owner | None"


class Owner(BaseModel):
    name: str
    adult: bool


@pytest.fixture(scope="module")
def live(tokenizer, sharpened_model):
    model = sharpened_model(tokenizer.vocab_size, 1024)
    server = LiveServer(Engine(model, tokenizer, EngineConfig(max_num_seqs=16)), ServerConfig(max_n=4))
    yield server
    server.close()


def test_response_format_and_structured_outputs(live):
    client = live.client()
    completion = client.chat.completions.parse(model="nanostack", messages=USER, response_format=Pet, n=3, seed=5,
                                               max_tokens=150, temperature=1.0)
    assert len(completion.choices) == 3
    for choice in completion.choices:  # the SDK validated each reply into a Pet
        assert isinstance(choice.message.parsed, Pet) and choice.finish_reason == "stop"
    reply = client.completions.create(model="nanostack", prompt="def fib(n):", max_tokens=80, temperature=0.9, seed=1,
                                      extra_body={"response_format": {"type": "json_object"}})
    assert isinstance(json.loads(reply.choices[0].text), dict)
    for constraint, check in [({"choice": ["yes", "no", "maybe"]}, lambda t: t in ("yes", "no", "maybe")),
                              ({"regex": r"\d{3}-[a-zé]{2,4}"}, lambda t: re.fullmatch(r"\d{3}-[a-zé]{2,4}", t))]:
        for seed in range(3):
            reply = client.completions.create(model="nanostack", prompt="hi", max_tokens=12, seed=seed,
                                              extra_body={"structured_outputs": constraint})
            assert check(reply.choices[0].text), (constraint, reply.choices[0].text)


def test_tool_calls_required_named_and_streamed(live):
    client = live.client()
    for tool_choice, names in [("required", {"calculate", "lookup"}),
                               ({"type": "function", "function": {"name": "lookup"}}, {"lookup"})]:
        for stream in (False, True):
            kwargs = dict(model="nanostack", messages=USER, tools=TOOLS, tool_choice=tool_choice, max_tokens=200,
                          temperature=1.0, seed=3)
            if stream:
                calls, finish = {}, None
                for chunk in client.chat.completions.create(stream=True, **kwargs):
                    for delta in chunk.choices[0].delta.tool_calls or []:
                        call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                        call["name"] += delta.function.name or ""
                        call["arguments"] += delta.function.arguments or ""
                    finish = chunk.choices[0].finish_reason or finish
                calls = list(calls.values())
            else:
                choice = client.chat.completions.create(**kwargs).choices[0]
                assert choice.message.content is None and all(c.id.startswith("call_") for c in choice.message.tool_calls)
                calls, finish = [{"name": c.function.name, "arguments": c.function.arguments}
                                 for c in choice.message.tool_calls], choice.finish_reason
            assert calls and finish == "tool_calls"
            for call in calls:
                assert call["name"] in names
                jsonschema.validate(json.loads(call["arguments"]), PARAMETERS[call["name"]])
    # The conversation continues with the call and its result (role "tool"); "auto" leaves the choice to the model.
    history = USER + [{"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function",
                      "function": {"name": "calculate", "arguments": '{"a": 2, "op": "+", "b": 3}'}}]},
                      {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    reply = client.chat.completions.create(model="nanostack", messages=history, tools=TOOLS, max_tokens=8)
    assert reply.choices[0].finish_reason in ("length", "stop", "tool_calls")


def test_embeddings_with_the_sdk(live, tokenizer):
    client = live.client()
    texts = ["def fib(n):", "Grüße aus Köln", "what does json.dumps do?"]
    batched = np.array([item.embedding for item in client.embeddings.create(model="nanostack", input=texts).data])
    assert batched.shape == (3, 64) and np.allclose(np.linalg.norm(batched, axis=1), 1, atol=1e-5)
    for text, vector in zip(texts, batched):
        alone = client.embeddings.create(model="nanostack", input=text).data[0].embedding  # base64 on the wire
        assert np.allclose(alone, vector, atol=1e-6)
    status, _, body = post(live.url + "/v1/embeddings", {"input": [[tokenizer.bos_id] + tokenizer.encode(texts[1])],
                                                         "encoding_format": "float"})
    assert status == 200 and np.allclose(body["data"][0]["embedding"], batched[1], atol=1e-6)
    assert body["usage"]["prompt_tokens"] == len(tokenizer.encode(texts[1])) + 1


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}}, "'/properties/a/type'"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "string", "format": "date"}}}}, "'format' is not supported (at '/format')"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": r"(a)\1"}}, "backreference"),
    ("/v1/completions", {"prompt": "hi", "structured_outputs": {"regex": "[ab]{0,30000}"}}, "automaton states"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {
        "type": "array"}}}]}, "parameters must be a JSON schema of type object"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "must name one of the tools"),
    ("/v1/chat/completions", {"tools": TOOLS, "tool_choice": "required", "max_tokens": 10}, "max_tokens=10"),
    ("/v1/chat/completions", {"suffix": "x"}, "unsupported parameter 'suffix'"),
    ("/v1/chat/completions", {"logit_bias": {"100000": 5}}, "logit_bias"),
    ("/v1/embeddings", {"input": "hi", "dimensions": 8}, "unsupported parameter 'dimensions'"),
    ("/v1/embeddings", {"input": []}, "'input' must be"),
])
def test_bad_requests_get_400s_that_name_the_problem(live, path, body, needle):
    if path == "/v1/chat/completions":
        body = {"messages": USER, **body}
    status, _, answer = post(live.url + path, body)
    assert_openai_error(status, answer, 400)
    assert needle in answer["error"]["message"], answer
    status, _, answer = post(live.url + "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert status == 200  # and the server stays up


@pytest.mark.slow
def test_examples_run_against_serve_py(tokenizer, sharpened_model, tmp_path):
    model = sharpened_model(tokenizer.vocab_size, 1024)
    save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--model", str(tmp_path / "ckpt"), "--port",
                                str(port), "--device", "cpu"], cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        wait_until(lambda: _is_up(port) or process.poll() is not None, timeout=90, what="serve.py listening")
        outputs = {}
        for example in ("structured_extraction", "calculator_agent", "rag_stdlib"):
            run = subprocess.run([sys.executable, str(ROOT / "examples" / f"{example}.py"), "--base-url",
                                  f"http://127.0.0.1:{port}/v1"], capture_output=True, text=True, timeout=180)
            assert run.returncode == 0, run.stderr
            outputs[example] = run.stdout
    finally:
        process.terminate()
        process.wait(30)
    assert outputs["structured_extraction"].count("-> Function(") == 2
    assert re.search(r"tool call: calculate\(\{.*\}\) = ", outputs["calculator_agent"])
    recalls = {name: float(value) for name, value in re.findall(r"(bm25|embeddings): recall@1 [\d.]+  recall@5 "
                                                                 r"([\d.]+)", outputs["rag_stdlib"])}
    assert recalls["bm25"] >= 0.5 and "embeddings" in recalls and "answer: " in outputs["rag_stdlib"]

"""OpenAI request bodies -> what the engine runs: prompts, sampling parameters, tools and output constraints.

Every field a route accepts is listed here (COMPLETION_FIELDS, CHAT_FIELDS, EMBEDDING_FIELDS) and implemented; any
other is answered with a 400 that names it, as OpenAI's API does, rather than accepted and ignored. The output
constraint of a request is a small JSON-able spec, which is also its cache key: {"json": schema},
{"json_object": true}, {"regex": pattern}, {"choice": [strings]} or {"tool_calls": {name: parameters},
"parallel": bool}, from `response_format` (OpenAI), `structured_outputs` (vLLM's: json, regex, choice, json_object)
or a required tool call; `spec_pattern` turns it into a pattern for serving/constrained.py, and a ConstraintCache
compiles it (on a worker thread: a large schema must not stall the event loop) and keeps the recently used ones.
"""
import asyncio
import json
import re
from dataclasses import dataclass

from nanostack.sampling import SamplingParams
from nanostack.serving.constrained import (Constraint, PatternError, Vocabulary, alt, compile_pattern, json_any,
                                           json_schema_pattern, lit, parse_regex)
from nanostack.serving.protocol import ApiError, get_field, is_int, short
from nanostack.serving.tools import tool_call_pattern

SAMPLING_FIELDS = {"model", "max_tokens", "temperature", "top_p", "n", "stream", "stream_options", "stop", "seed",
                   "user", "logit_bias", "presence_penalty", "frequency_penalty", "response_format",
                   "top_k", "min_p", "ignore_eos", "repetition_penalty", "structured_outputs"}  # (the last five: vLLM's)
COMPLETION_FIELDS = SAMPLING_FIELDS | {"prompt", "logprobs", "echo"}
CHAT_FIELDS = SAMPLING_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "tools", "tool_choice",
                                 "parallel_tool_calls"}
EMBEDDING_FIELDS = {"model", "input", "encoding_format", "user"}
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}
MESSAGE_FIELDS = {"role", "content", "tool_calls", "tool_call_id"}
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


@dataclass
class Prompt:
    """One prompt: its token ids, the text echoed for it, and whether we put a bos token before that text."""
    ids: list[int]
    text: str
    bos_added: bool = False


@dataclass
class Tools:
    """A chat request's tools: as the template gets them, {name: parameters schema}, tool_choice ("none", "auto",
    "required" or a function's name) and parallel_tool_calls."""
    definitions: list[dict] | None = None
    functions: dict | None = None
    choice: str = "none"
    parallel: bool = True


def check_fields(body: dict, accepted: set[str]) -> None:
    """A 400 naming the first field the route does not implement."""
    for name in body:
        if name not in accepted:
            raise ApiError(400, f"unsupported parameter '{name[:100]}': this server does not implement it",
                           param=name, code="unsupported_parameter")


def token_ids(value, param: str, vocab_size: int) -> list[int]:
    """A non-empty list of token ids in [0, vocab_size), or a 400 naming `param`."""
    if not isinstance(value, list) or not value or not all(is_int(t) and 0 <= t < vocab_size for t in value):
        raise ApiError(400, f"'{param}' must be a non-empty list of token ids in [0, {vocab_size}), got "
                            f"{short(value)}", param=param)
    return value


def text_prompts(body: dict, field: str, tokenizer) -> list[Prompt]:
    """The prompts of `field`: a string, a list of strings, a list of token ids, or a list of such lists. A string is
    encoded after the tokenizer's bos token, if it has one, as its training documents were; token ids are used as
    given."""
    value = body.get(field)
    if isinstance(value, str) or (isinstance(value, list) and value and all(is_int(t) for t in value)):
        value = [value]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'{field}' must be a string, a list of strings, a list of token ids or a list of "
                            f"token-id lists, got {short(value)}", param=field)
    prompts = []
    for item in value:
        if isinstance(item, str):
            bos = tokenizer.bos_prefix
            prompts.append(Prompt(bos + tokenizer.encode(item), item, bos_added=bool(bos)))
        else:
            ids = token_ids(item, field, tokenizer.vocab_size)
            prompts.append(Prompt(ids, tokenizer.decode(ids)))
    return prompts


def chat_tools(body: dict) -> Tools:
    """`tools`, `tool_choice` and `parallel_tool_calls`, checked."""
    definitions = get_field(body, "tools", list)
    choice = body.get("tool_choice")
    parallel = get_field(body, "parallel_tool_calls", bool, True)
    if not definitions:
        if choice not in (None, "none"):
            raise ApiError(400, f"'tool_choice' {short(choice)} needs 'tools'", param="tool_choice")
        return Tools(parallel=parallel)
    functions = {}
    for i, tool in enumerate(definitions):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name) or name in functions:
            raise ApiError(400, f"tools[{i}] must be {{'type': 'function', 'function': {{'name', 'parameters'}}}} with "
                                f"a new name of 1-64 letters, digits, _ or -, got {short(tool)}", param="tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict) or parameters.get("type") != "object":
            raise ApiError(400, f"tools[{i}].function.parameters must be a JSON schema of type object, got "
                                f"{short(parameters)}", param="tools")
        functions[name] = parameters
    if isinstance(choice, dict):
        named = choice.get("function", {}).get("name") if isinstance(choice.get("function"), dict) else None
        if choice.get("type") != "function" or named not in functions:
            raise ApiError(400, f"'tool_choice' {short(choice)} must name one of the tools {sorted(functions)}",
                           param="tool_choice")
        choice = named
    elif choice not in (None, "none", "auto", "required"):
        raise ApiError(400, f"'tool_choice' must be 'none', 'auto', 'required' or {{'type': 'function', 'function': "
                            f"{{'name': ...}}}}, got {short(choice)}", param="tool_choice")
    return Tools(definitions, functions, choice or "auto", parallel)


def chat_messages(body: dict) -> list[dict]:
    """The messages as the chat template takes them: text content parts joined, developer -> system, a call's
    JSON arguments parsed (Hugging Face templates expect an object)."""
    messages = get_field(body, "messages", list)
    if not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects", param="messages")
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages[{i}] must be an object with a role and content, got {short(message)}",
                           param="messages")
        role, content = message.get("role"), message.get("content")
        if isinstance(content, list):  # content parts: only text ones exist for this model
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise ApiError(400, f"messages[{i}].content parts must be {{'type': 'text', 'text': str}}",
                               param="messages")
            content = "".join(part["text"] for part in content)
        calls = message.get("tool_calls") if role == "assistant" else None
        if calls is not None and not isinstance(calls, list):
            raise ApiError(400, f"messages[{i}].tool_calls must be a list, got {short(calls)}", param="messages")
        if content is None and calls:
            content = ""
        if role not in ROLES or not isinstance(content, str):
            raise ApiError(400, f"messages[{i}] must have a role in {sorted(ROLES)} and string content, got "
                                f"{short(message)}", param="messages")
        unknown = [key for key, value in message.items() if value is not None and key not in MESSAGE_FIELDS]
        if unknown:
            raise ApiError(400, f"messages[{i}].{short(unknown[0])} is not supported", param="messages")
        rendered.append({"role": ROLES[role], "content": content})
        if calls:
            rendered[-1]["tool_calls"] = [_parsed_call(call, f"messages[{i}].tool_calls[{j}]")
                                          for j, call in enumerate(calls)]
        if role == "tool":
            rendered[-1]["tool_call_id"] = get_field(message, "tool_call_id", str)
    return rendered


def _parsed_call(call, where: str) -> dict:
    function = call.get("function") if isinstance(call, dict) else None
    try:
        arguments = json.loads(function["arguments"])
    except (TypeError, KeyError, ValueError):
        arguments = None
    if not isinstance(arguments, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"{where} must be {{'id', 'type': 'function', 'function': {{'name', 'arguments': "
                            f"JSON object text}}}}, got {short(call)}", param="messages")
    return {"id": call.get("id"), "type": "function", "function": {"name": function["name"], "arguments": arguments}}


def sampling_params(body: dict, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None, max_stop: int,
                    vocab_size: int) -> SamplingParams:
    """SamplingParams from the OpenAI fields (and vLLM's top_k, min_p, ignore_eos, repetition_penalty)."""
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop
    if stop is not None and (not isinstance(stop, list) or len(stop) > max_stop
                             or not all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, f"'stop' must be a non-empty string or a list of at most {max_stop} of them, got "
                            f"{short(body.get('stop'))}", param="stop")
    get_field(body, "user", str)  # an end-user id for the caller's own records; it changes nothing
    logit_bias = get_field(body, "logit_bias", dict, {})
    if not all(re.fullmatch(r"\d+", key) and int(key) < vocab_size and isinstance(bias, (int, float))
               and not isinstance(bias, bool) for key, bias in logit_bias.items()):
        raise ApiError(400, f"'logit_bias' must map token ids (strings of ints in [0, {vocab_size})) to numbers, got "
                            f"{short(logit_bias)}", param="logit_bias")
    try:
        return SamplingParams(
            max_tokens=max_tokens, temperature=get_field(body, "temperature", float, 1.0, 0.0),
            top_p=get_field(body, "top_p", float, 1.0), top_k=get_field(body, "top_k", int, 0),
            min_p=get_field(body, "min_p", float, 0.0), seed=get_field(body, "seed", int, None, -2**63, 2**63 - 1),
            stop=stop or [], ignore_eos=get_field(body, "ignore_eos", bool, False),
            logprobs=logprobs, prompt_logprobs=prompt_logprobs, logit_bias=logit_bias,
            presence_penalty=get_field(body, "presence_penalty", float, 0.0),
            frequency_penalty=get_field(body, "frequency_penalty", float, 0.0),
            repetition_penalty=get_field(body, "repetition_penalty", float, 1.0))
    except ValueError as error:
        raise ApiError(400, str(error)) from None


def constraint_spec(body: dict, tools: Tools) -> tuple[dict, str] | None:
    """The request's output constraint as a spec (see the module docstring) and the field it came from, or None."""
    specs = []
    response_format = get_field(body, "response_format", dict)
    if response_format is not None:
        kind = response_format.get("type")
        schema = (response_format.get("json_schema") or {}).get("schema") if kind == "json_schema" else None
        if kind == "json_object":
            specs.append(({"json_object": True}, "response_format"))
        elif isinstance(schema, dict):
            specs.append(({"json": schema}, "response_format"))
        elif kind != "text":
            raise ApiError(400, "'response_format' must be {'type': 'text'}, {'type': 'json_object'} or {'type': "
                                f"'json_schema', 'json_schema': {{'name', 'schema': {{...}}}}}}, got "
                                f"{short(response_format)}", param="response_format")
    structured = get_field(body, "structured_outputs", dict)
    if structured is not None:
        given = {key: value for key, value in structured.items() if value is not None}
        if len(given) != 1 or next(iter(given)) not in ("json", "regex", "choice", "json_object"):
            raise ApiError(400, "'structured_outputs' must set exactly one of json, regex, choice, json_object; got "
                                f"{short(sorted(given))}", param="structured_outputs")
        key, value = given.popitem()
        if key == "json" and isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError as error:
                raise ApiError(400, f"'structured_outputs.json' is not valid JSON: {error}",
                               param="structured_outputs") from None
        valid = {"json": isinstance(value, dict), "regex": isinstance(value, str), "json_object": value is True,
                 "choice": isinstance(value, list) and value and all(isinstance(c, str) and c for c in value)}[key]
        if not valid:
            raise ApiError(400, f"'structured_outputs.{key}' is not valid: {short(value)}", param="structured_outputs")
        specs.append(({key: value}, "structured_outputs"))
    if tools.choice not in ("none", "auto"):
        functions = tools.functions if tools.choice == "required" else {tools.choice: tools.functions[tools.choice]}
        specs.append(({"tool_calls": functions, "parallel": tools.parallel and tools.choice == "required"}, "tools"))
    elif tools.choice == "auto" and specs:
        raise ApiError(400, "tool_choice 'auto' cannot be combined with an output format: set tool_choice to 'none' "
                            "or 'required'", param="tool_choice")
    if len(specs) > 1:
        raise ApiError(400, f"only one output constraint per request, got {[field for _, field in specs]}",
                       param=specs[1][1])
    return specs[0] if specs else None


def spec_pattern(spec: dict):
    """The pattern (serving/constrained.py) of a constraint spec."""
    if "json" in spec:
        return json_schema_pattern(spec["json"])
    if "json_object" in spec:
        return json_any(kind="object")
    if "regex" in spec:
        return parse_regex(spec["regex"])
    if "choice" in spec:
        return alt(*[lit(choice) for choice in spec["choice"]])
    return tool_call_pattern(spec["tool_calls"], spec["parallel"])


class ConstraintCache:
    """Compiled constraints by spec over one vocabulary, least recently used first, at most `size` of them."""

    def __init__(self, tokenizer, vocab_size: int, size: int):
        self.tokenizer, self.vocab_size, self.size = tokenizer, vocab_size, size
        self.vocabulary: Vocabulary | None = None  # the tokenizer's trie, built with the first constraint
        self.compiled: dict[str, Constraint] = {}

    async def constrain(self, params: SamplingParams, found: tuple[dict, str] | None) -> None:
        """Give params the compiled constraint of (spec, field) from constraint_spec, if any; a bad spec is a 400."""
        if found is None:
            return
        spec, field = found
        key = json.dumps(spec, sort_keys=True)
        constraint = self.compiled.pop(key, None)  # put back below as the most recently used
        if constraint is None:
            try:
                constraint = await asyncio.to_thread(self._compile, spec)
            except (PatternError, RecursionError) as error:
                message = str(error) if isinstance(error, PatternError) else "the schema is nested too deeply"
                raise ApiError(400, f"'{field}': {message}", param=field) from None
            while len(self.compiled) >= self.size:
                self.compiled.pop(next(iter(self.compiled)))
        self.compiled[key] = constraint
        if constraint.min_tokens > params.max_tokens:
            raise ApiError(400, f"the shortest output '{field}' allows is {constraint.min_tokens} bytes, which "
                                f"max_tokens={params.max_tokens} may not cover: raise max_tokens", param="max_tokens")
        params.constraint = constraint

    def _compile(self, spec: dict) -> Constraint:
        if self.vocabulary is None:
            self.vocabulary = Vocabulary(self.tokenizer, self.vocab_size)
        constraint = Constraint(compile_pattern(spec_pattern(spec)), self.vocabulary)
        if constraint.min_tokens >= 2**30:
            raise PatternError("the pattern matches no text at all")
        return constraint

"""OpenAI tool calling on a chat model: the text form of a call, its constraint, and finding calls in generated text.

A call is text the model writes in its reply: `<tool_call>{"name": "calc", "arguments": {"x": 1}}</tool_call>`, the
form nanostack's chat template renders earlier calls in (and Qwen's and Hermes' templates, with newlines inside the
tags). With tool_choice "required" or a named function, the reply is constrained to one or more such calls whose
arguments match the function's parameter schema (`tool_call_pattern`), so parsing it is exact. With "auto" the model
writes freely; `parse_tool_calls` takes the reply as calls when it holds <tool_call> blocks that parse as a known
function and an arguments object (the text before the first block is the message content), or when the whole reply
is one JSON call object or a list of them (Llama 3.1's form, with "parameters" for "arguments"). Anything else is
content. A stream holds text back from a possible call on (`streamable_length`) and sends the calls at the end.
"""
import json
import re

from nanostack.serving.constrained import COLON, COMMA, alt, json_schema_pattern, lit, rep, seq

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_SPACE = re.compile(r"\s*")


def tool_call_pattern(functions: dict[str, dict], parallel: bool):
    """The pattern of one call (or, if parallel, one or more) of the functions {name: parameters schema}."""
    newline = rep(lit("\n"), 0, 1)
    call = alt(*[seq(lit(CALL_START), newline, lit('{"name"'), COLON, lit(json.dumps(name, ensure_ascii=False)), COMMA,
                     lit('"arguments"'), COLON, json_schema_pattern(parameters, pointer=f"/{name}/parameters"),
                     lit("}"), newline, lit(CALL_END))
                 for name, parameters in functions.items()])
    return seq(call, rep(seq(newline, call), 0, None if parallel else 0))


def _as_call(value, names) -> dict | None:
    if isinstance(value, dict) and value.get("name") in names:
        arguments = value.get("arguments", value.get("parameters"))
        if isinstance(arguments, dict):
            return {"name": value["name"], "arguments": arguments}
    return None


def parse_tool_calls(text: str, names) -> tuple[str | None, list[dict]]:
    """(content, [{"name", "arguments"}]) of a reply: the calls it makes of the functions `names` (see the module
    docstring), and the text before them (None if blank); ([], the text) when it makes none."""
    start = text.find(CALL_START)
    if start < 0:
        stripped = text.strip()
        if stripped.startswith(("{", "[")):
            try:
                value = json.loads(stripped)
            except ValueError:
                return text, []
            values = value if isinstance(value, list) else [value]
            calls = [_as_call(v, names) for v in values]
            if values and all(calls):
                return None, calls
        return text, []
    calls, position, decoder = [], start, json.JSONDecoder()
    while position < len(text):
        if not text.startswith(CALL_START, position):
            return text, []
        try:
            value, end = decoder.raw_decode(text, _SPACE.match(text, position + len(CALL_START)).end())
        except ValueError:
            return text, []
        end = _SPACE.match(text, end).end()
        calls.append(_as_call(value, names))
        if calls[-1] is None or not text.startswith(CALL_END, end):
            return text, []
        position = _SPACE.match(text, end + len(CALL_END)).end()
    return text[:start] if text[:start].strip() else None, calls


def streamable_length(text: str) -> int:
    """How much of a reply so far is surely content: everything before a call, or before an end that may begin one
    (a "<" starting CALL_START); nothing while the reply is blank or starts like a JSON call."""
    if not text.strip() or text.lstrip().startswith(("{", "[")):
        return 0
    start = text.find(CALL_START)
    if start >= 0:
        return start
    last = text.rfind("<")
    return last if last >= 0 and CALL_START.startswith(text[last:]) else len(text)

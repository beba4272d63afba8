"""OpenAI tool calling on a chat model: the text form of a call, its constraint, and finding calls in generated text.

A call is text the model writes in its reply: `<tool_call>{"name": "calc", "arguments": {"x": 1}}</tool_call>`, the
form nanostack's chat template renders earlier calls in (and Qwen's and Hermes' templates, with newlines inside the
tags). With tool_choice "required" or a named function, the reply is constrained to one or more such calls whose
arguments match the function's parameter schema (`tool_call_pattern`), so parsing it is exact. With "auto" the model
writes freely; `parse_tool_calls` takes the reply as calls when it holds <tool_call> blocks that parse as a known
function and an arguments object (the text before the first block is the message content), or when the whole reply
is one JSON call object (Llama 3.1's form, with "parameters" for "arguments"). Anything else is content. A stream
holds text back from where a call may begin (`streamable_length`) and sends the calls at the end.
"""
import json
import re

from nanostack.serving.constrained import COLON, COMMA, alt, json_schema_pattern, lit, rep, seq

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
_SPACE, _ARGUMENTS_KEY = re.compile(r"\s*"), re.compile(r'"(?:arguments|parameters)"\s*:\s*')
_DECODER = json.JSONDecoder()


def tool_call_pattern(functions: dict[str, dict], parallel: bool):
    """The pattern of one call (or, if parallel, one or more) of the functions {name: parameters schema}."""
    newline = rep(lit("\n"), 0, 1)
    call = alt(*[seq(lit(CALL_START), newline, lit('{"name"'), COLON, lit(json.dumps(name, ensure_ascii=False)), COMMA,
                     lit('"arguments"'), COLON, json_schema_pattern(parameters, pointer=f"/{name}/parameters"),
                     lit("}"), newline, lit(CALL_END))
                 for name, parameters in functions.items()])
    return seq(call, rep(seq(newline, call), 0, None if parallel else 0))


def _call_at(text: str, position: int, names) -> tuple[dict | None, int]:
    """The call object that starts at text[position] (None if it is not one) and where it ends. Its arguments keep
    the text they were generated as: parsed and written again, 1e999 would come back as Infinity, which is not JSON."""
    try:
        value, end = _DECODER.raw_decode(text, position)
    except ValueError:
        return None, position
    key = _ARGUMENTS_KEY.search(text, position, end)
    if not isinstance(value, dict) or value.get("name") not in names or key is None:
        return None, end
    arguments, arguments_end = _DECODER.raw_decode(text, key.end())
    if not isinstance(arguments, dict) or arguments != value.get("arguments", value.get("parameters")):
        return None, end
    return {"name": value["name"], "arguments": text[key.end():arguments_end]}, end


def parse_tool_calls(text: str, names) -> tuple[str | None, list[dict]]:
    """(content, [{"name", "arguments" (JSON text)}]) of a reply: the calls it makes of the functions `names` (see
    the module docstring) and the text before them (None if blank); (the text, []) when it makes none."""
    start = text.find(CALL_START)
    if start < 0:  # a reply that is one bare JSON call, or content
        begin = _SPACE.match(text).end()
        call, end = _call_at(text, begin, names) if text.startswith("{", begin) else (None, begin)
        return (None, [call]) if call and not text[end:].strip() else (text, [])
    calls, position = [], start
    while position < len(text):
        if not text.startswith(CALL_START, position):
            return text, []
        call, end = _call_at(text, _SPACE.match(text, position + len(CALL_START)).end(), names)
        end = _SPACE.match(text, end).end()
        if call is None or not text.startswith(CALL_END, end):
            return text, []
        calls.append(call)
        position = _SPACE.match(text, end + len(CALL_END)).end()
    return text[:start] if text[:start].strip() else None, calls


def streamable_length(text: str) -> int:
    """How much of a reply so far is surely content: everything before a call, or before an end that may begin one
    (a "<" starting CALL_START); nothing while the reply is blank or starts like a JSON call."""
    if not text.strip() or text.lstrip().startswith("{"):
        return 0
    start = text.find(CALL_START)
    if start >= 0:
        return start
    last = text.rfind("<")
    return last if last >= 0 and CALL_START.startswith(text[last:]) else len(text)

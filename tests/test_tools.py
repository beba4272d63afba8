"""Tool calls found in generated text (serving/tools.py): the tagged form in its variants, Llama's bare JSON, what is
content instead, the arguments' text kept as generated, and how much of a stream may be sent as content."""
from nanostack.serving.tools import parse_tool_calls, streamable_length

NAMES = {"calc", "look_up"}


def test_parse_tool_calls():
    calls = [{"name": "calc", "arguments": '{"a": 1e999, "op": "+"}'}, {"name": "look_up", "arguments": "{}"}]
    assert parse_tool_calls('<tool_call>{"name": "calc", "arguments": {"a": 1e999, "op": "+"}}</tool_call>'
                            '\n<tool_call>\n{"name":"look_up","arguments":{}}\n</tool_call>\n', NAMES) == (None, calls)
    assert parse_tool_calls('Let me see. <tool_call>{"arguments": {}, "name": "look_up"}</tool_call>', NAMES) == (
        "Let me see. ", calls[1:])
    assert parse_tool_calls(' {"name": "calc", "parameters": {"a": 1e999, "op": "+"}}', NAMES) == (None, calls[:1])
    for content in ['<tool_call>{"name": "nope", "arguments": {}}</tool_call>',  # an unknown function
                    '<tool_call>{"name": "calc", "arguments": [1]}</tool_call>',  # arguments not an object
                    '<tool_call>{"name": "calc", "arguments": {}}', '<tool_call>{"name": "calc", "argu',
                    '<tool_call>{"name": "calc", "arguments": {}}</tool_call> and then text',
                    '{"name": "calc", "arguments": {}} is how a call looks', "plain text", ""]:
        assert parse_tool_calls(content, NAMES) == (content, []), content


def test_streamable_length():
    for text, length in [("Hello", 5), ("Hello <tool", 6), ("a < b", 5), ("Hi <tool_call>{", 3), ("  ", 0),
                         (' {"name"', 0), ("x<", 1)]:
        assert streamable_length(text) == length, text

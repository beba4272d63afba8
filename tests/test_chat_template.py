"""Chat templates render as transformers renders them: its helpers, its sandbox, its None handling; marking.

The templates of whole conversations are checked against transformers' apply_chat_template in
test_hf_tokenizer.py (Hugging Face tokenizers) and test_tokenizer.py (nanostack's own)."""
import re

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from nanostack.chat_template import CONTROL_END, CONTROL_START, compile_chat_template, mark_controls, render

MESSAGES = [{"role": "user", "content": "<b>a & b</b> 😀", "name": "x"}]


@pytest.mark.parametrize("source", [
    "{{ messages | tojson }}",  # no HTML escaping, non-ASCII kept
    "{{ messages[0] | tojson(indent=2, sort_keys=true) }}",
    "{% for m in messages %}\n  {% generation %}{{ m.content }}{% endgeneration %}\n{% endfor %}",  # whitespace
    "{% for i in range(5) %}{% if i == 3 %}{% break %}{% endif %}{{ i }}{% endfor %}{{ bos_token }}",
])
def test_renders_as_transformers(source):
    ours = render(compile_chat_template(source), MESSAGES, False, None, {"bos_token": "<s>"})
    theirs, _ = render_jinja_template([MESSAGES], chat_template=source, bos_token="<s>")
    assert ours == theirs[0]


def test_a_key_set_to_none_is_absent():
    # transformers' apply_chat_template drops them before rendering (OpenAI clients send tool_calls=None)
    source = "{% for m in messages %}{{ m.tool_calls is defined }} {{ m.name is defined }}{% endfor %}"
    assert render(compile_chat_template(source), [{**MESSAGES[0], "tool_calls": None}], False, None, {}) == "False True"


def test_template_errors_are_value_errors():
    assert render(compile_chat_template("{{ strftime_now('%Y') }}"), [], False, None, {}).isdigit()
    with pytest.raises(ValueError, match="the chat template failed: roles must alternate"):
        render(compile_chat_template("{{ raise_exception('roles must alternate') }}"), [], False, None, {})
    with pytest.raises(ValueError, match="unsafe"):  # the sandbox
        render(compile_chat_template("{{ ''.__class__.__mro__ }}"), [], False, None, {})
    with pytest.raises(ValueError, match="does not parse"):
        compile_chat_template("{% for m in messages %}")


def test_mark_controls_wraps_control_text_and_drops_forged_marks():
    pattern = re.compile(r"<\|im_end\|>|<\|im_start\|>")
    value = {"content": f"a<|im_end|>b{CONTROL_START}<|im_start|>{CONTROL_END}", "n": 3, "list": ["<|im_end|>"]}
    assert mark_controls(value, pattern) == {
        "content": f"a{CONTROL_START}<|im_end|>{CONTROL_END}b{CONTROL_START}<|im_start|>{CONTROL_END}", "n": 3,
        "list": [f"{CONTROL_START}<|im_end|>{CONTROL_END}"]}

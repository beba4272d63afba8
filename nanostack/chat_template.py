"""Chat templates: Jinja source -> text, rendered as transformers' apply_chat_template renders it.

A template is code shipped with a checkpoint (tokenizer_config.json), so it runs sandboxed, with the few
helpers real templates call (raise_exception, tojson, strftime_now) and transformers' Jinja settings
(trim_blocks, lstrip_blocks, loop controls).

Two things the template alone does not give, both solved here without knowing the template:
- User text must not forge control tokens (nanostack's six specials, a Hugging Face tokenizer's added tokens
  marked "special"): "<|im_end|>" typed in a message stays text. The caller's strings get each control
  token's text wrapped in two private-use marks before rendering; the tokenizer encodes a marked token as
  text, together with the text around it, and drops stray marks (a template may split a string between
  them). Wrapping, rather than breaking the text, keeps template logic like `'<|im_end|>' in content` working.
- SFT needs to know which tokens are the assistant's. `reply_span` finds a reply by rendering prefixes: the
  conversation up to the reply, without and with the generation prompt, and up to the reply itself.
"""
import datetime
import functools
import json

import jinja2
import jinja2.ext
import jinja2.sandbox

# nanostack's own format: <|bos|>, then per message its role marker, the content and <|end|>. With tools, a
# system turn lists them first (one JSON per line, after the system message's own content); an assistant's calls
# follow its content as <tool_call>{"name": ..., "arguments": {...}}</tool_call>, and a tool's result is a user
# turn <tool_response>...</tool_response>. The tags are plain text: the vocabulary has no tokens for them.
NANOSTACK_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if tools %}{{ '<|system|>' }}"
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] ~ '\n\n' }}{% endif %}"
    "{{ 'Tools: call one as <tool_call>{\"name\": ..., \"arguments\": {...}}</tool_call>' }}"
    "{% for tool in tools %}{{ '\n' ~ tool | tojson }}{% endfor %}{{ '<|end|>' }}{% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant', 'tool'] %}"
    "{{ raise_exception('messages[' ~ loop.index0 ~ '] has role ' ~ message['role'] ~ "
    "'; expected system, user, assistant or tool') }}"
    "{% elif message['role'] == 'tool' %}"
    "{{ '<|user|><tool_response>' ~ message['content'] ~ '</tool_response><|end|>' }}"
    "{% elif not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}{{ '<tool_call>' ~ {'name': call['function']['name'], "
    "'arguments': call['function']['arguments']} | tojson ~ '</tool_call>' }}{% endfor %}"
    "{{ '<|end|>' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)
# Private-use characters around control-token text that came from the caller's strings.
CONTROL_START, CONTROL_END = "\U000F0000", "\U000F0001"


def _raise_template_error(message: str):
    raise jinja2.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    # Jinja's own tojson escapes HTML characters; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}`, transformers' marker of assistant text: the body renders as
    is (reply_span finds replies by rendering prefixes, with or without the marker)."""
    tags = {"generation"}

    def parse(self, parser):
        next(parser.stream)
        return parser.parse_statements(("name:endgeneration",), drop_needle=True)


@functools.lru_cache(maxsize=16)
def compile_chat_template(source: str) -> jinja2.Template:
    """A chat template compiled as transformers compiles it; a syntax error raises ValueError."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols, _GenerationBlock])
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_template_error
    environment.globals["strftime_now"] = lambda format: datetime.datetime.now().strftime(format)
    try:
        return environment.from_string(source)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"the chat template does not parse: {error.message} (template line {error.lineno})") from None


def render(template: jinja2.Template, messages, add_generation_prompt: bool, tools, variables: dict) -> str:
    """The template's text for the messages; `variables` are the special-token texts (bos_token, eos_token...)."""
    # As transformers does: a key set to None (OpenAI's tool_calls=None) reads as absent to `is defined` checks.
    messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
    try:
        return template.render(messages=messages, tools=tools, documents=None,
                               add_generation_prompt=add_generation_prompt, **variables)
    except jinja2.TemplateError as error:
        raise ValueError(f"the chat template failed: {error}") from None


def mark_controls(value, control_pattern):
    """`value`'s strings (recursively through dicts and lists) with each match of `control_pattern` wrapped in
    CONTROL_START / CONTROL_END; marks already in the strings are removed first, so no input can forge one."""
    if isinstance(value, str):
        value = value.replace(CONTROL_START, "").replace(CONTROL_END, "")
        return control_pattern.sub(lambda match: CONTROL_START + match[0] + CONTROL_END, value)
    if isinstance(value, dict):
        return {key: mark_controls(item, control_pattern) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [mark_controls(item, control_pattern) for item in value]
    return value


def reply_span(ids: list[int], before: list[int], prompt: list[int], turn: list[int], stop_ids,
               where: str) -> tuple[int, int]:
    """Where a reply lies in `ids` (the whole conversation's tokens), as [start, end).

    The messages before the reply rendered alone (`before`), with the generation prompt (`prompt`) and with
    the reply (`turn`). The reply starts where `prompt` and `turn` part (a prompt may end in text the reply
    drops, like "<think>\\n"). It ends after its last stop token: ChatML's newline after <|im_end|> is never
    generated, so it is not trained. A template that renders the reply differently once later messages follow
    (Qwen3 hides earlier reasoning) is matched up to the reply's first stop token in `ids`; one that changes
    the text *before* the reply (moves the system prompt into the last user message) is refused, naming `where`.
    """
    start = next((i for i, (a, b) in enumerate(zip(prompt, turn)) if a != b), min(len(prompt), len(turn)))
    if ids[:len(turn)] == turn:
        stops = [i for i in range(start, len(turn)) if turn[i] in stop_ids]
        end = stops[-1] + 1 if stops else len(turn)
    else:
        end = next((i + 1 for i in range(start, len(ids)) if ids[i] in stop_ids), None)
    if start < len(before) or turn[:len(before)] != before or ids[:start] != turn[:start] or end is None:
        raise ValueError(f"the chat template renders the conversation before {where} (an assistant reply) "
                         f"differently once more messages follow, or ends that reply with no stop token "
                         f"({sorted(stop_ids)}), so its loss mask cannot be found by rendering prefixes; train on "
                         f"conversations that end with that reply")
    return start, end

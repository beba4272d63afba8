"""Constrained decoding (serving/constrained.py): regular expressions against Python's `re`, UTF-8 byte ranges against
encoding every code point, token masks against decoding every token and walking it from scratch, and the property
that matters: random schemas, random untrained weights, random seeds and temperatures, and every completion parses and
validates (jsonschema as the oracle), batched beside unconstrained requests that speculate."""
import json
import random
import re

import jsonschema
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import TINY_CORPUS
from nanostack.model import GPT, ModelConfig
from nanostack.sampling import SamplingParams
from nanostack.serving.constrained import (Constraint, PatternError, Vocabulary, compile_pattern, json_any,
                                           json_schema_pattern, parse_regex, utf8_ranges)
from nanostack.serving.engine import Engine, EngineConfig
from nanostack.serving.speculative import SpeculativeConfig, Speculator
from nanostack.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def matches(automaton, text: str) -> bool:
    return bool(automaton.accepting[automaton.walk(0, text.encode())])


REGEXES = [r"^a|b+c$", r"\d{2,3}-[a-fé]+\.?", r"[^a-z]*x", r"^(?:ab|c){2}$", r"(?P<n>x)y?z*?", r"[\w.-]+@[a-z]+\.(com|org)",
           r"\u00e9{1,2}[😀-🙏]?", r"(yes|no|maybe)", r"[+-]?\d+(\.\d+)?([eE]\d+)?", r".{3}", r"\S\s\D\W"]
SAMPLES = ["", "a", "bc", "bbbc", "ac", "12-aé", "123-f.", "1-a", "ABCé😀x", "ax", "abc", "cc", "ab", "x", "xyzz", "y",
           "me.x@abc.org", "@a.com", "é", "éé😃", "ééé", "yes", "maybe", "-1.5e3", "+7", "1.", "a\nb", "a b", "é\té!"]


@pytest.mark.parametrize("pattern", REGEXES)
def test_regex_automaton_matches_python_re(pattern):
    automaton = compile_pattern(parse_regex(pattern))
    python = re.compile(pattern, re.ASCII)  # \d \w \s are ASCII in the subset, as in JSON Schema's regexes
    for text in SAMPLES:
        assert matches(automaton, text) == bool(python.fullmatch(text)), (pattern, text)


@pytest.mark.parametrize("pattern", [r"(a)\1", r"(?=a)b", r"a\b", "(?i)a", "a{3,2}", "(a", "a)", "*a", "[a", "a^b",
                                     "a++", "(^a)+"])
def test_unsupported_regexes_are_refused(pattern):
    with pytest.raises(PatternError, match="regex"):
        parse_regex(pattern)


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(st.integers(0, 0x10FFFF), st.integers(0, 200_000))
def test_utf8_ranges_cover_exactly_the_code_points(low, span):
    high = min(low + span, 0x10FFFF)
    sequences = list(utf8_ranges(low, high))
    def covered(data):
        return any(len(seq) == len(data) and all(a <= b <= c for (a, c), b in zip(seq, data)) for seq in sequences)
    for code in {low, high, (low + high) // 2, low - 1, high + 1, 0x7F, 0x80, 0x7FF, 0x800, 0xFFFF, 0x10000}:
        if 0 <= code <= 0x10FFFF and not 0xD800 <= code <= 0xDFFF:
            assert covered(chr(code).encode()) == (low <= code <= high and not 0xD800 <= code <= 0xDFFF), hex(code)


def test_json_schema_subset_and_its_errors():
    schema = {"type": "object", "$defs": {"Tag": {"enum": ["a", "é", 3, None], "type": ["string", "number"]}},
              "properties": {"name": {"type": "string", "maxLength": 3}, "age": {"type": ["integer", "null"]},
                             "tags": {"type": "array", "items": {"$ref": "#/$defs/Tag", "title": "a tag"}, "maxItems": 2},
                             "x": {"anyOf": [{"type": "boolean"}, {"type": "number"}]}},
              "required": ["name", "age"], "additionalProperties": False}
    automaton = compile_pattern(json_schema_pattern(schema))
    for text in ['{"name":"","age":null}', '{"name": "\\u00e9", "age": -0, "tags": ["é", 3], "x": 1.5e-3}',
                 '{"name":"abc","age":7,"x":true}']:
        assert matches(automaton, text), text
        jsonschema.validate(json.loads(text), schema)
    for text in ['{"age":1,"name":""}', '{"name":"abcd","age":1}', '{"name":"","age":01}', '{"name":"","age":1,}',
                 '{"name":"","age":1,"tags":["a","a","a"]}', '{"name":"","age":1,"y":1}',
                 '{"name":"","age":1,"tags":[null]}']:
        assert not matches(automaton, text), text
    assert matches(compile_pattern(json_any(kind="object")), '{"a": [1, {"b": null}], "c": "d"}')
    bad = {"type": "object", "properties": {"x": {"type": "string", "pattern": "a+"}}}
    with pytest.raises(PatternError, match="'pattern' is not supported.*'/properties/x/pattern'"):
        json_schema_pattern(bad)
    for schema, where in [({"type": "strin"}, "/type"), ({"$ref": "#/$defs/A", "$defs": {"A": {"$ref": "#/$defs/A"}}},
                          "/$defs/A/$ref"), ({"type": "array", "minItems": -1}, "/minItems"),
                          ({"anyOf": [{}], "properties": {}}, "/anyOf"), ({"type": "string", "enum": [1]}, "/enum"),
                          ({"type": "object", "properties": {"a": {}}, "additionalProperties": True},
                           "/additionalProperties"), ({"type": "object", "properties": {}, "required": ["a"]}, "/required")]:
        with pytest.raises(PatternError, match=re.escape(f"'{where or '/'}'")):
            compile_pattern(json_schema_pattern(schema))
    with pytest.raises(PatternError, match="more than 1000 automaton states"):
        compile_pattern(parse_regex("[ab]{0,1200}"), max_states=1000)


@pytest.fixture(scope="module")
def cjk_tokenizer():
    """Tokens that end inside multi-byte characters: a byte-level BPE trained on CJK and emoji text."""
    return Tokenizer.train([TINY_CORPUS + "漢字かな交じり文🙂🚀✨ 🙂🚀 한국어 텍스트 " * 8], vocab_size=400, num_workers=1)


@pytest.mark.parametrize("pattern", [r'\{"k": ("[你好世界é]*"|[0-9]+)\}', r"(🙂|🚀|fox)+ ?[^a-z]{0,4}"])
def test_token_masks_match_a_naive_walk_of_every_token(tokenizer, cjk_tokenizer, pattern):
    rng = random.Random(0)
    for tok in (tokenizer, cjk_tokenizer):
        automaton = compile_pattern(parse_regex(pattern))
        constraint = Constraint(automaton, Vocabulary(tok, tok.vocab_size + 5))  # a padded model vocabulary
        states = rng.sample(range(len(automaton.table) - 1), min(12, len(automaton.table) - 1))
        for state in states:
            budget = rng.choice([1, 2, 5, 1000])
            mask = constraint.allowed(state, budget, tok.stop_ids)
            expected = np.zeros(tok.vocab_size + 5, dtype=bool)
            for token in range(tok.vocab_size):
                if token in tok.stop_ids:
                    expected[token] = bool(automaton.accepting[state])
                elif token not in tok.special_tokens.values():
                    end = state
                    for byte in tok.decode_bytes([token]):  # from scratch, byte by byte
                        end = automaton.table[end, byte]
                    expected[token] = automaton.distance[end] <= budget - 1
            assert (mask == expected).all(), (pattern, state, np.flatnonzero(mask != expected))


# ---------------------------------------------------------------------------------------------------------------
# The property: every constrained completion parses and validates

LEAVES = st.sampled_from([{"type": "integer"}, {"type": "number"}, {"type": "boolean"}, {"type": "null"},
                          {"type": "string"}, {"type": "string", "maxLength": 2}, {"enum": ["é", "fox", 7]}])


def containers(children):
    objects = st.dictionaries(st.text("abé_", min_size=1, max_size=3), children, min_size=1, max_size=3).flatmap(
        lambda properties: st.lists(st.sampled_from(sorted(properties)), unique=True).map(lambda required: {
            "type": "object", "properties": properties, "required": required, "additionalProperties": False}))
    arrays = st.tuples(children, st.integers(0, 2), st.integers(0, 2)).map(
        lambda t: {"type": "array", "items": t[0], "minItems": t[1], "maxItems": t[1] + t[2]})
    return objects | arrays | st.lists(children, min_size=2, max_size=2).map(lambda options: {"anyOf": options})


SCHEMAS = st.recursive(LEAVES, containers, max_leaves=5)


def speculating_engine(tokenizer, seed: int) -> Engine:
    """An engine over a random untrained model (weights from `seed`) that speculates, recording who got drafts."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, max_seq_len=128, n_layer=1, n_head=2, n_kv_head=1,
                            n_embd=32)).eval()
    engine = Engine(model, tokenizer, EngineConfig(max_num_seqs=8), Speculator(SpeculativeConfig(num_speculative_tokens=3)))
    propose, engine.speculated = engine.speculator.propose, []

    def recording_propose(wanted):
        engine.speculated += [seq.params for seq, _ in wanted]
        return propose(wanted)
    engine.speculator.propose = recording_propose
    return engine


@settings(max_examples=25, derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=SCHEMAS, seed=st.integers(0, 2**31), temperature=st.sampled_from([0.0, 0.7, 1.5]))
def test_every_constrained_completion_parses_and_validates(tokenizer, schema, seed, temperature):
    constraint = Constraint(compile_pattern(json_schema_pattern(schema)), Vocabulary(tokenizer, tokenizer.vocab_size))
    max_tokens = constraint.min_tokens + 20
    prompt = [tokenizer.bos_id] + tokenizer.encode("def fib(n):")
    constrained = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i, constraint=constraint)
                   for i in range(3)]  # like n = 3
    plain = SamplingParams(max_tokens=12, temperature=temperature, seed=seed, ignore_eos=True)
    engine = speculating_engine(tokenizer, seed)
    outputs = engine.generate([prompt] * 4, constrained + [plain])
    for output in outputs[:3]:
        jsonschema.validate(json.loads(output.text), schema)
        assert len(output.new_token_ids) <= max_tokens
    assert outputs[3].completion_tokens == 12
    assert engine.speculated and all(params is plain for params in engine.speculated)  # constrained: no drafts

"""Tokenizer: the fast trainer against a naive one, tiktoken against a naive encoder, chat template, files."""
import json
import pathlib
import sysconfig

import numpy as np
import pytest
import regex
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from nanostack import tokenizer as tokenizer_module
from nanostack.tokenizer import (GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer, count_chunks, merges_to_ranks,
                                 train_bpe)


# ----------------------------------------------------------------------------------------------------
# Slow, obviously correct twins

def naive_train_bpe(chunk_counts: dict[bytes, int], vocab_size: int) -> list[tuple[int, int]]:
    """Recount every pair before every merge; same tie-break and same skip rule as train_bpe."""
    words = [(list(chunk), count) for chunk, count in chunk_counts.items()]
    token_bytes = [bytes([i]) for i in range(256)]
    merges = []
    while len(merges) < vocab_size - 256:
        pair_counts = {}
        for word, count in words:
            for pair in zip(word, word[1:]):
                pair_counts[pair] = pair_counts.get(pair, 0) + count
        candidates = [pair for pair in pair_counts if token_bytes[pair[0]] + token_bytes[pair[1]] not in token_bytes]
        if not candidates:
            break
        best = min(candidates, key=lambda pair: (-pair_counts[pair], token_bytes[pair[0]], token_bytes[pair[1]]))
        new = 256 + len(merges)
        merges.append(best)
        token_bytes.append(token_bytes[best[0]] + token_bytes[best[1]])
        words = [(merge_ids(word, best, new), count) for word, count in words]
    return merges


def merge_ids(ids: list[int], pair: tuple[int, int], new: int) -> list[int]:
    """Replace each occurrence of `pair` in ids by `new`, left to right."""
    out, i = [], 0
    while i < len(ids):
        if i + 1 < len(ids) and (ids[i], ids[i + 1]) == pair:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def naive_encode(text: str, merges: list[tuple[int, int]]) -> list[int]:
    """Split with the pattern, then apply every merge in rank order to each chunk's bytes."""
    ids = []
    for chunk in regex.findall(GPT4_SPLIT_PATTERN, text):
        chunk_ids = list(chunk.encode("utf-8"))
        for rank, pair in enumerate(merges):
            chunk_ids = merge_ids(chunk_ids, pair, 256 + rank)
        ids += chunk_ids
    return ids


# Few distinct characters make many repeated pairs and many ties; é, 中 and emoji are multi-byte.
MIXED = "aab b\n\t.é中😀"
mixed_texts = st.lists(st.text(alphabet=MIXED, max_size=40), min_size=1, max_size=8)


def stdlib_sample(max_chars: int = 300_000) -> list[str]:
    """A few deterministic standard-library sources: real text for a small trained tokenizer."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for name in ["json/decoder.py", "json/encoder.py", "textwrap.py", "string.py", "heapq.py", "difflib.py",
                 "argparse.py", "dataclasses.py"]:
        texts.append((root / name).read_text(encoding="utf-8"))
        size += len(texts[-1])
        if size >= max_chars:
            break
    return texts + ["Unicode: naïve café, 中文字符, emoji 😀🎉 and ünïcödé."]


@pytest.fixture(scope="module")
def trained():
    """(tokenizer, merges) trained on a small real corpus."""
    merges = train_bpe(count_chunks(stdlib_sample()), 256 + 500)
    return Tokenizer(merges_to_ranks(merges)), merges


# ----------------------------------------------------------------------------------------------------
# Training

@settings(max_examples=150, deadline=None)
@given(texts=mixed_texts, extra=st.integers(0, 60))
def test_fast_trainer_matches_naive_on_text(texts, extra):
    chunk_counts = count_chunks(texts)
    assert train_bpe(chunk_counts, 256 + extra) == naive_train_bpe(chunk_counts, 256 + extra)


@settings(max_examples=150, deadline=None)
@given(chunk_counts=st.dictionaries(st.binary(min_size=1, max_size=12).map(lambda b: bytes(x % 3 for x in b)),
                                   st.integers(1, 5), max_size=12),
       extra=st.integers(0, 40))
def test_fast_trainer_matches_naive_on_counts(chunk_counts, extra):
    # Three byte values in long chunks: runs like "aaaa" (overlapping pairs) and heavy ties.
    merges = train_bpe(chunk_counts, 256 + extra)
    assert merges == naive_train_bpe(chunk_counts, 256 + extra)
    merges_to_ranks(merges)  # unique bytes per token, or this raises


def test_tie_break_prefers_smaller_bytes():
    # Every pair occurs twice; (b"a", b"b") < (b"b", b"c") < (b"c", b"d"), then the new tokens.
    merges = train_bpe({b"cd": 2, b"ab": 2, b"bc": 2}, 256 + 3)
    assert merges == [(ord("a"), ord("b")), (ord("b"), ord("c")), (ord("c"), ord("d"))]
    # A higher count beats smaller bytes.
    assert train_bpe({b"ab": 1, b"yz": 2}, 257) == [(ord("y"), ord("z"))]


def test_trainer_stops_when_nothing_is_left_to_merge():
    assert train_bpe({b"abc": 1, b"x": 9}, 1000) == [(97, 98), (256, 99)]


def test_bad_training_input_is_rejected():
    with pytest.raises(ValueError, match="below 256"):
        train_bpe({b"ab": 1}, 100)
    with pytest.raises(ValueError, match="positive"):
        train_bpe({b"ab": 0}, 300)
    with pytest.raises(TypeError, match="not one string"):
        count_chunks("some text")


def test_duplicate_bytes_are_rejected_by_ranks():
    # "a"+"bc" and "ab"+"c" are both "abc": tiktoken needs one rank per byte string.
    with pytest.raises(ValueError, match="unique bytes"):
        merges_to_ranks([(97, 98), (98, 99), (256, 99), (97, 257)])


def test_count_chunks_splits_with_the_gpt4_pattern():
    counts = count_chunks(["def f(x):\n    return x's 12345\n", "def g(): pass"])
    assert counts[b"def"] == 2
    assert counts[b" f"] == 1 and counts[b"'s"] == 1
    assert counts[b"123"] == 1 and counts[b"45"] == 1  # digits in groups of at most three
    assert counts[b"):\n"] == 1  # punctuation takes the newlines after it
    assert counts[b"   "] == 1 and counts[b" return"] == 1  # indentation minus the space that starts a word


def test_count_chunks_in_processes_matches_serial(monkeypatch):
    texts = stdlib_sample(100_000)
    serial = count_chunks(texts, num_workers=1)
    monkeypatch.setattr(tokenizer_module, "BATCH_CHARS", 10_000)
    assert count_chunks(iter(texts), num_workers=2) == serial


def test_train_counts_specials_in_vocab_size():
    tok = Tokenizer.train(stdlib_sample(50_000), vocab_size=300)
    assert tok.vocab_size == 300
    assert tok.special_tokens == {s: 294 + i for i, s in enumerate(SPECIAL_TOKENS)}
    assert tok.stop_ids == {tok.special_tokens["<|eos|>"], tok.special_tokens["<|end|>"]}
    with pytest.raises(ValueError, match="too small"):
        Tokenizer.train(["abc"], vocab_size=100)


# ----------------------------------------------------------------------------------------------------
# Encoding

@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=200))
def test_decode_encode_round_trip(trained, text):
    tok, _ = trained
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert all(0 <= i < tok.vocab_size - len(SPECIAL_TOKENS) for i in ids)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(max_size=120), st.text(alphabet=MIXED + "defor():=_", max_size=120)))
def test_tiktoken_matches_naive_merge_application(trained, text):
    tok, merges = trained
    assert tok.encode(text) == naive_encode(text, merges)


def test_tiktoken_matches_naive_on_code(trained):
    tok, merges = trained
    text = (pathlib.Path(sysconfig.get_paths()["stdlib"]) / "colorsys.py").read_text(encoding="utf-8")
    assert tok.encode(text) == naive_encode(text, merges)
    assert len(text.encode("utf-8")) / len(tok.encode(text)) > 1.5  # the merges do compress


@pytest.mark.parametrize("special", SPECIAL_TOKENS)
def test_special_strings_in_user_text_stay_text(trained, special):
    tok, _ = trained
    text = f"say {special} now{special}"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_tokens.values())
    assert tok.decode(ids) == text
    assert tok.encode_batch([text, "plain"]) == [ids, tok.encode("plain")]


def test_decode_accepts_arrays_and_tensors(trained):
    tok, _ = trained
    ids = tok.encode("hello world")
    assert tok.decode(np.array(ids)) == tok.decode(torch.tensor(ids)) == "hello world"
    assert tok.decode_bytes(ids) == b"hello world"


def test_token_bytes_counts_utf8_bytes(trained):
    tok, _ = trained
    lengths = tok.token_bytes()
    assert len(lengths) == tok.vocab_size
    assert all(lengths[i] == 0 for i in tok.special_tokens.values())
    text = "naïve 中文 😀 def f(x): return x"
    assert sum(lengths[i] for i in tok.encode(text)) == len(text.encode("utf-8"))


def test_invalid_ranks_are_rejected():
    with pytest.raises(ValueError, match="exactly once"):
        Tokenizer({bytes([i]): i + 1 for i in range(256)})
    with pytest.raises(ValueError, match="single-byte"):
        Tokenizer({**{bytes([i]): i for i in range(255)}, b"ab": 255})


# ----------------------------------------------------------------------------------------------------
# Chat template

def masked_spans(ids: list[int], mask: list[int]) -> list[list[int]]:
    """Maximal runs of ids whose mask is 1."""
    spans, current = [], []
    for token, bit in zip(ids, mask):
        if bit:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    return spans + ([current] if current else [])


def test_render_chat_layout_and_mask(trained):
    tok, _ = trained
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And <|end|> 3+3?"},
                {"role": "assistant", "content": "6, naïvely 😀"}]
    ids, mask = tok.render_chat(messages)
    assert len(ids) == len(mask)
    assert tok.decode(ids) == ("<|bos|><|system|>Be brief.<|end|><|user|>What is 2+2?<|end|><|assistant|>4.<|end|>"
                               "<|user|>And <|end|> 3+3?<|end|><|assistant|>6, naïvely 😀<|end|>")
    assert [tok.decode(span) for span in masked_spans(ids, mask)] == ["4.<|end|>", "6, naïvely 😀<|end|>"]
    assert ids.count(tok.end_id) == len(messages)  # the <|end|> typed by the user stayed text

    prompt_ids, prompt_mask = tok.render_chat(messages[:2], add_generation_prompt=True)
    assert prompt_ids[-1] == tok.special_tokens["<|assistant|>"] and not any(prompt_mask)
    assert prompt_ids == ids[:len(prompt_ids)]  # the prompt is a prefix of the full conversation


@pytest.mark.parametrize("messages, error", [
    ({"role": "user", "content": "hi"}, TypeError),
    (["hi"], TypeError),
    ([{"role": "robot", "content": "hi"}], ValueError),
    ([{"content": "hi"}], ValueError),
    ([{"role": "user", "content": ["hi"]}], TypeError),
    ([{"role": "user"}], TypeError),
])
def test_render_chat_rejects_bad_messages(trained, messages, error):
    tok, _ = trained
    with pytest.raises(error, match="messages"):
        tok.render_chat(messages)


# ----------------------------------------------------------------------------------------------------
# Files

def test_save_load_round_trip(trained, tmp_path):
    tok, _ = trained
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    loaded = Tokenizer.load(path)
    assert loaded.mergeable_ranks == tok.mergeable_ranks
    assert loaded.special_tokens == tok.special_tokens and loaded.vocab_size == tok.vocab_size
    text = "def f(x): return x  # naïve 😀 <|eos|>"
    assert loaded.encode(text) == tok.encode(text)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temp file left behind
    state = json.loads(path.read_text())
    assert state["format"] == "nanostack-tokenizer" and state["version"] == 1


def test_load_errors(trained, tmp_path):
    tok, _ = trained
    with pytest.raises(FileNotFoundError, match="no tokenizer file"):
        Tokenizer.load(tmp_path / "missing.json")
    tok.save(tmp_path / "good.json")
    text = (tmp_path / "good.json").read_text()
    state = json.loads(text)
    cases = {
        "truncated.json": (text[: len(text) // 2], "not valid JSON"),
        "binary.json": ("\udcff", "not valid JSON"),
        "foreign.json": (json.dumps({"format": "hf-tokenizers", "model": {}}), "not a nanostack tokenizer"),
        "list.json": (json.dumps([1, 2]), "not a nanostack tokenizer"),
        "version.json": (json.dumps({**state, "version": 2}), "version 2"),
        "ranks.json": (json.dumps({**state, "ranks": state["ranks"][:100]}), "damaged"),
        "specials.json": (json.dumps({**state, "specials": {"<|bos|>": 0}}), "special tokens"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_text(content, errors="surrogateescape")
        with pytest.raises(ValueError, match=message):
            Tokenizer.load(tmp_path / name)

"""Byte-level BPE: train merges from scratch, then let a `tiktoken.Encoding` do all encoding and decoding.

Training works on *chunks*: the text is first split with a regex (GPT-4's pattern), so merges never cross
a chunk boundary (no token spans "word." or " the"+"\\n"). Only the unique chunks and their frequencies
matter, which turns ~30 MB of Python into ~120k short byte strings. BPE then repeats: find the most frequent
adjacent pair of tokens, make it a new token, replace it everywhere.

Rules that make the result well defined:
- Tie-break: the highest count wins; among equal counts, the smallest (bytes of left token, bytes of right
  token), compared lexicographically. The result depends only on the text, not on dict or heap order.
- Unique bytes: tiktoken maps token *bytes* to a rank, so no two tokens may have the same bytes. A pair
  whose concatenation is already a token (say "a"+"bc" after "ab"+"c" made "abc") is skipped for good and
  the next best pair taken. With every merge applied to every chunk left to right this never happens: a
  span that has become tokens [x, y] was always cut at its two ends, so it was merged exactly as the span
  alone would have been, and the span alone became the one token x+y when that token was made. The skip
  is the guard that keeps the output valid for tiktoken anyway; `merges_to_ranks` rejects merges that
  repeat bytes, and the tests check trained merges against a naive trainer with the same rule.

The trained merges become tiktoken ranks: bytes 0..255 are ranks 0..255, merge i is rank 256+i with the
bytes left+right. The special tokens (chat markers) get the ids right after the ordinary tokens; user
text never produces them: "<|eos|>" typed in a message is encoded as plain text.

A Hugging Face byte-level BPE tokenizer.json loads into the same class (nanostack/hf_tokenizer.py), with
its added tokens, Jinja chat template and stop ids; `save_hf` writes any tokenizer in that format.
"""
import base64
import heapq
import itertools
import json
import os
import unicodedata
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterable, Iterator

import regex
import tiktoken
from tqdm import tqdm

from nanostack import hf_tokenizer
from nanostack.atomic import atomic_file
from nanostack.chat_template import (CONTROL_END, CONTROL_START, NANOSTACK_CHAT_TEMPLATE, compile_chat_template,
                                     mark_controls, render as render_template, reply_span)

# cl100k's split: contractions, words with one leading non-letter (" hello"), 1-3 digit numbers, runs of
# punctuation, newlines with their indentation, other whitespace. Possessive quantifiers need `regex`.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")

FILE_FORMAT = "nanostack-tokenizer"
FILE_VERSION = 1
# Text per pre-tokenization task: big enough that process overhead is small, small enough to stream.
BATCH_CHARS = 1 << 21


# ----------------------------------------------------------------------------------------------------
# Pre-tokenization: text -> {chunk bytes: count}

def _count_batch(pattern: str, texts: list[str]) -> tuple[Counter, int]:
    """Count the regex chunks of a batch of texts (runs in a worker process)."""
    split = regex.compile(pattern)
    counts = Counter()
    for text in texts:
        counts.update(split.findall(text))
    return counts, sum(len(text) for text in texts)


def _batches(texts: Iterable[str], batch_chars: int) -> Iterator[list[str]]:
    batch, size = [], 0
    for text in texts:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")
        batch.append(text)
        size += len(text)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def available_cpus() -> int:
    """CPUs this process may run on (the affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _utf8(chunk: str) -> bytes:
    """UTF-8 bytes of a chunk; lone surrogates become U+FFFD, as tiktoken does when encoding."""
    try:
        return chunk.encode("utf-8")
    except UnicodeEncodeError:
        return chunk.encode("utf-16", "surrogatepass").decode("utf-16", "replace").encode("utf-8")


def count_chunks(texts: Iterable[str], pattern: str = GPT4_SPLIT_PATTERN,
                 num_workers: int | None = None) -> dict[bytes, int]:
    """Pre-tokenize with the split pattern and count unique chunks (utf-8 bytes).

    Texts are streamed in batches of ~BATCH_CHARS characters; from two batches on they are spread over
    `num_workers` processes (default: the CPUs this process may use), at most two batches per worker in
    flight, so a corpus larger than memory can be streamed through.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be an iterable of strings, not one string: wrap it in a list")
    num_workers = num_workers or available_cpus()
    batches = _batches(texts, BATCH_CHARS)
    head = list(itertools.islice(batches, 2))
    batches = itertools.chain(head, batches)
    counts = Counter()
    with tqdm(desc="pre-tokenize", unit="char", unit_scale=True, disable=None) as progress:
        def add(result: tuple[Counter, int]) -> None:
            batch_counts, chars = result
            counts.update(batch_counts)
            progress.update(chars)

        if len(head) < 2 or num_workers <= 1:
            for batch in batches:
                add(_count_batch(pattern, batch))
        else:
            with ProcessPoolExecutor(num_workers) as pool:
                pending = deque()
                for batch in batches:
                    pending.append(pool.submit(_count_batch, pattern, batch))
                    if len(pending) >= 2 * num_workers:
                        add(pending.popleft().result())
                for future in pending:
                    add(future.result())
    chunk_counts: dict[bytes, int] = {}
    for chunk, count in counts.items():
        key = _utf8(chunk)
        chunk_counts[key] = chunk_counts.get(key, 0) + count
    return chunk_counts


# ----------------------------------------------------------------------------------------------------
# BPE training: {chunk bytes: count} -> merges

def train_bpe(chunk_counts: dict[bytes, int], vocab_size: int) -> list[tuple[int, int]]:
    """The fast trainer: merges (pair of token ids) in order; token 256+i is merge i.

    Stops early when no pair is left to merge. State kept between merges:
    - `words`: each unique chunk as a list of token ids, with its count in `freqs`;
    - `pair_counts`: pair -> occurrences over the whole corpus (chunk count times occurrences in chunk);
    - `where`: pair -> indices of chunks that contained it when it appeared (may go stale; checked on use);
    - a max-heap of (count, bytes) per pair. Counts only ever *fall* for existing pairs (a merge eats
      their neighbours), while new pairs all contain the new token and are pushed once per merge. So an
      entry whose count is out of date is simply re-pushed with the true count when it reaches the top.
    A merge touches only the chunks in `where[pair]` and adjusts the counts of the neighbouring pairs by
    the chunk's count; nothing is recounted.
    """
    if vocab_size < 256:
        raise ValueError(f"vocab_size={vocab_size} is below 256, the number of byte tokens")
    bad = next(((chunk, count) for chunk, count in chunk_counts.items() if not count > 0), None)
    if bad:
        raise ValueError(f"chunk counts must be positive, got {bad[1]!r} for {bad[0]!r}")
    # Pairs are ints (left * shift + right): hashing an int is cheaper than hashing a tuple.
    shift = 1 << max(vocab_size.bit_length(), 9)
    words = [list(chunk) for chunk in chunk_counts if len(chunk) > 1]
    freqs = [count for chunk, count in chunk_counts.items() if len(chunk) > 1]
    pair_counts = defaultdict(int)
    where = defaultdict(list)
    for index, word in enumerate(words):
        freq = freqs[index]
        for left, right in zip(word, word[1:]):
            pair = left * shift + right
            pair_counts[pair] += freq
            where[pair].append(index)

    token_bytes = [bytes([i]) for i in range(256)]
    known_bytes = set(token_bytes)
    # heapq is a min-heap: -count puts the most frequent pair first, then the smallest (left, right) bytes.
    heap = [(-count, token_bytes[pair // shift], token_bytes[pair % shift], pair)
            for pair, count in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    with tqdm(total=vocab_size - 256, desc="bpe merges", unit="merge", disable=None) as progress:
        while len(merges) < vocab_size - 256 and heap:
            neg_count, left_bytes, right_bytes, pair = heapq.heappop(heap)
            count = pair_counts.get(pair, 0)
            if count != -neg_count:  # stale entry: requeue with the true count, if the pair still exists
                if count > 0:
                    heapq.heappush(heap, (-count, left_bytes, right_bytes, pair))
                continue
            new_bytes = left_bytes + right_bytes
            if new_bytes in known_bytes:  # another pair already made these bytes: skip for good
                continue
            left, right = divmod(pair, shift)
            new = 256 + len(merges)
            merges.append((left, right))
            token_bytes.append(new_bytes)
            known_bytes.add(new_bytes)
            new_where = _merge_pair(words, freqs, set(where.pop(pair)), left, right, new, shift, pair_counts)
            del pair_counts[pair]
            where.update(new_where)
            for new_pair in new_where:
                count = pair_counts[new_pair]
                if count > 0:
                    heapq.heappush(heap, (-count, token_bytes[new_pair // shift], token_bytes[new_pair % shift],
                                          new_pair))
            progress.update()
    return merges


def _merge_pair(words: list[list[int]], freqs: list[int], indices: set[int], left: int, right: int,
                new: int, shift: int, pair_counts: defaultdict) -> defaultdict:
    """Replace (left, right) by `new` in the given words, left to right, updating neighbour pair counts.

    Returns {new pair: indices of words that now hold it}; every new pair contains `new`.
    """
    new_where = defaultdict(list)
    for index in indices:
        word, freq = words[index], freqs[index]
        last = len(word) - 1  # a pair can start at 0..last-1
        i = 0
        while True:
            try:
                i = word.index(left, i, last)
            except ValueError:
                break
            if word[i + 1] == right:
                # In "x left right y", pairs (x, left) and (right, y) lose this occurrence and (x, new),
                # (new, y) gain it. Merging in place makes x the previous `new` in "left right left right".
                if i > 0:
                    before = word[i - 1] * shift
                    pair_counts[before + left] -= freq
                    pair_counts[before + new] += freq
                    new_where[before + new].append(index)
                if i < last - 1:
                    after = word[i + 2]
                    pair_counts[right * shift + after] -= freq
                    pair_counts[new * shift + after] += freq
                    new_where[new * shift + after].append(index)
                word[i] = new
                del word[i + 1]
                last -= 1
            i += 1
    return new_where


def merges_to_ranks(merges: list[tuple[int, int]]) -> dict[bytes, int]:
    """tiktoken's mergeable ranks: byte i is rank i, merge i is rank 256+i with bytes left+right."""
    token_bytes = [bytes([i]) for i in range(256)]
    for left, right in merges:
        token_bytes.append(token_bytes[left] + token_bytes[right])
    ranks = {token: rank for rank, token in enumerate(token_bytes)}
    if len(ranks) != len(token_bytes):
        raise ValueError("merges produce the same bytes twice; tiktoken needs unique bytes per rank")
    return ranks


# ----------------------------------------------------------------------------------------------------
# The tokenizer: tiktoken for encode/decode, plus specials, the chat template and a JSON file format

class Tokenizer:
    """Byte-level BPE tokenizer; `encoding` (a tiktoken.Encoding) does the BPE.

    nanostack's own tokenizers (from `train`) number their tokens by rank, put six special tokens right after
    them and use NANOSTACK_CHAT_TEMPLATE. A Hugging Face tokenizer.json (nanostack/hf_tokenizer.py) brings its
    own added tokens, chat template and stop ids, may NFC-normalize text and may number its tokens in another
    order than its merges; encoding still goes through tiktoken.
    """

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = GPT4_SPLIT_PATTERN, name: str = "nanostack",
                 *, special_tokens: dict[str, int] | None = None, text_tokens: Iterable[str] = (),
                 normalizer: str | None = None, token_ids: list[int] | None = None, bos_id: int | None = None,
                 eos_id: int | None = None, stop_ids: Iterable[int] | None = None,
                 chat_template: str | None = NANOSTACK_CHAT_TEMPLATE, special_tokens_map: dict[str, str] | None = None,
                 hf_config: dict | None = None):
        """`special_tokens` None: nanostack's own (ranks 0..n-1 are the ids, SPECIAL_TOKENS follow, with their
        bos / eos / end-of-turn roles). Otherwise `special_tokens` {text: id} are the added tokens, `text_tokens`
        those of them that plain text may contain (Hugging Face's non-special added tokens, like Qwen3's
        <think>), `normalizer` None or "NFC", `token_ids[rank]` the id of each rank when ids are not the ranks,
        `bos_id` the token put before a text (None: none), `eos_id` and `stop_ids` (default {eos_id}) where
        generation ends, `special_tokens_map` the template's {"bos_token": text, ...} variables and `hf_config`
        the Hugging Face config files it was read with, carried forward when it is saved."""
        missing = [i for i in range(256) if bytes([i]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"mergeable_ranks lacks single-byte tokens {missing[:8]}...: every byte needs a token")
        num_ordinary = len(mergeable_ranks)
        self.end_id = None  # nanostack's end-of-turn token
        if special_tokens is None:
            if sorted(mergeable_ranks.values()) != list(range(num_ordinary)):
                raise ValueError(f"mergeable_ranks must use each rank 0..{num_ordinary - 1} exactly once")
            special_tokens = {token: num_ordinary + i for i, token in enumerate(SPECIAL_TOKENS)}
            bos_id, eos_id, self.end_id = (special_tokens[t] for t in ("<|bos|>", "<|eos|>", "<|end|>"))
            stop_ids = (eos_id, self.end_id)
            special_tokens_map = {"bos_token": "<|bos|>", "eos_token": "<|eos|>"}
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern, self.name, self.normalizer = pattern, name, normalizer
        self.special_tokens = dict(special_tokens)
        self.text_tokens = frozenset(text_tokens)
        if not self.text_tokens <= self.special_tokens.keys():
            raise ValueError(f"text_tokens {sorted(self.text_tokens - self.special_tokens.keys())} are not in "
                             f"special_tokens")
        if normalizer not in (None, "NFC"):
            raise ValueError(f"normalizer must be None or 'NFC', got {normalizer!r}")

        # tiktoken returns ranks as ids. When the ids are not the ranks, its specials get the ranks after the
        # ordinary ones and _rank_to_id / _id_to_rank translate at the boundary (encode, decode).
        self.token_ids = None if token_ids is None else list(token_ids)
        self._rank_to_id = self._id_to_rank = None
        if self.token_ids is None:
            ordinary_ids, encoding_specials = list(self.mergeable_ranks.values()), self.special_tokens
        else:
            if sorted(self.mergeable_ranks.values()) != list(range(len(self.token_ids))):
                raise ValueError(f"with token_ids, mergeable_ranks must use each rank 0..{len(self.token_ids) - 1} "
                                 f"exactly once")
            ordinary_ids = self.token_ids
            encoding_specials = {token: len(self.token_ids) + i for i, token in enumerate(self.special_tokens)}
            self._rank_to_id = self.token_ids + list(self.special_tokens.values())
            self._id_to_rank = {token_id: rank for rank, token_id in enumerate(self._rank_to_id)}
        all_ids = [*ordinary_ids, *self.special_tokens.values()]
        if len(set(all_ids)) != len(all_ids) or min(all_ids) < 0:
            raise ValueError("token ids must be distinct and non-negative; two tokens (or a special and an ordinary "
                             "token) share an id")
        self.vocab_size = max(all_ids) + 1
        self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=self.mergeable_ranks,
                                          special_tokens=encoding_specials)

        known = set(all_ids)
        if eos_id not in known or (bos_id is not None and bos_id not in known):
            raise ValueError(f"bos_id {bos_id!r} / eos_id {eos_id!r} must be token ids of this vocabulary")
        self.bos_id, self.eos_id = bos_id, eos_id
        self.stop_ids = set(stop_ids) if stop_ids is not None else {eos_id}
        if not self.stop_ids <= known:
            raise ValueError(f"stop ids {sorted(self.stop_ids - known)} are not token ids of this vocabulary")
        self.chat_template = chat_template
        self._template = None if chat_template is None else compile_chat_template(chat_template)
        self.special_tokens_map = dict(special_tokens_map or {})
        self.hf_config = hf_config

        # Plain text splits only on text_tokens. A rendered chat splits on every special token, except the
        # control-token text that the caller's strings brought in, which render_chat marks (see mark_controls).
        controls = _alternation(self.special_tokens.keys() - self.text_tokens)
        self._control_pattern = regex.compile(controls)
        self._chat_splitter = regex.compile(f"{CONTROL_START}(?P<text>{controls}){CONTROL_END}|(?P<token>"
                                            f"{_alternation(self.special_tokens)})|[{CONTROL_START}{CONTROL_END}]")
        self._text_splitter = (regex.compile(f"(?P<token>{_alternation(self.text_tokens)})") if self.text_tokens
                               else None)
        self._special_splitter = regex.compile(f"(?P<token>{_alternation(self.special_tokens)})")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = GPT4_SPLIT_PATTERN,
              num_workers: int | None = None) -> "Tokenizer":
        """Train on texts; `vocab_size` counts the specials too, so `tokenizer.vocab_size == vocab_size`
        unless the text runs out of pairs to merge first."""
        num_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if num_merges < 0:
            raise ValueError(f"vocab_size={vocab_size} is too small: 256 byte tokens and "
                             f"{len(SPECIAL_TOKENS)} special tokens need at least {256 + len(SPECIAL_TOKENS)}")
        merges = train_bpe(count_chunks(texts, pattern, num_workers), 256 + num_merges)
        return cls(merges_to_ranks(merges), pattern)

    def __repr__(self) -> str:
        return f"Tokenizer(name={self.name!r}, vocab_size={self.vocab_size})"

    def differences(self, other: "Tokenizer") -> list[str]:
        """What would make `other` turn text into other ids than this tokenizer does (empty: token for token)."""
        return [what for what, mine, theirs in (
            ("vocabulary size", self.vocab_size, other.vocab_size),
            ("merges", self.mergeable_ranks, other.mergeable_ranks),
            ("token ids", self.token_ids, other.token_ids),
            ("special tokens", self.special_tokens, other.special_tokens),
            ("added tokens matched in text", self.text_tokens, other.text_tokens),
            ("split pattern", self.pattern, other.pattern),
            ("normalizer", self.normalizer, other.normalizer)) if mine != theirs]

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ordinary text: special-token strings in it are encoded as text, unless allow_special (for
        tools that find a special token's id by encoding its text, as lm-eval does through /tokenize). A Hugging
        Face tokenizer's non-special added tokens, like <think>, are always matched, as `tokenizers` does."""
        if allow_special:
            return self._encode_split(text, self._special_splitter)
        if self._text_splitter is None:
            return self._encode_ordinary(text)
        return self._encode_split(text, self._text_splitter)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of many texts, on `num_threads` threads (tiktoken releases the GIL) when nothing needs Python."""
        texts = list(texts)
        if self._text_splitter or self.normalizer or self.token_ids:
            return [self.encode(text) for text in texts]
        return self.encoding.encode_ordinary_batch(texts, num_threads=num_threads)

    def _encode_ordinary(self, text: str) -> list[int]:
        """BPE of text that holds no added token (after the normalizer, as Hugging Face does)."""
        if self.normalizer:
            text = unicodedata.normalize(self.normalizer, text)
        ranks = self.encoding.encode_ordinary(text)
        return ranks if self._rank_to_id is None else [self._rank_to_id[rank] for rank in ranks]

    def _encode_split(self, text: str, splitter) -> list[int]:
        """Ids of text in which `splitter` finds added tokens ("token" group), marked control-token text
        that stays text ("text" group) and stray marks (no group, dropped); the text between is BPE-encoded."""
        ids, pending, position = [], [], 0
        for match in splitter.finditer(text):
            pending.append(text[position:match.start()])
            position = match.end()
            if match.lastgroup == "token":
                ids += self._encode_ordinary("".join(pending))
                ids.append(self.special_tokens[match["token"]])
                pending = []
            elif match.lastgroup == "text":
                pending.append(match["text"])
        pending.append(text[position:])
        return ids + self._encode_ordinary("".join(pending))

    def decode(self, ids) -> str:
        """Text of token ids (a list, numpy array or tensor); broken UTF-8 becomes U+FFFD."""
        return self.encoding.decode(self._ranks(ids), errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes of token ids; special tokens decode to their marker text."""
        return self.encoding.decode_bytes(self._ranks(ids))

    def _ranks(self, ids) -> list[int]:
        ids = _int_list(ids)
        return ids if self._id_to_rank is None else [self._id_to_rank[token_id] for token_id in ids]

    def vocabulary(self) -> list[tuple[bytes, int]]:
        """(bytes, id) of each ordinary token, in rank order (the merge order)."""
        by_rank = sorted(self.mergeable_ranks, key=self.mergeable_ranks.__getitem__)
        return list(zip(by_rank, self.token_ids or [self.mergeable_ranks[token] for token in by_rank]))

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each token id, 0 for specials: turns a loss in nats/token into bits/byte."""
        lengths = [0] * self.vocab_size
        for token, token_id in self.vocabulary():
            lengths[token_id] = len(token)
        return lengths

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False,
                    tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
        """The chat template: ids and a loss mask (1 on each assistant reply and its end-of-turn token).

        The template (nanostack/chat_template.py) renders the text as transformers' apply_chat_template does,
        `tools` passed through; special-token text inside the messages stays text. nanostack's own: <|bos|>,
        then per message its role marker, the content and <|end|>; add_generation_prompt adds <|assistant|>.
        The mask comes from rendering prefixes (chat_template.reply_span), so it holds for any template.
        """
        _check_messages(messages)
        ids = self._render_ids(messages, add_generation_prompt, tools)
        mask = [0] * len(ids)
        for index, message in enumerate(messages):
            if message["role"] == "assistant":
                before, prompt = (self._render_ids(messages[:index], prompt, tools) for prompt in (False, True))
                last = index == len(messages) - 1 and not add_generation_prompt
                turn = ids if last else self._render_ids(messages[:index + 1], False, tools)
                start, end = reply_span(ids, before, prompt, turn, self.stop_ids, f"messages[{index}]")
                mask[start:end] = [1] * (end - start)
        return ids, mask

    def render_prompt(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        """The ids that ask for the next assistant reply: render_chat's ids with add_generation_prompt, without
        the renders that the loss mask takes (a server's prompt)."""
        _check_messages(messages)
        return self._render_ids(messages, True, tools)

    def _render_ids(self, messages, add_generation_prompt: bool, tools) -> list[int]:
        """Token ids of the template rendered on the messages, their control-token text kept as text."""
        if self._template is None:
            raise ValueError(f"tokenizer {self.name!r} has no chat template (its tokenizer_config.json has no "
                             f"chat_template): it cannot render conversations")
        text = render_template(self._template, mark_controls(messages, self._control_pattern), add_generation_prompt,
                               mark_controls(tools, self._control_pattern), self.special_tokens_map)
        return self._encode_split(text, self._chat_splitter)

    def save(self, path) -> None:
        """Write the tokenizer atomically (a temp file beside `path`, fsync, rename).

        nanostack's own: one JSON file, {"format": "nanostack-tokenizer", "version": 1, "name", "pattern",
        "ranks": [base64 of token bytes, index = rank], "specials": {token: id}}. A tokenizer read from Hugging
        Face files is written in that format again: `path` is its tokenizer.json, and tokenizer_config.json and
        generation_config.json go beside it (see save_hf).
        """
        if self.hf_config is not None:
            hf_tokenizer.write_hf_files(self, path)
            return
        by_rank = sorted(self.mergeable_ranks, key=self.mergeable_ranks.__getitem__)
        state = {"format": FILE_FORMAT, "version": FILE_VERSION, "name": self.name, "pattern": self.pattern,
                 "ranks": [base64.b64encode(token).decode("ascii") for token in by_rank],
                 "specials": self.special_tokens}
        with atomic_file(path, "w") as f:
            json.dump(state, f)

    def save_hf(self, directory) -> None:
        """Write tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json (bos
        and eos ids) into `directory`, for Hugging Face `tokenizers` and transformers' AutoTokenizer: they encode
        as this tokenizer does and apply_chat_template gives render_chat's ids."""
        hf_tokenizer.write_hf_files(self, Path(directory) / "tokenizer.json")

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a file written by `save`, or a Hugging Face tokenizer.json (with the tokenizer_config.json and
        generation_config.json beside it); a missing, truncated or foreign file raises a clear error."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        with open(path, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for a binary file
                raise ValueError(f"{path} is not valid JSON (truncated or not a tokenizer file?): {error}") from None
        if isinstance(state, dict) and "format" not in state and isinstance(state.get("model"), dict):
            arguments = hf_tokenizer.read_hf_tokenizer(path, state)
            try:
                return cls(**arguments)
            except ValueError as error:
                raise ValueError(f"{path}: {error}") from None
        if not isinstance(state, dict) or state.get("format") != FILE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} is not a nanostack tokenizer: format is {found!r}, expected {FILE_FORMAT!r} "
                             f"(or a Hugging Face tokenizer.json, which has a \"model\" and no \"format\")")
        if state.get("version") != FILE_VERSION:
            raise ValueError(f"{path} has tokenizer file version {state.get('version')!r}; "
                             f"this code reads version {FILE_VERSION}")
        try:
            ranks = {base64.b64decode(token, validate=True): rank for rank, token in enumerate(state["ranks"])}
            tokenizer = cls(ranks, state["pattern"], state.get("name", "nanostack"))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{path} is a damaged tokenizer file: {error!r}") from None
        if state.get("specials") != tokenizer.special_tokens:
            raise ValueError(f"{path} has special tokens {state.get('specials')}, but this code defines "
                             f"{tokenizer.special_tokens}")
        return tokenizer


def _check_messages(messages) -> None:
    """Check the messages render_chat takes: a list of dicts, each with a string role and string content."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for position, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{position}] must be a dict, got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{position}] has role {message.get('role')!r}; expected a string "
                             f"like 'user'")
        if not isinstance(message.get("content"), str):
            raise TypeError(f"messages[{position}]['content'] must be a string, got "
                            f"{type(message.get('content')).__name__}")


def _int_list(ids) -> list[int]:
    """A plain list of ints from a list, tuple, numpy array or torch tensor."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)


def _alternation(tokens) -> str:
    """A regex matching any of `tokens`, longest first (so "<|im_end|>" wins over a prefix of it); never
    matches when there are none."""
    return "|".join(regex.escape(token) for token in sorted(tokens, key=len, reverse=True)) or "(?!)"

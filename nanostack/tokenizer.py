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
"""
import base64
import heapq
import itertools
import json
import os
from collections import Counter, defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from typing import Iterable, Iterator

import regex
import tiktoken
from tqdm import tqdm

from nanostack.atomic import atomic_file

# cl100k's split: contractions, words with one leading non-letter (" hello"), 1-3 digit numbers, runs of
# punctuation, newlines with their indentation, other whitespace. Possessive quantifiers need `regex`.
GPT4_SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
    r"""\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = ("<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
# render_chat's format as a Jinja template, for tools that render chats themselves (lm-eval through the server's
# /tokenizer_info): its text, encoded with special-token text read as such, is exactly render_chat's ids (unless a
# message's content itself holds special-token text, which render_chat keeps as plain text).
CHAT_TEMPLATE = ("{{ '<|bos|>' }}{% for message in messages %}{{ '<|' ~ message['role'] ~ '|>' ~ message['content'] ~ "
                 "'<|end|>' }}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}")

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
    """Byte-level BPE tokenizer; `encoding` (a tiktoken.Encoding) does the work."""

    def __init__(self, mergeable_ranks: dict[bytes, int], pattern: str = GPT4_SPLIT_PATTERN,
                 name: str = "nanostack"):
        num_ordinary = len(mergeable_ranks)
        if sorted(mergeable_ranks.values()) != list(range(num_ordinary)):
            raise ValueError(f"mergeable_ranks must use each rank 0..{num_ordinary - 1} exactly once")
        missing = [i for i in range(256) if bytes([i]) not in mergeable_ranks]
        if missing:
            raise ValueError(f"mergeable_ranks lacks single-byte tokens {missing[:8]}...: every byte needs a token")
        self.mergeable_ranks = dict(mergeable_ranks)
        self.pattern = pattern
        self.name = name
        self.special_tokens = {token: num_ordinary + i for i, token in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = num_ordinary + len(SPECIAL_TOKENS)
        self.encoding = tiktoken.Encoding(name, pat_str=pattern, mergeable_ranks=self.mergeable_ranks,
                                          special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|bos|>"]
        self.eos_id = self.special_tokens["<|eos|>"]
        self.end_id = self.special_tokens["<|end|>"]
        self.stop_ids = {self.eos_id, self.end_id}

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

    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of ordinary text: special-token strings in it are encoded as text, unless allow_special
        (for tools that find a special token's id by encoding its text, as lm-eval does through /tokenize)."""
        if allow_special:
            return self.encoding.encode(text, allowed_special="all")
        return self.encoding.encode_ordinary(text)

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        """`encode` of many texts on `num_threads` threads (tiktoken releases the GIL)."""
        return self.encoding.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids) -> str:
        """Text of token ids (a list, numpy array or tensor); broken UTF-8 becomes U+FFFD."""
        return self.encoding.decode(_int_list(ids), errors="replace")

    def decode_bytes(self, ids) -> bytes:
        """Raw bytes of token ids; special tokens decode to their marker text."""
        return self.encoding.decode_bytes(_int_list(ids))

    def token_bytes(self) -> list[int]:
        """UTF-8 byte length of each token id, 0 for specials: turns a loss in nats/token into bits/byte."""
        lengths = [0] * self.vocab_size
        for token, rank in self.mergeable_ranks.items():
            lengths[rank] = len(token)
        return lengths

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False) -> tuple[list[int], list[int]]:
        """The chat template: ids and a loss mask (1 on assistant content and its closing <|end|>).

        <|bos|> then, per message, its role marker, the content tokens and <|end|>. With
        add_generation_prompt, a final <|assistant|> (mask 0) asks the model for the next reply.
        """
        if not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
        ids, mask = [self.bos_id], [0]
        for position, message in enumerate(messages):
            if not isinstance(message, dict):
                raise TypeError(f"messages[{position}] must be a dict, got {type(message).__name__}")
            role, content = message.get("role"), message.get("content")
            if role not in ROLE_TOKENS:
                raise ValueError(f"messages[{position}] has role {role!r}; expected one of {sorted(ROLE_TOKENS)}")
            if not isinstance(content, str):
                raise TypeError(f"messages[{position}]['content'] must be a string, got {type(content).__name__}")
            trained = 1 if role == "assistant" else 0
            content_ids = self.encode(content)
            ids += [self.special_tokens[ROLE_TOKENS[role]], *content_ids, self.end_id]
            mask += [0] + [trained] * (len(content_ids) + 1)
        if add_generation_prompt:
            ids.append(self.special_tokens["<|assistant|>"])
            mask.append(0)
        return ids, mask

    def save(self, path) -> None:
        """Write the tokenizer as JSON, atomically: a temp file beside `path`, fsync, rename.

        Format: {"format": "nanostack-tokenizer", "version": 1, "name", "pattern",
        "ranks": [base64 of token bytes, index = rank], "specials": {token: id}}.
        """
        by_rank = sorted(self.mergeable_ranks, key=self.mergeable_ranks.__getitem__)
        state = {"format": FILE_FORMAT, "version": FILE_VERSION, "name": self.name, "pattern": self.pattern,
                 "ranks": [base64.b64encode(token).decode("ascii") for token in by_rank],
                 "specials": self.special_tokens}
        with atomic_file(path, "w") as f:
            json.dump(state, f)

    @classmethod
    def load(cls, path) -> "Tokenizer":
        """Read a file written by `save`; a missing, truncated or foreign file raises a clear error."""
        path = os.fspath(path)
        if not os.path.exists(path):
            raise FileNotFoundError(f"no tokenizer file at {path}")
        with open(path, encoding="utf-8") as f:
            try:
                state = json.load(f)
            except ValueError as error:  # JSONDecodeError, or UnicodeDecodeError for a binary file
                raise ValueError(f"{path} is not valid JSON (truncated or not a tokenizer file?): {error}") from None
        if not isinstance(state, dict) or state.get("format") != FILE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{path} is not a nanostack tokenizer: format is {found!r}, expected {FILE_FORMAT!r}")
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


def _int_list(ids) -> list[int]:
    """A plain list of ints from a list, tuple, numpy array or torch tensor."""
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)

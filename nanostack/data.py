"""Pretraining data: corpora -> documents -> token shards on disk -> (x, y) batches.

Three stages, each a handful of functions:

1. Corpora. A *document* is a named piece of text. `iter_documents(source)` reads the default corpus (the
   running interpreter's standard library, no download), local .txt/.py/.jsonl files and directories, or a
   directory of downloaded web-corpus shards (jsonl or parquet; nanostack/download.py fetches them).
2. Shards. `prepare_tokens` tokenizes every document once (each prefixed with <|bos|> so the model sees
   where a document starts; a tokenizer without a bos token, like Qwen's, ends each with its eos token instead,
   as those models were pretrained), assigns it to train or val by a hash of its name, and writes each split's
   token stream as raw uint16/uint32 `.bin` files plus an `index.json`. `TokenShards` memory-maps a split
   back as one long array, so a corpus larger than RAM costs only page cache.
3. Loader. `BatchLoader` cuts the stream into windows of T+1 tokens and serves them in a seeded random
   order, sharded over data-parallel ranks. Its position (epoch, step) is a small dict that goes into the
   checkpoint, so a resumed run sees exactly the batches it would have seen. `eval_batches` is the
   unshuffled pass over the validation split.

Chat and preference datasets for post-training are not flat token streams; they belong beside this module
and share only `Document`-style reading and the tokenizer.
"""
import bisect
import gzip
import hashlib
import itertools
import json
import os
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from nanostack.atomic import atomic_file, file_sha256, fsync_dir, write_json

INDEX_FORMAT = "nanostack-token-shards"
INDEX_VERSION = 1
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SHARD_TOKENS = 2**26  # 128 MiB per uint16 shard: few files, and any one is cheap to memory-map
DOCS_PER_ENCODE_BATCH = 512  # documents handed to the tokenizer's threads at once
DOCUMENT_SUFFIXES = (".txt", ".py", ".jsonl", ".jsonl.gz", ".parquet")
SPLITS = ("train", "val")


# ---------------------------------------------------------------------------------------------------------
# Corpora -> documents

@dataclass
class Document:
    """One unit of text. `name` is stable across runs: it decides the document's train/val split."""
    name: str
    text: str


def _corpus_files(root: Path, suffixes: tuple[str, ...], skip_dirs: frozenset = frozenset()) -> list[Path]:
    """Files under `root` ending in one of `suffixes`, sorted so that every run reads them in the same order."""
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Pruning in place stops os.walk from descending; hidden entries hold VCS data or our own temp files.
        dirnames[:] = [d for d in dirnames if d not in skip_dirs and not d.startswith(".")]
        files += [Path(dirpath, f) for f in filenames if f.endswith(suffixes) and not f.startswith(".")]
    return sorted(files)


def _source_files(source: str) -> tuple[Path, list[Path]]:
    """The root directory and the sorted files that `source` stands for (see `iter_documents`)."""
    if source == "stdlib":
        root = Path(sysconfig.get_paths()["stdlib"])
        # Third-party packages live inside the stdlib directory; they are not part of the default corpus.
        return root, _corpus_files(root, (".py",), frozenset({"site-packages", "dist-packages"}))
    path = Path(source)
    if path.is_dir():
        files = _corpus_files(path, DOCUMENT_SUFFIXES)
        if not files:
            raise ValueError(f"source {source!r} holds no {'/'.join(DOCUMENT_SUFFIXES)} files: nothing to read")
        return path, files
    if path.is_file():
        return path.parent, [path]
    raise ValueError(f"source {source!r} is neither 'stdlib' nor an existing file or directory")


def decode_utf8(data: bytes, path, first_line: int = 1, first_offset: int = 0) -> str:
    """`data` (from `path`, starting at line `first_line` and byte `first_offset` of it) as UTF-8 text; an invalid
    byte raises a ValueError naming path:line, the byte and its offset, and how to re-encode the file."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        line = first_line + data.count(b"\n", 0, error.start)
        raise ValueError(f"{path}:{line}: byte 0x{data[error.start]:02x} at byte offset {first_offset + error.start} "
                         f"is not UTF-8; re-encode the file as UTF-8 (from Latin-1: iconv -f latin1 -t utf-8 {path} "
                         f"> fixed{''.join(Path(path).suffixes)})") from None


def jsonl_records(path) -> Iterator[tuple[int, dict]]:
    """(line number, object) for each non-empty line of a UTF-8 JSON-lines file (.gz too); errors name file:line."""
    path = Path(path)
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rb") as raw_lines:
        offset = 0  # of the line's first byte (in the decompressed text for .gz)
        for line_number, raw in enumerate(raw_lines, start=1):
            line = decode_utf8(raw, path, line_number, offset)
            if line_number == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark some editors write
            offset += len(raw)
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number}: not valid JSON ({error.msg}); "
                                 f"expected one JSON object per line") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_number}: expected a JSON object, got {line.strip()[:80]!r}")
            yield line_number, record


def _jsonl_documents(path: Path, name: str) -> Iterator[Document]:
    """One document per line of a JSON-lines file, from each object's "text" field."""
    for line_number, record in jsonl_records(path):
        if not isinstance(record.get("text"), str):
            raise ValueError(f'{path}:{line_number}: expected an object with a string "text" field, '
                             f"got {json.dumps(record)[:80]!r}")
        yield Document(f"{name}:{line_number}", record["text"])


def _parquet_documents(path: Path, name: str) -> Iterator[Document]:
    """One document per row of a parquet file's "text" column (FineWeb-style shards); needs pyarrow."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow, an optional dependency: "
                          f"pip install pyarrow (or nanostack[parquet])") from None
    parquet_file = pq.ParquetFile(path)
    if "text" not in parquet_file.schema_arrow.names:
        raise ValueError(f"{path}: no 'text' column; columns are {parquet_file.schema_arrow.names}")
    row = 0
    # Row group by row group keeps memory at one group, not the whole multi-GB file.
    for group in range(parquet_file.num_row_groups):
        for text in parquet_file.read_row_group(group, columns=["text"]).column("text").to_pylist():
            yield Document(f"{name}:{row}", text)
            row += 1


def read_documents(path, name: str, lenient: bool = False) -> Iterator[Document]:
    """The documents in one file: .jsonl(.gz) lines and .parquet rows are one each, any other file is one. Text must
    be UTF-8; `lenient` turns a plain file's invalid bytes into U+FFFD instead (for the stdlib corpus)."""
    path = Path(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return _jsonl_documents(path, name)
    if path.name.endswith(".parquet"):
        return _parquet_documents(path, name)
    data = path.read_bytes()
    nul = data.find(b"\0", 0, 8192)  # text has no NUL bytes; executables and images have them up front
    if nul >= 0:
        raise ValueError(f"{path} looks binary (a NUL byte at offset {nul}), not text: pass a corpus of "
                         f"{'/'.join(DOCUMENT_SUFFIXES)} files")
    return iter([Document(name, data.decode("utf-8", errors="replace") if lenient else decode_utf8(data, path))])


def iter_documents(source: str) -> Iterator[Document]:
    """Documents of `source`: "stdlib", a .txt/.py/.jsonl/.parquet file, or a directory of them (recursive)."""
    root, files = _source_files(source)
    for path in files:
        # A few stdlib test files are deliberately in other encodings; there a replacement character beats a crash.
        yield from read_documents(path, path.relative_to(root).as_posix(), lenient=source == "stdlib")


def stdlib_documents() -> Iterator[Document]:
    """The running interpreter's standard library *.py files, sorted: the default corpus, no download."""
    return iter_documents("stdlib")


# ---------------------------------------------------------------------------------------------------------
# Documents -> token shards

def tokenizer_sha256(tokenizer) -> str:
    """sha256 of the tokenizer's saved file; shards record it so that reading them with another is caught."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.json"
        tokenizer.save(str(path))
        return file_sha256(path)


def source_fingerprint(source: str) -> str:
    """A cheap hash of what `source` holds now (file names, sizes, mtimes), to tell whether shards are stale."""
    root, files = _source_files(source)
    digest = hashlib.sha256()
    for path in files:
        stat = path.stat()
        digest.update(f"{path.relative_to(root).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def is_validation(name: str, val_fraction: float) -> bool:
    """Whether the document named `name` goes to the val split: a hash of the name, so order never matters."""
    hash_value = int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big")
    return hash_value < val_fraction * 2**64


class _ShardWriter:
    """Collects one split's token stream and writes it as fixed-size shards, each one atomically."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.pending: list[np.ndarray] = []
        self.pending_tokens = 0
        self.shards: list[dict] = []
        self.documents = 0
        self.utf8_bytes = 0

    def add(self, text: str, ids: list[int]) -> None:
        self.pending.append(np.asarray(ids, dtype=self.dtype))
        self.pending_tokens += len(ids)
        self.documents += 1
        # surrogatepass: a lone surrogate (possible from JSON) counts 3 bytes, as the U+FFFD it is encoded as.
        self.utf8_bytes += len(text.encode("utf-8", errors="surrogatepass"))
        if self.pending_tokens >= self.shard_tokens:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        stream = np.concatenate(self.pending) if self.pending else np.empty(0, self.dtype)
        # Documents run across shard boundaries: the loader reads one stream, so only the sizes matter.
        ready = len(stream) if final else len(stream) - len(stream) % self.shard_tokens
        for start in range(0, ready, self.shard_tokens):
            shard = stream[start:start + self.shard_tokens]
            file_name = f"{self.split}_{len(self.shards):06d}.bin"
            with atomic_file(self.out_dir / file_name) as f:
                f.write(shard.tobytes())
            self.shards.append({"file": file_name, "tokens": len(shard)})
        self.pending = [stream[ready:]]
        self.pending_tokens = len(stream) - ready

    def finish(self) -> dict:
        self._flush(final=True)
        return {"shards": self.shards, "tokens": sum(s["tokens"] for s in self.shards),
                "documents": self.documents, "utf8_bytes": self.utf8_bytes}


def read_index(directory) -> dict:
    """The `index.json` of a prepared shard directory; raises if there is none (never prepared, or interrupted)."""
    path = Path(directory) / "index.json"
    if not path.is_file():
        raise ValueError(f"no complete token shards in {directory} (no index.json); run data/prepare.py "
                         f"(an interrupted prepare leaves no index)")
    try:
        index = json.loads(path.read_text())
    except ValueError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): prepare the shards again") from None
    if index.get("format") != INDEX_FORMAT or index.get("version") != INDEX_VERSION:
        raise ValueError(f"{path} has format {index.get('format')!r} version {index.get('version')!r}; "
                         f"expected {INDEX_FORMAT!r} version {INDEX_VERSION}: prepare the shards again")
    return index


def _shards_intact(directory: Path, index: dict) -> bool:
    """Whether every shard file in `index` exists with exactly the size its token count implies."""
    itemsize = np.dtype(index["dtype"]).itemsize
    for split in index["splits"].values():
        for shard in split["shards"]:
            path = directory / shard["file"]
            if not path.is_file() or path.stat().st_size != shard["tokens"] * itemsize:
                return False
    return True


def _remove_previous_shards(out_dir: Path) -> None:
    """Delete an earlier prepare's index first, then its shards and temp files, so nothing stale looks complete."""
    (out_dir / "index.json").unlink(missing_ok=True)
    fsync_dir(out_dir)
    # Temp files are those of atomic_file: ".<final name>.<random>.tmp".
    patterns = [f"{split}_??????.bin" for split in SPLITS] + [f".{split}_*.tmp" for split in SPLITS]
    for pattern in patterns + [".index.json.*.tmp"]:
        for path in out_dir.glob(pattern):
            path.unlink()


def _batched(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def prepare_tokens(documents: str | Iterable[Document], tokenizer, out_dir,
                   val_fraction: float = DEFAULT_VAL_FRACTION, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                   num_workers: int | None = None) -> dict:
    """Tokenize documents into train/val `.bin` shards plus `index.json` in `out_dir`; returns the index.

    `documents` is a source string for `iter_documents` or any iterable of Document. Given a source string, a
    complete index for the same source contents, tokenizer and settings is reused without re-tokenizing.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction}; expected a fraction in [0, 1)")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens={shard_tokens}; expected a positive number of tokens per shard")
    if num_workers is not None and num_workers < 1:
        raise ValueError(f"num_workers={num_workers}; expected None (all cores) or a positive count")
    out_dir = Path(out_dir)
    source = documents if isinstance(documents, str) else None
    settings = {
        "source": source,
        "source_fingerprint": source_fingerprint(source) if source is not None else None,
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
        "val_fraction": val_fraction,
        "shard_tokens": shard_tokens,
    }
    if source is not None and (out_dir / "index.json").is_file():
        try:
            existing = read_index(out_dir)
        except ValueError:  # an index of another format version: rebuild
            existing = {}
        if all(existing.get(key) == value for key, value in settings.items()) and _shards_intact(out_dir, existing):
            return existing

    out_dir.mkdir(parents=True, exist_ok=True)
    _remove_previous_shards(out_dir)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 2**16 else np.uint32)
    writers = {split: _ShardWriter(out_dir, split, dtype, shard_tokens) for split in SPLITS}
    threads = num_workers or os.cpu_count() or 1
    doc_stream = iter_documents(source) if source is not None else documents
    progress = tqdm(doc_stream, desc="tokenizing", unit="doc", disable=None)
    for batch in _batched(progress, DOCS_PER_ENCODE_BATCH):
        # tiktoken releases the GIL, so its encode_batch threads really do run on all cores.
        token_lists = tokenizer.encode_batch([doc.text for doc in batch], num_threads=threads)
        for doc, ids in zip(batch, token_lists):
            split = "val" if is_validation(doc.name, val_fraction) else "train"
            framed = [tokenizer.bos_id, *ids] if tokenizer.bos_id is not None else [*ids, tokenizer.eos_id]
            writers[split].add(doc.text, framed)
    splits = {split: writer.finish() for split, writer in writers.items()}
    if not any(info["utf8_bytes"] for info in splits.values()):
        _remove_previous_shards(out_dir)
        raise ValueError(f"{'source ' + repr(source) if source else 'the documents'} hold no text (every document is "
                         f"empty): nothing to tokenize")
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size,
        "bos_id": tokenizer.bos_id,
        **settings,
        "splits": splits,
    }
    # The index goes last: its presence is what marks the directory complete.
    write_json(out_dir / "index.json", index)
    return index


class TokenShards:
    """One split of a prepared shard directory, memory-mapped and read as one long token array."""

    def __init__(self, directory, split: str = "train", tokenizer=None):
        directory = Path(directory)
        index = read_index(directory)
        if split not in index["splits"]:
            raise ValueError(f"split {split!r} not in {directory}; expected one of {sorted(index['splits'])}")
        if tokenizer is not None and tokenizer_sha256(tokenizer) != index["tokenizer_sha256"]:
            raise ValueError(f"the shards in {directory} were made with a different tokenizer "
                             f"(sha256 {index['tokenizer_sha256'][:12]}...); prepare them again with this one")
        if not _shards_intact(directory, index):
            raise ValueError(f"a shard file in {directory} is missing or has the wrong size; prepare again")
        info = index["splits"][split]
        self.dtype = np.dtype(index["dtype"])
        self.vocab_size = index["vocab_size"]
        self.num_documents = info["documents"]
        self.num_bytes = info["utf8_bytes"]  # for bits per byte: a loss comparable across tokenizers
        self._arrays = [np.memmap(directory / shard["file"], dtype=self.dtype, mode="r")
                        for shard in info["shards"]]
        self._starts = [0]  # stream offset of each shard, and the total at the end
        for shard in info["shards"]:
            self._starts.append(self._starts[-1] + shard["tokens"])

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, key: slice) -> np.ndarray:
        """Tokens [start:stop] of the concatenated stream as an int64 array (may span shards)."""
        if not isinstance(key, slice) or key.step not in (None, 1):
            raise ValueError(f"TokenShards supports contiguous slices like shards[a:b], got {key!r}")
        start, stop, _ = key.indices(len(self))
        pieces = []
        shard = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            offset = self._starts[shard]
            end = min(stop, self._starts[shard + 1])
            pieces.append(self._arrays[shard][start - offset:end - offset])
            start, shard = end, shard + 1
        return np.concatenate(pieces).astype(np.int64) if pieces else np.empty(0, np.int64)


# ---------------------------------------------------------------------------------------------------------
# Token shards -> batches

def _steps_per_pass(num_tokens: int, batch_size: int, seq_len: int, rank: int, world_size: int) -> int:
    """Validate a loader's settings and return how many full global steps one pass over the stream holds."""
    for name, value in (("batch_size", batch_size), ("seq_len", seq_len), ("world_size", world_size)):
        if value < 1:
            raise ValueError(f"{name}={value}; expected a positive integer")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank}; expected 0 <= rank < world_size={world_size}")
    if num_tokens < seq_len + 1:
        raise ValueError(f"the split has {num_tokens} tokens, fewer than seq_len + 1 = {seq_len + 1}; "
                         f"use a shorter seq_len or more data (a larger val_fraction for val)")
    num_windows = (num_tokens - 1) // seq_len
    windows_per_step = batch_size * world_size
    if num_windows < windows_per_step:
        raise ValueError(f"the split holds {num_windows} windows of {seq_len + 1} tokens, fewer than one step "
                         f"needs (batch_size * world_size = {windows_per_step}); use a smaller batch or seq_len")
    return num_windows // windows_per_step


def _gather_windows(shards, windows: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-token targets for the given window numbers, each (len(windows), seq_len) int64."""
    rows = np.stack([np.asarray(shards[w * seq_len:w * seq_len + seq_len + 1], dtype=np.int64)
                     for w in windows])  # (B, T+1)
    batch = torch.from_numpy(rows)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


class BatchLoader:
    """Shuffled (x, y) batches from a token stream, sharded over data-parallel ranks, resumable exactly.

    Window w is tokens[w*T : w*T + T + 1]: consecutive windows share one token, so every token but the first
    is a target once per epoch. Each epoch visits the windows in a permutation seeded by (seed, epoch); global
    step s takes the windows at [s*B*world, (s+1)*B*world) of it and rank r the r-th contiguous B of those, so
    ranks never overlap or leave gaps. The < B*world windows left at an epoch's end are skipped that epoch
    (the next permutation puts others last). With shuffle=False the order is the stream's, every epoch.
    `shards` is a TokenShards or any 1-D integer array.
    """

    def __init__(self, shards, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle: bool = True):
        self.steps_per_epoch = _steps_per_pass(len(shards), batch_size, seq_len, rank, world_size)
        self.shards, self.batch_size, self.seq_len = shards, batch_size, seq_len
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.num_windows = (len(shards) - 1) // seq_len
        self.epoch, self.step = 0, 0  # the position of the *next* batch
        self._order, self._order_epoch = np.empty(0, np.int64), -1

    def _window_order(self) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_windows)
        if self._order_epoch != self.epoch:
            # Seeding with (seed, epoch) rather than drawing from one running generator makes any position
            # reachable directly, which is what lets load_state_dict jump there.
            self._order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_windows)
            self._order_epoch = self.epoch
        return self._order

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each (batch_size, seq_len) int64 with y = x shifted by one; epochs roll over."""
        first = self.step * self.batch_size * self.world_size + self.rank * self.batch_size
        windows = self._window_order()[first:first + self.batch_size]
        x, y = _gather_windows(self.shards, windows, self.seq_len)
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return x, y

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The loader's position and the settings it depends on, as plain JSON-serialisable values."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "shuffle": self.shuffle,
                "global_batch": self.batch_size * self.world_size, "seq_len": self.seq_len,
                "num_tokens": len(self.shards)}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the settings must match, or the next batch would not be the next.

        Positions count global steps of batch_size * world_size windows, so a run saved with 2 ranks of B
        resumes on 1 rank of 2B (and the reverse) at exactly the same windows. Rank is not compared: every
        rank resumes from the same global position, saved by rank 0.
        """
        for key in ("seed", "shuffle", "global_batch", "seq_len", "num_tokens"):
            current = self.state_dict()[key]
            if state[key] != current:
                raise ValueError(f"loader state has {key}={state[key]}, but this loader has {key}={current}; "
                                 f"resume with the settings and data the state was saved with")
        if not 0 <= state["step"] < self.steps_per_epoch or state["epoch"] < 0:
            raise ValueError(f"loader state at epoch {state['epoch']} step {state['step']}; expected "
                             f"epoch >= 0 and 0 <= step < steps_per_epoch = {self.steps_per_epoch}")
        self.epoch, self.step = state["epoch"], state["step"]


def eval_batches(shards, batch_size: int, seq_len: int, max_batches: int | None = None, rank: int = 0,
                 world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Unshuffled (x, y) batches over a split in stream order, rank-sharded like BatchLoader; at most max_batches.

    Only full global steps are served, so every rank runs the same number of same-shaped batches (a
    collective per batch, like an all-reduce of the loss, would otherwise hang on the rank with one less).
    """
    loader = BatchLoader(shards, batch_size, seq_len, rank=rank, world_size=world_size, shuffle=False)
    num_batches = loader.steps_per_epoch if max_batches is None else min(max_batches, loader.steps_per_epoch)
    return (loader.next_batch() for _ in range(num_batches))

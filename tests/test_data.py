"""Tests for nanostack/data.py: corpora, downloads, token shards and the resumable, rank-sharded loader."""
import asyncio
import collections
import gzip
import hashlib
import json
import os
import random
import socket
import subprocess
import sys
import sysconfig
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from aiohttp import web
from hypothesis import HealthCheck, given, settings, strategies as st

from nanostack import data, download
from nanostack.data import BatchLoader, Document, TokenShards, eval_batches, prepare_tokens
from nanostack.tokenizer import Tokenizer


# ---------------------------------------------------------------------------------------------------------
# Tokenizers

TRAINING_TEXT = "the quick brown fox jumps over the lazy dog; def main():\n    return 0\n" * 20 + "é√ß中文🙂"


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.train([TRAINING_TEXT], vocab_size=300)


class ShiftedTokenizer:
    """A tokenizer whose ids are another's plus `shift`: a second vocabulary with the same text behaviour.

    A large shift puts ids above 65535, which must force uint32 shards.
    """

    def __init__(self, base: Tokenizer, shift: int):
        self.base, self.shift = base, shift
        self.bos_id = base.bos_id + shift
        self.vocab_size = base.vocab_size + shift
        self.calls = 0  # encode_batch calls, to see whether prepare_tokens tokenized anything

    def encode_batch(self, texts, num_threads=8):
        self.calls += 1
        return [[i + self.shift for i in ids] for ids in self.base.encode_batch(texts, num_threads)]

    def decode(self, ids):
        return self.base.decode([i - self.shift for i in ids])

    def save(self, path):
        self.base.save(path)
        with open(path, "a") as f:
            f.write(f"\nshift {self.shift}")


def random_text(rng: random.Random) -> str:
    alphabet = "abcdefgh xyz\n\té√ß中文🙂"
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


def make_documents(count: int, seed: int = 0) -> list[Document]:
    rng = random.Random(seed)
    return [Document(f"doc-{i}", random_text(rng)) for i in range(count)]


def split_at_bos(stream: np.ndarray, bos_id: int) -> list[np.ndarray]:
    """Cut a token stream into documents: each starts with bos and runs to the next bos."""
    starts = np.flatnonzero(stream == bos_id)
    assert len(stream) == 0 or starts[0] == 0
    return [stream[a + 1:b] for a, b in zip(starts, list(starts[1:]) + [len(stream)])]


def read_split_raw(directory: Path, index: dict, split: str) -> np.ndarray:
    """A split's stream read with np.fromfile, independently of TokenShards."""
    pieces = [np.fromfile(directory / s["file"], dtype=index["dtype"]) for s in index["splits"][split]["shards"]]
    return np.concatenate(pieces).astype(np.int64) if pieces else np.empty(0, np.int64)


# ---------------------------------------------------------------------------------------------------------
# Corpora

def test_stdlib_documents_match_an_independent_walk():
    root = Path(sysconfig.get_paths()["stdlib"])
    expected = set()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in ("site-packages", "dist-packages") and not d.startswith(".")]
        expected |= {Path(dirpath, f).relative_to(root).as_posix() for f in filenames
                     if f.endswith(".py") and not f.startswith(".")}
    documents = list(data.stdlib_documents())
    names = [doc.name for doc in documents]
    assert len(names) > 1000
    assert set(names) == expected and len(names) == len(expected)
    assert names == [p.as_posix() for p in sorted(Path(n) for n in names)]  # sorted, so runs agree
    by_name = {doc.name: doc.text for doc in documents}
    assert by_name["json/__init__.py"] == (root / "json" / "__init__.py").read_text(encoding="utf-8")


def test_directory_source_reads_txt_jsonl_py_recursively(tmp_path):
    (tmp_path / "b").mkdir()
    (tmp_path / ".git").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "b" / "c.py").write_text("print('c')")
    (tmp_path / "b" / "d.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 7}\n')
    (tmp_path / "notes.md").write_text("not a corpus file")
    (tmp_path / ".git" / "e.txt").write_text("hidden")
    documents = list(data.iter_documents(str(tmp_path)))
    assert [(d.name, d.text) for d in documents] == [
        ("a.txt", "alpha"), ("b/c.py", "print('c')"), ("b/d.jsonl:1", "one"), ("b/d.jsonl:3", "two")]
    single = list(data.iter_documents(str(tmp_path / "a.txt")))
    assert [(d.name, d.text) for d in single] == [("a.txt", "alpha")]
    with pytest.raises(ValueError, match="neither 'stdlib' nor an existing"):
        list(data.iter_documents(str(tmp_path / "missing")))


@pytest.mark.parametrize("bad_line", ['{"text": "ok"', '["text"]', '{"content": "x"}', '{"text": 3}'])
def test_jsonl_malformed_line_names_file_and_line(tmp_path, bad_line):
    path = tmp_path / "corpus.jsonl"
    path.write_text('{"text": "first"}\n{"text": "second"}\n' + bad_line + "\n")
    documents = data.iter_documents(str(path))
    assert next(documents).text == "first"
    with pytest.raises(ValueError, match=f"{path}:3"):
        list(documents)


@pytest.mark.parametrize("name", ["corpus.jsonl", "corpus.txt", "corpus.jsonl.gz"])
def test_a_byte_that_is_not_utf8_names_file_line_and_offset(tmp_path, name):
    raw = b"".join(['{"text": "caf\u00e9 ok"}\n'.encode(), b'{"text": "second"}\n',
                    '{"text": "caf\u00e9"}\n'.encode("latin-1")])
    path = tmp_path / name
    path.write_bytes(gzip.compress(raw) if name.endswith(".gz") else raw)
    offset = raw.index(b"\xe9")  # the first byte that is not UTF-8: the Latin-1 e-acute of line 3
    with pytest.raises(ValueError) as raised:
        list(data.iter_documents(str(path)))
    message = str(raised.value)
    assert message.startswith(f"{path}:3: byte 0xe9 at byte offset {offset} is not UTF-8")
    assert "re-encode" in message and "iconv" in message


def test_an_empty_or_binary_source_is_refused_and_nothing_is_written(tmp_path, tokenizer):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.md").write_text("no corpus file in here")
    with pytest.raises(ValueError, match=f"source '{tmp_path / 'empty'}' holds no .txt/.py"):
        prepare_tokens(str(tmp_path / "empty"), tokenizer, tmp_path / "out")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("")
    (tmp_path / "blank" / "b.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=f"source '{tmp_path / 'blank'}' hold no text"):
        prepare_tokens(str(tmp_path / "blank"), tokenizer, tmp_path / "out")
    binary = tmp_path / "program"
    binary.write_bytes(b"\x7fELF\x02\x01\x01\x00" + bytes(range(256)) * 4)
    with pytest.raises(ValueError, match=f"{binary} looks binary"):
        prepare_tokens(str(binary), tokenizer, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # makes `import pyarrow...` fail like a missing package
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    (tmp_path / "shard.parquet").write_bytes(b"PAR1")
    with pytest.raises(ImportError, match="pip install pyarrow"):
        list(data.iter_documents(str(tmp_path)))


# ---------------------------------------------------------------------------------------------------------
# Downloads, against a local aiohttp server

class ShardServer:
    """Serves `files` at http://127.0.0.1:<port>/<name> with Range support; can drop a connection once."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.drop_once: dict[str, int] = {}  # name -> bytes to send before closing the connection
        self.fail_status: dict[str, int] = {}  # name -> HTTP status answered every time
        self.requests: list[tuple[str, str | None]] = []  # (name, Range header)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        range_header = request.headers.get("Range")
        self.requests.append((name, range_header))
        if name in self.fail_status:
            return web.Response(status=self.fail_status[name])
        if name not in self.files:
            return web.Response(status=404)
        body = self.files[name]
        start = int(range_header.removeprefix("bytes=").rstrip("-")) if range_header else 0
        if start >= len(body):
            return web.Response(status=416, headers={"Content-Range": f"bytes */{len(body)}"})
        status, headers = 200, {}
        if range_header:
            status, headers = 206, {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"}
        response = web.StreamResponse(status=status, headers=headers)
        response.content_length = len(body) - start
        await response.prepare(request)
        if name in self.drop_once:
            await response.write(body[start:start + self.drop_once.pop(name)])
            request.transport.close()
            return response
        await response.write(body[start:])
        await response.write_eof()
        return response


@pytest.fixture
def shard_server(monkeypatch):
    for variable in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(variable, raising=False)
    server = ShardServer({})
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_get("/{name}", server.handle)
    runner = web.AppRunner(app)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))  # a free port chosen by the OS, loopback only
    loop.run_until_complete(runner.setup())
    loop.run_until_complete(web.SockSite(runner, sock).start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    server.base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    yield server
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=10)
    loop.close()


def sha256_hex(content: bytes) -> str:
    return hashlib.sha256(content).hexdigest()


def test_download_fetches_and_verifies(shard_server, tmp_path):
    files = {f"shard_{i}.jsonl": os.urandom(5000 + i) for i in range(2)}
    shard_server.files.update(files)
    urls = [f"{shard_server.base_url}/{name}" for name in files]
    checksums = {name: sha256_hex(content) for name, content in files.items()}
    paths = download.download_shards(urls, tmp_path, checksums)
    assert [p.name for p in paths] == list(files)
    assert all(p.read_bytes() == files[p.name] for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no .part left behind
    download.download_shards(urls, tmp_path, checksums)
    assert len(shard_server.requests) == 2  # finished files are not fetched again


def test_download_resumes_with_range_after_dropped_connection(shard_server, tmp_path, monkeypatch):
    content = os.urandom(20000)
    shard_server.files["big.parquet"] = content
    shard_server.drop_once["big.parquet"] = 7000
    sleeps = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    [path] = download.download_shards([f"{shard_server.base_url}/big.parquet"], tmp_path,
                                  {"big.parquet": sha256_hex(content)})
    assert path.read_bytes() == content
    assert shard_server.requests == [("big.parquet", None), ("big.parquet", "bytes=7000-")]
    assert sleeps == [1.0]


def test_download_bad_checksum_leaves_no_file(shard_server, tmp_path):
    shard_server.files["x.jsonl"] = b'{"text": "hello"}\n'
    with pytest.raises(ValueError, match="checksum mismatch.*x.jsonl.*expected sha256 0+, got " +
                       sha256_hex(b'{"text": "hello"}\n')):
        download.download_shards([f"{shard_server.base_url}/x.jsonl"], tmp_path, {"x.jsonl": "0" * 64})
    assert list(tmp_path.iterdir()) == []


def test_download_retries_with_exponential_backoff_then_gives_up(shard_server, tmp_path, monkeypatch):
    shard_server.fail_status["flaky.jsonl"] = 503
    sleeps = []
    monkeypatch.setattr(download.time, "sleep", sleeps.append)
    with pytest.raises(RuntimeError, match="flaky.jsonl failed after 4 attempts"):
        download.download_shards([f"{shard_server.base_url}/flaky.jsonl"], tmp_path, retries=3, backoff_seconds=0.5)
    assert sleeps == [0.5, 1.0, 2.0]
    assert len(shard_server.requests) == 4
    with pytest.raises(RuntimeError, match="404"):  # a missing file is not retried
        download.download_shards([f"{shard_server.base_url}/missing.jsonl"], tmp_path)
    assert len(shard_server.requests) == 5
    assert list(tmp_path.iterdir()) == []


def test_url_list_source_downloads_then_reads(shard_server, tmp_path):
    files = {f"part{i}.jsonl": json.dumps({"text": f"document {i}"}).encode() + b"\n" for i in range(3)}
    shard_server.files.update(files)
    url_file = tmp_path / "corpus.urls"
    url_file.write_text(f"# shards\n{shard_server.base_url}/part0.jsonl {sha256_hex(files['part0.jsonl'])}\n\n"
                        + "".join(f"{shard_server.base_url}/{name}  # no checksum\n" for name in list(files)[1:]))
    urls, checksums = download.read_url_list(url_file)
    assert urls == [f"{shard_server.base_url}/{name}" for name in files]
    assert checksums == {"part0.jsonl": sha256_hex(files["part0.jsonl"])}
    directory = download.download_source(str(url_file), tmp_path / "raw", max_shards=2)
    assert [(d.name, d.text) for d in data.iter_documents(directory)] == [
        ("part0.jsonl:1", "document 0"), ("part1.jsonl:1", "document 1")]
    assert download.download_source("stdlib", tmp_path / "raw") == "stdlib"  # local sources pass through


def test_web_corpus_registry_and_url_checks(tmp_path):
    fineweb = download.web_corpus_urls("fineweb-edu-10bt", 2)
    assert len(fineweb) == 2 and fineweb[0] != fineweb[1] and all(u.endswith(".parquet") for u in fineweb)
    assert len(set(download.web_corpus_urls("fineweb-edu-100b-shuffle"))) == 1823
    with pytest.raises(ValueError, match="unknown web corpus"):
        download.web_corpus_urls("nope")
    with pytest.raises(ValueError, match="http"):  # rejected before any connection is made
        download.download_shards(["ftp://127.0.0.1/x.jsonl"], tmp_path)
    with pytest.raises(ValueError, match="none of the URLs"):
        download.download_shards(["http://127.0.0.1:9/x.jsonl"], tmp_path, {"y.jsonl": "00"})


# ---------------------------------------------------------------------------------------------------------
# Token shards

def test_prepare_round_trips_documents_across_shards(tmp_path, tokenizer):
    documents = make_documents(120, seed=1) + [Document("lone-surrogate", "a\ud800b")]
    index = prepare_tokens(documents, tokenizer, tmp_path, val_fraction=0.25, shard_tokens=97, num_workers=2)
    assert index["dtype"] == "uint16" and index["vocab_size"] == tokenizer.vocab_size
    seen = []
    for split in ("train", "val"):
        shards = TokenShards(tmp_path, split, tokenizer=tokenizer)
        stream = shards[:]
        assert np.array_equal(stream, read_split_raw(tmp_path, index, split))
        expected = [d for d in documents if data.is_validation(d.name, 0.25) == (split == "val")]
        texts = [tokenizer.decode(ids) for ids in split_at_bos(stream, tokenizer.bos_id)]
        # A lone surrogate cannot survive utf-8: the tokenizer encodes it as U+FFFD, 3 bytes all the same.
        assert texts == [d.text.replace("\ud800", "\ufffd") for d in expected]
        assert shards.num_documents == len(expected) == index["splits"][split]["documents"]
        assert shards.num_bytes == sum(len(t.encode("utf-8")) for t in texts)
        assert len(shards) == index["splits"][split]["tokens"] == sum(1 + len(tokenizer.encode(d.text))
                                                                       for d in expected)
        # Random slices, many crossing shard boundaries, agree with slicing the whole stream.
        rng = random.Random(split)
        for _ in range(50):
            a, b = sorted(rng.randrange(len(stream) + 1) for _ in range(2))
            assert np.array_equal(shards[a:b], stream[a:b])
        seen += [d.name for d in expected]
    assert len(index["splits"]["train"]["shards"]) > 3
    assert sorted(seen) == sorted(d.name for d in documents)


def test_vocab_above_uint16_uses_uint32(tmp_path, tokenizer):
    documents = make_documents(30, seed=2)
    largest_uint16 = ShiftedTokenizer(tokenizer, 2**16 - tokenizer.vocab_size)  # vocab_size == 65536
    small = prepare_tokens(documents, largest_uint16, tmp_path / "small", shard_tokens=64)
    beyond = ShiftedTokenizer(tokenizer, 70000)
    big = prepare_tokens(documents, beyond, tmp_path / "big", shard_tokens=64)
    assert small["dtype"] == "uint16" and big["dtype"] == "uint32"
    for directory, index, shifted in ((tmp_path / "small", small, largest_uint16), (tmp_path / "big", big, beyond)):
        itemsize = np.dtype(index["dtype"]).itemsize
        assert all((directory / s["file"]).stat().st_size == s["tokens"] * itemsize
                   for s in index["splits"]["train"]["shards"])
        stream = TokenShards(directory, "train")[:]
        assert stream.min() >= shifted.shift and stream.max() < shifted.vocab_size
        texts = [shifted.decode(ids) for ids in split_at_bos(stream, shifted.bos_id)]
        assert texts == [d.text for d in documents if not data.is_validation(d.name, 0.01)]


def test_split_is_by_document_name_and_stable(tmp_path, tokenizer):
    def names_per_split(docs, directory):
        prepare_tokens(docs, tokenizer, directory, val_fraction=0.2, shard_tokens=500)
        return {split: sorted(tokenizer.decode(ids).split("|")[0] for ids in
                              split_at_bos(TokenShards(directory, split)[:], tokenizer.bos_id))
                for split in ("train", "val")}

    rng = random.Random(3)
    documents = [Document(f"doc-{i}", f"doc-{i}|{random_text(rng)}") for i in range(400)]
    first = names_per_split(documents, tmp_path / "a")
    assert sorted(first["train"] + first["val"]) == sorted(d.name for d in documents)
    assert 40 <= len(first["val"]) <= 120  # ~20% of 400; outside this is over 5 standard deviations off
    shuffled = documents[:]
    rng.shuffle(shuffled)
    assert names_per_split(shuffled, tmp_path / "b") == first  # the order of documents does not matter
    other_texts = [Document(d.name, f"{d.name}|{random_text(rng)}") for d in documents]
    assert names_per_split(other_texts, tmp_path / "c") == first  # the name alone decides


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path, tokenizer):
    prepare_tokens(make_documents(50), tokenizer, tmp_path, shard_tokens=50)
    assert len(TokenShards(tmp_path, "train")) > 0

    def failing_documents():
        for i, document in enumerate(make_documents(2000, seed=4)):
            if i == 1500:
                raise RuntimeError("simulated crash")
            yield document

    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare_tokens(failing_documents(), tokenizer, tmp_path, shard_tokens=50)
    assert not (tmp_path / "index.json").exists()
    assert any(p.name.startswith("train_") for p in tmp_path.iterdir())  # shards were written before the crash
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    with pytest.raises(ValueError, match="no index.json"):
        TokenShards(tmp_path, "train")


def test_index_is_renamed_into_place_last(tmp_path, monkeypatch, tokenizer):
    renamed = []
    real_replace = os.replace

    def recording_replace(src, dst):
        if Path(dst).parent == tmp_path:
            renamed.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    index = prepare_tokens(make_documents(60), tokenizer, tmp_path, val_fraction=0.3, shard_tokens=40)
    shard_files = [s["file"] for split in index["splits"].values() for s in split["shards"]]
    assert len(shard_files) > 2
    assert renamed[-1] == "index.json" and sorted(renamed[:-1]) == sorted(shard_files)
    assert json.loads((tmp_path / "index.json").read_text()) == index


def test_complete_index_is_reused_and_stale_one_rebuilt(tmp_path, tokenizer):
    source = tmp_path / "corpus"
    source.mkdir()
    (source / "a.txt").write_text("hello world " * 20)
    (source / "b.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in ["x" * 30, "yz" * 40]) + "\n")
    out = tmp_path / "shards"
    counting = ShiftedTokenizer(tokenizer, 0)
    first = prepare_tokens(str(source), counting, out, val_fraction=0.0)
    assert counting.calls == 1 and first["splits"]["train"]["documents"] == 3
    assert prepare_tokens(str(source), counting, out, val_fraction=0.0) == first
    assert counting.calls == 1  # reused: nothing tokenized
    assert prepare_tokens(str(source), counting, out, val_fraction=0.5)["val_fraction"] == 0.5
    assert counting.calls == 2  # other settings: rebuilt

    other = ShiftedTokenizer(tokenizer, 5)
    prepare_tokens(str(source), other, out, val_fraction=0.0)
    assert other.calls == 1  # another tokenizer: rebuilt
    with pytest.raises(ValueError, match="different tokenizer"):
        TokenShards(out, "train", tokenizer=counting)
    assert len(TokenShards(out, "train", tokenizer=other)) == len(TokenShards(out, "train"))

    (source / "c.txt").write_text("a new document")
    rebuilt = prepare_tokens(str(source), other, out, val_fraction=0.0)
    assert other.calls == 2 and rebuilt["splits"]["train"]["documents"] == 4  # changed source: rebuilt

    (out / rebuilt["splits"]["train"]["shards"][0]["file"]).write_bytes(b"")  # damage a shard
    with pytest.raises(ValueError, match="wrong size"):
        TokenShards(out, "train")
    assert prepare_tokens(str(source), other, out, val_fraction=0.0) == rebuilt
    assert other.calls == 3  # a damaged directory is not reused


def test_a_saved_tokenizer_of_another_vocabulary_is_never_reused_silently(tmp_path):
    import train
    corpus, path = tmp_path / "corpus", tmp_path / "tokenizer.json"
    corpus.mkdir()
    with pytest.raises(ValueError, match="holds no .txt"):  # an empty source trains nothing, writes nothing
        train.load_or_train_tokenizer(path, str(corpus), 300, 1.0)
    (corpus / "tiny.txt").write_text("ab ab ab")
    with pytest.raises(ValueError, match="too few distinct pairs for a 300-token vocabulary"):
        train.load_or_train_tokenizer(path, str(corpus), 300, 1.0)
    assert not path.exists()
    (corpus / "a.txt").write_text(TRAINING_TEXT)
    trained = train.load_or_train_tokenizer(path, str(corpus), 300, 1.0)
    assert trained.vocab_size == 300 and train.load_or_train_tokenizer(path, str(corpus), 300, 1.0).vocab_size == 300
    with pytest.raises(ValueError) as raised:
        train.load_or_train_tokenizer(path, str(corpus), 4096, 1.0)
    assert f"{path} holds a 300-token tokenizer, but --vocab-size is 4096" in str(raised.value)
    assert "--vocab-size 300" in str(raised.value)


def test_prepare_cli_writes_shards_for_a_directory(tmp_path, tokenizer):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text(TRAINING_TEXT)
    tokenizer.save(tmp_path / "tokenizer.json")
    out = tmp_path / "out"
    result = subprocess.run(
        [sys.executable, "data/prepare.py", "--source", str(tmp_path / "corpus"), "--tokenizer",
         str(tmp_path / "tokenizer.json"), "--vocab-size", "300", "--out-dir", str(out), "--val-fraction", "0",
         "--workers", "1"],
        cwd=Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    stream = TokenShards(out, "train", tokenizer=tokenizer)[:]
    assert stream.tolist() == [tokenizer.bos_id] + tokenizer.encode(TRAINING_TEXT)
    assert "train: " in result.stdout


# ---------------------------------------------------------------------------------------------------------
# Loader

def naive_windows(stream: np.ndarray, seq_len: int) -> list[tuple[int, ...]]:
    """Every window of seq_len + 1 tokens at stride seq_len, by plain slicing."""
    return [tuple(stream[s:s + seq_len + 1]) for s in range(0, len(stream) - seq_len, seq_len)]


def as_windows(x, y) -> list[tuple[int, ...]]:
    """Rebuild the (T+1)-token windows behind a batch, checking that y is x shifted by one."""
    assert np.array_equal(x.numpy()[:, 1:], y.numpy()[:, :-1])
    return [tuple(row) + (last,) for row, last in zip(x.numpy().tolist(), y.numpy()[:, -1].tolist())]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_tokens=st.integers(2, 300), batch_size=st.integers(1, 4), seq_len=st.integers(1, 9),
       world_size=st.integers(1, 3), seed=st.integers(0, 2**32 - 1))
def test_ranks_partition_each_epoch(num_tokens, batch_size, seq_len, world_size, seed):
    # Distinct random tokens make every window identifiable, so overlaps would show up as duplicates.
    stream = np.random.default_rng(seed).permutation(10 * num_tokens)[:num_tokens]
    windows = naive_windows(stream, seq_len)
    if len(windows) < batch_size * world_size:
        with pytest.raises(ValueError, match="fewer"):
            BatchLoader(stream, batch_size, seq_len, seed=seed, world_size=world_size)
        return
    single = BatchLoader(stream, batch_size, seq_len, seed=seed)
    ranks = [BatchLoader(stream, batch_size, seq_len, seed=seed, rank=r, world_size=world_size)
             for r in range(world_size)]
    steps = len(windows) // (batch_size * world_size)
    for epoch in range(2):
        union = []
        single_batches = [as_windows(*single.next_batch()) for _ in range(steps * world_size)]
        for step in range(steps):
            for rank, loader in enumerate(ranks):
                batch = as_windows(*loader.next_batch())
                # Rank r's step s is the single process's batch s*world + r: contiguous, no gap between ranks.
                assert batch == single_batches[step * world_size + rank]
                union += batch
        assert len(set(union)) == len(union) == steps * batch_size * world_size  # no overlap
        assert set(union) <= set(windows)
        assert collections.Counter(union) == collections.Counter(w for b in single_batches for w in b)
        if len(windows) % (batch_size * world_size) == 0:
            assert sorted(union) == sorted(windows)  # nothing skipped when the windows divide evenly
        assert all(loader.epoch == epoch + 1 and loader.step == 0 for loader in ranks)
        for _ in range(len(windows) // batch_size - steps * world_size):  # finish the single process's epoch
            single.next_batch()


def test_epochs_are_different_permutations():
    stream = np.arange(1001)
    loader = BatchLoader(stream, batch_size=5, seq_len=10, seed=7)
    epochs = [[w for _ in range(loader.steps_per_epoch) for w in as_windows(*loader.next_batch())]
              for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == sorted(naive_windows(stream, 10))
    assert epochs[0] != epochs[1]
    other_seed = BatchLoader(stream, batch_size=5, seq_len=10, seed=8)
    assert as_windows(*other_seed.next_batch()) != epochs[0][:5]


@settings(max_examples=40, deadline=None)
@given(num_tokens=st.integers(40, 200), seq_len=st.integers(1, 6), world_size=st.integers(1, 3),
       rank_fraction=st.floats(0, 0.999), stop_fraction=st.floats(0, 1), seed=st.integers(0, 1000))
def test_resume_reproduces_the_uninterrupted_batches(num_tokens, seq_len, world_size, rank_fraction,
                                                     stop_fraction, seed):
    stream = np.random.default_rng(seed).integers(0, 50000, num_tokens)
    rank = int(rank_fraction * world_size)
    make = lambda: BatchLoader(stream, 2, seq_len, seed=seed, rank=rank, world_size=world_size)  # noqa: E731
    uninterrupted = make()
    steps_per_epoch = uninterrupted.steps_per_epoch
    total = 3 * steps_per_epoch + 2
    reference = [uninterrupted.next_batch() for _ in range(total)]
    stop = int(stop_fraction * 2.5 * steps_per_epoch)  # anywhere in the first epochs, boundaries included
    first_run = make()
    for _ in range(stop):
        first_run.next_batch()
    saved = json.loads(json.dumps(first_run.state_dict()))
    resumed = make()
    resumed.load_state_dict(saved)
    for step in range(stop, total):
        x, y = resumed.next_batch()
        assert np.array_equal(x, reference[step][0]) and np.array_equal(y, reference[step][1])
    # A state saved by rank 0 is the global position for every rank.
    other_rank = BatchLoader(stream, 2, seq_len, seed=seed, rank=(rank + 1) % world_size, world_size=world_size)
    other_rank.load_state_dict(saved)
    assert other_rank.epoch == first_run.epoch and other_rank.step == first_run.step


def test_load_state_dict_rejects_other_settings():
    stream = np.arange(500)
    state = BatchLoader(stream, 4, 8, seed=1).state_dict()
    for loader in (BatchLoader(stream, 4, 8, seed=2), BatchLoader(stream, 2, 8, seed=1),
                   BatchLoader(stream[:400], 4, 8, seed=1), BatchLoader(stream, 1, 8, seed=1, world_size=2),
                   BatchLoader(stream, 4, 8, seed=1, shuffle=False)):
        with pytest.raises(ValueError, match="resume with the settings"):
            loader.load_state_dict(state)


@pytest.mark.parametrize("saved_world, resumed_world", [(2, 1), (1, 2)])
def test_resume_with_another_world_size_continues_with_the_same_windows(saved_world, resumed_world):
    stream, global_batch, seq_len = np.arange(2000), 4, 8
    saved = BatchLoader(stream, global_batch // saved_world, seq_len, seed=3, world_size=saved_world)
    for _ in range(5):
        saved.next_batch()
    state = json.loads(json.dumps(saved.state_dict()))
    reference = BatchLoader(stream, global_batch, seq_len, seed=3)
    for _ in range(5):
        reference.next_batch()
    ranks = [BatchLoader(stream, global_batch // resumed_world, seq_len, seed=3, rank=r, world_size=resumed_world)
             for r in range(resumed_world)]
    for loader in ranks:
        loader.load_state_dict(state)
    for _ in range(3):
        expected_x, _ = reference.next_batch()
        got_x = torch.cat([loader.next_batch()[0] for loader in ranks])
        assert torch.equal(got_x, expected_x)


def test_loader_errors_name_the_problem():
    with pytest.raises(ValueError, match="has 8 tokens, fewer than seq_len \\+ 1 = 9"):
        BatchLoader(np.arange(8), 1, 8)
    with pytest.raises(ValueError, match="rank=2"):
        BatchLoader(np.arange(100), 1, 8, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size=0"):
        eval_batches(np.arange(100), 0, 8)


def test_loader_reads_prepared_shards_like_the_raw_stream(tmp_path, tokenizer):
    prepare_tokens(make_documents(80, seed=5), tokenizer, tmp_path, shard_tokens=33)
    stream = read_split_raw(tmp_path, json.loads((tmp_path / "index.json").read_text()), "train")
    from_shards = BatchLoader(TokenShards(tmp_path, "train"), batch_size=3, seq_len=16, seed=0)
    from_array = BatchLoader(stream, batch_size=3, seq_len=16, seed=0)
    for _ in range(from_shards.steps_per_epoch + 2):
        x, y = from_shards.next_batch()
        x_ref, y_ref = from_array.next_batch()
        assert x.dtype == y.dtype == torch.int64 and tuple(x.shape) == (3, 16)
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_batches_are_the_stream_in_order(world_size):
    stream = np.random.default_rng(0).integers(0, 1000, 257)
    windows = naive_windows(stream, 7)
    per_rank = [list(eval_batches(stream, 4, 7, rank=r, world_size=world_size)) for r in range(world_size)]
    steps = len(windows) // (4 * world_size)
    assert all(len(batches) == steps for batches in per_rank)
    in_order = [w for step in range(steps) for r in range(world_size) for w in as_windows(*per_rank[r][step])]
    assert in_order == windows[:steps * 4 * world_size]
    assert len(list(eval_batches(stream, 4, 7, max_batches=2))) == 2
    unshuffled = BatchLoader(stream, 4, 7, shuffle=False)
    for _ in range(2):  # every epoch in stream order
        in_order = [w for _ in range(unshuffled.steps_per_epoch) for w in as_windows(*unshuffled.next_batch())]
        assert in_order == windows[:unshuffled.steps_per_epoch * 4]

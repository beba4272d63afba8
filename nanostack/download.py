"""Web corpora over HTTP: numbered shards fetched with retries, resumed with Range requests, verified by sha256.

A shard appears under its final name only when it is complete and verified; until then it is `<name>.part`,
which the next attempt resumes. `download_source` turns a corpus name (WEB_CORPORA) or a `.urls` file into a
local directory that nanostack.data reads like any other.
"""
import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nanostack.atomic import file_sha256, fsync_dir

@dataclass(frozen=True)
class WebCorpus:
    """A corpus published as numbered shards over HTTP; `url_pattern` is formatted with `index=`."""
    url_pattern: str
    num_shards: int


WEB_CORPORA = {
    # FineWeb-Edu's 10B-token sample: 14 parquet files of about 2 GB with a 'text' column.
    "fineweb-edu-10bt": WebCorpus("https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu/resolve/main/"
                                  "sample/10BT/{index:03d}_00000.parquet", 14),
    # FineWeb-Edu, 100B tokens reshuffled into parquet files of about 90 MB (nanochat's pretraining corpus).
    "fineweb-edu-100b-shuffle": WebCorpus("https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/"
                                          "resolve/main/shard_{index:05d}.parquet", 1823),
}


def web_corpus_urls(name: str, num_shards: int | None = None) -> list[str]:
    """The URLs of the first `num_shards` shards (all by default) of a corpus in WEB_CORPORA."""
    if name not in WEB_CORPORA:
        raise ValueError(f"unknown web corpus {name!r}; known: {sorted(WEB_CORPORA)}")
    corpus = WEB_CORPORA[name]
    count = corpus.num_shards if num_shards is None else num_shards
    if not 1 <= count <= corpus.num_shards:
        raise ValueError(f"num_shards={num_shards} for {name!r}; expected 1..{corpus.num_shards}")
    return [corpus.url_pattern.format(index=index) for index in range(count)]


def read_url_list(path) -> tuple[list[str], dict[str, str]]:
    """Parse a URL-list file: one `URL [sha256]` per line, `#` comments; returns (urls, {file name: sha256})."""
    urls, sha256 = [], {}
    for line_number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            raise ValueError(f"{path}:{line_number}: expected 'URL [sha256]', got {line!r}")
        urls.append(fields[0])
        if len(fields) == 2:
            sha256[_file_name(fields[0])] = fields[1]
    return urls, sha256


def _file_name(url: str) -> str:
    """The local file name for a shard URL: the last path component."""
    parsed = urllib.parse.urlparse(url)
    name = urllib.parse.unquote(parsed.path.rsplit("/", 1)[-1])
    if parsed.scheme not in ("http", "https") or not name:
        raise ValueError(f"cannot download {url!r}: expected an http(s) URL ending in a file name")
    return name


def _fetch_into(url: str, partial: Path, timeout: float) -> None:
    """Append the rest of `url` to `partial`, resuming with an HTTP Range request; raise if the body is short."""
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as error:
        # 416: the range starts at the end, so an earlier attempt got everything but was stopped before renaming.
        if error.code == 416 and error.headers.get("Content-Range", "") == f"bytes */{have}":
            return
        raise
    with response:
        if response.status == 206:
            total = int(response.headers["Content-Range"].rsplit("/", 1)[-1])
            mode = "ab"
        else:  # a plain 200: the server ignored the range, so start the file over
            length = response.headers.get("Content-Length")
            total = int(length) if length is not None else None
            mode = "wb"
        with open(partial, mode) as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    size = partial.stat().st_size
    # http.client returns a short body without complaint when the peer closes early; only the size tells.
    if total is not None and size != total:
        raise ConnectionError(f"connection closed after {size} of {total} bytes")


def _download_one(url: str, final: Path, expected_sha256: str | None, retries: int,
                  backoff_seconds: float, timeout: float) -> None:
    """Download `url` to `final` via `<final>.part`, with retries; rename only when complete and verified."""
    partial = final.with_name(final.name + ".part")
    for attempt in range(retries + 1):
        try:
            _fetch_into(url, partial, timeout)
            break
        except (OSError, http.client.HTTPException) as error:
            code = error.code if isinstance(error, urllib.error.HTTPError) else None
            # 4xx (but timeout and rate limit) will not change by asking again.
            permanent = code is not None and code not in (408, 429) and code < 500
            if permanent or attempt == retries:
                tries = "" if permanent else f" after {attempt + 1} attempts"
                raise RuntimeError(f"download of {url} failed{tries}: {error}") from error
            # Exponential backoff: rate limits and flaky links clear up if each wait is longer than the last.
            time.sleep(backoff_seconds * 2**attempt)
    if expected_sha256 is not None:
        actual = file_sha256(partial)
        if actual != expected_sha256.lower():
            partial.unlink()
            raise ValueError(f"checksum mismatch for {url}: expected sha256 {expected_sha256}, got {actual}; "
                             f"the download was deleted (check the URL and the expected hash)")
    os.replace(partial, final)
    fsync_dir(final.parent)


def download_shards(urls: list[str], dest_dir, sha256: dict[str, str] | None = None, retries: int = 5,
                    backoff_seconds: float = 1.0, timeout: float = 60.0) -> list[Path]:
    """Download each URL into `dest_dir` (files already there are kept); returns the local paths.

    `sha256` maps file names to expected hex digests. A file appears under its final name only when complete
    and verified; until then it is `<name>.part`, which the next call resumes with an HTTP Range request.
    """
    dest_dir = Path(dest_dir)
    names = [_file_name(url) for url in urls]
    if len(set(names)) != len(names):
        raise ValueError(f"URLs must end in distinct file names; got {names}")
    unknown = set(sha256 or {}) - set(names)
    if unknown:
        raise ValueError(f"sha256 given for {sorted(unknown)}, which none of the URLs downloads")
    dest_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for url, name in zip(urls, names):
        final = dest_dir / name
        if not final.exists():
            _download_one(url, final, (sha256 or {}).get(name), retries, backoff_seconds, timeout)
        paths.append(final)
    return paths


def download_source(source: str, download_dir, max_shards: int | None = None) -> str:
    """If `source` names a web corpus or a `.urls` file, download it and return the directory; else `source`."""
    if source in WEB_CORPORA:
        urls, sha256 = web_corpus_urls(source, max_shards), None
    elif source.endswith(".urls"):
        urls, sha256 = read_url_list(source)
        urls = urls[:max_shards]
        kept_names = {_file_name(url) for url in urls}
        sha256 = {name: digest for name, digest in sha256.items() if name in kept_names}
    else:
        return source
    download_shards(urls, download_dir, sha256)
    return str(download_dir)

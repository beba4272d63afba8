"""Atomic writes: a file or a directory appears whole under its final name, or not at all.

The recipe is the classic one: write under a temporary name in the same directory, fsync the data, rename
over the final name (atomic on POSIX within one filesystem), then fsync the directory so the rename itself
survives a crash. A run killed at any instant leaves either the old file or the new one, never half of one.
"""
import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def file_sha256(path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks (checkpoint manifests, downloads, token shards)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_dir(path) -> None:
    """Flush a directory entry (a rename or a new file) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path, mode: str = "wb"):
    """Open a temporary file beside `path`; on success it is fsynced and renamed to `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path, obj) -> None:
    """Atomically write `obj` as indented JSON."""
    with atomic_file(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def fsync_tree(path) -> None:
    """fsync every file in a directory and the directory itself."""
    for entry in Path(path).iterdir():
        if entry.is_file():
            with open(entry, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(path)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary directory beside `path`; on success it is fsynced and renamed to `path`.

    An existing directory at `path` is replaced (moved aside first, removed after the rename).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        fsync_tree(tmp)
        old = None
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise

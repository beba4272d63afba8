"""Prepare token shards for pretraining: read a corpus, tokenize it, write train/val `.bin` shards + index.json.

    python data/prepare.py                                   # the standard library, no download
    python data/prepare.py --source my_corpus/               # local .txt/.py/.jsonl/.parquet files
    python data/prepare.py --source fineweb-edu-10bt --max-shards 1
    python data/prepare.py --source shards.urls              # one `URL [sha256]` per line

Running it again with the same source and tokenizer reuses the finished shards; see data/README.md.
"""
import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

# The package is used from the checkout, not installed; this script lives one level below the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanostack import data  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args, run  # noqa: E402
from nanostack.tokenizer import Tokenizer  # noqa: E402


@dataclass
class PrepareConfig:
    source: str = "stdlib"  # stdlib, a file or directory, a .urls file, or a web corpus name (see README)
    tokenizer: str = "out/tokenizer.json"  # the tokenizer file to encode with
    out_dir: str = ""  # where the shards and index.json go; empty means out/data/<source name>, as train.py
    val_fraction: float = data.DEFAULT_VAL_FRACTION  # share of documents held out for validation
    shard_tokens: int = data.DEFAULT_SHARD_TOKENS  # tokens per .bin file
    workers: int | None = None  # tokenizer threads; unset means one per core
    max_shards: int | None = None  # download only the first N files of a web corpus or URL list
    download_dir: str = ""  # where downloaded files go; empty means <out-dir>/raw


def main(argv: list[str] | None = None) -> int:
    """Parse flags, download the source if it is remote, tokenize it into shards; prints the index summary."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, PrepareConfig, title="prepare")
    config = dataclass_from_args(PrepareConfig, parser.parse_args(argv))
    if not Path(config.tokenizer).is_file():
        parser.error(f"--tokenizer {config.tokenizer}: no such file; train a tokenizer first or point to one")
    tokenizer = Tokenizer.load(config.tokenizer)
    out_dir = Path(config.out_dir or Path("out") / "data" / Path(config.source).name)
    source = data.download_source(config.source, config.download_dir or out_dir / "raw", config.max_shards)
    index = data.prepare_tokens(source, tokenizer, out_dir, config.val_fraction, config.shard_tokens,
                                config.workers)
    for split, info in index["splits"].items():
        bytes_per_token = info["utf8_bytes"] / max(info["tokens"], 1)
        print(f"{split}: {info['tokens']:,} tokens in {len(info['shards'])} shards, "
              f"{info['documents']:,} documents, {bytes_per_token:.2f} bytes/token")
    print(f"index: {out_dir / 'index.json'}")
    return 0


if __name__ == "__main__":
    run(main)

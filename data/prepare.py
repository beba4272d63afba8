"""Prepare token shards for pretraining: read a corpus, tokenize it, write train/val `.bin` shards + index.json.

    python data/prepare.py                                   # the standard library, no download
    python data/prepare.py --source my_corpus/               # local .txt/.py/.jsonl/.parquet files
    python data/prepare.py --source fineweb-edu-10bt --max-shards 1
    python data/prepare.py --source shards.urls              # one `URL [sha256]` per line

If the --tokenizer file does not exist yet, a --vocab-size tokenizer is trained on the first --tokenizer-max-mb
MB of the corpus and saved there first (what `python train.py` does too). The defaults put the tokenizer and
the shards where train.py looks, so `python train.py` afterwards reuses both; for a web corpus also pass
`--download-dir out/download/<corpus name>`, where train.py keeps its downloads. See data/README.md.
"""
import sys
from dataclasses import dataclass
from pathlib import Path

# The package is used from the checkout, not installed; this script lives one level below the repo root.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nanostack import data, download  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args, make_parser, run  # noqa: E402
from train import PretrainConfig, default_data_dir, load_or_train_tokenizer  # noqa: E402


@dataclass
class PrepareConfig:
    source: str = "stdlib"  # stdlib, a file or directory, a .urls file, or a web corpus name (see data/README.md)
    tokenizer: str = "out/tokenizer.json"  # the tokenizer file to encode with; trained and saved here if missing
    vocab_size: int = PretrainConfig.vocab_size  # vocabulary size when the tokenizer has to be trained
    tokenizer_max_mb: float = PretrainConfig.tokenizer_max_mb  # MB of corpus text a new tokenizer is trained on
    out_dir: str = ""  # where the shards and index.json go; empty = data/<source name> beside --tokenizer
    val_fraction: float = PretrainConfig.val_fraction  # share of documents held out for validation (as train.py)
    shard_tokens: int = data.DEFAULT_SHARD_TOKENS  # tokens per .bin file
    workers: int | None = None  # tokenizer threads; unset means one per core
    max_shards: int | None = None  # download only the first N files of a web corpus or URL list
    download_dir: str = ""  # where downloaded files go; empty means <out-dir>/raw


def main(argv: list[str] | None = None) -> int:
    """Parse flags, download the source if it is remote, tokenize it into shards; prints the index summary."""
    parser = make_parser(__doc__)
    add_dataclass_args(parser, PrepareConfig, title="prepare")
    config = dataclass_from_args(PrepareConfig, parser.parse_args(argv))
    # train.py names a downloaded corpus's shards after its download directory; so does this, given one.
    out_dir = Path(config.out_dir or default_data_dir(config.tokenizer, config.download_dir or config.source))
    source = download.download_source(config.source, config.download_dir or out_dir / "raw", config.max_shards)
    tokenizer = load_or_train_tokenizer(config.tokenizer, source, config.vocab_size, config.tokenizer_max_mb)
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

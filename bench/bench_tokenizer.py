"""Tokenizer benchmark: our BPE trainer + tiktoken against Hugging Face `tokenizers`, on the same text.

    python bench/bench_tokenizer.py                 # the whole stdlib corpus (~31 MB of *.py)
    python bench/bench_tokenizer.py --max-mb 8      # a capped corpus for a quick look

Per vocab size: training wall time (ours: pre-tokenize + merges + building the tiktoken Encoding; HF:
train_from_iterator) on the training files, bytes per token on the held-out files (those nanostack.data
puts in its validation split, by a hash of the file name), and encode throughput in MB/s of encode_batch
on those held-out files. Each time is the best of --repeats runs.

HF is set up as close to ours as it allows: pre-tokenizer Split(GPT-4 regex, "isolated") then ByteLevel
without its own regex, the 256-byte initial alphabet, and the same 6 special tokens, so both learn
vocab_size - 262 merges. Still different: HF's regex engine is Oniguruma (`split_agreement` reports on how
many held-out files its chunks equal ours), and among pairs of equal count HF picks by its own order
where we pick the smallest (left bytes, right bytes).
"""
import argparse
import dataclasses
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import regex  # noqa: E402
import tiktoken  # noqa: E402
import tokenizers  # noqa: E402
from tokenizers import decoders, models, pre_tokenizers, trainers  # noqa: E402

from bench.common import print_table, write_result  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.data import is_validation, stdlib_documents  # noqa: E402
from nanostack.tokenizer import (GPT4_SPLIT_PATTERN, SPECIAL_TOKENS, Tokenizer, available_cpus,  # noqa: E402
                                 count_chunks, merges_to_ranks, train_bpe)

TARGETS = {"train_time_ratio_max": 3.0, "bytes_per_token_ratio_min": 0.99, "encode_speed_ratio_min": 1.0}


@dataclass
class BenchConfig:
    """Tokenizer training time, compression and encode speed: ours vs HF tokenizers."""
    max_mb: float = 0.0              # cap on the corpus in MB of text, 0 for the whole stdlib
    vocab_sizes: str = "8192,32768"  # comma-separated total vocab sizes (specials included)
    heldout_fraction: float = 0.1    # share of files held out for bytes per token
    repeats: int = 3                 # timed runs per measurement; the best is kept


def stdlib_corpus(max_mb: float) -> list:
    """The standard library corpus (nanostack.data's default documents), capped at max_mb of UTF-8."""
    documents, size = [], 0
    for document in stdlib_documents():
        documents.append(document)
        size += len(document.text.encode("utf-8"))
        if max_mb and size >= max_mb * 1e6:
            break
    return documents


def best_times(repeats: int, runs: dict) -> dict:
    """{name: (wall seconds, result)} of the fastest of `repeats` calls of each run. The runs take turns,
    so that load from other work on the machine falls on all of them alike."""
    best = {name: (float("inf"), None) for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            result = run()
            elapsed = time.perf_counter() - start
            if elapsed < best[name][0]:
                best[name] = (elapsed, result)
    return best


def train_ours(texts: list[str], vocab_size: int) -> tuple[Tokenizer, dict]:
    """Tokenizer.train, step by step so that each phase is timed."""
    start = time.perf_counter()
    chunk_counts = count_chunks(texts)
    counted = time.perf_counter()
    merges = train_bpe(chunk_counts, vocab_size - len(SPECIAL_TOKENS))
    merged = time.perf_counter()
    tokenizer = Tokenizer(merges_to_ranks(merges))
    phases = {"pretokenize_s": counted - start, "merges_s": merged - counted,
              "encoding_s": time.perf_counter() - merged, "unique_chunks": len(chunk_counts)}
    return tokenizer, phases


def train_hf(texts: list[str], vocab_size: int) -> tokenizers.Tokenizer:
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(GPT4_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(texts, trainer)
    return hf


def split_agreement(texts: list[str]) -> float:
    """Fraction of texts that HF's Split with our regex cuts into exactly our chunks."""
    split = pre_tokenizers.Split(tokenizers.Regex(GPT4_SPLIT_PATTERN), behavior="isolated")
    same = sum([piece for piece, _ in split.pre_tokenize_str(text)] == regex.findall(GPT4_SPLIT_PATTERN, text)
               for text in texts)
    return same / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    load_at_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    documents = stdlib_corpus(config.max_mb)
    train_texts = [d.text for d in documents if not is_validation(d.name, config.heldout_fraction)]
    heldout = [d.text for d in documents if is_validation(d.name, config.heldout_fraction)]
    mb = lambda parts: sum(len(text.encode("utf-8")) for text in parts) / 1e6  # noqa: E731
    corpus = {"files": len(documents), "train_mb": round(mb(train_texts), 2), "heldout_mb": round(mb(heldout), 2),
              "split_agreement": split_agreement(heldout)}
    print(f"corpus: {corpus}")
    threads = available_cpus()
    heldout_mb = mb(heldout)

    rows = []
    for vocab_size in [int(v) for v in config.vocab_sizes.split(",")]:
        trained = best_times(config.repeats, {"ours": lambda: train_ours(train_texts, vocab_size),
                                              "hf": lambda: train_hf(train_texts, vocab_size)})
        (ours_s, (ours, phases)), (hf_s, hf) = trained["ours"], trained["hf"]
        encoders = {"ours": lambda: ours.encode_batch(heldout, num_threads=threads),
                    "hf": lambda: hf.encode_batch(heldout)}
        if hasattr(hf, "encode_batch_fast"):  # no offsets: HF's fastest batch path, shown for reference
            encoders["hf_fast"] = lambda: hf.encode_batch_fast(heldout)
        encoded = best_times(config.repeats, encoders)
        ours_bpt = heldout_mb * 1e6 / sum(map(len, encoded["ours"][1]))
        hf_bpt = heldout_mb * 1e6 / sum(len(encoding.ids) for encoding in encoded["hf"][1])
        row = {"vocab": vocab_size, "ours_vocab": ours.vocab_size, "hf_vocab": hf.get_vocab_size(),
               "ours_train_s": ours_s, **{f"ours_{k}": v for k, v in phases.items()}, "hf_train_s": hf_s,
               "train_ratio": ours_s / hf_s, "ours_bytes_per_token": ours_bpt, "hf_bytes_per_token": hf_bpt,
               "bpt_ratio": ours_bpt / hf_bpt, "encode_ratio": encoded["hf"][0] / encoded["ours"][0],
               **{f"{name}_encode_mb_s": heldout_mb / seconds for name, (seconds, _) in encoded.items()}}
        rows.append(row)
        print_table([row], title=f"vocab {vocab_size}")

    met = {
        "train_time_within_3x": all(row["train_ratio"] <= TARGETS["train_time_ratio_max"] for row in rows),
        "compression_within_1pct": all(row["bpt_ratio"] >= TARGETS["bytes_per_token_ratio_min"] for row in rows),
        "encode_at_least_hf": all(row["encode_ratio"] >= TARGETS["encode_speed_ratio_min"] for row in rows),
    }
    print_table([{"vocab": r["vocab"], "train s (ours)": r["ours_train_s"], "train s (HF)": r["hf_train_s"],
                  "ours/HF time": r["train_ratio"], "bytes/tok (ours)": r["ours_bytes_per_token"],
                  "bytes/tok (HF)": r["hf_bytes_per_token"], "MB/s (ours)": r["ours_encode_mb_s"],
                  "MB/s (HF)": r["hf_encode_mb_s"]} for r in rows], title="summary")
    print(f"targets met: {met}")
    write_result("tokenizer", {"config": dataclasses.asdict(config), "corpus": corpus, "encode_threads": threads,
                               "versions": {"tiktoken": tiktoken.__version__, "tokenizers": tokenizers.__version__,
                                            "regex": regex.__version__},
                               "load_average_1m_at_start": load_at_start, "targets": TARGETS, "targets_met": met,
                               "results": rows})


if __name__ == "__main__":
    main()

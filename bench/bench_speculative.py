"""Speculative decoding: output tokens/s at batch 1 and batch 16, without drafts, with n-gram prompt lookup and
with a draft model, and how many draft tokens the target accepts.

    python bench/bench_speculative.py                        # trains a small target with train.py if needed
    python bench/bench_speculative.py --target out/pretrain  # any checkpoint
    python bench/bench_speculative.py --target out/big --draft out/small --device cuda --dtype bfloat16

Models. The target is a trained checkpoint (default: the one bench_quant.py trains into out/bench_quant, trained
here the same way when it is missing). The draft model is, without --draft, a truncated copy of the target:
its first `draft_layers` blocks with the target's own embedding, final norm and LM head. No training is
needed and it agrees with the target often enough to give a meaningful acceptance rate (the residual
stream after a few layers already points at likely tokens). --draft takes a real small checkpoint instead.

Workload. Prompts are `prompt_len` tokens from the middle of held-out standard-library files (the validation
split of the default corpus); each request generates `max_tokens` tokens with ignore_eos. Greedy decoding, so
every configuration must produce the same tokens as plain decoding (checked, reported as
`same_tokens`); a sampled run (temperature 1) reports acceptance under rejection sampling too. A briefly
trained model's greedy continuations loop over what it has already written, which flatters n-gram lookup;
sampled at temperature 1 they stop repeating, and n-gram acceptance collapses while the draft model's holds.

Batch 1 runs the requests one after another; batch 16 submits 16 at once. The speculative rows use the
default off-switch (speculate only while <= max_batch_size requests run), so at batch 16 they fall back to
plain decoding; the "forced" rows lift the switch to show what speculation costs there.

On a CPU a forward over K+1 tokens costs noticeably more than over one (compute, not memory bandwidth, is
the limit), so the gains are smaller than on a GPU, where scoring K+1 tokens is nearly free.
"""
import argparse
import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import print_table, write_result  # noqa: E402
from nanostack import checkpoint, data  # noqa: E402
from nanostack.cli import add_dataclass_args, dataclass_from_args  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402
from nanostack.sampling import SamplingParams  # noqa: E402
from nanostack.serving.engine import Engine, EngineConfig  # noqa: E402
from nanostack.serving.speculative import SpeculativeConfig, Speculator  # noqa: E402


@dataclass
class BenchConfig:
    """Speculative decoding throughput and acceptance, batch 1 and batch 16."""
    target: str = ""                 # target checkpoint; empty = out/bench_quant, trained with train.py if missing
    draft: str = ""                  # draft checkpoint; empty = the target's first draft_layers blocks
    draft_layers: int = 1
    train_steps: int = 150           # train.py --steps when training the target
    device: str = "cpu"
    dtype: str = "float32"
    num_speculative_tokens: int = 4
    max_batch_size: int = 4          # the off-switch: speculate only while at most this many requests run
    prompt_len: int = 128
    max_tokens: int = 64
    num_requests: int = 16
    batch1_requests: int = 4         # requests run one at a time for the batch-1 rows
    threads: int = 1                 # torch CPU threads (a shared machine: one is steadiest)
    repeats: int = 2                 # timed runs per row; the best is kept


def target_checkpoint(config: BenchConfig) -> Path:
    """The --target checkpoint, or out/bench_quant, trained by train.py (as bench_quant.py does) when missing."""
    if config.target:
        return checkpoint.resolve_checkpoint(ROOT / config.target)
    run_dir = ROOT / "out" / "bench_quant"
    if not (run_dir / "latest").exists():
        command = [sys.executable, "train.py", "--out-dir", str(run_dir), "--steps", str(config.train_steps),
                   "--eval-every", "0", "--sample-every", "0"]
        print("training:", " ".join(command[1:]), flush=True)
        subprocess.run(command, cwd=ROOT, check=True)
    return checkpoint.resolve_checkpoint(run_dir)


def truncated_copy(target: GPT, num_layers: int) -> GPT:
    """The target's first num_layers blocks, sharing its embedding, final norm and LM head weights."""
    draft = GPT(ModelConfig(**{**vars(target.config), "n_layer": num_layers}))
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if k in draft.state_dict()})
    return draft.to(device=target.tok_emb.weight.device, dtype=target.tok_emb.weight.dtype).eval()


def held_out_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    """length tokens from the middle of each of the first count validation files long enough to give them."""
    prompts = []
    for document in data.stdlib_documents():
        if not data.is_validation(document.name, 0.02):
            continue
        ids = tokenizer.encode(document.text)
        if len(ids) >= 2 * length:
            prompts.append(ids[len(ids) // 2 - length // 2:][:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"only {len(prompts)} validation files hold {2 * length} tokens; lower --prompt-len")


def run(engine: Engine, prompts, params: SamplingParams, batch_size: int):
    """Generate everything, batch_size requests at a time; returns (seconds, token lists)."""
    start, outputs = time.perf_counter(), []
    for first in range(0, len(prompts), batch_size):
        outputs += [out.new_token_ids for out in engine.generate(prompts[first:first + batch_size], params)]
    if engine.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dataclass_args(parser, BenchConfig)
    config = dataclass_from_args(BenchConfig, parser.parse_args())
    torch.set_num_threads(config.threads)
    dtype = getattr(torch, config.dtype)
    target_path = target_checkpoint(config)
    loaded = checkpoint.load_checkpoint(target_path, config.device)
    target, tokenizer = loaded["model"].to(dtype).eval(), loaded["tokenizer"]
    if config.draft:
        draft = checkpoint.load_checkpoint(ROOT / config.draft, config.device)["model"].to(dtype).eval()
    else:
        draft = truncated_copy(target, config.draft_layers)
    prompts = held_out_prompts(tokenizer, config.num_requests, config.prompt_len)
    greedy = SamplingParams(max_tokens=config.max_tokens, temperature=0, ignore_eos=True)
    most_tokens = config.num_requests * (config.num_speculative_tokens + 1)  # every request verifying K drafts
    engine_config = EngineConfig(max_num_seqs=config.num_requests, max_model_len=config.prompt_len + config.max_tokens,
                                 max_num_batched_tokens=max(1024, most_tokens))

    def speculator(draft_model, max_batch_size=config.max_batch_size):
        return Speculator(SpeculativeConfig(num_speculative_tokens=config.num_speculative_tokens,
                                            max_batch_size=max_batch_size), draft_model)

    variants = {"none": lambda: None, "ngram": lambda: speculator(None), "draft model": lambda: speculator(draft),
                "ngram (forced)": lambda: speculator(None, 10**6),
                "draft model (forced)": lambda: speculator(draft, 10**6)}
    Engine(target, tokenizer, engine_config, speculator(draft)).generate(prompts[:2], greedy)  # warm-up
    rows, results, baseline = [], {}, {}
    for batch_size, count in ((1, config.batch1_requests), (config.num_requests, config.num_requests)):
        # The switch never fires at batch 1, so the forced rows would repeat the others there.
        names = [name for name in variants if batch_size > 1 or not name.endswith("(forced)")]
        runs = {name: [] for name in names}
        for _ in range(config.repeats):  # round robin, so every variant meets the same background load
            for name in names:
                engine = Engine(target, tokenizer, engine_config, variants[name]())
                runs[name].append((*run(engine, prompts[:count], greedy, batch_size), engine.stats().speculative))
        for name in names:
            seconds, tokens, spec = min(runs[name], key=lambda r: r[0])
            baseline.setdefault(batch_size, (seconds, tokens))
            row = {"batch": batch_size, "speculation": name, "tokens/s": count * config.max_tokens / seconds,
                   "speedup": baseline[batch_size][0] / seconds, "same_tokens": tokens == baseline[batch_size][1],
                   "acceptance": spec.acceptance_rate if spec else None,
                   "accepted/draft": spec.mean_acceptance_length if spec else None,
                   "drafts": spec.num_drafts if spec else None}
            rows.append(row)
            results[f"batch{batch_size}/{name}"] = {
                **row, "seconds": seconds, "runs_seconds": [r[0] for r in runs[name]],
                "spec_stats": dataclasses.asdict(spec) if spec else None}
    print_table(rows, title=f"greedy, K={config.num_speculative_tokens}, prompt {config.prompt_len} + "
                            f"{config.max_tokens} tokens, {config.device} {config.dtype}, {config.threads} thread(s)")

    sampled_rows = []
    sampled = SamplingParams(max_tokens=config.max_tokens, temperature=1.0, ignore_eos=True, seed=0)
    for name, draft_model in (("ngram", None), ("draft model", draft)):
        engine = Engine(target, tokenizer, engine_config, speculator(draft_model))
        run(engine, prompts[:config.batch1_requests], sampled, 1)
        spec = engine.stats().speculative
        sampled_rows.append({"speculation": name, "acceptance": spec.acceptance_rate,
                             "accepted/draft": spec.mean_acceptance_length,
                             "accepted per position": spec.accepted_per_position, "drafts": spec.num_drafts})
    print_table(sampled_rows, title="temperature 1, batch 1: acceptance under rejection sampling")
    write_result("speculative", {
        "config": dataclasses.asdict(config), "target_checkpoint": str(target_path.relative_to(ROOT))
        if target_path.is_relative_to(ROOT) else str(target_path),
        "target_model": dataclasses.asdict(target.config), "draft_model": dataclasses.asdict(draft.config),
        "draft_is_truncated_target": not config.draft, "torch_threads": torch.get_num_threads(),
        "greedy": results, "sampled_batch1": sampled_rows}, config.device)


if __name__ == "__main__":
    main()

"""Post-train a pretrained checkpoint: supervised fine-tuning, distillation, DPO or GRPO, in full or with LoRA.

    python finetune.py                                   # SFT of out/pretrain on stdlib docstring Q&A -> out/sft
    python finetune.py --lora-rank 8                     # the same with LoRA adapters on wq and wv
    python finetune.py --mode dpo --init out/sft         # prefer the right docstring over another one
    python finetune.py --mode distill --init out/small --teacher out/sft --kd-baseline true
    python finetune.py --lora-rank 8 --base-quant nf4        # QLoRA: adapters on a frozen 4-bit NF4 base
    python finetune.py --qat w8a8                            # quantization-aware: trained to be served in W8A8

    python finetune.py --task addition --out-dir out/sft_add             # SFT on a verifiable task's answers
    python finetune.py --mode grpo --task addition --init out/sft_add    # reinforcement learning from its reward
    python finetune.py --mode dpo --pairs-from-task addition --init out/sft_add   # on-policy preference pairs

The default data is built from the standard library's own docstrings (nanostack/chat_data.py), no
download; `--data file.jsonl` takes OpenAI-style {"messages": [...]} lines (sft, distill) or
{"prompt", "chosen", "rejected"} lines (dpo). Every run evaluates the model before and after training on
held-out data (assistant-token loss, 4-way multiple-choice accuracy, preference accuracy), prints a table
and writes it to <out-dir>/eval.json. Conversations longer than --seq-len tokens keep their beginning; one cut
before its first assistant token has nothing to learn and is dropped (a DPO pair, when either reply is cut away);
the counts are printed. The data and every cheap flag are checked before any model loads.

With --task (nanostack/tasks.py: addition, subtraction, stdlib_module) the data are a verifiable task's problems:
SFT and distillation train on the reference answers, GRPO on the rewards of its own samples (rollouts from the
serving Engine over the model being trained, --group-size per prompt), and DPO with --pairs-from-task on pairs of
a rewarded and an unrewarded sample of the --init model. The evaluation then adds pass@1 (greedy) and
pass@--pass-k (sampled) on the task's held-out problems (nanostack/evaluate.py), and for DPO and GRPO the KL
to the reference (the --init model) on the model's own samples.

What --out-dir holds:
    step_*/, latest      the fine-tuned model, a plain checkpoint every tool loads (LoRA merged into it);
                         config.json records the mode, the --init checkpoint and the LoRA settings
    eval.json            before/after evaluation
    metrics.jsonl        training log (full fine-tuning; a LoRA run logs in lora_run/)
    adapter/             LoRA: the adapter alone (adapter.safetensors + adapter.json naming the base)
    lora_run/            LoRA: the training checkpoints (base + unmerged adapter + optimizer state), which
                         `--resume true` continues exactly; kept apart so `latest` is always servable
    qat_run/, quantized/ --qat: the training checkpoints (weights under fake quantization), and the trained
                         model quantized with the mode it trained under (serve it as it is)
    baseline/            distill with --kd-baseline: the same student trained without the teacher
With `--merge-lora false` a LoRA run writes no merged checkpoint: load the base and `lora.load_adapter`.

QLoRA (`--base-quant nf4`) keeps the frozen base in 4-bit NormalFloat (nanostack/quant4.py), dequantized layer
by layer in forward and backward; eval.json compares the frozen base's bytes and the whole training state's
bytes with a bf16 LoRA's. The merged checkpoint is the dequantized base plus the adapter, in full precision
(quantize it with `python -m nanostack.quant` to serve it in 4 or 8 bits). `--qat w8a8|int4` fine-tunes the
whole model through fake quantizers (nanostack/qat.py), so quantizing it afterwards loses little.

LoRA from a pretrained model: add lm_head to --lora-targets (e.g. `attn,lm_head`). The chat template's
<|end|> was never a pretraining target, and a frozen output head cannot learn to predict it; on the
embedded data the adapters alone get ~87% of full fine-tuning's held-out gain, with lm_head ~99%.
"""
import copy
import json
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from nanostack import chat_data, checkpoint, distributed, evaluate, lora, objectives, qat, quant, quant4, tasks
from nanostack.atomic import write_json
from nanostack.cli import SettingsError, add_dataclass_args, dataclass_from_args, make_parser, run
from nanostack.distributed import ParallelConfig
from nanostack.model import default_learning_rate
from nanostack.training import TrainConfig, autocast_context, resolve_device, train

MODES = ("sft", "distill", "dpo", "grpo")


@dataclass
class FinetuneConfig:
    mode: str = "sft"               # sft | distill | dpo | grpo
    init: str = "out/pretrain"      # checkpoint or run directory to start from (train.py writes out/pretrain)
    data: str = "stdlib"            # stdlib (docstring Q&A, no download) | a .jsonl file of messages or of pairs (dpo)
    seq_len: int = 0                # tokens per row; 0 = the model's max_seq_len
    packing: bool = False           # sft/distill: pack several conversations per row (doc_ids keep them apart)
    heldout_fraction: float = 0.1   # share held out for evaluation (by top-level module for stdlib, by line for jsonl)
    eval_examples: int = 300        # held-out conversations, questions and pairs scored by each evaluation
    lora_rank: int = 0              # LoRA rank; 0 = full fine-tuning
    lora_alpha: float = 16.0        # the adapter update is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0       # dropout on the adapters' input
    lora_targets: str = "qv"        # qv | attn | all | a comma list of wq,wk,wv,wo,w_gate,w_up,w_down,lm_head
    merge_lora: bool = True         # write the adapters merged into a plain checkpoint for serving
    base_quant: str = ""            # nf4 = QLoRA: the frozen base in 4-bit NormalFloat (needs --lora-rank); empty = off
    qat: str = ""                   # w8a8 | int4: quantization-aware full fine-tuning for that PTQ mode; empty = off
    qat_group_size: int = 128       # --qat int4: input channels per scale and zero point
    teacher: str = ""               # distill: teacher checkpoint (must use the student's tokenizer)
    kd_temperature: float = 2.0     # distill: softmax temperature of both distributions
    kd_alpha: float = 0.5           # distill: weight of the KL term; 1 - alpha goes to the hard-label loss
    kd_kind: str = "forward"        # distill: forward = KL(teacher || student) | reverse = KL(student || teacher)
    kd_baseline: bool = False       # distill: also train the student without a teacher, same steps (2x the cost)
    dpo_beta: float = 0.1           # dpo: how strongly the policy is held to the reference
    dpo_precompute_reference: bool = False  # dpo: reference log-probs in one pass up front, no second model
    dpo_nll_weight: float = 0.0     # dpo: weight of the chosen reply's cross-entropy added to the loss (RPO)
    task: str = ""                  # verifiable tasks to train on instead of --data: addition,subtraction,stdlib_module
    pairs_from_task: str = ""       # dpo: pairs of the --init model's right and wrong samples on this task
    digits: int = 3                 # addition/subtraction: operands below 10**digits (the difficulty dial)
    task_examples: int = 20000      # training problems drawn per task
    group_size: int = 8             # grpo: completions per prompt; dpo --pairs-from-task: samples per prompt
    grpo_clip: float = 0.2          # grpo: the policy ratio is clipped to [1 - clip, 1 + clip]
    grpo_kl_beta: float = 0.04      # grpo: weight of the KL penalty to the reference (the --init model)
    temperature: float = 1.0        # sampling temperature of rollouts, on-policy pairs and pass@k
    max_new_tokens: int = 16        # tokens per sampled completion at most
    pass_k: int = 8                 # samples per held-out task problem for pass@k



# Fine-tuning starts from a trained model and sees little data: fewer steps, a short warmup, no weight
# decay (it would pull towards zero, not towards the pretrained weights), evaluation only at the end.
FINETUNE_DEFAULTS = {"out_dir": "", "steps": 200, "warmup_steps": 10, "weight_decay": 0.0, "eval_every": 0,
                     "sample_every": 0, "save_every": 100, "log_every": 10}


def finetune_learning_rate(model_config, mode: str, lora_rank: int) -> float:
    """Default peak LR: a third of the pretraining LR for SFT and distillation, a tenth of that for DPO (its
    loss drives log-probs apart without bound, and larger steps overfit the pairs) and GRPO (its gradient is as
    noisy as its samples); LoRA's small update 3x."""
    full = default_learning_rate(model_config) / 3 / (10 if mode in ("dpo", "grpo") else 1)
    return full * 3 if lora_rank else full


def parse_args(argv=None):
    """Flags from FinetuneConfig, TrainConfig (with fine-tuning defaults) and ParallelConfig."""
    parser = make_parser(__doc__)
    add_dataclass_args(parser, FinetuneConfig, "fine-tuning")
    add_dataclass_args(parser, TrainConfig, "training")
    add_dataclass_args(parser, ParallelConfig, "parallelism (under torchrun)")
    for action in parser._actions:
        if action.dest in FINETUNE_DEFAULTS:
            action.default = FINETUNE_DEFAULTS[action.dest]
            shown = "out/<mode>" if action.dest == "out_dir" else repr(action.default)
            action.help = re.sub(r"\(default: .*\)$", f"(default: {shown})", action.help)
    return parser.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Data

@dataclass
class Datasets:
    """Training data for the mode, and the held-out sets every evaluation uses."""
    train_conversations: list = field(default_factory=list)  # sft, distill: lists of messages
    train_pairs: list = field(default_factory=list)           # dpo: PreferenceExample
    heldout_conversations: list = field(default_factory=list)
    heldout_pairs: list = field(default_factory=list)
    questions: list = field(default_factory=list)             # multiple choice (stdlib data only)
    task_heldout: list = field(default_factory=list)          # (task, held-out problems), scored by pass@k
    train_problems: list = field(default_factory=list)        # grpo, dpo pairs: (task, Problem)


def _first(items: list, count: int, key) -> list:
    """`count` of the items, picked by a hash of `key(item)` so that they spread over every held-out module."""
    return sorted(items, key=lambda item: chat_data.stable_hash(key(item)))[:count]


def check_task_flags(config: FinetuneConfig) -> None:
    """Refuse task settings the mode would not use."""
    if config.mode == "grpo" and not config.task:
        raise ValueError(f"--mode grpo learns from a reward: pass --task, one of {', '.join(tasks.TASKS)}")
    if config.mode == "dpo" and config.task:
        raise ValueError(f"--mode dpo learns from pairs: use --pairs-from-task {config.task} (pairs of the --init "
                         f"model's right and wrong samples) instead of --task")
    if config.pairs_from_task and config.mode != "dpo":
        raise ValueError(f"--pairs-from-task builds DPO pairs; with --mode {config.mode} use --task")
    if (config.task or config.pairs_from_task) and config.data != "stdlib":
        raise ValueError(f"--data {config.data} and a task both name the training data: pass one of them")
    if config.mode == "grpo" and config.group_size < 2:
        raise ValueError(f"--group-size must be >= 2 for grpo, got {config.group_size}: with one completion per "
                         f"prompt every advantage (reward minus the group's mean) is 0 and nothing is learned")
    if config.task_examples < 1 or config.pass_k < 1 or config.max_new_tokens < 1:
        raise ValueError(f"--task-examples {config.task_examples}, --pass-k {config.pass_k} and --max-new-tokens "
                         f"{config.max_new_tokens} must all be at least 1")


def task_datasets(config: FinetuneConfig, names: str) -> Datasets:
    """Training problems and held-out conversations of the named tasks, each task's split kept apart."""
    task_list = tasks.parse_tasks(names, config.digits)
    train = [(task, p) for task in task_list
             for p in tasks.problems(task, "train", config.task_examples, 0, config.heldout_fraction)]
    # Fixed problems (--seed orders the training ones): every run of a task is scored on the same held-out ones.
    heldout = [(task, tasks.problems(task, "heldout", config.eval_examples, 0, config.heldout_fraction))
               for task in task_list]
    return Datasets(train_conversations=[p.conversation() for _, p in train], train_problems=train,
                    task_heldout=heldout, heldout_conversations=[p.conversation() for _, ps in heldout for p in ps])


def load_datasets(config: FinetuneConfig) -> Datasets:
    """A task's problems, the embedded stdlib docstring data, or a jsonl file, split into train and held-out."""
    limit = config.eval_examples
    if config.task or config.pairs_from_task:
        return task_datasets(config, config.task or config.pairs_from_task)
    if config.data == "stdlib":
        train_entries, heldout_entries = chat_data.split_by_module(chat_data.stdlib_docstrings(),
                                                                   config.heldout_fraction)
        heldout_conversations = [chat_data.chat_messages(e) for e in heldout_entries]
        return Datasets(
            train_conversations=[chat_data.chat_messages(e) for e in train_entries],
            train_pairs=chat_data.preference_examples(train_entries),
            heldout_conversations=_first(heldout_conversations, limit, lambda m: m[0]["content"]),
            heldout_pairs=_first(chat_data.preference_examples(heldout_entries), limit,
                                 lambda p: p.prompt[0]["content"]),
            questions=_first(chat_data.multiple_choice_questions(heldout_entries), limit, lambda q: q.question))
    path = Path(config.data)
    if path.suffix != ".jsonl" or not path.is_file():
        raise ValueError(f"--data must be 'stdlib' or an existing .jsonl file, got {config.data!r}")

    def split(items):
        heldout_lines = {i for i in range(len(items)) if chat_data.is_heldout(f"line {i}", config.heldout_fraction)}
        train = [item for i, item in enumerate(items) if i not in heldout_lines]
        if not train:
            raise ValueError(f"{path}: all {len(items)} examples fall in the held-out share (--heldout-fraction "
                             f"{config.heldout_fraction}), none is left to train on: add examples")
        return train, [items[i] for i in sorted(heldout_lines)][:limit]

    if config.mode == "dpo":
        train_pairs, heldout_pairs = split(chat_data.read_preference_jsonl(path))
        return Datasets(train_pairs=train_pairs, heldout_pairs=heldout_pairs,
                        heldout_conversations=[[*p.prompt, {"role": "assistant", "content": p.chosen}]
                                               for p in heldout_pairs])
    train_conversations, heldout_conversations = split(chat_data.read_chat_jsonl(path))
    return Datasets(train_conversations=train_conversations, heldout_conversations=heldout_conversations)


# ----------------------------------------------------------------------------------------------------------
# Models

def check_arguments(config: FinetuneConfig) -> None:
    """The checks that cost nothing, made before anything loads: the mode, the checkpoint paths, LoRA targets."""
    if config.mode not in MODES:
        raise ValueError(f"--mode must be one of {MODES}, got {config.mode!r}")
    if config.mode == "distill" and not config.teacher:
        raise ValueError("--mode distill needs --teacher CHECKPOINT_DIR (e.g. a larger fine-tuned model)")
    if not Path(config.init).exists():
        raise checkpoint.CheckpointError(f"no checkpoint at {config.init}: run `python train.py` first (it writes "
                                         f"out/pretrain), or pass --init CHECKPOINT_DIR")
    if config.teacher and not Path(config.teacher).exists():
        raise checkpoint.CheckpointError(f"no checkpoint at {config.teacher} (--teacher): pass the directory of a "
                                         f"trained model with the student's tokenizer")
    if config.lora_rank:
        lora.parse_targets(config.lora_targets)
    check_task_flags(config)


def load_teacher(path: str, student_tokenizer, device, student_tokenizer_path="the student's tokenizer.json"):
    """The distillation teacher; its tokenizer must be the student's, token for token."""
    loaded = checkpoint.load_checkpoint(path, device)
    # Distillation compares next-token distributions position by position: the same ids must mean the same text.
    checkpoint.require_same_tokenizer(student_tokenizer, student_tokenizer_path, loaded["tokenizer"],
                                      loaded["directory"] / "tokenizer.json", "teacher")
    return loaded["model"]


def stop_at_end_of_turn(tokenizer, init_path, say) -> None:
    """Make the chat template's end-of-turn token a stop id when it is not one, before any chat is rendered.

    A base model's template may end replies with a token its stop ids lack (Qwen2.5 base: ChatML's <|im_end|>,
    eos <|endoftext|>). Fine-tuned on that template, the model ends its replies with it, so generation must stop
    there: the stop ids travel with the checkpoint (generation_config.json) to serve.py and export_hf."""
    end = tokenizer.end_of_turn_id()
    if end is not None and end not in tokenizer.stop_ids:
        tokenizer.stop_ids.add(end)
        say(f"the chat template ends each reply with {tokenizer.decode([end])!r} (id {end}), which is not a stop "
            f"token of {init_path}: added to the stop ids saved with the fine-tuned model")


def check_low_precision(config: FinetuneConfig, parallel: ParallelConfig) -> None:
    """Refuse --base-quant / --qat settings that could not do what they say."""
    if config.base_quant not in ("", "nf4"):
        raise ValueError(f"--base-quant {config.base_quant!r}: expected nf4 (QLoRA) or empty")
    if config.base_quant and not config.lora_rank:
        raise ValueError("--base-quant nf4 freezes the base in 4 bits, so only LoRA adapters can train: "
                         "add --lora-rank R (e.g. 8)")
    if config.qat not in ("", *qat.MODES):
        raise ValueError(f"--qat {config.qat!r}: expected one of {', '.join(qat.MODES)} or empty")
    if config.qat and config.lora_rank:
        raise ValueError("--qat trains the quantized weights themselves: drop --lora-rank (or use --base-quant nf4 "
                         "for LoRA on a 4-bit base)")
    if config.qat_group_size != 128 and config.qat != "int4":
        raise ValueError(f"--qat-group-size {config.qat_group_size} applies to --qat int4 only")
    if (config.base_quant or config.qat) and parallel.strategy == "fsdp":
        raise ValueError(f"--{'base-quant' if config.base_quant else 'qat'} with --strategy fsdp: FSDP shards "
                         "parameters, not 4-bit buffers or fake quantizers; use --strategy ddp or one device")


def prepare_model(model, config: FinetuneConfig) -> int:
    """Put LoRA adapters (lora_rank > 0) or QAT's fake quantizers (--qat) on the model, or leave it fully
    trainable; returns trainable params. QLoRA's base is quantized before (quantize_base_nf4)."""
    if config.lora_rank:
        return lora.apply_lora(model, config.lora_targets, config.lora_rank, config.lora_alpha, config.lora_dropout)
    if config.qat:
        qat.apply_qat(model, config.qat, config.qat_group_size)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_state_bytes(model, frozen_bytes: int) -> int:
    """Frozen weights plus the trainable parameters in fp32 with their gradients and AdamW's two moments."""
    return frozen_bytes + 16 * sum(p.numel() for p in model.parameters() if p.requires_grad)


def sft_batches(config, tokenizer, examples, seq_len, train_config, rank):
    """The SFT/distillation batch source over `examples` (rows from chat_data.sft_examples)."""
    return chat_data.chat_batches(examples, train_config.batch_size, seq_len, tokenizer.eos_id,
                                  packing=config.packing, seed=train_config.seed, rank=rank.rank,
                                  world_size=rank.world_size)


# ----------------------------------------------------------------------------------------------------------
# Evaluation

class Evaluator:
    """Held-out assistant-token loss, multiple-choice accuracy, preference accuracy and task pass@k of a model."""

    def __init__(self, tokenizer, datasets: Datasets, seq_len: int, batch_size: int, autocast, progress: bool,
                 config: FinetuneConfig):
        """With `progress`, a full evaluation shows progress bars (it takes a while on a CPU)."""
        self.tokenizer, self.datasets, self.seq_len, self.batch_size = tokenizer, datasets, seq_len, batch_size
        self.autocast, self.progress = autocast, progress
        # Fixed seeds: every model is scored on the same sampling noise, so before and after compare closely.
        self.task_settings = dict(k=config.pass_k, temperature=config.temperature, max_tokens=config.max_new_tokens,
                                  seed=0)
        # Like the training rows, a held-out row cut before its answer has nothing to score: it is left out.
        self.heldout_rows, _, self.num_dropped = chat_data.sft_examples(tokenizer, datasets.heldout_conversations,
                                                                         seq_len)

    def heldout_loss(self, model, desc: str | None = None) -> dict:
        """{"heldout_loss": mean cross-entropy per assistant token} (the loop's periodic evaluation)."""
        if not self.heldout_rows:
            return {}
        with torch.no_grad(), self.autocast:
            return {"heldout_loss": chat_data.heldout_loss(model, self.heldout_rows, self.tokenizer.eos_id,
                                                           self.batch_size, desc)}

    def pair_scores(self, model, desc: str | None = None):
        """Summed log-probs of the held-out chosen and rejected replies, or None without pairs."""
        if not self.datasets.heldout_pairs:
            return None
        with self.autocast:
            return chat_data.preference_scores(model, self.tokenizer, self.datasets.heldout_pairs, self.seq_len,
                                               self.batch_size, desc)

    def __call__(self, model, name: str = "the model", reference=None) -> tuple[dict, tuple | None]:
        """All metrics of `model` (in eval mode), and the pair scores they came from; with a `reference`, the
        tasks' KL of the model to it."""
        def desc(part):
            return f"evaluating {name}: {part}" if self.progress else None
        was_training = model.training
        model.eval()
        metrics = self.heldout_loss(model, desc("held-out loss"))
        if self.datasets.questions:
            with self.autocast:
                accuracy = chat_data.multiple_choice_accuracy(model, self.tokenizer, self.datasets.questions,
                                                              self.seq_len, self.batch_size, desc("multiple choice"))
            metrics["multiple_choice_accuracy"] = accuracy["likelihood"]
            metrics["multiple_choice_accuracy_calibrated"] = accuracy["calibrated"]
        scores = self.pair_scores(model, desc("preferences"))
        if scores is not None:
            metrics["preference_accuracy"] = float((scores[0] > scores[1]).float().mean())
        if self.datasets.task_heldout:
            with self.autocast:
                metrics.update(evaluate.evaluate_tasks(model, self.tokenizer, self.datasets.task_heldout,
                                                       reference=reference, **self.task_settings))
        model.train(was_training)
        return metrics, scores


def print_comparison(before: dict, after: dict, extra: dict) -> None:
    """The evaluation table: one line per metric, before and after."""
    print(f"{'held-out metric':<28}{'before':>10}{'after':>10}")
    for name in after:
        print(f"{name:<28}{f'{before[name]:.4f}' if name in before else '-':>10}{after[name]:>10.4f}")
    for name, value in extra.items():
        print(f"{name:<28}{'':>10}{value:>10.4f}")


def peak_memory_mb(device) -> float:
    """Peak memory of this process: allocated GPU memory on CUDA, the resident set size on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------
# The run

def fitting_examples(config: FinetuneConfig, tokenizer, datasets: Datasets, seq_len: int, say) -> list:
    """The training rows (sft, distill) or pairs (dpo) that keep a token to learn within seq_len; examples longer than
    that are cut, those left with nothing to learn are dropped, and both counts are printed."""
    if config.mode == "dpo":
        kept, dropped = chat_data.pairs_that_fit(tokenizer, datasets.train_pairs, seq_len)
        what, total = "pairs", len(datasets.train_pairs)
        if dropped:
            say(f"{dropped} of {total} training pairs are cut before their chosen or rejected reply by --seq-len "
                f"{seq_len}: dropped")
    else:
        kept, cut, dropped = chat_data.sft_examples(tokenizer, datasets.train_conversations, seq_len)
        what, total = "conversations", len(datasets.train_conversations)
        if cut:
            say(f"{cut} of {total} training conversations do not fit in --seq-len {seq_len} tokens: cut to fit, "
                f"and {dropped} of them, cut before any assistant token, dropped")
    if not kept:
        raise ValueError(f"none of the {total} training {what} from {config.data} keeps an assistant token within "
                         f"--seq-len {seq_len}: shorten the prompts, or use a model with a longer context")
    return kept


def main(argv=None) -> int:
    """Check the arguments and data, load the models, evaluate, train, evaluate again, save."""
    run_start = time.time()
    args = parse_args(argv)
    config = dataclass_from_args(FinetuneConfig, args)
    train_config = dataclass_from_args(TrainConfig, args)
    parallel = dataclass_from_args(ParallelConfig, args)
    check_arguments(config)
    check_low_precision(config, parallel)
    if parallel.tp > 1 or parallel.pp > 1:  # its objectives read whole logits, its evaluation generates
        raise SettingsError(f"finetune.py runs data-parallel only (--strategy ddp|fsdp), not --tp {parallel.tp} "
                            f"--pp {parallel.pp}: tensor and pipeline parallelism are for train.py")
    if config.mode == "grpo" and parallel.strategy == "fsdp":
        raise SettingsError("--mode grpo samples with each rank's whole model, which FSDP shards: use --strategy ddp")
    datasets = load_datasets(config)  # every line of a --data file is checked before any model loads
    out_dir = Path(train_config.out_dir or f"out/{config.mode}")
    rank = distributed.setup(resolve_device(train_config.device), parallel)
    say = print if rank.is_main else (lambda *a, **k: None)
    device = rank.device
    torch.manual_seed(train_config.seed)

    init = checkpoint.load_checkpoint(config.init, device)
    model, tokenizer, model_config = init["model"], init["tokenizer"], init["config"]
    stop_at_end_of_turn(tokenizer, init["directory"], say)
    teacher = (load_teacher(config.teacher, tokenizer, device, init["directory"] / "tokenizer.json")
               if config.mode == "distill" else None)
    seq_len = config.seq_len or model_config.max_seq_len
    if not 1 <= seq_len <= model_config.max_seq_len:
        raise ValueError(f"--seq-len {seq_len} must be in 1..{model_config.max_seq_len} (the model's max_seq_len)")
    if config.pairs_from_task:
        pairs_wanted = train_config.steps * train_config.batch_size * train_config.grad_accum * rank.world_size
        datasets.train_pairs = on_policy_pairs(model, tokenizer, datasets.train_problems, config, pairs_wanted, say)
    source = config.task or config.pairs_from_task or config.data
    train_size = len(datasets.train_pairs if config.mode == "dpo" else datasets.train_conversations)
    say(f"data: {train_size:,} training {'pairs' if config.mode == 'dpo' else 'conversations'} from {source}; "
        f"held out: {len(datasets.heldout_conversations)} conversations, {len(datasets.questions)} questions, "
        f"{len(datasets.heldout_pairs)} pairs")
    # GRPO writes its own completions: it trains on no fixed rows.
    train_examples = fitting_examples(config, tokenizer, datasets, seq_len, say) if config.mode != "grpo" else []
    evaluator = Evaluator(tokenizer, datasets, seq_len, train_config.batch_size,
                          autocast_context(train_config.dtype, device), progress=rank.is_main, config=config)
    if evaluator.num_dropped:
        say(f"{evaluator.num_dropped} held-out conversations are cut before any assistant token by --seq-len "
            f"{seq_len}: left out of the held-out loss")
    before, before_scores = evaluator(model, "the initial model")

    total_params, bf16_base_bytes = model.num_params(), quant.weight_bytes(model)
    if config.base_quant:
        quant4.quantize_base_nf4(model)  # QLoRA: the frozen base in NF4 (the reference below too)
    # The reference of DPO and GRPO is the model as it starts; a copy is taken before LoRA changes the module tree.
    keeps_reference = config.mode == "grpo" or (config.mode == "dpo" and not config.dpo_precompute_reference)
    reference = copy.deepcopy(model) if keeps_reference else None
    base_bytes = quant.weight_bytes(model)
    trainable = prepare_model(model, config)
    lora_settings = lora.lora_config(model) if config.lora_rank else None
    if not train_config.lr:
        train_config.lr = finetune_learning_rate(model_config, config.mode, config.lora_rank)
    say(f"{config.mode}: {'LoRA ' + str(lora_settings) if lora_settings else 'full fine-tuning'}; "
        f"{trainable:,} trainable parameters of {total_params:,} ({trainable / total_params:.2%}); "
        f"lr {train_config.lr:.2e}; {train_config.steps} steps; device {device} x {rank.world_size}")

    if config.mode == "dpo":
        rows = chat_data.preference_rows(tokenizer, train_examples, seq_len)
        if config.dpo_precompute_reference:
            # Before training the model (with zero LoRA updates) is the reference, so it scores the pairs itself.
            rows = objectives.precompute_reference(model, rows, train_config.batch_size)
        batches = chat_data.preference_batches(rows, train_config.batch_size, seed=train_config.seed,
                                               rank=rank.rank, world_size=rank.world_size)
        objective = objectives.dpo(reference, config.dpo_beta, config.dpo_nll_weight)
    elif config.mode == "grpo":
        batches, objective = grpo_setup(model, tokenizer, reference, datasets.train_problems, config, train_config,
                                        rank)
    else:
        batches = sft_batches(config, tokenizer, train_examples, seq_len, train_config, rank)
        objective = (objectives.distillation(teacher, config.kd_temperature, config.kd_alpha, config.kd_kind)
                     if teacher is not None else objectives.sft)

    identity = lora.checkpoint_identity(config.init)
    record = {"mode": config.mode, "finetune": {"init": identity, "data": config.data, "lora": lora_settings,
                                                 "lora_merged": bool(lora_settings) and config.merge_lora,
                                                 "base_quant": config.base_quant or None, "qat": config.qat or None}}
    # Checkpoints of LoRA and QAT runs hold more than a plain model (adapters, fake quantizers): kept apart.
    run_dir = out_dir / "lora_run" if config.lora_rank else out_dir / "qat_run" if config.qat else out_dir
    start = time.time()
    train(model, objective, batches, replace(train_config, out_dir=str(run_dir)), model_config=model_config,
          tokenizer=tokenizer, evaluate=evaluator.heldout_loss, extra_config=record, parallel=parallel, rank=rank)
    train_seconds = time.time() - start
    after, after_scores = evaluator(model, "the fine-tuned model", reference)

    report = {"mode": config.mode, "init": identity["checkpoint"], "steps": train_config.steps,
              "trainable_params": trainable, "total_params": total_params, "lora": lora_settings,
              "lr": train_config.lr, "train_seconds": train_seconds,
              "step_seconds": train_seconds / max(1, train_config.steps), "peak_memory_mb": peak_memory_mb(device),
              "config": asdict(config), "before": before, "after": after}
    if lora_settings:  # floats counted at bf16: the QLoRA base against the same LoRA on a bf16 base
        report["memory_bytes"] = {
            "frozen_base": base_bytes, "training_state": training_state_bytes(model, base_bytes),
            "bf16_lora_frozen_base": bf16_base_bytes,
            "bf16_lora_training_state": training_state_bytes(model, bf16_base_bytes)}
    extra = {}
    if config.mode == "dpo" and after_scores is not None:
        # Implicit rewards beta * (policy - reference): the reference's scores are the "before" ones.
        margin = (after_scores[0] - before_scores[0]) - (after_scores[1] - before_scores[1])
        extra["dpo_reward_accuracy"] = float((margin > 0).float().mean())
    if teacher is not None:
        extra.update({f"teacher_{name}": value for name, value in evaluator(teacher, "the teacher")[0].items()})
        if config.kd_baseline:
            extra["no_teacher_heldout_loss"] = train_baseline(config, train_config, parallel, rank, train_examples,
                                                              seq_len, evaluator, out_dir)
    report.update(extra)

    lora.dequantize_bases(model)  # QLoRA: the adapter is merged into the dequantized NF4 base
    qat_settings = qat.remove_qat(model) if config.qat else None
    weights = distributed.full_model_state(model)  # a collective under FSDP: every rank takes part
    if rank.is_main and lora_settings:
        lora.save_adapter(out_dir / "adapter", weights, lora_settings, base=identity)
        if config.merge_lora:
            merged = lora.merge_state_dict(weights, lora_settings["alpha"] / lora_settings["rank"])
            checkpoint.save_run_checkpoint(out_dir, train_config.steps, train_config.keep, weights=merged,
                                           config=model_config, tokenizer=tokenizer, extra_config=record)
    if rank.is_main and qat_settings:
        checkpoint.save_run_checkpoint(out_dir, train_config.steps, train_config.keep, weights=weights,
                                       config=model_config, tokenizer=tokenizer, extra_config=record)
        quantized = qat.quantize_trained(model, qat_settings)
        quant.save_quantized(quantized, tokenizer, out_dir / "quantized", source=str(out_dir))
    if rank.is_main:
        write_json(out_dir / "eval.json", report)
        print_comparison(before, after, extra)
        where = checkpoint.resolve_checkpoint(out_dir) if (out_dir / "latest").exists() else out_dir / "adapter"
        say(f"done in {time.time() - run_start:.0f}s ({train_seconds:.0f}s of it training); model in {where}; "
            f"evaluation in {out_dir / 'eval.json'}")
    distributed.teardown()
    return 0


def on_policy_pairs(model, tokenizer, train_problems, config: FinetuneConfig, wanted: int, say) -> list:
    """DPO pairs from the model's own samples: for each training problem, --group-size completions, and the
    first rewarded one (chosen) with the first unrewarded one (rejected); where none is rewarded, the reference
    answer is the chosen reply, and a problem whose samples are all right gives no pair. Stops at `wanted` pairs."""
    pairs, sampled, reference_chosen = [], 0, 0
    while sampled < len(train_problems) and len(pairs) < wanted:
        # Most problems give a pair: sample about as many as are still wanted, in batches the engine runs well.
        start = sampled
        group = train_problems[start:start + min(256, max(16, wanted - len(pairs)))]
        prompts = evaluate.prompt_ids(tokenizer, [p for _, p in group])
        engine = evaluate.task_engine(model, tokenizer, prompts, config.max_new_tokens)
        seeds = [start * config.group_size + i for i in range(len(group) * config.group_size)]
        outputs = objectives.rollouts(engine, prompts, config.group_size, temperature=config.temperature,
                                      max_tokens=config.max_new_tokens, seeds=seeds)
        for i, (task, problem) in enumerate(group):
            texts = [out.text for out in outputs[i * config.group_size:(i + 1) * config.group_size]]
            rewards = [tasks.reward(task, problem, text) for text in texts]
            if min(rewards) == 1.0:
                continue
            if max(rewards) < 1.0:
                texts, rewards = [problem.answer, *texts], [1.0, *rewards]
                reference_chosen += 1
            pairs.append(chat_data.PreferenceExample(problem.messages(), texts[rewards.index(max(rewards))],
                                                     texts[rewards.index(min(rewards))]))
        sampled += len(group)
    say(f"on-policy pairs: {len(pairs):,} from {sampled:,} problems x {config.group_size} samples; the chosen reply "
        f"is a sample in {len(pairs) - reference_chosen:,}, the reference answer in {reference_chosen:,} (no sample "
        f"right); problems whose samples were all right give none")
    if not pairs:
        raise ValueError(f"every sample of the --init model was right on the {sampled} problems of "
                         f"{config.pairs_from_task!r} it tried: there is nothing to prefer; raise --digits")
    return pairs[:wanted]


def grpo_setup(model, tokenizer, reference, train_problems, config: FinetuneConfig, train_config, rank):
    """GRPO's batch source (training problem indices, shuffled and sharded like every other source) and objective,
    whose rollouts run on an Engine over `model` itself."""
    prompts = evaluate.prompt_ids(tokenizer, [p for _, p in train_problems])
    engine = evaluate.task_engine(model, tokenizer, prompts, config.max_new_tokens,
                                  max_num_seqs=train_config.batch_size * config.group_size)

    def reward(index: int, completion: str) -> float:
        task, problem = train_problems[index]
        return tasks.reward(task, problem, completion)

    batches = chat_data.ExampleBatches(
        len(prompts), train_config.batch_size, lambda rows: {"prompt_index": torch.tensor([r[0] for r in rows])},
        seed=train_config.seed, rank=rank.rank, world_size=rank.world_size,
        fingerprint=f"grpo:{chat_data.content_digest(json.dumps(prompts))}")
    objective = objectives.grpo(engine, prompts, reward, reference, config.group_size, config.grpo_clip,
                                config.grpo_kl_beta, config.temperature, config.max_new_tokens)
    return batches, objective


def train_baseline(config, train_config, parallel, rank, examples, seq_len, evaluator, out_dir) -> float:
    """Distillation's control: the same student, data, steps and LoRA, trained with plain SFT; its held-out loss."""
    student = checkpoint.load_checkpoint(config.init, rank.device)
    model, tokenizer = student["model"], student["tokenizer"]
    stop_at_end_of_turn(tokenizer, config.init, lambda *args: None)  # main() said so already
    if config.base_quant:
        quant4.quantize_base_nf4(model)
    prepare_model(model, config)
    batches = sft_batches(config, tokenizer, examples, seq_len, train_config, rank)
    train(model, objectives.sft, batches, replace(train_config, out_dir=str(out_dir / "baseline")),
          model_config=student["config"], tokenizer=tokenizer, extra_config={"mode": "sft"}, parallel=parallel,
          rank=rank)
    return evaluator(model, "the no-teacher baseline")[0]["heldout_loss"]


if __name__ == "__main__":
    run(main)

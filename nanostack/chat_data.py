"""Post-training data: chat conversations, preference pairs, a multiple-choice test, and their batch sources.

The default data needs no download. Every public function, class and method of the running interpreter's
standard library that has a docstring becomes one question and answer:

    user:       What does `json.dumps` do?
    assistant:  Serialize ``obj`` to a JSON formatted ``str``.     (the docstring's first paragraph)

The source files are parsed with `ast`, never imported, so this is safe and deterministic for a given
Python. Examples are split into train and held-out by a hash of their top-level module name (`json`,
`os`, ...), so no module contributes to both sides and the held-out score measures what the model learned
about answering, not what it memorised about one module. From the same entries come
- preference pairs (DPO): chosen = the right docstring, rejected = another function's;
- a 4-way multiple-choice test: a held-out question, its answer and three other answers, scored by the
  mean log-likelihood per token of each answer under the model.

Other data comes as JSON lines: {"messages": [{"role", "content"}, ...]} for SFT (OpenAI's chat format),
{"prompt", "chosen", "rejected"} for DPO (prompt is a string or a list of messages).

Everything is rendered with `Tokenizer.render_chat`, the tokenizer's chat template (nanostack's own, or a
Hugging Face checkpoint's Jinja template): a model only learns where the template's loss mask is 1 (each
assistant reply and its end-of-turn token); other targets are -1. `ExampleBatches` serves
shuffled batches of examples with the same guarantees as the pretraining loader (data.BatchLoader): seeded,
sharded over ranks with no overlap, resumable exactly from a small state dict. With packing, several
conversations share one row and `doc_ids` keeps attention and positions inside each.
"""
import ast
import functools
import hashlib
import inspect
import json
import os
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from nanostack.data import jsonl_records
from nanostack.objectives import sequence_logprobs

# Standard-library directories that are tests, demos or vendored tools rather than the library itself.
SKIP_DIRS = frozenset({"test", "tests", "idlelib", "lib2to3", "turtledemo", "ensurepip", "site-packages",
                       "dist-packages", "__pycache__"})
MIN_ANSWER_CHARS, MAX_ANSWER_CHARS = 16, 400  # drop stub docstrings ("Foo.") and whole essays
HELDOUT_FRACTION = 0.1
MAX_EMPTY_EPOCHS = 100
NEUTRAL_QUESTION = "What does this do?"  # the content-free question that calibrates multiple-choice scores


# ----------------------------------------------------------------------------------------------------------
# Standard-library docstrings -> question/answer entries

@dataclass(frozen=True)
class DocEntry:
    """One documented public name: `name` is qualified ("json.dumps"), `kind` function | class | method."""
    module: str
    name: str
    kind: str
    answer: str


def stdlib_module_files() -> dict[str, Path]:
    """Public standard-library modules by dotted name ("json.decoder") -> source file, sorted by name."""
    root = Path(sysconfig.get_paths()["stdlib"])
    modules = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "_", "config-"))]
        package = Path(dirpath).relative_to(root).parts
        for filename in filenames:
            if not filename.endswith(".py") or (filename.startswith("_") and filename != "__init__.py"):
                continue
            parts = package if filename == "__init__.py" else (*package, filename[:-3])
            if parts:
                modules[".".join(parts)] = Path(dirpath, filename)
    return dict(sorted(modules.items()))


def first_paragraph(docstring: str) -> str:
    """The first paragraph of a docstring on one line (indentation and line breaks collapsed)."""
    return " ".join(inspect.cleandoc(docstring).split("\n\n")[0].split())


def _literal_all(tree: ast.Module) -> set[str] | None:
    """The names in a module's `__all__ = [...]` when it is a plain literal, else None."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            try:
                return set(ast.literal_eval(node.value))
            except ValueError:
                return None
    return None


def module_entries(module: str, source: str | bytes) -> list[DocEntry]:
    """The documented public functions, classes and class methods of one module's source, in source order."""
    tree = ast.parse(source)
    exported = _literal_all(tree)
    entries = []

    def add(node, name, kind):
        docstring = ast.get_docstring(node)
        if docstring:
            answer = first_paragraph(docstring)
            if MIN_ANSWER_CHARS <= len(answer) <= MAX_ANSWER_CHARS:
                entries.append(DocEntry(module, f"{module}.{name}", kind, answer))

    functions = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if not isinstance(node, (*functions, ast.ClassDef)) or node.name.startswith("_"):
            continue
        if exported is not None and node.name not in exported:
            continue
        add(node, node.name, "class" if isinstance(node, ast.ClassDef) else "function")
        if isinstance(node, ast.ClassDef):
            for method in node.body:
                if isinstance(method, functions) and not method.name.startswith("_"):
                    add(method, f"{node.name}.{method.name}", "method")
    return entries


@functools.lru_cache(maxsize=4)
def stdlib_docstrings(modules: tuple[str, ...] | None = None) -> tuple[DocEntry, ...]:
    """Entries of every public stdlib module (or only `modules`), sorted; each answer text kept once.

    Answers are deduplicated (first name in sorted order wins) so that a multiple-choice question never
    offers two identical answers and a rejected response is never the chosen one in disguise.
    """
    files = stdlib_module_files()
    if modules is not None:
        unknown = sorted(set(modules) - set(files))
        if unknown:
            raise ValueError(f"not public standard-library modules: {unknown}")
        files = {m: files[m] for m in modules}
    entries, seen = [], set()
    for module, path in sorted(files.items()):
        try:
            found = module_entries(module, path.read_bytes())
        except SyntaxError:  # a few stdlib files target other Python versions; skip rather than fail
            continue
        for entry in found:
            if entry.answer not in seen:
                seen.add(entry.answer)
                entries.append(entry)
    return tuple(entries)


def question(entry: DocEntry) -> str:
    """The user's question about an entry."""
    return f"What is `{entry.name}`?" if entry.kind == "class" else f"What does `{entry.name}` do?"


def chat_messages(entry: DocEntry) -> list[dict]:
    """One conversation: the question, and the first paragraph of the docstring as the answer."""
    return [{"role": "user", "content": question(entry)}, {"role": "assistant", "content": entry.answer}]


def stable_hash(text: str) -> int:
    """A 64-bit hash of a string that is the same in every process and run (unlike hash())."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def content_digest(data: str | bytes) -> str:
    """A short sha256 of the data a batch source serves, so a resume with other data is caught."""
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()[:16]


def is_heldout(key: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether `key` falls in the held-out share: a hash of the key, so order and run never matter."""
    return stable_hash(key) < fraction * 2**64


def split_by_module(entries, fraction: float = HELDOUT_FRACTION) -> tuple[list[DocEntry], list[DocEntry]]:
    """(train, held-out) entries, split on the hash of the top-level module, so `os` and `os.path` stay together."""
    train, heldout = [], []
    for entry in entries:
        (heldout if is_heldout(entry.module.split(".")[0], fraction) else train).append(entry)
    return train, heldout


def _other_indices(key: str, num_items: int, exclude: int, count: int) -> list[int]:
    """`count` distinct indices in range(num_items) other than `exclude`, chosen by a hash of `key`."""
    if num_items - 1 < count:
        raise ValueError(f"need at least {count + 1} entries to draw {count} others, got {num_items}")
    others = random.Random(stable_hash(key)).sample(range(num_items - 1), count)
    return [i + (i >= exclude) for i in others]  # skip over `exclude`


@dataclass
class PreferenceExample:
    """A prompt (list of messages) and two candidate assistant replies, the better one first."""
    prompt: list[dict]
    chosen: str
    rejected: str


def preference_examples(entries) -> list[PreferenceExample]:
    """One pair per entry: chosen = its own docstring, rejected = another entry's (fixed per entry)."""
    entries = list(entries)
    pairs = []
    for i, entry in enumerate(entries):
        other = entries[_other_indices("rejected:" + entry.name, len(entries), i, 1)[0]]
        pairs.append(PreferenceExample([{"role": "user", "content": question(entry)}], entry.answer, other.answer))
    return pairs


@dataclass
class MultipleChoice:
    """A question, candidate answers, and the index of the right one."""
    question: str
    choices: list[str]
    answer: int


def multiple_choice_questions(entries, num_choices: int = 4) -> list[MultipleChoice]:
    """One question per entry: its answer and num_choices - 1 other entries' answers, in a fixed shuffle."""
    entries = list(entries)
    questions = []
    for i, entry in enumerate(entries):
        choices = [entry.answer] + [entries[j].answer for j in
                                    _other_indices("choices:" + entry.name, len(entries), i, num_choices - 1)]
        order = random.Random(stable_hash("order:" + entry.name)).sample(range(num_choices), num_choices)
        questions.append(MultipleChoice(question(entry), [choices[k] for k in order], order.index(0)))
    return questions


# ----------------------------------------------------------------------------------------------------------
# JSON-lines readers

ROLES = ("system", "user", "assistant")  # the roles chat data may use (every chat template knows them)


def _check_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"{where}: expected a non-empty list of messages, got {str(messages)[:80]!r}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES \
                or not isinstance(message.get("content"), str):
            raise ValueError(f"{where}: message {i} must be {{\"role\": one of {list(ROLES)}, \"content\": a string}}, "
                             f"got {str(message)[:80]!r}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def _not_empty(items: list, path, expected: str) -> list:
    if not items:
        raise ValueError(f"{path} holds no JSON lines (it is empty, or blank lines only): expected one {expected} "
                         f"object per line")
    return items


def read_chat_jsonl(path) -> list[list[dict]]:
    """Conversations from a jsonl file of {"messages": [...]}; each needs at least one assistant message."""
    conversations = []
    for line_number, record in jsonl_records(path):
        messages = _check_messages(record.get("messages"), f"{path}:{line_number}")
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError(f"{path}:{line_number}: no assistant message, so nothing to train on")
        conversations.append(messages)
    return _not_empty(conversations, path, '{"messages": [...]}')


def _response_text(value, where: str) -> str:
    """A reply given as a string, or as a list of messages whose last one is the assistant's."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and _check_messages(value, where)[-1]["role"] == "assistant":
        return value[-1]["content"]
    raise ValueError(f"{where}: expected a string or messages ending with an assistant message, "
                     f"got {str(value)[:80]!r}")


def read_preference_jsonl(path) -> list[PreferenceExample]:
    """Preference pairs from a jsonl file of {"prompt": str or messages, "chosen": ..., "rejected": ...}."""
    pairs = []
    for line_number, record in jsonl_records(path):
        where = f"{path}:{line_number}"
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise ValueError(f"{where}: missing {missing}; expected prompt, chosen and rejected")
        prompt = record["prompt"]
        if isinstance(prompt, str):
            prompt = [{"role": "user", "content": prompt}]
        prompt = _check_messages(prompt, where)
        pairs.append(PreferenceExample(prompt, _response_text(record["chosen"], f"{where}: chosen"),
                                       _response_text(record["rejected"], f"{where}: rejected")))
    return _not_empty(pairs, path, '{"prompt", "chosen", "rejected"}')


# ----------------------------------------------------------------------------------------------------------
# Token rows: (inputs, targets) with targets -1 wherever nothing is learned

def _rows(ids: list[int], mask: list[int], seq_len: int) -> tuple[list[int], list[int]]:
    """inputs and targets (each <= seq_len) of rendered ids: targets = next ids where the mask is 1, else -1."""
    ids, mask = ids[:seq_len + 1], mask[:seq_len + 1]
    return ids[:-1], [token if trained else -1 for token, trained in zip(ids[1:], mask[1:])]


def sft_example(tokenizer, messages: list[dict], seq_len: int) -> tuple[list[int], list[int]]:
    """inputs and targets (each <= seq_len) of a conversation: targets = next ids where the template's mask
    is 1, else -1. Longer conversations are cut at seq_len + 1 tokens."""
    return _rows(*tokenizer.render_chat(messages), seq_len)


def has_targets(row: tuple[list[int], list[int]]) -> bool:
    """Whether an (inputs, targets) row trains anything: a row cut before its first assistant token does not, and
    a batch of only such rows has no loss at all (0 / 0 = NaN)."""
    return any(target != -1 for target in row[1])


def sft_examples(tokenizer, conversations: list[list[dict]], seq_len: int) -> tuple[list, int, int]:
    """(rows, how many conversations were longer than seq_len + 1 tokens and cut, how many of those were dropped
    because the cut left them no assistant token). Cut conversations keep their beginning, as sft_example does."""
    rows, num_cut = [], 0
    for messages in conversations:
        ids, mask = tokenizer.render_chat(messages)
        num_cut += len(ids) > seq_len + 1
        rows.append(_rows(ids, mask, seq_len))
    kept = [row for row in rows if has_targets(row)]
    return kept, num_cut, len(rows) - len(kept)


def pairs_that_fit(tokenizer, pairs: list[PreferenceExample], seq_len: int) -> tuple[list[PreferenceExample], int]:
    """The pairs whose chosen and rejected replies both keep a token within seq_len (a pair cut before either
    reply compares nothing), and how many were dropped."""
    kept = [pair for pair in pairs if has_targets(response_example(tokenizer, pair.prompt, pair.chosen, seq_len))
            and has_targets(response_example(tokenizer, pair.prompt, pair.rejected, seq_len))]
    return kept, len(pairs) - len(kept)


def response_example(tokenizer, prompt: list[dict], response: str, seq_len: int) -> tuple[list[int], list[int]]:
    """Like sft_example for prompt + one assistant reply, but only that last reply has targets."""
    ids, mask = tokenizer.render_chat([*prompt, {"role": "assistant", "content": response}])
    # The reply is the mask's last run of 1s; it need not start where the generation prompt ends (a template's
    # prompt may end in text that rendered replies drop, like "<think>\n").
    start = max((i for i, trained in enumerate(mask) if trained), default=len(mask))
    while start > 0 and mask[start - 1]:
        start -= 1
    return _rows(ids, [0] * start + mask[start:], seq_len)


def pad_rows(rows: list[tuple[list[int], list[int]]], pad_id: int, length: int | None = None):
    """(inputs, targets) lists -> (B, length) tensors; length defaults to the longest row. Pads target -1."""
    length = length or max(len(inputs) for inputs, _ in rows)
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), length), -1, dtype=torch.long)
    for b, (row_inputs, row_targets) in enumerate(rows):
        inputs[b, :len(row_inputs)] = torch.tensor(row_inputs, dtype=torch.long)
        targets[b, :len(row_targets)] = torch.tensor(row_targets, dtype=torch.long)
    return inputs, targets


def preference_rows(tokenizer, examples: list[PreferenceExample], seq_len: int) -> dict[str, torch.Tensor]:
    """Chosen and rejected rows of every pair: "chosen_inputs", "chosen_targets", "rejected_inputs",
    "rejected_targets", each (N, seq_len), targets only on the reply."""
    chosen = [response_example(tokenizer, e.prompt, e.chosen, seq_len) for e in examples]
    rejected = [response_example(tokenizer, e.prompt, e.rejected, seq_len) for e in examples]
    chosen_inputs, chosen_targets = pad_rows(chosen, tokenizer.eos_id, seq_len)
    rejected_inputs, rejected_targets = pad_rows(rejected, tokenizer.eos_id, seq_len)
    return {"chosen_inputs": chosen_inputs, "chosen_targets": chosen_targets,
            "rejected_inputs": rejected_inputs, "rejected_targets": rejected_targets}


def pack(lengths: list[int], order, seq_len: int) -> list[list[int]]:
    """Greedy packing in `order`: each example joins the current row if it fits, else starts the next row."""
    rows, current, used = [], [], 0
    for index in order:
        if current and used + lengths[index] > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(int(index))
        used += lengths[index]
    if current:
        rows.append(current)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Batch sources (the loop's protocol: next_batch, state_dict, load_state_dict)

class ExampleBatches:
    """Shuffled batches of examples, sharded over data-parallel ranks, resumable exactly.

    Each epoch orders the examples by a permutation seeded with (seed, epoch), optionally groups them into
    packed rows (`group(order) -> list of lists of indices`; default one example per row), and serves the
    rows in that order: global step s takes rows [s*B*world, (s+1)*B*world) and rank r the r-th B of them,
    so ranks never overlap. Rows left over at an epoch's end (fewer than B*world) wait for the next epoch's
    shuffle. `collate(list of row index lists) -> batch` builds the tensors.
    """

    def __init__(self, num_examples: int, batch_size: int, collate: Callable, *, group: Callable | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, fingerprint: str = ""):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.num_examples, self.batch_size, self.collate = num_examples, batch_size, collate
        self.group = group or (lambda order: [[int(i)] for i in order])
        self.seed, self.rank, self.world_size, self.fingerprint = seed, rank, world_size, fingerprint
        self.epoch, self.step = 0, 0  # the position of the *next* batch
        self._rows, self._rows_epoch = [], -1
        if self.steps_in_epoch() == 0:
            raise ValueError(f"{num_examples} examples make {len(self._epoch_rows())} rows, fewer than one global "
                             f"batch of {batch_size} x {world_size} ranks: lower --batch-size or add data")

    def _epoch_rows(self) -> list[list[int]]:
        if self._rows_epoch != self.epoch:
            # Seeded by (seed, epoch), not a running generator, so load_state_dict can jump to any epoch.
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
            self._rows, self._rows_epoch = self.group(order), self.epoch
        return self._rows

    def steps_in_epoch(self) -> int:
        """Global steps in the current epoch (packing can change the number of rows from epoch to epoch)."""
        return len(self._epoch_rows()) // (self.batch_size * self.world_size)

    def next_batch(self):
        """This rank's next batch; epochs roll over."""
        first = self.step * self.batch_size * self.world_size + self.rank * self.batch_size
        batch = self.collate(self._epoch_rows()[first:first + self.batch_size])
        self.step += 1
        if self.step == self.steps_in_epoch():
            self.epoch, self.step = self.epoch + 1, 0
            # Packing may leave an epoch with less than one global batch when the data barely fills one.
            for _ in range(MAX_EMPTY_EPOCHS):
                if self.steps_in_epoch():
                    break
                self.epoch += 1
            else:
                raise ValueError(f"{MAX_EMPTY_EPOCHS} epochs in a row packed into less than one global batch")
        return batch

    def state_dict(self) -> dict:
        """The position and the settings it depends on, JSON-serialisable."""
        return {"epoch": self.epoch, "step": self.step, "seed": self.seed, "num_examples": self.num_examples,
                "global_batch": self.batch_size * self.world_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the data and settings must match the ones it was saved with."""
        for key in ("seed", "num_examples", "global_batch", "fingerprint"):
            if state.get(key) != self.state_dict()[key]:
                raise ValueError(f"batch source state has {key}={state.get(key)!r}, but this one has "
                                 f"{self.state_dict()[key]!r}; resume with the data and settings of the saved run")
        self.epoch, self.step = state["epoch"], 0
        if not 0 <= state["step"] < self.steps_in_epoch():
            raise ValueError(f"batch source state at step {state['step']} of an epoch of {self.steps_in_epoch()}")
        self.step = state["step"]


def chat_batches(examples: list[tuple[list[int], list[int]]], batch_size: int, seq_len: int, pad_id: int, *,
                 packing: bool = False, seed: int = 0, rank: int = 0, world_size: int = 1) -> ExampleBatches:
    """SFT batches {"inputs", "targets"} of (inputs, targets) examples (from sft_example).

    Unpacked, a row is one conversation, padded to the batch's longest. Packed, rows of seq_len hold as
    many conversations as fit, and "doc_ids" (B, seq_len) numbers them so attention stays inside each.
    """
    too_long = [i for i, (inputs, _) in enumerate(examples) if len(inputs) > seq_len]
    if too_long:
        raise ValueError(f"examples {too_long[:5]} are longer than seq_len={seq_len}: build them with that seq_len")

    def collate(rows):
        if not packing:
            inputs, targets = pad_rows([examples[group[0]] for group in rows], pad_id)
            return {"inputs": inputs, "targets": targets}
        packed, doc_ids = [], torch.full((len(rows), seq_len), -1, dtype=torch.long)  # (B, T)
        for b, group in enumerate(rows):
            row_inputs, row_targets, start = [], [], 0
            for doc, index in enumerate(group):
                inputs, targets = examples[index]
                row_inputs += inputs
                row_targets += targets
                doc_ids[b, start:start + len(inputs)] = doc
                start += len(inputs)
            doc_ids[b, start:] = len(group)  # the padding is a document of its own
            packed.append((row_inputs, row_targets))
        inputs, targets = pad_rows(packed, pad_id, seq_len)
        return {"inputs": inputs, "targets": targets, "doc_ids": doc_ids}

    lengths = [len(inputs) for inputs, _ in examples]
    group = (lambda order: pack(lengths, order, seq_len)) if packing else None
    return ExampleBatches(len(examples), batch_size, collate, group=group, seed=seed, rank=rank,
                          world_size=world_size, fingerprint=f"sft:packing={packing}:seq_len={seq_len}:"
                                                             f"{content_digest(json.dumps(examples))}")


def preference_batches(rows: dict[str, torch.Tensor], batch_size: int, *, seed: int = 0, rank: int = 0,
                       world_size: int = 1) -> ExampleBatches:
    """DPO batches: the `rows` (from preference_rows, maybe with precomputed reference log-probs) of each
    batch's pairs, cut to the last column any of them has a target in."""
    def collate(groups):
        index = torch.tensor([group[0] for group in groups])
        batch = {name: tensor[index] for name, tensor in rows.items()}
        used = torch.cat([batch["chosen_targets"], batch["rejected_targets"]]) != -1  # (2B, T)
        length = int(used.any(dim=0).nonzero().max()) + 1 if used.any() else 1
        return {name: tensor[:, :length] if tensor.dim() == 2 else tensor for name, tensor in batch.items()}

    # The digest covers the token rows, not precomputed reference log-probs (recomputed on resume, equal).
    tokens = b"".join(rows[k].numpy().tobytes() for k in ("chosen_inputs", "chosen_targets", "rejected_inputs",
                                                          "rejected_targets"))
    return ExampleBatches(len(rows["chosen_inputs"]), batch_size, collate, seed=seed, rank=rank,
                          world_size=world_size, fingerprint=f"dpo:seq_len={rows['chosen_inputs'].shape[1]}:"
                                                             f"{content_digest(tokens)}")


# ----------------------------------------------------------------------------------------------------------
# Evaluation

def _device(model) -> torch.device:
    return next(model.parameters()).device


def _batch_starts(num_rows: int, batch_size: int, desc: str | None):
    """range(0, num_rows, batch_size), with a progress bar named `desc` (none for None)."""
    return tqdm(range(0, num_rows, batch_size), desc=desc, disable=desc is None, leave=False, unit="batch")


@torch.no_grad()
def heldout_loss(model, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32,
                 desc: str | None = None) -> float:
    """Mean cross-entropy per assistant token over examples (token-weighted, one pass, no packing); a progress bar
    named `desc` unless it is None."""
    total, count = 0.0, 0
    for start in _batch_starts(len(examples), batch_size, desc):
        inputs, targets = pad_rows(examples[start:start + batch_size], pad_id)
        inputs, targets = inputs.to(_device(model)), targets.to(_device(model))
        logits = model(inputs)
        total += float(F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1, reduction="sum"))
        count += int((targets != -1).sum())
    if count == 0:
        raise ValueError("no assistant tokens to evaluate: the held-out examples are empty")
    return total / count


@torch.no_grad()
def response_scores(model, rows: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32,
                    desc: str | None = None) -> torch.Tensor:
    """Summed log-probability of each row's targets, (N,); a progress bar named `desc` unless it is None."""
    scores = []
    for start in _batch_starts(len(rows), batch_size, desc):
        inputs, targets = pad_rows(rows[start:start + batch_size], pad_id)
        scores.append(sequence_logprobs(model, inputs.to(_device(model)), targets.to(_device(model))).cpu())
    return torch.cat(scores)


def multiple_choice_accuracy(model, tokenizer, questions: list[MultipleChoice], seq_len: int,
                             batch_size: int = 32, desc: str | None = None) -> dict[str, float]:
    """Share of questions answered right, scored two ways: {"likelihood": ..., "calibrated": ...}.

    likelihood: the answer with the highest mean log-likelihood per token given the question (per token,
    so that an answer does not win just by being short). calibrated: the highest log p(answer | question)
    - log p(answer | NEUTRAL_QUESTION), how much the question itself raises the answer (domain-conditional
    PMI, Holtzman et al. 2021); plain likelihood mostly ranks how generic an answer sounds.
    """
    def rows(question, answers):
        return [response_example(tokenizer, [{"role": "user", "content": question}], a, seq_len) for a in answers]

    asked = [row for q in questions for row in rows(q.question, q.choices)]
    given = response_scores(model, asked, tokenizer.eos_id, batch_size, desc).view(len(questions), -1)  # (q, choices)
    counts = torch.tensor([sum(t != -1 for t in targets) for _, targets in asked]).view_as(given)
    # An answer's score under the neutral question does not depend on the question: score each text once.
    texts = sorted({choice for q in questions for choice in q.choices})
    neutral = dict(zip(texts, response_scores(model, rows(NEUTRAL_QUESTION, texts), tokenizer.eos_id, batch_size,
                                              desc and f"{desc} (calibration)")))
    baseline = torch.tensor([[float(neutral[c]) for c in q.choices] for q in questions], dtype=given.dtype)
    right = torch.tensor([q.answer for q in questions])
    return {"likelihood": float(((given / counts).argmax(dim=1) == right).float().mean()),
            "calibrated": float(((given - baseline).argmax(dim=1) == right).float().mean())}


@torch.no_grad()
def preference_scores(model, tokenizer, examples: list[PreferenceExample], seq_len: int,
                      batch_size: int = 32, desc: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probabilities of each pair's chosen and rejected replies, (N,) each.

    The share of pairs with chosen > rejected is the model's preference accuracy; the same scores under
    the reference model turn them into DPO's implicit rewards.
    """
    chosen = [response_example(tokenizer, e.prompt, e.chosen, seq_len) for e in examples]
    rejected = [response_example(tokenizer, e.prompt, e.rejected, seq_len) for e in examples]
    return (response_scores(model, chosen, tokenizer.eos_id, batch_size, desc and f"{desc} (chosen)"),
            response_scores(model, rejected, tokenizer.eos_id, batch_size, desc and f"{desc} (rejected)"))

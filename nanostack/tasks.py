"""Verifiable tasks: questions whose answers a program checks, so post-training is measured, not asserted.

Each task draws chat problems from a seeded generator, gives each a reference answer, and scores any completion
with `reward(task, problem, completion) -> 1.0 or 0.0`: whitespace is forgiven, the answer itself must be exact.

    addition        "What is 4 0 7 + 8 5 2?" -> "1 2 5 9"   two numbers of --digits digits (the difficulty dial)
    subtraction     "What is 8 5 2 - 4 0 7?" -> "4 4 5"     the larger first, so answers are never negative
    stdlib_module   "Which standard-library module defines `dedent`?" -> "textwrap"
                    names defined at the top level of exactly one public stdlib module, read with `ast` from the
                    pretraining corpus itself: held-out questions test what pretraining taught, SFT the format

Digits are written one apart from the next. A BPE tokenizer merges digit runs irregularly (on the stdlib "123" is
one token, "456" is "45" + "6"), so the same digit would be a different token in every number and a small model
could not learn carrying; written apart, every digit is its own token whatever the vocabulary.

Problems are split into train and held-out by a hash of what makes them the same problem (for addition the
unordered pair, so "2 + 3" and "3 + 2" fall on one side): no held-out problem is ever trained on, under any seed.
"""
import ast
import functools
import random
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable

from nanostack.chat_data import is_heldout, stdlib_module_files

HELDOUT_FRACTION = 0.1
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Problem:
    """One question, its reference answer, and the key the train/held-out split hashes."""
    question: str
    answer: str
    key: str

    def messages(self) -> list[dict]:
        """The chat prompt: the user's question."""
        return [{"role": "user", "content": self.question}]

    def conversation(self) -> list[dict]:
        """The question and the reference answer, as SFT trains on it."""
        return [*self.messages(), {"role": "assistant", "content": self.answer}]


@dataclass(frozen=True)
class Task:
    """A problem generator and its checker. `sample(rng)` draws any problem, train or held-out alike."""
    name: str
    sample: Callable[[random.Random], Problem]
    check: Callable[[Problem, str], bool]


def spaced_digits(number: int) -> str:
    """123 -> "1 2 3": one token per digit whatever the tokenizer merged."""
    return " ".join(str(number))


def exact_number(problem: Problem, completion: str) -> bool:
    """The completion is the answer's digits, with any whitespace between or around them."""
    return "".join(completion.split()) == problem.answer.replace(" ", "")


def arithmetic(name: str, digits: int) -> Task:
    """addition or subtraction of two numbers of `digits` digits (0..9 for one digit)."""
    if not 1 <= digits <= 12:
        raise ValueError(f"task {name!r}: digits must be in 1..12, got {digits}")
    symbol = {"addition": "+", "subtraction": "-"}[name]
    # Operands of one width put each digit at a fixed distance from the operator, which a small model finds.
    low = 10 ** (digits - 1) if digits > 1 else 0

    def sample(rng: random.Random) -> Problem:
        a, b = rng.randrange(low, 10 ** digits), rng.randrange(low, 10 ** digits)
        if name == "subtraction":
            a, b = max(a, b), min(a, b)
        result = a + b if name == "addition" else a - b
        # Addition commutes: both orders are one problem, so both land on the same side of the split.
        key = f"{min(a, b)}{symbol}{max(a, b)}" if name == "addition" else f"{a}{symbol}{b}"
        return Problem(f"What is {spaced_digits(a)} {symbol} {spaced_digits(b)}?", spaced_digits(result), key)

    return Task(name, sample, exact_number)


@functools.lru_cache(maxsize=1)
def unique_stdlib_names() -> tuple[tuple[str, str], ...]:
    """(name, module) for every public top-level function or class that exactly one public stdlib module defines."""
    modules_of = defaultdict(set)
    for module, path in stdlib_module_files().items():
        try:
            tree = ast.parse(path.read_bytes())
        except SyntaxError:  # a few stdlib files target other Python versions
            continue
        for node in tree.body:
            defines = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
            if defines and not node.name.startswith("_"):
                modules_of[node.name].add(module)
    return tuple(sorted((name, modules.pop()) for name, modules in modules_of.items() if len(modules) == 1))


def exact_module(problem: Problem, completion: str) -> bool:
    """The completion is the module's dotted name, optionally in backticks, with whitespace around it."""
    return completion.strip().strip("`").strip() == problem.answer


def stdlib_module() -> Task:
    """Which standard-library module defines a name: knowledge from the pretraining corpus."""
    names = unique_stdlib_names()

    def sample(rng: random.Random) -> Problem:
        name, module = names[rng.randrange(len(names))]
        return Problem(f"Which standard-library module defines `{name}`?", module, name)

    return Task("stdlib_module", sample, exact_module)


TASKS = {"addition": lambda digits: arithmetic("addition", digits),
         "subtraction": lambda digits: arithmetic("subtraction", digits),
         "stdlib_module": lambda digits: stdlib_module()}


def get_task(name: str, digits: int = 3) -> Task:
    """The task called `name`; `digits` sets the arithmetic tasks' operand size."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](digits)


def parse_tasks(names: str, digits: int = 3) -> list[Task]:
    """Tasks from a comma list such as "addition,subtraction"."""
    tasks = [get_task(name.strip(), digits) for name in names.split(",") if name.strip()]
    if not tasks:
        raise ValueError(f"no task named in {names!r}; known tasks: {', '.join(TASKS)}")
    return tasks


def in_split(task: Task, problem: Problem, split: str, fraction: float = HELDOUT_FRACTION) -> bool:
    """Whether `problem` belongs to `split`; a hash of the task and the problem's key decides, nothing else."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return is_heldout(f"{task.name}:{problem.key}", fraction) == (split == "heldout")


def problems(task: Task, split: str, count: int, seed: int = 0, fraction: float = HELDOUT_FRACTION) -> list[Problem]:
    """`count` distinct problems (questions) of `split`, drawn in a fixed order for (task, split, seed); fewer when
    the split holds fewer (stdlib_module has a few hundred held-out names, 1-digit addition a few dozen sums)."""
    rng = random.Random(f"{task.name}:{split}:{seed}")
    found: dict[str, Problem] = {}
    misses = 0
    # A split with no new problems left would loop forever: it is taken as exhausted after many misses in a row.
    while len(found) < count and misses < 10 * count + 10_000:
        problem = task.sample(rng)
        if problem.question in found or not in_split(task, problem, split, fraction):
            misses += 1
        else:
            misses = 0
            found[problem.question] = problem
    return list(found.values())


def reward(task: Task, problem: Problem, completion: str) -> float:
    """1.0 when `completion` answers `problem`, else 0.0; a checker that fails names the task and the completion."""
    try:
        return float(task.check(problem, completion))
    except Exception as error:
        raise ValueError(f"task {task.name!r}: the reward raised {type(error).__name__}: {error} on the completion "
                         f"{completion!r} to {problem.question!r}") from error

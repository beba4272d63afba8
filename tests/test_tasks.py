"""Verifiable tasks: each checker on hand-written right and wrong answers, the train/held-out split's disjointness
and stability, and bad input."""
import random

import pytest

from nanostack import tasks


def test_addition_checker_forgives_whitespace_and_nothing_else():
    task = tasks.get_task("addition", digits=2)
    sum_ = tasks.Problem("What is 4 7 + 8 5?", "1 3 2", "47+85")
    for right in ("1 3 2", "132", " 1 3 2\n", "13 2", "\t132 "):
        assert tasks.reward(task, sum_, right) == 1.0, right
    for wrong in ("1 3 1", "0132", "132.", "1 3 2 0", "", "one hundred thirty-two", "-132", "132 = 47 + 85"):
        assert tasks.reward(task, sum_, wrong) == 0.0, wrong


def test_subtraction_puts_the_larger_operand_first():
    task = tasks.get_task("subtraction", digits=3)
    draws = tasks.problems(task, "train", 200, seed=3)
    for p in draws:
        a, b = (int("".join(side.split())) for side in p.question[len("What is "):-1].split(" - "))
        assert a >= b and p.answer.replace(" ", "") == str(a - b)
    difference = tasks.Problem("What is 5 0 3 - 4 9 8?", "5", "503-498")
    assert tasks.reward(task, difference, "5") == 1.0 and tasks.reward(task, difference, "0 5") == 0.0
    assert tasks.reward(task, difference, "-5") == 0.0


def test_generated_sums_are_right():
    for p in tasks.problems(tasks.get_task("addition", digits=4), "train", 200):
        a, b = (int("".join(side.split())) for side in p.question[len("What is "):-1].split(" + "))
        assert p.answer.replace(" ", "") == str(a + b) and tasks.reward(tasks.get_task("addition"), p, p.answer) == 1
        assert 1000 <= min(a, b) and max(a, b) <= 9999  # operands of exactly --digits digits


def test_stdlib_module_names_are_read_from_the_corpus(monkeypatch):
    files = tasks.stdlib_module_files()
    # A few modules, not the whole library (parsing all of it takes seconds); quote is in shlex and urllib.parse.
    monkeypatch.setattr(tasks, "stdlib_module_files",
                        lambda: {m: files[m] for m in ("textwrap", "json", "shlex", "urllib.parse")})
    tasks.unique_stdlib_names.cache_clear()
    try:
        names = dict(tasks.unique_stdlib_names())
        task = tasks.get_task("stdlib_module")
        drawn = tasks.problems(task, "train", 10_000) + tasks.problems(task, "heldout", 10_000)
    finally:
        tasks.unique_stdlib_names.cache_clear()
    assert names["dedent"] == "textwrap" and names["urljoin"] == "urllib.parse" and "quote" not in names
    assert sorted(p.key for p in drawn) == sorted(names)  # every name is asked, on one side of the split
    assert all(p.answer == names[p.key] for p in drawn)
    asked = tasks.Problem("Which standard-library module defines `dedent`?", "textwrap", "dedent")
    for right in ("textwrap", " textwrap\n", "`textwrap`"):
        assert tasks.reward(task, asked, right) == 1.0, right
    for wrong in ("textwrap.dedent", "TextWrap", "string", "the textwrap module", ""):
        assert tasks.reward(task, asked, wrong) == 0.0, wrong


@pytest.mark.parametrize("name,digits", [("addition", 3), ("subtraction", 2), ("addition", 1)])
def test_train_and_heldout_never_share_a_problem_under_any_seed(name, digits):
    task = tasks.get_task(name, digits)
    heldout = tasks.problems(task, "heldout", 300)
    train = [p for seed in range(3) for p in tasks.problems(task, "train", 2000, seed)]
    assert not {p.key for p in heldout} & {p.key for p in train}
    assert len({p.question for p in heldout}) == len(heldout)  # distinct problems
    if name == "addition":  # a + b and b + a are one problem: no held-out sum is trained on in the other order
        flipped = {" + ".join(reversed(p.question[8:-1].split(" + "))) for p in train}
        assert not flipped & {p.question[8:-1] for p in heldout}


def test_the_split_depends_on_the_problem_alone():
    task = tasks.get_task("addition", 3)
    first, again = tasks.problems(task, "heldout", 200), tasks.problems(task, "heldout", 200)
    assert first == again  # the held-out set is fixed
    assert all(tasks.in_split(task, p, "heldout") for p in tasks.problems(task, "heldout", 50, seed=9))
    rng = random.Random(1)
    share = sum(tasks.in_split(task, task.sample(rng), "heldout") for _ in range(20_000)) / 20_000
    assert share == pytest.approx(tasks.HELDOUT_FRACTION, abs=0.01)


def test_a_small_split_gives_what_it_has():
    task = tasks.get_task("addition", 1)  # 100 sums of two digits: only a few are held out
    heldout = tasks.problems(task, "heldout", 300)
    assert 0 < len(heldout) < 25 and len(tasks.problems(task, "train", 300)) == 100 - len(heldout)


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown task 'multiplication'; known tasks: addition"):
        tasks.get_task("multiplication")
    with pytest.raises(ValueError, match="digits must be in 1..12, got 0"):
        tasks.get_task("addition", digits=0)
    with pytest.raises(ValueError, match="split must be one of"):
        tasks.problems(tasks.get_task("addition"), "test", 3)
    broken = tasks.Task("broken", tasks.get_task("addition").sample, lambda p, text: int(text) == 3)
    one = broken.sample(random.Random(0))
    with pytest.raises(ValueError, match=r"task 'broken': the reward raised ValueError.*'4 2\?' to 'What is"):
        tasks.reward(broken, one, "4 2?")

"""Chat and preference data: stdlib docstring Q&A, the split, jsonl readers, rows, batch sources, scoring."""
import hashlib
import inspect
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from nanostack import chat_data
from nanostack.model import GPT, ModelConfig
from nanostack.tokenizer import Tokenizer

MODULES = ("json", "json.decoder", "json.encoder", "textwrap", "shlex", "fnmatch", "glob", "bisect", "heapq",
           "colorsys", "string", "csv", "calendar", "fractions", "gettext")


@pytest.fixture(scope="module")
def entries():
    return chat_data.stdlib_docstrings(MODULES)


@pytest.fixture(scope="module")
def tokenizer(entries):
    return Tokenizer.train([" ".join(chat_data.question(e) + " " + e.answer for e in entries)], 400)


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32,
                           max_seq_len=512)).double()


# ----------------------------------------------------------------------------------------------------------
# Entries from the standard library

def test_question_and_answer_come_from_the_imported_functions_docstring(entries):
    import json
    by_name = {e.name: e for e in entries}
    dumps = by_name["json.dumps"]
    # A second path to the same text: the imported function's docstring, through inspect.
    expected = " ".join(inspect.getdoc(json.dumps).split("\n\n")[0].split())
    assert dumps.answer == expected and dumps.answer.startswith("Serialize ``obj``")
    assert chat_data.chat_messages(dumps) == [{"role": "user", "content": "What does `json.dumps` do?"},
                                              {"role": "assistant", "content": expected}]
    assert chat_data.question(by_name["json.decoder.JSONDecoder"]) == "What is `json.decoder.JSONDecoder`?"
    wrap = by_name["textwrap.TextWrapper.wrap"]
    assert wrap.kind == "method" and wrap.answer == " ".join(
        inspect.getdoc(textwrap.TextWrapper.wrap).split("\n\n")[0].split())
    assert len({e.answer for e in entries}) == len(entries)  # each answer once
    assert all(not part.startswith("_") for e in entries for part in e.name.split("."))


def test_module_entries_follow_all_privacy_and_length_rules():
    source = textwrap.dedent('''
        __all__ = ["exported", "Thing"]

        def exported(x):
            """Return the thing that was exported by this module.

            Second paragraph is not part of the answer."""

        def not_exported():
            """Not in __all__, so not public."""

        def _private():
            """Private helpers are skipped."""

        class Thing:
            """A thing with a long enough docstring."""
            def method(self):
                """Do the method's job,
                   over two lines."""
            def _hidden(self):
                """Hidden method docstring is skipped."""
            def short(self):
                """Too short."""
    ''')
    got = [(e.name, e.kind, e.answer) for e in chat_data.module_entries("mod", source)]
    assert got == [("mod.exported", "function", "Return the thing that was exported by this module."),
                   ("mod.Thing", "class", "A thing with a long enough docstring."),
                   ("mod.Thing.method", "method", "Do the method's job, over two lines.")]


def test_split_by_module_is_deterministic_disjoint_and_hash_based(entries):
    train, heldout = chat_data.split_by_module(entries, fraction=0.3)
    again_train, again_heldout = chat_data.split_by_module(list(reversed(entries)), fraction=0.3)
    assert sorted(e.name for e in again_train) == sorted(e.name for e in train)
    assert sorted(e.name for e in again_heldout) == sorted(e.name for e in heldout)
    top = lambda es: {e.module.split(".")[0] for e in es}  # noqa: E731
    assert train and heldout and not top(train) & top(heldout)
    assert len(train) + len(heldout) == len(entries)
    for module in top(entries):  # an independent computation of the documented rule
        digest = int.from_bytes(hashlib.sha256(module.encode()).digest()[:8], "big")
        assert (module in top(heldout)) == (digest < 0.3 * 2**64)


def test_preference_pairs_and_multiple_choice_are_fixed_and_well_formed(entries):
    entries = list(entries)
    pairs = chat_data.preference_examples(entries)
    assert pairs == chat_data.preference_examples(entries)
    answers = {e.answer for e in entries}
    for entry, pair in zip(entries, pairs):
        assert pair.prompt == [{"role": "user", "content": chat_data.question(entry)}]
        assert pair.chosen == entry.answer and pair.rejected != entry.answer and pair.rejected in answers
    assert len({p.rejected for p in pairs}) > len(pairs) // 3  # not one answer rejected everywhere

    questions = chat_data.multiple_choice_questions(entries)
    assert questions == chat_data.multiple_choice_questions(entries)
    for entry, q in zip(entries, questions):
        assert q.question == chat_data.question(entry) and len(q.choices) == 4 == len(set(q.choices))
        assert q.choices[q.answer] == entry.answer and set(q.choices) <= answers
    positions = [q.answer for q in questions]
    assert all(positions.count(k) > len(questions) // 10 for k in range(4))  # the right answer moves around


# ----------------------------------------------------------------------------------------------------------
# JSON lines

def test_jsonl_readers_accept_the_common_shapes(tmp_path):
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                             {"role": "assistant", "content": "a"}]}) + "\n\n")
    assert chat_data.read_chat_jsonl(chat) == [[{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                                                {"role": "assistant", "content": "a"}]]
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "q1", "chosen": "good", "rejected": "bad"},
        {"prompt": [{"role": "user", "content": "q2"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": "no"}]) + "\n")
    got = chat_data.read_preference_jsonl(prefs)
    assert got == [chat_data.PreferenceExample([{"role": "user", "content": "q1"}], "good", "bad"),
                   chat_data.PreferenceExample([{"role": "user", "content": "q2"}], "yes", "no")]


@pytest.mark.parametrize("reader, line, message", [
    ("chat", "{not json", "not valid JSON"),
    ("chat", "[1, 2]", "expected a JSON object"),
    ("chat", '{"text": "hi"}', "list of messages"),
    ("chat", '{"messages": [{"role": "robot", "content": "x"}]}', "role"),
    ("chat", '{"messages": [{"role": "user", "content": "only a question"}]}', "no assistant"),
    ("prefs", '{"prompt": "q", "chosen": "a"}', "missing"),
    ("prefs", '{"prompt": "q", "chosen": 3, "rejected": "b"}', "chosen"),
    ("prefs", '{"prompt": [], "chosen": "a", "rejected": "b"}', "non-empty list"),
])
def test_malformed_jsonl_names_file_and_line(tmp_path, reader, line, message):
    path = tmp_path / "data.jsonl"
    good = ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
            if reader == "chat" else '{"prompt": "q", "chosen": "a", "rejected": "b"}')
    path.write_text(f"{good}\n\n{line}\n{good}\n")
    read = chat_data.read_chat_jsonl if reader == "chat" else chat_data.read_preference_jsonl
    with pytest.raises(ValueError, match=rf"data\.jsonl:3: .*{message}"):
        read(path)


# ----------------------------------------------------------------------------------------------------------
# Rows

def test_sft_and_response_rows_follow_the_template_mask(tokenizer):
    messages = [{"role": "user", "content": "first question"}, {"role": "assistant", "content": "first answer"},
                {"role": "user", "content": "second question"}, {"role": "assistant", "content": "second answer"}]
    ids, mask = tokenizer.render_chat(messages)
    inputs, targets = chat_data.sft_example(tokenizer, messages, 512)
    assert inputs == ids[:-1] and len(targets) == len(inputs)
    for t, target in enumerate(targets):
        assert target == (ids[t + 1] if mask[t + 1] else -1)
    # The response row scores only the last reply, although the template masks both assistant turns in.
    _, response_targets = chat_data.response_example(tokenizer, messages[:3], "second answer", 512)
    last_reply = tokenizer.encode("second answer") + [tokenizer.end_id]
    assert [t for t in response_targets if t != -1] == last_reply
    assert sum(t != -1 for t in targets) == len(last_reply) + len(tokenizer.encode("first answer")) + 1
    short_inputs, short_targets = chat_data.sft_example(tokenizer, messages, 5)
    assert short_inputs == ids[:5] and short_targets == targets[:5]


def test_rows_longer_than_the_context_are_cut_and_those_left_with_nothing_to_learn_dropped(tokenizer):
    question, answer = "what does json.dumps do? " * 3, "Serialize obj to a JSON formatted str."
    conversations = [[{"role": "user", "content": question * repeats}, {"role": "assistant", "content": answer}]
                     for repeats in range(1, 8)]
    lengths = [len(tokenizer.render_chat(messages)[0]) for messages in conversations]
    prompt_lengths = [len(tokenizer.render_chat(m[:1], add_generation_prompt=True)[0]) for m in conversations]
    seq_len = sorted(lengths)[3]
    rows, num_cut, num_dropped = chat_data.sft_examples(tokenizer, conversations, seq_len)
    assert num_cut == sum(length > seq_len + 1 for length in lengths)
    # A row learns something iff its cut keeps the first assistant token: the prompt (<|assistant|> last) fits.
    assert num_dropped == sum(prompt_length >= seq_len + 1 for prompt_length in prompt_lengths) > 0
    assert rows == [row for row in (chat_data.sft_example(tokenizer, m, seq_len) for m in conversations)
                    if any(t != -1 for t in row[1])]
    pairs = [chat_data.PreferenceExample(m[:1], answer, "no") for m in conversations]
    kept, dropped = chat_data.pairs_that_fit(tokenizer, pairs, seq_len)
    assert dropped == num_dropped and kept == [p for p, (_, targets) in zip(pairs, [chat_data.sft_example(
        tokenizer, m, seq_len) for m in conversations]) if any(t != -1 for t in targets)]


def test_batches_cover_every_example_once_per_epoch_and_shard_without_overlap():
    examples = [([i, i, i], [i, -1, i]) for i in range(20)]

    def seen(source, steps):
        return [int(x) for _ in range(steps) for x in source.next_batch()["inputs"][:, 0]]

    one = chat_data.chat_batches(examples, 6, 8, pad_id=0, seed=1)
    assert one.steps_in_epoch() == 3  # 20 // 6; the two left over wait for the next shuffle
    first_epoch = seen(one, 3)
    assert len(set(first_epoch)) == 18 and one.state_dict()["epoch"] == 1
    two = [chat_data.chat_batches(examples, 3, 8, pad_id=0, seed=1, rank=r, world_size=2) for r in range(2)]
    rank_rows = [seen(source, 3) for source in two]
    assert not set(rank_rows[0]) & set(rank_rows[1])
    assert sorted(rank_rows[0] + rank_rows[1]) == sorted(first_epoch)
    assert chat_data.chat_batches(examples, 6, 8, pad_id=0, seed=2).next_batch()["inputs"][:, 0].tolist() != \
        first_epoch[:6]


@pytest.mark.parametrize("packing", [False, True])
def test_batch_sources_resume_exactly(packing):
    examples = [([i] * (1 + i % 5), [i] * (1 + i % 5)) for i in range(30)]

    def source():
        return chat_data.chat_batches(examples, 3, 8, pad_id=0, packing=packing, seed=7)

    uninterrupted = source()
    expected = [uninterrupted.next_batch() for _ in range(12)]  # crosses an epoch boundary
    cut = source()
    for _ in range(5):
        cut.next_batch()
    state = json.loads(json.dumps(cut.state_dict()))
    resumed = source()
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = resumed.next_batch()
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="seed"):
        chat_data.chat_batches(examples, 3, 8, pad_id=0, packing=packing, seed=8).load_state_dict(state)


def test_packed_rows_hold_whole_conversations_with_their_own_doc_ids():
    examples = [([100 + i] * (2 + i % 4), [200 + i] * (2 + i % 4)) for i in range(25)]
    source = chat_data.chat_batches(examples, 2, 10, pad_id=0, packing=True, seed=0)
    seen = []
    for _ in range(source.steps_in_epoch()):
        batch = source.next_batch()
        assert batch["inputs"].shape[1] == 10
        for inputs, targets, doc_ids in zip(batch["inputs"], batch["targets"], batch["doc_ids"]):
            for doc in doc_ids.unique().tolist():
                span = (doc_ids == doc).nonzero().flatten()
                assert torch.equal(span, torch.arange(span[0], span[-1] + 1))  # contiguous
                ids = inputs[span].unique().tolist()
                if targets[span[0]] == -1:  # padding: its own document, nothing to learn
                    assert ids == [0] and (targets[span] == -1).all()
                    continue
                assert len(ids) == 1 and len(span) == len(examples[ids[0] - 100][0])
                assert (targets[span] == ids[0] + 100).all()
                seen.append(ids[0] - 100)
    assert len(seen) == len(set(seen)) and len(seen) > 20


def test_preference_rows_and_batches(tokenizer):
    pairs = [chat_data.PreferenceExample([{"role": "user", "content": f"question {i}"}], f"right {i}", "wrong")
             for i in range(6)]
    rows = chat_data.preference_rows(tokenizer, pairs, 40)
    assert all(v.shape == (6, 40) for v in rows.values())
    for i, pair in enumerate(pairs):
        chosen = rows["chosen_targets"][i]
        assert chosen[chosen != -1].tolist() == tokenizer.encode(pair.chosen) + [tokenizer.end_id]
    batch = chat_data.preference_batches(rows, 4, seed=0).next_batch()
    used = int(max((rows[k] != -1).nonzero()[:, 1].max() for k in ("chosen_targets", "rejected_targets"))) + 1
    assert batch["chosen_inputs"].shape[0] == 4 and batch["chosen_inputs"].shape[1] <= used


# ----------------------------------------------------------------------------------------------------------
# Scoring

def naive_logprob(model, ids: list[int], first_target: int) -> tuple[float, int]:
    """Sum of log p(ids[t] | ids[:t]) for t >= first_target, one row, float64; and the token count."""
    logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0].double(), dim=-1)
    return sum(logp[t - 1, ids[t]].item() for t in range(first_target, len(ids))), len(ids) - first_target


def test_multiple_choice_and_preference_scores_match_a_naive_scorer(tokenizer, entries):
    model = tiny_model(tokenizer)
    questions = chat_data.multiple_choice_questions(entries)[:12]

    def naive(question, answer):
        prompt = tokenizer.render_chat([{"role": "user", "content": question}], add_generation_prompt=True)[0]
        return naive_logprob(model, prompt + tokenizer.encode(answer) + [tokenizer.end_id], len(prompt))

    right = {"likelihood": 0, "calibrated": 0}
    for q in questions:
        asked = [naive(q.question, choice) for choice in q.choices]
        neutral = [naive("What does this do?", choice)[0] for choice in q.choices]
        means = [total / count for total, count in asked]
        pmi = [total - base for (total, _), base in zip(asked, neutral)]
        right["likelihood"] += max(range(4), key=means.__getitem__) == q.answer
        right["calibrated"] += max(range(4), key=pmi.__getitem__) == q.answer
    got = chat_data.multiple_choice_accuracy(model, tokenizer, questions, 512, batch_size=5)
    assert got == pytest.approx({k: v / len(questions) for k, v in right.items()}, abs=1e-6)

    pairs = chat_data.preference_examples(entries)[:5]
    chosen, rejected = chat_data.preference_scores(model, tokenizer, pairs, 512, batch_size=2)
    for i, pair in enumerate(pairs):
        prompt = tokenizer.render_chat(pair.prompt, add_generation_prompt=True)[0]
        for reply, got in ((pair.chosen, chosen[i]), (pair.rejected, rejected[i])):
            expected, _ = naive_logprob(model, prompt + tokenizer.encode(reply) + [tokenizer.end_id], len(prompt))
            assert got.item() == pytest.approx(expected, rel=1e-9)


def test_heldout_loss_is_token_weighted(tokenizer, entries):
    model = tiny_model(tokenizer)
    rows = [chat_data.sft_example(tokenizer, chat_data.chat_messages(e), 512) for e in entries[:7]]
    total, count = 0.0, 0
    for inputs, targets in rows:
        logits = model(torch.tensor([inputs]))[0]
        total += F.cross_entropy(logits, torch.tensor(targets), ignore_index=-1, reduction="sum").item()
        count += sum(t != -1 for t in targets)
    got = chat_data.heldout_loss(model, rows, tokenizer.eos_id, batch_size=3)
    assert got == pytest.approx(total / count, rel=1e-10)

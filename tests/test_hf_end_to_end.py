"""A Hugging Face model through every stage, with transformers and peft as oracles: serve.py serves a model
directory with its own tokenizer and chat template over HTTP as transformers generates; finetune.py fine-tunes it
with LoRA and the merged model and the adapter load back into transformers and peft; a nanostack checkpoint
exported with its tokenizer generates in transformers as in nanostack.

The model directory is built here (no download): a random Qwen2 model whose greedy reply to CHAT ends with its eos
token, a byte-level BPE tokenizer.json trained with `tokenizers`, a ChatML template and, like a Qwen2.5 *base*
model, eos <|endoftext|>, so the template's <|im_end|> is not a stop token until fine-tuning makes it one.
"""
import copy
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import finetune  # noqa: E402
from hf_tokenizer_files import CHATML_TEMPLATE, QWEN2_STYLE_SPLIT, split_then_bytes, train_hf, write_json  # noqa: E402
from nanostack import checkpoint, data, hf  # noqa: E402
from nanostack.sampling import SamplingParams  # noqa: E402
from nanostack.serving.engine import Engine, EngineConfig  # noqa: E402
from nanostack.tokenizer import Tokenizer  # noqa: E402

# conftest.py: `tokenizer` (a 320-token nanostack BPE), `sharpened_model`, `one_thread`.
pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What does json.dumps do?"}]
# ChatML that refuses a conversation opened by the assistant, as real templates refuse what they cannot render.
TEMPLATE = ("{% if messages[0]['role'] == 'assistant' %}{{ raise_exception('the assistant cannot speak first') }}"
            "{% endif %}" + CHATML_TEMPLATE)
MAX_TOKENS = 24


def hf_greedy(model, prompt: list[int], max_new_tokens: int = MAX_TOKENS, **overrides) -> list[int]:
    """transformers' greedy continuation of `prompt`, stopping as the model's generation_config says."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False, **overrides)
    return out[0, len(prompt):].tolist()


def chat_ids(auto, messages, **kwargs) -> list[int]:
    """transformers' apply_chat_template ids (a BatchEncoding in transformers 5)."""
    ids = auto.apply_chat_template(messages, tokenize=True, **kwargs)
    return ids["input_ids"] if hasattr(ids, "keys") else ids


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    """The Qwen2.5-base-style model directory (see the module docstring)."""
    directory = tmp_path_factory.mktemp("qwen-base") / "hf"
    hf_tokenizer = train_hf(directory, split_then_bytes(QWEN2_STYLE_SPLIT), ["<|endoftext|>", "<|im_start|>",
                                                                             "<|im_end|>"])
    eos = hf_tokenizer.token_to_id("<|endoftext|>")
    config = transformers.Qwen2Config(vocab_size=hf_tokenizer.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, initializer_range=0.2, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    # Swap the output rows of eos and of a token the free-running greedy reply picks for the first time at step
    # 4 or later: the reply is the same up to there, then ends with eos.
    write_json(directory / "tokenizer_config.json", {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": None,
                                                     "eos_token": "<|endoftext|>", "chat_template": TEMPLATE})
    prompt = Tokenizer.load(directory / "tokenizer.json").render_prompt(CHAT)
    free = hf_greedy(model, prompt, eos_token_id=None)
    stop_at = next(i for i in range(4, len(free)) if free[i] not in free[:i])
    assert eos not in free
    with torch.no_grad():
        model.lm_head.weight[[eos, free[stop_at]]] = model.lm_head.weight[[free[stop_at], eos]]
    model.save_pretrained(directory, safe_serialization=True)
    write_json(directory / "generation_config.json", {"eos_token_id": eos})  # after save_pretrained's own
    return directory


# ----------------------------------------------------------------------------------------------------------
# serve.py over HTTP

class ServePy:
    """`python serve.py --model DIR --port 0` in a subprocess, its port read from its "listening on" line."""

    def __init__(self, model_dir):
        command = [sys.executable, str(ROOT / "serve.py"), "--model", str(model_dir), "--port", "0",
                   "--device", "cpu", "--max-num-seqs", "4"]
        self.process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                        text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        lines, self.output = queue.Queue(), []
        threading.Thread(target=lambda: [lines.put(line) for line in self.process.stdout] + [lines.put("")],
                         daemon=True).start()
        while True:
            line = lines.get(timeout=120)
            self.output.append(line)
            listening = re.search(r"listening on (http://\S+) ", line)
            if listening or not line:
                break
        assert listening, "".join(self.output)
        self.url = listening.group(1)

    def post(self, route: str, body: dict, status: int = 200) -> dict:
        request = urllib.request.Request(self.url + route, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                answer = response.status, json.loads(response.read())
        except urllib.error.HTTPError as error:
            answer = error.code, json.loads(error.read())
        assert answer[0] == status, answer
        return answer[1]

    def close(self):
        self.process.terminate()
        assert self.process.wait(timeout=30) == 0


def test_serve_py_answers_as_transformers_generates(base_dir):
    server = ServePy(base_dir)
    try:
        auto = transformers.AutoTokenizer.from_pretrained(base_dir)
        model = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
        eos = auto.convert_tokens_to_ids("<|endoftext|>")

        def text(ids):
            return auto.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

        prompt = chat_ids(auto, CHAT, add_generation_prompt=True)
        expected = hf_greedy(model, prompt)
        assert expected[-1] == eos and len(expected) < MAX_TOKENS  # transformers stopped at the eos id
        reply = server.post("/v1/chat/completions", {"messages": CHAT, "max_tokens": MAX_TOKENS, "temperature": 0})
        assert reply["choices"][0]["finish_reason"] == "stop"
        assert reply["choices"][0]["message"]["content"] == text(expected[:-1])
        assert (reply["usage"]["prompt_tokens"], reply["usage"]["completion_tokens"]) == (len(prompt), len(expected))
        refused = server.post("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400)
        assert "the assistant cannot speak first" in refused["error"]["message"]

        prompt_text = "def fib(n):"
        prompt = auto(prompt_text)["input_ids"]  # no bos token for this tokenizer
        assert server.post("/tokenize", {"prompt": prompt_text})["tokens"] == prompt
        expected = hf_greedy(model, prompt, 16)
        completion = server.post("/v1/completions", {"prompt": prompt_text, "max_tokens": 16, "temperature": 0})
        stopped = expected[-1] == eos
        assert completion["choices"][0]["text"] == text(expected[:-1] if stopped else expected)
        assert completion["choices"][0]["finish_reason"] == ("stop" if stopped else "length")
        assert completion["usage"]["prompt_tokens"] == len(prompt)
    finally:
        server.close()


# ----------------------------------------------------------------------------------------------------------
# Fine-tuning a Hugging Face model and exporting it back

@pytest.mark.slow
def test_lora_fine_tune_exports_to_transformers_and_peft(base_dir, tmp_path, capsys):
    peft = pytest.importorskip("peft")
    chats = tmp_path / "chat.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                      {"role": "assistant", "content": f"{2 * i}."}]}) + "\n"
                             for i in range(16)))
    out = tmp_path / "sft"
    assert finetune.main(["--init", str(base_dir), "--data", str(chats), "--lora-rank", "4", "--lora-targets",
                          "all,lm_head", "--steps", "5", "--batch-size", "4", "--seq-len", "48", "--eval-examples",
                          "4", "--lr", "1e-2", "--device", "cpu", "--out-dir", str(out)]) == 0
    assert re.search(r"ends each reply with '<\|im_end\|>' \(id \d+\), which is not a stop token of .*: added to "
                     r"the stop ids", capsys.readouterr().out)

    loaded = checkpoint.load_checkpoint(out)
    tokenizer, directory = loaded["tokenizer"], loaded["directory"]
    eos, im_end = (tokenizer.special_tokens[t] for t in ("<|endoftext|>", "<|im_end|>"))
    assert tokenizer.stop_ids == {eos, im_end}
    ids, mask = tokenizer.render_chat([*CHAT, {"role": "assistant", "content": "4."}])
    assert ids[-2:] == [im_end, *tokenizer.encode("\n")] and mask[-2:] == [1, 0]  # the reply is learned up to <|im_end|>
    manifest = json.loads((directory / checkpoint.MANIFEST).read_text())["files"]
    assert {"tokenizer_config.json", "generation_config.json"} <= manifest.keys()

    hf.export_hf(out, tmp_path / "merged")
    hf.export_peft_adapter(out / "adapter", tmp_path / "peft", str(base_dir))
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [eos, im_end]
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "merged")
    assert chat_ids(auto, CHAT, add_generation_prompt=True) == tokenizer.render_prompt(CHAT)

    idx = torch.randint(0, tokenizer.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        ours, before = loaded["model"].eval()(idx), base(idx).logits
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()(idx).logits
        torch.testing.assert_close(merged(idx).logits, ours, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(adapted, ours, rtol=1e-4, atol=1e-4)
    assert (ours - before).abs().max() > 1e-3  # five steps did move the model

    # The tokenizer's side files are verified like the weights: altered or added later, the checkpoint is refused.
    for damage, error in ((lambda d: (d / "generation_config.json").write_text('{"eos_token_id": 0}'),
                           r"generation_config.json has \d+ bytes, expected \d+"),
                          (lambda d: (d / "chat_template.jinja").write_text("{{ messages }}"),
                           r"chat_template.jinja is not listed in manifest.json")):
        shutil.copytree(directory, tmp_path / "damaged")
        damage(tmp_path / "damaged")
        with pytest.raises(checkpoint.CheckpointError, match=error):
            checkpoint.load_checkpoint(tmp_path / "damaged")
        shutil.rmtree(tmp_path / "damaged")


def test_nanostack_checkpoint_exported_generates_in_transformers(tokenizer, sharpened_model, tmp_path):
    model = sharpened_model(tokenizer.vocab_size, 128)
    checkpoint.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)
    hf.export_hf(tmp_path / "ckpt", tmp_path / "hf")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert auto.chat_template == tokenizer.chat_template
    prompt = chat_ids(auto, CHAT, add_generation_prompt=True)
    assert prompt == tokenizer.render_prompt(CHAT)
    assert set(exported.generation_config.eos_token_id) == tokenizer.stop_ids
    engine = Engine(model, tokenizer, EngineConfig(block_size=4))
    ours = engine.generate([prompt], SamplingParams(max_tokens=MAX_TOKENS, temperature=0))[0].new_token_ids
    assert hf_greedy(exported, prompt) == ours


# ----------------------------------------------------------------------------------------------------------
# What assumed nanostack's own tokenizer

def test_documents_end_with_eos_when_the_tokenizer_has_no_bos(base_dir, tmp_path):
    tokenizer = Tokenizer.load(base_dir / "tokenizer.json")
    texts = ["x = 1\n", "def f():\n    return 2\n"]
    data.prepare_tokens([data.Document(f"doc{i}", text) for i, text in enumerate(texts)], tokenizer, tmp_path,
                        val_fraction=0.0)
    stream = data.TokenShards(tmp_path, "train", tokenizer)[:].tolist()
    assert stream == [token for text in texts for token in tokenizer.encode(text) + [tokenizer.eos_id]]


def test_a_tokenizer_that_maps_text_to_other_ids_is_refused(base_dir):
    tokenizer = Tokenizer.load(base_dir / "tokenizer.json")
    other = copy.copy(tokenizer)
    other.normalizer = "NFC"  # same vocabulary, merges, specials and pattern: only the normalizer differs
    with pytest.raises(checkpoint.CheckpointError, match=r"different tokenizer: b/tokenizer.json differs from "
                                                         r"a/tokenizer.json in its normalizer"):
        checkpoint.require_same_tokenizer(tokenizer, "a/tokenizer.json", other, "b/tokenizer.json", "draft model")

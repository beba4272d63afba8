"""Test setup shared by every test file: the repo root on sys.path, Triton in interpreter mode off-GPU, the
fixtures the serving tests (test_engine.py, test_api.py) share: one torch thread, a tiny tokenizer, and a
factory of small random models with sharpened weights; the tiny Hugging Face models of every supported family
(test_hf.py, test_onnx.py: `from conftest import HF_FAMILIES, build_hf_model`) and a briefly trained model with its
token shards (test_quant.py, test_onnx.py)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Triton kernels run on CPU through the interpreter; it must be chosen before any kernel is defined.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# ASCII code and prose, a chat question, accented Latin, CJK and emoji: multi-byte characters split across tokens.
TINY_CORPUS = ("The quick brown fox jumps over the lazy dog. "
               "def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2)\n"
               "what does json.dumps do? Serialize obj to a JSON formatted str. Grüße! 你好，世界。 🙂🚀\n"
               "Grüße aus Köln! Ça va très bien. 你好，世界。 Emoji: 🙂🚀✨ — naïve café déjà vu.\n") * 4


def pytest_collection_modifyitems(config, items):
    """Tests marked `cuda` skip where there is no GPU (`pytest -m cuda` selects them on a GPU machine)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if item.get_closest_marker("cuda"):
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """torch on one thread for the module (use with `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    # Tiny matmuls on a shared 2-core machine: threads only contend.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def tokenizer():
    """A 320-token BPE tokenizer trained on TINY_CORPUS (test files with their own `tokenizer` fixture override it)."""
    # Imported here, not at the top: this file is loaded for every test, and only the serving tests need these.
    from nanostack.tokenizer import Tokenizer
    return Tokenizer.train([TINY_CORPUS], vocab_size=320, num_workers=1)


def _sharpened_model(vocab_size: int, max_seq_len: int, **overrides):
    from nanostack.model import GPT, ModelConfig
    torch.manual_seed(0)
    shape = dict(n_layer=2, n_head=4, n_kv_head=2, n_embd=64)
    config = ModelConfig(vocab_size=vocab_size, max_seq_len=max_seq_len, **{**shape, **overrides})
    model = GPT(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("wq.weight", "wk.weight")):
                param.mul_(10)
            elif name == "lm_head.weight":
                param.mul_(25)
    return model


@pytest.fixture(scope="session")
def sharpened_model():
    """`make(vocab_size, max_seq_len, **config_overrides) -> GPT`: a fixed-seed float32 model in eval mode with
    sharpened weights: peaky attention and well-separated logits, so greedy paths do not hinge on float rounding
    differences between batched paged attention and the full forward."""
    return _sharpened_model


# Tiny transformers models of every family nanostack/hf.py loads, with the `tokenizer` fixture's vocabulary.
HF_SHAPE = dict(vocab_size=320, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, rms_norm_eps=1e-6)
HF_EXPERTS = dict(num_local_experts=4, num_experts_per_tok=2)
# family -> (transformers Config class name, its settings, whether to save it in several shards)
HF_FAMILIES = {
    "llama": ("LlamaConfig", dict(tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32}), True),
    "qwen2": ("Qwen2Config", dict(rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                                                   "original_max_position_embeddings": 32}), False),
    "qwen3": ("Qwen3Config", dict(head_dim=16, rope_parameters={"rope_type": "linear", "rope_theta": 1000.0,
                                                                "factor": 2.0}), True),
    "mistral": ("MistralConfig", dict(sliding_window=8), False),
    "mixtral": ("MixtralConfig", dict(HF_EXPERTS), True),
    "qwen3_moe": ("Qwen3MoeConfig", dict(HF_EXPERTS, moe_intermediate_size=48, norm_topk_prob=False), False),
}


def build_hf_model(family: str, **overrides):
    """A fixed-seed random transformers model of `family` in eval mode, generating without a stop token."""
    import transformers
    class_name, settings, _ = HF_FAMILIES[family]
    config = getattr(transformers, class_name)(**HF_SHAPE, **{**settings, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    model.generation_config.eos_token_id = None
    return model


def corpus_documents():
    """Python source from a few standard-library modules, cut into named ~1.5 kB documents."""
    import argparse
    import inspect
    import json
    import string
    import textwrap
    from nanostack import data
    sources = [inspect.getsource(m) for m in (textwrap, argparse, string, json.encoder, json.decoder)]
    text = "\n".join(sources)
    return [data.Document(f"doc{i}", text[start:start + 1500]) for i, start in enumerate(range(0, len(text), 1500))]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-layer model trained for 120 steps on stdlib source, its checkpoint and token shards (a val split too)."""
    from nanostack import checkpoint, data
    from nanostack.model import GPT, ModelConfig
    from nanostack.tokenizer import Tokenizer
    root = tmp_path_factory.mktemp("trained")
    documents = corpus_documents()
    tokenizer = Tokenizer.train([doc.text for doc in documents], 400)
    data.prepare_tokens(documents, tokenizer, root / "data", val_fraction=0.15)
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=2, n_head=4, n_kv_head=4, n_embd=64,
                            max_seq_len=64))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = data.BatchLoader(data.TokenShards(root / "data", "train"), 8, 64, seed=0)
    for _ in range(120):
        inputs, targets = loader.next_batch()
        loss = model(inputs, targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    checkpoint.save_checkpoint(root / "model", model.state_dict(), model.config, tokenizer)
    return {"model": model, "tokenizer": tokenizer, "data": root / "data", "checkpoint": root / "model",
            "root": root}

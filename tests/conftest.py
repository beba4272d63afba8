"""Test setup shared by every test file: the repo root on sys.path, Triton in interpreter mode off-GPU, and the
fixtures the serving tests (test_engine.py, test_api.py) share: one torch thread, a tiny tokenizer, and a
factory of small random models with sharpened weights."""
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

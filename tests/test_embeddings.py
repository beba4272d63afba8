"""Embeddings (serving/embeddings.py): pooled final hidden states against the model's plain forward, one input at a
time (the final norm's output caught by a hook), packed or alone; the pooling a model directory names."""
import json

import pytest
import torch

from nanostack.serving.embeddings import POOLINGS, embed, named_pooling

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pooling", POOLINGS)
def test_embeddings_are_unit_pooled_hidden_states_packed_or_alone(tokenizer, sharpened_model, pooling):
    model = sharpened_model(tokenizer.vocab_size, 64)
    texts = ["def fib(n):", "Grüße aus Köln!", "a", "what does json.dumps do?", "def fib(n):"]
    inputs = [[tokenizer.bos_id] + tokenizer.encode(text) for text in texts]
    packed = embed(model, inputs, pooling, tokens_per_forward=24)  # several packs of several inputs
    caught = []
    hook = model.norm.register_forward_hook(lambda module, args, output: caught.append(output))
    try:
        for ids, vector in zip(inputs, packed):
            with torch.no_grad():
                model(torch.tensor([ids]))
            hidden = caught.pop()[0].double()  # (T, n_embd) after the final norm
            expected = hidden.mean(0) if pooling == "mean" else hidden[-1]
            torch.testing.assert_close(vector.double(), expected / expected.norm(), atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(embed(model, [ids], pooling)[0], vector, atol=1e-6, rtol=1e-6)
    finally:
        hook.remove()
    torch.testing.assert_close(packed[0], packed[4], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(packed[0], packed[1], atol=1e-2)


def test_named_pooling(tmp_path):
    assert named_pooling(tmp_path) == "mean"
    (tmp_path / "1_Pooling").mkdir()
    config = tmp_path / "1_Pooling" / "config.json"
    config.write_text(json.dumps({"word_embedding_dimension": 8, "pooling_mode_lasttoken": True,
                                  "pooling_mode_mean_tokens": False}))
    assert named_pooling(tmp_path) == "last"
    config.write_text(json.dumps({"pooling_mode_cls_token": True}))
    with pytest.raises(ValueError, match="pooling_mode_cls_token"):
        named_pooling(tmp_path)

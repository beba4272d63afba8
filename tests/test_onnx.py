"""ONNX export (nanostack/onnx_export.py) and the ONNX Runtime runner (nanostack/onnx_runtime.py), PyTorch as the
oracle: for every Hugging Face family nanostack loads (dense, sliding window, scaled RoPE, q/k norm, biases, MoE),
exported once per module, the graph's logits equal the model's alone and left-padded in a batch of 3; chunked
prefill and decode steps with a past equal the full recompute; greedy tokens equal model.generate; the int8 graph
keeps the router in fp32; the numpy sampler cuts what sampling.py cuts; a graph with another tokenizer and bad
export options are refused. The slow test runs both command lines on a briefly trained model: bits per byte of
the fp32 graph equal PyTorch's, int8 within 2%, and the runner answers without importing torch."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

for package in ("onnx", "onnxscript", "onnxruntime"):
    pytest.importorskip(package, reason=f"{package} is missing: pip install -e \".[onnx]\"")
pytest.importorskip("transformers")

from conftest import HF_FAMILIES, TINY_CORPUS, build_hf_model  # noqa: E402
from nanostack import checkpoint, data, onnx_export, onnx_runtime, quant  # noqa: E402
from nanostack.sampling import SamplingParams, filtered_logits  # noqa: E402
from nanostack.tokenizer import Tokenizer  # noqa: E402

# conftest.py: `tokenizer` (320 tokens, the families' vocabulary), `one_thread`, `trained`.
pytestmark = pytest.mark.usefixtures("one_thread")
# 40 tokens: past the 32-token original context of the scaled RoPE and far past mistral's 8-token window.
PROMPT_LENGTHS = (5, 11, 40)
NEW_TOKENS = 32
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prompts(vocab_size: int = 320) -> list[list[int]]:
    return [torch.randint(0, vocab_size, (n,), generator=torch.Generator().manual_seed(n)).tolist()
            for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module", params=list(HF_FAMILIES))
def exported(request, tokenizer, tmp_path_factory):
    """(family, the model as load_checkpoint gives it, an OnnxDecoder over its fp32 graph, the export directory)."""
    root = tmp_path_factory.mktemp(request.param)
    build_hf_model(request.param).save_pretrained(root / "hf", safe_serialization=True)
    if request.param == "qwen2":  # the tokenizer in Hugging Face's files (tokenizer.json, tokenizer_config.json, ...)
        tokenizer.save_hf(root / "hf")
    else:
        tokenizer.save(root / "hf" / "tokenizer.json")
    loaded = checkpoint.load_checkpoint(root / "hf")  # as the command line loads it
    model = loaded["model"].eval()
    onnx_export.export_onnx(model, loaded["tokenizer"], root / "onnx", int8=False,
                            tokenizer_source=str(root / "hf" / "tokenizer.json"))
    return request.param, model, onnx_runtime.OnnxDecoder(root / "onnx"), root / "onnx"


def torch_logits(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].numpy()


def test_logits_equal_pytorch_alone_and_left_padded_in_a_batch(exported):
    name, model, decoder, _ = exported
    batch = decoder.logits(prompts())  # one batch of 3, left-padded to 40
    for prompt, batched in zip(prompts(), batch):
        expected = torch_logits(model, prompt)
        np.testing.assert_allclose(decoder.logits([prompt])[0], expected, rtol=1e-4, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(batched, expected, rtol=1e-4, atol=1e-4, err_msg=name)


def test_prefill_in_chunks_then_decode_steps_equal_the_full_recompute(exported):
    name, model, decoder, _ = exported
    ids, mask = onnx_runtime.left_pad(prompts())  # (3, 40): the 5-token row is all padding in the first chunk
    keys = values = decoder.empty_past(3)
    steps = []
    for chunk in (slice(0, 23), slice(23, 40)):  # a prefill in two chunks, the second over a past of 23
        logits, keys, values = decoder.step(ids[:, chunk], mask[:, :chunk.stop], keys, values)
        steps.append(logits)
    rng = np.random.default_rng(0)
    for _ in range(4):  # decode steps of one token each
        next_ids = rng.integers(0, 320, size=(3, 1))
        ids, mask = np.concatenate([ids, next_ids], 1), np.concatenate([mask, np.ones_like(next_ids)], 1)
        logits, keys, values = decoder.step(next_ids, mask, keys, values)
        steps.append(logits)
    assert keys.shape == (*model.kv_layout()[:1], 3, 44, *model.kv_layout()[1:])
    incremental = np.concatenate(steps, axis=1)  # (3, 44, vocab)
    for row, prompt in enumerate(prompts()):
        real = ids[row, 40 - len(prompt):].tolist()
        np.testing.assert_allclose(incremental[row, 40 - len(prompt):], torch_logits(model, real), rtol=1e-4,
                                   atol=1e-4, err_msg=name)


def test_greedy_tokens_equal_model_generate(exported):
    name, model, decoder, _ = exported
    ours = decoder.generate(prompts(), NEW_TOKENS)  # the three prompts in one left-padded batch
    for prompt, tokens in zip(prompts(), ours):
        expected = model.generate(torch.tensor([prompt]), NEW_TOKENS, temperature=0)[0, len(prompt):].tolist()
        assert tokens == expected, name


def test_int8_graph_keeps_the_router_and_quantizes_every_expert_per_channel(exported, tmp_path):
    import onnx
    from onnx import numpy_helper
    name, model, decoder, directory = exported
    if name != "mixtral":
        pytest.skip("one MoE family is enough")
    onnx_export.quantize_int8(directory / onnx_runtime.FP32_GRAPH, tmp_path / onnx_runtime.INT8_GRAPH)
    graph = onnx.load(tmp_path / onnx_runtime.INT8_GRAPH).graph
    tensors = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    routers = [n for n in tensors if ".router." in n]  # (the quantizer stores a transposed copy)
    assert len(routers) == 2 and all(tensors[n].dtype == np.float32 for n in routers)
    expert_scales = [n for n in tensors if n.startswith("mlps.") and ".w_" in n and n.endswith("_scale")]
    assert len(expert_scales) == 2 * 4 * 3 and all(tensors[n].shape[0] in (32, 64) for n in expert_scales)
    shutil.copy(directory / "tokenizer.json", tmp_path)
    int8 = onnx_runtime.OnnxDecoder(tmp_path / onnx_runtime.INT8_GRAPH)
    prompt = prompts()[2]
    full, rounded = torch_logits(model, prompt), int8.logits([prompt])[0]
    # Activations are int8 too (per tensor, from their range), so the error is W8A8's; a token whose expert choice
    # flips differs more, hence the median over positions.
    assert (full.argmax(-1) == rounded.argmax(-1)).mean() > 0.9
    assert np.median(np.abs(full - rounded).max(-1)) < 0.1 * np.abs(full).max()


def test_the_tokenizer_files_travel_with_the_graph_and_the_runner_chats(exported, capsys):
    name, _, decoder, directory = exported
    source = Tokenizer.load(directory.parent / "hf" / "tokenizer.json")
    assert onnx_runtime.tokenizer_fingerprint(decoder.tokenizer) == onnx_runtime.tokenizer_fingerprint(source)
    files = json.loads((directory / "onnx_config.json").read_text())["tokenizer_files"]
    hf_files = ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]
    assert files == (hf_files if name == "qwen2" else ["tokenizer.json"])
    assert onnx_runtime.main(["--model", str(directory), "--chat", "true", "--prompt", "hi", "--max-tokens", "6"]) == 0
    prompt = source.render_prompt([{"role": "user", "content": "hi"}])
    expected = decoder.generate([prompt], 6, stop_ids=source.stop_ids)[0]  # greedy: the same tokens
    assert capsys.readouterr().out == source.decode(expected) + "\n"


# ----------------------------------------------------------------------------------------------------------
# The numpy sampler, and what is refused

@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 0.9), (0.7, 5, 1.0), (1.3, 20, 0.5), (1.0, 3, 0.3)])
def test_numpy_filters_cut_what_sampling_py_cuts(temperature, top_k, top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(top_k))
    logits[0, :10] = logits[0, 0]  # ties at the top, kept or cut together
    expected = filtered_logits(logits, [SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)] * 6)
    ours = onnx_runtime.filtered_logits(logits.numpy(), temperature, top_k, top_p)
    np.testing.assert_array_equal(np.isinf(ours), expected.isinf().numpy())
    np.testing.assert_allclose(ours[~np.isinf(ours)], expected[~expected.isinf()].numpy(), rtol=1e-6)


def test_seeded_sampling_repeats_and_stays_inside_the_kept_tokens():
    logits = np.random.default_rng(0).normal(size=(4, 40)).astype(np.float32)
    kept = ~np.isinf(onnx_runtime.filtered_logits(logits, 1.0, 5, 0.9))
    draws = [onnx_runtime.sample_next(logits, 1.0, 5, 0.9, np.random.default_rng(seed)) for seed in range(30)]
    assert all(kept[np.arange(4), tokens].all() for tokens in draws)
    assert len({tuple(tokens) for tokens in draws}) > 1
    again = onnx_runtime.sample_next(logits, 1.0, 5, 0.9, np.random.default_rng(3))
    np.testing.assert_array_equal(again, draws[3])
    np.testing.assert_array_equal(onnx_runtime.sample_next(logits, 0.0, 5, 0.9, None), logits.argmax(-1))


def test_a_graph_with_another_tokenizer_is_refused_naming_both(exported, tmp_path):
    _, _, decoder, directory = exported
    other = Tokenizer.train([TINY_CORPUS[::-1]], vocab_size=330, num_workers=1)
    other.save(tmp_path / "tokenizer.json")
    message = (rf"{directory}/model.onnx was exported with tokenizer '\w+' \(vocab_size 320, fingerprint "
               rf"{onnx_runtime.tokenizer_fingerprint(decoder.tokenizer)}, from .*hf/tokenizer.json\), but "
               rf"{tmp_path}/tokenizer.json is tokenizer 'nanostack' \(vocab_size 330, fingerprint "
               rf"{onnx_runtime.tokenizer_fingerprint(other)}\)")
    with pytest.raises(ValueError, match=message):
        onnx_runtime.main(["--model", str(directory), "--tokenizer", str(tmp_path / "tokenizer.json")])
    with pytest.raises(ValueError, match=r"no ONNX graph at .*nowhere: `python -m nanostack.onnx_export"):
        onnx_runtime.OnnxDecoder(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"a 40-token prompt \+ 100 new tokens exceeds the model's max_seq_len=128"):
        decoder.generate(prompts(), 100)
    with pytest.raises(ValueError, match="top_p in"):
        decoder.generate(prompts(), 4, temperature=1.0, top_p=0)


def test_bad_export_input_is_refused_and_nothing_is_written(trained, tmp_path):
    out = tmp_path / "onnx"
    with pytest.raises(checkpoint.CheckpointError, match=r"no checkpoint at .*missing"):
        onnx_export.main(["--model", str(tmp_path / "missing"), "--out", str(out)])
    with pytest.raises(ValueError, match=r"opset 11 is not supported: the dynamo exporter writes opsets 18\.\."):
        onnx_export.main(["--model", str(trained["checkpoint"]), "--out", str(out), "--opset", "11"])
    model = quant.quantize_model(quant.copy_model(trained["model"]), "int8-wo")
    quant.save_quantized(model, trained["tokenizer"], tmp_path / "int8", source="the-source")
    with pytest.raises(ValueError, match=r"int8-quantized model \(mode int8-wo\): export its full-precision source "
                                         r"\(the-source\)"):
        onnx_export.main(["--model", str(tmp_path / "int8"), "--out", str(out)])
    with pytest.raises(SystemExit):
        onnx_export.main(["--model", str(trained["checkpoint"]), "--dtype", "bfloat16"])
    assert not out.exists()


# ----------------------------------------------------------------------------------------------------------
# End to end: both command lines, bits per byte of fp32 and int8, no torch in the runner

@pytest.mark.slow
def test_command_lines_end_to_end_on_a_trained_model(trained, tmp_path, capsys):
    out = tmp_path / "onnx"
    assert onnx_export.main(["--model", str(trained["checkpoint"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    difference = float(printed.split("max |logits difference| ")[1].split()[0])
    assert difference < 1e-4
    config = json.loads((out / "onnx_config.json").read_text())
    assert config["opset"] == 18 and config["graphs"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert config["inputs"]["attention_mask"] == ["batch", "past + seq"]
    assert config["tokenizer_files"] == ["tokenizer.json"] and config["check_against_pytorch"]["prompt_tokens"] == 16
    assert (out / "model.int8.onnx").stat().st_size < 0.5 * (out / "model.onnx").stat().st_size

    # Bits per byte on the held-out split: the fp32 graph is PyTorch's, int8 within 2% of it.
    tokenizer, model = trained["tokenizer"], trained["model"]
    val = list(data.eval_batches(data.TokenShards(trained["data"], "val"), 8, 64, 4))
    token_bytes = torch.tensor(tokenizer.token_bytes())
    reference = quant.evaluate(model, val, token_bytes)
    results = {}
    for graph in ("model.onnx", "model.int8.onnx"):
        decoder = onnx_runtime.OnnxDecoder(out / graph)
        results[graph] = quant.evaluate(lambda inputs: torch.from_numpy(np.stack(decoder.logits(inputs.tolist()))),
                                        val, token_bytes, reference["top1"])
    assert results["model.onnx"]["bpb"] == pytest.approx(reference["bpb"], rel=1e-5)
    assert results["model.onnx"]["top1_agreement"] == 1.0
    assert abs(results["model.int8.onnx"]["bpb"] / reference["bpb"] - 1) < 0.02
    assert results["model.int8.onnx"]["top1_agreement"] > 0.95

    # The runner's command line in a fresh interpreter: a chat answer, and torch never imported.
    env = {**os.environ, "PYTHONPATH": ROOT}
    script = ("import sys; from nanostack import onnx_runtime; onnx_runtime.main(sys.argv[1:]); "
              "assert 'torch' not in sys.modules, 'the runner imported torch'")
    result = subprocess.run([sys.executable, "-c", script, "--model", str(out / "model.int8.onnx"), "--chat", "true",
                             "--prompt", "what does json.dumps do?", "--max-tokens", "8"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "tokens/s" in result.stderr and result.stdout.strip()
    Tokenizer.train([TINY_CORPUS], vocab_size=300, num_workers=1).save(tmp_path / "other.json")
    result = subprocess.run([sys.executable, "-m", "nanostack.onnx_runtime", "--model", str(out), "--tokenizer",
                             str(tmp_path / "other.json")], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {out}/model.onnx was exported with tokenizer")
    assert f"{tmp_path}/other.json is tokenizer" in result.stderr

"""Hugging Face interop (nanostack/hf.py) with `transformers` as the oracle: for every supported family a tiny
random model built with transformers' own Config class and saved by save_pretrained (some sharded) loads into
nanostack with the same fp32 logits, including positions past the RoPE-scaling breakpoints and the sliding
window; the serving Engine's greedy tokens equal transformers' generate; int8, SmoothQuant and LoRA (with PEFT's
layout) run on it; export_hf round-trips; every tool's loader takes the directory; bad input is refused."""
import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanostack import checkpoint, hf, lora, quant  # noqa: E402
from nanostack.model import GPT, ModelConfig  # noqa: E402
from nanostack.sampling import SamplingParams  # noqa: E402
from nanostack.serving.engine import Engine, EngineConfig  # noqa: E402
from nanostack.serving.speculative import SpeculativeConfig, Speculator  # noqa: E402
from conftest import HF_FAMILIES, build_hf_model  # noqa: E402

# conftest.py: `tokenizer` (a 320-token BPE), `one_thread`, the Hugging Face families and their builder.
pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB = 320  # conftest.py's HF_SHAPE and tokenizer have this vocabulary
PROMPT_LENGTHS = (5, 11, 17)
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=list(HF_FAMILIES))
def family(request, tmp_path_factory):
    """(family name, its transformers model, the directory save_pretrained wrote it to)."""
    model = build_hf_model(request.param)
    directory = tmp_path_factory.mktemp(request.param) / "hf"
    model.save_pretrained(directory, safe_serialization=True,
                          **({"max_shard_size": "40KB"} if HF_FAMILIES[request.param][2] else {}))
    return request.param, model, directory


def random_ids(batch: int, length: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def hf_greedy(model, prompt: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False)
    return out[0, len(prompt):].tolist()


def prompts() -> list[list[int]]:
    return [random_ids(1, n, seed=10 + n)[0].tolist() for n in PROMPT_LENGTHS]


# ----------------------------------------------------------------------------------------------------------
# Each family against transformers

def test_logits_equal_transformers(family):
    name, hf_model, directory = family
    if HF_FAMILIES[name][2]:
        assert (directory / hf.INDEX).exists()  # the sharded path really ran
    model = hf.import_hf(directory)
    # 96 positions: past the 32-token original context of the scaled RoPE and far past the 8-token window.
    idx = random_ids(2, 96, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf_model(idx).logits, rtol=1e-4, atol=1e-4)


def test_engine_greedy_equals_transformers_generate(family):
    name, hf_model, directory = family
    model = hf.import_hf(directory)
    # A small token budget splits the longer prompts into chunks that attend to their cached prefix.
    engine = Engine(model, None, EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=8))
    outputs = engine.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    expected = [hf_greedy(hf_model, prompt) for prompt in prompts()]
    assert [out.new_token_ids for out in outputs] == expected, name
    # Speculative decoding with a perturbed twin as the draft: some guesses rejected, the same greedy tokens.
    draft = hf.import_hf(directory)
    with torch.no_grad():
        draft.norm.weight.mul_(torch.rand(draft.config.n_embd, generator=torch.Generator().manual_seed(9)) + 0.5)
    speculator = Speculator(SpeculativeConfig(num_speculative_tokens=3), draft)
    engine = Engine(model, None, EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=16), speculator)
    outputs = engine.generate(prompts(), SamplingParams(max_tokens=NEW_TOKENS, temperature=0))
    assert [out.new_token_ids for out in outputs] == expected, name
    assert 0 < speculator.stats.num_accepted_tokens < speculator.stats.num_draft_tokens


def test_export_round_trip_through_transformers(family, tokenizer, tmp_path):
    name, hf_model, directory = family
    model = hf.import_hf(directory)
    checkpoint.save_checkpoint(tmp_path / "ckpt", model.state_dict(), model.config, tokenizer)
    hf.export_hf(tmp_path / "ckpt", tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    exported.generation_config.eos_token_id = None
    assert type(exported) is type(hf_model)
    assert hf.import_hf(tmp_path / "out").config == model.config
    idx = random_ids(1, 40, seed=2)
    with torch.no_grad():
        torch.testing.assert_close(exported(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
    prompt = prompts()[0]
    ours = model.generate(torch.tensor([prompt]), NEW_TOKENS, temperature=0)[0, len(prompt):].tolist()
    assert hf_greedy(exported, prompt) == ours


def test_load_in_bfloat16_equals_the_weights_cast(family):
    _, hf_model, directory = family
    model = hf.import_hf(directory, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.tok_emb.weight, hf_model.model.embed_tokens.weight.to(torch.bfloat16))
    assert model.rope_cos.dtype == torch.bfloat16
    assert model(random_ids(1, 8, seed=3)).isfinite().all()


# ----------------------------------------------------------------------------------------------------------
# nanostack's own models out, and what has no Hugging Face layout

@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True}, {"n_expert": 4, "n_expert_active": 2}])
def test_nanostack_checkpoint_exports_with_the_same_logits(overrides, tokenizer, tmp_path):
    config = ModelConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, max_seq_len=64, **overrides)
    torch.manual_seed(0)
    model = GPT(config).eval()
    checkpoint.save_checkpoint(tmp_path / "ckpt", model.state_dict(), config, tokenizer)
    hf.export_hf(tmp_path / "ckpt", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(hf_model).__name__ == ("MixtralForCausalLM" if config.n_expert else "LlamaForCausalLM")
    idx = random_ids(2, 20, seed=4)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(idx).logits, model(idx), rtol=1e-4, atol=1e-4)
    assert hf.import_hf(tmp_path / "hf").config == config


def test_a_config_without_a_hugging_face_layout_is_refused(tokenizer, tmp_path):
    config = ModelConfig(vocab_size=VOCAB, n_layer=1, n_embd=32, qkv_bias=True, qk_norm=True)
    checkpoint.save_checkpoint(tmp_path / "ckpt", GPT(config).state_dict(), config, tokenizer)
    with pytest.raises(checkpoint.CheckpointError, match="qk_norm with qkv_bias"):
        hf.export_hf(tmp_path / "ckpt", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


# ----------------------------------------------------------------------------------------------------------
# int8 and LoRA on a model with biases (Qwen2)

@pytest.fixture(scope="module")
def qwen2_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen2") / "hf"
    build_hf_model("qwen2").save_pretrained(directory, safe_serialization=True)
    return directory


def test_smoothquant_keeps_the_function_and_int8_runs(qwen2_dir, tokenizer, tmp_path):
    model = hf.import_hf(qwen2_dir)
    idx = random_ids(2, 24, seed=5)
    with torch.no_grad():
        expected = model(idx)
        smoothed = quant.copy_model(model)
        quant.smooth_model(smoothed, [random_ids(2, 24, seed=6)], alpha=0.5)  # divides v's bias with its rows
        torch.testing.assert_close(smoothed(idx), expected, rtol=1e-4, atol=1e-4)
        w8a8 = quant.quantize_model(quant.copy_model(model), "w8a8")
        assert (w8a8(idx) - expected).abs().max() < 0.1 * expected.abs().max()
        # Weight-only int8 is exactly the float model with the rounded weights (and the biases as they were).
        quantized = quant.quantize_model(quant.copy_model(model), "int8-wo")
        assert quantized.layers[0].attn.wq.bias is not None
        rounded = quant.copy_model(model)
        rounded.load_state_dict({**rounded.state_dict(), **{
            f"{name}.weight": quant.dequantize(module.weight_int8, module.weight_scale)
            for name, module in quantized.named_modules() if isinstance(module, quant.Int8WeightOnlyLinear)},
            "tok_emb.weight": quantized.tok_emb.weight})
        torch.testing.assert_close(quantized(idx), rounded(idx), rtol=1e-4, atol=1e-4)
    quant.save_quantized(quantized, tokenizer, tmp_path / "q")
    reloaded = quant.load_for_serving(tmp_path / "q")["model"]
    with torch.no_grad():
        assert torch.equal(reloaded(idx), quantized(idx))
    tokens = Engine(reloaded, None, EngineConfig(block_size=4)).generate([[1, 2, 3]], SamplingParams(max_tokens=4))
    assert len(tokens[0].new_token_ids) == 4


def test_lora_with_biases_merges_and_loads_in_peft(qwen2_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = hf.import_hf(qwen2_dir)
    lora.apply_lora(model, "all,lm_head", rank=4, alpha=8.0)
    torch.manual_seed(7)
    with torch.no_grad():
        for module in lora.lora_modules(model).values():
            module.lora_b.normal_(0.0, 0.2)
    idx = random_ids(2, 16, seed=8)
    model(idx, idx).backward()
    assert model.layers[0].attn.wq.lora_b.grad is not None and model.layers[0].attn.wq.bias.grad is None
    with torch.no_grad():
        unmerged = model(idx)
    lora.save_adapter(tmp_path / "adapter", lora.lora_state_dict(model), lora.lora_config(model))
    hf.export_peft_adapter(tmp_path / "adapter", tmp_path / "peft", str(qwen2_dir))
    base = transformers.AutoModelForCausalLM.from_pretrained(qwen2_dir, dtype=torch.float32)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(idx).logits, unmerged, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(lora.merge_lora(model)(idx), unmerged, rtol=1e-4, atol=1e-4)


# ----------------------------------------------------------------------------------------------------------
# One loader for every tool

@pytest.fixture(scope="module")
def qwen2_with_tokenizer(qwen2_dir, tokenizer, tmp_path_factory):
    """The Qwen2 directory with a tokenizer.json beside it (nanostack's: the Hugging Face one is tokenizer.py's)."""
    directory = tmp_path_factory.mktemp("qwen2-tok") / "hf"
    shutil.copytree(qwen2_dir, directory)
    tokenizer.save(directory / "tokenizer.json")
    return directory


def test_every_tool_loads_a_hugging_face_directory(qwen2_with_tokenizer, qwen2_dir, tmp_path):
    import finetune
    from nanostack.serving.speculative import Speculator
    from nanostack.serving.tensor_parallel import ModelSpec, load_model
    expected = hf.import_hf(qwen2_dir).state_dict()
    engine = Engine.from_checkpoint(qwen2_with_tokenizer, dtype=torch.bfloat16, block_size=4)
    assert engine.dtype == torch.bfloat16 and engine.tokenizer is not None
    served = load_model(ModelSpec(str(qwen2_with_tokenizer), "cpu", torch.float32))["model"]
    init = checkpoint.load_checkpoint(qwen2_with_tokenizer, "cpu")  # how finetune.py loads --init
    teacher = finetune.load_teacher(str(qwen2_with_tokenizer), init["tokenizer"], "cpu")
    draft = Speculator.from_checkpoint(qwen2_with_tokenizer, target_tokenizer=init["tokenizer"]).draft_model
    for model in (served, init["model"], teacher, draft):
        assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in expected.items())
    assert quant.main(["--model", str(qwen2_with_tokenizer), "--out", str(tmp_path / "q")]) == 0
    assert quant.load_for_serving(tmp_path / "q")["raw_config"]["quantization"]["source"] == str(qwen2_with_tokenizer)
    identity = lora.checkpoint_identity(qwen2_with_tokenizer)
    assert identity["model_sha256"] == checkpoint.weights_sha256(qwen2_with_tokenizer)
    with pytest.raises(checkpoint.CheckpointError, match=r"hf/tokenizer.json is missing"):
        checkpoint.load_checkpoint(qwen2_dir)


def test_a_long_context_gets_the_kv_pool_that_fits_in_memory(qwen2_dir, monkeypatch):
    import nanostack.serving.engine as engine_module
    from nanostack.serving.kv_cache import kv_bytes_per_block
    model = hf.import_hf(qwen2_dir)
    block_bytes = kv_bytes_per_block(model.kv_layout(), 16, torch.float32)
    pages = {"SC_PAGE_SIZE": 4096, "SC_AVPHYS_PAGES": 100 * block_bytes // 4096}  # room for 80 blocks at 80%
    monkeypatch.setattr(engine_module.os, "sysconf", pages.__getitem__)
    assert Engine(model, None, EngineConfig(max_num_seqs=64)).blocks.num_blocks == 80  # 64 * 128 / 16 wanted


def test_serve_help_names_every_supported_family():
    import serve
    assert all(family in serve.__doc__ for family in hf.SUPPORTED)
    assert "Tokenizers: byte-level BPE" in serve.__doc__ and "SentencePiece-style ones (Llama 2, Mistral v0.1) are " \
        "refused" in " ".join(serve.__doc__.split())


# ----------------------------------------------------------------------------------------------------------
# Bad input: one clear error naming the file and the field, nothing loaded or written

def _edit_config(directory, **changes):
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop_shard(directory):
    index = json.loads((directory / hf.INDEX).read_text())
    (directory / sorted(set(index["weight_map"].values()))[-1]).unlink()


def _drop_tensor(directory):
    from safetensors.torch import load_file, save_file
    index = json.loads((directory / hf.INDEX).read_text())
    shard = directory / index["weight_map"]["model.layers.0.mlp.down_proj.weight"]
    tensors = load_file(shard)
    del tensors["model.layers.0.mlp.down_proj.weight"]
    save_file(tensors, shard)


def _truncate(path):
    path.write_bytes(path.read_bytes()[:-100])


def _pickles_only(directory):
    for shard in directory.glob("*.safetensors"):
        shard.unlink()
    (directory / hf.INDEX).unlink()
    (directory / "pytorch_model.bin").write_bytes(b"not opened")


BAD_INPUTS = {
    "model_type": (lambda d: _edit_config(d, model_type="gpt2"), r"config.json: model_type='gpt2' is not supported"),
    "rope_type": (lambda d: _edit_config(d, rope_parameters={"rope_type": "dynamic", "factor": 2.0}),
                  r"config.json: rope_scaling rope_type 'dynamic' is not supported"),
    "attention_bias": (lambda d: _edit_config(d, attention_bias=True), r"config.json: attention_bias=True"),
    "quantized": (lambda d: _edit_config(d, quantization_config={"quant_method": "awq"}),
                  r"config.json: quantization_config=.* pre-quantized"),
    "layer_types": (lambda d: _edit_config(d, sliding_window=4, layer_types=["sliding_attention", "full_attention"]),
                    r"config.json: layer_types=\['full_attention', 'sliding_attention'\]"),
    "missing_shard": (_drop_shard, r"model.safetensors.index.json names the shard model-0000\d-of-0000\d"
                                   r".safetensors .* is missing"),
    "missing_tensor": (_drop_tensor, r"model-0000\d-of-0000\d.safetensors has no tensor "
                                     r"model.layers.0.mlp.down_proj.weight"),
    "shape": (lambda d: _edit_config(d, intermediate_size=48),
              r"model-0000\d-of-0000\d.safetensors: model.layers.0.mlp.gate_proj.weight is F32 \[64, 32\], but "
              r".*config.json \(.*intermediate_size=48"),
    "truncated": (lambda d: _truncate(sorted(d.glob("*.safetensors"))[0]), r"model-00001-of-0000\d.safetensors ends "
                                                                            r"inside its tensors: truncated"),
    "pickle": (_pickles_only,
               r"no \*.safetensors weights \(it has \['pytorch_model.bin'\]\): nanostack never unpickles"),
}


@pytest.fixture(scope="module")
def llama_sharded(tmp_path_factory):
    directory = tmp_path_factory.mktemp("llama") / "hf"
    model = build_hf_model("llama", tie_word_embeddings=False)  # an lm_head.weight of its own
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="40KB")
    return directory


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_naming_the_file_and_field(case, llama_sharded, tmp_path):
    directory = tmp_path / "bad"
    shutil.copytree(llama_sharded, directory)
    damage, message = BAD_INPUTS[case]
    damage(directory)
    with pytest.raises(checkpoint.CheckpointError, match=message):
        hf.import_hf(directory)


def test_the_command_line_says_one_error_line_and_writes_nothing(llama_sharded, tmp_path):
    from nanostack.cli import run
    directory = tmp_path / "bad"
    shutil.copytree(llama_sharded, directory)
    _edit_config(directory, rope_parameters={"rope_type": "longrope", "factor": 2.0})
    with pytest.raises(SystemExit) as exited:
        run(lambda: quant.main(["--model", str(directory), "--out", str(tmp_path / "q")]))
    message = str(exited.value.code)
    assert message.startswith("error: ") and "\n" not in message and "config.json" in message and "longrope" in message
    assert not (tmp_path / "q").exists()

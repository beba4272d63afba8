"""Export a model to ONNX, one decoder step over a KV cache, fp32 and int8, for ONNX Runtime.

    python -m nanostack.onnx_export --model out/sft --out out/onnx
    python -m nanostack.onnx_runtime --model out/onnx --chat true --prompt "what does json.dumps do?"

The output directory holds model.onnx (fp32), model.int8.onnx (ONNX Runtime's dynamic quantization of it: int8
weights, activations quantized per batch), the tokenizer files and onnx_config.json (opset, inputs and outputs
with their axes, the tokenizer's fingerprint, the source). `--model` takes what every nanostack tool takes: a
checkpoint or run directory, or a Hugging Face model directory (llama, mistral, qwen2, qwen3, mixtral, qwen3_moe).

One graph serves both phases, so the weights are stored once: a prompt is a step with a past of length 0 (prefill),
each new token a step with T = 1 whose past is the previous present (decode). Its signature, and how the runner
uses it, are in nanostack/onnx_runtime.py. `DecoderWithPast` is the nn.Module that is exported: it runs the
model's own blocks, handing each attention a `PastKV` (the same `attend` interface as model.KVCache) that appends
the step's K/V to the past and attends under the attention mask. Two parts are the wrapper's own:

- padding: attention_mask becomes model.attention's doc_ids, so real tokens see only real tokens (and padding
  only padding, which keeps its softmax finite); RoPE positions count from each row's first real token.
- MoE: the model dispatches by sorting tokens by expert and splitting by per-expert counts read back to the host,
  which a graph cannot hold. Here each expert gathers the tokens routed to it with nonzero(): torch.export keeps
  the data-dependent count as a symbolic size and ONNX as a dynamic axis, and every token still runs only its k
  experts (a dense "every expert, gated" graph would do n_expert / k times the work). The routing itself is the
  model's (MoE.route).

The exporter is torch.onnx's dynamo one (torch.export, then onnxscript): it is torch's default (the TorchScript
exporter is deprecated), it handles data-dependent sizes such as nonzero's, and named dynamic axes make it refuse,
rather than silently bake in, code that would fix one. The dynamic axes are the batch, the new tokens (seq) and
the past, whose length may be 0 in the same graph.
"""
import dataclasses
import logging
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir
import onnxruntime
import torch
import torch.nn as nn
from onnxruntime.quantization import QuantType, quantize_dynamic

from nanostack.atomic import atomic_dir, write_json
from nanostack.checkpoint import load_checkpoint, read_config, read_json
from nanostack.cli import add_dataclass_args, dataclass_from_args, make_parser, run
from nanostack.model import GPT, MoE, attention, swiglu
from nanostack.onnx_runtime import FP32_GRAPH, GRAPH_FORMAT, INT8_GRAPH, OnnxDecoder, tokenizer_fingerprint
from nanostack.tokenizer import Tokenizer

MIN_OPSET = 18  # the first opset the dynamo exporter writes
CHECK_PROMPT_TOKENS = 16  # the export's own check: a random prompt this long through ONNX Runtime and PyTorch
INPUTS = {"input_ids": ["batch", "seq"], "attention_mask": ["batch", "past + seq"],
          "past_keys": ["n_layer", "batch", "past", "n_kv_head", "head_dim"],
          "past_values": ["n_layer", "batch", "past", "n_kv_head", "head_dim"]}
OUTPUTS = {"logits": ["batch", "seq", "vocab_size"],
           "present_keys": ["n_layer", "batch", "past + seq", "n_kv_head", "head_dim"],
           "present_values": ["n_layer", "batch", "past + seq", "n_kv_head", "head_dim"]}


class PastKV:
    """The `kv_cache` of an exported step: past K/V in, this step's K/V appended, every layer's present kept."""

    def __init__(self, past_keys, past_values, attention_mask):
        self.past_keys, self.past_values, self.attention_mask = past_keys, past_values, attention_mask
        self.present_keys, self.present_values = [], []

    def attend(self, layer_idx: int, q, k, v, window: int = 0) -> torch.Tensor:
        """Attention of q (B, T, n_head, hd) over the past and this step's k/v (B, T, n_kv_head, hd)."""
        k = torch.cat([self.past_keys[layer_idx], k], dim=1)  # (B, P + T, n_kv_head, hd)
        v = torch.cat([self.past_values[layer_idx], v], dim=1)
        self.present_keys.append(k)
        self.present_values.append(v)
        return attention(q, k, v, causal=True, doc_ids=self.attention_mask, window=window)


class MoEForExport(nn.Module):
    """The MoE layer routed as the model routes, each expert run on the tokens that chose it (module docstring).
    Each expert's matrices are parameters of their own (views, no copy), so the graph holds them as separate
    initializers that int8 quantization treats like any other linear: per output channel."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe

        def per_expert(stacked):  # (n_expert, out, in) -> n_expert (out, in) views
            return nn.ParameterList(nn.Parameter(w, requires_grad=False) for w in stacked.detach().unbind(0))
        self.w_gate, self.w_up, self.w_down = (per_expert(w) for w in (moe.experts.w_gate, moe.experts.w_up,
                                                                          moe.experts.w_down))

    def forward(self, x):
        x_flat = x.reshape(-1, x.shape[-1])  # (N, n_embd)
        _, _, gates, chosen = self.moe.route(x_flat)  # (N, k) each
        y = torch.zeros_like(x_flat)
        for expert in range(self.moe.n_expert):
            token, slot = torch.nonzero(chosen == expert, as_tuple=True)  # (M,) each: M tokens chose this expert
            out = swiglu(x_flat[token], self.w_gate[expert], self.w_up[expert], self.w_down[expert])  # (M, n_embd)
            y = y.index_add(0, token, out * gates[token, slot, None].to(out.dtype))
        return y.view_as(x)


class DecoderWithPast(nn.Module):
    """What is exported: tokens + attention mask + past K/V -> logits + present K/V (shapes in INPUTS, OUTPUTS)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        self.mlps = nn.ModuleList(MoEForExport(layer.mlp) if isinstance(layer.mlp, MoE) else layer.mlp
                                  for layer in model.layers)

    def forward(self, input_ids, attention_mask, past_keys, past_values):
        model = self.model
        seq_len = input_ids.shape[1]
        # Left padding: each row's first real token is position 0.
        positions = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)[:, -seq_len:]  # (B, T)
        cos, sin = model.rope_cos[positions], model.rope_sin[positions]  # (B, T, hd)
        cache = PastKV(past_keys, past_values, attention_mask)
        x = model.tok_emb(input_ids)  # (B, T, n_embd)
        for layer, mlp in zip(model.layers, self.mlps):  # Block.forward, with the exportable MoE
            x = x + layer.attn(layer.attn_norm(x), cos, sin, kv_cache=cache)
            x = x + mlp(layer.mlp_norm(x))
        # (B, T, vocab), (n_layer, B, P + T, n_kv_head, hd) twice
        return model.lm_logits(x), torch.stack(cache.present_keys), torch.stack(cache.present_values)


def example_inputs(model: GPT) -> tuple:
    """Inputs to trace with: batch 2, 3 new tokens, a past of 2; every dynamic size >= 2, so that none is
    specialised to the 0 or 1 it may take later."""
    n_layer, n_kv_head, head_dim = model.kv_layout()
    past = torch.zeros(n_layer, 2, 2, n_kv_head, head_dim)  # (n_layer, B, P, n_kv_head, hd)
    return torch.zeros(2, 3, dtype=torch.int64), torch.ones(2, 5, dtype=torch.int64), past, past.clone()


def export_onnx(model: GPT, tokenizer: Tokenizer, out_dir, *, opset: int = MIN_OPSET, int8: bool = True,
                source: str = "", tokenizer_source: str = "") -> Path:
    """Write model.onnx (+ model.int8.onnx), the tokenizer and onnx_config.json to out_dir, atomically."""
    max_opset = onnx.defs.onnx_opset_version()
    if not MIN_OPSET <= opset <= max_opset:
        raise ValueError(f"opset {opset} is not supported: the dynamo exporter writes opsets {MIN_OPSET}.."
                         f"{max_opset} (onnx {onnx.__version__})")
    if getattr(model, "quantization", None):
        raise ValueError(f"the model is int8-quantized ({model.quantization}); export its full-precision source "
                         f"(model.int8.onnx is ONNX Runtime's int8 of it)")
    if model.norm.weight.dtype != torch.float32:
        raise ValueError(f"the model is in {model.norm.weight.dtype}; export it in float32 (load_checkpoint's default)")
    wrapper = DecoderWithPast(model.eval()).eval()
    batch, seq, past = torch.export.Dim("batch"), torch.export.Dim("seq"), torch.export.Dim("past", min=0)
    # attention_mask's length is past + seq, a sum torch.export infers but cannot be told.
    dynamic_shapes = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: torch.export.Dim.DYNAMIC},
                      "past_keys": {1: batch, 2: past}, "past_values": {1: batch, 2: past}}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own axis names and deprecations inside it
        program = torch.onnx.export(wrapper, example_inputs(model), dynamo=True, opset_version=opset,
                                    input_names=list(INPUTS), output_names=list(OUTPUTS),
                                    dynamic_shapes=dynamic_shapes, verbose=False)
    mask = program.model.graph.inputs[1]
    mask.shape = onnx_ir.Shape([mask.shape[0], INPUTS["attention_mask"][1]])  # the sum's name, not a new symbol
    metadata = {"format": GRAPH_FORMAT, "max_seq_len": str(model.config.max_seq_len),
                "tokenizer_fingerprint": tokenizer_fingerprint(tokenizer), "tokenizer_name": tokenizer.name,
                "tokenizer_vocab_size": str(tokenizer.vocab_size), "tokenizer_source": tokenizer_source,
                "source": source}
    program.model.metadata_props.update(metadata)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:  # nothing is published unless ONNX Runtime runs the graph
        program.save(tmp / FP32_GRAPH)
        tokenizer.save(tmp / "tokenizer.json")  # a Hugging Face tokenizer writes its companion files too
        tokenizer_files = sorted(p.name for p in tmp.iterdir() if p.suffix == ".json")
        prompt_tokens = min(CHECK_PROMPT_TOKENS, model.config.max_seq_len)
        check = {"prompt_tokens": prompt_tokens,
                 "max_logits_difference": check_against_pytorch(model, tmp, opset, prompt_tokens)}
        graphs = {"fp32": FP32_GRAPH}
        if int8:
            quantize_int8(tmp / FP32_GRAPH, tmp / INT8_GRAPH)
            graphs["int8"] = INT8_GRAPH
        write_json(tmp / "onnx_config.json", {
            "graphs": graphs, "opset": opset, "inputs": INPUTS, "outputs": OUTPUTS, "metadata": metadata,
            "model": dataclasses.asdict(model.config), "tokenizer_files": tokenizer_files,
            "check_against_pytorch": check, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__})
    return out_dir


def check_against_pytorch(model: GPT, directory: Path, opset: int, prompt_tokens: int) -> float:
    """Max |logits difference| between the fp32 graph in ONNX Runtime and PyTorch on a random prompt."""
    try:
        decoder = OnnxDecoder(directory)
    except ValueError as error:  # e.g. an opset newer than this ONNX Runtime runs
        raise ValueError(f"{error} (the graph has opset {opset}; --opset {MIN_OPSET} is known to work)") from None
    ids = torch.randint(0, model.config.vocab_size, (1, prompt_tokens), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids)[0].numpy()
    return float(np.abs(decoder.logits([ids[0].tolist()])[0] - expected).max())


def quantize_int8(fp32_path: Path, int8_path: Path) -> None:
    """ONNX Runtime's dynamic quantization: the weights of every linear (the router's aside) to int8 per output
    channel and the embedding table per tensor; activations quantized on the fly from their own range. The
    graph's metadata (the tokenizer's fingerprint) comes along."""
    graph = onnx.load(fp32_path, load_external_data=False).graph
    # The router stays fp32, as quant.py's DEFAULT_SKIP keeps it: a rounded score can send a token elsewhere.
    # (The quantizer first rewrites a Gemm as a MatMul named "<name>_MatMul", then looks the names up.)
    router = [name for node in graph.node if any(".router." in value for value in node.input)
              for name in (node.name, f"{node.name}_MatMul")]
    quantize_dynamic(fp32_path, int8_path, weight_type=QuantType.QInt8, per_channel=True,
                     op_types_to_quantize=["MatMul", "Gemm", "Gather"], nodes_to_exclude=router,
                     use_external_data_format=Path(f"{fp32_path}.data").exists())  # over 2 GB


# ----------------------------------------------------------------------------------------------------------
# Command line

@dataclass
class ExportConfig:
    model: str = "out/pretrain"     # checkpoint (or run) directory, or a Hugging Face model directory, to export
    out: str = "out/onnx"           # output directory: model.onnx, model.int8.onnx, tokenizer, onnx_config.json
    opset: int = MIN_OPSET          # ONNX opset of the graphs: 18 and up (the export checks ONNX Runtime runs it)
    int8: bool = True               # also write model.int8.onnx (ONNX Runtime's dynamic int8 quantization)


def main(argv=None) -> int:
    logging.disable(logging.WARNING)  # the exporter's and the quantizer's notes are not the user's to act on
    parser = make_parser(__doc__, prog="python -m nanostack.onnx_export")
    add_dataclass_args(parser, ExportConfig, "ONNX export")
    config = dataclass_from_args(ExportConfig, parser.parse_args(argv))
    _, raw = read_config(config.model)
    if raw.get("quantization"):
        raise ValueError(f"{config.model} holds an int8-quantized model (mode {raw['quantization'].get('mode')}): "
                         f"export its full-precision source ({raw['quantization'].get('source')}); "
                         f"--int8 true writes ONNX Runtime's int8 graph beside the fp32 one")
    loaded = load_checkpoint(config.model)
    model = loaded["model"].eval()
    tokenizer_path = loaded["directory"] / loaded["raw_config"].get("tokenizer", "tokenizer.json")
    start = time.perf_counter()
    out = export_onnx(model, loaded["tokenizer"], config.out, opset=config.opset, int8=config.int8,
                      source=str(loaded["directory"]), tokenizer_source=str(tokenizer_path))
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 1e6:.2f} MB" for p in sorted(out.glob("*.onnx*")))
    print(f"exported {loaded['directory']} to {out} in {time.perf_counter() - start:.0f} s (opset {config.opset}): "
          f"{sizes}")
    check = read_json(out / "onnx_config.json")["check_against_pytorch"]
    print(f"ONNX Runtime fp32 vs PyTorch on a {check['prompt_tokens']}-token prompt: max |logits difference| "
          f"{check['max_logits_difference']:.2e}")
    print(f"run it: python -m nanostack.onnx_runtime --model {out} --prompt \"def \"")
    return 0


if __name__ == "__main__":
    run(main)

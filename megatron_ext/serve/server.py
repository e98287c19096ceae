"""`megatron-ext serve`: vLLM's OpenAI-compatible server for an export (a checkpoint is exported first).

Everything the user can get wrong is checked before vLLM starts: vLLM installed, the model found, its
RoPE servable. The server itself is vLLM's (`python -m vllm.entrypoints.openai.api_server`): this process
execs it, in this Python (the serving environment), with the settings a CPU or GPU host needs; extra vLLM
arguments pass through. Imports megatron_ext.convert/checkpoint only when a checkpoint must be exported.
"""

import importlib.util
import logging
import os
import sys
from pathlib import Path

from megatron_ext.errors import MissingFile
from megatron_ext.serve.export_rope import HARPE_ARCHITECTURES, ServeError, check_harpe_export, serving_rope

log = logging.getLogger("megatron_ext")

INSTALL_HINT = ("install the serving environment: `make serve-env` (then run .venv-serve/bin/megatron-ext serve), "
                "or pip install 'megatron_ext[serve]' on a GPU host / 'megatron_ext[serve-cpu]' on a CPU host")
CPU_KV_CACHE_GIB = 1  # vLLM's default reserves 92% of memory on CPU (refused on a 24 GiB machine)


def require_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        raise ServeError(f"vLLM is not installed in this Python ({sys.executable}): {INSTALL_HINT}")


def export_dir_for(model: str, export_root: str | None, tokenizer: str | None = None) -> Path:
    """The Hugging Face directory to serve: `model` itself if it is one, else its checkpoint's export (made once,
    under EXPORT_ROOT/iter_XXXXXXX, by default <checkpoint root>/hf_exports)."""
    path = Path(model).expanduser()
    if (path / "config.json").is_file():
        return path.absolute()
    from megatron_ext.checkpoint.state import read_checkpoint

    saved = read_checkpoint(path, setting="--model")
    out = Path(export_root or saved.path.parent / "hf_exports").expanduser().absolute() / saved.path.name
    if (out / "config.json").is_file():
        log.info(f"megatron_ext: serving {out} (exported from {saved.path} before)")
        return out
    from megatron_ext.convert import mcore_to_hf

    return mcore_to_hf(saved.path, out, tokenizer=tokenizer)


def check_servable(export: Path, max_model_len: int | None) -> dict:
    """Refuse what vLLM would serve wrong; the environment vLLM needs for this export."""
    from megatron_ext.convert.hf_directory import check_hf_directory, read_json_object

    config = read_json_object(export / "config.json")
    architecture = (config.get("architectures") or ["?"])[0]
    harpe = architecture in HARPE_ARCHITECTURES
    if harpe:
        check_harpe_export(config, architecture)
        rope = serving_rope(config)
    # What eval and convert refuse of a Hugging Face directory (custom code, pickle-only weights, files outside
    # it, safetensors headers that lie), vLLM must not be handed either.
    check_hf_directory(export)
    if harpe:
        groups = config.get("num_key_value_heads") or config["num_attention_heads"]
        log.info(f"megatron_ext: {architecture} through megatron_ext's vLLM plugin: {rope.describe(groups)}")
    env = {}
    trained = config.get("max_position_embeddings")
    if max_model_len and trained and max_model_len > trained:
        # vLLM refuses lengths past max_position_embeddings unless told; serving past the trained window is
        # what a HARPE / YaRN model is for, and the user asked for it by name.
        log.info(f"megatron_ext: --max-model-len {max_model_len} exceeds the export's max_position_embeddings "
                 f"({trained}); allowed explicitly (VLLM_ALLOW_LONG_MAX_MODEL_LEN=1)")
        env["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"
    return env


def vllm_command(export: Path, *, host: str, port: int, max_model_len: int | None, tensor_parallel_size: int,
                 dtype: str, on_gpu: bool, extra: list[str]) -> list[str]:
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(export),
               "--host", host, "--port", str(port), "--dtype", dtype,
               "--tensor-parallel-size", str(tensor_parallel_size)]
    if not any(arg.startswith("--load-format") for arg in extra):
        command += ["--load-format", "safetensors"]  # never vLLM's fallback to pickled .bin weights
    if max_model_len:
        command += ["--max-model-len", str(max_model_len)]
    if not on_gpu and not any(arg.startswith(("--kv-cache-memory", "--gpu-memory-utilization")) for arg in extra):
        command += ["--kv-cache-memory-bytes", str(CPU_KV_CACHE_GIB << 30)]
    return command + extra


def gpu_present() -> bool:
    import torch

    return torch.cuda.is_available()


def run_serve(args) -> int:
    if not Path(args.model).expanduser().exists():
        raise MissingFile(f"--model ({args.model!r}) does not exist: give an exported model directory or a checkpoint")
    if not (Path(args.model).expanduser() / "config.json").is_file():
        require_vllm()  # before a checkpoint's export, the work vLLM would then not serve
    export = export_dir_for(args.model, args.export_dir, getattr(args, "tokenizer", None))
    env = check_servable(export, args.max_model_len)
    require_vllm()
    command = vllm_command(export, host=args.host, port=args.port, max_model_len=args.max_model_len,
                           tensor_parallel_size=args.tensor_parallel_size, dtype=args.dtype, on_gpu=gpu_present(),
                           extra=list(args.vllm_args))
    log.info(f"megatron_ext: serving {export} at http://{args.host}:{args.port}/v1 (vLLM's OpenAI server)")
    for handler in logging.getLogger().handlers:
        handler.flush()
    # This process becomes vLLM's server: signals (Ctrl-C, a scheduler's SIGTERM) reach it and its engine directly.
    os.execve(command[0], command, {**os.environ, **env})

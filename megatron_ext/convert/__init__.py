"""Hugging Face (Llama / Mistral / Qwen2, safetensors) <-> megatron_ext checkpoints, RoPE settings kept.

    hf_to_mcore(hf_dir, out_dir, tp=1, pp=1)      streamed, checked before anything is written
    mcore_to_hf(checkpoint, out_dir)              from any TP/PP the checkpoint was saved with

Modules: adapters (one per family: a name table + named transforms), hf_io (safetensors in/out, tokenizer
files), mcore_io (the one importing megatron), from_hf / to_hf (the two directions), cli. The HF RoPE forms
<-> RopeConfig are megatron_ext.rope.hf_forms (the transformers loader and the vLLM plugin read them too). Importing this package imports neither megatron nor torch:
the command-line parser imports convert/cli.py, and `megatron-ext --help` must stay fast.
"""

from typing import TYPE_CHECKING

from megatron_ext.errors import ConversionError
from megatron_ext.lazy import lazy_getattr

_LOADED_ON_FIRST_USE = {
    "hf_to_mcore": "megatron_ext.convert.from_hf",
    "mcore_to_hf": "megatron_ext.convert.to_hf",
}

if TYPE_CHECKING:
    from megatron_ext.convert.from_hf import hf_to_mcore
    from megatron_ext.convert.to_hf import mcore_to_hf

__all__ = ["ConversionError", "hf_to_mcore", "mcore_to_hf"]

__getattr__ = lazy_getattr(__name__, _LOADED_ON_FIRST_USE)

"""Opt-in: megatron-core's own RotaryEmbedding on a CPU, for tests and benchmarks that compare with it.

megatron_ext's model never builds it (position_embedding_type='none', its own rotation), so
prepare_megatron() leaves it alone; call `enable_stock_rope_on_cpu()` to build the stock RoPE
without CUDA. Imports torch, megatron.core and megatron_ext.compat only.
"""
from __future__ import annotations

import importlib

import torch

from megatron_ext.compat.cpu_torch import (
    CPU_TORCH,
    cuda_is_identity,
    override_while_running,
    use_cpu_torch_in,
)
from megatron_ext.compat.patches import PatchGroup

__all__ = ["STOCK_ROPE_PATCHES", "describe_stock_rope_patches", "enable_stock_rope_on_cpu"]

STOCK_ROPE_PATCHES = PatchGroup("stock megatron RoPE on CPU")
_EMBEDDINGS = "megatron.core.models.common.embeddings"


@STOCK_ROPE_PATCHES.patch(
    "rotary_embedding_on_cpu",
    "models/common/embeddings/{rotary,yarn_rotary}_pos_embedding.py: get_emb moves "
    "inv_freq to torch.cuda.current_device() at the first forward")
def _rotary_embedding_on_cpu():
    use_cpu_torch_in(f"{_EMBEDDINGS}.rotary_pos_embedding",
                     f"{_EMBEDDINGS}.yarn_rotary_pos_embedding")


@STOCK_ROPE_PATCHES.patch(
    "rope_cp_slice_on_cpu",
    "models/common/embeddings/rope_utils.py: get_pos_emb_on_this_cp_rank (RoPE with CP>1) "
    "builds its chunk index with pin_memory=True and .cuda()")
def _rope_cp_slice_on_cpu():
    rope_utils = importlib.import_module(f"{_EMBEDDINGS}.rope_utils")
    rope_utils.torch = CPU_TORCH
    cp_slice = override_while_running(rope_utils, "get_pos_emb_on_this_cp_rank", "cuda",
                                      cuda_is_identity)
    for importer in ("rotary_pos_embedding", "yarn_rotary_pos_embedding"):  # imported by name
        importlib.import_module(f"{_EMBEDDINGS}.{importer}").get_pos_emb_on_this_cp_rank = cp_slice


def enable_stock_rope_on_cpu(force: bool = False) -> list[str]:
    """Let megatron's stock RoPE run without CUDA; [] (nothing to do) when CUDA is available."""
    if torch.cuda.is_available() and not force:
        return []
    return STOCK_ROPE_PATCHES.apply()


def describe_stock_rope_patches() -> str:
    """The stock-RoPE patches as a two-column table: name | why."""
    return STOCK_ROPE_PATCHES.describe()

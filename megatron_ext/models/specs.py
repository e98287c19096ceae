"""Layer specs: Transformer Engine layers on GPU when TE imports, megatron-core local layers + SDPA otherwise.

The CPU and GPU paths differ here only; the model code is the same.
"""

import logging

import torch
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_ext.compat.extras import transformer_engine_available
from megatron_ext.models.attention import PositionIdSelfAttention
from megatron_ext.models.core_attention import SDPACoreAttention

log = logging.getLogger("megatron_ext")


def local_layer_spec(normalization: str = "RMSNorm", qk_layernorm: bool = False) -> ModuleSpec:
    """megatron-core local layers, our attention, SDPA core attention (CPU, or GPU without TE)."""
    spec = get_gpt_layer_local_spec(normalization=normalization, qk_layernorm=qk_layernorm)
    attention = spec.submodules.self_attention
    attention.module = PositionIdSelfAttention
    attention.submodules.core_attention = SDPACoreAttention
    return spec


def te_layer_spec(qk_layernorm: bool = False) -> ModuleSpec:
    """Transformer Engine layers (fused LayerNorm+linear, TE attention) with our attention class."""
    spec = get_gpt_layer_with_transformer_engine_spec(qk_layernorm=qk_layernorm)
    spec.submodules.self_attention.module = PositionIdSelfAttention
    return spec


def layer_spec(use_transformer_engine: bool | None = None, *, normalization: str = "RMSNorm",
               qk_layernorm: bool = False) -> ModuleSpec:
    """Pick the layer spec; None chooses TE when CUDA and TE are both there. Logs the choice."""
    if use_transformer_engine is None:
        use_transformer_engine = torch.cuda.is_available() and transformer_engine_available()
    if use_transformer_engine:
        log.info("megatron_ext: layer spec = Transformer Engine (fused layers, TE attention)")
        return te_layer_spec(qk_layernorm=qk_layernorm)
    log.info("megatron_ext: layer spec = megatron-core local layers + torch SDPA attention")
    return local_layer_spec(normalization=normalization, qk_layernorm=qk_layernorm)

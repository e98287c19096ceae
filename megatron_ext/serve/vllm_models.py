"""vLLM models for HARPE exports: vLLM's own Llama / Mistral / Qwen2, each attention rotating per KV group.

An export named Harpe<Family>ForCausalLM (see megatron_ext.convert.adapters.HARPE_PREFIX) is built as the
stock vLLM model of its family, whose weights, kernels, KV cache and parallel layers stay vLLM's; only
each attention layer's `rotary_emb` becomes a GroupedRotary holding the bases of the KV groups of this
tensor-parallel rank. Imported by vLLM's model registry inside its worker processes (needs vllm).
"""

from contextlib import contextmanager

import torch
from vllm.distributed import get_tensor_model_parallel_rank, get_tensor_model_parallel_world_size
from vllm.model_executor.models.llama import LlamaForCausalLM
from vllm.model_executor.models.mistral import MistralForCausalLM
from vllm.model_executor.models.qwen2 import Qwen2ForCausalLM

from megatron_ext.rope.config import RopeConfig
from megatron_ext.serve.export_rope import check_harpe_export, serving_rope
from megatron_ext.serve.rotary import GroupedRotary


@contextmanager
def stock_rope_while_building(hf_config, base: float):
    """The family's constructor asks vLLM's get_rope for the config's RoPE, which knows no 'harpe': while it
    runs the config says plain RoPE at `base` (that rotary module is replaced right after), then its own again."""
    exported = hf_config.rope_parameters
    hf_config.rope_parameters = {"rope_type": "default", "rope_theta": base}
    try:
        yield
    finally:
        hf_config.rope_parameters = exported


def fused_rotary_kernel(stock_rotary: torch.nn.Module):
    """vLLM's fused rotary kernel where this engine would run it for the stock model, else None (torch ops).

    vLLM enables its rotary custom op unless torch.compile's inductor is on (then it traces plain torch ops,
    which inductor fuses itself); the plugin follows the same decision, read from the stock module it replaces,
    and uses the kernel only where this build has one (CPU and CUDA builds do)."""
    enabled = getattr(type(stock_rotary), "enabled", None)
    if enabled is None or not enabled() or not hasattr(torch.ops._C, "rotary_embedding"):
        return None
    from vllm import _custom_ops

    return _custom_ops.rotary_embedding


def use_grouped_rotary(model: torch.nn.Module, rope: RopeConfig, *, max_position: int, dtype: torch.dtype) -> int:
    """Give every attention layer of a built vLLM model the per-KV-group rotation (one module, one cos/sin table
    of max_position rows, shared by the layers); returns how many layers."""
    tp_size, tp_rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    swapped, shared = 0, None
    for attention in model.modules():
        if not hasattr(attention, "rotary_emb") or not hasattr(attention, "total_num_kv_heads"):
            continue
        if shared is None:
            shared = GroupedRotary(rope, head_dim=attention.head_dim, num_heads=attention.total_num_heads,
                                   num_kv_heads=attention.total_num_kv_heads, tp_size=tp_size, tp_rank=tp_rank,
                                   max_position=max_position, dtype=dtype,
                                   fused_rotary=fused_rotary_kernel(attention.rotary_emb))
        attention.rotary_emb = shared
        swapped += 1
    if swapped == 0:
        raise RuntimeError(f"{type(model).__name__}: no attention layer with a rotary_emb found; this vLLM "
                           f"version lays its models out differently from the one megatron_ext.serve knows")
    return swapped


class HarpeModelMixin:
    """Builds the stock family model, then swaps its rotations (see the module docstring)."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        hf_config = vllm_config.model_config.hf_config
        config_dict = hf_config.to_dict()
        check_harpe_export(config_dict, type(self).__name__)
        rope = serving_rope(config_dict)
        with stock_rope_while_building(hf_config, rope.base):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        model_config = vllm_config.model_config
        use_grouped_rotary(self, rope, max_position=model_config.max_model_len, dtype=model_config.dtype)


class HarpeLlamaForCausalLM(HarpeModelMixin, LlamaForCausalLM):
    pass


class HarpeMistralForCausalLM(HarpeModelMixin, MistralForCausalLM):
    pass


class HarpeQwen2ForCausalLM(HarpeModelMixin, Qwen2ForCausalLM):
    pass

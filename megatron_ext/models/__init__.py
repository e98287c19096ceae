"""megatron-core integration: the rotary provider, our attention, layer specs, LongContextGPTModel."""

from megatron_ext.models.config import LongContextTransformerConfig
from megatron_ext.models.gpt import LongContextGPTModel
from megatron_ext.models.provider import RotaryProvider
from megatron_ext.models.specs import layer_spec, local_layer_spec, te_layer_spec

__all__ = [
    "LongContextGPTModel",
    "LongContextTransformerConfig",
    "RotaryProvider",
    "layer_spec",
    "local_layer_spec",
    "te_layer_spec",
]

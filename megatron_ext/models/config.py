"""LongContextTransformerConfig: megatron-core's TransformerConfig plus the RoPE settings of megatron_ext."""

from dataclasses import dataclass, field

from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_ext.rope.config import RopeConfig


@dataclass
class LongContextTransformerConfig(TransformerConfig):
    """TransformerConfig that carries how queries and keys are rotated (`rope`).

    The attention layers read `rope` when they are built, so every layer and every pipeline
    stage agree on the bases without passing them around.
    """

    rope: RopeConfig = field(default_factory=RopeConfig)

    def __post_init__(self):
        super().__post_init__()
        tp = self.tensor_model_parallel_size
        if self.num_attention_heads % tp != 0:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"tensor_model_parallel_size ({tp}): pick a TP size that divides the heads"
            )
        self.rope.validate(num_attention_heads=self.num_attention_heads,
                           num_query_groups=self.num_query_groups)
        if self.apply_rope_fusion:
            raise ValueError(
                "apply_rope_fusion=True routes RoPE to Transformer Engine's fused kernel, which takes "
                "one table for all heads and no position ids: set apply_rope_fusion=False"
            )

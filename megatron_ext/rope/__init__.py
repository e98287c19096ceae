"""RoPE math: frequencies, per-head bases (HARPE), PoSE position ids, the rotation. Pure torch, no megatron."""

from megatron_ext.rope.apply import apply_rotary, apply_rotary_qk
from megatron_ext.rope.bases import head_base_strategies, head_bases, validate_head_bases
from megatron_ext.rope.config import RopeConfig
from megatron_ext.rope.pose import pose_position_ids
from megatron_ext.rope.scaling import rope_inv_freq, rope_types, validate_rope_params

__all__ = [
    "RopeConfig",
    "apply_rotary",
    "apply_rotary_qk",
    "head_base_strategies",
    "head_bases",
    "pose_position_ids",
    "rope_inv_freq",
    "rope_types",
    "validate_head_bases",
    "validate_rope_params",
]

"""RopeConfig: one RoPE scaling plus one base per KV group (HARPE) or one for all heads.

Pure python/torch: must not import megatron. The model and the training config both hold one.
"""

from dataclasses import dataclass, field
from typing import ClassVar

import torch

from megatron_ext.rope.bases import head_bases, validate_head_bases
from megatron_ext.rope.scaling import follows_sequence_length, is_valid_base, rope_inv_freq, validate_rope_params


@dataclass
class RopeConfig:
    """How queries and keys are rotated.

    base:             the RoPE base when every head shares one (stock RoPE, or any scaling).
    scaling:          a rope type from megatron_ext.rope.scaling (default, linear, ntk, dynamic,
                      yarn, yarn_pose, llama3, abf) and its parameters.
    head_base_strategy: None for one base everywhere, or a strategy from megatron_ext.rope.bases
                      (uniform, peak_valley, explicit, harpe_llama2_7b_table2, ...) that gives one
                      base per KV group (per head without GQA): HARPE. `group_bases()` gives the
                      list of bases it makes (what checkpoints and HF exports record as `head_bases`).
    rotary_percent:   fraction of each head's channels that is rotated.
    """

    # old name -> new name, read by megatron_ext.config.reader (the old name warns for one release)
    RENAMED_SETTINGS: ClassVar[dict[str, str]] = {"head_bases": "head_base_strategy"}
    ON_RESUME: ClassVar[str] = "fixed"  # the positions a model sees (megatron_ext.config.train's resume classes)

    base: float = 10000.0
    scaling: str = "default"
    scaling_params: dict = field(default_factory=dict)
    head_base_strategy: str | None = None
    head_base_params: dict = field(default_factory=dict)
    rotary_percent: float = 1.0

    def validate(self, *, num_attention_heads: int, num_query_groups: int | None = None) -> None:
        """Raise ValueError naming the setting and the fix; cheap, call before any work."""
        groups = num_query_groups or num_attention_heads
        if not is_valid_base(self.base):
            raise ValueError(f"rope.base ({self.base}) must be > 1: use e.g. 10000 (Llama-2) or 500000 (Llama-3)")
        if not 0.0 < self.rotary_percent <= 1.0:
            raise ValueError(f"rope.rotary_percent ({self.rotary_percent}) must be in (0, 1]")
        if num_attention_heads % groups != 0:
            raise ValueError(
                f"num_attention_heads ({num_attention_heads}) must be divisible by "
                f"num_query_groups ({groups})"
            )
        validate_rope_params(self.scaling, **self.scaling_params)
        self.group_bases(groups)

    def group_bases(self, num_query_groups: int) -> torch.Tensor:
        """One base per KV group, float64 [num_query_groups]."""
        if self.head_base_strategy is None:
            return torch.full((num_query_groups,), float(self.base), dtype=torch.float64)
        bases = head_bases(self.head_base_strategy, num_query_groups, **self.head_base_params)
        return validate_head_bases(bases, num_query_groups)

    @property
    def per_head(self) -> bool:
        return self.head_base_strategy is not None

    def rotary_dim(self, kv_channels: int) -> int:
        dim = int(kv_channels * self.rotary_percent)
        if dim % 2 != 0 or dim == 0:
            raise ValueError(
                f"rope.rotary_percent ({self.rotary_percent}) x kv_channels ({kv_channels}) = {dim} "
                "rotary channels; it must be even and > 0"
            )
        return dim

    def inv_freq(self, bases: torch.Tensor, rotary_dim: int, seq_len: int | None = None):
        """Inverse frequencies for the given bases: ([len(bases), rotary_dim/2] fp32, attention factor).

        seq_len is the current length, used by the dynamic scaling only.
        """
        params = dict(self.scaling_params)
        if self.follows_sequence_length and seq_len is not None:
            params["seq_len"] = seq_len
        rows, factors = zip(*(rope_inv_freq(self.scaling, base=float(b), dim=rotary_dim, **params) for b in bases))
        return torch.stack(rows), factors[0]

    @property
    def follows_sequence_length(self) -> bool:
        """The frequencies depend on the current length (dynamic NTK): recomputed per forward, no rotated-key cache."""
        return follows_sequence_length(self.scaling)

    def describe(self, num_query_groups: int) -> str:
        """One line for people: base, scaling and, for HARPE, the bases per KV group."""
        text = f"base {self.base:g}, scaling {self.scaling}"
        if self.scaling_params:
            text += " " + ", ".join(f"{k}={v}" for k, v in self.scaling_params.items())
        if self.head_base_strategy is not None:
            bases = self.group_bases(num_query_groups).tolist()
            shown = ", ".join(f"{b:.6g}" for b in bases[:8]) + (", ..." if len(bases) > 8 else "")
            text += f"; HARPE {self.head_base_strategy} bases per KV group [{shown}]"
        if self.rotary_percent != 1.0:
            text += f"; rotary_percent {self.rotary_percent}"
        return text

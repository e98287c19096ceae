"""RotaryProvider: the RoPE frequencies of this tensor-parallel rank's KV groups, applied from position ids.

Imports the pure math from megatron_ext.rope only; megatron is touched in attention.py / gpt.py.
"""

import torch

from megatron_ext.rope.apply import apply_rotary_qk
from megatron_ext.rope.config import RopeConfig


class RotaryProvider(torch.nn.Module):
    """Rotates q [s, b, h_local, d] and k [s, b, g_local, d] with this rank's bases.

    Tensor parallelism splits the KV groups into contiguous blocks, one per rank (megatron's
    linear_qkv order), so rank r holds groups [r*g/tp, (r+1)*g/tp) and takes their bases. When
    the KV groups are fewer than the TP ranks, each rank holds one group, g*r//tp. When all
    local bases are equal, one shared [r/2] frequency row is kept, which is exactly stock RoPE.
    The provider works from whatever positions the rank holds, so PoSE ids and context-parallel
    slices need nothing special.
    """

    def __init__(self, rope: RopeConfig, *, kv_channels: int, num_query_groups: int,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if num_query_groups >= tp_size and num_query_groups % tp_size != 0:
            raise ValueError(
                f"num_query_groups ({num_query_groups}) must be divisible by "
                f"tensor_model_parallel_size ({tp_size}): choose a TP size that divides the KV heads"
            )
        self.rope = rope
        self.rotary_dim = rope.rotary_dim(kv_channels)
        local_groups = max(1, num_query_groups // tp_size)
        first = tp_rank * num_query_groups // tp_size
        bases = rope.group_bases(num_query_groups)[first:first + local_groups]
        self.shared_base = bool((bases == bases[0]).all())
        # Plain attributes, not buffers: Float16Module must not cast them to bf16, and they are
        # derived from the config, so they do not belong in checkpoints.
        self.local_bases = bases[:1] if self.shared_base else bases
        self.inv_freq, self.attention_factor = self._frequencies(seq_len=None)
        self.dynamic_seq_len: int | None = None  # set by the model for scalings that follow the sequence length

    def _frequencies(self, seq_len):
        inv_freq, factor = self.rope.inv_freq(self.local_bases, self.rotary_dim, seq_len=seq_len)
        return (inv_freq[0] if self.shared_base else inv_freq), factor  # [r/2] or [g_local, r/2]

    def frequencies(self, device) -> torch.Tensor:
        if self.rope.follows_sequence_length and self.dynamic_seq_len is not None:
            self.inv_freq, self.attention_factor = self._frequencies(self.dynamic_seq_len)
        if self.inv_freq.device != device:
            self.inv_freq = self.inv_freq.to(device)
        return self.inv_freq

    def forward(self, query: torch.Tensor, key: torch.Tensor, position_ids: torch.Tensor):
        """position_ids: [b, s] or [1, s], the positions of this rank's tokens."""
        inv_freq = self.frequencies(query.device)
        return apply_rotary_qk(query, key, position_ids, inv_freq, mscale=self.attention_factor)

    def extra_repr(self) -> str:
        bases = ", ".join(f"{b:.6g}" for b in self.local_bases.tolist())
        return f"scaling={self.rope.scaling}, rotary_dim={self.rotary_dim}, local_bases=[{bases}]"

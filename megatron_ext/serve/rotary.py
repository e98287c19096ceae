"""The per-KV-group rotation of a HARPE export, laid out as a vLLM attention layer holds its heads.

vLLM hands a layer's rotary module the flat token batch: positions [T], query [T, h_local * d],
key [T, g_local * d]. Under tensor parallelism rank r holds a contiguous block of KV heads (or, with
fewer KV heads than ranks, one KV head replicated on tp / g ranks) and the query heads that attend to
them, so its rotation needs the bases of exactly those KV groups. The frequencies are megatron_ext.rope's
(the ones training used, every scaling included); the rotation is written out in plain tensor ops (the same
fp32 angles and rotate-half convention as megatron_ext.rope.apply) so that vLLM's torch.compile can trace it.
Imports torch and megatron_ext.rope only (no vllm), so its tables are testable anywhere.
"""

import torch

from megatron_ext.rope.config import RopeConfig


def local_kv_groups(num_kv_heads: int, tp_size: int, tp_rank: int) -> list[int]:
    """Indices of the KV heads (= RoPE base groups) rank `tp_rank` of `tp_size` holds, in vLLM's layout.

    vLLM's QKVParallelLinear splits KV heads in contiguous blocks when there are at least as many as
    ranks, and otherwise replicates each KV head on tp_size / num_kv_heads consecutive ranks.
    """
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"tensor-parallel rank {tp_rank} is outside 0..{tp_size - 1}")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(f"{num_kv_heads} KV heads cannot be split over {tp_size} tensor-parallel ranks: "
                             f"use a tensor-parallel size that divides {num_kv_heads}")
        per_rank = num_kv_heads // tp_size
        return list(range(tp_rank * per_rank, (tp_rank + 1) * per_rank))
    if tp_size % num_kv_heads:
        raise ValueError(f"{num_kv_heads} KV heads cannot be replicated over {tp_size} tensor-parallel ranks: "
                         f"use a tensor-parallel size that is a multiple of {num_kv_heads}")
    return [tp_rank // (tp_size // num_kv_heads)]


class GroupedRotary(torch.nn.Module):
    """Rotates one rank's queries and keys, each KV group (and its query heads) by its own base.

    With `max_position`, a table of cos and sin for positions 0 .. max_position - 1 is built once (in `dtype`,
    what the rotation casts to anyway, so the result is the same) and every step gathers its rows, as vLLM's own
    rotary modules do; one module then serves every layer. Without it, angles come from each step's positions.

    The table is laid out group-major, [g_local * max_position, r] (cos | sin per row): row
    group_index * max_position + position. That is the layout of vLLM's fused rotary kernel
    (`fused_rotary`, vllm._custom_ops.rotary_embedding: one cache row per token, neox style, in place) once
    the heads are regrouped as g_local "tokens" per token, each holding one KV group's heads: one kernel call
    then rotates every group by its own base, where the torch ops below take ~10 small ops per layer (what
    dominated a decode step, see docs/results/serve_throughput.md).
    """

    def __init__(self, rope: RopeConfig, *, head_dim: int, num_heads: int, num_kv_heads: int,
                 tp_size: int = 1, tp_rank: int = 0, max_position: int | None = None,
                 dtype: torch.dtype = torch.float32, fused_rotary=None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_attention_heads ({num_heads}) must be a multiple of num_key_value_heads "
                             f"({num_kv_heads})")
        if num_heads % tp_size:
            raise ValueError(f"num_attention_heads ({num_heads}) cannot be split over {tp_size} tensor-parallel "
                             f"ranks: use a tensor-parallel size that divides it")
        self.head_dim = head_dim
        self.groups = local_kv_groups(num_kv_heads, tp_size, tp_rank)
        self.num_local_heads = num_heads // tp_size
        rotary_dim = rope.rotary_dim(head_dim)
        bases = rope.group_bases(num_kv_heads)[self.groups]  # float64 [g_local]
        inv_freq, self.attention_factor = rope.inv_freq(bases, rotary_dim)  # fp32 [g_local, r/2]
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # not a weight: nothing to load
        self.rotary_dim = rotary_dim
        table = offsets = None
        if max_position is not None:
            cos, sin = self.cos_sin(torch.arange(max_position, device=inv_freq.device))
            table = torch.cat((cos, sin), dim=-1).to(dtype).transpose(0, 1).reshape(-1, rotary_dim).contiguous()
            offsets = torch.arange(len(self.groups), device=inv_freq.device) * max_position  # first row per group
        elif fused_rotary is not None:
            raise ValueError("fused_rotary needs max_position: the kernel reads a cos/sin table")
        self.register_buffer("table", table, persistent=False)  # [g_local * max_position, r], group-major
        self.register_buffer("group_offsets", offsets, persistent=False)
        self.fused_rotary = fused_rotary

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rank's tables at `positions` [T]: cos and sin [T, g_local, r/2] (attention factor included)."""
        angles = positions.to(torch.float32)[:, None, None] * self.inv_freq.float()  # [T, g_local, r/2]
        return angles.cos() * self.attention_factor, angles.sin() * self.attention_factor

    def rotate(self, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate flat heads [T, n * d] (this rank's query heads, or its KV heads) by cos/sin [T, g_local, r/2]."""
        tokens, groups, half = cos.shape
        grouped = heads.reshape(tokens, groups, -1, self.head_dim)  # [T, g, n/g, d]: a group's heads are adjacent
        cos, sin = cos[:, :, None].to(heads.dtype), sin[:, :, None].to(heads.dtype)  # [T, g, 1, r/2]
        first, second, rest = grouped[..., :half], grouped[..., half:2 * half], grouped[..., 2 * half:]
        rotated = torch.cat((first * cos - second * sin, second * cos + first * sin, rest), dim=-1)
        return rotated.reshape(heads.shape)

    def forward(self, positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None = None):
        """vLLM's rotary interface: (positions [T], query [T, h*d], key [T, g*d]) -> rotated (query, key).

        The layer calls it between the q/k/v projection and attention, so keys are rotated before the
        attention backend writes them into the KV cache.
        """
        positions = positions.flatten()
        if self.table is None:
            cos, sin = self.cos_sin(positions)
            return self.rotate(query, cos, sin), (None if key is None else self.rotate(key, cos, sin))
        rows = (positions[:, None] + self.group_offsets).flatten()  # [T * g_local]: (token, group) -> table row
        if self.fused_rotary is not None:
            return self.rotate_fused(rows, query, key)
        cos, sin = self.table.index_select(0, rows).view(len(positions), len(self.groups), -1).chunk(2, dim=-1)
        return self.rotate(query, cos, sin), (None if key is None else self.rotate(key, cos, sin))

    def rotate_fused(self, rows: torch.Tensor, query: torch.Tensor, key: torch.Tensor | None):
        """One fused-kernel call: each (token, group) pair is one kernel "token" at table row `rows`.

        The kernel walks tokens with one stride, so the [T * g_local, heads of a group] views must be dense;
        reshape copies where vLLM hands over a strided slice of its qkv projection (then the copy is returned).
        """
        groups = len(self.groups)
        grouped_query = query.reshape(len(rows), -1)
        grouped_key = None if key is None else key.reshape(len(rows), -1)
        table = self.table if self.table.dtype == query.dtype else self.table.to(query.dtype)
        self.fused_rotary(rows, grouped_query, grouped_key, self.head_dim, table, True)
        tokens = len(rows) // groups
        return (grouped_query.view(tokens, -1),
                None if grouped_key is None else grouped_key.view(tokens, -1))

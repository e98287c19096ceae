"""Stand-ins with the memory of the GPU run's fused kernels, for the memory simulation (launch/simulate.py).

The GPU run uses Transformer Engine's layers, which cannot be imported here. The simulation builds
megatron-core's local layers and swaps in two modules that allocate and save what TE's kernels do:

- `FlashAttentionStandIn` for the core attention (TE's DotProductAttention, flash/fused backend): the forward
  keeps q, k, v (contiguous), the output and the fp32 softmax statistics (log-sum-exp, one per query row and
  head), never an s x s matrix; the backward allocates dq, dk, dv and the fp32 dO.O row sums. Packed sequences
  (THD, one [tokens, heads, dim] row with cu_seqlens: document masking) and [s, b, heads, dim] alike. Under
  context parallelism with the ring (p2p), the forward holds two K/V chunks in flight (the one in use, the one
  being received) and the backward two K/V chunks and two dK/dV chunks (TE's double-buffered exchange); a2a
  re-lays q, k, v and the output once more; allgather holds the whole sequence's K/V (and dK/dV in the backward).
- `FusedRMSNormStandIn` for the norms (TE's fused RMSNorm): saves its input and the fp32 1/rms per token, and
  supports sequence parallelism (its weight is marked `sequence_parallel`, so megatron all-reduces its
  gradient over TP as it does TE's). The following linear saves the norm's output, as TE's fused
  LayerNormLinear keeps `ln_out` for the weight gradient.

Values are meaningless (the simulation runs on fake tensors): only shapes, dtypes and lifetimes matter.
Imports torch and megatron-core.
"""

import torch
from megatron.core.utils import get_pg_size


class _FlashMemory(torch.autograd.Function):
    """q [..., h, d], k/v [..., g, d] -> output like q; saves q, k, v, output, lse (fp32 [h, tokens])."""

    @staticmethod
    def forward(ctx, query, key, value, exchange):
        ctx.exchange = exchange
        tokens = query.numel() // (query.size(-1) * query.size(-2))
        output = torch.empty_like(query)
        lse = torch.empty(query.size(-2), tokens, dtype=torch.float32, device=query.device)
        in_flight = exchange.buffers(query, key, value, backward=False)  # noqa: F841 (alive during the kernel)
        # the kernels take q, k, v contiguous (the ring sends K/V from its own buffer): a view of the fused QKV
        # projection's output (megatron splits it into q, k, v views) does not keep the whole projection alive
        query, key, value = (t if t.is_contiguous() else t.contiguous() for t in (query, key, value))
        ctx.save_for_backward(query, key, value, output, lse)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        query, key, value, output, lse = ctx.saved_tensors
        row_sums = torch.empty_like(lse)  # D = rowsum(dO * O), fp32, per query row and head
        grad_query = torch.empty_like(query)
        in_flight = ctx.exchange.buffers(query, key, value, backward=True)  # noqa: F841
        grad_key, grad_value = torch.empty_like(key), torch.empty_like(value)
        del row_sums, in_flight
        return grad_query, grad_key, grad_value, None


class ContextParallelExchange:
    """The K/V buffers a CP exchange type holds besides the attention's own tensors (TE's implementations)."""

    def __init__(self, cp_size: int, comm_type: str | None):
        self.cp_size, self.comm_type = cp_size, comm_type

    def buffers(self, query, key, value, *, backward: bool) -> list[torch.Tensor]:
        """Empty tensors of the sizes the exchange holds during the forward (or the backward) kernel."""
        if self.cp_size == 1:
            return []
        if self.comm_type == "a2a":  # Ulysses: q, k, v and the output (or their gradients) re-laid once
            return [torch.empty_like(t) for t in (query, key, value, query)]
        # all_gather: the whole sequence's K/V (backward: and their full gradients); p2p: the chunk in use and
        # the one being received (backward: K/V and dK/dV chunks, each double-buffered)
        copies = {"all_gather": self.cp_size, "p2p": 2}.get(self.comm_type, 2) * (2 if backward else 1)
        return [torch.empty_like(t) for _ in range(copies) for t in (key, value)]


class FlashAttentionStandIn(torch.nn.Module):
    """A core attention (megatron's interface) with flash attention's memory; see the module docstring."""

    takes_document_ids = False  # documents arrive packed (THD), as for Transformer Engine

    def __init__(self, config, layer_number, attn_mask_type, attention_type, attention_dropout=None,
                 softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        cp_group = pg_collection.cp if pg_collection is not None else None
        cp_size = get_pg_size(cp_group) if cp_group is not None else 1
        self.exchange = ContextParallelExchange(cp_size, cp_comm_type or "p2p")

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                packed_seq_params=None):
        output = _FlashMemory.apply(query, key, value, self.exchange)
        return output.reshape(*output.shape[:-2], -1)  # [t, h*d] (THD) or [s, b, h*d]


class _RMSNormMemory(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight):
        inverse_rms = torch.empty(hidden.shape[:-1], dtype=torch.float32, device=hidden.device)
        ctx.save_for_backward(hidden, weight, inverse_rms)
        return torch.empty_like(hidden)

    @staticmethod
    def backward(ctx, grad_output):
        hidden, weight, _ = ctx.saved_tensors
        return torch.empty_like(hidden), torch.empty_like(weight)


class FusedRMSNormStandIn(torch.nn.Module):
    """A norm (megatron's norm interface) with TE's fused RMSNorm memory; supports sequence parallelism."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, **_):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.empty(hidden_size, dtype=config.params_dtype))
        self.weight.sequence_parallel = config.sequence_parallel  # megatron all-reduces it over TP (as TE's)

    def forward(self, hidden):
        return _RMSNormMemory.apply(hidden, self.weight)

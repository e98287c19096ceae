"""Causal SDPA core attention for the local (non-Transformer-Engine) layer spec, context-parallel aware,
block-causal over packed documents when given their document ids.

Used on CPU (tests, CI) and on GPUs without Transformer Engine; TE's DotProductAttention
replaces it where TE is installed.
"""

import torch
import torch.nn.functional as F
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_ext.context_parallel import zigzag_causal_mask


class SDPACoreAttention(torch.nn.Module):
    """q [sq, b, hq, d], k/v [sk, b, g, d] -> context [sq, b, hq*d], causal.

    Under context parallelism each rank holds two zig-zag chunks of the sequence (megatron's
    layout, megatron_ext/context_parallel.py: rank r keeps chunks r and 2*cp-1-r of 2*cp). K and V
    are all-gathered over the CP group and the causal mask is built from the global token indices,
    so CP=n computes exactly what CP=1 does. This is the simple, memory-hungry form of CP (O(s) K/V per rank); ring
    attention is Transformer Engine's job on GPUs.

    Document masking: LongContextGPTModel hands the document ids of this rank's tokens, [b, s]
    int64, in megatron's `attention_mask` slot (threaded to every layer on every pipeline stage,
    and saved by activation recompute). A query then sees a key only if the key is not later and
    belongs to the same document; under CP the keys' ids are all-gathered with K and V. The mask is
    dense ([b, 1, s_q, s_k] bool): fine on CPU and at moderate lengths; TE's THD path scales.
    """

    takes_document_ids = True  # LongContextGPTModel passes document ids, not megatron's [b, 1, s, s] mask

    def __init__(self, config, layer_number, attn_mask_type, attention_type,
                 attention_dropout=None, softmax_scale=None, cp_comm_type=None, pg_collection=None):
        super().__init__()
        self.config = config
        self.softmax_scale = softmax_scale
        self.dropout = config.attention_dropout if attention_dropout is None else attention_dropout
        self.cp_group = pg_collection.cp if pg_collection is not None else None

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None:
            raise NotImplementedError(
                "SDPACoreAttention: packed (THD) sequences need the Transformer Engine spec; this spec masks "
                "documents from document ids (LongContextGPTModel's document_ids argument)"
            )
        document_ids = attention_mask  # [b, s_local] or None
        cp_size = get_pg_size(self.cp_group) if self.cp_group is not None else 1
        mask = None
        if cp_size > 1:
            key = _GatherSequence.apply(key, self.cp_group)
            value = _GatherSequence.apply(value, self.cp_group)
            mask = zigzag_causal_mask(query.size(0), cp_size, get_pg_rank(self.cp_group), query.device)
        if document_ids is not None:
            mask = _block_causal_mask(document_ids, mask, self.cp_group if cp_size > 1 else None)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [b, heads, s, d]
        context = grouped_sdpa(q, k, v, attn_mask=mask, is_causal=mask is None, scale=self.softmax_scale,
                               dropout_p=self.dropout if self.training else 0.0)
        context = context.permute(2, 0, 1, 3)  # [s, b, heads, d]
        return context.reshape(context.size(0), context.size(1), -1)


# torch >= 2.5 runs grouped-query attention inside SDPA (flash, cuDNN and memory-efficient backends
# on CUDA) without repeating K/V; setup.py allows torch 2.4, which lacks the argument.
SDPA_HAS_GQA = torch.torch_version.TorchVersion(torch.__version__) >= (2, 5)


def grouped_sdpa(q, k, v, **kwargs):
    """scaled_dot_product_attention for q [b, h, s, d] and k, v [b, g, s, d] with h % g == 0.

    On CUDA in bf16/fp16 without a mask torch picks its flash (or cuDNN) kernel: O(s) memory.
    """
    if k.size(1) == q.size(1):
        return F.scaled_dot_product_attention(q, k, v, **kwargs)
    if SDPA_HAS_GQA:
        return F.scaled_dot_product_attention(q, k, v, enable_gqa=True, **kwargs)
    repeats = q.size(1) // k.size(1)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(repeats, dim=1),
                                          v.repeat_interleave(repeats, dim=1), **kwargs)


def _block_causal_mask(document_ids, causal_mask, cp_group):
    """[b, 1, s_q, s_k] bool, True = may attend: causal (the zig-zag mask under CP) and same document.

    document_ids [b, s_q] are this rank's tokens' ids; under CP the keys' are gathered in rank order,
    the order of the gathered K/V."""
    query_documents = document_ids
    key_documents = document_ids
    if cp_group is not None:
        parts = [torch.empty_like(document_ids) for _ in range(get_pg_size(cp_group))]
        torch.distributed.all_gather(parts, document_ids.contiguous(), group=cp_group)
        key_documents = torch.cat(parts, dim=1)
    if causal_mask is None:
        causal_mask = torch.ones(query_documents.size(1), key_documents.size(1), dtype=torch.bool,
                                 device=document_ids.device).tril()
    same_document = query_documents[:, None, :, None] == key_documents[:, None, None, :]
    return same_document & causal_mask


class _GatherSequence(torch.autograd.Function):
    """All-gather dim 0 over a group in rank order; the backward sums the gradients and keeps ours."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(get_pg_size(group))]
        torch.distributed.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        torch.distributed.all_reduce(grad, group=ctx.group)
        return grad.chunk(get_pg_size(ctx.group), dim=0)[get_pg_rank(ctx.group)], None

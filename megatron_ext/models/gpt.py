"""LongContextGPTModel: megatron-core's GPTModel with RoPE driven by explicit position ids on every stage."""

import torch
from megatron.core.models.gpt.gpt_model import GPTModel

from megatron_ext.models.attention import PositionIdSelfAttention
from megatron_ext.models.config import LongContextTransformerConfig


class LongContextGPTModel(GPTModel):
    """GPTModel whose attention layers rotate with per-KV-group bases at the given position ids.

    Stock GPTModel builds RoPE from the sequence length alone, on each stage. Here the embedding
    adds no positions (position_embedding_type='none') and `_preprocess` hands this rank's
    position ids to the decoder instead, on every pipeline stage: the data iterator must give
    `position_ids` to middle and last stages too. Under context parallelism the ids arrive
    already sliced with the tokens, so PoSE ids, CP slices and plain ranges are all the same case.

    Document masking (packed documents that must not see one another) takes one of two forms,
    by layer spec: `document_ids` [b, s] (this rank's slice, like the tokens) for the SDPA core
    attention, which builds a block-causal mask from them (`takes_document_ids`); or megatron's
    `packed_seq_params` (THD, cu_seqlens) for Transformer Engine's attention
    (megatron_ext.context_parallel.packed_sequences_on_this_cp_rank makes both batch and params).
    """

    def __init__(self, config: LongContextTransformerConfig, transformer_layer_spec,
                 vocab_size: int, max_sequence_length: int, **kwargs):
        if not isinstance(config, LongContextTransformerConfig):
            raise TypeError(
                f"LongContextGPTModel needs a LongContextTransformerConfig (it carries `rope`), "
                f"got {type(config).__name__}"
            )
        if kwargs.get("position_embedding_type", "none") != "none":
            raise ValueError(
                "LongContextGPTModel applies RoPE itself: drop position_embedding_type "
                f"({kwargs['position_embedding_type']!r}) and set the scaling in config.rope"
            )
        kwargs["position_embedding_type"] = "none"
        super().__init__(config, transformer_layer_spec, vocab_size, max_sequence_length, **kwargs)
        for layer in self.decoder.layers:
            if not isinstance(layer.self_attention, PositionIdSelfAttention):
                raise TypeError(
                    "transformer_layer_spec must use megatron_ext's PositionIdSelfAttention: "
                    "build it with megatron_ext.models.specs.layer_spec()"
                )

    @property
    def takes_document_ids(self) -> bool:
        """True when the core attention masks documents from document ids (the SDPA spec); False when it
        takes packed (THD) sequences instead (Transformer Engine)."""
        return all(getattr(layer.self_attention.core_attention, "takes_document_ids", False)
                   for layer in self.decoder.layers)

    def forward(self, input_ids, position_ids, attention_mask=None, *args, document_ids=None, **kwargs):
        """GPTModel.forward; `document_ids` [b, s] int64 (0, 0, 1, 1, 1, 2, ... per row) keeps attention
        inside each document. Every pipeline stage needs them, as it needs the position ids."""
        if document_ids is not None:
            if attention_mask is not None:
                raise ValueError("LongContextGPTModel: give document_ids or attention_mask, not both")
            if not self.takes_document_ids:
                raise ValueError(
                    "LongContextGPTModel: this layer spec's attention (Transformer Engine) masks documents with "
                    "packed sequences: pass packed_seq_params (qkv_format='thd', see "
                    "megatron_ext.context_parallel.packed_sequences_on_this_cp_rank) instead of document_ids"
                )
            attention_mask = document_ids  # the slot megatron threads to every layer's core attention
        return super().forward(input_ids, position_ids, attention_mask, *args, **kwargs)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        if position_ids is None:
            raise ValueError(
                "LongContextGPTModel needs position_ids on every pipeline stage (they drive RoPE): "
                "give the forward step position_ids [b, s] on first, middle and last stages"
            )
        out = super()._preprocess(input_ids, position_ids, decoder_input=decoder_input,
                                  inference_context=inference_context,
                                  packed_seq_params=packed_seq_params, padding_mask=padding_mask)
        self._set_dynamic_length(position_ids)
        decoder_input, _no_rotary, *rest = out
        return (decoder_input, shared_positions(position_ids), *rest)

    def _set_dynamic_length(self, position_ids):
        """The 'dynamic' scaling depends on the current length: the largest id + 1 over all CP ranks."""
        if not self.config.rope.follows_sequence_length:
            return
        longest = position_ids.max().reshape(1) + 1
        cp_group = self.pg_collection.cp
        if cp_group is not None and cp_group.size() > 1:
            torch.distributed.all_reduce(longest, op=torch.distributed.ReduceOp.MAX, group=cp_group)
        for layer in self.decoder.layers:
            layer.self_attention.rotary.dynamic_seq_len = int(longest.item())


def shared_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[b, s] -> [1, s] when every sequence of the batch has the same ids (the usual case).

    The rotation then builds one angle table for the whole batch instead of one per sequence.
    """
    if position_ids.size(0) > 1 and torch.equal(position_ids, position_ids[:1].expand_as(position_ids)):
        return position_ids[:1]
    return position_ids

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
        if self.config.rope.scaling != "dynamic":
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

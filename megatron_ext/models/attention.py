"""Self-attention whose RoPE comes from explicit position ids and per-KV-group bases.

The only megatron class we subclass for rotation; specs.py puts it into the layer spec.
"""

from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.utils import get_pg_rank, get_pg_size

from megatron_ext.models.provider import RotaryProvider


class PositionIdSelfAttention(SelfAttention):
    """megatron-core SelfAttention that rotates q and k with a RotaryProvider.

    LongContextGPTModel passes the position ids of this rank's tokens, [b, s] or [1, s], in the
    `rotary_pos_emb` slot that megatron threads through the decoder (and through activation
    recompute, which saves it like any tensor argument). The rotation happens right after the
    q/k/v projection (and q/k norms), so megatron's own rotary code sees rotary_pos_emb=None.
    """

    def __init__(self, config, submodules, layer_number, attn_mask_type=AttnMaskType.causal,
                 cp_comm_type=None, pg_collection=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         attn_mask_type=attn_mask_type, cp_comm_type=cp_comm_type,
                         pg_collection=pg_collection)
        tp = self.pg_collection.tp
        self.rotary = RotaryProvider(
            config.rope, kv_channels=config.kv_channels, num_query_groups=config.num_query_groups,
            tp_rank=get_pg_rank(tp), tp_size=get_pg_size(tp),
        )
        self._position_ids = None

    def forward(self, hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs):
        self._position_ids = rotary_pos_emb
        try:
            return super().forward(hidden_states, attention_mask, *args, rotary_pos_emb=None, **kwargs)
        finally:
            self._position_ids = None

    def get_query_key_value_tensors(self, hidden_states, key_value_states=None, output_gate=False,
                                    split_qkv=True):
        qkv = super().get_query_key_value_tensors(hidden_states, key_value_states,
                                                  output_gate=output_gate, split_qkv=split_qkv)
        if self._position_ids is None:
            raise RuntimeError(
                "PositionIdSelfAttention got no position ids: run it inside LongContextGPTModel, "
                "which passes them to every layer on every pipeline stage"
            )
        query, key = self.rotary(qkv[0], qkv[1], self._position_ids)
        return (query, key, *qkv[2:])

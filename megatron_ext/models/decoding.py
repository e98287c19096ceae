"""Decoding with a KV cache on LongContextGPTModel: the prompt's keys and values are computed once, then each new
token costs one single-token forward (lm-eval's generate_until, through megatron_ext.eval.harness.decoding).

The cache is megatron-core's StaticInferenceContext, the KV cache of its own inference engine. Our attention
rotates q and k per KV group at the given position ids before megatron stores the keys, so cached keys carry the
model's own RoPE (HARPE bases, any scaling). Two things megatron-core 0.16 needs on CPU are done here: its cache
buffers are allocated on `torch.cuda.current_device()`, so they are allocated here, on the model's device, before
the first forward; and our SDPA core attention is causal with the top-left alignment of torch's `is_causal`, which
for one new query against all cached keys would hide them, so during decoding steps (megatron passes
attn_mask_type=no_mask then) the new token attends to every cached key through `_DecodeStepAttention`.

Where the cache would not give a full forward pass's logits, `megatron_cache_works` says no and the caller
recomputes: pipeline-parallel models (the static context would need megatron's inference schedule across
stages), context-parallel ones (each rank holds a zig-zag share of the sequence, the cache would not), TP > 1 on
CPU (megatron gathers inference logits into a CUDA buffer), and RoPE scalings whose frequencies follow the
current length ('dynamic'), where keys cached at a shorter length would be rotated differently.
"""

from contextlib import contextmanager

import torch


def _device(model) -> torch.device:
    return next(model.parameters()).device


def megatron_cache_works(model) -> bool:
    """Whether megatron-core's static KV cache gives `model` (a LongContextGPTModel, this process's layout) the
    logits of a full forward pass."""
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_world_size() == ps.get_context_parallel_world_size() == 1
            and (ps.get_tensor_model_parallel_world_size() == 1 or _device(model).type == "cuda")
            and not model.config.rope.follows_sequence_length)


@contextmanager
def megatron_cached_decoder(model, capacity: int, vocab_size: int):
    """A `MegatronCachedDecoder` for `capacity` positions, with every layer's core attention fit for decoding
    steps while it is in use (put back after)."""
    with _decode_step_attention(model):
        yield MegatronCachedDecoder(model, capacity, vocab_size)


class MegatronCachedDecoder:
    """One sequence through megatron-core's StaticInferenceContext (batch 1, `capacity` positions); logits over
    the first `vocab_size` columns (the real vocabulary, without megatron's padding rows). Use it through
    `megatron_cached_decoder`, which makes the decoding steps see the cached keys."""

    def __init__(self, model, capacity: int, vocab_size: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model, self.vocab_size, self.device = model, vocab_size, _device(model)
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=capacity)
        for layer in model.decoder.layers:
            attention = layer.self_attention
            dtype = next(attention.parameters()).dtype
            shape = (capacity, 1, attention.num_query_groups_per_partition, attention.key_hidden_size)
            self.context.key_value_memory_dict[attention.layer_number] = (
                torch.empty(shape, dtype=dtype, device=self.device), torch.empty(shape, dtype=dtype,
                                                                                 device=self.device))

    def start(self, prompt: list[int]) -> torch.Tensor:
        """Logits [V] of the token after `prompt`."""
        logits = self._forward(torch.tensor([prompt]), torch.arange(len(prompt))[None])
        self.context.enable_decode_mode()
        return logits

    def step(self, token: int) -> torch.Tensor:
        """Append `token`; logits [V] of the token after it."""
        return self._forward(torch.tensor([[token]]), torch.tensor([[self.context.sequence_len_offset]]))

    def _forward(self, tokens, position_ids):
        logits = self.model(tokens.to(self.device), position_ids.to(self.device), None,
                            inference_context=self.context,
                            runtime_gather_output=True)  # [1, 1, padded V]: the context keeps the last row
        self.context.sequence_len_offset += tokens.size(1)
        return logits[0, -1, :self.vocab_size].float()


class _DecodeStepAttention(torch.nn.Module):
    """A layer's core attention, except in decoding steps: there the new query attends to every cached key."""

    def __init__(self, core: torch.nn.Module):
        super().__init__()
        self.core = core

    def forward(self, query, key, value, attention_mask, attn_mask_type=None, **kwargs):
        from megatron.core.transformer.enums import AttnMaskType

        from megatron_ext.models.core_attention import grouped_sdpa

        if attn_mask_type != AttnMaskType.no_mask:
            return self.core(query, key, value, attention_mask, attn_mask_type=attn_mask_type, **kwargs)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))  # [s, b, heads, d] -> [b, heads, s, d]
        context = grouped_sdpa(q, k, v, scale=getattr(self.core, "softmax_scale", None)).permute(2, 0, 1, 3)
        return context.reshape(context.size(0), context.size(1), -1)  # [s, b, heads * d]


@contextmanager
def _decode_step_attention(model):
    """Swap every layer's core attention for `_DecodeStepAttention` while decoding; put it back after."""
    attentions = [layer.self_attention for layer in model.decoder.layers]
    cores = [attention.core_attention for attention in attentions]
    for attention, core in zip(attentions, cores):
        attention.core_attention = _DecodeStepAttention(core)
    try:
        yield
    finally:
        for attention, core in zip(attentions, cores):
            attention.core_attention = core

"""Greedy generation with a KV cache, for lm-eval's generate_until: the prompt's keys and values are computed once,
then each new token costs one single-token forward.

- megatron_ext checkpoints (TP=PP=CP=1; TP>1 on GPU too, megatron's own path, which the CPU tests cannot run):
  megatron-core's StaticInferenceContext, the KV cache of its own inference engine. Our attention rotates q and
  k per KV group at the given position ids before megatron stores the keys, so cached keys carry the model's
  own RoPE (HARPE bases, any scaling). Two things megatron-core 0.16 needs on CPU are done here: its cache
  buffers are allocated on `torch.cuda.current_device()`, so they are allocated here, on the model's device,
  before the first forward; and our SDPA core attention is causal with the top-left alignment of torch's
  `is_causal`, which for one new query against all cached keys would hide them, so during decoding steps
  (megatron passes attn_mask_type=no_mask then) the new token attends to every cached key through
  `_DecodeStepAttention`.
- Hugging Face models (HARPE exports included): transformers' own KV cache (past_key_values).
- Everything else recomputes the whole sequence per token (`RecomputeDecoder`, what
  megatron_ext.eval.scoring.greedy_generate does): pipeline-parallel megatron models (the static context would
  need megatron's inference schedule across stages), context-parallel ones (each rank holds a zig-zag share of
  the sequence, the cache would not), TP>1 on CPU (megatron gathers inference logits into a CUDA buffer), and
  the 'dynamic' RoPE scaling, whose frequencies follow the current length, so keys cached at a shorter length
  would be rotated differently from a full forward.
"""

from contextlib import contextmanager
from typing import Callable, Protocol

import torch

from megatron_ext.eval.models import EvalModel, HFCausalLM, MegatronExtModel


class NextTokenLogits(Protocol):
    def start(self, prompt: list[int]) -> torch.Tensor:
        """Logits [V] of the token after `prompt`."""

    def step(self, token: int) -> torch.Tensor:
        """Append `token`; logits [V] of the token after it."""


@torch.no_grad()
def greedy_tokens(model: EvalModel, prompt: list[int], max_new_tokens: int,
                  stop: Callable[[list[int]], bool] = lambda generated: False) -> list[int]:
    """Greedy continuation of `prompt`: up to `max_new_tokens` tokens, ending early (last token kept) once
    `stop(generated)` is true."""
    with incremental_decoder(model, capacity=len(prompt) + max_new_tokens) as decoder:
        generated = []
        logits = decoder.start(prompt)
        while True:
            generated.append(int(logits.argmax()))
            if len(generated) == max_new_tokens or stop(generated):
                return generated
            logits = decoder.step(generated[-1])


@contextmanager
def incremental_decoder(model: EvalModel, capacity: int):
    """The decoder with a KV cache that `model` supports (see the module docstring), for `capacity` tokens."""
    if isinstance(model, HFCausalLM):
        yield HFCachedDecoder(model)
    elif isinstance(model, MegatronExtModel) and megatron_cache_works(model):
        with _decode_step_attention(model.model):
            yield MegatronCachedDecoder(model, capacity)
    else:
        yield RecomputeDecoder(model)


def megatron_cache_works(model: MegatronExtModel) -> bool:
    from megatron.core import parallel_state as ps

    return (ps.get_pipeline_model_parallel_world_size() == ps.get_context_parallel_world_size() == 1
            and (ps.get_tensor_model_parallel_world_size() == 1 or model.device.type == "cuda")
            and not model.model.config.rope.follows_sequence_length)


class MegatronCachedDecoder:
    """One sequence through megatron-core's StaticInferenceContext (batch 1, `capacity` positions)."""

    def __init__(self, model: MegatronExtModel, capacity: int):
        from megatron.core.inference.contexts import StaticInferenceContext

        self.model = model
        self.context = StaticInferenceContext(max_batch_size=1, max_sequence_length=capacity)
        for layer in model.model.decoder.layers:
            attention = layer.self_attention
            dtype = next(attention.parameters()).dtype
            shape = (capacity, 1, attention.num_query_groups_per_partition, attention.key_hidden_size)
            self.context.key_value_memory_dict[attention.layer_number] = (
                torch.empty(shape, dtype=dtype, device=model.device), torch.empty(shape, dtype=dtype,
                                                                                  device=model.device))

    def start(self, prompt):
        logits = self._forward(torch.tensor([prompt]), torch.arange(len(prompt))[None])
        self.context.enable_decode_mode()
        return logits

    def step(self, token):
        return self._forward(torch.tensor([[token]]), torch.tensor([[self.context.sequence_len_offset]]))

    def _forward(self, tokens, position_ids):
        device = self.model.device
        logits = self.model.model(tokens.to(device), position_ids.to(device), None, inference_context=self.context,
                                  runtime_gather_output=True)  # [1, 1, padded V]: the context keeps the last row
        self.context.sequence_len_offset += tokens.size(1)
        return logits[0, -1, :self.model.vocab_size].float()


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


class HFCachedDecoder:
    """One sequence through transformers' KV cache (past_key_values), positions 0, 1, 2, ..."""

    def __init__(self, model: HFCausalLM):
        self.model = model
        self.cache = None
        self.length = 0

    def start(self, prompt):
        return self._forward(prompt)

    def step(self, token):
        return self._forward([token])

    def _forward(self, tokens):
        device = self.model.device
        positions = torch.arange(self.length, self.length + len(tokens), device=device)[None]
        output = self.model.model(input_ids=torch.tensor([tokens], device=device), position_ids=positions,
                                  past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        self.cache = output.past_key_values
        self.length += len(tokens)
        return output.logits[0, -1, :self.model.vocab_size].float()


class RecomputeDecoder:
    """Any EvalModel: the whole sequence again for every new token."""

    def __init__(self, model: EvalModel):
        self.model = model
        self.tokens = []

    def start(self, prompt):
        self.tokens = list(prompt)
        return self._last_logits()

    def step(self, token):
        self.tokens.append(token)
        return self._last_logits()

    def _last_logits(self):
        rows = torch.tensor([len(self.tokens) - 1])
        return self.model.logits(torch.tensor([self.tokens]), rows=rows)[0, -1].float()

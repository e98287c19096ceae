"""Greedy generation with a KV cache, for lm-eval's generate_until: the prompt's keys and values are computed once,
then each new token costs one single-token forward. Which cache a model gets:

- megatron_ext checkpoints: megatron-core's StaticInferenceContext, run beside the model
  (megatron_ext/models/decoding.py, which also says where it would not give a full forward pass's logits).
- Hugging Face models (HARPE exports included): transformers' own KV cache (past_key_values).
- Everything else recomputes the whole sequence per token (`RecomputeDecoder`, what
  megatron_ext.eval.scoring.greedy_generate does): pipeline- or context-parallel megatron models, TP > 1 on CPU,
  and RoPE scalings whose frequencies follow the current length ('dynamic').
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
    from megatron_ext.models.decoding import megatron_cache_works, megatron_cached_decoder  # megatron, when used

    if isinstance(model, HFCausalLM):
        yield HFCachedDecoder(model)
    elif isinstance(model, MegatronExtModel) and megatron_cache_works(model.model):
        with megatron_cached_decoder(model.model, capacity, model.vocab_size) as decoder:
            yield decoder
    else:
        yield RecomputeDecoder(model)


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

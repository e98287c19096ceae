"""Per-KV-group RoPE (HARPE, and scalings transformers lacks) inside a transformers Llama / Mistral / Qwen2.

transformers computes one (cos, sin) table in `model.model.rotary_emb` and every attention layer
applies it right after its q/k projections. Here that module is swapped for one that hands the
layers the identity rotation (cos 1, sin 0: exactly a no-op) and remembers the position ids, and
forward hooks on each q_proj / k_proj rotate the projections with megatron_ext.rope, one base per
KV group. Keys are rotated before they enter the KV cache, as transformers does, so generation
works. Only the given model object changes; nothing in transformers is patched.
Imports torch and megatron_ext.rope (no megatron); transformers only through the model given.
"""

import torch

from megatron_ext.rope.apply import apply_rotary
from megatron_ext.rope.config import RopeConfig



class PerGroupRotation:
    """Rotates [b, s, heads * head_dim] projections by the current position ids, per KV group."""

    def __init__(self, rope: RopeConfig, *, num_query_groups: int, head_dim: int):
        self.rope, self.head_dim = rope, head_dim
        self.rotary_dim = rope.rotary_dim(head_dim)
        self.bases = rope.group_bases(num_query_groups)  # float64 [g]
        self.inv_freq, self.attention_factor = rope.inv_freq(self.bases, self.rotary_dim)  # [g, r/2]
        self.position_ids: torch.Tensor | None = None  # [b or 1, s], set once per model forward

    def start_forward(self, position_ids: torch.Tensor) -> None:
        self.position_ids = position_ids
        if self.rope.follows_sequence_length:  # frequencies follow the current length, as in megatron_ext
            seq_len = int(position_ids.max()) + 1
            self.inv_freq, self.attention_factor = self.rope.inv_freq(self.bases, self.rotary_dim, seq_len=seq_len)

    def __call__(self, projection: torch.Tensor) -> torch.Tensor:
        if self.position_ids is None:
            raise RuntimeError("per-head RoPE: no position ids yet; call the model, not a layer, directly")
        b, s, width = projection.shape
        heads = projection.view(b, s, width // self.head_dim, self.head_dim).transpose(0, 1)  # [s, b, n, d]
        rotated = apply_rotary(heads, self.position_ids, self.inv_freq.to(projection.device),
                               mscale=self.attention_factor)
        return rotated.transpose(0, 1).reshape(b, s, width)


class IdentityRotaryEmbedding(torch.nn.Module):
    """Stands in for the model's rotary embedding: records the position ids, returns cos 1 / sin 0."""

    def __init__(self, rotation: PerGroupRotation):
        super().__init__()
        self.rotation = rotation
        self.hooks: list = []  # on the q/k projections; removed when another rotation replaces this one

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, *args, **kwargs):
        self.rotation.start_forward(position_ids)
        shape = (*position_ids.shape, self.rotation.head_dim)  # [b, s, d], what the layers broadcast
        return (torch.ones(shape, dtype=x.dtype, device=x.device),
                torch.zeros(shape, dtype=x.dtype, device=x.device))


def use_per_group_rope(model, rope: RopeConfig):
    """Make a transformers Llama / Mistral / Qwen2 model rotate with `rope` (per-KV-group bases). In place."""
    from megatron_ext.convert.adapters import ADAPTERS  # the families we convert are the ones we load

    config = model.config
    supported = [adapter.model_type for adapter in ADAPTERS.values()]
    if config.model_type not in supported:
        raise ValueError(f"per-head RoPE supports {', '.join(supported)} models, not model_type {config.model_type!r}")
    decoder = getattr(model, "model", model)  # *ForCausalLM wraps the decoder in .model
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rotation = PerGroupRotation(rope, num_query_groups=config.num_key_value_heads or heads, head_dim=head_dim)
    if isinstance(decoder.rotary_emb, IdentityRotaryEmbedding):  # called again: replace, never stack
        for hook in decoder.rotary_emb.hooks:
            hook.remove()
    decoder.rotary_emb = IdentityRotaryEmbedding(rotation)
    for layer in decoder.layers:
        for projection in (layer.self_attn.q_proj, layer.self_attn.k_proj):
            decoder.rotary_emb.hooks.append(
                projection.register_forward_hook(lambda module, inputs, output: rotation(output)))
    return model

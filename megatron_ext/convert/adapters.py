"""Hugging Face <-> megatron_ext, one adapter per model family: a table of tensor names plus a few named transforms.

Megatron names are those of LongContextGPTModel's state_dict with global layer numbers; the
checkpoint keys megatron derives from them are mcore_io's business. Layout facts (DESIGN §8):
megatron's linear_qkv packs, per KV group, its query heads, then its key head, then its value
head; both sides use rotate-half RoPE, so q/k rows need no permutation.
Imports torch and megatron_ext's config only (no megatron, no transformers).
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from megatron_ext.errors import ConversionError
from megatron_ext.rope.hf_forms import (
    dynamic_max_positions,
    hf_rope_parameters,
    needs_megatron_ext,
    rope_from_hf,
    rope_to_hf,
    set_hf_rope,
)
from megatron_ext.config import ModelConfig, TrainConfig


@dataclass(frozen=True)
class ModelShape:
    """What the transforms need to know about the model."""

    num_attention_heads: int
    num_query_groups: int
    head_dim: int
    vocab_size: int  # Hugging Face's rows
    padded_vocab_size: int  # megatron's rows (a multiple of 128 x TP)


# --- transforms: several Hugging Face tensors <-> one megatron tensor, both ways, bitwise ---------

class Same:
    """One tensor, unchanged."""

    def to_megatron(self, hf: list[torch.Tensor], shape: ModelShape) -> torch.Tensor:
        return hf[0]

    def to_hf(self, tensor: torch.Tensor, shape: ModelShape) -> list[torch.Tensor]:
        return [tensor]


class PadVocab:
    """Embedding / output rows: megatron pads the vocabulary with zero rows (see padded_vocab_size)."""

    def to_megatron(self, hf, shape):
        (rows,) = hf
        if rows.shape[0] == shape.padded_vocab_size:
            return rows
        padding = rows.new_zeros(shape.padded_vocab_size - rows.shape[0], *rows.shape[1:])
        return torch.cat([rows, padding])

    def to_hf(self, tensor, shape):
        return [tensor[: shape.vocab_size]]


class PackQKV:
    """q [h*d, ...], k [g*d, ...], v [g*d, ...] <-> linear_qkv [g * (h/g + 2) * d, ...], per KV group."""

    def to_megatron(self, hf, shape):
        q, k, v = hf
        g = shape.num_query_groups
        grouped = [t.reshape(g, -1, *t.shape[1:]) for t in (q, k, v)]  # [g, rows of the group, ...]
        return torch.cat(grouped, dim=1).reshape(-1, *q.shape[1:])

    def to_hf(self, tensor, shape):
        g, d = shape.num_query_groups, shape.head_dim
        queries_per_group = shape.num_attention_heads // g
        grouped = tensor.reshape(g, (queries_per_group + 2) * d, *tensor.shape[1:])
        q, k, v = grouped.split([queries_per_group * d, d, d], dim=1)
        return [t.reshape(-1, *tensor.shape[1:]) for t in (q, k, v)]


class ConcatGateUp:
    """SwiGLU: gate_proj and up_proj stacked as megatron's linear_fc1 [gate; up]."""

    def to_megatron(self, hf, shape):
        return torch.cat(hf)

    def to_hf(self, tensor, shape):
        return list(tensor.chunk(2))


SAME, PAD_VOCAB, PACK_QKV, CONCAT_GATE_UP = Same(), PadVocab(), PackQKV(), ConcatGateUp()


@dataclass(frozen=True)
class Rule:
    """`megatron` <- transform(`hf`...). `{}` stands for the layer number; `applies` picks configs."""

    megatron: str
    hf: tuple[str, ...]
    transform: object = SAME
    applies: Callable[[ModelConfig], bool] = lambda model: True


def _untied(model: ModelConfig) -> bool:
    return not model.tie_embeddings


def _with_qkv_bias(model: ModelConfig) -> bool:
    return model.qkv_bias


_ATTN, _MLP = "model.layers.{}.self_attn.", "model.layers.{}.mlp."

# The Llama layout, which Mistral and Qwen2 share.
LLAMA_RULES = (
    # megatron                                            Hugging Face                              transform
    Rule("embedding.word_embeddings.weight",               ("model.embed_tokens.weight",),           PAD_VOCAB),
    Rule("decoder.layers.{}.input_layernorm.weight",       ("model.layers.{}.input_layernorm.weight",)),
    Rule("decoder.layers.{}.self_attention.linear_qkv.weight",
         (_ATTN + "q_proj.weight", _ATTN + "k_proj.weight", _ATTN + "v_proj.weight"),          PACK_QKV),
    Rule("decoder.layers.{}.self_attention.linear_qkv.bias",
         (_ATTN + "q_proj.bias", _ATTN + "k_proj.bias", _ATTN + "v_proj.bias"),                PACK_QKV,
         _with_qkv_bias),
    Rule("decoder.layers.{}.self_attention.linear_proj.weight", (_ATTN + "o_proj.weight",)),
    Rule("decoder.layers.{}.pre_mlp_layernorm.weight",     ("model.layers.{}.post_attention_layernorm.weight",)),
    Rule("decoder.layers.{}.mlp.linear_fc1.weight",        (_MLP + "gate_proj.weight", _MLP + "up_proj.weight"),
         CONCAT_GATE_UP),
    Rule("decoder.layers.{}.mlp.linear_fc2.weight",        (_MLP + "down_proj.weight",)),
    Rule("decoder.final_layernorm.weight",                 ("model.norm.weight",)),
    Rule("output_layer.weight",                            ("lm_head.weight",),                      PAD_VOCAB,
         _untied),
)

# In Hugging Face checkpoints but derived from the config, not weights: skipped when reading.
IGNORED_HF_TENSORS = ("rotary_emb.inv_freq",)

# config.json keys of sliding-window attention, with the values that turn it off. megatron_ext's
# model attends to the whole causal context, so a source window is dropped on the way in and an
# export never turns one on: it would run a model other than the one trained.
WINDOW_OFF = {"sliding_window": None, "use_sliding_window": False}
DEFAULT_WINDOW = 4096  # MistralConfig's and Qwen2Config's sliding_window when config.json names none


# --- families ---------------------------------------------------------------------------------

class LlamaAdapter:
    """Llama 1/2/3 (LlamaForCausalLM): RMSNorm, SwiGLU, no biases, GQA/MQA, optional tied embeddings."""

    family = "llama"
    architecture = "LlamaForCausalLM"
    older_names = ("LLaMAForCausalLM",)  # early Llama-1 conversions; exports use `architecture`
    model_type = "llama"
    rules = LLAMA_RULES
    # config.json keys of a fresh export, before the model's own numbers are filled in
    fresh_config = {"attention_bias": False, "mlp_bias": False, "pretraining_tp": 1}
    # WINDOW_OFF keys this family's config reads: written even where the source has none, as
    # transformers' default for them may turn a window on
    window_keys: tuple[str, ...] = ()

    def qkv_bias(self, hf: dict) -> bool:
        if hf.get("attention_bias"):
            raise ConversionError(
                "attention_bias: true (biases on q/k/v *and* o_proj) is not supported: megatron_ext's model "
                "has biases on q/k/v only (Qwen2's layout)")
        return False

    def check(self, hf: dict) -> None:
        if hf.get("mlp_bias"):
            raise ConversionError("mlp_bias: true is not supported: megatron_ext's MLP has no biases")

    def sliding_window(self, hf: dict) -> int | None:
        """The attention window transformers runs this config.json with; None: full causal attention."""
        return None

    def export_overrides(self, config: TrainConfig, source: dict) -> dict:
        return {}

    def check_export(self, model: ModelConfig) -> None:
        if model.qkv_bias:
            raise ConversionError(f"this model has q/k/v biases, which {self.architecture} has not: "
                                  f"export it as family qwen2")

    # --- config.json -> TrainConfig ---

    def train_config(self, hf: dict) -> TrainConfig:
        """The model and rope sections for a config.json dict (other sections: defaults)."""
        self.check(hf)
        heads, hidden = _required(hf, "num_attention_heads"), _required(hf, "hidden_size")
        head_dim = hf.get("head_dim") or hidden // heads
        if head_dim * heads != hidden:
            raise ConversionError(
                f"head_dim ({head_dim}) x num_attention_heads ({heads}) != hidden_size ({hidden}): "
                f"megatron_ext's model config has no separate head size (kv_channels)")
        activation = hf.get("hidden_act", "silu")
        if activation != "silu":
            raise ConversionError(f"hidden_act {activation!r} is not supported: these families use SwiGLU (silu)")
        model = ModelConfig(
            num_layers=_required(hf, "num_hidden_layers"), hidden_size=hidden, num_attention_heads=heads,
            num_query_groups=hf.get("num_key_value_heads") or heads,
            ffn_hidden_size=_required(hf, "intermediate_size"),
            seq_length=hf.get("max_position_embeddings") or 4096, vocab_size=_required(hf, "vocab_size"),
            normalization="RMSNorm", norm_epsilon=float(hf.get("rms_norm_eps", 1e-6)), swiglu=True,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)), qkv_bias=self.qkv_bias(hf),
            init_method_std=float(hf.get("initializer_range", 0.02)),
            attention_dropout=float(hf.get("attention_dropout", 0.0)), hidden_dropout=0.0,
        )
        rope = rope_from_hf(hf)
        try:
            rope.validate(num_attention_heads=heads, num_query_groups=model.num_query_groups)
            rope.rotary_dim(head_dim)
        except ValueError as error:
            raise ConversionError(f"RoPE settings: {error}") from None
        return TrainConfig(model=model, rope=rope)

    # --- TrainConfig -> config.json ---

    def hf_config(self, config: TrainConfig, *, vocab_size: int, dtype: torch.dtype, source: dict | None,
                  rope_form: str | None, special_tokens: dict) -> dict:
        """config.json for `config`: the model's numbers and RoPE from `config`, everything else
        (token ids, cache settings, ...) kept from `source`, the model converted in, if any."""
        m = config.model
        _check_exportable(m)
        self.check_export(m)
        groups = m.num_query_groups or m.num_attention_heads
        head_dim = m.hidden_size // m.num_attention_heads
        hf = dict(source) if source else {
            "architectures": [self.architecture], "model_type": self.model_type, "hidden_act": "silu",
            "initializer_range": m.init_method_std, "use_cache": True, "pad_token_id": None,
            **special_tokens, **self.fresh_config}
        hf.update(
            architectures=[self.architecture], model_type=self.model_type, hidden_size=m.hidden_size,
            intermediate_size=m.ffn_size, num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
            num_key_value_heads=groups, vocab_size=vocab_size, rms_norm_eps=m.norm_epsilon,
            tie_word_embeddings=m.tie_embeddings, attention_dropout=m.attention_dropout)
        if "head_dim" in hf or not source:
            hf["head_dim"] = head_dim
        hf["max_position_embeddings"] = exported_context(config)[0]  # the source's may predate the training
        hf[_dtype_key(hf)] = str(dtype).removeprefix("torch.")
        hf.update(self.export_overrides(config, source or {}))
        hf.update({key: off for key, off in WINDOW_OFF.items() if key in hf or key in self.window_keys})
        _write_rope(hf, config, source, rope_form, groups, head_dim)
        if needs_megatron_ext(hf):
            hf["architectures"] = [HARPE_PREFIX + self.architecture]
        return hf

    def bind(self, config: TrainConfig, vocab_size: int, padded_vocab_size: int) -> "TensorPlan":
        """This family's table expanded for one model (HF has `vocab_size` rows, megatron `padded_vocab_size`)."""
        m = config.model
        shape = ModelShape(m.num_attention_heads, m.num_query_groups or m.num_attention_heads,
                           m.hidden_size // m.num_attention_heads, vocab_size, padded_vocab_size)
        return TensorPlan(self, [r for r in self.rules if r.applies(m)], m.num_layers, shape)


class MistralAdapter(LlamaAdapter):
    """Mistral (MistralForCausalLM): Llama's layout. A sliding window (v0.1: 4096) is dropped both ways
    (see WINDOW_OFF)."""

    family = "mistral"
    architecture = "MistralForCausalLM"
    older_names = ()
    model_type = "mistral"
    fresh_config = {}
    window_keys = ("sliding_window",)

    def qkv_bias(self, hf: dict) -> bool:
        return False

    def sliding_window(self, hf: dict) -> int | None:
        return hf.get("sliding_window", DEFAULT_WINDOW)


class Qwen2Adapter(LlamaAdapter):
    """Qwen2 / Qwen2.5 (Qwen2ForCausalLM): Llama's layout plus biases on q, k and v. A sliding window
    (use_sliding_window) is dropped both ways (see WINDOW_OFF)."""

    family = "qwen2"
    architecture = "Qwen2ForCausalLM"
    older_names = ()
    model_type = "qwen2"
    fresh_config = {}
    window_keys = ("use_sliding_window", "sliding_window")

    def qkv_bias(self, hf: dict) -> bool:
        return True

    def sliding_window(self, hf: dict) -> int | None:
        """transformers 5's rule: the window applies to the layers layer_types marks, by default to
        those from max_window_layers on."""
        window = hf.get("sliding_window", DEFAULT_WINDOW)
        if not hf.get("use_sliding_window") or window is None:
            return None
        types = hf.get("layer_types")
        if types is not None:
            return window if "sliding_attention" in types else None
        first_windowed_layer = hf.get("max_window_layers", 28)  # 28: Qwen2Config's default
        return window if first_windowed_layer < hf.get("num_hidden_layers", 0) else None

    def check_export(self, model: ModelConfig) -> None:
        if not model.qkv_bias:
            raise ConversionError("Qwen2ForCausalLM has q/k/v biases and this model has none: export it as "
                                  "family llama or mistral")

    def export_overrides(self, config: TrainConfig, source: dict) -> dict:
        layers = config.model.num_layers
        return {"max_window_layers": source.get("max_window_layers", layers),
                "layer_types": ["full_attention"] * layers}  # no window: see WINDOW_OFF


# An export whose RoPE only megatron_ext runs (rope_type 'harpe' or 'megatron_ext') is named HARPE_PREFIX + its
# family's architecture (HarpeLlamaForCausalLM, ...): vLLM then picks megatron_ext.serve's model (its plugin registers
# these names), stock vLLM refuses the unknown architecture by name instead of serving one base, and transformers
# (which picks its class by model_type) still refuses the rope_type; megatron_ext.hf loads it.
HARPE_PREFIX = "Harpe"
ADAPTERS = {adapter.family: adapter for adapter in (LlamaAdapter(), MistralAdapter(), Qwen2Adapter())}
BY_ARCHITECTURE = {name: adapter for adapter in ADAPTERS.values()
                   for name in (adapter.architecture, *adapter.older_names, HARPE_PREFIX + adapter.architecture)}


def adapter_for_hf(hf: dict, where: str) -> LlamaAdapter:
    """The adapter for a config.json dict, by its architecture; ConversionError naming it if unknown."""
    architectures = hf.get("architectures") or []
    for name in architectures:
        if name in BY_ARCHITECTURE:
            return BY_ARCHITECTURE[name]
    named = architectures or [hf.get("model_type", "none given")]
    raise ConversionError(
        f"unknown architecture {', '.join(map(str, named))} in {where}: supported are "
        f"{', '.join(adapter.architecture for adapter in ADAPTERS.values())}")


def adapter_for_family(family: str) -> LlamaAdapter:
    if family not in ADAPTERS:
        raise ConversionError(f"unknown model family {family!r}: choose one of {', '.join(ADAPTERS)}")
    return ADAPTERS[family]


# --- a family's table, expanded for one model --------------------------------------------------

class TensorPlan:
    """Every megatron tensor of one model, the Hugging Face tensors it is made of, and how."""

    def __init__(self, adapter: LlamaAdapter, rules: list[Rule], num_layers: int, shape: ModelShape):
        self.adapter, self.shape = adapter, shape
        self.entries: dict[str, tuple[tuple[str, ...], object]] = {}  # megatron name -> (hf names, transform)
        for rule in rules:
            layers = range(num_layers) if "{}" in rule.megatron else [None]
            for layer in layers:
                self.entries[rule.megatron.format(layer)] = (
                    tuple(name.format(layer) for name in rule.hf), rule.transform)

    def hf_names(self) -> list[str]:
        return [name for hf, _ in self.entries.values() for name in hf]

    def check_covers(self, megatron_names) -> None:
        """Every tensor of the megatron model has a rule (and every rule a tensor)."""
        megatron_names = set(megatron_names)
        missing = sorted(megatron_names - set(self.entries))
        extra = sorted(set(self.entries) - megatron_names)
        if missing or extra:
            raise ConversionError(
                f"the {self.adapter.family} adapter does not match megatron_ext's model: no rule for "
                f"{missing or 'nothing'}, rules without a tensor: {extra or 'none'}")

    def hf_shapes(self, megatron_shapes: dict[str, torch.Size]) -> dict[str, tuple[int, ...]]:
        """The Hugging Face shapes these megatron shapes imply (the transforms run on meta tensors)."""
        shapes = {}
        for name, (hf_names, transform) in self.entries.items():
            parts = transform.to_hf(torch.empty(megatron_shapes[name], device="meta"), self.shape)
            shapes.update({hf: tuple(part.shape) for hf, part in zip(hf_names, parts)})
        return shapes

    def to_megatron(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        hf_names, transform = self.entries[name]
        return transform.to_megatron([read(hf) for hf in hf_names], self.shape)

    def to_hf(self, name: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        hf_names, transform = self.entries[name]
        return dict(zip(hf_names, transform.to_hf(tensor, self.shape)))


# --- helpers -------------------------------------------------------------------------------------

def _required(hf: dict, key: str):
    if hf.get(key) is None:
        raise ConversionError(f"config.json has no {key!r}: it is needed to build the model")
    return hf[key]


def _check_exportable(m: ModelConfig) -> None:
    if m.normalization != "RMSNorm" or not m.swiglu:
        raise ConversionError(
            f"model.normalization={m.normalization}, model.swiglu={m.swiglu}: Llama/Mistral/Qwen2 use "
            f"RMSNorm and SwiGLU; this model has no Hugging Face counterpart")
    if m.hidden_size % m.num_attention_heads:
        raise ConversionError("model.hidden_size must be divisible by model.num_attention_heads")


def exported_context(config: TrainConfig) -> tuple[int, str]:
    """config.json's max_position_embeddings and where it comes from: the context the checkpoint was trained for
    (its model.seq_length, or PoSE's target), except under dynamic NTK, whose original length transformers reads
    from that field."""
    original = dynamic_max_positions(config.rope)
    if original is not None:
        return original, ("rope.scaling_params.original_max_position_embeddings (transformers' dynamic NTK reads its "
                          "original length from max_position_embeddings)")
    if config.pose.enabled:
        return config.pose.target_length, (f"pose.target_length (PoSE trained positions up to it in "
                                           f"{config.model.seq_length}-token windows)")
    return config.model.seq_length, "model.seq_length (the length it was trained at)"


def _dtype_key(hf: dict) -> str:
    return "torch_dtype" if "torch_dtype" in hf and "dtype" not in hf else "dtype"


def _write_rope(hf: dict, config: TrainConfig, source: dict | None, rope_form: str | None,
                groups: int, head_dim: int) -> None:
    """The RoPE fields: the source's own, verbatim, when they still describe config.rope."""
    form = rope_form or (hf_rope_parameters(source)[1] if source else "both")
    if source and rope_form is None:
        try:
            unchanged = rope_from_hf(source) == config.rope
        except ConversionError:
            unchanged = False
        if unchanged:  # hf started as a copy of source: its RoPE fields are already there
            return
    set_hf_rope(hf, rope_to_hf(config.rope, num_query_groups=groups, head_dim=head_dim), form)

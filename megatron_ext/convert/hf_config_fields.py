"""The fields of a Hugging Face config.json that the converters and transformers read, each checked for its kind and
range before anything uses it (`check_config_fields`), and the parameters a Llama-family config implies checked
against what its safetensors hold (`check_implied_parameters`): a config.json of the wrong types, or one claiming a
model thousands of times larger than its weights, is refused in one line instead of failing deep in the
conversion or asking for terabytes. Only fields that are present are checked (a missing required one is the
adapter's refusal). Standard library only.
"""

import math
from pathlib import Path

from megatron_ext.errors import ConversionError

MAX_SIZE = 2**31 - 1  # every size of a real model fits in int32 (and megatron's and torch's index math)


def _count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and minimum <= value <= MAX_SIZE


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _token_id(value) -> bool:
    return value is None or _count(value, 0) or (isinstance(value, list) and all(_count(v, 0) for v in value))


# the RoPE settings transformers (and megatron_ext.rope.hf_forms) compute with, by the kind each must be; other keys
# (megatron_ext's scaling_params and head_base_params objects, flags) are read and checked by hf_forms
ROPE_KINDS = {
    **{key: (lambda v: isinstance(v, str), "a string") for key in (
        "rope_type", "type", "scaling", "head_base_strategy")},
    **{key: (lambda v: v is None or _number(v), "null or a finite number") for key in (
        "rope_theta", "factor", "attention_factor", "beta_fast", "beta_slow", "low_freq_factor", "high_freq_factor",
        "original_max_position_embeddings", "mscale", "mscale_all_dim", "partial_rotary_factor")},
    **{key: (lambda v: v is None or (isinstance(v, list) and all(_number(x) for x in v)),
             "null or a list of finite numbers") for key in ("short_factor", "long_factor", "head_bases")},
}


def _check_rope(value, path, field: str) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: {field} is {_shown(value)}, not null or an object of RoPE settings: is "
                              f"config.json the right one for this model, and whole?")
    for key, (test, wanted) in ROPE_KINDS.items():
        if key in value and not test(value[key]):
            raise ConversionError(f"{path}: {field}.{key} is {_shown(value[key])}, not {wanted}: is config.json the "
                                  f"right one for this model, and whole?")


# field -> (test, what it must be)
FIELDS = {
    **{name: (lambda v: _count(v, 1), f"an integer from 1 to {MAX_SIZE}") for name in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")},
    **{name: (lambda v: v is None or _count(v, 1), f"null or an integer from 1 to {MAX_SIZE}") for name in (
        "num_key_value_heads", "head_dim", "max_position_embeddings", "sliding_window")},
    "max_window_layers": (lambda v: v is None or _count(v, 0), f"null or an integer from 0 to {MAX_SIZE}"),
    **{name: (_token_id, "null, a token id >= 0 or a list of them") for name in (
        "bos_token_id", "eos_token_id", "pad_token_id")},
    "rms_norm_eps": (lambda v: _number(v) and 0 < v < 1, "a number between 0 and 1 (e.g. 1e-5)"),
    "rope_theta": (lambda v: _number(v) and v > 1, "a finite number > 1 (e.g. 10000)"),
    "initializer_range": (lambda v: _number(v) and v >= 0, "a finite number >= 0 (e.g. 0.02)"),
    "attention_dropout": (lambda v: _number(v) and 0 <= v <= 1, "a number from 0 to 1"),
    **{name: (lambda v: isinstance(v, bool), "true or false") for name in (
        "tie_word_embeddings", "attention_bias", "mlp_bias", "use_sliding_window", "use_cache")},
    **{name: (lambda v: isinstance(v, str), "a string") for name in ("hidden_act", "model_type")},
    **{name: (lambda v: v is None or isinstance(v, str), "null or a dtype name such as bfloat16") for name in (
        "dtype", "torch_dtype")},
    "architectures": (lambda v: v is None or (isinstance(v, list) and all(isinstance(a, str) for a in v)),
                      "a list of class names such as [\"LlamaForCausalLM\"]"),
}


def check_config_fields(config: dict, path) -> None:
    """Each field of FIELDS that `config` (the JSON object of config.json at `path`) has is of its kind."""
    for name, (test, wanted) in FIELDS.items():
        if name in config and not test(config[name]):
            raise ConversionError(f"{path}: {name} is {_shown(config[name])}, not {wanted}: is config.json the "
                                  f"right one for this model, and whole?")
    for name in ("rope_scaling", "rope_parameters"):
        _check_rope(config.get(name), path, name)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


LLAMA_FAMILY = ("llama", "mistral", "qwen2")


def implied_parameters(config: dict) -> int | None:
    """Parameters of a Llama-family model with this config.json (embedding, attention, SwiGLU MLP, norms, output
    unless tied), or None for another model type or missing sizes."""
    if config.get("model_type") not in LLAMA_FAMILY:
        return None
    try:
        vocab, hidden, ffn = config["vocab_size"], config["hidden_size"], config["intermediate_size"]
        layers, heads = config["num_hidden_layers"], config["num_attention_heads"]
    except KeyError:
        return None
    if not all(_count(v, 1) for v in (vocab, hidden, ffn, layers, heads)):
        return None
    head_dim = config.get("head_dim") or hidden // heads
    kv_heads = config.get("num_key_value_heads") or heads
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    per_layer = attention + 3 * hidden * ffn + 2 * hidden
    embeddings = vocab * hidden * (1 if config.get("tie_word_embeddings") else 2)
    return embeddings + layers * per_layer + hidden


SLACK_PARAMETERS = 2**24  # what a model may exceed twice its weights by before it is refused unbuilt


def check_implied_parameters(config: dict, path, stored_elements: int) -> None:
    """A Llama-family config.json must not imply a model far larger than its safetensors hold: one the weights cannot
    fill would be allocated (at any size the config claims) before its missing tensors are named. A near miss (a
    tensor missing, a size off) is left to the tensor-by-tensor check, which names the tensor."""
    implied = implied_parameters(config)
    if implied is not None and implied > 2 * stored_elements + SLACK_PARAMETERS:
        raise ConversionError(
            f"{path} implies a model of {implied:,} parameters, more than twice the {stored_elements:,} values the "
            f"safetensors weights of {Path(path).parent} hold: is config.json the right one for these weights "
            f"(hidden_size, intermediate_size, num_hidden_layers, vocab_size)?")

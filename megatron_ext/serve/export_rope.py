"""What a served export's config says about its rotation: the RopeConfig, checked for what an engine can run.

Reads the same config.json fields megatron_ext.convert writes (`rope_parameters` / `rope_scaling` with
rope_type 'harpe' or 'megatron_ext'), through megatron_ext.rope.hf_forms, so serving and conversion
cannot disagree. Imports no vllm and no transformers (the dict may come from either's config object).
"""

from megatron_ext.convert.adapters import HARPE_PREFIX
from megatron_ext.errors import ConversionError, UserError
from megatron_ext.rope.hf_forms import needs_megatron_ext, rope_from_hf
from megatron_ext.rope.config import RopeConfig
from megatron_ext.rope.scaling import follows_sequence_length

# The stock vLLM model each HARPE architecture runs on (vLLM's registry names; Mistral runs on Llama's code).
HARPE_ARCHITECTURES = {
    f"{HARPE_PREFIX}LlamaForCausalLM": "LlamaForCausalLM",
    f"{HARPE_PREFIX}MistralForCausalLM": "MistralForCausalLM",
    f"{HARPE_PREFIX}Qwen2ForCausalLM": "Qwen2ForCausalLM",
}


class ServeError(UserError):
    """An export the serving engine must not run as it is (named setting, and the fix)."""


def serving_rope(hf_config: dict) -> RopeConfig:
    """The export's RopeConfig, refused by name where an engine would serve it wrong.

    dynamic NTK recomputes every frequency from the current sequence length: a batch of sequences of
    different lengths sharing one KV cache (whose keys were rotated at earlier lengths) cannot follow it.
    """
    try:
        rope = rope_from_hf(hf_config)
    except ConversionError as error:
        raise ServeError(f"cannot serve this export's RoPE settings: {error}") from None
    if follows_sequence_length(rope.scaling):
        raise ServeError(
            f"RoPE scaling {rope.scaling!r} (dynamic NTK) cannot be served: its frequencies change with each "
            "sequence's current length, which keys already in the KV cache cannot follow. Re-export the model "
            "with a fixed scaling (ntk, yarn, linear) that it was trained or evaluated with")
    heads = hf_config["num_attention_heads"]
    groups = hf_config.get("num_key_value_heads") or heads
    try:
        rope.validate(num_attention_heads=heads, num_query_groups=groups)
    except ValueError as error:
        raise ServeError(f"the export's RoPE settings are invalid: {error}") from None
    return rope


def check_harpe_export(hf_config: dict, architecture: str) -> None:
    """Refuse a config named as a HARPE model whose RoPE stock code would run (or the reverse) by name."""
    if architecture not in HARPE_ARCHITECTURES:
        raise ServeError(f"architecture {architecture!r} is not one megatron_ext serves: "
                         f"{', '.join(HARPE_ARCHITECTURES)}")
    if not needs_megatron_ext(hf_config):
        raise ServeError(
            f"the export is named {architecture} but its RoPE (rope_type "
            f"{hf_config.get('rope_parameters') or hf_config.get('rope_scaling')}) is stock: set architectures to "
            f"[{HARPE_ARCHITECTURES[architecture]!r}] in config.json and serve it with stock vLLM")

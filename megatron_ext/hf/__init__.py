"""Load exported HARPE models in transformers: per-KV-group RoPE bases, no remote code.

    from megatron_ext.hf import load_harpe_model
    model = load_harpe_model("exported/")            # AutoModelForCausalLM + per-head rotation

A config.json whose RoPE is rope_type 'harpe' (per-KV-group bases) or 'megatron_ext' (a scaling
transformers lacks) stops stock transformers with KeyError; this loader is the explicit opt-in.
It runs transformers' own Llama / Mistral / Qwen2 code (trust_remote_code=False) and swaps the
rotation only (see megatron_ext.hf.rotary). Needs transformers; imports no megatron.
"""

import json
from pathlib import Path

from megatron_ext.rope.hf_forms import hf_rope_parameters, needs_megatron_ext, rope_from_hf
from megatron_ext.hf.rotary import PerGroupRotation, use_per_group_rope

__all__ = ["PerGroupRotation", "load_harpe_model", "use_per_group_rope"]


def load_harpe_model(path, **from_pretrained_kwargs):
    """AutoModelForCausalLM.from_pretrained(path) rotating each KV group with its own base.

    Models whose RoPE stock transformers runs itself load unchanged. Keyword arguments go to
    from_pretrained (dtype, device_map, attn_implementation, ...); trust_remote_code stays False.
    The returned model's config keeps the exported RoPE settings, so save_pretrained writes them back.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from megatron_ext.convert.hf_directory import check_hf_directory

    if from_pretrained_kwargs.pop("trust_remote_code", False):
        raise ValueError("load_harpe_model runs transformers' own model code only: drop trust_remote_code")
    if not from_pretrained_kwargs.setdefault("use_safetensors", True):
        raise ValueError("load_harpe_model reads safetensors weights only (unpickling can run code): "
                         "drop use_safetensors=False")
    check_hf_directory(path)  # no custom code, no pickles, nothing outside the directory, sound safetensors headers
    hf_config = json.loads((Path(path) / "config.json").read_text())
    if not needs_megatron_ext(hf_config):
        return AutoModelForCausalLM.from_pretrained(path, trust_remote_code=False, **from_pretrained_kwargs)
    rope = rope_from_hf(hf_config)
    exported, _ = hf_rope_parameters(hf_config)
    stock = {k: v for k, v in hf_config.items() if k not in ("rope_scaling", "rope_parameters", "rope_theta")}
    stock["rope_parameters"] = {"rope_type": "default", "rope_theta": rope.base}
    model_type = stock.pop("model_type")
    config = AutoConfig.for_model(model_type, **stock)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, trust_remote_code=False,
                                                 **from_pretrained_kwargs)
    use_per_group_rope(model, rope)
    model.config.rope_parameters = exported  # save_pretrained must not write the stand-in default RoPE
    return model

"""Hugging Face RoPE settings <-> megatron_ext's RopeConfig, in both config.json forms.

transformers >= 5 writes `rope_parameters` ({"rope_type", "rope_theta", ...}); 4.x writes
`rope_theta` + `rope_scaling`. Both read into one RopeConfig; writing picks the form. The converters, the
transformers loader (megatron_ext.hf) and the vLLM plugin read exports through this one module.
Pure python/torch: must not import megatron or transformers.
"""

import inspect

import torch

from megatron_ext.errors import ConversionError
from megatron_ext.rope.bases import head_bases
from megatron_ext.rope.config import RopeConfig
from megatron_ext.rope.scaling import ROPE_SCALINGS, _ntk_scaled_base

# rope_types transformers' Llama/Mistral/Qwen2 compute themselves, and the parameters we carry for
# each (named the same on both sides). The other keys transformers accepts are the rope_theta and
# partial_rotary_factor handled below.
STOCK_ROPE_PARAMETERS = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),  # the latter: see rope_from_hf
    "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
             "mscale_all_dim", "attention_factor", "truncate"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}
# rope_types only megatron_ext.hf can run (stock transformers stops with KeyError on them):
HARPE_ROPE_TYPE = "harpe"  # one base per KV group
CUSTOM_ROPE_TYPE = "megatron_ext"  # one base, but a scaling or rotary fraction transformers lacks
CUSTOM_KEYS = ("scaling", "scaling_params", "head_bases", "head_base_strategy", "head_base_params",
               "rotary_percent")
FORMS = ("rope_parameters", "rope_scaling", "both")
DEFAULT_THETA = 10000.0  # transformers' default when a config names no rope_theta


def hf_rope_parameters(hf_config: dict) -> tuple[dict, str]:
    """The config's RoPE settings as one new-form dict, and the form the file used (see FORMS).

    Follows transformers 5: a non-null `rope_scaling` wins over `rope_parameters`, "type" is the
    old name of "rope_type", and rope_theta defaults to 10000.
    """
    scaling, parameters = hf_config.get("rope_scaling"), hf_config.get("rope_parameters")
    old_form = "rope_scaling" in hf_config or "rope_theta" in hf_config
    form = ("both" if parameters and old_form else "rope_parameters" if parameters or not old_form
            else "rope_scaling")
    params = dict(scaling or parameters or {})
    layer_types = set(hf_config.get("layer_types") or ()) | {"full_attention", "sliding_attention"}
    nested = sorted(key for key in params if key in layer_types)
    if nested:
        raise ConversionError(
            f"the RoPE settings are nested per layer type ({nested}): megatron_ext uses one RoPE "
            f"setting for every layer; such models are not supported")
    legacy_type = params.pop("type", None)
    params.setdefault("rope_type", legacy_type or "default")
    params.setdefault("rope_theta", hf_config.get("rope_theta", DEFAULT_THETA))
    if "partial_rotary_factor" in hf_config:
        params.setdefault("partial_rotary_factor", hf_config["partial_rotary_factor"])
    return params, form


def rope_from_hf(hf_config: dict) -> RopeConfig:
    """RopeConfig for a Hugging Face config.json dict; ConversionError for what it cannot express."""
    params, _ = hf_rope_parameters(hf_config)
    rope_type, base = params.pop("rope_type"), float(params.pop("rope_theta"))
    if rope_type in (HARPE_ROPE_TYPE, CUSTOM_ROPE_TYPE):
        return _custom_from_hf(rope_type, base, params)
    if rope_type not in STOCK_ROPE_PARAMETERS:
        raise ConversionError(
            f"rope_type {rope_type!r} is not supported: megatron_ext reads "
            f"{', '.join([*STOCK_ROPE_PARAMETERS, HARPE_ROPE_TYPE, CUSTOM_ROPE_TYPE])}")
    partial = params.pop("partial_rotary_factor", 1.0)
    if partial not in (None, 1, 1.0):
        raise ConversionError(
            f"partial_rotary_factor ({partial}) is not supported for Llama/Mistral/Qwen2: transformers "
            f"rotates their whole head; remove it or convert a model that rotates every channel")
    unknown = sorted(set(params) - set(STOCK_ROPE_PARAMETERS[rope_type]))
    if unknown:
        raise ConversionError(
            f"rope_type {rope_type!r}: unknown parameter(s) {unknown} in the RoPE settings; "
            f"accepted: {list(STOCK_ROPE_PARAMETERS[rope_type]) or 'none'}. Refusing to drop them silently")
    scaling_params = {key: value for key, value in params.items() if value is not None}
    for beta in ("beta_fast", "beta_slow"):  # transformers reads `value or default`: 0 means unset
        if scaling_params.get(beta) == 0:
            del scaling_params[beta]
    max_positions = hf_config.get("max_position_embeddings")
    if rope_type in ("yarn", "llama3"):  # transformers fills it in the same way
        scaling_params.setdefault("original_max_position_embeddings", max_positions)
    if rope_type == "dynamic":  # transformers' dynamic NTK takes max_position_embeddings as the original length
        scaling_params["original_max_position_embeddings"] = max_positions
    return RopeConfig(base=base, scaling=rope_type, scaling_params=scaling_params)


def _custom_from_hf(rope_type: str, base: float, params: dict) -> RopeConfig:
    unknown = sorted(set(params) - set(CUSTOM_KEYS) - {"partial_rotary_factor"})
    if unknown:
        raise ConversionError(f"rope_type {rope_type!r}: unknown key(s) {unknown}; accepted: {list(CUSTOM_KEYS)}")
    scaling = params.get("scaling", "default")
    if scaling not in ROPE_SCALINGS:
        raise ConversionError(f"rope_type {rope_type!r}: scaling {scaling!r} is not one of {list(ROPE_SCALINGS)}")
    rope = RopeConfig(base=base, scaling=scaling, scaling_params=dict(params.get("scaling_params") or {}),
                      rotary_percent=float(params.get("rotary_percent", 1.0)))
    if rope_type == HARPE_ROPE_TYPE:
        bases = params.get("head_bases")
        if not isinstance(bases, list) or not bases:
            raise ConversionError("rope_type 'harpe' needs head_bases: a list with one base per KV head")
        rope.head_base_strategy, rope.head_base_params = _head_base_source(
            bases, params.get("head_base_strategy"), dict(params.get("head_base_params") or {}))
    return rope


def _head_base_source(bases: list, strategy: str | None, strategy_params: dict) -> tuple[str, dict]:
    """The strategy that made `bases` if it gives them again exactly, else the list itself."""
    listed = torch.tensor(bases, dtype=torch.float64)
    if strategy and strategy != "explicit":
        try:
            again = head_bases(strategy, len(bases), **strategy_params)
        except ValueError:
            again = None
        if again is not None and torch.equal(again.to(torch.float64), listed):
            return strategy, strategy_params
    return "explicit", {"bases": [float(b) for b in bases]}


def rope_to_hf(rope: RopeConfig, *, num_query_groups: int, head_dim: int) -> dict:
    """New-form `rope_parameters` for a RopeConfig.

    Stock transformers runs the result where it can: NTK becomes a plain rope_theta (the same
    frequencies), ABF its new base. Per-head bases (rope_type 'harpe'), the PoSE repository's
    revised YaRN and partial rotation need megatron_ext.hf (rope_type 'megatron_ext').
    """
    params = dict(rope.scaling_params)
    stock = rope.head_base_strategy is None and rope.rotary_percent == 1.0
    if stock and rope.scaling in STOCK_ROPE_PARAMETERS:
        if rope.scaling == "dynamic":  # its original length travels as max_position_embeddings
            params.pop("original_max_position_embeddings")
        if rope.scaling == "llama3":  # transformers requires all four
            params = {**_defaults("llama3"), **params}
        return {"rope_type": rope.scaling, "rope_theta": rope.base, **params}
    if stock and rope.scaling == "ntk":
        return {"rope_type": "default", "rope_theta": _ntk_scaled_base(rope.base, head_dim, params["factor"])}
    if stock and rope.scaling == "abf":
        return {"rope_type": "default", "rope_theta": float(params["new_base"])}
    custom = {"rope_type": CUSTOM_ROPE_TYPE if rope.head_base_strategy is None else HARPE_ROPE_TYPE,
              "rope_theta": rope.base, "scaling": rope.scaling, "scaling_params": params}
    if rope.head_base_strategy is not None:
        custom.update(head_bases=rope.group_bases(num_query_groups).tolist(),
                      head_base_strategy=rope.head_base_strategy, head_base_params=dict(rope.head_base_params))
    if rope.rotary_percent != 1.0:
        custom["rotary_percent"] = rope.rotary_percent
    return custom


def _defaults(rope_type: str) -> dict:
    parameters = inspect.signature(ROPE_SCALINGS[rope_type]).parameters.values()
    return {p.name: p.default for p in parameters
            if p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty}


def set_hf_rope(hf_config: dict, rope_parameters: dict, form: str) -> None:
    """Write new-form `rope_parameters` into a config.json dict as `form` (see FORMS)."""
    if form not in FORMS:
        raise ConversionError(f"RoPE form {form!r} is not one of {FORMS}")
    for key in ("rope_parameters", "rope_scaling", "rope_theta"):
        hf_config.pop(key, None)
    if form in ("rope_parameters", "both"):
        hf_config["rope_parameters"] = dict(rope_parameters)
    if form in ("rope_scaling", "both"):
        scaling = {k: v for k, v in rope_parameters.items() if k != "rope_theta"}
        hf_config["rope_theta"] = rope_parameters["rope_theta"]
        hf_config["rope_scaling"] = None if scaling == {"rope_type": "default"} else scaling


def rope_keys(hf_config: dict) -> dict:
    """The RoPE fields of a config.json dict, as written (for round-trip checks and copying)."""
    return {k: hf_config[k] for k in ("rope_parameters", "rope_scaling", "rope_theta", "partial_rotary_factor")
            if k in hf_config}


def needs_megatron_ext(hf_config: dict) -> bool:
    """Whether the config's RoPE only runs through megatron_ext.hf (not stock transformers)."""
    params, _ = hf_rope_parameters(hf_config)
    return params["rope_type"] in (HARPE_ROPE_TYPE, CUSTOM_ROPE_TYPE)


def dynamic_max_positions(rope: RopeConfig) -> int | None:
    """transformers' dynamic NTK reads its original length from max_position_embeddings."""
    if rope.scaling == "dynamic" and rope.head_base_strategy is None and rope.rotary_percent == 1.0:
        return int(rope.scaling_params["original_max_position_embeddings"])
    return None

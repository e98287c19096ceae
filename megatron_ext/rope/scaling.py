"""RoPE inverse frequencies for one base under each scaling (default, PI, NTK, dynamic NTK, YaRN, llama3, ABF).
Pure torch math: must not import megatron or transformers."""

import inspect
import math
import numbers
from typing import Callable

import torch

# ----------------------------------------------------------------------------- shared math


def vanilla_inv_freq(base: float, dim: int) -> torch.Tensor:
    """inv_freq_j = base^(-2j/dim) for pairs j = 0 .. dim/2 - 1, in float64."""
    pair_exponent = torch.arange(0, dim, 2, dtype=torch.float64) / dim  # [dim // 2]
    return base**-pair_exponent


def _ntk_scaled_base(base: float, dim: int, ratio: float) -> float:
    """NTK-aware base: the lowest pair (exponent (dim-2)/dim) slows by exactly `ratio`, pair 0 not at all."""
    if dim == 2:  # a single pair has inv_freq 1 at every base
        return base
    return base * ratio ** (dim / (dim - 2))


def _yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature 0.1 * mscale * ln(factor) + 1 (1 when not extending)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_interpolation_weight(
    base: float, dim: int, original_max_position_embeddings: int, beta_fast: float, beta_slow: float, truncate: bool
) -> torch.Tensor:
    """Per pair [dim // 2]: 0 = keep the original frequency, 1 = fully interpolated (divided by factor).

    Pairs turning more than beta_fast times over the original context keep their frequency,
    pairs turning fewer than beta_slow times are interpolated, with a linear ramp in between.
    """

    def pair_turning(rotations: float) -> float:  # j solving original / (2π · base^(2j/dim)) = rotations
        wavelengths = original_max_position_embeddings / (2 * math.pi * rotations)
        return dim * math.log(wavelengths) / (2 * math.log(base))

    low, high = pair_turning(beta_fast), pair_turning(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    # Clamped to dim - 1 (not dim/2 - 1) as in the YaRN reference code and HF, so results match theirs.
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero; same nudge as the reference
    pairs = torch.arange(dim // 2, dtype=torch.float64)
    return ((pairs - low) / (high - low)).clamp(0, 1)


# ----------------------------------------------------------------------------- variants
# Each returns (inv_freq [dim // 2] in float64, attention factor). Keyword-only parameters,
# with their defaults, are the variant's parameter spec: validate_rope_params reads them.


def default_inv_freq(base: float, dim: int) -> tuple[torch.Tensor, float]:
    """Vanilla RoPE."""
    return vanilla_inv_freq(base, dim), 1.0


def linear_inv_freq(base: float, dim: int, *, factor: float) -> tuple[torch.Tensor, float]:
    """Position interpolation (PI): m -> m / factor, i.e. every frequency divided by factor."""
    return vanilla_inv_freq(base, dim) / factor, 1.0


def ntk_inv_freq(base: float, dim: int, *, factor: float) -> tuple[torch.Tensor, float]:
    """Static NTK-aware scaling: base -> base * factor^(dim / (dim - 2))."""
    return vanilla_inv_freq(_ntk_scaled_base(base, dim, factor), dim), 1.0


def dynamic_inv_freq(
    base: float, dim: int, *, factor: float, original_max_position_embeddings: int, seq_len: int | None = None
) -> tuple[torch.Tensor, float]:
    """Dynamic NTK as HF computes it: vanilla up to the original length, then NTK with a ratio
    factor * seq_len / original - (factor - 1) that grows with the current length seq_len."""
    original = original_max_position_embeddings
    if seq_len is None or seq_len <= original:
        return vanilla_inv_freq(base, dim), 1.0
    ratio = factor * seq_len / original - (factor - 1)
    return vanilla_inv_freq(_ntk_scaled_base(base, dim, ratio), dim), 1.0


def yarn_inv_freq(
    base: float,
    dim: int,
    *,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
    mscale: float | None = None,
    mscale_all_dim: float | None = None,
    attention_factor: float | None = None,
    truncate: bool = True,
) -> tuple[torch.Tensor, float]:
    """YaRN in Hugging Face's form: per pair, a linear blend of the original inv_freq and inv_freq / factor."""
    weight = _yarn_interpolation_weight(base, dim, original_max_position_embeddings, beta_fast, beta_slow, truncate)
    inv_freq = vanilla_inv_freq(base, dim) * ((1 - weight) + weight / factor)
    if attention_factor is None:
        # As in HF: mscale counts only together with mscale_all_dim (DeepSeek-style configs).
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    return inv_freq, float(attention_factor)


def yarn_pose_inv_freq(
    base: float,
    dim: int,
    *,
    factor: float,
    original_max_position_embeddings: int,
    beta_fast: float = 32.0,
    beta_slow: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """The PoSE repository's "revised YaRN": per pair, a linear blend of the *wavelength* instead.

    Read in github dwzhu-pku/PoSE (commit a3d4ba8), src/my_modeling_llama.py,
    LlamaYaRNScaledRotaryEmbedding.revised_yarn, the method its __init__ calls (the README points
    to jquesnelle/yarn issue #24 for why). With HF's ramp (floor/ceil ends, beta_fast 32,
    beta_slow 1) it sets inv_freq_mask = 1 - ramp = 1 - weight, then
        inv_freq = inv_freq / ((1 - inv_freq_mask) * scale + inv_freq_mask)
        mscale   = 0.1 * ln(scale) + 1     (no mscale / mscale_all_dim / attention_factor)
    It agrees with HF's yarn where the weight is 0 or 1 and differs on the ramp between.
    """
    weight = _yarn_interpolation_weight(base, dim, original_max_position_embeddings, beta_fast, beta_slow, True)
    inv_freq = vanilla_inv_freq(base, dim) / ((1 - weight) + weight * factor)
    return inv_freq, _yarn_mscale(factor)


def llama3_inv_freq(
    base: float,
    dim: int,
    *,
    factor: float = 8.0,
    low_freq_factor: float = 1.0,
    high_freq_factor: float = 4.0,
    original_max_position_embeddings: int = 8192,
) -> tuple[torch.Tensor, float]:
    """Llama 3.1: pairs turning more than high_freq_factor times over the original context keep
    their frequency, fewer than low_freq_factor times are divided by factor, smooth in between."""
    inv_freq = vanilla_inv_freq(base, dim)
    rotations = original_max_position_embeddings * inv_freq / (2 * math.pi)  # original / wavelength
    keep = ((rotations - low_freq_factor) / (high_freq_factor - low_freq_factor)).clamp(0, 1)
    return inv_freq * (keep + (1 - keep) / factor), 1.0


def abf_inv_freq(base: float, dim: int, *, new_base: float) -> tuple[torch.Tensor, float]:
    """Adjusted base frequency: vanilla RoPE at new_base (e.g. 10k -> 500k); `base` is ignored."""
    return vanilla_inv_freq(new_base, dim), 1.0


ROPE_SCALINGS: dict[str, Callable[..., tuple[torch.Tensor, float]]] = {
    "default": default_inv_freq,
    "linear": linear_inv_freq,
    "ntk": ntk_inv_freq,
    "dynamic": dynamic_inv_freq,
    "yarn": yarn_inv_freq,
    "yarn_pose": yarn_pose_inv_freq,
    "llama3": llama3_inv_freq,
    "abf": abf_inv_freq,
}


def rope_types() -> list[str]:
    """The registry keys, i.e. the accepted rope_type names."""
    return list(ROPE_SCALINGS)


def follows_sequence_length(rope_type: str) -> bool:
    """Whether the scaling's frequencies change with the current sequence length (its function takes
    `seq_len`: dynamic NTK): such a model recomputes them per forward and cannot cache rotated keys."""
    return "seq_len" in inspect.signature(ROPE_SCALINGS[rope_type]).parameters


# ----------------------------------------------------------------------------- validation


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _above(limit: float) -> Callable[[object], bool]:
    return lambda value: _is_real(value) and value > limit


def _at_least(limit: float) -> Callable[[object], bool]:
    return lambda value: _is_real(value) and value >= limit


def _positive_int(value) -> bool:
    return _is_int(value) and value > 0


def _even_int_from_2(value) -> bool:
    return _is_int(value) and value >= 2 and value % 2 == 0


# One rule per parameter name (a name means the same in every variant): (is_valid, requirement, fix).
_RULES: dict[str, tuple[Callable[[object], bool], str, str]] = {
    "base": (_above(1), "a number > 1", "set the RoPE base (rope_theta), e.g. 10000"),
    "dim": (_even_int_from_2, "an even int >= 2", "pass the rotary dimension head_dim * rotary_percent, even"),
    "factor": (_at_least(1), "a number >= 1", "set factor to target length / original length"),
    "original_max_position_embeddings": (_positive_int, "a positive int", "set it to the pretraining length"),
    "seq_len": (_positive_int, "a positive int", "pass the current sequence length, or leave it unset"),
    "beta_fast": (_above(0), "a number > 0", "leave it unset for YaRN's 32"),
    "beta_slow": (_above(0), "a number > 0", "leave it unset for YaRN's 1"),
    "mscale": (_at_least(0), "a number >= 0", "leave it unset unless the checkpoint sets it"),
    "mscale_all_dim": (_at_least(0), "a number >= 0", "leave it unset unless the checkpoint sets it"),
    "attention_factor": (_above(0), "a number > 0", "leave it unset to get 0.1 * ln(factor) + 1"),
    "truncate": (lambda value: isinstance(value, bool), "True or False", "leave it unset for HF's True"),
    "low_freq_factor": (_above(0), "a number > 0", "leave it unset for Llama 3.1's 1"),
    "high_freq_factor": (_above(0), "a number > 0", "leave it unset for Llama 3.1's 4"),
    "new_base": (_above(1), "a number > 1", "set new_base to the extended base, e.g. 500000"),
}

# (larger, smaller): where a variant takes both, the first must exceed the second.
_ORDERED_PAIRS = (("beta_fast", "beta_slow"), ("high_freq_factor", "low_freq_factor"))


def is_valid_base(base) -> bool:
    """The one rule for a RoPE base, shared by rope.base, every HARPE head base and ABF's new_base: a number > 1
    (a base <= 1 would make the rotation speed up, not slow down, along the channel pairs)."""
    return _RULES["base"][0](base)


def _check_value(rope_type: str, name: str, value) -> None:
    is_valid, requirement, fix = _RULES[name]
    if not is_valid(value):
        raise ValueError(f"rope_type {rope_type!r}: {name} ({value!r}) must be {requirement}: {fix}")


def _parameter_spec(rope_type: str) -> dict[str, inspect.Parameter]:
    """A variant's keyword-only parameters: their names and defaults (empty = required)."""
    parameters = inspect.signature(ROPE_SCALINGS[rope_type]).parameters.values()
    return {p.name: p for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY}


def validate_rope_params(rope_type: str, **params) -> None:
    """The one place scaling parameters are checked (no base/dim needed, so usable at config time).

    Raises ValueError naming the parameter and the fix for an unknown rope_type, an unknown,
    missing or out-of-range parameter.
    """
    if rope_type not in ROPE_SCALINGS:
        raise ValueError(f"rope_type {rope_type!r} is unknown: set rope_type to one of {rope_types()}")
    spec = _parameter_spec(rope_type)
    for name in params:
        if name not in spec:
            raise ValueError(
                f"rope_type {rope_type!r} has no parameter {name!r}: remove it or fix its name "
                f"(accepted: {list(spec) or 'none'})"
            )
    for name, parameter in spec.items():
        if parameter.default is inspect.Parameter.empty and name not in params:
            raise ValueError(f"rope_type {rope_type!r} needs parameter {name!r}: {_RULES[name][2]}")
    for name, value in params.items():
        if not (value is None and spec[name].default is None):  # None means "not set" where that is the default
            _check_value(rope_type, name, value)
    values = {name: parameter.default for name, parameter in spec.items()} | params
    for larger, smaller in _ORDERED_PAIRS:
        if larger in values and values[larger] <= values[smaller]:
            raise ValueError(
                f"rope_type {rope_type!r}: {larger} ({values[larger]}) must exceed {smaller} ({values[smaller]}): "
                f"raise {larger} or lower {smaller}"
            )


def rope_inv_freq(rope_type: str, *, base: float, dim: int, **params) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [dim // 2] (float32, computed in float64 then cast) and the attention
    factor (YaRN's mscale; 1.0 for methods without one) for one RoPE base.
    `dim` is the rotary dimension (head_dim * rotary_percent, even).
    Unknown rope_type or bad/missing/unknown params -> ValueError naming the parameter and the fix."""
    validate_rope_params(rope_type, **params)
    _check_value(rope_type, "base", base)
    _check_value(rope_type, "dim", dim)
    inv_freq, attention_factor = ROPE_SCALINGS[rope_type](float(base), int(dim), **params)
    return inv_freq.to(torch.float32), float(attention_factor)

"""megatron_ext.rope.scaling against Hugging Face's rope init functions and hand-written formulas."""

import inspect
import math

import numpy as np
import pytest
import torch

from megatron_ext.rope.scaling import ROPE_SCALINGS, rope_inv_freq, rope_types, validate_rope_params

DIMS = (64, 128)
BASES = (10_000.0, 500_000.0)


# ----------------------------------------------------------------------------- Hugging Face references


@pytest.fixture(scope="module")
def hf():
    return pytest.importorskip("transformers")


def hf_inv_freq(hf, dim, base, rope_parameters, max_position_embeddings, seq_len=None):
    """inv_freq and attention factor from transformers' own init function for a local LlamaConfig.

    `rope_theta` + `rope_scaling` is accepted by transformers 4.x and 5.x alike (5.x folds both
    into `config.rope_parameters`).
    """
    config = hf.LlamaConfig(
        hidden_size=2 * dim,
        num_attention_heads=2,
        head_dim=dim,
        max_position_embeddings=max_position_embeddings,
        rope_theta=base,
        rope_scaling=dict(rope_parameters) if rope_parameters else None,
    )
    rope_type = (rope_parameters or {}).get("rope_type", "default")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type == "default" and "default" not in ROPE_INIT_FUNCTIONS:  # 5.x moved it onto the model
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding.compute_default_rope_parameters(config)
    return ROPE_INIT_FUNCTIONS[rope_type](config, "cpu", seq_len=seq_len)


def assert_close_to_hf(ours, theirs):
    inv_freq, attention_factor = ours
    hf_freq, hf_attention_factor = theirs
    assert inv_freq.dtype == torch.float32 and inv_freq.shape == hf_freq.shape
    torch.testing.assert_close(inv_freq, hf_freq.float(), rtol=2e-6, atol=0)
    assert attention_factor == pytest.approx(float(hf_attention_factor), rel=1e-12)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
def test_default_matches_hf_vanilla_rope(hf, dim, base):
    assert_close_to_hf(rope_inv_freq("default", base=base, dim=dim), hf_inv_freq(hf, dim, base, None, 4096))


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("factor", [1.0, 2.0, 4.5, 32.0])
def test_linear_matches_hf_linear(hf, dim, base, factor):
    ours = rope_inv_freq("linear", base=base, dim=dim, factor=factor)
    theirs = hf_inv_freq(hf, dim, base, {"rope_type": "linear", "factor": factor}, 4096)
    assert_close_to_hf(ours, theirs)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("factor", [2.0, 8.0])
@pytest.mark.parametrize("seq_len", [None, 1000, 4096, 8192, 14_000, 131_072])
def test_dynamic_matches_hf_dynamic_at_every_length(hf, dim, base, factor, seq_len):
    original = 4096
    ours = rope_inv_freq(
        "dynamic", base=base, dim=dim, factor=factor, original_max_position_embeddings=original, seq_len=seq_len
    )
    theirs = hf_inv_freq(hf, dim, base, {"rope_type": "dynamic", "factor": factor}, original, seq_len=seq_len)
    assert_close_to_hf(ours, theirs)


YARN_CASES = [
    {"factor": 2.0, "original_max_position_embeddings": 4096},
    {"factor": 4.0, "original_max_position_embeddings": 2048},
    {"factor": 32.0, "original_max_position_embeddings": 4096},
    {"factor": 16.0, "original_max_position_embeddings": 8192, "truncate": False},
    {"factor": 8.0, "original_max_position_embeddings": 4096, "beta_fast": 64, "beta_slow": 2},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0, "mscale_all_dim": 0.8},
    {"factor": 4.0, "original_max_position_embeddings": 4096, "mscale": 0.707},  # HF ignores mscale alone
    {"factor": 4.0, "original_max_position_embeddings": 4096, "attention_factor": 1.5},
    {"factor": 1.0, "original_max_position_embeddings": 4096},
    # With base 1e4 the slow end of the ramp lands past dim/2 and is clamped at dim - 1, as HF does.
    {"factor": 2.0, "original_max_position_embeddings": 131_072},
]


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("params", YARN_CASES, ids=lambda p: "-".join(f"{k[:8]}={v}" for k, v in p.items()))
def test_yarn_matches_hf_yarn_including_attention_factor(hf, dim, base, params):
    ours = rope_inv_freq("yarn", base=base, dim=dim, **params)
    max_positions = int(params["factor"] * params["original_max_position_embeddings"])
    theirs = hf_inv_freq(hf, dim, base, {"rope_type": "yarn", **params}, max_positions)
    assert_close_to_hf(ours, theirs)


LLAMA3_CASES = [
    {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    {"factor": 16.0, "low_freq_factor": 2.0, "high_freq_factor": 8.0, "original_max_position_embeddings": 4096},
]


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("params", LLAMA3_CASES, ids=lambda p: f"factor={p['factor']}-low={p['low_freq_factor']}")
def test_llama3_matches_hf_llama3(hf, dim, base, params):
    ours = rope_inv_freq("llama3", base=base, dim=dim, **params)
    max_positions = int(params["factor"] * params["original_max_position_embeddings"])
    theirs = hf_inv_freq(hf, dim, base, {"rope_type": "llama3", **params}, max_positions)
    assert_close_to_hf(ours, theirs)


def test_llama3_defaults_are_llama_3_1s_8_1_4_8192(hf):
    ours = rope_inv_freq("llama3", base=500_000.0, dim=128)
    llama_31 = LLAMA3_CASES[0]
    assert_close_to_hf(ours, hf_inv_freq(hf, 128, 500_000.0, {"rope_type": "llama3", **llama_31}, 131_072))


# ----------------------------------------------------------------------------- hand-written formulas


def numpy_vanilla(base, dim):
    return 1.0 / base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize("factor", [1.0, 2.0, 8.0, 64.0])
def test_ntk_raises_base_by_factor_to_dim_over_dim_minus_2(dim, base, factor):
    inv_freq, attention_factor = rope_inv_freq("ntk", base=base, dim=dim, factor=factor)
    expected = numpy_vanilla(base * factor ** (dim / (dim - 2)), dim)
    np.testing.assert_allclose(inv_freq.numpy(), expected, rtol=1e-6)
    assert attention_factor == 1.0
    # The property behind the formula: pair 0 is untouched, the slowest pair is slowed by exactly factor.
    vanilla = numpy_vanilla(base, dim)
    assert inv_freq[0].item() == pytest.approx(1.0)
    assert inv_freq[-1].item() == pytest.approx(vanilla[-1] / factor, rel=1e-6)


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("new_base", [500_000.0, 5_000_000.0])
def test_abf_is_vanilla_rope_at_the_new_base_whatever_the_old_base(dim, new_base):
    for old_base in BASES:
        inv_freq, attention_factor = rope_inv_freq("abf", base=old_base, dim=dim, new_base=new_base)
        np.testing.assert_allclose(inv_freq.numpy(), numpy_vanilla(new_base, dim), rtol=1e-6)
        assert attention_factor == 1.0


def numpy_pose_revised_yarn(base, dim, scale, original, beta_fast=32, beta_slow=1):
    """The PoSE repo's revised YaRN, written from its description (dwzhu-pku/PoSE, src/my_modeling_llama.py)."""

    def correction_dim(rotations):
        return dim * np.log(original / (rotations * 2 * np.pi)) / (2 * np.log(base))

    low = max(np.floor(correction_dim(beta_fast)), 0)
    high = min(np.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2) - low) / (high - low), 0, 1)
    inv_freq_mask = 1 - ramp  # 1 = extrapolate (keep), 0 = interpolate
    inv_freq = numpy_vanilla(base, dim) / ((1 - inv_freq_mask) * scale + inv_freq_mask)
    mscale = 0.1 * np.log(scale) + 1 if scale > 1 else 1.0
    return inv_freq, mscale


@pytest.mark.parametrize("dim", DIMS)
@pytest.mark.parametrize("base", BASES)
@pytest.mark.parametrize(
    "factor, original, betas",
    [(2.0, 4096, (32, 1)), (16.0, 2048, (32, 1)), (64.0, 2048, (32, 1)), (8.0, 4096, (16, 2))],
)
def test_yarn_pose_matches_the_pose_repos_revised_yarn(dim, base, factor, original, betas):
    inv_freq, attention_factor = rope_inv_freq(
        "yarn_pose", base=base, dim=dim, factor=factor, original_max_position_embeddings=original,
        beta_fast=betas[0], beta_slow=betas[1],
    )
    expected_freq, expected_mscale = numpy_pose_revised_yarn(base, dim, factor, original, *betas)
    np.testing.assert_allclose(inv_freq.numpy(), expected_freq, rtol=1e-6)
    assert attention_factor == pytest.approx(expected_mscale, rel=1e-12)


def test_yarn_and_yarn_pose_differ_only_on_the_ramp_by_hand():
    # dim 8, base 1e4, original 2048, factor 4: vanilla inv_freq = 1, 0.1, 0.01, 0.001.
    # Ramp ends: 8 ln(2048 / (2π·32)) / (2 ln 1e4) = 1.008 -> floor 1;
    #            8 ln(2048 / 2π) / (2 ln 1e4) = 2.513 -> ceil 3; so the interpolation weights are 0, 0, 0.5, 1.
    # HF multiplies by (1 - w) + w / 4 -> 1, 0.1, 0.01·0.625, 0.001 / 4;
    # PoSE divides by (1 - w) + w · 4   -> 1, 0.1, 0.01 / 2.5, 0.001 / 4.
    params = dict(base=10_000.0, dim=8, factor=4.0, original_max_position_embeddings=2048)
    hf_yarn, hf_mscale = rope_inv_freq("yarn", **params)
    pose_yarn, pose_mscale = rope_inv_freq("yarn_pose", **params)
    np.testing.assert_allclose(hf_yarn.numpy(), [1.0, 0.1, 0.00625, 0.00025], rtol=1e-6)
    np.testing.assert_allclose(pose_yarn.numpy(), [1.0, 0.1, 0.004, 0.00025], rtol=1e-6)
    assert hf_mscale == pose_mscale == pytest.approx(0.1 * math.log(4.0) + 1)


def test_dynamic_is_vanilla_up_to_the_original_length():
    vanilla, _ = rope_inv_freq("default", base=10_000.0, dim=64)
    for seq_len in (None, 1, 4096):
        inv_freq, _ = rope_inv_freq(
            "dynamic", base=10_000.0, dim=64, factor=4.0, original_max_position_embeddings=4096, seq_len=seq_len
        )
        assert torch.equal(inv_freq, vanilla)


@pytest.mark.parametrize("rope_type", ["linear", "ntk", "yarn", "yarn_pose", "llama3"])
def test_factor_one_leaves_vanilla_rope_unchanged(rope_type):
    params = {"factor": 1.0}
    if rope_type in ("yarn", "yarn_pose"):
        params["original_max_position_embeddings"] = 4096
    inv_freq, attention_factor = rope_inv_freq(rope_type, base=500_000.0, dim=128, **params)
    np.testing.assert_allclose(inv_freq.numpy(), numpy_vanilla(500_000.0, 128), rtol=1e-6)
    assert attention_factor == 1.0


def test_returns_float32_half_of_the_rotary_dim_for_every_type():
    required = {"factor": 4.0, "original_max_position_embeddings": 4096, "new_base": 500_000.0}
    for rope_type in rope_types():
        spec = inspect.signature(ROPE_SCALINGS[rope_type]).parameters
        params = {name: value for name, value in required.items() if name in spec}
        inv_freq, attention_factor = rope_inv_freq(rope_type, base=10_000.0, dim=96, **params)
        assert inv_freq.dtype == torch.float32 and inv_freq.shape == (48,), rope_type
        assert isinstance(attention_factor, float) and attention_factor >= 1.0


def test_registry_holds_the_documented_types():
    assert rope_types() == ["default", "linear", "ntk", "dynamic", "yarn", "yarn_pose", "llama3", "abf"]


# ----------------------------------------------------------------------------- bad input


BAD_INPUTS = [
    # (rope_type, params, the parameter the message must name)
    ("yarn2", {}, "yarn2"),
    ("linear", {"factor": 0.0}, "factor"),
    ("linear", {"factor": -2.0}, "factor"),
    ("ntk", {"factor": 0.5}, "factor"),
    ("dynamic", {"factor": 0.5, "original_max_position_embeddings": 4096}, "factor"),
    ("yarn", {"factor": 0.9, "original_max_position_embeddings": 4096}, "factor"),
    ("yarn_pose", {"factor": 0.0, "original_max_position_embeddings": 4096}, "factor"),
    ("llama3", {"factor": 0.25}, "factor"),
    ("linear", {"factor": True}, "factor"),
    ("linear", {}, "factor"),
    ("yarn", {"factor": 4.0}, "original_max_position_embeddings"),
    ("dynamic", {"factor": 4.0}, "original_max_position_embeddings"),
    ("abf", {}, "new_base"),
    ("abf", {"new_base": 0.5}, "new_base"),
    ("linear", {"factor": 2.0, "original_max_position_embeddings": 4096}, "original_max_position_embeddings"),
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 4096, "beta_fsat": 32}, "beta_fsat"),
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 4096, "rope_theta": 1e4}, "rope_theta"),
    ("default", {"factor": 2.0}, "factor"),
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 4096.5}, "original_max_position_embeddings"),
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 4096, "truncate": "no"}, "truncate"),
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 4096, "attention_factor": 0.0}, "attention_factor"),
    ("yarn", {"factor": 2.0, "original_max_position_embeddings": 4096, "beta_fast": 1, "beta_slow": 2}, "beta_fast"),
    ("yarn_pose", {"factor": 2.0, "original_max_position_embeddings": 4096, "mscale": 1.0}, "mscale"),
    ("llama3", {"low_freq_factor": 4.0, "high_freq_factor": 4.0}, "high_freq_factor"),
    ("dynamic", {"factor": 2.0, "original_max_position_embeddings": 4096, "seq_len": 0}, "seq_len"),
]


@pytest.mark.parametrize("rope_type, params, named", BAD_INPUTS)
def test_bad_parameters_raise_value_error_naming_them(rope_type, params, named):
    with pytest.raises(ValueError, match=named):
        validate_rope_params(rope_type, **params)
    with pytest.raises(ValueError, match=named):  # rope_inv_freq checks through the same place
        rope_inv_freq(rope_type, base=10_000.0, dim=64, **params)


@pytest.mark.parametrize("dim", [7, 0, 64.0, -2])
def test_odd_or_non_int_rotary_dim_is_rejected(dim):
    with pytest.raises(ValueError, match="dim"):
        rope_inv_freq("default", base=10_000.0, dim=dim)


@pytest.mark.parametrize("base", [1.0, 0.0, -10.0, float("inf")])
def test_base_not_above_one_is_rejected(base):
    with pytest.raises(ValueError, match="base"):
        rope_inv_freq("linear", base=base, dim=64, factor=2.0)


def test_every_parameter_of_every_type_is_checked_with_a_message_naming_it():
    for rope_type, function in ROPE_SCALINGS.items():
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.kind is not parameter.KEYWORD_ONLY:
                continue
            params = {"factor": 2.0, "original_max_position_embeddings": 4096, "new_base": 1e6}
            params = {key: value for key, value in params.items() if key in inspect.signature(function).parameters}
            params[name] = "not a number"
            with pytest.raises(ValueError, match=name):
                validate_rope_params(rope_type, **params)


def test_config_time_validation_needs_no_base_or_dim():
    validate_rope_params("yarn", factor=32.0, original_max_position_embeddings=4096, mscale=None, truncate=False)
    validate_rope_params("llama3")
    validate_rope_params("default")


def test_only_dynamic_ntk_follows_the_sequence_length():
    """Derived from the scaling functions (a `seq_len` parameter), so a new length-dependent scaling is found
    by every place that recomputes frequencies per forward or refuses a rotated-key cache."""
    from megatron_ext.rope.scaling import follows_sequence_length, rope_types

    assert [name for name in rope_types() if follows_sequence_length(name)] == ["dynamic"]

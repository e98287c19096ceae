"""Per-head RoPE bases (HARPE): each strategy against the paper's formula, table or algorithm."""

import math

import numpy as np
import pytest
import torch

from megatron_ext.rope.bases import head_base_strategies, head_bases, validate_head_bases

# HARPE paper (arXiv 2412.07171) Table 2, x1e6, heads 1..32.
PAPER_TABLE2 = [
    1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47, 2.50, 2.65, 2.68, 2.71, 2.74, 2.80, 2.83, 2.92,
    3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46, 3.61, 3.88, 4.09, 4.15, 4.39, 4.45, 4.51, 4.54,
]


# ---------------------------------------------------------------- simple strategies


@pytest.mark.parametrize("num_heads", [1, 2, 8, 32])
def test_uniform_ascending_is_eq9(num_heads):
    b_min, b_max = 1e6, 5e6
    by_hand = [b_min + h * (b_max - b_min) / (num_heads - 1) if num_heads > 1 else b_min for h in range(num_heads)]
    bases = head_bases("uniform", num_heads, b_min=b_min, b_max=b_max)
    assert bases.dtype == torch.float64
    torch.testing.assert_close(bases, torch.tensor(by_hand, dtype=torch.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize("num_heads", [1, 8])
def test_uniform_descending_is_eq9_reversed(num_heads):
    b_min, b_max = 2e5, 1e6
    by_hand = [b_min + h * (b_max - b_min) / (num_heads - 1) if num_heads > 1 else b_min for h in range(num_heads)]
    bases = head_bases("uniform", num_heads, b_min=b_min, b_max=b_max, order="descending")
    torch.testing.assert_close(bases, torch.tensor(by_hand[::-1], dtype=torch.float64), rtol=1e-15, atol=0)


def test_constant_gives_every_head_the_stock_base():
    assert head_bases("constant", 4, base=10000.0).tolist() == [10000.0] * 4


def test_table2_preset_is_the_papers_table():
    bases = head_bases("harpe_llama2_7b_table2", 32)
    assert bases.tolist() == [round(b * 1e6) for b in PAPER_TABLE2]


def test_table2_preset_needs_32_heads_and_says_what_to_use_instead():
    with pytest.raises(ValueError, match="harpe_llama2_7b_table2.*'explicit'.*'peak_valley'"):
        head_bases("harpe_llama2_7b_table2", 8)


def test_explicit_bases_pass_through_as_float64():
    bases = head_bases("explicit", 3, bases=[1e4, 5e5, 2e6])
    assert bases.dtype == torch.float64 and bases.tolist() == [1e4, 5e5, 2e6]


@pytest.mark.parametrize(
    "bases, message",
    [
        ([1e4, 2e4], r"expected 3 bases .*got shape \(2,\)"),
        ([1e4, 0.0, 2e4], "head 1 has base 0.0"),
        ([1e4, 2e4, -5.0], "head 2 has base -5.0"),
        ([float("nan"), 1e4, 2e4], "head 0 has base nan"),
        ([1e4, float("inf"), 2e4], "head 1 has base inf"),
        ("1e4", "must be a list of numbers"),
    ],
)
def test_explicit_bases_are_validated(bases, message):
    with pytest.raises(ValueError, match=message):
        head_bases("explicit", 3, bases=bases)


def test_validate_head_bases_is_the_one_check():
    assert validate_head_bases(torch.tensor([1e4, 2e4]), 2).dtype == torch.float64
    with pytest.raises(ValueError, match="expected 4 bases"):
        validate_head_bases([1e4, 2e4], 4)


@pytest.mark.parametrize("base", [1.0, 0.5, -1.0, float("inf"), float("nan")])
def test_a_head_base_follows_the_same_rule_as_rope_base(base):
    from megatron_ext.rope import RopeConfig

    with pytest.raises(ValueError, match="must be finite and > 1"):
        validate_head_bases([1e4, base], 2)
    if math.isfinite(base):
        with pytest.raises(ValueError, match=r"rope.base .* must be > 1"):
            RopeConfig(base=base).validate(num_attention_heads=2)


def test_unknown_strategy_error_names_it_and_lists_the_known_ones():
    known = "constant, explicit, harpe_llama2_7b_table2, peak_valley, uniform"
    with pytest.raises(ValueError, match=f"'harpe2'.*{known}"):
        head_bases("harpe2", 32)
    assert head_base_strategies() == ["constant", "explicit", "harpe_llama2_7b_table2", "peak_valley", "uniform"]


@pytest.mark.parametrize(
    "strategy, params, message",
    [
        ("uniform", {"bmin": 1e6}, "uniform: unknown parameter.*bmin.*b_min, b_max, order"),
        ("constant", {}, "constant: missing base"),
        ("uniform", {"b_min": 5e6, "b_max": 1e6}, r"b_max \(1e6\) must exceed b_min \(5e6\).*descending"),
        ("uniform", {"order": "random"}, "order 'random' is unknown"),
        ("peak_valley", {"step": 1e6}, "only 5.*lower step"),
        ("peak_valley", {"peak_window": 32}, "peak_window"),
    ],
)
def test_bad_parameters_name_the_setting(strategy, params, message):
    with pytest.raises(ValueError, match=message):
        head_bases(strategy, 8, **params)


# ---------------------------------------------------------------- peak_valley (Algorithm 1)
# An independent, loop-by-loop numpy version of the definitions in bases.py: the waveform
# w_b(m) = 2/sqrt(d) sum_j cos(m b^(-2j/d)) on m = 32, 64, ..., 131072, one peak (max) and one
# valley (min) per 2048-token window, and the paper's d_j with nearest-neighbour distances.

DISTANCES = np.arange(32, 131072 + 1, 32, dtype=np.float64)
SAMPLES_PER_WINDOW = 2048 // 32


def naive_peaks_and_valleys(base, head_dim=128):
    waveform = np.zeros_like(DISTANCES)
    for j in range(head_dim // 2):
        waveform += np.cos(DISTANCES * base ** (-2 * j / head_dim))
    waveform *= 2 / math.sqrt(head_dim)
    peaks, valleys = [], []
    for start in range(0, len(DISTANCES), SAMPLES_PER_WINDOW):
        window = waveform[start:start + SAMPLES_PER_WINDOW]
        peaks.append(DISTANCES[start + window.argmax()])
        valleys.append(DISTANCES[start + window.argmin()])
    return np.array(peaks), np.array(valleys)


def summed_nearest_distance(points, others):
    return sum(np.abs(others - p).min() for p in points)


def naive_algorithm_1(candidates, num_heads):
    extrema = [naive_peaks_and_valleys(b) for b in candidates]
    chosen = [0]
    set_peaks, set_valleys = extrema[0]
    while len(chosen) < num_heads:
        d = [
            math.inf if j in chosen
            else summed_nearest_distance(peaks, set_valleys) + summed_nearest_distance(valleys, set_peaks)
            for j, (peaks, valleys) in enumerate(extrema)
        ]
        best = int(np.argmin(d))
        chosen.append(best)
        set_peaks = np.concatenate([set_peaks, extrema[best][0]])
        set_valleys = np.concatenate([set_valleys, extrema[best][1]])
    return sorted(candidates[i] for i in chosen)


def set_mismatch(bases):
    """Over all heads: how far each head's peaks are from the other heads' valleys, and vice versa."""
    extrema = [naive_peaks_and_valleys(b) for b in bases]
    total = 0.0
    for h, (peaks, valleys) in enumerate(extrema):
        other_peaks = np.concatenate([p for k, (p, _) in enumerate(extrema) if k != h])
        other_valleys = np.concatenate([v for k, (_, v) in enumerate(extrema) if k != h])
        total += summed_nearest_distance(peaks, other_valleys) + summed_nearest_distance(valleys, other_peaks)
    return total


def test_peak_valley_follows_algorithm_1_step_by_step():
    candidates = [1e6 + 5e4 * i for i in range(21)]  # b_min 1e6 .. b_max 2e6, stride 50k
    bases = head_bases("peak_valley", 4, b_min=1e6, b_max=2e6, step=5e4)
    assert bases.tolist() == naive_algorithm_1(candidates, 4)


def test_peak_valley_with_paper_settings(record_property):
    bases = head_bases("peak_valley", 32, b_min=1e6, b_max=5e6, step=3e4, head_dim=128)

    assert len(bases) == 32 and len(set(bases.tolist())) == 32
    assert (bases[1:] > bases[:-1]).all() and bases[0] == 1e6 and bases[-1] <= 5e6
    steps_from_b_min = (bases - 1e6) / 3e4
    assert torch.equal(steps_from_b_min, steps_from_b_min.round())  # every base is a candidate

    # The objective the search minimises, recomputed independently, beats evenly spread bases.
    uniform = np.linspace(1e6, 5e6, 32)
    table2 = np.array(PAPER_TABLE2) * 1e6
    sets = {"peak_valley": bases.numpy(), "uniform": uniform, "table2": table2}
    mismatch = {name: set_mismatch(set_bases) for name, set_bases in sets.items()}
    assert mismatch["peak_valley"] < 0.95 * mismatch["uniform"]

    # Reported, not asserted: how far the search lands from the paper's Table 2 (x1e6).
    difference = np.abs(bases.numpy() - table2) / 1e6
    print(f"\npeak_valley bases (x1e6): {np.round(bases.numpy() / 1e6, 2).tolist()}")
    print(f"vs Table 2: mean |diff| {difference.mean():.3f}, max |diff| {difference.max():.3f} (x1e6)")
    print("peak-valley mismatch (tokens, lower is better):", {k: round(v) for k, v in mismatch.items()})
    record_property("table2_mean_abs_diff_x1e6", round(float(difference.mean()), 4))
    record_property("table2_max_abs_diff_x1e6", round(float(difference.max()), 4))
    record_property("mismatch", {k: round(v) for k, v in mismatch.items()})

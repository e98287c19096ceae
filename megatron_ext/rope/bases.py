"""Per-head RoPE bases for HARPE: one function per strategy, picked by name from a registry.
Pure torch math: must not import megatron."""

import functools
import inspect
import math
from typing import Callable

import torch

from megatron_ext.rope.scaling import is_valid_base


def _num(x: float) -> str:
    """1000000.0 -> '1e6', 30000.0 -> '30000': numbers in error messages as people write them."""
    return f"{x:g}".replace("e+0", "e").replace("e+", "e")


# ----------------------------------------------------------------------------
# Strategies: (num_heads, **params) -> bases [num_heads]. head_bases() validates the result.


def constant_bases(num_heads: int, *, base: float) -> torch.Tensor:
    """Every head the same base: stock RoPE written as a strategy."""
    return torch.full((num_heads,), float(base), dtype=torch.float64)


def uniform_bases(
    num_heads: int, *, b_min: float = 1e6, b_max: float = 5e6, order: str = "ascending"
) -> torch.Tensor:
    """HARPE Eq. 9: b_h = b_min + h (b_max - b_min) / (N - 1), h = 0 .. N-1 (N = 1 gives b_min)."""
    if b_max <= b_min:
        raise ValueError(
            f"uniform: b_max ({_num(b_max)}) must exceed b_min ({_num(b_min)}): "
            "swap them or use order='descending'"
        )
    if order not in ("ascending", "descending"):
        raise ValueError(f"uniform: order {order!r} is unknown: use 'ascending' or 'descending'")
    spacing = (b_max - b_min) / (num_heads - 1) if num_heads > 1 else 0.0
    bases = b_min + torch.arange(num_heads, dtype=torch.float64) * spacing
    return bases if order == "ascending" else bases.flip(0)


def explicit_bases(num_heads: int, *, bases) -> torch.Tensor:
    """A list of bases from a config or a checkpoint, one per head."""
    return bases


# HARPE paper (arXiv 2412.07171), Table 2: the 32 bases (x1e6) its peak-valley search found for
# Llama-2-7B (b_min 1e6, b_max 5e6, stride 30k), head 1 .. head 32.
HARPE_LLAMA2_7B_TABLE2 = (
    1.00, 1.15, 1.30, 1.45, 2.17, 2.20, 2.23, 2.47, 2.50, 2.65, 2.68, 2.71, 2.74, 2.80, 2.83, 2.92,
    3.01, 3.04, 3.10, 3.13, 3.16, 3.22, 3.43, 3.46, 3.61, 3.88, 4.09, 4.15, 4.39, 4.45, 4.51, 4.54,
)


def harpe_llama2_7b_table2_bases(num_heads: int) -> torch.Tensor:
    """The paper's Table 2, as published (not recomputed)."""
    if num_heads != len(HARPE_LLAMA2_7B_TABLE2):
        raise ValueError(
            f"harpe_llama2_7b_table2: the paper's Table 2 lists 32 bases (Llama-2-7B has 32 heads), "
            f"num_heads is {num_heads}: use 'explicit' with your own list, or 'peak_valley' to search "
            f"{num_heads} bases"
        )
    # every Table 2 entry is a multiple of 1e4, so rounding gives the exact integers
    return (torch.tensor(HARPE_LLAMA2_7B_TABLE2, dtype=torch.float64) * 1e6).round()


# ----------------------------------------------------------------------------
# peak_valley: HARPE Algorithm 1, after Attention Buckets (Chen et al., arXiv 2312.04455).
#
# What the paper fixes (Sec. 3.2, Eq. 10, Algorithm 1): candidates b_min + i*s; start from {b_min};
# add the candidate b_j with the smallest
#     d_j = sum_{p in P_j} |p - v_s| + sum_{v in V_j} |v - p_s|
# (its peaks P_j against the chosen set's valleys V_s, its valleys V_j against the set's peaks P_s),
# then P_s += P_j, V_s += V_j, until N bases. We read |p - v_s| as the distance to the *nearest*
# valley of the set (the set grows, so index pairing is undefined).
# What it leaves open: which relative distances the waveform is looked at, and what counts as a peak.
# Our choice, in the spirit of Attention Buckets (which takes the highest point of each stretch of a
# few hundred tokens of a 4k window as that base's peaks):
#   - distances m = distance_step, 2*distance_step, ..., max_distance (default: every 32nd distance up
#     to the 128k target, 4096 points: 134 candidates x 64 pairs x 4096 distances = 35M cosines, ~0.3 s
#     on one core);
#   - in each window of peak_window tokens (default 2048, 64 windows), the highest sample is a peak and
#     the lowest a valley, so every base has the same number of each and the sums compare fairly.
# At these distances the waveform of bases 3% apart already decorrelates, so the result depends on
# these choices; it does not reproduce Table 2 (see tests/test_head_bases.py for how far it lands).


def attention_waveform(bases: torch.Tensor, distances: torch.Tensor, head_dim: int) -> torch.Tensor:
    """w_b(m) = (2/sqrt(d)) * sum_j cos(m * b^(-2j/d)): q.k of all-ones q, k at distance m, per base.

    bases [B], distances [M] -> [B, M] (float64)."""
    pair = torch.arange(head_dim // 2, dtype=torch.float64)
    inv_freq = bases.double()[:, None] ** (-2 * pair / head_dim)  # [B, d/2]
    waveform = torch.zeros(len(bases), len(distances), dtype=torch.float64)
    for inv_freq_j in inv_freq.T:  # one pair at a time keeps memory at [B, M]
        waveform += torch.cos(distances.double()[None, :] * inv_freq_j[:, None])
    return 2 / math.sqrt(head_dim) * waveform


def window_peaks_and_valleys(waveform: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The highest (peak) and lowest (valley) sample of each window of `window` samples.

    waveform [B, M] -> peak mask, valley mask, both bool [B, M] with M // window True per row."""
    num_bases, num_points = waveform.shape
    num_windows = num_points // window
    windows = waveform[:, : num_windows * window].reshape(num_bases, num_windows, window)
    window_start = torch.arange(num_windows) * window
    peaks = torch.zeros_like(waveform, dtype=torch.bool)
    valleys = torch.zeros_like(waveform, dtype=torch.bool)
    peaks.scatter_(1, windows.argmax(dim=2) + window_start, True)
    valleys.scatter_(1, windows.argmin(dim=2) + window_start, True)
    return peaks, valleys


def distance_to_nearest(distances: torch.Tensor, marked: torch.Tensor) -> torch.Tensor:
    """For every grid distance, how far (in tokens) the nearest marked one is. [M], [M] bool -> [M]."""
    return (distances[:, None] - distances[marked][None, :]).abs().amin(dim=1)


def peak_valley_search(
    peaks: torch.Tensor, valleys: torch.Tensor, distances: torch.Tensor, num_heads: int
) -> list[int]:
    """Algorithm 1's greedy loop over candidates (row 0 = b_min). Returns candidate rows in pick order.

    Keeping, for every grid distance, its distance to the set's nearest valley and nearest peak turns
    d_j for all candidates into two matrix-vector products per step."""
    chosen = [0]
    to_set_valley = distance_to_nearest(distances, valleys[0])  # [M]
    to_set_peak = distance_to_nearest(distances, peaks[0])  # [M]
    while len(chosen) < num_heads:
        mismatch = peaks.double() @ to_set_valley + valleys.double() @ to_set_peak  # d_j, [C]
        mismatch[chosen] = math.inf
        best = int(mismatch.argmin())
        chosen.append(best)
        to_set_valley = torch.minimum(to_set_valley, distance_to_nearest(distances, valleys[best]))
        to_set_peak = torch.minimum(to_set_peak, distance_to_nearest(distances, peaks[best]))
    return chosen


def peak_valley_bases(
    num_heads: int,
    *,
    b_min: float = 1e6,
    b_max: float = 5e6,
    step: float = 3e4,
    head_dim: int = 128,
    max_distance: int = 131072,
    distance_step: int = 32,
    peak_window: int = 2048,
) -> torch.Tensor:
    """HARPE Algorithm 1 (defaults: the paper's b_min, b_max, stride, Llama-2 head_dim, 128k target)."""
    _check_peak_valley(num_heads, b_min, b_max, step, head_dim, max_distance, distance_step, peak_window)
    bases = _search_peak_valley(num_heads, b_min, b_max, step, head_dim, max_distance, distance_step, peak_window)
    return torch.tensor(bases, dtype=torch.float64)


def _num_candidates(b_min: float, b_max: float, step: float) -> int:
    return math.floor((b_max - b_min) / step + 1e-9) + 1


def _check_peak_valley(num_heads, b_min, b_max, step, head_dim, max_distance, distance_step, peak_window) -> None:
    if b_max <= b_min or step <= 0:
        raise ValueError(
            f"peak_valley: need b_max ({_num(b_max)}) > b_min ({_num(b_min)}) and step ({_num(step)}) > 0: "
            "the paper uses b_min=1e6, b_max=5e6, step=3e4"
        )
    if head_dim < 2 or head_dim % 2:
        raise ValueError(f"peak_valley: head_dim ({head_dim}) must be even and >= 2: RoPE rotates channel pairs")
    if not 2 * distance_step <= peak_window <= max_distance:
        raise ValueError(
            f"peak_valley: need 2*distance_step ({2 * distance_step}) <= peak_window ({peak_window}) <= "
            f"max_distance ({max_distance}): a window needs two grid points and must fit in the range"
        )
    if num_heads > _num_candidates(b_min, b_max, step):
        raise ValueError(
            f"peak_valley: {num_heads} heads need {num_heads} distinct bases, but b_min..b_max in steps of "
            f"{_num(step)} gives only {_num_candidates(b_min, b_max, step)}: lower step or widen b_min..b_max"
        )


@functools.lru_cache(maxsize=16)
def _search_peak_valley(
    num_heads, b_min, b_max, step, head_dim, max_distance, distance_step, peak_window
) -> tuple[float, ...]:
    """Cached: model code asks for the bases once per layer and the search takes ~0.3 s."""
    num_candidates = _num_candidates(b_min, b_max, step)
    candidates = b_min + step * torch.arange(num_candidates, dtype=torch.float64)  # [C]: b_min, then Eq. 10
    distances = torch.arange(distance_step, max_distance + 1, distance_step, dtype=torch.float64)  # [M]
    waveform = attention_waveform(candidates, distances, head_dim)  # [C, M]
    peaks, valleys = window_peaks_and_valleys(waveform, peak_window // distance_step)
    chosen = peak_valley_search(peaks, valleys, distances, num_heads)
    return tuple(candidates[chosen].sort().values.tolist())


# ----------------------------------------------------------------------------
# Registry and the one validation every base list passes.

HEAD_BASE_STRATEGIES: dict[str, Callable[..., torch.Tensor]] = {
    "constant": constant_bases,
    "uniform": uniform_bases,
    "peak_valley": peak_valley_bases,
    "explicit": explicit_bases,
    "harpe_llama2_7b_table2": harpe_llama2_7b_table2_bases,
}


def head_base_strategies() -> list[str]:
    return sorted(HEAD_BASE_STRATEGIES)


def validate_head_bases(bases, num_heads: int) -> torch.Tensor:
    """One finite base > 1 per head (rope.scaling.is_valid_base), else ValueError. Returns float64 [num_heads]."""
    try:
        bases = torch.as_tensor(bases, dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError) as error:
        raise ValueError(f"head bases must be a list of numbers, got {bases!r}: {error}") from None
    if bases.dim() != 1 or len(bases) != num_heads:
        raise ValueError(
            f"head bases: expected {num_heads} bases (one per head), got shape {tuple(bases.shape)}: "
            f"give exactly one base per attention head"
        )
    bad = [head for head, base in enumerate(bases.tolist()) if not (math.isfinite(base) and is_valid_base(base))]
    if bad:
        head = bad[0]
        raise ValueError(
            f"head bases: head {head} has base {bases[head].item()}, bases must be finite and > 1: "
            "fix that entry (RoPE bases are typically 1e4 .. 1e7)"
        )
    return bases


def head_bases(strategy: str, num_heads: int, **params) -> torch.Tensor:
    """RoPE base of every head, float64 [num_heads], e.g. head_bases("uniform", 32, b_min=1e6, b_max=5e6)."""
    if strategy not in HEAD_BASE_STRATEGIES:
        raise ValueError(
            f"unknown head-base strategy {strategy!r}: known strategies are {', '.join(head_base_strategies())}"
        )
    if num_heads < 1:
        raise ValueError(f"{strategy}: num_heads ({num_heads}) must be >= 1")
    make_bases = HEAD_BASE_STRATEGIES[strategy]
    accepted = list(inspect.signature(make_bases).parameters.values())[1:]
    unknown = sorted(set(params) - {p.name for p in accepted})
    missing = [p.name for p in accepted if p.default is inspect.Parameter.empty and p.name not in params]
    if unknown or missing:
        problem = f"unknown parameter(s) {', '.join(unknown)}" if unknown else f"missing {', '.join(missing)}"
        raise ValueError(
            f"{strategy}: {problem}: it takes {', '.join(p.name for p in accepted) or 'no parameters'}"
        )
    return validate_head_bases(make_bases(num_heads, **params), num_heads)

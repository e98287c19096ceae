"""95% bootstrap intervals over seeds and prompts (or documents), for the reproduction's tables.

A resample draws the seeds with replacement, then within each drawn seed its prompts with replacement, and
recomputes the statistic; the interval is the 2.5th and 97.5th percentile of the resampled statistics. A
difference of two methods resamples the same seeds and prompt indices for both (the prompts of a seed are
the same for every method), so what they share cancels.
"""

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    mean: float
    low: float
    high: float

    def text(self, digits: int = 2) -> str:
        return f"{self.mean:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _resampled_indices(rng, sizes: list[int], resamples: int):
    """Per resample: (drawn seed positions, per drawn seed an index array into its items)."""
    for _ in range(resamples):
        seeds = rng.integers(0, len(sizes), len(sizes))
        yield seeds, [rng.integers(0, sizes[s], sizes[s]) for s in seeds]


def accuracy_interval(per_seed: list[list[float]], *, resamples: int = 2000, seed: int = 0) -> Interval:
    """Mean over seeds of each seed's mean outcome (e.g. exact match 0/1 per prompt), with its interval."""
    arrays = [np.asarray(values, dtype=float) for values in per_seed]
    mean = float(np.mean([a.mean() for a in arrays]))
    rng = np.random.default_rng(seed)
    stats = [np.mean([arrays[s][index].mean() for s, index in zip(seeds, indices)])
             for seeds, indices in _resampled_indices(rng, [len(a) for a in arrays], resamples)]
    return Interval(mean, *map(float, np.percentile(stats, [2.5, 97.5])))


def difference_interval(first: list[list[float]], second: list[list[float]], *, resamples: int = 2000,
                        seed: int = 0) -> Interval:
    """Mean of `first` minus mean of `second`, paired by seed and by item (both lists in the same order)."""
    pairs = [np.asarray(a, dtype=float) - np.asarray(b, dtype=float) for a, b in zip(first, second, strict=True)]
    return accuracy_interval(pairs, resamples=resamples, seed=seed)


def perplexity_interval(per_seed: list[tuple[list[float], list[int]]], *, resamples: int = 2000,
                        seed: int = 0) -> Interval:
    """exp(summed NLL / scored tokens) pooled over seeds' documents; per seed (document NLLs, document tokens)."""
    nlls = [np.asarray(n, dtype=float) for n, _ in per_seed]
    tokens = [np.asarray(t, dtype=float) for _, t in per_seed]

    def pooled(pairs):
        return float(np.exp(sum(n.sum() for n, _ in pairs) / sum(t.sum() for _, t in pairs)))

    mean = float(np.mean([pooled([(n, t)]) for n, t in zip(nlls, tokens)]))
    rng = np.random.default_rng(seed)
    stats = [np.mean([pooled([(nlls[s][index], tokens[s][index])]) for s, index in zip(seeds, indices)])
             for seeds, indices in _resampled_indices(rng, [len(n) for n in nlls], resamples)]
    return Interval(mean, *map(float, np.percentile(stats, [2.5, 97.5])))

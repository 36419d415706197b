"""The multi-bootstrap (Sellam et al., 2022, MultiBERTs): a confidence interval for a mean
score (or a difference of mean scores) that covers both seed noise and test-set noise.

Each bootstrap replicate resamples *both* the runs (seeds) and the test examples with
replacement and averages the per-example scores over the resampled grid. With a ``baseline``
it bootstraps the difference of two groups of runs evaluated on the same test examples
(examples resampled jointly, seeds of each group independently). Shared by the paper packages
(:mod:`ftlab.seeds` re-exports it; :mod:`ftlab.tint` uses it).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ftlab.errors import FtlabError


@dataclass
class Interval:
    """A point estimate with a bootstrap confidence interval ``[low, high]`` at ``level``."""

    estimate: float
    low: float
    high: float
    std: float
    level: float


def multi_bootstrap_samples(scores: np.ndarray, n_boot: int = 1000, seed: int = 0,
                            baseline: np.ndarray | None = None) -> np.ndarray:
    """``n_boot`` multi-bootstrap replicates of the mean score (or of the difference of means
    with ``baseline``). ``scores``: (runs, test examples) per-example scores (1/0 correctness)."""
    scores = _matrix(scores, "scores")
    rng = np.random.default_rng(seed)
    n_examples = scores.shape[1]
    # Counts of each example (and each seed) in a replicate: the resampled grid's mean is then
    # a weighted mean, without materialising the (n_boot, runs, examples) grid.
    examples = rng.multinomial(n_examples, np.full(n_examples, 1 / n_examples), size=n_boot)
    stat = _grid_mean(scores, examples, rng)
    if baseline is not None:
        baseline = _matrix(baseline, "baseline")
        if baseline.shape[1] != n_examples:
            raise FtlabError(f"baseline has {baseline.shape[1]} test examples, scores {n_examples}: "
                             "compare runs evaluated on the same test set")
        stat = stat - _grid_mean(baseline, examples, rng)
    return stat


def _grid_mean(scores: np.ndarray, example_counts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    runs, n_examples = scores.shape
    seed_counts = rng.multinomial(runs, np.full(runs, 1 / runs), size=len(example_counts))
    return np.einsum("br,re,be->b", seed_counts, scores, example_counts) / (runs * n_examples)


def multi_bootstrap(scores: np.ndarray, n_boot: int = 1000, seed: int = 0, level: float = 0.95,
                    baseline: np.ndarray | None = None) -> Interval:
    """The mean score over runs and test examples (minus ``baseline``'s) with a percentile
    multi-bootstrap interval at ``level``; ``std`` is the replicates' standard deviation."""
    if not 0 < level < 1:
        raise FtlabError(f"confidence level must lie in (0, 1), got {level}")
    samples = multi_bootstrap_samples(scores, n_boot, seed, baseline)
    estimate = float(np.mean(scores)) - (float(np.mean(baseline)) if baseline is not None else 0.0)
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), float(samples.std(ddof=1)), level)


def _matrix(values: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(values, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape or not np.all(np.isfinite(m)):
        raise FtlabError(f"{name}: expected a (runs x test examples) matrix of finite scores, "
                         f"got shape {m.shape}")
    return m

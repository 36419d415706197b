"""Statistics over fine-tuning runs that differ only in their random seeds.

- :func:`summary`: mean and (sample) standard deviation.
- :func:`multi_bootstrap`: the MultiBERTs multi-bootstrap (Sellam et al., 2022): each bootstrap
  replicate resamples *both* the seeds (runs) and the test examples with replacement and averages
  the per-example scores over the resampled grid, so the interval covers seed *and* test-set noise.
  With a ``baseline`` it bootstraps the difference of two groups of runs evaluated on the same
  test examples (examples resampled jointly, seeds of each group independently).
- :func:`expected_max_curve`: the expected maximum validation performance of ``n = 1..N`` runs
  (Dodge et al., 2019), in closed form from the empirical CDF of the ``N`` observed runs:
  ``E[max of n] = sum_i v_(i) ((i/N)^n - ((i-1)/N)^n)`` over the sorted values ``v_(1..N)``.
- :func:`variance_shares`: how much of the variance each seed kind causes, from groups of runs
  that vary one kind at a time.
- :func:`barrier`: the linear-interpolation barrier of a metric along
  ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b`` (see :mod:`ftlab.seeds.interpolation`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

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


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0 for one value), min, max and count."""
    v = _vector(values, "values")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


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


def expected_max_curve(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Expected maximum (and its standard deviation) of ``n`` runs drawn with replacement from
    the observed ``values``, for ``n = 1..N`` (Dodge et al., 2019). Returns two arrays of length N."""
    v = np.sort(_vector(values, "values"))
    big_n = len(v)
    i = np.arange(1, big_n + 1)
    n = i[:, None]  # rows: n = 1..N
    # P(max of n draws = v_(i)) = (i/N)^n - ((i-1)/N)^n: the empirical CDF at v_(i) to the n-th power.
    weights = (i / big_n) ** n - ((i - 1) / big_n) ** n
    mean = weights @ v
    var = np.clip(weights @ v**2 - mean**2, 0, None)
    return mean, np.sqrt(var)


def variance_shares(groups: Mapping[str, Sequence[float]]) -> dict[str, dict[str, float]]:
    """Variance of a metric within each group of runs that varies one seed kind (``order``,
    ``init``, ``zo``, ...; key ``all`` for runs varying every kind at once), and each kind's share
    of the sum over kinds. With independent, additive effects the sum matches ``all``'s variance."""
    out: dict[str, dict[str, float]] = {}
    for kind, values in groups.items():
        v = _vector(values, f"group {kind!r}")
        if len(v) < 2:
            raise FtlabError(f"group {kind!r} has {len(v)} run(s); a variance needs at least 2")
        out[kind] = {"variance": float(v.var(ddof=1)), "n": len(v)}
    total = sum(g["variance"] for k, g in out.items() if k != "all")
    for kind, g in out.items():
        if kind != "all":
            g["share"] = g["variance"] / total if total > 0 else float("nan")
    return out


def barrier(alphas: Sequence[float], values: Sequence[float], higher_is_better: bool) -> float:
    """Largest gap between the straight line joining the endpoints' metric values and the metric
    along the path, ``max_alpha`` of ``line(alpha) - value(alpha)`` for a metric to maximise
    (accuracy), ``value(alpha) - line(alpha)`` for one to minimise (loss). ``alphas`` must
    include 0 and 1; the result is >= 0 (0 at the endpoints)."""
    a, v = _vector(alphas, "alphas"), _vector(values, "values")
    if len(a) != len(v) or 0.0 not in a or 1.0 not in a:
        raise FtlabError("barrier: give one value per alpha, with alpha = 0 and alpha = 1 among them")
    start, end = v[a == 0.0][0], v[a == 1.0][0]
    gap = (1 - a) * start + a * end - v
    return max(0.0, float(np.max(gap if higher_is_better else -gap)))  # 0.0, never -0.0, at the endpoints


def _vector(values: Sequence[float], name: str) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1 or len(v) == 0 or not np.all(np.isfinite(v)):
        raise FtlabError(f"{name}: expected a non-empty list of finite numbers, got {values!r}")
    return v


def _matrix(values: np.ndarray, name: str) -> np.ndarray:
    m = np.asarray(values, dtype=np.float64)
    if m.ndim != 2 or 0 in m.shape or not np.all(np.isfinite(m)):
        raise FtlabError(f"{name}: expected a (runs x test examples) matrix of finite scores, "
                         f"got shape {m.shape}")
    return m

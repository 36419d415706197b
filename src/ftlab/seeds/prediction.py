"""Does a run's place in the loss landscape predict its out-of-distribution accuracy?

- :func:`permutation_test_correlation`: Spearman (or Pearson) correlation between a per-run
  feature (barrier to the base run, sharpness, ...) and per-run accuracy, with a two-sided
  permutation p-value (every permutation when ``n! <= n_perm``, else ``n_perm`` random ones,
  ``p = (1 + #{|r*| >= |r|}) / (1 + n_perm)``).
- :func:`permutation_test_difference`: difference of mean accuracy between two groups of runs
  (two basins), with a two-sided permutation p-value over the group labels (every split when
  ``C(n, k) <= n_perm``).
- :func:`correlation_interval`: a multi-bootstrap interval for the correlation: each replicate
  resamples the runs *and* the OOD test examples with replacement (the accuracy of a run is
  recomputed on the resampled examples), so it covers seed and test-set noise.
- Between basins, the multi-bootstrap interval of the difference is
  :func:`ftlab.seeds.stats.multi_bootstrap` with the other basin's runs as ``baseline``.
"""

from __future__ import annotations

import itertools
import math
from typing import Sequence

import numpy as np

from ftlab.errors import FtlabError
from ftlab.seeds.stats import Interval

CORRELATIONS = ("spearman", "pearson")
_TIE = 1e-12  # |statistic| within this of the observed one counts as "as extreme"


def correlation(x: Sequence[float], y: Sequence[float], method: str = "spearman") -> float:
    """Pearson correlation of ``x`` and ``y``, or of their ranks (Spearman, average ranks for
    ties); nan when either is constant."""
    if method not in CORRELATIONS:
        raise FtlabError(f"correlation method {method!r}: choose one of {list(CORRELATIONS)}")
    a, b = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or len(a) < 3:
        raise FtlabError(f"correlation needs two equally long lists of >= 3 values, got {len(a)} and {len(b)}")
    if method == "spearman":
        from scipy.stats import rankdata

        a, b = rankdata(a), rankdata(b)
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return float((a * b).sum() / den) if den > 0 else float("nan")


def permutation_test_correlation(x: Sequence[float], y: Sequence[float], method: str = "spearman",
                                 n_perm: int = 10000, seed: int = 0) -> dict[str, float]:
    """``{"r", "p", "exact"}``: the correlation and its two-sided permutation p-value."""
    r = correlation(x, y, method)
    xs, ys = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    n = len(xs)
    if math.isnan(r):
        return {"r": r, "p": float("nan"), "exact": False}
    if math.factorial(n) <= n_perm:
        stats = [correlation(xs[list(p)], ys, method) for p in itertools.permutations(range(n))]
        return {"r": r, "p": float(np.mean(np.abs(stats) >= abs(r) - _TIE)), "exact": True}
    rng = np.random.default_rng(seed)
    stats = np.array([correlation(xs[rng.permutation(n)], ys, method) for _ in range(n_perm)])
    return {"r": r, "p": float((1 + np.sum(np.abs(stats) >= abs(r) - _TIE)) / (1 + n_perm)), "exact": False}


def permutation_test_difference(values: Sequence[float], in_first: Sequence[bool], n_perm: int = 10000,
                                seed: int = 0) -> dict[str, float]:
    """``{"difference", "p", "exact"}``: mean of ``values`` where ``in_first`` minus the mean of
    the rest, and its two-sided permutation p-value over the group labels."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(in_first, dtype=bool)
    k, n = int(g.sum()), len(v)
    if v.shape != g.shape or k == 0 or k == n:
        raise FtlabError(f"a difference between groups needs runs in both groups (got {k} of {n} in the first)")
    observed = float(v[g].mean() - v[~g].mean())
    total = v.sum()

    def diff(idx: Sequence[int]) -> float:
        s = v[list(idx)].sum()
        return s / k - (total - s) / (n - k)
    if math.comb(n, k) <= n_perm:
        stats = np.array([diff(c) for c in itertools.combinations(range(n), k)])
        return {"difference": observed, "p": float(np.mean(np.abs(stats) >= abs(observed) - _TIE)), "exact": True}
    rng = np.random.default_rng(seed)
    stats = np.array([diff(rng.choice(n, size=k, replace=False)) for _ in range(n_perm)])
    return {"difference": observed, "p": float((1 + np.sum(np.abs(stats) >= abs(observed) - _TIE)) / (1 + n_perm)),
            "exact": False}


def correlation_interval(feature: Sequence[float], scores: np.ndarray, method: str = "spearman",
                         n_boot: int = 2000, seed: int = 0, level: float = 0.95) -> Interval:
    """Multi-bootstrap interval of the correlation between ``feature`` (one value per run) and
    the runs' mean score, ``scores`` being (runs, examples) per-example scores. Replicates where
    a resampled side is constant (no correlation defined) are dropped."""
    f = np.asarray(feature, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim != 2 or s.shape[0] != len(f):
        raise FtlabError(f"scores must be (runs, examples) with one row per feature value; got {s.shape} for {len(f)}")
    rng = np.random.default_rng(seed)
    runs, n_ex = s.shape
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, runs, runs)
        counts = rng.multinomial(n_ex, np.full(n_ex, 1 / n_ex))
        acc = s[idx] @ counts / n_ex
        if np.ptp(f[idx]) > 0 and np.ptp(acc) > 0:
            values.append(correlation(f[idx], acc, method))
    estimate = correlation(f, s.mean(1), method)
    if len(values) < 2:
        return Interval(estimate, float("nan"), float("nan"), float("nan"), level)
    v = np.asarray(values)
    low, high = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return Interval(estimate, float(low), float(high), float(v.std(ddof=1)), level)

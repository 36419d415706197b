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
- :func:`interpolation_barrier`: the linear-interpolation barrier of a metric along
  ``theta(alpha) = (1 - alpha) theta_a + alpha theta_b`` (see :mod:`ftlab.seeds.interpolation`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

from ftlab.bootstrap import Interval, multi_bootstrap, multi_bootstrap_samples  # noqa: F401 (re-exported)
from ftlab.errors import FtlabError


def summary(values: Sequence[float]) -> dict[str, float]:
    """Mean, sample standard deviation (ddof=1; 0 for one value), min, max and count."""
    v = _vector(values, "values")
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}


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


def interpolation_barrier(alphas: Sequence[float], values: Sequence[float], higher_is_better: bool) -> float:
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

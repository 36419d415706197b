"""Linear probes: logistic regression on frozen features, regularisation chosen on the dev split.

Features are standardised with the training split's mean and standard deviation (probabilities
of a few words and hidden states live on very different scales), then scikit-learn's
multinomial logistic regression is fit for every ``C`` of a grid; the ``C`` with the best dev
accuracy (ties: the stronger regularisation) is refit and scored on test. Accuracy comes with
a Wilson score interval.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np

from ftlab.errors import FtlabError

C_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


@dataclass
class ProbeResult:
    accuracy: float
    ci_low: float
    ci_high: float
    n_test: int
    C: float
    dev_accuracy: float | None
    n_train: int
    dim: int
    predictions: list[int]

    def summary(self) -> dict:
        out = asdict(self)
        out.pop("predictions")
        return out


def wilson_interval(correct: int, n: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``correct / n`` (95% by default)."""
    if n <= 0:
        raise FtlabError("an accuracy interval needs at least one test example")
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _check_labels(y: np.ndarray, what: str) -> None:
    classes = np.unique(y)
    if classes.size < 2:
        raise FtlabError(f"the {what} split has a single class ({classes.tolist()}); a probe needs >= 2 classes "
                         "(use more examples, or a balanced k-shot split)")


def fit_probe(x_train: np.ndarray, y_train: Sequence[int], x_test: np.ndarray, y_test: Sequence[int],
              x_dev: np.ndarray | None = None, y_dev: Sequence[int] | None = None, *,
              grid: Sequence[float] = C_GRID, seed: int = 0, max_iter: int = 2000) -> ProbeResult:
    """Fit and score a logistic-regression probe; ``C`` from ``grid`` by dev accuracy.

    Without a dev split (or with a single ``C``) the first / only ``C`` is used."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise FtlabError(f"features and labels differ in length (train {len(x_train)} vs {len(y_train)}, "
                         f"test {len(x_test)} vs {len(y_test)})")
    _check_labels(y_train, "training")
    scaler = StandardScaler().fit(x_train)

    def make(c: float) -> LogisticRegression:
        return LogisticRegression(C=c, max_iter=max_iter, random_state=seed)

    xt = scaler.transform(x_train)
    best_c, best_dev = grid[0], None
    if x_dev is not None and y_dev is not None and len(y_dev) and len(grid) > 1:
        xd, y_dev = scaler.transform(x_dev), np.asarray(y_dev)
        for c in grid:
            score = float((make(c).fit(xt, y_train).predict(xd) == y_dev).mean())
            if best_dev is None or score > best_dev:
                best_c, best_dev = c, score
    clf = make(best_c).fit(xt, y_train)
    pred = clf.predict(scaler.transform(x_test))
    correct = int((pred == y_test).sum())
    low, high = wilson_interval(correct, len(y_test))
    return ProbeResult(accuracy=correct / len(y_test), ci_low=low, ci_high=high, n_test=len(y_test), C=best_c,
                       dev_accuracy=best_dev, n_train=len(y_train), dim=int(x_train.shape[1]),
                       predictions=pred.tolist())


RIDGES = (1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def linear_fit_r2(x: np.ndarray, y: np.ndarray, x_test: np.ndarray, y_test: np.ndarray,
                  x_dev: np.ndarray | None = None, y_dev: np.ndarray | None = None,
                  ridges: Sequence[float] = RIDGES) -> tuple[float, float]:
    """``(R^2 on the test rows, ridge)`` of the best linear map (with intercept) from ``x`` to ``y``:
    how well ``y`` (e.g. ``f(s)``) is predicted linearly from ``x`` (e.g. ``Phi p_f(s)``).
    Ridge-regularised least squares on standardised inputs, penalty ``ridge x trace / dim`` (the
    intercept unpenalised), ridge chosen by R^2 on the dev rows (the first of ``ridges`` without
    them). R^2 = 1 - SSE / SST summed over all output coordinates, SST around the training mean."""
    x, y, x_test, y_test = (np.asarray(a, dtype=np.float64) for a in (x, y, x_test, y_test))
    mu, sd = x.mean(0), x.std(0) + 1e-12

    def design(z: np.ndarray) -> np.ndarray:  # standardised features and an intercept column
        return np.hstack([(np.asarray(z, np.float64) - mu) / sd, np.ones((len(z), 1))])

    a = design(x)
    gram, rhs = a.T @ a, a.T @ y
    scale = np.trace(gram) / gram.shape[0]

    def r2(ridge: float, xs: np.ndarray, ys: np.ndarray) -> float:
        reg = ridge * scale * np.eye(gram.shape[0])
        reg[-1, -1] = 0.0
        w = np.linalg.solve(gram + reg, rhs)
        ys = np.asarray(ys, np.float64)
        return float(1.0 - ((design(xs) @ w - ys) ** 2).sum() / ((ys - y.mean(0)) ** 2).sum())

    best = ridges[0]
    if x_dev is not None and y_dev is not None and len(ridges) > 1:
        best = max(ridges, key=lambda r: r2(r, x_dev, y_dev))
    return r2(best, x_test, y_test), best

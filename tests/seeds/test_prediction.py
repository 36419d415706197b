"""Permutation tests against hand-computable cases; correlations and their intervals."""

import itertools
import math

import numpy as np
import pytest

from ftlab.errors import FtlabError
from ftlab.seeds.prediction import (
    correlation,
    correlation_interval,
    permutation_test_correlation,
    permutation_test_difference,
)


def test_difference_permutation_test_by_hand():
    # Groups {1, 2} vs {3, 4}: difference -2. The 6 splits give -2, -1, 0, 0, 1, 2; two are as
    # extreme (|d| >= 2), so the exact two-sided p is 2/6.
    out = permutation_test_difference([1, 2, 3, 4], [True, True, False, False])
    assert out["difference"] == -2 and out["exact"] and out["p"] == pytest.approx(1 / 3)
    # Monte Carlo (fewer permutations allowed than splits) lands close to the exact value.
    values = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.8, 0.4, 0.6, 1.0]
    groups = [True] * 5 + [False] * 5
    exact = permutation_test_difference(values, groups, n_perm=1000)  # C(10, 5) = 252 <= 1000
    mc = permutation_test_difference(values, groups, n_perm=100, seed=0)
    assert exact["exact"] and not mc["exact"] and abs(mc["p"] - exact["p"]) < 0.15
    diffs = [np.mean([values[i] for i in c]) - np.mean([values[i] for i in range(10) if i not in c])
             for c in itertools.combinations(range(10), 5)]
    assert exact["p"] == pytest.approx(np.mean(np.abs(diffs) >= abs(exact["difference"]) - 1e-12))
    with pytest.raises(FtlabError, match="both groups"):
        permutation_test_difference([1, 2], [True, True])


def test_correlation_permutation_test_by_hand():
    # Three runs in the same order: rho = 1. Of the 6 permutations, rho = +-1 for two (identity,
    # reversal) and +-1/2 for the others: p = 2/6.
    out = permutation_test_correlation([1, 2, 3], [10, 20, 30])
    assert out["r"] == pytest.approx(1.0) and out["exact"] and out["p"] == pytest.approx(1 / 3)
    assert math.isnan(permutation_test_correlation([1, 1, 1], [1, 2, 3])["p"])


def test_correlations_match_scipy():
    from scipy.stats import pearsonr, spearmanr

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=12), rng.normal(size=12)
    x[3] = x[4]  # a tie
    assert correlation(x, y, "spearman") == pytest.approx(spearmanr(x, y).statistic)
    assert correlation(x, y, "pearson") == pytest.approx(pearsonr(x, y).statistic)
    with pytest.raises(FtlabError, match="method"):
        correlation(x, y, "kendall")


def test_correlation_interval_covers_seed_and_example_noise():
    rng = np.random.default_rng(0)
    feature = np.arange(10.0)
    # Run r answers correctly with probability rising with its feature: strong positive rho.
    scores = (rng.uniform(size=(10, 200)) < (0.3 + 0.05 * feature)[:, None]).astype(float)
    ci = correlation_interval(feature, scores, n_boot=300, seed=0)
    assert ci.estimate > 0.8 and 0 < ci.low < ci.estimate <= ci.high <= 1
    # No relation: the interval straddles 0.
    null = (rng.uniform(size=(10, 200)) < 0.5).astype(float)
    ci0 = correlation_interval(feature, null, n_boot=300, seed=0)
    assert ci0.low < 0 < ci0.high
    with pytest.raises(FtlabError, match="one row per feature"):
        correlation_interval(feature, scores[:5])

"""Seed statistics against hand-computable cases, enumeration and closed forms."""

import itertools

import numpy as np
import pytest

from ftlab.errors import FtlabError
from ftlab.seeds import (
    expected_max_curve,
    interpolation_barrier,
    multi_bootstrap,
    multi_bootstrap_samples,
    summary,
    variance_shares,
)


def test_summary():
    s = summary([0.5, 0.7, 0.9])
    assert s["mean"] == pytest.approx(0.7) and s["std"] == pytest.approx(0.2) and s["n"] == 3


def test_multi_bootstrap_over_examples_matches_the_hand_computed_distribution():
    # Two identical seeds, examples right/wrong: a replicate is the share of example 0 among two
    # draws: 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4 (mean 1/2, std sqrt(1/8)).
    samples = multi_bootstrap_samples(np.array([[1, 0], [1, 0]]), n_boot=40000, seed=0)
    freq = [np.mean(np.isclose(samples, v)) for v in (0, 0.5, 1)]
    assert freq == pytest.approx([0.25, 0.5, 0.25], abs=0.01)
    assert samples.std() == pytest.approx(np.sqrt(1 / 8), abs=0.005)


def test_multi_bootstrap_over_seeds_matches_the_hand_computed_distribution():
    # Three seeds scoring 1, 0, 0 on every example: a replicate is (#draws of seed 0) / 3,
    # Binomial(3, 1/3) / 3: P(0) = 8/27, P(1/3) = 12/27, P(2/3) = 6/27, P(1) = 1/27.
    samples = multi_bootstrap_samples(np.array([[1, 1], [0, 0], [0, 0]]), n_boot=40000, seed=1)
    freq = [np.mean(np.isclose(samples, v)) for v in (0, 1 / 3, 2 / 3, 1)]
    assert freq == pytest.approx([8 / 27, 12 / 27, 6 / 27, 1 / 27], abs=0.01)


def test_multi_bootstrap_interval():
    scores = np.random.default_rng(0).integers(0, 2, size=(5, 50))
    ci = multi_bootstrap(scores, n_boot=3000, seed=0)
    assert ci.estimate == pytest.approx(scores.mean())
    assert ci.low < ci.estimate < ci.high and ci.level == 0.95
    constant = multi_bootstrap(np.ones((3, 4)), n_boot=100)
    assert (constant.low, constant.high, constant.std) == (1.0, 1.0, 0.0)


def test_multi_bootstrap_difference_shares_the_examples():
    a = np.array([[1, 0, 1, 1]] * 3)
    diff = multi_bootstrap(a, n_boot=500, baseline=a.copy())
    # Same scores, same example draws, identical seeds: every replicate's difference is 0.
    assert (diff.estimate, diff.low, diff.high) == (0.0, 0.0, 0.0)
    with pytest.raises(FtlabError, match="same test set"):
        multi_bootstrap(a, baseline=np.ones((2, 3)))


@pytest.mark.parametrize("values", [[0.3, 0.9, 0.5], [0.7, 0.7, 0.2], [0.1, 0.4, 0.8, 0.6]])
def test_expected_max_equals_enumeration_of_all_draws(values):
    mean, std = expected_max_curve(values)
    for n in range(1, len(values) + 1):
        maxima = [max(draw) for draw in itertools.product(values, repeat=n)]  # all N^n equally likely draws
        assert mean[n - 1] == pytest.approx(np.mean(maxima), rel=1e-12)
        assert std[n - 1] == pytest.approx(np.std(maxima), abs=1e-9)
    assert mean[0] == pytest.approx(np.mean(values)) and np.all(np.diff(mean) >= -1e-12)


def test_variance_shares():
    groups = {"order": [0.1, 0.3], "init": [0.2, 0.2, 0.2], "all": [0.0, 0.4]}
    out = variance_shares(groups)
    assert out["order"]["variance"] == pytest.approx(0.02) and out["init"]["variance"] == pytest.approx(0, abs=1e-15)
    assert out["order"]["share"] == pytest.approx(1.0) and out["init"]["share"] == pytest.approx(0, abs=1e-12)
    assert "share" not in out["all"] and out["all"]["variance"] == pytest.approx(0.08)
    with pytest.raises(FtlabError, match="at least 2"):
        variance_shares({"order": [0.5]})


def test_interpolation_barrier_is_the_worst_drop_below_the_line_between_the_endpoints():
    alphas = [0.0, 0.5, 1.0]
    assert interpolation_barrier(alphas, [0.8, 0.5, 0.6], higher_is_better=True) == pytest.approx(0.2)  # line at 0.7
    assert interpolation_barrier(alphas, [0.4, 1.5, 0.6], higher_is_better=False) == pytest.approx(1.0)  # line at 0.5
    assert interpolation_barrier(alphas, [0.8, 0.9, 0.6], higher_is_better=True) == 0.0  # above the line: endpoints
    with pytest.raises(FtlabError, match="alpha = 0 and alpha = 1"):
        interpolation_barrier([0.0, 0.5], [1.0, 1.0], higher_is_better=True)


@pytest.mark.parametrize("bad", [[], [1.0, float("nan")], [[1.0]]])
def test_bad_values(bad):
    with pytest.raises(FtlabError):
        summary(bad)

import numpy as np
import pytest

from ftlab import bootstrap
from ftlab.seeds import stats


def test_seeds_reexports_the_shared_bootstrap():
    assert stats.multi_bootstrap is bootstrap.multi_bootstrap and stats.Interval is bootstrap.Interval


def test_difference_interval_covers_a_known_shift():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 2, (3, 200)).astype(float)
    better = np.maximum(base, rng.integers(0, 2, (3, 200)) * (rng.random((3, 200)) < 0.8))
    iv = bootstrap.multi_bootstrap(better, baseline=base, n_boot=500, seed=1)
    assert iv.estimate == pytest.approx(better.mean() - base.mean())
    assert 0 < iv.low < iv.estimate < iv.high

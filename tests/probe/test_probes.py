"""The probe against a closed-form case (Gaussian classes), its interval, its errors; the R^2."""

import math

import numpy as np
import pytest

from ftlab.errors import FtlabError
from ftlab.probe.probes import fit_probe, linear_fit_r2, wilson_interval


def _gaussians(n, mean, cov, rng):
    y = rng.integers(0, 2, n)
    x = rng.multivariate_normal(np.zeros(len(mean)), cov, n) + np.where(y[:, None] == 1, mean, -mean)
    return x, y


def test_probe_reaches_the_bayes_accuracy_of_two_gaussians():
    """Classes N(+m, S) and N(-m, S), equal priors: the Bayes classifier is linear, sign(x^T S^-1 m),
    with accuracy Phi(sqrt(m^T S^-1 m)) (half the Mahalanobis distance 2 sqrt(m^T S^-1 m))."""
    rng = np.random.default_rng(0)
    cov = np.array([[2.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 0.5]])
    mean = np.array([0.6, -0.2, 0.3])
    x_train, y_train = _gaussians(4000, mean, cov, rng)
    x_dev, y_dev = _gaussians(2000, mean, cov, rng)
    x_test, y_test = _gaussians(40000, mean, cov, rng)
    delta = math.sqrt(mean @ np.linalg.solve(cov, mean))
    bayes = 0.5 * (1 + math.erf(delta / math.sqrt(2)))
    r = fit_probe(x_train, y_train, x_test, y_test, x_dev, y_dev, grid=[1e-3, 1.0, 100.0])
    assert abs(r.accuracy - bayes) < 0.01, (r.accuracy, bayes)
    assert r.ci_low < bayes < r.ci_high
    assert r.C in (1.0, 100.0) and r.dev_accuracy is not None
    # Features unrelated to the labels give chance accuracy: the check above can fail.
    assert fit_probe(rng.normal(size=(4000, 3)), y_train, rng.normal(size=(40000, 3)), y_test).accuracy < 0.52


def test_wilson_interval_known_values():
    low, high = wilson_interval(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    with pytest.raises(FtlabError):
        wilson_interval(0, 0)


def test_one_class_is_refused():
    x = np.zeros((4, 2))
    with pytest.raises(FtlabError, match=r"single class \(\[1\]\); a probe needs >= 2 classes"):
        fit_probe(x, [1, 1, 1, 1], x, [1, 0, 1, 0])


def test_r2_of_linear_and_unrelated_targets():
    rng = np.random.default_rng(1)
    x, xt = rng.normal(size=(500, 6)), rng.normal(size=(300, 6))
    a = rng.normal(size=(6, 4))
    r2, ridge = linear_fit_r2(x, x @ a + 3.0, xt, xt @ a + 3.0, ridges=[1e-9])
    assert r2 == pytest.approx(1.0, abs=1e-6) and ridge == 1e-9
    assert abs(linear_fit_r2(x, rng.normal(size=(500, 4)), xt, rng.normal(size=(300, 4)))[0]) < 0.05
    # more inputs than rows: without a ridge chosen on dev the fit overfits (R^2 < 0), with it it is near 0+
    xw, xwd, xwt = rng.normal(size=(60, 100)), rng.normal(size=(200, 100)), rng.normal(size=(300, 100))
    b = np.zeros((100, 3))
    b[:3] = np.eye(3)
    noisy = lambda z: z @ b + 0.5 * rng.normal(size=(len(z), 3))  # noqa: E731
    yw, ywd, ywt = noisy(xw), noisy(xwd), noisy(xwt)
    assert linear_fit_r2(xw, yw, xwt, ywt, ridges=[1e-9])[0] < linear_fit_r2(xw, yw, xwt, ywt, xwd, ywd)[0]

"""Clustering runs by barrier: planted clusters, the cut, stability, bad input, the heat map."""

import numpy as np
import pytest

from ftlab.errors import FtlabError
from ftlab.seeds.basins import (
    bootstrap_barrier_matrices,
    check_matrix,
    cluster_runs,
    plot_heatmap,
    run_subsets,
    stability,
)


def planted(sizes=(4, 5, 3), seed=0, within=0.1, between=1.0):
    """A symmetric barrier matrix with planted clusters: small barriers inside, large across."""
    rng = np.random.default_rng(seed)
    truth = np.repeat(np.arange(len(sizes)), sizes)
    rng.shuffle(truth)
    n = len(truth)
    m = np.where(truth[:, None] == truth[None, :], rng.uniform(0, within, (n, n)),
                 between + rng.uniform(0, 0.2, (n, n)))
    m = np.triu(m, 1)
    return m + m.T, truth, [f"run{i}" for i in range(n)]


def _same_partition(a, b):
    from sklearn.metrics import adjusted_rand_score

    return adjusted_rand_score(a, b) == 1.0


@pytest.mark.parametrize("linkage", ["average", "complete", "single"])
def test_clustering_recovers_planted_clusters(linkage):
    m, truth, names = planted()
    c = cluster_runs(m, names, linkage=linkage)
    assert c.n_clusters == 3 and _same_partition(c.labels, truth)
    assert 0.1 < c.threshold < 1.0 and c.rule.startswith("largest gap")
    assert c.silhouette > 0.8 and c.within < 0.1 < 1.0 < c.between
    assert sorted(len(x) for x in c.members()) == [3, 4, 5] and c.labels[0] == 0
    two = cluster_runs(m, names, n_clusters=2, linkage=linkage)
    assert two.n_clusters == 2
    cut = cluster_runs(m, names, threshold=5.0)
    assert cut.n_clusters == 1 and cut.silhouette is None and cut.between is None


def test_stability_is_perfect_for_clear_clusters_and_low_for_noise():
    m, truth, names = planted()
    c = cluster_runs(m, names)
    rng0 = np.random.default_rng(1)
    noise = lambda rng: (lambda e: e + e.T)(np.triu(m + rng.uniform(0, 0.05, m.shape), 1))  # noqa: E731
    s = stability(c, noise, n_boot=30, seed=0)
    assert s["mean_ari"] == 1.0 and s["identical"] == 1.0
    assert run_subsets(c, m, n_boot=30, seed=0)["mean_ari"] == 1.0
    # Pure noise: every resample reshuffles the clusters.
    flat = np.triu(rng0.uniform(0, 1, m.shape), 1)
    flat = flat + flat.T
    c_noise = cluster_runs(flat, names, n_clusters=3)
    fresh = lambda rng: (lambda e: e + e.T)(np.triu(rng.uniform(0, 1, m.shape), 1))  # noqa: E731
    assert stability(c_noise, fresh, n_boot=30, seed=0)["mean_ari"] < 0.3


def test_bootstrap_of_examples_reproduces_the_matrix_without_noise():
    # Every example scores the same along each path: any resample gives the same barriers.
    rng = np.random.default_rng(0)
    alphas = [0.0, 0.5, 1.0]
    means = rng.uniform(0, 1, (4, 4, 3))
    means = (means + means.transpose(1, 0, 2)[..., ::-1]) / 2
    curves = np.repeat(means[..., None], 7, axis=-1)
    resample = bootstrap_barrier_matrices(curves, alphas, higher_is_better=False)
    a, b = resample(np.random.default_rng(1)), resample(np.random.default_rng(2))
    np.testing.assert_allclose(a, b)
    assert np.all(np.diag(a) == 0)


@pytest.mark.parametrize("matrix,match", [
    (np.zeros((2, 2)), "at least 3 runs"),
    (np.array([[0, 1, 2], [1, 0, 1], [2.5, 1, 0]]), "not symmetric"),
    (np.array([[0.1, 1, 2], [1, 0, 1], [2, 1, 0]]), "diagonal"),
    (np.array([[0, -1, 2], [-1, 0, 1], [2, 1, 0]]), ">= 0"),
    (np.zeros((3, 4)), "square"),
])
def test_bad_matrices(matrix, match):
    names = [f"r{i}" for i in range(len(matrix))]
    with pytest.raises(FtlabError, match=match):
        cluster_runs(matrix, names)


def test_bad_cut_arguments():
    m, _, names = planted()
    with pytest.raises(FtlabError, match="not both"):
        cluster_runs(m, names, n_clusters=2, threshold=0.5)
    with pytest.raises(FtlabError, match="n_clusters"):
        cluster_runs(m, names, n_clusters=40)
    with pytest.raises(FtlabError, match="linkage"):
        cluster_runs(m, names, linkage="ward")
    assert check_matrix(m, names).dtype == np.float64


def test_heatmap_png(tmp_path):
    m, truth, names = planted()
    c = cluster_runs(m, names)
    png = plot_heatmap(m, c, tmp_path / "h.png", "test", {n: 0.5 for n in names})
    assert png.stat().st_size > 1000

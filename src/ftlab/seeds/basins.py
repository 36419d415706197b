"""Basins: runs grouped by the loss barriers between them (Juneja et al., ICLR 2023).

:func:`cluster_runs` cuts an average-linkage dendrogram of the barrier matrix (a barrier is a
dissimilarity: 0 between runs joined by a straight line of low loss). The cut is a given number of
clusters, a given threshold, or by default the middle of the largest gap between consecutive merge
heights (the classic dendrogram cut). Whether the cut means anything is reported beside it: the
silhouette (precomputed barriers), the mean barrier within and between clusters, and stability
under resampling (:func:`stability`): the adjusted Rand index between the clustering and the one
obtained, with the same number of clusters, from a matrix recomputed on resampled evaluation
examples (bootstrap) or on a random 80% of the runs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from ftlab.errors import FtlabError
from ftlab.plots import optional

LINKAGES = ("average", "complete", "single")


@dataclass
class Clustering:
    """Cluster labels (0..k-1, by first appearance in ``names``' order), the cut and its quality."""

    names: list[str]
    labels: list[int]
    n_clusters: int
    threshold: float
    rule: str
    linkage: str
    merge_heights: list[float]
    order: list[int]  # dendrogram leaf order (for heat maps)
    silhouette: float | None
    within: float | None  # mean barrier between runs of one cluster
    between: float | None  # mean barrier between runs of different clusters
    stability: dict = field(default_factory=dict)

    def members(self) -> list[list[str]]:
        return [[n for n, lab in zip(self.names, self.labels) if lab == c] for c in range(self.n_clusters)]


def check_matrix(matrix: np.ndarray, names: Sequence[str], what: str = "barrier matrix") -> np.ndarray:
    """A validated, exactly symmetric float64 copy of a dissimilarity matrix between ``names``."""
    m = np.asarray(matrix, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(names):
        raise FtlabError(f"{what}: expected a square matrix over the {len(names)} runs, got shape {m.shape}")
    if not np.all(np.isfinite(m)) or np.any(m < 0):
        raise FtlabError(f"{what}: entries must be finite and >= 0")
    if np.any(np.diag(m) != 0):
        raise FtlabError(f"{what}: the diagonal (a run against itself) must be 0")
    if not np.allclose(m, m.T, rtol=1e-9, atol=1e-12):
        i, j = np.unravel_index(np.argmax(np.abs(m - m.T)), m.shape)
        raise FtlabError(f"{what}: not symmetric ({names[i]} vs {names[j]}: {m[i, j]} but {m[j, i]} back)")
    return (m + m.T) / 2


def cluster_runs(matrix: np.ndarray, names: Sequence[str], *, n_clusters: int | None = None,
                 threshold: float | None = None, linkage: str = "average") -> Clustering:
    """Hierarchical clustering of runs by barrier (see the module docstring)."""
    from scipy.cluster.hierarchy import fcluster, leaves_list
    from scipy.cluster.hierarchy import linkage as make_linkage
    from scipy.spatial.distance import squareform

    names = list(names)
    if len(names) < 3:
        raise FtlabError(f"clustering needs at least 3 runs, got {len(names)}: train more seeds")
    if linkage not in LINKAGES:
        raise FtlabError(f"linkage {linkage!r}: choose one of {list(LINKAGES)}")
    if n_clusters is not None and threshold is not None:
        raise FtlabError("give n_clusters or threshold, not both")
    if n_clusters is not None and not 1 <= n_clusters <= len(names):
        raise FtlabError(f"n_clusters must lie in 1..{len(names)}, got {n_clusters}")
    m = check_matrix(matrix, names)
    tree = make_linkage(squareform(m, checks=False), method=linkage)
    heights = tree[:, 2]
    if n_clusters is not None:
        labels, rule = fcluster(tree, n_clusters, criterion="maxclust"), f"{n_clusters} clusters (given)"
        k = len(set(labels))
        # The cut lies between the merge that would leave k clusters and the next one up.
        threshold = float(heights[len(names) - k - 1]) if k < len(names) else 0.0
    else:
        if threshold is None:
            gaps = np.diff(heights)
            cut = int(np.argmax(gaps)) if len(gaps) else 0
            threshold = float((heights[cut] + heights[cut + 1]) / 2) if len(gaps) else float(heights[0]) + 1
            rule = "largest gap between merge heights"
        else:
            rule = "threshold (given)"
        labels = fcluster(tree, threshold, criterion="distance")
    labels = _relabel(labels)
    k = len(set(labels))
    return Clustering(names, labels, k, float(threshold), rule, linkage, heights.tolist(),
                      leaves_list(tree).tolist(), *_quality(m, labels))


def _relabel(labels: Sequence[int]) -> list[int]:
    """Labels renumbered 0, 1, ... by first appearance."""
    seen: dict[int, int] = {}
    return [seen.setdefault(int(x), len(seen)) for x in labels]


def _quality(m: np.ndarray, labels: Sequence[int]) -> tuple[float | None, float | None, float | None]:
    """Silhouette (None unless 2 <= k <= n - 1), mean within- and between-cluster barrier."""
    from sklearn.metrics import silhouette_score

    lab = np.asarray(labels)
    same = lab[:, None] == lab[None, :]
    off = ~np.eye(len(lab), dtype=bool)
    within = float(m[same & off].mean()) if np.any(same & off) else None
    between = float(m[~same].mean()) if np.any(~same) else None
    k = len(set(labels))
    sil = float(silhouette_score(m, lab, metric="precomputed")) if 2 <= k <= len(lab) - 1 else None
    return sil, within, between


def stability(clustering: Clustering, resample: Callable[[np.random.Generator], np.ndarray], *,
              n_boot: int = 200, seed: int = 0) -> dict:
    """Mean adjusted Rand index (and share of identical partitions, ARI = 1) between
    ``clustering`` and the clusterings, with the same linkage and number of clusters, of
    ``n_boot`` matrices drawn by ``resample(rng)`` (e.g. :func:`bootstrap_barrier_matrices`)."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(seed)
    ref = np.asarray(clustering.labels)
    scores = [adjusted_rand_score(ref, cluster_runs(resample(rng), clustering.names, n_clusters=clustering.n_clusters,
                                                    linkage=clustering.linkage).labels)
              for _ in range(n_boot)]
    return _ari_summary(scores)


def run_subsets(clustering: Clustering, matrix: np.ndarray, *, n_boot: int = 200, seed: int = 0,
                fraction: float = 0.8) -> dict:
    """Mean adjusted Rand index (and share of identical partitions) between ``clustering``
    restricted to a random ``fraction`` of the runs and the clustering of that sub-matrix."""
    from sklearn.metrics import adjusted_rand_score

    rng = np.random.default_rng(seed)
    n = len(clustering.names)
    size = max(3, int(round(fraction * n)))
    ref = np.asarray(clustering.labels)
    k = clustering.n_clusters
    scores = []
    for _ in range(n_boot):
        keep = np.sort(rng.choice(n, size=size, replace=False))
        sub = [clustering.names[i] for i in keep]
        c = cluster_runs(matrix[np.ix_(keep, keep)], sub, n_clusters=min(k, size), linkage=clustering.linkage)
        scores.append(adjusted_rand_score(ref[keep], c.labels))
    return _ari_summary(scores)


def _ari_summary(scores: Sequence[float]) -> dict:
    s = np.asarray(scores, dtype=np.float64)
    return {"mean_ari": float(s.mean()), "identical": float(np.mean(s > 1 - 1e-12)), "n": len(s)}


def bootstrap_barrier_matrices(curves: np.ndarray, alphas: Sequence[float], higher_is_better: bool
                               ) -> Callable[[np.random.Generator], np.ndarray]:
    """A resampler for :func:`stability`: ``curves`` (pairs i, j of n runs as an (n, n, alphas,
    examples) array of per-example values along each path, i != j) -> the barrier matrix of the
    path means over examples drawn with replacement."""
    a = np.asarray(alphas, dtype=np.float64)
    n_ex = curves.shape[-1]

    def resample(rng: np.random.Generator) -> np.ndarray:
        counts = rng.multinomial(n_ex, np.full(n_ex, 1 / n_ex))
        means = curves @ counts / n_ex  # (n, n, alphas)
        return barrier_matrix_from_means(means, a, higher_is_better)
    return resample


def barrier_matrix_from_means(means: np.ndarray, alphas: np.ndarray, higher_is_better: bool) -> np.ndarray:
    """Barriers (see :func:`ftlab.seeds.stats.interpolation_barrier`) of every path of an (n, n, alphas) array
    of mean metric values, vectorised; 0 on the diagonal."""
    start = means[..., [np.flatnonzero(alphas == 0.0)[0]]]
    end = means[..., [np.flatnonzero(alphas == 1.0)[0]]]
    gap = (1 - alphas) * start + alphas * end - means
    out = np.maximum(0.0, (gap if higher_is_better else -gap).max(-1)) + 0.0  # + 0.0: no -0.0
    np.fill_diagonal(out, 0.0)
    return out


@optional
def plot_heatmap(matrix: np.ndarray, clustering: Clustering, png, title: str, values: dict[str, float] | None = None):
    """The barrier matrix ordered by cluster (dendrogram order within), cluster boundaries drawn;
    ``values`` (e.g. OOD accuracy by run) are appended to the tick labels."""
    from ftlab.plots import pyplot, save_figure

    plt = pyplot()
    order = sorted(range(len(clustering.names)), key=lambda i: (clustering.labels[i], clustering.order.index(i)))
    m = np.asarray(matrix)[np.ix_(order, order)]
    ticks = [clustering.names[i] + (f" ({values[clustering.names[i]]:.2f})" if values else "") for i in order]
    size = max(5.0, 0.45 * len(order) + 2.5)
    fig, ax = plt.subplots(figsize=(size + 1.2, size))
    im = ax.imshow(m, cmap="viridis")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="barrier")
    ax.set_xticks(range(len(order)), ticks, rotation=90, fontsize=7)
    ax.set_yticks(range(len(order)), ticks, fontsize=7)
    sorted_labels = [clustering.labels[i] for i in order]
    for pos in [i for i in range(1, len(order)) if sorted_labels[i] != sorted_labels[i - 1]]:
        ax.axhline(pos - 0.5, color="white", lw=1.5)
        ax.axvline(pos - 0.5, color="white", lw=1.5)
    ax.set_title(f"{title}\n{clustering.n_clusters} clusters, cut at {clustering.threshold:.3g} "
                 f"({clustering.rule})", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, png)

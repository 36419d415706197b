"""What the optimizer experiments share: runs over seeds, curves averaged over them, distances
between curves, means with t intervals, and the panels of their PNGs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ftlab.errors import FtlabError
from ftlab.plots import optional
from ftlab.rundir import RunDir
from ftlab.scaling.experiment import curve_distance, run_curves


def mean_ci(values: list[float], confidence: float = 0.95) -> dict[str, Any]:
    """Mean, sample standard deviation and the Student-t interval of the mean over seeds
    (``low = high = mean`` for a single value: no interval)."""
    x = np.asarray(values, dtype=float)
    n = len(x)
    if n == 0:
        raise FtlabError("no values to summarise")
    mean = float(x.mean())
    if n == 1:
        return {"mean": mean, "std": None, "low": mean, "high": mean, "n": 1}
    from scipy import stats

    std = float(x.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * std / math.sqrt(n)
    return {"mean": mean, "std": std, "low": mean - half, "high": mean + half, "n": n}


def fmt_ci(ci: dict[str, Any], digits: int = 3) -> str:
    """``mean [low, high]`` (or the mean alone for one seed)."""
    if ci["n"] == 1:
        return f"{ci['mean']:.{digits}f}"
    return f"{ci['mean']:.{digits}f} [{ci['low']:.{digits}f}, {ci['high']:.{digits}f}]"


def mean_curves(curves: list[dict[str, Any]]) -> dict[str, Any]:
    """Pointwise mean of several runs' curves (:func:`ftlab.scaling.experiment.run_curves`),
    on the sample points all of them share."""
    out: dict[str, Any] = {"metric": curves[0]["metric"]}
    for key, at in (("loss", "loss_samples"), ("dev", "dev_samples"), ("dev_loss", "dev_samples")):
        if not all(key in c for c in curves):
            continue
        maps = [dict(zip(c[at], c[key])) for c in curves]
        shared = sorted(set.intersection(*(set(m) for m in maps)))
        out[at] = shared
        out[key] = [float(np.mean([m[s] for m in maps])) for s in shared]
    return out


def seed_distances(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> dict[str, Any]:
    """:func:`curve_distance` of run pairs with the same seed, as a mean with an interval per key."""
    per_seed = [curve_distance(x, y) for x, y in zip(a, b)]
    return {key: mean_ci([d[key] for d in per_seed]) for key in per_seed[0]}


def run_summary(run_dir: str | Path, window: int) -> dict[str, Any]:
    """A finished run's curves, results and last training record."""
    run = RunDir(run_dir)
    results = run.read_results()
    last_train = run.read_metrics(split="train")[-1]
    return {"curves": run_curves(run_dir, window), "results": results, "last": last_train}


@optional
def plot_rows(rows: dict[str, dict[str, dict[str, Any]]], png: str | Path,
              labels: dict[str, dict[str, str]]) -> Path | None:
    """One row of panels (training loss, dev loss, dev metric against samples seen) per entry of
    ``rows``; in each, one line per run (``rows[row][name]``: mean curves), labelled by ``labels``."""
    from ftlab.plots import pyplot, save_figure

    plt = pyplot()
    fig, axes = plt.subplots(len(rows), 3, figsize=(17, 4 * len(rows)), squeeze=False)
    for ax_row, (row, runs) in zip(axes, rows.items()):
        for name, c in runs.items():
            label = labels[row][name]
            ax_row[0].plot(c["loss_samples"], c["loss"], marker=".", label=label)
            if "dev_loss" in c:
                ax_row[1].plot(c["dev_samples"], c["dev_loss"], marker="o", label=label)
            ax_row[2].plot(c["dev_samples"], c["dev"], marker="o", label=label)
        metric = next(iter(runs.values()))["metric"]
        ax_row[0].set(xlabel="samples seen", ylabel="training loss (window mean)", title=f"{row}: training loss")
        ax_row[1].set(xlabel="samples seen", ylabel="dev loss", title=f"{row}: dev loss")
        ax_row[2].set(xlabel="samples seen", ylabel=f"dev {metric}", title=f"{row}: dev {metric}")
        ax_row[1].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, png)

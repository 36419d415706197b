"""The report of one or more seed studies (``ftlab seeds report``): statistics, PNG plots and a
Markdown summary. Studies compared in one report must share the model and the test set.

For each study (one method, e.g. LoRA + AdamW, or MeZO): mean and std of test accuracy over its
runs, the multi-bootstrap interval over seeds and test examples, the expected maximum dev score
of n = 1..N runs, each seed kind's variance share, and interpolation barriers between pairs of
runs (the base run and the first other run of each seed kind's group; cached in
``barriers.json`` in the study folder, so a rerun evaluates no pair twice). Against the first
study, every other study gets a multi-bootstrap interval of the difference.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ftlab.errors import FtlabError
from ftlab.io import atomic_write_json, atomic_write_text
from ftlab.plots import optional, pyplot, save_figure
from ftlab.seeds import stats
from ftlab.seeds.interpolation import ALPHAS, interpolation_curve
from ftlab.seeds.runner import RunSpec, check_comparable, load_records, load_study
from ftlab.train import load_run_data


def build_report(study_dirs: Sequence[str | Path], out_dir: str | Path, *, n_boot: int = 2000, seed: int = 0,
                 barrier_pairs: int = 2, alphas: Sequence[float] = ALPHAS, progress: bool = False) -> dict[str, Any]:
    """Compute the report of the given study folders and write ``report.json``, ``report.md``
    and ``report.png`` into ``out_dir``; returns the report as a dict. ``alphas``: the points of
    each interpolation path (with 0 and 1)."""
    if not study_dirs:
        raise FtlabError("give at least one seed-study folder")
    studies = {str(d): load_study(d) for d in study_dirs}
    check_comparable({d: s.train for d, s in studies.items()})
    sections, matrices = [], []
    for d, study in studies.items():
        records = load_records(d)
        if len(records) < 2:
            raise FtlabError(f"{d} has {len(records)} finished run(s); run `ftlab seeds run` first (>= 2 needed)")
        scores = np.array([r["test_scores"] for r in records])
        matrices.append(scores)
        sections.append(_study_section(d, study, records, scores, n_boot, seed, barrier_pairs, alphas, progress))
    for section, scores in zip(sections[1:], matrices[1:]):
        diff = stats.multi_bootstrap(scores, n_boot, seed, baseline=matrices[0])
        section["difference_vs_first"] = vars(diff)
    report = {"studies": sections}
    out = Path(out_dir)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    plot_report(report, out / "report.png")
    return report


def _study_section(study_dir: str, study, records: list[dict[str, Any]], scores: np.ndarray, n_boot: int,
                   seed: int, barrier_pairs: int, alphas: Sequence[float], progress: bool) -> dict[str, Any]:
    test = [r["test"]["accuracy" if "accuracy" in r["test"] else "f1"] for r in records]
    dev = [r["best_dev"] for r in records]
    selection = dev if all(v is not None for v in dev) else test  # Dodge et al. use validation scores
    curve, curve_std = stats.expected_max_curve(selection)
    groups = {kind: [t for r, t in zip(records, test) if kind in r["groups"]]
              for kind in [*study.kinds, "all"]}
    groups = {k: v for k, v in groups.items() if len(v) >= 2}
    return {"study": study_dir, "label": f"{study.train.mode}/{study.train.optimizer}",
            "runs": [{"name": r["name"], "groups": r["groups"], "test": t, "dev": dv}
                     for r, t, dv in zip(records, test, dev)],
            "test": stats.summary(test),
            "multi_bootstrap": vars(stats.multi_bootstrap(scores, n_boot, seed)),
            "expected_max": {"on": "dev" if selection is dev else "test", "mean": curve.tolist(),
                             "std": curve_std.tolist()},
            "variance": stats.variance_shares(groups) if groups else {},
            "barriers": _barriers(study_dir, study, records, barrier_pairs, alphas, progress)}


def _barrier_pairs(study, records: list[dict[str, Any]], n_pairs: int) -> list[tuple[str, str, str]]:
    """(kind, run a, run b): the base run against the first other run of each group."""
    base = RunSpec(tuple((k, 0) for k in study.kinds), ()).name
    names = {r["name"] for r in records}
    pairs = []
    for kind in [*study.kinds, "all"]:
        others = [r["name"] for r in records if kind in r["groups"] and r["name"] != base]
        if base in names and others:
            pairs.append((kind, base, others[0]))
    return pairs[:n_pairs]


def _barriers(study_dir: str, study, records: list[dict[str, Any]], n_pairs: int, alphas: Sequence[float],
              progress: bool) -> list[dict[str, Any]]:
    pairs = _barrier_pairs(study, records, n_pairs)
    if not pairs:
        return []
    cache_path = Path(study_dir) / "barriers.json"
    cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    data = None
    for kind, a, b in pairs:
        key = _pair_key(a, b, alphas)
        if key in cache:
            continue
        data = data or load_run_data(study.train)
        run_dirs = [Path(study_dir) / "runs" / name for name in (a, b)]
        cache[key] = {"kind": kind, "a": a, "b": b,
                      **interpolation_curve(*run_dirs, data.spec, data.splits.test, alphas, progress)}
        atomic_write_json(cache_path, cache)  # one pair at a time: a killed report keeps the others
    return [cache[_pair_key(a, b, alphas)] for _, a, b in pairs]


def _pair_key(a: str, b: str, alphas: Sequence[float]) -> str:
    return f"{a}|{b}|" + ",".join(f"{x:g}" for x in alphas)


def markdown(report: dict[str, Any]) -> str:
    """The Markdown summary of a report."""
    lines = ["# Seed study", ""]
    lines += ["| method | runs | test mean | std | min | max | multi-bootstrap 95% CI |",
              "|---|---|---|---|---|---|---|"]
    for s in report["studies"]:
        t, mb = s["test"], s["multi_bootstrap"]
        lines.append(f"| {s['label']} | {t['n']} | {t['mean']:.4f} | {t['std']:.4f} | {t['min']:.4f} | "
                     f"{t['max']:.4f} | [{mb['low']:.4f}, {mb['high']:.4f}] |")
    for s in report["studies"][1:]:
        d = s["difference_vs_first"]
        lines += ["", f"{s['label']} minus {report['studies'][0]['label']}: {d['estimate']:+.4f}, "
                      f"95% multi-bootstrap CI [{d['low']:+.4f}, {d['high']:+.4f}]"]
    for s in report["studies"]:
        lines += ["", f"## {s['label']} ({s['study']})", ""]
        em = s["expected_max"]
        lines += [f"Expected max {em['on']} score of n runs: "
                  + ", ".join(f"n={i + 1}: {m:.4f}" for i, m in enumerate(em["mean"])), ""]
        if s["variance"]:
            lines += ["| seed kind | runs | variance of test score | share |", "|---|---|---|---|"]
            for kind, v in s["variance"].items():
                share = f"{v['share']:.2f}" if "share" in v else "-"
                lines.append(f"| {kind} | {v['n']} | {v['variance']:.3g} | {share} |")
        if s["barriers"]:
            lines += ["", "| pair (seed kind) | accuracy along alpha = 0 .. 1 | accuracy barrier | loss barrier |",
                      "|---|---|---|---|"]
            for b in s["barriers"]:
                accs = " ".join(f"{p['accuracy']:.3f}" for p in b["points"])
                lines.append(f"| {b['a']} vs {b['b']} ({b['kind']}) | {accs} | {b['accuracy_barrier']:.4f} | "
                             f"{b['loss_barrier']:.4f} |")
    return "\n".join(lines) + "\n"


@optional
def plot_report(report: dict[str, Any], png: str | Path) -> Path | None:
    """Three panels: test score of every run by method and group, the expected max curves, and
    the accuracy along the interpolation paths."""
    plt = pyplot()
    fig, (ax_runs, ax_max, ax_path) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, s in enumerate(report["studies"]):
        values = [r["test"] for r in s["runs"]]
        jitter = np.random.default_rng(i).uniform(-0.15, 0.15, len(values))  # spread overlapping dots
        ax_runs.scatter(i + jitter, values, s=18, label=s["label"])
        mb = s["multi_bootstrap"]
        ax_runs.errorbar(i + 0.3, mb["estimate"], yerr=[[mb["estimate"] - mb["low"]], [mb["high"] - mb["estimate"]]],
                         fmt="s", color="black", capsize=4)
        em = s["expected_max"]
        n = np.arange(1, len(em["mean"]) + 1)
        mean, std = np.array(em["mean"]), np.array(em["std"])
        ax_max.plot(n, mean, marker="o", label=s["label"])
        ax_max.fill_between(n, mean - std, mean + std, alpha=0.2)
        for b in s["barriers"]:
            ax_path.plot([p["alpha"] for p in b["points"]], [p["accuracy"] for p in b["points"]], marker=".",
                         label=f"{s['label']} {b['kind']}")
    ax_runs.set_xticks(range(len(report["studies"])), [s["label"] for s in report["studies"]])
    ax_runs.set(ylabel="test score", title="Runs (black: mean, multi-bootstrap 95% CI)")
    ax_max.set(xlabel="n runs", ylabel=f"expected max {report['studies'][0]['expected_max']['on']} score",
               title="Expected maximum performance (Dodge et al.)")
    ax_max.legend()
    ax_path.set(xlabel="alpha", ylabel="test accuracy", title="Linear interpolation between runs")
    if any(s["barriers"] for s in report["studies"]):
        ax_path.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, png)

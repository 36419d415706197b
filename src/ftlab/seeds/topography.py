"""The topography of a seed study (Juneja et al., ICLR 2023, "Linear connectivity reveals
generalization strategies"): pairwise barriers -> basins -> does the landscape predict OOD accuracy?

``topography(study_dir, cfg, out_dir)``:

1. every run's own evaluation (per-example loss and correctness on ``n_train`` training examples
   and on ``n_ood`` examples of an OOD task), its epsilon-sharpness and Hutchinson Hessian trace
   (:mod:`ftlab.seeds.curvature`), cached per run in ``<study>/topography/runs/<run>.json``;
2. every pair's straight line (interior alphas only: the endpoints are the runs' own
   evaluations), cached per pair in ``<study>/topography/pairs/<a>--<b>.json``; under
   ``torchrun`` rank ``r`` of ``w`` takes runs and pairs ``r::w``; a rerun computes only what is
   missing (a cache made with other alphas or examples is recomputed);
3. barrier matrices (loss and accuracy, on train and OOD), clusters of runs by the
   ``cluster_on`` matrix (:mod:`ftlab.seeds.basins`), their stability under bootstrap of the
   evaluation examples and under subsets of the runs;
4. the 2-D loss surface on the plane through three runs;
5. prediction of OOD accuracy (every OOD task of the study, per-example scores from
   ``seed_run.json``) from basin membership, barrier to the base run, sharpness and trace
   (:mod:`ftlab.seeds.prediction`), and the verdicts;

and writes ``report.json``, ``report.md``, ``heatmap.png``, ``surface.png`` and
``prediction.png`` into ``out_dir``.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ftlab.config import ConfigError, Settings, TrainConfig, at_least, needs, setting
from ftlab.distributed import barrier
from ftlab.errors import FtlabError
from ftlab.io import atomic_write_json, atomic_write_text
from ftlab.models import load_model, prepare_model
from ftlab.plots import optional, pyplot, save_figure
from ftlab.runs import claim_and_lock
from ftlab.seeds import basins, curvature, prediction, stats
from ftlab.seeds.interpolation import run_weights, saved_train_config
from ftlab.seeds.paths import PointEvaluator, combine, mix
from ftlab.seeds.runner import RunSpec, check_comparable, join_ranks, load_records, load_study, ood_sets, use_rank_gpu
from ftlab.train import load_run_data

CLUSTER_ON = ("train_loss", "train_accuracy", "ood_loss", "ood_accuracy")


@needs("increasing values in [0, 1] including 0 and 1")
def _path_alphas(alphas: list[float]) -> bool:
    return 0.0 in alphas and 1.0 in alphas and sorted(set(alphas)) == alphas and all(0 <= x <= 1 for x in alphas)


@needs("three run names")
def _three_runs(runs: list[str]) -> bool:
    return len(runs) == 3


@dataclass
class TopographyConfig(Settings):
    """What the topography of a study is measured on, and how finely."""

    where = "topography"

    alphas: list[float] = setting(factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], check=_path_alphas)
    # training examples the paths run on (the first of the train split)
    n_train: int = setting(64, check=at_least(1))
    ood_task: str | None = None  # OOD set the paths also run on (None: the study's first OOD task)
    n_ood: int = setting(64, check=at_least(1))
    batch_size: int = setting(16, check=at_least(1))
    group: int = setting(4, check=at_least(1))  # points per forward (LoRA; 1: one point at a time)
    cluster_on: Literal["train_loss", "train_accuracy", "ood_loss", "ood_accuracy"] = "train_loss"
    n_clusters: int | None = None  # None: cut at threshold, or at the largest gap of merge heights
    threshold: float | None = None
    linkage: Literal["average", "complete", "single"] = "average"
    # three run names (None: base, farthest, nearest to base)
    surface_runs: list[str] | None = setting(None, check=_three_runs)
    surface_points: int = setting(7, check=at_least(1))  # grid points per axis
    surface_margin: float = 0.25  # grid beyond the three runs, as a share of their span
    sharpness_eps: float = 1e-3
    sharpness_steps: int = setting(3, check=at_least(1))
    hutchinson_samples: int = setting(4, check=at_least(1))
    # training examples sharpness and trace are measured on
    n_curvature: int = setting(32, check=at_least(1))
    n_boot: int = setting(1000, check=at_least(1))
    n_perm: int = setting(5000, check=at_least(1))
    seed: int = 0

    def check_combinations(self) -> None:
        if self.n_clusters is not None and self.threshold is not None:
            raise ConfigError("", "give n_clusters or threshold, not both")


def _key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def check_same_kind(configs: dict[str, TrainConfig]) -> None:
    """Raise unless every run trains the same model and the same trainable set (mode, LoRA or
    prefix settings): only then do their trainable tensors live in one space."""
    check_comparable(configs)
    items = list(configs.items())
    first_name, first = items[0]
    keys = ("model", "mode", "lora", "prefix", "dtype")
    for name, cfg in items[1:]:
        diff = [k for k in keys if getattr(first, k) != getattr(cfg, k)]
        if diff:
            raise FtlabError(f"runs {first_name} and {name} train different models or trainable sets "
                             f"({', '.join(f'{k}: {getattr(first, k)!r} vs {getattr(cfg, k)!r}' for k in diff)}); "
                             "a barrier matrix needs runs of one model and one trainable set")


def topography(study_dir: str | Path, cfg: TopographyConfig, out_dir: str | Path | None = None, *,
               progress: bool = False) -> dict[str, Any] | None:
    """Measure, cluster, predict and write the report (see the module docstring); returns the
    report on rank 0 (None on the other ranks)."""
    cfg.validate()
    study_dir = Path(study_dir)
    out = Path(out_dir) if out_dir is not None else study_dir / "topography"
    study = load_study(study_dir)
    records = load_records(study_dir)
    names = [r["name"] for r in records]
    if len(names) < 3:
        raise FtlabError(f"{study_dir} has {len(names)} finished run(s); clustering needs at least 3 runs")
    runs = {n: study_dir / "runs" / n for n in names}
    configs = {n: saved_train_config(p) for n, p in runs.items()}
    check_same_kind(configs)
    train_cfg = configs[names[0]]
    use_rank_gpu(train_cfg.device)
    rank, world = join_ranks(train_cfg.device)
    data = load_run_data(study.train)
    ood = ood_sets(study, data.spec)
    ood_task = cfg.ood_task or (study.ood_tasks[0] if study.ood_tasks else None)
    if ood_task is not None and ood_task not in ood:
        raise FtlabError(f"topography.ood_task {ood_task!r} is not among the study's ood_tasks {study.ood_tasks}")
    sets = {"train": data.splits.train[:cfg.n_train]}
    if ood_task is not None:
        sets["ood"] = ood[ood_task][1][:cfg.n_ood]
    model, tokenizer = load_model(train_cfg.model, dtype=train_cfg.dtype, device=train_cfg.device)
    module = prepare_model(model, train_cfg.mode, lora=train_cfg.lora, prefix=train_cfg.prefix, seed=0)
    evaluator = PointEvaluator(module, tokenizer, data.spec, sets, batch_size=cfg.batch_size,
                               max_length=train_cfg.data.max_length, group=cfg.group)
    points = {}
    for n in names:
        points[n] = run_weights(runs[n], configs[n])
        evaluator.check_point(points[n], str(runs[n]))
    cache = study_dir / "topography"
    key = _key({"alphas": cfg.alphas, "sets": {k: [ex.id for ex in v] for k, v in sets.items()},
                "curvature": [cfg.sharpness_eps, cfg.sharpness_steps, cfg.hutchinson_samples, cfg.n_curvature,
                              cfg.seed]})
    # Rank 0 claims and locks the cache folder for the whole measurement; the other ranks write
    # their own runs' and pairs' files into it (each file atomically).
    with claim_and_lock(cache, "seeds", main=rank == 0):
        barrier()
        _run_measures(evaluator, points, names[rank::world], cache, key, cfg, rank, progress and rank == 0)
        pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]
        _pair_paths(evaluator, points, pairs[rank::world], cache, key, cfg, rank, progress and rank == 0)
        barrier()
        if rank != 0:
            return None
        measures = {n: json.loads((cache / "runs" / f"{n}.json").read_text()) for n in names}
        if out.resolve() == cache.resolve():
            return _analyse(study, records, names, measures, cache, cfg, evaluator, points, ood_task, out)
        with claim_and_lock(out, "seeds"):
            return _analyse(study, records, names, measures, cache, cfg, evaluator, points, ood_task, out)


def _run_measures(evaluator: PointEvaluator, points, names: Sequence[str], cache: Path, key: str,
                  cfg: TopographyConfig, rank: int, progress: bool) -> None:
    """Each run's own per-example evaluation and curvature (cached per run)."""
    params = list(evaluator.params.values())
    # The curvature set: the first n_curvature training examples, in the evaluator's batches.
    sub_batches = _first_examples(evaluator, "train", cfg.n_curvature)
    for n in tqdm(names, desc="runs", disable=not progress, unit="run"):
        path = cache / "runs" / f"{n}.json"
        if _cached(path, key):
            continue
        record: dict[str, Any] = {"key": key, "rank": rank}
        for set_name in evaluator.sizes:
            r = evaluator.evaluate(points[n], set_name)
            record[set_name] = {"loss": r.loss.tolist(), "correct": r.correct.tolist()}
        evaluator.load(points[n])
        loss_fn = curvature.set_loss(evaluator.module, sub_batches, evaluator.encoder.option_ids)
        with torch.enable_grad():
            record["sharpness"] = curvature.epsilon_sharpness(loss_fn, params, cfg.sharpness_eps, cfg.sharpness_steps)
            record["hessian_trace"] = curvature.hutchinson_trace(loss_fn, params, cfg.hutchinson_samples, cfg.seed)
        atomic_write_json(path, record)


def _first_examples(evaluator: PointEvaluator, set_name: str, n: int):
    """The evaluator's batches of ``set_name`` cut to the examples with index < n."""
    from ftlab.objectives import ModelBatch

    out = []
    for batch, idx in zip(evaluator.batches[set_name], evaluator.orders[set_name]):
        keep = [j for j, i in enumerate(idx) if i < n]
        if keep:
            pick = lambda t, keep=keep: None if t is None else t[keep]  # noqa: E731
            rows = keep if batch.n_options == 1 or batch.labels is None else \
                [j * batch.n_options + o for j in keep for o in range(batch.n_options)]
            pick_rows = lambda t, rows=rows: None if t is None else t[rows]  # noqa: E731
            out.append(ModelBatch(pick_rows(batch.input_ids), pick_rows(batch.attention_mask),
                                  pick_rows(batch.position_ids), pick_rows(batch.labels), batch.n_options,
                                  pick(batch.gold)))
    return out


def _pair_paths(evaluator: PointEvaluator, points, pairs: Sequence[tuple[str, str]], cache: Path, key: str,
                cfg: TopographyConfig, rank: int, progress: bool) -> None:
    """Interior alphas of every pair's straight line, per example (cached per pair). Points of
    several pairs share a forward when a path has fewer interior alphas than ``cfg.group``."""
    interior = [x for x in cfg.alphas if x not in (0.0, 1.0)]
    todo = [(a, b) for a, b in pairs if not _cached(cache / "pairs" / f"{a}--{b}.json", key)]
    per_chunk = max(1, cfg.group // max(1, len(interior)))
    bar = tqdm(total=len(todo), desc="pairs", disable=not progress, unit="pair")
    for start in range(0, len(todo), per_chunk):
        chunk = todo[start:start + per_chunk]
        mixed = [mix(points[a], points[b], x) for a, b in chunk for x in interior]
        results = {s: evaluator.evaluate_many(mixed, s) for s in evaluator.sizes}
        for k, (a, b) in enumerate(chunk):
            record: dict[str, Any] = {"key": key, "rank": rank, "a": a, "b": b, "alphas": interior}
            for set_name, res in results.items():
                mine = res[k * len(interior):(k + 1) * len(interior)]
                record[set_name] = {"loss": [r.loss.tolist() for r in mine],
                                    "correct": [r.correct.tolist() for r in mine]}
            atomic_write_json(cache / "pairs" / f"{a}--{b}.json", record)
            bar.update()
    bar.close()


def _cached(path: Path, key: str) -> bool:
    return path.exists() and json.loads(path.read_text()).get("key") == key


def curves(names: Sequence[str], measures: dict[str, Any], cache: Path, alphas: Sequence[float], set_name: str,
           metric: str) -> np.ndarray:
    """(n, n, alphas, examples) per-example ``metric`` ("loss" or "correct") along every path,
    the endpoints from the runs' own evaluations (row i -> column j goes from run i to run j)."""
    n_ex = len(measures[names[0]][set_name][metric])
    out = np.zeros((len(names), len(names), len(alphas), n_ex))
    interior = [k for k, x in enumerate(alphas) if x not in (0.0, 1.0)]
    for i, a in enumerate(names):
        out[i, i] = np.asarray(measures[a][set_name][metric])[None]
        for j in range(i + 1, len(names)):
            b = names[j]
            pair = json.loads((cache / "pairs" / f"{a}--{b}.json").read_text())
            values = np.zeros((len(alphas), n_ex))
            values[list(alphas).index(0.0)] = measures[a][set_name][metric]
            values[list(alphas).index(1.0)] = measures[b][set_name][metric]
            values[interior] = np.asarray(pair[set_name][metric])
            out[i, j], out[j, i] = values, values[::-1]
    return out


def _analyse(study, records, names, measures, cache, cfg: TopographyConfig, evaluator, points, ood_task, out: Path
             ) -> dict[str, Any]:
    alphas = np.asarray(cfg.alphas)
    matrices, per_example = {}, {}
    for set_name in evaluator.sizes:
        for metric, col, higher in (("loss", "loss", False), ("accuracy", "correct", True)):
            c = curves(names, measures, cache, cfg.alphas, set_name, col)
            per_example[f"{set_name}_{metric}"] = (c, higher)
            matrices[f"{set_name}_{metric}"] = basins.barrier_matrix_from_means(c.mean(-1), alphas, higher)
    if cfg.cluster_on not in matrices:
        raise FtlabError(f"topography.cluster_on {cfg.cluster_on!r}: the study has no OOD task to cluster on")
    matrix = matrices[cfg.cluster_on]
    clustering = basins.cluster_runs(matrix, names, n_clusters=cfg.n_clusters, threshold=cfg.threshold,
                                     linkage=cfg.linkage)
    c, higher = per_example[cfg.cluster_on]
    resample = basins.bootstrap_barrier_matrices(c, alphas, higher)
    n_stab = min(cfg.n_boot, 200)
    clustering.stability = {"examples": basins.stability(clustering, resample, n_boot=n_stab, seed=cfg.seed),
                            "runs": basins.run_subsets(clustering, matrix, n_boot=n_stab, seed=cfg.seed)}
    noise = np.std([resample(np.random.default_rng(cfg.seed + 1 + i)) for i in range(50)], axis=0)
    iu = np.triu_indices(len(names), 1)
    base = RunSpec(tuple((k, 0) for k in study.kinds), ()).name
    surface = _surface(evaluator, points, names, matrix, base, cfg, cache)
    features = _features(names, measures, matrix, base)
    pred, accuracy = _prediction(study, records, names, clustering, features, base, cfg)
    basin_verdict = _basin_verdict(clustering)
    report = {
        "scale": {"runs": len(names), "model": study.train.model, "mode": study.train.mode,
                  "task": study.train.data.task, "steps": study.train.steps, "alphas": cfg.alphas,
                  "n_train_eval": evaluator.sizes["train"], "ood_task": ood_task,
                  "n_ood_eval": evaluator.sizes.get("ood"), "n_curvature": cfg.n_curvature,
                  "ood_tests": {t: len(records[0]["ood"][t]["scores"]) for t in study.ood_tasks}},
        "names": names, "base": base,
        "matrices": {k: m.tolist() for k, m in matrices.items()},
        "barrier_summary": {k: {"mean": float(m[iu].mean()), "median": float(np.median(m[iu])),
                                "max": float(m[iu].max())} for k, m in matrices.items()},
        "barrier_noise": {"cluster_on": cfg.cluster_on, "median_bootstrap_std": float(np.median(noise[iu]))},
        "clustering": {k: v for k, v in vars(clustering).items()}, "members": clustering.members(),
        "basins_form": basin_verdict, "features": features, "prediction": pred, "accuracy": accuracy,
        "surface": surface,
    }
    report["verdict"] = _verdict(report)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    atomic_write_text(out / "report.md", markdown(report))
    first_ood = study.ood_tasks[0] if study.ood_tasks else None
    values = ({r["name"]: r["ood"][first_ood]["metrics"]["accuracy"] for r in records} if first_ood else None)
    basins.plot_heatmap(matrix, clustering, out / "heatmap.png",
                        f"{cfg.cluster_on.replace('_', ' ')} barrier"
                        + (f" (ticks: {first_ood} accuracy)" if values else ""),
                        values)
    _plot_surface(surface, out / "surface.png")
    _plot_prediction(report, out / "prediction.png")
    return report


def _features(names, measures, matrix, base) -> dict[str, dict[str, float]]:
    b = names.index(base) if base in names else None
    return {n: {"barrier_to_base": float(matrix[b, i]) if b is not None else float("nan"),
                "sharpness": measures[n]["sharpness"]["sharpness"],
                "hessian_trace": measures[n]["hessian_trace"]["trace"],
                "hessian_trace_stderr": measures[n]["hessian_trace"]["stderr"]} for i, n in enumerate(names)}


def _prediction(study, records, names, clustering, features, base: str, cfg: TopographyConfig
                ) -> tuple[list[dict[str, Any]], dict[str, dict[str, float]]]:
    """One row per (target, predictor): correlation or basin difference with intervals and p;
    and every run's accuracy on each target."""
    by_name = {r["name"]: r for r in records}
    targets = {t: np.array([by_name[n]["ood"][t]["scores"] for n in names]) for t in study.ood_tasks}
    targets["in-distribution test"] = np.array([by_name[n]["test_scores"] for n in names])
    rows = []
    labels = np.asarray(clustering.labels)
    sizes = np.bincount(labels)
    big = [int(c) for c in np.argsort(-sizes, kind="stable")[:2]] if clustering.n_clusters >= 2 else []
    for target, scores in targets.items():
        acc = scores.mean(1)
        if len(big) == 2 and min(sizes[big]) >= 2:
            first, second = labels == big[0], labels == big[1]
            keep = first | second
            diff = stats.multi_bootstrap(scores[first], cfg.n_boot, cfg.seed, baseline=scores[second])
            perm = prediction.permutation_test_difference(acc[keep], first[keep], cfg.n_perm, cfg.seed)
            rows.append({"target": target, "predictor": f"basin {big[0]} vs basin {big[1]}", "kind": "difference",
                         "n_runs": int(keep.sum()), "estimate": diff.estimate, "low": diff.low, "high": diff.high,
                         "p": perm["p"], "exact": perm["exact"]})
        for feat in ("barrier_to_base", "sharpness", "hessian_trace"):
            # The base run's barrier to itself (0) says nothing about it: left out.
            use = [i for i, n in enumerate(names) if math.isfinite(features[n][feat])
                   and not (feat == "barrier_to_base" and n == base)]
            x = [features[names[i]][feat] for i in use]
            if len(use) < 3 or np.ptp(x) == 0 or np.ptp(acc[use]) == 0:
                rows.append({"target": target, "predictor": feat, "kind": "spearman", "n_runs": len(use),
                             "estimate": float("nan"), "low": float("nan"), "high": float("nan"), "p": float("nan"),
                             "exact": False})
                continue
            ci = prediction.correlation_interval(x, scores[use], "spearman", cfg.n_boot, cfg.seed)
            perm = prediction.permutation_test_correlation(x, acc[use], "spearman", cfg.n_perm, cfg.seed)
            rows.append({"target": target, "predictor": feat, "kind": "spearman", "n_runs": len(use),
                         "estimate": perm["r"], "low": ci.low, "high": ci.high, "p": perm["p"], "exact": perm["exact"]})
    m = sum(1 for r in rows if math.isfinite(r["p"]))
    for r in rows:
        r["significant"] = bool(math.isfinite(r["p"]) and r["p"] < 0.05 and (r["low"] > 0 or r["high"] < 0))
        r["significant_bonferroni"] = bool(r["significant"] and r["p"] < 0.05 / max(m, 1))
    accuracy = {t: {n: float(a) for n, a in zip(names, scores.mean(1))} for t, scores in targets.items()}
    return rows, accuracy


def _basin_verdict(c: basins.Clustering) -> dict[str, Any]:
    ari = c.stability["examples"]["mean_ari"]
    ok = c.n_clusters >= 2 and c.silhouette is not None and c.silhouette >= 0.5 and ari >= 0.8
    return {"form": bool(ok), "rule": "k >= 2, silhouette >= 0.5 and mean ARI >= 0.8 under bootstrap of the "
                                      "evaluation examples", "n_clusters": c.n_clusters, "silhouette": c.silhouette,
            "stability_ari": ari}


def _verdict(report: dict[str, Any]) -> str:
    b = report["basins_form"]
    sil = "n/a" if b["silhouette"] is None else f"{b['silhouette']:.2f}"
    lines = [f"Basins {'form' if b['form'] else 'do not clearly form'} on {report['scale']['runs']} runs of "
             f"{report['scale']['model']} ({report['scale']['mode']}): {b['n_clusters']} clusters, silhouette {sil}, "
             f"bootstrap stability ARI {b['stability_ari']:.2f} (rule: {b['rule']})."]
    for target in dict.fromkeys(r["target"] for r in report["prediction"]):
        rows = [r for r in report["prediction"] if r["target"] == target]
        hits = [r for r in rows if r["significant"]]
        if hits:
            said = "; ".join(f"{r['predictor']} ({_fmt_row(r)})" for r in hits)
            lines.append(f"{target}: predicted by {said}.")
        else:
            lines.append(f"{target}: no predictor reaches p < 0.05 with an interval excluding 0 "
                         f"({len(rows)} tested).")
    return " ".join(lines)


def _fmt_row(r: dict[str, Any]) -> str:
    name = "rho" if r["kind"] == "spearman" else "difference"
    if not math.isfinite(r["estimate"]):
        return f"{name} undefined (constant values)"
    return f"{name} {r['estimate']:+.3f}, 95% CI [{r['low']:+.3f}, {r['high']:+.3f}], p = {r['p']:.3g}"


def _surface(evaluator: PointEvaluator, points, names, matrix, base, cfg: TopographyConfig, cache: Path
             ) -> dict[str, Any]:
    """Train loss and accuracy on a grid of the plane through three runs (orthonormal axes:
    e1 along run1 - run0, e2 the part of run2 - run0 orthogonal to it), cached."""
    if cfg.surface_runs is not None:
        trio = list(cfg.surface_runs)
        unknown = [n for n in trio if n not in names]
        if unknown:
            raise FtlabError(f"topography.surface_runs: no finished run named {unknown[0]!r}")
    else:
        b = names.index(base) if base in names else 0
        others = [i for i in np.argsort(matrix[b], kind="stable") if i != b]
        trio = [names[b], names[others[-1]], names[others[0]]]
    p0, p1, p2 = (points[n] for n in trio)
    u = {k: p1[k].double() - p0[k].double() for k in p0}
    v = {k: p2[k].double() - p0[k].double() for k in p0}
    dot = lambda x, y: float(sum((x[k] * y[k]).sum() for k in x))  # noqa: E731
    nu = math.sqrt(dot(u, u))
    e1 = {k: t / nu for k, t in u.items()}
    proj = dot(v, e1)
    w = {k: v[k] - proj * e1[k] for k in v}
    nw = math.sqrt(dot(w, w))
    if nu == 0 or nw == 0:
        raise FtlabError(f"surface runs {trio} do not span a plane (two are identical or the three are collinear)")
    e2 = {k: t / nw for k, t in w.items()}
    coords = [(0.0, 0.0), (nu, 0.0), (proj, nw)]
    xs, ys = [c[0] for c in coords], [c[1] for c in coords]
    mx, my = cfg.surface_margin * (max(xs) - min(xs)), cfg.surface_margin * (max(ys) - min(ys))
    gx = np.linspace(min(xs) - mx, max(xs) + mx, cfg.surface_points)
    gy = np.linspace(min(ys) - my, max(ys) + my, cfg.surface_points)
    key = _key({"runs": trio, "gx": gx.tolist(), "gy": gy.tolist(), "n": evaluator.sizes["train"]})
    path = cache / "surface.json"
    if path.exists() and json.loads(path.read_text()).get("key") == key:
        return json.loads(path.read_text())
    grid = [combine(p0, [e1, e2], [x, y]) for y in gy for x in gx]
    results = evaluator.evaluate_many(grid, "train")
    surface = {"key": key, "runs": trio, "coords": coords, "x": gx.tolist(), "y": gy.tolist(),
               "loss": [[results[j * len(gx) + i].loss.mean() for i in range(len(gx))] for j in range(len(gy))],
               "accuracy": [[results[j * len(gx) + i].correct.mean() for i in range(len(gx))]
                            for j in range(len(gy))]}
    atomic_write_json(path, surface)
    return surface


@optional
def _plot_surface(surface: dict[str, Any], png: Path) -> Path | None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))
    x, y, z = np.array(surface["x"]), np.array(surface["y"]), np.array(surface["loss"])
    cs = ax.contourf(x, y, z, levels=20, cmap="magma_r")
    fig.colorbar(cs, ax=ax, label="train loss")
    for (cx, cy), name in zip(surface["coords"], surface["runs"]):
        ax.plot(cx, cy, "o", color="cyan", ms=7)
        ax.annotate(name, (cx, cy), textcoords="offset points", xytext=(4, 4), color="cyan", fontsize=8)
    ax.set(xlabel="e1 (run 1 - run 0)", ylabel="e2 (run 2 - run 0, orthogonalised)",
           title="Loss on the plane through three runs")
    fig.tight_layout()
    return save_figure(fig, png)


@optional
def _plot_prediction(report: dict[str, Any], png: Path) -> Path | None:
    """OOD accuracy against barrier to base and sharpness, coloured by basin (first OOD task)."""
    plt = pyplot()
    names, labels, feats = report["names"], report["clustering"]["labels"], report["features"]
    targets = list(report["scale"]["ood_tests"]) or ["in-distribution test"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    accs = report["accuracy"]
    for ax, feat in zip(axes, ("barrier_to_base", "sharpness", "hessian_trace")):
        x = [feats[n][feat] for n in names]
        y = [accs.get(targets[0], {}).get(n, float("nan")) for n in names]
        ax.scatter(x, y, c=labels, cmap="tab10", s=30)
        ax.set(xlabel=feat.replace("_", " "), ylabel=f"{targets[0]} accuracy")
    fig.suptitle("Runs coloured by basin")
    fig.tight_layout()
    return save_figure(fig, png)


def markdown(report: dict[str, Any]) -> str:
    s = report["scale"]
    c = report["clustering"]
    lines = ["# Basins and out-of-distribution accuracy", "",
             f"Scale: {s['runs']} runs of {s['model']} ({s['mode']}, {s['steps']} steps) on {s['task']}; paths at "
             f"alpha = {', '.join(f'{a:g}' for a in s['alphas'])} on {s['n_train_eval']} training examples"
             + (f" and {s['n_ood_eval']} examples of {s['ood_task']}" if s["ood_task"] else "")
             + f"; curvature on {s['n_curvature']} training examples; OOD tests: "
             + ", ".join(f"{t} ({n} examples)" for t, n in s["ood_tests"].items()) + ".", "",
             "## Verdict", "", report["verdict"], "",
             "## Barriers", "", "| matrix | mean | median | max |", "|---|---|---|---|"]
    for k, v in report["barrier_summary"].items():
        lines.append(f"| {k} | {v['mean']:.4f} | {v['median']:.4f} | {v['max']:.4f} |")
    lines += ["", f"Noise: median bootstrap std of a {report['barrier_noise']['cluster_on']} barrier (resampled "
                  f"evaluation examples): {report['barrier_noise']['median_bootstrap_std']:.4f}.", "",
              "## Basins", "",
              f"Clustered on the {report['barrier_noise']['cluster_on']} barrier, {c['linkage']} linkage, cut at "
              f"{c['threshold']:.4g} ({c['rule']}): **{c['n_clusters']} clusters**; silhouette "
              f"{'n/a' if c['silhouette'] is None else format(c['silhouette'], '.3f')}; mean barrier within "
              f"{_f(c['within'])}, between {_f(c['between'])}; stability: mean ARI "
              f"{c['stability']['examples']['mean_ari']:.3f} under bootstrap of the examples "
              f"({c['stability']['examples']['identical']:.0%} identical partitions), "
              f"{c['stability']['runs']['mean_ari']:.3f} on random 80% subsets of the runs.", ""]
    for i, m in enumerate(report["members"]):
        lines.append(f"- basin {i}: {', '.join(m)}")
    lines += ["", "## Prediction of accuracy", "",
              "| target | predictor | runs | estimate | 95% multi-bootstrap CI | permutation p | significant |",
              "|---|---|---|---|---|---|---|"]
    for r in report["prediction"]:
        name = "difference of mean accuracy" if r["kind"] == "difference" else "Spearman rho"
        est = "nan" if not math.isfinite(r["estimate"]) else f"{r['estimate']:+.3f}"
        ci = "-" if not math.isfinite(r["low"]) else f"[{r['low']:+.3f}, {r['high']:+.3f}]"
        p = "-" if not math.isfinite(r["p"]) else f"{r['p']:.3g}{' (exact)' if r['exact'] else ''}"
        sig = "yes" + (" (Bonferroni too)" if r["significant_bonferroni"] else "") if r["significant"] else "no"
        lines.append(f"| {r['target']} | {r['predictor']} ({name}) | {r['n_runs']} | {est} | {ci} | {p} | {sig} |")
    lines += ["", "## Runs", "", "| run | basin | barrier to base | eps-sharpness | Hessian trace (± s.e.) |",
              "|---|---|---|---|---|"]
    for n, lab in zip(report["names"], c["labels"]):
        f = report["features"][n]
        lines.append(f"| {n} | {lab} | {f['barrier_to_base']:.4f} | {f['sharpness']:.4g} | "
                     f"{f['hessian_trace']:.4g} ± {f['hessian_trace_stderr']:.2g} |")
    sf = report["surface"]
    lines += ["", f"Loss surface: plane through {', '.join(sf['runs'])} ({len(sf['x'])} x {len(sf['y'])} grid, "
                  "surface.png); heat map: heatmap.png; features vs accuracy: prediction.png.", ""]
    return "\n".join(lines)


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4f}"

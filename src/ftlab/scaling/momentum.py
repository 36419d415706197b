"""The momentum experiment: does SGD with momentum ``beta`` at lr ``eta`` train like plain SGD at
the effective lr ``eta / (1 - beta)`` (Wang et al., 2023, arXiv 2307.15196: yes when the lr is
small; momentum then adds little in fine-tuning), and unlike plain SGD at ``eta``?

For every lr in ``lrs`` and every seed, three normal ``ftlab.train`` runs
(``<output_dir>/lr<eta>/<variant>/seed<s>/``, resumable, finished ones skipped):

- ``momentum``: SGD, momentum ``beta``, lr ``eta``;
- ``effective``: plain SGD at ``eta / (1 - beta)`` (what the rule says is equivalent);
- ``plain``: plain SGD at ``eta`` (the control: what momentum changes).

Reported (``momentum.json``, ``momentum.png``): curves against samples seen (training loss over
windows of ``eval_every * batch`` samples, dev loss, dev metric; means over seeds), the distances
``momentum`` -> ``effective`` and ``momentum`` -> ``plain`` (mean absolute difference at shared
points, per seed, mean and t interval over seeds) with their ratio (small: the rule holds),
and the best-dev and test metrics of every variant with t intervals over seeds.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftlab.config import Settings, TrainConfig, to_dict
from ftlab.errors import FtlabError
from ftlab.io import atomic_write_json
from ftlab.runs import writes_run_dir
from ftlab.scaling.compare import mean_ci, mean_curves, plot_rows, run_summary, seed_distances
from ftlab.train import load_run_data, train

VARIANTS: tuple[str, ...] = ("momentum", "effective", "plain")


@dataclass
class MomentumExperimentConfig(Settings):
    """The base run (``train``: optimizer sgd; its lr and momentum are replaced), the momentum
    ``beta``, the learning rates ``eta`` to try (a small and a large one) and the seeds."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="sgd"))
    beta: float = 0.9
    lrs: list[float] = field(default_factory=lambda: [1e-3, 1e-1])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    output_dir: str = "runs/scale-momentum"


def _lr_name(lr: float) -> str:
    return f"lr{lr:g}"


def run_configs(exp: MomentumExperimentConfig) -> dict[tuple[float, str, int], TrainConfig]:
    """The training config of every run, by ``(eta, variant, seed)``; checks the experiment."""
    base = exp.train
    if base.optimizer != "sgd":
        raise FtlabError(f"train.optimizer: the momentum experiment compares SGD runs; set train.optimizer=sgd "
                         f"(got {base.optimizer})")
    if not 0 < exp.beta < 1:
        raise FtlabError(f"beta: must be in (0, 1) (got {exp.beta})")
    if not exp.lrs or any(lr <= 0 for lr in exp.lrs):
        raise FtlabError(f"lrs: give one or more learning rates > 0 (got {exp.lrs})")
    if not exp.seeds or len(set(exp.seeds)) != len(exp.seeds):
        raise FtlabError(f"seeds: give one or more distinct seeds (got {exp.seeds})")
    if not base.eval_every:
        raise FtlabError("the momentum experiment compares dev curves: set train.eval_every > 0 (and a dev set)")
    out = Path(exp.output_dir)
    configs = {}
    for lr in exp.lrs:
        hparams = {"momentum": (lr, exp.beta), "effective": (lr / (1 - exp.beta), 0.0), "plain": (lr, 0.0)}
        for variant, (rate, beta) in hparams.items():
            for seed in exp.seeds:
                cfg = dataclasses.replace(base, lr=rate, momentum=beta, seed=seed,
                                          output_dir=str(out / _lr_name(lr) / variant / f"seed{seed}"))
                cfg.validate()
                configs[(lr, variant, seed)] = cfg
    return configs


@writes_run_dir("scale", "exp.output_dir", validate=run_configs)  # claims + locks
def run_momentum_experiment(exp: MomentumExperimentConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train every run not finished yet, compare, write ``momentum.json`` and ``momentum.png``."""
    configs = run_configs(exp)
    data = {seed: load_run_data(dataclasses.replace(exp.train, seed=seed)) for seed in exp.seeds}
    for (_lr, _variant, seed), cfg in configs.items():
        train(cfg, progress=progress, data=data[seed])
    window = exp.train.eval_every * exp.train.batch_size
    summaries = {key: run_summary(cfg.output_dir, window) for key, cfg in configs.items()}
    result: dict[str, Any] = {"config": to_dict(exp), "beta": exp.beta, "lrs": {}}
    rows, labels = {}, {}
    for lr in exp.lrs:
        per = {v: [summaries[(lr, v, s)] for s in exp.seeds] for v in VARIANTS}
        curves = {v: [r["curves"] for r in runs] for v, runs in per.items()}
        to_effective = seed_distances(curves["momentum"], curves["effective"])
        to_plain = seed_distances(curves["momentum"], curves["plain"])
        metric = curves["momentum"][0]["metric"]
        entry = {
            "lr": {v: configs[(lr, v, exp.seeds[0])].lr for v in VARIANTS},
            "distance": {"momentum_to_effective": to_effective, "momentum_to_plain": to_plain},
            # < 1: momentum is closer to SGD at eta / (1 - beta) than to SGD at eta
            "ratio_dev_loss": _ratio(to_effective, to_plain, "dev_loss_mean_abs"),
            "ratio_train_loss": _ratio(to_effective, to_plain, "loss_mean_abs"),
            "best_dev": {v: mean_ci([r["results"]["best_dev"] for r in runs]) for v, runs in per.items()},
            "test": {v: mean_ci([r["results"]["test"][metric] for r in runs]) for v, runs in per.items()},
            "final_dev_loss": {v: mean_ci([r["curves"]["dev_loss"][-1] for r in runs]) for v, runs in per.items()
                               if "dev_loss" in runs[0]["curves"]},
            "mean_curves": {v: mean_curves(c) for v, c in curves.items()},
        }
        result["lrs"][_lr_name(lr)] = entry
        row = f"eta = {lr:g}"
        rows[row] = entry["mean_curves"]
        dist = {v: entry["distance"]["momentum_to_" + v].get("dev_loss_mean_abs", {}).get("mean", float("nan"))
                for v in VARIANTS if v != "momentum"}
        labels[row] = {v: f"{v} (lr {entry['lr'][v]:.3g}{', beta ' + str(exp.beta) if v == 'momentum' else ''})"
                       + ("" if v == "momentum" else f", dist to momentum: dev loss {dist[v]:.4f}")
                       for v in VARIANTS}
    out = Path(exp.output_dir)
    atomic_write_json(out / "momentum.json", result)
    plot_rows(rows, out / "momentum.png", labels)
    return result


def _ratio(a: dict[str, Any], b: dict[str, Any], key: str) -> float | None:
    if key not in a or key not in b or not b[key]["mean"]:
        return None
    return a[key]["mean"] / b[key]["mean"]

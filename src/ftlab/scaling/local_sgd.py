"""The Local SGD experiment: Local SGD (constant H, and the quadratic synchronization rule of
Gu, Lyu, Arora, Zhang, Huang 2024) against synchronous data-parallel SGD at equal samples, on the
processes ``torchrun`` started (Gu, Lyu, Huang, Arora 2023 ask when Local SGD generalizes better).

For every seed, one normal ``ftlab.train`` run per variant, all ranks together
(``<output_dir>/<variant>/seed<s>/``, resumable, finished ones skipped):

- ``sync``: DDP, gradients all-reduced every step;
- ``constant``: Local SGD, weights averaged every ``period`` steps;
- ``quadratic``: Local SGD with ``H = max(period, floor((alpha / lr) ** 2))`` per round (use a
  decaying ``train.schedule``, e.g. cosine: H grows as the lr falls).

Every variant sees the same global batches (``train.batch_size`` over all ranks) in the same
order. Reported (``local_sgd.json``, ``local_sgd.png``): curves against samples seen (means over
seeds), each Local SGD variant's distance to ``sync`` (per seed, mean and t interval), best dev
and test metric with t intervals over seeds, and communication rounds (gradient all-reduces plus
weight averages) with their ratio to ``sync``'s.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftlab.config import LocalSGDSettings, Settings, TrainConfig, to_dict
from ftlab.distributed import barrier, init_from_env, is_main
from ftlab.errors import FtlabError
from ftlab.io import atomic_write_json
from ftlab.runs import writes_run_dir
from ftlab.scaling.compare import mean_ci, mean_curves, plot_rows, run_summary, seed_distances
from ftlab.train import load_run_data, train

VARIANTS: tuple[str, ...] = ("sync", "constant", "quadratic")


@dataclass
class LocalSGDExperimentConfig(Settings):
    """The base run (``train``; its ``local_sgd`` section is replaced), the variants, H (and
    H_base), the QSR's ``alpha``, the post-local ``switch_step`` and the seeds."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(optimizer="sgd"))
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    period: int = 4
    alpha: float | None = None
    switch_step: int = 0
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    output_dir: str = "runs/scale-local-sgd"


def run_configs(exp: LocalSGDExperimentConfig) -> dict[tuple[str, int], TrainConfig]:
    """The training config of every run, by ``(variant, seed)``; checks the experiment."""
    unknown = [v for v in exp.variants if v not in VARIANTS]
    if unknown or "sync" not in exp.variants:
        raise FtlabError(f"variants: choose among {list(VARIANTS)}, sync included (got {exp.variants})")
    if exp.train.optimizer not in ("sgd", "adamw"):
        raise FtlabError(f"train.optimizer: Local SGD is first order; use sgd or adamw (got {exp.train.optimizer}; "
                         f"zeroth-order data parallelism already sends one scalar per step)")
    if "quadratic" in exp.variants and (exp.alpha is None or exp.alpha <= 0):
        raise FtlabError(f"alpha: the quadratic rule needs alpha > 0 (got {exp.alpha}); H = max(period, "
                         f"floor((alpha / lr)^2)), e.g. alpha = lr * sqrt(2 * period) doubles H at the start")
    if not exp.seeds or len(set(exp.seeds)) != len(exp.seeds):
        raise FtlabError(f"seeds: give one or more distinct seeds (got {exp.seeds})")
    if not exp.train.eval_every:
        raise FtlabError("the Local SGD experiment compares dev curves: set train.eval_every > 0 (and a dev set)")
    settings = {"sync": LocalSGDSettings(),
                "constant": LocalSGDSettings(period=exp.period, switch_step=exp.switch_step),
                "quadratic": LocalSGDSettings(period=exp.period, rule="quadratic", alpha=exp.alpha,
                                              switch_step=exp.switch_step)}
    out = Path(exp.output_dir)
    configs = {}
    for variant in exp.variants:
        for seed in exp.seeds:
            cfg = dataclasses.replace(exp.train, local_sgd=settings[variant], seed=seed,
                                      output_dir=str(out / variant / f"seed{seed}"))
            cfg.validate()  # period < 1 and the like, in one line
            configs[(variant, seed)] = cfg
    return configs


@writes_run_dir("scale", "exp.output_dir", validate=run_configs)  # rank 0 claims + locks
def run_local_sgd_experiment(exp: LocalSGDExperimentConfig, *, progress: bool = True) -> dict[str, Any] | None:
    """Train every run not finished yet (all ranks), then, on rank 0, compare and write
    ``local_sgd.json`` and ``local_sgd.png``; returns the summary (None on the other ranks)."""
    configs = run_configs(exp)
    _, world = init_from_env(exp.train.device)
    if world < 2:
        raise FtlabError("the Local SGD experiment needs several processes: launch it with "
                         "torchrun --standalone --nproc_per_node 2 -m ftlab.cli scale local-sgd ...")
    data = {seed: load_run_data(dataclasses.replace(exp.train, seed=seed)) for seed in exp.seeds}
    for (_variant, seed), cfg in configs.items():
        train(cfg, progress=progress, data=data[seed])
    barrier()
    if not is_main():
        return None
    window = exp.train.eval_every * exp.train.batch_size
    summaries = {key: run_summary(cfg.output_dir, window) for key, cfg in configs.items()}
    per = {v: [summaries[(v, s)] for s in exp.seeds] for v in exp.variants}
    metric = per["sync"][0]["curves"]["metric"]
    rounds = {v: mean_ci([r["last"]["comm_rounds"] for r in runs]) for v, runs in per.items()}
    result: dict[str, Any] = {
        "config": to_dict(exp), "world": world, "samples": exp.train.steps * exp.train.batch_size,
        "best_dev": {v: mean_ci([r["results"]["best_dev"] for r in runs]) for v, runs in per.items()},
        "test": {v: mean_ci([r["results"]["test"][metric] for r in runs]) for v, runs in per.items()},
        "final_dev_loss": {v: mean_ci([r["curves"]["dev_loss"][-1] for r in runs]) for v, runs in per.items()
                           if "dev_loss" in runs[0]["curves"]},
        "comm_rounds": rounds,
        "rounds_vs_sync": {v: rounds[v]["mean"] / rounds["sync"]["mean"] for v in per},
        "distance_to_sync": {v: seed_distances([r["curves"] for r in per["sync"]], [r["curves"] for r in runs])
                             for v, runs in per.items() if v != "sync"},
        "mean_curves": {v: mean_curves([r["curves"] for r in runs]) for v, runs in per.items()},
    }
    labels = {v: f"{v}" + (f" (H={exp.period})" if v == "constant" else
                           f" (H_base={exp.period}, alpha={exp.alpha:g})" if v == "quadratic" else "")
              + f", {rounds[v]['mean']:.0f} comm rounds" for v in per}
    out = Path(exp.output_dir)
    atomic_write_json(out / "local_sgd.json", result)
    plot_rows({f"{world} processes, global batch {exp.train.batch_size}": result["mean_curves"]},
              out / "local_sgd.png", {f"{world} processes, global batch {exp.train.batch_size}": labels})
    return result

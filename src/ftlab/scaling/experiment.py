"""Batch-size scaling experiment: train at batch B and at kappa * B under a scaling rule (and
under alternatives) with the one training loop, and compare the curves against samples seen.

Variants (each a normal ``ftlab.train`` run in ``<output_dir>/<name>/``):

- ``base``: the given config (batch B, ``steps``, ``eval_every``).
- ``rule``: batch kappa B under the optimizer's rule (:func:`ftlab.scaling.rules.scale`).
- ``naive``: batch kappa B, every other hyperparameter unchanged.
- ``linear``: batch kappa B, lr x kappa, nothing else changed (the SGD rule applied to Adam).

The kappa B runs take ``steps / kappa`` steps and evaluate every ``eval_every / kappa`` steps,
so every run sees the same samples and is evaluated at the same numbers of samples seen.

What is computed (``experiment.json``):

- curves against samples seen: the training loss averaged over windows of ``eval_every * B``
  samples (the same samples for every run, so batch noise averages out alike), and the dev
  metric and dev loss at each evaluation (the dev loss is the smooth one: it moves with the
  weights even when no dev prediction flips);
- the distance of each variant's curve to the base curve: the mean absolute difference over
  the shared sample points (dev metric, dev loss, windowed training loss), plus the final dev gap;
- the SDE-validity check of Li, Malladi, Arora (2021): their necessary condition for the SDE
  approximation (and hence for a batch-size rule) is that gradient noise dominates the gradient,
  ``N / G >> 1`` with ``G = |grad L|^2`` and ``N = tr(Sigma) / batch`` the minibatch noise
  (Malladi et al. 2022 assume the same noise-dominated regime for Adam's SDE). It is estimated
  from per-example gradients of ``n_probe`` training examples, unbiasedly
  (``tr Sigma = sum |g_i - g_mean|^2 / (n - 1)``, ``G = |g_mean|^2 - tr Sigma / n``), at the
  starting point and at the base run's final weights. Reported: ``N/G`` at batch B and at
  kappa B, and ``kappa* = tr Sigma / (B G)``, the factor at which noise stops dominating
  (N/G = 1 at batch kappa* B): the rule is expected to hold only for kappa well below kappa*.
  When the noise is so large that the unbiased ``G`` is <= 0 at this ``n_probe``, those are
  ``None`` and only ``kappa_star_lower_bound = tr Sigma / (B |g_mean|^2)`` is given (``|g_mean|^2``
  overestimates G, so this bounds kappa* from below).
  The curve distances are the direct test: if the SDE holds, ``rule`` tracks ``base``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ftlab import objectives
from ftlab.checkpoint import load_trainable
from ftlab.config import Settings, TrainConfig, to_dict
from ftlab.errors import FtlabError
from ftlab.evaluate import model_device
from ftlab.io import atomic_write_json
from ftlab.models import load_model, trainable_parameters
from ftlab.objectives import Encoder
from ftlab.plots import optional, pyplot, save_figure
from ftlab.rundir import RunDir
from ftlab.runs import writes_run_dir
from ftlab.scaling.rules import from_train_config, scale, to_train_config
from ftlab.train import RunData, build_trainer, load_run_data, train

VARIANTS: tuple[str, ...] = ("rule", "naive", "linear")


@dataclass
class ScalingExperimentConfig(Settings):
    """The base run (batch B) and the batch-size factor; variants among ``VARIANTS``."""

    train: TrainConfig = field(default_factory=TrainConfig)
    kappa: float = 4.0
    variants: list[str] = field(default_factory=lambda: ["rule", "naive", "linear"])
    n_probe: int = 32  # training examples whose per-example gradients estimate the noise (0: skip)
    output_dir: str = "runs/scale"


def variant_configs(exp: ScalingExperimentConfig) -> dict[str, TrainConfig]:
    """The training config of every run, by name (``base`` first)."""
    base = exp.train
    unknown = [v for v in exp.variants if v not in VARIANTS]
    if unknown:
        raise FtlabError(f"unknown variant(s) {unknown}; choose among {list(VARIANTS)}")
    if not base.eval_every:
        raise FtlabError("the scaling experiment compares dev curves: set train.eval_every > 0 (and a dev set)")
    scaled = scale(from_train_config(base), exp.kappa)  # first: it checks kappa
    steps, every = _divided(base.steps, exp.kappa, "steps"), _divided(base.eval_every, exp.kappa, "eval_every")
    big = scaled.hparams.batch_size
    h = from_train_config(base)
    hparams = {"rule": scaled.hparams, "naive": dataclasses.replace(h, batch_size=big),
               "linear": dataclasses.replace(h, batch_size=big, lr=h.lr * exp.kappa)}
    out = Path(exp.output_dir)
    configs = {"base": dataclasses.replace(base, output_dir=str(out / "base"))}
    for name in exp.variants:
        cfg = to_train_config(base, hparams[name])
        configs[name] = dataclasses.replace(cfg, steps=steps, eval_every=every, checkpoint_every=every,
                                            output_dir=str(out / name))
    return configs


def _divided(value: int, kappa: float, name: str) -> int:
    result = value / kappa
    if result < 1 or abs(result - round(result)) > 1e-9:
        raise FtlabError(f"train.{name} = {value} must be a multiple of kappa = {kappa:g}, so that the "
                         f"kappa B runs see the same samples")
    return round(result)


@writes_run_dir("scale", "exp.output_dir", validate=variant_configs)  # claims + locks
def run_experiment(exp: ScalingExperimentConfig, *, progress: bool = True) -> dict[str, Any]:
    """Train every run (resuming or skipping finished ones), compare the curves, run the
    noise check, and write ``experiment.json`` and ``experiment.png``; returns the summary."""
    configs = variant_configs(exp)
    data = load_run_data(exp.train)
    if not data.splits.dev:
        raise FtlabError("the scaling experiment compares dev curves: set train.data.n_dev > 0")
    for cfg in configs.values():
        train(cfg, progress=progress, data=data)
    window = exp.train.eval_every * exp.train.batch_size
    curves = {name: run_curves(cfg.output_dir, window) for name, cfg in configs.items()}
    result = {"config": to_dict(exp), "kappa": exp.kappa,
              "hyperparameters": {n: _hparams_dict(c) for n, c in configs.items()},
              "explanation": scale(from_train_config(exp.train), exp.kappa).explanation,
              "curves": curves,
              "distance": {n: curve_distance(curves["base"], curves[n]) for n in configs if n != "base"},
              "noise": noise_check(exp, configs["base"], data) if exp.n_probe else None}
    out = Path(exp.output_dir)
    atomic_write_json(out / "experiment.json", result)
    plot_experiment(result, out / "experiment.png")
    return result


def _hparams_dict(cfg: TrainConfig) -> dict[str, Any]:
    return {"batch_size": cfg.batch_size, "lr": cfg.lr, "steps": cfg.steps, "betas": cfg.adam_betas,
            "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay, "momentum": cfg.momentum}


def run_curves(run_dir: str | Path, window: int) -> dict[str, list[float]]:
    """A run's training loss averaged over consecutive windows of ``window`` samples, and its
    dev metric, both against samples seen (read from ``metrics.jsonl``)."""
    run = RunDir(run_dir)
    records = run.read_metrics()
    cfg_batch = run.read_config()["batch_size"]
    train_rows = [r for r in records if r["split"] == "train" and r.get("loss") is not None]
    dev = [r for r in records if r["split"] == "dev"]
    metric = "accuracy" if dev and "accuracy" in dev[0] else "f1"
    dev_loss = {"dev_loss": [r["loss"] for r in dev]} if dev and "loss" in dev[0] else {}
    per_window = max(1, window // cfg_batch)  # steps per window
    losses = np.array([r["loss"] for r in train_rows])
    n_windows = len(losses) // per_window
    windowed = losses[:n_windows * per_window].reshape(n_windows, per_window).mean(1)
    return {"loss_samples": [(i + 1) * per_window * cfg_batch for i in range(n_windows)],
            "loss": windowed.tolist(),
            "dev_samples": [r["step"] * cfg_batch for r in dev], "dev": [r[metric] for r in dev],
            "metric": metric, **dev_loss}


def curve_distance(base: dict[str, list[float]], other: dict[str, list[float]]) -> dict[str, float]:
    """Mean absolute difference of two runs' curves at their shared sample points (dev metric,
    dev loss where both have it, windowed training loss), and the gap of their final dev scores."""
    out = {}
    keys = [("dev", "dev_samples"), ("loss", "loss_samples")]
    if "dev_loss" in base and "dev_loss" in other:
        keys.append(("dev_loss", "dev_samples"))
    for key, at in keys:
        a, b = dict(zip(base[at], base[key])), dict(zip(other[at], other[key]))
        shared = sorted(set(a) & set(b))
        if not shared:
            raise FtlabError("the two runs share no evaluation points; were they run with matching "
                             "steps and eval_every?")
        out[f"{key}_mean_abs"] = float(np.mean([abs(a[s] - b[s]) for s in shared]))
    out["final_dev_gap"] = float(other["dev"][-1] - base["dev"][-1])
    return out


def per_example_gradients(module: torch.nn.Module, encoder: Encoder, tokenizer, examples: list) -> torch.Tensor:
    """The flattened gradient of the loss of each example, shape (n, trainable entries), float64."""
    params = [p for _, p in trainable_parameters(module)]
    rows = []
    module.eval()  # no dropout: the noise measured is the data's alone
    for ex in examples:
        loss = objectives.objective_fn("loss", module, tokenizer, encoder, [ex], model_device(module))()
        grads = torch.autograd.grad(loss, params)
        rows.append(torch.cat([g.reshape(-1) for g in grads]).double().cpu())
    return torch.stack(rows)


def noise_statistics(grads: torch.Tensor, batch_size: int, kappa: float) -> dict[str, float]:
    """Li et al.'s noise-dominance statistics from per-example gradients (see module docstring)."""
    n = grads.shape[0]
    if n < 2:
        raise FtlabError("the noise check needs n_probe >= 2 examples")
    mean = grads.mean(0)
    trace = float(((grads - mean) ** 2).sum() / (n - 1))
    mean_sq = float(mean @ mean)  # E = |grad L|^2 + tr Sigma / n: an upper estimate of G
    g2 = mean_sq - trace / n  # unbiased, but <= 0 when the noise swamps the gradient at this n
    resolved = g2 > 0
    return {"trace_cov": trace, "grad_norm_sq": g2, "mean_grad_sq": mean_sq,
            "noise_to_signal_B": trace / (batch_size * g2) if resolved else None,
            "noise_to_signal_kappaB": trace / (kappa * batch_size * g2) if resolved else None,
            "kappa_star": trace / (batch_size * g2) if resolved else None,
            "kappa_star_lower_bound": trace / (batch_size * mean_sq)}


def noise_line(stats: dict[str, Any]) -> str:
    """One line summarising :func:`noise_statistics` for people."""
    if stats["kappa_star"] is None:
        return f"G not resolved (noise swamps it at this n_probe); kappa* >= {stats['kappa_star_lower_bound']:.3g}"
    return (f"N/G = {stats['noise_to_signal_B']:.3g} at batch B, {stats['noise_to_signal_kappaB']:.3g} at kappa B; "
            f"kappa* = {stats['kappa_star']:.3g}")


def noise_check(exp: ScalingExperimentConfig, base: TrainConfig, data: RunData) -> dict[str, Any]:
    """The noise statistics at the start and at the base run's final weights."""
    model, tokenizer = load_model(base.model, dtype=base.dtype, device=base.device)
    module, _, _ = build_trainer(base, model)
    encoder = Encoder(tokenizer, data.spec, max_length=base.data.max_length)
    rng = np.random.default_rng(base.seed)
    probe = [data.splits.train[i] for i in rng.choice(len(data.splits.train),
                                                       min(exp.n_probe, len(data.splits.train)), replace=False)]
    out = {"n_probe": len(probe), "start": noise_statistics(per_example_gradients(module, encoder, tokenizer, probe),
                                                            base.batch_size, exp.kappa)}
    final = RunDir(base.output_dir).weights_file("last", fallback=False)  # the end of training, if it got there
    if final is not None:
        load_trainable(module, final)
        out["end"] = noise_statistics(per_example_gradients(module, encoder, tokenizer, probe),
                                      base.batch_size, exp.kappa)
    return out


@optional
def plot_experiment(result: dict[str, Any], png: str | Path) -> Path | None:
    """Training loss and dev metric of every run against samples seen, in one PNG."""
    plt = pyplot()
    has_dev_loss = all("dev_loss" in c for c in result["curves"].values())
    fig, axes = plt.subplots(1, 3 if has_dev_loss else 2, figsize=(16 if has_dev_loss else 11, 4))
    ax_loss, ax_dev = axes[0], axes[1]
    for name, c in result["curves"].items():
        h = result["hyperparameters"][name]
        label = f"{name} (B={h['batch_size']}, lr={h['lr']:.3g})"
        if name != "base":
            d = result["distance"][name]
            label += f", dist: dev {d['dev_mean_abs']:.3f}"
            label += f", dev loss {d['dev_loss_mean_abs']:.4f}" if "dev_loss_mean_abs" in d else ""
            label += f", train loss {d['loss_mean_abs']:.4f}"
        style = dict(lw=2.5, color="black") if name == "base" else dict(lw=1.5)
        ax_loss.plot(c["loss_samples"], c["loss"], marker=".", label=label, **style)
        ax_dev.plot(c["dev_samples"], c["dev"], marker="o", label=label, **style)
        if has_dev_loss:
            axes[2].plot(c["dev_samples"], c["dev_loss"], marker="o", label=label, **style)
    metric = result["curves"]["base"]["metric"]
    ax_loss.set(xlabel="samples seen", ylabel="training loss (window mean)", title="Training loss")
    ax_dev.set(xlabel="samples seen", ylabel=f"dev {metric}", title=f"Dev {metric}, kappa = {result['kappa']:g}")
    if has_dev_loss:
        axes[2].set(xlabel="samples seen", ylabel="dev loss (cross-entropy)", title="Dev loss")
    ax_loss.legend(fontsize=7, loc="upper right")  # the loss curves fall away from that corner
    fig.tight_layout()
    return save_figure(fig, png)

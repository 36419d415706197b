"""`ftlab scale` (batch-size scaling rules and the scaling experiment) and `ftlab seeds`
(seed studies: run the grid, report on it)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ftlab.cli.common import drawn, note_skipped_plots, resolved_config, table

OVERRIDES_HELP = "Overrides as key=value (YAML values), e.g. kappa=8 train.lr=1e-3 train.steps=96"

scale_app = typer.Typer(help="Batch-size scaling rules: new hyperparameters for kappa x the batch size, "
                             "and an experiment that checks a rule.", invoke_without_command=True,
                        no_args_is_help=True)
seeds_app = typer.Typer(help="Seed studies: a grid of runs varying data order, init and MeZO seeds, and "
                             "its report (multi-bootstrap, expected max, variance shares, barriers).",
                        no_args_is_help=True)


@scale_app.callback()
def scale_cmd(
    ctx: typer.Context,
    kappa: Optional[float] = typer.Option(None, help="Batch-size factor: the new batch is kappa x the old one."),
    optimizer: str = typer.Option("adamw", help="sgd, rmsprop, adam, adamw or mezo."),
    lr: float = typer.Option(1e-3), batch_size: int = typer.Option(8),
    momentum: float = typer.Option(0.0, help="SGD momentum."),
    betas: str = typer.Option("0.9,0.999", help="beta1,beta2 (Adam); RMSprop's smoothing constant is beta2."),
    eps: float = typer.Option(1e-8), weight_decay: float = typer.Option(0.0),
    n_perturbations: int = typer.Option(1, help="MeZO's perturbations per step."),
) -> None:
    """Print the hyperparameters for batch size kappa x batch_size under the optimizer's rule.

    Example: ftlab scale --kappa 4 --optimizer adam --lr 1e-3 --batch-size 8"""
    if ctx.invoked_subcommand is not None:
        return
    from ftlab.errors import FtlabError
    from ftlab.scaling import OptimizerHParams, scale

    if kappa is None:
        raise FtlabError("give --kappa (the batch-size factor), e.g. ftlab scale --kappa 4 --optimizer adam")
    try:
        beta_values = [float(b) for b in betas.split(",")]
    except ValueError:
        raise FtlabError(f"--betas {betas!r}: write two numbers, e.g. 0.9,0.999") from None
    before = OptimizerHParams(optimizer, lr, batch_size, momentum, beta_values, eps, weight_decay, n_perturbations)
    result = scale(before, kappa)
    keys = _shown_keys(optimizer)
    rows = [(k, _fmt(getattr(before, k)), _fmt(getattr(result.hparams, k))) for k in keys]
    typer.echo(table(rows, ("hyperparameter", "batch " + str(batch_size), "batch " + str(result.hparams.batch_size))))
    typer.echo(f"\n{result.rule} rule: {result.explanation}")


def _shown_keys(optimizer: str) -> list[str]:
    extra = {"sgd": ["momentum"], "mezo": ["n_perturbations"]}.get(optimizer, ["betas", "eps"])
    return ["batch_size", "lr", *extra, "weight_decay"]


def _fmt(value) -> str:
    if isinstance(value, list):
        return "[" + ", ".join(f"{v:.6g}" for v in value) + "]"
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@scale_app.command("experiment")
def experiment_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help=OVERRIDES_HELP),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config: a path or a packaged config's name "
                                                                     "(e.g. scale-adam-lora)."),
) -> None:
    """Train at batch B and kappa x B (the rule, lr unchanged, linear lr) and compare the curves
    against samples seen; prints the distances and the SDE noise check. Resumable."""
    from ftlab.scaling.experiment import ScalingExperimentConfig, noise_line, run_experiment

    exp = resolved_config(ScalingExperimentConfig, config, overrides)
    result = run_experiment(exp)
    rows = [(name, str(h["batch_size"]), f"{h['lr']:.3g}", str(h["betas"]), f"{c['dev'][-1]:.4f}",
             *((f"{result['distance'][name]['dev_mean_abs']:.4f}", f"{result['distance'][name]['loss_mean_abs']:.4f}")
               if name != "base" else ("-", "-")))
            for (name, h), c in zip(result["hyperparameters"].items(), result["curves"].values())]
    typer.echo(table(rows, ("run", "batch", "lr", "betas", "final dev", "dev distance", "loss distance")))
    noise = result["noise"]
    if noise:
        for where in ("start", "end"):
            if where in noise:
                typer.echo(f"noise/signal at {where}: {noise_line(noise[where])}")
    for png in drawn(Path(exp.output_dir) / "experiment.png"):
        typer.echo(f"curves in {png}")
    note_skipped_plots()


@scale_app.command("momentum")
def momentum_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as key=value, e.g. beta=0.9 "
                                                             "'lrs=[1e-3, 1e-1]' 'seeds=[0, 1]' train.steps=64"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config: a path or a packaged name "
                                                                     "(e.g. scale-momentum)."),
) -> None:
    """SGD with momentum beta at lr eta against plain SGD at eta / (1 - beta) and at eta, for each
    lr and seed; prints the curve distances and the dev/test metrics with intervals. Resumable."""
    from ftlab.scaling.compare import fmt_ci
    from ftlab.scaling.momentum import VARIANTS, MomentumExperimentConfig, run_momentum_experiment

    exp = resolved_config(MomentumExperimentConfig, config, overrides)
    result = run_momentum_experiment(exp)
    rows = []
    for name, entry in result["lrs"].items():
        d = entry["distance"]
        for v in VARIANTS:
            dist = d.get(f"momentum_to_{v}", {}).get("dev_loss_mean_abs")
            rows.append((name, v, f"{entry['lr'][v]:.3g}", "-" if dist is None else fmt_ci(dist, 4),
                         fmt_ci(entry["best_dev"][v]), fmt_ci(entry["test"][v])))
        ratio = entry["ratio_dev_loss"]
        rows.append((name, "ratio", "", "-" if ratio is None else f"{ratio:.3f}", "", ""))
    typer.echo(table(rows, ("eta", "run", "lr", "dev-loss distance to momentum", "best dev", "test")))
    typer.echo("ratio = distance(momentum, effective) / distance(momentum, plain): small means momentum "
               "trains like SGD at eta / (1 - beta)." +
               "".join(f" Curves in {png}" for png in drawn(Path(exp.output_dir) / "momentum.png")))
    note_skipped_plots()


@scale_app.command("local-sgd")
def local_sgd_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as key=value, e.g. period=4 alpha=0.2 "
                                                             "'seeds=[0, 1, 2]' train.steps=96"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config: a path or a packaged name "
                                                                     "(e.g. scale-local-sgd)."),
) -> None:
    """Local SGD (constant H and the quadratic synchronization rule) against synchronous
    data-parallel SGD at equal samples; run under torchrun (2+ processes). Resumable."""
    from ftlab.distributed import shutdown
    from ftlab.scaling.compare import fmt_ci
    from ftlab.scaling.local_sgd import LocalSGDExperimentConfig, run_local_sgd_experiment

    exp = resolved_config(LocalSGDExperimentConfig, config, overrides)
    result = run_local_sgd_experiment(exp)
    shutdown()
    if result is None:  # not rank 0
        return
    rows = []
    for v, rounds in result["comm_rounds"].items():
        dist = result["distance_to_sync"].get(v, {}).get("dev_loss_mean_abs")
        rows.append((v, f"{rounds['mean']:.0f}", f"{result['rounds_vs_sync'][v]:.3f}",
                     fmt_ci(result["final_dev_loss"][v], 4) if v in result["final_dev_loss"] else "-",
                     fmt_ci(result["best_dev"][v]), fmt_ci(result["test"][v]),
                     "-" if dist is None else fmt_ci(dist, 4)))
    typer.echo(table(rows, ("run", "comm rounds", "vs sync", "final dev loss", "best dev", "test",
                            "dev-loss distance to sync")))
    typer.echo(f"{result['world']} processes, {result['samples']} samples each run" +
               "".join(f"; curves in {png}" for png in drawn(Path(exp.output_dir) / "local_sgd.png")))
    note_skipped_plots()


@seeds_app.command("run")
def seeds_run_cmd(
    overrides: Optional[list[str]] = typer.Argument(None, help="Overrides as key=value, e.g. runs_per_kind=3 "
                                                             "train.steps=40 train.device=cuda"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config: a path or a packaged config's name "
                                                                     "(e.g. seeds-lora)."),
) -> None:
    """Train every run of the seed grid not finished yet (resumable; under torchrun each rank
    takes its share of the runs)."""
    from ftlab.distributed import is_main, shutdown
    from ftlab.seeds import SeedStudyConfig, run_study

    study = resolved_config(SeedStudyConfig, config, overrides)
    records = run_study(study)
    shutdown()
    if is_main():
        rows = [(r["name"], ",".join(r["groups"]), str(r["best_dev"]),
                 f"{r['test'].get('accuracy', r['test'].get('f1')):.4f}") for r in records]
        typer.echo(table(rows, ("run", "groups", "best dev", "test")))
        typer.echo(f"{len(records)} runs in {study.output_dir}; next: ftlab seeds report {study.output_dir}")


@seeds_app.command("report")
def seeds_report_cmd(
    studies: list[Path] = typer.Argument(..., help="Seed-study folders (same model and task), e.g. runs/seeds-lora."),
    output: Path = typer.Option(Path("runs/seeds-report"), help="Folder for report.md, report.json, report.png."),
    n_boot: int = typer.Option(2000, help="Multi-bootstrap replicates."),
    pairs: int = typer.Option(2, help="Interpolation pairs per study (0: no barriers)."),
    seed: int = typer.Option(0, help="Seed of the bootstrap resampling."),
) -> None:
    """Statistics over the runs of seed studies, with PNG plots and a Markdown summary."""
    from ftlab.seeds.report import build_report

    report = build_report(studies, output, n_boot=n_boot, seed=seed, barrier_pairs=pairs, progress=True)
    typer.echo((output / "report.md").read_text())
    typer.echo(f"report in {output} ({len(report['studies'])} studies)")
    note_skipped_plots()


@seeds_app.command("topography")
def seeds_topography_cmd(
    study: Path = typer.Argument(..., help="A seed-study folder (ftlab seeds run), e.g. runs/seeds-sentiment-ood."),
    overrides: Optional[list[str]] = typer.Argument(None, help="TopographyConfig overrides as key=value, e.g. "
                                                             "alphas=[0,0.5,1] n_train=32 n_clusters=2"),
    output: Optional[Path] = typer.Option(None, help="Folder for report.md/.json and the PNGs "
                                                     "(default: STUDY/topography)."),
) -> None:
    """Pairwise barriers (cached per pair, resumable; under torchrun ranks take pairs), basins,
    sharpness, the loss surface through three runs, and whether they predict OOD accuracy."""
    from ftlab.config import load_config
    from ftlab.distributed import shutdown
    from ftlab.seeds.topography import TopographyConfig, topography

    cfg = load_config(TopographyConfig, None, overrides or [])
    report = topography(study, cfg, output, progress=True)
    shutdown()
    if report is not None:
        out = output or study / "topography"
        typer.echo((out / "report.md").read_text())
        typer.echo(f"report in {out}")
        note_skipped_plots()

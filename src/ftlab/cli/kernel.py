"""``ftlab kernel compute | solve | compare``: the kernel view of prompt-based fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ftlab.cli.common import note_skipped_plots, resolved_config, table

app = typer.Typer(help="Empirical NTK of prompt-based fine-tuning: compute kernels, solve them, "
                       "and check whether fine-tuning is in the kernel regime.", no_args_is_help=True)

CONFIG = typer.Option(None, "--config", "-c", help="YAML config: a path or a name in configs/ (e.g. kernel-sentiment).")
OVERRIDES = typer.Argument(None, help="Config overrides as key=value, e.g. k=32 seed=1 kernel.params=all "
                                      "kernel.projection_dim=8192 compare.optimizer=adamw output_dir=runs/k")
SHOW = typer.Option(False, help="Print the resolved config and exit.")


def _config(config: Optional[str], overrides: Optional[list[str]], show: bool):
    """The resolved :class:`~ftlab.kernel.config.KernelConfig`, or None after printing it (``--show-config``)."""
    from ftlab.kernel.config import KernelConfig

    return resolved_config(KernelConfig, config, overrides, show=show)


@app.command("compute")
def compute_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[str] = CONFIG,
                show_config: bool = SHOW) -> None:
    """Compute the SGD and sign eNTKs (train x train and test x train) on a k-shot split into
    ``output_dir`` (resumable: rerun the same command to continue)."""
    from ftlab.kernel import compute_kernel
    from ftlab.models import load_model
    from ftlab.train import build_trainer, load_run_data

    cfg = _config(config, overrides, show_config)
    if cfg is None:
        return
    tcfg = cfg.train_config()
    data = load_run_data(tcfg)
    lm, tokenizer = load_model(cfg.model, device=cfg.device)
    module = build_trainer(tcfg, lm)[0].eval()  # the same seeded adapters a training run starts from
    kd = compute_kernel(module, tokenizer, data.spec, data.splits.train, data.splits.test, cfg.kernel, cfg.output_dir,
                        identity=cfg.identity())
    if data.splits.note:
        typer.echo(f"note: {data.splits.note}", err=True)
    typer.echo(f"kernel of {kd.manifest['n_params']:,} parameters, {kd.n_train} train x "
               f"{len(kd.manifest['test_ids'])} test examples, {kd.tensors['readout'].shape[1]} outputs: "
               f"{cfg.output_dir}")


@app.command("solve")
def solve_cmd(
    kernel_dir: Path = typer.Argument(..., help="A folder written by `ftlab kernel compute`."),
    method: str = typer.Option("all", help="regression, svm, logistic, or all."),
    kind: str = typer.Option("all", help="sgd, sign, or all."),
    ridge: float = typer.Option(0.0, help="Relative ridge of regression (0: exact solve, ridge only if singular)."),
    c: float = typer.Option(1.0, help="Inverse regularisation of SVM / logistic regression."),
    model: Optional[str] = typer.Option(None, help="Refuse the kernel unless it was computed for this model."),
    task: Optional[str] = typer.Option(None, help="... for this task."),
    k: Optional[int] = typer.Option(None, "--k", help="... for this k per class."),
    seed: Optional[int] = typer.Option(None, help="... for this split seed."),
    predictions: Optional[Path] = typer.Option(None, help="Write per-example predictions and outputs to this JSON."),
    heatmap: Optional[Path] = typer.Option(None, help="Draw the kernel (trace over outputs) to this PNG."),
) -> None:
    """Kernel regression (f0 offset), SVM and logistic regression on a computed kernel."""
    from ftlab.io import atomic_write_json
    from ftlab.kernel import load_kernel, readout_accuracy
    from ftlab.kernel.solvers import METHODS, solve

    identity = {key: v for key, v in (("model", model), ("k", k), ("seed", seed)) if v is not None}
    expect = {**({"identity": identity} if identity else {}), **({"task": task} if task else {})}
    kd = load_kernel(kernel_dir, expect)
    methods = METHODS if method == "all" else (method,)
    kinds = ("sgd", "sign") if kind == "all" else (kind,)
    solutions = [solve(kd, m, kd_kind, ridge=ridge, c=c) for m in methods for kd_kind in kinds]
    zero_shot = readout_accuracy(kd.f0_test, kd.tensors["readout"], kd.y_test)
    rows = [("zero-shot (f0)", "-", f"{zero_shot:.4f}", "")]
    rows += [(s.method, s.kind, f"{s.accuracy:.4f}", s.note) for s in solutions]
    typer.echo(table(rows, ("method", "kernel", "accuracy", "note")))
    if predictions:
        atomic_write_json(predictions, {"kernel": str(kernel_dir), "zero_shot_accuracy": zero_shot, "solutions": [
            {"method": s.method, "kind": s.kind, "accuracy": s.accuracy, "ridge": s.ridge, "note": s.note,
             "predictions": s.predictions, "outputs": s.outputs.tolist()} for s in solutions],
            "test_ids": kd.manifest["test_ids"]})
    if heatmap:
        from ftlab.kernel.plots import kernel_heatmap

        png = kernel_heatmap(kd, heatmap)  # None without matplotlib
        if png:
            typer.echo(f"heat-map: {png}")
        note_skipped_plots()


@app.command("compare")
def compare_cmd(overrides: Optional[list[str]] = OVERRIDES, config: Optional[str] = CONFIG,
                show_config: bool = SHOW) -> None:
    """Fine-tune with the training loop on the kernel's k-shot split (settings ``compare.*``), then
    report kernel vs fine-tuned accuracy, prediction agreement, linearisation error, kernel
    change and a verdict; the run and its kernels go under ``output_dir`` (resumable)."""
    import dataclasses

    from ftlab.io import atomic_write_json
    from ftlab.kernel.diagnostics import diagnose
    from ftlab.train import load_run_data

    cfg = _config(config, overrides, show_config)
    if cfg is None:
        return
    tcfg = cfg.compare_config()
    data = load_run_data(tcfg)
    kspec = dataclasses.replace(cfg.kernel, params="trainable")  # the kernel of the trained parameters
    report, details = diagnose(tcfg, data.spec, data.splits, Path(cfg.output_dir) / "kernels", kspec=kspec,
                               method=cfg.compare.method,
                               identity={"task": cfg.task, "k": cfg.k, "data_seed": cfg.data_seed}, progress=True)
    atomic_write_json(Path(cfg.output_dir) / "diagnostics.json", {**report.to_dict(), **details})
    typer.echo(json.dumps(report.to_dict(), indent=2))
    typer.echo(report.verdict())

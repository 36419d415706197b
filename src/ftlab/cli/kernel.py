"""``ftlab kernel compute | solve | compare``: the kernel view of prompt-based fine-tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ftlab.cli.common import table

app = typer.Typer(help="Empirical NTK of prompt-based fine-tuning: compute kernels, solve them, "
                       "and check whether fine-tuning is in the kernel regime.", no_args_is_help=True)

MODEL = typer.Option("smollm2-135m", help="Embedded model name, local folder, or hub name.")
TASK = typer.Option("sentiment", help="Built-in classification task (single-token label words).")
K = typer.Option(16, "--k", help="Training examples per class (balanced k-shot split).")
SEED = typer.Option(0, help="Seed of the k-shot train split and of the LoRA initialisation.")
N_TEST = typer.Option(200, help="Test examples (fixed by --data-seed across seeds).")
DATA_SEED = typer.Option(0, help="Seed of the test split.")
PARAMS = typer.Option("lora", help="Parameters: lora, all, trainable, or re:<regex> over names.")
LORA_R = typer.Option(8, help="LoRA rank (params=lora, mode=lora).")


def _config(model: str, task: str, k: int, seed: int, n_test: int, data_seed: int, mode: str, lora_r: int,
            device: str, **extra):
    from ftlab.config import TrainConfig, load_config

    overrides = [f"model={model}", f"data.task={task}", f"data.k_per_class={k}", f"data.n_test={n_test}",
                 f"data.data_seed={data_seed}", "data.n_dev=0", f"seed={seed}", f"mode={mode}",
                 f"lora.r={lora_r}", f"lora.alpha={2 * lora_r}", f"device={device}",
                 *(f"{key}={value}" for key, value in extra.items())]
    return load_config(TrainConfig, None, overrides)


def _identity(cfg, params: str) -> dict:
    return {"model": cfg.model, "params": params, "lora_r": cfg.lora.r, "seed": cfg.seed,
            "k": cfg.data.k_per_class, "data_seed": cfg.data.data_seed, "n_test": cfg.data.n_test}


@app.command("compute")
def compute_cmd(
    out: Path = typer.Option(..., help="Kernel folder (resumable: rerun the same command to continue)."),
    model: str = MODEL, task: str = TASK, k: int = K, seed: int = SEED, n_test: int = N_TEST,
    data_seed: int = DATA_SEED, params: str = PARAMS, lora_r: int = LORA_R,
    output: str = typer.Option("logits", help="logits (C label-word logits) or contrast (C-1 contrasts)."),
    projection_dim: Optional[int] = typer.Option(None, help="Project Jacobians to this many dims (large sets)."),
    projection_seed: int = typer.Option(0),
    chunk_size: int = typer.Option(8, help="At most this many examples per batched pass."),
    max_padding: float = typer.Option(0.1, help="Cut a chunk where padding would add more than this share of tokens."),
    max_block_mb: float = typer.Option(1024.0, help="Memory for one parameter block's training Jacobian (exact)."),
    device: str = typer.Option("cpu"),
) -> None:
    """Compute the SGD and sign eNTKs (train x train and test x train) on a k-shot split."""
    from ftlab.kernel import KernelSpec, compute_kernel
    from ftlab.models import load_model
    from ftlab.train import build_trainer, load_run_data

    cfg = _config(model, task, k, seed, n_test, data_seed, "lora" if params == "lora" else "full", lora_r, device)
    data = load_run_data(cfg)
    lm, tokenizer = load_model(model, device=device)
    module = build_trainer(cfg, lm)[0].eval()  # the same seeded adapters a training run starts from
    kspec = KernelSpec(params=params, output=output, projection_dim=projection_dim, projection_seed=projection_seed,
                       chunk_size=chunk_size, max_padding=max_padding, max_block_mb=max_block_mb)
    kd = compute_kernel(module, tokenizer, data.spec, data.splits.train, data.splits.test, kspec, out,
                        identity=_identity(cfg, params))
    if data.splits.note:
        typer.echo(f"note: {data.splits.note}", err=True)
    typer.echo(f"kernel of {kd.manifest['n_params']:,} parameters, {kd.n_train} train x "
               f"{len(kd.manifest['test_ids'])} test examples, {kd.tensors['readout'].shape[1]} outputs: {out}")


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
    from ftlab.kernel import load_kernel
    from ftlab.kernel.solvers import METHODS, solve

    identity = {key: v for key, v in (("model", model), ("k", k), ("seed", seed)) if v is not None}
    expect = {**({"identity": identity} if identity else {}), **({"task": task} if task else {})}
    kd = load_kernel(kernel_dir, expect)
    methods = METHODS if method == "all" else (method,)
    kinds = ("sgd", "sign") if kind == "all" else (kind,)
    solutions = [solve(kd, m, kd_kind, ridge=ridge, c=c) for m in methods for kd_kind in kinds]
    f0_pred = (kd.f0_test.double() @ kd.tensors["readout"].double().T).argmax(1)
    zero_shot = float((f0_pred == kd.y_test).double().mean())
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

        typer.echo(f"heat-map: {kernel_heatmap(kd, heatmap)}")


@app.command("compare")
def compare_cmd(
    out: Path = typer.Option(..., help="Folder for the run and its kernels (resumable)."),
    model: str = MODEL, task: str = TASK, k: int = K, seed: int = SEED, n_test: int = N_TEST,
    data_seed: int = DATA_SEED, lora_r: int = LORA_R,
    mode: str = typer.Option("lora", help="full or lora (the kernel is over the trained parameters)."),
    optimizer: str = typer.Option("sgd", help="sgd (SGD kernel) or adamw (sign kernel)."),
    lr: float = typer.Option(1e-3), steps: int = typer.Option(100), batch_size: int = typer.Option(8),
    projection_dim: Optional[int] = typer.Option(None, help="Project the kernel (mode=full on large models)."),
    method: str = typer.Option("regression", help="Kernel solver compared with fine-tuning."),
    device: str = typer.Option("cpu"),
) -> None:
    """Fine-tune with the training loop on the kernel's k-shot split, then report kernel vs
    fine-tuned accuracy, prediction agreement, linearisation error, kernel change and a verdict."""
    from ftlab.io import atomic_write_json
    from ftlab.kernel import KernelSpec
    from ftlab.kernel.diagnostics import diagnose
    from ftlab.train import load_run_data

    cfg = _config(model, task, k, seed, n_test, data_seed, mode, lora_r, device, optimizer=optimizer, lr=lr,
                  steps=steps, batch_size=batch_size, eval_every=0, checkpoint_every=steps,
                  output_dir=str(out / "run"))
    data = load_run_data(cfg)
    kspec = KernelSpec(params="trainable", projection_dim=projection_dim)
    report, details = diagnose(cfg, data.spec, data.splits, out / "kernels", kspec=kspec, method=method,
                               identity={"task": task, "k": k, "data_seed": data_seed}, progress=True)
    atomic_write_json(out / "diagnostics.json", {**report.to_dict(), **details})
    typer.echo(json.dumps(report.to_dict(), indent=2))
    typer.echo(report.verdict())

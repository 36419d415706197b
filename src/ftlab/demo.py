"""The demo recipe: zero-shot, MeZO (LoRA) and AdamW (LoRA) on one task, side by side.

Each row has the test accuracy, the peak memory the method's work allocated beyond the loaded
model (:class:`ftlab.memory.PeakMemory`: for the training rows, over the training steps only --
MeZO's forwards keep no activations, gradients or optimizer state, so it stays near inference),
and the wall time (training rows: training plus the test evaluation; ``cpu_seconds`` beside it, the
process's CPU time, for loaded machines). The runs are written
under ``train.output_dir`` (``mezo/``, ``adamw/``), with ``demo.json`` (the rows) and
``demo.png`` (loss curves, accuracy and memory). A rerun reuses the rows of finished runs; a
killed run resumes from its checkpoint.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftlab.config import Optimizer, Settings, TrainConfig, ZOSettings, to_dict
from ftlab.evaluate import evaluate
from ftlab.io import atomic_write_json
from ftlab.memory import PeakMemory
from ftlab.models import load_model
from ftlab.plots import optional
from ftlab.rundir import RunDir
from ftlab.train import RunData, load_run_data, train

ROWS = "demo.json"
METHODS = ("mezo", "adamw")
LABELS = {"zero-shot": "zero-shot", "mezo": "MeZO (LoRA)", "adamw": "AdamW (LoRA)"}


@dataclass
class DemoMethod(Settings):
    """What one fine-tuning row sets on top of the shared ``train`` section."""

    optimizer: Optimizer = "adamw"
    lr: float = 2e-3
    steps: int = 60
    batch_size: int = 8
    zo: ZOSettings = field(default_factory=ZOSettings)


@dataclass
class DemoConfig(Settings):
    """The demo: a shared training setup (model, task, splits, mode) and the two methods."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(mode="lora", eval_every=0))
    mezo: DemoMethod = field(default_factory=lambda: DemoMethod(optimizer="mezo", lr=3e-3, steps=100,
                                                                batch_size=8, zo=ZOSettings(eps=1e-2)))
    adamw: DemoMethod = field(default_factory=lambda: DemoMethod(lr=1e-3, steps=60, batch_size=4))


# `ftlab demo --quick`: the same rows, smaller (a smoke run, not a measurement).
QUICK = ["train.data.n_train=64", "train.data.n_test=100", "mezo.steps=20", "adamw.steps=10",
         "train.output_dir=runs/demo-quick"]


def method_config(cfg: DemoConfig, method: str) -> TrainConfig:
    """The ``TrainConfig`` of one fine-tuning row (its run folder: ``<output_dir>/<method>``)."""
    m: DemoMethod = getattr(cfg, method)
    return dataclasses.replace(cfg.train, optimizer=m.optimizer, lr=m.lr, steps=m.steps, batch_size=m.batch_size,
                               zo=m.zo, output_dir=str(Path(cfg.train.output_dir) / method))


Loader = Callable[[], tuple[Any, Any]]


def run_demo(cfg: DemoConfig, progress: bool = True, load: Loader | None = None,
             data: RunData | None = None) -> list[dict[str, Any]]:
    """Zero-shot, then each method of ``METHODS`` fine-tuned from a fresh copy of the model;
    returns one row per method (also written to ``<output_dir>/demo.json``).

    ``load`` returns a fresh (model, tokenizer) (default: :func:`load_model` of ``cfg.train``);
    ``data`` the task's splits (default: loaded from ``cfg.train``): tests pass tiny ones.
    """
    t = cfg.train
    load = load or (lambda: load_model(t.model, dtype=t.dtype, device=t.device))
    data = data or load_run_data(t)
    out = Path(t.output_dir)
    done = _read_rows(out / ROWS, cfg)
    rows = [done.get("zero-shot") or _zero_shot(t, load, data, progress)]
    _write_rows(out, cfg, rows)
    for method in METHODS:
        run_cfg = method_config(cfg, method)
        finished = RunDir(run_cfg.output_dir).finished()
        rows.append(done[method] if finished and method in done else _fine_tune(run_cfg, method, load, data, progress))
        _write_rows(out, cfg, rows)
    return rows


def _loaded(t: TrainConfig, load: Loader, data: RunData) -> tuple[Any, Any]:
    """A fresh model, its weights paged in by a one-example forward (a model loaded from
    safetensors is memory-mapped: its first forward would count the weights as the method's)."""
    model, tokenizer = load()
    evaluate(model, tokenizer, data.spec, data.splits.test[:1], max_length=t.data.max_length, progress=False)
    return model, tokenizer


def _zero_shot(t: TrainConfig, load: Loader, data: RunData, progress: bool) -> dict[str, Any]:
    model, tokenizer = _loaded(t, load, data)
    memory, start, cpu = PeakMemory().start(), time.perf_counter(), time.process_time()
    result = evaluate(model, tokenizer, data.spec, data.splits.test, batch_size=t.eval_batch_size,
                      max_length=t.data.max_length, progress=progress, desc="zero-shot")
    return _row("zero-shot", result.metrics, 0, memory.peak(), time.perf_counter() - start, time.process_time() - cpu)


def _fine_tune(run_cfg: TrainConfig, method: str, load: Loader, data: RunData, progress: bool) -> dict[str, Any]:
    model, tokenizer = _loaded(run_cfg, load, data)  # fresh: LoRA is injected into the model in place
    resumed = Path(run_cfg.output_dir).exists()
    memory, start, cpu = PeakMemory().start(), time.perf_counter(), time.process_time()
    state = {"training": None}

    def after_step(step: int, record: dict[str, Any]) -> None:
        if step == run_cfg.steps:  # the peak of the training steps, before the test evaluation
            state["training"] = memory.peak()

    results = train(run_cfg, progress=progress, model_and_tokenizer=(model, tokenizer), data=data,
                    callback=after_step)
    row = _row(method, results["test"], run_cfg.steps, state["training"] if state["training"] is not None
               else memory.peak(), time.perf_counter() - start, time.process_time() - cpu)
    del model
    gc.collect()
    return {**row, **({"resumed": True} if resumed else {})}


def _row(method: str, metrics: dict[str, float], steps: int, peak: int | None, seconds: float,
         cpu_seconds: float) -> dict[str, Any]:
    return {"method": method, "label": LABELS[method], "accuracy": metrics["accuracy"], "n": int(metrics["n"]),
            "steps": steps, "peak_mib": None if peak is None else peak / 2**20, "seconds": seconds,
            "cpu_seconds": cpu_seconds}


def _read_rows(path: Path, cfg: DemoConfig) -> dict[str, dict[str, Any]]:
    """The rows an earlier run of this same demo config recorded (none for another config)."""
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved["config"] != json.loads(json.dumps(to_dict(cfg))):
            return {}
        return {r["method"]: r for r in saved["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # none yet (or unreadable: the rows are recomputed)


def _write_rows(out: Path, cfg: DemoConfig, rows: list[dict[str, Any]]) -> None:
    atomic_write_json(out / ROWS, {"config": to_dict(cfg), "rows": rows})


@optional
def plot_demo(cfg: DemoConfig, rows: list[dict[str, Any]], png: str | Path | None = None) -> Path | None:
    """Training loss of both runs against examples seen, test accuracy and peak memory per row."""
    from ftlab.plots import pyplot, save_figure

    plt = pyplot()
    fig, (ax_loss, ax_acc, ax_mem) = plt.subplots(1, 3, figsize=(13, 3.8))
    for method in METHODS:
        run_cfg = method_config(cfg, method)
        run = RunDir(run_cfg.output_dir)
        records = run.read_metrics(split="train") if run.metrics.is_file() else []  # none: the run did not start
        train_rows = [r for r in records if r.get("loss") is not None]
        losses = [r["loss"] for r in train_rows]
        window = max(1, len(losses) // 10)
        smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
                  for i in range(len(losses))]
        ax_loss.plot([r["step"] * run_cfg.batch_size for r in train_rows], smooth, label=LABELS[method])
    ax_loss.set(xlabel="training examples seen", ylabel="training loss (moving average)", title="Training loss")
    ax_loss.legend()
    labels = [r["label"] for r in rows]
    ax_acc.bar(labels, [r["accuracy"] for r in rows], color=["gray", "tab:blue", "tab:orange"][:len(rows)])
    ax_acc.set(ylabel="test accuracy", title=f"Test accuracy (n={rows[0]['n']})",
               ylim=(max(0.0, min(r["accuracy"] for r in rows) - 0.1), 1.0))
    ax_mem.bar(labels, [r["peak_mib"] or 0.0 for r in rows], color=["gray", "tab:blue", "tab:orange"][:len(rows)])
    ax_mem.set(ylabel="MiB beyond the loaded model", title="Peak memory of the work")
    fig.tight_layout()
    return save_figure(fig, png or Path(cfg.train.output_dir) / "demo.png")

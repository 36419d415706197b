"""Pictures of a training run (matplotlib, saved as PNG)."""

from __future__ import annotations

from pathlib import Path

from ftlab.io import atomic_file
from ftlab.rundir import RunDir


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, png: str | Path, dpi: int = 120) -> Path:
    """Save ``fig`` as a PNG atomically (creating the folder) and close it; returns the path."""
    png = Path(png)
    png.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(png, "wb") as f:
        fig.savefig(f, format="png", dpi=dpi)
    pyplot().close(fig)
    return png


def plot_run(run_dir: str | Path, png: str | Path | None = None) -> Path:
    """Plot a run's training loss (with a moving average) and its dev metric against steps.

    Reads ``<run_dir>/metrics.jsonl`` and writes ``png`` (default ``<run_dir>/training.png``).
    """
    plt = pyplot()
    run = RunDir(run_dir)
    records = run.read_metrics()
    train = [r for r in records if r["split"] == "train" and r.get("loss") is not None]  # not skipped steps
    dev = [r for r in records if r["split"] == "dev"]
    fig, (ax_loss, ax_dev) = plt.subplots(1, 2, figsize=(10, 3.8))
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    ax_loss.plot(steps, losses, lw=0.8, alpha=0.4, label="batch loss")
    window = max(1, len(losses) // 10)
    smooth = [sum(losses[max(0, i - window + 1):i + 1]) / len(losses[max(0, i - window + 1):i + 1])
              for i in range(len(losses))]
    ax_loss.plot(steps, smooth, lw=1.8, label=f"moving average ({window})")
    ax_loss.set(xlabel="step", ylabel="training loss", title="Training loss")
    ax_loss.legend()
    if dev:
        metric = "accuracy" if "accuracy" in dev[0] else "f1"
        ax_dev.plot([r["step"] for r in dev], [r[metric] for r in dev], marker="o")
        ax_dev.set(xlabel="step", ylabel=f"dev {metric}", title=f"Dev {metric} (n={dev[0]['n']})")
    fig.tight_layout()
    return save_figure(fig, png or run.plot)

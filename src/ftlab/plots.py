"""Pictures of a training run (matplotlib, saved as PNG).

matplotlib is optional (the ``plot`` extra): every function that draws a PNG is marked
:func:`optional`, so without matplotlib it draws nothing and returns None, and the work around
it (a run, a report) completes; the command line then says so in one line (:data:`SKIPPED`).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Callable, TypeVar

from ftlab.errors import FtlabError
from ftlab.io import atomic_file
from ftlab.rundir import RunDir

SKIPPED = "plots skipped: install ftlab[plot]"
F = TypeVar("F", bound=Callable[..., object])


def available() -> bool:
    """Whether matplotlib (the ``plot`` extra) can be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def optional(draw: F) -> F:
    """Decorator of a function that draws a PNG: without matplotlib it returns None, drawing nothing."""
    @functools.wraps(draw)
    def draw_if_available(*args, **kwargs):
        return draw(*args, **kwargs) if available() else None
    return draw_if_available  # type: ignore[return-value]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (files only: no display needed)."""
    if not available():  # a drawing function not marked optional
        raise FtlabError("this plot needs matplotlib: pip install 'ftlab[plot]'")
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


@optional
def plot_run(run_dir: str | Path, png: str | Path | None = None) -> Path | None:
    """Plot a run's training loss (with a moving average) and its dev metric against steps.

    Reads ``<run_dir>/metrics.jsonl`` and writes ``png`` (default ``<run_dir>/training.png``);
    None without matplotlib.
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

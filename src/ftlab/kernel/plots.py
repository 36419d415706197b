"""Pictures of the kernel view (matplotlib, Agg backend, PNG files)."""

from __future__ import annotations

import textwrap
from pathlib import Path
from typing import Any, Sequence

from ftlab.errors import FtlabError
from ftlab.kernel.store import KernelData
from ftlab.plots import optional, pyplot, save_figure


@optional
def accuracy_scatter(records: Sequence[dict[str, Any]], png: str | Path, title: str = "") -> Path | None:
    """Kernel accuracy (y) against fine-tuning accuracy (x), one point per record.

    Each record has ``kernel_accuracy``, ``finetuned_accuracy``, ``task`` and ``label`` (e.g.
    ``"lora/adamw"``; one marker per label, one colour per task); the diagonal is where the
    kernel predicts fine-tuning's accuracy exactly."""
    if not records:
        raise FtlabError("nothing to plot: no (kernel, fine-tuning) accuracy pairs")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 4.8))
    tasks = sorted({r["task"] for r in records})
    labels = sorted({r["label"] for r in records})
    markers = "osD^vP*X"
    colours = plt.get_cmap("tab10")
    for r in records:
        marker = markers[labels.index(r["label"]) % len(markers)]
        ax.scatter(r["finetuned_accuracy"], r["kernel_accuracy"], marker=marker,
                   color=colours(tasks.index(r["task"]) % 10), alpha=0.8, s=40)
    lo = min(min(r["finetuned_accuracy"], r["kernel_accuracy"]) for r in records) - 0.05
    ax.plot([lo, 1], [lo, 1], color="grey", lw=0.8, ls="--")
    for i, t in enumerate(tasks):
        ax.scatter([], [], color=colours(i % 10), label=t)
    for i, lab in enumerate(labels):
        ax.scatter([], [], marker=markers[i % len(markers)], color="black", label=lab)
    ax.set_xlabel("fine-tuning test accuracy")
    ax.set_ylabel("kernel (eNTK) test accuracy")
    ax.set_title(textwrap.fill(title or "kernel vs fine-tuning", 55), fontsize=10)  # long titles wrap, not clip
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return save_figure(fig, png)


@optional
def kernel_heatmap(kernel: KernelData, png: str | Path, kind: str = "sgd") -> Path | None:
    """Heat-map of the trace kernel ``sum_o K_oo`` (rows: train then test, columns: train),
    examples grouped by label, with lines between the label groups."""
    from ftlab.kernel.solvers import trace_kernel

    plt = pyplot()
    scalar = trace_kernel(kernel.tensors[kind]).numpy()
    n = kernel.n_train
    labels = kernel.manifest["train_labels"] + kernel.manifest["test_labels"]
    rows = sorted(range(n), key=lambda i: labels[i]) + sorted(range(n, len(labels)), key=lambda i: labels[i])
    cols = sorted(range(n), key=lambda i: labels[i])
    fig, ax = plt.subplots(figsize=(5.5, max(3.0, 5.5 * len(rows) / max(n, 1) * 0.5)))
    image = ax.imshow(scalar[rows][:, cols], aspect="auto", cmap="viridis", interpolation="nearest")
    ax.axhline(n - 0.5, color="white", lw=1.2)
    for boundary in [i for i in range(1, n) if labels[cols[i]] != labels[cols[i - 1]]]:
        ax.axvline(boundary - 0.5, color="white", lw=0.6, ls=":")
    ax.set_xlabel("training examples (by label)")
    ax.set_ylabel("train (top) / test (bottom) examples")
    ax.set_title(f"{kind} kernel, trace over outputs ({kernel.manifest.get('task', '')})")
    fig.colorbar(image, ax=ax)
    fig.tight_layout()
    return save_figure(fig, png)

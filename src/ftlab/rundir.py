"""The layout of a training run's folder, in one place: what ``ftlab train`` writes and where, and
how the other commands (replay, plots, the kernel check, seed studies, scaling experiments, the
Hugging Face trainer) read it back.

    config.json        the full config (a rerun with another config refuses to resume)
    metrics.jsonl      one JSON line per logged train step and per dev evaluation
    checkpoint/        trainable.safetensors + optimizer/scheduler/RNG state (state.json ...)
    best.safetensors   the trainable tensors of the best dev step
    trajectory.bin     zeroth-order runs: the checksummed (seed, projected gradient) log
    model/             save_pretrained output of the best model
    results.json       dev/test metrics of the best model (its presence marks a finished run)
    training.png       the training curves
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftlab.errors import FtlabError, damaged


def read_written_json(path: Path) -> Any:
    """A JSON file ftlab wrote; one that cannot be read or parsed is a one-line error naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(path, e) from None


@dataclass(frozen=True)
class RunDir:
    """A training run's folder; the properties are its files (which may not exist yet)."""

    path: Path

    def __init__(self, path: str | Path) -> None:
        object.__setattr__(self, "path", Path(path))

    config = property(lambda self: self.path / "config.json")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoint = property(lambda self: self.path / "checkpoint")
    checkpoint_weights = property(lambda self: self.path / "checkpoint" / "trainable.safetensors")
    checkpoint_state = property(lambda self: self.path / "checkpoint" / "state.json")
    best = property(lambda self: self.path / "best.safetensors")
    trajectory = property(lambda self: self.path / "trajectory.bin")
    model = property(lambda self: self.path / "model")
    results = property(lambda self: self.path / "results.json")
    plot = property(lambda self: self.path / "training.png")

    # Everything above, by name: what an ftlab version before the folder marker wrote (see
    # ftlab.runs), and what counts as a run having made progress.
    NAMES = ("config.json", "metrics.jsonl", "checkpoint", "best.safetensors", "trajectory.bin", "model",
             "results.json", "training.png")

    def started(self) -> bool:
        """Whether training (or evaluating) began here: a folder with none of these files holds at
        most the config.json of a start that failed (bad model name, data file...), which a
        corrected config may replace."""
        return any((self.path / name).exists() for name in self.NAMES if name not in ("config.json", "training.png"))

    def finished(self) -> bool:
        return self.results.is_file()

    def read_json(self, path: Path) -> Any:
        """A JSON file of the run, or a one-line error naming it (missing or damaged)."""
        if not path.is_file():
            raise FtlabError(f"{path} not found: is {self.path} a (finished) training run folder?")
        return read_written_json(path)

    def read_config(self) -> dict[str, Any]:
        return self.read_json(self.config)

    def read_results(self) -> dict[str, Any]:
        return self.read_json(self.results)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The logged records in order; a line a kill cut in half (the last) is skipped."""
        if not self.metrics.is_file():
            raise FtlabError(f"{self.metrics} not found: is {self.path} a training run folder?")
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def final_weights(self) -> dict[str, Any]:
        """The trainable tensors at the end of a finished run (its last checkpoint, written at the
        final step), else the dev-selected best ones. The end, not the best, says where training
        went: dev selection may pick an early step (even step 0)."""
        from safetensors.torch import load_file

        for path in (self.checkpoint_weights, self.best):
            if path.exists():
                return load_file(str(path))
        raise FtlabError(f"{self.path} holds no trained weights (best.safetensors or checkpoint/); "
                         "is it a finished run?")

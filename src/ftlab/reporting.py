"""Mirrors of a training run's metrics in TensorBoard and Weights & Biases (``report_to``).

The training loop logs every record (train loss and lr per step, dev metrics per evaluation)
through one :class:`MetricsLog`: it appends the record to ``metrics.jsonl``, which stays the
record of the run, and hands it to each reporter; :meth:`MetricsLog.end` adds the test metrics
(at the last step) and closes the reporters. Each numeric field of a record becomes the scalar
``<split>/<field>`` at the record's step (``train/loss``, ``train/lr``, ``dev/accuracy``,
``test/accuracy``...). Only rank 0 reports (the other ranks log nothing).

- ``tensorboard``: event files in ``<output_dir>/tensorboard/`` (``tensorboard --logdir
  runs/``), written by ``torch.utils.tensorboard``; a resumed run purges the events past the
  step it resumes from (a run that starts again at step 0: all of them), as ``metrics.jsonl``
  drops its lines past that step, so no point is logged twice.
- ``wandb``: one W&B run per run folder (its id kept in ``<output_dir>/wandb-run-id``, so a
  resumed run continues it), project ``$WANDB_PROJECT`` (default ``ftlab``), files under
  ``<output_dir>/wandb/``; ``WANDB_MODE=offline`` works without an account (``wandb sync``
  uploads later). W&B cannot take back points: steps a killed run sent past its last
  checkpoint stay (the resumed run recomputes them bitwise, and W&B ignores the repeats).

Whether a reporter is installed is checked with the config (:meth:`ftlab.config.TrainConfig.validate`),
before a run writes anything.
"""

from __future__ import annotations

import math
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

from ftlab.errors import FtlabError
from ftlab.io import atomic_write_text

Record = dict[str, Any]
WANDB_ID = "wandb-run-id"


class Reporter(Protocol):
    def log(self, step: int, scalars: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def scalars(record: Record) -> dict[str, float]:
    """The numbers of a metrics record as ``{"<split>/<field>": value}`` (not its step; a
    skipped step's null loss and text fields are left out)."""
    return {f"{record['split']}/{key}": float(value) for key, value in record.items()
            if key not in ("step", "split") and isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value)}


class MetricsLog:
    """What the training loop logs through: ``log(record)`` writes it (``write``: rank 0's
    ``metrics.jsonl``) and mirrors its numbers to each reporter; ``end(results)`` reports the
    test metrics at the last step, closes the reporters and returns ``results``."""

    def __init__(self, write: Callable[[Record], None] | None = None, reporters: Iterable[Reporter] = ()) -> None:
        self.write, self.reporters = write, list(reporters)

    def __call__(self, record: Record) -> None:
        if self.write is not None:
            self.write(record)
        for reporter in self.reporters:
            reporter.log(record["step"], scalars(record))

    def end(self, results: Record) -> Record:
        """Report ``results["test"]`` at step ``results["steps"]``, close the reporters; returns ``results``."""
        try:
            if results.get("test"):
                numbers = scalars({"split": "test", **results["test"]})
                for reporter in self.reporters:
                    reporter.log(results["steps"], numbers)
        finally:
            for reporter in self.reporters:
                reporter.close()
        return results


def reporters(names: Iterable[str], folder: str | Path, config: Record, kept_step: int) -> list[Reporter]:
    """The reporters ``names`` (``report_to``) of the run in ``folder``, whose records up to
    ``kept_step`` stay (the step it resumes from; -1: it starts afresh)."""
    built = {"tensorboard": TensorBoard, "wandb": WandB}
    return [built[name](Path(folder), config, kept_step) for name in names]


class TensorBoard:
    """Scalars as TensorBoard event files in ``<folder>/tensorboard/``."""

    def __init__(self, folder: Path, config: Record, kept_step: int) -> None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise FtlabError(f"report_to tensorboard: {e}; pip install 'ftlab[report]'") from None
        # Events past the step the run resumes from are purged, as metrics.jsonl drops them.
        self.writer = SummaryWriter(log_dir=str(folder / "tensorboard"), purge_step=kept_step + 1)

    def log(self, step: int, scalars: dict[str, float]) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()  # on disk at once: a killed run's events are not lost

    def close(self) -> None:
        self.writer.close()


class WandB:
    """Scalars logged to a Weights & Biases run, one per run folder (resumed with it)."""

    def __init__(self, folder: Path, config: Record, kept_step: int) -> None:
        try:
            import wandb
        except ImportError as e:
            raise FtlabError(f"report_to wandb: {e}; pip install 'ftlab[report]'") from None
        id_file = folder / WANDB_ID
        if not id_file.is_file():
            atomic_write_text(id_file, uuid.uuid4().hex[:12] + "\n")
        try:
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "ftlab"), dir=str(folder),
                                  id=id_file.read_text().strip(), resume="allow", name=folder.name, config=config,
                                  reinit="create_new", settings=wandb.Settings(silent=True))
        except Exception as e:  # wandb raises its own errors (no API key, no network...)
            raise FtlabError(f"report_to wandb: could not start a W&B run ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}); run `wandb login`, or set "
                             "WANDB_MODE=offline") from None

    def log(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()

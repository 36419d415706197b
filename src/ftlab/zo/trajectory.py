"""The trajectory log of a MeZO run: everything needed to rebuild its weights from the base model.

A MeZO step is fully described by its seeds, projected gradients and lr, so a run's
checkpoint is its ``config.json`` (base model id, mode, seeds, settings) plus an append-only
binary log (``trajectory.bin``) of 16-byte records
``(step: uint32, seed: uint32, projected_gradient: float32, lr: float32)``, one per
perturbation: 16 KB per thousand steps. MeZO uses the float32 values themselves, so replaying
the log reproduces the weights bit for bit.
"""

from __future__ import annotations

import os
import struct
import warnings
from pathlib import Path
from typing import Iterator

from ftlab.errors import FtlabError
from ftlab.zo.mezo import MeZO, ZOStep

RECORD = struct.Struct("<IIff")
LOG = "trajectory.bin"


class TrajectoryLog:
    """Append-only log of MeZO steps in folder ``run_dir``."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / LOG

    def append(self, step: int, record: ZOStep) -> None:
        """Append one step (all its perturbations) and flush it to the OS."""
        with self.path.open("ab") as f:
            for seed, g in zip(record.seeds, record.grads):
                f.write(RECORD.pack(step, seed, g, record.lr))

    def sync(self) -> None:
        """Make the appended records durable (called at checkpoints)."""
        if self.path.exists():
            with self.path.open("rb+") as f:
                os.fsync(f.fileno())

    def steps(self) -> Iterator[tuple[int, ZOStep]]:
        """The logged steps in order, as (step, ZOStep); a torn last record is ignored."""
        data = self.path.read_bytes() if self.path.exists() else b""
        whole = len(data) - len(data) % RECORD.size
        current: tuple[int, ZOStep] | None = None
        for step, seed, g, lr in RECORD.iter_unpack(data[:whole]):
            if current is not None and current[0] == step:
                current[1].seeds.append(seed)
                current[1].grads.append(g)
                continue
            if current is not None:
                yield current
            current = (step, ZOStep([seed], [g], lr, float("nan")))
        if current is not None:
            yield current

    def truncate(self, n_steps: int) -> None:
        """Keep only the records of steps ``< n_steps`` (drop what a killed run did after its
        last checkpoint; those steps are recomputed identically)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = b"".join(RECORD.pack(*r) for r in RECORD.iter_unpack(data[:len(data) - len(data) % RECORD.size])
                        if r[0] < n_steps)
        tmp = self.path.with_name(f".{LOG}.tmp")
        tmp.write_bytes(keep)
        os.replace(tmp, self.path)


def replay(log: TrajectoryLog, optimizer: MeZO, scheduler: object | None = None,
           steps: int | None = None) -> int:
    """Apply the logged steps (the first ``steps``, default all) to ``optimizer``'s parameters
    without forwards, advancing its seed generator and ``scheduler`` alike; returns how many
    steps were replayed."""
    n = 0
    for step, record in log.steps():
        if steps is not None and step >= steps:
            break
        drawn = optimizer.draw_seeds()
        if step != n or drawn != record.seeds:
            raise FtlabError(f"{log.path}: step {step} does not follow from this run's seed "
                             f"(expected step {n}, seeds {drawn}); the log belongs to another run")
        optimizer.replay(record)
        if scheduler is not None:
            with warnings.catch_warnings():  # it warns that optimizer.step() was not called
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
        n += 1
    return n

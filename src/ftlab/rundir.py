"""A training run's folder: :class:`RunDir` knows its layout and reads and writes its files (the training
loop writes through it, every other command reads through it); :mod:`ftlab.runs` claims and locks folders.

Every reader of a run folder (replay, plots, the kernel check, seed studies, scaling experiments,
the demo) reads through :class:`RunDir`: :meth:`RunDir.read_metrics` for the log,
:meth:`RunDir.final_weights` (with a stated preference) for the trained tensors. The layout:

    config.json        the full config (a rerun with another config refuses to resume)
    metrics.jsonl      one JSON line per logged train step and per dev evaluation
    checkpoint/        trainable.safetensors + optimizer/scheduler/RNG state (state.json ...), and
                       ftlab-manifest.json: every file's sha256, checked before a resume
    best.safetensors   the trainable tensors of the best dev step (their sha256 in its metadata)
    trajectory.bin     zeroth-order runs: the checksummed (seed, projected gradient) log
    model/             save_pretrained output of the kept weights: those training ended with, or
                       with keep=best the best dev step's (an adapter or prefix also holds the
                       tokenizer and ftlab_base.json: the base's name and weights hash), with
                       ftlab-manifest.json (every file's sha256, and results.json's: checked by
                       load_trained and read_results)
    results.json       which weights model/ holds ("model": "last" | "best", "model_step"), their
                       test metrics, the dev facts ("best_step", "best_dev"); its presence marks
                       a finished run
    training.png       the training curves
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ftlab.errors import FtlabError, damaged
from ftlab.io import MANIFEST, atomic_write_text, file_sha256, json_sha256, verify_manifest

if TYPE_CHECKING:
    import torch

# Which trained tensors a reader wants first: the last checkpoint's ("last", the end of training)
# or the dev-selected best ones ("best").
Prefer = Literal["last", "best"]


# The safetensors metadata key under which save_trainable records its tensors' tensors_sha256.
SHA256_KEY = "ftlab.sha256"


def tensors_sha256(state: dict[str, torch.Tensor]) -> str:
    """The sha256 (hex) of named tensors: every name, dtype, shape and byte, in name order."""
    import torch

    digest = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().to("cpu").contiguous().reshape(-1)
        digest.update(f"{name}:{t.dtype}:{tuple(state[name].shape)};".encode())
        digest.update(t.view(torch.uint8).numpy())
    return digest.hexdigest()


def read_trainable(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a file written by :func:`ftlab.checkpoint.save_trainable`, checked: a file whose tensors no
    longer have the sha256 recorded in it is refused (one written before ftlab recorded it is
    taken as it is)."""
    remedy = "restore it or start afresh with --overwrite"
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as f:
            recorded = (f.metadata() or {}).get(SHA256_KEY)
        state = load_file(str(path))
    except Exception as e:  # safetensors' errors (bad header, truncated file) have no common base
        raise damaged(path, e, remedy) from None
    if recorded is not None and tensors_sha256(state) != recorded:
        raise FtlabError(f"{path} is damaged (its tensors' sha256 differs from the one recorded when it was "
                         f"written: a flipped bit or an edit); {remedy}")
    return state


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
        """The results, checked against their sha256, recorded in the model folder's manifest when the
        run finished (a run finished before ftlab recorded it is not checked)."""
        results = self.read_json(self.results)
        recorded = self._recorded_at_finish("results_sha256")
        if recorded is not None and json_sha256(results) != recorded:
            raise FtlabError(f"{self.results} is damaged (its sha256 differs from the one recorded in "
                             f"{self.model / MANIFEST} when the run finished: a flipped bit or an edit); restore "
                             f"it, or delete it to evaluate the run's last checkpoint again (rerun the training)")
        return results

    def read_metrics(self, split: str | None = None) -> list[dict[str, Any]]:
        """The logged records in order (only those of ``split``, e.g. ``"train"`` or ``"dev"``,
        if given); a line a kill cut in half (the last) is skipped."""
        if not self.metrics.is_file():
            raise FtlabError(f"{self.metrics} not found: is {self.path} a training run folder?")
        self._check_finished_metrics()
        records = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records if split is None else [r for r in records if r.get("split") == split]

    def _check_finished_metrics(self) -> None:
        """A finished run's metrics.jsonl against the sha256 recorded in the model folder's manifest
        when the run finished (before ftlab recorded it, or while a run is going: not checked)."""
        recorded = self._recorded_at_finish("metrics_sha256") if self.results.is_file() else None
        if recorded is not None and file_sha256(self.metrics) != recorded:
            raise FtlabError(f"{self.metrics} is damaged (its sha256 differs from the one recorded in "
                             f"{self.model / MANIFEST} when the run finished: a flipped bit, a cut or an edit); "
                             f"restore it from a copy")

    def _recorded_at_finish(self, key: str) -> Any:
        """What the run recorded under ``key`` in ``model/``'s manifest when it finished (None: no
        manifest, as before ftlab recorded one, or no such key)."""
        manifest = self.model / MANIFEST
        return read_written_json(manifest).get(key) if manifest.is_file() else None

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Log ``record`` as one JSON line at the end of ``metrics.jsonl``."""
        with self.metrics.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def truncate_metrics(self, last_step: int) -> None:
        """Drop the log lines written after the checkpoint a run resumes from (``step >
        last_step``: a killed run's tail), and any line that is not a record with a step (one a
        kill cut in half); the log is rewritten atomically. No log: nothing to do."""
        if not self.metrics.exists():
            return
        keep = []
        for line in self.metrics.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line)["step"] <= last_step:
                    keep.append(line)
            except (json.JSONDecodeError, KeyError, TypeError):
                continue
        atomic_write_text(self.metrics, "".join(line + "\n" for line in keep))

    def checkpoint_step(self) -> int | None:
        """The step the last checkpoint was written at (None: no checkpoint)."""
        if not self.checkpoint_state.is_file():
            return None
        return read_written_json(self.checkpoint_state).get("step")

    def kept(self, keep: Prefer, *, dev_selection: bool) -> Prefer:
        """Which trained tensors the run's ``model/`` holds, i.e. were tested: what ``results.json``
        records as ``"model"`` once the run finished (one finished before ftlab recorded it kept the
        best dev weights where it had them); before that, what its config asks: ``keep`` where
        it selected on dev (``dev_selection``: eval_every and a dev set), else "last"."""
        if self.finished():
            model = self.read_results().get("model")
            if model in ("last", "best"):
                return model
            return "best" if self.best.exists() else "last"
        return keep if dev_selection else "last"

    def weights_file(self, prefer: Prefer, *, fallback: bool) -> Path | None:
        """The file of the run's trained tensors, by the one rule every reader states:

        * ``prefer="last"``: the last checkpoint's (``checkpoint/trainable.safetensors``, written
          at the final step of a finished run): where training ended -- dev selection may pick an
          early step (even step 0);
        * ``prefer="best"``: the dev-selected best ones (``best.safetensors``; only runs with a
          dev set and ``eval_every`` write it): what the run was evaluated with;

        and with ``fallback`` the other one when the preferred file is not there. None: neither
        (or, without ``fallback``, not the preferred one)."""
        files = {"last": self.checkpoint_weights, "best": self.best}
        if prefer not in files:
            raise ValueError(f"prefer must be 'last' or 'best', not {prefer!r}")
        order = [prefer, *([other for other in files if other != prefer] if fallback else [])]
        return next((files[name] for name in order if files[name].exists()), None)

    def final_weights(self, prefer: Prefer, *, fallback: bool) -> dict[str, torch.Tensor]:
        """The trained tensors of :meth:`weights_file` (same ``prefer`` and ``fallback`` rule), or a
        one-line error naming what is missing."""
        path = self.weights_file(prefer, fallback=fallback)
        if path is None:
            names = "best.safetensors or checkpoint/" if fallback else \
                {"last": "checkpoint/", "best": "best.safetensors"}[prefer]
            raise FtlabError(f"{self.path} holds no trained weights ({names}); is it a finished run?")
        if path == self.checkpoint_weights:  # the checkpoint's files are checked against its manifest
            verify_manifest(self.checkpoint, "restore it, or rerun the training with --overwrite")
        return read_trainable(path)

"""Resumable training state: the trainable tensors, the optimizer and scheduler state and the
loop's counters (:class:`TrainState`), written atomically as one folder so a kill never leaves a
mixed checkpoint. Every file is fsynced before it is renamed into place, and the folder after
(see :mod:`ftlab.io`), so a checkpoint that was saved also survives a power cut.

Nothing read back is trusted without a checksum: every checkpoint folder holds
``ftlab-manifest.json`` (the sha256 and size of each of its files, committed with them), checked
on every rank before a resume loads anything (:func:`verify_checkpoint`); ``best.safetensors``
carries its tensors' sha256 in its metadata (:func:`save_trainable`, checked by
:func:`load_trainable`); ``state.json`` records the id of the run's ``config.json``
(:func:`config_id`, also the trajectory log's ``run_id``), the hashes of the data the steps were
trained on and the sha256 of ``metrics.jsonl`` at the checkpoint, so a resume after any of them
was edited is refused (see ``ftlab.train``). A mismatch is one line naming the file and what to do.

The training loop keeps a run resumable through one :class:`Checkpointer`, which its
parallelism strategy (:mod:`ftlab.parallel`) picks:

==========================  ==============================================================
``TensorCheckpointer``      first order, one process or DDP: rank 0 saves the tensors and the
                            optimizer state; every rank restores them
``PerRankCheckpointer``     Local SGD over ranks: every rank's weights and optimizer state
                            (they differ inside a round), gathered into ``extra.pt``
``ShardedCheckpointer``     first-order FSDP2: whole tensors and the whole optimizer state,
                            gathered from the shards; each rank restores its own
``TrajectoryCheckpointer``  zeroth order: the trajectory log (KBs: the seeds and projected
                            gradients, :mod:`ftlab.zo.trajectory`) and the counters; a resume
                            replays the log
==========================  ==============================================================
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file
from torch import nn

from ftlab.config import TrainConfig, from_dict, to_dict
from ftlab.distributed import barrier, copy_full_into, full_tensor, gather_to_main
from ftlab.errors import FtlabError, damaged
from ftlab.io import atomic_dir, atomic_path, file_sha256, recover_dir, verify_manifest, write_manifest
from ftlab.models import trainable_parameters
from ftlab.rundir import SHA256_KEY, RunDir, read_trainable, read_written_json, tensors_sha256


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``module`` by name (a copy on CPU; whole tensors, gathered from
    every rank when the module is sharded with FSDP2 -- then every rank must call it)."""
    return {n: full_tensor(p).to("cpu", copy=True).contiguous() for n, p in trainable_parameters(module)}


def save_trainable(module: nn.Module, path: str | Path, write: bool = True) -> None:
    """Write the trainable tensors to one safetensors file (atomically and durably), with their
    sha256 in its metadata (checked by :func:`load_trainable`). A sharded module's ranks all call
    it (the tensors are gathered) and only the one with ``write`` writes."""
    state = trainable_state(module)
    if write:
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={SHA256_KEY: tensors_sha256(state)})


@torch.no_grad()
def load_trainable(module: nn.Module, path: str | Path) -> None:
    """Copy tensors saved by :func:`save_trainable` back into ``module`` (names must match),
    checked by :func:`read_trainable`."""
    state = read_trainable(path)
    params = dict(trainable_parameters(module))
    missing = [n for n in params if n not in state]
    if missing or any(n not in params for n in state):
        raise FtlabError(f"{path}: trainable tensors do not match the model (e.g. {missing[:3]}); "
                         "was it written by a run with another mode or model?")
    copy_trainable_into(module, state)


@torch.no_grad()
def copy_trainable_into(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors by name into ``module``'s trainable parameters (a sharded parameter
    takes its own rows)."""
    params = dict(trainable_parameters(module))
    for name, tensor in state.items():
        copy_full_into(params[name], tensor)


def save_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any], *, extra: Any = None,
                    trainable: dict[str, torch.Tensor] | None = None, optimizer_state: Any = None) -> None:
    """Save everything needed to continue a run exactly where it stopped (one atomic folder
    replace: a kill at any point leaves the previous or the new checkpoint, see
    :func:`ftlab.io.atomic_dir`). ``extra`` (tensors and plain values, e.g. every rank's state
    under Local SGD) goes to ``extra.pt``; ``trainable`` and ``optimizer_state`` replace the
    module's and optimizer's own (gathered in advance from sharded ranks)."""
    with atomic_dir(path) as tmp:
        save_file(trainable if trainable is not None else trainable_state(module), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer_state if optimizer_state is not None else optimizer.state_dict(),
                    "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
        if extra is not None:
            torch.save(extra, tmp / "extra.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))
        write_manifest(tmp)  # every file's sha256, checked on resume (verify_checkpoint)


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, *,
                    load_optimizer: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the loop state. A
    replace that a kill interrupted is completed (or undone) first. ``load_optimizer(state)``
    restores the saved optimizer state (default: ``optimizer.load_state_dict``)."""
    path = Path(path)
    recover_dir(path)
    load_trainable(module, path / "trainable.safetensors")
    try:
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        (load_optimizer or optimizer.load_state_dict)(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except Exception as e:  # unpickling, zip and state-dict errors have no common base
        raise damaged(path / "optimizer.pt", e) from None
    return read_written_json(path / "state.json")


def checkpoint_remedy(path: str | Path) -> str:
    """What to do about a damaged checkpoint ``path`` (the end of the one-line error)."""
    return (f"restore it, delete {path} to restart the run from step 0, or start afresh with --overwrite")


def verify_checkpoint(path: str | Path) -> None:
    """Check every file of checkpoint folder ``path`` against the sha256 and size its manifest
    recorded when it was written (a checkpoint written before manifests is taken as it is).

    Raises:
        FtlabError: one line naming the first file that differs (a flipped bit, a cut, an edit)."""
    verify_manifest(path, checkpoint_remedy(path))


def load_extra(path: str | Path) -> Any:
    """The ``extra`` a checkpoint was saved with (None if it has none)."""
    path = Path(path) / "extra.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and zip errors have no common base
        raise damaged(path, e) from None


def flush(optimizer: torch.optim.Optimizer) -> None:
    """Apply an offloaded optimizer's queued updates (a no-op for every other optimizer): call
    before reading the weights outside the model's forwards (evaluating, saving)."""
    if hasattr(optimizer, "flush"):
        optimizer.flush()


def run_id(cfg: TrainConfig) -> str:
    """A short, deterministic id of a run's config, wherever it is saved (recorded in its
    trajectory log's header and its checkpoints): :func:`config_id` of its ``config.json``."""
    return config_id(to_dict(cfg))


# Settings that change neither the weights nor the steps: where the run is, which weights model/
# keeps at the end, and where the metrics are mirrored (keep and report_to may change on
# resuming; see ftlab.train._check_output).
_NOT_IDENTITY = ("output_dir", "keep", "report_to")


def config_id(config: dict[str, Any]) -> str:
    """The id of a config as saved in a run's ``config.json`` (the JSON object, without
    ``output_dir``, ``keep`` and ``report_to``): a run's checkpoints and trajectory log are bound
    to the config they were written under by it (the file as written, so fields added to ftlab
    later change nothing)."""
    identity = {k: v for k, v in config.items() if k not in _NOT_IDENTITY}
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def _saved_config(run: RunDir) -> dict[str, Any]:
    """The run's ``config.json`` (a one-line error if it is missing or damaged)."""
    config = run.read_config()
    if not isinstance(config, dict):
        raise damaged(run.config, ValueError(f"expected a JSON object, got {type(config).__name__}"))
    return config


def saved_config_id(run: RunDir) -> str:
    """:func:`config_id` of the run's ``config.json`` as written."""
    return config_id(_saved_config(run))


def saved_config_ids(run: RunDir) -> list[str]:
    """The ids under which the run's ``config.json`` may have been recorded: first that of the file
    as written (:func:`saved_config_id`), then that of the same settings with every default filled
    in (a config.json written by an ftlab before some setting existed, or without its
    default-valued keys, is the same run)."""
    config = _saved_config(run)
    ids = [config_id(config)]
    try:
        filled = config_id(to_dict(from_dict(TrainConfig, config, str(run.config))))
    except FtlabError:
        return ids  # not a config this ftlab reads: only the file as written identifies it
    return ids if filled == ids[0] else [*ids, filled]


def check_log_config(run: RunDir, log: Any) -> None:
    """Refuse a trajectory log recorded under another config than the run's ``config.json`` (an
    edited weight_decay or LoRA alpha would replay to other weights). A log whose header has no
    run id (written by ``TrajectoryLog`` directly, without one) is not checked."""
    if not log.path.exists():
        return
    recorded = log.header.get("run_id")
    if recorded is None:
        return
    ids = saved_config_ids(run)
    if recorded not in ids:
        raise FtlabError(f"{run.config} is not the config {log.path} was recorded under (config id {ids[0]}, "
                         f"the log's {recorded}): it was edited or replaced; restore the run's config.json (a "
                         f"replay or resume under another config would build other weights), or start "
                         f"afresh with --overwrite")


def check_finite_weights(module: nn.Module, what: str) -> None:
    """Refuse trainable tensors holding NaN or inf (a diverged run) before they are saved as ``what``."""
    for name, p in trainable_parameters(module):
        t = full_tensor(p)
        if not torch.isfinite(t).all():
            raise FtlabError(f"the trained weights hold NaN or inf ({name}, {int((~torch.isfinite(t)).sum())} "
                             f"values): the run diverged and {what} was not written; lower the lr (or eps), "
                             f"then start afresh with --overwrite")


# -- the loop's counters and the checkpointers -------------------------------------------------

@dataclass
class TrainState:
    """The training loop's counters: steps done, the best dev score and its step, the
    zeroth-order steps skipped for a non-finite loss, and the parallelism strategy's own
    counters (saved as ``dp``). Saved as ``checkpoint/state.json``."""

    step: int = 0
    best_score: float | None = None
    best_step: int | None = None
    skipped: int = 0
    parallel: dict[str, Any] | None = None
    # What the steps so far were trained on (None: a checkpoint written before ftlab recorded it):
    # the config_id of config.json, and the hashes of the data's splits (saved as "config", "data");
    # and the sha256 of metrics.jsonl as it was when the checkpoint was written ("metrics").
    config: str | None = None
    data: dict[str, Any] | None = None
    metrics: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"step": self.step, "best_score": self.best_score, "best_step": self.best_step}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.parallel is not None:
            out["dp"] = self.parallel
        if self.config is not None:
            out["config"] = self.config
        if self.data is not None:
            out["data"] = self.data
        if self.metrics is not None:
            out["metrics"] = self.metrics
        return out

    @classmethod
    def from_json(cls, state: Any, path: Path) -> TrainState:
        """The counters of a checkpoint, checked (a damaged state.json is named, not a KeyError)."""
        if not (isinstance(state, dict) and isinstance(state.get("step"), int) and state["step"] >= 0
                and "best_score" in state and "best_step" in state):
            raise damaged(path, ValueError("expected an object with step, best_score and best_step"))
        return cls(state["step"], state["best_score"], state["best_step"], state.get("skipped", 0), state.get("dp"),
                   state.get("config"), state.get("data"), state.get("metrics"))


class Checkpointer:
    """Keeps a run resumable in ``run.checkpoint``. Every rank calls every method; only rank 0
    (``main``) writes. Subclasses say what is saved (:meth:`_save`) and restored (:meth:`_load`,
    or only how the optimizer state is: :meth:`_optimizer_loader`)."""

    def __init__(self, run: RunDir, main: bool) -> None:
        self.run, self.main = run, main

    def resume(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
        """Restore the last checkpoint, if any (every rank from rank 0's files); returns the counters."""
        if self.main:
            recover_dir(self.run.checkpoint)  # finish or undo a checkpoint replace a kill interrupted
        barrier()
        if self.run.checkpoint_state.exists():  # (no state.json, e.g. deleted: no checkpoint, the run restarts)
            verify_checkpoint(self.run.checkpoint)  # every rank: each raises alike rather than wait for rank 0
        return self._load(module, optimizer, scheduler)

    def record(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called after every step (the trajectory log takes the step's record)."""

    def save(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
        flush(optimizer)
        if self.main and self.run.metrics.exists():  # checked on resume, once the log is cut back to the checkpoint
            state.metrics = file_sha256(self.run.metrics)
        self._save(module, optimizer, scheduler, state)

    def _load(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
        """The checkpoint's tensors, optimizer and scheduler state and counters (fresh counters
        where no checkpoint was written yet)."""
        if not self.run.checkpoint_state.exists():
            return TrainState()
        state = load_checkpoint(self.run.checkpoint, module, optimizer, scheduler,
                                load_optimizer=self._optimizer_loader(module, optimizer))
        return TrainState.from_json(state, self.run.checkpoint_state)

    def _optimizer_loader(self, module: nn.Module, optimizer: torch.optim.Optimizer
                          ) -> Callable[[dict[str, Any]], None] | None:
        """How the saved optimizer state is restored (None: ``optimizer.load_state_dict``)."""
        return None

    def _save(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
        raise NotImplementedError


class TensorCheckpointer(Checkpointer):
    """First order, one process or DDP (the ranks agree): rank 0 saves the trainable tensors and
    the optimizer and scheduler state."""

    def _save(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
        if self.main:
            save_checkpoint(self.run.checkpoint, module, optimizer, scheduler, state.to_json())


class PerRankCheckpointer(Checkpointer):
    """Local SGD over ranks: each rank's weights and optimizer state are gathered into
    ``extra.pt`` (rank 0's are also the checkpoint's own); each rank restores its own."""

    def __init__(self, run: RunDir, main: bool, rank: int) -> None:
        super().__init__(run, main)
        self.rank = rank

    def _save(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
        ranks = gather_to_main({"trainable": trainable_state(module), "optimizer": optimizer.state_dict()})
        if self.main:
            save_checkpoint(self.run.checkpoint, module, optimizer, scheduler, state.to_json(), extra={"ranks": ranks})

    def _load(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
        state = super()._load(module, optimizer, scheduler)
        if state.step > 0:
            extra = load_extra(self.run.checkpoint)
            if not extra or "ranks" not in extra or self.rank >= len(extra["ranks"]):
                raise FtlabError("the checkpoint holds no per-rank Local SGD state for this number of processes; "
                                 "resume with the same torchrun --nproc_per_node, or start afresh with --overwrite")
            mine = extra["ranks"][self.rank]
            copy_trainable_into(module, mine["trainable"])
            optimizer.load_state_dict(mine["optimizer"])
        return state


class ShardedCheckpointer(Checkpointer):
    """First-order FSDP2: the whole tensors and the whole optimizer state, gathered from every
    rank's shards (a collective) and written by rank 0; on resume each rank keeps its own shard."""

    def _save(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        trainable = trainable_state(module)
        optimizer_state = get_optimizer_state_dict(module, optimizer,
                                                   options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.main:
            save_checkpoint(self.run.checkpoint, module, optimizer, scheduler, state.to_json(), trainable=trainable,
                            optimizer_state=optimizer_state)

    def _optimizer_loader(self, module: nn.Module, optimizer: torch.optim.Optimizer
                          ) -> Callable[[dict[str, Any]], None]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        def load_optimizer(saved: dict[str, Any]) -> None:  # each rank keeps its shard of the whole state
            set_optimizer_state_dict(module, optimizer, saved, options=StateDictOptions(full_state_dict=True))
        return load_optimizer


class TrajectoryCheckpointer(Checkpointer):
    """Zeroth order: the trajectory log (:class:`ftlab.zo.trajectory.TrajectoryLog`, appended
    every step) is the checkpoint, with the counters in ``checkpoint/state.json``; a resume
    replays the log up to the checkpoint. The log's header records how z is made (a replay with
    other settings is refused) and the run (a hash of its config: identical runs write
    identical logs)."""

    def __init__(self, run: RunDir, main: bool, cfg: TrainConfig, optimizer: torch.optim.Optimizer) -> None:
        from ftlab.zo.trajectory import TrajectoryLog

        super().__init__(run, main)
        # The id of config.json as written (an older run's lacks fields added since: its id is the file's).
        rid = saved_config_id(run) if run.config.exists() else run_id(cfg)
        self.log = TrajectoryLog(run.path, run_id=rid, z=optimizer.z_spec())

    def _load(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any) -> TrainState:
        from ftlab.zo.trajectory import replay

        path = self.run.checkpoint_state
        state = TrainState.from_json(read_written_json(path), path) if path.exists() else TrainState()
        if self.run.config.exists():
            check_log_config(self.run, self.log)
        # Replay (which checks the log against this run's seeds) before touching the file, so a
        # corrupted or foreign log is reported and left as it is. Up to the checkpoint only: another
        # rank may read the log before or after rank 0 truncates it.
        done = replay(self.log, optimizer, scheduler, steps=state.step, allow_torn_tail=True)
        if done != state.step:
            raise FtlabError(f"{self.log.path} holds {done} steps but the checkpoint is at step {state.step}: "
                             "the log was cut or replaced; restore it, or start afresh with --overwrite")
        if self.main:
            self.log.truncate(state.step)  # steps after the checkpoint are redone, identically
        return state

    def record(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        done = optimizer.history.pop()
        if self.main:
            self.log.append(step, done)

    def _save(self, module: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, state: TrainState) -> None:
        if self.main:
            self.log.sync()
            with atomic_dir(self.run.checkpoint) as tmp:
                (tmp / "state.json").write_text(json.dumps(state.to_json(), indent=2))
                write_manifest(tmp)

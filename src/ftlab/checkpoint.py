"""Resumable training state: the trainable tensors, the optimizer and scheduler state and the
loop's counters, written atomically as one folder so a kill never leaves a mixed checkpoint.
Every file is fsynced before it is renamed into place, and the folder after (see
:mod:`ftlab.io`), so a checkpoint that was saved also survives a power cut."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftlab.distributed import copy_full_into, full_tensor
from ftlab.errors import FtlabError, damaged
from ftlab.io import atomic_dir, atomic_path, recover_dir
from ftlab.models import trainable_parameters


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``module`` by name (a copy on CPU; whole tensors, gathered from
    every rank when the module is sharded with FSDP2 -- then every rank must call it)."""
    return {n: full_tensor(p).to("cpu", copy=True).contiguous() for n, p in trainable_parameters(module)}


def save_trainable(module: nn.Module, path: str | Path, write: bool = True) -> None:
    """Write the trainable tensors to one safetensors file (atomically and durably). A sharded
    module's ranks all call it (the tensors are gathered) and only the one with ``write`` writes."""
    state = trainable_state(module)
    if write:
        with atomic_path(path) as tmp:
            save_file(state, str(tmp))


@torch.no_grad()
def load_trainable(module: nn.Module, path: str | Path) -> None:
    """Copy tensors saved by :func:`save_trainable` back into ``module`` (names must match)."""
    try:
        state = load_file(str(path))
    except Exception as e:  # safetensors' errors (bad header, truncated file) have no common base
        raise damaged(path, e) from None
    params = dict(trainable_parameters(module))
    missing = [n for n in params if n not in state]
    if missing or any(n not in params for n in state):
        raise FtlabError(f"{path}: trainable tensors do not match the model (e.g. {missing[:3]}); "
                         "was it written by a run with another mode or model?")
    for name, tensor in state.items():
        copy_full_into(params[name], tensor)  # a sharded parameter takes its own rows


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


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the loop state. A
    replace that a kill interrupted is completed (or undone) first."""
    path = Path(path)
    recover_dir(path)
    load_trainable(module, path / "trainable.safetensors")
    try:
        saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
    except Exception as e:  # unpickling, zip and state-dict errors have no common base
        raise damaged(path / "optimizer.pt", e) from None
    try:
        return json.loads((path / "state.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise damaged(path / "state.json", e) from None


def load_extra(path: str | Path) -> Any:
    """The ``extra`` a checkpoint was saved with (None if it has none)."""
    path = Path(path) / "extra.pt"
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unpickling and zip errors have no common base
        raise damaged(path, e) from None

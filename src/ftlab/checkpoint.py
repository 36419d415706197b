"""Resumable training state: the trainable tensors, the optimizer and scheduler state and the
loop's counters, written atomically as one folder so a kill never leaves a mixed checkpoint."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ftlab.errors import FtlabError
from ftlab.io import atomic_dir
from ftlab.models import trainable_parameters


def trainable_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors of ``module`` by name (a copy on CPU)."""
    return {n: p.detach().to("cpu", copy=True).contiguous() for n, p in trainable_parameters(module)}


def save_trainable(module: nn.Module, path: str | Path) -> None:
    """Write the trainable tensors to one safetensors file (atomically)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(trainable_state(module), str(tmp))
    tmp.replace(path)


@torch.no_grad()
def load_trainable(module: nn.Module, path: str | Path) -> None:
    """Copy tensors saved by :func:`save_trainable` back into ``module`` (names must match)."""
    state = load_file(str(path))
    params = dict(trainable_parameters(module))
    missing = [n for n in params if n not in state]
    if missing or any(n not in params for n in state):
        raise FtlabError(f"{path}: trainable tensors do not match the model (e.g. {missing[:3]}); "
                         "was it written by a run with another mode or model?")
    for name, tensor in state.items():
        params[name].copy_(tensor)


def save_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, state: dict[str, Any]) -> None:
    """Save everything needed to continue a run exactly where it stopped."""
    with atomic_dir(path) as tmp:
        save_file(trainable_state(module), str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()},
                   tmp / "optimizer.pt")
        (tmp / "state.json").write_text(json.dumps(state, indent=2))


def load_checkpoint(path: str | Path, module: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint`; returns the loop state."""
    path = Path(path)
    load_trainable(module, path / "trainable.safetensors")
    saved = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    return json.loads((path / "state.json").read_text())

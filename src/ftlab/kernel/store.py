"""Kernel folders: a JSON manifest, resumable partial state, and the finished kernel.

Layout of a kernel folder::

    manifest.json        what the kernel is (model, task, example ids and labels, parameters,
                         output, projection) and whether it is complete
    partial.safetensors  running sums / features, with the number of finished units
                         (parameter blocks or example chunks) in its metadata
    kernel.safetensors   sgd, sign (rows x train x O x O), f0 (rows x O), readout (C x O)

Every file is written to a temporary name and renamed, so a kill leaves either the previous
state or the new one; a rerun with the same manifest resumes after the last finished unit.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save
from torch import Tensor

from ftlab.errors import FtlabError
from ftlab.io import atomic_file, atomic_write_json
from ftlab.runs import check_settings

FORMAT = "ftlab-kernel/1"
MANIFEST, PARTIAL, KERNEL = "manifest.json", "partial.safetensors", "kernel.safetensors"
# Manifest keys that say *which* data and model a kernel belongs to (checked by load_kernel).
IDENTITY_KEYS = ("identity", "task", "options", "train_ids", "test_ids")


def _write_tensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    with atomic_file(path, "wb") as f:
        f.write(save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


@dataclass
class KernelData:
    """A finished kernel: its manifest and tensors (``sgd``, ``sign``, ``f0``, ``readout``)."""

    manifest: dict[str, Any]
    tensors: dict[str, Tensor]

    @property
    def n_train(self) -> int:
        return len(self.manifest["train_ids"])

    def train(self, kind: str) -> Tensor:
        """Train x train blocks ``(N, N, O, O)`` of kernel ``kind`` (``"sgd"`` or ``"sign"``)."""
        return self._kernel(kind)[: self.n_train]

    def test(self, kind: str) -> Tensor:
        """Test x train blocks ``(M, N, O, O)``."""
        return self._kernel(kind)[self.n_train:]

    def _kernel(self, kind: str) -> Tensor:
        if kind not in ("sgd", "sign"):
            raise FtlabError(f"kernel kind must be 'sgd' or 'sign', got {kind!r}")
        return self.tensors[kind]

    @property
    def f0_train(self) -> Tensor:
        return self.tensors["f0"][: self.n_train]

    @property
    def f0_test(self) -> Tensor:
        return self.tensors["f0"][self.n_train:]

    @property
    def y_train(self) -> Tensor:
        return torch.tensor(self.manifest["train_labels"])

    @property
    def y_test(self) -> Tensor:
        return torch.tensor(self.manifest["test_labels"])


class PartialState:
    """Running tensors of an unfinished kernel and how many units are done."""

    def __init__(self, path: Path, tensors: dict[str, Tensor], done: int, unit: str) -> None:
        self.path, self.tensors, self.done, self.unit = path, tensors, done, unit

    def save(self, done: int) -> None:
        """Record that ``done`` units are finished (atomically, with the tensors)."""
        self.done = done
        _write_tensors(self.path, self.tensors, {"done": str(done), "unit": self.unit})


class KernelStore:
    """One kernel folder; refuses a folder whose manifest describes another kernel."""

    def __init__(self, folder: str | Path, manifest: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.manifest = json.loads(json.dumps({"format": FORMAT, **manifest}))  # JSON-normalised
        path = self.folder / MANIFEST
        if path.exists():
            check_settings(self.folder, "kernel", read_manifest(self.folder), self.manifest, ignore=("complete",))
        else:
            atomic_write_json(path, {**self.manifest, "complete": False})

    def complete(self) -> bool:
        return (self.folder / KERNEL).exists() and read_manifest(self.folder).get("complete", False)

    def partial(self, init: dict[str, Tensor], unit: str) -> PartialState:
        """The saved partial state, or ``init`` (nothing done) if there is none."""
        path = self.folder / PARTIAL
        if not path.exists():
            return PartialState(path, init, 0, unit)
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
        if meta.get("unit") != unit or set(tensors) != set(init) or any(
                tensors[k].shape != init[k].shape for k in init):
            raise FtlabError(f"{path} does not match this computation; delete it to start the kernel afresh")
        return PartialState(path, tensors, int(meta["done"]), unit)

    def finish(self, tensors: dict[str, Tensor]) -> KernelData:
        """Write the finished kernel, mark the manifest complete, drop the partial state."""
        _write_tensors(self.folder / KERNEL, tensors)
        atomic_write_json(self.folder / MANIFEST, {**self.manifest, "complete": True})
        (self.folder / PARTIAL).unlink(missing_ok=True)
        return KernelData(self.manifest, tensors)

    def load(self) -> KernelData:
        return KernelData(self.manifest, load_file(str(self.folder / KERNEL)))


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a kernel folder."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        raise FtlabError(f"{path} not found: {folder} is not a kernel folder (make one with `ftlab kernel compute`)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise FtlabError(f"{path} is not valid JSON ({e}); recompute the kernel") from e
    if manifest.get("format") != FORMAT:
        raise FtlabError(f"{path}: unknown kernel format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def load_kernel(folder: str | Path, expect: dict[str, Any] | None = None) -> KernelData:
    """A finished kernel; ``expect`` (manifest keys -> values, e.g. ``{"identity": {...},
    "train_ids": [...]}``) must match, so a kernel of another model, task or split is refused."""
    manifest = read_manifest(folder)
    if not manifest.get("complete") or not (Path(folder) / KERNEL).exists():
        raise FtlabError(f"{folder} holds an unfinished kernel; rerun the same `ftlab kernel compute` to finish it")
    for key, want in (expect or {}).items():
        have = manifest.get(key)
        if key == "identity":
            bad = {k: (have.get(k), v) for k, v in want.items() if have.get(k) != v}
            if bad:
                k, (h, w) = next(iter(bad.items()))
                raise FtlabError(f"{folder} was computed for {k}={h!r}, not {w!r}; compute a kernel for this "
                                 "model/task/split")
        elif have != json.loads(json.dumps(want)):
            raise FtlabError(f"{folder} was computed for other {key} than requested; compute a kernel for "
                             "this model/task/split")
    return KernelData(manifest, load_file(str(Path(folder) / KERNEL)))

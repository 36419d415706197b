"""A resumable feature store: one folder per (model, task, split, feature kind).

Layout (the root is an ftlab run folder of kind ``probe``)::

    <root>/model.json                      the model's name and a fingerprint of its weights
    <root>/<task>/<split>/<kind>/meta.json what the rows are: template, example ids, words, layer
    <root>/<task>/<split>/<kind>/chunk-00000.npy ... float32 rows, each file written atomically

A chunk is written whole or not at all, so after a kill the store holds the chunks before it and
a rerun continues with the next. A store of another model (name or weights), or a folder of the
same task and split name holding other examples, other words or another layer, is refused in one
line: features of different things must never be mixed.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.io import atomic_path, atomic_write_json

_CHUNK = re.compile(r"chunk-(\d{5})\.npy")


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's shapes and of a slice of its first and last tensors: two models
    with the same name but other weights (a fine-tuned copy) get other fingerprints."""
    h = hashlib.sha256()
    params = [p for _, p in model.named_parameters()]
    for p in params:
        h.update(f"{tuple(p.shape)}".encode())
    for p in (params[0], params[-1]):
        h.update(p.detach().reshape(-1)[:4096].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(text).name if "/" in text else text)[:80] or "task"


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        return data
    except (OSError, ValueError) as e:
        raise FtlabError(f"{path}: damaged feature-store file ({e}); delete that folder to recompute it") from None


class FeatureStore:
    """The root of a store, bound to one model (checked on open)."""

    def __init__(self, root: str | Path, model_name: str, fingerprint: str) -> None:
        self.root = Path(root)
        self.model = {"model": model_name, "fingerprint": fingerprint}
        path = self.root / "model.json"
        if path.exists():
            old = _read(path)
            if old != self.model:
                what = "model" if old.get("model") != model_name else "weights"
                raise FtlabError(f"{self.root} holds features of model {old.get('model')!r} "
                                 f"(fingerprint {old.get('fingerprint')}), not {model_name!r} ({fingerprint}): "
                                 f"other {what}; use another store folder")
        else:
            atomic_write_json(path, self.model)

    def table(self, task: str, split: str, kind: str, meta: dict[str, Any]) -> "FeatureTable":
        return FeatureTable(self.root / _slug(task) / split / kind, {"task": task, "split": split,
                                                                      "kind": kind, **meta})


class FeatureTable:
    """The rows of one (task, split, kind): ``done`` rows so far, ``append`` a chunk, ``load`` all."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = folder
        meta = json.loads(json.dumps(meta))  # JSON types, so the comparison below is exact
        path = folder / "meta.json"
        if path.exists():
            old = _read(path)
            diff = sorted(k for k in set(old) | set(meta) if old.get(k) != meta.get(k))
            if diff:
                raise FtlabError(f"{folder} holds {old.get('kind')} features of other {', '.join(diff)} "
                                 f"(split {old.get('split')!r}: {old.get('n')} examples, ids "
                                 f"{str(old.get('ids_sha256'))[:12]}); use another store folder or split name")
        else:
            atomic_write_json(path, meta)
        self.meta = meta

    def chunks(self) -> list[Path]:
        """The complete chunk files, in order (stops at the first gap)."""
        found = sorted((int(m.group(1)), p) for p in self.folder.glob("chunk-*.npy")
                       if (m := _CHUNK.fullmatch(p.name)))
        out = []
        for i, (number, p) in enumerate(found):
            if number != i:
                break
            out.append(p)
        return out

    @property
    def done(self) -> int:
        return sum(np.load(p, mmap_mode="r").shape[0] for p in self.chunks())

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32))
        if not np.isfinite(rows).all():
            raise FtlabError(f"{self.folder}: non-finite features (NaN/inf) at rows {self.done}+; check the model")
        with atomic_path(self.folder / f"chunk-{len(self.chunks()):05d}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, rows)

    def load(self) -> np.ndarray:
        parts = [np.load(p) for p in self.chunks()]
        n = self.meta.get("n")
        rows = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        if n is not None and rows.shape[0] != n:
            raise FtlabError(f"{self.folder}: holds {rows.shape[0]} of {n} rows; rerun the command to finish it")
        return rows


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()

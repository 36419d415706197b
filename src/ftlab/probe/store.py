"""A resumable feature store: one folder per (model, task, split, feature kind).

Layout (the root is an ftlab run folder of kind ``probe``)::

    <root>/model.json                      the model's name and a fingerprint of its weights
    <root>/<task>/<split>/<kind>/meta.json what the rows are: template, example ids, words, layer
    <root>/<task>/<split>/<kind>/chunk-00000.npy ... float32 rows, each file written atomically
    <root>/<task>/<split>/<kind>/chunks.json the chunks written so far: rows, bytes, CRC-32, SHA-256

A chunk is written whole or not at all, and only then listed in ``chunks.json`` (rewritten
atomically), so after a kill the store holds the listed chunks and a rerun continues with the
next; a chunk file not listed (or listed after a missing one) is recomputed and overwritten. A
listed chunk is checked before it is used: its size when the rows are counted, its CRC-32 (see
:func:`ftlab.io.checksums`) and then its dtype and shape when it is read (``np.load`` never
unpickles), so a truncated, replaced or bit-flipped chunk is a one-line error naming it, never a
traceback or silently different features. A store of another model (name or weights), or a
folder of the same task and split name holding other examples, other words or another layer, is
refused in one line: features of different things must never be mixed.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from ftlab.errors import FtlabError
from ftlab.io import atomic_file, atomic_write_json, checksum_to_check, checksums, file_digest

CHUNKS = "chunks.json"


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

    def _listed(self) -> list[dict[str, Any]]:
        """The chunk records of ``chunks.json`` (none before the first chunk), each checked."""
        path = self.folder / CHUNKS
        if not path.exists():
            return []
        records = _read(path).get("chunks")
        if not isinstance(records, list):
            raise FtlabError(f"{path}: damaged feature-store file (no list 'chunks'); delete {self.folder} "
                             f"to recompute it")
        for i, record in enumerate(records):
            if not _is_record(record, i):
                raise FtlabError(f"{path}: damaged feature-store file (chunks[{i}] = {str(record)[:60]}); "
                                 f"delete {self.folder} to recompute it")
        return records

    def _present(self) -> list[dict[str, Any]]:
        """The listed chunks up to the first missing file, each of the size it was written with."""
        out = []
        for record in self._listed():
            file = self.folder / record["file"]
            if not file.exists():
                break
            if file.stat().st_size != record["bytes"]:
                raise FtlabError(f"feature chunk {file} has {file.stat().st_size} bytes, not the {record['bytes']} "
                                 f"it was written with (truncated or replaced); delete it and rerun the command "
                                 f"to recompute it")
            out.append(record)
        return out

    def chunks(self) -> list[Path]:
        """The complete chunk files, in order (stops at the first missing one)."""
        return [self.folder / record["file"] for record in self._present()]

    @property
    def done(self) -> int:
        return sum(record["rows"] for record in self._present())

    def append(self, rows: torch.Tensor | np.ndarray) -> None:
        rows = np.ascontiguousarray(np.asarray(rows, dtype=np.float32))
        if not np.isfinite(rows).all():
            raise FtlabError(f"{self.folder}: non-finite features (NaN/inf) at rows {self.done}+; check the model")
        present = self._present()
        buffer = io.BytesIO()
        np.save(buffer, rows)
        raw = buffer.getvalue()
        name = f"chunk-{len(present):05d}.npy"
        with atomic_file(self.folder / name, "wb") as f:
            f.write(raw)
        record = {"file": name, "rows": rows.shape[0], "bytes": len(raw), **checksums(raw)}
        atomic_write_json(self.folder / CHUNKS, {"chunks": [*present, record]})

    def _load_chunk(self, record: dict[str, Any]) -> np.ndarray:
        """One chunk's rows, after its checksum; a one-line error naming it otherwise."""
        file = self.folder / record["file"]
        kind = checksum_to_check(record)
        if kind is not None and file_digest(file, kind) != record[kind]:
            raise FtlabError(f"feature chunk {file} does not match its checksum ({kind}; corrupted on disk or in "
                             f"a copy); delete it and rerun the command to recompute it")
        try:
            rows = np.load(file, allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise FtlabError(f"feature chunk {file} is unreadable ({str(e).splitlines()[0][:100]}); delete it and "
                             f"rerun the command to recompute it") from None
        if rows.dtype != np.float32 or rows.ndim != 2 or rows.shape[0] != record["rows"]:
            raise FtlabError(f"feature chunk {file} holds {rows.dtype} rows of shape {rows.shape}, not "
                             f"{record['rows']} float32 rows; delete it and rerun the command to recompute it")
        return rows

    def load(self) -> np.ndarray:
        parts = [self._load_chunk(record) for record in self._present()]
        if len({p.shape[1] for p in parts}) > 1:
            raise FtlabError(f"{self.folder}: chunks of {sorted({p.shape[1] for p in parts})} features each; "
                             f"delete that folder to recompute it")
        n = self.meta.get("n")
        rows = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
        if n is not None and rows.shape[0] != n:
            raise FtlabError(f"{self.folder}: holds {rows.shape[0]} of {n} rows; rerun the command to finish it")
        return rows


def _is_record(record: Any, i: int) -> bool:
    """An entry of ``chunks.json``: chunk ``i``'s file name, its row and byte counts, its checksums."""
    def count(x: Any) -> bool:
        return isinstance(x, int) and not isinstance(x, bool) and x >= 0

    return (isinstance(record, dict) and record.get("file") == f"chunk-{i:05d}.npy" and count(record.get("rows"))
            and count(record.get("bytes")) and count(record.get("crc32"))
            and isinstance(record.get("sha256"), str))


def ids_digest(ids: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode()).hexdigest()

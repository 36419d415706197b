"""Feature datastores: memory-mapped float16/float32 shards described by a JSON manifest.

Layout of a datastore folder::

    manifest.json            model, checkpoint, grad_type, dim, dtype, projection, shard list, complete
    shard-00000.bin          rows x dim raw little-endian values (no header: the manifest has the shape)
    shard-00000.ids.json     the ids of those rows, in order
    ...

Kill safety: a shard's ids file and data file are each written to a temp name, fsynced and
renamed, and only then is the manifest (rewritten atomically) extended to list them. After a
kill the manifest lists exactly the durable shards; anything else is an orphan that the resumed
writer overwrites. Reopening a :class:`DatastoreWriter` on the same folder resumes: ``done_ids()``
says which examples to skip and rows for them are never written twice.

Integrity: the manifest is validated field by field (a malformed one is a one-line error naming
the manifest and the field; shard file names must be plain names inside the folder). Readers
check every shard's size when the store is opened, and each shard's content against its
checksum before its first row is read (CRC-32, 2-4 GB/s: see :meth:`Datastore.open`), so a
truncated, replaced or bit-flipped shard is reported, never silently read. Each shard carries a
CRC-32 (the fast check) and a SHA-256 (:meth:`Datastore.verify`), and its ids a SHA-256 checked
whenever they are read (on open): a swapped or replaced id is reported, never scored as the
wrong example.

Row ``i`` of a store is ``ids[i]``: ids are kept per shard in shard order, and merges keep (or
re-establish, with ``order``) that mapping exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ftlab.config import needs, rule_of, setting
from ftlab.distributed import barrier, init_from_env
from ftlab.errors import FtlabError
from ftlab.grads.projection import ProjectionSpec
from ftlab.io import atomic_file, atomic_write_json, checksum_to_check, checksums, file_digest
from ftlab.runs import check_settings

MANIFEST = "manifest.json"
DTYPES = ("float16", "float32")
FORMAT_VERSION = 1
# Manifest fields that say what the features are; stores are comparable only when they agree.
IDENTITY = ("model", "checkpoint", "grad_type", "dim", "dtype", "projection")


# The manifest's fields are checked by the rules declared with them (ftlab.config.setting), here
# strictly as JSON values (an int is not a bool or a float): both when a manifest is read
# (:func:`_parse_manifest`, each fault naming the file and the field) and when one is built.
def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@needs("a string")
def _text(x: Any) -> bool:
    return isinstance(x, str)


@needs("a positive integer")
def _positive_int(x: Any) -> bool:
    return _is_int(x) and x >= 1


@needs("a non-negative integer")
def _count(x: Any) -> bool:
    return _is_int(x) and x >= 0


@needs("an integer")
def _integer(x: Any) -> bool:
    return _is_int(x)


@needs(f"one of {', '.join(DTYPES)}")
def _storage_dtype(x: Any) -> bool:
    return x in DTYPES


@needs("an object or null")
def _object_or_null(x: Any) -> bool:
    return x is None or isinstance(x, dict)


@needs("an object")
def _object(x: Any) -> bool:
    return isinstance(x, dict)


@needs("a list")
def _list(x: Any) -> bool:
    return isinstance(x, list)


@needs("true or false")
def _flag(x: Any) -> bool:
    return isinstance(x, bool)


@needs("a plain file name inside the datastore folder")
def _plain_name(name: Any) -> bool:
    """A file name that stays inside the folder: no separator, not absolute, not ``.``/``..``."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name) and not (os.altsep and os.altsep in name))


@needs("a 32-bit unsigned integer")
def _crc32(x: Any) -> bool:
    return _is_int(x) and 0 <= x < 1 << 32


@needs("64 lowercase hex digits")
def _sha256(x: Any) -> bool:
    return isinstance(x, str) and len(x) == 64 and all(c in "0123456789abcdef" for c in x)


@dataclass
class DatastoreManifest:
    """What a datastore holds (serialised to ``manifest.json``).

    Attributes:
        model: the model the features come from (name or path).
        checkpoint: the checkpoint they were taken at (e.g. ``"epoch-1"``).
        grad_type: ``"adam"`` (Adam-preconditioned) or ``"sgd"`` (plain gradients), or another label.
        dim: feature dimension (the projection's ``dim_out``).
        dtype: storage dtype, ``"float16"`` or ``"float32"``.
        projection: the :class:`ProjectionSpec` as a dict (``None`` for unprojected features).
        extra: free-form metadata (e.g. the checkpoint's mean learning rate).
        shards: ``{"file", "ids", "rows", "bytes", "crc32", "sha256", "ids_sha256"}`` per shard,
            in row order (stores written before ``crc32`` was added are checked with their
            ``sha256``, and their ids files unchecked; see :class:`ShardRecord`).
        complete: ``True`` once the writer was closed; readers refuse an incomplete store.
    """

    model: str = setting(check=_text)
    checkpoint: str = setting(check=_text)
    grad_type: str = setting(check=_text)
    dim: int = setting(check=_positive_int)
    dtype: str = setting("float16", check=_storage_dtype)
    projection: dict[str, Any] | None = setting(None, check=_object_or_null)
    extra: dict[str, Any] = setting(factory=dict, check=_object)
    shards: list[dict[str, Any]] = setting(factory=list, check=_list)
    complete: bool = setting(False, check=_flag)
    version: int = setting(FORMAT_VERSION, check=_integer)

    def __post_init__(self) -> None:
        if isinstance(self.projection, ProjectionSpec):
            self.projection = self.projection.to_dict()
        for f in dataclasses.fields(self):
            ok, need = rule_of(f)
            value = getattr(self, f.name)
            if not ok(value):
                raise FtlabError(f"datastore {f.name} must be {need}, got {value!r}")
        if self.projection is not None and self.projection.get("dim_out", self.dim) != self.dim:
            raise FtlabError(f"datastore dim={self.dim} differs from the projection's dim_out="
                             f"{self.projection['dim_out']}")

    @property
    def rows(self) -> int:
        """Number of rows in the listed shards."""
        return sum(s["rows"] for s in self.shards)

    def identity(self) -> dict[str, Any]:
        """The fields that define what the features are (see ``IDENTITY``)."""
        return {k: getattr(self, k) for k in IDENTITY}

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "DatastoreManifest":
        """Inverse of :meth:`to_dict`."""
        names = {f.name for f in dataclasses.fields(cls)}
        if d.get("version", FORMAT_VERSION) > FORMAT_VERSION or set(d) - names:
            raise FtlabError(f"datastore manifest version {d.get('version')} with fields {sorted(set(d) - names)} "
                             f"is newer than this ftlab (version {FORMAT_VERSION}); upgrade ftlab")
        return cls(**d)


@dataclass
class ShardRecord:
    """The fields of one entry of ``DatastoreManifest.shards`` (entries stay plain dicts in the
    manifest; this class declares their rules). ``crc32``, ``sha256`` and ``ids_sha256`` may be absent
    (older stores). ``ids_sha256`` covers the ids file: without it, a swap of two ids (in every
    checkpoint's store alike) would pin rows to the wrong examples unnoticed."""

    file: str = setting(check=_plain_name)
    ids: str = setting(check=_plain_name)
    rows: int = setting(check=_count)
    bytes: int = setting(check=_count)
    crc32: int | None = setting(None, check=_crc32)
    sha256: str | None = setting(None, check=_sha256)
    ids_sha256: str | None = setting(None, check=_sha256)


# Manifest fields a manifest file may leave out (they take the dataclass default).
_MAY_BE_ABSENT = ("projection", "extra", "version")


def _bad_field(file: Path, field: str, must: str, value: Any) -> FtlabError:
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    return FtlabError(f"{file}: field {field!r} must be {must}, got {shown}; the manifest is damaged: "
                      f"delete the folder and rewrite the datastore")


def _check_fields(file: Path, d: dict[str, Any], cls: type, may_be_absent: Sequence[str],
                  where: str = "") -> None:
    """Check the values of ``d`` by the rules of ``cls``'s fields (see :func:`ftlab.config.setting`)."""
    for f in dataclasses.fields(cls):
        key = f.name
        if key not in d:
            if key not in may_be_absent:
                raise FtlabError(f"{file}: field {where + key!r} is missing; the manifest is damaged: delete the "
                                 f"folder and rewrite the datastore")
            continue
        ok, must = rule_of(f)
        if not ok(d[key]):
            raise _bad_field(file, where + key, must, d[key])


def _parse_manifest(file: Path, d: Any) -> DatastoreManifest:
    """The manifest in ``d`` (parsed JSON), every field checked; a one-line error naming
    ``file`` and the field otherwise."""
    if not isinstance(d, dict):
        raise FtlabError(f"{file} is not a datastore manifest (a JSON {type(d).__name__}, not an object); "
                         f"delete the folder and rewrite it")
    version = d.get("version", FORMAT_VERSION)
    unknown = sorted(set(d) - {f.name for f in dataclasses.fields(DatastoreManifest)})
    if (_is_int(version) and version > FORMAT_VERSION) or unknown:
        raise FtlabError(f"{file}: datastore manifest version {version} with fields {unknown} is newer than this "
                         f"ftlab (version {FORMAT_VERSION}); upgrade ftlab")
    _check_fields(file, d, DatastoreManifest, _MAY_BE_ABSENT)
    seen: dict[str, int] = {}
    for k, shard in enumerate(d["shards"]):
        if not isinstance(shard, dict):
            raise _bad_field(file, f"shards[{k}]", "an object", shard)
        _check_fields(file, shard, ShardRecord, ("crc32", "sha256", "ids_sha256"), f"shards[{k}].")
        for key in ("file", "ids"):
            if seen.setdefault(shard[key], k) != k:
                raise FtlabError(f"{file}: field 'shards[{k}].{key}' names {shard[key]!r}, already used by shard "
                                 f"{seen[shard[key]]}; the manifest is damaged: delete the folder and rewrite it")
    if isinstance(d.get("projection"), dict) and not _is_int(d["projection"].get("dim_out", d["dim"])):
        raise _bad_field(file, "projection.dim_out", "an integer", d["projection"]["dim_out"])
    try:
        return DatastoreManifest.from_dict(d)
    except FtlabError as e:
        raise FtlabError(f"{file}: {e}") from None


def _read_manifest(path: Path) -> DatastoreManifest | None:
    file = path / MANIFEST
    if not file.exists():
        return None
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FtlabError(f"{file} is not a datastore manifest ({e}); delete the folder and rewrite it") from None
    return _parse_manifest(file, d)


def _itemsize(dtype: str) -> int:
    return np.dtype(dtype).itemsize


def _check_shard(path: Path, shard: dict[str, Any], dim: int, dtype: str) -> None:
    """Raise if the shard's data file is missing or its size disagrees with the manifest."""
    file = path / shard["file"]
    want = shard["rows"] * dim * _itemsize(dtype)
    if not file.exists():
        raise FtlabError(f"datastore shard {file} is missing; delete {path} and rewrite the datastore")
    got = file.stat().st_size
    if got != want or shard["bytes"] != want:
        raise FtlabError(f"datastore shard {file} has {got} bytes but the manifest says {shard['rows']} rows "
                         f"x {dim} x {dtype} = {want} (truncated or replaced); delete {path} and rewrite it")


def _read_ids(path: Path, shard: dict[str, Any]) -> list[str]:
    file = path / shard["ids"]
    try:
        ids = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FtlabError(f"datastore ids file {file} is unreadable ({e}); delete {path} and rewrite it") from None
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise FtlabError(f"datastore ids file {file} is not a JSON list of strings; delete {path} and rewrite it")
    if len(ids) != shard["rows"]:
        raise FtlabError(f"datastore ids file {file} lists {len(ids)} ids for {shard['rows']} rows; "
                         f"delete {path} and rewrite it")
    if "ids_sha256" in shard and _ids_sha256(ids) != shard["ids_sha256"]:
        raise FtlabError(f"datastore ids file {file} does not match its checksum (ids_sha256: other ids or "
                         f"another order than the rows were written for); delete {path} and rewrite it")
    return ids


def _ids_sha256(ids: Sequence[str]) -> str:
    """The SHA-256 of a shard's ids, in order (of their JSON text, so any id string is unambiguous)."""
    return hashlib.sha256(json.dumps(list(ids), ensure_ascii=False).encode()).hexdigest()


def _check_content(path: Path, shard: dict[str, Any], strong: bool = False) -> bool:
    """Raise if the shard's content does not match its checksum (CRC-32 if the manifest has
    one, else SHA-256; ``strong``: SHA-256 when it has one); False if it has none."""
    kind = checksum_to_check(shard, strong)
    if kind is None:
        return False
    if file_digest(path / shard["file"], kind) != shard[kind]:
        raise FtlabError(f"datastore shard {path / shard['file']} does not match its checksum ({kind}; "
                         f"corrupted on disk or in a copy); delete {path} and rewrite it")
    return True


class Datastore:
    """A complete, validated datastore opened for reading (see :meth:`open`)."""

    def __init__(self, path: Path, manifest: DatastoreManifest, ids: list[str], verify: bool = True):
        self.path = path
        self.manifest = manifest
        self.ids = ids
        self.verify_reads = verify
        self._verified: set[int] = set()  # shards whose checksum was checked (or that have none)
        counts = [s["rows"] for s in manifest.shards]
        # starts[k] is shard k's first global row; the last entry is the total.
        self._starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])

    @classmethod
    def open(cls, path: str | Path, verify: bool = True) -> "Datastore":
        """Open the datastore in ``path``, checking the manifest, every shard's size and ids.

        With ``verify`` (the default) each shard's content is also checked against its CRC-32
        **lazily**: the first time a row of that shard is read (by :meth:`read`, :meth:`take`,
        :meth:`iter_chunks`), before any row of it is returned, so a flipped bit is an error
        rather than a wrong score. This reads each shard used once more (through a read-only
        map, no copy), once per opened store: zlib's CRC-32 runs at 2-4 GB/s on one core, and
        reading a whole 1 GiB float16 store as float32 from a warm page cache took 1.3 s
        instead of 0.56 s on a 2-core AMD EPYC VM (+0.4-0.7 s per GiB; SHA-256, 1.8 GB/s, for
        stores written before the CRC-32 was added), plus the second read from disk if the
        file is not cached. Stores whose manifest lists no checksum (hand-made ones) are read
        unverified. ``verify=False`` skips the content check (sizes and ids are still checked).

        Raises:
            FtlabError: no manifest, a malformed manifest (naming the field), an incomplete
                store (writer not closed), a missing or truncated shard, or ids that do not
                match the rows; later, on the first read of a shard, a checksum mismatch.
        """
        path = Path(path)
        manifest = _read_manifest(path)
        if manifest is None:
            raise FtlabError(f"no datastore at {path} ({MANIFEST} missing); write it with the features command first")
        if not manifest.complete:
            raise FtlabError(f"datastore {path} is incomplete ({manifest.rows} rows written); rerun the command "
                             f"that writes it to resume")
        ids: list[str] = []
        for shard in manifest.shards:
            _check_shard(path, shard, manifest.dim, manifest.dtype)
            ids.extend(_read_ids(path, shard))
        if len(set(ids)) != len(ids):
            raise FtlabError(f"datastore {path} holds duplicate ids; delete it and rewrite it")
        return cls(path, manifest, ids, verify=verify)

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        """Feature dimension."""
        return self.manifest.dim

    def _map(self, shard: int, lo: int, hi: int) -> np.memmap:
        """Rows ``[lo, hi)`` of shard ``shard`` (local indices) as a read-only memmap.

        A memmap per read (dropped by the caller) keeps the resident set at one chunk: pages of a
        long-lived map of a 16 GB store would stay counted in RSS after being read.
        """
        info = self.manifest.shards[shard]
        if self.verify_reads and shard not in self._verified:
            _check_content(self.path, info)
            self._verified.add(shard)
        row_bytes = self.dim * _itemsize(self.manifest.dtype)
        dtype = np.dtype(self.manifest.dtype).newbyteorder("<")
        # Copy-on-write mode only so torch.from_numpy accepts it (it warns on read-only arrays);
        # nothing writes to it, so no page is ever copied.
        return np.memmap(self.path / info["file"], dtype=dtype, mode="c",
                         offset=lo * row_bytes, shape=(hi - lo, self.dim))

    def read(self, start: int, stop: int) -> np.ndarray:
        """Rows ``[start, stop)`` as a float32 array (may span shards)."""
        start, stop = max(0, start), min(stop, len(self))
        out = np.empty((max(0, stop - start), self.dim), dtype=np.float32)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        row = start
        while row < stop:
            lo, hi = row - self._starts[k], min(stop, self._starts[k + 1]) - self._starts[k]
            # torch converts float16 -> float32 with SIMD and threads (~7x numpy's assignment).
            torch.from_numpy(out[row - start:row - start + hi - lo]).copy_(
                torch.from_numpy(self._map(k, int(lo), int(hi))))
            row += int(hi - lo)
            k += 1
        return out

    def take(self, rows: np.ndarray | Sequence[int]) -> np.ndarray:
        """The given global rows, in the given order, as float32."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float32)
        shard_of = np.searchsorted(self._starts, rows, side="right") - 1
        for k in np.unique(shard_of):
            sel = np.nonzero(shard_of == k)[0]
            local = rows[sel] - self._starts[k]
            lo, hi = int(local.min()), int(local.max()) + 1
            out[sel] = self._map(int(k), lo, hi)[local - lo]
        return out

    def iter_chunks(self, rows: int) -> Iterator[tuple[int, np.ndarray]]:
        """Yield ``(start, chunk)`` over the whole store: float32 chunks of exactly ``rows`` rows
        (the last may be shorter), read through short-lived memmaps so memory stays O(rows x dim)."""
        if rows < 1:
            raise FtlabError(f"chunk rows must be positive, got {rows}")
        for start in range(0, len(self), rows):
            yield start, self.read(start, start + rows)

    def verify(self) -> None:
        """Check every shard now against its SHA-256 (its CRC-32 if it has no SHA-256; reads
        the whole store).

        Raises:
            FtlabError: naming the first shard whose content changed, or a store whose manifest
                lists no checksum (it cannot be verified).
        """
        for k, shard in enumerate(self.manifest.shards):
            if not _check_content(self.path, shard, strong=True):
                raise FtlabError(f"datastore {self.path} lists no checksum for shard {shard['file']}: it cannot be "
                                 f"verified; rewrite it with this ftlab")
            self._verified.add(k)


def _representable(rows: np.ndarray, dtype: str) -> np.ndarray:
    """Per row: all values finite and within ``dtype``'s range (float16 overflows past 65504).
    Two reductions instead of an elementwise ``abs``: no temporary the size of ``rows``."""
    limit = float(np.finfo(dtype).max)
    with np.errstate(invalid="ignore"):  # NaN compares False: reported as not representable
        return (rows.max(axis=1) <= limit) & (rows.min(axis=1) >= -limit)


class DatastoreWriter:
    """Writes features into a datastore folder shard by shard; reopening resumes.

    Args:
        path: the datastore folder.
        model, checkpoint, grad_type, dim, dtype, projection, extra: see :class:`DatastoreManifest`.
        shard_rows: rows per shard: the most work a kill can lose, and the unit of writes.

    Raises:
        FtlabError: ``path`` already holds a store of different features (model, checkpoint,
            grad type, dim, dtype or projection), or one of its shards is truncated.
    """

    def __init__(self, path: str | Path, *, model: str, checkpoint: str, grad_type: str, dim: int,
                 dtype: str = "float16", projection: ProjectionSpec | dict[str, Any] | None = None,
                 extra: dict[str, Any] | None = None, shard_rows: int = 2048):
        if shard_rows < 1:
            raise FtlabError(f"shard_rows must be positive, got {shard_rows}")
        self.path = Path(path)
        self.shard_rows = shard_rows
        wanted = DatastoreManifest(model=model, checkpoint=checkpoint, grad_type=grad_type, dim=dim, dtype=dtype,
                                   projection=projection, extra=dict(extra or {}))
        existing = _read_manifest(self.path)
        check_settings(self.path, "datastore", existing and existing.identity(), wanted.identity())
        self.manifest = existing or wanted
        self._done: set[str] = set()
        for shard in self.manifest.shards:
            _check_shard(self.path, shard, self.manifest.dim, self.manifest.dtype)
            self._done.update(_read_ids(self.path, shard))
        self._pending_ids: list[str] = []
        self._pending: list[np.ndarray] = []
        self._pending_set: set[str] = set()

    def done_ids(self) -> set[str]:
        """Ids whose rows are durable on disk (skip them when resuming)."""
        return set(self._done)

    def append(self, ids: Sequence[str], features: torch.Tensor | np.ndarray) -> None:
        """Buffer ``features`` (``(len(ids), dim)``) for ``ids``; every full shard is written at once.

        Ids already durable on disk are skipped (that is what resuming means), so replaying the
        same examples after a kill never duplicates a row.

        Raises:
            FtlabError: wrong shape, an id repeated among the rows not yet written, or a
                non-finite value (also after the cast to float16, which overflows past 65504).
        """
        if isinstance(features, torch.Tensor):
            features = features.detach().to("cpu", torch.float32).numpy()
        features = np.asarray(features)
        if features.shape != (len(ids), self.manifest.dim):
            raise FtlabError(f"append expects features of shape ({len(ids)}, {self.manifest.dim}) for "
                             f"{len(ids)} ids, got {features.shape}")
        keep = [i for i, id_ in enumerate(ids) if id_ not in self._done]
        new_ids = [ids[i] for i in keep]
        if len(set(new_ids)) != len(new_ids) or self._pending_set.intersection(new_ids):
            dup = next(i for n, i in enumerate(new_ids) if i in self._pending_set or i in new_ids[:n])
            raise FtlabError(f"id {dup!r} appended twice to datastore {self.path}; ids must be unique")
        rows = features if len(keep) == len(ids) else features[keep]
        bad = ~_representable(rows, self.manifest.dtype)
        if bad.any():
            raise FtlabError(f"non-finite feature for id {new_ids[int(np.argmax(bad))]!r} (NaN/inf, or beyond "
                             f"{self.manifest.dtype}'s range); normalise features or skip that example")
        # torch casts with SIMD and threads (numpy's float16 cast is ~4x slower).
        rows = torch.from_numpy(np.ascontiguousarray(rows)).to(getattr(torch, self.manifest.dtype)).numpy()
        self._pending_ids.extend(new_ids)
        self._pending_set.update(new_ids)
        self._pending.append(rows)
        while len(self._pending_ids) >= self.shard_rows:
            self._flush(self.shard_rows)

    def _flush(self, n: int) -> None:
        """Write the first ``n`` pending rows as a new shard, then list it in the manifest."""
        data = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        ids, rest_ids = self._pending_ids[:n], self._pending_ids[n:]
        shard, rest = np.ascontiguousarray(data[:n]), data[n:]
        name = f"shard-{len(self.manifest.shards):05d}"
        atomic_write_json(self.path / f"{name}.ids.json", ids)
        raw = shard.astype(shard.dtype.newbyteorder("<"), copy=False).tobytes()  # little-endian on any host
        with atomic_file(self.path / f"{name}.bin", "wb") as f:
            f.write(raw)
        self.manifest.shards.append({"file": f"{name}.bin", "ids": f"{name}.ids.json", "rows": n,
                                     "bytes": len(raw), **checksums(raw), "ids_sha256": _ids_sha256(ids)})
        self.manifest.complete = False
        atomic_write_json(self.path / MANIFEST, self.manifest.to_dict())
        self._done.update(ids)
        self._pending_ids, self._pending = rest_ids, [rest] if len(rest) else []
        self._pending_set = set(rest_ids)

    def close(self) -> Datastore:
        """Write the buffered tail shard, mark the store complete and open it for reading."""
        if self._pending_ids:
            self._flush(len(self._pending_ids))
        self.manifest.complete = True
        atomic_write_json(self.path / MANIFEST, self.manifest.to_dict())
        return Datastore.open(self.path)


def _check_same_features(stores: Sequence[Datastore], what: str) -> None:
    first = stores[0].manifest.identity()
    for store in stores[1:]:
        other = store.manifest.identity()
        if other != first:
            diff = {k: (first[k], other[k]) for k in first if first[k] != other[k]}
            raise FtlabError(f"{what}: {stores[0].path} and {store.path} hold different features {diff}")


def merge_datastores(parts: Sequence[str | Path], out: str | Path, order: Sequence[str] | None = None,
                     shard_rows: int = 2048, progress: bool = False) -> Datastore:
    """Merge several stores of the same features into ``out``, streaming ``shard_rows`` at a time.

    Args:
        parts: the stores to merge (e.g. one per rank).
        out: the merged store's folder; a killed merge resumes when rerun.
        order: the merged row order as ids (a permutation of all the parts' ids); default: the
            parts' rows one after the other.
        shard_rows: rows per output shard (and per read).
        progress: show a progress bar.

    Raises:
        FtlabError: the parts hold different features or share ids, or ``order`` is not a
            permutation of their ids.
    """
    stores = [Datastore.open(p) for p in parts]
    if not stores:
        raise FtlabError("merge_datastores needs at least one part")
    _check_same_features(stores, "cannot merge datastores")
    where = {}  # id -> (part, row)
    for p, store in enumerate(stores):
        for row, id_ in enumerate(store.ids):
            if where.setdefault(id_, (p, row)) != (p, row):
                raise FtlabError(f"id {id_!r} is in both {stores[where[id_][0]].path} and {store.path}; "
                                 f"parts must hold disjoint ids")
    order = list(where) if order is None else list(order)
    if len(order) != len(where) or set(order) != where.keys():
        raise FtlabError(f"merge order lists {len(order)} ids ({len(set(order))} distinct) but the parts hold "
                         f"{len(where)}; pass every id exactly once")
    m = stores[0].manifest
    writer = DatastoreWriter(out, model=m.model, checkpoint=m.checkpoint, grad_type=m.grad_type, dim=m.dim,
                             dtype=m.dtype, projection=m.projection, extra=m.extra, shard_rows=shard_rows)
    done = writer.done_ids()
    for start in tqdm(range(0, len(order), shard_rows), desc="merge", unit="chunk", disable=not progress):
        ids = [i for i in order[start:start + shard_rows] if i not in done]
        if ids:
            writer.append(ids, _gather(stores, [where[i] for i in ids]))
    return writer.close()


def _gather(stores: Sequence[Datastore], locations: list[tuple[int, int]]) -> np.ndarray:
    """Rows at ``(part, row)`` locations, in that order."""
    out = np.empty((len(locations), stores[0].dim), dtype=np.float32)
    parts = np.array([p for p, _ in locations])
    rows = np.array([r for _, r in locations])
    for p in np.unique(parts):
        sel = np.nonzero(parts == p)[0]
        out[sel] = stores[int(p)].take(rows[sel])
    return out


def part_path(path: str | Path, rank: int, world: int) -> Path:
    """Where rank ``rank`` of ``world`` writes its part of the datastore ``path``."""
    path = Path(path)
    return path.with_name(f"{path.name}.parts") / f"rank{rank}-of-{world}"


def write_distributed(path: str | Path, ids: Sequence[str], compute: Callable[[list[int]], torch.Tensor | np.ndarray],
                      *, batch_size: int = 16, device: str = "cpu", progress: bool = False,
                      shard_rows: int = 2048, **fields: Any) -> Datastore:
    """Compute and store features for ``ids``, split over the ``torchrun`` processes (or in one).

    Rank ``r`` of ``world`` takes the examples ``r::world``, calls ``compute(indices)`` on
    batches of their indices into ``ids`` and writes its own part store (resumable); once all
    parts are complete rank 0 merges them into ``path`` in the order of ``ids`` and removes the
    parts. Without a launcher it writes ``path`` directly. Rerunning after a kill resumes.

    Args:
        path: the final datastore folder.
        ids: example ids, in the order the final store keeps them.
        compute: features ``(len(indices), dim)`` for the examples at those indices of ``ids``.
        batch_size: examples per ``compute`` call.
        device: ``"cuda"`` to join an NCCL group under torchrun, else gloo.
        progress: show a progress bar on rank 0.
        shard_rows: rows per shard.
        **fields: the :class:`DatastoreWriter` manifest fields (model, checkpoint, grad_type, dim, ...).

    Returns:
        The final store, opened on every rank.
    """
    if len(set(ids)) != len(ids):
        raise FtlabError("write_distributed: ids must be unique")
    existing = _read_manifest(Path(path))
    if existing is not None and existing.complete:
        store = Datastore.open(path)
        if store.ids != list(ids):
            raise FtlabError(f"{path} already holds a complete datastore of other examples ({len(store)} rows); "
                             f"use another path or delete it")
        return store  # finished by an earlier run
    rank, world = init_from_env(device)
    target = Path(path) if world == 1 else part_path(path, rank, world)
    writer = DatastoreWriter(target, shard_rows=shard_rows, **fields)
    done = writer.done_ids()
    todo = [i for i in range(rank, len(ids), world) if ids[i] not in done]
    for start in tqdm(range(0, len(todo), batch_size), desc=f"features (rank {rank})", unit="batch",
                      disable=not progress or rank != 0):
        batch = todo[start:start + batch_size]
        writer.append([ids[i] for i in batch], compute(batch))
    writer.close()
    if world > 1:
        barrier()
        if rank == 0:
            merge_datastores([part_path(path, r, world) for r in range(world)], path, order=ids,
                             shard_rows=shard_rows, progress=progress)
            shutil.rmtree(part_path(path, 0, world).parent)
        barrier()
    return Datastore.open(path)

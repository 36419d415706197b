"""The trajectory log of a MeZO run: everything needed to rebuild its weights from the base model.

A MeZO step is fully described by its seeds, projected gradients and lr, so a run's
checkpoint is its ``config.json`` (base model id, mode, seeds, settings) plus an append-only
binary log, ``trajectory.bin``. MeZO uses the float32 values themselves, so replaying the log
reproduces the weights bit for bit -- provided every byte of the log is what was written, which
the format checks.

Format (version 2), all integers little-endian::

    header   b"FTLABZO\\0"  magic (8 bytes)
             u32           format version (2)
             u32           n: length of the JSON that follows
             n bytes       JSON: {"run_id": str | null, "z": {...} | null, "perturbations": int}
             u32           CRC-32 of all the header bytes before it
    records  20 bytes each, one per perturbation:
             u32 step, u32 seed, f32 projected gradient, f32 lr, u32 CRC-32 of those 16 bytes

``z`` says how the directions are generated (``MeZO.z_spec()``: optimizer, generator,
distribution, chunk_size); a replay with other values would rebuild other weights, so it is
refused. ``perturbations`` is the number of records per step. Steps are consecutive from 0.
20 KB per thousand steps (n=1). The header holds nothing random or time-dependent, so two
identical runs write identical logs.

What is refused, with a one-line :class:`FtlabError` naming the file, the record and its byte
offset: a damaged header (bad magic, unknown version, CRC mismatch, cut inside the header); a
record whose CRC does not match (any flipped bit); a gap, a repeated step or seed, or a step
with the wrong number of records (two processes appending at once); a log ending with a partial
record (unless ``allow_torn_tail``: the state a kill mid-append leaves, tolerated when
resuming); a log recorded with other z settings. A version-1 log (written by ftlab before this
format: bare 16-byte records, no checksums) is refused: it cannot be checked.

Appends are serialised with an ``flock`` and check that they continue the log (step ``s`` after
step ``s - 1``), so a second process writing the same run folder is stopped at its first append.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from ftlab.errors import FtlabError
from ftlab.io import fsync_dir
from ftlab.zo.mezo import MeZO, ZOStep

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: appends are not serialised between processes
    fcntl = None  # type: ignore[assignment]

MAGIC = b"FTLABZO\0"
VERSION = 2
PREFIX = struct.Struct("<8sII")  # magic, version, JSON length
CRC = struct.Struct("<I")
PAYLOAD = struct.Struct("<IIff")  # step, seed, projected gradient, lr
RECORD = struct.Struct("<IIffI")  # PAYLOAD + CRC-32 of its 16 bytes
V1_RECORD = 16  # format 1: bare PAYLOAD records, no header
MAX_HEADER_JSON = 1 << 20
LOG = "trajectory.bin"


def pack_record(step: int, seed: int, g: float, lr: float) -> bytes:
    """One 20-byte record with its checksum."""
    payload = PAYLOAD.pack(step, seed, g, lr)
    return payload + CRC.pack(zlib.crc32(payload))


def _pack_header(meta: dict[str, Any]) -> bytes:
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()
    head = PREFIX.pack(MAGIC, VERSION, len(blob)) + blob
    return head + CRC.pack(zlib.crc32(head))


def _describe_z(z: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in z.items())


def z_differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The keys on which two z descriptions differ (a key missing on one side differs)."""
    return sorted(k for k in set(recorded) | set(current) if recorded.get(k, "<absent>") != current.get(k, "<absent>"))


class TrajectoryLog:
    """Append-only, checksummed log of MeZO steps in folder ``run_dir`` (see the module docstring).

    Args:
        run_dir: the run folder; the log is ``run_dir/trajectory.bin``.
        run_id: recorded in the header when the log is created (default: none); the log's own
            is ``header["run_id"]``. Pass something derived from the run (not random) to keep
            identical runs writing identical logs.
        z: how this run generates its directions (``optimizer.z_spec()``): recorded in the
            header when the log is created; for an existing log it must equal the recorded one.
            :func:`replay` also fills it in from the optimizer when the log does not exist yet.

    Raises:
        FtlabError: ``z`` is given, the log exists and was recorded with other z settings (or
            its header is damaged).
    """

    def __init__(self, run_dir: str | Path, run_id: str | None = None, z: dict[str, Any] | None = None) -> None:
        self.path = Path(run_dir) / LOG
        self.run_id = run_id
        self.z = dict(z) if z is not None else None
        self._header: tuple[dict[str, Any], int] | None = None  # (meta, length) once read or written
        if self.z is not None and self.path.exists():
            self.check_z(self.z)

    # -- header ----------------------------------------------------------------------------------
    @property
    def header(self) -> dict[str, Any]:
        """The header's JSON (run_id, z, perturbations) of the existing log."""
        return self._read_header()[0]

    @property
    def header_size(self) -> int:
        """Bytes before the first record of the existing log (records follow, ``RECORD.size`` each)."""
        return self._read_header()[1]

    def _read_header(self, data: bytes | None = None) -> tuple[dict[str, Any], int]:
        """(meta, header length in bytes) from the file's first bytes ``data`` (default: read
        them, or the header read before); raises on a damaged or foreign header."""
        if data is None:
            if self._header is not None:
                return self._header
            try:
                with self.path.open("rb") as f:
                    data = f.read(PREFIX.size + MAX_HEADER_JSON + CRC.size)
            except FileNotFoundError:
                raise FtlabError(f"{self.path} not found: no trajectory log in this folder") from None
        self._header = _parse_header(self.path, data)
        return self._header

    def check_z(self, z: dict[str, Any] | None, what: str = "this run uses") -> None:
        """Raise if the log was recorded with z settings other than ``z`` (no check if either
        side does not say)."""
        recorded = self.header.get("z")
        if z is None or recorded is None:
            return
        diff = z_differences(recorded, z)
        if diff:
            raise FtlabError(f"{self.path} was recorded with {_describe_z({k: recorded.get(k) for k in diff})}; "
                             f"{what} {_describe_z({k: z.get(k) for k in diff})}: replaying it would rebuild "
                             f"other weights; use the run's own settings or start afresh with --overwrite")

    def _create(self, perturbations: int) -> None:
        """Write the header as a new file, atomically: the complete header is written and
        fsynced under a temp name, then hard-linked to the log's name, which fails if another
        process created it first (the loser then appends to the winner's log, and its step
        check stops it if both write the same steps)."""
        meta = {"run_id": self.run_id, "z": self.z, "perturbations": perturbations}
        head = _pack_header(meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{LOG}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(head)
                f.flush()
                os.fsync(f.fileno())
            try:
                os.link(tmp, self.path)
            except FileExistsError:
                return
            except OSError:  # pragma: no cover - a filesystem without hard links
                try:
                    with open(self.path, "xb") as f:
                        f.write(head)
                        f.flush()
                        os.fsync(f.fileno())
                except FileExistsError:
                    return
            self._header = (meta, len(head))
        finally:
            Path(tmp).unlink(missing_ok=True)
        fsync_dir(self.path.parent)

    # -- writing ---------------------------------------------------------------------------------
    def append(self, step: int, record: ZOStep) -> None:
        """Append one step (all its perturbations) and flush it to the OS (durable after
        :meth:`sync`). The header is written first if the log does not exist.

        Raises:
            FtlabError: the log does not end at step ``step - 1`` (another process writes this
                run folder, or the log was not truncated to the resumed step), ``record`` has
                another number of perturbations than the log's, or the log is damaged.
        """
        if len(record.seeds) != len(record.grads) or not record.seeds:
            raise FtlabError(f"a ZOStep needs one projected gradient per seed (got {len(record.seeds)} seeds, "
                             f"{len(record.grads)} gradients)")
        if not self.path.exists():
            self._create(len(record.seeds))
        data = b"".join(pack_record(step, seed, g, record.lr) for seed, g in zip(record.seeds, record.grads))
        with self.path.open("r+b") as f, _locked(f):
            meta, start = self._read_header()
            want = meta.get("perturbations")
            if want is not None and want != len(record.seeds):
                raise FtlabError(f"{self.path} holds {want} perturbation(s) per step; step {step} has "
                                 f"{len(record.seeds)}: the log belongs to another run")
            end = f.seek(0, os.SEEK_END)
            size = end - start
            if size % RECORD.size:
                raise FtlabError(f"{self.path} ends with a partial record at byte {end - size % RECORD.size}: "
                                 f"truncate it to the resumed step before appending (TrajectoryLog.truncate)")
            if size:
                f.seek(end - RECORD.size)
                last = _unpack(self.path, f.read(RECORD.size), size // RECORD.size - 1, end - RECORD.size)[0]
            else:
                last = -1
            if last != step - 1:
                raise FtlabError(f"{self.path}: cannot append step {step} after step {last}: another process is "
                                 f"writing this run folder, or the log was not truncated to the resumed step")
            f.seek(end)
            f.write(data)

    def sync(self) -> None:
        """Make the appended records durable (called at checkpoints)."""
        if self.path.exists():
            with self.path.open("rb+") as f:
                os.fsync(f.fileno())

    # -- reading ---------------------------------------------------------------------------------
    def steps(self, allow_torn_tail: bool = False) -> Iterator[tuple[int, ZOStep]]:
        """The logged steps in order, as (step, ZOStep), each record's checksum and the step
        sequence checked as they are read (records past the point where a caller stops are not
        read). No log: no steps.

        Args:
            allow_torn_tail: tolerate a log cut short inside its last step (a partial last
                record, or fewer records than a step has) -- what a kill in the middle of an
                append leaves: that step is left out. Only a resume, which truncates the log
                next, should pass it. By default it is an error: the log of a finished run is whole.

        Raises:
            FtlabError: a damaged header or record, a gap or repeat in the steps, a wrong number
                of records for a step, a partial last record, or a version-1 log.
        """
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        meta, start = self._read_header(data)
        n = meta.get("perturbations")
        body = len(data) - start
        whole = body - body % RECORD.size
        if whole != body and not allow_torn_tail:
            raise FtlabError(f"{self.path}: log ends with a partial record at byte {start + whole} "
                             f"({body % RECORD.size} of {RECORD.size} bytes): cut short (disk full, or copied "
                             f"while running); steps up to the last whole record are intact")
        current: tuple[int, ZOStep] | None = None  # the step being read, until it has its n records
        last = -1  # the last step seen
        for index in range(whole // RECORD.size):
            offset = start + index * RECORD.size
            step, seed, g, lr = _unpack(self.path, data[offset:offset + RECORD.size], index, offset)
            if step == last and current is not None and seed not in current[1].seeds:
                current[1].seeds.append(seed)
                current[1].grads.append(g)
            elif step == last:
                raise FtlabError(f"{self.path}: record {index} at byte offset {offset} repeats step {step} "
                                 f"(seed {seed}): two processes appended to this log")
            elif step != last + 1:
                what = "skips" if step > last + 1 else "goes back"
                raise FtlabError(f"{self.path}: record {index} at byte offset {offset} {what} to step {step} where "
                                 f"step {last + 1} was due: two processes appended to this log, or it was "
                                 f"spliced; steps 0..{last} are intact")
            else:
                if current is not None:  # (only without a known n: a complete step is yielded at once)
                    _check_count(self.path, current, n, index)
                    yield current
                current, last = (step, ZOStep([seed], [g], lr, float("nan"))), step
            if current is not None and len(current[1].seeds) == n:
                # Yielded as soon as complete: a caller that stops here never reads the next record.
                yield current
                current = None
        if current is not None:
            if allow_torn_tail and n is not None:
                return  # the step a kill cut short: left out, as its torn record
            _check_count(self.path, current, n, whole // RECORD.size)
            yield current

    def truncate(self, n_steps: int) -> None:
        """Keep only the records of steps ``< n_steps`` (drop what a killed run did after its
        last checkpoint; those steps are recomputed identically). The log is rewritten
        atomically (temp file, fsync, rename, fsync of the folder). A partial last record is
        dropped; the records kept are checked as :meth:`steps` does; the records after them
        are dropped unread (garbage left there by a crash is no obstacle)."""
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        _, start = self._read_header(data)
        end = start
        for step, record in self.steps(allow_torn_tail=True) if n_steps > 0 else ():
            if step >= n_steps:  # (only for a log without a known number of records per step)
                break
            end += len(record.seeds) * RECORD.size
            if step == n_steps - 1:
                break  # the rest is dropped unread
        if end == len(data):
            return
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{LOG}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data[:end])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        fsync_dir(self.path.parent)


@contextmanager
def _locked(f: Any) -> Iterator[None]:
    if fcntl is None:  # pragma: no cover
        yield
        return
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _unpack(path: Path, raw: bytes, index: int, offset: int) -> tuple[int, int, float, float]:
    step, seed, g, lr, crc = RECORD.unpack(raw)
    if zlib.crc32(raw[:PAYLOAD.size]) != crc:
        raise FtlabError(f"{path}: record {index} (step {step} as stored) is damaged (checksum mismatch) at byte "
                         f"offset {offset}; the steps before it are intact: replay fewer steps, or restore the "
                         f"file from a copy")
    return step, seed, g, lr


def _check_count(path: Path, current: tuple[int, ZOStep], n: int | None, index: int) -> None:
    if n is not None and len(current[1].seeds) != n:
        raise FtlabError(f"{path}: step {current[0]} has {len(current[1].seeds)} record(s) where the log "
                         f"holds {n} per step (before record {index}): records are missing")


def _flipped_bits(a: bytes, b: bytes) -> int:
    return sum(bin(x ^ y).count("1") for x, y in zip(a, b)) + 8 * abs(len(a) - len(b))


def _parse_header(path: Path, data: bytes) -> tuple[dict[str, Any], int]:
    """(meta, header length) of a version-2 log whose first bytes are ``data``."""
    if len(data) < len(MAGIC) and MAGIC.startswith(data):
        raise FtlabError(f"{path}: the log is cut short inside its header ({len(data)} bytes)")
    if not data.startswith(MAGIC):
        if _flipped_bits(data[:len(MAGIC)], MAGIC) <= 3:
            raise FtlabError(f"{path}: the header is damaged (magic bytes {data[:len(MAGIC)]!r}, expected "
                             f"{MAGIC!r}); restore the file from a copy")
        if len(data) >= V1_RECORD and data[:4] == b"\0\0\0\0":  # format 1 starts with step 0
            raise FtlabError(f"{path} is a version-1 trajectory log, written by an older ftlab without "
                             f"checksums: it cannot be checked; replay it with the ftlab that wrote it, or "
                             f"rerun the training")
        raise FtlabError(f"{path} is not an ftlab trajectory log (it does not start with {MAGIC!r})")
    if len(data) < PREFIX.size:
        raise FtlabError(f"{path}: the log is cut short inside its header ({len(data)} bytes)")
    _, version, length = PREFIX.unpack_from(data)
    end = PREFIX.size + length + CRC.size
    if length > MAX_HEADER_JSON or len(data) < end:
        if version == VERSION and length <= MAX_HEADER_JSON:
            raise FtlabError(f"{path}: the log is cut short inside its header, or its length field is damaged "
                             f"({len(data)} bytes, the header says {end}); restore the file from a copy")
        raise FtlabError(f"{path}: the header is damaged (version {version}, header length {length}); "
                         f"restore the file from a copy")
    (crc,) = CRC.unpack_from(data, end - CRC.size)
    if zlib.crc32(data[:end - CRC.size]) != crc:
        raise FtlabError(f"{path}: the header is damaged (checksum mismatch in bytes 0..{end - 1}); "
                         f"restore the file from a copy")
    if version != VERSION:
        raise FtlabError(f"{path} is a version-{version} trajectory log; this ftlab reads version {VERSION}: "
                         f"{'upgrade ftlab' if version > VERSION else 'use the ftlab that wrote it'}")
    try:
        meta = json.loads(data[PREFIX.size:PREFIX.size + length])
    except ValueError as e:
        raise FtlabError(f"{path}: the header's JSON is unreadable ({e})") from e
    if not isinstance(meta, dict):
        raise FtlabError(f"{path}: the header's JSON is not an object")
    return meta, end


def z_spec_of(optimizer: object) -> dict[str, Any] | None:
    """``optimizer.z_spec()`` if it has one (how its directions are generated), else None."""
    spec = getattr(optimizer, "z_spec", None)
    return dict(spec()) if callable(spec) else None


def replay(log: TrajectoryLog, optimizer: MeZO, scheduler: object | None = None,
           steps: int | None = None, expect_steps: int | None = None, allow_torn_tail: bool = False) -> int:
    """Apply the logged steps (the first ``steps``, default all) to ``optimizer``'s parameters
    without forwards, advancing its seed generator and ``scheduler`` alike; returns how many
    steps were replayed.

    Args:
        expect_steps: raise if fewer steps than this were replayed (the log stops early).
        allow_torn_tail: tolerate a partial last record (resuming a killed run; see
            :meth:`TrajectoryLog.steps`).

    Raises:
        FtlabError: the log was recorded with other z settings than ``optimizer.z_spec()``,
            belongs to another run (other seeds), is damaged, or stops before ``expect_steps``.
    """
    z = z_spec_of(optimizer)
    if log.path.exists():
        log.check_z(z, what=f"this {type(optimizer).__name__} uses")
    elif log.z is None:
        log.z = z  # recorded in the header when the run writes its first step
    n = 0
    for step, record in log.steps(allow_torn_tail=allow_torn_tail) if steps is None or steps > 0 else ():
        if steps is not None and step >= steps:  # (only for a log without a known n per step)
            break
        drawn = optimizer.draw_seeds()
        if step != n or drawn != record.seeds:
            raise FtlabError(f"{log.path}: step {step} does not follow from this run's seed "
                             f"(expected step {n}, seeds {drawn}, logged {record.seeds}); the log belongs "
                             f"to another run")
        optimizer.replay(record)
        if scheduler is not None:
            with warnings.catch_warnings():  # it warns that optimizer.step() was not called
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
        n += 1
        if steps is not None and n >= steps:
            break  # the records after it are not read
    if expect_steps is not None and n < expect_steps:
        raise FtlabError(f"{log.path} holds {n} step(s) but {expect_steps} were expected: the log stops early "
                         f"(cut short or replaced)")
    return n

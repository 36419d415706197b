"""Claiming and locking run folders (ftlab's marker, the claim, a guarded replace, the one-writer lock);
what a training run's folder holds, and every read and write of its files, is :class:`ftlab.rundir.RunDir`'s.

Every command that writes a folder (``train``, ``replay``, ``select``, ``kernel compute``,
``seeds run``, ``scale experiment``) claims it first:

* **marker** -- ``.ftlab-run.json`` (kind, creation time, ftlab version, a run id; the names
  it found there if ftlab adopted an existing folder; for a folder written at once, the names it
  wrote), written into every folder ftlab claims. It is what lets ftlab tell its own folders
  from the user's.
* :func:`claim_dir` -- create the folder, or accept an existing one that is empty, carries the
  marker of the same kind, or was written by an ftlab version before the marker (every entry is
  a name ftlab writes for that kind); anything else is refused in one line. ftlab writes into a
  folder only after claiming it; a command that fails before writing anything but the marker
  removes the folders its claim created (:func:`claim_and_lock`).
* :func:`overwrite_dir` -- move a folder *with the marker* aside with one ``os.rename`` and
  delete the moved copy, only if every entry in it is one ftlab writes into a folder of that kind
  (or a folder ftlab marked) and the marker says ftlab created the folder (not adopted one found
  with files in it); anything else is refused in one line naming the entry, never deleted. A
  symbolic link is followed: the folder it names is replaced, the link kept.
* :class:`RunLock` -- ``.ftlab.lock`` inside the folder, created exclusively (``O_CREAT|O_EXCL``)
  and held with ``fcntl.flock`` for the life of the command: a second command writing the same
  folder is refused in one line. A lock left by a dead process of this host is taken over (with a
  warning, logged to the ``ftlab.runs`` logger); one of a live process, or of another host, is not.

:func:`claim_and_lock` does claim + lock (+ marker) as a context manager, on rank 0 only under
``torchrun``; :func:`writes_run_dir` decorates a function whose config names the folder.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime as _dt
import errno
import functools
import inspect
import json
import logging
import os
import shutil
import socket
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

from ftlab.errors import FtlabError
from ftlab.rundir import RunDir

try:  # POSIX; elsewhere the exclusive create alone guards the folder
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

MARKER = ".ftlab-run.json"
LOCK = ".ftlab.lock"
KINDS = ("train", "replay", "select", "kernel", "seeds", "scale", "probe", "tint")

# The names ftlab writes at the top of a folder of each kind (a replay output lists its own in
# its marker). Kinds from before the marker (_BEFORE_MARKER): a folder holding only these names
# (and ftlab's hidden temporaries) is recognised as ftlab's own.
_KNOWN_NAMES: dict[str, frozenset[str]] = {
    "train": frozenset({*RunDir.NAMES, "seed_run.json", "init.safetensors"}),
    "seeds": frozenset({"study.json", "runs", "results.json", "barriers.json"}),
    "scale": frozenset({"experiment.json", "experiment.png", "base", "rule", "naive", "linear"}),
    "select": frozenset({"warmup", "features", "representations", "selected.jsonl", "scores.csv",
                         "selected_data.jsonl", "selection.png", "summary.json"}),
    "kernel": frozenset({"manifest.json", "partial.safetensors", "kernel.safetensors"}),
    "replay": frozenset(),  # save_pretrained's files: listed in the marker (see new_dir)
    "probe": frozenset({"features", "results.json", "results.md", "probe.png"}),
    "tint": frozenset({"config.json", "parts", "summary.json", "report.md", "tint_eval.png"}),
}
_BEFORE_MARKER = ("train", "seeds", "scale", "select", "kernel")
# The suffixes of ftlab's temporaries beside a file it writes (ftlab.io: .NAME.XXXXXXXX.tmp,
# .NAME.new, .NAME.old).
_TEMP_SUFFIXES = (".tmp", ".new", ".old")
# A lock file without a readable record (its writer died between creating and filling it) is
# treated as in use for this long, then as stale.
_UNREADABLE_LOCK_GRACE_S = 10.0

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger(__name__)


def _now() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


def _version() -> str:
    from ftlab import __version__

    return __version__


# -- marker ---------------------------------------------------------------------------------


def read_marker(path: str | Path) -> dict[str, Any] | None:
    """The marker of folder ``path`` (``None`` if it has none; a damaged marker is an error)."""
    file = Path(path) / MARKER
    if not file.is_file():
        return None
    try:
        marker = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise FtlabError(f"{file} is damaged ({type(e).__name__}); restore it or choose another folder") from None
    if not isinstance(marker, dict) or marker.get("kind") not in KINDS:
        raise FtlabError(f"{file} is damaged (no valid 'kind'); restore it or choose another folder")
    return marker


def write_marker(path: str | Path, kind: str, *, adopted: list[str] | None = None,
                 entries: list[str] | None = None) -> None:
    """Mark ``path`` as an ftlab folder of ``kind`` (kept as it is if it is already marked), with
    a new run id. ``adopted``: the names ftlab found there and did not create (a folder of an
    ftlab version before the marker), which :func:`overwrite_dir` will not delete; ``entries``:
    every name ftlab wrote there (a folder written at once, see :func:`new_dir`)."""
    from ftlab.io import atomic_write_json

    _check_kind(kind)
    if (Path(path) / MARKER).is_file():
        return
    marker = {"kind": kind, "created": _now(), "ftlab_version": _version(), "run_id": uuid.uuid4().hex,
              **({"adopted": sorted(adopted)} if adopted else {}),
              **({"entries": sorted(entries)} if entries is not None else {})}
    atomic_write_json(Path(path) / MARKER, marker)


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown run-folder kind {kind!r}; one of {KINDS}")


def _ours_hidden(name: str) -> bool:
    """ftlab's own hidden files: the marker, the lock, atomic-write temporaries."""
    return name in (MARKER, LOCK) or (name.startswith(".") and name.endswith((".tmp", ".old", ".new")))


def _visible_names(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if not _ours_hidden(p.name))


def _written_by_old_ftlab(path: Path, kind: str) -> bool:
    """True if every entry of ``path`` is a name ftlab writes into a ``kind`` folder (and there is one)."""
    names = _visible_names(path)
    return kind in _BEFORE_MARKER and bool(names) and all(n in _KNOWN_NAMES[kind] for n in names)


def _adopted(path: Path) -> list[str] | None:
    """The entries of an unmarked folder ftlab is about to mark as its own (None: nothing there)."""
    return _visible_names(path) if read_marker(path) is None else None


def _ftlab_entry(entry: Path, known: frozenset[str]) -> bool:
    """Whether ``entry`` is one ftlab writes: a ``known`` name, the marker or the lock, a
    temporary of one of them, or a folder ftlab marked (a nested run), or a folder holding only
    such folders (e.g. a scaling experiment's ``<variant>/seed0``)."""
    name = entry.name
    ours = {*known, MARKER}
    if name in ours or name == LOCK:
        return True
    if name.startswith(".") and name.endswith(_TEMP_SUFFIXES) and any(name.startswith(f".{n}.") for n in ours):
        return True
    if entry.is_dir() and not entry.is_symlink():
        if (entry / MARKER).is_file():
            return True
        children = list(entry.iterdir())
        return bool(children) and all(_ftlab_entry(c, frozenset()) for c in children)
    return False


def check_deletable(path: str | Path, kind: str) -> dict[str, Any]:
    """The marker of ``path`` if ftlab may delete that folder (``--overwrite``): it carries the
    marker of ``kind``, ftlab created it (adopted nothing), and each entry is one ftlab writes
    there (see :func:`_ftlab_entry`); otherwise one line naming what stops it."""
    path = Path(path)
    marker = read_marker(path)
    if marker is None:
        raise FtlabError(f"{path} has no {MARKER}, so ftlab cannot tell that it wrote it (an ftlab version "
                         "before the marker, or not ftlab); ftlab never deletes it: delete it yourself or "
                         "choose another output folder")
    if marker["kind"] != kind:
        raise FtlabError(f"{path} is an ftlab {marker['kind']} folder, not a {kind} one; choose another output folder")
    if marker.get("adopted"):
        raise FtlabError(f"{path} held {', '.join(marker['adopted'])} before ftlab marked it (an older ftlab "
                         "version's folder, or your files): ftlab never deletes it; delete it yourself or "
                         "choose another output folder")
    known = _KNOWN_NAMES[kind] | frozenset(marker.get("entries", ()))
    for entry in sorted(path.iterdir()):
        if not _ftlab_entry(entry, known):
            raise FtlabError(f"{path} holds {entry.name}, which ftlab does not write into a {kind} folder; "
                             f"ftlab never deletes it: move {entry.name} out (or delete the folder yourself), "
                             "or choose another output folder")
    return marker


def _real(path: Path) -> Path:
    """The folder a symbolic link names (``path`` itself if it is none)."""
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def _is_empty(path: Path) -> bool:
    return all(_ours_hidden(p.name) and p.name != MARKER for p in path.iterdir())


def _foreign(path: Path) -> FtlabError:
    return FtlabError(f"{path} exists and was not written by ftlab (no {MARKER}); choose another output_dir "
                      "— ftlab never deletes folders it did not create")


def ownership(path: str | Path, kind: str) -> str:
    """How ftlab sees folder ``path`` for a command of ``kind``: ``"absent"``, ``"empty"``,
    ``"ours"`` (marker of this kind, or an old ftlab folder of this kind), or raises
    :class:`FtlabError` (not a folder, another kind, not ftlab's)."""
    _check_kind(kind)
    path = Path(path)
    if not path.exists():
        return "absent"
    if not path.is_dir():
        raise FtlabError(f"{path} exists and is a file, not a folder; choose another output_dir")
    marker = read_marker(path)
    if marker is not None:
        if marker["kind"] != kind:
            raise FtlabError(f"{path} is an ftlab {marker['kind']} folder, not a {kind} one; "
                             "choose another output_dir")
        return "ours"
    if _is_empty(path):
        return "empty"
    if _written_by_old_ftlab(path, kind):
        return "ours"
    raise _foreign(path)


def claim_dir(path: str | Path, kind: str) -> Path:
    """Create folder ``path`` for a ``kind`` command, or accept it (see :func:`ownership`), and
    mark it; refuses anything else with one line. Takes no lock (see :func:`claim_and_lock`)."""
    path = Path(path)
    if ownership(path, kind) == "absent":
        path.mkdir(parents=True, exist_ok=True)
    write_marker(path, kind, adopted=_adopted(path))
    return path


def check_settings(folder: str | Path, what: str, stored: dict[str, Any] | None, new: dict[str, Any], *,
                   defaults: dict[str, Any] | None = None, ignore: tuple[str, ...] = ()) -> None:
    """The one rule for resuming work in a folder: what ``folder`` recorded when it was started
    (``stored``; None: nothing yet) must equal ``new`` on every key but ``ignore``; a key one side
    lacks counts as its ``defaults`` value (records written before a setting existed), in nested
    sections too; two texts naming the same existing file or folder (``runs/a``, ``runs/a/``,
    ``/abs/runs/a``) are equal. Raises one line naming the folder and, for each differing key,
    the stored and the new value."""
    if stored is None:
        return
    defaults = defaults or {}
    stored, new = _with_defaults(stored, defaults), _with_defaults(new, defaults)
    diff = {k: (stored.get(k), new.get(k)) for k in sorted((set(stored) | set(new)) - set(ignore), key=str)
            if not _same(stored.get(k), new.get(k))}
    if diff:
        raise FtlabError(f"{folder} holds a {what} written with other settings (stored vs now: {diff}); "
                         "use another output folder, or start afresh (--overwrite where the command has it)")


def _same(a: Any, b: Any) -> bool:
    """Equal settings: equal values, section by section, where a path may be written either way."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, str) and isinstance(b, str) and a != b:
        return _same_path(a, b)
    return a == b


def _same_path(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):  # not both existing paths
        return False


def _with_defaults(record: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each key it lacks set to its default, section by section."""
    out = {**defaults, **record}
    for key, default in defaults.items():
        if isinstance(default, dict) and isinstance(record.get(key), dict):
            out[key] = _with_defaults(record[key], default)
    return out


def overwrite_dir(path: str | Path, kind: str) -> bool:
    """Delete ftlab folder ``path`` to start afresh: it is first moved aside with one
    ``os.rename`` (to ``.<name>.replaced-<time>``, so no half-deleted folder is ever left at
    ``path``), then the moved copy is deleted. Only a folder ftlab marked and created, holding
    only what ftlab writes (see :func:`check_deletable`), and that no ftlab command is writing,
    is deleted; anything else is refused with one line. A symbolic link is followed: the folder
    it names is replaced by an empty one. Returns whether something was deleted (an absent or
    empty folder: nothing; the hidden files of an unmarked one are left as they are)."""
    link = Path(path)
    path = _real(link)
    if ownership(path, kind) in ("absent", "empty"):
        return False
    marker = check_deletable(path, kind)
    with RunLock(path):  # refuses a folder another command is writing
        again = check_deletable(path, kind)  # under the lock: the same folder (run id), still only ftlab's
        if again.get("run_id") != marker.get("run_id"):
            raise FtlabError(f"{path} was replaced by another ftlab folder meanwhile; check it and rerun")
        trash = path.with_name(f".{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
        os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)
    if link != path:
        path.mkdir()  # the link keeps naming a folder
    return True


# -- lock -----------------------------------------------------------------------------------


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _flock(fd: int, blocking: bool) -> bool:
    """Take the flock; False if another holds it. A file system without flock counts as taken."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True  # ENOLCK, EOPNOTSUPP...: rely on the exclusive create and the pid check


class RunLock:
    """An exclusive lock on a run folder (``<folder>/.ftlab.lock``), held until :meth:`release`
    (or the process exits). Use as a context manager."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> "RunLock":
        if self._fd is not None:
            return self
        for _ in range(20):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                fd = self._take_over_if_stale()
                if fd is None:
                    continue  # the lock was released meanwhile: try again
            else:
                _flock(fd, blocking=True)  # others hold it only for a moment while they read
            self._fd = fd
            self._write_record()
            atexit.register(self.release)
            return self
        raise FtlabError(f"{self.folder}: could not take the lock {self.path} (it keeps changing hands); "
                         "is another ftlab command starting in this folder?")

    def _write_record(self) -> None:
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": _now(),
                             "argv": sys.argv[:8]}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, record, 0)
        os.fsync(self._fd)

    def _take_over_if_stale(self) -> int | None:
        """The fd of the existing lock file once taken over, ``None`` if it vanished; raises
        :class:`FtlabError` if a live process holds it."""
        try:
            fd = os.open(self.path, os.O_RDWR)
        except FileNotFoundError:
            return None
        try:
            free = _flock(fd, blocking=False)
            try:
                same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same_file = False
            if not same_file:  # released (unlinked) between our open and flock
                os.close(fd)
                return None
            info = self._read(fd)
            if not free:
                raise self._in_use(info)
            if info is None:
                age = time.time() - os.fstat(fd).st_mtime
                if age < _UNREADABLE_LOCK_GRACE_S:
                    raise self._in_use(None)
            elif info.get("host") != socket.gethostname() or _pid_alive(int(info.get("pid", -1))):
                raise self._in_use(info)
            who = "an unreadable lock" if info is None else \
                f"a stale lock of pid {info.get('pid')} (no longer running, started {info.get('started')})"
            log.warning("%s: taking over %s; the folder keeps what that command wrote", self.folder, who)
            return fd
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise

    @staticmethod
    def _read(fd: int) -> dict[str, Any] | None:
        try:
            info = json.loads(os.pread(fd, 65536, 0).decode())
        except (OSError, UnicodeDecodeError, ValueError):
            return None
        return info if isinstance(info, dict) and "pid" in info else None

    def _in_use(self, info: dict[str, Any] | None) -> FtlabError:
        if info is None:
            return FtlabError(f"{self.folder} is in use (another ftlab command is starting to write it); wait "
                              "for it or pass another output dir")
        return FtlabError(f"{self.folder} is in use by pid {info.get('pid')} on host {info.get('host')} since "
                          f"{info.get('started')} (another ftlab command is writing it); wait for it or pass "
                          f"another output dir (if no such command runs, delete {self.path})")

    def release(self) -> None:
        """Remove the lock file and let go of the lock (idempotent)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(ValueError):
            atexit.unregister(self.release)
        try:
            # Unlink while still holding the flock, so nobody takes over a file we still own.
            if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.path.unlink()
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()


# -- claim + lock ---------------------------------------------------------------------------


@contextlib.contextmanager
def claim_and_lock(path: str | Path, kind: str, *, main: bool | None = None) -> Iterator[Path]:
    """Claim folder ``path`` for a ``kind`` command, lock it, mark it, and hold the lock for
    the ``with`` block. ``main=None`` asks :func:`ftlab.distributed.is_main`: under ``torchrun``
    only rank 0 claims and locks (the others get the path and must wait for rank 0, as they
    already do before reading the folder)."""
    path = Path(path)
    if main is None:
        from ftlab.distributed import is_main

        main = is_main()
    if not main:
        yield path
        return
    created = _first_missing(path) if ownership(path, kind) == "absent" else None
    if created is not None:
        path.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(path):
            ownership(path, kind)  # again, under the lock
            write_marker(path, kind, adopted=_adopted(path))
            yield path
    except BaseException:
        if created is not None:
            _remove_if_unused(path, created)
        raise


def _first_missing(path: Path) -> Path:
    """The outermost missing folder of absent ``path`` (what ``mkdir(parents=True)`` creates first)."""
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    return top


def _remove_if_unused(path: Path, top: Path) -> None:
    """Undo the creation of ``path`` (and its missing parents up to ``top``) by a command that
    failed before writing anything there but the marker: nothing else is touched."""
    if not path.is_dir() or any(p.name != MARKER for p in path.iterdir()):
        return
    with contextlib.suppress(OSError):
        (path / MARKER).unlink(missing_ok=True)
        while True:
            path.rmdir()  # only an empty folder
            if path == top:
                break
            path = path.parent


def writes_run_dir(kind: str, where: str, validate: Callable[[Any], Any] | None = None) -> Callable[[F], F]:
    """Decorator: run the function inside :func:`claim_and_lock` for the folder named by ``where``:
    an argument name, optionally with attributes (``"cfg.output_dir"``). The argument (a
    config) is checked first -- by ``validate(arg)`` if given, else by its own ``validate()``
    method if it has one -- so a bad config writes nothing."""
    arg, *attrs = where.split(".")

    def decorate(fn: F) -> F:
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            root = value = bound.arguments[arg]
            if validate is not None:
                validate(root)
            elif callable(getattr(root, "validate", None)):
                root.validate()
            for attr in attrs:
                value = getattr(value, attr)
            with claim_and_lock(value, kind):
                return fn(*args, **kwargs)
        return wrapper  # type: ignore[return-value]
    return decorate


# -- whole folders written at once ----------------------------------------------------------


def _check_replaceable(path: Path, kind: str, overwrite: bool) -> None:
    state = ownership(path, kind)  # refuses files, other kinds and folders ftlab did not write
    if state == "empty":
        foreign = [p.name for p in sorted(path.iterdir()) if not _ftlab_entry(p, frozenset())]
        if foreign:
            raise FtlabError(f"{path} holds {foreign[0]}, which ftlab did not write; ftlab never deletes it: "
                             "choose another output folder (or move it out)")
    if state == "ours" and not overwrite:
        raise FtlabError(f"{path} already holds an ftlab {kind} output; pass --overwrite to replace it, "
                         "or choose another output folder")
    if state == "ours":
        check_deletable(path, kind)


@contextlib.contextmanager
def new_dir(path: str | Path, kind: str, *, overwrite: bool = False) -> Iterator[Path]:
    """Write a whole folder at once: the ``with`` block fills a temporary sibling, which is
    then marked and renamed onto ``path``. ``path`` may be absent or empty; an ftlab folder of
    the same ``kind`` is replaced only with ``overwrite`` (moved aside, then deleted, as in
    :func:`overwrite_dir`); anything else is refused, before the block runs and again before the
    rename. If the block fails, ``path`` is left as it was. The marker lists what the block
    wrote: only those entries are deleted by a later replace. A symbolic link is followed (the
    folder it names is replaced, the link kept)."""
    path = _real(Path(path))
    _check_replaceable(path, kind, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{kind}-{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        write_marker(tmp, kind, entries=[p.name for p in tmp.iterdir()])
        _check_replaceable(path, kind, overwrite)
        trash = None
        if path.exists():
            trash = path.with_name(f".{path.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
            with RunLock(path):
                os.rename(path, trash)
        try:
            os.rename(tmp, path)
        except OSError as e:
            if trash is not None:
                os.rename(trash, path)
            raise FtlabError(f"{path}: could not move the new output into place ({e.strerror}); "
                             "did another command create it meanwhile?") from None
        if trash is not None:
            shutil.rmtree(trash, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

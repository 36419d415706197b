"""Cache location and crash-safe writes: a killed process (or a power cut after the call
returned) never leaves half a file or a missing folder.

Durability rules used throughout:

* a file is written under a temp name beside its target, ``fsync``-ed, renamed onto the
  target with :func:`os.replace`, and then the *folder* is fsynced (:func:`fsync_dir`): the
  rename itself is only durable once the folder's entry is on disk;
* a folder is replaced by a two-phase commit (see :func:`atomic_dir` and
  :func:`recover_dir`), never left missing whatever instant the process dies at.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import mmap
import os
import re
import shutil
import tempfile
import time
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Iterator

from ftlab.errors import FtlabError, damaged

try:  # POSIX only; without it commits are not serialised between processes (Windows)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]


def cache_dir() -> Path:
    """The ftlab cache: ``$FTLAB_CACHE`` if set, else ``~/.cache/ftlab``. Created on demand."""
    path = Path(os.environ.get("FTLAB_CACHE", Path.home() / ".cache" / "ftlab")).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- fsync helpers --------------------------------------------------------------------------------
def fsync_dir(path: str | Path) -> None:
    """Make the entries of folder ``path`` durable (a rename, create or delete in it survives a
    power cut only after this). A no-op where folders cannot be opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover - Windows, or a filesystem without folder handles
        return
    try:
        os.fsync(fd)
    except OSError as e:  # pragma: no cover - some filesystems refuse fsync on folders
        if e.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    """Flush file ``path``'s content to disk (for files written by a library by name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """fsync every file and folder under ``path`` (files first, each folder after its entries)."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            full = os.path.join(root, name)
            if not os.path.islink(full):
                fsync_file(full)
        fsync_dir(root)


# -- files ----------------------------------------------------------------------------------------
_CHUNK = 1 << 20


def file_sha256(path: str | Path) -> str:
    """The sha256 (hex) of file ``path`` (:func:`file_digest`)."""
    return str(file_digest(path, "sha256"))


# The checksums of the stores ftlab writes (feature datastores, probe feature chunks): a CRC-32,
# the fast check made before a file's first read (zlib: 2-4 GB/s on one core), and a SHA-256,
# the strong one (1.8 GB/s). A record lists each under its name.
CHECKSUMS = ("crc32", "sha256")


def checksums(data: bytes) -> dict[str, int | str]:
    """``{"crc32": int, "sha256": hex}`` of ``data`` (the record of what a store just wrote)."""
    return {"crc32": zlib.crc32(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digest(path: str | Path, kind: str) -> int | str:
    """``kind`` ("crc32" or "sha256", as :func:`checksums` gives them) of file ``path``'s
    content, over a read-only map of the file: no copy into Python buffers (3x faster than
    reading blocks on a box with slow memcpy)."""
    if kind not in CHECKSUMS:
        raise ValueError(f"unknown checksum {kind!r}; one of {CHECKSUMS}")
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        with (mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else contextlib.nullcontext(b"")) as data:
            if size and hasattr(data, "madvise"):
                data.madvise(mmap.MADV_SEQUENTIAL)
            return hashlib.sha256(data).hexdigest() if kind == "sha256" else zlib.crc32(data)


def checksum_to_check(record: dict[str, Any], strong: bool = False) -> str | None:
    """Which checksum of ``record`` to check a file against: its CRC-32 (with ``strong``: its
    SHA-256) if listed, else the other one; None if it lists neither (an unverifiable record)."""
    return next((k for k in (CHECKSUMS[::-1] if strong else CHECKSUMS) if k in record), None)


def copy_hashed(source: IO[bytes], out: IO[bytes]) -> tuple[str, int]:
    """Copy stream ``source`` into ``out``; return the copied bytes' sha256 (hex) and size."""
    digest, size = hashlib.sha256(), 0
    while block := source.read(_CHUNK):
        digest.update(block)
        size += len(block)
        out.write(block)
    return digest.hexdigest(), size


@contextmanager
def atomic_file(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """Open a temp file beside ``path`` for writing; on success it is fsynced, renamed onto
    ``path`` in one step and the folder fsynced; on failure removed. So ``path`` is never seen
    half-written, and once the ``with`` block is left the new content survives a power cut."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Like :func:`atomic_file` for libraries that write a file by name (``safetensors``'
    ``save_file``, ``torch.save``): yields a temp path beside ``path``; on success the file
    written there is fsynced, renamed onto ``path`` and the folder fsynced."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_file`)."""
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


# -- folders --------------------------------------------------------------------------------------
def _staged(path: Path) -> Path:
    """Where a complete, fsynced new version waits during a commit (the commit point)."""
    return path.with_name(f".{path.name}.new")


def _old(path: Path) -> Path:
    """Where the previous version sits between the two renames of a commit."""
    return path.with_name(f".{path.name}.old")


def _temp_re(path: Path) -> re.Pattern:
    # tempfile.mkdtemp(prefix=".NAME.", suffix=".tmp") adds 8 characters from [a-z0-9_].
    return re.compile(re.escape(f".{path.name}.") + r"[a-z0-9_]{8}\.tmp")


@contextmanager
def _commit_lock(parent: Path) -> Iterator[None]:
    """Serialise commits and recoveries in folder ``parent`` between processes (an advisory
    ``flock`` on the folder itself: nothing is created, the kernel drops it when the holder dies)."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    try:
        fd = os.open(parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # pragma: no cover
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # pragma: no cover - a filesystem without flock: go on unlocked
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


def _recover(path: Path, stale_after: float | None) -> str | None:
    """:func:`recover_dir`'s work, with the commit lock held."""
    staged, old, parent = _staged(path), _old(path), path.parent
    done = None
    if os.path.lexists(staged):
        # The new version was complete and durable before it got its staged name: roll forward.
        if os.path.lexists(path):
            if os.path.lexists(old):
                _remove(old)  # a half-deleted old from an earlier commit
            os.replace(path, old)
            fsync_dir(parent)
        os.replace(staged, path)
        fsync_dir(parent)
        done = "rolled forward"
    elif os.path.lexists(old) and not os.path.lexists(path):
        # Only reachable when something else removed ``path`` mid-commit: the old version is all there is.
        os.replace(old, path)
        fsync_dir(parent)
        done = "rolled back"
    if os.path.lexists(old):
        _remove(old)
        fsync_dir(parent)
        done = done or "removed the previous version"
    if stale_after is not None and parent.is_dir():
        pattern, now = _temp_re(path), time.time()
        for entry in parent.iterdir():
            try:
                stale = pattern.fullmatch(entry.name) and now - entry.lstat().st_mtime >= stale_after
            except FileNotFoundError:  # its writer just renamed or removed it
                continue
            if stale:
                shutil.rmtree(entry, ignore_errors=True)
                done = done or "removed an abandoned temp folder"
    return done


def recover_dir(path: str | Path, stale_after: float | None = None) -> str | None:
    """Finish or undo a folder replace (:func:`atomic_dir`) that a kill interrupted, so that
    ``path`` is entirely the old or entirely the new version; returns what was done (``None``:
    nothing to do). Cheap when there is nothing to do (two ``lstat`` calls).

    Call it before reading a folder that :func:`atomic_dir` writes (``atomic_dir`` itself calls
    it first). ``stale_after`` (seconds) also removes the ``.NAME.XXXXXXXX.tmp`` folders of
    killed writers last modified that long ago; a live writer's temp folder must not be taken
    for one, so pick an age no writer of ``path`` takes (``0``: only when no other process can
    be writing ``path``). By default temp folders are left alone.
    """
    path = Path(path)
    staged, old = _staged(path), _old(path)
    if not (os.path.lexists(staged) or os.path.lexists(old) or stale_after is not None):
        return None
    if not path.parent.is_dir():
        return None
    with _commit_lock(path.parent):
        return _recover(path, stale_after)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside ``path``; on success it replaces ``path`` as a whole.

    Kill safety (a two-phase commit, chosen over a symlink swap so that ``path`` stays a plain
    folder for every other tool):

    1. the body writes into ``.NAME.XXXXXXXX.tmp``; every file and folder in it is then fsynced;
    2. the temp folder is renamed to ``.NAME.new`` (fsync of the parent) -- the commit point:
       from here on the new version is complete and durable and a recovery rolls forward;
    3. ``path`` is renamed to ``.NAME.old``, then ``.NAME.new`` to ``path`` (parent fsynced after
       each rename);
    4. ``.NAME.old`` is deleted.

    A kill at any instant leaves one of: only the old ``path`` (+ an ignorable temp folder,
    which ``recover_dir(path, stale_after=...)`` removes),
    the staged new version beside the old ``path``, the staged new version beside
    ``.NAME.old`` (no ``path``: the only window where ``path`` is missing, between two
    renames), or the new ``path`` beside (part of) ``.NAME.old``. :func:`recover_dir` turns
    each into a whole old or whole new ``path``; it runs at the start of every ``atomic_dir``
    and readers should call it before reading. Commits and recoveries in one parent folder are
    serialised by an ``flock`` on that folder, so a reader's recovery never races a commit, and
    two processes replacing the same ``path`` at once each commit whole (the last one wins). A
    reader running *while* a commit is in progress can still find ``path`` missing for the
    instant between its two renames (``recover_dir`` then waits for the commit to finish).

    If the body raises, ``path`` keeps its previous content and the temp folder is removed.
    If the commit itself fails (e.g. the disk is full), it is completed or undone at once.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_dir(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    parent, staged, old = path.parent, _staged(path), _old(path)
    with _commit_lock(parent):
        try:
            if os.path.lexists(staged):  # pragma: no cover - a stale one after a failed recovery
                _remove(staged)
            os.replace(tmp, staged)
            fsync_dir(parent)
            if os.path.lexists(path):
                if os.path.lexists(old):
                    _remove(old)
                os.replace(path, old)
                fsync_dir(parent)
            os.replace(staged, path)
            fsync_dir(parent)
            if os.path.lexists(old):
                _remove(old)
                fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            try:
                _recover(path, stale_after=None)
            except OSError:  # pragma: no cover - the next atomic_dir / recover_dir finishes it
                pass
            raise


# -- manifests: what a folder held when it was written ---------------------------------------------
MANIFEST = "ftlab-manifest.json"


def write_manifest(folder: str | Path, **meta: Any) -> None:
    """Record the sha256 and size of every file under ``folder`` in ``folder/ftlab-manifest.json``
    (with ``meta``, plain JSON values, beside them). Call it last, inside the :func:`atomic_dir`
    that writes the folder, so the manifest is committed with the files it describes."""
    folder = Path(folder)
    files = {p.relative_to(folder).as_posix(): {"sha256": file_sha256(p), "size": p.stat().st_size}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"version": 1, "files": files, **meta}, indent=2, sort_keys=True)
                                   + "\n", encoding="utf-8")


def verify_manifest(folder: str | Path, remedy: str, *, exact: bool = True) -> dict[str, Any] | None:
    """Check every file of ``folder`` against its ``ftlab-manifest.json``: present, of the size and
    sha256 recorded when it was written (and, with ``exact``, no file the manifest does not list).
    Returns the manifest (None: the folder has none: written by an ftlab before manifests).

    Raises:
        FtlabError: one line naming the first file that differs, ending with ``remedy``.
    """
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        files = manifest["files"]
        expected = {str(name): (str(v["sha256"]), int(v["size"])) for name, v in files.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise damaged(path, e, remedy) from None
    for name, (sha, size) in sorted(expected.items()):
        file = folder / name
        if not file.is_file():
            raise FtlabError(f"{file} is missing (listed in {path}); {remedy}")
        actual = file.stat().st_size
        if actual != size:
            raise FtlabError(f"{file} is damaged (it has {actual} bytes, {size} were written: cut or edited); "
                             f"{remedy}")
        if file_sha256(file) != sha:
            raise FtlabError(f"{file} is damaged (its sha256 differs from the one recorded when it was written, "
                             f"in {path.name}: a flipped bit or an edit); {remedy}")
    if exact:
        extra = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                       if p.is_file() and p.name != MANIFEST and p.relative_to(folder).as_posix() not in expected)
        if extra:
            raise FtlabError(f"{folder / extra[0]} was not written with the rest of {folder} (it is not in "
                             f"{path.name}); {remedy}")
    return manifest


# -- JSON values ----------------------------------------------------------------------------------
def json_sha256(obj: Any) -> str:
    """The sha256 (hex) of a JSON value, written canonically (sorted keys): the same for the value
    in memory and as read back from a JSON file."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()

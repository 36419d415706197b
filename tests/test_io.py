import pytest

from ftlab.io import atomic_dir, atomic_file, atomic_write_json, cache_dir


class _Boom(Exception):
    pass


def test_atomic_file_keeps_the_old_content_on_failure(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(_Boom):
        with atomic_file(path) as f:
            f.write("half of the new")
            raise _Boom
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]  # no temp file left behind
    with atomic_file(path, "wb") as f:
        f.write(b"new")
    assert path.read_bytes() == b"new"


def test_atomic_dir_replaces_whole_folders_only(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "a").write_text("1")
    with pytest.raises(_Boom):
        with atomic_dir(target) as tmp:
            (tmp / "b").write_text("2")
            raise _Boom
    assert sorted(p.name for p in target.iterdir()) == ["a"]
    with atomic_dir(target) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in target.iterdir()) == ["c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()
    atomic_write_json(cache_dir() / "x.json", {"b": 1, "a": [2]})
    assert (tmp_path / "c" / "x.json").read_text() == '{\n  "a": [\n    2\n  ],\n  "b": 1\n}\n'


# -- kill safety of the folder replace -------------------------------------------------------
# A kill is simulated in a forked child that dies (os._exit: no cleanup handler runs) at the k-th
# call of a file-system primitive during atomic_dir's commit; the parent then checks that after
# recover_dir the target is entirely the old or entirely the new version, never missing or mixed.

import os  # noqa: E402
import shutil  # noqa: E402

import ftlab.io as fio  # noqa: E402
from ftlab.io import atomic_path, fsync_dir, recover_dir  # noqa: E402

OLD = {"a.txt": "old a", "sub/b.txt": "old b"}
NEW = {"a.txt": "new a", "c.txt": "new c", "sub/d.txt": "new d"}


def _write_tree(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


def _tree(root):
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*")) if p.is_file()}


def _make_old(target):
    with atomic_dir(target) as tmp:
        _write_tree(tmp, OLD)
    assert _tree(target) == OLD


def _die_at(monkeypatch, name, k, module=os):
    """Patch ``module.name`` so that its k-th call (1-based) kills the process before it runs."""
    real, calls = getattr(module, name), {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == k:
            os._exit(17)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, dying)


def _killed_replace(target, monkeypatch, name, k, module=os):
    """Fork a child that replaces ``target`` by NEW and dies at call k of ``module.name``;
    returns True if the child died there (False: it finished without reaching call k)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _die_at(monkeypatch, name, k, module)
            with atomic_dir(target) as tmp:
                _write_tree(tmp, NEW)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) == 17


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("primitive", ["replace", "fsync", "rmtree"])
def test_a_kill_at_every_step_of_the_replace_leaves_old_or_new(tmp_path, monkeypatch, primitive):
    module = shutil if primitive == "rmtree" else os
    outcomes = []
    for k in range(1, 40):
        root = tmp_path / f"{primitive}-{k}"
        root.mkdir()
        target = root / "ckpt"
        _make_old(target)
        died = _killed_replace(target, monkeypatch, primitive, k, module)
        recover_dir(target)  # what a reader does
        state = _tree(target)
        assert state in (OLD, NEW), (primitive, k, state)
        outcomes.append(state == NEW)
        # The next writer writes normally; no leftovers once old temp folders are swept.
        with atomic_dir(target) as tmp:
            (tmp / "x").write_text("x")
        recover_dir(target, stale_after=0)
        assert sorted(p.name for p in root.iterdir()) == ["ckpt"] and _tree(target) == {"x": "x"}
        if not died:
            break
    else:
        pytest.fail(f"the commit used more than 39 {primitive} calls")
    assert outcomes[-1]  # finished: new
    if primitive != "rmtree":  # (the only rmtree call deletes the old version, after the commit)
        assert not outcomes[0]  # killed at the first call: still old
    # os.replace: 3 renames; os.fsync: 3 new files, 2 new folders, the parent after 3 renames + 1 delete.
    assert k - 1 == {"replace": 3, "fsync": 9, "rmtree": 1}[primitive]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_kill_while_deleting_the_old_version_is_cleaned_up(tmp_path, monkeypatch):
    target = tmp_path / "ckpt"
    _make_old(target)
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child dies half way through deleting .ckpt.old
        def half_rmtree(p, *a, **kw):
            next(f for f in sorted(p.rglob("*")) if f.is_file()).unlink()
            os._exit(17)
        monkeypatch.setattr(fio, "_remove", half_rmtree)
        with atomic_dir(target) as tmp:
            _write_tree(tmp, NEW)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 17
    assert (tmp_path / ".ckpt.old").is_dir() and _tree(target) == NEW
    assert recover_dir(target) == "removed the previous version"
    assert _tree(target) == NEW and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_an_error_mid_commit_is_completed_or_undone_at_once(tmp_path, monkeypatch, k):
    target = tmp_path / "ckpt"
    _make_old(target)
    real, calls = os.replace, {"n": 0}

    def failing(*args):
        calls["n"] += 1
        if calls["n"] == k:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(os, "replace", failing)
    with pytest.raises(OSError, match="No space"):
        with atomic_dir(target) as tmp:
            _write_tree(tmp, NEW)
    monkeypatch.undo()
    # k=1: the staging rename failed: still old. k>=2: staged, so rolled forward to new.
    assert _tree(target) == (OLD if k == 1 else NEW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_recover_dir_states(tmp_path):
    target = tmp_path / "d"
    assert recover_dir(target) is None and recover_dir(tmp_path / "no" / "parent") is None
    # staged beside old path (killed right after the commit point): forward
    _write_tree(target, OLD)
    _write_tree(tmp_path / ".d.new", NEW)
    assert recover_dir(target) == "rolled forward" and _tree(target) == NEW
    # staged beside .old, no path (killed between the two renames): forward
    shutil.move(target, tmp_path / ".d.old")
    _write_tree(tmp_path / ".d.new", {"z": "z"})
    assert recover_dir(target) == "rolled forward" and _tree(target) == {"z": "z"}
    # only .old (path removed by someone else): back
    shutil.move(target, tmp_path / ".d.old")
    assert recover_dir(target) == "rolled back" and _tree(target) == {"z": "z"}
    # abandoned temp folders are removed only when asked, and only when old enough
    (tmp_path / ".d.abcd1234.tmp").mkdir()
    (tmp_path / ".dx.abcd1234.tmp").mkdir()  # another target's: kept
    assert recover_dir(target) is None and (tmp_path / ".d.abcd1234.tmp").exists()
    with atomic_dir(target) as tmp:  # nor does a writer touch them (they may be a live writer's)
        _write_tree(tmp, {"z": "z"})
    assert recover_dir(target, stale_after=3600) is None and (tmp_path / ".d.abcd1234.tmp").exists()
    os.utime(tmp_path / ".d.abcd1234.tmp", (1, 1))
    assert recover_dir(target, stale_after=3600) == "removed an abandoned temp folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dx.abcd1234.tmp", "d"]


def test_files_and_folders_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}") if os.path.exists("/proc/self/fd") else fd)
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    with atomic_file(tmp_path / "f.txt") as f:
        f.write("x")
    with atomic_path(tmp_path / "g.bin") as tmp:
        tmp.write_bytes(b"y")
    with atomic_dir(tmp_path / "d") as tmp:
        _write_tree(tmp, NEW)
    fsync_dir(tmp_path)
    if not os.path.exists("/proc/self/fd"):
        return
    names = [os.path.basename(p) for p in synced]
    assert names[0].startswith(".f.txt.") and names[1] == tmp_path.name  # the file, then its folder
    assert names[2].startswith(".g.bin.") and names[3] == tmp_path.name
    assert {"a.txt", "c.txt", "d.txt", "sub"} <= set(names)  # every file and folder of the new version
    assert names.count(tmp_path.name) >= 5  # and the parent after each rename
    assert (tmp_path / "g.bin").read_bytes() == b"y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "f.txt", "g.bin"]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_two_processes_replacing_one_folder_each_commit_whole(tmp_path):
    target = tmp_path / "d"
    pids = []
    for who in ("a", "b"):
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the children
            code = 0
            try:
                for i in range(30):
                    with atomic_dir(target) as tmp:
                        _write_tree(tmp, {f"{who}{j}": f"{who}{i}" for j in range(3)})
            except BaseException:
                code = 5
            finally:
                os._exit(code)
        pids.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in pids] == [0, 0]
    tree = _tree(target)
    assert tree in ({f"a{j}": "a29" for j in range(3)}, {f"b{j}": "b29" for j in range(3)})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]

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

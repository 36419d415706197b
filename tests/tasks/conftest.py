"""Fixtures for the task tests: an isolated cache and a small fake BIG-bench archive."""

from pathlib import Path

import pytest

from ftlab.tasks import bigbench

from fake_bigbench import TASK_FILES, make_tarball


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """An empty ftlab cache; the tarball env var is cleared so nothing outside it is used."""
    monkeypatch.setenv("FTLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(bigbench.TARBALL_ENV, raising=False)
    return tmp_path / "cache"


@pytest.fixture
def fake_tarball(tmp_path) -> Path:
    return make_tarball(tmp_path / "bigbench-1.0.0.tar.gz", TASK_FILES)

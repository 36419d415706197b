"""The YAML recipes shipped inside the package (``ftlab train -c sentiment-lora``...).

They are package data (``importlib.resources``), so a config name works from a wheel as from
a source checkout; a path to any YAML file works everywhere."""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

_FILES = contextlib.ExitStack()  # extracted copies, when the package is not on a filesystem (zip)
atexit.register(_FILES.close)


def packaged_configs() -> list[str]:
    """The names of the packaged configs (file names without ``.yaml``), sorted."""
    return sorted(f.name[:-5] for f in resources.files(__name__).iterdir() if f.name.endswith(".yaml"))


def packaged_config(name: str) -> Path | None:
    """The file of packaged config ``name`` (``"demo"`` or ``"demo.yaml"``), or None."""
    stem = name.removesuffix(".yaml")
    if "/" in stem or "\\" in stem or stem not in packaged_configs():
        return None
    return _FILES.enter_context(resources.as_file(resources.files(__name__) / f"{stem}.yaml"))

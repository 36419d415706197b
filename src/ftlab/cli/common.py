"""Helpers shared by the CLI modules: tables and config lookup (no library logic here)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from ftlab.configs import packaged_config, packaged_configs
from ftlab.errors import FtlabError


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Rows as a plain-text table with left-aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def config_path(config: Optional[str]) -> Optional[Path]:
    """A config given by path (an existing file wins), or by the name of a config packaged with
    ftlab (``demo`` -> ftlab/configs/demo.yaml, see :mod:`ftlab.configs`)."""
    if config is None:
        return None
    path = Path(config)
    if path.exists():
        return path
    packaged = packaged_config(config)
    if packaged is None:
        stem = config.removesuffix(".yaml")
        old = Path(__file__).resolve().parents[3] / "configs" / f"{stem}.yaml"  # before configs were packaged
        hint = (f" ({old} is in the checkout's old configs/ folder: pass its path, or move it into "
                f"src/ftlab/configs/ to package it)" if old.is_file() else "")
        raise FtlabError(f"config file {config} not found; give a YAML path or a packaged config: "
                         f"{', '.join(packaged_configs())}{hint}")
    return packaged

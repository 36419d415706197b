"""Helpers shared by the CLI modules: tables and config lookup (no library logic here)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

CONFIGS = Path(__file__).resolve().parents[3] / "configs"


def table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Rows as a plain-text table with left-aligned columns."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def config_path(config: Optional[str]) -> Optional[Path]:
    """A config given by path, or by the name of a file in configs/ (``demo`` -> configs/demo.yaml)."""
    if config is None:
        return None
    path = Path(config)
    if not path.exists() and (CONFIGS / f"{config}.yaml").exists():
        return CONFIGS / f"{config}.yaml"
    return path

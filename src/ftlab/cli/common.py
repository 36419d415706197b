"""Helpers shared by the CLI modules: tables and config lookup (no library logic here)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

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


def resolved_config(cls: type, config: Optional[str], overrides: Optional[list[str]], *, show: bool = False,
                    overwrite_kind: Optional[str] = None) -> Any:
    """The config of a command: ``cls`` from defaults <- ``config`` (a path or packaged name) <-
    ``key=value`` overrides, validated. ``show``: print it as YAML and return None (``--show-config``).
    ``overwrite_kind``: first delete its ``output_dir``, a folder ftlab wrote for that kind of
    command (``--overwrite``; anything else is refused, never deleted)."""
    import typer
    import yaml

    from ftlab.config import load_config, to_dict

    cfg = load_config(cls, config_path(config), list(overrides or []))
    if show:
        typer.echo(yaml.safe_dump(to_dict(cfg), sort_keys=False))
        cost = optimizer_cost(cfg)
        if cost:
            typer.echo(f"# {cost}")
        return None
    if overwrite_kind is not None:
        from ftlab.runs import overwrite_dir

        overwrite_dir(cfg.output_dir, overwrite_kind)
    return cfg


def optimizer_cost(cfg: Any) -> str | None:
    """What one step of a config's zeroth-order optimizer costs (forwards, extra memory), as the
    optimizer states it, measured on one 576 x 576 matrix (SmolLM2's hidden size); None for
    other configs."""
    optimizer = getattr(cfg, "optimizer", None)
    zo = getattr(cfg, "zo", None)
    if not isinstance(optimizer, str) or zo is None:
        return None
    import torch

    from ftlab.optim import is_zeroth_order
    from ftlab.zo import build_zo_optimizer

    if not is_zeroth_order(optimizer):
        return None
    probe = build_zo_optimizer(optimizer, [torch.nn.Parameter(torch.zeros(576, 576))], cfg.lr, zo, 0)
    return f"{probe.cost()} (on a 576 x 576 matrix)"


def drawn(*pngs: str | Path) -> list[str | Path]:
    """The PNGs a command drew, for its closing line: ``pngs``, or none without matplotlib."""
    from ftlab.plots import available

    return list(pngs) if available() else []


def note_skipped_plots() -> None:
    """Say, in one line on stderr, that a command drew no PNG because matplotlib (the plot
    extra) is missing; silent when it is installed."""
    import typer

    from ftlab.plots import SKIPPED, available

    if not available():
        typer.echo(SKIPPED, err=True)


class ProgressBars:
    """One tqdm bar per named stage, fed ``(name, done, total)`` by a library progress callback
    (``absolute``: ``done`` is the count so far, else the increment)."""

    def __init__(self, unit: str = "ex", absolute: bool = False) -> None:
        self.unit, self.absolute, self.bars = unit, absolute, {}

    def __call__(self, name: str, done: int, total: int) -> None:
        from tqdm.auto import tqdm

        if name not in self.bars:
            self.bars[name] = tqdm(total=total, desc=name, unit=self.unit, leave=False)
        bar = self.bars[name]
        bar.update(done - bar.n if self.absolute else done)

    def close(self) -> None:
        for bar in self.bars.values():
            bar.close()

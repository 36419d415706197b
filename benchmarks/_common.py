"""What the benchmark scripts share: the results folder, the machine's state, timing, a table, JSON.

Every script prints a table and writes JSON under ``benchmarks/results/``; ratios are measured side
by side in one run, with the machine's load recorded before and after (these machines are noisy).

    from _common import RESULTS, machine, write_json, table, timed, median
    from _common import clock, interleaved      # one timed block; methods compared round by round

Memory (/proc, peak RSS) is read by ftlab.memory (status_bytes, meminfo_bytes, reset_peak).
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Iterable

RESULTS = Path(__file__).resolve().parent / "results"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine(**extra: Any) -> dict[str, Any]:
    """The machine and its state now: cores, torch threads, versions, load average, time."""
    import torch

    state = {"cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__,
             "transformers": package_version("transformers"), "python": sys.executable,
             "processor": platform.processor() or platform.machine(), "loadavg": os.getloadavg(),
             "time": time.strftime("%Y-%m-%d %H:%M:%S")}
    if torch.cuda.is_available():
        state["gpu"] = torch.cuda.get_device_name(0)
    return {**state, **extra}


def write_json(path: str | Path, data: Any) -> Path:
    """``data`` as indented JSON at ``path`` (relative paths go under RESULTS), written atomically."""
    path = Path(path)
    if not path.is_absolute():
        path = RESULTS / path
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_json(path: str | Path, default: Any = None) -> Any:
    """The JSON at ``path`` (relative paths under RESULTS), or ``default`` when it does not exist."""
    path = Path(path)
    if not path.is_absolute():
        path = RESULTS / path
    return json.loads(path.read_text()) if path.exists() else default


def table(rows: Iterable[Iterable[Any]], header: Iterable[Any], markdown: bool = False) -> str:
    """Rows as a plain-text table with left-aligned columns (floats to 4 significant digits), or
    with ``markdown`` as a Markdown table (to paste into BENCHMARKS.md)."""
    fmt = lambda c: f"{c:.4g}" if isinstance(c, float) else str(c)  # noqa: E731
    header = [fmt(c) for c in header]
    rows = [[fmt(c) for c in r] for r in rows]
    if markdown:
        line = lambda r: "| " + " | ".join(r) + " |"  # noqa: E731
        return "\n".join([line(header), "|" + "---|" * len(header), *map(line, rows)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


class clock:
    """``with clock() as c: ...``, then ``c.seconds``: the wall seconds of the block (``sync``
    before and after it, e.g. ``torch.cuda.synchronize``, so queued device work is counted)."""

    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync, self.seconds = sync, float("nan")

    def __enter__(self) -> clock:
        if self.sync:
            self.sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.sync:
            self.sync()
        self.seconds = time.perf_counter() - self.start


def timed(fn: Callable[[], Any], repeats: int, warmup: int = 1, sync: Callable[[], None] | None = None
          ) -> list[float]:
    """Wall seconds of ``repeats`` calls of ``fn`` after ``warmup`` untimed ones (``sync`` after each,
    e.g. ``torch.cuda.synchronize``)."""
    for _ in range(warmup):
        fn()
        if sync:
            sync()
    times = []
    for _ in range(repeats):
        with clock(sync) as c:
            fn()
        times.append(c.seconds)
    return times


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1, order: str = "shuffle",
                sync: Callable[[], None] | None = None,
                after_round: Callable[[int, dict[str, list[float]]], None] | None = None) -> dict[str, list[float]]:
    """Wall seconds of each of ``fns`` per round, side by side: ``warmup`` untimed calls of each,
    then ``repeats`` rounds calling each once, in an order that changes every round (``shuffle``:
    the last round's order shuffled by ``random.Random(round)``; ``rotate``: shifted by one), so
    drift and other jobs on the machine hit them alike. ``after_round(r, times)`` after each."""
    if order not in ("shuffle", "rotate"):
        raise ValueError(f"order is 'shuffle' or 'rotate', not {order!r}")
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
            if sync:
                sync()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        if order == "shuffle":
            random.Random(r).shuffle(names)
        this_round = names[r % len(names):] + names[:r % len(names)] if order == "rotate" else names
        for name in this_round:
            with clock(sync) as c:
                fns[name]()
            times[name].append(c.seconds)
        if after_round:
            after_round(r, times)
    return times


def median(xs: Iterable[float]) -> float:
    return statistics.median(list(xs))

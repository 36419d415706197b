"""Peak CPU memory of a stretch of work in this process (Linux): the resident set's high-water
mark (``VmHWM``), reset at the start of each stretch (``/proc/self/clear_refs``) after the
allocator has handed its free memory back (``malloc_trim``), so the peak counts what the work
itself allocated. Elsewhere every reading is None."""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
from pathlib import Path

_STATUS = Path("/proc/self/status")
_CLEAR = Path("/proc/self/clear_refs")


def _status_bytes(key: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # kB
    except OSError:
        pass
    return None


def _trim() -> None:
    gc.collect()
    name = ctypes.util.find_library("c")
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


class PeakMemory:
    """``start()`` a window; ``peak()`` is the peak resident memory since then over the resident
    memory at the start (bytes; None where not measurable)."""

    def __init__(self) -> None:
        self.base: int | None = None

    def start(self) -> PeakMemory:
        _trim()
        try:
            _CLEAR.write_text("5")  # resets VmHWM to the current resident size
        except OSError:
            self.base = None
            return self
        self.base = _status_bytes("VmRSS")
        return self

    def peak(self) -> int | None:
        high = _status_bytes("VmHWM")
        return None if high is None or self.base is None else max(0, high - self.base)

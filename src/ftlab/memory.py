"""CPU memory of this process and of the machine, read in one place (Linux ``/proc``; elsewhere
every reading is None, except :func:`lifetime_peak_bytes`).

* :func:`status_bytes` -- a field of ``/proc/self/status``: ``VmRSS`` (resident now),
  ``VmHWM`` (the resident set's high-water mark).
* :func:`meminfo_bytes` -- a field of ``/proc/meminfo``: ``MemAvailable``, ``Cached``, ...
* :func:`reset_peak` -- hand the allocator's free memory back (``malloc_trim``) and restart
  ``VmHWM`` at the resident size (``5 > /proc/self/clear_refs``).
* :func:`lifetime_peak_bytes` -- the peak resident set as ``getrusage`` reports it
  (``ru_maxrss``, macOS too; on Linux it follows ``VmHWM``, restarts included).
* :class:`PeakMemory` -- the peak of a stretch of work over the memory at its start: what the
  work itself allocated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import resource
import sys
from pathlib import Path

_STATUS = Path("/proc/self/status")
_MEMINFO = Path("/proc/meminfo")
_CLEAR = Path("/proc/self/clear_refs")


def _kb_field(path: Path, key: str) -> int | None:
    """A ``key:  N kB`` line of a /proc file, in bytes (None where it cannot be read)."""
    try:
        for line in path.read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def status_bytes(key: str) -> int | None:
    """A memory field of this process (``VmRSS``, ``VmHWM``, ...) in bytes."""
    return _kb_field(_STATUS, key)


def meminfo_bytes(key: str) -> int | None:
    """A field of the machine's memory (``MemAvailable``, ``Cached``, ...) in bytes."""
    return _kb_field(_MEMINFO, key)


def available_host_bytes() -> int | None:
    """``MemAvailable``: the CPU memory that can be allocated without swapping, in bytes."""
    return meminfo_bytes("MemAvailable")


def trim_heap() -> None:
    """Hand the allocator's free memory back to the OS (glibc's ``malloc_trim``; a no-op elsewhere)."""
    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError, TypeError):  # not glibc
        pass


def reset_peak() -> int | None:
    """Trim the heap and restart this process's ``VmHWM`` at its resident size; returns that
    size (``VmRSS``, bytes): ``status_bytes("VmHWM")`` minus it, after some work, is the work's
    extra peak memory. None where ``/proc/self/clear_refs`` cannot be written."""
    trim_heap()
    try:
        _CLEAR.write_text("5")
    except OSError:
        return None
    return status_bytes("VmRSS")


def lifetime_peak_bytes() -> int:
    """The peak resident set of this process in bytes, as ``getrusage`` reports it (``ru_maxrss``:
    kB on Linux, bytes on macOS). On Linux it is about ``VmHWM`` and restarts with it (at
    :func:`reset_peak`), and a forked child's starts from its parent's."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


class PeakMemory:
    """``start()`` a window; ``peak()`` is the peak resident memory since then over the resident
    memory at the start (bytes; None where not measurable). The start collects garbage and
    trims the heap first, so the peak counts what the work itself allocated."""

    def __init__(self) -> None:
        self.base: int | None = None

    def start(self) -> PeakMemory:
        gc.collect()
        self.base = reset_peak()
        return self

    def peak(self) -> int | None:
        high = status_bytes("VmHWM")
        return None if high is None or self.base is None else max(0, high - self.base)

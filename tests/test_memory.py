"""The one /proc memory reader: PeakMemory measures what a stretch of work allocated (Linux
/proc), not what was there before; the readings it is made of."""

import os

import pytest
import torch

from ftlab.memory import (
    PeakMemory,
    available_host_bytes,
    lifetime_peak_bytes,
    meminfo_bytes,
    reset_peak,
    status_bytes,
)

pytestmark = pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc")


def test_the_peak_counts_an_allocation_made_and_freed_inside_the_window():
    kept = torch.ones(16 << 20)  # 64 MiB held from before: not counted
    memory = PeakMemory().start()
    quiet = memory.peak()
    made = torch.ones(32 << 20)  # 128 MiB, touched
    del made
    peak = memory.peak()
    assert quiet < 16 * 2**20
    assert 120 * 2**20 < peak < 200 * 2**20, peak / 2**20
    assert memory.peak() == peak  # freed, the peak stays
    assert kept.sum() > 0


def test_the_readings_and_the_reset():
    rss = status_bytes("VmRSS")
    assert 10 * 2**20 < rss < 64 * 2**30  # torch is imported
    assert status_bytes("VmHWM") >= rss and status_bytes("NoSuchField") is None
    assert 0 < available_host_bytes() == meminfo_bytes("MemAvailable") < meminfo_bytes("MemTotal")
    base = reset_peak()
    assert abs(status_bytes("VmHWM") - base) < 16 * 2**20  # restarted at the resident size
    made = torch.ones(32 << 20)  # 128 MiB, touched
    del made  # freed or kept by the allocator: the high-water mark saw it either way
    assert status_bytes("VmHWM") >= base + 120 * 2**20
    # ru_maxrss is the process's lifetime peak (no reset): at least this window's
    assert lifetime_peak_bytes() >= status_bytes("VmHWM") - 16 * 2**20

"""PeakMemory measures what a stretch of work allocated (Linux /proc), not what was there before."""

import os

import pytest
import torch

from ftlab.memory import PeakMemory

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

"""ringattn.memstat: each probe against an independent reading of the same quantity."""

from __future__ import annotations

import os
import resource

import pytest
import torch

from ringattn import memstat


def test_live_bytes_counts_storages_once_and_frees():
    with memstat.LiveBytes() as live:
        a = torch.empty(1 << 18)  # 1 MiB
        b = a.view(-1, 2)  # a view: same storage, not counted again
        a.add_(1)  # in place: same storage
        c = a + 1  # a new MiB
        assert live.live == 2 << 20
        del c
        assert live.live == 1 << 20
        del a, b
        assert live.live == 0
    assert live.peak == 2 << 20


def test_rss_readings_in_mib():
    # ru_maxrss is KiB on Linux; statm counts pages: both must give the same MiB as memstat
    assert memstat.peak_rss_mib() == pytest.approx(
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, abs=64
    )
    with open("/proc/self/statm") as f:
        statm = int(f.read().split()[1]) * resource.getpagesize() / 2**20
    assert memstat.rss_mib("VmRSS") == pytest.approx(statm, abs=16)
    assert memstat.rss_mib("NoSuchField") is None


def test_measure_call_sees_a_new_tensor():
    keep = []
    got = memstat.measure_call(lambda: keep.append(torch.ones(1 << 20)), rss=False)  # 4 MiB
    assert got == dict(peak_live_mb=4.0, rss_growth_mb=None)


def test_saved_bytes_skips_parameters():
    w = torch.nn.Parameter(torch.ones(256, 256))  # a leaf that requires grad: not counted
    x = torch.ones(256, 256, requires_grad=True) * 2  # 256 KiB, not a leaf: counted
    saved = memstat.SavedBytes()
    with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
        (x @ w).sum().backward()
    assert saved.mib == pytest.approx(0.25)


def test_free_mib_is_some_of_the_machine():
    total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / memstat.MIB
    assert 0 < memstat.free_mib() <= total

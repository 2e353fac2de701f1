"""Memory probes of this process, shared by the benchmarks and the trainer: resident set
(now and peak), tensor bytes created by a call, and bytes autograd saves for backward.

Units: MiB = 2**20 bytes. Linux reports ``ru_maxrss`` in KiB and ``/proc/self/status`` in kB
(KiB), so both are divided by 1024. Nothing here is distributed: each rank probes itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import resource
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = [
    "MIB",
    "LiveBytes",
    "SavedBytes",
    "free_mib",
    "measure_call",
    "peak_rss_mib",
    "prepare_rss",
    "reset_peak_rss",
    "rss_mib",
]

MIB = 2**20


def peak_rss_mib() -> float:
    """The process's peak resident set since it started (``ru_maxrss`` KiB / 1024; unlike
    ``VmHWM``, :func:`reset_peak_rss` does not reset it)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_mib() -> float:
    """Free physical memory of the machine now, in MiB (``inf`` where the OS does not say).
    Not counted: memory the kernel would give back from its caches."""
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / MIB
    return float("inf")


def rss_mib(field: str = "VmRSS") -> float | None:
    """A ``/proc/self/status`` memory field in MiB: ``VmRSS`` the resident set now, ``VmHWM``
    its peak (which :func:`reset_peak_rss` resets); None where there is no such file."""
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        return next((int(ln.split()[1]) / 1024 for ln in f if ln.startswith(field + ":")), None)
    return None


def reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident set; False where the kernel does not allow it."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
        return True
    return False


def prepare_rss() -> bool:
    """mmap every allocation above 64 KiB (glibc) so RSS follows live memory; False if the
    platform cannot (then RSS growth is reported as None)."""
    with contextlib.suppress(OSError, AttributeError):
        ok = ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD
        return bool(ok) and rss_mib("VmHWM") is not None
    return False


class LiveBytes(TorchDispatchMode):
    """Tracks bytes of tensor storages created inside the mode: ``live`` now, ``peak`` max.

    Each storage counts once, from the op that returns it until it is freed. Not seen:
    scratch a fused kernel allocates inside C++ (the CPU flash kernel's tiles, under 1 MB).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._sizes: dict[int, int] = {}  # storage data_ptr -> nbytes, while alive

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # Views and in-place results alias an input: no new memory. (Their storage may also
        # predate the mode, e.g. a view of an input, and must not be counted as new.)
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        st = t.untyped_storage()
        key, n = st.data_ptr(), st.nbytes()
        if n == 0 or key in self._sizes:  # views and in-place results share a storage
            return
        self._sizes[key] = n
        self.live += n
        self.peak = max(self.peak, self.live)
        # storages keep their Python object while the C++ storage lives, so this fires
        # when the memory is actually released
        weakref.finalize(st, self._free, key, n)

    def _free(self, key: int, n: int) -> None:
        if self._sizes.pop(key, None) is not None:
            self.live -= n


def measure_call(fn, rss: bool) -> dict:
    """Run ``fn()`` once; peak extra live tensor bytes and peak RSS growth (MiB or None):
    the peak RSS is reset before the call, growth = VmHWM after - VmRSS before."""
    before = rss_mib("VmRSS") if rss and reset_peak_rss() else None
    with LiveBytes() as live:
        fn()
    growth = None if before is None else rss_mib("VmHWM") - before
    return dict(peak_live_mb=live.peak / MIB, rss_growth_mb=growth)


class SavedBytes:
    """Sums the distinct storages autograd saves for backward, parameters excluded; use
    ``pack`` as the pack hook of ``torch.autograd.graph.saved_tensors_hooks``."""

    def __init__(self):
        self.seen: dict[int, int] = {}

    def pack(self, t: torch.Tensor):
        # parameters (FSDP's unsharded ones included) are leaves that require grad
        if not (t.is_leaf and t.requires_grad):
            st = t.untyped_storage()
            self.seen[st.data_ptr()] = st.nbytes()
        return t

    @property
    def mib(self) -> float:
        return sum(self.seen.values()) / MIB

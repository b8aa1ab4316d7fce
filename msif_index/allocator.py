"""glibc malloc settings for the build: reuse freed memory instead of faulting it back in.

By default glibc hands blocks of 128 KiB and more straight to the kernel (mmap/munmap; the
threshold rises only as such blocks are freed) and gives free memory at the top of the heap back
as soon as more than 128 KiB of it is free. A build allocates and frees the same large tensors
batch after batch, so each batch faults fresh pages in again, and on a virtual machine a page
fault can cost more than the arithmetic done on the page: on this project's 2-core VM the small
CNN's gradient capture took 150-175 us per example with the defaults and 125 us with the settings
below (benchmarks/README.md; the MLP's, with smaller activations, did not change).

``keep_freed_memory()`` sets ``M_MMAP_THRESHOLD`` to 32 MiB (glibc's maximum: larger blocks still
go to mmap) and ``M_TRIM_THRESHOLD`` to 1 GiB, for the whole process, once. The price: memory freed
after the build's peak stays with the process (its RSS stays near the peak instead of shrinking).
``build_index`` calls it; set ``MSIF_MALLOC_TUNING=0`` to leave malloc alone. Elsewhere than glibc
(macOS, musl) it does nothing.
"""
from __future__ import annotations

import ctypes
import os
import platform

#: environment variable: "0" leaves malloc's settings alone
ENV = "MSIF_MALLOC_TUNING"
#: mallopt parameter numbers (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks below this come from the heap (glibc refuses more than 32 MiB on 64-bit)
MMAP_THRESHOLD = 32 << 20
#: free memory at the heap's top is given back only beyond this
TRIM_THRESHOLD = 1 << 30

_applied = False


def keep_freed_memory() -> bool:
    """Apply the settings above (once per process); True when they are in effect."""
    global _applied
    if _applied:
        return True
    if os.environ.get(ENV, "1").strip() == "0" or platform.libc_ver()[0] != "glibc":
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    _applied = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    return _applied


def _mallopt():
    try:
        fn = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn

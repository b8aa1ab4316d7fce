"""Transparent huge pages for the memory a query reads: fewer TLB misses per query.

One query reads about 12 MB spread over the process (at n = 100k, SVD128,PQ64fs, proj_dim 1024):
the finetuned model's weights and the operator B (model part), the fast-scan codes, and a few
hundred rows gathered at random from the reduced and the full rows (search part). With 4 KiB
pages each of those reads can miss the TLB, and on a virtual machine a TLB miss walks two page
tables. Backing the same memory with 2 MiB pages took 0.1-0.6 ms off a 2.6-3.3 ms query on the
2-core development VM (benchmarks/README.md), for 0.2-1.5 s spent once when the index is opened.

``use_huge_pages(buffers)`` asks the kernel (Linux, THP mode ``always`` or ``madvise``) to back
the 2 MiB-aligned interior of each buffer with huge pages now: ``madvise(MADV_HUGEPAGE)``, then
``madvise(MADV_COLLAPSE)`` (Linux 6.1+; on older kernels khugepaged collapses the range later, in
the background). The contents do not change. Anything that fails is skipped: huge pages are a
speed-up, never a requirement.
"""
from __future__ import annotations

import ctypes
import errno
import platform
from pathlib import Path
from typing import Any, Iterable

#: madvise advice values (linux/mman.h)
MADV_HUGEPAGE = 14
MADV_COLLAPSE = 25
_THP = Path("/sys/kernel/mm/transparent_hugepage")
_libc: Any = None


def huge_page_size() -> int:
    """The THP size in bytes (2 MiB on x86-64)."""
    try:
        return int((_THP / "hpage_pmd_size").read_text())
    except (OSError, ValueError):
        return 2 << 20


def available() -> bool:
    """Whether this kernel offers transparent huge pages to a process that asks (mode always/madvise)."""
    if platform.system() != "Linux":
        return False
    try:
        mode = (_THP / "enabled").read_text()
    except OSError:
        return False
    return "[never]" not in mode


def _madvise(addr: int, length: int, advice: int) -> int:
    """0, or the errno of a failed madvise."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
        _libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        _libc.madvise.restype = ctypes.c_int
    if _libc.madvise(addr, length, advice) == 0:
        return 0
    return ctypes.get_errno() or errno.EINVAL


def _address(buf: Any) -> tuple[int, int]:
    """(address, bytes) of a torch tensor, a numpy array or an (address, bytes) pair."""
    if isinstance(buf, tuple):
        return int(buf[0]), int(buf[1])
    if hasattr(buf, "data_ptr"):                       # torch
        if not buf.is_contiguous() or buf.device.type != "cpu":
            return 0, 0
        return buf.data_ptr(), buf.numel() * buf.element_size()
    if hasattr(buf, "ctypes"):                         # numpy
        return buf.ctypes.data, buf.nbytes
    raise TypeError(f"not a buffer: {type(buf).__name__}")


def use_huge_pages(buffers: Iterable[Any]) -> int:
    """Back the 2 MiB-aligned interior of each buffer with huge pages; returns the bytes collapsed
    now (0 where huge pages are unavailable, the buffer is smaller than two pages, or the kernel
    declined)."""
    if not available():
        return 0
    size = huge_page_size()
    done = 0
    for buf in buffers:
        addr, nbytes = _address(buf)
        start = (addr + size - 1) // size * size
        stop = (addr + nbytes) // size * size
        if stop <= start:
            continue
        if _madvise(start, stop - start, MADV_HUGEPAGE):
            continue
        if _madvise(start, stop - start, MADV_COLLAPSE) == 0:
            done += stop - start
    return done


def packed_on_huge_pages(tensors: list[Any]) -> list[Any]:
    """Copies of CPU tensors laid out one after another (64-byte aligned) in one buffer that starts
    on a huge-page boundary, which is then backed by huge pages where available. Small tensors (a
    model's parameters) gain only this way: each alone is smaller than a huge page."""
    import torch

    size = huge_page_size()
    offsets, total = [], 0
    for t in tensors:
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 64) * 64
    span = -(-max(total, 1) // size) * size
    raw = torch.empty(span + size, dtype=torch.uint8)
    start = (-raw.data_ptr()) % size
    out = []
    for t, off in zip(tensors, offsets):
        nbytes = t.numel() * t.element_size()
        view = raw[start + off:start + off + nbytes].view(t.dtype).view(t.shape)
        view.copy_(t)
        out.append(view)
    use_huge_pages([raw[start:start + span]])
    return out


def huge_page_bytes() -> int:
    """Bytes of this process's anonymous memory backed by huge pages now (0 when unknown)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0

"""msif_index.allocator: glibc malloc keeps freed memory for reuse once the build tuned it."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from msif_index import allocator

# run in a fresh interpreter: the settings are process-wide and this process's heap is not fresh
PROBE = r"""
import ctypes, json
from msif_index.allocator import keep_freed_memory


class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
applied = keep_freed_memory()
size = 24 << 20                      # above glibc's default mmap threshold, below the tuned one
m0 = libc.mallinfo2()
p = libc.malloc(size)
ctypes.memset(p, 1, size)
m1 = libc.mallinfo2()
libc.free(p)
m2 = libc.mallinfo2()
print(json.dumps({"applied": applied, "mmapped": m1.hblkhd - m0.hblkhd, "heap_in_use": m1.uordblks - m0.uordblks,
                  "heap_shrank": m1.arena - m2.arena}))
"""

GLIBC = platform.libc_ver()[0] == "glibc"


def probe(env: dict[str, str]) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env}, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not GLIBC, reason="mallopt/mallinfo2 are glibc's")
def test_tuned_malloc_serves_large_blocks_from_the_heap_and_keeps_them():
    tuned = probe({allocator.ENV: "1"})
    assert tuned["applied"] is True
    assert tuned["mmapped"] == 0                       # not a fresh mmap per block
    assert tuned["heap_in_use"] >= 24 << 20            # from the heap
    assert tuned["heap_shrank"] == 0                   # freed memory stays for the next batch
    plain = probe({allocator.ENV: "0"})                 # opt-out: glibc's defaults, the block is mmapped
    assert plain["applied"] is False
    assert plain["mmapped"] >= 24 << 20


def test_opt_out_and_non_glibc(monkeypatch):
    monkeypatch.setattr(allocator, "_applied", False)
    monkeypatch.setenv(allocator.ENV, "0")
    assert allocator.keep_freed_memory() is False
    monkeypatch.setenv(allocator.ENV, "1")
    monkeypatch.setattr(allocator.platform, "libc_ver", lambda: ("", ""))
    assert allocator.keep_freed_memory() is False      # macOS, musl: nothing to set

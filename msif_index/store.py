"""The HDF5 row store: an [n, k] matrix of projected per-example gradients, one row per example.

File layout (``SCHEMA_VERSION`` 2):
    dataset ``rows``       [n, k] float16/float32/float64, contiguous, allocated when the file is
                           created: the writer puts the rows' bytes at their offsets with pwrite(2)
                           (which, unlike h5py's calls, releases the GIL, so a background thread
                           writes while the build computes the next batch)
    dataset ``row_hash``   [n] uint64, fletcher32: each row's hash (``row_hash``: a multilinear
                           hash of its 32-bit words, any change inside one word always detected);
                           RowStore verifies every row it reads against it
    dataset ``written``    [n] bool, fletcher32: which rows were written
    dataset ``scales``     [n] float32, fletcher32, float16 stores only (attribute ``row_scales``):
                           row i is ``rows[i] * scales[i]``. Each row is stored times a power of two
                           that puts its largest entry in [2^14, 2^15), so float16 neither overflows
                           (65504) nor loses a small row's precision to subnormals; readers multiply back
    extra datasets         small arrays (e.g. preconditioner state), fletcher32
    file attributes        schema_version, n, k, dtype and the caller's attributes; dicts, lists,
                           tuples and None are stored as JSON strings (their names are listed in
                           the ``_json_attrs`` attribute) and decoded back on read

Schema version 1 (earlier msif-index builds) stored the rows chunked, each chunk with HDF5's
fletcher32 checksum and no ``row_hash``; RowStore still reads it (HDF5 verifies its chunks).

Files are written into a temporary file next to the final one and renamed only when every
row was written (``msif_index.atomic``), so a reader never sees a half-written store. The
checksums make corrupted bytes fail on read (CorruptIndexError), and a truncated file fails
to open (CorruptIndexError).

``ShardedWriter`` is the resumable form used by a build: rows go into shard files
``shard_{i:05d}.h5``, each committed atomically when complete, so a build killed at any
moment resumes from the shards that exist.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import gc
import json
import math
import os
import queue
import re
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, Mapping

import h5py
import numpy as np

from .atomic import atomic_path, check_free_space, cleanup_stale_tmp, disk_full_error, is_disk_full
from .errors import REBUILD, ConfigError, CorruptIndexError, NonFiniteError, ShapeError, first_line
from .warn import warn_user

try:  # torch is optional here: rows may be numpy arrays
    import torch
except ImportError:  # pragma: no cover
    torch = None  # type: ignore[assignment]

__all__ = [
    "SCHEMA_VERSION",
    "DTYPES",
    "RowStore",
    "RowWriter",
    "ShardedWriter",
    "link_shards",
    "normalize_attrs",
    "normalize_dtype",
]

SCHEMA_VERSION = 2
#: the row-store schema versions RowStore reads (1: chunked rows with HDF5's fletcher32)
READABLE_SCHEMA_VERSIONS = (1, 2)
DTYPES = ("float32", "float16", "float64")

ROWS = "rows"
WRITTEN = "written"
SCALES = "scales"
HASHES = "row_hash"
#: file attribute: the rows are stored scaled, one power of two per row in ``scales`` (float16)
ROW_SCALES = "row_scales"
_JSON_ATTRS = "_json_attrs"
_RESERVED_ATTRS = frozenset({"schema_version", "n", "k", "dtype", ROW_SCALES, _JSON_ATTRS})
_RESERVED_DATASETS = frozenset({ROWS, WRITTEN, SCALES, HASHES})

# rows read at a time by take() (<= 1 MiB of rows, verified together; schema 1's chunk size, chosen
# when HDF5's per-chunk buffers of 4 MiB went through mmap/munmap on every chunk of a build)
_MAX_CHUNK_BYTES = 1 << 20
_CACHE_BYTES = 32 << 20  # HDF5 chunk cache per dataset (partial-chunk writes stay in memory)
_MASK_BLOCK = 1 << 20  # rows of the written mask checked at a time
_META_ROWS = 1 << 16  # rows whose hashes / scales / mask bits RowWriter keeps before writing them
_MAX_BLOCK_BYTES = 256 << 20  # iter_blocks never yields more than this per block

#: whether ShardedWriter (the build's featurize pass) writes shards from a background thread by
#: default (see RowWriter's ``background``; benchmarks/build_throughput.py measures both)
BACKGROUND_SHARD_WRITES = True
#: whether background writes put whole pages with O_DIRECT (where the file system takes it)
USE_DIRECT_WRITES = True
#: whether ShardedWriter commits a finished shard (fsync, rename, fsync of the folder) from a
#: background thread while the caller computes the next shard (os.fsync releases the GIL, so the
#: disk write-back overlaps the computation), by default. The shard is on disk only once its commit
#: ended: ``completed_shards`` / ``pending_ranges`` / ``is_complete`` / ``iter_blocks`` and the
#: next ``shard`` wait for it (``wait_commits``). The build's featurize pass turns it on.
BACKGROUND_SHARD_COMMITS = False
#: whether ShardedWriter drops each committed shard's pages from the page cache (after its fsync;
#: msif_index.atomic.drop_page_cache), by default
DROP_SHARD_PAGES = True



# ----------------------------------------------------------------------------- helpers


def normalize_dtype(dtype: Any) -> str:
    """'float32' | 'float16' | 'float64' from a string, numpy dtype or torch dtype; else ConfigError."""
    name = str(dtype).replace("torch.", "")
    try:
        name = np.dtype(name).name
    except TypeError:
        pass
    if name not in DTYPES:
        raise ConfigError(f"row dtype {dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    return name


def _encode_attr(value: Any) -> tuple[Any, bool]:
    """(value to store as an HDF5 attribute, stored as JSON?)."""
    if isinstance(value, (bool, np.bool_)):
        return np.bool_(value), False
    if isinstance(value, (int, np.integer)):
        if -(2**63) <= int(value) < 2**63:
            return np.int64(value), False
        return json.dumps(int(value)), True
    if isinstance(value, (float, np.floating)):
        return np.float64(value), False
    if isinstance(value, (str, bytes)):
        return value, False
    if isinstance(value, np.ndarray):
        value = value.tolist()
    try:
        return json.dumps(value, sort_keys=True), True
    except (TypeError, ValueError) as e:
        raise TypeError(f"attribute value {value!r} cannot be stored: {e}") from None


def _decode_attr(value: Any, is_json: bool) -> Any:
    if is_json:
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        return json.loads(value)
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def normalize_attrs(attrs: Mapping[str, Any]) -> dict[str, Any]:
    """``attrs`` as a store reads them back (tuples -> lists, numpy scalars -> Python, ...)."""
    out = {}
    for key, value in attrs.items():
        enc, is_json = _encode_attr(value)
        out[str(key)] = _decode_attr(enc, is_json)
    return out


def _write_attrs(f: h5py.File, attrs: Mapping[str, Any]) -> None:
    json_keys = []
    for key, value in attrs.items():
        enc, is_json = _encode_attr(value)
        f.attrs[str(key)] = enc
        if is_json:
            json_keys.append(str(key))
    f.attrs[_JSON_ATTRS] = json.dumps(sorted(json_keys))


def _read_attrs(f: h5py.File) -> dict[str, Any]:
    raw = dict(f.attrs.items())
    json_keys = set(json.loads(_decode_attr(raw.pop(_JSON_ATTRS, "[]"), False) or "[]"))
    return {k: _decode_attr(v, k in json_keys) for k, v in raw.items()}


#: HDF5's message for a file shorter than its superblock says
_TRUNCATED = re.compile(r"truncated file: eof = (\d+).*?stored_eof = (\d+)")


def _virtual_sources(ds: h5py.Dataset, start: int, stop: int) -> list[tuple[str, str]]:
    """(file, dataset) of the sources of a virtual dataset that hold its rows [start, stop); [] if it
    is not virtual (or cannot tell: used only to name a file in an error message)."""
    try:
        if not ds.is_virtual:
            return []
        out = []
        for vs in ds.virtual_sources():
            (lo, *_), (hi, *_) = vs.vspace.get_select_bounds()
            if lo < stop and hi >= start:
                out.append((vs.file_name, vs.dset_name))
        return out
    except Exception:  # noqa: BLE001 - only names the file in an error message
        return []


def _failing_sources(folder: Path, ds: h5py.Dataset, start: int, stop: int) -> list[str]:
    """The source files of ``ds``'s rows [start, stop) whose part cannot be read on their own (a
    truncated or corrupted shard), or all of those sources when each reads (or [] if not virtual)."""
    sources = _virtual_sources(ds, start, stop)
    bad = []
    for name, dset in sources:
        try:
            with _open_h5(folder / name, "r") as f:
                f[dset][...]
        except Exception:  # noqa: BLE001 - any failure names the file
            bad.append(name)
    return bad or [name for name, _ in sources]


def _open_h5(path: Path, mode: str, cache_bytes: int = _CACHE_BYTES) -> h5py.File:
    kwargs: dict[str, Any] = {"rdcc_nbytes": cache_bytes, "rdcc_nslots": 10007}
    if mode != "r":
        # dense attribute storage (no 64 KiB limit on JSON attributes)
        kwargs["libver"] = ("v108", "latest")
    try:
        # files are never written in place (atomic rename), so HDF5's file locks only get in
        # the way (read-only or network file systems)
        return h5py.File(path, mode, locking=False, **kwargs)
    except OSError as e:
        if "flag values don't match" not in str(e):
            raise
        # this process already holds the file open with other locking flags (the user's own
        # h5py.File(path), default or locking=True or "best-effort"): HDF5 refuses a second open
        # with other flags, so match theirs
        for locking in (None, True, "best-effort"):
            try:
                return h5py.File(path, mode, locking=locking, **kwargs)
            except OSError as again:
                if "flag values don't match" not in str(again):
                    raise
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - h5py/HDF5 without the locking option
        if "lock" not in str(e).lower() and not isinstance(e, TypeError):
            raise
        return h5py.File(path, mode, **kwargs)


def _to_numpy(rows: Any) -> np.ndarray:
    if torch is not None and isinstance(rows, torch.Tensor):
        t = rows.detach().to("cpu")
        if t.dtype in (torch.bfloat16,) or not t.dtype.is_floating_point:
            t = t.to(torch.float32)
        return t.numpy()
    return np.asarray(rows)


_F16_EXP = np.uint16(0x7C00)


def _convert(arr: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """``arr`` as a C-contiguous array of ``dtype`` (no copy when it already is one).

    float32/float64 -> float16 goes through torch when available: numpy's conversion is scalar
    code, about 10x slower (2.9 ms vs 0.3 ms for 256 x 4050 values on one core)."""
    if (dtype == np.float16 and arr.dtype in (np.float32, np.float64) and torch is not None
            and arr.flags.writeable and arr.size):
        src = torch.from_numpy(np.ascontiguousarray(arr))
        return src.to(torch.float16).numpy()
    with np.errstate(over="ignore", invalid="ignore"):
        return np.ascontiguousarray(arr, dtype=dtype)


#: the exponent of each float16 row's largest entry after scaling: |x| < 2^15 < 65504
_F16_TOP = 15
#: exponents of a row's largest entry outside [-100, 128] are clamped (the power of two stays a
#: normal float32); a row below 2^-100 everywhere is stored as (near) zeros
_EXP_RANGE = (-100, 128)


def _scaled_float16(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows as float16, times a power of two per row; those powers' inverses as float32 scales):
    row i is ``out[i] * scales[i]``, exactly up to float16's rounding of each entry. The largest
    entry of each row lands in [2^14, 2^15), so nothing overflows and small rows keep float16's 11
    bits. Non-finite rows stay non-finite (the caller's check names them)."""
    if torch is not None and arr.size and arr.dtype in (np.float32, np.float64):
        ok = arr.flags.writeable and arr.flags.c_contiguous
        t = torch.from_numpy(arr if ok else np.array(arr, order="C"))
        top = torch.frexp(t.abs().amax(dim=1)).exponent.clamp_(*_EXP_RANGE)
        shift = (_F16_TOP - top).to(t.dtype)
        out = torch.empty(t.shape, dtype=torch.float16)
        torch.mul(t, torch.exp2(shift).unsqueeze(1), out=out)
        return out.numpy(), torch.exp2(-shift).to(torch.float32).numpy()
    a = np.asarray(arr, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        top = np.clip(np.frexp(np.abs(a).max(axis=1, initial=0.0))[1], *_EXP_RANGE) if a.size else \
            np.zeros(a.shape[0], dtype=np.int64)
    shift = (_F16_TOP - top).astype(np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        out = (a * np.exp2(shift)[:, None]).astype(np.float16)
    return out, np.exp2(-shift).astype(np.float32)


def _all_finite(out: np.ndarray) -> bool:
    """True when no entry is NaN or infinite (float16: from the exponent bits, ~4x faster; float32 /
    float64: from torch's sum when it is finite, 2x faster than numpy's isfinite, else entry by entry)."""
    if out.dtype == np.float16:
        return not np.any((out.view(np.uint16) & _F16_EXP) == _F16_EXP)
    if (torch is not None and out.size and out.flags.c_contiguous and out.flags.writeable
            and bool(torch.isfinite(torch.from_numpy(out).sum()))):
        return True
    return bool(np.isfinite(out).all())


#: ``row_hash``'s value for a row of zeros (not 0, the fill value of rows never written)
_HASH_BASE = 0x6D73_6966_2D69_6478
_hash_coeffs: dict[int, tuple[np.ndarray, np.ndarray]] = {}


def _coefficients(words: int) -> np.ndarray:
    """c_j = splitmix64(j + 1) | 1, j < ``words``: fixed odd 64-bit constants (part of the file format,
    so computed here rather than drawn from a generator whose stream may change)."""
    with np.errstate(over="ignore"):
        x = np.arange(1, words + 1, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31)) | np.uint64(1)


def _lane_coefficients(pairs: int) -> tuple[np.ndarray, np.ndarray]:
    """(c_{2i}, c_{2i+1} - 2^32 c_{2i}) for i < ``pairs``: ``row_hash`` over 64-bit words w_i = lo_i +
    2^32 hi_i, since c_{2i} lo_i + c_{2i+1} hi_i = c_{2i} w_i + (c_{2i+1} - 2^32 c_{2i}) hi_i mod 2^64."""
    got = _hash_coeffs.get(pairs)
    if got is None:
        c = _coefficients(2 * pairs)
        with np.errstate(over="ignore"):
            got = _hash_coeffs[pairs] = (c[0::2].copy(), c[1::2] - (c[0::2] << np.uint64(32)))
    return got


def row_hash(rows: np.ndarray) -> np.ndarray:
    """Each row's hash, uint64 [m], of an [m, k] array: h = B + sum_j c_j u_j mod 2^64 over the row's
    little-endian 32-bit words u_j (zero-padded to a whole number of 64-bit words), with
    ``_coefficients`` c_j and B = ``_HASH_BASE``: the multilinear hash family (Lemire and Kaser,
    "Strongly universal string hashing is fast", 2014) with fixed coefficients.

    Every c_j is odd, so c_j e != 0 mod 2^64 for any change 0 < |e| < 2^32 of one word: a change inside
    one 32-bit word always changes h. A change of several words leaves h equal only when its weighted
    sum vanishes mod 2^64, about 2^-32 of such patterns (each word's change reaches at least the 33
    lowest bits' worth of h; with 64-bit words, two flipped sign bits of float64 entries cancel:
    (c_i + c_j) 2^63 = 0). A zero row hashes to B, not to 0, the fill value of rows never written.
    Computed as two lanes over the 64-bit words (``_lane_coefficients``): 0.47 ms for 256 rows of 4,050
    float32 here, against 0.75 ms for zlib.crc32 per row and 0.65 ms for the fletcher32 of the HDF5
    chunks it replaced, which the build's throughput needs."""
    m = rows.shape[0]
    if m == 0:
        return np.zeros(0, dtype=np.uint64)
    le = rows.dtype.newbyteorder("<")
    raw = np.ascontiguousarray(rows, dtype=le).reshape(m, -1).view(np.uint8)
    width = raw.shape[1]
    if width % 8:
        padded = np.zeros((m, -(-width // 8) * 8), dtype=np.uint8)
        padded[:, :width] = raw
        raw = padded
    words = raw.view("<u8")
    c_lo, c_hi = _lane_coefficients(words.shape[1])
    with np.errstate(over="ignore"):
        h = np.einsum("ij,j->i", words, c_lo)
        h += np.einsum("ij,j->i", words >> np.uint64(32), c_hi)
        return h + np.uint64(_HASH_BASE)


def _pwrite_all(fd: int, data: np.ndarray, offset: int) -> None:
    """All bytes of the C-contiguous ``data`` at ``offset`` of ``fd`` (pwrite may write fewer; where
    there is no pwrite, Windows, a seek and a write: one thread writes a RowWriter's file at a time)."""
    view = memoryview(data.reshape(-1).view(np.uint8))
    while view.nbytes:
        if hasattr(os, "pwrite"):
            done = os.pwrite(fd, view, offset)
        else:  # pragma: no cover - Windows
            os.lseek(fd, offset, os.SEEK_SET)
            done = os.write(fd, view)
        view, offset = view[done:], offset + done


#: O_DIRECT writes go in whole pages (at least 4 KiB, the kernel's page size where larger, so a page
#: is never written both through the page cache and directly), from buffers aligned to it
def _page_size() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):  # pragma: no cover - no sysconf (Windows)
        return 4096


_DIRECT_ALIGN = max(4096, _page_size())


#: what a file system that opens files with O_DIRECT but refuses such writes answers
_NO_DIRECT_ERRNOS = {errno.EINVAL, getattr(errno, "EOPNOTSUPP", errno.EINVAL), getattr(errno, "ENOTSUP", errno.EINVAL)}


def _aligned_empty(nbytes: int) -> np.ndarray:
    """An uninitialized uint8 array of ``nbytes`` whose first byte's address is a multiple of
    ``_DIRECT_ALIGN`` (O_DIRECT reads from such memory only)."""
    raw = np.empty(nbytes + _DIRECT_ALIGN, dtype=np.uint8)
    shift = (-raw.ctypes.data) % _DIRECT_ALIGN
    return raw[shift:shift + nbytes]


def _open_direct(path: Path) -> int | None:
    """``path`` opened for O_DIRECT writes (no copy into the page cache: the disk reads the
    caller's memory), or None where the platform or the file system has no O_DIRECT."""
    flag = getattr(os, "O_DIRECT", None)
    if flag is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | flag)
    except OSError:
        return None


def _create_contiguous(f: h5py.File, name: str, shape: tuple[int, int], dtype: np.dtype) -> h5py.Dataset:
    """A contiguous dataset whose space is allocated now and never filled (no write at all: the
    file is sparse until the rows are written at ``dataset.id.get_offset()``)."""
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_layout(h5py.h5d.CONTIGUOUS)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    tid = h5py.h5t.py_create(dtype)
    dsid = h5py.h5d.create(f.id, name.encode(), tid, h5py.h5s.create_simple(shape), dcpl=dcpl)
    return h5py.Dataset(dsid)


def expected_file_bytes(n: int, k: int, itemsize: int, attrs: Mapping[str, Any], scaled: bool = False) -> int:
    """A row file's size when complete, from above: the rows, their hashes and the mask (with 64
    bytes per chunk of those: checksum and chunk index entry), the float32 scales of a ``scaled``
    float16 store, the attributes, and 256 KiB for HDF5's other metadata (tests/test_store.py checks
    the bound)."""
    per_row_chunk = max(1, min(n, 1 << 16))            # the hashes', mask's and scales' chunk (rows)
    chunks = -(-n // per_row_chunk)
    stored = chunks * per_row_chunk                    # their edge chunk is stored whole
    text = sum(len(str(v)) for v in attrs.values())
    extra = 4 * stored + 64 * chunks + (4 << 10) if scaled else 0
    return n * k * itemsize + 9 * stored + 128 * chunks + extra + 2 * text + (256 << 10)


def _chunk_rows_for(n: int, k: int, itemsize: int, chunk_rows: int) -> int:
    by_bytes = max(1, _MAX_CHUNK_BYTES // max(1, k * itemsize))
    return max(1, min(int(chunk_rows), by_bytes, max(n, 1)))


def _missing_ranges(mask: np.ndarray, offset: int, limit: int = 3) -> list[tuple[int, int]]:
    """First ``limit`` runs of False in ``mask`` as (start, stop) with ``offset`` added."""
    idx = np.flatnonzero(~mask)
    if idx.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(idx) != 1)
    starts = np.concatenate(([idx[0]], idx[breaks + 1]))
    stops = np.concatenate((idx[breaks], [idx[-1]])) + 1
    return [(int(a) + offset, int(b) + offset) for a, b in zip(starts[:limit], stops[:limit])]


def _fmt_ranges(ranges: list[tuple[int, int]]) -> str:
    return ", ".join(f"{a}..{b - 1}" if b - a > 1 else f"{a}" for a, b in ranges)


# ----------------------------------------------------------------------------- writer


@contextlib.contextmanager
def _quiet_h5py_dealloc() -> Iterator[None]:
    """Drop the reports of errors in h5py's object deallocation raised inside the block (Cython
    prints each one through sys.excepthook, then "Exception ignored in" through sys.unraisablehook)."""
    import traceback

    def from_h5py_dealloc(tb) -> bool:
        return any("h5py" in f.filename and "dealloc" in f.name for f in traceback.extract_tb(tb))

    prev_unraisable, prev_except = sys.unraisablehook, sys.excepthook

    def unraisable(info) -> None:
        if "h5py" not in repr(getattr(info, "object", "")):
            prev_unraisable(info)

    def excepthook(exc_type, exc, tb) -> None:
        if not from_h5py_dealloc(tb):
            prev_except(exc_type, exc, tb)

    sys.unraisablehook, sys.excepthook = unraisable, excepthook
    try:
        yield
    finally:
        sys.unraisablehook, sys.excepthook = prev_unraisable, prev_except


@dataclasses.dataclass
class _PendingMeta:
    """Rows [start, stop) written, their hashes (and a float16 store's scales) not yet in the file."""
    start: int
    stop: int
    hashes: np.ndarray
    scales: np.ndarray | None


class RowWriter:
    """Write an [n, k] row store atomically; use as a context manager.

    >>> with RowWriter(path, n, k, "float32", attrs={"config": {...}}) as w:
    ...     w.write(0, block)              # a contiguous block of rows starting at row 0
    ...     w.add_dataset("precond", arr)  # small extra arrays
    On a clean exit every row must have been written (else CorruptIndexError and nothing is
    saved); the file then replaces ``path`` atomically. On an exception the temporary file is
    removed and ``path`` (if it existed) is untouched. A full disk raises DiskFullError.

    ``background=True`` hands the writes (pwrite(2) of the rows' bytes, their hashes, the mask)
    to one writer thread, so they overlap the caller's next computation: pwrite releases the GIL
    (h5py's calls do not), and whole pages go to the disk with O_DIRECT where the file system
    takes it (``USE_DIRECT_WRITES``: no copy into the page cache, the disk reads the buffer).
    ``write`` still checks shape, range and finiteness at once, copies the rows into one of its own
    staging buffers (none when they were computed into one lent by ``buffer``), and blocks while
    three blocks are queued or being written. An error of a queued write (e.g. DiskFullError) is
    raised by a later ``write`` or on
    exit, and then nothing is saved, as without the thread.

    ``drop_cache=True`` drops the file's pages from the page cache once it is fsynced (the build's
    shards: msif_index.atomic.drop_page_cache).
    """

    def __init__(
        self,
        path: Path | str,
        n: int,
        k: int,
        dtype: Any = "float32",
        attrs: Mapping[str, Any] | None = None,
        background: bool = False,
        background_commit: bool = False,
        drop_cache: bool = False,
    ) -> None:
        self.path = Path(path)
        if int(n) != n or n < 0:
            raise ConfigError(f"the number of rows must be a non-negative integer, got {n!r}")
        if int(k) != k or k < 1:
            raise ConfigError(f"the row width (projection dimension) must be a positive integer, got {k!r}")
        self.n = int(n)
        self.k = int(k)
        self.dtype = normalize_dtype(dtype)
        self._np_dtype = np.dtype(self.dtype)
        self.attrs = dict(attrs or {})
        clash = _RESERVED_ATTRS.intersection(self.attrs)
        if clash:
            raise ValueError(f"attribute names {sorted(clash)} are reserved by the row store")
        normalize_attrs(self.attrs)  # fail early on values that cannot be stored
        self._stack: contextlib.ExitStack | None = None
        self._f: h5py.File | None = None
        self._tmp: Path | None = None
        self._rows: h5py.Dataset | None = None
        self._written: h5py.Dataset | None = None
        self.background = bool(background)
        self._queue: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self._abandon = False
        self.background_commit = bool(background_commit)
        self.drop_cache = bool(drop_cache)
        self._commit_thread: threading.Thread | None = None
        self._commit_error: BaseException | None = None
        self._fd: int | None = None                   # the temporary file, for pwrite of the rows
        self._direct_fd: int | None = None            # the same with O_DIRECT (background writes)
        self._offset: int | None = None               # the rows' byte offset in it (None: no bytes)
        self._hashes: h5py.Dataset | None = None
        self._staging: queue.Queue | None = None      # the background writer's free buffers
        self._meta: _PendingMeta | None = None        # rows written, their hashes not yet in the file
        self._lent: tuple[int, np.ndarray, np.ndarray] | None = None   # (start, array, buffer) of ``buffer``
        self.scaled = self.dtype == "float16"         # rows stored times a power of two each
        self._scales: h5py.Dataset | None = None

    # -- context management

    def __enter__(self) -> "RowWriter":
        if self._stack is not None:
            raise RuntimeError("RowWriter is already open")
        self._stack = contextlib.ExitStack()
        self._error, self._abandon, self._meta = None, False, None
        try:
            self._tmp = self._stack.enter_context(atomic_path(self.path, drop_cache=self.drop_cache))
            check_free_space(self._tmp.parent, str(self.path), self._expected_bytes())
            self._f = _open_h5(self._tmp, "w")
            self._rows = _create_contiguous(self._f, ROWS, (self.n, self.k), self._np_dtype)
            mask_chunk = max(1, min(self.n, 1 << 16))
            self._hashes = self._f.create_dataset(
                HASHES, shape=(self.n,), maxshape=(None,) if self.n == 0 else (self.n,),
                dtype=np.uint64, chunks=(mask_chunk,), fletcher32=True, fillvalue=0)
            self._written = self._f.create_dataset(
                WRITTEN,
                shape=(self.n,),
                maxshape=(None,) if self.n == 0 else (self.n,),
                dtype=np.bool_,
                chunks=(mask_chunk,),
                fletcher32=True,
                fillvalue=False,
            )
            header = {"schema_version": SCHEMA_VERSION, "n": self.n, "k": self.k, "dtype": self.dtype}
            if self.scaled:
                self._scales = self._f.create_dataset(
                    SCALES, shape=(self.n,), maxshape=(None,) if self.n == 0 else (self.n,),
                    dtype=np.float32, chunks=(mask_chunk,), fletcher32=True, fillvalue=np.nan)
                header[ROW_SCALES] = True
            _write_attrs(self._f, {**header, **self.attrs})
            self._offset = self._rows.id.get_offset() if self.n else None
            if self.n and self._offset is None:
                raise RuntimeError(f"HDF5 allocated no space for the rows of {self.path} (h5py {h5py.__version__}, "
                                   f"HDF5 {h5py.version.hdf5_version}); please report it")
            self._fd = os.open(self._tmp, os.O_WRONLY | getattr(os, "O_BINARY", 0))
            if self.background and USE_DIRECT_WRITES:
                self._direct_fd = _open_direct(self._tmp)
        except BaseException as e:
            self._abort(e)
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is not None:
            self._abort(exc)  # may raise DiskFullError in place of exc
            return False
        try:
            self._finish()
        except BaseException as e:
            self._abort(e)
            raise
        stack, self._stack = self._stack, None
        assert stack is not None
        if not self.background_commit:
            stack.__exit__(None, None, None)  # fsync + rename; DiskFullError on a full disk
            return False

        def commit() -> None:
            try:
                stack.__exit__(None, None, None)
            except BaseException as e:  # noqa: BLE001 - raised by wait_commit in the caller's thread
                self._commit_error = e

        self._commit_error = None
        self._commit_thread = threading.Thread(target=commit, name=f"msif-commit-{self.path.name}")
        self._commit_thread.start()
        return False

    def _expected_bytes(self) -> int:
        return expected_file_bytes(self.n, self.k, self._np_dtype.itemsize, self.attrs,
                                   self.scaled)

    def wait_commit(self) -> None:
        """With ``background_commit``: wait until the file is fsynced and renamed into place; raise
        the commit's error (e.g. DiskFullError; the temporary file is then removed). No-op otherwise."""
        t, self._commit_thread = self._commit_thread, None
        if t is not None:
            t.join()
        if self._commit_error is not None:
            err, self._commit_error = self._commit_error, None
            raise err

    def _close_h5_quietly(self) -> None:
        self._abandon = True  # the file is being discarded: queued blocks need not be written
        self._stop_thread()
        self._close_fd()
        f, self._f = self._f, None
        self._rows = self._written = self._scales = self._hashes = None
        if f is not None:
            with contextlib.suppress(Exception):
                f.close()

    def _abort(self, exc: BaseException) -> None:
        """Close and remove the temporary file; raises DiskFullError if ``exc`` says the disk is full."""
        if self._f is not None and is_disk_full(exc):
            # HDF5 writes cached chunks and metadata when the file closes; on a full disk those writes
            # fail again, and h5py reports each failure as an "Exception ignored" traceback. The file is
            # being discarded, so they are dropped here (the caller raises one DiskFullError line).
            with _quiet_h5py_dealloc():
                self._close_h5_quietly()
                gc.collect()
        else:
            self._close_h5_quietly()
        stack, self._stack = self._stack, None
        if stack is not None:
            stack.__exit__(type(exc), exc, exc.__traceback__)

    def _finish(self) -> None:
        self._require_open()
        self._drain()
        self._flush_meta()
        assert self._written is not None and self._f is not None and self._tmp is not None
        missing: list[tuple[int, int]] = []
        n_missing = 0
        for s in range(0, self.n, _MASK_BLOCK):
            mask = self._written[s : min(self.n, s + _MASK_BLOCK)]
            if not mask.all():
                n_missing += int(mask.size - np.count_nonzero(mask))
                if len(missing) < 3:
                    missing += _missing_ranges(mask, s, 3 - len(missing))
        if n_missing:
            raise CorruptIndexError(
                f"{n_missing} of {self.n} rows of {self.path} (rows {_fmt_ranges(missing)}"
                f"{', ...' if n_missing > sum(b - a for a, b in missing) else ''}) were never written, "
                f"so the file was not saved (an existing one is untouched); run the build again"
            )
        try:
            self._close_fd()
            self._f.flush()
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise disk_full_error(self.path) from e
            raise
        f, self._f = self._f, None
        self._rows = self._written = self._scales = self._hashes = None
        f.close()
        # read the new file back: a write that failed silently (e.g. when closing) shows here
        try:
            with _open_h5(self._tmp, "r") as g:
                if int(g.attrs["schema_version"]) != SCHEMA_VERSION or g[ROWS].shape != (self.n, self.k):
                    raise OSError("the header read back differs from the one written")
        except (OSError, KeyError) as e:
            if is_disk_full(e):
                raise disk_full_error(self.path) from e
            raise CorruptIndexError(
                f"writing {self.path} failed: the new file cannot be read back ({first_line(e)}); "
                f"check the disk (free space, errors) and run again"
            ) from None

    def _close_fd(self) -> None:
        for name in ("_fd", "_direct_fd"):
            fd = getattr(self, name)
            setattr(self, name, None)
            if fd is not None:
                os.close(fd)

    def _require_open(self) -> None:
        if self._f is None:
            raise RuntimeError("RowWriter is not open; use it as `with RowWriter(...) as w:`")

    # -- writing

    def write(self, start: int, rows: Any) -> None:
        """Write the [m, k] block ``rows`` (numpy array or tensor) at rows [start, start + m)."""
        self._require_open()
        assert self._rows is not None and self._written is not None
        arr = _to_numpy(rows)
        if arr.ndim != 2 or arr.shape[1] != self.k:
            raise ShapeError(
                f"rows written to {self.path.name} must have shape [m, {self.k}], got {list(arr.shape)}"
            )
        start = int(start)
        stop = start + arr.shape[0]
        if start < 0 or stop > self.n:
            raise ShapeError(
                f"rows {start}..{stop - 1} are outside the {self.n} rows of {self.path.name} (0..{self.n - 1})"
            )
        if stop == start:
            return
        out, scales = _scaled_float16(arr) if self.scaled else (_convert(arr, self._np_dtype), None)
        if not _all_finite(out):
            if self.dtype != "float64" and np.isfinite(arr).all():
                raise NonFiniteError(
                    f"rows {start}..{stop - 1} overflow {self.dtype} (values up to "
                    f"{float(np.abs(arr).max()):.3g}); rebuild with `--dtype float32` or `--dtype float64`"
                )
            raise NonFiniteError(
                f"rows {start}..{stop - 1} contain NaN or infinite values; check the losses and "
                f"gradients of these examples (e.g. a diverged model or bad inputs) and build again"
            )
        if not self.background:
            self._write_block(start, stop, out, scales)
            return
        self._raise_queued_error()
        lent, self._lent = self._lent, None
        if lent is not None and lent[0] == start and out.shape == lent[1].shape and \
                out.ctypes.data == lent[1].ctypes.data:
            staged, buf = lent[1], lent[2]    # the caller filled the buffer ``buffer`` lent: no copy
        else:
            if lent is not None:              # lent and not used: back to the pool
                self._staging.put(lent[2])
            staged, buf = self._stage(start, out.shape)
            np.copyto(staged, out)            # the caller may reuse its buffer while the thread writes
        assert self._queue is not None
        self._queue.put((start, stop, staged, scales, buf))

    def buffer(self, start: int, m: int) -> np.ndarray | None:
        """A [m, k] array of the store's dtype for the rows [start, start + m) that the next ``write``
        at ``start`` takes without copying (a background writer's staging buffer, aligned for
        O_DIRECT), or None (no background writer, or a float16 store, whose rows are scaled first).
        Fill it and pass it to ``write(start, ...)``; anything else written first returns it unused."""
        self._require_open()
        if not self.background or self.scaled or m < 1:
            return None
        self._raise_queued_error()
        if self._lent is not None:
            assert self._staging is not None
            self._staging.put(self._lent[2])
        staged, buf = self._stage(int(start), (int(m), self.k))
        self._lent = (int(start), staged, buf)
        return staged

    def _stage(self, start: int, shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """(a view of a free staging buffer shaped ``shape`` in the store's dtype, the buffer): its rows
        sit at the same offset modulo _DIRECT_ALIGN as in the file, so their whole aligned pages can
        go to the disk with O_DIRECT straight from the buffer. Blocks while three blocks are queued or
        being written; starts the writer thread."""
        if self._thread is None:
            self._queue = queue.Queue()
            self._staging = queue.Queue()
            for _ in range(3):            # two queued blocks and the one being written
                self._staging.put(np.empty(0, dtype=np.uint8))
            self._thread = threading.Thread(target=self._worker, name=f"msif-write-{self.path.name}",
                                            daemon=True)
            self._thread.start()
        assert self._staging is not None
        buf = self._staging.get()
        nbytes = shape[0] * shape[1] * self._np_dtype.itemsize
        shift = 0 if self._offset is None else self._row_offset(start) % _DIRECT_ALIGN
        if buf.nbytes < nbytes + shift:
            buf = _aligned_empty(nbytes + _DIRECT_ALIGN)
        return buf[shift:shift + nbytes].view(self._np_dtype).reshape(shape), buf

    def _write_block(self, start: int, stop: int, out: np.ndarray, scales: np.ndarray | None = None) -> None:
        """Rows [start, stop): their bytes at their place in the file (pwrite), then their hashes,
        scales and mask bits (h5py). Readers verify every row against its hash."""
        assert self._rows is not None and self._written is not None and self._hashes is not None
        try:
            if self._offset is not None and out.size:
                self._pwrite(out, self._row_offset(start))
            self._pending_meta(start, stop, row_hash(out), scales)
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise disk_full_error(self.path) from e
            raise

    def _pending_meta(self, start: int, stop: int, hashes: np.ndarray, scales: np.ndarray | None) -> None:
        """Record rows [start, stop)'s hashes and scales, and that they are written: kept in memory
        while blocks follow each other (up to _META_ROWS rows), then written in one h5py call per
        dataset (one call per block cost 0.3 ms per batch of 256 rows in a build)."""
        m = self._meta
        if m is not None and (m.stop != start or stop - m.start > _META_ROWS):
            self._flush_meta()
            m = None
        if m is None:
            size = max(min(_META_ROWS, self.n - start), stop - start)
            m = self._meta = _PendingMeta(start, start, np.empty(size, dtype=np.uint64),
                                          None if scales is None else np.empty(size, dtype=np.float32))
        m.hashes[m.stop - m.start:stop - m.start] = hashes
        if scales is not None and m.scales is not None:
            m.scales[m.stop - m.start:stop - m.start] = scales
        m.stop = stop

    def _flush_meta(self) -> None:
        m, self._meta = self._meta, None
        if m is None or m.stop == m.start:
            return
        assert self._hashes is not None and self._written is not None
        rows = m.stop - m.start
        try:
            self._hashes[m.start:m.stop] = m.hashes[:rows]
            if self._scales is not None and m.scales is not None:
                self._scales[m.start:m.stop] = m.scales[:rows]
            self._written[m.start:m.stop] = True
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise disk_full_error(self.path) from e
            raise

    def _row_offset(self, row: int) -> int:
        assert self._offset is not None
        return self._offset + row * self.k * self._np_dtype.itemsize

    def _pwrite(self, out: np.ndarray, offset: int) -> None:
        """``out``'s bytes at ``offset`` of the file: the whole aligned pages they cover with O_DIRECT
        where open and ``out`` is aligned as the file (staged by ``write``), the rest through the page
        cache. No page is written both ways by one call (HDF5's metadata may share the first or last
        page of the rows: those go through the page cache, as HDF5's own writes)."""
        assert self._fd is not None
        data = out.reshape(-1).view(np.uint8)
        a = -(-offset // _DIRECT_ALIGN) * _DIRECT_ALIGN
        b = (offset + data.nbytes) // _DIRECT_ALIGN * _DIRECT_ALIGN
        if self._direct_fd is None or b <= a or data.ctypes.data % _DIRECT_ALIGN != offset % _DIRECT_ALIGN:
            _pwrite_all(self._fd, data, offset)
            return
        _pwrite_all(self._fd, data[:a - offset], offset)
        try:
            _pwrite_all(self._direct_fd, data[a - offset:b - offset], a)
        except OSError as e:
            if e.errno not in _NO_DIRECT_ERRNOS:
                raise
            os.close(self._direct_fd)           # a file system that opens but refuses O_DIRECT writes
            self._direct_fd = None
            _pwrite_all(self._fd, data[a - offset:b - offset], a)
        _pwrite_all(self._fd, data[b - offset:], b)

    # -- the background writer thread

    def _worker(self) -> None:
        assert self._queue is not None
        while True:
            item = self._queue.get()
            if item is None:
                return
            *block, buf = item
            if self._error is None and not self._abandon:
                # (after a failure, or when the file is discarded: drain without writing)
                try:
                    self._write_block(*block)
                except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
                    self._error = e
            assert self._staging is not None
            self._staging.put(buf)

    def _raise_queued_error(self) -> None:
        if self._error is not None:
            # the blocks still queued are not written (_abandon), so no later error replaces this one
            self._abandon = True
            self._stop_thread()
            self._abandon = False
            err, self._error = self._error, None
            raise err

    def _stop_thread(self) -> None:
        """Let the writer thread finish the queued blocks and end (errors stay in ``_error``)."""
        t, q = self._thread, self._queue
        if t is not None and q is not None:
            q.put(None)
            t.join()
        self._thread = self._queue = self._staging = self._lent = None

    def _drain(self) -> None:
        """Wait until every queued block is written; raise the first error of the thread."""
        self._stop_thread()
        self._raise_queued_error()

    def add_dataset(self, name: str, array: Any) -> None:
        """Store a small extra array (any numeric dtype, any shape) under ``name``, checksummed."""
        self._require_open()
        assert self._f is not None
        try:
            _create_small_dataset(self._f, name, array)
        except (OSError, RuntimeError) as e:
            if is_disk_full(e):
                raise disk_full_error(self.path) from e
            raise


# ----------------------------------------------------------------------------- reader


class RowStore:
    """A read-only row store; open with ``RowStore.open(path)``. Safe to read from several threads."""

    def __init__(self, path: Path, f: h5py.File, attrs: dict[str, Any]) -> None:
        self.path = path
        self._f: h5py.File | None = f
        self._attrs = attrs
        self._rows: h5py.Dataset = f[ROWS]
        self.n = int(attrs["n"])
        self.k = int(attrs["k"])
        self.dtype: str = attrs["dtype"]
        #: float16 rows stored times a power of two each (``scales``): reads multiply them back
        self.scaled = bool(attrs.get(ROW_SCALES, False))
        self._scales: h5py.Dataset | None = f[SCALES] if self.scaled else None
        #: the rows' hashes (schema 2), verified on every read; None in a schema-1 store, whose
        #: chunks carry HDF5's fletcher32 (verified by HDF5)
        self._hashes: h5py.Dataset | None = f[HASHES] if int(attrs["schema_version"]) >= 2 else None
        if self._rows.chunks:          # schema 1: HDF5 reads (and checksums) whole chunks
            self.chunk_rows = int(self._rows.chunks[0])
        else:                          # contiguous rows or linked shards: read in pieces of <= 1 MiB
            self.chunk_rows = _chunk_rows_for(self.n, self.k, np.dtype(self.dtype).itemsize, 1024)
        self._lock = threading.RLock()
        if self._rows.is_virtual:
            self._hold_shards()

    def _hold_shards(self) -> None:
        """Read one value of each shard through the handles kept for reading (the rows, their hashes,
        a float16 store's scales: HDF5 opens a source file per virtual dataset): HDF5 then holds the
        shard files open, so a shard removed or replaced after this open (an in-place rebuild) cannot
        turn rows read later into the virtual dataset's fill value (NaN) or pair them with another
        file's hashes. The first rows of each shard (up to ``chunk_rows``) are verified."""
        if not (self.n and self.k):
            return
        others = [ds for ds in (self._hashes, self._scales) if ds is not None and ds.is_virtual]
        for src in self._rows.virtual_sources():
            (first, _), (last, _) = src.vspace.get_select_bounds()
            try:
                value = self._rows[first, 0]
                for ds in others:
                    ds[first]
            except (OSError, RuntimeError) as e:
                raise CorruptIndexError(f"{self.path} cannot read its rows in {src.file_name} ({first_line(e)}); "
                                        f"{REBUILD}") from None
            if not np.isfinite(value):
                raise CorruptIndexError(f"{self.path} reads no rows from {src.file_name} (removed or replaced "
                                        f"meanwhile?); {REBUILD}")
            self._read_raw(first, min(last + 1, first + self.chunk_rows))

    # -- opening and validation

    @classmethod
    def open(cls, path: Path | str) -> "RowStore":
        """Open and validate a row store; CorruptIndexError/ConfigError with a one-line message if unusable."""
        path = Path(path)
        if not path.exists():
            raise CorruptIndexError(f"row store {path} not found, so the index is incomplete; {REBUILD}")
        try:
            f = _open_h5(path, "r")
        except (OSError, ValueError, RuntimeError) as e:
            raise CorruptIndexError(
                f"{path} is truncated or corrupted (it cannot be opened as HDF5: {first_line(e)}); {REBUILD}"
            ) from None
        try:
            attrs = cls._validate(path, f)
            return cls(path, f, attrs)
        except BaseException:
            with contextlib.suppress(Exception):
                f.close()
            raise

    @staticmethod
    def _validate(path: Path, f: h5py.File) -> dict[str, Any]:
        try:
            attrs = _read_attrs(f)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
            raise CorruptIndexError(
                f"the attributes of {path} cannot be read ({first_line(e)}), so the file is corrupted; {REBUILD}"
            ) from None
        if "schema_version" not in attrs:
            raise CorruptIndexError(f"{path} is not an msif-index row store (no schema_version); {REBUILD}")
        version = attrs["schema_version"]
        if version not in READABLE_SCHEMA_VERSIONS:
            raise ConfigError(
                f"{path} has row-store schema version {version} but this msif-index reads versions "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}; {REBUILD} (or use the msif-index "
                f"version that built it)"
            )
        try:
            n, k, dtype = int(attrs["n"]), int(attrs["k"]), str(attrs["dtype"])
        except (KeyError, TypeError, ValueError):
            raise CorruptIndexError(f"{path} lacks valid n/k/dtype attributes, so it is corrupted; {REBUILD}") from None
        if dtype not in DTYPES or n < 0 or k < 1:
            raise CorruptIndexError(f"{path} has invalid attributes n={n} k={k} dtype={dtype!r}; {REBUILD}")
        scaled = bool(attrs.get(ROW_SCALES, False))
        names = (ROWS, WRITTEN) + ((SCALES,) if scaled else ()) + ((HASHES,) if version >= 2 else ())
        for name in names:
            try:
                ok = isinstance(f.get(name), h5py.Dataset)
            except (OSError, KeyError, ValueError, RuntimeError):
                ok = False
            if not ok:
                raise CorruptIndexError(f"{path} has no readable {name!r} dataset, so it is corrupted; {REBUILD}")
        rows, written = f[ROWS], f[WRITTEN]
        for ds in (f[name] for name in names):
            if ds.is_virtual:
                for src in ds.virtual_sources():
                    if not (path.parent / src.file_name).is_file():
                        raise CorruptIndexError(f"{path} links to {src.file_name}, which is missing; {REBUILD}")
        if scaled and (dtype != "float16" or f[SCALES].shape != (n,) or f[SCALES].dtype != np.float32):
            raise CorruptIndexError(f"{path} has an inconsistent 'scales' dataset; {REBUILD}")
        if version >= 2 and (f[HASHES].shape != (n,) or f[HASHES].dtype != np.uint64):
            raise CorruptIndexError(f"{path} has an inconsistent {HASHES!r} dataset; {REBUILD}")
        if rows.shape != (n, k) or rows.dtype != np.dtype(dtype) or written.shape != (n,):
            raise CorruptIndexError(
                f"{path} has inconsistent datasets (rows {rows.shape} {rows.dtype}, written {written.shape}; "
                f"expected ({n}, {k}) {dtype}); {REBUILD}"
            )
        for s in range(0, n, _MASK_BLOCK):
            try:
                mask = written[s : min(n, s + _MASK_BLOCK)]
            except (OSError, RuntimeError) as e:
                # through a virtual dataset the error is rows.h5's: name the shard that fails on its own
                bad = _failing_sources(path.parent, written, s, min(n, s + _MASK_BLOCK))
                where = f" (in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})" if bad else ""
                cut = _TRUNCATED.search(str(e))
                if cut and len(bad) <= 1:       # HDF5's own words: "truncated file: eof = A, ..., stored_eof = B"
                    raise CorruptIndexError(
                        f"{path}: {bad[0] if bad else 'a shard'} is truncated ({int(cut[1]):,} of its "
                        f"{int(cut[2]):,} bytes are there: a copy or a disk that did not finish?); {REBUILD}") from None
                raise CorruptIndexError(
                    f"{path} fails its checksum in the 'written' mask{where} ({first_line(e)}), so it is "
                    f"corrupted; {REBUILD}"
                ) from None
            if not mask.all():
                raise CorruptIndexError(
                    f"{path} is half-written: rows {_fmt_ranges(_missing_ranges(mask, s))} were never written; {REBUILD}"
                )
        attrs["n"], attrs["k"], attrs["dtype"] = n, k, dtype
        return attrs

    # -- properties and lifetime

    @property
    def attrs(self) -> dict[str, Any]:
        """Every file attribute (schema_version, n, k, dtype and the writer's), JSON values decoded."""
        return dict(self._attrs)

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n, self.k)

    def close(self) -> None:
        with self._lock:
            f, self._f = self._f, None
            if f is not None:
                with contextlib.suppress(Exception):
                    f.close()

    def __enter__(self) -> "RowStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __len__(self) -> int:
        return self.n

    def __repr__(self) -> str:
        return f"RowStore({str(self.path)!r}, n={self.n}, k={self.k}, dtype={self.dtype})"

    def _file(self) -> h5py.File:
        if self._f is None:
            raise RuntimeError(f"row store {self.path} is closed")
        return self._f

    def _read_error(self, what: str, exc: BaseException) -> CorruptIndexError:
        return CorruptIndexError(
            f"{self.path}: {what} fail their checksum or cannot be read ({first_line(exc)}), "
            f"so the file is corrupted; {REBUILD}"
        )

    def _shards_of(self, start: int, stop: int) -> list[str]:
        """The files (shards of a virtual row dataset) that hold rows [start, stop); [] if not virtual."""
        return [name for name, _ in _virtual_sources(self._rows, start, stop)]

    def _read_raw(self, start: int, stop: int) -> np.ndarray:
        """Rows [start, stop) as stored, each verified against its checksum."""
        with self._lock:
            self._file()
            try:
                rows = self._rows[start:stop]
                hashes = None if self._hashes is None else self._hashes[start:stop]
            except (OSError, RuntimeError) as e:
                raise self._read_error(f"rows {start}..{stop - 1}{self._where(start, stop)}", e) from None
        if hashes is not None:
            bad = np.flatnonzero(row_hash(rows) != hashes)
            if bad.size:
                first = start + int(bad[0])
                raise self._read_error(
                    f"rows {start}..{stop - 1}{self._where(first, first + 1)}",
                    ValueError(f"{bad.size} row(s) differ from their hash, the first is row {first}"))
        return rows

    def _where(self, start: int, stop: int) -> str:
        files = self._shards_of(start, stop)
        return f" (in {', '.join(files[:3])}{', ...' if len(files) > 3 else ''})" if files else ""

    def _read_scales(self, start: int, stop: int) -> np.ndarray:
        assert self._scales is not None
        with self._lock:
            self._file()
            try:
                return self._scales[start:stop]
            except (OSError, RuntimeError) as e:
                raise self._read_error(f"the scales of rows {start}..{stop - 1}", e) from None

    def _read_rows(self, start: int, stop: int, dtype: Any) -> np.ndarray:
        """Rows [start, stop) as ``dtype``, scaled back where the store is scaled."""
        raw = self._read_raw(start, stop)
        if not self.scaled:
            return np.asarray(raw, dtype=dtype)
        out = np.empty(raw.shape, dtype=dtype)
        with np.errstate(over="ignore"):
            np.multiply(raw, self._read_scales(start, stop)[:, None], out=out, casting="unsafe")
        return out

    # -- reading

    def read(self, start: int, stop: int, dtype: Any = np.float32) -> np.ndarray:
        """Rows [start, stop) as an array of ``dtype`` (float32 by default)."""
        start, stop = int(start), int(stop)
        if not 0 <= start <= stop <= self.n:
            raise ConfigError(
                f"row range {start}..{stop} is outside the {self.n} rows of {self.path.name}; "
                f"use 0 <= start <= stop <= {self.n}"
            )
        if start == stop:
            return np.empty((0, self.k), dtype=dtype)
        return self._read_rows(start, stop, dtype)

    def take(self, ids: Any, dtype: Any = np.float32) -> np.ndarray:
        """Rows ``ids`` (any order, duplicates allowed) as an [len(ids), k] array, in the order given.

        Reads the sorted unique ids chunk by chunk, so memory beyond the result is one chunk.
        """
        if torch is not None and isinstance(ids, torch.Tensor):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.size == 0:
            return np.empty((0, self.k), dtype=dtype)
        if ids.dtype.kind not in "iu":
            if ids.dtype.kind == "f" and np.all(np.mod(ids, 1) == 0):
                ids = ids.astype(np.int64)
            else:
                raise ConfigError(f"row ids must be integers, got dtype {ids.dtype}; pass integer example ids")
        ids = ids.reshape(-1).astype(np.int64, copy=False)
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.n:
            bad = lo if lo < 0 else hi
            raise ConfigError(
                f"row id {bad} is out of range: {self.path.name} holds {self.n} rows (ids 0..{self.n - 1}); "
                f"pass ids in that range"
            )
        uniq, inverse = np.unique(ids, return_inverse=True)
        out = np.empty((uniq.size, self.k), dtype=dtype)
        chunk_of = uniq // self.chunk_rows
        bounds = np.flatnonzero(np.diff(chunk_of)) + 1
        starts = np.concatenate(([0], bounds))
        stops = np.concatenate((bounds, [uniq.size]))
        for g0, g1 in zip(starts.tolist(), stops.tolist()):
            r0, r1 = int(uniq[g0]), int(uniq[g1 - 1]) + 1
            block = self._read_raw(r0, r1)
            sel = uniq[g0:g1] - r0
            if self.scaled:
                with np.errstate(over="ignore"):
                    np.multiply(block[sel], self._read_scales(r0, r1)[sel, None], out=out[g0:g1],
                                casting="unsafe")
            else:
                out[g0:g1] = block[sel]
        return out[inverse.reshape(-1)]

    def iter_blocks(
        self, block_rows: int = 65536, dtype: Any = np.float32, max_block_bytes: int = _MAX_BLOCK_BYTES
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, rows[start:start+m]) over all rows in order.

        A block holds at most ``block_rows`` rows and at most ``max_block_bytes`` bytes (the
        last one may be shorter), so memory stays bounded whatever n is.
        """
        step = _block_step(block_rows, self.k, np.dtype(dtype).itemsize, max_block_bytes, self.chunk_rows)
        for s in range(0, self.n, step):
            e = min(self.n, s + step)
            yield s, self._read_rows(s, e, dtype)

    def verify(self, block_rows: int = 65536) -> None:
        """Read every row (and extra dataset) once, so any checksum failure raises CorruptIndexError now."""
        step = _block_step(block_rows, self.k, np.dtype(self.dtype).itemsize, _MAX_BLOCK_BYTES, self.chunk_rows)
        for s in range(0, self.n, step):
            self._read_raw(s, min(self.n, s + step))
        if self.scaled:
            self._read_scales(0, self.n)
        for name in self.dataset_names():
            self.dataset(name)

    def dataset_names(self) -> list[str]:
        """Names of the extra datasets (everything but rows and written)."""
        with self._lock:
            return sorted(n for n in self._file().keys() if n not in _RESERVED_DATASETS)

    def dataset(self, name: str) -> np.ndarray:
        """An extra dataset stored with ``RowWriter.add_dataset``, read whole."""
        with self._lock:
            f = self._file()
            try:
                ds = f.get(name)
            except (OSError, KeyError, ValueError, RuntimeError):
                ds = None
            if name in _RESERVED_DATASETS or not isinstance(ds, h5py.Dataset):
                raise CorruptIndexError(
                    f"{self.path} has no dataset {name!r}, so the index is incomplete or from another version; {REBUILD}"
                )
            try:
                arr = ds[...]
                scalar = bool(ds.attrs.get("scalar", False))
            except (OSError, RuntimeError) as e:
                raise self._read_error(f"dataset {name!r} values", e) from None
        return arr.reshape(()) if scalar else arr


def _block_step(block_rows: int, k: int, itemsize: int, max_block_bytes: int, chunk_rows: int) -> int:
    if int(block_rows) != block_rows or block_rows < 1:
        raise ConfigError(f"block_rows must be a positive integer, got {block_rows!r}")
    cap = max(1, int(max_block_bytes) // max(1, k * max(itemsize, 4)))
    step = min(int(block_rows), cap)
    if step >= chunk_rows and step < block_rows:
        step -= step % chunk_rows  # whole chunks: each chunk is read (and checksummed) once
    return max(1, step)


# ----------------------------------------------------------------------------- shards


_SHARD_RE = re.compile(r"^shard_(\d+)\.h5$")
_SHARD_KEYS = ("shard_index", "shard_start", "shard_stop", "total_rows", "shard_rows")


class _ShardWriter:
    """What ``ShardedWriter.shard(i)`` yields: ``write(start, rows)`` with global row numbers."""

    def __init__(self, writer: RowWriter, index: int, start: int, stop: int) -> None:
        self._w = writer
        self.index, self.start, self.stop = index, start, stop

    def _local(self, start: int, m: int) -> int:
        """``start`` within the shard; ShapeError when rows [start, start + m) are outside it."""
        start = int(start)
        if start < self.start or start + m > self.stop:
            raise ShapeError(
                f"rows {start}..{start + m - 1} are outside shard {self.index} (rows {self.start}..{self.stop - 1})"
            )
        return start - self.start

    def write(self, start: int, rows: Any) -> None:
        arr = _to_numpy(rows)
        self._w.write(self._local(start, arr.shape[0] if arr.ndim >= 1 else 0), arr)

    def buffer(self, start: int, m: int) -> np.ndarray | None:
        """RowWriter.buffer with a global row number."""
        return self._w.buffer(self._local(start, m), m)

    def add_dataset(self, name: str, array: Any) -> None:
        self._w.add_dataset(name, array)


class ShardedWriter:
    """Resumable writer of n rows as shard files ``shard_{i:05d}.h5`` in ``folder``.

    Shard i holds rows [i*shard_rows, min(n, (i+1)*shard_rows)); it is written incrementally
    into a temporary file and renamed only when complete, so after a kill the shards on disk
    are exactly the finished ones. Typical use::

        sw = ShardedWriter(folder, n, k, "float32", shard_rows, attrs)
        for start, stop in sw.pending_ranges():          # one range per missing shard
            with sw.shard(sw.shard_index(start)) as w:
                for s in range(start, stop, batch):
                    w.write(s, compute(s, min(stop, s + batch)))
        for start, block in sw.iter_blocks(65536):
            ...

    Shards written with other n/k/dtype/shard_rows/attrs raise ConfigError (rebuild with
    --overwrite), or with ``discard_mismatched`` (what --overwrite passes) are deleted and written
    again; shards that cannot be opened are deleted with a warning and recomputed.
    Leftover temporary shard files of killed writers are removed when the writer is created.
    ``drop_cache`` (default ``DROP_SHARD_PAGES``, on): each shard's pages leave the page cache once
    it is fsynced, so the next shard's writes reuse them (see msif_index.atomic.drop_page_cache).
    """

    def __init__(
        self,
        folder: Path | str,
        n: int,
        k: int,
        dtype: Any = "float32",
        shard_rows: int = 65536,
        attrs: Mapping[str, Any] | None = None,
        background: bool | None = None,
        background_commit: bool | None = None,
        drop_cache: bool | None = None,
        discard_mismatched: bool = False,
    ) -> None:
        self.folder = Path(folder)
        self.background = BACKGROUND_SHARD_WRITES if background is None else bool(background)
        if int(n) != n or n < 0:
            raise ConfigError(f"the number of rows must be a non-negative integer, got {n!r}")
        if int(k) != k or k < 1:
            raise ConfigError(f"the row width (projection dimension) must be a positive integer, got {k!r}")
        if int(shard_rows) != shard_rows or shard_rows < 1:
            raise ConfigError(f"shard_rows must be a positive integer, got {shard_rows!r}")
        self.n, self.k, self.shard_rows = int(n), int(k), int(shard_rows)
        self.dtype = normalize_dtype(dtype)
        self.attrs = dict(attrs or {})
        clash = (_RESERVED_ATTRS | set(_SHARD_KEYS)).intersection(self.attrs)
        if clash:
            raise ValueError(f"attribute names {sorted(clash)} are reserved by the sharded row store")
        self._norm_attrs = normalize_attrs(self.attrs)
        self.num_shards = math.ceil(self.n / self.shard_rows)
        self._valid: dict[int, tuple[int, int, int]] = {}
        self.background_commit = BACKGROUND_SHARD_COMMITS if background_commit is None else bool(background_commit)
        self.drop_cache = DROP_SHARD_PAGES if drop_cache is None else bool(drop_cache)
        self._committing: tuple[int, RowWriter] | None = None
        self.discard_mismatched = bool(discard_mismatched)
        self.folder.mkdir(parents=True, exist_ok=True)
        cleanup_stale_tmp(self.folder, ".shard_*.h5.tmp-*")

    # -- layout

    def shard_path(self, i: int) -> Path:
        return self.folder / f"shard_{i:05d}.h5"

    def shard_range(self, i: int) -> tuple[int, int]:
        if not 0 <= i < self.num_shards:
            raise IndexError(f"shard {i} does not exist (there are {self.num_shards})")
        return i * self.shard_rows, min(self.n, (i + 1) * self.shard_rows)

    def shard_index(self, row: int) -> int:
        """The shard holding ``row``."""
        if not 0 <= row < self.n:
            raise IndexError(f"row {row} is outside 0..{self.n - 1}")
        return int(row) // self.shard_rows

    def _shard_attrs(self, i: int) -> dict[str, Any]:
        start, stop = self.shard_range(i)
        return {
            **self.attrs,
            "shard_index": i,
            "shard_start": start,
            "shard_stop": stop,
            "total_rows": self.n,
            "shard_rows": self.shard_rows,
        }

    def _expected_attrs(self, i: int) -> dict[str, Any]:
        start, stop = self.shard_range(i)
        return {
            **self._norm_attrs,
            **normalize_attrs({k: v for k, v in self._shard_attrs(i).items() if k in _SHARD_KEYS}),
            "schema_version": SCHEMA_VERSION,
            "n": stop - start,
            "k": self.k,
            "dtype": self.dtype,
            **({ROW_SCALES: True} if self.dtype == "float16" else {}),
        }

    # -- state on disk

    @staticmethod
    def _stat_key(path: Path) -> tuple[int, int, int] | None:
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def _check_shard(self, i: int) -> bool:
        path = self.shard_path(i)
        key = self._stat_key(path)
        if key is None:
            self._valid.pop(i, None)
            return False
        if self._valid.get(i) == key:
            return True
        try:
            store = RowStore.open(path)
        except CorruptIndexError:
            warn_user(f"shard {path} is truncated, corrupted or half-written; deleted it, its rows will be computed "
                      f"again")
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            self._valid.pop(i, None)
            return False
        with store:
            found = store.attrs
        if found.get("schema_version") != SCHEMA_VERSION:     # an unfinished build of an older version
            warn_user(f"shard {path} was written by an older msif-index (row-store schema "
                      f"{found.get('schema_version')}, now {SCHEMA_VERSION}); deleted it, its rows will be "
                      f"computed again")
            path.unlink()
            self._valid.pop(i, None)
            return False
        expected = self._expected_attrs(i)
        for name in sorted(set(found) | set(expected)):
            a, b = found.get(name, "<missing>"), expected.get(name, "<missing>")
            if a != b:
                if self.discard_mismatched:            # --overwrite: its rows are computed again
                    path.unlink()
                    self._valid.pop(i, None)
                    return False
                raise ConfigError(
                    f"shard {path.name} in {self.folder} was written with other settings "
                    f"({name}: {a!r} there, {b!r} now); rebuild with `msif build-index ... --overwrite` "
                    f"to discard the old shards"
                )
        self._valid[i] = key
        return True

    def wait_commits(self) -> None:
        """Wait for the shard being committed in the background (if any); raise its error."""
        pending, self._committing = self._committing, None
        self._wait(pending)

    def _wait(self, pending: tuple[int, RowWriter] | None) -> None:
        if pending is None:
            return
        i, writer = pending
        writer.wait_commit()
        key = self._stat_key(self.shard_path(i))
        if key is not None:
            self._valid[i] = key

    def completed_shards(self) -> list[int]:
        """Indices of the shard files that exist and are complete and valid (sorted)."""
        self.wait_commits()
        for p in self.folder.glob("shard_*.h5"):
            m = _SHARD_RE.match(p.name)
            if m and int(m.group(1)) >= self.num_shards:
                if self.discard_mismatched:
                    p.unlink()
                    continue
                raise ConfigError(
                    f"{p} does not belong to a build of {self.n} rows in shards of {self.shard_rows} "
                    f"(other data set or settings); rebuild with `msif build-index ... --overwrite`"
                )
        return [i for i in range(self.num_shards) if self._check_shard(i)]

    def pending_shards(self) -> list[int]:
        """Indices of the shards still to write."""
        done = set(self.completed_shards())
        return [i for i in range(self.num_shards) if i not in done]

    def pending_ranges(self) -> Iterator[tuple[int, int]]:
        """(start, stop) of the rows still to compute: one range per missing shard, in order."""
        for i in self.pending_shards():
            yield self.shard_range(i)

    def is_complete(self) -> bool:
        return not self.pending_shards()

    def pending_bytes(self) -> int:
        """What the shards still to write take on disk, from above (``expected_file_bytes``)."""
        itemsize = np.dtype(self.dtype).itemsize
        total = 0
        for i in self.pending_shards():
            start, stop = self.shard_range(i)
            total += expected_file_bytes(stop - start, self.k, itemsize, self._shard_attrs(i),
                                         self.dtype == "float16")
        return total

    # -- writing

    @contextlib.contextmanager
    def shard(self, i: int) -> Iterator[_ShardWriter]:
        """Write shard ``i``: yields a writer whose ``write(start, rows)`` takes global row numbers.

        Every row of the shard must be written; on a clean exit the shard is committed
        atomically, on an exception it is discarded.
        """
        start, stop = self.shard_range(i)
        path = self.shard_path(i)
        with RowWriter(path, stop - start, self.k, self.dtype, self._shard_attrs(i),
                       background=self.background, background_commit=self.background_commit,
                       drop_cache=self.drop_cache) as w:
            yield _ShardWriter(w, i, start, stop)
        if self.background_commit:
            # this shard's commit runs while the caller computes the next one; the previous shard's
            # commit (overlapped with this shard's computation) is awaited now: at most two in flight.
            # This one is recorded first, so that an error of the previous one leaves it awaited too.
            previous, self._committing = self._committing, (i, w)
            self._wait(previous)
            return
        key = self._stat_key(path)
        if key is not None:
            self._valid[i] = key

    # -- reading

    def open_shard(self, i: int) -> RowStore:
        self.wait_commits()
        return RowStore.open(self.shard_path(i))

    def iter_blocks(
        self, block_rows: int = 65536, dtype: Any = np.float32, max_block_bytes: int = _MAX_BLOCK_BYTES
    ) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (start, block) over all n rows in order, across shards; one shard open at a time."""
        pending = self.pending_shards()
        if pending:
            shown = ", ".join(str(i) for i in pending[:5]) + (", ..." if len(pending) > 5 else "")
            raise CorruptIndexError(
                f"{len(pending)} of {self.num_shards} shards in {self.folder} are not written yet "
                f"(shards {shown}); run the build again to finish it"
            )
        step = _block_step(block_rows, self.k, np.dtype(dtype).itemsize, max_block_bytes, 1)
        cur: RowStore | None = None
        cur_i = -1
        try:
            for b0 in range(0, self.n, step):
                b1 = min(self.n, b0 + step)
                out = np.empty((b1 - b0, self.k), dtype=dtype)
                p = b0
                while p < b1:
                    i = p // self.shard_rows
                    if i != cur_i:
                        if cur is not None:
                            cur.close()
                        cur, cur_i = None, -1
                        cur = self.open_shard(i)
                        cur_i = i
                    s0, s1 = self.shard_range(i)
                    q = min(b1, s1)
                    out[p - b0 : q - b0] = cur._read_rows(p - s0, q - s0, dtype)
                    p = q
                yield b0, out
        finally:
            if cur is not None:
                cur.close()

    def remove(self) -> None:
        """Delete every shard file (e.g. after merging them into one store)."""
        for p in self.folder.glob("shard_*.h5"):
            if _SHARD_RE.match(p.name):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        self._valid.clear()


def _create_small_dataset(f: h5py.File, name: str, array: Any) -> None:
    """A small extra array (any numeric dtype, any shape, scalars and empty arrays included) stored
    under ``name`` in ``f``, checksummed; ``RowStore.dataset`` reads it back."""
    if name in _RESERVED_DATASETS or not name or "/" in name:
        raise ValueError(f"dataset name {name!r} is reserved or invalid")
    arr = _to_numpy(array) if (torch is not None and isinstance(array, torch.Tensor)) else np.asarray(array)
    if arr.dtype.kind not in "biufc":
        raise TypeError(f"dataset {name!r} must be numeric, got dtype {arr.dtype}")
    scalar = arr.ndim == 0
    data = arr.reshape(1) if scalar else arr
    maxshape = tuple(None if s == 0 else s for s in data.shape)
    chunks = tuple(max(1, min(s, 1 << 16)) if s else 1 for s in data.shape)
    ds = f.create_dataset(name, shape=data.shape, maxshape=maxshape, dtype=data.dtype, chunks=chunks,
                          fletcher32=True)
    if data.size:
        ds[...] = data
    ds.attrs["scalar"] = np.bool_(scalar)


def link_shards(sharded: "ShardedWriter", path: Path | str, attrs: Mapping[str, Any] | None = None,
                datasets: Mapping[str, Any] | None = None) -> None:
    """Write ``path`` atomically: a row store whose ``rows``, ``row_hash`` and ``written`` (and a
    float16 store's ``scales``) are HDF5 virtual datasets over the complete shards of ``sharded``
    (no copy of the rows), plus small extra ``datasets``.

    The shard files stay where they are and become part of the store (paths stored relative to
    ``path``'s folder); RowStore.open checks that every one of them exists.
    """
    path = Path(path)
    if not sharded.is_complete():
        raise CorruptIndexError(f"shards in {sharded.folder} are incomplete; run the build again")
    np_dtype = np.dtype(sharded.dtype)
    rows = h5py.VirtualLayout(shape=(sharded.n, sharded.k), dtype=np_dtype)
    written = h5py.VirtualLayout(shape=(sharded.n,), dtype=np.bool_)
    hashes = h5py.VirtualLayout(shape=(sharded.n,), dtype=np.uint64)
    scaled = sharded.dtype == "float16"
    scales = h5py.VirtualLayout(shape=(sharded.n,), dtype=np.float32) if scaled else None
    for i in range(sharded.num_shards):
        start, stop = sharded.shard_range(i)
        rel = str(sharded.shard_path(i).relative_to(path.parent))
        rows[start:stop] = h5py.VirtualSource(rel, ROWS, shape=(stop - start, sharded.k))
        written[start:stop] = h5py.VirtualSource(rel, WRITTEN, shape=(stop - start,))
        hashes[start:stop] = h5py.VirtualSource(rel, HASHES, shape=(stop - start,))
        if scales is not None:
            scales[start:stop] = h5py.VirtualSource(rel, SCALES, shape=(stop - start,))
    try:
        with atomic_path(path) as tmp:
            with _open_h5(tmp, "w") as f:
                f.create_virtual_dataset(ROWS, rows, fillvalue=np.nan)
                f.create_virtual_dataset(WRITTEN, written, fillvalue=False)
                f.create_virtual_dataset(HASHES, hashes, fillvalue=0)
                header = {"schema_version": SCHEMA_VERSION, "n": sharded.n, "k": sharded.k, "dtype": sharded.dtype}
                if scales is not None:
                    f.create_virtual_dataset(SCALES, scales, fillvalue=np.nan)
                    header[ROW_SCALES] = True
                _write_attrs(f, {**header, **dict(attrs or {})})
                for name, array in (datasets or {}).items():
                    _create_small_dataset(f, name, array)
    except (OSError, RuntimeError) as e:
        if is_disk_full(e):
            raise disk_full_error(path) from e
        raise

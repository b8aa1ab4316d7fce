"""Row store, sharded writer, atomic writes and fingerprints (fast, CPU only)."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

import msif_index.atomic
import msif_index.store
from msif_index.atomic import (
    atomic_path,
    cleanup_stale_tmp,
    is_disk_full,
    read_json,
    write_bytes_atomic,
    write_json_atomic,
)
from msif_index.errors import ConfigError, CorruptIndexError, DiskFullError, NonFiniteError, ShapeError
from msif_index.fingerprint import fingerprint_tensors, short
from msif_index.store import SCHEMA_VERSION, RowStore, RowWriter, ShardedWriter

REPO = Path(__file__).resolve().parents[1]


def one_line(exc: BaseException) -> str:
    msg = str(exc.value if hasattr(exc, "value") else exc)
    assert msg and "\n" not in msg, msg
    return msg


def rows_for(start: int, stop: int, k: int = 3) -> np.ndarray:
    """Deterministic rows: row r is r * 10 + [0, 1, ..., k-1] (exact in float16 for small r)."""
    r = np.arange(start, stop, dtype=np.float64)[:, None]
    return (r * 10 + np.arange(k)[None, :]).astype(np.float32)


def write_store(path: Path, data: np.ndarray, dtype: str = "float32", attrs=None) -> None:
    with RowWriter(path, data.shape[0], data.shape[1], dtype, attrs or {}) as w:
        for s in range(0, data.shape[0], 3):
            w.write(s, data[s : s + 3])


def tmp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.glob(".*.tmp-*"))


# ----------------------------------------------------------------------------- RowWriter / RowStore


def test_round_trip_dtypes_attrs_and_datasets(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.standard_normal((11, 5)).astype(np.float32)
    attrs = {
        "config": {"proj_dim": 5, "layers": ["a", "b"], "lr": 0.1},
        "pair": (1, 2),
        "name": "digits",
        "flag": True,
        "count": 7,
        "scale": 2.5,
        "nothing": None,
    }
    for dtype, tol in (("float32", 0.0), ("float16", 2e-3), ("float64", 0.0)):
        path = tmp_path / f"{dtype}.h5"
        with RowWriter(path, 11, 5, dtype, attrs) as w:
            w.write(0, torch.from_numpy(data[:6]))  # tensors are accepted
            w.write(6, data[6:])
            w.add_dataset("precond", np.eye(3))
            w.add_dataset("scalar", np.float64(3.5))
        assert tmp_files(tmp_path) == []
        with RowStore.open(path) as st:
            assert (st.n, st.k, st.dtype) == (11, 5, dtype)
            got = st.read(0, 11)
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, data, rtol=tol, atol=tol)
            a = st.attrs
            assert a["config"] == {"proj_dim": 5, "layers": ["a", "b"], "lr": 0.1}
            assert a["pair"] == [1, 2] and a["name"] == "digits" and a["flag"] is True
            assert a["count"] == 7 and a["scale"] == 2.5 and a["nothing"] is None
            assert a["schema_version"] == SCHEMA_VERSION and a["n"] == 11 and a["k"] == 5
            np.testing.assert_array_equal(st.dataset("precond"), np.eye(3))
            assert st.dataset("scalar").shape == () and float(st.dataset("scalar")) == 3.5
            assert st.dataset_names() == ["precond", "scalar"]
            blocks = list(st.iter_blocks(block_rows=4))
            assert [s for s, _ in blocks] == [0, 4, 8]
            np.testing.assert_allclose(np.concatenate([b for _, b in blocks]), data, rtol=tol, atol=tol)
            assert st.read(3, 5, dtype=np.float64).dtype == np.float64
            with pytest.raises(CorruptIndexError) as e:
                st.dataset("missing")
            one_line(e)


def test_missing_rows_raise_and_leave_no_file(tmp_path):
    path = tmp_path / "rows.h5"
    with pytest.raises(CorruptIndexError) as e:
        with RowWriter(path, 10, 3) as w:
            w.write(0, rows_for(0, 4))
            w.write(7, rows_for(7, 9))
    msg = one_line(e)
    assert "4..6" in msg and "9" in msg and "never written" in msg
    assert not path.exists() and tmp_files(tmp_path) == []

    # an existing final file is untouched by a failed rewrite
    write_store(path, rows_for(0, 10))
    before = path.read_bytes()
    with pytest.raises(CorruptIndexError):
        with RowWriter(path, 10, 3) as w:
            w.write(0, rows_for(0, 2))
    assert path.read_bytes() == before and tmp_files(tmp_path) == []


def test_exception_inside_writer_discards_temp(tmp_path):
    path = tmp_path / "rows.h5"
    with pytest.raises(KeyError):
        with RowWriter(path, 4, 3) as w:
            w.write(0, rows_for(0, 4))
            raise KeyError("boom")
    assert not path.exists() and tmp_files(tmp_path) == []


def test_bad_writes(tmp_path):
    with RowWriter(tmp_path / "a.h5", 4, 3, "float16") as w:
        with pytest.raises(ShapeError) as e:
            w.write(0, np.zeros((2, 4)))
        one_line(e)
        with pytest.raises(ShapeError):
            w.write(3, np.zeros((2, 3)))
        with pytest.raises(NonFiniteError) as e:
            w.write(0, np.array([[np.nan, 0, 0]]))
        one_line(e)
        with pytest.raises(NonFiniteError) as e:
            w.write(0, np.array([[1e6, np.inf, 0]]))
        one_line(e)
        w.write(0, rows_for(0, 4))
        w.write(1, np.array([[1e6, -3e5, 0]]))           # beyond float16's range: stored scaled
    with RowStore.open(tmp_path / "a.h5") as st:
        np.testing.assert_allclose(st.read(1, 2), [[1e6, -3e5, 0]], rtol=1e-3)
    with pytest.raises(ConfigError) as e:
        RowWriter(tmp_path / "b.h5", 4, 3, "int8")
    one_line(e)
    # float32: finite rows whose sum overflows are stored; a NaN or inf entry is refused
    big = np.full((2, 3), 3e38, dtype=np.float32)
    with RowWriter(tmp_path / "c.h5", 2, 3, "float32") as w:
        for bad in (np.inf, -np.inf, np.nan):
            rows = big.copy()
            rows[1, 2] = bad
            with pytest.raises(NonFiniteError):
                w.write(0, rows)
        w.write(0, big)
    with RowStore.open(tmp_path / "c.h5") as st:
        np.testing.assert_array_equal(st.read(0, 2), big)


def test_truncated_file_is_corrupt(tmp_path):
    path = tmp_path / "rows.h5"
    write_store(path, rows_for(0, 200, k=16))
    size = path.stat().st_size
    os.truncate(path, size // 2)
    with pytest.raises(CorruptIndexError) as e:
        RowStore.open(path)
    msg = one_line(e)
    assert "truncated or corrupted" in msg and "--overwrite" in msg


def test_missing_and_garbage_files_are_corrupt(tmp_path):
    with pytest.raises(CorruptIndexError) as e:
        RowStore.open(tmp_path / "nope.h5")
    one_line(e)
    (tmp_path / "junk.h5").write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(CorruptIndexError) as e:
        RowStore.open(tmp_path / "junk.h5")
    one_line(e)


def row_byte(path: Path, row: int, byte: int = 0) -> int:
    """The file offset of byte ``byte`` of row ``row`` of a (schema 2, contiguous) row store."""
    with h5py.File(path, "r") as f:
        d = f["rows"]
        return d.id.get_offset() + row * d.shape[1] * d.dtype.itemsize + byte


def flip_byte(path: Path, offset: int, mask: int = 0xFF) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ mask]))


def test_flipped_byte_in_rows_fails_checksum(tmp_path):
    path = tmp_path / "rows.h5"
    data = rows_for(0, 12, k=4)
    write_store(path, data)
    flip_byte(path, row_byte(path, 5, 5))
    with RowStore.open(path) as st:  # opening reads only the header and the written mask
        np.testing.assert_array_equal(st.read(0, 5), data[:5])  # intact rows still read
        np.testing.assert_array_equal(st.take([4, 0]), data[[4, 0]])
        with pytest.raises(CorruptIndexError) as e:
            st.read(0, 12)
        msg = one_line(e)
        assert "checksum" in msg and "row 5" in msg and "--overwrite" in msg
        with pytest.raises(CorruptIndexError):
            st.take([5])
        with pytest.raises(CorruptIndexError):
            list(st.iter_blocks(4))
        with pytest.raises(CorruptIndexError):
            st.verify()


def _hash_reference(rows: np.ndarray) -> list[int]:
    """row_hash in plain Python integers, from its definition: B + sum_j c_j u_j mod 2^64 over the
    row's little-endian 32-bit words u_j (zero-padded to whole 64-bit words), c_j = splitmix64(j + 1) | 1."""
    from msif_index.store import _HASH_BASE
    mask = (1 << 64) - 1

    def splitmix(j: int) -> int:
        x = (j * 0x9E3779B97F4A7C15) & mask
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & mask
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & mask
        return x ^ (x >> 31)

    out = []
    for row in rows:
        raw = np.ascontiguousarray(row, dtype=row.dtype.newbyteorder("<")).tobytes()
        raw += bytes(-len(raw) % 8)
        words = [int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4)]
        out.append((_HASH_BASE + sum((splitmix(j + 1) | 1) * u for j, u in enumerate(words))) & mask)
    return out


@pytest.mark.parametrize("dtype, k", [("float32", 6), ("float32", 3), ("float16", 3), ("float16", 8),
                                      ("float64", 5), ("float64", 2), ("float16", 1)])
def test_row_hash_is_its_definition_and_catches_one_and_two_flipped_bits(dtype, k):
    """row_hash (vectorized) equals its definition in plain integers, padding and byte order included
    (a big-endian array hashes as its little-endian twin); every single flipped bit, every pair of
    flipped bits (the sign bits of two float64 entries among them, which a hash over 64-bit words
    misses) and every change of one 32-bit word changes the row's hash, and no other row's; a zero row
    does not hash to 0 (the fill value of rows never written)."""
    from msif_index.store import row_hash
    rng = np.random.default_rng(k)
    rows = rng.standard_normal((4, k)).astype(dtype)
    h = row_hash(rows)
    assert h.dtype == np.uint64 and h.tolist() == _hash_reference(rows)
    assert row_hash(rows.astype(rows.dtype.newbyteorder(">"))).tolist() == h.tolist()
    zeros = np.zeros((2, k), dtype)
    assert row_hash(zeros).tolist() == _hash_reference(zeros) and 0 not in row_hash(zeros).tolist()
    raw = rows.view(np.uint8)
    for r in range(rows.shape[0]):
        for byte in range(raw.shape[1]):
            for bit in range(8):
                raw[r, byte] ^= 1 << bit
                changed = row_hash(rows) != h
                raw[r, byte] ^= 1 << bit
                assert changed.tolist() == [i == r for i in range(rows.shape[0])], (r, byte, bit)
    bits = raw.shape[1] * 8
    row = np.unpackbits(raw[0:1], axis=1, bitorder="little")[0]
    i, j = np.triu_indices(bits, 1)                # every pair of distinct bits of row 0
    flipped = np.tile(row, (len(i), 1))
    flipped[np.arange(len(i)), i] ^= 1
    flipped[np.arange(len(i)), j] ^= 1
    variants = np.packbits(flipped, axis=1, bitorder="little").view(dtype)
    assert (row_hash(variants) != h[0]).all()
    if dtype == "float64":                          # the two sign bits named above, explicitly
        signs = rows[0:1].copy()
        signs[0, :2] *= -1
        assert row_hash(signs)[0] != h[0]
    if raw.shape[1] >= 4:
        for _ in range(200):                       # any new value of one aligned 32-bit word
            r, w = int(rng.integers(4)), int(rng.integers(raw.shape[1] // 4))
            saved = raw[r, 4 * w:4 * w + 4].copy()
            raw[r, 4 * w:4 * w + 4] = rng.integers(0, 256, 4, dtype=np.uint8)
            if not np.array_equal(saved, raw[r, 4 * w:4 * w + 4]):
                assert row_hash(rows)[r] != h[r]
            raw[r, 4 * w:4 * w + 4] = saved
    assert row_hash(np.zeros((0, k), dtype)).shape == (0,)


@pytest.mark.parametrize("mode", ["foreground", "background", "direct-simulated", "direct"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
def test_every_write_path_stores_the_same_rows(tmp_path, monkeypatch, mode, dtype):
    """Rows written in the caller's thread, by the background writer through the page cache, and with
    O_DIRECT for whole pages (real where the file system takes it, else skipped; "simulated": the same
    split into head, aligned pages and tail through an ordinary descriptor) read back the same, each
    row verified against its hash, whatever the blocks' alignment (rows of 1,000 float32 cross page
    borders anywhere; blocks out of order; a block rewritten)."""
    import msif_index.store as S
    n, k = 37, 1000
    data = np.random.default_rng(1).standard_normal((n, k)).astype(np.float32)
    if mode == "direct-simulated":
        monkeypatch.setattr(S, "_open_direct", lambda path: os.open(path, os.O_WRONLY))
    with RowWriter(tmp_path / "ref.h5", n, k, dtype) as w:
        w.write(0, data)
    with RowWriter(tmp_path / "w.h5", n, k, dtype, background=mode != "foreground") as w:
        if mode == "direct" and w._direct_fd is None:
            pytest.skip("this file system does not take O_DIRECT")
        if mode in ("direct", "direct-simulated"):
            assert w._direct_fd is not None
        w.write(5, data[5:6] + 1)                  # rewritten with the right row below
        for a, b in [(0, 3), (3, 14), (14, 20), (26, n), (20, 26), (5, 6)]:
            w.write(a, data[a:b])
        if mode in ("direct", "direct-simulated"):
            assert w._direct_fd is not None           # no silent fallback to the page cache
    with RowStore.open(tmp_path / "w.h5") as st, RowStore.open(tmp_path / "ref.h5") as ref:
        st.verify()
        np.testing.assert_array_equal(st.read(0, n), ref.read(0, n))
        np.testing.assert_array_equal(st.take([36, 0, 17]), ref.take([36, 0, 17]))
        tol = 2e-3 if dtype == "float16" else 0
        np.testing.assert_allclose(st.read(0, n), data, rtol=tol, atol=tol)


@pytest.mark.parametrize("background", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_row_metadata_kept_in_memory_is_flushed_whole(tmp_path, monkeypatch, background, dtype):
    """The hashes, scales and mask bits of consecutive blocks wait in memory (up to _META_ROWS rows,
    here 5) and are written when a block does not follow, the window is full, or the file ends:
    rewrites, out-of-order blocks and blocks larger than the window all read back verified."""
    import msif_index.store as S
    monkeypatch.setattr(S, "_META_ROWS", 5)
    n, k = 23, 7
    data = np.random.default_rng(4).standard_normal((n, k)).astype(np.float32)
    with RowWriter(tmp_path / "m.h5", n, k, dtype, background=background) as w:
        w.write(2, data[2:4] * 3)                  # rewritten below
        for a, b in [(0, 2), (2, 4), (4, 5), (5, 12), (12, 13), (20, n), (13, 20), (4, 5)]:
            w.write(a, data[a:b])
    with RowStore.open(tmp_path / "m.h5") as st:
        st.verify()
        tol = 2e-3 if dtype == "float16" else 0
        np.testing.assert_allclose(st.read(0, n), data, rtol=tol, atol=tol)


def test_a_lost_row_write_fails_its_hash(tmp_path, monkeypatch):
    """A block whose bytes never reach the file (the mask and hashes say written) reads as zeros, which
    fail the row hashes: CorruptIndexError, not zeros."""
    import msif_index.store as S
    real = S._pwrite_all
    calls = []

    def lose_second(fd, data, offset):
        calls.append(offset)
        if len(calls) != 2:
            real(fd, data, offset)

    monkeypatch.setattr(S, "_pwrite_all", lose_second)
    data = rows_for(0, 12, k=4)
    write_store(tmp_path / "lost.h5", data)        # blocks of 3 rows: rows 3..5 lost
    monkeypatch.undo()
    with RowStore.open(tmp_path / "lost.h5") as st:
        np.testing.assert_array_equal(st.read(0, 3), data[:3])
        with pytest.raises(CorruptIndexError, match="row 3"):
            st.read(0, 12)


def test_disk_full_in_the_background_writer_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    """ENOSPC from the writer thread's pwrite: DiskFullError in the caller (from a later write or on
    exit), the previous file untouched, no temporary file, no descriptor left open."""
    import msif_index.store as S
    path = tmp_path / "rows.h5"
    write_store(path, rows_for(0, 10))
    before = path.read_bytes()
    fds = len(os.listdir("/proc/self/fd")) if os.path.isdir("/proc/self/fd") else None

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(S, "_pwrite_all", no_space)
    with pytest.raises(DiskFullError) as e:
        with RowWriter(path, 10, 3, background=True) as w:
            for s0 in range(0, 10, 2):
                w.write(s0, rows_for(s0, s0 + 2))
    monkeypatch.undo()
    assert str(path) in one_line(e) and "free space" in one_line(e)
    assert path.read_bytes() == before and tmp_files(tmp_path) == []
    if fds is not None:
        assert len(os.listdir("/proc/self/fd")) <= fds


@pytest.mark.parametrize("code", ["EINVAL", "EOPNOTSUPP"])
def test_direct_writes_fall_back_when_the_file_system_refuses_them(tmp_path, monkeypatch, code):
    """A file system that opens with O_DIRECT but refuses its writes (EINVAL, EOPNOTSUPP) gets the
    rows through the page cache instead, once, with nothing lost."""
    import msif_index.store as S
    n, k = 40, 1000
    data = np.random.default_rng(2).standard_normal((n, k)).astype(np.float32)
    direct = set()

    def fake_open(path):
        fd = os.open(path, os.O_WRONLY)
        direct.add(fd)
        return fd
    real = S.os.pwrite
    refused = []

    def pwrite(fd, data, offset):
        if fd in direct:
            refused.append(offset)
            raise OSError(getattr(errno, code), code)
        return real(fd, data, offset)

    monkeypatch.setattr(S, "_open_direct", fake_open)
    monkeypatch.setattr(S.os, "pwrite", pwrite)
    with RowWriter(tmp_path / "w.h5", n, k, background=True) as w:
        for s0 in range(0, n, 8):
            w.write(s0, data[s0:s0 + 8])
    monkeypatch.undo()
    assert len(refused) == 1
    with RowStore.open(tmp_path / "w.h5") as st:
        np.testing.assert_array_equal(st.read(0, n), data)


def test_schema_1_stores_still_read(tmp_path):
    """A store of schema version 1 (chunked rows with HDF5's fletcher32, no row hashes: msif-index up
    to session 20) reads as before, and a flipped byte in it still fails HDF5's checksum."""
    from msif_index.store import _write_attrs
    data = rows_for(0, 10, k=4)
    path = tmp_path / "v1.h5"
    with h5py.File(path, "w", libver=("v108", "latest")) as f:
        f.create_dataset("rows", data=data, chunks=(4, 4), fletcher32=True)
        f.create_dataset("written", data=np.ones(10, bool), chunks=(10,), fletcher32=True)
        _write_attrs(f, {"schema_version": 1, "n": 10, "k": 4, "dtype": "float32", "note": "old"})
    with RowStore.open(path) as st:
        assert st.attrs["note"] == "old" and st.chunk_rows == 4
        np.testing.assert_array_equal(st.read(0, 10), data)
        np.testing.assert_array_equal(st.take([9, 1]), data[[9, 1]])
        st.verify()
    with h5py.File(path, "r") as f:
        info = f["rows"].id.get_chunk_info(1)
    flip_byte(path, info.byte_offset + 3)
    with RowStore.open(path) as st:
        with pytest.raises(CorruptIndexError):
            st.read(4, 8)


def test_half_written_and_schema_version(tmp_path):
    # a file with the right layout but an incomplete written mask (e.g. copied mid-write)
    path = tmp_path / "half.h5"
    write_store(path, rows_for(0, 8))
    with h5py.File(path, "r+") as f:
        f["written"][5] = False
    with pytest.raises(CorruptIndexError) as e:
        RowStore.open(path)
    assert "half-written" in one_line(e)

    path = tmp_path / "v.h5"
    write_store(path, rows_for(0, 8))
    with h5py.File(path, "r+") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(ConfigError) as e:
        RowStore.open(path)
    msg = one_line(e)
    assert "99" in msg and str(SCHEMA_VERSION) in msg


def test_take_unordered_duplicates_and_range(tmp_path, monkeypatch):
    monkeypatch.setattr(msif_index.store, "_MAX_CHUNK_BYTES", 4 * 5 * 4)   # take reads 4 rows at a time
    path = tmp_path / "rows.h5"
    data = rows_for(0, 37, k=5)
    write_store(path, data)
    with RowStore.open(path) as st:
        ids = [36, 0, 5, 5, 17, 0, 4, 3, 36, 20]
        np.testing.assert_array_equal(st.take(ids), data[ids])
        np.testing.assert_array_equal(st.take(np.array(ids, dtype=np.int32)), data[ids])
        np.testing.assert_array_equal(st.take(torch.tensor(ids)), data[ids])
        assert st.take([]).shape == (0, 5)
        with pytest.raises(ConfigError) as e:
            st.take([3, 37])
        assert "37" in one_line(e)
        with pytest.raises(ConfigError):
            st.take([-1])
        with pytest.raises(ConfigError):
            st.read(10, 40)


def test_concurrent_reads_from_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(msif_index.store, "_MAX_CHUNK_BYTES", 16 * 8 * 4)  # take reads 16 rows at a time
    path = tmp_path / "rows.h5"
    data = rows_for(0, 300, k=8)
    write_store(path, data)
    errors: list[BaseException] = []
    with RowStore.open(path) as st:

        def worker(seed: int) -> None:
            rng = np.random.default_rng(seed)
            try:
                for _ in range(30):
                    ids = rng.integers(0, 300, size=20)
                    np.testing.assert_array_equal(st.take(ids), data[ids])
                    s = int(rng.integers(0, 290))
                    np.testing.assert_array_equal(st.read(s, s + 10), data[s : s + 10])
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


# ----------------------------------------------------------------------------- disk full


def test_open_while_the_user_holds_the_file_open_with_h5py(tmp_path):
    """HDF5 refuses a second open of a file in one process with other locking flags; a user's own
    h5py.File(rows.h5) (default locking, locking=True or "best-effort") must not make RowStore.open
    call the file corrupted."""
    path = tmp_path / "rows.h5"
    data = rows_for(0, 20, k=5)
    write_store(path, data)
    for locking in (None, True, "best-effort"):
        with h5py.File(path, "r", locking=locking) as user:
            with RowStore.open(path) as st:
                np.testing.assert_array_equal(st.read(0, 20), data)
            np.testing.assert_array_equal(user["rows"][()], data)


def test_disk_full_during_write_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "rows.h5"
    write_store(path, rows_for(0, 10))
    before = path.read_bytes()

    def no_space(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    for target, name in ((h5py.Dataset, "__setitem__"), (msif_index.store, "_pwrite_all")):
        monkeypatch.setattr(target, name, no_space)   # HDF5's write (hashes, mask), then the rows' pwrite
        with pytest.raises(DiskFullError) as e:
            with RowWriter(path, 10, 3) as w:
                w.write(0, rows_for(0, 10))
        monkeypatch.undo()
        msg = one_line(e)
        assert str(path) in msg and "free space" in msg
        assert path.read_bytes() == before and tmp_files(tmp_path) == []
    with RowStore.open(path) as st:
        np.testing.assert_array_equal(st.read(0, 10), rows_for(0, 10))


def test_runtime_error_of_a_failed_flush_on_a_full_disk_is_disk_full(tmp_path, monkeypatch):
    """h5py reports a flush that met a full disk as RuntimeError, the errno only in HDF5's text (the
    message below is a real one, from a 12 MiB tmpfs): one DiskFullError line, the old file kept."""
    path = tmp_path / "rows.h5"
    write_store(path, rows_for(0, 10))
    before = path.read_bytes()

    def no_space(self):
        raise RuntimeError("Unable to flush raw data (file write failed: time = Mon Nov 30 17:28:33 2026\n, "
                           "filename = '.shard_00000.h5.tmp-3603', file descriptor = 4, errno = 28, error message "
                           "= 'No space left on device', buf = 0x55c62fa465c8, total write size = 1029236, bytes "
                           "this sub-write = 1029236, offset = 12570624)")

    monkeypatch.setattr(h5py.File, "flush", no_space)
    with pytest.raises(DiskFullError) as e:
        write_store(path, rows_for(10, 20))
    monkeypatch.undo()
    assert "disk full while writing" in one_line(e) and str(path) in one_line(e)
    assert path.read_bytes() == before and tmp_files(tmp_path) == []


def test_free_space_is_checked_before_any_row_is_written(tmp_path, monkeypatch):
    """A disk without room for the whole file refuses at once, in one line with the sizes, instead
    of meeting the full disk mid-write (where HDF5 could not close the file and the process crashed
    at exit)."""
    path = tmp_path / "rows.h5"
    write_store(path, rows_for(0, 10))
    before = path.read_bytes()
    monkeypatch.setattr(msif_index.atomic, "_free_bytes", lambda folder: 1000)
    with pytest.raises(DiskFullError) as e:
        with RowWriter(path, 10, 3):
            raise AssertionError("the writer opened")
    msg = one_line(e)
    assert msg.startswith(f"not enough free space for {path}: 256.") and "KiB needed, 1.0 KiB free" in msg
    monkeypatch.undo()
    assert path.read_bytes() == before and tmp_files(tmp_path) == []


def test_free_space_of_root_and_of_mounts_that_do_not_say(tmp_path, monkeypatch):
    """Root may fill the blocks ext4 reserves for it (a container's usual user): they count as free
    for root only; a file system reporting no blocks at all (FUSE, special mounts) is not refused."""
    import collections

    import msif_index.atomic as atomic
    vfs = collections.namedtuple("vfs", "f_blocks f_bfree f_bavail f_frsize")
    monkeypatch.setattr(atomic.os, "statvfs", lambda folder: vfs(1000, 100, 10, 4096))
    monkeypatch.setattr(atomic.os, "geteuid", lambda: 0)
    assert atomic._free_bytes(tmp_path) == 100 * 4096
    atomic.check_free_space(tmp_path, "x", 50 * 4096)
    monkeypatch.setattr(atomic.os, "geteuid", lambda: 1000)
    assert atomic._free_bytes(tmp_path) == 10 * 4096
    with pytest.raises(DiskFullError, match="not enough free space for x: 200.0 KiB needed, 40.0 KiB free"):
        atomic.check_free_space(tmp_path, "x", 50 * 4096)
    monkeypatch.setattr(atomic.os, "statvfs", lambda folder: vfs(0, 0, 0, 4096))
    atomic.check_free_space(tmp_path, "x", 1 << 40)


@pytest.mark.parametrize("n, k, dtype", [(1000, 64, "float32"), (2000, 1058, "float32"), (300, 780, "float16"),
                                         (7, 3, "float64"), (0, 5, "float32"), (20000, 2, "float16"),
                                         (100000, 1, "float16"), (70000, 1, "float32")])
def test_free_space_estimate_bounds_the_file_size(tmp_path, n, k, dtype):
    """The size the check asks for is at least the file's and at most 300 KiB (plus the attributes and
    32 bytes a chunk of the per-row datasets) more: a disk that can hold the file is never refused for a
    large margin."""
    path = tmp_path / "rows.h5"
    attrs = {"config": {"a": "x" * 5000}}
    with RowWriter(path, n, k, dtype, attrs) as w:
        step = 100 if n <= 20000 else 10000
        for s in range(0, n, step):
            w.write(s, np.ones((min(step, n - s), k), np.float32))
        expected = w._expected_bytes()
    size, chunks = path.stat().st_size, -(-n // (1 << 16))
    assert size <= expected <= size + (300 << 10) + 2 * 5100 + 32 * chunks, (size, expected)


def test_sharded_pending_bytes_bound_the_shard_files(tmp_path):
    """What a build asks the disk for before computing anything: every pending shard's file, from
    above, and nothing for the shards already written (a resume)."""
    sw = ShardedWriter(tmp_path / "s", 1000, 40, "float32", shard_rows=300, attrs={"identity": {"x": "y" * 300}})
    before = sw.pending_bytes()
    with sw.shard(0) as w:
        w.write(0, rows_for(0, 300, k=40))
    sw.wait_commits()
    after = sw.pending_bytes()
    for i in (1, 2, 3):
        with sw.shard(i) as w:
            a, b = sw.shard_range(i)
            w.write(a, rows_for(a, b, k=40))
    sw.wait_commits()
    sizes = [sw.shard_path(i).stat().st_size for i in range(4)]
    assert sum(sizes) <= before <= sum(sizes) + 4 * (300 << 10)
    assert sum(sizes[1:]) <= after <= sum(sizes[1:]) + 3 * (300 << 10)
    assert sw.pending_bytes() == 0


def test_disk_full_at_commit_keeps_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "meta.json"
    write_json_atomic(path, {"a": 1})

    def no_space(fd):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(DiskFullError) as e:
        write_json_atomic(path, {"a": 2})
    with pytest.raises(DiskFullError):
        write_store(tmp_path / "rows.h5", rows_for(0, 4))
    monkeypatch.undo()
    one_line(e)
    assert read_json(path, "index metadata") == {"a": 1}
    assert tmp_files(tmp_path) == [] and not (tmp_path / "rows.h5").exists()
    assert is_disk_full(OSError("Can't write data (file write failed: errno = 28, error message = 'No space left on device')"))
    assert not is_disk_full(OSError(errno.EACCES, "Permission denied"))


# ----------------------------------------------------------------------------- atomic helpers


def test_atomic_helpers(tmp_path):
    p = tmp_path / "sub" / "meta.json"
    write_json_atomic(p, {"b": [1, 2], "a": None})
    assert read_json(p, "index metadata") == {"a": None, "b": [1, 2]}
    write_bytes_atomic(tmp_path / "x.bin", b"\x00\x01")
    assert (tmp_path / "x.bin").read_bytes() == b"\x00\x01"

    with pytest.raises(CorruptIndexError) as e:
        read_json(tmp_path / "missing.json", "index metadata")
    assert "index metadata" in one_line(e)
    (tmp_path / "bad.json").write_text('{"a": 1, ')
    with pytest.raises(CorruptIndexError) as e:
        read_json(tmp_path / "bad.json", "index metadata")
    assert "not valid JSON" in one_line(e)

    with pytest.raises(RuntimeError):
        with atomic_path(tmp_path / "y.bin") as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("killed")
    assert not (tmp_path / "y.bin").exists() and tmp_files(tmp_path) == []

    dead = tmp_path / ".meta.json.tmp-99999999"
    dead.write_text("stale")
    live = tmp_path / f".other.json.tmp-{os.getppid()}"  # a running process: maybe a parallel writer
    live.write_text("in progress")
    live_save = tmp_path / f".faiss.index.tmp-{os.getppid()}-0a1b2c3d"   # SearchIndex.save's form
    live_save.write_text("in progress")
    with atomic_path(tmp_path / "z.bin") as active:
        active.write_bytes(b"z")
        removed = cleanup_stale_tmp(tmp_path)
        assert removed == [dead] and active.exists() and live.exists() and live_save.exists()
    assert (tmp_path / "z.bin").read_bytes() == b"z"


# ----------------------------------------------------------------------------- sharded writer


def fill_shard(sw: ShardedWriter, i: int, batch: int = 2) -> None:
    start, stop = sw.shard_range(i)
    with sw.shard(i) as w:
        for s in range(start, stop, batch):
            w.write(s, rows_for(s, min(stop, s + batch)))


@pytest.mark.parametrize("drop", [None, False])
def test_sharded_writer_drops_committed_shard_pages(tmp_path, monkeypatch, drop):
    """By default each committed shard's pages are dropped from the page cache after its fsync
    (one call per shard, on the shard file's own descriptor); drop_cache=False never drops; the
    shards read back intact either way."""
    from msif_index import atomic

    dropped = []

    def spy(fd):
        dropped.append(os.fstat(fd).st_size)
        real(fd)

    real = atomic.drop_page_cache
    monkeypatch.setattr(atomic, "drop_page_cache", spy)
    sw = ShardedWriter(tmp_path / "shards", 10, 3, "float32", shard_rows=4, drop_cache=drop)
    for i in range(sw.num_shards):
        fill_shard(sw, i)
    sw.wait_commits()
    assert sw.is_complete()
    if drop is None:
        sizes = sorted(p.stat().st_size for p in (tmp_path / "shards").glob("shard_*.h5"))
        assert len(dropped) == sw.num_shards == 3 and sorted(dropped) == sizes
    else:
        assert dropped == []
    got = np.concatenate([b for _, b in sw.iter_blocks(5)])
    np.testing.assert_array_equal(got, rows_for(0, 10))


def test_sharded_resume_after_kill(tmp_path):
    folder = tmp_path / "feats"
    attrs = {"config": {"proj_dim": 3, "seed": 0}}
    sw = ShardedWriter(folder, 23, 3, "float32", 5, attrs)
    assert sw.num_shards == 5
    assert list(sw.pending_ranges()) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 23)]
    for i in (0, 1, 3):
        fill_shard(sw, i)
    # a kill in the middle of shard 2 leaves a stale temp file; shard 4 exists but is garbage
    (folder / ".shard_00002.h5.tmp-99999999").write_bytes(b"\x89HDF partial")
    (folder / "shard_00004.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\x00" * 40)

    sw2 = ShardedWriter(folder, 23, 3, "float32", 5, attrs)
    assert tmp_files(folder) == []
    with pytest.warns(RuntimeWarning, match="shard_00004"):
        pending = list(sw2.pending_ranges())
    assert pending == [(10, 15), (20, 23)]
    assert not (folder / "shard_00004.h5").exists()
    assert sw2.completed_shards() == [0, 1, 3]
    with pytest.raises(CorruptIndexError) as e:
        next(sw2.iter_blocks(4))
    one_line(e)

    # a failure inside a shard commits nothing
    with pytest.raises(ValueError):
        with sw2.shard(2) as w:
            w.write(10, rows_for(10, 12))
            raise ValueError("worker died")
    assert not (folder / "shard_00002.h5").exists() and tmp_files(folder) == []
    with pytest.raises(ShapeError):
        with sw2.shard(2) as w:
            w.write(14, rows_for(14, 16))  # crosses into shard 3

    for start, stop in sw2.pending_ranges():
        fill_shard(sw2, sw2.shard_index(start), batch=3)
    assert sw2.is_complete()
    expected = rows_for(0, 23)
    for block_rows in (4, 5, 7, 100):
        blocks = list(sw2.iter_blocks(block_rows))
        assert [s for s, _ in blocks] == list(range(0, 23, block_rows))
        assert all(b.dtype == np.float32 and b.shape[0] <= block_rows for _, b in blocks)
        np.testing.assert_array_equal(np.concatenate([b for _, b in blocks]), expected)
    with sw2.open_shard(4) as st:
        assert st.attrs["config"] == attrs["config"] and st.attrs["shard_start"] == 20


def test_sharded_other_settings_raise_config_error(tmp_path):
    folder = tmp_path / "feats"
    sw = ShardedWriter(folder, 10, 3, "float32", 4, {"config": {"proj_dim": 3}})
    fill_shard(sw, 0)
    for kwargs in (
        dict(n=10, k=3, dtype="float32", shard_rows=4, attrs={"config": {"proj_dim": 4}}),
        dict(n=10, k=3, dtype="float16", shard_rows=4, attrs={"config": {"proj_dim": 3}}),
        dict(n=11, k=3, dtype="float32", shard_rows=4, attrs={"config": {"proj_dim": 3}}),
        dict(n=10, k=3, dtype="float32", shard_rows=5, attrs={"config": {"proj_dim": 3}}),
    ):
        other = ShardedWriter(folder, **kwargs)
        with pytest.raises(ConfigError) as e:
            list(other.pending_ranges())
        msg = one_line(e)
        assert "--overwrite" in msg and "shard_00000.h5" in msg
    # a shard beyond the last one belongs to a larger build
    with pytest.raises(ConfigError) as e:
        ShardedWriter(folder, 3, 3, "float32", 1, {"config": {"proj_dim": 3}}).completed_shards()
    assert "--overwrite" in one_line(e)


CHILD = r"""
import sys, time
import numpy as np
sys.path.insert(0, sys.argv[2])
from msif_index.store import ShardedWriter

def rows_for(start, stop, k=3):
    r = np.arange(start, stop, dtype=np.float64)[:, None]
    return (r * 10 + np.arange(k)[None, :]).astype(np.float32)

sw = ShardedWriter(sys.argv[1], 12, 3, "float32", 4, {"config": {"seed": 1}})
for start, stop in sw.pending_ranges():
    with sw.shard(sw.shard_index(start)) as w:
        for r in range(start, stop):
            w.write(r, rows_for(r, r + 1))
            time.sleep(0.25)
"""


def test_sigkill_mid_shard_then_resume(tmp_path):
    folder = tmp_path / "feats"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    proc = subprocess.Popen([sys.executable, str(script), str(folder), str(REPO)])
    tmp1 = folder / f".shard_00001.h5.tmp-{proc.pid}"
    try:
        deadline = time.monotonic() + 120
        while not ((folder / "shard_00000.h5").exists() and tmp1.exists()):
            assert proc.poll() is None, "the writer exited early"
            assert time.monotonic() < deadline, "the writer did not start shard 1"
            time.sleep(0.01)
        time.sleep(0.3)  # a row or two of shard 1 written
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert tmp1.exists() and not (folder / "shard_00001.h5").exists()

    sw = ShardedWriter(folder, 12, 3, "float32", 4, {"config": {"seed": 1}})
    assert not tmp1.exists()
    assert sw.completed_shards() == [0]
    assert list(sw.pending_ranges()) == [(4, 8), (8, 12)]
    for start, _ in list(sw.pending_ranges()):
        fill_shard(sw, sw.shard_index(start))
    got = np.concatenate([b for _, b in sw.iter_blocks(5)])
    np.testing.assert_array_equal(got, rows_for(0, 12))


# ----------------------------------------------------------------------------- fingerprints


class _Augmented(torch.utils.data.Dataset):
    """Items (x + noise, label, name): the noise drawn from torch's, numpy's and Python's global RNGs."""

    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        import random
        noise = torch.rand(()) + float(np.random.rand()) + random.random()
        return self.x[i] + noise, int(i % 3), f"item{i}"


def test_dataset_fingerprint_is_repeatable_and_tells_other_data():
    """fingerprint_dataset: the same for the same data even with random augmentation (the global
    generators are seeded, then restored), different for another length, another example at a
    sampled id, or reordered examples; ids outside the sample are not covered (a cheap check)."""
    import random

    from torch.utils.data import Subset, TensorDataset

    from msif_index.fingerprint import dataset_sample_ids, fingerprint_dataset

    x = torch.randn(50, 4)
    ds = _Augmented(x)
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(7), np.random.seed(7), random.seed(7)
    fp = fingerprint_dataset(ds)
    after = (torch.rand(3), np.random.rand(3), random.random())            # the caller's streams go on
    assert torch.equal(after[0], expected[0]) and np.array_equal(after[1], expected[1]) and after[2] == expected[2]
    assert fingerprint_dataset(_Augmented(x.clone())) == fp and len(fp) == 64
    ids = dataset_sample_ids(50)
    assert len(ids) == 16 and ids[0] == 0 and ids[-1] == 49 and ids == sorted(set(ids))
    changed = x.clone()
    changed[ids[5], 1] += 1e-3
    assert fingerprint_dataset(_Augmented(changed)) != fp
    assert fingerprint_dataset(_Augmented(x[:49])) != fp
    order = list(range(50))
    order[ids[3]], order[ids[3] + 1] = order[ids[3] + 1], order[ids[3]]
    assert fingerprint_dataset(Subset(ds, order)) != fp
    unsampled = next(i for i in range(50) if i not in ids)
    changed = x.clone()
    changed[unsampled] += 1.0
    assert fingerprint_dataset(_Augmented(changed)) == fp
    small = TensorDataset(torch.arange(5.0), torch.arange(5))                # n <= 16: every example
    assert dataset_sample_ids(5) == [0, 1, 2, 3, 4]
    assert fingerprint_dataset(small) != fingerprint_dataset(TensorDataset(torch.arange(5.0) + 1, torch.arange(5)))
    assert fingerprint_dataset(TensorDataset(torch.zeros(0), torch.zeros(0))) == \
        fingerprint_dataset(TensorDataset(torch.zeros(0), torch.zeros(0)))


def test_fingerprint_changes_with_values_shapes_and_names():
    base = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.zeros(3)}
    fp = fingerprint_tensors(base)
    assert len(fp) == 64 and short(fp) == fp[:12]
    # order of the mapping and non-contiguous layout do not matter
    assert fingerprint_tensors({"b": torch.zeros(3), "w": base["w"].t().contiguous().t()}) == fp
    changed = {k: v.clone() for k, v in base.items()}
    changed["w"][1, 2] += 1e-6
    assert fingerprint_tensors(changed) != fp
    assert fingerprint_tensors({"w": base["w"].reshape(3, 2), "b": base["b"]}) != fp
    assert fingerprint_tensors({"w": base["w"].double(), "b": base["b"]}) != fp
    assert fingerprint_tensors({"w2": base["w"], "b": base["b"]}) != fp
    assert fingerprint_tensors({"w": base["w"].numpy(), "b": base["b"].numpy()}) == fp
    assert fingerprint_tensors({"x": torch.ones(2, dtype=torch.bfloat16)}) != fingerprint_tensors(
        {"x": torch.ones(2, dtype=torch.float16)}
    )


def test_linked_rows_stay_readable_when_a_shard_is_removed_or_replaced_after_open(tmp_path):
    """An open row store over shards holds every shard from the start: a shard removed or replaced
    afterwards (an in-place rebuild) changes nothing it reads. Rows read lazily (HNSW / IVF indexes,
    scores, exact rerank) once came back as the virtual dataset's fill value, NaN, without an error."""
    from msif_index.store import link_shards
    sw = ShardedWriter(tmp_path / "shards", 8, 3, shard_rows=4)
    for i in range(2):
        with sw.shard(i) as w:
            w.write(4 * i, np.full((4, 3), float(i + 1)))
    link_shards(sw, tmp_path / "rows.h5")
    want = np.repeat([1.0, 2.0], 4)
    with RowStore.open(tmp_path / "rows.h5") as s:
        os.unlink(tmp_path / "shards" / "shard_00001.h5")
        np.testing.assert_array_equal(s.read(0, 8)[:, 0], want)
        np.testing.assert_array_equal(s.take([6, 5])[:, 0], [2.0, 2.0])
        again = ShardedWriter(tmp_path / "shards", 8, 3, shard_rows=4)
        with again.shard(1) as w:                   # another build's rows under the same name
            w.write(4, np.full((4, 3), 9.0))
        np.testing.assert_array_equal(s.read(0, 8)[:, 0], want)


def test_linked_store_takes_the_small_datasets_a_row_writer_takes(tmp_path):
    """link_shards(datasets=...) stores extra arrays as RowWriter.add_dataset does: scalars and empty
    arrays included (h5py refused a chunked scalar), read back by RowStore.dataset."""
    from msif_index.store import link_shards
    sw = ShardedWriter(tmp_path / "shards", 4, 3, shard_rows=4)
    with sw.shard(0) as w:
        w.write(0, np.ones((4, 3)))
    extra = {"scalar": np.float64(3.0), "empty": np.zeros((0, 3)), "ids": torch.arange(5)}
    link_shards(sw, tmp_path / "rows.h5", datasets=extra)
    with RowStore.open(tmp_path / "rows.h5") as s:
        assert s.dataset("scalar").shape == () and float(s.dataset("scalar")) == 3.0
        assert s.dataset("empty").shape == (0, 3)
        np.testing.assert_array_equal(s.dataset("ids"), np.arange(5))
    with pytest.raises(ValueError, match="reserved"):
        link_shards(sw, tmp_path / "bad.h5", datasets={"rows": np.zeros(2)})


@pytest.mark.parametrize("source", ["float32", "float64", "tensor"])
def test_float16_rows_are_stored_scaled_per_row_at_any_magnitude(tmp_path, source):
    """float16 rows are stored times a power of two per row (``scales``): rows from 1e-30 to 1e30
    (beyond float16's 6e-8 .. 65504) read back within float16's rounding of each row's largest
    entry (2^-11), zero rows as zeros, the same through read / take / iter_blocks and through
    linked shards; the scales are checksummed like the rows."""
    from msif_index.store import SCALES, link_shards
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 37)) * 10.0 ** rng.integers(-30, 31, size=(300, 1))
    x[5] = 0
    x = x.astype(np.float32 if source != "float64" else np.float64)
    rows = torch.from_numpy(x) if source == "tensor" else x
    with RowWriter(tmp_path / "a.h5", 300, 37, "float16") as w:
        w.write(0, rows[:100])
        w.write(100, rows[100:])
    sw = ShardedWriter(tmp_path / "sh", 300, 37, "float16", shard_rows=128)
    for a, b in sw.pending_ranges():
        with sw.shard(sw.shard_index(a)) as w:
            w.write(a, rows[a:b])
    link_shards(sw, tmp_path / "rows.h5")
    top = np.abs(x).max(axis=1, keepdims=True)
    for path in (tmp_path / "a.h5", tmp_path / "rows.h5"):
        with RowStore.open(path) as st:
            assert st.scaled
            y = st.read(0, 300)
            assert y.dtype == np.float32
            live = top[:, 0] > 0
            assert np.max(np.abs(y - x)[live] / top[live]) <= 2.0 ** -11
            assert not y[5].any()
            np.testing.assert_array_equal(st.take([299, 3, 3, 150]), y[[299, 3, 3, 150]])
            np.testing.assert_array_equal(np.concatenate([b for _, b in st.iter_blocks(64)]), y)
            np.testing.assert_allclose(st.read(0, 300, dtype=np.float64), y, rtol=0)
            st.verify()
    with h5py.File(tmp_path / "a.h5", "r") as f:
        assert f[SCALES].fletcher32 and np.abs(f["rows"][()]).max() < 2 ** 15
    with h5py.File(tmp_path / "a.h5", "r+") as f:
        del f[SCALES]
    with pytest.raises(CorruptIndexError, match="scales"):
        RowStore.open(tmp_path / "a.h5")


def test_float16_shards_written_without_scales_are_not_resumed(tmp_path):
    """A float16 shard from before the per-row scales (no ``row_scales`` attribute) is not mixed
    with scaled ones: refused as other settings, or discarded and written again with --overwrite."""
    from msif_index.store import ROW_SCALES
    sw = ShardedWriter(tmp_path / "sh", 20, 3, "float16", shard_rows=10)
    with sw.shard(0) as w:
        w.write(0, np.ones((10, 3), np.float32))
    sw.wait_commits()
    path = sw.shard_path(0)
    with h5py.File(path, "r+") as f:                 # as an older version wrote it
        del f.attrs[ROW_SCALES]
        del f["scales"]
    with pytest.raises(ConfigError, match="row_scales"):
        list(ShardedWriter(tmp_path / "sh", 20, 3, "float16", shard_rows=10).pending_ranges())
    again = ShardedWriter(tmp_path / "sh", 20, 3, "float16", shard_rows=10, discard_mismatched=True)
    assert list(again.pending_ranges()) == [(0, 10), (10, 20)]


def test_an_unfinished_build_s_shards_of_schema_1_are_computed_again(tmp_path):
    """Shards an older msif-index left (row-store schema 1) are not mixed with this version's: each is
    deleted with a warning and becomes pending again; this version's shards stay."""
    from msif_index.store import _write_attrs
    sw = ShardedWriter(tmp_path / "shards", 8, 3, shard_rows=4, attrs={"a": 1})
    for i in range(2):
        with sw.shard(i) as w:
            w.write(4 * i, rows_for(4 * i, 4 * i + 4))
    with h5py.File(sw.shard_path(1), "r+") as f:
        attrs = {k: v for k, v in f.attrs.items() if k != "_json_attrs"}
        _write_attrs(f, {**attrs, "schema_version": 1})
    again = ShardedWriter(tmp_path / "shards", 8, 3, shard_rows=4, attrs={"a": 1})
    with pytest.warns(RuntimeWarning, match=r"shard_00001.h5 was written by an older msif-index \(row-store schema 1"):
        assert again.pending_shards() == [1]
    assert not sw.shard_path(1).exists() and sw.shard_path(0).exists()


def test_a_lent_staging_buffer_is_written_without_a_copy_or_given_back(tmp_path, monkeypatch):
    """RowWriter.buffer lends a background writer's staging buffer: rows filled in it and written at
    its start are queued without a copy; a buffer lent and not used goes back to the pool (twenty
    unused loans never block: the pool holds three); a writer without a thread, and a float16 store,
    lend none."""
    import msif_index.store as S
    n, k = 40, 1000
    data = np.random.default_rng(5).standard_normal((n, k)).astype(np.float32)
    copies = []
    real_copyto = np.copyto
    monkeypatch.setattr(S.np, "copyto", lambda dst, src, **kw: (copies.append(dst.shape), real_copyto(dst, src, **kw)))
    with RowWriter(tmp_path / "lent.h5", n, k, background=True) as w:
        for _ in range(20):
            assert w.buffer(0, 8) is not None        # lent, never used
        for s0 in range(0, n, 8):
            buf = w.buffer(s0, 8)
            assert buf.shape == (8, k) and buf.dtype == np.float32
            buf[...] = data[s0:s0 + 8]
            w.write(s0, torch.from_numpy(buf))     # as the build passes it: a tensor over the buffer
        assert copies == []
        w.buffer(0, 8)
        w.write(0, data[:8])                       # another array: copied, the loan given back
        assert copies == [(8, k)]
    monkeypatch.undo()
    with RowStore.open(tmp_path / "lent.h5") as st:
        st.verify()
        np.testing.assert_array_equal(st.read(0, n), data)
    with RowWriter(tmp_path / "fg.h5", 2, 3) as w:
        assert w.buffer(0, 2) is None
        w.write(0, np.ones((2, 3)))
    with RowWriter(tmp_path / "f16.h5", 2, 3, "float16", background=True) as w:
        assert w.buffer(0, 2) is None
        w.write(0, np.ones((2, 3)))

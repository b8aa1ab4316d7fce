"""Tests for msif_index.search (fast: small dims, CPU only; the GPU branch is monkeypatched)."""
from __future__ import annotations

import threading

import faiss
import numpy as np
import pytest

from msif_index import search as S
from msif_index.errors import ConfigError, CorruptIndexError, ShapeError
from msif_index.search import SearchIndex, exact_topk, recall_at_k, rerank


def _blocks(x, bs):
    return [x[i : i + bs] for i in range(0, len(x), bs)]


def _pairs(x, bs):
    return [(i, x[i : i + bs]) for i in range(0, len(x), bs)]


def _brute(q, x, topk):
    s = q.astype(np.float64) @ x.astype(np.float64).T
    order = np.argsort(-s, axis=1, kind="stable")[:, :topk]
    return np.take_along_axis(s, order, 1), order


def _clustered(n, d, nc=64, nq=50, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((nc, d)).astype(np.float32)
    x = centers[rng.integers(0, nc, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    q = centers[rng.integers(0, nc, nq)] + 0.35 * rng.standard_normal((nq, d)).astype(np.float32)
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(q, dtype=np.float32)


@pytest.fixture(scope="module")
def flat_data():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3000, 48)).astype(np.float32)
    q = rng.standard_normal((64, 48)).astype(np.float32)
    idx = SearchIndex.create(48, "Flat", device="cpu")   # the CPU paths (tests/test_gpu.py: the GPU one)
    idx.train_and_add(iter(_blocks(x, 700)), n=len(x))  # one-shot iterator is fine for Flat
    return x, q, idx


def _flat_index(x, bs=500):
    idx = SearchIndex.create(x.shape[1], "Flat")
    idx.train_and_add(_blocks(x, bs), n=len(x))
    return idx


# ------------------------------------------------------------------------------------- Flat path


@pytest.mark.parametrize("nq", [1, 64])
def test_flat_equals_numpy_bruteforce(flat_data, nq):
    x, q, idx = flat_data
    assert idx.ntotal == len(x) and idx.dim == 48 and idx.factory == "Flat" and not idx.on_gpu
    s, i = idx.search(q[:nq], 10)
    assert s.dtype == np.float32 and i.dtype == np.int64 and s.shape == i.shape == (nq, 10)
    rs, ri = _brute(q[:nq], x, 10)
    np.testing.assert_array_equal(i, ri)
    np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(s, axis=1) <= 0)


def test_flat_torch_path_matches_faiss_flat(flat_data):
    x, q, idx = flat_data
    ref = faiss.IndexFlatIP(48)
    ref.add(x)
    fs, fi = ref.search(q, 7)
    s, i = idx.search(q, 7)
    np.testing.assert_array_equal(i, fi)
    np.testing.assert_allclose(s, fs, rtol=1e-5, atol=1e-4)


def test_flat_topk_larger_than_n_pads_like_faiss():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 16)).astype(np.float32)
    q = rng.standard_normal((3, 16)).astype(np.float32)
    idx = _flat_index(x)
    s, i = idx.search(q, 8)
    assert i.shape == (3, 8)
    assert np.all(i[:, 5:] == -1) and np.all(s[:, 5:] == S.MISSING_SCORE)
    rs, ri = _brute(q, x, 5)
    np.testing.assert_array_equal(i[:, :5], ri)
    np.testing.assert_allclose(s[:, :5], rs, rtol=1e-5, atol=1e-5)
    ref = faiss.IndexFlatIP(16)
    ref.add(x)
    fs, fi = ref.search(q, 8)
    np.testing.assert_array_equal(fi, i)
    np.testing.assert_allclose(fs, s, rtol=1e-5, atol=1e-5)


def test_empty_index_returns_missing():
    idx = SearchIndex.create(8, "Flat")
    s, i = idx.search(np.ones((2, 8), np.float32), 3)
    assert np.all(i == -1) and np.all(s == S.MISSING_SCORE)


def test_torch_blocked_path_equals_unblocked(monkeypatch, flat_data):
    x, q, idx = flat_data
    full = idx.search(q, 12)
    monkeypatch.setattr(S, "_SCORE_BLOCK_ELEMENTS", 1000)  # forces query blocks of 1 and row chunks
    blocked = idx.search(q, 12)
    np.testing.assert_array_equal(blocked[1], full[1])
    np.testing.assert_allclose(blocked[0], full[0], rtol=1e-6, atol=1e-5)


# ------------------------------------------------------------------------------ approximate


def _subspace_clustered(n, d, sub, seed=0):
    """Zero-mean clustered data in a ``sub``-dimensional subspace (PCA<sub> then loses nothing;
    PCA subtracts the mean, which changes inner-product rankings unless the mean is zero)."""
    x, q = _clustered(n, sub, seed=seed)
    x -= x.mean(axis=0)
    basis = np.linalg.qr(np.random.default_rng(seed + 1).standard_normal((d, sub)))[0].astype(np.float32)
    return np.ascontiguousarray(x @ basis.T), np.ascontiguousarray(q @ basis.T)


@pytest.mark.parametrize(
    "factory, kw",
    [
        ("IVF64,Flat", {"nprobe": 16}),
        ("IVF256,Flat", {"nprobe": 48}),
        ("HNSW32", {"ef_search": 128}),
        ("PCA16,IVF32,Flat", {"nprobe": 8}),
    ],
)
def test_approximate_recall(factory, kw):
    if factory.startswith("PCA"):
        x, q = _subspace_clustered(6000, 32, 16)
    else:
        x, q = _clustered(6000, 32)
    idx = SearchIndex.create(32, factory)
    calls = []

    def make():
        calls.append(1)
        return iter(_pairs(x, 2048))

    idx.train_and_add(make, n=len(x), train_size=len(x) if factory.startswith("PCA") else 5000, seed=0)
    assert idx.ntotal == len(x) and idx.is_trained
    assert len(calls) == (1 if factory.startswith("HNSW") else 2)
    es, ei = exact_topk(q, _pairs(x, 1500), 10)
    s, i = idx.search(q, 10, **kw)
    r = recall_at_k(es, ei, i, 10)
    assert r >= 0.9, (factory, r)
    # low effort setting is worse or equal: parameters really apply per call
    low = {k: 1 for k in kw}
    r_low = recall_at_k(es, ei, idx.search(q, 10, **low)[1], 10)
    assert r_low <= r
    # per-call parameters do not stick to the index
    np.testing.assert_array_equal(idx.search(q, 10, **kw)[1], i)


def test_ivfpq_recall_with_exact_rerank():
    """PQ scores are approximate: search top-50 by PQ, rerank exactly to top-10 (the usual pipeline)."""
    x, q = _clustered(4000, 32, seed=3)
    idx = SearchIndex.create(32, "IVF64,PQ16")
    assert not faiss.downcast_index(idx._index).do_polysemous_training
    idx.train_and_add(lambda: iter(_blocks(x, 1000)), n=len(x), train_size=2000)
    es, ei = exact_topk(q, _pairs(x, 1000), 10)
    _, raw = idx.search(q, 10, nprobe=16)
    assert recall_at_k(es, ei, raw, 10) >= 0.5
    _, cand = idx.search(q, 50, nprobe=16)
    s, i = rerank(q, cand, lambda ids: x[ids], 10)
    assert recall_at_k(es, ei, i, 10) >= 0.9


def test_inapplicable_params_raise(flat_data):
    _, q, idx = flat_data
    with pytest.raises(ConfigError, match="nprobe"):
        idx.search(q, 5, nprobe=4)
    with pytest.raises(ConfigError, match="ef_search"):
        idx.search(q, 5, ef_search=4)


def test_trainable_needs_reiterable():
    x, _ = _clustered(3000, 32)
    idx = SearchIndex.create(32, "IVF16,Flat")
    with pytest.raises(ConfigError, match="callable"):
        idx.train_and_add(iter(_blocks(x, 500)), n=len(x))
    with pytest.raises(ShapeError, match="n=2999"):
        idx.train_and_add(lambda: iter(_blocks(x, 500)), n=2999)
    assert idx.ntotal == 0


def test_training_too_few_rows_is_config_error():
    x, _ = _clustered(100, 32)
    idx = SearchIndex.create(32, "IVF1024,Flat")
    with pytest.raises(ConfigError) as e:
        idx.train_and_add(lambda: iter([x]), n=100)
    assert "\n" not in str(e.value)


def test_train_sample_is_seeded_and_bounded():
    x, _ = _clustered(5000, 16)

    def run(seed):
        i = SearchIndex.create(16, "IVF8,Flat")
        got = {}
        real_train = i._index.train

        def train(s):
            got["s"] = np.array(s)
            return real_train(s)

        i._index.train = train
        i.train_and_add(lambda: iter(_blocks(x, 777)), n=len(x), train_size=300, seed=seed)
        return got["s"]

    a, b, c = run(0), run(0), run(1)
    assert a.shape == (300, 16)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # every sample row is a real row
    rows = {r.tobytes() for r in x}
    assert all(r.tobytes() in rows for r in a)


# ---------------------------------------------------------------------------------- errors / io


@pytest.mark.parametrize("bad", ["bogus", "IVF,Flat", "PQ7", "", "  "])
def test_bad_factory_is_one_line_config_error(bad):
    with pytest.raises(ConfigError) as e:
        SearchIndex.create(64, bad)
    msg = str(e.value)
    assert "\n" not in msg and "'Flat'" in msg and "'IVF1024,Flat'" in msg and "'HNSW32'" in msg and "'IVF256,PQ32'" in msg


def test_wrong_query_shape_is_shape_error(flat_data):
    _, q, idx = flat_data
    with pytest.raises(ShapeError, match="dimension 47"):
        idx.search(q[:, :47], 5)
    with pytest.raises(ShapeError, match="reshape"):
        idx.search(q[0], 5)
    with pytest.raises(ShapeError):
        idx.search(q[None], 5)
    with pytest.raises(ShapeError):
        idx.train_and_add([np.zeros((3, 7), np.float32)], n=3)


def test_bad_topk_and_device():
    idx = SearchIndex.create(8)
    with pytest.raises(ConfigError):
        idx.search(np.zeros((1, 8), np.float32), 0)
    with pytest.raises(ConfigError):
        SearchIndex.create(8, device="tpu")


@pytest.mark.parametrize("factory, kw", [("Flat", {}), ("IVF32,Flat", {"nprobe": 4}), ("HNSW16", {"ef_search": 32}), ("IVF16,PQ8", {"nprobe": 4})])
def test_save_load_roundtrip(tmp_path, factory, kw):
    x, q = _clustered(3000, 32, seed=5)
    idx = SearchIndex.create(32, factory)
    idx.train_and_add(lambda: iter(_blocks(x, 1000)), n=len(x), train_size=1500)
    before = idx.search(q, 10, **kw)
    p = tmp_path / "a.faiss"
    assert idx.save(p) == p
    assert [f.name for f in tmp_path.iterdir()] == ["a.faiss"]  # no temp file left
    loaded = SearchIndex.load(p, device="cpu")
    assert loaded.ntotal == idx.ntotal and loaded.dim == 32 and loaded.factory == factory
    after = loaded.search(q, 10, **kw)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    # overwrite atomically
    idx.save(p)
    np.testing.assert_array_equal(SearchIndex.load(p).search(q, 10, **kw)[1], before[1])


@pytest.mark.parametrize("cut", [0, 5, 40, 0.5, -3])
def test_truncated_file_is_corrupt_index_error(tmp_path, cut):
    x, _ = _clustered(500, 16)
    idx = _flat_index(x)
    p = tmp_path / "t.faiss"
    idx.save(p)
    data = p.read_bytes()
    n = int(len(data) * cut) if isinstance(cut, float) else (cut if cut >= 0 else len(data) + cut)
    p.write_bytes(data[:n])
    with pytest.raises(CorruptIndexError) as e:
        SearchIndex.load(p)
    assert "\n" not in str(e.value) and str(p) in str(e.value)


def test_missing_file_is_corrupt_index_error(tmp_path):
    with pytest.raises(CorruptIndexError, match="missing"):
        SearchIndex.load(tmp_path / "nope.faiss")


def test_save_failure_leaves_old_file(tmp_path, monkeypatch):
    x, q = _clustered(500, 16)
    idx = _flat_index(x)
    p = tmp_path / "s.faiss"
    idx.save(p)
    old = p.read_bytes()

    def boom(index, path):
        open(path, "wb").write(b"partial")
        raise RuntimeError("Error in write: No space left on device")

    monkeypatch.setattr(faiss, "write_index", boom)
    from msif_index.errors import DiskFullError

    with pytest.raises(DiskFullError):
        idx.save(p)
    assert p.read_bytes() == old
    assert [f.name for f in tmp_path.iterdir()] == ["s.faiss"]


def test_save_on_a_real_full_disk_is_disk_full_and_keeps_the_old_file(tmp_path):
    """faiss's own error on a real full disk (a 1 MiB tmpfs in a private mount namespace; skipped
    where unprivileged namespaces are not allowed) is recognised: DiskFullError, the old file intact,
    no temporary file left."""
    import shutil
    import subprocess
    import sys
    import textwrap
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    script = tmp_path / "save.py"
    script.write_text(textwrap.dedent(f"""
        import os, numpy as np
        from msif_index.errors import DiskFullError
        from msif_index.search import SearchIndex
        idx = SearchIndex.create(64, "Flat", device="cpu")
        idx.train_and_add([np.ones((8000, 64), dtype=np.float32)], 8000)    # 2 MiB of rows
        open("{mnt}/s.faiss", "wb").write(b"old")
        try:
            idx.save("{mnt}/s.faiss")
        except DiskFullError as e:
            print("DiskFullError:", e)
        print(sorted(os.listdir("{mnt}")), open("{mnt}/s.faiss", "rb").read())
    """))
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=1m tmpfs {mnt} || exit 99; "
                           f"{sys.executable} {script}"], capture_output=True, text=True, timeout=120)
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip(f"no private tmpfs here: {proc.stderr.strip()[:120]}")
    assert proc.returncode == 0, proc.stderr
    assert "DiskFullError: disk full while saving index" in proc.stdout, proc.stdout
    assert "['s.faiss'] b'old'" in proc.stdout, proc.stdout


# -------------------------------------------------------------------------------- exact helpers


def test_exact_topk_running_equals_full_sort():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2311, 24)).astype(np.float32)
    q = rng.standard_normal((9, 24)).astype(np.float32)
    for bs in (1, 7, 100, 5000):
        s, i = exact_topk(q, _pairs(x, bs) if bs > 1 else ((j, x[j : j + 1]) for j in range(len(x))), 15)
        rs, ri = _brute(q, x, 15)
        np.testing.assert_array_equal(i, ri)
        np.testing.assert_allclose(s, rs, rtol=1e-5, atol=1e-5)
    # bare blocks and topk > n
    s, i = exact_topk(q, _blocks(x[:4], 3), 6)
    assert np.all(i[:, 4:] == -1) and np.all(s[:, 4:] == S.MISSING_SCORE)
    np.testing.assert_array_equal(i[:, :4], _brute(q, x[:4], 4)[1])


def test_exact_topk_ties_prefer_smaller_id():
    x = np.ones((10, 4), np.float32)
    s, i = exact_topk(np.ones((1, 4), np.float32), _pairs(x, 3), 4)
    np.testing.assert_array_equal(i, [[0, 1, 2, 3]])


def test_exact_topk_ties_prefer_smaller_id_in_blocks_larger_than_topk():
    """A tie straddling the topk-th place inside one block: the smallest ids win (argpartition would
    keep an arbitrary subset of the tie)."""
    x = np.ones((1000, 4), np.float32)
    q = np.ones((2, 4), np.float32)
    for block in (1000, 600, 7):
        s, i = exact_topk(q, _pairs(x, block), 3)
        np.testing.assert_array_equal(i, [[0, 1, 2]] * 2)


def test_rerank_equals_exact_scores_of_candidates():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((400, 20)).astype(np.float32)
    q = rng.standard_normal((6, 20)).astype(np.float32)
    cand = rng.integers(0, 400, (6, 30))
    cand[:, :3] = -1
    cand[0, 5] = cand[0, 6]  # duplicate
    fetched = []

    def rows_for_ids(ids):
        assert np.all(np.diff(ids) > 0) and ids.dtype == np.int64
        fetched.append(len(ids))
        return x[ids]

    s, i = rerank(q, cand, rows_for_ids, 10, max_rows=60)  # groups of 2 queries
    assert len(fetched) == 3
    for r in range(6):
        c = np.unique(cand[r][cand[r] >= 0])
        sc = q[r].astype(np.float64) @ x[c].astype(np.float64).T
        o = np.argsort(-sc, kind="stable")[:10]
        np.testing.assert_array_equal(i[r], c[o])
        np.testing.assert_allclose(s[r], sc[o], rtol=1e-5, atol=1e-5)
    # fewer valid candidates than topk pads with -1
    s, i = rerank(q[:1], np.array([[3, -1, 3]]), rows_for_ids, 4)
    np.testing.assert_array_equal(i, [[3, -1, -1, -1]])
    assert s[0, 1] == S.MISSING_SCORE
    with pytest.raises(ShapeError):
        rerank(q, cand, lambda ids: x[ids][:, :5], 3)


def test_recall_at_k_tie_handling():
    # exact top-3 of one query: ids 0,1,2 with scores 5,4,3; id 3 also scores 3 (tie with the 3rd).
    es = np.array([[5.0, 4.0, 3.0, 3.0, 1.0]])
    ei = np.array([[0, 1, 2, 3, 4]])
    assert recall_at_k(es, ei, np.array([[0, 1, 2]]), 3) == 1.0
    assert recall_at_k(es, ei, np.array([[0, 1, 3]]), 3) == 1.0  # tie found in the longer exact list
    assert recall_at_k(es, ei, np.array([[0, 1, 4]]), 3) == pytest.approx(2 / 3)  # 1.0 is no tie
    # within 1e-6 relative counts as a tie, beyond does not
    es2 = np.array([[5.0, 4.0, 3.0, 3.0 * (1 - 5e-7), 3.0 * (1 - 5e-6)]])
    assert recall_at_k(es2, ei, np.array([[0, 1, 3]]), 3) == 1.0
    assert recall_at_k(es2, ei, np.array([[0, 1, 4]]), 3) == pytest.approx(2 / 3)
    # tie known only from approx (exact) scores
    es3, ei3 = es[:, :3], ei[:, :3]
    assert recall_at_k(es3, ei3, np.array([[0, 1, 9]]), 3) == pytest.approx(2 / 3)
    assert recall_at_k(es3, ei3, np.array([[0, 1, 9]]), 3, approx_scores=np.array([[5.0, 4.0, 3.0]])) == 1.0
    # duplicates and -1 do not count; mean over queries
    two_e = np.vstack([es3, es3]), np.vstack([ei3, ei3])
    assert recall_at_k(*two_e, np.array([[0, 0, -1], [0, 1, 2]]), 3) == pytest.approx((1 / 3 + 1) / 2)
    assert S.precision_at_k is recall_at_k


def test_recall_vs_faiss_search_with_ties():
    # many identical rows: any of them is a valid top-k answer
    x = np.vstack([np.ones((20, 8)), np.zeros((5, 8))]).astype(np.float32)
    q = np.ones((2, 8), np.float32)
    es, ei = exact_topk(q, _pairs(x, 4), 5)
    approx_ids = np.array([[19, 18, 17, 16, 15], [0, 1, 2, 3, 4]])
    assert recall_at_k(es, ei, approx_ids, 5) == pytest.approx(0.5)
    assert recall_at_k(es, ei, approx_ids, 5, approx_scores=np.full((2, 5), 8.0)) == 1.0


# ------------------------------------------------------------------------------------------ GPU


class _FakeGpuIndex:
    def __init__(self, cpu_index):
        self.inner = faiss.clone_index(cpu_index)
        self.calls = 0

    def search(self, x, k, params=None):
        self.calls += 1
        return self.inner.search(x, k, params=params) if params is not None else self.inner.search(x, k)


def _patch_gpu(monkeypatch, ngpu=1, fail=False):
    made = []

    class FakeRes:
        pass

    def to_gpu(res, device, index):
        assert isinstance(res, FakeRes) and device == 0
        if fail:
            raise RuntimeError("Error in index_cpu_to_gpu: not implemented for this type of index")
        made.append(_FakeGpuIndex(index))
        return made[-1]

    monkeypatch.setattr(S, "_torch_cuda", lambda: False)          # the faiss branch, also on CUDA machines
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: ngpu, raising=False)
    monkeypatch.setattr(faiss, "StandardGpuResources", FakeRes, raising=False)
    monkeypatch.setattr(faiss, "index_cpu_to_gpu", to_gpu, raising=False)
    return made


def test_gpu_branch_taken_when_gpus_exist(tmp_path, monkeypatch):
    x, q = _clustered(2000, 32)
    cpu = _flat_index(x)
    ref = cpu.search(q, 5)
    p = tmp_path / "g.faiss"
    cpu.save(p)
    made = _patch_gpu(monkeypatch)
    g = SearchIndex.load(p)  # device="auto"
    assert g.on_gpu and len(made) == 1 and g._gpu_res is not None
    s, i = g.search(q, 5)
    assert made[0].calls == 1
    np.testing.assert_array_equal(i, ref[1])
    np.testing.assert_allclose(s, ref[0], rtol=1e-5, atol=1e-4)
    assert not SearchIndex.load(p, device="cpu").on_gpu
    # built indexes move too, after adding; IVF params reach the GPU search
    ivf = SearchIndex.create(32, "IVF16,Flat")
    ivf.train_and_add(lambda: iter([x]), n=len(x))
    assert ivf.on_gpu
    ivf.search(q, 5, nprobe=4)
    assert made[-1].calls == 1
    # save still works from the CPU master
    g.save(tmp_path / "g2.faiss")


def test_gpu_transfer_failure_falls_back_to_cpu(tmp_path, monkeypatch):
    x, q = _clustered(1000, 16)
    cpu = _flat_index(x)
    p = tmp_path / "f.faiss"
    cpu.save(p)
    _patch_gpu(monkeypatch, fail=True)
    with pytest.warns(RuntimeWarning, match="GPU"):
        g = SearchIndex.load(p)
    assert not g.on_gpu
    np.testing.assert_array_equal(g.search(q, 5)[1], cpu.search(q, 5)[1])


def test_no_gpu_support_stays_on_cpu(tmp_path, monkeypatch):
    x, q = _clustered(500, 16)
    p = tmp_path / "c.faiss"
    _flat_index(x).save(p)
    monkeypatch.setattr(S, "_torch_cuda", lambda: False)
    monkeypatch.delattr(faiss, "get_num_gpus", raising=False)  # builds lacking it
    assert not SearchIndex.load(p).on_gpu
    with pytest.raises(ConfigError, match="no GPU"):
        SearchIndex.load(p, device="gpu")
    _patch_gpu(monkeypatch, ngpu=0)
    assert not SearchIndex.load(p).on_gpu


# -------------------------------------------------------------------------------- concurrency


@pytest.mark.parametrize("factory, kw", [("Flat", {}), ("IVF32,Flat", {"nprobe": 8}), ("HNSW16", {"ef_search": 64}),
                                         ("SVD8", {"candidates": 60}), ("SVD8,PQ4fs", {"candidates": 60})])
def test_concurrent_searches_equal_sequential(factory, kw):
    x, q = _clustered(4000, 32, nq=40, seed=11)
    idx = SearchIndex.create(32, factory)
    idx.train_and_add(lambda: iter(_blocks(x, 1000)), n=len(x))
    chunks = [q[j : j + 5] for j in range(0, len(q), 5)]
    # different per-call params in flight at once must not interfere
    variants = [dict(kw), {k: v // 2 for k, v in kw.items()}]
    seq = {(c, v): idx.search(chunks[c], 7, **variants[v]) for c in range(len(chunks)) for v in range(2)}
    errors, results = [], {}

    def worker(t):
        try:
            for rep in range(3):
                for c in range(len(chunks)):
                    v = (c + t + rep) % 2
                    results[(t, rep, c)] = (c, v, idx.search(chunks[c], 7, **variants[v]))
        except Exception as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 4 * 3 * len(chunks)
    for c, v, (s, i) in results.values():
        np.testing.assert_array_equal(i, seq[(c, v)][1])
        np.testing.assert_array_equal(s, seq[(c, v)][0])


def test_set_threads():
    import torch

    old = torch.get_num_threads()
    try:
        assert S.set_threads(1) == 1 and torch.get_num_threads() == 1
        n = S.set_threads()
        assert n == S.physical_cores() >= 1 and torch.get_num_threads() == n
        with pytest.raises(ConfigError):
            S.set_threads(0)
    finally:
        S.set_threads(old)


# ---------------------------------------------------------------------------- SVD<r> two-stage


def _low_rank(n=4000, d=64, r=12, nq=40, seed=3):
    """Rows with a strong rank-r part plus isotropic noise (like preconditioned gradients)."""
    rng = np.random.default_rng(seed)
    basis = rng.standard_normal((r, d))
    x = rng.standard_normal((n, r)) @ basis * rng.lognormal(0, 0.5, (n, 1)) + 0.3 * rng.standard_normal((n, d))
    q = rng.standard_normal((nq, r)) @ basis + 0.3 * rng.standard_normal((nq, d))
    return np.ascontiguousarray(x, dtype=np.float32), np.ascontiguousarray(q, dtype=np.float32)


def test_svd_two_stage_recall_and_exact_scores():
    """Recall@10 >= 0.95 against brute force at the default candidates, and every returned score is
    the exact inner product of its row (the second stage rescores exactly)."""
    x, q = _low_rank()
    idx = SearchIndex.create(x.shape[1], "SVD16")
    idx.train_and_add(lambda: _blocks(x, 1000), len(x))
    assert idx.two_stage and idx.factory == "SVD16"
    s, i = idx.search(q, 10)
    es, ei = _brute(q, x, 10)
    assert recall_at_k(es, ei, i, 10) >= 0.95
    exact = np.einsum("qk,qtk->qt", q.astype(np.float64), x[i].astype(np.float64))
    np.testing.assert_allclose(s, exact, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(s, axis=1) <= 0)
    # with every row a candidate the result is the exact top-k
    s_all, i_all = idx.search(q, 10, candidates=len(x))
    assert recall_at_k(es, ei, i_all, 10) == 1.0
    # faiss's own search of the same structure agrees (it is what save/load and GPU fallbacks use)
    fs, fi = SearchIndex._faiss_search(idx._index, q, 10, None)
    assert recall_at_k(s, i, fi, 10) >= 0.95


@pytest.mark.parametrize("budget_rows", [1, 7, 100])
def test_svd_rescoring_within_a_memory_budget_gives_the_same_answer(monkeypatch, budget_rows):
    """The second stage gathers at most _GATHER_BYTES of full rows at once (16 queries' candidates,
    or one query's in pieces): a budget of 1, 7 or 100 rows gives exactly the default's answer, also
    with every row a candidate and topk = n."""
    x, q = _low_rank()
    idx = SearchIndex.create(x.shape[1], "SVD16")
    idx.train_and_add(lambda: _blocks(x, 1000), len(x))
    want = [idx.search(q, 10), idx.search(q, 10, candidates=len(x)), idx.search(q[:3], len(x))]
    monkeypatch.setattr(S, "_GATHER_BYTES", budget_rows * x.shape[1] * 4)
    got = [idx.search(q, 10), idx.search(q, 10, candidates=len(x)), idx.search(q[:3], len(x))]
    for (ws, wi), (gs, gi) in zip(want, got):       # the same sets; order may differ between near-ties
        np.testing.assert_array_equal(np.sort(gi, 1), np.sort(wi, 1))
        np.testing.assert_allclose(gs, ws, rtol=1e-5, atol=1e-6 * np.abs(ws).max())   # float32 sums


def test_svd_basis_is_uncentered_principal_subspace():
    x, _ = _low_rank(n=2000, d=32, r=4)
    x = x + 5.0                                             # a large mean: centering would lose it
    idx = SearchIndex.create(32, "SVD4")
    idx.train_and_add([x], len(x), train_size=len(x))
    lt, _, _ = S._svd_parts(idx._index)
    a = faiss.vector_to_array(lt.A).reshape(4, 32).astype(np.float64)
    evals, evecs = np.linalg.eigh(x.astype(np.float64).T @ x)
    top = evecs[:, -4:]
    # same subspace: the projector onto it is the same
    np.testing.assert_allclose(a.T @ a, top @ top.T, atol=1e-4)


def test_svd_save_load_and_errors(tmp_path):
    x, q = _low_rank(n=1500, d=32, r=6)
    idx = SearchIndex.create(32, "SVD8")
    idx.train_and_add(lambda: _blocks(x, 500), len(x))
    s, i = idx.search(q, 5, candidates=60)
    idx.save(tmp_path / "svd.faiss")
    back = SearchIndex.load(tmp_path / "svd.faiss")
    assert back.two_stage and back.factory == "SVD8"
    s2, i2 = back.search(q, 5, candidates=60)
    np.testing.assert_array_equal(i, i2)
    with pytest.raises(ConfigError, match="between 1 and"):
        SearchIndex.create(32, "SVD32")
    with pytest.raises(ShapeError, match="yielded 1500 rows but n=1499"):
        bad = SearchIndex.create(32, "SVD8")
        bad.train_and_add(lambda: _blocks(x, 500), len(x) - 1)
    assert bad.ntotal == 0 and not bad.is_trained       # nothing half-added is left behind
    flat = SearchIndex.create(32, "Flat")
    flat.train_and_add([x], len(x))
    with pytest.raises(ConfigError, match="candidates applies only"):
        flat.search(q, 5, candidates=10)
    with pytest.raises(ConfigError, match="positive integer"):
        idx.search(q, 5, candidates=0)
    assert S.built_at_open("SVD8") and S.built_at_open("Flat") and not S.built_at_open("IVF8,Flat")


@pytest.mark.parametrize("factory", ["SVD8", "SVD8,PQ4fs"])
def test_svd_reads_the_rows_once_and_equals_its_definition(factory):
    """An SVD<r> index is filled from one read of the rows (a one-shot iterator is enough): the
    basis is the top-r eigenvectors of the seeded sample's second moment, the reduced rows are the
    rows times that basis (float64 reference), and a rerun gives the same index bit for bit."""
    x, q = _low_rank(n=3000, d=32, r=6)
    reads = []

    def blocks():
        reads.append(1)
        return _blocks(x, 700)

    idx = SearchIndex.create(32, factory)
    idx.train_and_add(blocks, len(x), train_size=1000, seed=5)
    assert len(reads) == 1 and idx.ntotal == len(x)
    views = idx._svd_views()
    np.testing.assert_array_equal(views["rows"].numpy(), x)
    sample = x[np.sort(np.random.default_rng(5).choice(len(x), size=1000, replace=False))].astype(np.float64)
    m = sample.T @ sample
    top = np.linalg.eigvalsh(m)[::-1][:8]
    a = views["a"].numpy().astype(np.float64)                       # [r, d]
    np.testing.assert_allclose(a @ a.T, np.eye(8), atol=1e-5)       # orthonormal rows ...
    np.testing.assert_allclose(np.diag(a @ m @ a.T), top, rtol=1e-5)   # ... spanning the top-r eigenvalues
    np.testing.assert_allclose(views["reduced"].numpy(), x.astype(np.float64) @ a.T, rtol=1e-4, atol=1e-4)
    again = SearchIndex.create(32, factory)
    again.train_and_add(iter(_blocks(x, 500)), len(x), train_size=1000, seed=5)   # one-shot iterator
    for key in ("rows", "reduced", "a"):
        np.testing.assert_array_equal(again._svd_views()[key].numpy(), views[key].numpy())
    s1, i1 = idx.search(q, 5, candidates=60)
    s2, i2 = again.search(q, 5, candidates=60)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_array_equal(s1, s2)


def test_svd_fast_scan_stage_recall_exact_scores_and_determinism():
    """SVD<r>,PQ<M>fs: the fast-scan first stage keeps recall@10 >= 0.95 at the default candidates,
    scores stay exact, every row a candidate gives the exact top-k, and two builds from the same
    rows and seed answer identically."""
    x, q = _low_rank()
    es, ei = _brute(q, x, 10)
    answers = []
    for _ in range(2):
        idx = SearchIndex.create(x.shape[1], "SVD16,PQ8fs", device="cpu")  # on CUDA it searches as SVD16
        idx.train_and_add(lambda: _blocks(x, 1000), len(x), seed=4)
        assert idx.two_stage and idx.factory == "SVD16,PQ8fs" and idx._fast_scan is not None
        s, i = idx.search(q, 10)
        answers.append(i)
    assert recall_at_k(es, ei, i, 10) >= 0.95
    exact = np.einsum("qk,qtk->qt", q.astype(np.float64), x[i].astype(np.float64))
    np.testing.assert_allclose(s, exact, rtol=1e-5, atol=1e-4)
    assert np.all(np.diff(s, axis=1) <= 0)
    np.testing.assert_array_equal(answers[0], answers[1])
    _, i_all = idx.search(q, 10, candidates=len(x))
    assert recall_at_k(es, ei, i_all, 10) == 1.0
    # the first stage matters: with few candidates it is an approximation of the plain SVD stage
    plain = SearchIndex.create(x.shape[1], "SVD16", device="cpu")
    plain.train_and_add(lambda: _blocks(x, 1000), len(x), seed=4)
    _, i_few = idx.search(q, 10, candidates=10)
    _, p_few = plain.search(q, 10, candidates=10)
    assert not np.array_equal(i_few, p_few)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_dots_by_ids_split_over_threads_equals_numpy(threads):
    """The candidate rescoring's inner products: each query's ids split over faiss's threads (fewer
    queries than threads) or one query per thread, ids -1 scored -inf, equal to numpy's."""
    import faiss

    rng = np.random.default_rng(0)
    rows = rng.standard_normal((500, 24)).astype(np.float32)
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(threads)
    try:
        for nq, c in [(1, 301), (1, 64), (2, 300), (5, 130)]:
            x = rng.standard_normal((nq, 24)).astype(np.float32)
            ids = rng.integers(0, 500, size=(nq, c))
            ids[0, 7] = -1
            got = S._dots_by_ids(x, rows, ids, 24)
            want = np.einsum("qd,qcd->qc", x.astype(np.float64), rows[ids].astype(np.float64))
            want[ids < 0] = -np.inf
            assert got.shape == (nq, c) and got[0, 7] == -np.inf
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    finally:
        faiss.omp_set_num_threads(before)


def test_svd_fast_scan_one_query_at_a_time_equals_the_batch():
    """A query alone (its candidates split over threads) and the same query in a batch (one query
    per thread) get the same ids and scores, bit for bit."""
    x, q = _low_rank()
    idx = SearchIndex.create(x.shape[1], "SVD16,PQ8fs", device="cpu")  # the CPU fast-scan path
    idx.train_and_add(lambda: _blocks(x, 1000), len(x), seed=4)
    bs, bi = idx.search(q, 10, candidates=70)
    for j in range(len(q)):
        s, i = idx.search(q[j:j + 1], 10, candidates=70)
        np.testing.assert_array_equal(i[0], bi[j])
        np.testing.assert_array_equal(s[0], bs[j])


def test_svd_fast_scan_errors_and_small_n(tmp_path):
    x, q = _low_rank(n=300, d=32, r=6)
    with pytest.raises(ConfigError, match="M >= 1 dividing r = 8"):
        SearchIndex.create(32, "SVD8,PQ3fs")
    tiny = SearchIndex.create(32, "SVD8,PQ4fs")
    tiny.train_and_add([x[:100]], 100)               # too few rows for the fast scan: plain SVD8
    assert tiny._fast_scan is None and tiny.search(q, 3)[1].shape == (len(q), 3)
    idx = SearchIndex.create(32, "SVD8,PQ4fs")
    idx.train_and_add([x], len(x))
    assert idx._fast_scan is not None
    s, i = idx.search(q, 10, candidates=200)         # 4 x 200 > n: the first stage returns all n
    es, ei = _brute(q, x, 10)
    assert recall_at_k(es, ei, i, 10) == 1.0
    with pytest.raises(ConfigError, match="not saved"):
        idx.save(tmp_path / "x.faiss")
    assert S.built_at_open("SVD8,PQ4fs") and S.svd_fast_scan("SVD8,PQ4fs") == 4 and S.svd_fast_scan("SVD8") is None


@pytest.mark.parametrize("factory", ["Flat", "SVD8"])
def test_torch_gpu_path_logic_without_a_gpu(monkeypatch, factory):
    """The torch CUDA path (Flat without faiss-gpu, SVD<r>) with its copies placed on the CPU: the
    same answers as the zero-copy path (tests/test_gpu.py runs it on a real GPU where there is one)."""
    x, q = _low_rank(n=2000, d=40, r=6)
    ref = SearchIndex.create(40, factory, device="cpu")
    ref.train_and_add(lambda: _blocks(x, 700), len(x))
    monkeypatch.setattr(S, "_torch_cuda", lambda: True)
    monkeypatch.setattr(S, "_CUDA_DEVICE", "cpu")
    monkeypatch.setattr(faiss, "get_num_gpus", lambda: 0, raising=False)
    g = SearchIndex.create(40, factory)
    g.train_and_add(lambda: _blocks(x, 700), len(x))
    assert g.on_gpu and g._cuda is not None and g._gpu_index is None
    for topk in (1, 7):
        np.testing.assert_array_equal(g.search(q, topk)[1], ref.search(q, topk)[1])
        np.testing.assert_allclose(g.search(q, topk)[0], ref.search(q, topk)[0], rtol=1e-5, atol=1e-5)


def test_svd_never_takes_the_faiss_gpu_branch(monkeypatch):
    """faiss-gpu cannot move an SVD<r> structure: without torch CUDA it stays on the CPU under 'auto'
    and device='gpu' is a one-line error."""
    x, q = _low_rank(n=600, d=24, r=4)
    made = _patch_gpu(monkeypatch)                      # faiss "sees" a GPU; torch does not
    idx = SearchIndex.create(24, "SVD4")
    idx.train_and_add(lambda: [x], len(x))
    assert not idx.on_gpu and not made
    with pytest.raises(ConfigError, match="torch"):
        SearchIndex.create(24, "SVD4", device="gpu").train_and_add(lambda: [x], len(x))


@pytest.mark.parametrize("factory", ["Flat", "SVD4"])
def test_rows_with_nan_or_inf_are_refused(factory):
    """The finiteness check sums a block first (a NaN or infinity makes the sum non-finite); a sum
    that overflows on finite rows must not be mistaken for a bad row (next test)."""
    from msif_index.errors import NonFiniteError
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    for bad in (np.nan, np.inf, -np.inf):
        y = x.copy()
        y[37, 5] = bad
        with pytest.raises(NonFiniteError, match="NaN or infinite"):
            SearchIndex.create(8, factory).train_and_add(lambda: [y], len(y))


def test_rows_whose_sum_overflows_are_still_finite():
    x = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    huge = x.copy()
    huge[:, 0] = 3e38                              # every entry finite, the float32 sum overflows
    idx = SearchIndex.create(8, "Flat")
    idx.train_and_add(lambda: [huge], len(huge))
    assert idx.ntotal == len(huge)

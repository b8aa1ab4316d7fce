"""GPU paths, run where torch sees a CUDA device (CI has none: these are skipped there, with the
reason shown; tests/test_search.py covers the faiss-gpu branch by monkeypatching on any machine).

- SearchIndex: Flat (without faiss-gpu) and SVD<r> search with torch on CUDA and answer as on CPU;
- build_index(device='cuda') stores the rows the CPU build stores;
- an index opened with device='auto' searches on the GPU and answers queries as the CPU one does.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from msif_index.build import build_index
from msif_index.config import BuildConfig
from msif_index.data import full_batch
from msif_index.index import InfluenceIndex
from msif_index.search import SearchIndex, recall_at_k
from msif_index.store import RowStore

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (GPU paths need one)")


def _rows(n=3000, d=48, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8)) @ rng.standard_normal((8, d)) + 0.3 * rng.standard_normal((n, d))
    q = rng.standard_normal((9, d))
    return x.astype(np.float32), q.astype(np.float32)


@pytest.mark.parametrize("factory", ["Flat", "SVD8"])
def test_search_on_cuda_equals_cpu(factory):
    x, q = _rows()
    cpu = SearchIndex.create(x.shape[1], factory, device="cpu")
    cpu.train_and_add(lambda: [x], len(x))
    gpu = SearchIndex.create(x.shape[1], factory, device="auto")
    gpu.train_and_add(lambda: [x], len(x))
    assert gpu.on_gpu and not cpu.on_gpu
    for topk in (1, 10):
        cs, ci = cpu.search(q, topk)
        gs, gi = gpu.search(q, topk)
        assert recall_at_k(cs, ci, gi, topk) == 1.0
        np.testing.assert_allclose(gs, cs, rtol=1e-4, atol=1e-4)


def test_fast_scan_factory_on_cuda_searches_as_its_svd_stage_and_one_query_equals_the_batch():
    """On CUDA "SVD<r>,PQ<M>fs" skips its CPU fast-scan stage (documented): it answers as "SVD<r>";
    a query alone and in a batch get the same ids and scores within float32 rounding (the GPU
    matmul's reduction order depends on the batch shape, so not bit for bit as on CPU)."""
    x, q = _rows()
    fs = SearchIndex.create(x.shape[1], "SVD8,PQ4fs", device="auto")
    fs.train_and_add(lambda: [x], len(x), seed=3)
    svd = SearchIndex.create(x.shape[1], "SVD8", device="auto")
    svd.train_and_add(lambda: [x], len(x), seed=3)
    assert fs.on_gpu and svd.on_gpu
    fs_s, fs_i = fs.search(q, 10, candidates=40)
    sv_s, sv_i = svd.search(q, 10, candidates=40)
    np.testing.assert_array_equal(fs_i, sv_i)
    np.testing.assert_allclose(fs_s, sv_s, rtol=1e-6)
    for j in range(len(q)):
        s, i = fs.search(q[j:j + 1], 10, candidates=40)
        np.testing.assert_array_equal(i[0], fs_i[j])
        np.testing.assert_allclose(s[0], fs_s[j], rtol=1e-5, atol=1e-5)


def test_build_on_cuda_equals_cpu_build(tmp_path, digits_frozen):
    cfg = BuildConfig(proj_dim=256)
    cpu = build_index(digits_frozen, tmp_path / "cpu", cfg)
    gpu = build_index(digits_frozen, tmp_path / "gpu", cfg.with_(device="cuda"))
    with RowStore.open(cpu / "rows.h5") as a, RowStore.open(gpu / "rows.h5") as b:
        ra, rb = a.read(0, a.n).astype(np.float64), b.read(0, b.n).astype(np.float64)
    scale = np.abs(ra).max()
    np.testing.assert_allclose(rb, ra, rtol=1e-4, atol=1e-5 * scale)

    batch = full_batch(digits_frozen.test_dataset(), list(range(8)))
    on_cpu = InfluenceIndex.open(gpu, device="cpu")
    on_gpu = InfluenceIndex.open(gpu, device="auto")
    assert on_gpu.search_index.on_gpu and not on_cpu.search_index.on_gpu
    on_cpu.attach(digits_frozen)
    on_gpu.attach(digits_frozen)
    for direction in ("helpful", "harmful"):
        a = on_cpu.query(batch, k=10, direction=direction)
        b = on_gpu.query(batch, k=10, direction=direction)
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.scores, b.scores, rtol=1e-4, atol=1e-6)


def test_a_task_model_on_cuda_attaches_and_queries_like_cpu(tmp_path, digits_frozen):
    """attach / query run on a CPU copy of the finetuned model: a CUDA-resident model and a CUDA test
    batch give the CPU answers."""
    import copy

    from msif_index.data import move

    folder = build_index(digits_frozen, tmp_path / "i", BuildConfig(proj_dim=256))
    batch = full_batch(digits_frozen.test_dataset(), list(range(6)))
    index = InfluenceIndex.open(folder)
    cpu_key = index.attach(digits_frozen)
    ref = index.query(batch, k=10, finetuned=cpu_key)
    cuda_model = copy.deepcopy(digits_frozen.finetuned_model()).to("cuda")
    key = index.attach(digits_frozen, finetuned=cuda_model)
    got = index.query(move(batch, "cuda"), k=10, finetuned=key)
    np.testing.assert_array_equal(got.ids, ref.ids)
    np.testing.assert_allclose(got.scores, ref.scores, rtol=1e-6, atol=1e-9)

"""GPU timings and checks, one short run on a CUDA machine (not part of the test suite).

Run:  python benchmarks/gpu_check.py --out gpu_check.json
Measures, in one process, on the first CUDA device and side by side with the same work on CPU:

* build: ``build_index(device='cuda')`` examples/s (784-512-512 MLP n=20k and the small CNN n=8192,
  batch 256, proj_dim 4096, ekfac, rows written to HDF5) against one batched forward+backward SGD
  step on the GPU (same model, same batch);
* search: one query (p50) and batches of 64 over n=100k synthetic low-rank rows of dim 1058, Flat and
  SVD128 (torch on CUDA when faiss has no GPU build), with recall@10 of SVD128 against Flat, and
  the same on CPU;
* query end to end: a real index (MLP, n=10k, proj_dim 1024) opened with device='auto' (GPU search),
  attached, p50 of ``InfluenceIndex.query`` on one test example.
Prints a summary and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import common  # noqa: E402


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _p50(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        _sync()
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts))


def train_eps_on(task, device: str, batch_size: int = 256) -> float:
    import copy
    model = copy.deepcopy(task.pretrained_model()).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    x, y = task.pretrain_dataset().batch(range(batch_size))
    batch = (x.to(device), y.to(device))

    def step():
        opt.zero_grad(set_to_none=False)
        task.pretrain_loss(model, batch).mean().backward()
        opt.step()
    return batch_size / _p50(step, 20)


def build_eps(task, device: str, tmp: Path, n: int) -> dict[str, Any]:
    from msif_index.build import build_index
    from msif_index.config import BuildConfig
    cfg = BuildConfig(proj_dim=4096, batch_size=256, device=device)
    out = tmp / f"b_{device}_{n}_{time.perf_counter_ns()}"
    _sync()
    t0 = time.perf_counter()
    build_index(task, out, cfg, progress_bar=False)
    _sync()
    dt = time.perf_counter() - t0
    return {"seconds": dt, "examples_per_s": n / dt}


def search_timings(device: str) -> dict[str, Any]:
    from msif_index.search import SearchIndex, recall_at_k
    rng = np.random.default_rng(0)
    n, d = 100_000, 1058
    basis = rng.standard_normal((64, d)).astype(np.float32)
    x = (rng.standard_normal((n, 64)).astype(np.float32) @ basis
         + 0.5 * rng.standard_normal((n, d)).astype(np.float32))
    q = (rng.standard_normal((64, 64)).astype(np.float32) @ basis).astype(np.float32)
    out: dict[str, Any] = {}
    ref = None
    for factory in ("Flat", "SVD128"):
        idx = SearchIndex.create(d, factory, device=device)
        idx.train_and_add(lambda: [x[i:i + 20000] for i in range(0, n, 20000)], n)
        s, i = idx.search(q, 10)
        if ref is None:
            ref = (s, i)
        one = _p50(lambda: idx.search(q[:1], 10), 50)
        b64 = _p50(lambda: idx.search(q, 10), 10)
        out[factory] = {"on_gpu": idx.on_gpu, "p50_ms": 1e3 * one, "batch64_queries_per_s": 64 / b64,
                        "recall@10_vs_flat": recall_at_k(ref[0], ref[1], i, 10)}
    return out


def query_end_to_end(tmp: Path) -> dict[str, Any]:
    from msif_index.build import build_index
    from msif_index.config import BuildConfig
    from msif_index.index import InfluenceIndex
    task = common.mlp_task(10_000)
    folder = build_index(task, tmp / "q10k", BuildConfig(proj_dim=1024), progress_bar=False)
    res: dict[str, Any] = {}
    answers = {}
    test = task.test_dataset()
    one = [test.batch([i]) for i in range(60)]
    for device in ("cpu", "auto"):
        index = InfluenceIndex.open(folder, device=device)
        t0 = time.perf_counter()
        index.attach(task, progress_bar=False)
        attach_s = time.perf_counter() - t0
        ts = []
        index.query(one[0], k=10)
        for b in one:
            t0 = time.perf_counter()
            index.query(b, k=10)
            ts.append(time.perf_counter() - t0)
        answers[device] = index.query(test.batch(list(range(60))), k=10)
        # the second open finds the operator the first one saved: its attach_s is a load, not a compute
        res[device] = {"on_gpu": index.search_index.on_gpu, "attach_s": attach_s,
                       "attach_reused_saved_operator": device != "cpu",
                       "query_p50_ms": 1e3 * float(np.median(ts))}
        index.close()
    a, b = answers["cpu"], answers["auto"]
    res["auto_ids_equal_cpu"] = bool(np.array_equal(a.ids, b.ids))
    res["auto_scores_max_rel_diff"] = float(np.abs(a.scores - b.scores).max() / np.abs(a.scores).max())
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "gpu_check.json"))
    args = ap.parse_args()
    import faiss
    result: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%d %H:%M:%S"), "torch": torch.__version__,
        "cuda": torch.cuda.is_available(),
        "device_name": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "faiss": faiss.__version__, "faiss_gpus": int(getattr(faiss, "get_num_gpus", lambda: 0)()),
        "cpu_threads": torch.get_num_threads()}
    print(json.dumps(result), flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="msif_gpu_"))
    result["build"] = []
    for name, task, n in (("mlp", common.mlp_task(20_000), 20_000), ("cnn", common.cnn_task(8192), 8192)):
        for device in ("cuda", "cpu"):
            if device == "cuda" and not torch.cuda.is_available():
                continue
            train = train_eps_on(task, device)
            b = build_eps(task, device, tmp, n)
            row = {"model": name, "n": n, "device": device, "train_examples_per_s": train, **b,
                   "build_over_train": b["examples_per_s"] / train}
            result["build"].append(row)
            print(json.dumps(row), flush=True)
            _save(result, args.out)
    result["search"] = {}
    for device in ("cpu", "auto"):
        result["search"][device] = search_timings(device)
        print(device, json.dumps(result["search"][device]), flush=True)
        _save(result, args.out)
    result["query"] = query_end_to_end(tmp)
    print(json.dumps(result["query"]), flush=True)
    result["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    _save(result, args.out)
    print(f"wrote {args.out}")


def _save(result: dict[str, Any], out: str) -> None:
    """Write what has been measured so far (a run stopped at its time limit keeps its sections)."""
    Path(out).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

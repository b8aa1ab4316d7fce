"""Benchmark the exact (Flat) inner-product search path: faiss IndexFlatIP vs torch matmul + topk.

Run:  python benchmarks/search_exact_path.py [--quick]
Prints a table and writes search_exact_path.json next to this file.
msif_index.search picks its exact path from these numbers (see EXACT_PATH there).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

import faiss  # noqa: E402  (faiss and torch each bring their own OpenMP; both coexist)
import torch


def _threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        return os.cpu_count() or 1


def _time(fn, repeats: int) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def bench(n: int, k: int, q: int, topk: int, repeats: int, rng: np.random.Generator) -> dict:
    rows = rng.standard_normal((n, k), dtype=np.float32)
    queries = rng.standard_normal((q, k), dtype=np.float32)

    index = faiss.IndexFlatIP(k)
    index.add(rows)
    del rows
    # torch view over the flat index's own storage (no copy), as msif_index.search does
    storage = faiss.rev_swig_ptr(index.get_xb(), n * k)
    rows_t = torch.from_numpy(np.asarray(storage).reshape(n, k))
    q_t = torch.from_numpy(queries)

    def run_faiss():
        return index.search(queries, topk)

    def run_torch():
        with torch.inference_mode():
            s = q_t @ rows_t.T
            return torch.topk(s, topk, dim=1, largest=True, sorted=True)

    # correctness check: same ids modulo ties
    fs, fi = run_faiss()
    ts, ti = run_torch()
    np.testing.assert_allclose(fs, ts.numpy(), rtol=1e-4, atol=1e-3)

    t_faiss = _time(run_faiss, repeats)
    t_torch = _time(run_torch, repeats)
    return {
        "n": n, "k": k, "Q": q, "topk": topk,
        "faiss_flat_s": t_faiss, "torch_matmul_topk_s": t_torch,
        "faiss_over_torch": t_faiss / t_torch,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="n=10k only, fewer repeats")
    ap.add_argument("--topk", type=int, default=100)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    nthreads = _threads()
    faiss.omp_set_num_threads(nthreads)
    torch.set_num_threads(nthreads)
    rng = np.random.default_rng(0)

    ns = [10_000] if args.quick else [10_000, 100_000]
    results = []
    print(f"threads={nthreads} faiss={faiss.__version__} torch={torch.__version__} topk={args.topk}")
    print(f"{'n':>8} {'k':>5} {'Q':>4} {'faiss_s':>10} {'torch_s':>10} {'faiss/torch':>11}")
    for n in ns:
        for k in (1024, 4096):
            for q in (1, 64):
                r = bench(n, k, q, args.topk, args.repeats, rng)
                results.append(r)
                print(f"{n:>8} {k:>5} {q:>4} {r['faiss_flat_s']:>10.4f} "
                      f"{r['torch_matmul_topk_s']:>10.4f} {r['faiss_over_torch']:>11.2f}", flush=True)

    out = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(),
                    "threads": nthreads, "faiss": faiss.__version__, "torch": torch.__version__,
                    "numpy": np.__version__},
        "results": results,
    }
    path = Path(__file__).with_suffix(".json")
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

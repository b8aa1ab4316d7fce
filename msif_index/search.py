"""Maximum inner-product search over stored rows (float32 [n, k]) for query vectors [Q, k].

Conventions follow faiss: every search returns ``(scores, ids)`` with ``scores`` float32 [Q, topk]
sorted descending and ``ids`` int64 [Q, topk]; a missing result (topk > n, or an approximate
index that found fewer candidates) has id ``-1`` and score ``MISSING_SCORE`` (-FLT_MAX, as faiss).

Exact path: for a ``"Flat"`` index the rows live in the faiss flat index's own storage; search
views that storage as a torch tensor (no copy) and runs matmul + topk in blocks, because
``benchmarks/search_exact_path.py`` measured faiss ``IndexFlatIP.search`` 1.0-12x slower (two runs) than
torch matmul + topk on the 2-core development machine (n in {10k, 100k}, k in {1024, 4096},
Q in {1, 64}; faiss never won). See ``EXACT_PATH``.

Two-stage index ``"SVD<r>"`` (msif's own, not a faiss factory string): candidates by inner product
in the top-r *uncentered* principal subspace of the rows (q V . x V, V from the eigenvectors of the
second moment of a seeded row sample; uncentered because centering would change the ranking by a
per-row term), then exact rescoring of ``candidates`` of them (default ``SVD_K_FACTOR * topk``)
against the full float32 rows. It is stored as faiss objects (IndexRefineFlat over
IndexPreTransform(LinearTransform, IndexFlatIP)), so faiss can save, load and search it; on CPU
the same two stages run as torch matmul + topk over zero-copy views (like Flat). Like Flat it is
built from the rows when an index folder is opened (no faiss.index file).
``"SVD<r>,PQ<M>fs"`` adds a first stage: a faiss 4-bit fast-scan product quantizer (M sub-vectors,
M/2 bytes per row, trained on a seeded sample at open) over the r-dim reduced rows gives
``SVD_PQ_FACTOR x candidates`` ids, which are rescored exactly in the reduced space, then the best
``candidates`` exactly against the full rows (three stages; the returned scores stay exact; below
FAST_SCAN_MIN_ROWS rows, and on CUDA, it searches as SVD<r>). Why: MIPS over
preconditioned gradients is hard for IVF and HNSW (benchmarks/query_latency.py: IVF needs a
quarter of the lists for recall 0.95), while the rows have a strong low-rank part.

GPU: when faiss reports GPUs (``faiss.get_num_gpus() > 0``; builds without it count as none),
the index is copied to GPU 0 with ``index_cpu_to_gpu`` and searched there (Flat too). Flat without
faiss-gpu, and SVD<r> always, search with torch on CUDA when torch sees a CUDA device: the rows are
copied to the GPU once (matmul + topk there; results come back as numpy). If the copy
fails (e.g. an index type faiss cannot move, such as HNSW) search falls back to the CPU index
with a warning. The CPU index stays the master copy (used by ``save``).

Thread safety: any number of threads may call ``search`` concurrently. Search parameters
(``nprobe``, ``ef_search``) are passed per call as faiss ``SearchParameters`` and never change the
shared index, so concurrent callers with different parameters do not interfere. ``train_and_add``
takes an exclusive lock and waits for running searches (and blocks new ones) while it runs.
"""
from __future__ import annotations

import errno
import os
import re
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from ._faiss import faiss
import numpy as np

from .errors import ConfigError, CorruptIndexError, DiskFullError, NonFiniteError, ShapeError
from .warn import warn_user

__all__ = [
    "EXACT_PATH",
    "FACTORY_EXAMPLES",
    "MISSING_SCORE",
    "SVD_K_FACTOR",
    "SearchIndex",
    "built_at_open",
    "exact_topk",
    "physical_cores",
    "precision_at_k",
    "recall_at_k",
    "rerank",
    "set_threads",
]

#: Which implementation answers a "Flat" (exact) search on CPU: "torch" (matmul + topk over a
#: zero-copy view of the flat index's storage) or "faiss" (IndexFlatIP.search). Chosen from
#: benchmarks/search_exact_path.json; torch was 1.0-12x faster in every measured case.
EXACT_PATH = "torch"

#: Score faiss reports for a missing result (id -1): -FLT_MAX.
MISSING_SCORE = float(np.finfo(np.float32).min)

FACTORY_EXAMPLES = ("Flat", "SVD128", "SVD128,PQ64fs", "IVF1024,Flat", "HNSW32", "IVF256,PQ32")

#: SVD<r> indexes rescore this many candidates per requested result unless ``candidates`` is given
SVD_K_FACTOR = 40
#: SVD<r>,PQ<M>fs: the fast-scan stage passes this many ids per final candidate to the reduced stage
SVD_PQ_FACTOR = 4
#: below this many rows SVD<r>,PQ<M>fs skips its fast-scan stage (searches as SVD<r>)
FAST_SCAN_MIN_ROWS = 256
_SVD_RE = re.compile(r"^SVD(\d+)(?:,PQ(\d+)fs)?$")


def svd_rank(factory: str) -> int | None:
    """r of an "SVD<r>" or "SVD<r>,PQ<M>fs" factory string, else None."""
    m = _SVD_RE.match(factory.strip()) if isinstance(factory, str) else None
    return int(m.group(1)) if m else None


def svd_fast_scan(factory: str) -> int | None:
    """M of an "SVD<r>,PQ<M>fs" factory string (its fast-scan stage), else None."""
    m = _SVD_RE.match(factory.strip()) if isinstance(factory, str) else None
    return int(m.group(2)) if m and m.group(2) else None


def min_train_rows(factory: str) -> int:
    """The fewest rows a faiss factory string can be trained on: the lists of IVF<nlist> (k-means),
    2^nbits codewords per PQ sub-quantizer (8 bits, or 4 for fast scan); 1 when nothing is trained."""
    if not isinstance(factory, str) or built_at_open(factory):
        return 1
    need = [1]
    need += [int(m) for m in re.findall(r"IVF(\d+)", factory)]
    for _, bits, fs in re.findall(r"PQ(\d+)(?:x(\d+))?(fs)?", factory):
        need.append(2 ** (int(bits) if bits else 4 if fs else 8))
    return max(need)


def fitting_nlist(n: int) -> int:
    """A number of IVF lists that n rows train well (faiss asks for 39 rows per list)."""
    return max(1, min(n // 39, int(4 * n ** 0.5)))


def built_at_open(factory: str) -> bool:
    """Whether an index folder builds this index from its rows when opened (no faiss.index file)."""
    return factory.strip() == "Flat" or svd_rank(factory) is not None

# Largest score matrix (elements) the torch exact path materialises at once: 2**25 floats = 128 MiB.
_SCORE_BLOCK_ELEMENTS = 1 << 25
#: bytes of full rows the SVD<r> search gathers at once to rescore its candidates
_GATHER_BYTES = 64 << 20


# --------------------------------------------------------------------------------------- threads


def physical_cores() -> int:
    """Number of physical cores among the CPUs this process may run on (os.sched_getaffinity).

    Hyper-threads of one core count once (read from /sys topology where available).
    """
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - non-Linux
        return max(1, os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            pkg = (topo / "physical_package_id").read_text().strip()
            core = (topo / "core_id").read_text().strip()
        except OSError:
            cores.add(("cpu", cpu))
            continue
        cores.add((pkg, core))
    return max(1, len(cores))


#: fewest candidate rows per thread worth splitting one query's inner products over threads
_MIN_DOTS_PER_THREAD = 64


def set_threads(n: int | None = None) -> int:
    """Set faiss (OpenMP) and torch intra-op thread counts to ``n`` (default: physical cores).

    Returns the number set. faiss and torch each bring their own OpenMP runtime, so both are set.
    """
    if n is None:
        n = physical_cores()
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ConfigError(f"threads must be a positive integer, got {n!r}: pass e.g. set_threads(4) or None for all physical cores")
    n = int(n)
    faiss.omp_set_num_threads(n)
    import torch

    torch.set_num_threads(n)
    return n


# --------------------------------------------------------------------------------------- helpers


class _RWLock:
    """Many readers (searches) or one writer (train_and_add)."""

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer = False

    def read(self) -> "_RWLock":
        """``with lock.read():`` (a plain context manager, not a generator: a search takes it once per call)."""
        return self

    def __enter__(self) -> None:
        with self._cond:
            while self._writer:
                self._cond.wait()
            self._readers += 1

    def __exit__(self, *exc: Any) -> None:
        with self._cond:
            self._readers -= 1
            if self._readers == 0:
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            while self._writer or self._readers:
                self._cond.wait()
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def _check_topk(topk) -> int:
    if isinstance(topk, bool) or not isinstance(topk, (int, np.integer)) or topk < 1:
        raise ConfigError(f"topk must be a positive integer, got {topk!r}")
    return int(topk)


def _as_queries(queries, dim: int | None) -> np.ndarray:
    q = np.asarray(queries)
    if q.ndim != 2:
        hint = " (for one query use queries.reshape(1, -1))" if q.ndim == 1 else ""
        raise ShapeError(f"queries must be a 2-D array [Q, {dim if dim is not None else 'k'}], got shape {tuple(q.shape)}{hint}")
    if dim is not None and q.shape[1] != dim:
        raise ShapeError(f"queries have dimension {q.shape[1]} but the index has dimension {dim}: project queries with the same model/projection as the index")
    if not (np.issubdtype(q.dtype, np.floating) or np.issubdtype(q.dtype, np.integer)):
        raise ShapeError(f"queries must be a float array, got dtype {q.dtype}")
    q = np.ascontiguousarray(q, dtype=np.float32)
    if not np.isfinite(q).all():
        raise NonFiniteError("queries contain NaN or infinite values: check the query gradients/projections")
    return q


def _as_block(item, dim: int, what: str = "block") -> np.ndarray:
    if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (int, np.integer)):
        item = item[1]
    b = np.asarray(item)
    if b.ndim != 2 or b.shape[1] != dim:
        raise ShapeError(f"each {what} must be a 2-D array [rows, {dim}], got shape {tuple(b.shape)}")
    b = np.ascontiguousarray(b, dtype=np.float32)
    if not _all_finite(b):
        raise NonFiniteError(f"a {what} of rows contains NaN or infinite values: recompute or drop those rows before indexing")
    return b


def _all_finite(b: np.ndarray) -> bool:
    """True when every entry is finite: one sum (a NaN or infinity makes it non-finite), and the
    elementwise test only when the sum is not finite (bad entries, or a sum that overflows)."""
    with np.errstate(over="ignore", invalid="ignore"):
        if np.isfinite(b.sum()):
            return True
    return bool(np.isfinite(b).all())


def _sample_ids(n: int, m: int, seed: int) -> np.ndarray:
    """The sorted ids of a seeded sample of m of n rows (training samples)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=m, replace=False))


def _empty_result(nq: int, topk: int) -> tuple[np.ndarray, np.ndarray]:
    return (np.full((nq, topk), MISSING_SCORE, dtype=np.float32), np.full((nq, topk), -1, dtype=np.int64))


def _first_line(exc: BaseException) -> str:
    """The useful part of a (faiss) exception message, on one line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    if not lines:
        return type(exc).__name__
    line = lines[0]
    m = re.search(r" at \S+:\d+: (.*)$", line)  # faiss: "Error in <func> at <file>:<line>: <what>"
    return (m.group(1) if m else line).strip()


def _describe(index) -> str:
    """Factory-like description of a (CPU) faiss index; faiss 1.15 has no reverse_index_factory."""
    idx = faiss.downcast_index(index)
    if _svd_parts(idx) is not None:
        return f"SVD{faiss.downcast_index(idx.base_index).index.d}"
    if isinstance(idx, faiss.IndexPreTransform):
        return f"{type(idx).__name__}({_describe(idx.index)})"
    if isinstance(idx, faiss.IndexHNSW):
        inner = "" if isinstance(idx, faiss.IndexHNSWFlat) else f"({type(idx).__name__})"
        return f"HNSW{idx.hnsw.nb_neighbors(1)}{inner}"
    if isinstance(idx, faiss.IndexIVFPQ):
        nb = "" if idx.pq.nbits == 8 else f"x{idx.pq.nbits}"
        return f"IVF{idx.nlist},PQ{idx.pq.M}{nb}"
    if isinstance(idx, faiss.IndexIVFFlat):
        return f"IVF{idx.nlist},Flat"
    if isinstance(idx, faiss.IndexPQ):
        nb = "" if idx.pq.nbits == 8 else f"x{idx.pq.nbits}"
        return f"PQ{idx.pq.M}{nb}"
    if type(idx) in (faiss.IndexFlat, faiss.IndexFlatIP):
        return "Flat"
    return type(idx).__name__


def _no_polysemous_training(index) -> None:
    """Skip polysemous code training for PQ indexes (faiss factory turns it on unless "PQ<M>np").

    It only serves polysemous (Hamming-filtered) search, which this module never enables, and it
    costs most of the PQ training time.
    """
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    if isinstance(idx, (faiss.IndexIVFPQ, faiss.IndexPQ)):
        idx.do_polysemous_training = False


def _is_flat_ip(index) -> bool:
    idx = faiss.downcast_index(index)
    return type(idx) in (faiss.IndexFlat, faiss.IndexFlatIP) and idx.metric_type == faiss.METRIC_INNER_PRODUCT


def _make_svd(k: int, r: int):
    """The untrained faiss structure of an "SVD<r>" index: refine(pretransform(V^T, flat IP r), flat IP k)."""
    if not 1 <= r < k:
        raise ConfigError(f"SVD{r}: the rank must be between 1 and k-1 = {k - 1}; use 'Flat' for exact search")
    lt = faiss.LinearTransform(int(k), int(r), False)
    base = faiss.IndexPreTransform(lt, faiss.IndexFlatIP(int(r)))
    index = faiss.IndexRefineFlat(base)
    index.k_factor = float(SVD_K_FACTOR)
    # faiss keeps the python objects alive (referenced_objects) while the C++ ones point to them
    assert getattr(index, "referenced_objects", None) and getattr(base, "referenced_objects", None)
    return index


def _svd_parts(index):
    """(LinearTransform, reduced IndexFlatIP, full IndexFlat) of an SVD<r> structure, else None."""
    idx = faiss.downcast_index(index)
    if not isinstance(idx, faiss.IndexRefineFlat):
        return None
    base = faiss.downcast_index(idx.base_index)
    if not isinstance(base, faiss.IndexPreTransform) or base.chain.size() != 1:
        return None
    lt = faiss.downcast_VectorTransform(base.chain.at(0))
    inner = faiss.downcast_index(base.index)
    full = faiss.downcast_index(idx.refine_index)
    if type(lt) is not faiss.LinearTransform or lt.have_bias or not _is_flat_ip(inner) or not _is_flat_ip(full):
        return None
    return lt, inner, full


def _train_svd(index, sample: np.ndarray) -> None:
    """V = the top-r eigenvectors of the (uncentered) second moment of ``sample``; sets A = V^T."""
    import torch

    lt, _, _ = _svd_parts(index)
    r = lt.d_out
    x = torch.from_numpy(np.ascontiguousarray(sample, dtype=np.float32))
    m = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    for s in range(0, x.shape[0], 8192):          # float32 products (fast), summed in float64
        m += (x[s:s + 8192].T @ x[s:s + 8192]).to(torch.float64)
    evals, evecs = torch.linalg.eigh(m)
    v = evecs[:, -r:].flip(1)                                  # [k, r], largest first
    faiss.copy_array_to_vector(np.ascontiguousarray(v.T.numpy(), dtype=np.float32).ravel(), lt.A)
    lt.is_trained = True
    base = faiss.downcast_index(faiss.downcast_index(index).base_index)
    base.is_trained = True
    index.is_trained = True


def _search_params(index, nprobe, ef_search, factory: str):
    """Per-call faiss SearchParameters for ``index`` (CPU master), or None for defaults.

    Returns (params, keepalive) — keepalive holds nested parameter objects that SWIG does not own.
    """
    if nprobe is None and ef_search is None:
        return None, []
    for name, v in (("nprobe", nprobe), ("ef_search", ef_search)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ConfigError(f"{name} must be a positive integer, got {v!r}")
    keep: list = []
    idx = faiss.downcast_index(index)
    wrap = None
    if isinstance(idx, faiss.IndexPreTransform):
        wrap = faiss.SearchParametersPreTransform()
        idx = faiss.downcast_index(idx.index)
    used_nprobe = used_ef = False
    params = None
    if isinstance(idx, faiss.IndexIVF):
        params = faiss.SearchParametersIVF()
        params.nprobe = int(nprobe) if nprobe is not None else int(idx.nprobe)
        params.max_codes = int(idx.max_codes)
        used_nprobe = nprobe is not None
        quant = faiss.downcast_index(idx.quantizer)
        if ef_search is not None and isinstance(quant, faiss.IndexHNSW):  # e.g. "IVF4096_HNSW32,Flat"
            qp = faiss.SearchParametersHNSW()
            qp.efSearch = int(ef_search)
            params.quantizer_params = qp
            keep.append(qp)
            used_ef = True
    elif isinstance(idx, faiss.IndexHNSW):
        params = faiss.SearchParametersHNSW()
        params.efSearch = int(ef_search) if ef_search is not None else int(idx.hnsw.efSearch)
        used_ef = ef_search is not None
    if nprobe is not None and not used_nprobe:
        raise ConfigError(f"nprobe applies only to IVF indexes, this index is {factory!r}: drop nprobe")
    if ef_search is not None and not used_ef:
        raise ConfigError(f"ef_search applies only to HNSW indexes (or IVF with an HNSW quantizer), this index is {factory!r}: drop ef_search")
    if wrap is not None:
        wrap.index_params = params
        keep.append(params)
        params = wrap
    return params, keep


def _to_gpu(cpu_index):
    """Copy ``cpu_index`` to GPU 0. Returns (gpu_index, resources); resources must stay alive."""
    res = faiss.StandardGpuResources()
    return faiss.index_cpu_to_gpu(res, 0, cpu_index), res


def _num_gpus() -> int:
    get = getattr(faiss, "get_num_gpus", None)
    if get is None:
        return 0
    try:
        return int(get())
    except Exception:  # pragma: no cover - broken GPU runtime counts as none
        return 0


#: where the torch GPU path puts the rows (tests set "cpu" to run that path without a GPU)
_CUDA_DEVICE = "cuda"


def _torch_cuda() -> bool:
    """Whether torch can use a CUDA device (the GPU path of Flat and SVD<r> without faiss-gpu)."""
    try:
        import torch

        return bool(torch.cuda.is_available())
    except Exception:  # pragma: no cover - a broken CUDA runtime counts as none
        return False


def _torch_topk(queries: np.ndarray, rows, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact MIPS by torch matmul + topk over ``rows`` [n, k] (a numpy view, not copied, or a torch
    tensor on any device), in blocks."""
    import torch

    nq, n = queries.shape[0], rows.shape[0]
    out_s, out_i = _empty_result(nq, topk)
    if n == 0 or nq == 0:
        return out_s, out_i
    kk = min(topk, n)
    rows_t = rows if isinstance(rows, torch.Tensor) else torch.from_numpy(rows)
    q_all = torch.from_numpy(queries).to(rows_t.device)
    qb = max(1, min(nq, _SCORE_BLOCK_ELEMENTS // n))
    rb = min(n, max(_SCORE_BLOCK_ELEMENTS // qb, kk))
    with torch.inference_mode():
        for q0 in range(0, nq, qb):
            q_t = q_all[q0 : q0 + qb]
            best_s = best_i = None
            for r0 in range(0, n, rb):
                s = q_t @ rows_t[r0 : r0 + rb].T
                bs, bi = torch.topk(s, min(kk, s.shape[1]), dim=1, largest=True, sorted=best_s is None and rb >= n)
                bi = bi + r0
                if best_s is None:
                    best_s, best_i = bs, bi
                else:
                    cs = torch.cat([best_s, bs], dim=1)
                    ci = torch.cat([best_i, bi], dim=1)
                    best_s, pos = torch.topk(cs, kk, dim=1, largest=True, sorted=False)
                    best_i = torch.gather(ci, 1, pos)
            if rb < n:  # merged chunks: final sort
                best_s, order = torch.sort(best_s, dim=1, descending=True)
                best_i = torch.gather(best_i, 1, order)
            out_s[q0 : q0 + qb, :kk] = best_s.cpu().numpy()
            out_i[q0 : q0 + qb, :kk] = best_i.cpu().numpy()
    return out_s, out_i


# ----------------------------------------------------------------------------------- SearchIndex


class SearchIndex:
    """A faiss inner-product index over pretraining rows, with an exact fast path for "Flat".

    Build with ``SearchIndex.create(k, factory)`` then ``train_and_add(blocks, n)``; or
    ``SearchIndex.load(path)``. ``search(queries, topk)`` returns faiss-style ``(scores, ids)``.
    """

    def __init__(self, index, factory: str | None = None, device: str = "auto") -> None:
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise ConfigError("the faiss index does not use inner-product metric: rebuild it with SearchIndex.create (METRIC_INNER_PRODUCT)")
        _check_device(device)
        self._index = index  # CPU master; owns the C++ object
        self._typed = faiss.downcast_index(index)  # borrowed view, valid while self._index lives
        self._factory = factory if factory is not None else _describe(index)
        self._device = device
        self._flat = _is_flat_ip(index)
        self._svd = _svd_parts(index)
        self._lock = _RWLock()
        self._gpu_index = None
        self._gpu_res = None
        self._cuda: dict | None = None   # torch CUDA copies of the rows (Flat, SVD<r> without faiss-gpu)
        self._views: dict | None = None  # SVD<r>: cached zero-copy views (see _svd_views)
        self._fast_scan_m: int | None = None   # SVD<r>,PQ<M>fs: M
        self._fast_scan = None                 # its faiss IndexPQFastScan over the reduced rows

    # -- construction ---------------------------------------------------------------------------

    @classmethod
    def create(cls, k: int, factory: str = "Flat", device: str = "auto") -> "SearchIndex":
        """New empty inner-product index of dimension ``k`` from a faiss factory string."""
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"index dimension k must be a positive integer, got {k!r}")
        if not isinstance(factory, str) or not factory.strip():
            raise ConfigError(f"index factory must be a non-empty faiss factory string such as {', '.join(repr(e) for e in FACTORY_EXAMPLES)}; got {factory!r}")
        factory = factory.strip()
        r = svd_rank(factory)
        if r is not None:
            out = cls(_make_svd(int(k), r), factory=factory, device=device)
            m = svd_fast_scan(factory)
            if m is not None:
                if m < 1 or r % m:
                    raise ConfigError(f"{factory}: the fast-scan stage needs M >= 1 dividing r = {r} "
                                      f"(e.g. 'SVD{r},PQ{max(1, r // 2)}fs')")
                out._fast_scan_m = m
            return out
        try:
            index = faiss.index_factory(int(k), factory, faiss.METRIC_INNER_PRODUCT)
        except Exception as e:
            raise ConfigError(
                f"invalid index factory {factory!r} for dimension {k} ({_first_line(e)}); "
                f"use a faiss factory string such as {', '.join(repr(x) for x in FACTORY_EXAMPLES)}"
            ) from None
        _no_polysemous_training(index)
        return cls(index, factory=factory, device=device)

    def train_and_add(
        self,
        block_iter: Iterable[np.ndarray] | Callable[[], Iterable[np.ndarray]],
        n: int,
        train_size: int = 65536,
        seed: int = 0,
    ) -> None:
        """Train (if the index needs it) on a seeded sample of rows, then add all ``n`` rows.

        ``block_iter`` yields float32 blocks [b, k] (or ``(start, block)`` pairs) covering rows
        0..n-1 in order. A trainable index (IVF, PQ) reads the rows twice: once to gather the
        training sample, once to add; pass a callable returning a fresh iterator (or a re-iterable
        such as a list). Memory: one block + ``min(train_size, n)`` sample rows + the index.
        """
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
            raise ConfigError(f"n (number of rows) must be a non-negative integer, got {n!r}")
        if isinstance(train_size, bool) or not isinstance(train_size, (int, np.integer)) or train_size < 1:
            raise ConfigError(f"train_size must be a positive integer, got {train_size!r}")
        n = int(n)

        def fresh() -> Iterator:
            return iter(block_iter() if callable(block_iter) else block_iter)

        with self._lock.write():
            index = self._index
            self._drop_gpu()              # copies and views of the rows are stale once rows are added
            if self._svd is not None and not index.is_trained:     # SVD<r>: one read of the rows
                self._svd_fill(fresh(), n, int(train_size), seed)
            else:
                self._train_then_add(block_iter, fresh, n, int(train_size), seed)
            if self._fast_scan_m is not None:
                self._fit_fast_scan(int(train_size), seed)
            self._place(self._device)

    def _train_then_add(self, block_iter, fresh: Callable[[], Iterator], n: int, train_size: int,
                        seed: int) -> None:
        """A faiss index: train it (if it needs it) on a seeded sample gathered in a first read of the
        rows, then add all rows in a second read."""
        index = self._index
        if not index.is_trained:
            if not callable(block_iter) and iter(block_iter) is block_iter:
                raise ConfigError(
                    f"index {self._factory!r} needs training, which reads the rows twice: pass a callable "
                    "returning a fresh block iterator (e.g. lambda: store.iter_blocks()) instead of a one-shot iterator"
                )
            m = min(train_size, n)
            if m == 0:
                raise ConfigError(f"index {self._factory!r} needs training rows but n=0: add rows or use 'Flat'")
            sample_idx = _sample_ids(n, m, seed)
            sample = np.empty((m, self.dim), dtype=np.float32)
            filled, seen = 0, 0
            for item in fresh():
                b = _as_block(item, self.dim)
                lo = np.searchsorted(sample_idx, seen)
                hi = np.searchsorted(sample_idx, seen + b.shape[0])
                if hi > lo:
                    sample[filled : filled + hi - lo] = b[sample_idx[lo:hi] - seen]
                    filled += hi - lo
                seen += b.shape[0]
            if seen != n:
                raise ShapeError(f"block_iter yielded {seen} rows but n={n}: pass the true row count")
            try:
                index.train(sample)
            except Exception as e:
                raise ConfigError(
                    f"cannot train index {self._factory!r} on {m} rows ({_first_line(e)}): "
                    "raise train_size/add rows, or use fewer lists (e.g. 'IVF256,Flat') or 'Flat'"
                ) from None
            del sample
        start = index.ntotal
        seen = 0
        try:
            for item in fresh():
                b = _as_block(item, self.dim)
                index.add(b)
                seen += b.shape[0]
            if seen != n:
                raise ShapeError(f"block_iter yielded {seen} rows but n={n}: pass the true row count")
        except BaseException:
            if start == 0:
                index.reset()  # leave no half-added index behind
            raise

    def _svd_fill(self, blocks: Iterator, n: int, train_size: int, seed: int) -> None:
        """Untrained SVD<r>: one read of the rows. They go into the full flat index; the
        training sample (the same seeded rows as the two-pass path) and the reduced rows come from
        that copy in memory, so the caller's rows are read once (a one-shot iterator is fine)."""
        index = self._index
        lt, inner, full = self._svd
        if min(train_size, n) == 0:
            raise ConfigError(f"index {self._factory!r} needs training rows but n=0: add rows or use 'Flat'")
        try:
            seen = 0
            for item in blocks:
                b = _as_block(item, self.dim)
                full.add(b)
                seen += b.shape[0]
            if seen != n:
                raise ShapeError(f"block_iter yielded {seen} rows but n={n}: pass the true row count")
            rows = faiss.rev_swig_ptr(full.get_xb(), n * self.dim).reshape(n, self.dim)
            m = min(train_size, n)
            try:
                _train_svd(index, rows[_sample_ids(n, m, seed)])
            except Exception as e:
                raise ConfigError(
                    f"cannot train index {self._factory!r} on {m} rows ({_first_line(e)}): "
                    "raise train_size/add rows, or use 'Flat'"
                ) from None
            base = faiss.downcast_index(faiss.downcast_index(index).base_index)
            step = max(1, (1 << 26) // (4 * self.dim))          # reduce 64 MiB of rows at a time
            for s in range(0, n, step):
                base.add(rows[s:s + step])     # faiss applies V^T, as IndexRefine.add
            faiss.downcast_index(index).ntotal = full.ntotal
        except BaseException:
            index.reset()                 # leave no half-added index behind
            raise

    # -- properties -----------------------------------------------------------------------------

    @property
    def ntotal(self) -> int:
        return int(self._index.ntotal)

    @property
    def dim(self) -> int:
        return int(self._index.d)

    @property
    def factory(self) -> str:
        return self._factory

    @property
    def two_stage(self) -> bool:
        """An SVD<r> index: candidates in a reduced space, rescored exactly."""
        return self._svd is not None

    @property
    def on_gpu(self) -> bool:
        return self._gpu_index is not None or self._cuda is not None

    @property
    def is_trained(self) -> bool:
        return bool(self._index.is_trained)

    def __repr__(self) -> str:
        return f"SearchIndex(factory={self._factory!r}, dim={self.dim}, ntotal={self.ntotal}, on_gpu={self.on_gpu})"

    # -- search ---------------------------------------------------------------------------------

    def search(
        self,
        queries: np.ndarray,
        topk: int,
        nprobe: int | None = None,
        ef_search: int | None = None,
        candidates: int | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Top-``topk`` rows by inner product for each query row: ``(scores [Q,topk], ids [Q,topk])``.

        ``nprobe`` (IVF), ``ef_search`` (HNSW) and ``candidates`` (SVD<r>: rows rescored exactly,
        default ``SVD_K_FACTOR * topk``) apply to this call only; passing one that does not apply
        to this index type raises ConfigError (so all raise for "Flat").
        """
        topk = _check_topk(topk)
        return self._search(_as_queries(queries, self.dim), topk, nprobe, ef_search, candidates)

    def _search(self, q: np.ndarray, topk: int, nprobe: int | None = None, ef_search: int | None = None,
                candidates: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``search`` of queries already as ``_as_queries`` returns them (float32, C-contiguous,
        [Q, dim], finite) and a checked ``topk``: InfluenceIndex.query's own query vectors."""
        if candidates is not None:
            if self._svd is None:
                raise ConfigError(f"candidates applies only to SVD<r> indexes, this index is {self._factory!r}: drop candidates")
            if isinstance(candidates, bool) or not isinstance(candidates, (int, np.integer)) or candidates < 1:
                raise ConfigError(f"candidates must be a positive integer, got {candidates!r}")
        params, keep = _search_params(self._index, nprobe, ef_search, self._factory)
        with self._lock.read():
            if q.shape[0] == 0 or self._index.ntotal == 0:
                return _empty_result(q.shape[0], topk)
            if self._svd is not None:
                cand = max(topk, int(candidates) if candidates is not None else SVD_K_FACTOR * topk)
                if self._fast_scan is not None and self._cuda is None:
                    return self._fast_scan_search(q, topk, cand)
                return self._svd_search(q, topk, cand)
            if self._cuda is not None:
                return _torch_topk(q, self._cuda["rows"], topk)
            if self._gpu_index is not None:
                return self._faiss_search(self._gpu_index, q, topk, params, keep)
            if self._flat and EXACT_PATH == "torch":
                n, d = self._index.ntotal, self._index.d
                rows = faiss.rev_swig_ptr(self._typed.get_xb(), n * d).reshape(n, d)
                return _torch_topk(q, rows, topk)
            return self._faiss_search(self._index, q, topk, params, keep)

    def _svd_search(self, q: np.ndarray, topk: int, cand: int) -> tuple[np.ndarray, np.ndarray]:
        """Candidates by q V . (x V) (torch, zero-copy over the reduced rows), then exact q . x."""
        import torch

        n = self._index.ntotal
        parts = self._cuda if self._cuda is not None else self._svd_views()
        rows, reduced, a = parts["rows"], parts["reduced"], parts["a"]
        dev = rows.device
        qt = torch.from_numpy(q).to(dev)
        cand = min(cand, n)
        with torch.inference_mode():
            q_red = qt @ a.T
            if q.shape[0] * n <= _SCORE_BLOCK_ELEMENTS:       # one product; candidates need no order
                cid = torch.topk(q_red @ reduced.T, cand, dim=1, sorted=False).indices.cpu().numpy()
            else:
                _, cid = _torch_topk(q_red.contiguous().cpu().numpy(), reduced, cand)
        out_s, out_i = _empty_result(q.shape[0], topk)
        kk = min(topk, n)
        # gathered full rows: up to 16 queries' candidates at once, within _GATHER_BYTES (one query's
        # candidates in pieces beyond it)
        per_row = rows.shape[1] * rows.element_size()
        piece = max(1, _GATHER_BYTES // per_row)
        group = max(1, min(16, _GATHER_BYTES // (per_row * cand)))
        with torch.inference_mode():
            for q0 in range(0, q.shape[0], group):
                ids = torch.from_numpy(cid[q0:q0 + group]).to(dev)
                g, c = ids.shape
                if g * c <= piece:                                  # index_select: faster than rows[ids]
                    full = rows.index_select(0, ids.reshape(-1)).view(g, c, rows.shape[1])
                    s = torch.bmm(full, qt[q0:q0 + g, :, None])[..., 0]       # [g, cand] exact
                else:
                    s = torch.cat([rows.index_select(0, ids[0, j:j + piece]) @ qt[q0]
                                   for j in range(0, c, piece)])[None]
                bs, pos = torch.topk(s, kk, dim=1)
                out_s[q0:q0 + g, :kk] = bs.cpu().numpy()
                out_i[q0:q0 + g, :kk] = torch.gather(ids, 1, pos).cpu().numpy()
        return out_s, out_i

    def _fit_fast_scan(self, train_size: int, seed: int) -> None:
        """(Re)build the SVD<r>,PQ<M>fs first stage over all reduced rows: a 4-bit fast-scan PQ,
        trained on a seeded sample of ``train_size`` reduced rows (faiss k-means, fixed seed)."""
        reduced = self._svd_views()["reduced"].numpy()
        n, r = reduced.shape
        self._fast_scan = None
        if n < FAST_SCAN_MIN_ROWS:                  # too few rows to train it: the plain SVD<r> search
            return
        m = min(train_size, n)
        sample = reduced[_sample_ids(n, m, seed)]
        fs = faiss.IndexPQFastScan(r, self._fast_scan_m, 4, faiss.METRIC_INNER_PRODUCT)
        fs.pq.cp.min_points_per_centroid = 1        # no faiss warning on small samples
        fs.train(np.ascontiguousarray(sample))
        fs.add(reduced)
        self._fast_scan = fs

    def _fast_scan_search(self, q: np.ndarray, topk: int, cand: int) -> tuple[np.ndarray, np.ndarray]:
        """SVD<r>,PQ<M>fs on CPU: ``SVD_PQ_FACTOR x cand`` ids from the fast-scan PQ over the reduced
        rows, the best ``cand`` of them by exact reduced score, then the best ``topk`` of those by
        exact full score. Most of its time is random memory reads: the fast scan and the two
        candidate sets' rows, whose inner products faiss computes in place (no gathered copy), all
        queries in one call, spread over faiss's threads (``_dots_by_ids``); numpy does the small
        steps (a one-query search is mostly per-call overhead otherwise)."""
        views = self._svd_views()
        rows, reduced = views["rows_np"], views["reduced_np"]
        n, k = rows.shape
        r = reduced.shape[1]
        nq = q.shape[0]
        out_s, out_i = _empty_result(nq, topk)
        import torch

        # torch's BLAS pool (numpy's own would oversubscribe the cores); no autograd: neither input needs it
        q_red = torch.mm(torch.from_numpy(q), views["a_t"]).numpy()                 # [Q, r]
        first = self._fast_scan.search(q_red, min(n, SVD_PQ_FACTOR * cand))[1]       # [Q, c1]
        c1 = first.shape[1]
        c = min(cand, c1)
        if c == 0:
            return out_s, out_i
        at = np.arange(nq)[:, None]                        # row index for [Q, j] picks (C-level fancy indexing)
        if c < c1:                                         # the best c by exact reduced score
            red_s = _dots_by_ids(q_red, reduced, first, r)   # missing ids (-1) score -inf
            top = first[at, np.argpartition(-red_s, c - 1, axis=1)[:, :c]]
        else:
            top = np.ascontiguousarray(first)
        full_s = _dots_by_ids(q, rows, top, k)             # [Q, c] exact
        kk = min(topk, c)
        pos = np.argpartition(-full_s, kk - 1, axis=1)[:, :kk] if kk < c else np.broadcast_to(np.arange(c), (nq, c))
        s = full_s[at, pos]
        order = np.argsort(-s, axis=1, kind="stable")
        out_s[:, :kk] = s[at, order]
        out_i[:, :kk] = top[at, pos][at, order]
        missing = out_s[:, :kk] == -np.inf                 # fewer than kk found (ids -1)
        if missing.any():
            out_s[:, :kk][missing] = MISSING_SCORE
            out_i[:, :kk][missing] = -1
        return out_s, out_i

    def use_huge_pages(self) -> int:
        """Back the rows a CPU search reads (Flat and SVD<r> rows, reduced rows, fast-scan codes) with
        huge pages (msif_index.hugepages); returns the bytes collapsed. Other faiss types: 0."""
        from .hugepages import use_huge_pages

        if self._index.ntotal == 0 or self._cuda is not None or self._gpu_index is not None:
            return 0
        buffers: list = []
        if self._svd is not None:
            views = self._svd_views()
            buffers += [views["rows"], views["reduced"]]
            if self._fast_scan is not None:
                codes = self._fast_scan.codes
                buffers.append(faiss.rev_swig_ptr(codes.get(), codes.nbytes()))
        elif self._flat:
            n, d = self._index.ntotal, self._index.d
            buffers.append(faiss.rev_swig_ptr(self._typed.get_xb(), n * d))
        return use_huge_pages(buffers)

    def _svd_views(self) -> dict:
        """Zero-copy torch views of an SVD<r> index: full rows [n, k], reduced rows [n, r], V^T [r, k]
        (a copy). Cached until rows are added (train_and_add drops it with the GPU copies)."""
        import torch

        if self._views is None:
            lt, inner, full = self._svd
            n, k, r = self._index.ntotal, self.dim, inner.d
            rows = faiss.rev_swig_ptr(full.get_xb(), n * k).reshape(n, k)
            reduced = faiss.rev_swig_ptr(inner.get_xb(), n * r).reshape(n, r)
            a = faiss.vector_to_array(lt.A).reshape(r, k)
            self._views = {"rows": torch.from_numpy(rows), "reduced": torch.from_numpy(reduced),
                           "a": torch.from_numpy(a), "rows_np": rows, "reduced_np": reduced,
                           "a_t": torch.from_numpy(np.ascontiguousarray(a.T))}
        return self._views

    @staticmethod
    def _faiss_search(index, q, topk, params, keepalive=()):
        # keepalive: nested SearchParameters objects that must outlive the call
        s, i = index.search(q, topk, params=params) if params is not None else index.search(q, topk)
        s = np.asarray(s, dtype=np.float32)
        i = np.asarray(i, dtype=np.int64)
        s[i < 0] = MISSING_SCORE
        return s, i

    # -- persistence ----------------------------------------------------------------------------

    def save(self, path: str | os.PathLike) -> Path:
        """Write the index to ``path`` atomically (temp file in the same folder, then os.replace)."""
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"cannot save index to {path}: it is a folder; give a file path such as {path / 'search.faiss'}")
        folder = path.parent
        if not folder.is_dir():
            raise ConfigError(f"cannot save index to {path}: folder {folder} does not exist; create it first")
        if self._fast_scan_m is not None:
            raise ConfigError(f"{self._factory} is built from the rows when an index is opened and is not saved "
                              f"to a file; save 'SVD<r>' instead, or keep the rows")
        tmp = folder / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        try:
            with self._lock.read():
                faiss.write_index(self._index, str(tmp))
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException as e:
            try:
                tmp.unlink()
            except OSError:
                pass
            if getattr(e, "errno", None) == errno.ENOSPC or "No space left" in str(e):
                raise DiskFullError(f"disk full while saving index to {path}: free space and save again (the old file, if any, is intact)") from None
            if isinstance(e, RuntimeError):
                raise OSError(f"could not write index to {path}: {_first_line(e)}") from None
            raise
        try:  # make the rename durable
            dfd = os.open(folder, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:  # pragma: no cover - some filesystems refuse fsync on folders
            pass
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "auto") -> "SearchIndex":
        """Read an index written by ``save``; ``device`` "auto" (GPU if faiss sees one), "cpu" or "gpu"."""
        _check_device(device)
        path = Path(path)
        if not path.is_file():
            raise CorruptIndexError(f"index file {path} is missing: build it first or check the path")
        try:
            index = faiss.read_index(str(path))
        except Exception as e:
            raise CorruptIndexError(f"index file {path} is unreadable (truncated or corrupted: {_first_line(e)}); rebuild it") from None
        if index.metric_type != faiss.METRIC_INNER_PRODUCT:
            raise CorruptIndexError(f"index file {path} is not an inner-product index: rebuild it with msif-index")
        self = cls(index, device=device)
        self._place(device)
        return self

    # -- GPU ------------------------------------------------------------------------------------

    def _place(self, device: str) -> None:
        """Copy the index to GPU when ``device`` allows and faiss sees a GPU; else stay on CPU."""
        if device == "cpu" or self.on_gpu:
            return
        # Flat without faiss-gpu, and SVD<r> always (faiss cannot move its refine structure): torch CUDA
        if self._index.ntotal and (self._svd is not None or (self._flat and _num_gpus() <= 0)) and _torch_cuda():
            import torch

            n, d = self._index.ntotal, self.dim
            if self._svd is not None:
                views = self._svd_views()
                self._cuda = {k: views[k].to(_CUDA_DEVICE, copy=True) for k in ("rows", "reduced", "a")}
            else:
                rows = faiss.rev_swig_ptr(self._typed.get_xb(), n * d).reshape(n, d)
                self._cuda = {"rows": torch.from_numpy(rows).to(_CUDA_DEVICE, copy=True)}
            return
        if self._svd is not None:                # its GPU path is torch's, and torch sees no GPU
            if device == "gpu" and self._index.ntotal:
                raise ConfigError(f"device='gpu': {self._factory} searches on the GPU with torch, which sees no "
                                  f"CUDA device; use device='cpu'/'auto'")
            return
        if _num_gpus() <= 0:
            if device == "gpu":
                raise ConfigError("device='gpu' but faiss sees no GPU: install faiss-gpu and check CUDA, or use device='cpu'/'auto'")
            return
        try:
            self._gpu_index, self._gpu_res = _to_gpu(self._index)
        except Exception as e:
            self._gpu_index = self._gpu_res = None
            warn_user(f"could not move index {self._factory!r} to GPU ({_first_line(e)}); searching on CPU")

    def _drop_gpu(self) -> None:
        self._gpu_index = None
        self._gpu_res = None
        self._cuda = None
        self._views = None
        self._fast_scan = None


def _check_device(device) -> None:
    if device not in ("auto", "cpu", "gpu"):
        raise ConfigError(f"device must be 'auto', 'cpu' or 'gpu', got {device!r}")


# ----------------------------------------------------------------------------------- exact tools


def _dots_by_ids(x: np.ndarray, rows: np.ndarray, ids: np.ndarray, d: int) -> np.ndarray:
    """x[i] . rows[ids[i, j]] (float32 [Q, c]) without copying the rows out (faiss
    fvec_inner_products_by_idx, parallel over its ``nx`` query rows); ids -1 score -inf.

    With fewer queries than faiss threads each query's ids are split into equal parts, one per
    thread (its x repeated): one query's 1,280 reduced and 320 full candidate rows are random
    memory reads, about half as long on two threads."""
    nq, c = ids.shape
    x = np.ascontiguousarray(x, dtype=np.float32)
    ids = np.ascontiguousarray(ids, dtype=np.int64)
    parts = min(max(1, faiss.omp_get_max_threads() // max(nq, 1)), max(1, c // _MIN_DOTS_PER_THREAD))
    per = -(-c // parts)
    split = ids
    if per * parts != c:                        # each query's ids padded with -1 to parts x per
        split = np.full((nq, parts * per), -1, dtype=np.int64)
        split[:, :c] = ids
    xs = np.repeat(x, parts, axis=0) if parts > 1 else x
    out = np.empty((nq, parts * per), dtype=np.float32)
    faiss.fvec_inner_products_by_idx(faiss.swig_ptr(out), faiss.swig_ptr(xs), faiss.swig_ptr(rows),
                                     faiss.swig_ptr(split), d, nq * parts, per)
    if split is not ids:
        out = out[:, :c]
    if c and ids.min() < 0:                     # faiss versions differ: some leave these unwritten
        out[ids < 0] = -np.inf
    return out


def _merge_topk(run_s, run_i, blk_s, blk_i, topk):
    """Keep the best ``topk`` of two candidate sets per row; ties broken by smaller id."""
    s = np.concatenate([run_s, blk_s], axis=1)
    i = np.concatenate([run_i, blk_i], axis=1)
    # missing entries (id -1) sort last: give them -inf for ordering
    key_s = np.where(i < 0, -np.inf, s.astype(np.float64))
    key_i = np.where(i < 0, np.iinfo(np.int64).max, i)
    order = np.lexsort((key_i, -key_s), axis=-1)[:, :topk]
    return np.take_along_axis(s, order, 1), np.take_along_axis(i, order, 1)


def exact_topk(queries: np.ndarray, block_iter: Iterable, topk: int) -> tuple[np.ndarray, np.ndarray]:
    """Brute-force exact MIPS reference over rows given as ``(start, block)`` pairs.

    Keeps a running top-``topk`` per query, so memory is one block's scores + O(Q * topk).
    Bare blocks (no start) are numbered consecutively. Ties are broken by smaller id.
    """
    topk = _check_topk(topk)
    q = _as_queries(queries, None)
    run_s, run_i = _empty_result(q.shape[0], topk)
    offset = 0
    for item in block_iter:
        if isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (int, np.integer)):
            start, block = int(item[0]), item[1]
        else:
            start, block = offset, item
        b = _as_block(block, q.shape[1])
        offset = start + b.shape[0]
        if b.shape[0] == 0:
            continue
        s = q @ b.T
        ids = np.broadcast_to(np.arange(start, start + b.shape[0], dtype=np.int64), s.shape)
        if b.shape[0] > topk:
            # a stable sort keeps the smaller id first among equal scores (argpartition would keep
            # an arbitrary subset of a tie that straddles the topk-th place)
            part = np.argsort(-s, axis=1, kind="stable")[:, :topk]
            s = np.take_along_axis(s, part, 1)
            ids = np.take_along_axis(ids, part, 1)
        run_s, run_i = _merge_topk(run_s, run_i, s, np.ascontiguousarray(ids), topk)
    run_s[run_i < 0] = MISSING_SCORE
    return run_s.astype(np.float32, copy=False), run_i


def rerank(
    queries: np.ndarray,
    candidate_ids: np.ndarray,
    rows_for_ids: Callable[[np.ndarray], np.ndarray],
    topk: int,
    *,
    max_rows: int = 16384,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact rescoring of candidates: ``(scores [Q,topk], ids [Q,topk])`` by exact inner product.

    ``candidate_ids`` [Q, K'] may hold -1 (ignored) and duplicates (counted once).
    ``rows_for_ids(ids)`` gets sorted unique int64 ids and returns their rows [len(ids), k].
    Queries are processed in groups so that at most about ``max_rows`` rows are fetched at once.
    """
    topk = _check_topk(topk)
    q = _as_queries(queries, None)
    cand = np.asarray(candidate_ids)
    if cand.ndim != 2 or cand.shape[0] != q.shape[0]:
        raise ShapeError(f"candidate_ids must be [Q={q.shape[0]}, K'], got shape {tuple(cand.shape)}")
    if not np.issubdtype(cand.dtype, np.integer):
        raise ShapeError(f"candidate_ids must be integers, got dtype {cand.dtype}")
    cand = cand.astype(np.int64, copy=True)
    nq, kc = cand.shape
    out_s, out_i = _empty_result(nq, topk)
    if nq == 0 or kc == 0:
        return out_s, out_i
    # drop duplicate candidates within a query (sorted order; final order comes from scores)
    cand.sort(axis=1)
    dup = np.zeros_like(cand, dtype=bool)
    dup[:, 1:] = cand[:, 1:] == cand[:, :-1]
    cand[dup] = -1
    group = max(1, int(max_rows) // kc)
    for q0 in range(0, nq, group):
        c = cand[q0 : q0 + group]
        valid = c >= 0
        uniq = np.unique(c[valid])
        if uniq.size == 0:
            continue
        rows = np.asarray(rows_for_ids(uniq))
        if rows.ndim != 2 or rows.shape != (uniq.size, q.shape[1]):
            raise ShapeError(f"rows_for_ids returned shape {tuple(rows.shape)} for {uniq.size} ids; expected [{uniq.size}, {q.shape[1]}]")
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        pos = np.searchsorted(uniq, np.where(valid, c, uniq[0]))
        full = q[q0 : q0 + group] @ rows.T  # [g, uniq]
        s = np.take_along_axis(full, pos, 1)
        s_ids = np.where(valid, c, -1)
        g_s, g_i = _empty_result(c.shape[0], topk)
        g_s, g_i = _merge_topk(g_s, g_i, s, s_ids, topk)
        g_s[g_i < 0] = MISSING_SCORE
        out_s[q0 : q0 + group], out_i[q0 : q0 + group] = g_s, g_i
    return out_s, out_i


def recall_at_k(
    exact_scores: np.ndarray,
    exact_ids: np.ndarray,
    approx_ids: np.ndarray,
    k: int,
    approx_scores: np.ndarray | None = None,
    rtol: float = 1e-6,
) -> float:
    """Tie-aware recall@k of ``approx_ids`` against an exact search, averaged over queries.

    An approximate id (among its first ``k``, -1 and duplicates ignored) is a hit if it is in the
    exact top-k, or if its exact score ties the k-th exact score within ``rtol`` relative
    (faiss contrib style: an exact list is only one of several valid answers under ties).
    The exact score of an approximate id is found in ``exact_scores`` when ``exact_ids`` holds it
    (pass an exact list longer than k to cover ties), else in ``approx_scores`` if given (these
    must be exact scores, e.g. from ``rerank``, "Flat"/"IVF*,Flat"/"HNSW*" searches). Each query's
    recall is hits / (number of valid exact ids among the first k).
    """
    k = _check_topk(k)
    es = np.asarray(exact_scores, dtype=np.float64)
    ei = np.asarray(exact_ids)
    ai = np.asarray(approx_ids)
    if es.shape != ei.shape or es.ndim != 2 or ai.ndim != 2 or ai.shape[0] != ei.shape[0]:
        raise ShapeError(f"exact_scores/exact_ids must be the same [Q, K] shape and approx_ids [Q, K'], got {es.shape}, {ei.shape}, {ai.shape}")
    if ei.shape[1] < k:
        raise ShapeError(f"exact results have {ei.shape[1]} columns, fewer than k={k}: run the exact search with topk >= k")
    asc = None
    if approx_scores is not None:
        asc = np.asarray(approx_scores, dtype=np.float64)
        if asc.shape != ai.shape:
            raise ShapeError(f"approx_scores shape {asc.shape} differs from approx_ids shape {ai.shape}")
    nq = ei.shape[0]
    if nq == 0:
        return float("nan")
    total = 0.0
    for qi in range(nq):
        top = ei[qi, :k]
        n_valid = int((top >= 0).sum())
        if n_valid == 0:
            total += 1.0
            continue
        kth = es[qi, n_valid - 1]
        tol = rtol * abs(kth)
        exact_score_of = {int(i): float(s) for i, s in zip(ei[qi], es[qi]) if i >= 0}
        top_set = {int(i) for i in top if i >= 0}
        hits, seen = 0, set()
        for j, a in enumerate(ai[qi, :k]):
            a = int(a)
            if a < 0 or a in seen:
                continue
            seen.add(a)
            if a in top_set:
                hits += 1
                continue
            s = exact_score_of.get(a)
            if s is None and asc is not None:
                s = float(asc[qi, j])
            if s is not None and s >= kth - tol:
                hits += 1
        total += min(hits, n_valid) / n_valid
    return total / nq


#: Precision@k equals recall@k here: both lists are cut to k entries, so hits / k is both the
#: fraction of exact neighbours found and the fraction of returned ids that are correct.
precision_at_k = recall_at_k

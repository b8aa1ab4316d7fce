"""Shared helpers of the benchmark scripts (not part of the library, not part of the test suite).

* ``LazyImages``: a synthetic MNIST-shaped map-style dataset whose memory is O(1) in n: two fixed
  pools of seeded uniform images (a few MB) and example i = pool_a[i % 1024] + pool_b[i % 1021]
  (distinct for i < 1024 * 1021), label = a hash of i mod the number of classes (random labels).
  Items cost one tensor add, so data loading is a small part of a build's time.
* ``mlp_task`` / ``cnn_task``: tiny ``MultiStageTask``s with untrained, seeded weights (enough for
  throughput and latency), frozen finetuning: the finetuned model is the pretrained backbone W with a
  new small head theta = Linear(feat, 2) trained on m = 128 lazy examples (theta is never trained:
  the operator only needs the finetuning objective's derivatives at the given weights).
* timing (``timeit``), thread setup (``setup_threads``), RSS (``peak_rss_mb`` / ``current_rss_mb``)
  and ``run_child`` (run a function of a script in a fresh subprocess, JSON in, JSON out: used to
  measure peak RSS at each n from a clean process).
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import msif_index  # noqa: E402

THREADS = 2


def setup_threads(n: int = THREADS) -> int:
    """torch and faiss (each has its own OpenMP runtime) both on ``n`` threads."""
    torch.set_num_threads(n)
    try:
        import faiss
        faiss.omp_set_num_threads(n)
    except ImportError:  # pragma: no cover
        pass
    return n


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover
        cores = os.cpu_count() or 1
    return {"cpu": cpu, "cpus_available": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version()}


# ------------------------------------------------------------------------------------------------
# data


def _hash(i: int) -> int:
    """A cheap integer hash (splitmix-like), deterministic across processes."""
    x = (i * 0x9E3779B97F4A7C15 + 0x632BE59BD9B4E019) & 0xFFFFFFFFFFFFFFFF
    x ^= x >> 31
    x = (x * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 29)


def _hash_np(i: np.ndarray) -> np.ndarray:
    """``_hash`` of every entry of a uint64 array (uint64 arithmetic wraps modulo 2**64)."""
    with np.errstate(over="ignore"):
        x = i * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x632BE59BD9B4E019)
        x ^= x >> np.uint64(31)
        x = x * np.uint64(0xBF58476D1CE4E5B9)
        return x ^ (x >> np.uint64(29))


class LazyImages(Dataset):
    """n synthetic [1, 28, 28] float32 images with random labels; memory O(1) in n.

    Example i is (pool_a[i % 1024] + pool_b[i % 1021], hash(i) % classes); the pools are seeded, so
    the same (n, seed) gives the same examples in every process.
    """

    POOL_A, POOL_B = 1024, 1021

    def __init__(self, n: int, classes: int = 10, seed: int = 0, shape: tuple[int, ...] = (1, 28, 28)):
        self.n, self.classes, self.seed = int(n), int(classes), int(seed)
        g = torch.Generator().manual_seed(1_000_003 * seed + 17)
        self.pool_a = torch.rand(self.POOL_A, *shape, generator=g) * 0.5
        self.pool_b = torch.rand(self.POOL_B, *shape, generator=g) * 0.5

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        i = int(i)
        if not 0 <= i < self.n:
            raise IndexError(i)
        x = self.pool_a[i % self.POOL_A] + self.pool_b[i % self.POOL_B]
        return x, (_hash(i + self.seed * 7_919) % self.classes)

    def __getitems__(self, ids) -> list:
        """Items ``ids`` in one indexing operation per pool (torch's batched-fetch protocol, used by
        DataLoader and msif_index.data.batches); the same items as ``[self[i] for i in ids]``."""
        idx = torch.as_tensor([int(i) for i in ids], dtype=torch.long)
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= self.n):
            raise IndexError(f"ids outside 0..{self.n - 1}")
        x = self.pool_a[idx % self.POOL_A] + self.pool_b[idx % self.POOL_B]
        labels = (_hash_np(idx.numpy().astype(np.uint64) + np.uint64(self.seed * 7_919))
                  % np.uint64(self.classes)).tolist()
        return list(zip(x.unbind(0), labels))

    def batch(self, ids) -> tuple[torch.Tensor, torch.Tensor]:
        """A collated batch of ``ids`` (what msif_index.data.batches would make)."""
        from msif_index.data import full_batch
        return full_batch(self, list(ids))


# ------------------------------------------------------------------------------------------------
# models and tasks


class Net(nn.Module):
    """head(backbone(x)); the backbone's parameters are W."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def mlp_backbone() -> nn.Module:
    """784-512-512 MLP: Flatten, Linear(784,512), ReLU, Linear(512,512), ReLU."""
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU())


def cnn_backbone() -> nn.Module:
    """Conv2d(1,16,3)+ReLU+MaxPool2 + Conv2d(16,32,3)+ReLU+MaxPool2 + Flatten + Linear(800,128)+ReLU."""
    return nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(32 * 5 * 5, 128), nn.ReLU())


def _ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


class SyntheticTask(msif_index.MultiStageTask):
    """Pretrain head U = Linear(feat, 10) on ``n`` lazy images; frozen finetuning of a new head
    theta = Linear(feat, ft_classes) on ``m`` other lazy images. Untrained, seeded weights."""

    finetuning = "frozen"
    #: small weight decays: the finetuning head's Hessian H_tt must be invertible (m * (classes-1)
    #: can be below dim(theta)), as for any task the operator is computed for
    pretrain_weight_decay = 1e-4
    finetune_weight_decay = 1e-2

    def __init__(self, backbone_fn: Callable[[], nn.Module], feat: int, n: int, m: int = 128,
                 n_test: int = 256, ft_classes: int = 2, seed: int = 0):
        torch.manual_seed(seed)
        backbone = backbone_fn()
        self._pre = Net(backbone, nn.Linear(feat, 10))
        g = torch.Generator().manual_seed(seed + 1)
        head = nn.Linear(feat, ft_classes)
        with torch.no_grad():
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * feat ** -0.5)
            head.bias.zero_()
        import copy
        self._fin = Net(copy.deepcopy(backbone), head)
        self.shared_parameters = tuple("backbone." + k for k, _ in backbone.named_parameters())
        self._n, self._m, self._t = n, m, n_test
        self._pretrain = LazyImages(n, 10, seed=seed)
        self._finetune = LazyImages(m, ft_classes, seed=seed + 101)
        self._test = LazyImages(n_test, ft_classes, seed=seed + 202)

    def pretrained_model(self) -> nn.Module:
        return self._pre

    def finetuned_model(self) -> nn.Module:
        return self._fin

    def pretrain_dataset(self) -> Dataset:
        return self._pretrain

    def finetune_dataset(self) -> Dataset:
        return self._finetune

    def test_dataset(self) -> Dataset:
        return self._test

    def pretrain_loss(self, model, batch):
        return _ce(model, batch)

    def finetune_loss(self, model, batch):
        return _ce(model, batch)


def mlp_task(n: int, **kw) -> SyntheticTask:
    return SyntheticTask(mlp_backbone, 512, n, **kw)


def cnn_task(n: int, **kw) -> SyntheticTask:
    return SyntheticTask(cnn_backbone, 128, n, **kw)


TASKS = {"mlp": mlp_task, "cnn": cnn_task}


# ------------------------------------------------------------------------------------------------
# measurement


def format_targets(targets: list[dict[str, Any]]) -> list[str]:
    """The "targets:" block of a benchmark summary, one MET/MISSED line per target."""
    return ["targets:"] + [f"  [{'MET' if t['met'] else 'MISSED'}] {t['what']}: {t['value']}" for t in targets]


def timeit(fn: Callable[[], Any], repeats: int = 5, warmup: int = 1) -> list[float]:
    """Wall-clock seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (MB; ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def anon_huge_mb() -> float | None:
    """All anonymous memory of this process backed by transparent huge pages (MB;
    /proc/self/smaps_rollup), None where the kernel does not say: what msif_index.hugepages collapsed
    plus whatever else got huge pages (numpy asks for them for its large arrays)."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) / 1024.0
    except (OSError, ValueError, IndexError):
        return None
    return None


def current_rss_mb() -> float:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:  # pragma: no cover
        pass
    return float("nan")


def run_child(script: Path, args: dict[str, Any], timeout: float = 3600) -> dict[str, Any]:
    """Run ``python script --child JSON`` in a fresh process; return the JSON it prints last."""
    cmd = [sys.executable, str(script), "--child", json.dumps(args)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        raise RuntimeError(f"child {args} failed (rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return json.loads(lines[-1])


def fmt_table(rows: list[dict[str, Any]], cols: list[tuple[str, str]]) -> str:
    """A plain-text table: ``cols`` = [(key, header)]."""
    def cell(v):
        if isinstance(v, float):
            if v != v:
                return "-"
            if abs(v) >= 1000:
                return f"{v:,.0f}"
            if abs(v) >= 10:
                return f"{v:.1f}"
            return f"{v:.3g}"
        return "-" if v is None else str(v)
    table = [[h for _, h in cols]] + [[cell(r.get(k)) for k, _ in cols] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    os.replace(tmp, path)


def median(xs) -> float:
    return float(np.median(np.asarray(xs, dtype=np.float64)))

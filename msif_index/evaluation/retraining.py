"""Actual retraining of both stages, with an on-disk cache of the measurements it yields.

One retraining = the task's own recipe, through its hooks:

    pretrained' = task.pretrain(Subset(pretrain_dataset, kept ids), init_model=copy of task.pretrained_model())
    finetuned'  = task.finetune(pretrained')                                    (fresh finetuning), or
                  task.finetune(pretrained', init_model=copy of task.finetuned_model())
                  when the hook accepts ``init_model`` and ``finetune_init`` is 'auto' or 'finetuned'
    measurement = task.measurement(finetuned', test batch)   (every test point when there are <= 10,000,
                                                               else the evaluated ones)

Warm-starting the finetuning from the finetuned model is faster and, for a convex (or locally convex)
finetuning problem, lands on the same optimum the influence formula linearizes around; a fresh seeded
init (``finetune_init='fresh'``) follows the recipe literally. The actual change of a removal is measured
against a *reference* retraining on the full pretraining set with the same recipe and warm start, so
optimizer differences between the recipe's original run and a warm-started retraining cancel.

Cache: one small JSON per retraining in ``<cache>/<task fingerprint>/``, named by what was removed
(``remove-<sha of the sorted ids>.json``, ``lds-...-j00042.json``, ``reference.json``), written atomically
(msif_index.atomic), holding the measured test ids and values. The task fingerprint covers the pretrained
and finetuned weights, dataset sizes and a sample of their items, the finetuning settings, the source code
of the task's class (its recipe) and ``finetune_init``; a changed task never reuses stale measurements.
Runs resume from the cache, and several processes can share one cache (``--shard i/N``).
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_leaves
from torch.utils.data import Subset

from ..atomic import check_free_space, cleanup_stale_tmp, write_json_atomic
from ..build import pretrained_fingerprints
from ..data import batches
from ..errors import ConfigError, CorruptIndexError, NonFiniteError, TaskError
from ..fingerprint import fingerprint_tensors
from ..progress import progress
from ..task import MultiStageTask, state_buffers

CACHE_SCHEMA = 1
#: bytes of a retraining cache file besides its ids and values (checked free before each retraining)
CACHE_FILE_BASE_BYTES = 64 << 10
FINETUNE_INITS = ("auto", "finetuned", "fresh")
#: a retraining measures every test point (not only the evaluated ones) when the test set has at most
#: this many: one forward pass, and later evaluations on other test points reuse the cache
MEASURE_ALL_MAX = 10_000


def finetune_accepts_init(task: MultiStageTask) -> bool:
    """Whether ``task.finetune`` takes an ``init_model`` argument (the digits example's does)."""
    try:
        params = inspect.signature(task.finetune).parameters
    except (TypeError, ValueError):
        return False
    return "init_model" in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def resolve_finetune_init(task: MultiStageTask, finetune_init: str) -> str:
    """'finetuned' or 'fresh' for this task ('auto': warm start when the hook accepts init_model)."""
    if finetune_init not in FINETUNE_INITS:
        raise ConfigError(f"finetune_init must be one of {', '.join(FINETUNE_INITS)}, got {finetune_init!r}")
    accepts = finetune_accepts_init(task)
    if finetune_init == "finetuned" and not accepts:
        raise ConfigError(f"{type(task).__name__}.finetune(pretrained_model) takes no init_model, so it cannot "
                          f"warm-start from the finetuned model; use --finetune-init fresh")
    if finetune_init == "auto":
        return "finetuned" if accepts else "fresh"
    return finetune_init


def _items_digest(dataset: Any, count: int = 16) -> str:
    """sha256 over a few evenly spaced items of a dataset (a cheap content check)."""
    n = len(dataset)
    h = hashlib.sha256()
    for i in sorted({int(round(x)) for x in np.linspace(0, n - 1, min(count, n))}):
        for j, leaf in enumerate(tree_leaves(dataset[i])):
            if isinstance(leaf, torch.Tensor):
                h.update(fingerprint_tensors({f"{i}.{j}": leaf}).encode())
            elif isinstance(leaf, np.ndarray):
                h.update(fingerprint_tensors({f"{i}.{j}": leaf}).encode())
            else:
                h.update(repr(leaf).encode())
    return h.hexdigest()


def task_fingerprint(task: MultiStageTask, finetune_init: str) -> str:
    """sha256 identifying the measurements retraining this task gives (see the module docstring)."""
    pre, fin = task.pretrained_model(), task.finetuned_model()
    try:
        source = inspect.getsource(type(task))
    except (OSError, TypeError):
        source = type(task).__qualname__
    pretrained = pretrained_fingerprints(task, pre)
    if not state_buffers(pre):
        pretrained.pop("buffers", None)   # as before buffers were fingerprinted: such caches stay valid
    parts = {
        "pretrained": pretrained,
        "finetuned": fingerprint_tensors(dict(fin.named_parameters())),
        "sizes": [len(task.pretrain_dataset()), len(task.finetune_dataset()), len(task.test_dataset())],
        "data": [_items_digest(task.pretrain_dataset()), _items_digest(task.finetune_dataset()),
                 _items_digest(task.test_dataset())],
        "finetuning": task.finetuning, "alpha": float(task.alpha),
        "wd": [float(task.pretrain_weight_decay), float(task.finetune_weight_decay)],
        "class": type(task).__qualname__,
        "source": hashlib.sha256(source.encode()).hexdigest(),
        "finetune_init": finetune_init,
        "schema": CACHE_SCHEMA,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Job:
    """One retraining: ``removed`` pretraining ids left out; ``key`` names its cache file."""

    key: str
    removed: tuple[int, ...]
    meta: dict = field(default_factory=dict, compare=False, hash=False)


def removal_job(removed: Sequence[int]) -> Job:
    ids = tuple(sorted(int(i) for i in removed))
    if not ids:
        return Job("reference", ())
    digest = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()[:20]
    return Job(f"remove-{digest}", ids)


def reference_job() -> Job:
    return Job("reference", ())


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """'i/N' -> (i, N) with 0 <= i < N; None stays None."""
    if text is None or text == "":
        return None
    try:
        a, b = text.split("/")
        i, n = int(a), int(b)
    except ValueError:
        raise ConfigError(f"--shard must look like i/N (e.g. 0/4), got {text!r}") from None
    if not (n >= 1 and 0 <= i < n):
        raise ConfigError(f"--shard i/N needs N >= 1 and 0 <= i < N, got {text!r}")
    return i, n


class Retrainer:
    """Retrains the task on subsets of its pretraining set and caches the measurements."""

    def __init__(self, task: MultiStageTask, test_ids: Sequence[int], cache_dir: str | Path,
                 finetune_init: str = "auto", progress_bar: bool | None = None, batch_size: int = 256):
        self.task = task
        self.test_ids = [int(i) for i in test_ids]
        n_test = len(task.test_dataset())
        self.measure_ids = (list(range(n_test)) if n_test <= MEASURE_ALL_MAX
                            else sorted(set(self.test_ids)))
        self.finetune_init = resolve_finetune_init(task, finetune_init)
        self.fingerprint = task_fingerprint(task, self.finetune_init)
        self.dir = Path(cache_dir) / self.fingerprint[:16]
        self.progress_bar = progress_bar
        self.batch_size = batch_size
        self.n = len(task.pretrain_dataset())
        self.retrained = 0
        self.loaded = 0
        self.seconds: list[float] = []

    # -- cache ---------------------------------------------------------------------------------
    def path(self, job: Job) -> Path:
        return self.dir / f"{job.key}.json"

    def _read(self, job: Job) -> dict | None:
        p = self.path(job)
        if not p.exists():
            return None
        try:
            data = json.loads(p.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None                           # damaged (cannot happen with atomic writes): redo it
        if data.get("task_fingerprint") != self.fingerprint or list(data.get("removed", [])) != list(job.removed):
            raise CorruptIndexError(f"retraining cache file {p} belongs to another task or removal; "
                                    f"delete {self.dir} and rerun")
        return data

    def cached(self, job: Job) -> np.ndarray | None:
        """The cached measurements of ``job`` on this evaluation's test ids, or None if any is missing."""
        data = self._read(job)
        if data is None:
            return None
        values = dict(zip(data["test_ids"], data["values"]))
        if not all(t in values for t in self.test_ids):
            return None
        return np.array([values[t] for t in self.test_ids], dtype=np.float64)

    # -- retraining ------------------------------------------------------------------------------
    def measure(self, kept: Sequence[int]) -> np.ndarray:
        """Retrain both stages on the pretraining examples ``kept``; the measurements on ``measure_ids``."""
        task = self.task
        subset = Subset(task.pretrain_dataset(), list(map(int, kept)))
        try:
            pre = task.pretrain(subset, init_model=copy.deepcopy(task.pretrained_model()))
            if self.finetune_init == "finetuned":
                fin = task.finetune(pre, init_model=copy.deepcopy(task.finetuned_model()))
            else:
                fin = task.finetune(pre)
        except NotImplementedError as e:
            raise TaskError(f"retraining evaluation needs the task's retraining hooks: {e}") from None
        fin.eval()
        values = []
        with torch.no_grad():
            for _, batch in batches(task.test_dataset(), self.batch_size, self.measure_ids):
                values.append(task.measurement(fin, batch).detach().to(torch.float64).cpu().reshape(-1))
        out = torch.cat(values).numpy()
        if not np.isfinite(out).all():
            raise NonFiniteError("a retrained model's measurement is NaN or infinite; check the task's "
                                 "pretrain/finetune hooks")
        return out

    def run(self, job: Job) -> np.ndarray:
        """The job's measurements: from the cache, else by retraining (then cached)."""
        hit = self.cached(job)
        if hit is not None:
            self.loaded += 1
            return hit
        # the file it will write (removed ids and a value per measured test point, as JSON) must fit
        # before the retraining, which can take minutes, is spent on it
        check_free_space(self.dir, f"the retraining cache file {self.path(job).name}",
                         CACHE_FILE_BASE_BYTES + 32 * (len(job.removed) + len(self.measure_ids)))
        removed = np.zeros(self.n, dtype=bool)
        removed[list(job.removed)] = True
        t0 = time.perf_counter()
        measured = dict(zip(self.measure_ids, self.measure(np.flatnonzero(~removed)).tolist()))
        sec = time.perf_counter() - t0
        self.seconds.append(sec)
        self.retrained += 1
        old = self._read(job)
        merged = dict(zip(old["test_ids"], old["values"])) if old else {}
        merged.update(measured)
        ids = sorted(merged)
        write_json_atomic(self.path(job), {
            "schema": CACHE_SCHEMA, "task_fingerprint": self.fingerprint, "key": job.key,
            "removed": list(job.removed), "kept_count": int(self.n - len(job.removed)),
            "finetune_init": self.finetune_init, "meta": job.meta, "test_ids": ids,
            "values": [merged[i] for i in ids], "seconds": sec})
        return np.array([measured[t] for t in self.test_ids], dtype=np.float64)

    def run_all(self, jobs: Sequence[Job], description: str = "retrain") -> dict[str, np.ndarray]:
        """Run (or load) every job, with a progress bar; returns key -> measurements."""
        self.dir.mkdir(parents=True, exist_ok=True)
        cleanup_stale_tmp(self.dir)
        out: dict[str, np.ndarray] = {}
        with progress(len(jobs), description, unit="model", enabled=self.progress_bar) as advance:
            for job in jobs:
                out[job.key] = self.run(job)
                advance(1)
        return out

    def collect(self, jobs: Sequence[Job]) -> tuple[dict[str, np.ndarray], list[Job]]:
        """(cached measurements by key, jobs still missing) without retraining anything."""
        got, missing = {}, []
        for job in jobs:
            v = self.cached(job)
            if v is None:
                missing.append(job)
            else:
                got[job.key] = v
        return got, missing

    def summary(self) -> dict[str, Any]:
        return {"retrained": self.retrained, "loaded_from_cache": self.loaded,
                "cache_dir": str(self.dir), "task_fingerprint": self.fingerprint,
                "finetune_init": self.finetune_init,
                "seconds_per_retrain": float(np.mean(self.seconds)) if self.seconds else None}


def select_shard(jobs: Sequence[Job], shard: tuple[int, int] | None) -> list[Job]:
    """Every N-th job (offset i) of a deterministic job list; all of them without a shard."""
    if shard is None:
        return list(jobs)
    i, n = shard
    return [j for idx, j in enumerate(jobs) if idx % n == i]

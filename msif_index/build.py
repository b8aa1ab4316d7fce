"""build_index: the offline pass over the pretraining set (MATH.md, "Why an index works").

Lifecycle, each step resumable, each artifact written atomically:
    featurize   raw rows phi_z = P grad_{(W,U)} g(z), streamed into shard files  (raw/shard_*.h5)
    statistics  the preconditioner's passes over the raw rows (or HVPs for hessian/exact)
    finalize    stored rows s_z = [M^{-1} phi_z]_W, block by block                (rows.h5)
    index       a FAISS inner-product index over the stored rows                 (faiss.index)
    manifest    config, fingerprints, sizes, timings: written last               (manifest.json)
A build killed at any moment and rerun with the same command resumes and ends with the same index.
Memory is bounded by the batch, one shard block and the preconditioner state, independent of n.
"""
from __future__ import annotations

import copy
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import __version__
from .atomic import cleanup_stale_tmp, read_json, write_json_atomic
from .autodiff import FlatParams, batched_objective
from .config import BuildConfig
from .data import batches, move
from .errors import ConfigError, IndexMismatchError, NonFiniteError, OutputExistsError
from .fingerprint import fingerprint_tensors, short
from .gradients import GradientProjector, plan_blocks
from .preconditioners import Preconditioner, make_preconditioner, projected_hessian
from .progress import progress
from .search import SearchIndex
from .store import RowStore, RowWriter, ShardedWriter
from .task import MultiStageTask, split_parameters

BUILD_FILE = "build.json"
MANIFEST = "manifest.json"
ROWS = "rows.h5"
FAISS = "faiss.index"
RAW = "raw"
OPERATORS = "operators"
_OURS = {BUILD_FILE, MANIFEST, ROWS, FAISS, RAW, OPERATORS, "report.png", "README.md"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pretrained_fingerprints(task: MultiStageTask, model: nn.Module) -> dict[str, str]:
    """sha256 of the pretrained W and of U (names, shapes, dtypes, values)."""
    params = dict(model.named_parameters())
    w, u = split_parameters(task, model)
    return {"W": fingerprint_tensors({n: params[n] for n in w}),
            "U": fingerprint_tensors({n: params[n] for n in u})}


@dataclass
class Prepared:
    """The model, projector and preconditioner of a build, as the config and the task define them."""

    model: nn.Module
    projector: GradientProjector
    preconditioner: Preconditioner
    w_names: list[str]
    u_names: list[str]
    dtype: torch.dtype
    device: torch.device


def prepare(task: MultiStageTask, config: BuildConfig) -> Prepared:
    """Copy the pretrained model to the compute dtype/device and plan its projection."""
    source = task.pretrained_model()
    first = next(source.parameters())
    dtype = first.dtype if config.compute_dtype == "auto" else _DTYPES[config.compute_dtype]
    if not dtype.is_floating_point:
        dtype = torch.float32
    device = torch.device(config.device)
    model = copy.deepcopy(source).to(device=device, dtype=dtype)
    model.eval()
    w, u = split_parameters(task, model)
    probe = make_preconditioner(config.preconditioner, [], [], config.damping or 0.0, 0.0, None)
    names = w + u if probe.uses_u else w
    projector = GradientProjector(model, names, proj_dim=config.proj_dim, seed=config.seed, dtype=dtype,
                                  device=device, proj_dim_per_layer=config.proj_dim_per_layer)
    w_set = set(w)
    w_blocks = []
    for b in projector.blocks:
        inside = [p in w_set for p in b.params]
        if any(inside) and not all(inside):
            raise ConfigError(f"module {b.name} has parameters both in W and outside it ({', '.join(b.params)}); "
                              f"list all or none of them in shared_parameters")
        w_blocks.append(all(inside))
    gram_cache: dict[str, torch.Tensor] = {}
    full_gram = projector.gram()

    def gram(b):
        if b.name not in gram_cache:
            s = slice(b.offset, b.offset + b.dim)
            gram_cache[b.name] = full_gram[s, s]
        return gram_cache[b.name]

    pre = make_preconditioner(config.preconditioner, projector.blocks, w_blocks, config.damping,
                              float(task.pretrain_weight_decay), gram)
    return Prepared(model, projector, pre, w, u, dtype, device)


def resolve_config(task: MultiStageTask, config: BuildConfig) -> BuildConfig:
    """Make ``auto`` choices concrete for this task's pretrained model (see BuildConfig.resolved)."""
    if config.preconditioner != "auto" and config.damping is not None:
        return config
    model = task.pretrained_model()
    w, u = split_parameters(task, model)
    params = dict(model.named_parameters())
    names = w + u
    d = sum(params[n].numel() for n in names)
    k = sum(b.dim for b in plan_blocks(model, names, config.proj_dim, config.seed, config.proj_dim_per_layer))
    return config.resolved(d, k)


# ------------------------------------------------------------------------------------------------
# the output folder


def _check_out_dir(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse a folder that holds something else, or another build unless ``overwrite``."""
    if not out.exists():
        return
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    entries = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    foreign = entries - _OURS
    if foreign:
        raise OutputExistsError(f"{out} holds files that are not an msif index ({', '.join(sorted(foreign)[:3])}); "
                                f"choose an empty or new --out folder")
    previous = None
    for name in (MANIFEST, BUILD_FILE):
        if (out / name).exists():
            previous = read_json(out / name, "the index's " + name)
            break
    if previous is None:
        if entries and not overwrite:
            raise OutputExistsError(f"{out} holds a partial index without {BUILD_FILE}; rerun with --overwrite")
        if entries:
            _clear(out)
        return
    if previous.get("identity") != identity:
        if not overwrite:
            raise ConfigError(f"{out} holds an index built with another config or pretrained model "
                              f"({_diff(previous.get('identity', {}), identity)}); rerun with --overwrite "
                              f"to replace it, or choose another --out")
        _clear(out)


def _diff(old: dict, new: dict) -> str:
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if "config" in keys:
        oc, nc = old.get("config", {}), new.get("config", {})
        keys = [f"config.{k}: {oc.get(k)!r} -> {nc.get(k)!r}" for k in sorted(set(oc) | set(nc))
                if oc.get(k) != nc.get(k)] + [k for k in keys if k != "config"]
    return "; ".join(keys[:3]) or "unknown difference"


def _clear(out: Path) -> None:
    for name in _OURS - {"README.md"}:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ------------------------------------------------------------------------------------------------
# the passes


def _featurize(task: MultiStageTask, prep: Prepared, config: BuildConfig, raw: ShardedWriter,
               show: bool | None) -> None:
    dataset = task.pretrain_dataset()
    pending = list(raw.pending_ranges())
    todo = sum(b - a for a, b in pending)
    if not todo:
        return
    buf = torch.empty(config.batch_size, prep.projector.dim, dtype=prep.dtype, device=prep.device)
    host = torch.empty(config.batch_size, prep.projector.dim,
                       dtype=torch.float64 if prep.dtype == torch.float64 else torch.float32)
    with progress(todo, "featurize", enabled=show) as advance:
        for start, stop in pending:
            with raw.shard(raw.shard_index(start)) as shard:
                for ids, batch in batches(dataset, config.batch_size, range(start, stop)):
                    b = len(ids)
                    out = buf[:b]
                    prep.projector.project_batch(task.pretrain_loss, move(batch, prep.device, prep.dtype), out=out)
                    rows = host[:b]
                    rows.copy_(out)
                    _check_finite(rows, ids)
                    shard.write(ids[0], rows.numpy())
                    advance(b)


def _check_finite(rows: torch.Tensor, ids: list[int]) -> None:
    if torch.isfinite(rows.sum()):
        return
    bad = (~torch.isfinite(rows)).any(1).nonzero()
    if len(bad):
        i = ids[int(bad[0])]
        raise NonFiniteError(f"the pretraining gradient of example {i} is not finite (NaN or inf); "
                             f"check its loss, or build with --compute-dtype float64")


def _hessian_fit(task: MultiStageTask, prep: Prepared, config: BuildConfig, n: int) -> None:
    """hessian / exact: M = P H_G P^T by HVPs (on a seeded subsample for 'hessian')."""
    flat = FlatParams(prep.model, prep.projector.param_names)
    f = flat.loss(task.pretrain_loss)
    if config.preconditioner == "exact" or config.hessian_examples >= n:
        ids = list(range(n))
    else:
        g = torch.Generator().manual_seed(config.seed)
        ids = sorted(torch.randperm(n, generator=g)[: config.hessian_examples].tolist())
    data = [move(b, prep.device, prep.dtype) for _, b in batches(task.pretrain_dataset(), config.batch_size, ids)]
    mean_loss = batched_objective(f, data, len(ids))
    p = prep.projector.matrix()
    prep.preconditioner.fit_hessian(projected_hessian(mean_loss, flat.get(), p))


def _raw_blocks(raw: ShardedWriter, block_rows: int) -> Callable[[], Iterator[torch.Tensor]]:
    def gen() -> Iterator[torch.Tensor]:
        for _, block in raw.iter_blocks(block_rows, dtype=raw.dtype):
            yield torch.from_numpy(block)
    return gen


def build_index(task: MultiStageTask, out_dir: str | Path, config: BuildConfig | None = None,
                overwrite: bool = False, progress_bar: bool | None = None) -> Path:
    """Build (or resume, or reuse) the pretraining index of ``task`` in ``out_dir``; return its path.

    Stored row s_z = [M^{-1} P grad g(z)]_W; with a query q_t = P_W v_t the influence is
    I(z, x_t) ~ - q_t . s_z (negative: helpful; positive: harmful).
    """
    config = resolve_config(task, config or BuildConfig())
    out = Path(out_dir)
    n = len(task.pretrain_dataset())
    fps = pretrained_fingerprints(task, task.pretrained_model())
    identity = {"config": config.identity_fields(), "fingerprints": fps, "n": n,
                "finetuning_independent": True}
    _check_out_dir(out, identity, overwrite)
    if (out / MANIFEST).exists():
        return out                                    # already built with this config
    out.mkdir(parents=True, exist_ok=True)
    cleanup_stale_tmp(out)
    timings: dict[str, float] = {}
    prep = prepare(task, config)
    build_info = {"identity": identity, "config": config.to_dict(), "projector": prep.projector.config(),
                  "version": __version__}
    write_json_atomic(out / BUILD_FILE, build_info)
    pre = prep.preconditioner
    if not (out / ROWS).exists():
        raw_dtype = "float64" if prep.dtype == torch.float64 else "float32"
        raw = ShardedWriter(out / RAW, n, prep.projector.dim, raw_dtype, min(config.shard_rows, n),
                            attrs={"identity": identity})
        t0 = time.perf_counter()
        _featurize(task, prep, config, raw, progress_bar)
        timings["featurize_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        block_rows = max(1024, min(65536, (64 << 20) // (4 * prep.projector.dim)))
        if config.preconditioner in ("hessian", "exact"):
            _hessian_fit(task, prep, config, n)
        else:
            pre.fit(_raw_blocks(raw, block_rows), n)
        timings["statistics_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        attrs = {"identity": identity, "config": config.to_dict(), "projector": prep.projector.config(),
                 "preconditioner": pre.summary(), "w_cols": pre.w_cols.tolist()}
        with RowWriter(out / ROWS, n, pre.dim_w, config.dtype, attrs=attrs) as writer:
            with progress(n, "finalize", enabled=progress_bar) as advance:
                for start, block in raw.iter_blocks(block_rows, dtype=raw.dtype):
                    rows = pre.apply(torch.from_numpy(block).to(torch.float64))
                    writer.write(start, rows.numpy())
                    advance(len(block))
            for key, value in pre.state_dict().items():
                writer.add_dataset("preconditioner_" + key.replace("/", "_"), np.asarray(value, dtype=np.float32))
        timings["finalize_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    with RowStore.open(out / ROWS) as store:
        summary = store.attrs["preconditioner"]
        index = SearchIndex.create(store.k, config.factory)
        index.train_and_add(lambda: (b for _, b in store.iter_blocks()), store.n, seed=config.seed)
        index.save(out / FAISS)
    timings["index_s"] = time.perf_counter() - t0
    manifest = {
        "schema": 1, "version": __version__, "identity": identity, "config": config.to_dict(),
        "n": n, "k": pre.dim_w, "k_raw": prep.projector.dim,
        "fingerprints": fps, "fingerprint_short": {k: short(v) for k, v in fps.items()},
        "w_names": prep.w_names, "u_names": prep.u_names,
        "projector": prep.projector.config(), "preconditioner": summary, "timings": timings,
        "files": {"rows": ROWS, "faiss": FAISS},
        "sign_convention": "I(z, x_t) = -q_t . s_z; negative: helpful, positive: harmful",
    }
    write_json_atomic(out / MANIFEST, manifest)
    if (out / RAW).exists():
        shutil.rmtree(out / RAW)
    return out

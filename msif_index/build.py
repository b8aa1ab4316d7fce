"""build_index: the offline pass over the pretraining set (MATH.md, "Why an index works").

Lifecycle, each step resumable, each artifact written atomically:
    statistics  the preconditioner, fitted on raw rows phi_z = P grad_{(W,U)} g(z) of a seeded
                subsample (or by Hessian-vector products for hessian / exact)   (preconditioner.h5)
    featurize   stored rows s_z = [M^{-1} phi_z]_W, written shard by shard; the subsample's raw
                rows are reused from the statistics pass, so every example's gradient is computed
                once; kfac / ekfac store rows in M's eigenbasis (row_basis "eigen": queries are
                rotated alike) and capture them already rotated (the rotation folded into the
                projections), so preconditioning a row is one elementwise product; each shard's
                commit (fsync, rename) overlaps the next shard
                                                                                  (shards/shard_*.h5)
    link        one HDF5 row store over the shards (virtual datasets, no copy)   (rows.h5)
    index       a FAISS inner-product index over the stored rows (not for Flat and SVD<r>, built
                from the rows when the index is opened); the factory is not part of the build's
                identity: rerun with another one and only this step runs  (faiss.index / faiss.alt.index)
    manifest    config, fingerprints, sizes, timings: written last               (manifest.json)
A build killed at any moment and rerun with the same command resumes and ends with the same index.
Memory is bounded by the batch, the statistics subsample and the preconditioner state, independent of n.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn

from . import __version__
from .allocator import keep_freed_memory
from .atomic import (atomic_path, check_free_space, cleanup_stale_tmp, file_sha256, fsync_dir, read_json,
                     write_json_atomic)
from .autodiff import FlatParams, batched_objective
from .config import HESSIAN_DAMPING, BuildConfig
from .data import batches, full_batch, move
from .errors import (ConfigError, CorruptIndexError, NonFiniteError, OutputExistsError, TaskError, exception_text,
                     first_line, forward_ad_errors, python_api)
from .fingerprint import fingerprint_dataset, fingerprint_tensors, short
from .gradients import GradientProjector, plan_blocks
from .lock import folder_lock
from .preconditioners import (DenseInverse, Preconditioner, make_preconditioner, projected_hessian, read_state,
                             warn_negative)
from .progress import progress
from .search import SearchIndex, built_at_open, fitting_nlist, min_train_rows
from .store import RowStore, ShardedWriter, _open_h5, link_shards, normalize_dtype
from .task import (MultiStageTask, eval_mode, fisher_loss_columns, has_fisher_losses, require_shared_parameters,
                   split_parameters, state_buffers)
from .warn import warn_user

BUILD_FILE = "build.json"
MANIFEST = "manifest.json"
ROWS = "rows.h5"
SHARDS = "shards"
PRECOND = "preconditioner.h5"
#: the hessian preconditioner's HVP rows so far (P H P^T's first rows), while they are computed: a
#: killed build resumes its HVPs from there; removed once preconditioner.h5 is written
HVP_PARTIAL = "hvps.partial.h5"
#: seconds between two saves of the HVP rows (each rewrites the rows so far: k x k float64 at most)
HVP_CHECKPOINT_S = 30.0
#: HVPs per vmap call (a resumed run keeps the chunk boundaries: identical rows)
HVP_CHUNK = 64
FAISS = "faiss.index"
#: the search structure's file alternates between these two names when the factory changes, so the
#: manifest (which names it) is the one file replaced to switch from the old one to the new one
FAISS_NAMES = (FAISS, "faiss.alt.index")
OPERATORS = "operators"
_OURS = {BUILD_FILE, MANIFEST, ROWS, SHARDS, PRECOND, HVP_PARTIAL, *FAISS_NAMES, OPERATORS, "report.png",
         "README.md"}
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def pretrained_fingerprints(task: MultiStageTask, model: nn.Module) -> dict[str, str]:
    """sha256 of the pretrained W, of U and of the model's persistent floating-point buffers (batch
    norm running statistics, ...: what the model computes depends on them too; ``state_buffers``),
    each over names, shapes, dtypes and values."""
    params = dict(model.named_parameters())
    w, u = split_parameters(task, model)
    return {"W": fingerprint_tensors({n: params[n] for n in w}),
            "U": fingerprint_tensors({n: params[n] for n in u}),
            "buffers": fingerprint_tensors(state_buffers(model))}


#: pretraining examples whose loss values a build records (``pretrain_loss_probe``)
PROBE_EXAMPLES = 8


def loss_values(loss_fn: Callable, model: nn.Module, data: Any, examples: int = PROBE_EXAMPLES) -> list[float | None]:
    """``loss_fn(model, batch)`` on the first ``examples`` items of ``data``, without autograd, on the
    model's device and dtype, torch's generator seeded (float64 values; None where not finite)."""
    ids = list(range(min(examples, len(data))))
    if not ids:
        return []
    p = next(model.parameters(), None)
    batch = move(full_batch(data, ids), device=p.device if p is not None else "cpu",
                 dtype=p.dtype if p is not None else None)
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(0)
        values = torch.as_tensor(loss_fn(model, batch)).detach().to("cpu", torch.float64).reshape(-1)
    return [float(v) if math.isfinite(float(v)) else None for v in values]


def pretrain_loss_probe(task: MultiStageTask, model: nn.Module) -> list[float | None] | None:
    """``pretrain_loss`` on the first pretraining examples at the pretrained model, as the build saw
    it (recorded in build.json and the manifest): the rows depend on the loss, which no fingerprint
    covers, so a rerun, a resume or an attach with another loss (label smoothing, another weighting)
    is told (``loss_probe_change``). None when two evaluations differ (e.g. dropout on a CUDA model).
    In eval mode, as the build computes its rows (on an eval copy): a task model returned in
    training mode (batch norm on batch statistics, dropout) gives the same probe."""
    with eval_mode(model):
        runs = [loss_values(task.pretrain_loss, model, task.pretrain_dataset()) for _ in range(2)]
    return runs[0] if loss_probe_change(runs[0], runs[1], rtol=1e-9) is None else None


def loss_probe_change(recorded: Any, now: list[float | None] | None, rtol: float = 1e-3) -> str | None:
    """How the probe ``now`` differs from the ``recorded`` one beyond float noise (e.g. "2.303 -> 2.197
    on example 0"), or None (also when either was not recorded: builds from before the probe, or a
    loss that changes from one evaluation to the next)."""
    if now is None or recorded is None:
        return None
    if not isinstance(recorded, list) or len(recorded) != len(now):
        return None if not isinstance(recorded, list) else f"{len(recorded)} -> {len(now)} values"
    for i, (a, b) in enumerate(zip(recorded, now)):
        if (a is None) != (b is None):
            return f"{a} -> {b} on example {i}"
        if a is not None and abs(a - b) > rtol * max(abs(a), abs(b)) + 1e-9:
            return f"{a:.6g} -> {b:.6g} on example {i}"
    return None


def _warn_if_loss_changed(out: Path, identity: dict, probe: list[float | None] | None) -> None:
    """Warn when the build or index in ``out`` is this build (``identity``: it is reused or resumed)
    but recorded other pretraining loss values than ``probe``."""
    for name in (MANIFEST, BUILD_FILE):
        if (out / name).is_file():
            try:
                previous = read_json(out / name, "the index's " + name)
                if previous.get("identity") != identity:
                    return                            # another build: refused or replaced, not mixed
                recorded = previous.get("pretrain_loss_probe")
            except (CorruptIndexError, AttributeError):
                return
            change = loss_probe_change(recorded, probe)
            if change:
                warn_user(f"the task's pretrain_loss gives other values than when {out} was built ({change}); "
                          f"its rows are the old loss's (or the first pretraining examples changed): if that "
                          f"was on purpose, rebuild with --overwrite")
            return


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
    #: featurize's projector: ``projector`` with the preconditioner's eigenbases folded into its
    #: projections (kfac / ekfac: raw rows come out rotated into the stored rows' eigenbasis, so
    #: storing them is an elementwise product), set once the preconditioner is fitted
    rotated: GradientProjector | None = None
    #: the W blocks ``rotated`` rotates (Kronecker blocks; dense blocks are rotated in apply)
    folded: frozenset[str] = frozenset()


def _device(name: str) -> torch.device:
    """torch.device(name), or ConfigError when torch cannot parse it or this machine lacks it."""
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as e:
        raise ConfigError(f"--device {name!r} is not a torch device ({first_line(e)}); "
                          f"use cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name!r}: this torch sees no CUDA device; use --device cpu")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        count = torch.cuda.device_count()
        raise ConfigError(f"--device {name!r}: this machine has {count} CUDA device(s) "
                          f"(cuda:0{'' if count == 1 else f' .. cuda:{count - 1}'}); use one of those or --device cpu")
    if device.type not in ("cpu", "cuda"):
        try:
            torch.empty(1, device=device)
        except Exception as e:  # noqa: BLE001 - any backend error means the device cannot be used
            raise ConfigError(f"--device {name!r} cannot be used here ({first_line(e)}); "
                              f"use --device cpu") from None
    return device


def resolve_compute_dtype(compute_dtype: str, model: nn.Module) -> torch.dtype:
    """The dtype gradients are computed in: ``compute_dtype`` (float32 / float64), or for "auto" the
    model's own when it is float32 or float64, else float32 (a float16 / bfloat16 model's gradients,
    statistics and eigendecompositions need more precision than its weights). Build and attach use
    the same."""
    if compute_dtype != "auto":
        return _DTYPES[compute_dtype]
    dtype = next(model.parameters()).dtype
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def prepare(task: MultiStageTask, config: BuildConfig) -> Prepared:
    """Copy the pretrained model to the compute dtype/device and plan its projection."""
    source = task.pretrained_model()
    dtype = resolve_compute_dtype(config.compute_dtype, source)
    device = _device(config.device)
    model = copy.deepcopy(source).to(device=device, dtype=dtype)
    model.eval()
    w, u = split_parameters(task, model)
    probe = make_preconditioner(config.preconditioner, [], [], config.damping or 0.0, 0.0, None)
    names = w + u if probe.uses_u else w
    projector = GradientProjector(model, names, proj_dim=config.proj_dim, seed=config.seed, dtype=dtype,
                                  device=device, proj_dim_per_layer=config.proj_dim_per_layer,
                                  dense_modules=list(task.dense_modules))
    w_set = set(w)
    w_blocks = []
    for b in projector.blocks:
        inside = [p in w_set for p in b.params]
        if any(inside) and not all(inside):
            raise ConfigError(f"module {b.name} has parameters both in W and outside it ({', '.join(b.params)}); "
                              f"list all or none of them in shared_parameters")
        w_blocks.append(all(inside))
    gram_cache: dict[str, torch.Tensor] = {}

    def gram(b):                      # one block of P P^T, when a preconditioner asks for it
        if b.name not in gram_cache:
            gram_cache[b.name] = projector.gram_block(b).cpu()    # preconditioner state lives on the CPU
        return gram_cache[b.name]

    pre = make_preconditioner(config.preconditioner, projector.blocks, w_blocks, config.damping,
                              float(task.pretrain_weight_decay), gram)
    return Prepared(model, projector, pre, w, u, dtype, device)


def resolve_config(task: MultiStageTask, config: BuildConfig) -> BuildConfig:
    """Make ``auto`` choices concrete for this task's pretrained model (see BuildConfig.resolved); the
    curvature of the statistics: gauss-newton when the task defines ``pretrain_fisher_losses``."""
    if config.fisher == "auto":
        config = config.with_(fisher="gauss-newton" if has_fisher_losses(task) else "empirical")
    elif config.fisher == "gauss-newton" and not has_fisher_losses(task):
        raise ConfigError(f"fisher='gauss-newton' needs the task to define pretrain_fisher_losses(model, batch) "
                          f"({type(task).__name__} does not); use fisher='empirical' or define it")
    if config.preconditioner != "auto" and config.damping is not None:
        return config
    model = task.pretrained_model()
    w, u = split_parameters(task, model)
    params = dict(model.named_parameters())
    names = w + u
    d = sum(params[n].numel() for n in names)
    k = sum(b.dim for b in plan_blocks(model, names, config.proj_dim, config.seed, config.proj_dim_per_layer))
    return config.resolved(d, k, len(task.pretrain_dataset()))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------
# the output folder


def index_folder_entries(out: Path) -> set[str]:
    """The entries of an existing output folder; OutputExistsError if it is not a folder or holds
    anything that is not an msif index file."""
    if not out.is_dir():
        raise OutputExistsError(f"{out} exists and is not a folder; choose another --out")
    entries = {p.name for p in out.iterdir() if not p.name.startswith(".")}
    foreign = entries - _OURS
    if foreign:
        raise OutputExistsError(f"{out} holds files that are not an msif index ({', '.join(sorted(foreign)[:3])}); "
                                f"choose an empty or new --out folder")
    return entries


def _check_out_dir(out: Path, identity: dict, overwrite: bool) -> None:
    """Refuse a folder that holds something else, or another build unless ``overwrite``."""
    if not out.exists():
        return
    entries = index_folder_entries(out)
    previous = None
    finished = (out / MANIFEST).exists()
    for name in (MANIFEST, BUILD_FILE):
        if (out / name).exists():
            try:
                previous = read_json(out / name, "the index's " + name)
            except CorruptIndexError:
                if not overwrite:
                    raise
                _clear(out)                      # unreadable: --overwrite replaces it, as the error says
                return
            break
    if previous is None:
        if entries and not overwrite:
            raise OutputExistsError(f"{out} holds a partial index without {BUILD_FILE}; rerun with --overwrite")
        if entries:
            _clear(out)
        return
    if previous.get("identity") != identity:
        if not overwrite:
            what = "an index built" if finished else "an unfinished build (rerun its own command to resume it)"
            raise ConfigError(f"{out} holds {what} with another config, pretrained model or pretraining data "
                              f"({_diff(previous.get('identity', {}), identity)}); rerun with --overwrite "
                              f"to replace it, or choose another --out")
        _clear(out)


def _attached_operators_replaced(out: Path, identity: dict) -> int:
    """How many attached operators (operators/*.h5) an overwrite of ``out`` with another build drops."""
    ops = list((out / OPERATORS).glob("*.h5")) if (out / OPERATORS).is_dir() else []
    if not ops:
        return 0
    for name in (MANIFEST, BUILD_FILE):
        if (out / name).is_file():
            try:
                previous = read_json(out / name, "the index's " + name)
            except CorruptIndexError:
                return len(ops)
            return len(ops) if not isinstance(previous, dict) or previous.get("identity") != identity else 0
    return len(ops)


def _staging(out: Path) -> Path:
    """Where ``--overwrite`` builds the replacement of a complete index: a hidden sibling folder."""
    out = out.resolve()                     # "." and relative paths: name the real folder
    return out.parent / f".{out.name}.overwrite"


def _replaces_complete_index(out: Path, identity: dict, overwrite: bool) -> bool:
    """Whether ``out`` holds a complete, readable index of another identity that ``overwrite`` replaces:
    then the new one is built beside it and swapped in when complete, so an interrupted rebuild
    leaves the old index answering."""
    if not overwrite or not (out / MANIFEST).is_file():
        return False
    cwd, real = Path.cwd().resolve(), out.resolve()
    if cwd == real or real in cwd.parents:
        return False                                   # the process works inside it: replaced in place
    index_folder_entries(out)                          # nothing foreign in it
    try:
        previous = read_json(out / MANIFEST, "the index's " + MANIFEST)
    except CorruptIndexError:
        return False                                   # unreadable: replaced in place, as before
    return isinstance(previous, dict) and previous.get("identity") != identity


def _swap_in(staging: Path, out: Path) -> None:
    """Replace ``out`` by the complete index in ``staging``: two renames in one folder, then the old
    one is deleted. What the old folder holds besides the index (a README.md, hidden files such as
    .gitkeep) moves over first."""
    out = out.resolve()
    replaced = out.parent / f".{out.name}.replaced"
    if replaced.exists():
        shutil.rmtree(replaced)
    if out.exists():
        for entry in out.iterdir():
            keep = entry.name == "README.md" or (entry.name.startswith(".") and ".tmp-" not in entry.name)
            if keep and not (staging / entry.name).exists():
                os.rename(entry, staging / entry.name)
        os.rename(out, replaced)
    os.rename(staging, out)
    fsync_dir(out.parent)
    if replaced.exists():
        shutil.rmtree(replaced)


def _finish_interrupted_swap(out: Path) -> None:
    """A process stopped between the two renames of ``_swap_in``: ``out`` is gone and the complete
    replacement waits in the staging folder. Finish the swap. A process stopped after them leaves
    the old index in ``.NAME.replaced``: delete it."""
    staging = _staging(out)
    if not out.exists() and (staging / MANIFEST).is_file():
        _swap_in(staging, out)
    replaced = staging.parent / f".{out.resolve().name}.replaced"
    if out.exists() and replaced.is_dir():
        shutil.rmtree(replaced, ignore_errors=True)


def index_damage(out: Path) -> str | None:
    """Why the complete index in ``out`` cannot answer as it is, its search structure aside (a file
    missing, failing its checksum or unreadable), or None: InfluenceIndex.open's checks of the
    manifest and rows.h5, then preconditioner.h5 and every stored row read once (HDF5's per-chunk
    checksums). ``_search_damage`` checks the faiss file."""
    from .index import check_checksum, open_checked_rows     # (index.py imports this module)
    try:
        manifest = read_json(out / MANIFEST, "the index's " + MANIFEST)
        with open_checked_rows(out, manifest, search=False) as store:
            check_checksum(out / PRECOND, manifest, "preconditioner")
            read_state(out / PRECOND)
            store.verify()
    except CorruptIndexError as e:
        return _damage(e)
    except (OSError, KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
        return f"unreadable ({exception_text(e)})"
    return None


def _search_damage(out: Path) -> str | None:
    """Why the faiss file of the complete index in ``out`` cannot be used (missing, failing its
    checksum), or None (also for Flat / SVD<r>, which have none)."""
    from .index import check_search_file                    # (index.py imports this module)
    try:
        check_search_file(out, read_json(out / MANIFEST, "the index's " + MANIFEST))
    except CorruptIndexError as e:
        return _damage(e)
    return None


def _damage(e: CorruptIndexError) -> str:
    """A corruption error's first line without what to do (the caller does it)."""
    return first_line(e).split("; rebuild")[0]


def _diff(old: dict, new: dict) -> str:
    old, new = _identity_part(old, old), _identity_part(new, old)     # the factory is no difference
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    if "config" in keys:
        oc, nc = old.get("config", {}), new.get("config", {})
        keys = [f"config.{k}: {oc.get(k)!r} -> {nc.get(k)!r}" for k in sorted(set(oc) | set(nc))
                if oc.get(k) != nc.get(k)] + [k for k in keys if k != "config"]
    names = {"data": "pretraining data (fingerprint of sampled examples)",
             "fingerprints": "pretrained W / U / buffers", "pretrain_weight_decay": "the task's pretrain_weight_decay"}
    return "; ".join(names.get(k, k) for k in keys[:3]) or "unknown difference"


def _clear(out: Path, keep: set[str] = frozenset()) -> None:
    # the manifest first: a clear interrupted midway leaves a partial build, never a manifest
    # that describes missing files
    for name in [MANIFEST] + sorted(_OURS - {"README.md", MANIFEST} - set(keep)):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


# ------------------------------------------------------------------------------------------------
# the passes


def _raw_rows(task: MultiStageTask, prep: Prepared, config: BuildConfig, ids: Any,
              out: torch.Tensor | None = None, fill: bool = False,
              loss: Callable | None = None, rotated: bool = False,
              slots: int = 1) -> Iterator[tuple[list[int], torch.Tensor]]:
    """(ids, raw rows phi = P grad g) batch by batch, in the compute dtype, into a reused buffer
    (``fill``: ``out`` holds a row for every id, and each batch goes to its own rows of it; else
    batch j goes to rows from (j % ``slots``) * batch_size of ``out``, so the last ``slots`` batches
    stay there). ``loss``: the per-example loss to differentiate (default: ``task.pretrain_loss``);
    ``rotated``: rows in the preconditioner's eigenbasis, from ``prep.rotated``."""
    loss = loss or task.pretrain_loss
    projector = prep.rotated if rotated else prep.projector
    buf = out if out is not None else torch.empty(slots * config.batch_size, prep.projector.dim,
                                                  dtype=prep.dtype, device=prep.device)
    pos = 0
    for j, (bids, batch) in enumerate(batches(task.pretrain_dataset(), config.batch_size, ids)):
        lo = pos if fill else (j % slots) * config.batch_size
        pos += len(bids)
        rows = buf[lo:lo + len(bids)]
        try:
            # the projector checks these rows as a whole (and the losses, on its Kronecker path)
            projector.project_batch(loss, move(batch, prep.device, prep.dtype), out=rows)
        except NonFiniteError:
            # find the example and name it
            raise _nonfinite(_first_nonfinite(task, prep, bids)) from None
        if buf.requires_grad:
            # parameters outside the dense-path blocks can leave autograd history on the rows:
            # drop it (and the graph it keeps alive) before the rows are used or the buffer reused
            buf = buf.detach()
            rows = buf[lo:lo + len(bids)]
        yield bids, rows


def _nonfinite(i: int | None) -> NonFiniteError:
    if i is None:
        return NonFiniteError("a pretraining loss or gradient is not finite (NaN or inf); check the losses, "
                              "or build with --compute-dtype float64")
    return NonFiniteError(f"the pretraining loss or gradient of example {i} is not finite (NaN or inf); "
                          f"check that example and its loss, or build with --compute-dtype float64")


def _first_nonfinite(task: MultiStageTask, prep: Prepared, ids: Any) -> int | None:
    """The first of ``ids`` whose pretraining loss or projected gradient is NaN or infinite (one example
    at a time: only used to name the culprit once a batch failed)."""
    for bids, batch in batches(task.pretrain_dataset(), 1, ids):
        try:
            row = prep.projector.project_batch(task.pretrain_loss, move(batch, prep.device, prep.dtype))
        except NonFiniteError:
            return bids[0]
        if not torch.isfinite(row).all():
            return bids[0]
    return None


def _subsample(n: int, size: int, seed: int) -> list[int]:
    if size >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed)
    return sorted(torch.randperm(n, generator=g)[:size].tolist())


#: rows of the statistics subsample per block of the preconditioner's fit, which rotates them into its
#: eigenbasis in place (ekfac), and of take, which rotates them where the fit did not (kfac, a resumed
#: build) and preconditions them: the same blocks in both, so the rotated rows are bitwise the same.
#: A batch's worth keeps the temporaries at 4 MB for k = 4096 (1,024 rows raised a 10k-row MLP
#: build's peak RSS from 580 to 680-700 MB; the per-call cost is ~1 ms, 32 calls for 8,192 rows)
ROTATE_ROWS = 256


class _Sample:
    """Raw rows phi of the statistics subsample, grouped by the shard their ids fall in.

    The statistics pass computes them (each shard's group in batches of its own, so a group never
    shares a batch with another shard's ids) and featurize reuses them for those ids instead of a
    second gradient pass. A resumed build that loaded the fitted preconditioner recomputes only the
    groups of the shards still to write, in the same batches: the rows are bitwise the same as in
    the uninterrupted build. Memory is bounded by ``stats_examples``, whatever n is."""

    def __init__(self, ids: list[int], shard_rows: int):
        self.shard_rows = shard_rows
        self.groups: dict[int, list[int]] = {}
        for i in ids:
            self.groups.setdefault(i // shard_rows, []).append(i)
        self.rows: dict[int, torch.Tensor] = {}
        #: W blocks the preconditioner's fit already rotated into its eigenbasis in ``rows`` (ekfac)
        self.rotated: frozenset[str] = frozenset()

    def compute(self, task: MultiStageTask, prep: Prepared, config: BuildConfig, shard: int,
                advance: Callable[[int], None] | None = None) -> torch.Tensor:
        ids = self.groups.get(shard, [])
        rows = torch.empty(len(ids), prep.projector.dim, dtype=prep.dtype, device=prep.device)
        for bids, r in _raw_rows(task, prep, config, ids, rows, fill=True):
            if advance is not None:
                advance(len(bids))
        return rows.detach()       # dense-path blocks can leave autograd history on the buffer

    def take(self, task: MultiStageTask, prep: Prepared, config: BuildConfig,
             shard: int) -> tuple[list[int], torch.Tensor]:
        """(ids, stored rows) of one shard's group: its raw rows from memory (then released) or
        computed again, rotated into the preconditioner's basis (unless the fit did, ``rotated``) and
        preconditioned (``stored_rows``)
        ``ROTATE_ROWS`` at a time (one call per block instead of one per batch of featurize: the
        per-call cost dominated), in place where the stored rows are as wide as the raw ones (no
        second copy of the group)."""
        ids = self.groups.get(shard, [])
        rows = self.rows.pop(shard, None)
        rotate = prep.folded
        if rows is None:
            rows = self.compute(task, prep, config, shard)
        else:
            rotate = rotate - self.rotated
        pre = prep.preconditioner
        stored = rows if _stored_in_place(prep) else torch.empty(rows.shape[0], pre.dim_w, dtype=rows.dtype,
                                                                  device=rows.device)
        for i in range(0, rows.shape[0], ROTATE_ROWS):
            block = rows[i:i + ROTATE_ROWS]
            if rotate:
                block = pre.rotate(block, rotate)
            pre.stored_rows(block, prep.folded, out=stored[i:i + ROTATE_ROWS])
        return ids, stored


def _stored_in_place(prep: Prepared) -> bool:
    """Whether a stored row can overwrite its raw row (as wide: no U columns in the raw rows)."""
    return prep.preconditioner.dim_w == prep.projector.dim


def _reuses_sample(pre: Preconditioner, config: BuildConfig) -> bool:
    """Whether the statistics are the stored rows' own raw rows of a subsample (so featurize can reuse
    them): not for identity (no statistics), hessian / exact (HVPs) or Gauss-Newton pseudo-losses."""
    return pre.passes > 0 and config.preconditioner not in ("hessian", "exact") and config.fisher != "gauss-newton"


def _stats_ids(n: int, config: BuildConfig) -> list[int]:
    return _subsample(n, config.stats_examples, config.seed)


def _shard_rows(n: int, config: BuildConfig) -> int:
    return min(config.shard_rows, max(n, 1))


def _fit_preconditioner(task: MultiStageTask, prep: Prepared, config: BuildConfig, n: int,
                        show: bool | None, out: Path, report: dict[str, Any]) -> _Sample | None:
    """Statistics from a seeded subsample of ``stats_examples`` (kept in memory: bounded by its size,
    and returned for featurize to reuse; a killed build computes them again, seconds), or
    Hessian-vector products for hessian / exact (minutes on small CNNs and transformers: saved to
    ``out``/HVP_PARTIAL every HVP_CHECKPOINT_S seconds and on Ctrl-C, so a killed build resumes them;
    ``report["hvps_loaded"]``: how many rows of P H P^T an interrupted run had saved)."""
    pre = prep.preconditioner
    if config.preconditioner in ("hessian", "exact"):
        ids = list(range(n)) if config.preconditioner == "exact" else _subsample(n, config.hessian_examples,
                                                                                 config.seed)
        # the hooks' first-batch check (a weight used outside its module, an input not batch-first,
        # interacting examples) on one batch now, before the HVPs, which take much longer than it
        next(_raw_rows(task, prep, config, ids[:config.batch_size]), None)
        flat = FlatParams(prep.model, prep.projector.param_names)
        data = [move(b, prep.device, prep.dtype) for _, b in batches(task.pretrain_dataset(), config.batch_size, ids)]
        mean_loss = batched_objective(flat.loss(task.pretrain_loss), data, len(ids))
        pm = prep.projector.matrix()
        x = flat.get()
        done, save = _hvp_checkpoint(out, pm, x)
        report["hvps_loaded"] = 0 if done is None else done.shape[0]
        loaded = "" if done is None else f"; {done.shape[0]:,} loaded from the interrupted run"
        with forward_ad_errors(f"the {config.preconditioner!r} preconditioner (Hessian-vector products)"), \
                progress(pm.shape[0], f"{config.preconditioner} (HVPs over {len(ids)} examples{loaded})", unit="HVP",
                         enabled=show, initial=report["hvps_loaded"]) as advance:
            php = projected_hessian(mean_loss, x, pm, chunk=HVP_CHUNK, advance=advance, done=done,
                                    checkpoint=save, every_s=HVP_CHECKPOINT_S)
        if not torch.isfinite(php).all():
            # name the example that poisoned the Hessian (one pass over the subsample, error path only)
            for _ in _raw_rows(task, prep, config, ids):
                pass
            raise NonFiniteError("the pretraining Hessian is not finite (NaN or inf) although every loss and "
                                 "gradient is; build with --compute-dtype float64")
        pre.fit_hessian(php)
        return None
    if pre.passes == 0:
        return None
    if config.fisher == "gauss-newton":
        _fit_gauss_newton(task, prep, config, n, show)
        return None
    ids = _stats_ids(n, config)
    sample = _Sample(ids, _shard_rows(n, config))
    with progress(len(ids), "statistics", enabled=show) as advance:
        for shard in sorted(sample.groups):
            sample.rows[shard] = sample.compute(task, prep, config, shard, advance)

    def blocks():
        # each group in the blocks take() rotates it in: where the fit rotates the rows in place (ekfac's
        # second pass), a group computed again by a resumed build is rotated to bitwise the same rows
        for shard in sorted(sample.groups):
            rows = sample.rows[shard]
            for i in range(0, rows.shape[0], ROTATE_ROWS):
                yield rows[i:i + ROTATE_ROWS]

    sample.rotated = pre.fit(blocks, len(ids), rotate=frozenset(b.name for b in prep.projector.blocks if b.kronecker))
    return sample


def saved_hvp_rows(out: Path) -> tuple[int, int] | None:
    """(rows saved, k) of the HVP checkpoint in ``out`` (an interrupted hessian / exact build), None
    without a readable one."""
    try:
        with _open_h5(out / HVP_PARTIAL, "r") as f:
            rows = f["rows"]
            return (int(rows.shape[0]), int(rows.shape[1])) if rows.ndim == 2 else None
    except (OSError, KeyError, ValueError, RuntimeError, TypeError):
        return None


def _hvp_checkpoint(out: Path, pm: torch.Tensor, x: torch.Tensor
                    ) -> tuple[torch.Tensor | None, Callable[[torch.Tensor], None]]:
    """(the HVP rows an interrupted build saved, or None; a function that saves the rows so far).
    The saved rows are keyed by a fingerprint of P and of the parameters they were taken at, so rows
    of another projection or model are never reused (the folder's build.json already guards that).
    The fingerprint (a hash of P: k x d float64) is taken only when there is a file to read or write."""
    path = out / HVP_PARTIAL
    key = functools.cache(lambda: fingerprint_tensors({"p": pm, "x": x}))
    done = None
    shape = saved_hvp_rows(out) if path.exists() else None
    k = pm.shape[0]
    if shape is not None and shape[1] == k and 0 < shape[0] < k and shape[0] % HVP_CHUNK == 0:
        try:
            with _open_h5(path, "r") as f:
                if f.attrs["key"] == key():
                    done = torch.from_numpy(f["rows"][...])
        except (OSError, KeyError, ValueError, RuntimeError, TypeError):
            done = None                          # unreadable (killed mid-write is not: it is atomic)
    if done is None:
        path.unlink(missing_ok=True)

    def save(rows: torch.Tensor) -> None:
        check_free_space(out, str(path), rows.numel() * rows.element_size() + (256 << 10))
        with atomic_path(path) as tmp:
            with _open_h5(tmp, "w") as f:
                f.create_dataset("rows", data=rows.numpy(), fletcher32=True)
                f.attrs["key"] = key()
    return done, save


def _fit_gauss_newton(task: MultiStageTask, prep: Prepared, config: BuildConfig, n: int,
                      show: bool | None) -> None:
    """Statistics of the Gauss-Newton matrix (1/m) sum_b sum_r phi_br phi_br^T, phi_br = P grad L[b, r]
    for the task's pseudo-losses L = pretrain_fisher_losses [B, R], over a seeded subsample of
    m = ceil(stats_examples / R) examples (so about stats_examples rows, as the empirical statistics).
    Not the stored rows (those are at the data's targets), so featurize computes every row itself."""
    probe = move(next(iter(batches(task.pretrain_dataset(), 1, [0])))[1], prep.device, prep.dtype)
    columns = fisher_loss_columns(task.pretrain_fisher_losses, prep.model, probe, "pretrain_fisher_losses")
    r_count = len(columns)
    ids = _subsample(n, max(1, -(-config.stats_examples // r_count)), config.seed)
    rows = torch.empty(len(ids) * r_count, prep.projector.dim, dtype=prep.dtype, device=prep.device)
    with progress(len(ids) * r_count, "statistics (Gauss-Newton)", enabled=show) as advance:
        for r, loss_r in enumerate(columns):
            block = rows[r * len(ids):(r + 1) * len(ids)]
            for bids, _ in _raw_rows(task, prep, config, ids, block, fill=True, loss=loss_r):
                advance(len(bids))
    rows = rows.detach()
    prep.preconditioner.fit(lambda: (rows[i:i + 1024] for i in range(0, rows.shape[0], 1024)), len(ids))


def _load_or_fit(task: MultiStageTask, prep: Prepared, config: BuildConfig, out: Path, n: int,
                 show: bool | None, report: dict[str, Any] | None = None) -> _Sample | None:
    """The preconditioner state, saved atomically once fitted so a resumed build reuses it; returns
    the statistics subsample's rows for featurize (their groups are recomputed where not in memory).
    ``report``, if given, receives what the fit took up from an interrupted run (``hvps_loaded``)."""
    report = {} if report is None else report
    path = out / PRECOND
    pre = prep.preconditioner
    if path.exists():
        try:
            state, attrs = read_state(path)
            pre.load_state_dict(state)
            pre.damping_used = json.loads(attrs["damping_used"])
            pre.negative = json.loads(attrs.get("negative_eigenvalues", "null"))
            if pre.negative:                     # said at the fit; again
                warn_negative(pre.negative)
            (out / HVP_PARTIAL).unlink(missing_ok=True)    # killed between the two writes
            if not _reuses_sample(pre, config):
                return None
            return _Sample(_stats_ids(n, config), _shard_rows(n, config))    # rows recomputed per shard
        except (OSError, KeyError, ValueError, RuntimeError, TypeError):
            path.unlink()                        # unreadable: fit again (deterministic)
    sample = _fit_preconditioner(task, prep, config, n, show, out, report)
    state = pre.state_dict()
    check_free_space(out, str(path), sum(np.asarray(v).nbytes for v in state.values()) + (256 << 10))
    with atomic_path(path) as tmp:
        with _open_h5(tmp, "w") as f:            # checksummed metadata (superblock v2+)
            for k, v in state.items():
                f.create_dataset(k, data=v, fletcher32=True)
            f.attrs["damping_used"] = json.dumps(pre.damping_used)
            if pre.negative:
                f.attrs["negative_eigenvalues"] = json.dumps(pre.negative)
    (out / HVP_PARTIAL).unlink(missing_ok=True)
    return sample


def _file_id(path: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None when there is none: an atomic rewrite changes it."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _shard_stored_rows(task: MultiStageTask, prep: Prepared, config: BuildConfig, start: int, stop: int,
                       sample: _Sample | None, cbuf: torch.Tensor, wbuf: torch.Tensor,
                       dest: Callable[[int, int], torch.Tensor | None]) -> Iterator[tuple[int, torch.Tensor]]:
    """(first id, stored rows) of the ids [start, stop) in order, in blocks of batch_size rows (the
    last one shorter) aligned to the shard's start, each written into ``dest(first, m)`` ([m, dim_W],
    the writer's staging buffer) or, where that is None, into ``wbuf``. The subsample's rows come from
    ``sample`` (``take``), the others from a gradient pass over just them (through the projector
    rotated into the preconditioner's basis), in batches of batch_size, preconditioned as they come.

    ``cbuf`` holds two batches ([2 * batch_size, dim]; batch j in slot j % 2), so a block's computed
    rows, which span at most two consecutive batches, are all there when the later one is done; the
    block is assembled by one gather from them and one copy of its (few, consecutive) subsample rows
    into their positions. Copying the computed rows into their positions (index_copy_) instead took
    0.3 ms a block of 256 x 4096 on a 2-core machine, and the bookkeeping around it as much."""
    bsz = config.batch_size
    pre = prep.preconditioner
    ids, srows = ([], None) if sample is None else sample.take(task, prep, config,
                                                               start // sample.shard_rows)
    if not ids:
        for bids, rows in _raw_rows(task, prep, config, range(start, stop), cbuf[:bsz], rotated=True):
            out = dest(bids[0], len(bids))
            yield bids[0], pre.stored_rows(rows, prep.folded, out=wbuf[:len(bids)] if out is None else out)
        return
    size = stop - start
    dev = wbuf.device
    raw = cbuf.detach()       # (the same memory: dense-path blocks can leave autograd history on cbuf)
    ring = raw if _stored_in_place(prep) else torch.empty(2 * bsz, pre.dim_w, dtype=cbuf.dtype, device=dev)
    in_sample = torch.zeros(size, dtype=torch.bool)
    in_sample[torch.tensor(ids, dtype=torch.long) - start] = True
    computed_before = torch.cumsum(~in_sample, 0)          # computed rows at positions <= p
    sampled_before = torch.cumsum(in_sample, 0)
    # ring's row of each computed position (computed row r sits at r % (2 * bsz)); sample positions
    # gather row 0 and are overwritten
    gather = torch.where(in_sample, 0, (computed_before - 1) % (2 * bsz)).to(dev)
    ends = list(range(bsz, size, bsz)) + [size]
    c_end = [int(computed_before[e - 1]) for e in ends]     # computed rows a block needs done
    s_end = [int(sampled_before[e - 1]) for e in ends]      # subsample rows up to its end
    rest = (torch.nonzero(~in_sample).flatten() + start).tolist()
    block = 0

    def emit(done: int) -> Iterator[tuple[int, torch.Tensor]]:
        # every block whose computed rows are all done (with ``done`` computed rows so far)
        nonlocal block
        while block < len(ends) and c_end[block] <= done:
            lo, hi = block * bsz, ends[block]
            s0, s1 = (s_end[block - 1] if block else 0), s_end[block]
            c0 = c_end[block - 1] if block else 0
            out = dest(start + lo, hi - lo)
            if out is None:
                out = wbuf[:hi - lo]
            if c_end[block] == c0:                         # every row from the subsample
                out.copy_(srows[s0:s1])
            else:
                torch.index_select(ring, 0, gather[lo:hi], out=out)
                if s1 > s0:
                    local = torch.nonzero(in_sample[lo:hi]).flatten().to(dev)
                    out.index_copy_(0, local, srows[s0:s1])
            yield start + lo, out
            block += 1

    done = 0
    for j, (bids, rows) in enumerate(_raw_rows(task, prep, config, rest, cbuf, rotated=True, slots=2)):
        slot = (j % 2) * bsz
        pre.stored_rows(raw[slot:slot + len(bids)], prep.folded, out=ring[slot:slot + len(bids)])
        done += len(bids)
        yield from emit(done)
    yield from emit(done)


def _lent_buffers(shard: Any) -> Callable[[int, int], torch.Tensor | None]:
    """``dest`` for _shard_stored_rows: the shard writer's staging buffer for rows [first, first + m),
    which its next write takes without a copy (None where it lends none)."""
    def dest(first: int, m: int) -> torch.Tensor | None:
        buf = shard.buffer(first, m)
        return None if buf is None else torch.from_numpy(buf)
    return dest


def _no_buffers(first: int, m: int) -> None:
    """``dest`` for _shard_stored_rows where rows are not computed in the store's dtype on the CPU."""
    return None


def _write_rows(task: MultiStageTask, prep: Prepared, config: BuildConfig, shards: ShardedWriter,
                sample: _Sample | None, show: bool | None) -> None:
    """Stored rows s_z = [M^{-1} phi_z]_W, one gradient pass (the statistics subsample's rows are
    reused), shard by shard (resumable)."""
    pending = list(shards.pending_ranges())
    todo = sum(b - a for a, b in pending)
    if not todo:
        return
    pre = prep.preconditioner
    kron = {b.name for b in prep.projector.blocks if b.kronecker}
    rotations = {k: v for k, v in pre.eigenbases(prep.dtype, prep.device).items() if k in kron}
    prep.rotated = prep.projector.rotated(rotations) if rotations else prep.projector
    prep.folded = frozenset(rotations)
    cbuf = torch.empty(2 * config.batch_size, prep.projector.dim, dtype=prep.dtype, device=prep.device)
    wbuf = torch.empty(config.batch_size, pre.dim_w, dtype=prep.dtype, device=prep.device)
    # rows computed on the CPU in the storage dtype go straight into the writer's staging buffers
    direct = prep.device.type == "cpu" and normalize_dtype(prep.dtype) == config.dtype
    try:
        with progress(todo, "featurize", enabled=show) as advance:
            for start, stop in pending:
                with shards.shard(shards.shard_index(start)) as shard:
                    dest = _lent_buffers(shard) if direct else _no_buffers
                    for first, stored in _shard_stored_rows(task, prep, config, start, stop, sample, cbuf,
                                                            wbuf, dest):
                        shard.write(first, stored.cpu().numpy())
                        advance(stored.shape[0])
    except BaseException:
        # the previous shard's commit may still run in the background: it ends before the error
        # leaves build_index (its own error, if any, is the lesser one: the shard is recomputed)
        with contextlib.suppress(Exception):
            shards.wait_commits()
        raise
    shards.wait_commits()         # the last shard's commit (fsync, rename) ran in the background


def _data_fingerprint(task: MultiStageTask) -> str | None:
    """fingerprint_dataset of the pretraining data, or None (with a warning) when two reads of its
    sampled examples differ: random augmentation not drawn from the seeded global generators would
    otherwise make every resume and attach refuse it."""
    data = task.pretrain_dataset()
    fp = fingerprint_dataset(data)
    if fingerprint_dataset(data) != fp:
        warn_user("the pretraining dataset returns different examples when read twice (random "
                  "augmentation?), so its fingerprint is not recorded: resuming this build or attaching "
                  "a task to the index cannot check that its data are the same")
        return None
    return fp


#: identity keys (top level, and in "fingerprints") that older versions did not record: a build or
#: index without them is compared without them (its rows may be the same)
_LATER_KEYS = ("data", "pretrain_weight_decay")
_LATER_FINGERPRINTS = ("buffers",)


def _identity_part(identity: dict, previous: dict) -> dict:
    """An identity without what older versions recorded and this one does not (config.factory), and
    without what this one records and ``previous`` (an older version's) does not."""
    d = {k: v for k, v in identity.items() if not (k in _LATER_KEYS and k not in previous)}
    if isinstance(d.get("config"), dict):
        d["config"] = {k: v for k, v in d["config"].items() if k != "factory"}
    old_fps = previous.get("fingerprints")
    if isinstance(d.get("fingerprints"), dict) and isinstance(old_fps, dict):
        d["fingerprints"] = {k: v for k, v in d["fingerprints"].items()
                             if not (k in _LATER_FINGERPRINTS and k not in old_fps)}
    return d


def _adopt_older_identity(out: Path, identity: dict) -> dict:
    """The identity ``out`` records when it names the same rows as ``identity`` in an older form, so
    that build or index is reused or resumed as before (its rows are the same) instead of refused
    as another build: from before the data, the buffers or the weight decay were recorded (no "data",
    "fingerprints.buffers", "pretrain_weight_decay"), or before the search factory left the identity
    (config.factory). Else ``identity``."""
    for name in (MANIFEST, BUILD_FILE):
        if (out / name).is_file():
            try:
                previous = read_json(out / name, "the index's " + name).get("identity")
            except (CorruptIndexError, AttributeError):
                return identity                       # _check_out_dir reports it
            if isinstance(previous, dict):
                if _identity_part(previous, previous) == _identity_part(identity, previous):
                    return previous
            return identity
    return identity


def _former_default_damping(out: Path, config: BuildConfig, identity: dict) -> tuple[BuildConfig, dict] | None:
    """(config, identity) with hessian's former default damping (1e-3, also over a subsample) when
    ``out`` holds this build made with it: a rerun without ``--damping`` then resumes or reuses it,
    with a warning, instead of refusing it as another config. None otherwise."""
    older = config.with_(damping=HESSIAN_DAMPING)
    candidate = {**identity, "config": older.identity_fields()}
    if _adopt_older_identity(out, candidate) is candidate:
        return None
    warn_user(f"{out} was built with damping {HESSIAN_DAMPING:g}, hessian's default over a subsample before "
              f"it became {config.damping:g} (README, 'Why auto'); it is kept: rebuild with --overwrite (and "
              f"no --damping) for the new default")
    return older, candidate


def _faiss_name(manifest: dict) -> str | None:
    """The file of the index's search structure named by its manifest (InfluenceIndex.open checks the
    name is one of FAISS_NAMES); faiss.index in manifests from before the name could change."""
    return (manifest.get("files") or {}).get("faiss", FAISS)


def _switch_search_index(out: Path, config: BuildConfig, rebuild: bool = False) -> bool:
    """Give the complete index in ``out`` the search structure of ``config.factory`` over its rows
    (the rows, preconditioner and attached operators stay); False when it already has it (unless
    ``rebuild``: a damaged one is built again). The new faiss file is written under the name the
    manifest does not use, then the manifest is replaced (atomically, the one switch), then the old
    file is removed."""
    from .index import _check_manifest, open_checked_rows  # (index.py imports this module)
    manifest = read_json(out / MANIFEST, "the index's " + MANIFEST)
    _check_manifest(out / MANIFEST, manifest)               # its schema and file names, before any file goes
    old = manifest["config"]["factory"]
    old_file = None if built_at_open(old) else _faiss_name(manifest)
    if old == config.factory and not rebuild:
        return False
    # what a crash or a killed save left: the faiss name the manifest does not use, temp files
    cleanup_stale_tmp(out)
    for name in FAISS_NAMES:
        if name != old_file:
            with contextlib.suppress(FileNotFoundError):
                (out / name).unlink()
    t0 = time.perf_counter()
    new_file = None
    checksums = {k: v for k, v in manifest.get("checksums", {}).items() if k != "faiss"}
    # the rows' checksum (and rows.h5 against the manifest) checked before HDF5 reads them
    with open_checked_rows(out, manifest, search=False) as store:
        if not built_at_open(config.factory):
            new_file = FAISS_NAMES[1] if old_file == FAISS_NAMES[0] else FAISS_NAMES[0]
            index = SearchIndex.create(store.k, config.factory)
            index.train_and_add(lambda: (b for _, b in store.iter_blocks()), store.n, seed=config.seed)
            index.save(out / new_file)
            checksums["faiss"] = file_sha256(out / new_file)
    manifest["config"] = {**manifest["config"], "factory": config.factory}
    manifest["files"] = {**manifest.get("files", {}), "faiss": new_file}
    manifest["checksums"] = checksums
    manifest["timings"] = {**manifest.get("timings", {}), "search_rebuild_s": time.perf_counter() - t0}
    manifest["search_rebuilt_from"] = old
    write_json_atomic(out / MANIFEST, manifest)
    if old_file is not None and old_file != new_file:
        with contextlib.suppress(FileNotFoundError):
            (out / old_file).unlink()
    return True


@python_api
def build_index(task: MultiStageTask, out_dir: str | Path, config: BuildConfig | None = None,
                overwrite: bool = False, progress_bar: bool | None = None) -> Path:
    """Build (or resume, or reuse) the pretraining index of ``task`` in ``out_dir``; return its path.

    Stored row s_z = [M^{-1} P grad g(z)]_W; with a query q_t = P_W v_t the influence is
    I(z, x_t) ~ - q_t . s_z (negative: helpful; positive: harmful).
    """
    require_shared_parameters(task, finetuned=False)
    damping_unset = (config or BuildConfig()).damping is None
    config = resolve_config(task, config or BuildConfig())
    if config.preconditioner == "exact" and config.damping:
        # (a check here, not in BuildConfig: manifests of earlier builds with a damping stay readable)
        raise ConfigError(f"the exact preconditioner has no damping (its rows reproduce exact_influence), got "
                          f"damping={config.damping!r}; drop it, or use preconditioner 'hessian' for a damped "
                          f"exact Hessian")
    keep_freed_memory()                  # glibc: reuse freed tensor memory (see msif_index.allocator)
    out = Path(out_dir)
    n = len(task.pretrain_dataset())
    if n == 0:
        raise TaskError("the task's pretrain_dataset() is empty: there is nothing to index")
    fps = pretrained_fingerprints(task, task.pretrained_model())
    # the pretraining data too (its length and a fixed sample of examples): a build is not resumed,
    # reused or queried with other data under the same ids
    identity = {"config": config.identity_fields(), "fingerprints": fps, "n": n,
                "data": _data_fingerprint(task),
                # part of G (H_G's + wd I): the rows of every preconditioner but identity depend on it
                "pretrain_weight_decay": float(task.pretrain_weight_decay)}
    # everything that can be checked without writing is checked before the folder is touched (so a
    # bad --device or --factory with --overwrite leaves the existing index as it was)
    prep = prepare(task, config)
    pre = prep.preconditioner
    if task.dense_modules:                # another projection plan, other rows (absent: as before)
        identity["dense_modules"] = sorted(task.dense_modules)
    if pre.row_basis != "parameter":
        # kfac / ekfac rows in the eigenbasis: a build or index from a version that stored them in the
        # parameter basis (no key) is not resumed or reused
        identity["row_basis"] = pre.row_basis
    if damping_unset and config.preconditioner == "hessian" and config.damping != HESSIAN_DAMPING:
        older = _former_default_damping(out, config, identity)
        if older is not None:
            config, identity = older
            prep = prepare(task, config)
            pre = prep.preconditioner
    SearchIndex.create(pre.dim_w, config.factory)    # a bad factory string fails now, not after the pass
    if n < min_train_rows(config.factory):            # ... and one these rows cannot train
        raise ConfigError(f"factory {config.factory!r} needs at least {min_train_rows(config.factory)} rows to "
                          f"train, the pretraining set has {n}; use fewer lists (e.g. 'IVF{fitting_nlist(n)},Flat') "
                          f"or 'Flat'")
    with folder_lock(out):                            # one writer per folder (BusyError otherwise)
        return _build_locked(task, config, out, prep, identity, fps, n, overwrite, progress_bar)


def _build_locked(task: MultiStageTask, config: BuildConfig, out: Path, prep: Prepared, identity: dict,
                  fps: dict[str, str], n: int, overwrite: bool, progress_bar: bool | None) -> Path:
    """build_index once the config, task and factory are checked, holding the folder's write lock."""
    pre = prep.preconditioner
    _finish_interrupted_swap(out)
    identity = _adopt_older_identity(out, identity)
    probe = pretrain_loss_probe(task, task.pretrained_model())
    _warn_if_loss_changed(out, identity, probe)
    final = out
    dropped = _attached_operators_replaced(out, identity) if overwrite else 0
    if _replaces_complete_index(out, identity, overwrite):
        out = _staging(final)                         # the old index answers until the new one is done
    _check_out_dir(out, identity, overwrite)
    if (out / MANIFEST).exists():
        if out != final:
            _swap_in(out, final)                      # completed earlier, not yet swapped in
            _switch_search_index(final, config)       # ... perhaps with another factory than this one
            return final
        damage = index_damage(out) if overwrite else None
        if damage is None:
            search_damage = _search_damage(out) if overwrite else None
            if search_damage is not None:
                # only the search structure is damaged (or missing): built again over the rows
                warn_user(f"rebuilding the search index of {out} over its rows ({search_damage})")
            # already built with these rows; another --factory rebuilds only the search structure
            _switch_search_index(out, config, rebuild=search_damage is not None)
            return final
        # the same build, damaged (what every corruption error tells to rebuild with --overwrite):
        # built again in place, its attached operators kept (they do not depend on the rows)
        warn_user(f"rebuilding the damaged index in {out} ({damage})")
        _clear(out, keep={OPERATORS})
    out.mkdir(parents=True, exist_ok=True)
    cleanup_stale_tmp(out)
    timings: dict[str, float] = {}

    def shard_writer() -> ShardedWriter:
        return ShardedWriter(out / SHARDS, n, pre.dim_w, config.dtype, _shard_rows(n, config),
                             attrs={"identity": identity}, background_commit=True,
                             discard_mismatched=overwrite)
    shards = None
    if (out / SHARDS).is_dir():
        # shards on disk are checked first (another shard_rows refuses without --overwrite, which
        # recomputes them), so that a refused rerun leaves build.json describing the shards there
        # (and a new build creates shards/ only after build.json: a kill between the two must not
        # leave a folder that looks like a partial index without its build.json)
        shards = shard_writer()
        shards.completed_shards()                    # (checked once here; the pass reuses the result)
    write_json_atomic(out / BUILD_FILE, {"identity": identity, "config": config.to_dict(),
                                         "projector": prep.projector.config(), "version": __version__,
                                         "pretrain_loss_probe": probe})
    if shards is None:
        shards = shard_writer()
    # the rows (and a dense preconditioner's k x k_W float64 inverse) must fit before the statistics
    # and gradients are computed; each file checks again before it is written
    todo = sum(b - a for a, b in shards.pending_ranges())
    need = shards.pending_bytes()
    if isinstance(pre, DenseInverse) and not (out / PRECOND).exists():
        need += pre.dim * pre.dim_w * 8
    check_free_space(out, f"the rows of {todo:,} examples", need)
    saved = _file_id(out / PRECOND)            # an earlier, interrupted run's fitted state, if any
    t0 = time.perf_counter()
    fit_report: dict[str, Any] = {}
    sample = _load_or_fit(task, prep, config, out, n, progress_bar, fit_report)
    timings["statistics_s"] = time.perf_counter() - t0
    # what this run did where an earlier, interrupted one left work (the timings are this run's only)
    resumed = {"rows_computed": todo, "preconditioner_loaded": saved is not None and _file_id(out / PRECOND) == saved,
               "hvps_loaded": fit_report.get("hvps_loaded", 0)}
    t0 = time.perf_counter()
    _write_rows(task, prep, config, shards, sample, progress_bar)
    del sample
    timings["featurize_s"] = time.perf_counter() - t0
    summary = pre.summary()
    link_shards(shards, out / ROWS, attrs={"identity": identity, "config": config.to_dict(),
                                           "projector": prep.projector.config(), "preconditioner": summary})
    t0 = time.perf_counter()
    if not built_at_open(config.factory):            # Flat and SVD<r> are built from the rows when opened
        with RowStore.open(out / ROWS) as store:
            index = SearchIndex.create(store.k, config.factory)
            index.train_and_add(lambda: (b for _, b in store.iter_blocks()), store.n, seed=config.seed)
            index.save(out / FAISS)
    timings["index_s"] = time.perf_counter() - t0
    # rows.h5 is the small file that maps the shards (virtual datasets): its checksum is verified
    # before HDF5 parses it (HDF5 can loop forever on some damaged metadata bytes); the rows
    # themselves carry a 64-bit hash each, verified on every read (msif_index.store.row_hash)
    checksums = {"rows": file_sha256(out / ROWS), "preconditioner": file_sha256(out / PRECOND)}
    if not built_at_open(config.factory):
        checksums["faiss"] = file_sha256(out / FAISS)
    manifest = {
        "schema": 1, "version": __version__, "identity": identity, "config": config.to_dict(),
        "n": n, "k": pre.dim_w, "k_raw": prep.projector.dim,
        "fingerprints": fps, "fingerprint_short": {k: short(v) for k, v in fps.items()},
        "w_names": prep.w_names, "u_names": prep.u_names,
        "projector": prep.projector.config(), "preconditioner": summary, "timings": timings,
        "resumed": (resumed if resumed["rows_computed"] < n or resumed["preconditioner_loaded"]
                    or resumed["hvps_loaded"] else None),
        "files": {"rows": ROWS, "shards": SHARDS, "preconditioner": PRECOND,
                  "faiss": None if built_at_open(config.factory) else FAISS},
        "checksums": checksums,
        "pretrain_loss_probe": probe,
        "sign_convention": "I(z, x_t) = -q_t . s_z; negative: helpful, positive: harmful",
    }
    write_json_atomic(out / MANIFEST, manifest)
    if out != final:
        _swap_in(out, final)
    if dropped:
        warn_user(f"the replaced index in {final} had {dropped} attached finetuned model(s); their operators "
                  f"belong to the old index and were removed: attach them again (msif build-index attaches the "
                  f"task's own finetuned model right after, unless --no-attach)")
    return final

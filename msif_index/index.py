"""InfluenceIndex: open a built index, attach finetuned models, answer queries.

    q_t = P_W v_t   (operator.py: frozen or proximal, through the attached finetuned model)
    I(z, x_t) ~ - q_t . s_z      (s_z: the stored row of pretraining example z)
Most helpful = most negative I = largest q_t . s_z; most harmful = largest (-q_t) . s_z.
Sign convention: I < 0 helpful (proponent), I > 0 harmful (opponent), in units of d l(x_t) / d eps.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import json
import operator
import threading
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .atomic import is_disk_full, read_json
from .build import (BUILD_FILE, FAISS_NAMES, MANIFEST, OPERATORS, PRECOND, ROWS, _faiss_name, file_sha256,
                    loss_probe_change, loss_values, pretrain_loss_probe, pretrained_fingerprints,
                    resolve_compute_dtype)
from .data import BATCH_FORM, batch_size_of, move
from .errors import (REBUILD, ConfigError, CorruptIndexError, DiskFullError, IndexMismatchError, NonFiniteError,
                     ShapeError, exception_text, first_line, python_api)
from .fingerprint import fingerprint_dataset, fingerprint_tensors, short
from .gradients import GradientProjector
from .gradients.blocks import Block, plan_blocks
from .head_curvature import CG_ITERS, block_permutation, resolve_h_tt
from .hugepages import packed_on_huge_pages
from .lock import lock_holder, writer_text
from .operator import KRONECKER_DAMPING, FinetuneOperator, compute_operator, warn_not_a_minimum
from .preconditioners import negative_summary, read_state, rotate_blocks, stored_eigenbases
from .search import SearchIndex, built_at_open
from .store import RowStore
from .task import (MultiStageTask, frozen_buffer_problem, has_finetune_fisher_losses,
                   require_shared_parameters, split_parameters, task_code_location, user_raise_site,
                   validate_task)
from .warn import warn_user

DIRECTIONS = ("helpful", "harmful")


@dataclass
class QueryResult:
    """Top pretraining examples per test point: ``ids`` [Q, k] int64, ``scores`` [Q, k] = I(z, x_t).

    helpful: most negative I first; harmful: most positive I first. k is capped at n; -1 ids (score
    NaN) pad the rare rows where an approximate index finds fewer than k.
    """

    ids: np.ndarray
    scores: np.ndarray
    direction: str
    finetuned: str
    test_ids: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        scores = [[None if np.isnan(v) else float(v) for v in row] for row in self.scores]   # JSON has no NaN
        return {"direction": self.direction, "finetuned": self.finetuned, "test_ids": self.test_ids,
                "ids": self.ids.tolist(), "scores": scores}


@dataclass
class _Attached:
    task: MultiStageTask
    model: nn.Module
    projector: GradientProjector     # P_W on the finetuned model
    operator: FinetuneOperator
    query: "_QueryPath"
    lock: threading.Lock = field(default_factory=threading.Lock)


@dataclass
class _QueryPath:
    """One backward pass per query: a projector over (W, theta) whose W blocks are P_W and whose
    theta blocks are unprojected, so a row is [P_W grad_W l | grad_theta l (block layout)].

    ``b_rows`` is B with its columns permuted into the theta blocks' layout, ``c`` is C (or None),
    both in the projector's dtype:  q_t = (P_W g_W - g_t B^T) C^T.
    """

    projector: GradientProjector
    k_w: int
    b_rows: torch.Tensor             # [k_W, d_theta]
    c: torch.Tensor | None           # [k_W, k_W]
    #: W blocks the projector does not rotate into the stored rows' basis (dense blocks of an
    #: "eigen" row basis), rotated after the product, with their (Q_S, Q_A)
    late: tuple[list[Block], list[tuple[torch.Tensor, torch.Tensor]]] | None = None

    @classmethod
    def make(cls, model: nn.Module, w_proj: GradientProjector, theta_names: list[str],
             op: FinetuneOperator, bases: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
             dense_modules: list[str] | tuple[str, ...] = ()) -> "_QueryPath":
        """``bases``: (Q_S, Q_A) per W block when the stored rows are in the eigenbasis ("eigen"):
        then q comes out rotated alike, R q, by a rotated projector, R B and R C R^T (the rotation
        costs nothing per query except for dense W blocks)."""
        dtype = w_proj.dtype
        modules = dict(model.named_modules())
        theta_blocks = plan_blocks(model, theta_names, None, dense_modules=[m for m in dense_modules if m in modules])
        blocks = list(w_proj.blocks) + [replace(b, offset=b.offset + w_proj.dim) for b in theta_blocks]
        proj = GradientProjector.from_blocks(model, list(w_proj.param_names) + list(theta_names), blocks,
                                             seed=w_proj.seed, dtype=dtype)
        perm = block_permutation(model, theta_names, theta_blocks)
        b_rows = op.b[:, perm].to(dtype).contiguous()
        c = None if op.c is None else op.c.to(dtype).contiguous()
        late = None
        if bases is not None:
            w_blocks = list(w_proj.blocks)
            kron = [i for i, b in enumerate(w_blocks) if b.kronecker]
            dense = [i for i, b in enumerate(w_blocks) if not b.kronecker]
            proj = proj.rotated({w_blocks[i].name: bases[i] for i in kron})
            b_rows = rotate_blocks(b_rows.T, [w_blocks[i] for i in kron], [bases[i] for i in kron]).T.contiguous()
            if c is not None:                                   # R C R^T
                c = rotate_blocks(rotate_blocks(c, w_blocks, bases).T, w_blocks, bases).T.contiguous()
            if dense:
                late = ([w_blocks[i] for i in dense], [bases[i] for i in dense])
        return cls(proj, w_proj.dim, b_rows, c, late)

    def vectors(self, measurement, batch) -> torch.Tensor:
        # finiteness is checked once, on q (query_vectors), not on the losses and rows
        rows = self.projector.project_batch(measurement, batch, check_finite=False)
        q = torch.addmm(rows[:, :self.k_w], rows[:, self.k_w:], self.b_rows.T, alpha=-1.0)
        if self.late is not None:
            q = rotate_blocks(q, *self.late)
        return q if self.c is None else q @ self.c.T


class InfluenceIndex:
    """A built pretraining index (``msif build-index``) plus the finetuned models attached to it."""

    def __init__(self, path: Path, manifest: dict, store: RowStore, search: SearchIndex,
                 huge_pages: bool = False):
        self.path = path
        self.huge_pages = huge_pages
        self.manifest = manifest
        self.store = store
        self.search_index = search
        self._attached: dict[str, _Attached] = {}
        self._default: str | None = None
        #: one lock per finetuned-model key: two threads attaching one model compute its operator once
        self._attach_locks: dict[str, threading.Lock] = {}
        self._attach_guard = threading.Lock()
        self._closed = False

    # -- opening ---------------------------------------------------------------------------------
    @classmethod
    @python_api
    def open(cls, path: str | Path, device: str = "auto", huge_pages: bool = True) -> "InfluenceIndex":
        """Open an index folder; the FAISS index moves to the GPU when faiss sees one (device='auto').

        ``huge_pages``: back what a CPU query reads (search rows, then each attached model and its
        operator) with transparent huge pages (msif_index.hugepages): faster queries for a one-time
        cost at open (0.2-1.5 s at n = 100k). Pass False in a process that answers a few queries."""
        p = Path(path)
        if not (p / MANIFEST).exists():
            writer = lock_holder(p)
            if writer is not None:
                raise CorruptIndexError(f"the index in {p} is still being built ({writer_text(writer)}); "
                                        f"wait for that build to finish")
            if (p / BUILD_FILE).exists():
                raise CorruptIndexError(f"the build in {p} did not finish; rerun the same msif build-index "
                                        f"command to resume it")
            raise CorruptIndexError(f"no msif index in {p} (no {MANIFEST}); build one with msif build-index")
        manifest = read_json(p / MANIFEST, "the index manifest")
        for attempt in range(4):
            # a build switching the search structure (another --factory) meanwhile replaces the
            # manifest and removes the old faiss file: read again, and open what the new one names
            try:
                store, search = _open_parts(p, manifest, device)
            except CorruptIndexError:
                again = read_json(p / MANIFEST, "the index manifest")
                if again == manifest or attempt == 3:
                    raise
                manifest = again
                continue
            try:
                again = read_json(p / MANIFEST, "the index manifest")
            except BaseException:
                store.close()
                raise
            if again == manifest:
                break
            store.close()                        # switched while loading: the pair may not match
            if attempt == 3:
                raise CorruptIndexError(f"the index in {p} kept changing while it was opened (a build "
                                        f"switching its search index?); open it again")
            manifest = again
        if huge_pages:
            search.use_huge_pages()
        index = cls(p, manifest, store, search, huge_pages)
        text = _negative_text(manifest)
        if text:                            # said at the build; again to whoever queries the index
            try:
                warn_user(f"{p}: {text}")
            except BaseException:           # warnings raised as errors (-W error): nothing left open
                index.close()
                raise
        return index

    @property
    def n(self) -> int:
        return self.store.n

    @property
    def k(self) -> int:
        return self.store.k

    def close(self) -> None:
        """Close the row store; every later attach or query is refused (ConfigError, one line)."""
        self._closed = True
        self.store.close()

    def _require_open(self) -> None:
        if self._closed:
            raise ConfigError(f"the index {self.path} is closed (close(), or its with block ended); open it again "
                              f"with InfluenceIndex.open(path)")

    def __enter__(self) -> "InfluenceIndex":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- attaching -------------------------------------------------------------------------------
    def check_pretrained(self, task: MultiStageTask) -> None:
        """IndexMismatchError unless the task's pretrained W and U, and its pretraining dataset (length and
        a fixed sample of examples, ``fingerprint_dataset``), are the ones the index was built from."""
        pretrained = task.pretrained_model()
        fps = pretrained_fingerprints(task, pretrained)
        want = self.manifest["fingerprints"]
        built_w = self.manifest.get("w_names")
        w_now = split_parameters(task, pretrained)[0]
        if isinstance(built_w, list) and sorted(built_w) != sorted(w_now):
            gone, new = sorted(set(built_w) - set(w_now)), sorted(set(w_now) - set(built_w))
            moved = "; ".join(part for part in (f"no longer in W: {gone[:4]}" if gone else "",
                                                f"new in W: {new[:4]}" if new else "") if part)
            raise IndexMismatchError(
                f"the task's shared_parameters (W) are not the ones this index was built with ({moved}); "
                f"list the same W, or {REBUILD}")
        for part in ("W", "U", "buffers"):
            if part in want and fps[part] != want[part]:     # (buffers: absent in indexes built before them)
                what = (f"{part} ({short(fps[part])}) is not the one" if part != "buffers" else
                        f"model's buffers ({short(fps[part])}: batch norm running statistics, ...) are not the ones")
                raise IndexMismatchError(
                    f"the task's pretrained {what} this index was built from ({short(want[part])}); use the "
                    f"matching pretrained model or {REBUILD}")
        wd = self.manifest["identity"].get("pretrain_weight_decay")      # absent in indexes built before it
        if wd is not None and float(task.pretrain_weight_decay) != wd:
            raise IndexMismatchError(
                f"the task's pretrain_weight_decay is {task.pretrain_weight_decay:g} but this index was built with "
                f"{wd:g} (part of the pretraining objective, so of its Hessian and the stored rows); use the "
                f"weight decay it was built with or {REBUILD}")
        if len(task.pretrain_dataset()) != self.n:
            raise IndexMismatchError(f"the task has {len(task.pretrain_dataset())} pretraining examples, "
                                     f"the index {self.n}; {REBUILD} for this dataset")
        want_data = self.manifest["identity"].get("data")        # absent in indexes built before it
        if want_data is not None:
            data = fingerprint_dataset(task.pretrain_dataset())
            if data != want_data:
                raise IndexMismatchError(
                    f"the task's pretraining dataset ({short(data)}) is not the one this index was built from "
                    f"({short(want_data)}: its length and a fixed sample of examples differ); the index's ids "
                    f"would name other examples: use the dataset it was built from or {REBUILD}")
        # the same model and data: is it the same loss? (the rows depend on it; no fingerprint covers it)
        change = loss_probe_change(self.manifest.get("pretrain_loss_probe"),
                                   pretrain_loss_probe(task, task.pretrained_model()))
        if change:
            warn_user(f"the task's pretrain_loss gives other values than when {self.path} was built ({change}); "
                      f"the index's rows are the old loss's (or the first pretraining examples changed): if "
                      f"that was on purpose, {REBUILD}")

    def _w_blocks(self) -> list[Block]:
        """The W blocks of the projection, with their offsets in a stored row (q_t's layout)."""
        w_names = set(self.manifest["w_names"])
        blocks, off = [], 0
        for bd in self.manifest["projector"]["blocks"]:
            b = Block(**{**bd, "params": tuple(bd["params"])})
            if set(b.params) <= w_names:
                blocks.append(replace(b, offset=off))
                off += b.dim
        return blocks

    def _w_projector(self, model: nn.Module, dtype: torch.dtype) -> GradientProjector:
        blocks = self._w_blocks()
        names = [n for b in blocks for n in b.params]
        order = {n: i for i, n in enumerate(self.manifest["w_names"])}
        names.sort(key=order.__getitem__)
        return GradientProjector.from_blocks(model, names, blocks, seed=self.manifest["projector"]["seed"], dtype=dtype)

    @property
    def row_basis(self) -> str:
        """The stored rows' basis: "parameter" ([M^{-1} phi]_W) or "eigen" (kfac / ekfac: each W block
        rotated into the preconditioner's eigenbasis; ``to_row_basis`` maps a q_t there)."""
        return self.manifest["preconditioner"].get("row_basis", "parameter")

    def _eigenbases(self, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """(Q_S, Q_A) per W block of an "eigen" row basis (from preconditioner.h5), else None."""
        if self.row_basis != "eigen":
            return None
        path = self.path / PRECOND
        check_checksum(path, self.manifest, "preconditioner")
        try:
            return stored_eigenbases(read_state(path)[0], len(self._w_blocks()), dtype)
        except (OSError, KeyError, ValueError, RuntimeError) as e:
            raise CorruptIndexError(f"{path} is missing or damaged ({first_line(e)}); "
                                    f"rebuild the index with --overwrite") from None

    def to_row_basis(self, vectors: np.ndarray | torch.Tensor) -> np.ndarray:
        """Vectors q = P_W v [Q, k] in the parameter basis -> the stored rows' basis (``row_basis``),
        so that q . s_z is the influence: unchanged for "parameter", rotated per W block for "eigen".
        ``query_vectors`` already returns this basis."""
        q = torch.as_tensor(np.asarray(vectors, dtype=np.float64))
        if q.ndim != 2 or q.shape[1] != self.k:
            raise ShapeError(f"vectors must have shape [Q, {self.k}], got {tuple(q.shape)}")
        bases = self._eigenbases(torch.float64)
        return q.numpy() if bases is None else rotate_blocks(q, self._w_blocks(), bases).numpy()

    @python_api
    def attach(self, task: MultiStageTask, finetuned: nn.Module | None = None, batch_size: int = 256,
               progress_bar: bool | None = None, validate: bool = True, h_tt: str = "auto",
               damping: float | None = None, cg_iters: int | None = None, label: str | None = None) -> str:
        """Attach a finetuned model (default: the task's); returns its key. Computed once, then cached
        under ``operators/`` keyed by a fingerprint of the finetuned model, the finetuning style and
        the H_tt method. ``label``: what ``msif info`` shows beside the key (default: the task's
        class name; the command line passes FILE.py:NAME), recorded when the operator is computed.

        ``h_tt``: 'auto' (exact dense H_tt up to 8192 head parameters, ekfac beyond), 'dense', 'kfac'
        or 'ekfac' (msif_index.head_curvature); ``damping``: its relative damping (default 0 for
        dense, 1e-3 for kfac / ekfac); ``cg_iters``: CG steps with exact HVPs that refine kfac /
        ekfac (default 5)."""
        self._require_open()
        if validate:
            validate_task(task)
        else:
            require_shared_parameters(task)
        if cg_iters is not None and (isinstance(cg_iters, bool) or not isinstance(cg_iters, int) or cg_iters < 0):
            raise ConfigError(f"cg_iters must be an integer >= 0, got {cg_iters!r}")
        if damping is not None and (isinstance(damping, bool) or not isinstance(damping, (int, float))
                                    or not np.isfinite(damping) or damping < 0):
            raise ConfigError(f"damping must be a finite number >= 0 (relative to H_tt's mean eigenvalue), "
                              f"got {damping!r}")
        resolve_h_tt(h_tt, 0)                    # an unknown h_tt fails before any work
        self.check_pretrained(task)
        source = finetuned if finetuned is not None else task.finetuned_model()
        params = dict(source.named_parameters())
        missing = [n for n in task.shared_parameters if n not in params]
        if missing:
            raise IndexMismatchError(f"the finetuned model has no parameter {missing[0]!r} of the task's "
                                     f"shared_parameters (W); pass the model finetuned from this pretraining")
        w, theta = split_parameters(task, source)
        if task.finetuning == "frozen":
            fw = fingerprint_tensors({n: params[n] for n in w})
            if fw != self.manifest["fingerprints"]["W"]:
                raise IndexMismatchError("finetuning is 'frozen' but the finetuned model's W differs from the "
                                         "pretrained W*; set finetuning = 'proximal' (with alpha) or use the "
                                         "frozen finetuned model")
            problem = frozen_buffer_problem(task, task.pretrained_model(), source)
            if problem:
                raise IndexMismatchError(f"finetuning is 'frozen' but {problem}")
        dtype = resolve_compute_dtype(self.manifest["config"].get("compute_dtype", "auto"), source)
        # the finetune side (attach, query vectors) runs on a CPU copy of the model, whatever device
        # the task's model is on; the search index uses the GPU when there is one
        model = copy.deepcopy(source).to(device="cpu", dtype=dtype)
        model.eval()
        ident = {"model": fingerprint_tensors({n: params[n] for n in w + theta}),
                 "finetuning": task.finetuning, "alpha": float(task.alpha) if task.finetuning == "proximal" else None,
                 "finetune_n": len(task.finetune_dataset()), "wd": float(task.finetune_weight_decay),
                 "h_tt": resolve_h_tt(h_tt, sum(params[n].numel() for n in theta)),
                 # B depends on the finetuning data and loss too: their fingerprints, so that another
                 # dataset or loss with the same model is not answered with a cached operator
                 "finetune_data": _stable_fingerprint(task.finetune_dataset()),
                 "finetune_loss": _loss_probe(task, model)}
        # defaults spelled out, so an omitted option and its default value share one operator
        dense = ident["h_tt"] == "dense"
        ident["damping"] = float((0.0 if dense else KRONECKER_DAMPING) if damping is None else damping)
        if not dense:
            ident["h_tt_gauss_newton"] = has_finetune_fisher_losses(task)
            ident["cg_iters"] = CG_ITERS if cg_iters is None else int(cg_iters)
        key = hashlib.sha256(repr(sorted(ident.items())).encode()).hexdigest()[:16]
        projector = self._w_projector(model, dtype)
        with self._attach_guard:
            key_lock = self._attach_locks.setdefault(key, threading.Lock())
        with key_lock:
            op = self._load_or_compute_operator(task, model, projector, key, ident, theta,
                                                sum(params[n].numel() for n in theta), batch_size, damping,
                                                cg_iters, progress_bar,
                                                type(task).__name__ if label is None else str(label))
        query = _QueryPath.make(model, projector, theta, op, self._eigenbases(dtype), task.dense_modules)
        if self.huge_pages:
            _pack_on_huge_pages(model, query)
        self._attached[key] = _Attached(task, model, projector, op, query)
        self._default = key
        return key

    def _load_or_compute_operator(self, task, model, projector, key, ident, theta, d_theta, batch_size, damping,
                                  cg_iters, progress_bar, label: str = "") -> FinetuneOperator:
        """The operator of ``key``: the one this index already holds for it (another thread attached
        the same model), the cached file, or computed and cached (called under the key's lock)."""
        op_path = self.path / OPERATORS / f"{key}.h5"
        projection = _projection_fingerprint(self.manifest)
        held = self._attached.get(key)
        if held is not None and held.operator.projection == projection:
            return held.operator
        op = None
        if op_path.exists():
            # the key covers the model, data and settings but not the index's projection: a file
            # copied from another index under the same name, or a damaged one, is computed again
            try:
                op = FinetuneOperator.load(op_path)
                why = _operator_misfit(op, projection, projector.dim, d_theta, theta, task.finetuning)
            except CorruptIndexError as e:
                why = f"unreadable: {getattr(e, 'reason', 'damaged')}"
            if why:
                warn_user(f"the finetune operator {op_path} does not fit this index ({why}); computing it "
                          f"again")
                op = None
            else:
                warn_not_a_minimum(op.info)          # said when it was computed; again to this process
        if op is None:
            op = compute_operator(task, model, projector, key, batch_size=batch_size, damping=damping,
                                  h_tt=ident["h_tt"], cg_iters=cg_iters, show=progress_bar).stored_in(projector.dtype)
            op.projection = projection
            op.label = label
            try:
                op_path.parent.mkdir(exist_ok=True)
                op.save(op_path)
            except DiskFullError as e:
                # computing it took a while: the index still answers with it, from memory
                warn_user(f"cannot cache the finetune operator in {op_path.parent} ({str(e).split(';')[0]}); "
                          f"it is kept in memory and computed again by the next process")
            except OSError as e:
                if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOENT) and not is_disk_full(e):
                    raise
                # a shared read-only index still answers (ENOENT: the folder was swapped meanwhile by
                # an --overwrite rebuild, which takes no operators along): the operator lives in
                # this process only
                warn_user(f"cannot cache the finetune operator in {op_path.parent} ({e.strerror}); it is "
                          f"kept in memory and computed again by the next process")
        return op

    @property
    def attached(self) -> list[str]:
        return list(self._attached)

    def operator(self, finetuned: str | None = None) -> FinetuneOperator:
        """The finetune-side operator of an attached model (default: the last attached, with a warning
        when several are): B, C and ``info`` (how H_tt was formed, CG residual, damping, ...)."""
        return self._get(finetuned).operator

    def _key(self, finetuned: str | None) -> str | None:
        """The attached model's key ``finetuned`` names; None names the last attached, with a warning
        when several are attached (an omitted ``finetuned=`` is then most likely a slip)."""
        if finetuned is not None:
            return finetuned
        key = self._default                      # read once: an attach from another thread moves it
        if len(self._attached) > 1:
            warn_user(f"{len(self._attached)} finetuned models are attached to this index and finetuned= is "
                      f"omitted: using the last attached, {key}; pass finetuned=KEY (what attach returned) "
                      f"to choose")
        return key

    def _get(self, finetuned: str | None) -> _Attached:
        self._require_open()
        if not self._attached:
            what = (f"finetuned model {finetuned!r} is not" if finetuned is not None else
                    "no finetuned model is")
            raise ConfigError(f"{what} attached to this open index: call index.attach(task) first (each "
                              f"process attaches the models it queries){self._cached_text(finetuned)}")
        key = self._key(finetuned)
        if key not in self._attached:
            raise ConfigError(f"finetuned model {key!r} is not attached to this open index (attached: "
                              f"{', '.join(self._attached)}); call index.attach(task) with its task"
                              f"{self._cached_text(key)}")
        return self._attached[key]

    def _cached_text(self, key: str | None) -> str:
        """What an error about an unattached ``key`` adds when its operator is cached in this index."""
        if key and (self.path / OPERATORS / f"{key}.h5").is_file():
            return "; its operator is cached under operators/, so attaching loads it at once"
        return ""

    # -- querying --------------------------------------------------------------------------------
    @python_api
    def query_vectors(self, test_batch: Any, finetuned: str | None = None) -> np.ndarray:
        """q_t = P_W v_t for each test point, [Q, k] float64, in the stored rows' basis (``row_basis``;
        "eigen": R P_W v_t, see ``to_row_basis``), so that I(z, x_t) ~ -q_t . s_z."""
        return self._query_vectors(test_batch, finetuned).astype(np.float64)

    def _test_points(self, test_batch: Any, finetuned: str | None) -> tuple[_Attached, Any, int]:
        """The attached model, the test batch on its device and dtype, and the number of test points."""
        a = self._get(finetuned)
        batch = move(test_batch, device="cpu", dtype=a.projector.dtype)
        try:
            return a, batch, batch_size_of(batch)
        except ValueError as e:
            raise ShapeError(f"the test batch holds no tensors ({e}): {BATCH_FORM}") from None

    def _query_vectors(self, test_batch: Any, finetuned: str | None = None) -> np.ndarray:
        """``query_vectors`` in the model's dtype (float32 for a float32 model: the search's own)."""
        a, batch, q_n = self._test_points(test_batch, finetuned)
        if q_n == 0:                        # no test points: no vectors (a query returns [0, k] results)
            return np.zeros((0, self.k), dtype=torch.empty(0, dtype=a.projector.dtype).numpy().dtype)
        with a.lock:
            try:
                q = a.query.vectors(a.task.measurement, batch).detach()
            except _MODEL_CALL_ERRORS as e:
                raise _does_not_fit(e) from e
            except ShapeError as e:            # the per-example gradients' own checks (no batch dimension, ...)
                raise ShapeError(f"{first_line(e)}; {BATCH_FORM}") from None
        if q.shape[0] != q_n:
            raise ShapeError(f"measurement returned {q.shape[0]} values for {q_n} test examples")
        if q.dtype not in (torch.float32, torch.float64):      # a half-precision model: float32 vectors
            q = q.float()
        q = q.numpy()
        if not np.isfinite(q.sum()) and not np.isfinite(q).all():
            bad = int(np.flatnonzero(~np.isfinite(q).all(1))[0])
            raise NonFiniteError(f"the query vector of test point {bad} (position in the batch) is NaN or "
                                 f"infinite: check its measurement and the finetuned model's outputs")
        return q

    @python_api
    def query(self, test_batch: Any, k: int = 10, direction: str = "helpful", finetuned: str | None = None,
              exact_rerank: int | None = None, nprobe: int | None = None,
              test_ids: list[int] | None = None) -> QueryResult:
        """The k most helpful (or harmful) pretraining examples for each test point, with I(z, x_t).

        ``test_batch``: a batch as the task's measurement takes it (torch tensors, batch dimension
        first: ``msif_index.data.full_batch(task.test_dataset(), ids)``). ``k``: results per test point
        (at most n). ``direction``: 'helpful' (most negative I first) or 'harmful' (most positive
        first). ``finetuned``: an attached model's key (``attach`` returns it; default: the one attached
        last, with a warning when several are attached). ``exact_rerank``: search that many
        candidates, then rescore them exactly (float64 rows get 2 k by default). ``nprobe``: IVF lists
        to visit. ``test_ids``: ids to carry in the result (one per test point). Returns a
        QueryResult: ``ids`` [Q, k] int64 and ``scores`` [Q, k] float64, best first (NaN where fewer
        than k were found)."""
        if direction not in DIRECTIONS:
            raise ConfigError(f"direction must be 'helpful' or 'harmful', got {direction!r}")
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ConfigError(f"k must be an integer >= 1, got {k!r}")
        if exact_rerank is not None and (isinstance(exact_rerank, bool) or not isinstance(exact_rerank, (int, np.integer))
                                         or exact_rerank < 1):
            raise ConfigError(f"exact_rerank must be an integer >= 1 (candidates to rescore), got {exact_rerank!r}")
        k = int(k)
        if k > self.n:                                # there are only n pretraining examples
            warn_user(f"k={k} is more than the index's {self.n} pretraining examples: returning all {self.n}")
            k = self.n
        if exact_rerank is not None:
            exact_rerank = min(int(exact_rerank), self.n)
        key = self._key(finetuned)
        q = self._query_vectors(test_batch, key)      # checks that the index is open; finite, in the model's dtype
        if test_ids is not None:
            try:                                      # plain ints: QueryResult.to_dict is JSON (numpy ids too)
                test_ids = [operator.index(i) for i in test_ids]
            except TypeError:
                raise ConfigError(f"test_ids must be integers, one per test point, got {test_ids!r}") from None
        if test_ids is not None and len(test_ids) != q.shape[0]:
            raise ShapeError(f"test_ids names {len(test_ids)} test points but the test batch holds {q.shape[0]}: "
                             f"pass one id per test point, in the batch's order (or none)")
        sign = 1.0 if direction == "helpful" else -1.0
        if q.dtype == np.float32:
            signed = np.ascontiguousarray(q if sign > 0 else -q)
        else:                                                 # float64: the search's float32 copy
            with np.errstate(over="ignore"):
                signed = np.ascontiguousarray(q if sign > 0 else -q, dtype=np.float32)
            if not np.isfinite(signed).all():
                raise NonFiniteError("a query vector exceeds float32's range (the search's dtype): check the "
                                     "test points' measurements and the finetuned model's outputs")
        if exact_rerank is None and self.store.dtype == "float64":
            # float64 rows (the exact preset): rescore the float32 search's candidates in float64
            exact_rerank = min(self.n, 2 * k)
        search = self.search_index._search            # signed is checked: no second validation
        if exact_rerank and self.search_index.two_stage and self.store.dtype != "float64":
            # SVD<r> rescores its candidates exactly against the rows it holds in memory
            dots, ids = search(signed, k, nprobe=nprobe, candidates=max(exact_rerank, k))
        elif exact_rerank:
            _, cand = search(signed, max(exact_rerank, k), nprobe=nprobe)
            ids, dots = _rerank(sign * q.astype(np.float64), cand, self.store, k)
        else:
            dots, ids = search(signed, k, nprobe=nprobe)
        scores = -dots.astype(np.float64) if direction == "helpful" else dots.astype(np.float64)
        scores[ids < 0] = np.nan
        return QueryResult(ids.astype(np.int64), scores, direction, key, test_ids)

    @python_api
    def measurements(self, test_batch: Any, finetuned: str | None = None) -> np.ndarray:
        """l(x_t): the task's measurement (default: the finetuning loss) of each test point on the
        attached finetuned model, [Q] float64: what a query's scores are derivatives of."""
        a, batch, q_n = self._test_points(test_batch, finetuned)
        if q_n == 0:
            return np.zeros(0)
        with a.lock, torch.no_grad():
            try:
                values = a.task.measurement(a.model, batch)
            except _MODEL_CALL_ERRORS as e:
                raise _does_not_fit(e) from e
        if not isinstance(values, torch.Tensor) or tuple(values.shape) != (q_n,):
            shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
            raise ShapeError(f"measurement returned {shape} for {q_n} test examples; it must return one value "
                             f"per example (shape [{q_n}])")
        return values.detach().to(torch.float64).numpy()

    @python_api
    def scores(self, test_batch: Any, finetuned: str | None = None, block_rows: int = 65536) -> np.ndarray:
        """I(z, x_t) ~ -q_t . s_z for every pretraining example, [Q, n] float64 (bounded memory)."""
        q = self.query_vectors(test_batch, finetuned)
        out = np.empty((q.shape[0], self.n), dtype=np.float64)
        for start, block in self.store.iter_blocks(block_rows, dtype=np.float64):
            out[:, start:start + len(block)] = -(q @ block.T)
        return out


#: what the finetuned model raises on a test batch it cannot take (wrong shape, dtype, ...)
_MODEL_CALL_ERRORS = (RuntimeError, IndexError, ValueError, TypeError)


def _negative_text(manifest: dict) -> str | None:
    """The short account of the negative eigenvalues the manifest records (the build said the long
    one), or None (none recorded, or a hand-edited record: msif info shows what is there)."""
    negative = manifest["preconditioner"].get("negative_eigenvalues")
    if not isinstance(negative, dict):
        return None
    try:
        return negative_summary(negative)
    except (KeyError, TypeError, ValueError):
        return None


def _does_not_fit(e: BaseException) -> ShapeError:
    """What the finetuned model or the task's measurement raised on a test batch, in one line: raised
    by the task's own code (a bug there, or a batch it cannot unpack), with its file and line; else
    by torch (shapes or dtypes), with the task's line that called it where the task came from a file."""
    site = user_raise_site(e)
    if site:
        return ShapeError(f"the task's code raised {exception_text(e)} on the test batch ({site}): a bug "
                          f"there, or a batch it cannot take; {BATCH_FORM}")
    where = task_code_location(e)
    at = f" (raised under {where})" if where else ""
    return ShapeError(f"the test batch does not fit the finetuned model (shapes or dtypes): {first_line(e)}{at}; "
                      f"{BATCH_FORM}")


def _projection_fingerprint(manifest: dict) -> str:
    """What B depends on besides the finetuned model: the index's projection P_W (seed, blocks, widths)."""
    return hashlib.sha256(json.dumps(manifest["projector"], sort_keys=True, default=str).encode()).hexdigest()[:16]


def _operator_misfit(op: FinetuneOperator, projection: str, k_w: int, d_theta: int, theta: list[str],
                     finetuning: str) -> str | None:
    """Why a cached operator cannot serve this index and model, or None."""
    if op.projection != projection:
        return ("computed for another projection: copied from another index?" if op.projection
                else "written before operators recorded their projection")
    if tuple(op.b.shape) != (k_w, d_theta):
        return f"B is {list(op.b.shape)}, expected {[k_w, d_theta]}"
    if op.theta_names != theta:
        return "its theta parameters differ from the finetuned model's"
    if op.finetuning != finetuning or (op.c is None) != (finetuning == "frozen") or (
            op.c is not None and tuple(op.c.shape) != (k_w, k_w)):
        return f"it is for {op.finetuning} finetuning"
    return None


def _stable_fingerprint(data: Any) -> str | None:
    """fingerprint_dataset of ``data``, or None when two reads differ (random augmentation): such a
    dataset cannot be told apart from another one, and must not make every attach compute B again."""
    fp = fingerprint_dataset(data)
    return fp if fingerprint_dataset(data) == fp else None


def _loss_probe(task: MultiStageTask, model: nn.Module) -> str:
    """A short hash of ``finetune_loss`` on the first finetuning examples at ``model`` (the CPU copy
    in eval mode), rounded to 4 significant digits so that last-bit differences between processes
    (float32: about 1e-7) almost never change it: tells another loss (label smoothing, another
    weighting) with the same data and model, unless it moves no loss by 1e-4 relative."""
    values = loss_values(task.finetune_loss, model, task.finetune_dataset())
    if not values:
        return "empty"
    return hashlib.sha256(",".join(f"{v:.4g}" if v is not None else "nan" for v in values).encode()).hexdigest()[:16]


def _pack_on_huge_pages(model: nn.Module, query: _QueryPath) -> None:
    """Move what a query reads on the finetune side (this private copy of the model's parameters, B
    and C) into one buffer backed by huge pages (values unchanged)."""
    params = [p for p in model.parameters() if p.device.type == "cpu"]
    mats = [query.b_rows] + ([] if query.c is None else [query.c])
    copies = packed_on_huge_pages([p.data for p in params] + mats)
    with torch.no_grad():
        for p, t in zip(params, copies):
            p.data = t
    query.b_rows = copies[len(params)]
    if query.c is not None:
        query.c = copies[len(params) + 1]


#: manifest entries an index needs, with their JSON types
_MANIFEST_SCHEMA = {"n": int, "k": int, "config": dict, "identity": dict, "fingerprints": dict, "projector": dict,
                    "w_names": list, "preconditioner": dict}


def _open_parts(path: Path, manifest: Any, device: str) -> tuple[RowStore, SearchIndex]:
    """The checked row store and the search structure the manifest names (CorruptIndexError, one
    line, when they do not fit; the store is then closed)."""
    store = open_checked_rows(path, manifest)
    try:
        factory = manifest["config"]["factory"]
        if built_at_open(factory):              # Flat, SVD<r>: built straight from the rows
            search = SearchIndex.create(store.k, factory, device=device)
            search.train_and_add(lambda: (b for _, b in store.iter_blocks()), store.n,
                                 seed=manifest["config"].get("seed", 0))
        else:
            search = SearchIndex.load(path / _faiss_name(manifest), device=device)
        if search.ntotal != store.n:
            raise CorruptIndexError(f"{path / (_faiss_name(manifest) or 'the search index')} holds "
                                    f"{search.ntotal} rows, expected {store.n}; rebuild with --overwrite")
    except BaseException:
        store.close()
        raise
    return store, search


def check_checksum(path: Path, manifest: dict, key: str) -> None:
    """CorruptIndexError when ``path`` exists and differs from the manifest's sha256 under ``key``
    (indexes built before a file's checksum was recorded have none: not checked)."""
    want = manifest.get("checksums", {}).get(key)
    try:
        if want is not None and path.is_file() and file_sha256(path) != want:
            raise CorruptIndexError(f"{path} fails its checksum (damaged, or another build's); rebuild the index "
                                    f"with --overwrite")
    except FileNotFoundError:       # removed meanwhile (a factory switch): as missing
        raise CorruptIndexError(f"{path} is missing (deleted, or not copied with the index); rebuild with "
                                f"--overwrite") from None


def check_search_file(path: Path, manifest: dict) -> None:
    """CorruptIndexError (one line) when the faiss file the manifest names is missing or fails its
    checksum; nothing to check for Flat / SVD<r> (built from the rows at open)."""
    if built_at_open(manifest["config"]["factory"]):
        return
    faiss_file = path / _faiss_name(manifest)
    if not faiss_file.is_file():
        raise CorruptIndexError(f"{faiss_file} is missing (deleted, or not copied with the index); "
                                f"rebuild with --overwrite")
    check_checksum(faiss_file, manifest, "faiss")


def open_checked_rows(path: Path, manifest: Any, search: bool = True) -> RowStore:
    """The index's row store, opened after the checks that need no row read: the manifest's schema,
    the checksums of rows.h5 and faiss.index (before HDF5 or faiss parse them; the latter unless
    ``search`` is False), the rows' shape and the settings rows.h5 carries against the manifest's.
    CorruptIndexError (one line) otherwise."""
    _check_manifest(path / MANIFEST, manifest)
    check_checksum(path / ROWS, manifest, "rows")
    if search:
        check_search_file(path, manifest)
    store = RowStore.open(path / ROWS)
    if store.n != manifest.get("n") or store.k != manifest.get("k"):
        store.close()
        raise CorruptIndexError(f"{path / ROWS} holds {store.n}x{store.k} rows but the manifest says "
                                f"{manifest.get('n')}x{manifest.get('k')}; rebuild with --overwrite")
    for part in ("identity", "projector", "config"):      # the rows carry the settings they were built with
        if part in store.attrs and _canonical(store.attrs[part]) != _canonical(manifest[part]):
            store.close()
            raise CorruptIndexError(f"{path / MANIFEST} does not match {path / ROWS} (its {part} differs: edited, "
                                    f"or files from another build); rebuild with --overwrite")
    return store


def _check_manifest(path: Path, manifest: Any) -> None:
    """CorruptIndexError unless the manifest has the entries and types an index needs."""
    def bad(what: str) -> CorruptIndexError:
        return CorruptIndexError(f"{path} is damaged ({what}); rebuild the index with --overwrite")
    if not isinstance(manifest, dict):
        raise bad(f"a JSON {type(manifest).__name__}, not an object")
    for key, kind in _MANIFEST_SCHEMA.items():
        if not isinstance(manifest.get(key), kind) or isinstance(manifest.get(key), bool):
            raise bad(f"'{key}' is missing or not a {kind.__name__}")
    proj = manifest["projector"]
    fields = {f.name for f in dataclasses.fields(Block)}
    if not isinstance(proj.get("blocks"), list) or not isinstance(proj.get("seed"), int) or not all(
            isinstance(b, dict) and set(b) == fields for b in proj["blocks"]):
        raise bad("its projector blocks")
    if not isinstance(manifest["config"].get("factory"), str) or not all(
            isinstance(manifest["fingerprints"].get(x), str) for x in ("W", "U")):
        raise bad("its config or fingerprints")
    if not all(isinstance(x, str) for x in manifest["w_names"]):
        raise bad("its w_names")
    files = manifest.get("files", {})
    if not isinstance(files, dict) or (files.get("faiss") is not None and files.get("faiss") not in FAISS_NAMES):
        raise bad("its files")
    if not built_at_open(manifest["config"]["factory"]) and files.get("faiss", FAISS_NAMES[0]) is None:
        raise bad("no search index file for its factory")
    checksums = manifest.get("checksums", {})
    if not isinstance(checksums, dict) or not all(isinstance(v, str) for v in checksums.values()):
        raise bad("its checksums")


def _canonical(value: Any) -> str:
    """JSON text of a manifest entry, without the search factory (it shapes the search structure,
    checked on its own, not the rows)."""
    def drop(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: drop(x) for k, x in v.items() if k != "factory"}
        return v
    return json.dumps(drop(value), sort_keys=True, default=str)


#: bytes of float64 candidate rows an exact rerank reads at once
RERANK_BLOCK_BYTES = 64 << 20


def _rerank(q: np.ndarray, cand: np.ndarray, store: RowStore, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact q . s over each query's candidate ids, top k (float64); the candidates' rows are read
    ``RERANK_BLOCK_BYTES`` at a time (exact_rerank may name all n rows)."""
    ids = np.full((q.shape[0], k), -1, dtype=np.int64)
    dots = np.full((q.shape[0], k), -np.inf)
    block = max(1, RERANK_BLOCK_BYTES // (8 * max(1, store.k)))
    for i in range(q.shape[0]):
        c = cand[i][cand[i] >= 0]
        if not len(c):
            continue
        s = np.empty(len(c))
        for j in range(0, len(c), block):
            s[j:j + block] = store.take(c[j:j + block], dtype=np.float64) @ q[i]
        order = np.argsort(-s, kind="stable")[:k]
        ids[i, :len(order)] = c[order]
        dots[i, :len(order)] = s[order]
    return ids, dots

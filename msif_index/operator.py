"""The finetune-side operator: what turns a test gradient into the chained query q_t = P_W v_t.

MATH.md, "What a query needs from the finetuned side". With g_W = grad_W l, g_t = grad_theta l
at the finetuned model (theta_hat, W_hat):

    frozen:    q_t = P_W g_W - B g_t,        B = (P_W F_Wt) H_tt^{-1}               [k_W, d_theta]
    proximal:  q_t = C (P_W g_W - B g_t),    C = alpha P P^T (P S P^T)^{-1}         [k_W, k_W]
               P S P^T = P H_WW P^T + alpha P P^T - (P F_Wt) H_tt^{-1} (P F_Wt)^T   (Schur complement)

B and C are computed once at attach time: P F_Wt by a forward-over-reverse pass over the finetuning
set per theta coordinate or per row of P_W (whichever is fewer), H_tt^{-1} dense or Kronecker-
factored and refined by CG (msif_index.head_curvature), P H_WW P^T by HVPs along P's rows or a
projected Fisher. A query is then one backward pass of the test batch plus small products and never
touches the finetuning data. With no projection (P = I) and dense Hessians both are exact
(tests/test_query.py, exact mode).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import h5py
import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .atomic import atomic_path, check_free_space, file_sha256
from .autodiff import FlatParams, _LossCall, hvp
from .data import batches, move
from .errors import CorruptIndexError, NonFiniteError, forward_ad_errors
from .exact import negative_curvature, negative_text, rounding_tolerance
from .gradients import GradientProjector
from .head_curvature import (CG_ITERS, MAX_DENSE_THETA, DenseHeadCurvature, HeadCurvature,
                             KroneckerHeadCurvature, conjugate_gradient_rows, resolve_h_tt)
from .preconditioners import NOT_A_MINIMUM_ADVICE
from .progress import progress
from .task import MultiStageTask, split_parameters
from .warn import load_jvp_decompositions, warn_user

#: default relative damping of Kronecker-factored H_tt (x each block's mean eigenvalue)
KRONECKER_DAMPING = 1e-3
#: P H_WW P^T by HVPs along P's rows when the dense P has at most this many entries
MAX_HVP_PROJECTION = 50_000_000
_F64 = torch.float64


@dataclass
class FinetuneOperator:
    """B (and C for proximal) of one finetuned model, with what identifies it."""

    finetuning: str
    alpha: float
    b: torch.Tensor                   # [k_W, d_theta]
    c: torch.Tensor | None            # [k_W, k_W] (proximal) or None
    theta_names: list[str]
    fingerprint: str
    info: dict[str, Any]
    #: fingerprint of the index projection B was computed for (P_W: seed, blocks, widths); "" in files
    #: written before it was recorded
    projection: str = ""
    #: what the model was first attached as (the command line's FILE.py:NAME, or the task's class
    #: name), shown by ``msif info``; "" in files written before it was recorded
    label: str = ""

    def query_vectors(self, projected_w: torch.Tensor, grad_theta: torch.Tensor) -> torch.Tensor:
        """q_t [Q, k_W] from P_W grad_W l [Q, k_W] and grad_theta l [Q, d_theta]."""
        q = projected_w.to(_F64) - grad_theta.to(_F64) @ self.b.to(_F64).T
        return q if self.c is None else q @ self.c.to(_F64).T

    def stored_in(self, dtype: torch.dtype) -> "FinetuneOperator":
        """This operator with B and C rounded to ``dtype`` (never above float64): an operator of a
        float32 model is kept and saved in float32 (half the memory and disk of float64; its query
        path computes in float32 anyway), so the process that computed it and every process that
        loads it answer alike."""
        dtype = torch.float32 if dtype != _F64 else _F64
        if self.b.dtype == dtype and (self.c is None or self.c.dtype == dtype):
            return self
        return replace(self, b=self.b.to(dtype), c=None if self.c is None else self.c.to(dtype),
                       info={**self.info, "stored_dtype": str(dtype).replace("torch.", "")})

    def save(self, path: Path) -> None:
        """Write atomically, sealed with a sha256 (``seal_file``); DiskFullError before anything is
        written when the disk cannot hold it (B and C, plus 256 KiB for HDF5's metadata and the
        attributes)."""
        parts = [self.b] if self.c is None else [self.b, self.c]
        check_free_space(Path(path).parent, str(path), sum(t.numel() * t.element_size() for t in parts) + (256 << 10))
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w", userblock_size=USERBLOCK, libver=("v108", "latest"), locking=False) as f:
                f.create_dataset("b", data=self.b.numpy(), fletcher32=True)
                if self.c is not None:
                    f.create_dataset("c", data=self.c.numpy(), fletcher32=True)
                f.attrs["finetuning"] = self.finetuning
                f.attrs["alpha"] = self.alpha
                f.attrs["theta_names"] = ",".join(self.theta_names)
                f.attrs["fingerprint"] = self.fingerprint
                f.attrs["projection"] = self.projection
                f.attrs["label"] = self.label
                import json
                f.attrs["info"] = json.dumps(self.info)
            seal_file(tmp)

    @classmethod
    def load(cls, path: Path) -> "FinetuneOperator":
        """Read a saved operator; CorruptIndexError (its ``reason``: DAMAGED or NO_SEAL) when the
        file's sha256 does not match its seal, before HDF5 parses it."""
        import json
        verify_file(path)
        try:
            with h5py.File(path, "r", locking=False) as f:
                b = torch.from_numpy(f["b"][()])
                c = torch.from_numpy(f["c"][()]) if "c" in f else None
                return cls(str(f.attrs["finetuning"]), float(f.attrs["alpha"]), b, c,
                           [x for x in str(f.attrs["theta_names"]).split(",") if x], str(f.attrs["fingerprint"]),
                           json.loads(f.attrs["info"]), str(f.attrs.get("projection", "")),
                           str(f.attrs.get("label", "")))
        except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
            raise CorruptIndexError(f"finetune operator {path} is unreadable ({type(e).__name__}); delete it "
                                    f"and attach the finetuned model again") from None


#: bytes before the HDF5 superblock (an HDF5 user block) holding the operator file's seal
USERBLOCK = 512
_SEAL = b"msif-operator sha256="
#: why ``verify_file`` refused a file (its CorruptIndexError's ``reason``)
DAMAGED = "damaged: its checksum does not match"
NO_SEAL = "written without a checksum by an older msif"


def seal_file(path: Path) -> None:
    """Write the sha256 of everything after the user block into the user block of a closed file."""
    digest = file_sha256(path, USERBLOCK)
    with open(path, "r+b") as f:
        f.write((_SEAL + digest.encode() + b"\n").ljust(USERBLOCK, b"\0"))


def verify_file(path: Path) -> None:
    """CorruptIndexError unless ``path`` carries a seal that matches its contents. HDF5 can crash or
    hang on damaged metadata, so an operator file is checked before it is parsed."""
    try:
        with open(path, "rb") as f:
            head = f.read(USERBLOCK)
        if not head.startswith(_SEAL):
            reason = NO_SEAL if head.startswith(b"\x89HDF") else DAMAGED
        else:
            digest = head[len(_SEAL):len(_SEAL) + 64].decode("ascii", "replace")
            reason = "" if digest == file_sha256(path, USERBLOCK) else DAMAGED
    except OSError:
        reason = DAMAGED
    if reason:
        err = CorruptIndexError(f"finetune operator {path} is {reason}; delete it and attach the finetuned model again")
        err.reason = reason  # type: ignore[attr-defined]
        raise err


def reference_query_vectors(projector: GradientProjector, op: FinetuneOperator, model: nn.Module,
                            measurement: Callable, batch: Any) -> torch.Tensor:
    """q_t [Q, k_W] (float64, parameter basis) the slow, separate way: P_W grad_W l by the W projector,
    grad_theta l by torch.func per-example gradients, combined by ``op.query_vectors``. The reference
    the query path's one hooked pass (index._QueryPath) is tested against."""
    from .autodiff import per_example_grads

    b = move(batch, dtype=projector.dtype)
    pw = projector.project_batch(measurement, b).detach()
    theta = FlatParams(model, op.theta_names)
    gt = per_example_grads(theta.loss(measurement), theta.get(), b).detach()
    return op.query_vectors(pw, gt)


@forward_ad_errors("attaching a finetuned model (the finetune-side operator)")
def compute_operator(task: MultiStageTask, finetuned: nn.Module, projector: GradientProjector,
                     fingerprint: str, batch_size: int = 256, damping: float | None = None,
                     h_tt: str = "auto", cg_iters: int | None = None,
                     show: bool | None = None) -> FinetuneOperator:
    """Precompute B (and C) for ``finetuned``.

    ``projector`` is P_W: it projects exactly the W parameters, in ``task.shared_parameters`` order.
    ``h_tt`` picks how H_tt^{-1} is formed (msif_index.head_curvature); ``damping`` is its relative
    damping (default 0 for dense, i.e. exact, and KRONECKER_DAMPING for kfac / ekfac); kfac / ekfac
    are refined by ``cg_iters`` CG steps with exact HVPs (default head_curvature.CG_ITERS).
    """
    load_jvp_decompositions()                # its jvps (the mixed term) do not go through autodiff.hvp
    model = finetuned
    w, theta = split_parameters(task, model)
    flat = FlatParams(model, theta + w)
    d_theta = sum(flat.sizes[: len(theta)])
    method = resolve_h_tt(h_tt, d_theta)
    x = flat.get()
    f = split_loss(model, theta, w, task.finetune_loss)
    dataset = task.finetune_dataset()
    m = len(dataset)  # type: ignore[arg-type]
    dtype = x.dtype
    data = [move(b, dtype=dtype) for _, b in batches(dataset, batch_size)]

    def mean_f(t: torch.Tensor, ww: torch.Tensor) -> torch.Tensor:
        """F(theta, W) without weight decay: the mean finetuning loss."""
        return sum(f(t, ww, b).sum() for b in data) / m

    wd = float(task.finetune_weight_decay)
    x_theta, x_w = x[:d_theta], x[d_theta:]

    if method == "dense":
        curv: HeadCurvature = DenseHeadCurvature(lambda t: mean_f(t, x_w), x_theta, wd,
                                                 0.0 if damping is None else damping)
    else:
        curv = KroneckerHeadCurvature(task, model, theta, method,
                                      KRONECKER_DAMPING if damping is None else damping, batch_size, show)
    # P_W F_Wt [k_W, d_theta]: one forward-over-reverse pass over the finetuning set per theta
    # direction (columns) or per row of P_W (rows), whichever is fewer
    if projector.dim < d_theta:
        pf = _mixed_by_rows(projector, mean_f, x_theta, x_w, show)
    else:
        pf = _mixed_by_columns(projector, mean_f, x_theta, x_w, show)
    info: dict[str, Any] = {"d_theta": d_theta, "m": m, "mixed_term": "rows" if projector.dim < d_theta
                            else "columns", **curv.info}
    if method == "dense":
        b = curv.solve_rows(pf.to(_F64))
    else:
        iters = CG_ITERS if cg_iters is None else int(cg_iters)
        b, cg = conjugate_gradient_rows(pf, _theta_hvp_rows(f, data, m, x_theta, x_w, wd), curv.solve_rows,
                                        iters, show)
        info.update({"h_tt_" + k: v for k, v in cg.items()})
        if cg["cg_negative_curvature"]:
            warn_user(f"H_tt is not positive definite (the finetuned head is not at a minimum): CG stopped "
                      f"early on {cg['cg_negative_curvature']} of {pf.shape[0]} rows of B; finetune the head to "
                      f"convergence or attach with h_tt='dense' (heads up to {MAX_DENSE_THETA} parameters)")
    if not torch.isfinite(b).all():
        raise NonFiniteError(f"the finetune operator B is not finite ({method} H_tt is singular or the "
                             f"finetuning losses are not finite); attach with damping > 0, e.g. 1e-3")
    c = None
    if task.finetuning == "proximal":
        alpha = float(task.alpha)
        php, how = _projected_h_ww(projector, mean_f, x_theta, x_w, task, data, m)
        gram = projector.gram().to(_F64)
        s_proj = php + alpha * gram - (b.to(_F64) @ pf.to(_F64).T)
        s_proj = 0.5 * (s_proj + s_proj.T)
        c = alpha * gram @ torch.linalg.inv(s_proj)
        info.update({"h_ww": how, "alpha": alpha})
        if how == "hvp":
            # only with the exact P H_WW P^T: with the Fisher stand-in (large W) S is not K's Schur
            # complement, and a negative eigenvalue of it says nothing about the finetuned model
            info["schur_negative"] = negative_curvature(s_proj, rounding_tolerance(projector.dtype))
    warn_not_a_minimum(info)
    return FinetuneOperator(task.finetuning, float(task.alpha), b, c, theta, fingerprint, info)


def warn_not_a_minimum(info: dict[str, Any]) -> None:
    """RuntimeWarning when an operator's ``info`` records negative curvature of the finetuning
    objective: H_tt (the head's Hessian, dense) or, for proximal finetuning, the projected Schur
    complement P S P^T, S = H_WW + alpha I - F_Wt H_tt^-1 F_tW (K's curvature along the projected W
    directions, the head eliminated; K is positive definite iff H_tt and S are), checked only where
    P H_WW P^T is exact (HVPs). Said when the
    operator is computed and whenever a cached one is attached again."""
    parts = []
    if info.get("h_tt_negative"):
        parts.append(f"H_tt (the head's Hessian) has {negative_text(info['h_tt_negative'])}")
    if info.get("schur_negative"):
        parts.append(f"the projected Schur complement of K (W's curvature in the proximal objective, the "
                     f"head eliminated) has {negative_text(info['schur_negative'])}")
    if parts:
        warn_user(f"the finetuned model is not at a minimum of its finetuning objective: {'; '.join(parts)}; "
                  f"influence assumes a minimum, so the query scores are the formula's value at a saddle point "
                  f"and may not track retraining: {NOT_A_MINIMUM_ADVICE}")


def split_loss(model: nn.Module, theta: list[str], w: list[str], loss_fn) -> Callable:
    """``f(t, ww, batch) -> Tensor[B]``: per-example losses with theta = t and W = ww (flat vectors).

    Two arguments rather than one concatenated vector, so that under ``vmap`` over directions in
    theta the backbone (a function of W alone) stays unbatched and runs once per batch, not once
    per direction (and likewise for directions in W and the head)."""
    ft, fw = FlatParams(model, theta), FlatParams(model, w)
    call = _LossCall(model, loss_fn)

    def f(t: torch.Tensor, ww: torch.Tensor, batch: Any) -> torch.Tensor:
        params = {"model." + n: p for n, p in ft.as_dict(t).items()}
        params.update({"model." + n: p for n, p in fw.as_dict(ww).items()})
        return functional_call(call, params, (batch,))

    return f


def _theta_hvp_rows(f, data: list, m: int, x_theta: torch.Tensor, x_w: torch.Tensor, wd: float,
                    chunk: int = 32) -> Callable[[torch.Tensor], torch.Tensor]:
    """V [r, d_theta] -> V H_tt (H_tt of the finetuning objective incl. weight decay, W held at its
    value): forward-over-reverse HVPs, accumulated batch by batch (memory: one batch x ``chunk``)."""
    def rows_h(v: torch.Tensor) -> torch.Tensor:
        out = wd * v
        for batch in data:
            def f_b(t: torch.Tensor, batch=batch) -> torch.Tensor:
                return f(t, x_w, batch).sum() / m
            for s in range(0, v.shape[0], chunk):
                out[s:s + chunk] += vmap(lambda u: hvp(f_b, x_theta, u))(v[s:s + chunk].to(x_theta.dtype)).to(v.dtype)
        return out
    return rows_h


def _mixed_by_columns(projector: GradientProjector, mean_f, x_theta: torch.Tensor, x_w: torch.Tensor,
                      show: bool | None) -> torch.Tensor:
    """P_W F_Wt by columns: column j = P_W d/dtheta_j grad_W F (jvp along e_j of grad_W)."""
    d_theta = x_theta.numel()

    def grad_w(t: torch.Tensor) -> torch.Tensor:
        return grad(lambda ww: mean_f(t, ww))(x_w)

    eye = torch.eye(d_theta, dtype=x_theta.dtype)
    chunk = max(1, min(64, (1 << 22) // max(1, x_w.numel())))
    cols = []
    with progress(d_theta, "attach: mixed term P F_Wt", unit="dir", enabled=show) as advance:
        for s in range(0, d_theta, chunk):
            mixed = vmap(lambda e: jvp(grad_w, (x_theta,), (e,))[1])(eye[s:s + chunk])   # [c, d_W]
            cols.append(_project_w(projector, mixed))
            advance(mixed.shape[0])
    return torch.cat(cols).T.contiguous()                  # [k_W, d_theta]


def _mixed_by_rows(projector: GradientProjector, mean_f, x_theta: torch.Tensor, x_w: torch.Tensor,
                   show: bool | None) -> torch.Tensor:
    """P_W F_Wt by rows: row i = p_i^T F_Wt = d/deps grad_theta F(theta, W + eps p_i), a jvp of
    grad_theta along the i-th row p_i of P_W (for heads with more parameters than k_W)."""
    k_w = projector.dim

    def grad_theta(ww: torch.Tensor) -> torch.Tensor:
        return grad(lambda t: mean_f(t, ww))(x_theta)

    chunk = max(1, min(64, (1 << 22) // max(1, x_w.numel())))
    out = torch.empty(k_w, x_theta.numel(), dtype=x_theta.dtype)
    with progress(k_w, "attach: mixed term P F_Wt", unit="row", enabled=show) as advance:
        for s in range(0, k_w, chunk):
            dirs = projection_rows(projector, s, min(k_w, s + chunk)).to(x_w.dtype)     # [c, d_W]
            out[s:s + dirs.shape[0]] = vmap(lambda p: jvp(grad_theta, (x_w,), (p,))[1])(dirs)
            advance(dirs.shape[0])
    return out


def projection_rows(projector: GradientProjector, start: int, stop: int) -> torch.Tensor:
    """Rows start..stop of the explicit P [stop - start, d] (flat ``param_names`` order), as
    P^T e_i: the gradient of the linear map ``project_dense`` (never forms all of P)."""
    flat = FlatParams(projector.model, projector.param_names)
    z = torch.zeros(stop - start, flat.dim, dtype=projector.dtype, requires_grad=True)
    with torch.enable_grad():
        y = projector.project_dense(flat.as_dict(z))
        e = torch.zeros_like(y)
        e[:, start:stop] = torch.eye(stop - start, dtype=y.dtype)
        (rows,) = torch.autograd.grad(y, z, grad_outputs=e)
    return rows


def _project_w(projector: GradientProjector, vecs: torch.Tensor) -> torch.Tensor:
    """P_W applied to flat W-space vectors [c, d_W] -> [c, k_W]."""
    flat = FlatParams(projector.model, projector.param_names)
    return projector.project_dense(dict(zip(flat.names, flat.split(vecs.to(projector.dtype)))))


def _projected_h_ww(projector: GradientProjector, mean_f, x_theta: torch.Tensor, x_w: torch.Tensor,
                    task: MultiStageTask, data: list, m: int) -> tuple[torch.Tensor, str]:
    """P H_WW P^T of the finetuning objective: by HVPs along P_W's rows when the dense P_W fits
    (exact), else the empirical Fisher of the projected per-example finetuning gradients."""
    k_w, d_w = projector.dim, x_w.numel()
    if k_w * d_w > MAX_HVP_PROJECTION:
        out = torch.zeros(k_w, k_w, dtype=_F64)
        for batch in data:
            rows = projector.project_batch(task.finetune_loss, batch).detach().to(_F64)
            out.addmm_(rows.T, rows)
        return out / m, "fisher"
    p_w = projector.matrix().to(x_w.dtype)                  # [k_W, d_W], shared_parameters order

    def f_w(ww: torch.Tensor) -> torch.Tensor:
        return mean_f(x_theta, ww)

    out = torch.empty(k_w, k_w, dtype=_F64)
    for s in range(0, k_w, 64):
        hp = vmap(lambda v: hvp(f_w, x_w, v))(p_w[s:s + 64])
        out[s:s + 64] = (hp @ p_w.T).to(_F64)
    return 0.5 * (out + out.T), "hvp"

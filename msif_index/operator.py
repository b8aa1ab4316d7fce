"""The finetune-side operator: what turns a test gradient into the chained query q_t = P_W v_t.

MATH.md, "What a query needs from the finetuned side". With g_W = grad_W l, g_t = grad_theta l
at the finetuned model (theta_hat, W_hat):

    frozen:    q_t = P_W g_W - B g_t,        B = (P_W F_Wt) H_tt^{-1}               [k_W, d_theta]
    proximal:  q_t = C (P_W g_W - B g_t),    C = alpha P P^T (P S P^T)^{-1}         [k_W, k_W]
               P S P^T = P H_WW P^T + alpha P P^T - (P F_Wt) H_tt^{-1} (P F_Wt)^T   (Schur complement)

B and C are computed once at attach time (a pass over the finetuning set per theta coordinate for
P F_Wt, HVPs along P's rows or a projected Fisher for P H_WW P^T), so a query is one backward pass
of the test batch plus small products and never touches the finetuning data. With no projection
(P = I) and dense Hessians both are exact (tests/test_query_exact.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch
from torch import nn
from torch.func import grad, jvp, vmap

from .atomic import atomic_path
from .autodiff import FlatParams, batched_objective, dense_hessian, hvp
from .data import batches, move
from .errors import CorruptIndexError, TooLargeError
from .gradients import GradientProjector
from .progress import progress
from .task import MultiStageTask, split_parameters

#: H_tt is factored densely up to this many theta parameters
MAX_DENSE_THETA = 8192
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

    def query_vectors(self, projected_w: torch.Tensor, grad_theta: torch.Tensor) -> torch.Tensor:
        """q_t [Q, k_W] from P_W grad_W l [Q, k_W] and grad_theta l [Q, d_theta]."""
        q = projected_w.to(_F64) - grad_theta.to(_F64) @ self.b.T
        return q if self.c is None else q @ self.c.T

    def save(self, path: Path) -> None:
        with atomic_path(path) as tmp:
            with h5py.File(tmp, "w") as f:
                f.create_dataset("b", data=self.b.numpy(), fletcher32=True)
                if self.c is not None:
                    f.create_dataset("c", data=self.c.numpy(), fletcher32=True)
                f.attrs["finetuning"] = self.finetuning
                f.attrs["alpha"] = self.alpha
                f.attrs["theta_names"] = ",".join(self.theta_names)
                f.attrs["fingerprint"] = self.fingerprint
                import json
                f.attrs["info"] = json.dumps(self.info)

    @classmethod
    def load(cls, path: Path) -> "FinetuneOperator":
        import json
        try:
            with h5py.File(path, "r") as f:
                b = torch.from_numpy(f["b"][()])
                c = torch.from_numpy(f["c"][()]) if "c" in f else None
                return cls(str(f.attrs["finetuning"]), float(f.attrs["alpha"]), b, c,
                           str(f.attrs["theta_names"]).split(","), str(f.attrs["fingerprint"]),
                           json.loads(f.attrs["info"]))
        except (OSError, KeyError) as e:
            raise CorruptIndexError(f"finetune operator {path} is unreadable ({type(e).__name__}); delete it "
                                    f"and attach the finetuned model again") from None


def compute_operator(task: MultiStageTask, finetuned: nn.Module, projector: GradientProjector,
                     fingerprint: str, batch_size: int = 256, damping: float = 0.0,
                     show: bool | None = None) -> FinetuneOperator:
    """Precompute B (and C) for ``finetuned``.

    ``projector`` is P_W: it projects exactly the W parameters, in ``task.shared_parameters`` order.
    """
    model = finetuned
    w, theta = split_parameters(task, model)
    flat = FlatParams(model, theta + w)
    d_theta = sum(flat.sizes[: len(theta)])
    if d_theta > MAX_DENSE_THETA:
        raise TooLargeError(f"the finetuning head has {d_theta} parameters; dense H_tt is limited to "
                            f"{MAX_DENSE_THETA} (Kronecker-factored H_tt is not implemented yet)")
    x = flat.get()
    f = flat.loss(task.finetune_loss)
    dataset = task.finetune_dataset()
    m = len(dataset)  # type: ignore[arg-type]
    dtype = x.dtype
    data = [move(b, dtype=dtype) for _, b in batches(dataset, batch_size)]
    mean_f = batched_objective(f, data, m)
    wd = float(task.finetune_weight_decay)

    # H_tt (dense, over theta only, W held at W_hat) + weight decay
    x_theta, x_w = x[:d_theta], x[d_theta:]

    def f_theta(t: torch.Tensor) -> torch.Tensor:
        return mean_f(torch.cat([t, x_w]))

    h_tt = dense_hessian(f_theta, x_theta).to(_F64) + wd * torch.eye(d_theta, dtype=_F64)
    evals, evecs = torch.linalg.eigh(h_tt)
    lam = damping * float(evals.mean())
    h_tt_inv = (evecs / (evals + lam)) @ evecs.T

    # P_W F_Wt: column j = P_W d/dtheta_j grad_W F, a forward-over-reverse pass per theta direction
    def grad_w(t: torch.Tensor) -> torch.Tensor:
        return grad(lambda ww: mean_f(torch.cat([t, ww])))(x_w)

    eye = torch.eye(d_theta, dtype=dtype)
    chunk = max(1, min(64, (1 << 22) // max(1, x_w.numel())))
    cols = []
    with progress(d_theta, "attach: mixed term P F_Wt", unit="dir", enabled=show) as advance:
        for s in range(0, d_theta, chunk):
            mixed = vmap(lambda e: jvp(grad_w, (x_theta,), (e,))[1])(eye[s:s + chunk])   # [c, d_W]
            cols.append(_project_w(projector, mixed))
            advance(mixed.shape[0])
    pf = torch.cat(cols).T.to(_F64)                      # [k_W, d_theta]
    b = pf @ h_tt_inv
    info: dict[str, Any] = {"d_theta": d_theta, "m": m, "h_tt_damping": lam,
                            "h_tt_min_eig": float(evals.min())}
    c = None
    if task.finetuning == "proximal":
        alpha = float(task.alpha)
        php, how = _projected_h_ww(projector, mean_f, x_theta, x_w, task, data, m)
        gram = projector.gram().to(_F64)
        s_proj = php + alpha * gram - pf @ h_tt_inv @ pf.T
        s_proj = 0.5 * (s_proj + s_proj.T)
        c = alpha * gram @ torch.linalg.inv(s_proj)
        info.update({"h_ww": how, "alpha": alpha})
    return FinetuneOperator(task.finetuning, float(task.alpha), b, c, theta, fingerprint, info)


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
        return mean_f(torch.cat([x_theta, ww]))

    out = torch.empty(k_w, k_w, dtype=_F64)
    for s in range(0, k_w, 64):
        hp = vmap(lambda v: hvp(f_w, x_w, v))(p_w[s:s + 64])
        out[s:s + 64] = (hp @ p_w.T).to(_F64)
    return 0.5 * (out + out.T), "hvp"

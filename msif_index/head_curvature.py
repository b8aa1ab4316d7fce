"""H_tt^{-1}: the inverse Hessian of the finetuning objective over the head theta (MATH.md, Stage 2a).

The finetune-side operator needs B = (P_W F_Wt) H_tt^{-1}, i.e. H_tt^{-1} applied to the k_W rows of
P_W F_Wt. Two ways, chosen by ``h_tt`` (``InfluenceIndex.attach`` / ``msif attach --h-tt``):

    dense        H_tt + wd I exactly, by forward-over-reverse HVPs along every theta direction, then
                 eigh; ``damping`` x its mean eigenvalue is added (default 0: exact). Heads up to
                 MAX_DENSE_THETA parameters (memory d^2, time d^3).
    kfac, ekfac  block diagonal over the head's modules; per nn.Linear / nn.Conv2d / nn.Embedding
                 the Kronecker factors S (x) A of its per-example output-gradient and input
                 statistics on the finetuning set, eigenvalue-corrected for ekfac (George et al.
                 2018), damped by ``damping`` x the block's mean eigenvalue, plus wd. Any other theta
                 parameter (a norm scale, a raw nn.Parameter) is one dense block of the same
                 statistics. These are msif_index.preconditioners' KroneckerEigen / EKFAC over
                 unprojected theta blocks, so the same code and tests cover both sides.
    auto         dense up to MAX_DENSE_THETA parameters, ekfac beyond.

kfac / ekfac alone are coarse (on a two-layer 10-class head fitted to near-zero loss, scores vs
exact influence reach Spearman ~0.44). So B is then refined by ``cg_iters`` (default CG_ITERS) steps
of conjugate gradients on X H_tt = P_W F_Wt, preconditioned by the Kronecker inverse, with exact
Hessian-vector products over theta on the finetuning set (forward-over-reverse, batch by batch):
Spearman 0.97 after the default 5 steps (tests/test_head_curvature.py; 0.91 after 2 in a one-off
check). Each step costs k_W HVPs over the finetuning set; the final relative residual (max over
rows of ||P_W F_Wt - B H_tt|| / ||P_W F_Wt||) goes into the operator's info.

Statistics for kfac / ekfac: the Gauss-Newton matrix when the task defines
``finetune_fisher_losses(model, batch)`` (pseudo-losses whose gradients' outer products sum to
J^T H_out J; for cross-entropy ``msif_index.cross_entropy_fisher_losses``), otherwise the empirical
Fisher of the finetuning targets. At a well-fit finetuned optimum the empirical Fisher is much
smaller than H_tt, so define the hook (tests/test_head_curvature.py measures both).
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from .autodiff import FlatParams, dense_hessian
from .data import batches, move
from .errors import ConfigError, TooLargeError
from .exact import rounding_tolerance
from .gradients import GradientProjector
from .preconditioners import make_preconditioner, negative_eigenvalues
from .progress import progress
from .task import MultiStageTask, fisher_loss_columns, has_finetune_fisher_losses

H_TT_CHOICES = ("auto", "dense", "kfac", "ekfac")
#: H_tt is factored densely (h_tt='auto') up to this many theta parameters
MAX_DENSE_THETA = 8192
#: CG steps that refine a Kronecker-factored H_tt^{-1} (see the module docstring)
CG_ITERS = 5
#: entries of one block of per-example statistics rows held at once
_ROW_ENTRIES = 1 << 23
_F64 = torch.float64


def resolve_h_tt(h_tt: str, d_theta: int) -> str:
    """The H_tt method ``h_tt`` means for a head of ``d_theta`` parameters (see the module docstring)."""
    if h_tt not in H_TT_CHOICES:
        raise ConfigError(f"unknown h_tt {h_tt!r}; choose one of {', '.join(H_TT_CHOICES)}")
    if h_tt == "auto":
        return "dense" if d_theta <= MAX_DENSE_THETA else "ekfac"
    if h_tt == "dense" and d_theta > MAX_DENSE_THETA:
        raise TooLargeError(f"the finetuning head has {d_theta} parameters; dense H_tt is limited to "
                            f"{MAX_DENSE_THETA}; use h_tt='ekfac' (Kronecker factors) or 'auto'")
    return h_tt


class HeadCurvature:
    """H_tt^{-1} (approximate or exact) as a map on rows: ``solve_rows(R) = R H_tt^{-1}``."""

    kind = "dense"

    def __init__(self) -> None:
        self.info: dict[str, Any] = {}

    def solve_rows(self, rows: torch.Tensor) -> torch.Tensor:  # pragma: no cover - interface
        """R [r, d_theta] (flat theta order) -> R H_tt^{-1} [r, d_theta] (H_tt is symmetric)."""
        raise NotImplementedError


class DenseHeadCurvature(HeadCurvature):
    """The exact H_tt + wd I from forward-over-reverse HVPs, factored by eigh and damped."""

    kind = "dense"

    def __init__(self, f_theta: Callable[[torch.Tensor], torch.Tensor], x_theta: torch.Tensor,
                 weight_decay: float, damping: float = 0.0):
        super().__init__()
        d = x_theta.numel()
        h = dense_hessian(f_theta, x_theta).to(_F64) + weight_decay * torch.eye(d, dtype=_F64)
        evals, evecs = torch.linalg.eigh(h)
        lam = damping * float(evals.mean())
        self.inv = (evecs / (evals + lam)) @ evecs.T
        self.info = {"h_tt": "dense", "h_tt_damping": lam, "h_tt_min_eig": float(evals.min()),
                     "h_tt_negative": negative_eigenvalues(evals, 0.0, noise=rounding_tolerance(x_theta.dtype),
                                                           clamped=False)}

    def solve_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.to(_F64) @ self.inv


class KroneckerHeadCurvature(HeadCurvature):
    """Block-diagonal (E)K-FAC of H_tt over the head's modules, fitted on the finetuning set."""

    def __init__(self, task: MultiStageTask, model: nn.Module, theta: list[str], kind: str = "ekfac",
                 damping: float = 1e-3, batch_size: int = 256, show: bool | None = None):
        super().__init__()
        if kind not in ("kfac", "ekfac"):
            raise ConfigError(f"Kronecker H_tt must be 'kfac' or 'ekfac', got {kind!r}")
        self.kind = kind
        dtype = next(model.parameters()).dtype
        modules = dict(model.named_modules())
        self.projector = GradientProjector(model, theta, proj_dim=None, dtype=dtype, device="cpu",
                                           dense_modules=[m for m in task.dense_modules if m in modules])
        big = [b for b in self.projector.blocks if not b.kronecker and b.numel > MAX_DENSE_THETA]
        if big:
            raise TooLargeError(f"head parameter {big[0].name} ({big[0].numel} entries) is not in an nn.Linear, "
                                f"nn.Conv2d or nn.Embedding, so it needs a dense block, limited to "
                                f"{MAX_DENSE_THETA} entries")
        self.perm = block_permutation(model, theta, self.projector.blocks)
        self.inv_perm = torch.argsort(self.perm)
        blocks = self.projector.blocks
        self.pre = make_preconditioner(kind, blocks, [True] * len(blocks), damping,
                                       float(task.finetune_weight_decay), None)
        gauss_newton = has_finetune_fisher_losses(task)
        data = task.finetune_dataset()
        m = len(data)  # type: ignore[arg-type]
        if gauss_newton:
            probe = move(next(iter(batches(data, 1)))[1], dtype=dtype)
            losses = fisher_loss_columns(task.finetune_fisher_losses, model, probe, "finetune_fisher_losses")
        else:
            losses = [task.finetune_loss]
        step = max(1, min(batch_size, _ROW_ENTRIES // max(1, self.projector.dim)))
        total = self.pre.passes * m * len(losses)
        with progress(total, f"attach: {kind} H_tt statistics", enabled=show) as advance:
            def row_blocks():
                for loss in losses:
                    for _, batch in batches(data, step):
                        rows = self.projector.project_batch(loss, move(batch, dtype=dtype)).detach()
                        advance(rows.shape[0])
                        yield rows
            self.pre.fit(row_blocks, m)
        self.info = {"h_tt": kind, "h_tt_statistics": "gauss-newton" if gauss_newton else "empirical",
                     "h_tt_damping": dict(self.pre.damping_used), "h_tt_blocks": [b.name for b in blocks]}

    def solve_rows(self, rows: torch.Tensor, chunk: int = 256) -> torch.Tensor:
        out = torch.empty_like(rows)
        for s in range(0, rows.shape[0], chunk):
            block_layout = rows[s:s + chunk][:, self.perm].to(self.projector.dtype)
            out[s:s + chunk] = self.pre.apply(block_layout)[:, self.inv_perm].to(rows.dtype)
        return out


def block_permutation(model: nn.Module, theta: list[str], blocks) -> torch.Tensor:
    """perm[j] = the flat theta coordinate (FlatParams order) at column j of the unprojected
    ``blocks`` of theta: the vector 0, 1, 2, ... projected through those permutation-only blocks."""
    flat = FlatParams(model, theta)
    ident = GradientProjector.from_blocks(model, theta, blocks, seed=0, dtype=_F64, check=False)
    perm = ident.project_dense(flat.as_dict(torch.arange(flat.dim, dtype=_F64)))[0].round().long()
    if not torch.equal(perm.sort().values, torch.arange(flat.dim)):
        raise RuntimeError("internal error: the theta blocks are not a permutation of theta")
    return perm


def conjugate_gradient_rows(rows: torch.Tensor, hvp_rows: Callable[[torch.Tensor], torch.Tensor],
                            precondition: Callable[[torch.Tensor], torch.Tensor], iters: int,
                            show: bool | None = None, block_rows: int = 256
                            ) -> tuple[torch.Tensor, dict[str, Any]]:
    """X ~ rows H^{-1} by ``iters`` steps of preconditioned CG per row, started at precondition(rows),
    ``block_rows`` rows at a time (memory: five blocks of rows besides X).

    ``hvp_rows(V) = V H`` (H symmetric; positive definite at a finetuned minimum),
    ``precondition(V) ~ V H^{-1}`` (positive definite). A row stops early once its residual is at
    rounding level, or when it meets a direction of non-positive curvature (H not positive definite:
    the head is not at a minimum), keeping its iterate. Rows that are 0 stay 0. Returns X and
    {cg_iters, cg_residual: max over rows of ||rows - X H|| / ||rows||, cg_negative_curvature: rows
    stopped by non-positive curvature}.
    """
    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return (a * b).sum(1, keepdim=True)

    tiny = torch.finfo(rows.dtype).tiny
    tol = 16 * torch.finfo(rows.dtype).eps
    out = torch.empty_like(rows)
    worst, negative = 0.0, 0
    starts = range(0, rows.shape[0], block_rows)
    with progress(len(starts) * (iters + 1), "attach: CG refinement of H_tt^{-1}", unit="step",
                  enabled=show) as advance:
        for s0 in starts:
            b = rows[s0:s0 + block_rows]
            b_norm = b.norm(dim=1, keepdim=True)
            x = precondition(b)
            r = b - hvp_rows(x)
            advance(1)
            z = precondition(r)
            p = z.clone()
            rz = dot(r, z)
            active = r.norm(dim=1, keepdim=True) > tol * b_norm
            bent = torch.zeros_like(active)
            for _ in range(iters):
                if not bool(active.any()):
                    advance(1)
                    continue
                hp = hvp_rows(p)
                php = dot(p, hp)
                bent |= active & (php <= 0)
                active &= php > 0
                a = torch.where(active, rz / php.clamp_min(tiny), torch.zeros_like(rz))
                x.add_(a * p)
                r.sub_(a * hp)
                z = precondition(r)
                rz_new = dot(r, z)
                beta = torch.where(active, rz_new / rz.clamp_min(tiny), torch.zeros_like(rz))
                p = z + beta * p
                rz = rz_new
                active &= r.norm(dim=1, keepdim=True) > tol * b_norm
                advance(1)
            out[s0:s0 + block_rows] = x
            negative += int(bent.sum())
            worst = max(worst, float((r.norm(dim=1) / b.norm(dim=1).clamp_min(tiny)).max()))
    return out, {"cg_iters": iters, "cg_residual": worst, "cg_negative_curvature": negative}

"""Exact multi-stage influence with dense Hessians (MATH.md), the ground truth for small models.

    DW(z)   = - [ H_G^{-1} grad_{(W,U)} g(z) ]_W                          (stage 1)
    frozen:   v_t = grad_W l - F_Wt H_tt^{-1} grad_theta l                (stage 2a)
    proximal: v_t = alpha [ K^{-1} grad_{(theta,W)} l ]_W,  K = d2F/d(theta,W)2 + diag(0, alpha I)
    I(z, x_t) = v_t . DW(z)

Sign convention: I(z, x_t) = d l(x_t) / d eps for up-weighting z by eps in pretraining.
I < 0: z is helpful (a proponent); I > 0: z is harmful (an opponent). Removing z changes the
test measurement by about -I / n.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from .autodiff import FlatParams, batched_objective, dense_hessian, per_example_grads
from .data import BATCH_FORM, batch_size_of, batches, move
from .errors import ConfigError, ShapeError, TooLargeError, forward_ad_errors, python_api
from .preconditioners import NOT_A_MINIMUM_ADVICE, negative_eigenvalues
from .task import FINETUNING_STYLES, MultiStageTask, require_shared_parameters, require_task, split_parameters
from .warn import warn_user

#: dense Hessians above this many parameters are refused
MAX_EXACT_PARAMS = 20_000
_DTYPE = torch.float64


def _as_float64(model: nn.Module) -> nn.Module:
    """A float64 copy on the CPU, in eval mode: exact influence is a small model's dense algebra (the
    task's datasets give CPU batches, moved there too)."""
    m = copy.deepcopy(model).to(device="cpu", dtype=_DTYPE)
    m.eval()
    return m


def _check_size(dim: int, what: str, limit: int) -> None:
    if dim > limit:
        raise TooLargeError(
            f"exact influence needs a dense {dim}x{dim} Hessian of {what} (limit {limit} parameters); "
            f"use the index instead: msif build-index --preconditioner ekfac (or gauss-newton)")


#: up to this many parameters the negative eigenvalues of a Hessian that is not positive definite
#: are counted, and their smallest and largest given, by an eigendecomposition (about 6 s at 2,000
#: on a 2-core CPU, and cubic); above it an LDL^T factorization counts them (about 6x a Cholesky
#: factorization's time, 5x faster than the eigendecomposition at 3,000), without their sizes
MAX_EIGEN_COUNT = 2048


def negative_inertia(matrix: torch.Tensor) -> int:
    """How many eigenvalues of the symmetric ``matrix`` are negative, by Sylvester's law of inertia:
    its Bunch-Kaufman factorization P A P^T = L D L^T has D congruent to A, so D's 1 x 1 blocks count
    by their sign and each 2 x 2 block by its determinant (negative: one of each sign) and trace."""
    ld, pivots, _ = torch.linalg.ldl_factor_ex(matrix, hermitian=False)   # info > 0: a zero pivot, countable
    diag = torch.diagonal(ld).tolist()
    sub = torch.diagonal(ld, -1).tolist()
    piv = pivots.tolist()
    count, i, d = 0, 0, len(diag)
    while i < d:
        if piv[i] > 0 or i + 1 == d:          # a 1 x 1 block (LAPACK: a negative pivot starts a 2 x 2 one)
            count += diag[i] < 0
            i += 1
        else:
            det = diag[i] * diag[i + 1] - sub[i] * sub[i]
            count += 1 if det < 0 else (2 if det > 0 and diag[i] + diag[i + 1] < 0 else 0)
            i += 2
    return int(count)


def rounding_tolerance(dtype: torch.dtype) -> float:
    """Relative size (x the largest eigenvalue) below which a negative eigenvalue of a Hessian computed
    in ``dtype`` is rounding, not curvature: 1e-9 for float64, 1e-5 for float32 (about 100 x its
    machine epsilon: an exactly singular H_tt, a linear head's without weight decay, showed
    -2.3e-8 x the largest in float32)."""
    return 1e-9 if dtype == torch.float64 else 1e-5


def negative_curvature(hessian: torch.Tensor, rel_tol: float = 1e-9) -> dict | None:
    """The negative eigenvalues of a dense symmetric Hessian beyond rounding, as ``negative_eigenvalues``
    records them (no damping, not clamped), or None.

    A Cholesky factorization of ``hessian + tol I`` decides (``tol`` = ``rel_tol`` (1e-9; see
    ``rounding_tolerance`` for a Hessian from float32 products) x its largest absolute
    row sum, a bound on its eigenvalues: rounding in a singular positive semidefinite Hessian is
    not reported). It costs about what the solves that follow it in exact influence cost; only a
    matrix it refuses gets counted: an eigendecomposition up to ``MAX_EIGEN_COUNT`` rows, the inertia
    of an LDL^T factorization of the same shifted matrix above (the eigenvalues below -tol; min and
    largest None)."""
    hessian = hessian.detach()
    d = hessian.shape[0]
    scale = float(hessian.abs().sum(1).max()) if d else 0.0
    if not (math.isfinite(scale) and scale > 0):
        return None
    shifted = hessian + rel_tol * scale * torch.eye(d, dtype=hessian.dtype, device=hessian.device)
    if int(torch.linalg.cholesky_ex(shifted).info) == 0:
        return None
    if d <= MAX_EIGEN_COUNT:
        return negative_eigenvalues(torch.linalg.eigvalsh(hessian), 0.0, noise=rel_tol, clamped=False)
    count = negative_inertia(shifted)
    if count == 0:                            # the Cholesky factorization's refusal was rounding at -tol
        return None
    return {"count": count, "of": d, "min": None, "largest": None, "damping": 0.0, "damping_needed": None,
            "clamped": False}


def negative_text(neg: dict) -> str:
    """'19 of 728 negative eigenvalues (down to -0.0773, the largest is 41.2)', or the LDL^T count's."""
    if neg["min"] is not None:
        return (f"{neg['count']} of {neg['of']} negative eigenvalues (down to {neg['min']:.3g}, the largest is "
                f"{neg['largest']:.3g})")
    return (f"{neg['count']} of {neg['of']} negative eigenvalues (counted by an LDL^T factorization; their sizes "
            f"take an eigendecomposition, not done above MAX_EIGEN_COUNT = {MAX_EIGEN_COUNT} parameters)")


def check_minimum(hessian: torch.Tensor, what: str, model: str) -> dict | None:
    """RuntimeWarning when the dense Hessian of an objective (``what``) has negative eigenvalues
    (``negative_curvature``): its ``model`` is then not at a minimum, and the exact formula's value
    there (a saddle point) is not the influence retraining measures. The warning points at the first
    caller outside msif_index. Returns ``negative_curvature``'s record, or None."""
    neg = negative_curvature(hessian)
    if neg:
        warn_user(f"exact influence: {what} has {negative_text(neg)}: the {model} model is not at a minimum of its "
                  f"objective, which influence assumes, so the exact scores are the formula's value at a saddle "
                  f"point and may not track retraining: {NOT_A_MINIMUM_ADVICE}")
    return neg


@dataclass
class PretrainSide:
    """Stage 1 quantities at (W*, U*), in float64."""

    hessian: torch.Tensor        # H_G over (W, U), [d_WU, d_WU]
    grads: torch.Tensor          # grad_{(W,U)} g(z_i), [n, d_WU]
    displacements: torch.Tensor  # DW(z_i) = -[H_G^{-1} grad g(z_i)]_W, [n, d_W]
    w_names: list[str]
    u_names: list[str]


@forward_ad_errors("exact influence (dense Hessians)")
def pretrain_side(task: MultiStageTask, pretrained: nn.Module | None = None, batch_size: int = 512,
                  max_params: int = MAX_EXACT_PARAMS) -> PretrainSide:
    """H_G, per-example gradients and DW(z) for every pretraining example, exactly."""
    model = _as_float64(pretrained if pretrained is not None else task.pretrained_model())
    w, u = split_parameters(task, model)
    hessian, flat, data = _pretrain_hessian(task, model, w + u, batch_size, max_params)
    check_minimum(hessian, "the pretraining Hessian H_G (over W and U)", "pretrained")
    x = flat.get()
    f = flat.loss(task.pretrain_loss)
    grads = torch.cat([per_example_grads(f, x, b) for b in data])
    solved = torch.linalg.solve(hessian, grads.T).T      # H_G^{-1} grad g(z_i), rows
    d_w = sum(flat.sizes[: len(w)])
    return PretrainSide(hessian, grads, -solved[:, :d_w], w, u)


def _pretrain_hessian(task: MultiStageTask, model: nn.Module, names: list[str], batch_size: int,
                      max_params: int, advance: Callable[[int], None] | None = None
                      ) -> tuple[torch.Tensor, FlatParams, list]:
    """H_G over ``names`` of the float64 ``model`` (mean pretraining loss plus its weight decay), with
    the flat parameters and the float64 batches."""
    flat = FlatParams(model, names)
    _check_size(flat.dim, "the pretraining objective over (W, U)", max_params)
    dataset = task.pretrain_dataset()
    data = [move(b, device="cpu", dtype=_DTYPE) for _, b in batches(dataset, batch_size)]
    mean_loss = batched_objective(flat.loss(task.pretrain_loss), data, len(dataset))  # type: ignore[arg-type]
    hessian = dense_hessian(mean_loss, flat.get(), advance=advance)       # the model is a CPU copy (_as_float64)
    hessian += float(task.pretrain_weight_decay) * torch.eye(flat.dim, dtype=_DTYPE)
    return hessian, flat, data


@forward_ad_errors("the pretraining Hessian")
def pretrain_hessian(task: MultiStageTask, pretrained: nn.Module | None = None, batch_size: int = 512,
                     max_params: int = MAX_EXACT_PARAMS, advance: Callable[[int], None] | None = None
                     ) -> torch.Tensor:
    """H_G over (W, U) at the pretrained model, dense, float64 (no check of its eigenvalues;
    ``advance(rows)`` as its rows are computed)."""
    model = _as_float64(pretrained if pretrained is not None else task.pretrained_model())
    w, u = split_parameters(task, model)
    return _pretrain_hessian(task, model, w + u, batch_size, max_params, advance)[0]


def _finetune_loss_hessian(task: MultiStageTask, model: nn.Module, names: list[str], what: str, batch_size: int,
                           max_params: int, advance: Callable[[int], None] | None = None
                           ) -> tuple[torch.Tensor, FlatParams]:
    """The dense float64 Hessian over ``names`` of the finetuning loss's mean over the finetuning set,
    without weight decay or proximal term, at ``model``; and the flat view it was taken over."""
    flat = FlatParams(model, names)
    _check_size(flat.dim, what, max_params)
    dataset = task.finetune_dataset()
    data = [move(b, device="cpu", dtype=_DTYPE) for _, b in batches(dataset, batch_size)]
    h = dense_hessian(batched_objective(flat.loss(task.finetune_loss), data, len(dataset)), flat.get(),  # type: ignore[arg-type]
                      advance=advance)
    return h, flat


@forward_ad_errors("the finetuning Hessian")
def finetune_objective_hessian(task: MultiStageTask, finetuned: nn.Module | None = None, batch_size: int = 512,
                               max_params: int = MAX_EXACT_PARAMS, advance: Callable[[int], None] | None = None
                               ) -> torch.Tensor:
    """The Hessian of the finetuning objective over what finetuning trains, dense, float64: H_tt over
    theta (frozen), K over (theta, W) with the proximal term's alpha I on W (proximal)."""
    model = _as_float64(finetuned if finetuned is not None else task.finetuned_model())
    w, theta = split_parameters(task, model)
    frozen = task.finetuning == "frozen"
    h, flat = _finetune_loss_hessian(task, model, theta if frozen else theta + w,
                                     "the finetuning objective over " + ("theta" if frozen else "(theta, W)"),
                                     batch_size, max_params, advance)
    d_theta = sum(flat.sizes[: len(theta)])
    diag = torch.full((flat.dim,), float(task.finetune_weight_decay), dtype=_DTYPE)
    diag[d_theta:] = float(task.alpha)                  # proximal: alpha/2 ||W - W*||^2
    return h + torch.diag(diag)


@dataclass
class FinetuneSide:
    """Stage 2 quantities at the finetuned point (theta_hat, W_hat), in float64."""

    hessian: torch.Tensor      # d2F/d(theta, W)2 (finetuning objective incl. its weight decay)
    theta_names: list[str]
    w_names: list[str]
    d_theta: int


@forward_ad_errors("exact influence (dense Hessians)")
def finetune_side(task: MultiStageTask, finetuned: nn.Module, batch_size: int = 512,
                  max_params: int = MAX_EXACT_PARAMS) -> tuple[FinetuneSide, FlatParams]:
    """The finetuning Hessian over (theta, W) at the finetuned model."""
    w, theta = split_parameters(task, finetuned)
    h, flat = _finetune_loss_hessian(task, finetuned, theta + w, "the finetuning objective over (theta, W)",
                                     batch_size, max_params)
    d_theta = sum(flat.sizes[: len(theta)])
    wd = float(task.finetune_weight_decay)
    h[:d_theta, :d_theta] += wd * torch.eye(d_theta, dtype=_DTYPE)
    return FinetuneSide(h, theta, w, d_theta), flat


def chained_test_vectors(task: MultiStageTask, test_batch: Any, finetuned: nn.Module | None = None,
                         finetuning: str | None = None, alpha: float | None = None,
                         max_params: int = MAX_EXACT_PARAMS) -> torch.Tensor:
    """v_t for each test point, [Q, d_W] (frozen or proximal, MATH.md stage 2)."""
    style = finetuning or task.finetuning
    if style not in FINETUNING_STYLES:
        raise ConfigError(f"finetuning must be 'frozen' or 'proximal', got {style!r}")
    a = float(alpha if alpha is not None else task.alpha) if style == "proximal" else 0.0
    if style == "proximal" and not (math.isfinite(a) and a > 0):
        raise ConfigError(f"proximal finetuning needs alpha > 0 (the proximal strength), got {a!r}")
    model = _as_float64(finetuned if finetuned is not None else task.finetuned_model())
    side, flat = finetune_side(task, model, max_params=max_params)
    batch = move(test_batch, device="cpu", dtype=_DTYPE)
    g = per_example_grads(flat.loss(task.measurement), flat.get(), batch)   # [Q, d_theta + d_W]
    dt = side.d_theta
    h = side.hessian
    if style == "frozen":
        h_tt, f_wt = h[:dt, :dt], h[dt:, :dt]
        check_minimum(h_tt, "the finetuning Hessian H_tt (over theta)", "finetuned")
        return g[:, dt:] - (f_wt @ torch.linalg.solve(h_tt, g[:, :dt].T)).T
    k = h.clone()
    k[dt:, dt:] += a * torch.eye(h.shape[0] - dt, dtype=_DTYPE)
    check_minimum(k, "the proximal finetuning Hessian K (over theta and W, alpha I added on W)", "finetuned")
    return a * torch.linalg.solve(k, g.T).T[:, dt:]


@python_api
def exact_influence(task: MultiStageTask, test_batch: Any, pretrained: nn.Module | None = None,
                    finetuned: nn.Module | None = None, finetuning: str | None = None,
                    alpha: float | None = None, max_params: int = MAX_EXACT_PARAMS) -> torch.Tensor:
    """I(z_i, x_t) for every test point and pretraining example, [Q, n], float64, exactly.

    I(z, x_t) = d l(x_t) / d eps of up-weighting z by eps in pretraining (then finetuning as
    the task does). I < 0: helpful (a proponent); I > 0: harmful (an opponent).
    ``finetuning``/``alpha`` override the task's settings (e.g. to compare styles).
    """
    if pretrained is None and finetuned is None:
        require_shared_parameters(task)
    else:
        require_task(task)
    test_batch = move(test_batch)                 # numpy arrays: tensors
    try:
        batch_size_of(test_batch)
    except ValueError as e:
        raise ShapeError(f"the test batch holds no tensors ({e}): {BATCH_FORM}") from None
    v = chained_test_vectors(task, test_batch, finetuned, finetuning, alpha, max_params)   # checks the style first
    pre = pretrain_side(task, pretrained, max_params=max_params)
    return v @ pre.displacements.T

"""Full-batch training to convergence (L-BFGS, then Newton polish on small models).

Used by the example tasks and by retraining checks: the influence formulas hold at an optimum, so
small reference pipelines are trained until the gradient vanishes to float64 precision.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .autodiff import FlatParams, LossFn, batched_objective, dense_hessian
from .warn import warn_user


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """torch's CPU threads set to ``n`` inside the block, restored after. ``torch_threads(1)`` makes
    training bitwise reproducible from one process to the next: with two threads the order of
    floating-point sums can change (last bits of the weights, and with them their fingerprint)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fit(model: nn.Module, names: Sequence[str], loss_fn: LossFn, data: Sequence[Any], n: int,
        weights: Sequence[torch.Tensor] | None = None, l2: float | torch.Tensor = 0.0,
        center: torch.Tensor | None = None, max_iter: int = 1000, newton_max_dim: int = 4000,
        grad_tol: float = 1e-11, warn: bool = True) -> float:
    """Minimize (1/n) sum_i w_i loss_i + 1/2 sum_c l2_c (x_c - center_c)^2 over ``names``, in place.

    ``data`` are batches covering the n examples; ``weights`` (one tensor per batch) default to 1.
    ``l2`` is a scalar or a per-coordinate vector; ``center`` defaults to zero. The model is trained
    in the mode it is in (call ``model.eval()`` first for the objective msif differentiates: batch
    norm on its running statistics, dropout off). Returns the final
    gradient norm. Starts from the model's current values (warm start). When that norm is still above
    ``grad_tol`` (ill-conditioned models, too few iterations), a RuntimeWarning says so, since the
    influence formulas hold at an optimum; ``warn=False`` for a deliberately budgeted call.
    """
    flat = FlatParams(model, names)
    f = flat.loss(loss_fn)
    data_term = batched_objective(f, data, n, weights)
    x0 = flat.get()
    l2_t = torch.as_tensor(l2, dtype=x0.dtype)
    c = torch.zeros_like(x0) if center is None else center.to(x0)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return data_term(x) + 0.5 * (l2_t * (x - c) ** 2).sum()

    newton = flat.dim <= newton_max_dim
    x = x0.clone().requires_grad_(True)
    # with a Newton polish to follow, L-BFGS only needs to reach Newton's region of fast convergence
    opt = torch.optim.LBFGS([x], lr=1, max_iter=max_iter, tolerance_grad=max(grad_tol, 1e-7) if newton else grad_tol,
                            tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        val = objective(x)
        val.backward()
        return val

    opt.step(closure)
    x = x.detach()
    gnorm = _grad_norm(objective, x)
    if newton:
        for _ in range(8):
            if gnorm < grad_tol:
                break
            x, gnorm = _newton_step(objective, x)
    flat.set(x)
    if warn and not gnorm <= grad_tol:
        warn_user(f"fit stopped at gradient norm {gnorm:.1e}, above grad_tol={grad_tol:.0e} (L-BFGS, "
                  f"max_iter={max_iter}{', then Newton steps' if newton else ''}): influence assumes an "
                  f"optimum; call fit again (it continues from here), raise max_iter, or add l2")
    return gnorm


def _grad_norm(objective, x: torch.Tensor) -> float:
    return float(torch.func.grad(objective)(x).detach().norm())


def _newton_step(objective, x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One damped Newton step with backtracking; keeps x if nothing decreases the gradient."""
    g = torch.func.grad(objective)(x)
    h = dense_hessian(objective, x)
    step = torch.linalg.solve(h, g)
    g0 = float(g.detach().norm())
    t = 1.0
    for _ in range(20):
        cand = x - t * step
        gn = _grad_norm(objective, cand)
        if gn < g0:
            return cand, gn
        t *= 0.5
    return x, g0

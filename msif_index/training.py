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


#: L-BFGS then Newton rounds at most: a round ends at a minimum, or where the polish found negative
#: curvature and stepped down along it (then L-BFGS again from there)
MAX_ROUNDS = 6


#: Lanczos steps (HVPs) of fit's saddle check above newton_max_dim (its default): the extreme
#: eigenvalues converge first, but the small end of a wide spectrum slowly (see _lanczos_extremes)
LANCZOS_STEPS = 40


def fit(model: nn.Module, names: Sequence[str], loss_fn: LossFn, data: Sequence[Any], n: int,
        weights: Sequence[torch.Tensor] | None = None, l2: float | torch.Tensor = 0.0,
        center: torch.Tensor | None = None, max_iter: int = 1000, newton_max_dim: int = 4000,
        grad_tol: float = 1e-11, warn: bool = True, lanczos_steps: int = LANCZOS_STEPS) -> float:
    """Minimize (1/n) sum_i w_i loss_i + 1/2 sum_c l2_c (x_c - center_c)^2 over ``names``, in place.

    ``data`` are batches covering the n examples; ``weights`` (one tensor per batch) default to 1.
    ``l2`` is a scalar or a per-coordinate vector; ``center`` defaults to zero. The model is trained
    in the mode it is in (call ``model.eval()`` first for the objective msif differentiates: batch
    norm on its running statistics, dropout off). Returns the final
    gradient norm. Starts from the model's current values (warm start). When that norm is still above
    ``grad_tol`` (ill-conditioned models, too few iterations), a RuntimeWarning says so, since the
    influence formulas hold at an optimum; ``warn=False`` for a deliberately budgeted call.

    Up to ``newton_max_dim`` parameters, L-BFGS is followed by Newton steps on the dense Hessian,
    which also tell a minimum from a saddle point (where L-BFGS, and Newton's own steps, can stop
    with a vanishing gradient): where the Hessian has negative eigenvalues the polish takes a
    saddle-free Newton step (|H|^-1 g) and a step along the most negative curvature, each kept only
    if it lowers the objective; when L-BFGS had converged there (a saddle point), it runs again from
    the lower point (``max_iter`` per run, at most ``MAX_ROUNDS`` runs). When L-BFGS instead used up
    ``max_iter``, no further run is made, and the step down is kept only if it does not raise the
    gradient norm. A fit that still ends where the Hessian has negative eigenvalues warns, whatever
    its gradient. Above ``newton_max_dim`` a saddle is not stepped down from, but up to
    ``lanczos_steps`` Hessian-vector products (Lanczos) estimate the Hessian's extreme eigenvalues,
    and a clearly negative one warns (``warn=False`` or ``lanczos_steps=0`` skips them). That check
    can miss a negative eigenvalue that is tiny against the largest one (a wide spectrum needs more
    steps: a trial's transformer needed 150), so its silence does not prove a minimum.
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
    start = float(objective(x0).detach()) if warn else None
    x, negative = x0.clone(), 0
    rounds = MAX_ROUNDS if newton else 1
    tol = max(grad_tol, 1e-7) if newton else grad_tol
    lanczos = None
    for r in range(rounds):
        x = _lbfgs(objective, x, max_iter, tol)
        gnorm = _grad_norm(objective, x)
        if not newton:
            if warn and lanczos_steps > 0:   # no dense Hessian: Lanczos estimates its extreme eigenvalues
                noise = _lanczos_noise(x.dtype)
                lanczos = _lanczos_extremes(objective, x, lanczos_steps, noise=noise)
                negative = int(lanczos[0] < -noise * max(abs(lanczos[0]), abs(lanczos[1])))
            break
        x_next, g_next, negative, escaped = _polish(objective, x, gnorm, grad_tol)
        if not escaped:                                 # a minimum, or no step lowers the objective
            x, gnorm = x_next, g_next
            break
        if gnorm > 10 * tol:
            # L-BFGS used up max_iter short of a stationary point: the budget is spent. A step down
            # along negative curvature lowers the objective but can raise the gradient norm a
            # hundredfold (a new-user trial's transformer: 0.037 -> 11-33): keep it only if it does not
            if g_next <= gnorm:
                x, gnorm = x_next, g_next
            break
        if r + 1 < rounds:           # stuck where the curvature is negative: down, then L-BFGS again
            x = x_next
        # else: the last round's L-BFGS point stays, and ``negative`` says where it stopped
    flat.set(x)
    stalled = ""
    if warn and not gnorm <= grad_tol:       # (a saddle whose gradient vanished is not a kink)
        end = float(objective(x).detach())
        if not end < start - 1e-12 * max(1.0, abs(start)):
            # nothing gained in this call, yet no stationary minimum: typical of a kink (relu, max)
            stalled = (f"; the objective did not decrease in this call ({start:.10g} -> {end:.10g}): the "
                       f"model may not be differentiable there (ReLU-type activations, max-pooling: at a "
                       f"kink the gradient need not vanish and the Hessian misleads), so calling fit again "
                       f"will not help; use a smooth activation (SiLU, GELU, Softplus) for an exact minimum")
    if warn and negative and lanczos is not None:
        warn_user(f"fit stopped where the Hessian has a negative eigenvalue (about {lanczos[0]:.3g}, the largest "
                  f"about {lanczos[1]:.3g}: {lanczos[2]} Lanczos steps, as {flat.dim} parameters are above "
                  f"newton_max_dim={newton_max_dim}; gradient norm {gnorm:.1e}): a saddle point or a nonconvex "
                  f"region, so the model is not at a minimum, which influence assumes"
                  + (stalled or "; train longer first (e.g. Adam with a decaying learning rate), start elsewhere, "
                                "add l2, or raise newton_max_dim so that fit steps down from it"))
    elif warn and negative:
        warn_user(f"fit stopped where the Hessian has {negative} negative eigenvalue(s) (gradient norm {gnorm:.1e}): "
                  f"a saddle point or a nonconvex region, so the model is not at a minimum, which influence "
                  f"assumes" + (stalled or "; call fit again, train longer first (e.g. Adam with a decaying "
                                           "learning rate), start elsewhere, or add l2"))
    elif warn and not gnorm <= grad_tol:
        warn_user(f"fit stopped at gradient norm {gnorm:.1e}, above grad_tol={grad_tol:.0e} (L-BFGS, "
                  f"max_iter={max_iter}{', then Newton steps' if newton else ''}): influence assumes an "
                  f"optimum" + (stalled or "; call fit again (it continues from here), raise max_iter, or add l2"))
    return gnorm


def _lanczos_noise(dtype: torch.dtype) -> float:
    """How far below zero, relative to the largest eigenvalue magnitude, an estimate may fall by
    rounding alone (the HVPs' relative error: float64, float32, half precision)."""
    return {torch.float64: 1e-8, torch.float32: 1e-4}.get(dtype, 1e-2)


def _lanczos_extremes(objective, x: torch.Tensor, steps: int = LANCZOS_STEPS, seed: int = 0,
                      noise: float | None = None) -> tuple[float, float, int]:
    """(smallest, largest) eigenvalue of the Hessian of ``objective`` at ``x``, estimated by Lanczos
    with full reorthogonalization over at most ``steps`` HVPs (float64 recurrences) from a seeded
    start, and the number of HVPs taken: the Ritz values of T = Q^T H Q lie inside
    [lambda_min, lambda_max] and approach both ends first, so a negative smallest one proves a
    negative eigenvalue; with ``noise``, the run stops as soon as the smallest falls below
    -noise x the largest magnitude. The small end of a wide spectrum converges slowly: a negative
    eigenvalue 2e-5 of the largest took 150 steps to show in a trial (40 gave +0.05)."""
    from .autodiff import hvp
    d = x.numel()
    steps = min(steps, d)
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(d, generator=g, dtype=torch.float64).to(x.device)
    qs = [q / q.norm()]
    alphas, betas = [], []
    for j in range(steps):
        w = hvp(objective, x, qs[j].to(x.dtype)).detach().to(torch.float64)
        alphas.append(float(w @ qs[j]))
        basis = torch.stack(qs)
        w = w - basis.T @ (basis @ w)
        w = w - basis.T @ (basis @ w)            # twice: full reorthogonalization
        beta = float(w.norm())
        if j + 1 == steps or beta <= 1e-12 * max(abs(a) for a in alphas):
            break                                # an invariant subspace: T's eigenvalues are exact
        if noise is not None and j >= 4:
            ritz = _ritz(alphas, betas)
            if ritz[0] < -noise * max(abs(ritz[0]), abs(ritz[-1])):
                break                            # a negative eigenvalue, proven: no need for more
        betas.append(beta)
        qs.append(w / beta)
    ritz = _ritz(alphas, betas)
    return float(ritz[0]), float(ritz[-1]), len(alphas)


def _ritz(alphas: list[float], betas: list[float]) -> torch.Tensor:
    """The eigenvalues (ascending) of the Lanczos tridiagonal T with diagonal ``alphas`` and the first
    len(alphas) - 1 of ``betas`` off the diagonal."""
    t = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if len(alphas) > 1:
        off = torch.tensor(betas[:len(alphas) - 1], dtype=torch.float64)
        t += torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(t)


def _lbfgs(objective, x0: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """L-BFGS (strong Wolfe line search) from ``x0``; with a Newton polish to follow, ``tol`` only
    needs to reach Newton's region of fast convergence."""
    x = x0.detach().clone().requires_grad_(True)
    opt = torch.optim.LBFGS([x], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-16,
                            history_size=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        val = objective(x)
        val.backward()
        return val

    opt.step(closure)
    return x.detach()


def _grad_norm(objective, x: torch.Tensor) -> float:
    return float(torch.func.grad(objective)(x).detach().norm())


def _polish(objective, x: torch.Tensor, gnorm: float, grad_tol: float, steps: int = 8
            ) -> tuple[torch.Tensor, float, int, bool]:
    """Newton steps while the Hessian is positive definite; (x, gradient norm, negative eigenvalues
    of the last Hessian, whether a step down along negative curvature was taken).

    A point that already meets ``grad_tol`` still gets its Hessian checked once: a vanishing gradient
    is also what a saddle point has."""
    checked = False
    for _ in range(steps):
        if gnorm < grad_tol and checked:
            break
        h = dense_hessian(objective, x)
        if int(torch.linalg.cholesky_ex(h).info) != 0:
            evals, evecs = torch.linalg.eigh(h)
            top = float(evals.abs().max())
            # rounding: 1e-9 of the largest in float64; float32's eigenvalues carry ~d x its eps of it
            noise = max(1e-9, 100 * h.shape[0] * torch.finfo(h.dtype).eps)
            negative = int((evals < -noise * top).sum())
            if negative:
                down = _descend(objective, x, evals, evecs)
                if down is None:
                    return x, gnorm, negative, False
                return down, _grad_norm(objective, down), negative, True
        checked = True
        if gnorm < grad_tol:
            break
        x_new, g_new = _newton_step(objective, x, h)
        if g_new >= gnorm:
            break
        x, gnorm = x_new, g_new
    return x, gnorm, 0, False


def _newton_step(objective, x: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, float]:
    """One damped Newton step with backtracking; keeps x if nothing decreases the gradient."""
    g = torch.func.grad(objective)(x)
    g0 = float(g.detach().norm())
    try:
        step = torch.linalg.solve(h, g)
    except torch.linalg.LinAlgError:        # exactly singular (e.g. float32 softmax without l2): no step
        return x, g0
    t = 1.0
    for _ in range(20):
        cand = x - t * step
        gn = _grad_norm(objective, cand)
        if gn < g0:
            return cand, gn
        t *= 0.5
    return x, g0


def _descend(objective, x: torch.Tensor, evals: torch.Tensor, evecs: torch.Tensor) -> torch.Tensor | None:
    """A point of lower objective where the Hessian ``evecs diag(evals) evecs^T`` has negative
    eigenvalues, or None: the saddle-free Newton step -|H|^-1 g (a descent direction whatever the
    signs), backtracked to an Armijo decrease, then from there a step along the most negative
    curvature's eigenvector v, turned downhill, of length s = 2^-j (j = 0..40) while
    f(x + s v) <= f(x) + 1e-4 s^2 lambda_min / 2 fails."""
    g = torch.func.grad(objective)(x).detach()
    f0 = float(objective(x))
    top = float(evals.abs().max())
    p = -(evecs @ ((evecs.T @ g) / evals.abs().clamp_min(1e-8 * top)))
    best, f_best = x, f0
    slope = float(g @ p)
    t = 1.0
    for _ in range(40):
        cand = x + t * p
        fc = float(objective(cand))
        if fc <= f0 + 1e-4 * t * slope and fc < f0:
            best, f_best = cand, fc
            break
        t *= 0.5
    v = evecs[:, 0]
    if float(torch.func.grad(objective)(best).detach() @ v) > 0:
        v = -v
    lam = float(evals[0])
    s = 1.0
    for _ in range(40):
        cand = best + s * v
        fc = float(objective(cand))
        if fc <= f_best + 1e-4 * 0.5 * s * s * lam and fc < f_best:
            best, f_best = cand, fc
            break
        s *= 0.5
    return best if f_best < f0 else None

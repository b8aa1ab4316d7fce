"""msif_index.training.fit: reaches the optimum the influence formulas assume, and says when it did not."""
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msif_index.training import fit


def _problem():
    torch.manual_seed(0)
    x = torch.randn(60, 5, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(60, dtype=torch.float64) > 0).long()
    model = nn.Linear(5, 2).double()
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    return model, loss, [(x, y)]


def _caught(**kw):
    model, loss, data = _problem()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gnorm = fit(model, ["weight", "bias"], loss, data, 60, l2=1e-2, **kw)
    return gnorm, [str(r.message) for r in rec if "fit stopped" in str(r.message)]


def test_fit_converges_silently():
    gnorm, msgs = _caught()
    assert gnorm <= 1e-11 and msgs == []


@pytest.mark.parametrize("warn", [True, False])
def test_fit_that_stops_short_warns_unless_told_not_to(warn):
    gnorm, msgs = _caught(max_iter=1, newton_max_dim=0, warn=warn)
    assert gnorm > 1e-11
    if warn:
        assert len(msgs) == 1 and f"{gnorm:.1e}" in msgs[0] and "call fit again" in msgs[0], msgs
    else:
        assert msgs == []


def _saddle_problem():
    """A two-layer tanh network at zero weights: the gradient vanishes exactly (each layer's gradient
    is multiplied by the other's zeros), and the Hessian's cross terms make it a saddle point."""
    torch.manual_seed(1)
    x = torch.randn(40, 3, dtype=torch.float64)
    y = torch.tanh(x @ torch.tensor([1.5, -1.0, 0.5], dtype=torch.float64))[:, None]
    model = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Tanh(), nn.Linear(4, 1, bias=False)).double()
    with torch.no_grad():
        for prm in model.parameters():
            prm.zero_()
    loss = lambda m, b: ((m(b[0]) - b[1]) ** 2).sum(1)  # noqa: E731
    return model, loss, [(x, y)]


def _objective_and_hessian(model, loss, data, l2):
    from msif_index.autodiff import FlatParams, batched_objective, dense_hessian
    flat = FlatParams(model, ["0.weight", "2.weight"])
    term = batched_objective(flat.loss(loss), data, 40)
    obj = lambda v: term(v) + 0.5 * l2 * (v ** 2).sum()  # noqa: E731
    x = flat.get()
    return float(obj(x)), torch.linalg.eigvalsh(dense_hessian(obj, x))


def test_fit_leaves_a_saddle_point_for_a_minimum():
    """Before, fit returned at once (gradient 0 <= grad_tol), silently, at the saddle."""
    model, loss, data = _saddle_problem()
    f_saddle, evals = _objective_and_hessian(model, loss, data, 1e-3)
    assert evals.min() < -0.1                                   # the start is a saddle point
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gnorm = fit(model, ["0.weight", "2.weight"], loss, data, 40, l2=1e-3)
    f_end, evals = _objective_and_hessian(model, loss, data, 1e-3)
    assert [str(r.message) for r in rec if "fit stopped" in str(r.message)] == []
    assert gnorm <= 1e-11 and f_end < 0.5 * f_saddle
    assert evals.min() > -1e-9 * evals.abs().max()               # a minimum: no negative curvature left


def test_fit_that_cannot_leave_negative_curvature_says_so(monkeypatch):
    import msif_index.training as T
    monkeypatch.setattr(T, "_descend", lambda *a: None)           # no step lowers the objective
    model, loss, data = _saddle_problem()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(model, ["0.weight", "2.weight"], loss, data, 40, l2=1e-3)
    mine = [r for r in rec if "fit stopped" in str(r.message)]
    assert len(mine) == 1 and "negative eigenvalue" in str(mine[0].message) and mine[0].filename == __file__
    assert "not at a minimum" in str(mine[0].message)           # what msif evaluate's note looks for


@pytest.mark.parametrize("l2", [1e-6, 0.0])
def test_a_convex_float32_fit_sees_no_saddle(l2):
    """float32 eigenvalues of an ill-conditioned convex Hessian go below zero by rounding (softmax's
    null space with l2 = 0, nearly collinear features): not negative curvature."""
    g = torch.Generator().manual_seed(2)
    base = torch.randn(80, 3, generator=g)
    x = torch.cat([base, base[:, :1] + 1e-4 * torch.randn(80, 1, generator=g)], 1)
    y = torch.randint(0, 3, (80,), generator=g)
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    for seed in range(4):
        torch.manual_seed(seed)
        model = nn.Linear(4, 3)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fit(model, ["weight", "bias"], loss, [(x, y)], 80, l2=l2)
        assert not [str(r.message) for r in rec if "negative eigenvalue" in str(r.message)], seed


def test_a_singular_hessian_stops_the_newton_polish_instead_of_raising():
    """float32 softmax regression without l2 can give an exactly singular Hessian (torch.linalg.solve
    raised LinAlgError out of fit)."""
    from msif_index.training import _newton_step
    x = torch.tensor([1.0, -2.0, 0.5])
    got, gnorm = _newton_step(lambda v: (v ** 2).sum(), x, torch.zeros(3, 3))
    assert torch.equal(got, x) and gnorm == pytest.approx(float((2 * x).norm()))


def test_a_budgeted_fit_runs_l_bfgs_once(monkeypatch):
    """max_iter bounds the work: the rounds after a step down along negative curvature are for a run
    that converged to a saddle point, not for one that used up its iterations on the way."""
    import msif_index.training as T
    runs = []
    real = T._lbfgs
    monkeypatch.setattr(T, "_lbfgs", lambda *a: runs.append(1) or real(*a))
    model, loss, data = _saddle_problem()
    with torch.no_grad():                    # near the saddle, not on it: the gradient does not vanish
        for prm in model.parameters():
            prm.add_(1e-2 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(4), dtype=prm.dtype))
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        gnorm = fit(model, ["0.weight", "2.weight"], loss, data, 40, l2=1e-3, max_iter=1)
    assert runs == [1] and gnorm > 1e-6
    runs.clear()
    model, loss, data = _saddle_problem()    # on the saddle: L-BFGS "converges" at once, then rounds
    fit(model, ["0.weight", "2.weight"], loss, data, 40, l2=1e-3)
    assert len(runs) >= 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_budgeted_fit_does_not_end_on_a_steeper_point(monkeypatch, seed):
    """When L-BFGS used up max_iter where the curvature is negative, the step down along it lowered the
    objective but raised the gradient norm 5-10x here (a new-user trial's transformer: 0.037 -> 11-33,
    and an index that then disagreed with exact influence): fit keeps the L-BFGS point instead, and
    returns its true gradient norm."""
    import msif_index.training as T
    from msif_index.autodiff import FlatParams, batched_objective
    ends = []
    real = T._lbfgs
    monkeypatch.setattr(T, "_lbfgs", lambda *a: ends.append(real(*a)) or ends[-1])
    model, loss, data = _saddle_problem()
    with torch.no_grad():
        for prm in model.parameters():
            prm.add_(1e-2 * torch.randn(prm.shape, generator=torch.Generator().manual_seed(seed), dtype=prm.dtype))
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gnorm = fit(model, ["0.weight", "2.weight"], loss, data, 40, l2=1e-3, max_iter=1)
    flat = FlatParams(model, ["0.weight", "2.weight"])
    term = batched_objective(flat.loss(loss), data, 40)
    grad = lambda v: torch.func.grad(lambda u: term(u) + 0.5e-3 * (u ** 2).sum())(v)  # noqa: E731
    assert len(ends) == 1
    assert gnorm <= float(grad(ends[0]).norm()) * (1 + 1e-12)
    assert gnorm == pytest.approx(float(grad(flat.get()).norm()), rel=1e-10)
    assert [str(r.message) for r in rec if "negative eigenvalue" in str(r.message)]     # still not a minimum


def test_fit_with_a_parameter_the_model_lacks_is_one_task_error_naming_the_closest():
    """A typo or a missing prefix in ``names`` is a TaskError that names the model's closest
    parameter, before any work (was a bare KeyError)."""
    from msif_index.errors import TaskError
    model = nn.Sequential(nn.Linear(3, 2))
    x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))

    def loss(m, b):
        return F.cross_entropy(m(b[0]), b[1], reduction="none")

    with pytest.raises(TaskError, match=r"'0\.weigth' -> '0\.weight'\?, 'bias' -> '0\.bias'\?"):
        fit(model, ["0.weigth", "bias"], loss, [(x, y)], 8)
    with pytest.raises(TaskError, match=r"not in the model.*it has 2, e\.g\. \['0\.weight', '0\.bias'\]"):
        fit(model, ["zzz"], loss, [(x, y)], 8)


def test_fit_at_a_kink_says_calling_it_again_will_not_help():
    """A minimum at a kink (relu: the gradient never vanishes there): the first call lowers the
    objective and says to call fit again; a second call gains nothing and says why instead (a
    non-differentiable model, a smooth activation for an exact minimum)."""
    class Kink(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.tensor([0.7], dtype=torch.float64))

        def forward(self, x):
            return x.reshape(-1) * 0 + torch.relu(self.w) + 2 * torch.relu(-self.w)

    model = Kink()
    data = [(torch.ones(4, 1, dtype=torch.float64),)]
    said = []
    for _ in range(2):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fit(model, ["w"], lambda m, b: m(b[0]), data, 4)
        said.append([str(w.message) for w in caught if "fit stopped" in str(w.message)])
    assert len(said[0]) == 1 and "call fit again" in said[0][0] and "did not decrease" not in said[0][0]
    assert len(said[1]) == 1 and "did not decrease in this call" in said[1][0]
    assert "smooth activation" in said[1][0] and "call fit again (it" not in said[1][0]


@pytest.mark.parametrize("d, steps", [(30, 40), (200, 40)])
def test_lanczos_finds_the_extreme_eigenvalues(d, steps):
    """The saddle check above newton_max_dim against eigvalsh: exact when the steps span the space
    (d <= steps); at d = 200 the separated negative eigenvalue to 1e-6 within 40 steps, and the top
    of the clustered positive ones from below (Ritz values lie inside the spectrum) to 1e-3."""
    from msif_index.training import _lanczos_extremes
    g = torch.Generator().manual_seed(d)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.tensor([-1.0], dtype=torch.float64),
                       torch.linspace(0.1, 10.0, d - 1, dtype=torch.float64)])
    h = q @ torch.diag(evals) @ q.T
    lo, hi, taken = _lanczos_extremes(lambda v: 0.5 * v @ h @ v, torch.zeros(d, dtype=torch.float64), steps)
    assert taken == min(d, steps)
    assert lo == pytest.approx(-1.0, abs=1e-6) and hi <= 10.0 + 1e-9
    assert hi == pytest.approx(10.0, abs=1e-6 if d <= steps else 1e-2)


def test_above_newton_max_dim_a_saddle_point_warns():
    """Without the Newton polish (more parameters than newton_max_dim) fit used to return silently at
    a saddle point whose gradient vanished: the Lanczos estimate now says so; a convex fit (float64
    and float32, whose HVPs carry rounding) gets no such warning."""
    model, loss, data = _saddle_problem()
    _, evals = _objective_and_hessian(model, loss, data, 1e-3)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gnorm = fit(model, ["0.weight", "2.weight"], loss, data, 40, l2=1e-3, newton_max_dim=0)
    mine = [str(r.message) for r in rec if "fit stopped" in str(r.message)]
    assert gnorm <= 1e-11 and len(mine) == 1, mine
    assert re.search(r"\d+ Lanczos steps", mine[0]) and "not at a minimum" in mine[0] and "newton_max_dim=0" in mine[0]
    assert "differentiable" not in mine[0]      # a stationary saddle, not a kink: the saddle's advice
    assert f"about {float(evals.min()):.3g}" in mine[0]           # the smallest eigenvalue, found
    for dtype in (torch.float64, torch.float32):
        model, loss, data = _problem()
        model = model.to(dtype)
        data = [(data[0][0].to(dtype), data[0][1])]
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            fit(model, ["weight", "bias"], loss, data, 60, l2=1e-2, newton_max_dim=0,
                grad_tol=1e-11 if dtype == torch.float64 else 1e-4)
        assert not [str(r.message) for r in rec if "negative eigenvalue" in str(r.message)], dtype


def test_lanczos_stops_once_a_negative_eigenvalue_is_proven_and_more_steps_resolve_a_wide_spectrum():
    """A trial's transformer had a negative eigenvalue 2e-5 of the largest (-2.15 against 1.2e5): 40
    steps gave +0.05, 150 found it. More steps (fit's lanczos_steps) resolve such a spectrum, and
    the run stops as soon as a Ritz value proves a negative eigenvalue (Ritz values lie inside the
    spectrum), so a saddle costs fewer HVPs than the budget."""
    from msif_index.training import _lanczos_extremes
    d = 400
    g = torch.Generator().manual_seed(7)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.cat([torch.tensor([-2.0], dtype=torch.float64),
                       torch.logspace(-1, 5, d - 1, dtype=torch.float64)])
    h = q @ torch.diag(evals) @ q.T
    f = lambda v: 0.5 * v @ h @ v  # noqa: E731
    x = torch.zeros(d, dtype=torch.float64)
    lo, hi, taken = _lanczos_extremes(f, x, 300, noise=1e-8)
    assert lo < -1e-8 * hi and -2.0 - 1e-9 <= lo and taken < 300      # proven, then stopped
    lo_full, _, taken_full = _lanczos_extremes(f, x, 300)
    assert taken_full == 300 and lo_full == pytest.approx(-2.0, abs=1e-6)


def test_lanczos_steps_zero_skips_the_check():
    model, loss, data = _saddle_problem()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        fit(model, ["0.weight", "2.weight"], loss, data, 40, l2=1e-3, newton_max_dim=0, lanczos_steps=0)
    assert not [str(r.message) for r in rec if "fit stopped" in str(r.message)]

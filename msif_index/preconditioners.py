"""H~^{-1}: approximations of the pretraining Hessian's inverse, applied in the projected space.

A raw row is phi_z = P grad_{(W,U)} g(z) (P = blockdiag of the per-layer projections). Every
preconditioner here is a Galerkin approximation (MATH.md): with M ~ P H_G P^T,
    stored row  s_z = [ M^{-1} phi_z ]_W          and    I(z, x_t) ~ - (P_W v_t) . s_z
so it is exact when P is invertible and M = P H_G P^T (the ``exact`` preconditioner).
kfac / ekfac store s_z in M's eigenbasis instead (``row_basis`` "eigen"): per W block
R s = Q_S^T S Q_A, and a query is rotated alike (R P_W v_t), which leaves every q . s unchanged
(R is orthogonal) and makes storing a row one elementwise product (Lambda^{-1} * R phi).

    identity      M = I                                   (gradient similarity, the baseline)
    gauss-newton  M = (1/n) sum phi phi^T + wd P P^T + lambda I      (empirical Fisher, full k x k)
    kfac          per layer: M_b = S_b (x) A_b / E||Phi||^2 from the projected gradient matrices Phi
                  (S = E[Phi Phi^T], A = E[Phi^T Phi]), damped in its eigenbasis
    ekfac         kfac's eigenbasis, eigenvalues corrected to E[(Q_S^T Phi Q_A)^2] (George et al. 2018)
    hessian       M = P H_G P^T from Hessian-vector products along P's rows, on all (or a seeded
                  subsample of) pretraining examples, eigenvalues clamped, damped
    exact         ``hessian`` on every example with no damping: with proj_dim=None this is H_G itself

Damping lambda defaults to ``damping`` x the mean eigenvalue of M (per layer for kfac/ekfac); the
value used is reported by ``summary()`` and saved in the manifest. The weight decay of the
pretraining objective (wd/2 ||(W, U)||^2 contributes wd P P^T) is added to M exactly for
gauss-newton / hessian / exact and as wd * mean diag(P_b P_b^T) per layer for kfac / ekfac.
"""
from __future__ import annotations

import time
from dataclasses import replace
from typing import Any, Callable, Collection, Iterable, Sequence

import numpy as np
import torch

from .errors import ConfigError, is_interrupt
from .gradients.blocks import Block
from .warn import warn_user

PRECONDITIONERS = ("identity", "gauss-newton", "kfac", "ekfac", "hessian", "exact")
_F64 = torch.float64


def _cached(owner: Any, sources: Sequence[torch.Tensor], dtype: torch.dtype, device: torch.device,
            make: Callable[[], Any]) -> Any:
    """``make()`` (apply()'s matrices converted to the rows' dtype/device), computed once per fitted
    state: kept on ``owner`` with the source tensors it was made from and reused while the state
    tensors are the same objects (fit / load_state_dict replace them, which invalidates it)."""
    hit = getattr(owner, "_apply_cache", None)
    if (hit is not None and hit[0] == (dtype, device) and len(hit[1]) == len(sources)
            and all(a is b for a, b in zip(hit[1], sources))):
        return hit[2]
    value = make()
    owner._apply_cache = ((dtype, device), list(sources), value)
    return value


def _flush_tiny(q: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q`` (an orthogonal eigenbasis) with entries below eps(dtype)^2 set to 0.

    Their contribution to a rotated row is below eps^2 relative (the rotation keeps norms), far
    below the dtype's rounding, so results are the same to within rounding; but chains of such
    entries (eigenvectors of dead units: exact zero rows of S or A) create subnormal intermediates,
    which make float32 matrix products several times slower on x86 CPUs."""
    eps = torch.finfo(dtype).eps
    return torch.where(q.abs() < eps * eps, torch.zeros_like(q), q)


def rotate_blocks(rows: torch.Tensor, blocks: Sequence[Block], bases: Sequence[tuple[torch.Tensor, torch.Tensor]],
                  inverse: bool = False) -> torch.Tensor:
    """A copy of ``rows`` [n, dim] whose column block of each ``blocks[i]`` (a [k_out, k_in] matrix
    Phi per row, at the block's offset) is Q_S^T Phi Q_A for ``bases[i] = (Q_S, Q_A)`` (or
    Q_S Phi Q_A^T with ``inverse``); other columns are copied."""
    spans = sorted((b.offset, b.offset + b.dim) for b in blocks)
    covered = sum(e - s for s, e in spans) == rows.shape[1] and all(a[1] <= c[0] for a, c in zip(spans, spans[1:]))
    out = torch.empty_like(rows) if covered else rows.clone()     # every column rewritten: no copy
    n = rows.shape[0]
    for b, (qs, qa) in zip(blocks, bases):
        qs, qa = qs.to(rows.dtype), qa.to(rows.dtype)
        left, right = (qs, qa.T) if inverse else (qs.T, qa)
        phi = rows[:, b.offset:b.offset + b.dim].reshape(n, b.k_out, b.k_in)
        out[:, b.offset:b.offset + b.dim].view(n, b.k_out, b.k_in).copy_(torch.matmul(torch.matmul(left, phi), right))
    return out


def read_state(path) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(datasets, attributes) of a saved preconditioner state (preconditioner.h5). Keys may hold '/'
    (kfac / ekfac: "0/qs"), which h5py stores as groups: every dataset is read by its full name."""
    import h5py

    with h5py.File(path, "r") as f:
        state: dict[str, np.ndarray] = {}
        f.visititems(lambda name, obj: state.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
        return state, dict(f.attrs)


def _as_basis(q: torch.Tensor, dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """An eigenbasis in the dtype and on the device it rotates rows or queries in (tiny entries
    flushed): the build's rows and the query side's vectors go through this one conversion."""
    return _flush_tiny(q.to(dtype=dtype, device=device), dtype).contiguous()


def stored_eigenbases(state: dict[str, np.ndarray], count: int, dtype: torch.dtype) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(Q_S, Q_A) of each of the ``count`` W blocks of a saved kfac / ekfac state (preconditioner.h5,
    ``KroneckerEigen.state_dict``), as the build rotated its stored rows with them."""
    return [(_as_basis(torch.from_numpy(np.asarray(state[f"{i}/qs"])), dtype),
             _as_basis(torch.from_numpy(np.asarray(state[f"{i}/qa"])), dtype)) for i in range(count)]


class Preconditioner:
    """Base: statistics passes over raw rows, then ``apply`` maps raw rows to stored (W) rows."""

    name = "identity"
    #: the basis of the stored rows: "parameter" (the rows are [M^{-1} phi]_W) or "eigen" (kfac /
    #: ekfac: each W block rotated into M's eigenbasis; a query vector is rotated the same way, so
    #: every inner product q . s is the same)
    row_basis = "parameter"
    #: how many statistics passes over the raw rows ``fit`` needs
    passes = 0
    #: whether U blocks influence the W rows (if not, U need not be captured at all)
    uses_u = False

    def __init__(self, blocks: Sequence[Block], w_blocks: Sequence[bool], damping: float = 0.1,
                 weight_decay: float = 0.0, gram: Callable[[Block], torch.Tensor] | None = None):
        self.blocks = list(blocks)
        self.w_blocks = list(w_blocks)
        self.damping = float(damping)
        self.weight_decay = float(weight_decay)
        self.gram = gram
        self.dim = sum(b.dim for b in self.blocks)
        cols = [torch.arange(b.offset, b.offset + b.dim) for b, w in zip(self.blocks, self.w_blocks) if w]
        self.w_cols = torch.cat(cols) if cols else torch.zeros(0, dtype=torch.long)
        self.dim_w = int(self.w_cols.numel())
        self.damping_used: dict[str, float] = {}
        #: the clamped negative eigenvalues of a dense Hessian (``negative_eigenvalues``), or None
        self.negative: dict[str, float] | None = None

    # statistics ---------------------------------------------------------------------------------
    def fit(self, row_blocks: Callable[[], Iterable[torch.Tensor]], n: int,
            rotate: Collection[str] = ()) -> frozenset[str]:
        """Run the statistics passes; ``row_blocks()`` yields raw row blocks [B, dim] afresh each call.
        ``rotate``: W blocks whose rows the caller wants rotated into the eigenbasis in place, where
        a pass rotates them anyway (kfac / ekfac); returns the names it rotated (here none)."""
        for p in range(self.passes):
            for rows in row_blocks():
                self.accumulate(p, rows.to(device="cpu", dtype=_F64))   # statistics live on the CPU
            self.end_pass(p, n)
        return frozenset()

    def accumulate(self, p: int, rows: torch.Tensor) -> None:  # noqa: D102
        pass

    def end_pass(self, p: int, n: int) -> None:  # noqa: D102
        pass

    # application ----------------------------------------------------------------------------------
    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """[M^{-1} rows]_W [B, dim_W] in the parameter basis (here M = I)."""
        span = _cached(self, [self.w_cols], torch.int64, torch.device("cpu"), self._w_span)
        if span is not None:                    # W columns are one contiguous range: a slice copy
            return rows[:, span[0]:span[1]].clone(memory_format=torch.contiguous_format)
        return rows[:, self.w_cols]

    def _w_span(self) -> tuple[int, int] | None:
        c = self.w_cols
        if c.numel() == 0:
            return None
        a = int(c[0])
        return (a, a + c.numel()) if torch.equal(c, torch.arange(a, a + c.numel())) else None

    def eigenbases(self, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per-block rotations that featurize folds into the projection (kfac / ekfac); none here."""
        return {}

    def rotate(self, rows: torch.Tensor, names: Collection[str]) -> torch.Tensor:
        """Raw rows -> the basis ``stored_rows`` expects of the blocks in ``names`` (the same here)."""
        return rows

    def stored_rows(self, rows: torch.Tensor, names: Collection[str],
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """The stored rows [B, dim_W], in ``row_basis``, of raw rows whose blocks in ``names`` are
        already rotated (``rotate``, or a projector rotated by ``eigenbases``); here ``apply``.
        Written into ``out`` ([B, dim_W], the rows' dtype and device) when given."""
        res = self.apply(rows)
        return res if out is None else out.copy_(res)

    def to_parameter_basis(self, vectors: torch.Tensor) -> torch.Tensor:
        """W vectors [Q, dim_W] in ``row_basis`` (stored rows, query vectors) -> the parameter basis."""
        return vectors

    def state_dict(self) -> dict[str, np.ndarray]:
        return {}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        out = {"name": self.name, "damping": self.damping, "damping_used": self.damping_used,
               "weight_decay": self.weight_decay, "row_basis": self.row_basis}
        if self.negative:
            out["negative_eigenvalues"] = self.negative
        return out


class DenseInverse(Preconditioner):
    """Shared by gauss-newton / hessian / exact: a full k x k M, stored as M^{-1}[:, W]."""

    uses_u = True

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.m: torch.Tensor | None = None
        self.inv_w: torch.Tensor | None = None

    def _full_gram(self) -> torch.Tensor:
        g = torch.zeros(self.dim, self.dim, dtype=_F64)
        if self.gram is not None:
            for b in self.blocks:
                s = slice(b.offset, b.offset + b.dim)
                g[s, s] = self.gram(b).to(_F64)
        return g

    def _factor(self, m: torch.Tensor, clamp: bool, check: bool = False) -> None:
        """M^{-1}[:, W] of M + weight decay, damped; ``clamp``: negative eigenvalues to 0 first;
        ``check``: record (``negative``) and warn of eigenvalues below minus the damping (a Hessian's)."""
        m = 0.5 * (m + m.T) + self.weight_decay * self._full_gram()
        evals, evecs = torch.linalg.eigh(m)
        raw = evals
        if clamp:
            evals = evals.clamp_min(0.0)
        lam = self.damping * float(evals.mean()) if self.damping > 0 else 0.0
        self.damping_used["all"] = lam
        if check:
            self.negative = negative_eigenvalues(raw, lam, clamped=clamp)
            if self.negative:                   # at build_index's caller (tests/test_build.py checks)
                warn_negative(self.negative)
        inv = (evecs / (evals + lam)) @ evecs.T
        self.inv_w = inv[:, self.w_cols].contiguous()

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        assert self.inv_w is not None, "fit() first"
        inv = _cached(self, [self.inv_w], rows.dtype, rows.device,
                      lambda: self.inv_w.to(dtype=rows.dtype, device=rows.device).contiguous())
        return rows @ inv

    def state_dict(self) -> dict[str, np.ndarray]:
        return {"inv_w": self.inv_w.numpy()}

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.inv_w = torch.from_numpy(np.asarray(state["inv_w"]))


def negative_eigenvalues(evals: torch.Tensor, lam: float, noise: float = 1e-9,
                         clamped: bool = True) -> dict[str, Any] | None:
    """{count, of, min, largest (the largest eigenvalue), damping, damping_needed, clamped} of the
    eigenvalues below -``lam``
    (the absolute damping; at least ``noise`` x the largest magnitude, rounding), or None.

    Clamped to 0 and damped by ``lam``, such a direction gets the largest weight there is, 1 / lam,
    where the Hessian says its curvature is negative: with a small damping those directions dominate
    every score. ``damping_needed`` is the relative damping (x the clamped mean eigenvalue) above
    which none is left. ``clamped`` False: the exact preconditioner, which inverts them as they are
    (manifests written before this key were all clamped)."""
    top = float(evals.abs().max()) if evals.numel() else 0.0
    neg = evals < -max(lam, noise * top)
    if top > 0 and bool(neg.any()):
        mean = float(evals.clamp_min(0.0).mean())
        return {"count": int(neg.sum()), "of": int(evals.numel()), "min": float(evals.min()),
                "largest": float(evals.max()),
                "damping": lam, "damping_needed": -float(evals.min()) / mean if mean > 0 else None,
                "clamped": bool(clamped)}
    return None


#: how every account of an index's negative eigenvalues begins (the command line matches it)
NEGATIVE_HEAD = "the projected pretraining Hessian has"

#: what to do about a model that is not at a minimum, in every message that says so
NOT_A_MINIMUM_ADVICE = ("train that model to convergence (`msif check-task --stationarity` measures how close it "
                        "is)")


def warn_negative(negative: dict[str, Any]) -> None:
    """RuntimeWarning for ``negative_eigenvalues``: the pretrained model is not at a minimum (a saddle
    point or far from converged). Given again when a resumed build loads the fitted state."""
    warn_user(negative_message(negative))


def negative_summary(negative: dict[str, Any]) -> str:
    """The short account of ``negative_eigenvalues`` that each open of the index repeats (the build's
    warning, ``negative_message``, also says what damping would cover them and what to check)."""
    which = "eigenvalues below minus the damping" if negative.get("damping", 0.0) else "negative eigenvalues"
    how = ("the exact preconditioner inverts them as they are" if negative.get("clamped", True) is False
           else "clamped to 0")
    return (f"{NEGATIVE_HEAD} {negative['count']} of {negative['of']} {which} ({how}): the pretrained model is not "
            f"at a minimum of its loss, so the scores may not track retraining; train it to convergence "
            f"(`msif check-task --stationarity`)")


def negative_message(negative: dict[str, Any]) -> str:
    """The one-line account of ``negative_eigenvalues``: the build's warning (each open repeats
    ``negative_summary``; msif info prints its own line)."""
    damping = negative.get("damping", 0.0)
    which = (f"eigenvalues below minus the damping ({damping:.3g} absolute; " if damping
             else "negative eigenvalues (no damping; ")
    head = (f"{NEGATIVE_HEAD} {negative['count']} of {negative['of']} {which}down to {negative['min']:.3g}, the "
            f"largest is {negative['largest']:.3g}): the pretrained model is not at a minimum of its loss, which "
            f"influence assumes. ")
    if not negative.get("clamped", True):
        return head + ("The exact preconditioner inverts them as they are, so the scores are the formula's value "
                       "at a saddle point and may not track retraining: " + NOT_A_MINIMUM_ADVICE)
    needed = negative.get("damping_needed")
    damping = (f"a --damping above {needed:.2g} x the mean eigenvalue covers them" if needed
               else "relative to the mean eigenvalue")
    return head + ("Clamped to 0, those directions get the largest weight and the scores may not track "
                   f"retraining: {NOT_A_MINIMUM_ADVICE}. Damping ({damping}) or ekfac / gauss-newton (positive "
                   f"by construction) only mask those directions and can rank worse: check such an index against "
                   f"`msif exact` (small models) or `msif evaluate`")


class GaussNewton(DenseInverse):
    """Empirical Fisher of the projected gradients, full k x k, damped."""

    name = "gauss-newton"
    passes = 1

    def accumulate(self, p: int, rows: torch.Tensor) -> None:
        if self.m is None:
            self.m = torch.zeros(self.dim, self.dim, dtype=_F64)
        self.m.addmm_(rows.T, rows)

    def end_pass(self, p: int, n: int) -> None:
        self._factor(self.m / n, clamp=False)


class ProjectedHessian(DenseInverse):
    """M = P H_G P^T by Hessian-vector products (``fit_hessian``), eigenvalues clamped at 0."""

    name = "hessian"

    def fit_hessian(self, php: torch.Tensor) -> None:
        """``php`` = P (H_G without weight decay) P^T, [dim, dim]."""
        self._factor(php.to(device="cpu", dtype=_F64), clamp=self.name == "hessian", check=True)


class ExactHessian(ProjectedHessian):
    """The exact H_G on every example, no damping (small models; identity projection -> exact)."""

    name = "exact"


class KroneckerEigen(Preconditioner):
    """kfac / ekfac: per block, M_b = Q diag(Lambda) Q^T with Q = Q_S (x) Q_A."""

    name = "kfac"
    passes = 1
    row_basis = "eigen"

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self._wb = [b for b, w in zip(self.blocks, self.w_blocks) if w]
        self.s = [torch.zeros(b.k_out, b.k_out, dtype=_F64) for b in self._wb]
        self.a = [torch.zeros(b.k_in, b.k_in, dtype=_F64) for b in self._wb]
        self.sq = [0.0 for _ in self._wb]
        self.qs: list[torch.Tensor] = []
        self.qa: list[torch.Tensor] = []
        self.inv_eig: list[torch.Tensor] = []
        self._lam_raw: list[torch.Tensor] = []

    def _mats(self, rows: torch.Tensor, i: int) -> torch.Tensor:
        b = self._wb[i]
        return rows[:, b.offset:b.offset + b.dim].reshape(-1, b.k_out, b.k_in)

    def fit(self, row_blocks: Callable[[], Iterable[torch.Tensor]], n: int,
            rotate: Collection[str] = ()) -> frozenset[str]:
        """As Preconditioner.fit, but the products of each block of rows are computed in the rows' own
        dtype when it is float32 (float64 otherwise) and summed across blocks in float64; the
        eigendecompositions are float64 (the statistics dtypes Kronfluence uses by default).

        ekfac's second pass rotates every row into the eigenbasis: for the W blocks in ``rotate`` it
        rotates the caller's rows in place, exactly as ``rotate`` would (the same bases, the same
        arithmetic on each block of rows), and takes its corrections from them; featurize then stores
        those rows without rotating them again. Returns the names rotated (kfac, one pass: none)."""
        done = frozenset(b.name for b in self._wb if b.name in rotate) if self.passes > 1 else frozenset()
        for p in range(self.passes):
            for rows in row_blocks():
                if p > 0 and done:
                    rows.copy_(self.rotate(rows, done, bases=self._bases_for(rows.dtype, rows.device)))
                rows = rows.to(device="cpu", dtype=torch.float32 if rows.dtype == torch.float32 else _F64)
                self.accumulate(p, rows, rotated=done)   # statistics live on the CPU (rows may come from a GPU)
            self.end_pass(p, n)
        return done

    def _bases_for(self, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(Q_S, Q_A) per W block as ``_mats_for`` converts them, before Lambda is known (cached)."""
        return _cached(self, [*self.qs, *self.qa], dtype, device,
                       lambda: [(_as_basis(qs, dtype, device), _as_basis(qa, dtype, device))
                                for qs, qa in zip(self.qs, self.qa)])

    def accumulate(self, p: int, rows: torch.Tensor, rotated: Collection[str] = ()) -> None:
        # S and A as one large matrix product each over the whole block of rows (not an einsum of
        # small per-example products): sums over examples b of Phi_b Phi_b^T and Phi_b^T Phi_b
        for i, b in enumerate(self._wb):
            phi = self._mats(rows, i)                                   # [B, k_out, k_in]
            m = phi.shape[0]
            if p == 0:
                # [k_out, B*k_in], copied into a reused buffer (a fresh one per block of rows costs
                # page faults that take as long as the copy)
                scratch = getattr(self, "_scratch", None)
                if scratch is None or scratch.numel() < phi.numel() or scratch.dtype != phi.dtype:
                    scratch = self._scratch = torch.empty(phi.numel(), dtype=phi.dtype, device=phi.device)
                by_out = scratch[:phi.numel()].view(b.k_out, m, b.k_in)
                by_out.copy_(phi.transpose(0, 1))
                by_out = by_out.view(b.k_out, m * b.k_in)
                self.s[i] += (by_out @ by_out.T).to(_F64)
                by_in = phi.reshape(m * b.k_out, b.k_in)                    # [B*k_out, k_in]
                self.a[i] += (by_in.T @ by_in).to(_F64)
                flat = phi.reshape(-1)
                self.sq[i] += float(torch.dot(flat, flat))
            else:
                if b.name in rotated:                                       # already Q_S^T Phi_b Q_A
                    rot = phi
                else:
                    qs, qa = self.qs[i].to(rows.dtype), self.qa[i].to(rows.dtype)
                    rot = qs.T @ phi @ qa                                   # Q_S^T Phi_b Q_A
                self._lam_raw[i] += (rot * rot).sum(0).to(_F64)

    def end_pass(self, p: int, n: int) -> None:
        self._scratch = None
        self._eigen(n)
        self._finish()

    def _eigen(self, n: int) -> None:
        """Eigenbases of S and A; Lambda = their eigenvalue products scaled so tr M = E||Phi||^2."""
        for i in range(len(self._wb)):
            es, qs = torch.linalg.eigh(self.s[i] / n)
            ea, qa = torch.linalg.eigh(self.a[i] / n)
            self.qs.append(qs)
            self.qa.append(qa)
            mean_sq = max(self.sq[i] / n, 1e-300)
            self._lam_raw.append(torch.outer(es.clamp_min(0), ea.clamp_min(0)) / mean_sq)

    def _finish(self) -> None:
        self.inv_eig = []
        for b, lam in zip(self._wb, self._lam_raw):
            wd = self.weight_decay * (float(torch.diagonal(self.gram(b)).mean()) if self.gram else 1.0)
            damp = self.damping * float(lam.mean())
            self.damping_used[b.name] = damp
            self.inv_eig.append(1.0 / (lam + wd + damp))

    def apply(self, rows: torch.Tensor) -> torch.Tensor:
        """Per W block: Q_S (Lambda^{-1} * (Q_S^T Phi Q_A)) Q_A^T, four matrix products: the stored
        row (eigenbasis) rotated back to the parameter basis."""
        return self.to_parameter_basis(self.stored_rows(rows, ()))

    def eigenbases(self, dtype: torch.dtype, device: torch.device) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{W block name: (Q_S, Q_A)}: a projector rotated by these (GradientProjector.rotated) gives
        raw rows already in the eigenbasis, Q_S^T Phi Q_A, for ``stored_rows``."""
        mats = self._mats_for(dtype, device)
        return {b.name: (qs, qa) for b, (qs, qa, _) in zip(self._wb, mats)}

    def rotate(self, rows: torch.Tensor, names: Collection[str],
               bases: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None) -> torch.Tensor:
        """Raw rows Phi -> Q_S^T Phi Q_A in the W blocks named in ``names`` (other columns copied);
        ``bases``: (Q_S, Q_A) per W block (default: the fitted ones, as ``_mats_for`` has them)."""
        if bases is None:
            bases = [(qs, qa) for qs, qa, _ in self._mats_for(rows.dtype, rows.device)]
        pairs = [(b, q) for b, q in zip(self._wb, bases) if b.name in names]
        return rotate_blocks(rows, [b for b, _ in pairs], [q for _, q in pairs])

    def stored_rows(self, rows: torch.Tensor, names: Collection[str],
                    out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored rows in the eigenbasis, per W block Lambda^{-1} * (Q_S^T Phi Q_A): an elementwise
        product where the block is already rotated (``names``), two matrix products elsewhere;
        written into ``out`` ([B, dim_W], the rows' dtype and device) when given."""
        mats = self._mats_for(rows.dtype, rows.device)
        n = rows.shape[0]
        if out is None:
            out = torch.empty(n, self.dim_w, dtype=rows.dtype, device=rows.device)
        col = 0
        for b, (qs, qa, inv) in zip(self._wb, mats):
            phi = rows[:, b.offset:b.offset + b.dim].view(n, b.k_out, b.k_in)
            dst = out[:, col:col + b.dim].view(n, b.k_out, b.k_in)
            if b.name in names:
                torch.mul(phi, inv, out=dst)
            else:
                torch.mul(torch.matmul(torch.matmul(qs.T, phi), qa), inv, out=dst)
            col += b.dim
        return out

    def to_parameter_basis(self, vectors: torch.Tensor) -> torch.Tensor:
        """W vectors [Q, dim_W] in the eigenbasis -> the parameter basis: Q_S X Q_A^T per W block."""
        mats = self._mats_for(vectors.dtype, vectors.device)
        blocks, off = [], 0
        for b in self._wb:                                # offsets in a W-only row
            blocks.append(replace(b, offset=off))
            off += b.dim
        return rotate_blocks(vectors, blocks, [(qs, qa) for qs, qa, _ in mats], inverse=True)

    def _mats_for(self, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """``_apply_mats``, computed once per fitted state, dtype and device."""
        return _cached(self, [*self.qs, *self.qa, *self.inv_eig], dtype, device,
                       lambda: self._apply_mats(dtype, device))

    def _apply_mats(self, dtype: torch.dtype, device: torch.device) -> list[tuple[torch.Tensor, ...]]:
        """(Q_S, Q_A, Lambda^{-1}) per W block in ``dtype`` on ``device`` (tiny entries flushed)."""
        return [(_as_basis(qs, dtype, device), _as_basis(qa, dtype, device),
                 inv.to(dtype=dtype, device=device).contiguous())
                for qs, qa, inv in zip(self.qs, self.qa, self.inv_eig)]

    def state_dict(self) -> dict[str, np.ndarray]:
        st = {}
        for i, b in enumerate(self._wb):
            st[f"{i}/qs"], st[f"{i}/qa"] = self.qs[i].numpy(), self.qa[i].numpy()
            st[f"{i}/inv_eig"] = self.inv_eig[i].numpy()
        return st

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        m = len(self._wb)
        self.qs = [torch.from_numpy(np.asarray(state[f"{i}/qs"])) for i in range(m)]
        self.qa = [torch.from_numpy(np.asarray(state[f"{i}/qa"])) for i in range(m)]
        self.inv_eig = [torch.from_numpy(np.asarray(state[f"{i}/inv_eig"])) for i in range(m)]


class EKFAC(KroneckerEigen):
    """kfac's eigenbasis with eigenvalues fitted to the projected gradients (a second pass)."""

    name = "ekfac"
    passes = 2

    def end_pass(self, p: int, n: int) -> None:
        self._scratch = None
        if p == 0:
            self._eigen(n)
            self._lam_raw = [torch.zeros_like(lam) for lam in self._lam_raw]
            return
        self._lam_raw = [lam / n for lam in self._lam_raw]
        self._finish()


_CLASSES = {"identity": Preconditioner, "gauss-newton": GaussNewton, "kfac": KroneckerEigen,
            "ekfac": EKFAC, "hessian": ProjectedHessian, "exact": ExactHessian}


def make_preconditioner(name: str, blocks: Sequence[Block], w_blocks: Sequence[bool], damping: float,
                        weight_decay: float, gram: Callable[[Block], torch.Tensor] | None) -> Preconditioner:
    """A preconditioner by name (see the module docstring)."""
    if name not in _CLASSES:
        raise ConfigError(f"unknown preconditioner {name!r}; choose one of {', '.join(PRECONDITIONERS)}")
    return _CLASSES[name](blocks, w_blocks, damping=damping, weight_decay=weight_decay, gram=gram)


def projected_hessian(mean_loss: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                      p: torch.Tensor, chunk: int = 64,
                      advance: Callable[[int], None] | None = None, done: torch.Tensor | None = None,
                      checkpoint: Callable[[torch.Tensor], None] | None = None,
                      every_s: float = 30.0) -> torch.Tensor:
    """P H P^T for H the Hessian of ``mean_loss`` at ``x``, by HVPs along the rows of P [k, d].
    ``advance(c)`` is called after each chunk of c HVPs computed (a progress bar over the k rows).

    Resumable: ``done`` holds the first rows of P H P^T (a whole number of chunks) from an interrupted
    run, taken as they are; ``checkpoint(rows)`` receives the rows computed so far, at chunk
    boundaries, at most once every ``every_s`` seconds. Chunks keep their boundaries, so a resumed
    run's rows equal an uninterrupted one's bit for bit."""
    from torch.func import vmap

    from .autodiff import hvp
    k = p.shape[0]
    out = torch.empty(k, k, dtype=_F64)
    start = 0
    if done is not None:
        start = done.shape[0]
        if start % chunk or start > k or done.shape[1:] != (k,):
            raise ValueError(f"done holds {tuple(done.shape)} rows: not whole chunks of {chunk} rows of a "
                             f"{k} x {k} matrix")
        out[:start] = done
    pt = p.to(x.dtype)
    last = time.monotonic()
    finished = saved = start                 # rows computed / in the last checkpoint (whole chunks)
    try:
        for s in range(start, k, chunk):
            hp = vmap(lambda v: hvp(mean_loss, x, v))(pt[s:s + chunk])     # [c, d] rows of P H
            out[s:s + chunk] = (hp @ pt.T).to(_F64)
            if s + chunk < k:
                finished = s + chunk
            if advance is not None:
                advance(hp.shape[0])
            if checkpoint is not None and finished > saved and time.monotonic() - last >= every_s:
                checkpoint(out[:finished])
                saved, last = finished, time.monotonic()
    except BaseException as e:               # Ctrl-C or SIGTERM: keep the chunks finished so far
        if checkpoint is not None and finished > saved and is_interrupt(e):
            checkpoint(out[:finished])
        raise
    return 0.5 * (out + out.T)

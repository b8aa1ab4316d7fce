"""Acceptance tests of building the index (msif_index.build.build_index).

- exact preset on the digits task: stored rows are -DW(z) = [H_G^{-1} grad g(z)]_W, permuted by P_W;
- every preconditioner builds (digits, and a Conv2d + Embedding + LayerNorm model) and the kfac /
  ekfac / gauss-newton / hessian rows equal their brute-force definitions on a tiny model;
- a build killed midway resumes to the same rows; corrupt files, changed configs, foreign folders,
  changed pretrained models and non-finite gradients fail with one clear line.
"""
from __future__ import annotations

import errno
import json

import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import msif_index
from msif_index.task import cross_entropy_fisher_losses
import msif_index.build as build_mod
from msif_index.build import _subsample, build_index
from msif_index.config import HESSIAN_DAMPING, PRESETS, SUBSAMPLED_HESSIAN_DAMPING, BuildConfig
from msif_index.data import full_batch
from msif_index.errors import (BusyError, ConfigError, CorruptIndexError, NonFiniteError, OutputExistsError,
                               ShapeError)
from msif_index.exact import pretrain_side
from msif_index.gradients import GradientProjector
from msif_index.index import InfluenceIndex
from msif_index.info import describe
from msif_index.lock import folder_lock, lock_holder, lock_path
from msif_index.preconditioners import rotate_blocks
from msif_index.store import RowStore

ROOT = Path(__file__).resolve().parents[1]
PRECONDITIONERS = ("identity", "gauss-newton", "kfac", "ekfac", "hessian", "exact")


# ------------------------------------------------------------------------------------------------
# tiny tasks (untrained: nothing here needs an optimum, and building them takes well under a second)


def _init(model: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return model


class TinyNet(nn.Module):
    def __init__(self, d: int, h: int, c: int):
        super().__init__()
        self.embed = nn.Linear(d, h)
        self.head = nn.Linear(h, c)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


class _HeldTask(msif_index.MultiStageTask):
    """The contract's models and datasets from attributes set by a subclass's __init__."""

    _pm: nn.Module
    _fm: nn.Module
    _pre: TensorDataset
    _fin: TensorDataset
    _test: TensorDataset

    def pretrained_model(self):
        return self._pm

    def finetuned_model(self):
        return self._fm

    def pretrain_dataset(self):
        return self._pre

    def finetune_dataset(self):
        return self._fin

    def test_dataset(self):
        return self._test


class TinyTask(_HeldTask):
    """W = embed (one Linear), U / theta = head. Pretraining items are (x, y, id).

    ``nan_id``: that example's input holds a NaN (so its loss and gradient are NaN);
    ``slow``: seconds slept per pretraining loss call; ``seen``: set to a list to record the ids
    whose pretraining loss was differentiated (evaluations without autograd, such as the task check
    and the build's loss probe, are not recorded).
    """

    shared_parameters = ("embed.weight", "embed.bias")
    pretrain_weight_decay = 0.01
    finetune_weight_decay = 0.1

    def __init__(self, n: int = 64, d: int = 6, h: int = 4, seed: int = 0, nan_id: int | None = None,
                 slow: float = 0.0):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        if nan_id is not None:
            x[nan_id, 0] = float("nan")
        self._pre = TensorDataset(x, torch.randint(0, 3, (n,), generator=g), torch.arange(n))
        self._fin = TensorDataset(torch.randn(20, d, generator=g, dtype=torch.float64),
                                  torch.randint(0, 2, (20,), generator=g))
        self._test = TensorDataset(torch.randn(8, d, generator=g, dtype=torch.float64),
                                   torch.randint(0, 2, (8,), generator=g))
        self.slow = slow
        self.seen: list[int] | None = None
        self._pm = _init(TinyNet(d, h, 3).double(), seed + 1)
        self._fm = _init(TinyNet(d, h, 2).double(), seed + 2)
        self._fm.embed.load_state_dict(self._pm.embed.state_dict())

    def pretrain_loss(self, model, batch):
        x, y, ids = batch
        if self.slow:
            time.sleep(self.slow)
        if self.seen is not None and torch.is_grad_enabled():
            self.seen.extend(ids.tolist())
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    def finetune_loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")


class TinyGN(TinyTask):
    """TinyTask with the Gauss-Newton statistics hook (cross-entropy: one pseudo-loss per class)."""

    def pretrain_fisher_losses(self, model, batch):
        return cross_entropy_fisher_losses(model(batch[0]))


def _stats_rows(task, model, names, p) -> torch.Tensor:
    """The statistics' gradient rows by brute force: phi at the data's targets (empirical), or
    P grad of every pseudo-loss sqrt(p_c) (-log p_c) of every example (Gauss-Newton), [rows, k]."""
    if not isinstance(task, TinyGN):
        return _example_grads(model, names, task.pretrain_loss, task.pretrain_dataset()) @ p.T
    c = model(task.pretrain_dataset().tensors[0]).shape[1]
    return torch.cat([_example_grads(model, names, lambda m, b, r=r: task.pretrain_fisher_losses(m, b)[:, r],
                                     task.pretrain_dataset()) @ p.T for r in range(c)])


class MixedNet(nn.Module):
    """Conv2d on an image + Embedding of tokens, LayerNorm, Linear head."""

    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.emb = nn.Embedding(7, 3)
        self.norm = nn.LayerNorm(2 * 4 * 4 + 3)
        self.head = nn.Linear(2 * 4 * 4 + 3, c)

    def forward(self, batch):
        img, tok = batch[0], batch[1]
        a = torch.relu(self.conv(img)).flatten(1)
        b = self.emb(tok).mean(1)
        return self.head(self.norm(torch.cat([a, b], 1)))


class MixedTask(_HeldTask):
    shared_parameters = ("conv.weight", "conv.bias", "emb.weight", "norm.weight", "norm.bias")
    pretrain_weight_decay = 0.01
    finetune_weight_decay = 0.1

    def __init__(self, n: int = 24, seed: int = 0):
        g = torch.Generator().manual_seed(seed)

        def data(m: int, classes: int) -> TensorDataset:
            return TensorDataset(torch.randn(m, 1, 6, 6, generator=g, dtype=torch.float64),
                                 torch.randint(0, 7, (m, 3), generator=g),
                                 torch.randint(0, classes, (m,), generator=g))
        self._pre, self._fin, self._test = data(n, 3), data(16, 2), data(4, 2)
        self._pm = _init(MixedNet(3).double(), seed + 1)
        self._fm = _init(MixedNet(2).double(), seed + 2)
        for name in ("conv", "emb", "norm"):
            getattr(self._fm, name).load_state_dict(getattr(self._pm, name).state_dict())

    def pretrain_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch), batch[2], reduction="none")

    def finetune_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch), batch[2], reduction="none")


class TiedNet(nn.Module):
    """A token model whose output layer reuses the input embedding (F.linear(h, emb.weight)), as
    tied language models do: the Kronecker hooks on emb cannot see the output layer's use."""

    def __init__(self, vocab: int = 9, d: int = 4):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.mix = nn.Linear(d, d)
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, tokens):
        h = torch.tanh(self.mix(self.emb(tokens).mean(1)))
        return nn.functional.linear(h, self.emb.weight, self.bias)


class TiedTask(_HeldTask):
    shared_parameters = ("emb.weight", "mix.weight", "mix.bias")
    pretrain_weight_decay = 0.01
    finetune_weight_decay = 0.1

    def __init__(self, n: int = 24, dense_modules: tuple[str, ...] = ()):
        g = torch.Generator().manual_seed(0)

        def data(m: int) -> TensorDataset:
            return TensorDataset(torch.randint(0, 9, (m, 5), generator=g), torch.randint(0, 9, (m,), generator=g))
        self._pre, self._fin, self._test = data(n), data(12), data(4)
        self._pm = _init(TiedNet().double(), 1)
        self._fm = _init(TiedNet().double(), 2)
        for name in ("emb", "mix"):
            getattr(self._fm, name).load_state_dict(getattr(self._pm, name).state_dict())
        self.dense_modules = dense_modules

    def pretrain_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    def finetune_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


def _rows(path: Path) -> np.ndarray:
    with RowStore.open(path / "rows.h5") as store:
        return store.read(0, store.n, dtype=store.dtype)


def _parameter_rows(path: Path) -> np.ndarray:
    """The stored rows mapped back to the parameter basis, [M^{-1} phi]_W: kfac / ekfac store each W
    block rotated into the preconditioner's eigenbasis (row_basis "eigen"), Q_S^T S Q_A."""
    rows = _rows(path)
    with InfluenceIndex.open(path) as index:
        if index.row_basis == "parameter":
            return rows
        blocks = index._w_blocks()
        bases = index._eigenbases(torch.float64)
    return rotate_blocks(torch.from_numpy(rows).double(), blocks, bases, inverse=True).numpy()


def _check_scores_in_parameter_basis(task, path: Path) -> None:
    """index.scores == -q_t . [M^-1 phi_z]_W with q_t from the two-pass reference (W projector,
    torch.func theta gradients, FinetuneOperator) and the rows mapped back to the parameter basis."""
    from msif_index.operator import reference_query_vectors
    batch = full_batch(task.test_dataset())
    with InfluenceIndex.open(path) as index:
        key = index.attach(task, validate=False)
        att = index._get(key)
        q = reference_query_vectors(att.projector, att.operator, att.model, att.task.measurement, batch).numpy()
        got = index.scores(batch, key)
        np.testing.assert_allclose(index.query_vectors(batch, key), index.to_row_basis(q), rtol=1e-9,
                                   atol=1e-12 * np.abs(q).max())
    want = -(q @ _parameter_rows(path).T)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-11 * np.abs(want).max())


def _manifest(path: Path) -> dict:
    with InfluenceIndex.open(path) as index:
        return index.manifest


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------
# exact preset: the stored rows are the exact H_G^{-1} gradients


def test_exact_preset_rows_are_exact_inverse_hessian_gradients(tmp_path, digits_frozen):
    task = digits_frozen
    path = build_index(task, tmp_path / "exact", PRESETS["exact"])
    rows = _rows(path)                                          # [n, k_W] float64
    side = pretrain_side(task)                                  # DW(z) = -[H_G^{-1} grad g(z)]_W
    model = task.pretrained_model()
    p_w = GradientProjector(model, side.w_names, proj_dim=None, dtype=torch.float64).matrix()
    assert torch.equal(p_w @ p_w.T, torch.eye(p_w.shape[0], dtype=torch.float64))   # a permutation
    want = (-side.displacements @ p_w.T).numpy()
    assert rows.shape == want.shape == (len(task.pretrain_dataset()), 780)
    err = np.abs(rows - want).max() / np.abs(want).max()
    assert err < 1e-6, err
    # row by row too (small rows must not hide behind large ones)
    rel = np.linalg.norm(rows - want, axis=1) / np.linalg.norm(want, axis=1)
    assert rel.max() < 1e-6, rel.max()
    m = _manifest(path)
    assert m["preconditioner"]["name"] == "exact" and m["preconditioner"]["damping_used"] == {"all": 0.0}


# ------------------------------------------------------------------------------------------------
# every preconditioner builds


@pytest.mark.parametrize("pre", PRECONDITIONERS)
def test_every_preconditioner_builds_on_digits(tmp_path, digits_frozen, pre):
    task = digits_frozen
    cfg = BuildConfig(proj_dim=128, preconditioner=pre)
    path = build_index(task, tmp_path / pre, cfg)
    rows = _rows(path)
    assert rows.shape[0] == len(task.pretrain_dataset()) and np.isfinite(rows).all()
    assert np.abs(rows).max() > 0
    m = _manifest(path)
    summary = m["preconditioner"]
    assert summary["name"] == pre
    expected_damping = {"hessian": 1e-3, "exact": 0.0}.get(pre, 0.1)
    assert summary["damping"] == expected_damping == m["config"]["damping"]
    if pre != "identity":
        used = summary["damping_used"]
        assert used and all(np.isfinite(v) and v >= 0 for v in used.values())
        assert (max(used.values()) > 0) == (pre != "exact")
    # the rows answer queries
    with InfluenceIndex.open(path) as index:
        index.attach(task, validate=False)
        res = index.query(full_batch(task.test_dataset(), [0, 1]), k=5)
    assert res.ids.shape == (2, 5) and np.isfinite(res.scores).all()


@pytest.mark.parametrize("proj_dim", [None, 32])
def test_every_preconditioner_builds_on_conv_embedding_layernorm_model(tmp_path, proj_dim):
    task = MixedTask()
    msif_index.validate_task(task)
    kinds = {b.kind for b in GradientProjector(task.pretrained_model(), list(task.shared_parameters)).blocks}
    assert kinds == {"conv2d", "embedding", "dense"}            # LayerNorm: dense blocks
    for pre in PRECONDITIONERS:
        cfg = BuildConfig(proj_dim=proj_dim, preconditioner=pre, dtype="float64", hessian_examples=8)
        path = build_index(task, tmp_path / f"{pre}", cfg)
        rows = _rows(path)
        assert rows.shape[0] == 24 and np.isfinite(rows).all() and np.abs(rows).max() > 0, pre
        m = _manifest(path)
        assert m["preconditioner"]["name"] == pre
        # hessian over 8 of the 24 examples: the subsample's default damping
        assert m["preconditioner"]["damping"] == {"hessian": SUBSAMPLED_HESSIAN_DAMPING, "exact": 0.0}.get(pre, 0.1)
        if pre in ("kfac", "ekfac"):          # one damping per W block
            assert set(m["preconditioner"]["damping_used"]) == {"conv", "emb", "norm.weight", "norm.bias"}
        if pre in ("ekfac", "exact"):         # the query side, with a W-only and a (W, U) projector
            with InfluenceIndex.open(path) as index:
                index.attach(task, validate=False)
                res = index.query(full_batch(task.test_dataset()), k=3, direction="harmful")
            assert res.ids.shape == (4, 3) and np.isfinite(res.scores).all()
        if pre in ("kfac", "ekfac"):          # eigenbasis rows: Kronecker and dense (LayerNorm) W blocks
            _check_scores_in_parameter_basis(task, path)
        if pre == "exact" and proj_dim is None:
            # exact rows through the Kronecker conv / embedding blocks and the dense LayerNorm blocks
            side = pretrain_side(task)
            p_w = GradientProjector(task.pretrained_model(), side.w_names, proj_dim=None,
                                    dtype=torch.float64).matrix()
            want = (-side.displacements @ p_w.T).numpy()
            assert np.abs(rows - want).max() / np.abs(want).max() < 1e-6


# ------------------------------------------------------------------------------------------------
# brute-force definitions of the preconditioners on a tiny model


def _example_grads(model: nn.Module, names: list[str], loss_fn, dataset) -> torch.Tensor:
    """Per-example gradients [n, d] over ``names`` (concatenated p.reshape(-1)), one backward each."""
    params = dict(model.named_parameters())
    out = []
    for i in range(len(dataset)):
        batch = full_batch(dataset, [i])
        loss = loss_fn(model, batch).sum()
        gs = torch.autograd.grad(loss, [params[n] for n in names])
        out.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(out).to(torch.float64)


@pytest.mark.parametrize("fisher", ["empirical", "gauss-newton"])
@pytest.mark.parametrize("proj_dim", [None, 12])
@pytest.mark.parametrize("pre", ["kfac", "ekfac"])
@pytest.mark.parametrize("stats_examples", [8192, 20])
def test_kronecker_preconditioners_equal_their_definition(tmp_path, pre, proj_dim, fisher, stats_examples):
    """kfac: M = S (x) A / E||Phi||^2; ekfac: M = Q diag(E[(Q^T vec Phi)^2]) Q^T, Q = Q_S (x) Q_A;
    both + (wd mean diag(P P^T) + damping * mean eigenvalue) I; stored row = M^{-1} vec Phi.
    The statistics' Phi: the stored rows' (empirical) or every pseudo-loss's (Gauss-Newton), summed
    over them and averaged over the examples of the seeded statistics subsample (all 64, or 20
    rows: then most stored rows come from featurize's rotated projector, the rest from the
    statistics pass rotated in apply)."""
    from msif_index.build import _subsample
    task = TinyTask() if fisher == "empirical" else TinyGN()
    damping = 0.05
    path = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=proj_dim, preconditioner=pre,
                                                           damping=damping, dtype="float64", fisher=fisher,
                                                           stats_examples=stats_examples))
    model = task.pretrained_model()
    w = list(task.shared_parameters)
    proj = GradientProjector(model, w, proj_dim=proj_dim, dtype=torch.float64)
    (block,) = proj.blocks
    p = proj.matrix()                                               # [k, 28]
    phi = (_example_grads(model, w, task.pretrain_loss, task.pretrain_dataset()) @ p.T)
    n = phi.shape[0]
    stats = _stats_rows(task, model, w, p)
    r_count = stats.shape[0] // n                                   # rows per example: 1, or the pseudo-losses
    ids = torch.tensor(_subsample(n, -(-stats_examples // r_count), 0))
    stats = stats.reshape(r_count, n, -1)[:, ids].reshape(-1, stats.shape[1])
    n = len(ids)                                                    # the statistics' examples
    mats = stats.reshape(-1, block.k_out, block.k_in)               # row-major Phi
    s = torch.einsum("zoi,zpi->op", mats, mats) / n
    a = torch.einsum("zoi,zoj->ij", mats, mats) / n
    mean_sq = (stats ** 2).sum() / n
    es, qs = torch.linalg.eigh(s)
    ea, qa = torch.linalg.eigh(a)
    q = torch.kron(qs, qa)
    if pre == "kfac":
        lam = torch.kron(torch.diag(es), torch.diag(ea)).diagonal() / mean_sq
        m_eig = lam
        # the explicit matrix: S (x) A / E||Phi||^2 has the eigenvalues lam in the basis q
        assert torch.allclose(q @ torch.diag(m_eig) @ q.T, torch.kron(s, a) / mean_sq, atol=1e-12)
    else:
        m_eig = ((stats @ q) ** 2).sum(0) / n
    wd = task.pretrain_weight_decay * float(torch.diagonal(p @ p.T).mean())
    lam_damp = damping * float(m_eig.mean())
    m_full = q @ torch.diag(m_eig + wd + lam_damp) @ q.T
    want = torch.linalg.solve(m_full, phi.T).T.numpy()
    assert _manifest(path)["preconditioner"]["row_basis"] == "eigen"
    rows = _parameter_rows(path)
    assert np.abs(rows - want).max() / np.abs(want).max() < 1e-10
    used = _manifest(path)["preconditioner"]["damping_used"]
    assert used == pytest.approx({"embed": lam_damp}, rel=1e-10)


def _projected_gradients(task, proj_dim):
    """By brute force, over (W, head) of the pretrained model: (model, names, P [k, d], the W columns
    of a row, phi = P g_z [n, k] of every pretraining example)."""
    model = task.pretrained_model()
    w = list(task.shared_parameters)
    names = w + ["head.weight", "head.bias"]
    proj = GradientProjector(model, names, proj_dim=proj_dim, dtype=torch.float64)
    p = proj.matrix()
    w_cols = torch.cat([torch.arange(b.offset, b.offset + b.dim) for b in proj.blocks if set(b.params) <= set(w)])
    phi = _example_grads(model, names, task.pretrain_loss, task.pretrain_dataset()) @ p.T
    return model, names, p, w_cols, phi


def _dense_definition_rows(phi, m, w_cols, damping: float, clamp: bool) -> tuple[np.ndarray, float]:
    """Stored rows [(M + damping * mean eig(M) I)^{-1} phi]_W (eigenvalues of M clamped at 0 when
    ``clamp``) and the damping used."""
    evals, evecs = torch.linalg.eigh(0.5 * (m + m.T))
    if clamp:
        evals = evals.clamp_min(0)
    lam = damping * float(evals.mean())
    return (phi @ (evecs @ torch.diag(1 / (evals + lam)) @ evecs.T))[:, w_cols].numpy(), lam


@pytest.mark.parametrize("proj_dim", [None, 16])
@pytest.mark.parametrize("pre, fisher", [("gauss-newton", "empirical"), ("gauss-newton", "gauss-newton"),
                                         ("hessian", "empirical")])
def test_dense_preconditioners_equal_their_definition(tmp_path, pre, fisher, proj_dim):
    """gauss-newton: M = (1/n) sum phi phi^T + wd P P^T (phi: the stored rows, or with fisher
    gauss-newton every pseudo-loss's projected gradient: then M is P (GGN + wd I) P^T); hessian:
    M = P H_G P^T (H_G with its weight decay; eigenvalues clamped at 0); stored row =
    [(M + damping * mean eig(M) I)^{-1} phi]_W."""
    task = TinyTask() if fisher == "empirical" else TinyGN()
    damping = 0.05
    path = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=proj_dim, preconditioner=pre,
                                                           damping=damping, dtype="float64", fisher=fisher))
    model, names, p, w_cols, phi = _projected_gradients(task, proj_dim)
    if pre == "gauss-newton":
        stats = _stats_rows(task, model, names, p)
        m = stats.T @ stats / phi.shape[0] + task.pretrain_weight_decay * (p @ p.T)
    else:
        m = p @ pretrain_side(task).hessian @ p.T                 # pretrain_side's H_G includes wd I
    want, lam = _dense_definition_rows(phi, m, w_cols, damping, clamp=pre == "hessian")
    rows = _rows(path)
    assert rows.shape == want.shape
    assert np.abs(rows - want).max() / np.abs(want).max() < 1e-8
    assert _manifest(path)["preconditioner"]["damping_used"] == pytest.approx({"all": lam}, rel=1e-8)


@pytest.mark.parametrize("proj_dim", [None, 16])
def test_subsampled_hessian_equals_its_definition(tmp_path, proj_dim):
    """hessian over a seeded subsample S of hessian_examples < n examples: M = P (H_S + wd I) P^T, with
    H_S the mean loss Hessian over S alone (not divided by n), eigenvalues clamped at 0; stored row =
    [(M + damping * mean eig(M) I)^{-1} phi]_W for every example, in S or not; default damping 0.1."""
    task = TinyTask()
    n, size = len(task.pretrain_dataset()), 20
    path = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=proj_dim, preconditioner="hessian",
                                                           hessian_examples=size, dtype="float64"))
    assert _manifest(path)["config"]["damping"] == SUBSAMPLED_HESSIAN_DAMPING
    ids = _subsample(n, size, 0)
    assert len(ids) == size
    sub = TinyTask()
    sub._pre = TensorDataset(*[t[ids] for t in task.pretrain_dataset().tensors])
    _, _, p, w_cols, phi = _projected_gradients(task, proj_dim)
    m = p @ pretrain_side(sub).hessian @ p.T                     # includes wd I
    want, _ = _dense_definition_rows(phi, m, w_cols, SUBSAMPLED_HESSIAN_DAMPING, clamp=True)
    rows = _rows(path)
    assert np.abs(rows - want).max() / np.abs(want).max() < 1e-8


class MixedGN(MixedTask):
    """MixedTask (Conv2d, Embedding, LayerNorm: dense blocks) with the Gauss-Newton statistics hook."""

    def pretrain_fisher_losses(self, model, batch):
        return cross_entropy_fisher_losses(model(batch))


@pytest.mark.parametrize("proj_dim", [None, 24])
def test_gauss_newton_statistics_through_dense_blocks_equal_their_definition(tmp_path, proj_dim):
    """Gauss-Newton statistics (one gradient pass per pseudo-loss into one buffer) through a model with
    dense-path blocks (LayerNorm): M = (1/n) sum_b sum_r phi_br phi_br^T + wd P P^T, rows to 1e-8.
    (The dense path's per-example gradients once carried autograd history into the shared buffer,
    and the second pseudo-loss's pass failed.)"""
    task = MixedGN()
    path = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=proj_dim, preconditioner="gauss-newton",
                                                           dtype="float64"))
    assert _manifest(path)["config"]["fisher"] == "gauss-newton"
    model, names, p, w_cols, phi = _projected_gradients(task, proj_dim)
    data = task.pretrain_dataset()
    stats = torch.cat([_example_grads(model, names, lambda m, b, r=r: task.pretrain_fisher_losses(m, b)[:, r], data)
                       for r in range(3)]) @ p.T
    m = stats.T @ stats / len(data) + task.pretrain_weight_decay * (p @ p.T)
    want, _ = _dense_definition_rows(phi, m, w_cols, 0.1, clamp=False)
    rows = _rows(path)
    assert np.abs(rows - want).max() / np.abs(want).max() < 1e-8


def test_hessian_of_a_model_not_at_a_minimum_warns(tmp_path, digits_frozen, capsys):
    """Negative eigenvalues of the projected Hessian (an untrained model) are clamped with a warning
    that points at build_index's caller, recorded in the manifest, and said again by a build resumed
    from the saved preconditioner; a model trained to its minimum (digits) gets none."""
    cfg = BuildConfig(proj_dim=None, preconditioner="hessian", shard_rows=16)
    with pytest.warns(RuntimeWarning, match="not at a minimum") as rec:
        out = build_index(TinyTask(), tmp_path / "tiny", cfg)
    w = [r for r in rec if "not at a minimum" in str(r.message)]
    assert len(w) == 1 and w[0].filename == __file__, [(r.filename, r.lineno) for r in w]
    neg = _manifest(out)["preconditioner"]["negative_eigenvalues"]
    assert neg["count"] >= 1 and neg["min"] < 0 < neg["largest"] and f"{neg['count']} of {neg['of']}" in str(w[0].message)
    (out / "manifest.json").unlink()                     # as if killed before the last shard
    (out / "shards" / "shard_00003.h5").unlink()
    with pytest.warns(RuntimeWarning, match="not at a minimum") as rec:
        build_index(TinyTask(), out, cfg)
    w2 = [r for r in rec if "not at a minimum" in str(r.message)]
    assert len(w2) == 1 and w2[0].filename == __file__ and str(w2[0].message) == str(w[0].message)
    assert _manifest(out)["preconditioner"]["negative_eigenvalues"] == neg
    from msif_index.cli.main import main
    from msif_index.info import describe
    assert describe(out)["negative_eigenvalues"] == neg
    main(["info", "--index", str(out)])
    assert f"warning: {neg['count']} of {neg['of']} eigenvalues" in capsys.readouterr().out
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        build_index(digits_frozen, tmp_path / "digits", BuildConfig(proj_dim=128, preconditioner="hessian"))
    assert not [r for r in rec if "not at a minimum" in str(r.message)]


def test_build_checks_free_space_for_all_rows_before_the_statistics(tmp_path, monkeypatch):
    """A disk without room for every row stops the build at once, before the statistics and gradients
    (nothing but build.json written), in one line with the space the rows need."""
    import msif_index.atomic
    monkeypatch.setattr(msif_index.atomic, "_free_bytes", lambda folder: 16)
    with pytest.raises(msif_index.errors.DiskFullError) as e:
        build_index(TinyTask(), tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="ekfac"))
    msg, n = str(e.value), len(TinyTask().pretrain_dataset())
    assert "\n" not in msg and msg.startswith(f"not enough free space for the rows of {n} examples")
    assert sorted(p.name for p in (tmp_path / "idx").iterdir()) == ["build.json", "shards"]
    assert not list((tmp_path / "idx" / "shards").iterdir())
    monkeypatch.undo()
    assert build_index(TinyTask(), tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="ekfac")).is_dir()


@pytest.mark.filterwarnings("ignore:the projected pretraining Hessian")
@pytest.mark.parametrize("preconditioner", ["hessian", "ekfac"])
def test_build_space_check_counts_the_shards_and_a_dense_inverse(tmp_path, monkeypatch, preconditioner):
    """The space asked for before the statistics is the shards' (ShardedWriter.pending_bytes, checked
    against the files in tests/test_store.py) plus the k_raw x k float64 inverse a dense
    preconditioner saves (it can outweigh the rows; ekfac's factors are small and not counted);
    preconditioner.h5 is checked again, with its real size, before it is written."""
    import msif_index.build as build_mod
    from msif_index.store import ShardedWriter
    real, calls = build_mod.check_free_space, []
    monkeypatch.setattr(build_mod, "check_free_space", lambda folder, what, nbytes:
                        (calls.append((what, nbytes)), real(folder, what, nbytes)))
    monkeypatch.setattr(ShardedWriter, "pending_bytes", lambda self: 1000)
    path = build_index(TinyTask(), tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner=preconditioner))
    m = _manifest(path)
    dense = m["k_raw"] * m["k"] * 8 if preconditioner == "hessian" else 0
    assert calls[0] == (f"the rows of {m['n']} examples", 1000 + dense)
    assert calls[1][0] == str(path / "preconditioner.h5")
    assert calls[1][1] >= (path / "preconditioner.h5").stat().st_size


@pytest.mark.filterwarnings("ignore:the projected pretraining Hessian")
def test_hessian_hvps_show_progress(tmp_path, monkeypatch):
    """The HVPs of hessian (minutes for a small CNN) advance a progress bar over the k rows of P."""
    import contextlib

    import msif_index.build as build_mod
    bars: dict[str, list[int]] = {}

    @contextlib.contextmanager
    def recording(total, description, unit="ex", enabled=None, initial=0):
        steps = bars.setdefault(description, [total])
        yield steps.append

    monkeypatch.setattr(build_mod, "progress", recording)
    path = build_index(TinyTask(), tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="hessian",
                                                                 hessian_examples=20), progress_bar=True)
    hvp = [v for d, v in bars.items() if "HVPs over 20 examples" in d]
    assert len(hvp) == 1, list(bars)
    k = _manifest(path)["k"]
    total, *steps = hvp[0]
    assert total == sum(steps) >= k and all(s > 0 for s in steps)


def _hvp_steps(monkeypatch, stop_at: int | None = None) -> list[int]:
    """The hessian preconditioner's progress steps (rows of P H P^T per step: a resumed run's rows
    first, then one step per chunk of HVPs computed); Ctrl-C at step ``stop_at``, after that
    chunk's HVPs and before its checkpoint."""
    import contextlib
    steps: list[int] = []

    def advance(c: int) -> None:
        steps.append(c)
        if stop_at is not None and len(steps) >= stop_at:
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def recording(total, description, unit="ex", enabled=None, initial=0):
        if "HVPs" in description and initial:
            steps.append(("initial", initial))
        yield advance if "HVPs" in description else (lambda c: None)

    monkeypatch.setattr(build_mod, "progress", recording)
    return steps


@pytest.mark.filterwarnings("ignore:the projected pretraining Hessian")
def test_interrupted_hessian_hvps_resume_from_their_checkpoint(tmp_path, monkeypatch, capsys):
    """A new-user trial's Ctrl-C after minutes of HVPs restarted them from zero (3,124 HVPs, 142 s):
    the rows so far are saved (every HVP_CHECKPOINT_S seconds, at chunk boundaries, and when Ctrl-C
    lands), a rerun computes only the rest and says so (progress bar, manifest), and its index equals
    an uninterrupted build's bit for bit. Saved rows that do not read back are computed again; the
    checkpoint is gone once preconditioner.h5 is written."""
    monkeypatch.setattr(build_mod, "HVP_CHUNK", 4)
    monkeypatch.setattr(build_mod, "HVP_CHECKPOINT_S", 3600.0)    # only Ctrl-C saves them
    cfg = BuildConfig(proj_dim=16, preconditioner="hessian", hessian_examples=20, dtype="float64")
    out = tmp_path / "idx"
    _hvp_steps(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        build_index(TinyTask(), out, cfg)
    partial = out / build_mod.HVP_PARTIAL
    with h5py.File(partial, "r") as f:
        rows_done, k = f["rows"].shape                # k: the rows of P (W and U projected)
    assert rows_done == 12 and k > 16                 # the three chunks before Ctrl-C (after the third)
    assert not (out / "preconditioner.h5").exists()
    from msif_index.cli.main import main
    capsys.readouterr()
    main(["info", "--index", str(out)])
    assert f"statistics not done: 12 of {k} HVP rows saved" in capsys.readouterr().out
    steps = _hvp_steps(monkeypatch)
    ref = build_index(TinyTask(), tmp_path / "ref", cfg)
    assert steps == [4] * (k // 4) + [k % 4] * (k % 4 > 0) and not (ref / build_mod.HVP_PARTIAL).exists()

    steps = _hvp_steps(monkeypatch)
    build_index(TinyTask(), out, cfg)
    # the bar starts at the 12 rows loaded (not counted in its rate), then only the rest is computed
    assert steps[0] == ("initial", 12) and steps[1:] == [4] * ((k - 12) // 4) + [k % 4] * (k % 4 > 0)
    assert not partial.exists() and _manifest(out)["resumed"]["hvps_loaded"] == 12
    assert _manifest(ref)["resumed"] is None
    capsys.readouterr()
    main(["info", "--index", str(out)])
    assert "preconditioner fitted from 12 saved HVP rows and the rest" in capsys.readouterr().out
    np.testing.assert_array_equal(_rows(out), _rows(ref))
    with h5py.File(out / "preconditioner.h5", "r") as a, h5py.File(ref / "preconditioner.h5", "r") as b:
        assert sorted(a) == sorted(b) and all(np.array_equal(a[n][...], b[n][...]) for n in a)

    again = tmp_path / "again"                        # a checkpoint that does not read back: ignored
    monkeypatch.setattr(build_mod, "HVP_CHECKPOINT_S", 0.0)           # saved after every chunk
    _hvp_steps(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        build_index(TinyTask(), again, cfg)
    (again / build_mod.HVP_PARTIAL).write_bytes(b"not hdf5")
    steps = _hvp_steps(monkeypatch)
    build_index(TinyTask(), again, cfg)
    assert sum(steps) == k and steps[0] == 4          # all of them, from the start
    np.testing.assert_array_equal(_rows(again), _rows(ref))


def test_rerun_keeps_an_index_built_with_the_former_hessian_default(tmp_path):
    """An index built when hessian's default damping over a subsample was 1e-3: the same command
    (no damping given) reuses it with a warning, instead of refusing it as another config; a new
    folder gets the new default, and a damping given explicitly is compared as before."""
    cfg = BuildConfig(proj_dim=16, preconditioner="hessian", hessian_examples=20)
    path = build_index(TinyTask(), tmp_path / "old", cfg.with_(damping=HESSIAN_DAMPING))   # the former default
    rows, mtime = _rows(path), (path / "manifest.json").stat().st_mtime_ns
    with pytest.warns(RuntimeWarning, match="it is kept") as rec:
        assert build_index(TinyTask(), path, cfg) == path
    w = [r for r in rec if "it is kept" in str(r.message)]
    assert len(w) == 1 and w[0].filename == __file__
    assert _manifest(path)["config"]["damping"] == HESSIAN_DAMPING
    assert (path / "manifest.json").stat().st_mtime_ns == mtime and np.array_equal(_rows(path), rows)
    with pytest.raises(ConfigError, match="damping"):
        build_index(TinyTask(), path, cfg.with_(damping=0.05))
    new = build_index(TinyTask(), tmp_path / "new", cfg)
    assert _manifest(new)["config"]["damping"] == SUBSAMPLED_HESSIAN_DAMPING


class BNNet(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.embed = nn.Linear(6, 4)
        self.bn = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, c)

    def forward(self, x):
        return self.head(torch.tanh(self.bn(self.embed(x))))


class BNTask(TinyTask):
    """TinyTask with batch norm in W; ``train_mode``: the models come back in training mode."""

    shared_parameters = ("embed.weight", "embed.bias", "bn.weight", "bn.bias")

    def __init__(self, train_mode: bool):
        super().__init__()
        self._pm, self._fm = _init(BNNet(3).double(), 1), _init(BNNet(2).double(), 2)
        for name in ("embed", "bn"):
            getattr(self._fm, name).load_state_dict(getattr(self._pm, name).state_dict())
        g = torch.Generator().manual_seed(3)
        for m in (self._pm, self._fm):
            m.bn.running_mean.uniform_(-0.5, 0.5, generator=g)
            m.bn.running_var.uniform_(0.5, 2.0, generator=g)
            m.train(train_mode)
        self._fm.bn.load_state_dict(self._pm.bn.state_dict())


def test_models_returned_in_training_mode_build_as_in_eval_mode(tmp_path):
    """msif computes on eval copies (batch norm on its running statistics, dropout off): a task whose
    models come back in training mode gets the same rows, the same recorded loss probe (no "the loss
    changed" warning when the same task comes back in eval mode, or the other way) and keeps its
    models' modes."""
    cfg = BuildConfig(proj_dim=12, preconditioner="ekfac", dtype="float64")
    train_task = BNTask(train_mode=True)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        path = build_index(train_task, tmp_path / "train", cfg)
        assert build_index(BNTask(train_mode=False), path, cfg) == path
        eval_path = build_index(BNTask(train_mode=False), tmp_path / "eval", cfg)
        with InfluenceIndex.open(eval_path) as index:
            index.attach(BNTask(train_mode=True))
    assert not [r for r in rec if "other values" in str(r.message)], [str(r.message) for r in rec]
    assert np.array_equal(_rows(path), _rows(eval_path))
    assert train_task.pretrained_model().training and train_task.pretrained_model().bn.training


def test_hessian_default_damping_depends_on_the_subsample():
    cfg = BuildConfig(preconditioner="hessian", hessian_examples=10)
    assert cfg.resolved(100, 10, n=10).damping == HESSIAN_DAMPING == 1e-3   # every example
    assert cfg.resolved(100, 10, n=11).damping == SUBSAMPLED_HESSIAN_DAMPING == 0.1
    assert cfg.resolved(100, 10).damping == HESSIAN_DAMPING                # n unknown
    assert cfg.with_(damping=0.02).resolved(100, 10, n=11).damping == 0.02   # given: kept
    assert BuildConfig(preconditioner="ekfac").resolved(100, 10, n=11).damping == 0.1


# ------------------------------------------------------------------------------------------------
# resuming, corruption, reuse, refusal

KILL_CONFIG = dict(proj_dim=12, preconditioner="ekfac", shard_rows=8, batch_size=4)
_KILL_SCRIPT = """
import sys
sys.path.insert(0, {root!r})
from tests.test_build import KILL_CONFIG, TinyTask
from msif_index.build import _subsample, build_index
from msif_index.config import BuildConfig
build_index(TinyTask(slow={slow}), {out!r}, BuildConfig(**KILL_CONFIG))
"""


def test_killed_build_resumes_to_identical_rows(tmp_path, capsys):
    out = tmp_path / "killed"
    script = _KILL_SCRIPT.format(root=str(ROOT), slow=0.2, out=str(out))
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    first = out / "shards" / "shard_00000.h5"
    deadline = time.monotonic() + 240

    def wait_for(path: Path, what: str) -> None:
        while not path.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, f"the build never wrote {what}"
            time.sleep(0.005)
    try:
        # during its statistics pass (16 batches of 0.2 s), a second build into the folder (even
        # --overwrite) is refused at once, in one line naming the writer; info and open name it too
        wait_for(out / "build.json", "build.json")
        with pytest.raises(BusyError) as e:
            build_index(TinyTask(), out, BuildConfig(**KILL_CONFIG), overwrite=True)
        assert f"process {proc.pid}" in _one_line(e) and "wait for it" in _one_line(e)
        assert describe(out)["writer_pid"] == proc.pid
        with pytest.raises(CorruptIndexError) as e:
            InfluenceIndex.open(out)
        assert f"still being built (process {proc.pid})" in _one_line(e)
        wait_for(first, "its first shard")
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = sorted(p.name for p in (out / "shards").glob("shard_*.h5"))
    assert 1 <= len(done) < 8, done                      # killed midway: shard 0 done, not all of them
    assert not (out / "manifest.json").exists()
    with pytest.raises(CorruptIndexError) as e:          # half-built: open says so, in one line
        InfluenceIndex.open(out)
    assert "did not finish" in _one_line(e)
    assert lock_path(out).exists() and lock_holder(out) is None     # SIGKILL: the kernel dropped the lock

    task = TinyTask()
    task.seen = []
    build_index(task, out, BuildConfig(**KILL_CONFIG))   # resume (same command)
    assert not lock_path(out).exists()
    n_done = 8 * len(done)
    assert set(task.seen) == set(range(n_done, 64)), "the resumed build recomputed finished shards"
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]

    ref = build_index(TinyTask(), tmp_path / "uninterrupted", BuildConfig(**KILL_CONFIG))
    assert np.array_equal(_rows(out), _rows(ref))
    # the manifest's timings are the resuming run's, and it says what that run computed
    assert describe(out)["resumed"] == {"rows_computed": 64 - n_done, "preconditioner_loaded": True,
                                       "hvps_loaded": 0}
    assert describe(ref)["resumed"] is None
    from msif_index.cli.main import main
    main(["info", "--index", str(out)])
    assert (f"built in (the run that resumed it: {64 - n_done} of 64 rows computed, preconditioner loaded) "
            in capsys.readouterr().out)
    queries = np.random.default_rng(0).standard_normal((5, _rows(ref).shape[1])).astype(np.float32)
    with InfluenceIndex.open(out) as a, InfluenceIndex.open(ref) as b:
        sa, ia = a.search_index.search(queries, 10)
        sb, ib = b.search_index.search(queries, 10)
        assert np.array_equal(ia, ib) and np.array_equal(sa, sb)
        batch = full_batch(task.test_dataset())
        a.attach(task)
        b.attach(task)
        ra, rb = a.query(batch, k=10), b.query(batch, k=10)
        assert np.array_equal(ra.ids, rb.ids) and np.array_equal(ra.scores, rb.scores)
        assert a.manifest["preconditioner"] == b.manifest["preconditioner"]


def test_folder_lock_one_writer_at_a_time(tmp_path, monkeypatch):
    out = tmp_path / "sub" / "idx"
    with folder_lock(out):
        assert lock_path(out).parent == out.parent and lock_holder(out) == os.getpid()
        with pytest.raises(BusyError, match=f"process {os.getpid()}"):      # even in one process
            with folder_lock(out):
                pass
        assert not out.exists()                     # the lock is beside the folder, not in it
    assert not lock_path(out).exists() and lock_holder(out) is None
    with folder_lock(out):                          # released: taken again
        pass
    # a lock file a killed build left, whose pid now names a live process (here: this one), is not
    # taken for a running build: the kernel's flock table says nobody holds it
    lock_path(out).write_text(f"{os.getpid()}\n")
    if Path("/proc/locks").exists():
        assert lock_holder(out) is None
    else:                                           # no kernel table: the recorded pid's liveness decides
        assert lock_holder(out) == os.getpid()
    with folder_lock(out):
        assert lock_holder(out) == os.getpid()
    # before the build writes anything, open and info already say a build is starting there
    with folder_lock(out):
        with pytest.raises(CorruptIndexError, match=f"still being built \\(process {os.getpid()}\\)"):
            InfluenceIndex.open(out)
        with pytest.raises(CorruptIndexError, match=f"a build \\(process {os.getpid()}\\) is starting"):
            describe(out)
    # a symbolic link where the lock file goes is not followed (its target is not overwritten)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    lock_path(out).symlink_to(victim)
    with pytest.warns(RuntimeWarning, match="not protected against another build"):
        with folder_lock(out):
            pass
    assert victim.read_text() == "keep me"
    lock_path(out).unlink()
    os.mkfifo(lock_path(out))                      # a FIFO there: no blocking open or read
    assert lock_holder(out) is None
    with pytest.warns(RuntimeWarning, match="not a regular file"):
        with folder_lock(out):
            pass
    lock_path(out).unlink()
    real_open = os.open

    # another user's lock file (not writable here): locked through a read-only descriptor all the same
    def read_only(path, flags, *a, **k):
        if str(path).endswith(".lock") and flags & os.O_RDWR:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **k)

    lock_path(out).write_text("")
    monkeypatch.setattr(os, "open", read_only)
    with folder_lock(out):
        with pytest.raises(BusyError, match="another process"):       # no pid could be recorded
            with folder_lock(out):
                pass
    monkeypatch.setattr(os, "open", real_open)
    lock_path(out).unlink(missing_ok=True)
    # a parent folder this user cannot write (creating the file is refused; it is not there to open
    # read-only): built unguarded, with a warning pointing at the caller (not an error)

    def refuse(path, flags, *a, **k):
        if str(path).endswith(".lock") and flags & os.O_CREAT:
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", refuse)
    with pytest.warns(RuntimeWarning, match="not protected against another build") as w:
        with folder_lock(out):
            pass
    assert w[0].filename == __file__
    monkeypatch.setattr(os, "open", real_open)
    # a file system without flock (ENOLCK, ENOSYS, ...): unguarded too
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with pytest.warns(RuntimeWarning, match="flock: No locks available"):
        with folder_lock(out):
            pass


@pytest.fixture()
def tiny_index(tmp_path) -> Path:
    return build_index(TinyTask(), tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="gauss-newton",
                                                                 shard_rows=16))


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def test_truncated_rows_file_is_detected(tmp_path, tiny_index):
    InfluenceIndex.open(tiny_index).close()
    rows = tiny_index / "rows.h5"
    size = rows.stat().st_size
    with open(rows, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(tiny_index)
    assert "rows.h5" in _one_line(e)


def test_truncated_or_missing_shard_is_detected(tmp_path, tiny_index):
    shard = tiny_index / "shards" / "shard_00002.h5"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(tiny_index)
    assert f"shard_00002.h5 is truncated ({size // 2:,} of its {size:,} bytes are there" in _one_line(e)
    shard.unlink()
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(tiny_index)
    assert "shard_00002.h5" in _one_line(e)


def test_corrupted_row_byte_is_detected(tmp_path, tiny_index):
    shard = tiny_index / "shards" / "shard_00001.h5"
    with h5py.File(shard, "r") as f:                    # a byte of the shard's first row
        offset = f["rows"].id.get_offset() + f["rows"].shape[1] * f["rows"].dtype.itemsize // 2
    _flip_byte(shard, offset)
    with pytest.raises(CorruptIndexError) as e:        # opening reads every row (Flat search) ...
        InfluenceIndex.open(tiny_index)
    assert "shard_00001.h5" in _one_line(e)            # the damaged file is named, not only rows.h5
    with pytest.raises(CorruptIndexError) as e:        # ... and so does the row store: it reads each
        RowStore.open(tiny_index / "rows.h5")          # shard's first rows to hold the shard open
    assert "shard_00001.h5" in _one_line(e) and "shard_00000.h5" not in _one_line(e)


def test_corrupted_faiss_file_is_detected(tmp_path):
    task = TinyTask()
    path = build_index(task, tmp_path / "hnsw", BuildConfig(proj_dim=16, preconditioner="identity",
                                                            factory="HNSW8"))
    with InfluenceIndex.open(path) as index:
        index.attach(task)
        before = index.query(full_batch(task.test_dataset()), k=5)
    faiss_file = path / "faiss.index"
    _flip_byte(faiss_file, faiss_file.stat().st_size // 2)
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(path)
    assert "faiss.index" in _one_line(e)
    assert before.ids.shape == (8, 5)
    faiss_file.unlink()                                   # gone: say so, and how to get it back
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(path)
    assert "faiss.index is missing" in _one_line(e) and "--overwrite" in _one_line(e)
    # --overwrite, as the error says: only the search structure is built again, over the rows
    cfg = BuildConfig(proj_dim=16, preconditioner="identity", factory="HNSW8")
    rows = _rows(path)
    def named():
        return path / json.loads((path / "manifest.json").read_text())["files"]["faiss"]
    for damage, factory in (("missing", "HNSW8"), ("flipped", "HNSW8"), ("missing", "Flat"), ("none", "HNSW8")):
        if damage == "flipped":
            _flip_byte(named(), named().stat().st_size // 2)
        elif damage == "missing" and named().is_file():
            named().unlink()
        task.seen = []
        if damage == "none":                               # from Flat back to HNSW8: a switch, no warning
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                build_index(task, path, cfg.with_(factory=factory), overwrite=True)
        else:
            with pytest.warns(RuntimeWarning, match="rebuilding the search index"):
                build_index(task, path, cfg.with_(factory=factory), overwrite=True)
        assert task.seen == [] and np.array_equal(_rows(path), rows) and _manifest(path)["config"]["factory"] == factory
        assert len(list(path.glob("faiss*"))) == (factory != "Flat")
        with InfluenceIndex.open(path) as index:
            index.attach(task)
            after = index.query(full_batch(task.test_dataset()), k=5)
        np.testing.assert_array_equal(after.ids, before.ids)


def test_corrupted_manifest_is_detected(tmp_path, tiny_index):
    manifest = tiny_index / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:-40])
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(tiny_index)
    assert "manifest" in _one_line(e) and "--overwrite" in _one_line(e)
    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)
    with pytest.raises(CorruptIndexError):                # a rebuild refuses to guess ...
        build_index(TinyTask(), tiny_index, cfg)
    build_index(TinyTask(), tiny_index, cfg, overwrite=True)   # ... and --overwrite, as the error says, works
    InfluenceIndex.open(tiny_index).close()


def test_rerun_reuses_and_other_config_refuses_unless_overwrite(tmp_path, tiny_index):
    task = TinyTask()
    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)
    before = _rows(tiny_index)
    mtime = (tiny_index / "manifest.json").stat().st_mtime_ns
    task.seen = []
    assert build_index(task, tiny_index, cfg.with_(batch_size=7, shard_rows=9)) == tiny_index  # same rows
    assert task.seen == [] and (tiny_index / "manifest.json").stat().st_mtime_ns == mtime
    other = cfg.with_(preconditioner="kfac")
    with pytest.raises(ConfigError) as e:
        build_index(task, tiny_index, other)
    msg = _one_line(e)
    assert "preconditioner" in msg and "overwrite" in msg and "holds an index built with another" in msg
    # the message words the remedy as the command line does; from Python a note translates it
    assert e.value.__notes__ == ["From Python: --overwrite is build_index(..., overwrite=True); "
                                 "--out is the out_dir argument"]
    assert np.array_equal(_rows(tiny_index), before)      # refused: untouched
    with InfluenceIndex.open(tiny_index) as index:
        index.attach(task)
    with pytest.warns(RuntimeWarning, match="1 attached finetuned model"):   # said, not silently dropped
        build_index(task, tiny_index, other, overwrite=True)
    assert not list((tiny_index / "operators").glob("*.h5"))
    m = _manifest(tiny_index)
    assert m["config"]["preconditioner"] == "kfac"
    assert not np.array_equal(_rows(tiny_index), before)


def test_another_config_on_an_unfinished_build_says_it_is_unfinished(tmp_path):
    """A build stopped midway (a NaN example here) and run again with another config: refused, and
    called an unfinished build (it once read "holds an index built with another config")."""
    out = tmp_path / "idx"
    with pytest.raises(NonFiniteError):
        build_index(TinyTask(nan_id=40), out, BuildConfig(proj_dim=16, preconditioner="identity", shard_rows=16))
    assert not (out / "manifest.json").exists() and (out / "build.json").exists()
    with pytest.raises(ConfigError) as e:
        build_index(TinyTask(nan_id=40), out, BuildConfig(proj_dim=32, preconditioner="identity", shard_rows=16))
    msg = _one_line(e)
    assert "holds an unfinished build (rerun its own command to resume it) with another config" in msg, msg
    assert "proj_dim" in msg and "--overwrite" in msg


def test_another_factory_rebuilds_only_the_search_index(tmp_path, tiny_index):
    """The search factory is not part of the build's identity: a rerun with another one computes no
    gradient and keeps rows, shards and attached operators, and only the search structure changes
    (its file alternates between two names, so the manifest switches from the old to the new one);
    a partial build resumes with another factory; an index whose recorded identity still holds
    config.factory (older versions) is reused and switched the same way."""
    task = TinyTask()
    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)
    rows = _rows(tiny_index)
    shards = sorted((p.name, p.stat().st_mtime_ns) for p in (tiny_index / "shards").glob("*.h5"))
    test = full_batch(task.test_dataset())
    with InfluenceIndex.open(tiny_index) as index:
        key = index.attach(task)
        flat = index.query(test, k=5)
    for factory, file in (("HNSW8", "faiss.index"), ("IVF2,Flat", "faiss.alt.index"), ("HNSW16", "faiss.index"),
                          ("SVD4", None), ("Flat", None)):
        task.seen = []
        assert build_index(task, tiny_index, cfg.with_(factory=factory)) == tiny_index
        m = _manifest(tiny_index)
        assert task.seen == [] and m["config"]["factory"] == factory and m["files"]["faiss"] == file
        assert sorted(p.name for p in tiny_index.glob("faiss*")) == ([file] if file else [])
        assert np.array_equal(_rows(tiny_index), rows)
        assert sorted((p.name, p.stat().st_mtime_ns) for p in (tiny_index / "shards").glob("*.h5")) == shards
        with InfluenceIndex.open(tiny_index) as index:
            assert index.attach(task) == key and len(list((tiny_index / "operators").glob("*.h5"))) == 1
            res = index.query(test, k=5, **({"nprobe": 2} if factory.startswith("IVF") else {}))
        np.testing.assert_array_equal(res.ids, flat.ids, err_msg=factory)
        np.testing.assert_allclose(res.scores, flat.scores, rtol=1e-5, err_msg=factory)
        mtime = (tiny_index / "manifest.json").stat().st_mtime_ns
        build_index(task, tiny_index, cfg.with_(factory=factory))          # the same again: nothing rewritten
        assert (tiny_index / "manifest.json").stat().st_mtime_ns == mtime
    # a partial build (stops at example 40) resumed with another factory
    with pytest.raises(NonFiniteError):
        build_index(TinyTask(nan_id=40), tmp_path / "partial", cfg)
    partial = build_index(TinyTask(), tmp_path / "partial", cfg.with_(factory="HNSW8"))
    assert np.array_equal(_rows(partial), rows) and _manifest(partial)["config"]["factory"] == "HNSW8"
    # identities recorded by older versions held the factory: still the same build
    for name in ("manifest.json", "build.json"):
        path = partial / name
        data = json.loads(path.read_text())
        data["identity"]["config"]["factory"] = "HNSW8"
        path.write_text(json.dumps(data))
    mtime = (partial / "manifest.json").stat().st_mtime_ns
    build_index(TinyTask(), partial, cfg.with_(factory="HNSW8"))
    assert (partial / "manifest.json").stat().st_mtime_ns == mtime
    build_index(TinyTask(), partial, cfg.with_(factory="Flat"))
    assert _manifest(partial)["config"]["factory"] == "Flat" and not list(partial.glob("faiss*"))
    with InfluenceIndex.open(partial) as index:
        index.attach(task)
        np.testing.assert_array_equal(index.query(test, k=5).ids, flat.ids)
    with pytest.raises(ConfigError) as e:                     # another preconditioner is still another build
        build_index(TinyTask(), partial, cfg.with_(preconditioner="kfac", factory="HNSW8"))
    assert "preconditioner" in _one_line(e) and "config.factory" not in _one_line(e)   # the factory is no difference
    # what a crash between the new faiss file and the manifest, or a killed save, leaves is removed by
    # the next switch (a plain rerun deletes nothing: another build may be switching)
    build_index(TinyTask(), partial, cfg.with_(factory="HNSW8"))
    (partial / "faiss.alt.index").write_bytes(b"left by a crash")
    (partial / ".faiss.index.tmp-999999999-0123abcd").write_bytes(b"left by a killed save")
    build_index(TinyTask(), partial, cfg.with_(factory="HNSW8"))
    assert len(list(partial.glob("*faiss*"))) == 3
    build_index(TinyTask(), partial, cfg.with_(factory="HNSW16"))
    assert sorted(p.name for p in partial.glob("*faiss*")) == ["faiss.alt.index"]
    InfluenceIndex.open(partial).close()


def test_readers_see_the_old_or_the_new_search_index_during_a_switch(tmp_path, tiny_index):
    """InfluenceIndex.open in another thread while the factory switches back and forth: every open
    succeeds (a manifest read just before a switch is read again) and answers as Flat does."""
    import threading
    task = TinyTask()
    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)
    test = full_batch(task.test_dataset())
    with InfluenceIndex.open(tiny_index) as index:
        index.attach(task)
        want = index.query(test, k=5).ids
    errors, opened, stop = [], [0], threading.Event()

    def reader():
        while not stop.is_set():
            try:
                with InfluenceIndex.open(tiny_index, huge_pages=False) as index:
                    index.search_index.search(np.zeros((1, index.k), np.float32), 3)
                opened[0] += 1
            except Exception as e:  # noqa: BLE001 - collected and reported below
                errors.append(repr(e))

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(30):
            build_index(task, tiny_index, cfg.with_(factory=("HNSW8", "HNSW16", "Flat")[i % 3]))
    finally:
        stop.set()
        t.join()
    assert not errors and opened[0] > 0, (errors[:3], opened)
    with InfluenceIndex.open(tiny_index) as index:
        index.attach(task)
        np.testing.assert_array_equal(index.query(test, k=5).ids, want)
    # the faiss file removed between its existence check and its checksum: "missing", one line
    import msif_index.index as I
    build_index(task, tiny_index, cfg.with_(factory="HNSW8"))
    real = I.file_sha256

    def removed_meanwhile(path):
        raise FileNotFoundError(2, "No such file or directory", str(path))
    I.file_sha256 = removed_meanwhile
    try:
        with pytest.raises(CorruptIndexError) as e:
            InfluenceIndex.open(tiny_index)
        assert "is missing" in _one_line(e)
    finally:
        I.file_sha256 = real


def test_operator_file_copied_from_another_index_is_computed_again(tmp_path, tiny_index):
    """An attached operator's file name (its key) does not depend on the index's projection: one copied
    from an index with another proj_dim is refused with a warning and computed again."""
    task = TinyTask()
    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)
    test = full_batch(task.test_dataset())
    with InfluenceIndex.open(tiny_index) as index:
        key = index.attach(task)
    # another width (B's shape differs); the same width from another seed (every shape fits: the
    # projection's fingerprint tells them apart); a damaged file
    for folder, change, damage in (("other", {"proj_dim": 12}, "copied"), ("seeded", {"seed": 1}, "copied"),
                                   ("seeded", {"seed": 1}, "truncated")):
        path = build_index(task, tmp_path / folder, cfg.with_(**change))
        with InfluenceIndex.open(path) as index:
            assert index.attach(task) == key
            want = index.query(test, k=5)
        target = path / "operators" / f"{key}.h5"
        if damage == "copied":
            shutil.copy(tiny_index / "operators" / f"{key}.h5", target)
        else:
            target.write_bytes(target.read_bytes()[:1000])
        with InfluenceIndex.open(path) as index:
            with pytest.warns(RuntimeWarning, match="does not fit this index"):
                index.attach(task)
            got = index.query(test, k=5)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_allclose(got.scores, want.scores, rtol=1e-9)
        with InfluenceIndex.open(path) as index:            # the file was replaced by the right one
            with warnings.catch_warnings():
                warnings.simplefilter("error", RuntimeWarning)
                index.attach(task)


def test_describe_a_complete_index_and_an_unfinished_build(tmp_path, tiny_index):
    """msif info's library side: the manifest's summary and the attached models without loading rows;
    for an unfinished build, how many rows and shards are done."""
    from msif_index.info import describe
    task = TinyTask()
    with InfluenceIndex.open(tiny_index) as index:
        key = index.attach(task)
    d = describe(tiny_index)
    m = _manifest(tiny_index)
    assert d["complete"] and (d["n"], d["k"], d["preconditioner"], d["factory"]) == (m["n"], m["k"], "gauss-newton", "Flat")
    assert [a["key"] for a in d["attached"]] == [key] and d["attached"][0]["finetuning"] == "frozen"
    assert d["bytes"]["rows"] > 0 and d["fingerprints"]["W"] == m["fingerprint_short"]["W"] and not d["problems"]
    json.dumps(d, allow_nan=False)
    cfg = BuildConfig(proj_dim=16, preconditioner="identity", shard_rows=16)
    with pytest.raises(NonFiniteError):                       # stops in its third shard of 16 rows
        build_index(TinyTask(nan_id=40), tmp_path / "partial", cfg)
    d = describe(tmp_path / "partial")
    assert not d["complete"] and (d["shards_done"], d["shards_total"], d["rows_done"]) == (2, 4, 32)
    # a rerun with another shard_rows is refused before build.json records it; stray files: the count holds
    with pytest.raises(ConfigError):
        build_index(TinyTask(nan_id=40), tmp_path / "partial", cfg.with_(shard_rows=10))
    assert json.loads((tmp_path / "partial" / "build.json").read_text())["config"]["shard_rows"] == 16
    (tmp_path / "partial" / "shards" / "shard_00099.h5").write_bytes(b"junk")
    (tmp_path / "partial" / "shards" / "shard_abc.h5").write_bytes(b"junk")
    d = describe(tmp_path / "partial")
    assert (d["shards_done"], d["shards_total"], d["rows_done"]) == (2, 4, 32)   # what the shards' headers say
    json.dumps(d, allow_nan=False)
    with pytest.raises(CorruptIndexError):
        describe(tmp_path / "nothing")


def test_another_pretraining_loss_is_told_on_rerun_resume_and_attach(tmp_path, tiny_index):
    """The rows depend on pretrain_loss, which no fingerprint covers: its values on the first examples
    are recorded, and a rerun, a resume or an attach whose loss gives other values warns (one line)."""
    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)

    class Smoothed(TinyTask):
        def pretrain_loss(self, model, batch):
            return super().pretrain_loss(model, batch) * 1.1

    assert len(_manifest(tiny_index)["pretrain_loss_probe"]) == 8
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        build_index(TinyTask(), tiny_index, cfg)                      # the same loss: nothing said
        with InfluenceIndex.open(tiny_index) as index:
            index.attach(TinyTask())
    with pytest.warns(RuntimeWarning, match="pretrain_loss gives other values") as w:
        build_index(Smoothed(), tiny_index, cfg)
    assert "\n" not in str(w[0].message) and "--overwrite" in str(w[0].message)
    with InfluenceIndex.open(tiny_index) as index:
        with pytest.warns(RuntimeWarning, match="pretrain_loss gives other values"):
            index.attach(Smoothed())
    with pytest.raises(NonFiniteError):                               # a partial build, resumed
        build_index(TinyTask(nan_id=40), tmp_path / "partial", cfg)
    with pytest.warns(RuntimeWarning, match="pretrain_loss gives other values"):
        build_index(Smoothed(), tmp_path / "partial", cfg)


def test_manifest_naming_another_search_file_is_corrupt(tmp_path):
    path = build_index(TinyTask(), tmp_path / "hnsw", BuildConfig(proj_dim=16, preconditioner="identity",
                                                                  factory="HNSW8"))
    manifest = json.loads((path / "manifest.json").read_text())
    for bad in ("../../etc/passwd", None, 3):
        manifest["files"]["faiss"] = bad
        (path / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CorruptIndexError) as e:
            InfluenceIndex.open(path)
        assert "files" in _one_line(e) or "search index file" in _one_line(e)


def _with_pretraining_example_changed(task: "TinyTask", i: int) -> "TinyTask":
    x, y, ids = task._pre.tensors
    x = x.clone()
    x[i, 0] += 1.0
    task._pre = TensorDataset(x, y, ids)
    return task


def test_other_pretraining_data_is_neither_reused_nor_resumed(tmp_path, tiny_index):
    """Same n, pretrained model and config, one sampled pretraining example changed: a complete index
    is not reused and a partial build is not resumed (ConfigError naming the pretraining data),
    unless --overwrite."""
    from msif_index.fingerprint import dataset_sample_ids

    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)
    sampled = dataset_sample_ids(64)
    other = _with_pretraining_example_changed(TinyTask(), sampled[1])
    before = _rows(tiny_index)
    with pytest.raises(ConfigError) as e:
        build_index(other, tiny_index, cfg)
    assert "pretraining data" in _one_line(e) and "overwrite" in _one_line(e)
    assert np.array_equal(_rows(tiny_index), before)
    # a partial build (example 40, not sampled, is NaN: the build stops in its third shard)
    assert 40 not in sampled
    partial = tmp_path / "partial"
    with pytest.raises(NonFiniteError):
        build_index(TinyTask(nan_id=40), partial, cfg)
    with pytest.raises(ConfigError) as e:
        build_index(_with_pretraining_example_changed(TinyTask(), sampled[2]), partial, cfg)
    assert "pretraining data" in _one_line(e)
    build_index(TinyTask(), partial, cfg)                      # the same data resumes
    assert np.array_equal(_rows(partial), before)
    build_index(other, tiny_index, cfg, overwrite=True)
    assert not np.array_equal(_rows(tiny_index), before)


def test_builds_from_before_data_fingerprints_are_reused_and_resumed(tmp_path, monkeypatch):
    """An index or partial build made before the data were fingerprinted (identity without "data",
    simulated) is reused or resumed as before, not refused as another build; its rows equal a
    fresh build's and the task attaches (no data check)."""
    import msif_index.build as B

    real = B._adopt_older_identity
    cfg = BuildConfig(proj_dim=16, preconditioner="identity", shard_rows=16)
    fresh = build_index(TinyTask(), tmp_path / "fresh", cfg)
    monkeypatch.setattr(B, "_adopt_older_identity",
                        lambda out, identity: {k: v for k, v in identity.items() if k != "data"})
    old = build_index(TinyTask(), tmp_path / "old", cfg)
    with pytest.raises(NonFiniteError):                      # an old partial build (stops at example 40)
        build_index(TinyTask(nan_id=40), tmp_path / "partial", cfg)
    monkeypatch.setattr(B, "_adopt_older_identity", real)
    assert "data" not in _manifest(old)["identity"]
    mtime = (old / "manifest.json").stat().st_mtime_ns
    assert build_index(TinyTask(), old, cfg) == old          # reused
    assert (old / "manifest.json").stat().st_mtime_ns == mtime
    partial = build_index(TinyTask(), tmp_path / "partial", cfg)     # resumed
    assert "data" not in _manifest(partial)["identity"]
    assert np.array_equal(_rows(partial), _rows(fresh))
    with InfluenceIndex.open(partial) as index:
        index.attach(TinyTask())
    with pytest.raises(ConfigError):                          # another config is still another build
        build_index(TinyTask(), old, cfg.with_(proj_dim=12))


class _Unseeded(torch.utils.data.Dataset):
    """TinyTask's pretraining items plus noise from a fresh, unseeded numpy generator per read."""

    def __init__(self, base):
        self.base = base

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, ids = self.base[i]
        return x + 1e-9 * float(np.random.default_rng().random()), y, ids


def test_pretraining_data_that_change_on_every_read_are_not_fingerprinted(tmp_path):
    """Examples that differ on every read (randomness outside the seeded global generators): the
    build warns and records no data fingerprint, so the build resumes and the task attaches."""
    task = TinyTask()
    task._pre = _Unseeded(task._pre)
    cfg = BuildConfig(proj_dim=16, preconditioner="identity", shard_rows=16)
    with pytest.warns(RuntimeWarning, match="different examples when read twice"):
        path = build_index(task, tmp_path / "idx", cfg)
    assert _manifest(path)["identity"]["data"] is None
    with pytest.warns(RuntimeWarning):
        assert build_index(task, path, cfg) == path              # reused, not refused
    with InfluenceIndex.open(path) as index:
        index.attach(task)


def test_interrupted_overwrite_keeps_the_old_index_and_resumes(tmp_path):
    """--overwrite of a complete index builds the new one beside it and swaps it in when complete: a
    rebuild that fails midway leaves the old index answering, the rerun resumes the new one, and a
    swap stopped between its two renames is finished by the next call."""
    old_cfg = BuildConfig(proj_dim=16, preconditioner="identity", shard_rows=16)
    new_cfg = BuildConfig(proj_dim=12, preconditioner="identity", shard_rows=16, batch_size=8)
    path = build_index(TinyTask(), tmp_path / "idx", old_cfg)
    (path / "README.md").write_text("my notes")
    (path / ".gitkeep").write_text("")
    before = _rows(path)
    staging = tmp_path / ".idx.overwrite"
    with pytest.raises(NonFiniteError):                        # example 40 fails in the third shard
        build_index(TinyTask(nan_id=40), path, new_cfg, overwrite=True)
    assert np.array_equal(_rows(path), before)                # the old index is intact ...
    assert _manifest(path)["config"]["proj_dim"] == 16
    with InfluenceIndex.open(path) as index:                  # ... and answers
        index.attach(TinyTask())
        assert index.query(full_batch(TinyTask().test_dataset(), [0]), k=3).ids.shape == (1, 3)
    assert (staging / "build.json").is_file() and len(list((staging / "shards").glob("shard_*.h5"))) == 2
    task = TinyTask()
    task.seen = []
    with pytest.warns(RuntimeWarning, match="attached finetuned model"):   # the old index's operator goes
        assert build_index(task, path, new_cfg, overwrite=True) == path
    assert set(task.seen) == set(range(32, 64))               # the two finished shards were not redone
    assert _manifest(path)["config"]["proj_dim"] == 12
    assert not staging.exists() and not (tmp_path / ".idx.replaced").exists()
    assert (path / "README.md").read_text() == "my notes" and (path / ".gitkeep").is_file()
    fresh = build_index(TinyTask(), tmp_path / "fresh", new_cfg)
    assert np.array_equal(_rows(path), _rows(fresh))          # the same rows as a build from scratch
    # a swap stopped after its first rename: the index folder is gone, the new index waits in staging
    path.rename(staging)
    task.seen = []
    assert build_index(task, path, new_cfg) == path and task.seen == []
    assert not staging.exists() and np.array_equal(_rows(path), _rows(fresh))
    # an overwrite whose replacement is complete but not swapped in, rerun with another factory: the
    # replacement is swapped in with that factory (over its rows, no gradient)
    import msif_index.build as B
    real_swap = B._swap_in

    def stopped(*args):
        raise KeyboardInterrupt
    B._swap_in = stopped
    try:
        with pytest.raises(KeyboardInterrupt):
            build_index(TinyTask(), path, old_cfg, overwrite=True)
    finally:
        B._swap_in = real_swap
    assert (staging / "manifest.json").is_file() and _manifest(path)["config"]["proj_dim"] == 12
    task.seen = []
    assert build_index(task, path, old_cfg.with_(factory="HNSW8"), overwrite=True) == path and task.seen == []
    m = _manifest(path)
    assert m["config"]["proj_dim"] == 16 and m["config"]["factory"] == "HNSW8" and (path / "faiss.index").is_file()
    assert np.array_equal(_rows(path), before) and not staging.exists()


def test_overwrite_rebuilds_a_damaged_index_of_the_same_config(tmp_path, tiny_index):
    """Every corruption error says to rebuild with --overwrite: with the same config it must rebuild
    what is damaged (not return "already built"); on a healthy index it changes nothing."""
    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)
    task = TinyTask()
    with InfluenceIndex.open(tiny_index) as index:
        index.attach(task)                               # an attached operator survives the rebuild
        before = index.query(full_batch(task.test_dataset()), k=5)
    rows = _rows(tiny_index)
    mtime = (tiny_index / "manifest.json").stat().st_mtime_ns
    task.seen = []
    build_index(task, tiny_index, cfg, overwrite=True)   # healthy: nothing redone
    assert task.seen == [] and (tiny_index / "manifest.json").stat().st_mtime_ns == mtime
    shard = tiny_index / "shards" / "shard_00001.h5"
    with h5py.File(shard, "r") as f:
        offset = f["rows"].id.get_offset() + f["rows"].id.get_storage_size() // 2
    _flip_byte(shard, offset)
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(tiny_index)
    assert "--overwrite" in _one_line(e)
    with pytest.warns(RuntimeWarning, match="rebuilding the damaged index"):
        build_index(task, tiny_index, cfg, overwrite=True)
    assert task.seen                                      # rebuilt ...
    assert np.array_equal(_rows(tiny_index), rows)        # ... to the same rows
    (tiny_index / "preconditioner.h5").write_bytes(b"damaged")
    with pytest.warns(RuntimeWarning, match="preconditioner.h5"):
        build_index(task, tiny_index, cfg, overwrite=True)
    (tiny_index / "rows.h5").unlink()
    with pytest.warns(RuntimeWarning, match="rows.h5"):
        build_index(task, tiny_index, cfg, overwrite=True)
    manifest = json.loads((tiny_index / "manifest.json").read_text())
    manifest["projector"]["seed"] = 12345                 # an edited manifest: open refuses it ...
    (tiny_index / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CorruptIndexError):
        InfluenceIndex.open(tiny_index)
    with pytest.warns(RuntimeWarning, match="does not match"):   # ... and --overwrite repairs it
        build_index(task, tiny_index, cfg, overwrite=True)
    with InfluenceIndex.open(tiny_index) as index:
        assert len(list((tiny_index / "operators").glob("*.h5"))) == 1
        index.attach(task)
        after = index.query(full_batch(task.test_dataset()), k=5)
    assert np.array_equal(before.ids, after.ids) and np.allclose(before.scores, after.scores, rtol=1e-6)


def test_query_side_checks_the_preconditioner_checksum(tmp_path):
    """kfac / ekfac rows are in the preconditioner's eigenbasis, read from preconditioner.h5 at attach:
    a damaged or replaced file is refused in one line, not used."""
    task = TinyTask()
    path = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="kfac"))
    other = build_index(task, tmp_path / "other", BuildConfig(proj_dim=16, preconditioner="kfac", seed=1))
    shutil.copy(other / "preconditioner.h5", path / "preconditioner.h5")     # readable, but another build's
    with InfluenceIndex.open(path) as index:
        with pytest.raises(CorruptIndexError) as e:
            index.attach(task)
    assert "preconditioner.h5 fails its checksum" in _one_line(e) and "--overwrite" in _one_line(e)


def test_partial_build_with_other_shard_rows_resumes_only_with_overwrite(tmp_path):
    """shard_rows is not part of the identity (the rows do not depend on it), so a partial build
    rerun with another value is refused by its shards; --overwrite, as the message says, rewrites them."""
    cfg = BuildConfig(proj_dim=16, preconditioner="identity", shard_rows=16)
    out = tmp_path / "idx"
    with pytest.raises(NonFiniteError):                    # example 40 fails in the third shard
        build_index(TinyTask(nan_id=40), out, cfg)
    assert len(list((out / "shards").glob("shard_*.h5"))) == 2
    other = cfg.with_(shard_rows=20)
    with pytest.raises(ConfigError) as e:
        build_index(TinyTask(), out, other)
    assert "--overwrite" in _one_line(e)
    build_index(TinyTask(), out, other, overwrite=True)
    ref = build_index(TinyTask(), tmp_path / "ref", other)
    assert np.array_equal(_rows(out), _rows(ref))
    assert sorted(p.name for p in (out / "shards").glob("*")) == sorted(p.name for p in (ref / "shards").glob("*"))


def test_unreadable_preconditioner_state_is_fitted_again_on_resume(tmp_path, monkeypatch):
    """A damaged preconditioner.h5 may make h5py raise RuntimeError (damaged metadata), not only
    OSError: the resume fits it again (deterministic) instead of failing with a traceback."""
    import msif_index.build as build_mod
    cfg = BuildConfig(proj_dim=16, preconditioner="kfac", shard_rows=16)
    out = build_index(TinyTask(), tmp_path / "idx", cfg)
    (out / "manifest.json").unlink()                     # as if killed before the last shard
    (out / "shards" / "shard_00003.h5").unlink()

    def damaged(path):
        raise RuntimeError("Object visitation failed (message not aligned)")

    monkeypatch.setattr(build_mod, "read_state", damaged)
    task = TinyTask()
    task.seen = []
    build_index(task, out, cfg)
    monkeypatch.undo()
    assert set(range(48, 64)) <= set(task.seen) and len(task.seen) > 16    # fitted again, then shard 3
    ref = build_index(TinyTask(), tmp_path / "ref", cfg)
    assert np.array_equal(_rows(out), _rows(ref))
    head = (out / "preconditioner.h5").read_bytes()[:9]
    assert head[:8] == b"\x89HDF\r\n\x1a\n" and head[8] >= 2  # superblock v2+: checksummed metadata


def test_failed_build_waits_for_the_shard_commit_in_flight(tmp_path, monkeypatch):
    """A build that fails while the previous shard's commit (fsync, rename) runs in the background
    returns only once that commit is done: nothing of it is left running or half-renamed."""
    import threading
    real_fsync = os.fsync

    def slow_fsync(fd):                                   # the commit is still running when shard 2 fails
        if threading.current_thread().name.startswith("msif-commit"):
            time.sleep(0.5)
        real_fsync(fd)

    class Stop(Exception):
        pass

    class Interrupted(TinyTask):                          # as a Ctrl-C in the second shard
        def pretrain_loss(self, model, batch):
            if 20 in batch[2].tolist():
                raise Stop()
            return super().pretrain_loss(model, batch)

    monkeypatch.setattr(os, "fsync", slow_fsync)
    with pytest.raises(Stop):
        build_index(Interrupted(), tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="identity",
                                                                 shard_rows=16, batch_size=8))
    assert not [t for t in threading.enumerate() if t.name.startswith("msif-commit")]
    assert not [p for p in (tmp_path / "idx").rglob("*") if ".tmp-" in p.name]
    assert len(list((tmp_path / "idx" / "shards").glob("shard_*.h5"))) == 1


def test_old_index_left_by_a_swap_killed_after_its_renames_is_removed(tmp_path):
    cfg = BuildConfig(proj_dim=16, preconditioner="identity", shard_rows=16)
    path = build_index(TinyTask(), tmp_path / "idx", cfg)
    replaced = tmp_path / ".idx.replaced"
    shutil.copytree(path, replaced)                      # what a kill before its rmtree leaves
    assert build_index(TinyTask(), path, cfg) == path
    assert not replaced.exists()


def test_tied_embeddings_are_named_and_built_exactly_with_dense_modules(tmp_path, monkeypatch):
    """A weight used outside its module stops the build in one line naming the module and the task's
    dense_modules; listed there, the module takes the exact per-example path: rows = P g_z."""
    from msif_index.build import prepare, resolve_config
    from msif_index.errors import TaskError
    cfg = BuildConfig(proj_dim=20, preconditioner="identity", compute_dtype="float64", dtype="float64")
    with pytest.raises(TaskError) as e:
        build_index(TiedTask(), tmp_path / "hooks", cfg)
    msg = _one_line(e)
    assert "'emb'" in msg and "dense_modules" in msg
    import msif_index.build as build_mod

    def no_hvps(*a, **k):
        raise AssertionError("the Hessian-vector products ran before the hooks' check")
    with monkeypatch.context() as mp:                  # hessian: the check comes before the HVPs
        mp.setattr(build_mod, "projected_hessian", no_hvps)
        with pytest.raises(TaskError, match="dense_modules"):
            build_index(TiedTask(), tmp_path / "hessian", cfg.with_(preconditioner="hessian"))
    task = TiedTask(dense_modules=("emb",))
    path = build_index(task, tmp_path / "dense", cfg)
    prep = prepare(task, resolve_config(task, cfg))
    assert {b.name: b.kind for b in prep.projector.blocks}["emb.weight"] == "dense"
    names = list(prep.projector.param_names)
    want = _example_grads(task.pretrained_model(), names, task.pretrain_loss, task.pretrain_dataset()) \
        @ prep.projector.matrix().T
    k_w = _manifest(path)["k"]
    np.testing.assert_allclose(_rows(path), want[:, :k_w].numpy(), rtol=1e-9, atol=1e-12)
    assert _manifest(path)["identity"]["dense_modules"] == ["emb"]
    with InfluenceIndex.open(path) as index:                  # the query side follows the stored plan
        index.attach(task)
        assert index.query(full_batch(task.test_dataset()), k=3).ids.shape == (4, 3)
    with pytest.raises(TaskError, match="dense_modules"):
        from msif_index.task import validate_task
        validate_task(TiedTask(dense_modules=("nope",)))


def test_dense_modules_reach_the_finetune_side(tmp_path):
    """A tied module in theta (the finetuning head reuses the embedding): listed in dense_modules, the
    query path and H_tt take it whole too, and q_t equals the two-pass reference."""
    from msif_index.errors import TaskError
    from msif_index.operator import reference_query_vectors

    class HeadTied(TiedTask):
        shared_parameters = ("mix.weight", "mix.bias")

    cfg = BuildConfig(proj_dim=None, preconditioner="identity", compute_dtype="float64", dtype="float64")
    batch = full_batch(HeadTied().test_dataset())
    path = build_index(HeadTied(), tmp_path / "plain", cfg)
    with InfluenceIndex.open(path) as index:
        with pytest.raises(TaskError, match="dense_modules"):     # at attach (ekfac H_tt) or the first query
            index.attach(HeadTied())
            index.query(batch, k=3)
    task = HeadTied(dense_modules=("emb",))
    path = build_index(task, tmp_path / "dense", cfg)
    for h_tt in ("dense", "ekfac"):
        with InfluenceIndex.open(path) as index:
            key = index.attach(task, h_tt=h_tt, cg_iters=0)
            att = index._attached[key]
            want = reference_query_vectors(att.projector, att.operator, att.model, task.measurement, batch)
            np.testing.assert_allclose(index.query_vectors(batch), want.numpy(), rtol=1e-9, atol=1e-12)


def test_kronecker_build_in_the_old_row_basis_is_not_resumed_or_reused(tmp_path):
    """kfac / ekfac rows are stored in the eigenbasis: a build or an index of a version that stored
    them in the parameter basis (its identity has no row_basis) is refused, not mixed or reused."""
    task = TinyTask()
    cfg = BuildConfig(proj_dim=12, preconditioner="ekfac", shard_rows=16)
    path = build_index(task, tmp_path / "idx", cfg)
    for name in ("manifest.json", "build.json"):                  # as the previous version wrote them
        d = json.loads((path / name).read_text())
        assert d["identity"].pop("row_basis") == "eigen"
        (path / name).write_text(json.dumps(d))
    before = _rows(path)
    with pytest.raises(ConfigError) as e:
        build_index(task, path, cfg)
    msg = _one_line(e)
    assert "row_basis" in msg and "overwrite" in msg
    assert np.array_equal(_rows(path), before)
    assert "row_basis" not in json.loads((path / "manifest.json").read_text())["identity"]   # untouched


def test_folder_with_foreign_files_is_refused_and_untouched(tmp_path):
    out = tmp_path / "mine"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("keep me")
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01")
    (out / "rows.h5").write_bytes(b"not ours either")

    def snapshot():
        return sorted((str(p.relative_to(out)), p.read_bytes() if p.is_file() else None, p.stat().st_mtime_ns)
                      for p in out.rglob("*"))
    before = snapshot()
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError) as e:
            build_index(TinyTask(), out, BuildConfig(proj_dim=16, preconditioner="identity"), overwrite=overwrite)
        assert "notes.txt" in _one_line(e)
        assert snapshot() == before
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputExistsError) as e:
        build_index(TinyTask(), tmp_path / "file", BuildConfig(proj_dim=16, preconditioner="identity"))
    _one_line(e)


def test_changed_pretrained_model_is_refused(tmp_path, tiny_index):
    task = TinyTask()
    with torch.no_grad():
        task.pretrained_model().head.bias[0] += 1e-9          # U only
    cfg = BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16)
    with pytest.raises(ConfigError) as e:
        build_index(task, tiny_index, cfg)
    assert "pretrained" in _one_line(e)
    with InfluenceIndex.open(tiny_index) as index:           # attaching that task is refused too
        with pytest.raises(msif_index.errors.IndexMismatchError) as e:
            index.attach(task)
        assert "pretrained U" in _one_line(e)


@pytest.mark.parametrize("pre", ["ekfac", "hessian", "identity"])
def test_nonfinite_gradient_names_the_example(tmp_path, pre):
    task = TinyTask(nan_id=37)
    msif_index.validate_task(task)                            # the first two examples are fine
    with pytest.raises(NonFiniteError) as e:
        build_index(task, tmp_path / "nan", BuildConfig(proj_dim=16, preconditioner=pre, batch_size=8))
    msg = _one_line(e)
    assert "example 37" in msg, msg
    assert not (tmp_path / "nan" / "manifest.json").exists()


class _OddExample(torch.utils.data.Dataset):
    """A dataset whose example ``bad`` has one input feature too many."""

    def __init__(self, base, bad: int):
        self.base, self.bad = base, bad

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        x, y, ids = self.base[i]
        return (torch.cat([x, x[:1]]) if i == self.bad else x), y, ids


def test_wrong_shaped_example_is_named(tmp_path):
    """An example whose shape differs from the others' in the middle of the data: one line naming it
    (not the collate traceback), and nothing written as the index."""
    from msif_index.errors import ShapeError
    task = TinyTask()
    task._pre = _OddExample(task._pre, 37)
    msif_index.validate_task(task)                            # the first examples are fine
    with pytest.raises(ShapeError) as e:
        build_index(task, tmp_path / "odd", BuildConfig(proj_dim=16, preconditioner="identity", batch_size=8))
    msg = _one_line(e)
    assert "example 37" in msg and "[7] float64" in msg and "[6] float64" in msg, msg
    assert not (tmp_path / "odd" / "manifest.json").exists()


# ------------------------------------------------------------------------------------------------
# featurize reuses the statistics subsample's rows (no second gradient pass over them)


def _load_preconditioner(task, config: BuildConfig, path: Path):
    from msif_index.build import prepare, resolve_config
    prep = prepare(task, resolve_config(task, config))
    state: dict = {}
    with h5py.File(path / "preconditioner.h5", "r") as f:
        f.visititems(lambda name, obj: state.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    prep.preconditioner.load_state_dict(state)
    return prep


@pytest.mark.parametrize("pre,stats,shard_rows,batch", [
    ("kfac", 24, 16, 5), ("ekfac", 24, 16, 5), ("gauss-newton", 24, 16, 5),
    # every row sampled (no gradient pass in featurize); most sampled (blocks of subsample rows only);
    # one-row batches; batches wider than a shard; a shard's rows in blocks of the whole shard
    ("ekfac", 64, 16, 5), ("ekfac", 58, 16, 3), ("gauss-newton", 58, 16, 3), ("ekfac", 24, 16, 1),
    ("ekfac", 24, 16, 40), ("kfac", 12, 64, 64)])
def test_rows_with_reused_statistics_rows_equal_brute_force(tmp_path, pre, stats, shard_rows, batch):
    """stats_examples < n, several shards, batches that do not divide them: every stored row (those of
    the subsample, reused from the statistics pass, and the others, merged into blocks from two
    batches of computed rows) equals M^-1 P grad g(z) with per-example gradients taken one at a time,
    and M is fitted on exactly the seeded subsample."""
    from msif_index.build import _subsample
    task = TinyTask(n=64)
    config = BuildConfig(proj_dim=12, preconditioner=pre, damping=0.05, stats_examples=stats,
                         shard_rows=shard_rows, batch_size=batch, dtype="float64")
    path = build_index(task, tmp_path / "idx", config)
    prep = _load_preconditioner(task, config, path)
    names = prep.projector.param_names
    p = prep.projector.matrix()
    phi = _example_grads(task.pretrained_model(), names, task.pretrain_loss, task.pretrain_dataset()) @ p.T
    want = prep.preconditioner.apply(phi).numpy()
    rows = _parameter_rows(path)
    assert rows.shape == want.shape
    assert np.abs(rows - want).max() / np.abs(want).max() < 1e-10
    # the preconditioner maps its stored rows back itself (the query benchmark's no-index path)
    back = prep.preconditioner.to_parameter_basis(torch.from_numpy(_rows(path))).numpy()
    assert np.abs(back - want).max() / np.abs(want).max() < 1e-10
    # the preconditioner was fitted on the seeded subsample's rows, each once
    ids = _subsample(64, stats, config.seed)
    fresh = _load_preconditioner(task, config, path).preconditioner
    ref = type(fresh)(fresh.blocks, fresh.w_blocks, damping=fresh.damping, weight_decay=fresh.weight_decay,
                      gram=fresh.gram)
    ref.fit(lambda: iter([phi[ids]]), len(ids))
    assert np.abs(ref.apply(phi).numpy() - want).max() / np.abs(want).max() < 1e-9


@pytest.mark.parametrize("rotate_rows", [None, 3])
def test_resumed_build_with_a_statistics_subsample_gives_identical_rows(tmp_path, monkeypatch, rotate_rows):
    """A shard lost after the statistics were saved is recomputed (its subsample rows in the same
    batches as the statistics pass, the others in their own) to bitwise the same rows, touching only
    that shard's examples. The subsample's rows are rotated in blocks of ROTATE_ROWS (3: several
    blocks per shard's group) to the same rows as in one block, up to rounding."""
    config = BuildConfig(proj_dim=12, preconditioner="ekfac", stats_examples=24, shard_rows=16, batch_size=5,
                         compute_dtype="float32", dtype="float32")
    if rotate_rows is not None:
        whole = _rows(build_index(TinyTask(n=64), tmp_path / "whole", config))
        monkeypatch.setattr(build_mod, "ROTATE_ROWS", rotate_rows)
    ref = build_index(TinyTask(n=64), tmp_path / "ref", config)
    if rotate_rows is not None:
        np.testing.assert_allclose(_rows(ref), whole, rtol=1e-5, atol=1e-6 * np.abs(whole).max())
    out = tmp_path / "resumed"
    shutil.copytree(ref, out)
    for name in ("manifest.json", "rows.h5", "shards/shard_00001.h5"):
        (out / name).unlink()
    task = TinyTask(n=64)
    task.seen = []
    build_index(task, out, config)
    assert set(task.seen) == set(range(16, 32))
    assert np.array_equal(_rows(out), _rows(ref))


def test_fetch_equals_the_per_item_collate():
    from torch.utils.data import Dataset, Subset

    from msif_index.data import batches, fetch
    from msif_index.task import collate

    class Batched(Dataset):
        def __init__(self):
            self.x = torch.randn(30, 3, 2)

        def __len__(self):
            return 30

        def __getitem__(self, i):
            return {"x": self.x[i], "y": i % 4}

        def __getitems__(self, ids):
            return [{"x": xi, "y": i % 4} for xi, i in zip(self.x[torch.as_tensor(ids)].unbind(0), ids)]

    td = TensorDataset(torch.randn(30, 4, dtype=torch.float64), torch.randint(0, 5, (30,)), torch.arange(30))
    ids = [7, 3, 29, 0, 3]
    for ds in (td, Batched(), Subset(td, list(range(29, -1, -1))), Subset(Batched(), list(range(30)))):
        want = collate([ds[i] for i in ids])
        got = fetch(ds, ids)
        flat_w, flat_g = torch.utils._pytree.tree_leaves(want), torch.utils._pytree.tree_leaves(got)
        assert len(flat_w) == len(flat_g)
        for a, b in zip(flat_w, flat_g):
            assert a.dtype == b.dtype and torch.equal(a, b)
        (got_ids, got_batch), = list(batches(ds, 10, ids))
        assert got_ids == ids


@pytest.mark.parametrize("factory", ["bogus", "SVD999"])
def test_bad_factory_fails_before_the_gradient_pass(tmp_path, factory):
    """A factory string that cannot make an index (or an SVD rank >= k) is one ConfigError raised
    after the statistics and before any row is written."""
    out = tmp_path / "idx"
    with pytest.raises(ConfigError):
        build_index(TinyTask(), out, BuildConfig(proj_dim=16, preconditioner="gauss-newton", shard_rows=16,
                                                 factory=factory))
    assert not list((out / "shards").glob("*.h5")) if (out / "shards").exists() else True
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("factory", ["IVF128,Flat", "IVF8,PQ4"])
def test_factory_the_rows_cannot_train_fails_before_the_folder_is_touched(tmp_path, factory):
    """n is known before any work: IVF with more lists than rows, or PQ with more codewords, fails in
    one line suggesting a number of lists that fits, and the rerun with it is not refused."""
    out = tmp_path / "idx"
    with pytest.raises(ConfigError) as e:
        build_index(TinyTask(), out, BuildConfig(proj_dim=16, preconditioner="identity", factory=factory))
    assert "64" in _one_line(e) and "IVF1,Flat" in _one_line(e)
    assert not out.exists()
    build_index(TinyTask(), out, BuildConfig(proj_dim=16, preconditioner="identity", factory="IVF1,Flat"))


def test_fisher_choice_and_errors(tmp_path):
    """auto: gauss-newton when the task defines pretrain_fisher_losses, else empirical (in the manifest);
    asking for gauss-newton without the hook, or a hook of the wrong shape, is one clear error."""
    cfg = BuildConfig(proj_dim=12, preconditioner="kfac", shard_rows=16)
    assert _manifest(build_index(TinyGN(), tmp_path / "gn", cfg))["config"]["fisher"] == "gauss-newton"
    assert _manifest(build_index(TinyTask(), tmp_path / "emp", cfg))["config"]["fisher"] == "empirical"
    with pytest.raises(ConfigError, match="pretrain_fisher_losses"):
        build_index(TinyTask(), tmp_path / "x", cfg.with_(fisher="gauss-newton"))
    with pytest.raises(ConfigError, match="fisher must be"):
        BuildConfig(fisher="true")

    class Flat1D(TinyGN):
        def pretrain_fisher_losses(self, model, batch):
            return super().pretrain_fisher_losses(model, batch).sum(1)       # [B]: wrong
    with pytest.raises(ShapeError, match=r"\[B, "):
        build_index(Flat1D(), tmp_path / "bad", cfg)


def test_proj_dim_zero_means_no_projection_and_bad_values_fail_in_one_line():
    """BuildConfig(proj_dim=0) is the command line's `--proj-dim 0`: no projection (stored as None,
    so the saved config compares equal); negative, fractional or boolean widths are refused."""
    assert BuildConfig(proj_dim=0).proj_dim is None
    assert BuildConfig(proj_dim=0) == BuildConfig(proj_dim=None)
    for bad in (-1, 2.5, True, "64"):
        with pytest.raises(ConfigError, match="proj_dim must be a positive integer, or 0 / None"):
            BuildConfig(proj_dim=bad)


@pytest.mark.parametrize("change", [{"factory": "NoSuchIndex"}, {"device": "banana"}, {"device": "cuda:7"}])
def test_bad_device_or_factory_fails_in_one_line_before_anything_is_touched(tmp_path, tiny_index, change):
    """Checked before the folder is touched: even with overwrite=True the existing index stays as it
    was, and a new folder is not created."""
    before = sorted((str(p.relative_to(tiny_index)), p.stat().st_mtime_ns) for p in tiny_index.rglob("*"))
    cfg = BuildConfig(proj_dim=16, preconditioner="kfac", shard_rows=16, **change)
    for out, overwrite in ((tiny_index, True), (tmp_path / "new", False)):
        with pytest.raises(ConfigError) as e:
            build_index(TinyTask(), out, cfg, overwrite=overwrite)
        msg = _one_line(e)
        assert ("factory" in msg) if "factory" in change else ("--device" in msg and "cpu" in msg), msg
    assert sorted((str(p.relative_to(tiny_index)), p.stat().st_mtime_ns) for p in tiny_index.rglob("*")) == before
    assert not (tmp_path / "new").exists()


FLIP_SCRIPT = r"""
import sys
from pathlib import Path
import numpy as np
from msif_index.errors import CorruptIndexError
from msif_index.store import RowStore
path, start, stop = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
orig = path.read_bytes()
with RowStore.open(path) as st:
    ref = st.read(0, st.n)
caught = 0
for pos in range(start, min(stop, len(orig))):
    damaged = bytearray(orig)
    damaged[pos] ^= 0xFF
    path.write_bytes(bytes(damaged))
    try:
        with RowStore.open(path) as st:
            st.verify()
            assert np.array_equal(st.read(0, st.n), ref), pos
    except CorruptIndexError as e:
        assert "\n" not in str(e)
        caught += 1
print(caught)
"""


def test_every_flipped_byte_of_rows_h5_is_caught_before_hdf5_reads_it(tmp_path, tiny_index):
    """The manifest holds rows.h5's sha256 (a small file: the map of the shards), checked before HDF5
    parses it, so no damaged byte reaches HDF5 (some made it loop forever, e.g. byte 2148): every
    byte of the file flipped in turn gives one CorruptIndexError from InfluenceIndex.open."""
    path = tiny_index                     # built in this test's own tmp_path
    rows = path / "rows.h5"
    orig = rows.read_bytes()
    assert len(orig) < 1 << 16 and "rows" in json.loads((path / "manifest.json").read_text())["checksums"]
    for pos in range(len(orig)):
        damaged = bytearray(orig)
        damaged[pos] ^= 0xFF
        rows.write_bytes(bytes(damaged))
        with pytest.raises(CorruptIndexError) as e:
            InfluenceIndex.open(path, huge_pages=False)
        assert "rows.h5 fails its checksum" in _one_line(e)
    rows.write_bytes(orig)
    with InfluenceIndex.open(path) as index:
        assert index.n == 64


def test_flipped_bytes_in_the_linked_row_store_are_one_corrupt_index_error(tmp_path, tiny_index):
    """Every byte of the first 2 KiB of a built rows.h5 (superblock, object headers, the JSON
    attributes, the virtual dataset's mapping) flipped in turn: each read gives the written rows or
    one CorruptIndexError. HDF5 reports damaged attribute metadata as RuntimeError ("incorrect
    metadata checksum"), which used to escape as a traceback. Run in a child process with a time
    limit: HDF5 can loop on some damaged b-tree bytes further on (noted on the issue)."""
    proc = subprocess.run([sys.executable, "-c", FLIP_SCRIPT, str(tiny_index / "rows.h5"), "0", "2048"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout) > 100


def test_an_empty_pretraining_set_is_one_clear_error(tmp_path):
    """No pretraining examples: a TaskError saying so, before anything is written (it once read as a
    search-factory training problem)."""
    from msif_index.errors import TaskError
    with pytest.raises(TaskError, match="pretrain_dataset\\(\\) is empty"):
        build_index(TinyTask(n=0), tmp_path / "idx", BuildConfig(proj_dim=16))
    assert not (tmp_path / "idx").exists()


def test_negative_eigenvalues_are_judged_against_the_damping():
    """A negative eigenvalue matters once it is below minus the damping: clamped to 0 it then gets
    the largest weight, 1 / damping (a trial's transformer: 28 eigenvalues between -0.014 and -2e-4
    dominated its scores at --damping 1e-5, silently, under a rule of -1e-3 x the largest)."""
    from msif_index.preconditioners import negative_eigenvalues
    evals = torch.tensor([100.0, 10.0, 1.0, -0.05], dtype=torch.float64)
    mean = (100 + 10 + 1) / 4
    small = negative_eigenvalues(evals, 1e-3 * mean)
    assert small is not None and small["count"] == 1 and small["min"] == -0.05
    assert small["damping_needed"] == pytest.approx(0.05 / mean)
    assert negative_eigenvalues(evals, 1e-2 * mean) is None            # damped beyond them: harmless
    assert negative_eigenvalues(torch.tensor([1.0, -1e-12], dtype=torch.float64), 0.0) is None   # rounding


def test_buildconfig_docstring_lists_every_field_with_its_help():
    """help(BuildConfig) shows what `msif build-index --help` shows: each field, default and help."""
    from dataclasses import fields

    from msif_index.config import help_text
    doc = BuildConfig.__doc__
    for f in fields(BuildConfig):
        assert f"    {f.name} = {f.default!r}: {help_text(f.name)}" in doc
    assert "    default: the defaults" in doc
    assert "    fast: proj_dim=1024, preconditioner='kfac', dtype='float16'" in doc


def test_python_forms_of_the_options_an_error_names():
    """Each command-line option an error names maps to its Python form (a BuildConfig or
    EvaluationConfig field of that name, or the argument that stands for it); a message naming none
    gets no note, and a note is added once however many entry points the error leaves."""
    from msif_index.errors import MsifError, python_api, python_forms
    assert python_forms("damaged; rebuild with `msif build-index ... --overwrite` or --damping 0.1") == (
        "From Python: --overwrite is build_index(..., overwrite=True); --damping is BuildConfig(damping=...)")
    assert python_forms("use --against retraining, --k 5 or --json") == (
        "From Python: --against is EvaluationConfig(against=...); --k is EvaluationConfig(k=...)")
    assert python_forms("the rows are damaged") is None
    assert python_forms("the x-- --unknown-flag thing") is None

    @python_api
    def inner():
        raise ConfigError("rerun with --overwrite")

    @python_api
    def outer():
        inner()

    with pytest.raises(MsifError) as e:
        outer()
    assert e.value.__notes__ == ["From Python: --overwrite is build_index(..., overwrite=True)"]


def test_float16_build_of_rows_beyond_float16s_range(tmp_path):
    """Rows far beyond float16's 65504 (a loss scaled by 1e7, identity preconditioner) build with
    --dtype float16 (they overflowed before the per-row scales) and equal the float32 build's rows
    within float16's rounding of each row's largest entry; the query answers the same ids."""
    class Loud(TinyTask):
        def pretrain_loss(self, model, batch):
            return super().pretrain_loss(model, batch) * 1e7

    cfg = BuildConfig(proj_dim=16, preconditioner="identity", shard_rows=24)
    wide = build_index(Loud(), tmp_path / "f32", cfg)
    half = build_index(Loud(), tmp_path / "f16", cfg.with_(dtype="float16"))
    with RowStore.open(wide / "rows.h5") as a, RowStore.open(half / "rows.h5") as b:
        x, y = a.read(0, a.n), b.read(0, b.n)
        assert b.scaled and np.abs(x).max() > 1e6
    top = np.abs(x).max(axis=1, keepdims=True)
    assert np.max(np.abs(y - x) / top) <= 2.0 ** -11
    batch = full_batch(Loud().test_dataset(), [0, 1])
    with InfluenceIndex.open(wide) as i32, InfluenceIndex.open(half) as i16:
        i32.attach(Loud())
        i16.attach(Loud())
        r32, r16 = i32.query(batch, k=5), i16.query(batch, k=5)
    np.testing.assert_array_equal(r32.ids, r16.ids)
    np.testing.assert_allclose(r16.scores, r32.scores, rtol=1e-2)


def test_python_note_without_add_note_and_without_importing_for_plain_messages(monkeypatch):
    """Where exceptions have no add_note (Python 3.10) the note goes to __notes__ all the same; a
    message that names no option costs no import (the evaluation package is heavy)."""
    import builtins

    from msif_index.errors import python_api, python_forms

    class OldStyle(ConfigError):
        add_note = property(lambda self: (_ for _ in ()).throw(AttributeError("add_note")))

    @python_api
    def fails():
        raise OldStyle("rerun with --overwrite")

    with pytest.raises(OldStyle) as e:
        fails()
    assert e.value.__notes__ == ["From Python: --overwrite is build_index(..., overwrite=True)"]

    real_import = builtins.__import__

    def no_config_import(name, *a, **k):
        if "evaluation" in name or name.endswith("config"):
            raise AssertionError(f"imported {name}")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_config_import)
    assert python_forms("the rows are damaged") is None
    assert python_forms("rebuild with --overwrite") == "From Python: --overwrite is build_index(..., overwrite=True)"


def test_a_shared_parameter_the_models_lack_is_one_task_error_at_every_entry_point(tmp_path):
    """A task instance (not loaded through load_task, so not validated) whose shared_parameters
    names a parameter the models lack: build_index, exact_influence, stationarity and attach
    without validation each raise one TaskError naming the closest name (were bare KeyErrors),
    before the output folder is touched."""
    from msif_index.errors import TaskError
    from msif_index.stationarity import stationarity

    class Typo(TinyTask):
        shared_parameters = ("embed.weigth", "embed.bias")

    hint = r"shared parameter 'embed\.weigth' is not in pretrained_model\(\).*did you mean 'embed\.weight'\?"
    with pytest.raises(TaskError, match=hint):
        build_index(Typo(), tmp_path / "idx", BuildConfig(proj_dim=16))
    assert not (tmp_path / "idx").exists()
    batch = full_batch(Typo().test_dataset(), [0])
    with pytest.raises(TaskError, match=hint):
        msif_index.exact_influence(Typo(), batch)
    with pytest.raises(TaskError, match=hint):
        stationarity(Typo(), progress_bar=False)
    path = build_index(TinyTask(), tmp_path / "ok", BuildConfig(proj_dim=16, preconditioner="identity"))
    with InfluenceIndex.open(path) as index:
        with pytest.raises(TaskError, match=hint):
            index.attach(Typo(), validate=False)


def test_an_index_queried_with_another_w_split_names_the_parameters_that_moved(tmp_path, tiny_index):
    """The same trained model with another shared_parameters list (a parameter moved between W and
    U) is refused by naming the parameters, not as 'another pretrained W'."""
    from msif_index.errors import IndexMismatchError

    class Split(TinyTask):
        shared_parameters = ("embed.weight",)

    with InfluenceIndex.open(tiny_index) as index:
        with pytest.raises(IndexMismatchError, match=r"shared_parameters \(W\) are not the ones.*"
                                                     r"no longer in W: \['embed\.bias'\]"):
            index.attach(Split())


def test_a_parameter_left_out_of_w_with_the_same_values_in_both_models_is_flagged():
    """A parameter in both models with identical values but not in shared_parameters (a forgotten
    norm-layer parameter) counts as theta that finetuning never changed: validate_task says so."""
    from msif_index.task import validate_task

    class Forgot(TinyTask):
        shared_parameters = ("embed.weight",)

    with pytest.warns(RuntimeWarning, match=r"\['embed\.bias'\] are in both models with the same values"):
        validate_task(Forgot())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_task(TinyTask())

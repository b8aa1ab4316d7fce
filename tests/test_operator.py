"""The finetune-side operator: its approximations against exact v_t, and the alpha -> infinity limit."""
from __future__ import annotations

import copy
import shutil
import warnings

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

import msif_index.operator as operator_mod
from msif_index.build import build_index
from msif_index.config import PRESETS, BuildConfig
from msif_index.data import full_batch
from msif_index.autodiff import per_example_grads
from msif_index.errors import CorruptIndexError
from msif_index.exact import _as_float64, exact_influence, finetune_side
from msif_index.index import InfluenceIndex
from tests.test_build import MixedTask

TEST_IDS = list(range(8))


@pytest.fixture(scope="module")
def exact_index(tmp_path_factory, digits_frozen):
    return build_index(digits_frozen, tmp_path_factory.mktemp("op") / "exact", PRESETS["exact"])


def _proximal_scores(index_dir, task, batch, tmp_path, name, monkeypatch, h_ww=None):
    """Scores of a fresh copy of the exact index attached to ``task`` (no cached operator), with
    P H_WW P^T replaced by ``h_ww(out, how)`` when given, and the H_WW method the operator used."""
    path = tmp_path / name
    shutil.copytree(index_dir, path)
    shutil.rmtree(path / "operators", ignore_errors=True)
    orig = operator_mod._projected_h_ww
    if h_ww is not None:
        monkeypatch.setattr(operator_mod, "_projected_h_ww", lambda *a: h_ww(*orig(*a)))
    with InfluenceIndex.open(path) as index:
        index.attach(task)
        how = index.operator().info["h_ww"]
        scores = index.scores(batch)
    monkeypatch.setattr(operator_mod, "_projected_h_ww", orig)
    return scores, how


def test_proximal_fisher_fallback_error_is_bounded(tmp_path, exact_index, digits_proximal, monkeypatch, capsys):
    """Where P_W is too large for HVPs, P H_WW P^T is the projected empirical Fisher (its definition:
    tests/test_head_curvature.py): its error against exact influence is reported and bounded, and it
    must beat dropping H_WW from the Schur complement altogether by a clear margin."""
    task = digits_proximal
    batch = full_batch(task.test_dataset(), TEST_IDS)
    ref = exact_influence(task, batch).numpy()
    monkeypatch.setattr(operator_mod, "MAX_HVP_PROJECTION", 0)

    def errors(got):
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        return rel, float(np.mean([spearmanr(got[q], ref[q])[0] for q in range(len(TEST_IDS))]))

    got, how = _proximal_scores(exact_index, task, batch, tmp_path, "fisher", monkeypatch)
    assert how == "fisher"
    rel, rho = errors(got)
    none, _ = _proximal_scores(exact_index, task, batch, tmp_path, "no_h_ww", monkeypatch,
                               lambda out, how: (torch.zeros_like(out), how))
    rel0, rho0 = errors(none)
    with capsys.disabled():
        print(f"\n[proximal, Fisher H_WW] relative error {rel:.3f}, Spearman {rho:.3f} vs exact "
              f"(without H_WW: {rel0:.3f}, {rho0:.3f})")
    assert rel < 0.45 and rho > 0.9          # measured: 0.38 and 0.94 (alpha = 1)
    assert rel < rel0 - 0.1                   # measured without H_WW: 0.60


@pytest.mark.parametrize("finetuning", ["frozen", "proximal"])
def test_exact_mode_equals_exact_influence_with_layernorm_in_w(tmp_path, finetuning):
    """Conv2d + Embedding + LayerNorm in W (LayerNorm's weight: the torch.func second-derivative pitfall):
    the exact preset's index scores equal exact_influence, both finetuning styles (float64, 1e-8)."""
    task = MixedTask()
    if finetuning == "proximal":
        task.finetuning, task.alpha = "proximal", 0.5
    batch = full_batch(task.test_dataset(), [0, 1, 2, 3])
    ref = exact_influence(task, batch).numpy()
    with InfluenceIndex.open(build_index(task, tmp_path / "idx", PRESETS["exact"])) as index:
        index.attach(task)
        assert index.operator().info.get("h_ww", "hvp") == "hvp"
        got = index.scores(batch)
    assert np.abs(got - ref).max() / np.abs(ref).max() < 1e-8


def test_proximal_query_with_a_compressing_projection_is_the_galerkin_formula(tmp_path, digits_proximal):
    """proj_dim 256 < dim(W): q_t = C P x_t with x_t = g_W - F_Wt H_tt^{-1} g_t and
    C = alpha P P^T (P S P^T)^{-1}, S = H_WW + alpha I - F_Wt H_tt^{-1} F_tW (MATH.md), from the dense
    finetuning Hessian of exact.finetune_side (float64, 1e-9 relative)."""
    task = digits_proximal
    batch = full_batch(task.test_dataset(), TEST_IDS)
    cfg = BuildConfig(proj_dim=256, preconditioner="hessian", dtype="float64", compute_dtype="float64")
    with InfluenceIndex.open(build_index(task, tmp_path / "idx", cfg)) as index:
        key = index.attach(task)
        assert index.row_basis == "parameter"
        q = index.query_vectors(batch, key)
        p = index._get(key).projector.matrix().to(torch.float64)              # [k_W, d_W]
    assert p.shape[0] < p.shape[1]
    side, flat = finetune_side(task, _as_float64(task.finetuned_model()))
    dt, alpha, h = side.d_theta, float(task.alpha), side.hessian
    g = per_example_grads(flat.loss(task.measurement), flat.get(), batch)
    x = g[:, dt:] - (h[dt:, :dt] @ torch.linalg.solve(h[:dt, :dt], g[:, :dt].T)).T
    s = h[dt:, dt:] + alpha * torch.eye(h.shape[0] - dt, dtype=torch.float64) \
        - h[dt:, :dt] @ torch.linalg.solve(h[:dt, :dt], h[:dt, dt:])
    c = alpha * (p @ p.T) @ torch.linalg.inv(p @ s @ p.T)
    want = ((x @ p.T) @ c.T).numpy()
    assert np.linalg.norm(q - want) / np.linalg.norm(want) < 1e-9


@pytest.mark.parametrize("proj_dim", [None, 256])
def test_proximal_operator_tends_to_frozen_as_alpha_grows(tmp_path, digits_frozen, proj_dim):
    """The Schur-complement operator keeps the theta-W coupling, so alpha -> inf gives the frozen query
    (a block-diagonal approximation would not); also with a compressing projection (Galerkin)."""
    cfg = PRESETS["exact"] if proj_dim is None else BuildConfig(proj_dim=proj_dim, preconditioner="hessian",
                                                                 compute_dtype="float64")
    path = build_index(digits_frozen, tmp_path / "idx", cfg)
    index = InfluenceIndex.open(path)
    batch = full_batch(digits_frozen.test_dataset(), TEST_IDS)
    index.attach(digits_frozen)
    q_frozen = index.query_vectors(batch)
    diffs = []
    for alpha in (1e2, 1e4):
        prox = copy.copy(digits_frozen)
        prox.finetuning, prox.alpha = "proximal", alpha
        index.attach(prox)
        q = index.query_vectors(batch)
        diffs.append(np.linalg.norm(q - q_frozen) / np.linalg.norm(q_frozen))
    assert diffs[1] < diffs[0] / 20, diffs   # shrinks ~ 1/alpha
    assert diffs[1] < 1e-2, diffs


def _tiny_attached(tmp_path):
    from tests.test_build import TinyTask
    task = TinyTask(n=48)
    path = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="ekfac"))
    with InfluenceIndex.open(path, huge_pages=False) as index:
        key = index.attach(task, progress_bar=False)
        ref = index.scores(full_batch(task.test_dataset(), [0, 1]))
    return task, path, path / "operators" / f"{key}.h5", ref


def test_a_damaged_operator_file_is_refused_before_hdf5_parses_it(tmp_path):
    """Every flipped byte of an operator file (sampled: every 3rd) is caught by its seal (sha256 in
    the HDF5 user block) before HDF5 reads it: HDF5 can segfault or hang on damaged metadata. Only
    the user block's unused padding may change."""
    from msif_index.operator import _SEAL, USERBLOCK, FinetuneOperator
    _, _, op_file, _ = _tiny_attached(tmp_path)
    good = op_file.read_bytes()
    ref = FinetuneOperator.load(op_file).b
    padding = len(_SEAL) + 64 + 1
    probe = tmp_path / "probe.h5"
    for off in range(0, len(good), 3):
        bad = bytearray(good)
        bad[off] ^= 0xFF
        probe.write_bytes(bytes(bad))
        if padding <= off < USERBLOCK:
            assert torch.equal(FinetuneOperator.load(probe).b, ref)
        else:
            with pytest.raises(CorruptIndexError, match="checksum does not match"):
                FinetuneOperator.load(probe)


def test_damaged_or_unsealed_operator_files_are_computed_again(tmp_path, capsys):
    """attach recomputes (with a warning naming why) an operator file that is damaged or was written
    without a seal (older msif), and the answers equal the original ones; msif info lists such a file
    as damaged instead of parsing it."""
    import h5py

    from msif_index.cli.main import main
    from msif_index.operator import USERBLOCK
    task, path, op_file, ref = _tiny_attached(tmp_path)
    data = bytearray(op_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    op_file.write_bytes(bytes(data))
    main(["info", "--index", str(path)])
    assert "damaged: its checksum does not match (the next attach of this model computes it again)" in \
        capsys.readouterr().out
    unsealed = tmp_path / "unsealed.h5"
    for damage, why in (("flip", "unreadable: damaged"), ("unsealed", "unreadable: written without a checksum")):
        if damage == "unsealed":                        # the same file as an older msif wrote it
            good = op_file.read_bytes()
            with h5py.File(op_file, "r") as src, h5py.File(unsealed, "w") as dst:
                for name in src:
                    dst.create_dataset(name, data=src[name][()])
                for k, v in src.attrs.items():
                    dst.attrs[k] = v
            op_file.write_bytes(unsealed.read_bytes())
            assert good[:USERBLOCK] != op_file.read_bytes()[:USERBLOCK]
        with InfluenceIndex.open(path, huge_pages=False) as index:
            with pytest.warns(RuntimeWarning, match=f"does not fit this index \\({why}"):
                index.attach(task, progress_bar=False)
            np.testing.assert_allclose(index.scores(full_batch(task.test_dataset(), [0, 1])), ref, rtol=1e-10)
        with InfluenceIndex.open(path, huge_pages=False) as index:     # sealed again: no warning
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                index.attach(task, progress_bar=False)

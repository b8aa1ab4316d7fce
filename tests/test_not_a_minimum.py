"""A model that is not at a minimum (an indefinite Hessian) is said, not hidden: by exact influence
(H_G, H_tt, K), by the exact preconditioner (which inverts the Hessian as it is), and again whenever
such an index is opened. Before, `--preset exact` and `msif exact` said nothing, and their perfect
agreement with each other read as correctness (a new-user trial with a transformer at a saddle)."""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

from msif_index.build import build_index
from msif_index.config import BuildConfig
from msif_index.exact import check_minimum, exact_influence, finetune_side, negative_inertia, pretrain_side
from msif_index.index import InfluenceIndex

from .test_build import TinyTask

NOT_MIN = "not at a minimum"


def _caught(fn, where: list | None = None):
    """fn()'s result and its "not at a minimum" warnings' messages (their files into ``where``)."""
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = fn()
    mine = [r for r in rec if issubclass(r.category, RuntimeWarning) and NOT_MIN in str(r.message)]
    if where is not None:
        where.extend(r.filename for r in mine)
    return out, [str(r.message) for r in mine]


def _rotated(evals: list[float], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=g, dtype=torch.float64))
    return q @ torch.diag(torch.tensor(evals, dtype=torch.float64)) @ q.T


@pytest.mark.parametrize("evals, count", [([3.0, 1.0, 0.5, 1e-3], 0),     # positive definite
                                          ([3.0, 1.0, 0.0, 0.0], 0),      # singular, positive semidefinite
                                          ([3.0, 1.0, -1e-13, 0.0], 0),   # rounding below zero
                                          ([0.0, 0.0, 0.0, 0.0], 0),
                                          ([3.0, 1.0, -0.5, 2.0], 1),
                                          ([-1.0, -2.0, 4.0, 0.1], 2),
                                          ([-9.0, 1.0, 0.5, 2.0], 1)])    # the largest is 2, not |-9|
def test_check_minimum_counts_the_negative_eigenvalues(evals, count, monkeypatch):
    h = _rotated(evals)
    if count == 0:          # the shifted Cholesky factorization settles these: no eigendecomposition
        monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: pytest.fail("an eigendecomposition"))
    neg, said = _caught(lambda: check_minimum(h, "a Hessian", "pretrained"))
    if count == 0:
        assert neg is None and said == []
        return
    assert neg["count"] == count and neg["of"] == 4 and neg["clamped"] is False
    assert abs(neg["min"] - min(evals)) < 1e-12 and abs(neg["largest"] - max(evals)) < 1e-12
    assert len(said) == 1 and f"a Hessian has {count} of 4 negative eigenvalues" in said[0]


@pytest.mark.parametrize("evals, count", [([3.0, 1.0, -0.5, 2.0], 1), ([-1.0, -2.0, 4.0, 0.1], 2),
                                          ([-3.0, -1.0, -0.5, -2.0], 4), ([3.0, 1.0, 0.5, 2.0], 0),
                                          ([3.0, 1.0, -1e-13, 0.0], 0)])
def test_above_the_eigen_size_an_ldl_factorization_counts_them(evals, count, monkeypatch):
    """Past MAX_EIGEN_COUNT rows no eigendecomposition: the inertia of an LDL^T factorization counts."""
    import msif_index.exact as E
    monkeypatch.setattr(E, "MAX_EIGEN_COUNT", 3)
    monkeypatch.setattr(torch.linalg, "eigvalsh", lambda *a, **k: pytest.fail("eigendecomposition above the limit"))
    neg, said = _caught(lambda: check_minimum(_rotated(evals), "a Hessian", "pretrained"))
    if count == 0:
        assert neg is None and said == []
        return
    assert neg["count"] == count and neg["of"] == 4 and neg["min"] is None and len(said) == 1
    assert f"a Hessian has {count} of 4 negative eigenvalues (counted by an LDL^T factorization" in said[0]


@pytest.mark.parametrize("d", [1, 2, 7, 60, 301])
def test_negative_inertia_equals_the_eigenvalue_count(d):
    """The oracle: eigvalsh of the same matrices; indefinite ones (Bunch-Kaufman picks 2 x 2 pivots
    there), definite ones of either sign, and exactly singular ones."""
    g = torch.Generator().manual_seed(d)
    cases = []
    for kind in ("indefinite", "positive", "negative", "singular"):
        q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
        ev = torch.randn(d, generator=g, dtype=torch.float64) * 10 ** (3 * torch.rand(d, generator=g, dtype=torch.float64))
        ev = {"positive": ev.abs() + 0.1, "negative": -ev.abs() - 0.1, "indefinite": ev,
              "singular": torch.where(torch.arange(d) % 3 == 0, torch.zeros(()), ev.abs() + 1)}[kind]
        cases.append((kind, q @ torch.diag(ev) @ q.T, int((ev < 0).sum())))
    a = torch.randn(d, d, generator=g, dtype=torch.float64)                 # a plain symmetric one
    cases.append(("symmetric", a + a.T, int((torch.linalg.eigvalsh(a + a.T) < 0).sum())))
    for kind, m, expected in cases:
        m = (m + m.T) / 2
        if kind == "singular":       # rounding puts its zero eigenvalues on either side: shift past it
            m = m + 1e-6 * torch.eye(d, dtype=torch.float64)
        assert negative_inertia(m) == expected, kind


@pytest.mark.parametrize("finetuning", ["frozen", "proximal"])
def test_exact_influence_warns_exactly_when_a_hessian_is_indefinite(finetuning):
    """The oracle: the eigenvalues of the same dense matrices (H_G; H_tt or K). The untrained tiny
    task's pretraining Hessian has negative eigenvalues; each warning names its matrix."""
    task = TinyTask()
    task.finetuning = finetuning
    task.alpha = 0.5
    files: list[str] = []
    _, said = _caught(lambda: exact_influence(task, task.test_dataset()[:4][:2]), files)
    assert set(files) == {__file__}                   # at exact_influence's caller
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        pre = pretrain_side(task)
    assert float(torch.linalg.eigvalsh(pre.hessian).min()) < 0        # the case is not vacuous
    fin, _ = finetune_side(task, task.finetuned_model().double())
    dt = fin.d_theta
    h = fin.hessian.clone()
    if finetuning == "frozen":
        h = h[:dt, :dt]
    else:
        h[dt:, dt:] += task.alpha * torch.eye(h.shape[0] - dt, dtype=torch.float64)
    second_negative = float(torch.linalg.eigvalsh(h).min()) < 0
    # both outcomes are covered: H_tt (a linear head's cross entropy + weight decay) is positive
    # definite, while K at this alpha is not
    assert second_negative == (finetuning == "proximal")
    assert sum("the pretraining Hessian H_G" in m and "pretrained model" in m for m in said) == 1
    name = "H_tt" if finetuning == "frozen" else "Hessian K"
    assert sum(name in m and "finetuned model" in m for m in said) == int(second_negative), said
    assert len(said) == 1 + int(second_negative)


@pytest.mark.parametrize("finetuning", ["frozen", "proximal"])
def test_attach_warns_exactly_when_the_finetuning_hessian_is_indefinite(tmp_path, capsys, finetuning):
    """Attach (and every later attach of the cached operator) says when the finetuned model is not at
    a minimum: H_tt indefinite, or for proximal finetuning the projected Schur complement P S P^T.
    With the identity projection P S P^T = S, whose negative eigenvalues are K's when H_tt is
    positive definite (Haynsworth inertia additivity): the oracle is eigvalsh(K). The tiny task's
    K at alpha = 0.5 is indefinite, its H_tt is not."""
    task = TinyTask()
    task.finetuning, task.alpha = finetuning, 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=None, preconditioner="exact", damping=0.0))
        fin, _ = finetune_side(task, task.finetuned_model().double())
    dt = fin.d_theta
    k = fin.hessian.clone()
    k[dt:, dt:] += task.alpha * torch.eye(k.shape[0] - dt, dtype=torch.float64)
    assert float(torch.linalg.eigvalsh(k[:dt, :dt]).min()) > 0
    negative_k = int((torch.linalg.eigvalsh(k) < 0).sum()) if finetuning == "proximal" else 0
    assert (negative_k > 0) == (finetuning == "proximal")             # both outcomes covered
    for attempt in ("computed", "cached"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            index = InfluenceIndex.open(out, huge_pages=False)
        with index:
            files: list[str] = []
            key, said = _caught(lambda: index.attach(task, progress_bar=False), files)
            info = index.operator(key).info
        if finetuning == "frozen":
            assert said == [] and info["h_tt_negative"] is None, (attempt, said)
            continue
        assert len(said) == 1 and "finetuned model is not at a minimum" in said[0], (attempt, said)
        assert "Schur complement of K" in said[0] and f"has {negative_k} of " in said[0], said
        assert info["schur_negative"]["count"] == negative_k and set(files) == {__file__}
    from msif_index.cli.main import main
    main(["info", "--index", str(out)])
    shown = capsys.readouterr().out
    assert (f"its Schur complement has {negative_k} of " in shown) == (finetuning == "proximal"), shown
    assert "not at a minimum of its finetuning objective" in shown or finetuning == "frozen"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_a_singular_head_hessian_is_not_called_negative_in_float32(tmp_path, dtype):
    """A linear softmax head without weight decay has an exactly singular H_tt (adding a constant to
    every class's logit changes nothing); float32 products put its zero eigenvalues at about -1e-8
    x the largest, which a float64 tolerance called negative curvature (a review found the false
    warning). The tolerance follows the compute dtype (exact.rounding_tolerance)."""
    from torch.utils.data import TensorDataset
    task = TinyTask()
    task.finetune_weight_decay = 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        fin, _ = finetune_side(task, task.finetuned_model().double())
    h_tt = torch.linalg.eigvalsh(fin.hessian[:fin.d_theta, :fin.d_theta])
    assert abs(float(h_tt.min())) < 1e-10 * float(h_tt.max())          # singular: the case is not vacuous
    for name in ("_pre", "_fin", "_test"):
        x, *rest = getattr(task, name).tensors
        setattr(task, name, TensorDataset(x.to(dtype), *rest))
    task._pm, task._fm = task._pm.to(dtype), task._fm.to(dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="ekfac"))
        index = InfluenceIndex.open(out, huge_pages=False)
    with index:
        key, said = _caught(lambda: index.attach(task, progress_bar=False, h_tt="dense"))
        info = index.operator(key).info
    assert said == [] and info["h_tt_negative"] is None, said


def test_a_converged_task_gets_no_warning(digits_frozen):
    _, said = _caught(lambda: exact_influence(digits_frozen, digits_frozen.test_dataset()[:2][:2]))
    assert said == []


def test_the_exact_preconditioner_says_it_and_the_index_says_it_again(tmp_path, capsys):
    """Build (the warning, at the caller), manifest record (not clamped), every later open, and msif
    info; the command line's build-index says it once, not again at its own open."""
    task = TinyTask()
    (out, said) = _caught(lambda: build_index(task, tmp_path / "exact", BuildConfig(
        proj_dim=None, preconditioner="exact", damping=0.0)))
    assert len(said) == 1 and "inverts them as they are" in said[0]
    assert "negative eigenvalues (no damping; down to" in said[0] and "minus the damping" not in said[0]
    neg = json.loads((out / "manifest.json").read_text())["preconditioner"]["negative_eigenvalues"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        truth = torch.linalg.eigvalsh(pretrain_side(task).hessian)   # identity projection: M = H_G itself
    assert neg["clamped"] is False and neg["count"] == int((truth < 0).sum()) >= 1
    assert abs(neg["min"] - float(truth.min())) < 1e-8 * float(truth.abs().max())
    built = said[0]
    index, said = _caught(lambda: InfluenceIndex.open(out))
    index.close()
    assert len(said) == 1 and str(out) in said[0] and "inverts them as they are" in said[0]
    # each open repeats it in short (a trial found the build's ~600 characters on every command)
    assert f"has {neg['count']} of {neg['of']} negative eigenvalues" in said[0] and "--stationarity" in said[0]
    assert len(said[0]) - len(str(out)) < 0.75 * len(built)

    from msif_index.cli.main import main
    main(["info", "--index", str(out)])
    text = capsys.readouterr().out
    assert f"warning: {neg['count']} of {neg['of']} eigenvalues" in text and "not clamped" in text
    assert "were negative (down to" in text
    spec_dir = tmp_path / "task"
    spec_dir.mkdir()
    (spec_dir / "t.py").write_text("from tests.test_build import TinyTask\ntask = TinyTask()\n")
    # said once each time: by the fit, by the open of a reused index, by the open after a search-only
    # rebuild (another factory: no fit, a new manifest)
    for run, extra in (("built", []), ("reused", []), ("search switched", ["--factory", "HNSW8"])):
        main(["build-index", "--task", f"{spec_dir / 't.py'}:task", "--out", str(tmp_path / "cli"),
              "--preconditioner", "hessian", "--proj-dim", "0"] + extra)
        err = capsys.readouterr().err
        assert err.count("the projected pretraining Hessian has") == 1, (run, err)

    # evaluate: the warnings as they come, and a note under its table (the figures are of the
    # formulas where they do not hold)
    main(["evaluate", "--index", str(out), "--task", f"{spec_dir / 't.py'}:task", "--against", "exact",
          "--test-ids", "0,1", "--methods", "index", "--no-figures", "--out", str(tmp_path / "report")])
    got = capsys.readouterr()
    assert "not at a minimum" in got.err and "note: " in got.out and "not at a minimum" in got.out.split("note: ")[1]

    main(["info", "--index", str(out)])                            # the exact index: no damping
    assert "no damping" in capsys.readouterr().out
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["resumed"] = {"rows_computed": "12", "preconditioner_loaded": True}    # hand-edited
    (out / "manifest.json").write_text(json.dumps(manifest))
    main(["info", "--index", str(out)])
    assert "(the run that resumed it: 12 of 64 rows computed, preconditioner loaded)" in capsys.readouterr().out


def test_info_gives_the_damping_in_both_units(tmp_path, capsys):
    out = build_index(TinyTask(), tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="gauss-newton",
                                                                damping=0.01))
    from msif_index.cli.main import main
    main(["info", "--index", str(out)])
    text = capsys.readouterr().out
    used = json.loads((out / "manifest.json").read_text())["preconditioner"]["damping_used"]["all"]
    assert f"damping 0.01 x the mean eigenvalue (--damping), absolute: all {used:.3g}" in text
    assert np.isfinite(used) and used > 0


def test_the_fisher_stand_in_for_h_ww_is_not_called_negative_curvature(tmp_path, monkeypatch):
    """Above MAX_HVP_PROJECTION, P H_WW P^T is the empirical Fisher of the projected finetuning
    gradients, so P S P^T is not K's Schur complement: its negative eigenvalues say nothing about
    the finetuned model, and attach does not claim they do (the bundled demo's proximal model got
    that warning). The tiny task's K is indefinite, so the exact path would warn."""
    import msif_index.operator as operator_mod
    monkeypatch.setattr(operator_mod, "MAX_HVP_PROJECTION", 0)
    task = TinyTask()
    task.finetuning, task.alpha = "proximal", 0.5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=None, preconditioner="exact", damping=0.0))
        index = InfluenceIndex.open(out, huge_pages=False)
    with index:
        key, said = _caught(lambda: index.attach(task, progress_bar=False))
        info = index.operator(key).info
    assert info["h_ww"] == "fisher" and "schur_negative" not in info and said == [], (info, said)

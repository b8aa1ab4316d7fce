"""Retrieval evaluation (msif_index.evaluation, `msif evaluate`) on the digits example.

Retraining uses the digits task's own recipe through its hooks (warm-started L-BFGS + Newton to a
gradient norm ~1e-15, about 1 s of CPU per retraining), so the number of retrainings is kept small.
"""
from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch

from msif_index.build import build_index
from msif_index.config import BuildConfig
from msif_index.data import full_batch
from msif_index.evaluation import EvaluationConfig, SchemaError, evaluate, validate_report
from msif_index.evaluation.baselines import backbone_features, shared_modules
from msif_index.evaluation.metrics import (pearson, recall_at_k_scores, sign_precision_at_k, spearman,
                                           top_k)
from msif_index.evaluation.report import PER_TEST_METRICS, TOP_LEVEL
from msif_index.errors import ConfigError, MsifError


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The digits model's matrices are tiny: one torch thread retrains it 2-5x faster than two
    competing ones on a busy 2-core machine (and never slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def task(digits_frozen, one_thread):
    digits_frozen.finetuned_model()
    return digits_frozen


@pytest.fixture(scope="module")
def index_dir(task, tmp_path_factory):
    return build_index(task, tmp_path_factory.mktemp("eval") / "index", BuildConfig())


@pytest.fixture(scope="module")
def exact_result(task, index_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_exact")
    config = EvaluationConfig(against="exact", num_test=4, k=10, sweep_preconditioners=("identity",),
                              sweep_proj_dims=(64,))
    return evaluate(task, index_dir, config, out, task_spec="examples/digits/task.py:task", progress_bar=False)


@pytest.fixture(scope="module")
def loo_result(task, index_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_loo")
    config = EvaluationConfig(against="retraining", test_ids=(0, 1), k=3, methods=("index", "grad_sim", "exact"),
                              figures=True)
    return evaluate(task, index_dir, config, out, progress_bar=False)


# ------------------------------------------------------------------------------------------------
# metrics


def test_metrics_on_known_values():
    truth = np.array([-3.0, -2.0, -1.0, 0.5, 1.0, 2.0, 3.0])
    assert spearman(truth, truth * 10 + 1) == pytest.approx(1.0)
    assert pearson(truth, -truth) == pytest.approx(-1.0)
    assert math.isnan(spearman(truth, np.ones_like(truth)))          # constant side: undefined, not 0
    with_nan = np.concatenate([truth, [np.nan]])                      # e.g. a diverged retraining
    with pytest.warns(RuntimeWarning, match="1 of 8 score pairs are NaN"):
        assert pearson(with_nan, np.concatenate([-truth, [1.0]])) == pytest.approx(-1.0)
    assert top_k(truth, 2, "helpful").tolist() == [0, 1]
    assert top_k(truth, 2, "harmful").tolist() == [6, 5]
    shuffled = np.array([-1.0, -3.0, -2.0, 0.5, 3.0, 1.0, 2.0])     # same top-2 sets, other order
    assert recall_at_k_scores(shuffled, truth, 2, "helpful") == pytest.approx(0.5)   # picks ids 1, 2
    assert recall_at_k_scores(truth, truth, 3, "harmful") == 1.0
    wrong_sign = np.array([3.0, 2.0, 1.0, 0.0, -1.0, -2.0, -3.0])
    assert sign_precision_at_k(wrong_sign, truth, 3, "helpful") == 0.0
    assert sign_precision_at_k(truth, truth, 3, "harmful") == 1.0
    # ties at the k-th exact score: any of the tied ids is a valid answer
    tied = np.array([-2.0, -1.0, -1.0, 0.0, 1.0])
    assert recall_at_k_scores(np.array([-2.0, 0.0, -1.0, 0.0, 1.0]), tied, 2, "helpful") == 1.0


def test_backbone_features_fallback_and_hook(task):
    pre = task.pretrained_model()
    assert shared_modules(task, pre) == ["embed"]
    batch = full_batch(task.pretrain_dataset(), [0, 1, 2])
    feats = backbone_features(task, pre, task.pretrain_loss, batch)
    assert feats.shape == (3, task.hidden)
    torch.testing.assert_close(feats, pre.embed(batch[0]).detach())      # the embed module's output
    hooked = copy.copy(task)
    hooked.features = lambda model, b: model.features(b[0])
    torch.testing.assert_close(backbone_features(hooked, pre, task.pretrain_loss, batch),
                               torch.tanh(pre.embed(batch[0])).detach())


def test_config_validation():
    with pytest.raises(ConfigError, match="against"):
        EvaluationConfig(against="loo")
    with pytest.raises(ConfigError, match="index"):
        EvaluationConfig(methods=("grad_sim",))
    with pytest.raises(ConfigError, match="fraction"):
        EvaluationConfig(against="lds", fraction=1.0)


# ------------------------------------------------------------------------------------------------
# against exact influence


def test_default_index_matches_exact_influence(exact_result):
    r = exact_result.report
    assert r["status"] == "complete" and r["against"] == "exact"
    assert set(r["methods"]) == {"index", "grad_sim", "repr_sim", "single_stage"}
    for row in r["per_test"]["index"]:
        assert row["spearman"] >= 0.9, row
        assert row["recall_at_k_helpful"] >= 0.8 and row["recall_at_k_harmful"] >= 0.8, row
    s = r["summary"]
    assert 0.9 < s["index"]["scale"] < 1.1                     # scores in units of influence, not just ranks
    # the baselines are clearly worse against exact influence than the index
    for m in ("grad_sim", "repr_sim", "single_stage"):
        assert s[m]["spearman"] < s["index"]["spearman"] - 0.3, (m, s[m])
    sweep = r["sweep"]
    assert len(sweep) == 1 and sweep[0]["preconditioner"] == "identity" and sweep[0]["error"] is None
    assert sweep[0]["metrics"]["spearman"] < s["index"]["spearman"]
    for name in ("metrics", "scatter"):
        p = exact_result.paths[name]
        assert p.exists() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_schema_is_stable(exact_result):
    path = exact_result.paths["report"]
    on_disk = json.loads(path.read_text())
    assert on_disk == exact_result.report
    validate_report(on_disk)
    for key in TOP_LEVEL:                                      # the documented keys, with their types
        assert key in on_disk and isinstance(on_disk[key], TOP_LEVEL[key]), key
    assert on_disk["schema_version"] == 1 and on_disk["kind"] == "msif-evaluation"
    assert on_disk["task"]["spec"] == "examples/digits/task.py:task"
    assert on_disk["index"]["n"] == 300 and isinstance(on_disk["config"]["test_ids"], list)
    for m in on_disk["methods"]:
        assert [row["test_id"] for row in on_disk["per_test"][m]] == on_disk["config"]["test_ids"]
        for metric in PER_TEST_METRICS["exact"]:
            agg = on_disk["aggregate"][m][metric]
            assert set(agg) == {"mean", "std", "stderr", "count"}
            assert on_disk["summary"][m][metric] == agg["mean"]
    # the validator catches a missing key, a wrong type and a missing per-test metric
    for mutate in (lambda d: d.pop("aggregate"), lambda d: d["index"].update(k="780"),
                   lambda d: d["per_test"]["index"][0].pop("spearman")):
        broken = copy.deepcopy(on_disk)
        mutate(broken)
        with pytest.raises(SchemaError):
            validate_report(broken)
    # docs/evaluation_schema.md documents every top-level key and metric
    from pathlib import Path
    doc = (Path(__file__).resolve().parents[1] / "docs" / "evaluation_schema.md").read_text()
    for key in list(TOP_LEVEL) + [m for ms in PER_TEST_METRICS.values() for m in ms]:
        assert f"`{key}`" in doc, key


# ------------------------------------------------------------------------------------------------
# against leave-out retraining


def test_exact_influence_predicts_leave_one_out_retraining(loo_result):
    r = loo_result.report
    assert r["status"] == "complete" and r["retraining"]["finetune_init"] == "finetuned"
    assert r["retraining"]["retrained"] == r["retraining"]["jobs"]
    for row in r["per_test"]["exact"]:
        assert row["removals"] >= 9                           # 3 helpful + 3 harmful + 3 random at least
        assert row["pearson"] >= 0.9, row
        assert row["precision_at_k_helpful"] == 1.0 and row["precision_at_k_harmful"] == 1.0, row
    assert r["pooled"]["exact"]["pearson"] >= 0.9
    # the points behind the correlations: removing a top helpful example raises the test loss
    p = r["points"][0]
    assert len(p["actual"]) == len(p["removed"]) == len(p["predicted"]["index"])


def test_index_beats_gradient_similarity_on_retraining(loo_result):
    s, pooled = loo_result.report["summary"], loo_result.report["pooled"]
    assert s["index"]["pearson"] > s["grad_sim"]["pearson"] + 0.2
    assert pooled["index"]["pearson"] > pooled["grad_sim"]["pearson"] + 0.2
    assert s["index"]["pearson"] >= 0.9


# ------------------------------------------------------------------------------------------------
# LDS, cached and resumable


def test_lds_caches_and_resumes(task, index_dir, tmp_path):
    base = dict(against="lds", test_ids=(0, 1, 2), num_subsets=3, fraction=0.8,
                methods=("index", "repr_sim"), figures=False)
    cache = str(tmp_path / "cache")
    first = evaluate(task, index_dir, EvaluationConfig(**base, cache_dir=cache, shard=(0, 2)), tmp_path / "a",
                     progress_bar=False)
    r = first.report
    assert r["status"] == "partial" and r["retraining"]["retrained"] == 3     # reference + subsets 0, 2
    assert r["retraining"]["missing"] == 1 and r["per_test"] == {}
    validate_report(r)
    second = evaluate(task, index_dir, EvaluationConfig(**base, cache_dir=cache, shard=(1, 2)), tmp_path / "b",
                      progress_bar=False)
    assert second.report["retraining"]["retrained"] == 1 and second.report["status"] == "complete"
    third = evaluate(task, index_dir, EvaluationConfig(**base, cache_dir=cache), tmp_path / "c", progress_bar=False)
    r3 = third.report
    assert r3["retraining"]["retrained"] == 0 and r3["retraining"]["loaded_from_cache"] == 4
    assert r3["status"] == "complete" and r3["retraining"]["subsets_used"] == 3
    assert r3["per_test"] == second.report["per_test"]
    validate_report(r3)
    for m in ("index", "repr_sim"):
        assert "lds" in r3["summary"][m] and len(r3["per_test"][m]) == 3
    points = r3["points"]
    assert np.asarray(points["actual"]).shape == (3, 3)
    assert np.isfinite(np.asarray(points["actual"])).all()
    # the cache is keyed by the task: another finetuned model retrains instead of reusing it
    other = copy.copy(task)
    fin = copy.deepcopy(task.finetuned_model())
    with torch.no_grad():
        fin.head.bias.add_(0.01)
    other.finetuned_model = lambda: fin
    from msif_index.evaluation.retraining import task_fingerprint
    assert task_fingerprint(other, "finetuned") != task_fingerprint(task, "finetuned")


def test_retraining_refuses_a_full_disk_before_it_retrains(task, tmp_path, monkeypatch):
    """A cache file that would not fit is refused in one line before the retraining (minutes of
    work) is spent on it, and nothing is written."""
    import msif_index.atomic
    from msif_index.errors import DiskFullError
    from msif_index.evaluation.retraining import Retrainer, removal_job
    retrainer = Retrainer(task, [0, 1], tmp_path / "cache", progress_bar=False)
    monkeypatch.setattr(msif_index.atomic, "_free_bytes", lambda folder: 4096)

    def never(kept):
        raise AssertionError("retrained although the cache file cannot be written")
    monkeypatch.setattr(retrainer, "measure", never)
    with pytest.raises(DiskFullError, match="retraining cache file") as e:
        retrainer.run_all([removal_job([3, 4])])
    assert "\n" not in str(e.value) and retrainer.retrained == 0
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_cli_evaluate_json(task, index_dir, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from msif_index.cli.main import app
    import msif_index.task as task_mod
    monkeypatch.setattr(task_mod, "load_task", lambda spec, validate=True: task)
    res = CliRunner().invoke(app, ["evaluate", "--index", str(index_dir), "--task", "digits:task",
                                   "--against", "exact", "--test-ids", "0,5", "--k", "5", "--no-figures",
                                   "--methods", "index,single_stage", "--out", str(tmp_path / "r"), "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["status"] == "complete" and out["test_ids"] == [0, 5]
    assert set(out["summary"]) == {"index", "single_stage"}
    assert out["summary"]["index"]["spearman"] >= 0.9
    assert out["not_at_a_minimum"] == []                   # the digits task is trained to convergence
    assert (tmp_path / "r" / "report.json").exists()
    bad = CliRunner().invoke(app, ["evaluate", "--index", str(index_dir), "--task", "digits:task",
                                   "--against", "loo"])
    assert bad.exit_code != 0


def test_against_exact_refuses_large_models_unless_forced(task, index_dir, tmp_path, monkeypatch):
    import msif_index.evaluation.runner as runner
    monkeypatch.setattr(runner, "exact_feasible", lambda t: (False, "its dense Hessians are too large"))
    with pytest.raises(ConfigError, match="--against retraining or lds"):
        evaluate(task, index_dir, EvaluationConfig(against="exact", test_ids=(0,)), tmp_path, progress_bar=False)
    with pytest.raises(ConfigError, match="--exact is off"):
        evaluate(task, index_dir, EvaluationConfig(against="exact", exact="off", test_ids=(0,)), tmp_path,
                 progress_bar=False)


def test_k_above_n_is_refused_and_num_test_above_the_test_set_is_said(task, index_dir, tmp_path):
    """--k above the index's n (recall@k would be 1 for every method) is one ConfigError; --num-test
    above the test set evaluates all of it and says so; a bad EvaluationConfig built in Python carries
    the note translating its option."""
    with pytest.raises(ConfigError, match=r"--k 100000 is above the index's \d+ pretraining examples"):
        evaluate(task, index_dir, EvaluationConfig(against="exact", k=100000, test_ids=(0,)), tmp_path / "r",
                 progress_bar=False)
    n_test = len(task.test_dataset())
    from msif_index.evaluation.runner import choose_test_ids
    with pytest.warns(RuntimeWarning, match=f"--num-test {n_test + 5} is above the test set's {n_test} examples"):
        assert len(choose_test_ids(task, EvaluationConfig(num_test=n_test + 5))) == n_test
    with pytest.raises(ConfigError) as e:
        EvaluationConfig(k=-1)
    assert e.value.__notes__ == ["From Python: --k is EvaluationConfig(k=...)"]


def test_refused_evaluation_leaves_no_report_folder(task, index_dir, tmp_path, monkeypatch):
    """An evaluation that fails on its inputs (test ids out of range, exact influence infeasible)
    removes the report folders it created, and keeps a folder that was there before."""
    import msif_index.evaluation.runner as runner
    out = tmp_path / "reports" / "r"
    with pytest.raises(MsifError):
        evaluate(task, index_dir, EvaluationConfig(against="exact", test_ids=(10 ** 6,)), out, progress_bar=False)
    assert not (tmp_path / "reports").exists()
    monkeypatch.setattr(runner, "exact_feasible", lambda t: (False, "its dense Hessians are too large"))
    with pytest.raises(ConfigError):
        evaluate(task, index_dir, EvaluationConfig(against="exact", test_ids=(0,)), out, progress_bar=False)
    assert not (tmp_path / "reports").exists()
    out.mkdir(parents=True)
    with pytest.raises(ConfigError):
        evaluate(task, index_dir, EvaluationConfig(against="exact", test_ids=(0,)), out, progress_bar=False)
    assert out.is_dir()
    # a report folder that cannot be made (under a file): the index opened first is closed again
    from msif_index.index import InfluenceIndex
    closed = []
    real_close = InfluenceIndex.close
    monkeypatch.setattr(InfluenceIndex, "close", lambda self: (closed.append(1), real_close(self)))
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        evaluate(task, index_dir, EvaluationConfig(against="exact", test_ids=(0,)), tmp_path / "file" / "r",
                 progress_bar=False)
    assert closed


def test_report_folder_that_is_a_file_or_an_index_is_refused(tmp_path):
    """`msif evaluate --out` naming a file, or an index folder (the report would make the same
    build-index command refuse it), is one ConfigError before anything is written."""
    from msif_index.errors import ConfigError
    from msif_index.evaluation.runner import evaluate
    (tmp_path / "file").write_text("x")
    index = tmp_path / "idx"
    index.mkdir()
    (index / "manifest.json").write_text("{}")
    for out in (tmp_path / "file", index):
        with pytest.raises(ConfigError, match="--out"):
            evaluate(None, index, out_dir=out)
    assert sorted(p.name for p in index.iterdir()) == ["manifest.json"]


def test_single_stage_baseline_is_basis_independent(task, tmp_path):
    """kfac / ekfac store rows in the preconditioner's eigenbasis: the single-stage baseline must
    rotate its test gradient alike, giving -(P_W grad_W l) . [M^-1 phi_z]_W in any basis."""
    from msif_index.evaluation.baselines import Context, single_stage_scores
    from msif_index.index import InfluenceIndex
    from msif_index.preconditioners import rotate_blocks
    path = build_index(task, tmp_path / "ekfac", BuildConfig(preconditioner="ekfac", proj_dim=256,
                                                             dtype="float64", compute_dtype="float64"))
    test_ids = [0, 1, 2]
    batch = full_batch(task.test_dataset(), test_ids)
    with InfluenceIndex.open(path) as index:
        assert index.row_basis == "eigen"
        key = index.attach(task)
        got, _ = single_stage_scores(Context(task, index, key, test_ids, batch, tmp_path))
        att = index._attached[key]
        pw = att.projector.project_batch(task.measurement, batch).detach().double()   # parameter basis
        rows = torch.from_numpy(index.store.read(0, index.n, dtype=np.float64))
        rows = rotate_blocks(rows, index._w_blocks(), index._eigenbases(torch.float64), inverse=True)
    want = -(pw @ rows.T).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10 * np.abs(want).max())

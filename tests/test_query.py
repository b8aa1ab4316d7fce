"""Acceptance tests of querying the index (InfluenceIndex.attach / query / scores) on the digits task.

- exact mode (proj_dim=None, exact preconditioner): top-k ids and scores equal exact_influence, for
  frozen and proximal finetuning attached to one index, helpful and harmful;
- default config: rank correlation, recall@10 and the scale of the scores against exact_influence;
  with real compression (proj_dim=256) the measured Spearman is printed and checked against a bar;
- answers survive a new process, do not depend on the finetuning set size in time, and are the
  same from 4 threads; user errors give one clear line.
"""
from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from msif_index.build import build_index, pretrained_fingerprints, resolve_config
from msif_index.config import PRESETS, BuildConfig
from msif_index.data import full_batch
from msif_index.errors import ConfigError, CorruptIndexError, IndexMismatchError, NonFiniteError, ShapeError
from msif_index.exact import chained_test_vectors, exact_influence, pretrain_side
from msif_index.gradients import GradientProjector
from msif_index.index import InfluenceIndex
from msif_index.search import recall_at_k
from msif_index.store import RowStore

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "task.py"
TEST_IDS = list(range(10))
STYLES = ("frozen", "proximal")


@pytest.fixture(scope="module")
def tasks(digits_frozen, digits_proximal):
    return {"frozen": digits_frozen, "proximal": digits_proximal}


@pytest.fixture(scope="module")
def batch(digits_frozen):
    return full_batch(digits_frozen.test_dataset(), TEST_IDS)


@pytest.fixture(scope="module")
def side(tasks):
    """The exact pretraining side (H_G, per-example gradients, DW), shared by both styles."""
    f, p = (t.pretrained_model() for t in tasks.values())
    assert pretrained_fingerprints(tasks["frozen"], f) == pretrained_fingerprints(tasks["proximal"], p)
    return pretrain_side(tasks["frozen"])


@pytest.fixture(scope="module")
def exact(tasks, batch, side):
    """exact_influence [Q, n] per finetuning style: v_t . DW(z), its definition (exact.py), with the
    pretraining side computed once for both styles (they share the pretrained model)."""
    return {s: (chained_test_vectors(t, batch) @ side.displacements.T).numpy() for s, t in tasks.items()}


@pytest.fixture(scope="module")
def exact_index(tmp_path_factory, tasks):
    return build_index(tasks["frozen"], tmp_path_factory.mktemp("q") / "exact", PRESETS["exact"])


@pytest.fixture(scope="module")
def default_index(tmp_path_factory, tasks):
    return build_index(tasks["frozen"], tmp_path_factory.mktemp("q") / "default", BuildConfig())


@pytest.fixture(scope="module")
def ekfac_index(tmp_path_factory, tasks):
    """Rows in the eigenbasis (row_basis "eigen"); a subsample for the statistics, so most rows come
    from the rotated projector."""
    return build_index(tasks["frozen"], tmp_path_factory.mktemp("q") / "ekfac",
                       BuildConfig(preconditioner="ekfac", proj_dim=256, stats_examples=100, dtype="float64",
                                   compute_dtype="float64"))


def _exact_topk(scores: np.ndarray, k: int, direction: str) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(scores if direction == "helpful" else -scores, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(scores, order, 1)


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([spearmanr(a[q], b[q])[0] for q in range(len(a))]))


def _recall(approx_ids: np.ndarray, exact_scores: np.ndarray, k: int, direction: str) -> float:
    sim = -exact_scores if direction == "helpful" else exact_scores       # larger = more helpful/harmful
    order = np.argsort(-sim, axis=1, kind="stable")
    return recall_at_k(np.take_along_axis(sim, order, 1), order, approx_ids, k)


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert msg and "\n" not in msg, msg
    return msg


# ------------------------------------------------------------------------------------------------


def test_frozen_and_proximal_share_the_pretrained_model(tasks):
    f, p = (t.pretrained_model() for t in tasks.values())
    assert pretrained_fingerprints(tasks["frozen"], f) == pretrained_fingerprints(tasks["proximal"], p)
    assert tasks["frozen"].pretrain_dataset().tensors[0].equal(tasks["proximal"].pretrain_dataset().tensors[0])


def test_exact_mode_equals_exact_influence(exact_index, tasks, batch, exact):
    """Two finetuned models on one index; each answers as its own exact influence, both directions."""
    two = full_batch(tasks["proximal"].test_dataset(), [0, 1])       # the fixture is exact_influence
    np.testing.assert_allclose(exact_influence(tasks["proximal"], two).numpy(), exact["proximal"][:2],
                               rtol=1e-10, atol=0)
    index = InfluenceIndex.open(exact_index)
    keys = {s: index.attach(t) for s, t in tasks.items()}
    assert keys["frozen"] != keys["proximal"] and sorted(index.attached) == sorted(keys.values())
    k = 10
    answers = {}
    for style in STYLES:
        for direction in ("helpful", "harmful"):
            res = index.query(batch, k=k, direction=direction, finetuned=keys[style])
            want_ids, want_scores = _exact_topk(exact[style], k, direction)
            assert res.finetuned == keys[style] and res.direction == direction
            np.testing.assert_array_equal(res.ids, want_ids)
            np.testing.assert_allclose(res.scores, want_scores, rtol=1e-6, atol=0)
            assert (res.scores < 0).all() if direction == "helpful" else (res.scores > 0).all()
            answers[style, direction] = res
        np.testing.assert_allclose(index.scores(batch, finetuned=keys[style]), exact[style],
                                   rtol=1e-6, atol=1e-9 * np.abs(exact[style]).max())
    # the two finetuned models answer differently (and so does exact influence)
    assert not np.array_equal(answers["frozen", "helpful"].ids, answers["proximal", "helpful"].ids)
    assert not np.allclose(exact["frozen"], exact["proximal"], rtol=1e-2)
    # the default key is the last one attached, with a warning naming it (two are attached: an omitted
    # finetuned= is most likely a slip); naming it explicitly gives the same answer, without a warning
    with pytest.warns(RuntimeWarning, match=f"2 finetuned models are attached .* using the last attached, "
                                            f"{keys['proximal']}; pass finetuned=KEY"):
        again = index.query(batch, k=k, direction="harmful")
    np.testing.assert_array_equal(again.ids, answers["proximal", "harmful"].ids)
    for default_to_last in (index.scores, index.measurements, index.query_vectors, lambda b: index.operator()):
        with pytest.warns(RuntimeWarning, match="finetuned= is omitted"):
            default_to_last(batch)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        index.query(batch, k=k, direction="harmful", finetuned=keys["proximal"])
        index.measurements(batch, keys["frozen"])
    index.close()
    with InfluenceIndex.open(exact_index) as one:                 # one attached: its default, silently
        one.attach(tasks["frozen"])
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(one.query(batch, k=k).ids, answers["frozen", "helpful"].ids)
            one.scores(batch)


def test_default_config_ranks_like_exact(default_index, tasks, batch, exact, capsys):
    index = InfluenceIndex.open(default_index)
    assert index.manifest["preconditioner"]["name"] == "hessian"          # auto at this size
    report = []
    for style in STYLES:
        key = index.attach(tasks[style])
        scores = index.scores(batch, finetuned=key)
        rho = _spearman(scores, exact[style])
        recalls = {d: _recall(index.query(batch, k=10, direction=d, finetuned=key).ids, exact[style], 10, d)
                   for d in ("helpful", "harmful")}
        slope = float((scores * exact[style]).sum() / (exact[style] ** 2).sum())
        report.append(f"{style}: Spearman {rho:.4f}, recall@10 helpful {recalls['helpful']:.2f} "
                      f"harmful {recalls['harmful']:.2f}, slope {slope:.3f}")
        assert rho >= 0.9, report[-1]
        assert min(recalls.values()) >= 0.8, report[-1]
        # scale: least-squares slope of index scores against exact ones
        assert 0.8 <= slope <= 1.25, report[-1]
    with capsys.disabled():
        print("\n[default config] " + "; ".join(report))
    index.close()


@pytest.mark.parametrize("pre, bar", [("hessian", 0.25), ("ekfac", 0.08)])
def test_compressed_projection_is_informative(tmp_path, tasks, batch, exact, side, pre, bar, capsys):
    """proj_dim=256 compresses the 780 W parameters to 144 (hessian: rows over (W, U)) or 252 (ekfac:
    W only) columns. Measured Spearman vs exact (frozen, 10 test points): hessian 0.336, ekfac 0.293
    (Gauss-Newton statistics: the digits task defines pretrain_fisher_losses; 0.154 with the empirical
    Fisher)."""
    task = tasks["frozen"]
    cfg = BuildConfig(proj_dim=256, preconditioner=pre, dtype="float64")
    path = build_index(task, tmp_path / pre, cfg)
    index = InfluenceIndex.open(path)
    index.attach(task)
    scores = index.scores(batch)
    rho = _spearman(scores, exact["frozen"])
    rec = _recall(index.query(batch, k=10).ids, exact["frozen"], 10, "helpful")
    with capsys.disabled():
        print(f"\n[proj_dim=256, {pre}, k={index.k}] Spearman {rho:.3f}, recall@10 helpful {rec:.2f}")
    assert rho >= bar
    if pre == "hessian":
        # it is exactly the Galerkin formula of MATH.md: -(P_W v_t) . [(P H_G P^T + lambda I)^{-1} P g]_W
        model = task.pretrained_model()
        proj = GradientProjector(model, side.w_names + side.u_names, proj_dim=256, seed=0, dtype=torch.float64)
        p = proj.matrix()
        w_cols = torch.cat([torch.arange(b.offset, b.offset + b.dim) for b in proj.blocks
                            if set(b.params) <= set(side.w_names)])
        evals, evecs = torch.linalg.eigh(p @ side.hessian @ p.T)
        evals = evals.clamp_min(0)
        lam = resolve_config(task, cfg).damping * float(evals.mean())
        inv = evecs @ torch.diag(1 / (evals + lam)) @ evecs.T
        s = (side.grads @ p.T @ inv)[:, w_cols]
        d_w = side.displacements.shape[1]
        q = chained_test_vectors(task, batch) @ p[w_cols, :d_w].T
        galerkin = -(q @ s.T).numpy()
        assert np.abs(scores - galerkin).max() < 1e-8 * np.abs(galerkin).max()
    index.close()


# ------------------------------------------------------------------------------------------------
# persistence, finetuning-set size, threads

_SUBPROCESS = """
import json, sys, torch
import msif_index
from msif_index.data import full_batch
from msif_index.index import InfluenceIndex
base = msif_index.load_task({digits!r} + ":task", validate=False)
mod = sys.modules[type(base).__module__]
states = torch.load({models!r})
out = {{}}
with InfluenceIndex.open({index!r}) as index:
    for style, alpha in (("frozen", 1.0), ("proximal", {alpha!r})):
        t = mod.DigitsTask(style, alpha=alpha)
        pre = mod.DigitsNet(12, 10).double(); pre.load_state_dict(states["pre"])
        fin = mod.DigitsNet(12, 2).double(); fin.load_state_dict(states[style])
        t.__dict__["_pretrained"], t.__dict__["_finetuned"] = pre, fin     # no retraining here
        key = index.attach(t)
        for direction in ("helpful", "harmful"):
            r = index.query(full_batch(t.test_dataset(), {ids!r}), k=10, direction=direction, finetuned=key)
            out[style + "/" + direction] = {{"key": key, "ids": r.ids.tolist(), "scores": r.scores.tolist()}}
print(json.dumps(out))
"""


def test_attached_index_answers_the_same_in_a_new_process(tmp_path, default_index, tasks, batch):
    path = tmp_path / "index"
    shutil.copytree(default_index, path)
    here = {}
    with InfluenceIndex.open(path) as index:
        for style in STYLES:
            key = index.attach(tasks[style])
            for direction in ("helpful", "harmful"):
                here[style + "/" + direction] = (key, index.query(batch, k=10, direction=direction, finetuned=key))
    ops = {p.name: p.stat().st_mtime_ns for p in (path / "operators").iterdir()}
    assert len(ops) == 2
    models = tmp_path / "models.pt"
    torch.save({"pre": tasks["frozen"].pretrained_model().state_dict(),
                "frozen": tasks["frozen"].finetuned_model().state_dict(),
                "proximal": tasks["proximal"].finetuned_model().state_dict()}, models)
    script = _SUBPROCESS.format(digits=str(DIGITS), models=str(models), index=str(path),
                                alpha=float(tasks["proximal"].alpha), ids=TEST_IDS)
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    there = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(there) == set(here)
    for name, (key, res) in here.items():
        assert there[name]["key"] == key
        np.testing.assert_array_equal(np.array(there[name]["ids"]), res.ids)
        np.testing.assert_allclose(np.array(there[name]["scores"]), res.scores, rtol=1e-6)
    # the new process read the cached operators: nothing was recomputed or rewritten
    assert {p.name: p.stat().st_mtime_ns for p in (path / "operators").iterdir()} == ops
    assert not np.array_equal(np.array(there["frozen/helpful"]["ids"]), np.array(there["proximal/helpful"]["ids"]))


def test_query_time_does_not_grow_with_the_finetuning_set(default_index, tasks, capsys):
    base = tasks["frozen"]
    cls = type(base)
    m = 60
    index = InfluenceIndex.open(default_index)
    keys, seconds = {}, {}
    for size in (m, 4 * m):
        t = cls("frozen", n_finetune=size)
        # the split is by position after one seeded permutation: the pretraining set is unchanged,
        # so the pretrained model is reused instead of trained again
        assert t.pretrain_dataset().tensors[0].equal(base.pretrain_dataset().tensors[0])
        t.__dict__["_pretrained"] = base.pretrained_model()
        assert len(t.finetune_dataset()) == size
        keys[size] = index.attach(t)
        seconds[size] = []
    assert keys[m] != keys[4 * m]
    one = full_batch(base.test_dataset(), [3])
    for size in keys:                                             # warm up
        index.query(one, k=10, finetuned=keys[size])
    for _ in range(40):                                           # interleaved, so load hits both alike
        for size, key in keys.items():
            t0 = time.perf_counter()
            index.query(one, k=10, finetuned=key)
            seconds[size].append(time.perf_counter() - t0)
    # the lower quartile: robust to other processes sharing the CPUs (a timing test on 2 cores)
    med = {size: float(np.percentile(s, 25)) for size, s in seconds.items()}
    ratio = med[4 * m] / med[m]
    with capsys.disabled():
        print(f"\n[query time] m={m}: {med[m] * 1e3:.2f} ms, m={4 * m}: {med[4 * m] * 1e3:.2f} ms, "
              f"ratio {ratio:.2f}")
    assert ratio < 1.5
    index.close()


def test_concurrent_queries_equal_sequential_ones(exact_index, tasks, batch):
    index = InfluenceIndex.open(exact_index)
    keys = {s: index.attach(t) for s, t in tasks.items()}
    test = tasks["frozen"].test_dataset()
    jobs = [(ids, style, direction, k) for ids in ([0], [1, 2], [3, 4, 5], [6, 7, 8, 9])
            for style in STYLES for direction in ("helpful", "harmful") for k in (1, 7)]

    def run(job):
        ids, style, direction, k = job
        return index.query(full_batch(test, ids), k=k, direction=direction, finetuned=keys[style])

    sequential = [run(j) for j in jobs]
    with ThreadPoolExecutor(4) as pool:
        for _ in range(2):
            parallel = list(pool.map(run, jobs))
            for job, a, b in zip(jobs, sequential, parallel):
                np.testing.assert_array_equal(a.ids, b.ids, err_msg=str(job))
                np.testing.assert_allclose(a.scores, b.scores, rtol=1e-12, err_msg=str(job))
                assert b.finetuned == keys[job[1]]
    index.close()


# ------------------------------------------------------------------------------------------------
# one-line errors


def test_wrong_shape_test_batch(exact_index, tasks):
    task = tasks["frozen"]
    x, y = full_batch(task.test_dataset(), [0, 1, 2])
    with InfluenceIndex.open(exact_index) as index:
        index.attach(task)
        for bad in ((x[:, :63], y), (x.reshape(3, 8, 8), y), (x, y[:2]), ("not", "tensors"), {"x": x, "y": y}):
            with pytest.raises(ShapeError) as e:
                index.query(bad, k=5)
            _one_line(e)
        for bad in ((x[:, :63], y), (x.reshape(3, 8, 8), y)):
            with pytest.raises(ShapeError) as e:
                index.measurements(bad)
            _one_line(e)
        for bad in ((x[:, :63], y), x[:2], x[0]):        # a bare tensor: the task unpacks its rows as (x, y)
            with pytest.raises(ShapeError) as e:
                index.query(bad, k=5)
            assert "full_batch(task.test_dataset(), ids)" in _one_line(e)
        for ids in ([0, 1], [0, 1, 2, 3]):                         # test_ids: one per test point
            with pytest.raises(ShapeError, match="one id per test point") as e:
                index.query((x, y), k=5, test_ids=ids)
            _one_line(e)
        assert index.query((x, y), k=5, test_ids=[7, 8, 9]).test_ids == [7, 8, 9]
        assert index.query((x, y), k=5).ids.shape == (3, 5)      # the index still works afterwards
        empty = (x[:0], y[:0])                                     # no test points: empty answers
        res = index.query(empty, k=5)
        assert res.ids.shape == res.scores.shape == (0, 5) and res.ids.dtype == np.int64
        assert index.scores(empty).shape == (0, index.n) and index.measurements(empty).shape == (0,)
        real = task.measurement
        try:                                                       # a measurement not of shape [Q]
            task.measurement = lambda model, batch: torch.stack([real(model, batch)] * 2, 1)
            with pytest.raises(ShapeError) as e:
                index.measurements((x, y))
            assert "(3, 2)" in _one_line(e) and "[3]" in _one_line(e)
        finally:
            del task.measurement
        np.testing.assert_allclose(index.measurements((x, y)),
                                   task.measurement(task.finetuned_model(), (x, y)).detach().numpy(), rtol=1e-12)


def test_a_key_attached_in_another_process_says_to_attach_here(exact_index, tasks, batch):
    """Attached models belong to the process that attached them: a reopened index asked for a key
    whose operator is cached says to attach (which loads it), in one line."""
    with InfluenceIndex.open(exact_index, huge_pages=False) as index:
        key = index.attach(tasks["frozen"], progress_bar=False)
    with InfluenceIndex.open(exact_index, huge_pages=False) as index:
        for finetuned, start in ((key, f"finetuned model {key!r} is not attached to this open index"),
                                 (None, "no finetuned model is attached to this open index")):
            with pytest.raises(ConfigError) as e:
                index.query(batch, k=3, finetuned=finetuned)
            msg = _one_line(e)
            assert msg.startswith(start) and "index.attach(task)" in msg, msg
            assert ("cached under operators/" in msg) == (finetuned is not None)
        other = index.attach(tasks["proximal"], progress_bar=False)
        with pytest.raises(ConfigError) as e:
            index.query(batch, k=3, finetuned=key)
        assert f"(attached: {other})" in _one_line(e) and "cached under operators/" in _one_line(e)


def test_k_above_n_returns_every_example_with_a_warning(exact_index, tasks, batch):
    with InfluenceIndex.open(exact_index, huge_pages=False) as index:
        index.attach(tasks["frozen"], progress_bar=False)
        n = index.n
        with pytest.warns(RuntimeWarning, match=f"k={n + 5} is more than the index's {n} pretraining examples"):
            res = index.query(batch, k=n + 5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            same = index.query(batch, k=n)
    assert res.ids.shape == (len(TEST_IDS), n)
    assert all(sorted(row) == list(range(n)) for row in res.ids.tolist())
    np.testing.assert_array_equal(res.ids, same.ids)


def test_an_error_of_the_tasks_own_code_at_query_time_names_its_line(exact_index, tasks):
    """A test batch the task's own code fails on (its bug, or a batch it cannot unpack) is one line
    naming that code's file and line, with the original error as its cause (MSIF_TRACEBACK=1 shows
    it); what torch raises on a wrong batch says the batch does not fit the model."""
    task = tasks["frozen"]
    x, y = full_batch(task.test_dataset(), [0, 1, 2])

    def bad_measurement(model, batch):
        raise ValueError("boom in my measurement")

    def indexing_bug(model, batch):
        return model(batch[0])[:, 99]                      # no class 99: IndexError in the task's line

    with InfluenceIndex.open(exact_index, huge_pages=False) as index:
        index.attach(task, progress_bar=False)
        try:
            for fn, exc, text in ((bad_measurement, ValueError, "boom in my measurement"),
                                  (indexing_bug, IndexError, "99")):
                task.measurement = fn
                line = f"test_query.py:{fn.__code__.co_firstlineno + 1} in {fn.__name__}"
                for call in (lambda: index.query((x, y), k=5), lambda: index.measurements((x, y))):
                    with pytest.raises(ShapeError) as e:
                        call()
                    msg = _one_line(e)
                    assert msg.startswith(f"the task's code raised {exc.__name__}: ") and text in msg
                    assert line in msg and "a bug there" in msg
                    assert isinstance(e.value.__cause__, exc)
        finally:
            del task.measurement
        with pytest.raises(ShapeError) as e:
            index.query((x[:, :63], y), k=5)              # torch's error on a wrong batch
        assert _one_line(e).startswith("the test batch does not fit the finetuned model (shapes or dtypes)")
        with pytest.raises(ShapeError) as e:
            index.query(x, k=5)                            # the task's `x, y = batch` fails on a bare tensor
        assert "the task's code raised ValueError" in _one_line(e) and "full_batch(task.test_dataset(), ids)" in _one_line(e)
        assert index.query((x, y), k=5).ids.shape == (3, 5)


def test_non_finite_test_point_is_named(exact_index, tasks):
    """The query path skips the per-loss and per-row checks of the build and checks q itself."""
    task = tasks["frozen"]
    x, y = full_batch(task.test_dataset(), [0, 1, 2])
    x = x.clone()
    x[1, 0] = float("nan")
    with InfluenceIndex.open(exact_index) as index:
        index.attach(task)
        with pytest.raises(NonFiniteError) as e:
            index.query((x, y), k=5)
        assert "test point 1" in _one_line(e)
        # float64 query vectors (the exact preset's float64 model) beyond float32's range: the search's
        # float32 copy would hold inf, so the query says so instead of searching with it
        q = index._query_vectors((x[[0]], y[[0]]))
        assert q.dtype == np.float64
        huge = np.full_like(q, 1e39)
        index._query_vectors = lambda *a, **k: huge
        with pytest.raises(NonFiniteError) as e:
            index.query((x[[0]], y[[0]]), k=5)
        assert "float32" in _one_line(e)


@pytest.mark.parametrize("factory", ["Flat", "SVD32,PQ16fs"])
def test_huge_pages_change_no_answer(tmp_path, default_index, tasks, batch, factory):
    """Opening with huge pages changes the search rows' pages and packs the attached model's
    parameters and B into one buffer: bitwise the same query vectors and answers."""
    folder = tmp_path / "idx"
    shutil.copytree(default_index, folder)
    m = json.loads((folder / "manifest.json").read_text())
    m["config"]["factory"] = factory
    (folder / "manifest.json").write_text(json.dumps(m))
    out = {}
    for huge in (False, True):
        with InfluenceIndex.open(folder, device="cpu", huge_pages=huge) as index:
            index.attach(tasks["frozen"])
            out[huge] = (index.query(batch, k=8, direction="harmful"), index.query_vectors(batch))
    np.testing.assert_array_equal(out[True][0].ids, out[False][0].ids)
    np.testing.assert_array_equal(out[True][0].scores, out[False][0].scores)
    np.testing.assert_array_equal(out[True][1], out[False][1])


def test_index_of_another_pretrained_model(exact_index, tasks):
    task = copy.copy(tasks["frozen"])                              # shares the datasets and models ...
    other = copy.deepcopy(task.pretrained_model())
    with torch.no_grad():
        other.embed.weight[0, 0] += 1e-6
    task.__dict__["_pretrained"] = other                           # ... except the pretrained one
    fin = copy.deepcopy(task.finetuned_model())                     # (frozen: the finetuned model holds it)
    with torch.no_grad():
        fin.embed.weight.copy_(other.embed.weight)
    task.__dict__["_finetuned"] = fin
    with InfluenceIndex.open(exact_index) as index:
        with pytest.raises(IndexMismatchError) as e:
            index.attach(task)
        assert "pretrained W" in _one_line(e)


def test_index_of_other_pretraining_data(exact_index, tasks):
    """A task with the index's models and n but another pretraining example at a sampled id is refused
    at attach; an index built before datasets were fingerprinted (no "data") does not check it."""
    from torch.utils.data import Subset

    from msif_index.fingerprint import dataset_sample_ids

    task = copy.copy(tasks["frozen"])
    data = task.pretrain_dataset()
    n = len(data)
    order = list(range(n))
    a, b = dataset_sample_ids(n)[1], dataset_sample_ids(n)[1] + 1     # two examples swapped
    order[a], order[b] = order[b], order[a]
    swapped = Subset(data, order)
    task.pretrain_dataset = lambda: swapped
    with InfluenceIndex.open(exact_index) as index:
        with pytest.raises(IndexMismatchError) as e:
            index.attach(task)
        assert "pretraining dataset" in _one_line(e)
        assert index.attached == []
        index.manifest["identity"].pop("data")
        if a < 8 or b < 8:           # the probe of the loss on the first 8 examples still tells a change
            with pytest.warns(RuntimeWarning, match="pretrain_loss gives other values"):
                index.check_pretrained(task)
        else:
            index.check_pretrained(task)


def test_bad_attach_settings_are_refused_before_any_work(exact_index, tasks):
    with InfluenceIndex.open(exact_index) as index:
        for kwargs in ({"damping": -5}, {"damping": float("nan")}, {"damping": True}, {"damping": "0.1"},
                       {"cg_iters": -1}, {"h_tt": "banana"}):
            with pytest.raises(ConfigError) as e:
                index.attach(tasks["frozen"], **kwargs)
            _one_line(e)
        assert index.attached == []


def test_frozen_finetuning_with_moved_w(exact_index, tasks):
    with InfluenceIndex.open(exact_index) as index:
        with pytest.raises(IndexMismatchError) as e:
            index.attach(tasks["frozen"], finetuned=tasks["proximal"].finetuned_model())
        assert "frozen" in _one_line(e)
        with pytest.raises(ConfigError) as e:                     # nothing attached
            index.query(full_batch(tasks["frozen"].test_dataset(), [0]))
        _one_line(e)


def test_missing_or_unfinished_index(tmp_path, exact_index, tasks):
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(tmp_path / "does-not-exist")
    assert "does-not-exist" in _one_line(e)
    unfinished = tmp_path / "unfinished"
    shutil.copytree(exact_index, unfinished)
    (unfinished / "manifest.json").unlink()
    with pytest.raises(CorruptIndexError) as e:
        InfluenceIndex.open(unfinished)
    assert "did not finish" in _one_line(e)
    with InfluenceIndex.open(exact_index) as index:
        index.attach(tasks["frozen"])
        one = full_batch(tasks["frozen"].test_dataset(), [0])
        for kwargs in ({"direction": "sideways"}, {"k": 0}, {"k": "3"}, {"k": 2.5}, {"finetuned": "nope"},
                       {"exact_rerank": 0}, {"exact_rerank": -5}):
            with pytest.raises(ConfigError) as e:
                index.query(one, **kwargs)
            _one_line(e)
        huge = index.query(one, k=10**12, exact_rerank=10**12)    # capped at n, not a 10^12-wide array
        assert huge.ids.shape == (1, index.n) and sorted(huge.ids[0]) == list(range(index.n))


@pytest.mark.parametrize("factory", ["SVD48", "SVD48,PQ24fs"])
def test_svd_index_agrees_with_flat(tmp_path, tasks, default_index, batch, factory):
    """factory='SVD<r>' (built from the rows at open, like Flat), also with its fast-scan stage:
    recall@10 >= 0.9 against the Flat index's answers, both directions, and its scores are the exact
    row scores of the ids it returns."""
    cfg = BuildConfig(factory=factory)
    svd_dir = build_index(tasks["frozen"], tmp_path / "svd", cfg)
    assert not (svd_dir / "faiss.index").exists()
    flat = InfluenceIndex.open(default_index)
    svd = InfluenceIndex.open(svd_dir)
    flat.attach(tasks["frozen"])
    svd.attach(tasks["frozen"])
    assert svd.search_index.two_stage
    assert (svd.search_index._fast_scan is not None) == factory.endswith("fs")
    all_scores = svd.scores(batch)
    for direction in ("helpful", "harmful"):
        a = flat.query(batch, k=10, direction=direction)
        b = svd.query(batch, k=10, direction=direction)
        sign = 1.0 if direction == "helpful" else -1.0
        assert recall_at_k(-sign * a.scores, a.ids, b.ids, 10) >= 0.9
        np.testing.assert_allclose(b.scores, np.take_along_axis(all_scores, b.ids, 1), rtol=1e-4, atol=1e-6)
        wide = svd.query(batch, k=10, direction=direction, exact_rerank=svd.n)       # every row rescored
        np.testing.assert_array_equal(np.sort(wide.ids, 1), np.sort(a.ids, 1))
        # the float64 rerank of a faiss index reads its candidates' rows in blocks: 3 rows at a time
        import msif_index.index as index_mod
        old, index_mod.RERANK_BLOCK_BYTES = index_mod.RERANK_BLOCK_BYTES, 3 * 8 * flat.k
        try:
            blocked = flat.query(batch, k=10, direction=direction, exact_rerank=flat.n)
        finally:
            index_mod.RERANK_BLOCK_BYTES = old
        np.testing.assert_array_equal(blocked.ids, a.ids)
        np.testing.assert_allclose(blocked.scores, a.scores, rtol=1e-5, atol=1e-7)
    flat.close()
    svd.close()


@pytest.mark.parametrize("which", ["default", "ekfac"])
@pytest.mark.parametrize("style", STYLES)
def test_single_pass_query_equals_two_pass_reference(default_index, ekfac_index, tasks, batch, style, which):
    """The query's one hooked backward pass over (W, theta) gives the same q_t (float64, 1e-10) as the
    reference: P_W grad_W l from the W projector, grad_theta l by torch.func per-example gradients,
    combined by FinetuneOperator.query_vectors (then rotated into the rows' eigenbasis for ekfac:
    the query path's rotated projector, R B and R C R^T). With ekfac, the scores equal
    -q_t . [M^-1 phi_z]_W in the parameter basis."""
    from msif_index.operator import reference_query_vectors

    index = InfluenceIndex.open(default_index if which == "default" else ekfac_index)
    assert index.row_basis == ("eigen" if which == "ekfac" else "parameter")
    key = index.attach(tasks[style])
    att = index._get(key)
    ref = reference_query_vectors(att.projector, att.operator, att.model, att.task.measurement, batch).numpy()
    got = index.query_vectors(batch, key)
    np.testing.assert_allclose(got, index.to_row_basis(ref), rtol=1e-10, atol=1e-12 * np.abs(ref).max())
    if which == "ekfac":
        assert np.abs(got - ref).max() > 1e-3 * np.abs(ref).max()      # the basis did change
        from msif_index.preconditioners import rotate_blocks
        with RowStore.open(ekfac_index / "rows.h5") as store:
            rows = torch.from_numpy(store.read(0, store.n, dtype=np.float64))
        param_rows = rotate_blocks(rows, index._w_blocks(), index._eigenbases(torch.float64), inverse=True)
        want = -(torch.from_numpy(ref) @ param_rows.T).numpy()
        scores = index.scores(batch, key)
        np.testing.assert_allclose(scores, want, rtol=1e-9, atol=1e-11 * np.abs(want).max())
    index.close()


def test_gauss_newton_statistics_track_exact_influence_better(tmp_path, tasks, batch, exact):
    """ekfac (the scalable preconditioner) fitted to the Gauss-Newton matrix (the digits task defines
    pretrain_fisher_losses) against the empirical Fisher, at proj_dim 4096: mean Spearman of the index
    scores over all pretraining examples vs exact_influence. Measured 0.55 vs 0.27 (README)."""
    rho = {}
    for fisher in ("gauss-newton", "empirical"):
        out = build_index(tasks["frozen"], tmp_path / fisher, BuildConfig(preconditioner="ekfac", fisher=fisher))
        with InfluenceIndex.open(out) as index:
            index.attach(tasks["frozen"])
            scores = index.scores(batch)
        rho[fisher] = float(np.mean([spearmanr(s, e)[0] for s, e in zip(scores, exact["frozen"])]))
    print(f"\n[ekfac statistics] Spearman vs exact: gauss-newton {rho['gauss-newton']:.3f}, "
          f"empirical {rho['empirical']:.3f}")
    assert rho["gauss-newton"] >= 0.45 and rho["gauss-newton"] >= rho["empirical"] + 0.15


def test_damaged_or_mismatched_manifest_is_one_line(tmp_path, exact_index, tasks):
    """A manifest that lost an entry, has a wrong type, or disagrees with the settings stored in the
    rows (e.g. another projection seed: it would silently give other answers) is refused at open."""
    import json
    cases = {
        "no-config": lambda m: m.pop("config"),
        "list": None,
        "seed": lambda m: m["projector"].__setitem__("seed", m["projector"]["seed"] + 1),
        "block-key": lambda m: m["projector"]["blocks"][0].__setitem__("dIm", m["projector"]["blocks"][0].pop("dim")),
        "w-names": lambda m: m.__setitem__("w_names", [1, 2]),
        "fingerprint": lambda m: m["fingerprints"].__setitem__("W", None),
        "damping": lambda m: m["identity"]["config"].__setitem__("damping", 0.5),
    }
    for name, edit in cases.items():
        folder = tmp_path / name
        shutil.copytree(exact_index, folder)
        manifest = json.loads((folder / "manifest.json").read_text())
        if edit is None:
            manifest = [manifest]
        else:
            edit(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        with pytest.raises(CorruptIndexError) as e:
            InfluenceIndex.open(folder)
        assert "manifest.json" in _one_line(e) and "--overwrite" in str(e.value), name


@pytest.mark.parametrize("err", ["EROFS", "ENOENT", "ENOSPC", "no room"])
def test_read_only_index_attaches_in_memory(tmp_path, exact_index, tasks, monkeypatch, err):
    """An operator that cannot be cached (read-only or forbidden folder; ENOENT: the folder was
    swapped meanwhile by an --overwrite rebuild; ENOSPC: creating operators/ on a full disk; no room:
    the free-space check refuses it before HDF5 meets the full disk) is kept in memory with a warning
    (computing it took a while): the index still answers, the same as a writable one."""
    import errno as errno_

    import msif_index.atomic
    from msif_index.operator import FinetuneOperator
    folder = tmp_path / "ro"
    shutil.copytree(exact_index, folder)
    shutil.rmtree(folder / "operators", ignore_errors=True)
    batch = full_batch(tasks["frozen"].test_dataset(), [0, 1])
    with InfluenceIndex.open(exact_index) as index:
        index.attach(tasks["frozen"])
        want = index.query(batch, k=5)

    def refuse(self, path):
        raise OSError(getattr(errno_, err), os.strerror(getattr(errno_, err)), str(path))
    if err == "no room":
        monkeypatch.setattr(msif_index.atomic, "_free_bytes", lambda folder: 100)
    else:
        monkeypatch.setattr(FinetuneOperator, "save", refuse)
    with InfluenceIndex.open(folder) as index:
        with pytest.warns(RuntimeWarning, match="kept in memory") as rec:
            index.attach(tasks["frozen"])
        got = index.query(batch, k=5)
    if err == "no room":
        msg = [str(r.message) for r in rec if "kept in memory" in str(r.message)][0]
        assert "not enough free space" in msg and "run the same command" not in msg       # nothing to rerun
    np.testing.assert_array_equal(got.ids, want.ids)
    np.testing.assert_allclose(got.scores, want.scores, rtol=1e-12)
    assert not list(folder.glob("operators/*")) and not list(folder.glob("operators/.*"))   # nothing cached


def test_result_names_the_model_that_answered(exact_index, tasks, batch):
    """The key is read once per query: an attach from another thread that changes the default model
    midway must not label one model's answer with another's key."""
    with InfluenceIndex.open(exact_index) as index:
        key_f = index.attach(tasks["frozen"])
        key_p = index.attach(tasks["proximal"])
        index._default = key_f
        real = index._query_vectors

        def racing(test_batch, finetuned=None):
            q = real(test_batch, finetuned)
            index._default = key_p                          # lands while the query searches
            return q

        index._query_vectors = racing
        result = index.query(batch, k=3)
        index._query_vectors = real
        assert result.finetuned == key_f
        assert np.array_equal(result.ids, index.query(batch, k=3, finetuned=key_f).ids)


def test_cached_operator_is_keyed_by_the_finetuning_loss_and_data(tmp_path, exact_index, tasks, batch):
    """B depends on the finetuning loss and data: the same finetuned model with another loss (label
    smoothing) or other finetuning data gets its own operator, not the cached one."""
    path = tmp_path / "idx"
    shutil.copytree(exact_index, path)
    shutil.rmtree(path / "operators", ignore_errors=True)
    frozen = tasks["frozen"]
    smoothed = copy.copy(frozen)
    smoothed.finetune_loss = lambda model, b: torch.nn.functional.cross_entropy(
        model(b[0]), b[1], reduction="none", label_smoothing=0.3)
    other_data = copy.copy(frozen)
    x, y = other_data.finetune_dataset().tensors if hasattr(other_data.finetune_dataset(), "tensors") else (None, None)
    assert x is not None, "the digits task's finetuning set is a TensorDataset"
    x = x.clone()
    x[0] += 0.5
    other_data.finetune_dataset = lambda: torch.utils.data.TensorDataset(x, y)
    with InfluenceIndex.open(path) as index:
        keys = [index.attach(t) for t in (frozen, smoothed, other_data)]
        assert len(set(keys)) == 3 and len(list((path / "operators").glob("*.h5"))) == 3
        b = [index.operator(k).b for k in keys]
        assert not torch.allclose(b[0], b[1]) and not torch.allclose(b[0], b[2])
        assert index.attach(frozen) == keys[0]                 # the same task: the cached operator


def test_attach_of_a_model_without_the_shared_parameters_is_one_line(exact_index, tasks):
    other = torch.nn.Sequential(torch.nn.Linear(64, 2)).double()
    with InfluenceIndex.open(exact_index) as index:
        with pytest.raises(IndexMismatchError) as e:
            index.attach(tasks["frozen"], finetuned=other)
        assert "shared_parameters" in _one_line(e)
        assert index.attached == []


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_is_indexed_and_queried_in_float32(tmp_path, half):
    """A float16 / bfloat16 model (and data) under compute_dtype "auto": build, attach and query
    compute in float32, so the answers equal those of the model's float32 copy (same weights).
    (bfloat16 rows once failed to convert to numpy in the build, and attach computed B in the
    model's half precision even under compute_dtype float32.)"""
    from torch.utils.data import TensorDataset

    from tests.test_build import TinyTask

    def task_in(dtype):
        task = TinyTask(n=48)
        for name in ("_pre", "_fin", "_test"):
            x, *rest = getattr(task, name).tensors
            setattr(task, name, TensorDataset(x.to(half).to(dtype), *rest))
        task._pm = task._pm.to(half).to(dtype)
        task._fm = task._fm.to(half).to(dtype)
        return task

    answers = []
    for dtype in (half, torch.float32):
        task = task_in(dtype)
        path = build_index(task, tmp_path / str(dtype), BuildConfig(proj_dim=16, preconditioner="ekfac"))
        with InfluenceIndex.open(path, huge_pages=False) as index:
            key = index.attach(task, progress_bar=False)
            assert index._attached[key].projector.dtype == torch.float32
            res = index.query(full_batch(task.test_dataset(), [0, 1, 2]), k=5)
        answers.append(res)
    assert np.isfinite(answers[0].scores).all()
    np.testing.assert_array_equal(answers[0].ids, answers[1].ids)
    np.testing.assert_allclose(answers[0].scores, answers[1].scores, rtol=1e-5)


@pytest.mark.parametrize("finetuning", ["frozen", "proximal"])
def test_a_float32_models_operator_is_kept_and_saved_in_float32(tmp_path, monkeypatch, finetuning):
    """B and C of a float32 model are rounded to float32 once computed (half the memory and disk of
    float64; the query path computes in float32 anyway): a new process loading the file answers
    bitwise like the process that computed it, and the answers stay within float32 rounding of a
    float64 operator's. A float64 model's operator stays float64."""
    from torch.utils.data import TensorDataset

    from msif_index.operator import FinetuneOperator
    from tests.test_build import TinyTask

    task = TinyTask(n=48)
    for name in ("_pre", "_fin", "_test"):
        x, *rest = getattr(task, name).tensors
        setattr(task, name, TensorDataset(x.float(), *rest))
    task._pm, task._fm = task._pm.float(), task._fm.float()
    if finetuning == "proximal":
        task.finetuning, task.alpha = "proximal", 0.5
        with torch.no_grad():
            task._fm.embed.weight.add_(0.01)
    path = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="ekfac"))
    batch = full_batch(task.test_dataset(), [0, 1, 2])
    with InfluenceIndex.open(path, huge_pages=False) as index:
        key = index.attach(task, progress_bar=False)
        op = index.operator(key)
        first = index.query(batch, k=5)
        q32 = index.query_vectors(batch)
    assert op.b.dtype == torch.float32 and (op.c is None) == (finetuning == "frozen")
    assert op.c is None or op.c.dtype == torch.float32
    assert op.info["stored_dtype"] == "float32"
    op_file = path / "operators" / f"{key}.h5"
    with h5py.File(op_file, "r") as f:
        assert all(f[name].dtype == np.float32 for name in f)
    loaded = FinetuneOperator.load(op_file)
    assert torch.equal(loaded.b, op.b) and (op.c is None or torch.equal(loaded.c, op.c))
    with InfluenceIndex.open(path, huge_pages=False) as index:        # a new opening reads the file
        index.attach(task, progress_bar=False)
        again = index.query(batch, k=5)
    np.testing.assert_array_equal(again.ids, first.ids)
    np.testing.assert_array_equal(again.scores, first.scores)
    # against the float64 operator (the same computation, B and C not rounded)
    monkeypatch.setattr(FinetuneOperator, "stored_in", lambda self, dtype: self)
    op_file.unlink()
    with InfluenceIndex.open(path, huge_pages=False) as index:
        op64 = index.operator(index.attach(task, progress_bar=False))
        q64 = index.query_vectors(batch)
    assert op64.b.dtype == torch.float64 and "stored_dtype" not in op64.info
    # B and C are the float64 ones rounded (the query path rounded them to float32 before too, so the
    # answers are unchanged: q32 equals the float64 operator's q bit for bit)
    for got, full in ((op.b, op64.b), (op.c, op64.c)):
        if full is not None:
            np.testing.assert_array_equal(got.numpy(), full.float().numpy())
    np.testing.assert_array_equal(q32, q64)


def test_a_float64_models_operator_stays_float64(exact_index, tasks):
    with InfluenceIndex.open(exact_index, huge_pages=False) as index:
        op = index.operator(index.attach(tasks["proximal"], progress_bar=False))
    assert op.b.dtype == torch.float64 and op.c.dtype == torch.float64 and "stored_dtype" not in op.info


def test_two_threads_attaching_one_model_compute_its_operator_once(tmp_path, monkeypatch):
    """Concurrent attaches of the same finetuned model to one open index: both succeed and share one
    operator, computed once (the second waited for the first; its save once collided with the
    first's temporary file and failed with a raw RuntimeError)."""
    import threading

    import msif_index.index as index_mod
    from tests.test_build import TinyTask

    task = TinyTask(n=48)
    path = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=16, preconditioner="ekfac"))
    real, calls = index_mod.compute_operator, []

    def slow(*a, **kw):
        calls.append(1)
        time.sleep(0.3)
        return real(*a, **kw)

    monkeypatch.setattr(index_mod, "compute_operator", slow)
    errors, keys = [], []
    with InfluenceIndex.open(path, huge_pages=False) as index:
        def attach():
            try:
                keys.append(index.attach(task, progress_bar=False))
            except Exception as e:  # noqa: BLE001 - reported below
                errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=attach) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == [] and len(set(keys)) == 1 and len(calls) == 1, (errors, keys, calls)
        res = index.query(full_batch(task.test_dataset(), [0, 1]), k=3)
    assert np.isfinite(res.scores).all()
    assert [p.name for p in (path / "operators").iterdir()] == [f"{keys[0]}.h5"]


def test_python_api_edges_from_a_trial(tmp_path):
    """From a Python-API trial: a spec string where a task goes, batches without tensors, an empty id list,
    numpy test_ids (to_dict must stay JSON), an empty finetuned key, and a closed index each get one
    line (before: AttributeError / IndexError deep inside, a TypeError in json.dumps, the default
    model for '', and a closed index that answered some queries and raised RuntimeError on others)."""
    import json

    from msif_index.build import build_index
    from msif_index.config import BuildConfig
    from msif_index.errors import TaskError
    from msif_index.exact import exact_influence
    from msif_index.stationarity import stationarity

    from .test_build import TinyTask
    task = TinyTask()
    for call in (lambda: build_index("task.py:task", tmp_path / "x"), lambda: stationarity("task.py:task"),
                 lambda: exact_influence("task.py:task", None)):
        with pytest.raises(TaskError, match="load_task") as e:
            call()
        _one_line(e)
    with pytest.raises(ShapeError, match="holds no tensors"):
        exact_influence(task, {"x": "not an array"})
    with pytest.raises(ShapeError, match="at least one id"):
        full_batch(task.test_dataset(), [])
    out = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=16), progress_bar=False)
    x, y = full_batch(task.test_dataset(), [0, 1])
    with InfluenceIndex.open(out) as index:
        index.attach(task)
        res = index.query((x, y), k=3, test_ids=np.array([5, 6]))
        assert res.test_ids == [5, 6] and json.loads(json.dumps(res.to_dict()))["test_ids"] == [5, 6]
        with pytest.raises(ConfigError, match="test_ids must be integers"):
            index.query((x, y), k=3, test_ids=[0.5, 1.5])
        with pytest.raises(ConfigError, match="'' is not attached"):
            index.query((x, y), k=3, finetuned="")
        # numpy arrays are turned into tensors, as a DataLoader's collate does (a trial found the
        # README promising it while the query refused them)
        as_numpy = index.query((x.numpy(), y.numpy()), k=3)
        np.testing.assert_array_equal(as_numpy.ids, res.ids)
        np.testing.assert_array_equal(as_numpy.scores, res.scores)
        np.testing.assert_allclose(exact_influence(task, (x.numpy(), y.numpy())).numpy(),
                                   exact_influence(task, (x, y)).numpy(), rtol=0, atol=0)
        flipped = index.query((x.numpy()[:, ::-1].copy()[:, ::-1], y.numpy()), k=3)      # a negative-stride view
        np.testing.assert_array_equal(flipped.ids, res.ids)
        with pytest.raises(ShapeError, match="full_batch"):
            index.query({"x": "not an array"}, k=3)
        with pytest.raises(ShapeError, match="full_batch"):
            index.query(np.array(["a", "b"]), k=3)                  # strings stay as they are: no tensor
    for call in (lambda: index.query((x, y), k=3), lambda: index.scores((x, y)),
                 lambda: index.query((x, y), k=3, exact_rerank=10), lambda: index.attach(task)):
        with pytest.raises(ConfigError, match="is closed") as e:
            call()
        _one_line(e)

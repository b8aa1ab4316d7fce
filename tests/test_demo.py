"""`msif demo`: the shrunken (--quick) demo end to end, on the real bundled data, into tmp_path.

One quick run (trains 500-digit MNIST pretraining and both finetunings, builds, attaches both
finetuned models, queries, draws) is shared by the tests; a second run through the CLI reuses it.
"""
from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

from msif_index.build import MANIFEST, OPERATORS
from msif_index.data import full_batch
from msif_index.demo import QUICK, format_tables, make_tasks, run_demo
from msif_index.errors import OutputExistsError
from msif_index.index import InfluenceIndex

K = 3
QUERIES = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "demo"
    summary = run_demo(out, quick=True, k=K, n_queries=QUERIES, show=False, verbose=False)
    return out, summary


def _png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "report.png is not a PNG"
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_files_and_manifest(demo):
    out, s = demo
    report = out / "report.png"
    assert s["report"] == str(report) and report.stat().st_size > 10_000
    width, height = _png_size(report)
    assert width > 500 and height > 300 * QUERIES              # one row per test digit and model
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["n"] == s["n"] == QUICK["n_pretrain"]
    assert manifest["k"] == s["k"] and manifest["preconditioner"]["name"] == s["preconditioner"] == "ekfac"
    assert (out / "README.md").read_text().startswith("# msif demo")
    # the trained models live next to the index, never inside it
    assert sorted(p.name.split("-")[0] for p in (out.parent / "demo-models").glob("*.pt")) == \
        ["finetuned", "finetuned", "pretrained"]


def test_both_finetuned_models_attached(demo):
    out, s = demo
    keys = {style: m["key"] for style, m in s["models"].items()}
    assert set(keys) == {"frozen", "proximal"} and keys["frozen"] != keys["proximal"]
    for key in keys.values():
        assert (out / OPERATORS / f"{key}.h5").is_file()
    for style in keys:
        assert 0.5 < s["models"][style]["test_accuracy"] <= 1.0     # well above chance (0.1)
    # the two models answer differently for at least one test digit
    assert any(q["frozen"]["helpful"]["scores"] != q["proximal"]["helpful"]["scores"] for q in s["queries"])


def test_rankings_are_valid(demo):
    _, s = demo
    n = s["n"]
    assert len(s["queries"]) == QUERIES
    for q in s["queries"]:
        for style in ("frozen", "proximal"):
            helpful, harmful = q[style]["helpful"], q[style]["harmful"]
            for side in (helpful, harmful):
                assert len(side["ids"]) == K == len(side["scores"]) == len(side["labels"])
                assert all(0 <= i < n for i in side["ids"]) and len(set(side["ids"])) == K
                assert all(math.isfinite(v) for v in side["scores"])
                assert all(0 <= lab <= 9 for lab in side["labels"])
            assert helpful["ids"] != harmful["ids"]
            assert helpful["scores"] == sorted(helpful["scores"])                # most negative first
            assert harmful["scores"] == sorted(harmful["scores"], reverse=True)  # most positive first
            assert helpful["scores"][0] < 0 < harmful["scores"][0]
            assert max(helpful["scores"]) <= min(harmful["scores"])


def test_misclassified_digits_come_first(demo):
    _, s = demo
    wrong = [q["pred"]["frozen"] != q["label"] for q in s["queries"]]
    assert wrong[0], "the frozen model misclassifies some quick-demo test digits; the demo must show one"
    assert wrong == sorted(wrong, reverse=True)


def test_rankings_match_the_index_scores(demo):
    """The summary's top ids and scores are the extremes of all n scores of the index (Flat search)."""
    out, s = demo
    frozen, proximal = make_tasks(quick=True, cache_dir=s["cache_dir"], verbose=False)
    ids = [q["test_id"] for q in s["queries"]]
    with InfluenceIndex.open(out) as index:
        for style, task in (("frozen", frozen), ("proximal", proximal)):
            key = index.attach(task, validate=False)           # loads the stored operator
            assert key == s["models"][style]["key"]
            scores = index.scores(full_batch(task.test_dataset(), ids), finetuned=key)
            for row, q in zip(scores, s["queries"]):
                order = np.argsort(row, kind="stable")
                assert set(q[style]["helpful"]["ids"]) == set(order[:K].tolist())
                assert set(q[style]["harmful"]["ids"]) == set(order[::-1][:K].tolist())
                np.testing.assert_allclose(q[style]["helpful"]["scores"], row[order[:K]], rtol=1e-4, atol=1e-6)
    labels = frozen.pretrain_dataset()[:][1]
    for q in s["queries"]:
        assert q["frozen"]["helpful"]["labels"] == [int(labels[i]) for i in q["frozen"]["helpful"]["ids"]]


def test_tables_name_every_digit(demo):
    _, s = demo
    text = format_tables(s)
    assert "negative = helpful" in text and s["report"] in text
    for q in s["queries"]:
        assert f"test digit {q['test_id']}: true {q['label']}" in text
        for i in q["proximal"]["harmful"]["ids"]:
            assert f" {i} " in text


def test_cli_second_run_reuses_everything(demo, capsys):
    """`msif demo --quick --json` on the same folder: no retraining, no rebuild, the same answers."""
    from msif_index.cli.main import main
    out, s = demo
    models = sorted((out.parent / "demo-models").glob("*.pt"))
    stamps = [p.stat().st_mtime_ns for p in models] + [(out / "rows.h5").stat().st_mtime_ns]
    capsys.readouterr()
    main(["demo", "--quick", "--out", str(out), "--k", str(K), "--queries", str(QUERIES), "--json"])
    again = json.loads(capsys.readouterr().out)
    assert [p.stat().st_mtime_ns for p in models] + [(out / "rows.h5").stat().st_mtime_ns] == stamps
    assert again["queries"] == s["queries"] and again["models"] == s["models"]
    assert again["seconds"]["train_s"] < 5 and again["seconds"]["attach_s"] < 5


def test_refuses_a_folder_it_did_not_write(tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("not an index")
    with pytest.raises(OutputExistsError, match="not an msif index"):
        run_demo(out, quick=True, show=False, verbose=False)
    (out / "notes.txt").unlink()
    (out / MANIFEST).write_text("{}")                          # someone else's index
    with pytest.raises(OutputExistsError, match="did not write"):
        run_demo(out, quick=True, show=False, verbose=False)


def test_digits_are_read_without_sklearn_and_equal_load_digits():
    """The task file reads sklearn's digits file itself (importing sklearn costs ~2 s per `msif query`);
    the images and labels must be exactly what sklearn.datasets.load_digits gives."""
    import subprocess
    import sys

    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_digits

    from msif_index.demo import load_example_module

    module = load_example_module()
    x, y = module.load_sklearn_digits_28()
    digits = load_digits()
    ref = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    ref = F.interpolate(ref, size=(28, 28), mode="bilinear", align_corners=False).clamp(0.0, 1.0)
    assert torch.equal(x, ref) and torch.equal(y, torch.as_tensor(digits.target, dtype=torch.int64))
    # ... and loading the data imports no sklearn module
    code = ("import sys; from msif_index.demo import load_example_module; "
            "load_example_module().load_sklearn_digits_28(); "
            "print(sorted(k for k in sys.modules if k.split('.')[0] == 'sklearn'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"

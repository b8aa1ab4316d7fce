"""Packaging: the faiss extras, the namespaced CLI package, and the missing-faiss message."""
from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_faiss_is_an_extra_not_a_core_dependency():
    proj = _pyproject()["project"]
    core = " ".join(proj["dependencies"])
    assert "faiss" not in core                       # faiss-cpu and faiss-gpu cannot both be installed
    extras = proj["optional-dependencies"]
    assert any(d.startswith("faiss-cpu") for d in extras["cpu"])
    assert any(d.startswith("faiss-gpu") for d in extras["gpu"])
    assert not any("faiss-cpu" in d for d in extras["gpu"])


def test_torch_range_admits_the_local_cpu_wheel_only():
    deps = _pyproject()["project"]["dependencies"]
    torch_dep = next(d for d in deps if d.startswith("torch"))
    assert "<=2.13.0" in torch_dep                  # never pulls a newer (CUDA) build


def test_cli_is_namespaced():
    cfg = _pyproject()["tool"]["setuptools"]
    assert cfg["package-dir"]["msif_index.cli"] == "cli"
    assert "cli" not in cfg["packages"]
    import msif_index.cli.main as m
    assert Path(m.__file__).resolve().parent == ROOT / "cli"


def test_missing_faiss_is_one_clear_line(tmp_path):
    (tmp_path / "faiss.py").write_text("raise ImportError('no faiss here')\n")
    code = "import msif_index.search"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.returncode != 0
    assert 'pip install "msif-index[cpu]"' in r.stderr


def test_top_level_api_and_import_without_faiss(tmp_path):
    """The issues' names live at the top level (msif_index.build_index, msif_index.InfluenceIndex,
    ...); the faiss-backed ones load on first use, so `import msif_index` (task files, exact
    influence) works without faiss and the first use says which extra to install."""
    import msif_index
    from msif_index.build import build_index
    from msif_index.index import InfluenceIndex, QueryResult
    assert msif_index.build_index is build_index and msif_index.InfluenceIndex is InfluenceIndex
    assert msif_index.QueryResult is QueryResult and callable(msif_index.exact_influence)
    from msif_index.evaluation import EvaluationConfig, evaluate
    assert msif_index.evaluate is evaluate and msif_index.EvaluationConfig is EvaluationConfig
    assert set(msif_index.__all__) <= set(dir(msif_index)) | {"build_index", "InfluenceIndex", "QueryResult"}
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        msif_index.nope
    (tmp_path / "faiss.py").write_text("raise ImportError('no faiss here')\n")
    code = "import msif_index; print(msif_index.exact_influence.__name__); msif_index.build_index"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert r.stdout.strip() == "exact_influence"
    assert r.returncode != 0 and 'pip install "msif-index[cpu]"' in r.stderr

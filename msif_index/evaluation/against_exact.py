"""Index (and baselines) against exact multi-stage influence, and a sweep over index configurations.

For Q test points every method's scores over all n pretraining examples are compared with
msif_index.exact_influence (dense Hessians, small models only) by the metrics of metrics.py.

The optional sweep builds one index per (preconditioner, projection size) with build_index and
``BuildConfig.with_(...)`` (starting from the evaluated index's config) in ``<report>/sweep/<name>/``,
attaches the task's finetuned model and scores the same test points, so a user can pick a configuration
by accuracy against its build time and size. The sweep's indexes are kept: a rerun reuses them.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..build import build_index
from ..config import BuildConfig
from ..errors import MsifError
from ..index import InfluenceIndex
from ..progress import progress
from ..task import MultiStageTask
from .metrics import aggregate, compare

SWEEP_DIR = "sweep"


def evaluate(scores: dict[str, np.ndarray], truth: np.ndarray, test_ids: Sequence[int], k: int
             ) -> dict[str, Any]:
    """Per-test and aggregate metrics of each method (scores: name -> [Q, n]) against ``truth`` [Q, n]."""
    per_test = {m: [{"test_id": int(t), **compare(s[q], truth[q], k)} for q, t in enumerate(test_ids)]
                for m, s in scores.items()}
    agg = {m: aggregate(rows) for m, rows in per_test.items()}
    return {"per_test": per_test, "aggregate": agg}


def sweep_name(preconditioner: str, proj_dim: int | None) -> str:
    return f"{preconditioner}-k{proj_dim if proj_dim else 'full'}"


def sweep(task: MultiStageTask, base: BuildConfig, out_dir: Path, test_batch: Any, test_ids: Sequence[int],
          truth: np.ndarray, k: int, proj_dims: Sequence[int | None], preconditioners: Sequence[str],
          progress_bar: bool | None = None) -> list[dict[str, Any]]:
    """One row per (preconditioner, projection size): the config, build/query seconds and mean metrics."""
    rows = []
    combos = [(p, d) for p in preconditioners for d in proj_dims]
    with progress(len(combos), "sweep", unit="index", enabled=progress_bar) as advance:
        for pre, dim in combos:
            name = sweep_name(pre, dim)
            row: dict[str, Any] = {"name": name, "preconditioner": pre, "proj_dim": dim}
            try:
                config = base.with_(preconditioner=pre, proj_dim=dim, proj_dim_per_layer=None, damping=None,
                                    factory="Flat")
                path = build_index(task, Path(out_dir) / SWEEP_DIR / name, config, overwrite=True,
                                   progress_bar=False)
                with InfluenceIndex.open(path, device="cpu") as idx:
                    row["build_s"] = float(sum(idx.manifest.get("timings", {}).values()))
                    idx.attach(task, validate=False, progress_bar=False)
                    t0 = time.perf_counter()
                    s = idx.scores(test_batch)
                    row["query_s"] = time.perf_counter() - t0
                    row["k"] = idx.k
                    row["damping_used"] = idx.manifest["preconditioner"].get("damping_used")
                    row["path"] = str(path)
                res = evaluate({"x": s}, truth, test_ids, k)["aggregate"]["x"]
                row["metrics"] = {m: v["mean"] for m, v in res.items()}
                row["error"] = None
            except MsifError as e:
                row.update({"metrics": {}, "error": f"{type(e).__name__}: {e}"})
            rows.append(row)
            advance(1)
    return rows

"""The evaluation report: a JSON document with a versioned, documented schema (docs/evaluation_schema.md).

``validate_report`` checks a report against that schema (keys present, value types) and is what the
tests use to keep the schema stable. Bump SCHEMA_VERSION when a key is renamed or removed or a type
changes; adding keys is backward compatible.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_json_atomic

SCHEMA_VERSION = 1
KIND = "msif-evaluation"
REPORT_FILE = "report.json"
AGAINST = ("exact", "retraining", "lds")
SIGN_CONVENTION = ("scores are I(z, x_t) = d l(x_t) / d eps of up-weighting pretraining example z: negative = "
                   "helpful, positive = harmful; removing z changes l(x_t) by about -I / n (n: pretraining size)")

#: top-level key -> allowed types (None allowed where listed)
TOP_LEVEL: dict[str, tuple] = {
    "schema_version": (int,),
    "kind": (str,),
    "against": (str,),
    "status": (str,),
    "created": (str,),
    "msif_version": (str,),
    "sign_convention": (str,),
    "task": (dict,),
    "index": (dict,),
    "config": (dict,),
    "methods": (dict,),
    "skipped_methods": (dict,),
    "per_test": (dict,),
    "aggregate": (dict,),
    "summary": (dict,),
    "pooled": (dict,),
    "points": (dict, list, type(None)),
    "sweep": (list,),
    "retraining": (dict, type(None)),
    "timings": (dict,),
    "figures": (dict,),
}
TASK_KEYS = {"spec": (str, type(None)), "class": (str,), "finetuning": (str,), "alpha": (float, int, type(None)),
             "n_pretrain": (int,), "n_finetune": (int,), "n_test": (int,)}
INDEX_KEYS = {"path": (str,), "n": (int,), "k": (int,), "preconditioner": (str,), "proj_dim": (int, type(None)),
              "damping_used": (float, int, dict, type(None)), "config": (dict,), "fingerprint_short": (dict,),
              "attached": (str,)}
CONFIG_KEYS = {"test_ids": (list,), "k": (int,), "methods": (list,), "seed": (int,)}
METHOD_KEYS = {"description": (str,), "units": (str,), "seconds": (float, int), "info": (dict,)}
AGG_KEYS = {"mean": (float, int, type(None)), "std": (float, int, type(None)),
            "stderr": (float, int, type(None)), "count": (int,)}
#: metrics every per-test row has, by ``against``
PER_TEST_METRICS = {
    "exact": ("spearman", "pearson", "recall_at_k_helpful", "recall_at_k_harmful", "precision_at_k_helpful",
              "precision_at_k_harmful", "scale"),
    "retraining": ("pearson", "spearman", "pearson_own", "spearman_own", "precision_at_k_helpful",
                   "precision_at_k_harmful", "recall_at_k_helpful", "recall_at_k_harmful", "scale"),
    "lds": ("spearman", "pearson"),
}
#: the metrics of the summary table printed by the CLI, by ``against``
HEADLINE = {
    "exact": ("spearman", "pearson", "recall_at_k_helpful", "recall_at_k_harmful", "precision_at_k_helpful",
              "precision_at_k_harmful"),
    "retraining": ("pearson", "spearman", "pearson_own", "spearman_own", "precision_at_k_helpful",
                   "precision_at_k_harmful"),
    "lds": ("lds", "pearson"),
}


def clean(obj: Any) -> Any:
    """JSON-ready copy: numpy scalars/arrays to Python, NaN/inf to None, tuples to lists, Paths to str."""
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def summary(aggregate: dict[str, dict]) -> dict[str, dict[str, float | None]]:
    """method -> metric -> mean (the table the CLI prints)."""
    return {m: {metric: v["mean"] for metric, v in metrics.items()} for m, metrics in aggregate.items()}


class SchemaError(ValueError):
    """A report does not match the documented schema."""


def _check(obj: dict, keys: dict[str, tuple], where: str) -> None:
    if not isinstance(obj, dict):
        raise SchemaError(f"{where} must be an object, got {type(obj).__name__}")
    for key, types in keys.items():
        if key not in obj:
            raise SchemaError(f"{where} lacks key {key!r}")
        v = obj[key]
        if isinstance(v, bool) and bool not in types:
            raise SchemaError(f"{where}.{key} is a bool, expected {[t.__name__ for t in types]}")
        if not isinstance(v, types):
            raise SchemaError(f"{where}.{key} is {type(v).__name__}, expected {[t.__name__ for t in types]}")


def validate_report(report: dict) -> None:
    """Raise SchemaError unless ``report`` follows docs/evaluation_schema.md (schema_version 1)."""
    _check(report, TOP_LEVEL, "report")
    if report["schema_version"] != SCHEMA_VERSION or report["kind"] != KIND:
        raise SchemaError(f"not a {KIND} report of schema_version {SCHEMA_VERSION}")
    if report["against"] not in AGAINST:
        raise SchemaError(f"report.against must be one of {AGAINST}, got {report['against']!r}")
    if report["status"] not in ("complete", "partial"):
        raise SchemaError(f"report.status must be complete or partial, got {report['status']!r}")
    _check(report["task"], TASK_KEYS, "report.task")
    _check(report["index"], INDEX_KEYS, "report.index")
    _check(report["config"], CONFIG_KEYS, "report.config")
    for name, info in report["methods"].items():
        _check(info, METHOD_KEYS, f"report.methods.{name}")
    if report["status"] == "partial":
        return
    metrics = PER_TEST_METRICS[report["against"]]
    test_ids = report["config"]["test_ids"]
    for name in report["methods"]:
        rows = report["per_test"].get(name)
        if not isinstance(rows, list) or len(rows) != len(test_ids):
            raise SchemaError(f"report.per_test.{name} must hold one row per test id")
        for row, t in zip(rows, test_ids):
            if row.get("test_id") != t:
                raise SchemaError(f"report.per_test.{name} rows must follow config.test_ids")
            _check(row, {m: (float, int, type(None)) for m in metrics}, f"report.per_test.{name}[{t}]")
        agg = report["aggregate"].get(name)
        if not isinstance(agg, dict):
            raise SchemaError(f"report.aggregate lacks method {name!r}")
        for m in metrics:
            if m not in agg:
                raise SchemaError(f"report.aggregate.{name} lacks metric {m!r}")
            _check(agg[m], AGG_KEYS, f"report.aggregate.{name}.{m}")
        if name not in report["summary"]:
            raise SchemaError(f"report.summary lacks method {name!r}")
        if report["against"] != "exact":
            _check(report["pooled"].get(name), {"pearson": (float, int, type(None)),
                                                "spearman": (float, int, type(None)), "count": (int,)},
                   f"report.pooled.{name}")
    if report["against"] != "exact" and report["retraining"] is None:
        raise SchemaError("report.retraining is required for retraining and lds reports")


def write_report(report: dict, out_dir: str | Path) -> Path:
    """Atomically write ``<out_dir>/report.json``; returns its path."""
    path = Path(out_dir) / REPORT_FILE
    write_json_atomic(path, clean(report))
    return path

"""PNG figures of an evaluation report (matplotlib, non-interactive Agg backend)."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import atomic_path

INFLUENCE_UNITS = ("index", "single_stage", "exact")


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    return path


def _fmt(x: Any) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


def _grid(count: int):
    cols = min(count, 3)
    rows = int(math.ceil(count / cols))
    return rows, cols


def _pairs(report: dict, method: str) -> tuple[np.ndarray, np.ndarray]:
    points = report["points"]
    if report["against"] == "retraining":
        pred = np.concatenate([np.asarray(p["predicted"][method], dtype=float) for p in points]) if points else np.zeros(0)
        act = np.concatenate([np.asarray(p["actual"], dtype=float) for p in points]) if points else np.zeros(0)
        return pred, act
    pred = np.asarray(points["predicted"][method], dtype=float)
    act = np.asarray(points["actual"], dtype=float)
    # LDS: per test point, centered over subsets (the pooled correlations are computed the same way)
    return ((pred - pred.mean(1, keepdims=True)).ravel(), (act - act.mean(1, keepdims=True)).ravel())


def scatter_predicted_actual(report: dict, path: Path) -> Path:
    """Predicted vs actual change of the test measurement, one panel per method (pooled over test points)."""
    plt = _plt()
    methods = list(report["per_test"])
    rows, cols = _grid(len(methods))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    main = "spearman" if report["against"] == "lds" else "pearson"
    for ax, m in zip(axes.ravel(), methods):
        pred, act = _pairs(report, m)
        ax.scatter(act, pred, s=9, alpha=0.6)
        if m in INFLUENCE_UNITS and act.size:
            lo, hi = float(min(act.min(), pred.min())), float(max(act.max(), pred.max()))
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        agg = report["aggregate"][m]
        pooled = report["pooled"].get(m, {})
        label = "LDS" if report["against"] == "lds" else "mean Pearson"
        ax.set_title(f"{m}\n{label} {_fmt(agg[main]['mean'])}, pooled Pearson {_fmt(pooled.get('pearson'))}",
                     fontsize=9)
        ax.set_xlabel("actual change (retrained)", fontsize=8)
        ax.set_ylabel("predicted change", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    what = ("leave-out retraining" if report["against"] == "retraining"
            else "LDS subsets, centered per test point")
    fig.suptitle(f"predicted vs actual change of the test measurement ({what})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def scatter_against_exact(report: dict, scores: dict[str, np.ndarray], truth: np.ndarray, path: Path) -> Path:
    """Each method's scores vs exact influence for the first test point."""
    plt = _plt()
    methods = list(scores)
    rows, cols = _grid(len(methods))
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    t0 = report["config"]["test_ids"][0]
    for ax, m in zip(axes.ravel(), methods):
        ax.scatter(truth[0], scores[m][0], s=7, alpha=0.6)
        if m in INFLUENCE_UNITS:
            lo, hi = float(truth[0].min()), float(truth[0].max())
            ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
        row = report["per_test"][m][0]
        ax.set_title(f"{m}: Spearman {_fmt(row['spearman'])}, Pearson {_fmt(row['pearson'])}", fontsize=9)
        ax.set_xlabel("exact influence I(z, x_t)", fontsize=8)
        ax.set_ylabel("method score", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes.ravel()[len(methods):]:
        ax.axis("off")
    fig.suptitle(f"scores vs exact influence, test point {t0}", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def metric_bars(report: dict, metrics: tuple[str, ...], path: Path) -> Path:
    """Grouped bars: mean of each metric (x) for each method (colour), standard error as error bars."""
    plt = _plt()
    methods = list(report["aggregate"])
    metrics = tuple(m for m in metrics if any(m in report["aggregate"][x] for x in methods))
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(metrics) * max(1, len(methods)) / 3, 3.8))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(metrics))
    for i, m in enumerate(methods):
        agg = report["aggregate"][m]
        vals = [agg.get(k, {}).get("mean") for k in metrics]
        errs = [agg.get(k, {}).get("stderr") for k in metrics]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, [np.nan if v is None else v for v in vals], width,
               yerr=[0 if e is None else e for e in errs], label=m, capsize=2)
    ax.set_xticks(x)
    ax.set_xticklabels(metrics, rotation=20, ha="right", fontsize=8)
    ax.axhline(0, color="k", lw=0.6)
    ax.set_ylabel("mean over test points", fontsize=8)
    ax.legend(fontsize=7, ncol=min(len(methods), 5), loc="upper center", bbox_to_anchor=(0.5, -0.28),
              frameon=False)
    ax.set_title(f"methods against {report['against']} (k={report['config']['k']}, "
                 f"{len(report['config']['test_ids'])} test point"
                 f"{'' if len(report['config']['test_ids']) == 1 else 's'})", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def sweep_plot(rows: list[dict], path: Path, metric: str = "spearman") -> Path:
    """Metric against projection size, one line per preconditioner."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 3.6))
    by_pre: dict[str, list[tuple[float, float]]] = {}
    for r in rows:
        v = r.get("metrics", {}).get(metric)
        if v is None or r.get("k") is None:
            continue
        by_pre.setdefault(r["preconditioner"], []).append((r["k"], v))
    for pre, pts in by_pre.items():
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=pre)
    ax.set_xscale("log")
    ks = sorted({p[0] for pts in by_pre.values() for p in pts})
    ax.minorticks_off()
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks], fontsize=7)
    ax.set_xlabel("projected dimension of a stored row (k)", fontsize=8)
    ax.set_ylabel(f"mean {metric} vs exact", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("index configurations against exact influence", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)

"""Agreement metrics between a method's scores and a ground truth, per test point.

Every score here is in the influence convention of MATH.md: lower = more helpful (removing the
example raises the test loss), higher = more harmful. The ground truth is exact influence
(``--against exact``) or actual retraining (``--against retraining|lds``).

    spearman, pearson         rank / linear correlation (scipy.stats); NaN when either side is constant
    recall_at_k_{helpful,harmful}
                              tie-aware overlap of the method's top-k with the truth's top-k
                              (msif_index.search.recall_at_k: an id counts when it is in the truth's
                              top-k or ties its k-th score). Both lists hold k ids, so this is also the
                              overlap precision.
    precision_at_k_{helpful,harmful}
                              sign precision: the fraction of the method's top-k helpful (harmful) ids
                              whose true score is < 0 (> 0), i.e. that really are helpful (harmful).
    scale                     least-squares slope of the method's scores regressed on the truth (with an
                              intercept), cov(s, t) / var(t): 1 for a perfectly calibrated influence estimate,
                              insensitive to a constant offset shared by all examples; only meaningful for
                              methods in units of influence.
"""
from __future__ import annotations

import math
import warnings
from typing import Iterable, Mapping, Sequence

import numpy as np
from scipy import stats

from ..search import recall_at_k
from ..warn import warn_user

DIRECTIONS = ("helpful", "harmful")


def _finite_pair(a: np.ndarray, b: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"correlation of arrays of different lengths {a.shape} and {b.shape}")
    ok = np.isfinite(a) & np.isfinite(b)
    if not ok.all():
        # e.g. a retraining that diverged: its pairs are left out, and that is said (the figures
        # computed from the rest are over fewer points than asked for)
        warn_user(f"{int((~ok).sum())} of {ok.size} score pairs are NaN or infinite and were left out of "
                  f"the {what}")
        return a[ok], b[ok]
    return a, b


def _constant(x: np.ndarray) -> bool:
    return x.size == 0 or bool(np.all(x == x[0])) or float(np.ptp(x)) <= 1e-300


def _correlation(fn, a: Sequence[float], b: Sequence[float]) -> float:
    x, y = _finite_pair(np.asarray(a), np.asarray(b), "correlation")
    if x.size < 3 or _constant(x) or _constant(y):
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(fn(x, y).statistic)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (ties get average ranks); NaN with < 3 points or a constant side."""
    return _correlation(stats.spearmanr, a, b)


def pearson(a: Sequence[float], b: Sequence[float]) -> float:
    """Pearson correlation; NaN with < 3 points or a constant side."""
    return _correlation(stats.pearsonr, a, b)


def scale(scores: Sequence[float], truth: Sequence[float]) -> float:
    """Least-squares slope of ``scores`` regressed on ``truth`` (with intercept): cov(s, t) / var(t)."""
    s, t = _finite_pair(np.asarray(scores), np.asarray(truth), "scale")
    if s.size < 2:
        return float("nan")
    tc = t - t.mean()
    denom = float(tc @ tc)
    return float((s - s.mean()) @ tc) / denom if denom > 0 else float("nan")


def top_k(scores: np.ndarray, k: int, direction: str) -> np.ndarray:
    """Ids of the k most helpful (lowest) or harmful (highest) scores, best first, ties by smaller id."""
    s = np.asarray(scores, dtype=np.float64)
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be helpful or harmful, got {direction!r}")
    key = s if direction == "helpful" else -s
    key = np.where(np.isfinite(key), key, np.inf)
    order = np.lexsort((np.arange(s.size), key))
    return order[: min(k, s.size)]


def recall_at_k_scores(scores: np.ndarray, truth: np.ndarray, k: int, direction: str) -> float:
    """Tie-aware recall@k of one test point's scores against the truth (msif_index.search.recall_at_k)."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    k = min(k, t.size)
    if k < 1:
        return float("nan")
    sign = 1.0 if direction == "helpful" else -1.0
    truth_ids = top_k(t, t.size, direction)              # the whole list: covers ties at the k-th
    truth_scores = -sign * t[truth_ids]                  # recall_at_k wants "higher is better"
    approx = top_k(s, k, direction)
    return recall_at_k(truth_scores[None, :], truth_ids[None, :], approx[None, :], k)


def sign_precision_at_k(scores: np.ndarray, truth: np.ndarray, k: int, direction: str) -> float:
    """Fraction of the method's top-k (direction) whose true score has that direction's sign."""
    s = np.asarray(scores, dtype=np.float64)
    t = np.asarray(truth, dtype=np.float64)
    ids = top_k(s, k, direction)
    if ids.size == 0:
        return float("nan")
    right = t[ids] < 0 if direction == "helpful" else t[ids] > 0
    return float(np.mean(right))


def compare(scores: np.ndarray, truth: np.ndarray, k: int) -> dict[str, float]:
    """Every metric of one test point: method ``scores`` [n] against ``truth`` [n]."""
    out = {"spearman": spearman(scores, truth), "pearson": pearson(scores, truth)}
    for d in DIRECTIONS:
        out[f"recall_at_k_{d}"] = recall_at_k_scores(scores, truth, k, d)
        out[f"precision_at_k_{d}"] = sign_precision_at_k(scores, truth, k, d)
    out["scale"] = scale(scores, truth)
    return out


def aggregate(rows: Iterable[Mapping[str, float]], skip: Sequence[str] = ("test_id",)) -> dict[str, dict]:
    """Mean, standard deviation, standard error and count (NaN ignored) of each metric over test points."""
    rows = list(rows)
    keys: list[str] = []
    for r in rows:
        for key in r:
            if key not in skip and key not in keys:
                keys.append(key)
    out: dict[str, dict] = {}
    for key in keys:
        vals = np.array([float(r[key]) for r in rows if r.get(key) is not None
                         and isinstance(r.get(key), (int, float)) and math.isfinite(float(r[key]))])
        n = int(vals.size)
        out[key] = {"mean": float(vals.mean()) if n else None,
                    "std": float(vals.std(ddof=1)) if n > 1 else None,
                    "stderr": float(vals.std(ddof=1) / math.sqrt(n)) if n > 1 else None,
                    "count": n}
    return out

"""Linear datamodeling score (LDS; Ilyas et al. 2022, Park et al. 2023 "TRAK") for multi-stage influence.

M random subsets S_1..S_M of the pretraining set, each keeping ``fraction`` of it (subset j drawn with
numpy's default_rng([seed, j]), so any subset can be regenerated alone). Both stages are retrained on each
(retraining.py, cached per subset). For a test point x_t and a method with scores tau(z, x_t):

    predicted change for S_j = - (1/n) * sum_{z not in S_j} tau(z, x_t)        (the removed examples)
                             = (1/n) * sum_{z in S_j} tau(z, x_t) - (1/n) * sum_z tau(z, x_t)
    actual change for S_j    = l(x_t; retrained on S_j) - l(x_t; reference retraining on all n)

The second line is the standard datamodel form (a sum of scores over the kept subset) up to a constant
per test point, so rank correlations are the same either way; msif reports the first form, whose values
are in units of the measurement (for methods in units of influence) and comparable with the actual change.

    LDS(method) = mean over test points of Spearman_j(predicted change, actual change)

Also reported per test point: Pearson over subsets; and pooled correlations over all (test, subset) pairs
after centering each test point's predicted and actual changes over its subsets. The centering removes
per-test offsets that no method is asked to predict: retraining on a Subset averages the loss over the
kept examples, so removing half of the set does not halve the data term as the 1/n removal of the
prediction does; that difference is the same for every subset of a test point (all have the same size).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from .metrics import aggregate, pearson, spearman
from .retraining import Job, reference_job


def subset_removed(n: int, fraction: float, seed: int, j: int) -> tuple[int, ...]:
    """The ids removed by subset j (the complement of the round(fraction * n) kept ids)."""
    keep = int(round(fraction * n))
    rng = np.random.default_rng([int(seed), int(j)])
    kept = np.zeros(n, dtype=bool)
    kept[rng.choice(n, size=keep, replace=False)] = True
    return tuple(int(i) for i in np.flatnonzero(~kept))


def subset_job(n: int, fraction: float, seed: int, j: int) -> Job:
    return Job(f"lds-f{fraction:g}-s{seed}-j{j:05d}", subset_removed(n, fraction, seed, j),
               {"subset": j, "fraction": fraction, "seed": seed})


def jobs(n: int, fraction: float, seed: int, num_subsets: int) -> list[Job]:
    """The reference retraining, then subsets 0..M-1."""
    return [reference_job()] + [subset_job(n, fraction, seed, j) for j in range(num_subsets)]


def shard_jobs(all_jobs: Sequence[Job], start: int, stop: int | None, shard: tuple[int, int] | None) -> list[Job]:
    """The jobs one process runs: subsets j with start <= j < stop and j % N == i, and the reference
    retraining unless this is shard i > 0 (shard 0 or an unsharded run retrains it once)."""
    out = [all_jobs[0]] if shard is None or shard[0] == 0 else []
    for job in all_jobs[1:]:
        j = job.meta["subset"]
        if j < start or (stop is not None and j >= stop):
            continue
        if shard is not None and j % shard[1] != shard[0]:
            continue
        out.append(job)
    return out


def centered(x: np.ndarray) -> np.ndarray:
    """Each test point's row minus its mean over subsets (removes the per-test offsets, see the module doc)."""
    x = np.asarray(x, dtype=np.float64)
    return x - x.mean(axis=1, keepdims=True)


def evaluate(scores: dict[str, np.ndarray], subset_jobs: Sequence[Job], results: dict[str, np.ndarray],
             test_ids: Sequence[int], n: int) -> dict[str, Any]:
    """LDS and friends from the cached measurements of ``subset_jobs`` (and the reference)."""
    ref = results["reference"]
    removed = np.zeros((len(subset_jobs), n), dtype=np.float64)
    for r, job in enumerate(subset_jobs):
        removed[r, list(job.removed)] = 1.0
    actual = np.stack([results[j.key] - ref for j in subset_jobs], axis=1)      # [Q, M]
    per_test: dict[str, list[dict]] = {}
    predicted: dict[str, np.ndarray] = {}
    pooled: dict[str, dict] = {}
    for m, s in scores.items():
        pred = -(s @ removed.T) / n                                               # [Q, M]
        predicted[m] = pred
        per_test[m] = [{"test_id": int(t), "spearman": spearman(pred[q], actual[q]),
                        "pearson": pearson(pred[q], actual[q])} for q, t in enumerate(test_ids)]
        pc, ac = centered(pred), centered(actual)
        pooled[m] = {"pearson": pearson(pc.ravel(), ac.ravel()), "spearman": spearman(pc.ravel(), ac.ravel()),
                     "count": int(pred.size)}
    agg = {m: aggregate(rows) for m, rows in per_test.items()}
    for m in agg:
        agg[m]["lds"] = agg[m]["spearman"]
    points = {"test_ids": [int(t) for t in test_ids], "subsets": [j.meta["subset"] for j in subset_jobs],
              "actual": actual.tolist(), "predicted": {m: p.tolist() for m, p in predicted.items()}}
    return {"per_test": per_test, "aggregate": agg, "pooled": pooled, "points": points,
            "reference": {"test_ids": [int(t) for t in test_ids], "values": ref.tolist()}}

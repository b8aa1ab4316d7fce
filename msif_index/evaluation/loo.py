"""Leave-out retraining evaluation (the paper's protocol, Chen et al. 2020, Sec. 5).

For each test point x_t and each method, its top-k helpful and top-k harmful pretraining examples are
removed (one at a time, or in groups of ``group_size`` consecutive ranks), and so are k random
examples (one seeded random set shared by all test points and methods). Pretraining and finetuning are
retrained without them (retraining.py) and the test measurement's actual change is compared with each
method's prediction:

    predicted change of removing R = - (1/n) * sum_{z in R} score(z, x_t)     (n: full pretraining size)
    actual change                  = l(x_t; retrained without R) - l(x_t; reference retraining)

Every method is scored on the *same* removals of a test point, the union of all methods' top-k lists and
the random ones ("common" metrics), and also on its own top-k plus the random ones (``*_own``).
One retraining measures every evaluated test point, so removals shared between test points or methods
are retrained once.

Per (method, test point): pearson, spearman (common pool), pearson_own, spearman_own,
precision_at_k_helpful (fraction of the method's helpful removals that actually raised the loss),
precision_at_k_harmful (... that actually lowered it), recall_at_k_{helpful,harmful} (single removals
only: tie-aware overlap of the method's top-k with the top-k by actual effect within the pool, the actual
effect of removing z expressed as an influence -n * change), scale (least-squares slope of predicted on
actual, with an intercept).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from .metrics import DIRECTIONS, aggregate, pearson, recall_at_k_scores, scale, spearman, top_k
from .retraining import Job, reference_job, removal_job

RANDOM = "random"


@dataclass
class Removal:
    """One removal set of a test point and which lists it came from ((method, direction, rank) tuples)."""

    removed: tuple[int, ...]
    sources: list[tuple[str, str, int]] = field(default_factory=list)

    @property
    def job(self) -> Job:
        return removal_job(self.removed)


@dataclass
class Plan:
    pools: list[list[Removal]]      # per test point
    random_ids: list[int]
    jobs: list[Job]                 # reference first, then every distinct removal (deterministic order)


def random_ids(n: int, k: int, seed: int) -> list[int]:
    rng = np.random.default_rng([int(seed), 0x5EED])
    return sorted(int(i) for i in rng.choice(n, size=min(k, n), replace=False))


def _chunks(ids: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(int(i) for i in ids[s:s + size]) for s in range(0, len(ids), size)]


def plan(scores: dict[str, np.ndarray], k: int, group_size: int, seed: int, n: int) -> Plan:
    """The removals of every test point (scores: method -> [Q, n]) and the distinct retraining jobs."""
    q_count = next(iter(scores.values())).shape[0]
    rand = random_ids(n, k, seed)
    pools: list[list[Removal]] = []
    for q in range(q_count):
        pool: dict[tuple[int, ...], Removal] = {}

        def add(removed: tuple[int, ...], source: tuple[str, str, int]) -> None:
            key = tuple(sorted(removed))
            pool.setdefault(key, Removal(key)).sources.append(source)

        for name, s in scores.items():
            for d in DIRECTIONS:
                for rank, chunk in enumerate(_chunks(top_k(s[q], k, d).tolist(), group_size)):
                    add(chunk, (name, d, rank))
        for rank, chunk in enumerate(_chunks(rand, group_size)):
            add(chunk, (RANDOM, RANDOM, rank))
        pools.append(sorted(pool.values(), key=lambda r: r.removed))
    distinct = sorted({r.removed for pool in pools for r in pool}, key=lambda t: (len(t), t))
    jobs = [reference_job()] + [removal_job(t) for t in distinct]
    return Plan(pools, rand, jobs)


def evaluate(scores: dict[str, np.ndarray], the_plan: Plan, results: dict[str, np.ndarray],
             test_ids: Sequence[int], k: int, n: int, group_size: int) -> dict[str, Any]:
    """Metrics from the retrained measurements (``results``: job key -> [Q] values)."""
    ref = results["reference"]
    per_test: dict[str, list[dict]] = {m: [] for m in scores}
    points: list[dict] = []
    pooled: dict[str, tuple[list, list]] = {m: ([], []) for m in scores}
    for q, pool in enumerate(the_plan.pools):
        actual = np.array([results[r.job.key][q] - ref[q] for r in pool])
        masks = [np.isin(np.arange(n), r.removed) for r in pool]
        pred = {m: np.array([-(s[q][mask].sum()) / n for mask in masks]) for m, s in scores.items()}
        point = {"test_id": int(test_ids[q]), "removed": [list(r.removed) for r in pool],
                 "sources": [[f"{a}:{b}:{c}" if a != RANDOM else f"random:{c}" for a, b, c in r.sources]
                             for r in pool],
                 "actual": actual.tolist(), "predicted": {m: v.tolist() for m, v in pred.items()}}
        points.append(point)
        for m, p in pred.items():
            own = np.array([any(src[0] in (m, RANDOM) for src in r.sources) for r in pool])
            row: dict[str, Any] = {"test_id": int(test_ids[q]), "removals": len(pool),
                                   "pearson": pearson(p, actual), "spearman": spearman(p, actual),
                                   "pearson_own": pearson(p[own], actual[own]),
                                   "spearman_own": spearman(p[own], actual[own])}
            for d in DIRECTIONS:
                mine = np.array([any(src[0] == m and src[1] == d for src in r.sources) for r in pool])
                if mine.any():
                    right = actual[mine] > 0 if d == "helpful" else actual[mine] < 0
                    row[f"precision_at_k_{d}"] = float(np.mean(right))
                else:
                    row[f"precision_at_k_{d}"] = None
            for d in DIRECTIONS:
                row[f"recall_at_k_{d}"] = None
            if group_size == 1:
                ids = np.array([r.removed[0] for r in pool])
                truth = -n * actual                      # the actual effect as an influence
                for d in DIRECTIONS:
                    row[f"recall_at_k_{d}"] = recall_at_k_scores(scores[m][q][ids], truth, min(k, len(ids)), d)
            row["scale"] = scale(p, actual)
            per_test[m].append(row)
            pooled[m][0].extend(p.tolist())
            pooled[m][1].extend(actual.tolist())
    agg = {m: aggregate(rows, skip=("test_id", "removals")) for m, rows in per_test.items()}
    pooled_out = {m: {"pearson": pearson(a, b), "spearman": spearman(a, b), "count": len(a)}
                  for m, (a, b) in pooled.items()}
    return {"per_test": per_test, "aggregate": agg, "pooled": pooled_out, "points": points,
            "reference": {"test_ids": [int(t) for t in test_ids], "values": ref.tolist()},
            "random_ids": the_plan.random_ids}

"""``evaluate``: one evaluation run (what ``msif evaluate`` calls), from config to report and figures."""
from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..data import batches, full_batch
from ..errors import ConfigError, python_api
from ..exact import exact_influence
from ..index import InfluenceIndex
from ..preconditioners import PRECONDITIONERS
from ..task import MultiStageTask, eval_mode
from ..warn import warn_user
from . import against_exact, figures, lds, loo
from .baselines import DESCRIPTIONS, METHODS, UNITS, Context, compute_methods, exact_feasible
from .report import (AGAINST, HEADLINE, KIND, SCHEMA_VERSION, SIGN_CONVENTION, clean, summary, validate_report,
                     write_report)
from .retraining import Retrainer, select_shard

#: default number of test points when none are given, by ``against``
DEFAULT_NUM_TEST = {"exact": 10, "retraining": 5, "lds": 20}
EXACT_MODES = ("auto", "on", "off")
TEST_SELECT = ("random", "highest")


@dataclass(frozen=True)
class EvaluationConfig:
    """Settings of one evaluation (``msif evaluate`` options)."""

    against: str = "exact"
    test_ids: tuple[int, ...] | None = None     # None: num_test test points chosen by test_select
    num_test: int | None = None                 # None: DEFAULT_NUM_TEST[against]
    test_select: str = "random"                  # random (seeded) | highest (largest measurement)
    k: int = 10
    methods: tuple[str, ...] | None = None      # None: every method that can run
    seed: int = 0
    exact: str = "auto"                          # exact influence as a method: auto | on | off
    # retraining
    group_size: int = 1
    finetune_init: str = "auto"                  # auto | finetuned | fresh (retraining.py)
    cache_dir: str | None = None                 # default: <out>/retraining-cache
    shard: tuple[int, int] | None = None         # (i, N): run every N-th retraining job, offset i
    # lds
    num_subsets: int = 50
    fraction: float = 0.5
    subset_start: int = 0
    subset_stop: int | None = None
    # exact
    sweep_proj_dims: tuple[int | None, ...] = ()
    sweep_preconditioners: tuple[str, ...] = ()
    figures: bool = True
    batch_size: int = 256

    @python_api
    def __post_init__(self) -> None:
        if self.against not in AGAINST:
            raise ConfigError(f"--against must be one of {', '.join(AGAINST)}, got {self.against!r}")
        if self.k < 1:
            raise ConfigError(f"--k must be >= 1, got {self.k}")
        if self.num_test is not None and self.num_test < 1:
            raise ConfigError(f"--num-test must be >= 1, got {self.num_test}")
        if self.methods is not None:
            bad = [m for m in self.methods if m not in METHODS]
            if bad:
                raise ConfigError(f"unknown method(s) {', '.join(bad)}; choose from {', '.join(METHODS)}")
            if "index" not in self.methods:
                raise ConfigError("--methods must include index (the index under evaluation)")
        if self.test_select not in TEST_SELECT:
            raise ConfigError(f"--test-select must be one of {', '.join(TEST_SELECT)}, got {self.test_select!r}")
        if self.exact not in EXACT_MODES:
            raise ConfigError(f"--exact must be auto, on or off, got {self.exact!r}")
        if self.group_size < 1:
            raise ConfigError(f"--group-size must be >= 1, got {self.group_size}")
        if self.num_subsets < 2:
            raise ConfigError(f"--num-subsets must be >= 2 (a rank correlation over subsets), got {self.num_subsets}")
        if not 0.0 < self.fraction < 1.0:
            raise ConfigError(f"--fraction must be strictly between 0 and 1, got {self.fraction}")
        if self.subset_start < 0 or (self.subset_stop is not None and self.subset_stop <= self.subset_start):
            raise ConfigError(f"need 0 <= --subset-start < --subset-stop, got {self.subset_start}, {self.subset_stop}")
        bad_pre = [p for p in self.sweep_preconditioners if p not in PRECONDITIONERS]
        if bad_pre:
            raise ConfigError(f"unknown sweep preconditioner(s) {', '.join(bad_pre)}; choose from "
                              f"{', '.join(PRECONDITIONERS)}")
        if any(d is not None and d < 1 for d in self.sweep_proj_dims):
            raise ConfigError("--sweep-proj-dims must be positive integers (0 for no projection)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvaluationResult:
    """The report (a JSON-ready dict) and the files written."""

    report: dict[str, Any]
    paths: dict[str, Path]

    @property
    def complete(self) -> bool:
        return self.report["status"] == "complete"


def choose_test_ids(task: MultiStageTask, config: EvaluationConfig) -> list[int]:
    """The evaluated test points: ``config.test_ids``, else ``num_test`` of them, seeded random or (``highest``)
    those with the largest measurement on the finetuned model (the worst predicted, where an explanation is
    most wanted and a loss is not saturated at 0)."""
    n_test = len(task.test_dataset())
    if config.test_ids is not None:
        ids = [int(i) for i in config.test_ids]
        bad = [i for i in ids if not 0 <= i < n_test]
        if bad:
            raise ConfigError(f"test ids {bad[:5]} out of range: the test set has {n_test} examples "
                              f"(ids 0..{n_test - 1})")
        if len(set(ids)) != len(ids):
            raise ConfigError("test ids must be distinct")
        return ids
    if config.num_test is not None and config.num_test > n_test:
        warn_user(f"--num-test {config.num_test} is above the test set's {n_test} examples: evaluating all {n_test}")
    q = min(config.num_test or DEFAULT_NUM_TEST[config.against], n_test)
    if config.test_select == "highest":
        model = task.finetuned_model()
        values = []
        with torch.no_grad(), eval_mode(model):
            for _, batch in batches(task.test_dataset(), config.batch_size):
                values.append(task.measurement(model, batch).detach().to(torch.float64).cpu().reshape(-1))
        m = torch.cat(values).numpy()
        order = np.lexsort((np.arange(n_test), -m))
        return sorted(int(i) for i in order[:q])
    rng = np.random.default_rng([int(config.seed), 0x7E57])
    return sorted(int(i) for i in rng.choice(n_test, size=q, replace=False))


def _methods(task: MultiStageTask, config: EvaluationConfig) -> tuple[list[str], dict[str, str]]:
    names = list(config.methods) if config.methods is not None else list(METHODS)
    skipped: dict[str, str] = {}
    if config.against == "exact":
        names = [m for m in names if m != "exact"]          # it is the ground truth here
    elif "exact" in names:
        if config.exact == "off":
            names.remove("exact")
            skipped["exact"] = "turned off (--exact off)"
        elif config.exact == "auto":
            ok, why = exact_feasible(task)
            if not ok:
                names.remove("exact")
                skipped["exact"] = "exact influence skipped: " + why
    return names, skipped


def _index_summary(index: InfluenceIndex, key: str) -> dict[str, Any]:
    m = index.manifest
    return {"path": str(index.path), "n": int(m["n"]), "k": int(m["k"]),
            "preconditioner": m["preconditioner"]["name"], "proj_dim": m["config"].get("proj_dim"),
            "damping_used": m["preconditioner"].get("damping_used"), "config": m["config"],
            "fingerprint_short": m.get("fingerprint_short", {}), "attached": key}


def _task_summary(task: MultiStageTask, spec: str | None) -> dict[str, Any]:
    return {"spec": spec, "class": type(task).__qualname__, "finetuning": task.finetuning,
            "alpha": float(task.alpha) if task.finetuning == "proximal" else None,
            "n_pretrain": len(task.pretrain_dataset()), "n_finetune": len(task.finetune_dataset()),
            "n_test": len(task.test_dataset())}


@python_api
def evaluate(task: MultiStageTask, index_path: str | Path, config: EvaluationConfig | None = None,
             out_dir: str | Path | None = None, task_spec: str | None = None,
             progress_bar: bool | None = None) -> EvaluationResult:
    """Evaluate the index at ``index_path`` for ``task`` against exact influence, leave-out retraining
    or LDS (``config.against``), with the baselines on the same test points; write ``report.json`` and
    PNG figures into ``out_dir`` (default: ``reports/<index folder name>-<against>``).

    Sign convention: every score is an influence-like I(z, x_t), negative = helpful, positive = harmful.
    """
    config = config or EvaluationConfig()
    out = Path(out_dir) if out_dir is not None else Path("reports") / f"{Path(index_path).name}-{config.against}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder; choose a folder for the report")
    if (out / "manifest.json").exists() or out.resolve() == Path(index_path).resolve():
        raise ConfigError(f"--out {out} is an index folder; write the report elsewhere (default: reports/...)")
    timings: dict[str, float] = {}
    t_start = time.perf_counter()
    index = InfluenceIndex.open(index_path, device="cpu")
    made: list[Path] = []
    try:
        made = _new_folders(out)
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        if config.k > index.n:
            raise ConfigError(f"--k {config.k} is above the index's {index.n} pretraining examples (a top k of "
                              f"every example makes recall@k 1 for any method); use a --k well below {index.n}")
        key = index.attach(task, validate=False, progress_bar=progress_bar)
        timings["attach_s"] = time.perf_counter() - t0
        test_ids = choose_test_ids(task, config)
        test_batch = full_batch(task.test_dataset(), test_ids)
        names, skipped = _methods(task, config)
        ctx = Context(task, index, key, test_ids, test_batch, out, progress_bar, config.batch_size)
        computed: dict[str, Any] = {}

        def score_all() -> dict[str, np.ndarray]:
            t0 = time.perf_counter()
            done, failed = compute_methods(ctx, names)
            skipped.update(failed)
            computed.update(done)
            timings["scores_s"] = time.perf_counter() - t0
            return {m: v.scores for m, v in done.items()}

        report: dict[str, Any] = {
            "schema_version": SCHEMA_VERSION, "kind": KIND, "against": config.against, "status": "complete",
            "created": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"), "msif_version": __version__,
            "sign_convention": SIGN_CONVENTION, "task": _task_summary(task, task_spec),
            "index": _index_summary(index, key),
            "config": {**config.to_dict(), "test_ids": test_ids, "methods": list(names), "out": str(out)},
            "methods": {}, "skipped_methods": skipped, "per_test": {}, "aggregate": {}, "summary": {},
            "pooled": {}, "points": None, "sweep": [], "retraining": None, "timings": timings, "figures": {}}
        scores: dict[str, np.ndarray] = {}
        paths: dict[str, Path] = {}
        n = index.n
        if config.against == "exact":
            ok, why = exact_feasible(task)
            if config.exact == "off" or (not ok and config.exact == "auto"):
                raise ConfigError("--against exact needs exact influence, but " + (
                    "--exact is off" if config.exact == "off" else why + ", or evaluate with --against "
                    "retraining or lds"))
            scores = score_all()
            t0 = time.perf_counter()
            truth = exact_influence(task, test_batch).numpy()
            timings["exact_s"] = time.perf_counter() - t0
            section = against_exact.evaluate(scores, truth, test_ids, config.k)
            report.update(section)
            if config.sweep_preconditioners or config.sweep_proj_dims:
                from ..config import BuildConfig
                base = BuildConfig.from_dict(index.manifest["config"])
                t0 = time.perf_counter()
                report["sweep"] = against_exact.sweep(
                    task, base, out, test_batch, test_ids, truth, config.k,
                    list(config.sweep_proj_dims) or [base.proj_dim],
                    list(config.sweep_preconditioners) or [index.manifest["preconditioner"]["name"]],
                    progress_bar)
                timings["sweep_s"] = time.perf_counter() - t0
        else:
            cache = Path(config.cache_dir) if config.cache_dir else out / "retraining-cache"
            retrainer = Retrainer(task, test_ids, cache, config.finetune_init, progress_bar, config.batch_size)
            if config.against == "retraining":
                scores = score_all()
                the_plan = loo.plan(scores, config.k, config.group_size, config.seed, n)
                all_jobs = the_plan.jobs
                mine = select_shard(all_jobs, config.shard)        # job 0, the reference, goes to shard 0
            else:
                all_jobs = lds.jobs(n, config.fraction, config.seed, config.num_subsets)
                mine = lds.shard_jobs(all_jobs, config.subset_start, config.subset_stop, config.shard)
            t0 = time.perf_counter()
            retrainer.run_all(mine, "retrain" if config.against == "retraining" else "retrain (LDS subsets)")
            timings["retrain_s"] = time.perf_counter() - t0
            results, missing = retrainer.collect(all_jobs)
            info = {**retrainer.summary(), "jobs": len(all_jobs), "jobs_this_run": len(mine),
                    "missing": len(missing)}
            report["retraining"] = info
            if config.against == "retraining":
                info["removals_per_test"] = [len(p) for p in the_plan.pools]
                complete = not missing
                if complete:
                    report.update(loo.evaluate(scores, the_plan, results, test_ids, config.k, n,
                                               config.group_size))
            else:
                used = [j for j in all_jobs[1:] if j.key in results]
                complete = not missing
                info["subsets_used"] = len(used)
                info["subsets_missing"] = [j.meta["subset"] for j in all_jobs[1:] if j.key not in results]
                if complete:
                    scores = score_all()       # only now: a shard run that cannot report skips the methods
                    report.update(lds.evaluate(scores, used, results, test_ids, n))
            if not complete:
                report["status"] = "partial"
        report["methods"] = {m: {"description": DESCRIPTIONS[m], "units": UNITS[m], "seconds": v.seconds,
                                 "info": v.info} for m, v in computed.items()}
        if computed:
            report["config"]["methods"] = list(computed)
        if report["status"] == "complete":
            report["summary"] = summary(report["aggregate"])
            if config.figures:
                t0 = time.perf_counter()
                paths.update(_figures(report, scores, truth if config.against == "exact" else None, out))
                timings["figures_s"] = time.perf_counter() - t0
        report["figures"] = {k: str(v) for k, v in paths.items()}
        timings["total_s"] = time.perf_counter() - t_start
        report = clean(report)
        validate_report(report)
        paths["report"] = write_report(report, out)
        return EvaluationResult(report, paths)
    except BaseException:
        _remove_if_empty(made)          # a bad task, test ids or method: no empty report folder left
        raise
    finally:
        index.close()


def _new_folders(out: Path) -> list[Path]:
    """The folders ``out.mkdir(parents=True)`` would create, deepest first."""
    made = []
    p = Path(os.path.abspath(out))
    while not p.exists() and p != p.parent:
        made.append(p)
        p = p.parent
    return made


def _remove_if_empty(folders: list[Path]) -> None:
    """Remove the folders this evaluation created (deepest first) that are still empty."""
    for p in folders:
        try:
            p.rmdir()
        except OSError:
            return


def _figures(report: dict, scores: dict[str, np.ndarray], truth: np.ndarray | None, out: Path) -> dict[str, Path]:
    r = clean(report)
    paths = {"metrics": figures.metric_bars(r, HEADLINE[r["against"]], out / "metrics.png")}
    if r["against"] == "exact":
        paths["scatter"] = figures.scatter_against_exact(r, scores, truth, out / "scatter.png")
        if r["sweep"]:
            paths["sweep"] = figures.sweep_plot(r["sweep"], out / "sweep.png")
    else:
        paths["scatter"] = figures.scatter_predicted_actual(r, out / "scatter.png")
    return paths

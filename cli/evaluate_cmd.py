"""`msif evaluate`: the index against exact influence, leave-out retraining or LDS, with baselines."""
from __future__ import annotations

import math
from typing import Optional

import typer

from msif_index.errors import ConfigError

from .output import NOT_A_MINIMUM, SIGN_CONVENTION, parse_ids, print_json, warnings_kept

TASK_HELP = "Task as FILE.py:NAME (NAME: a MultiStageTask instance, or a class/factory called with no arguments)."


def _int_list(text: Optional[str], what: str, zero_is_none: bool = False) -> tuple:
    if not text:
        return ()
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = int(part)
        except ValueError:
            raise ConfigError(f"{what} must be comma-separated integers, got {text!r}") from None
        out.append(None if (zero_is_none and v == 0) else v)
    return tuple(out)


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "     n/a"
    return f"{v:8.3f}"


def print_summary(report: dict) -> None:
    """The per-method table of the headline metrics (means over test points)."""
    from msif_index.evaluation.report import HEADLINE
    metrics = HEADLINE[report["against"]]
    short = {"recall_at_k_helpful": "rec@k+", "recall_at_k_harmful": "rec@k-",
             "precision_at_k_helpful": "prec@k+", "precision_at_k_harmful": "prec@k-"}
    width = max([len(m) for m in report["summary"]] + [6])
    typer.echo(f"  {'method':<{width}}  " + "  ".join(f"{short.get(m, m):>8}" for m in metrics)
               + ("  pooled-r" if report["against"] != "exact" else ""))
    for name, row in report["summary"].items():
        line = f"  {name:<{width}}  " + "  ".join(_fmt(row.get(m)) for m in metrics)
        if report["against"] != "exact":
            line += "  " + _fmt(report["pooled"].get(name, {}).get("pearson"))
        typer.echo(line)
    legend = []
    if any(m.startswith("recall_at_k") for m in metrics):           # only for the columns shown
        legend.append("rec@k+/- = tie-aware recall@k of the helpful / harmful top k")
    if any(m.startswith("precision_at_k") for m in metrics):
        legend.append("prec@k+/- = sign precision of the top k")
    if any(m.endswith("_own") for m in metrics):
        legend.append("*_own = over each method's own removals")
    if report["against"] != "exact":
        legend.append("pooled-r = Pearson over all test points' pairs together")
    if legend:
        typer.echo("  (" + "; ".join(legend) + ")")


def register(app: typer.Typer) -> None:
    """Add the `evaluate` command to the msif app."""

    @app.command("evaluate")
    def evaluate_cmd(
            index: str = typer.Option(..., help="Index folder (from msif build-index)."),
            task: str = typer.Option(..., help=TASK_HELP),
            against: str = typer.Option(..., help="exact (exact influence, small models) | retraining "
                                                  "(leave-out retraining of both stages) | lds (random "
                                                  "subsets, linear datamodeling score)."),
            test_ids: Optional[str] = typer.Option(None, help="Test example ids, e.g. 0,3,10-14 (default: "
                                                              "--num-test seeded random ones)."),
            num_test: Optional[int] = typer.Option(None, min=1, help="How many random test points when "
                                                                     "--test-ids is not given (default: "
                                                                     "exact 10, retraining 5, lds 20)."),
            test_select: str = typer.Option("random", help="How --num-test test points are chosen: random "
                                                           "(seeded) | highest (largest measurement on the "
                                                           "finetuned model, e.g. misclassified ones)."),
            k: int = typer.Option(10, min=1, help="Top-k size: recall/precision@k and, for retraining, "
                                                  "how many helpful/harmful/random examples to remove."),
            out: Optional[str] = typer.Option(None, help="Report folder (default: reports/<index name>-<against>)."),
            methods: Optional[str] = typer.Option(None, help="Comma-separated subset of index, grad_sim, "
                                                             "repr_sim, single_stage, exact (default: all)."),
            seed: int = typer.Option(0, help="Seed of the test point sample, random removals and LDS subsets."),
            exact: str = typer.Option("auto", help="Exact influence as a method: auto (small models) | on | off."),
            group_size: int = typer.Option(1, min=1, help="retraining: remove ranked examples in groups of "
                                                          "this many consecutive ranks (1: one at a time)."),
            finetune_init: str = typer.Option("auto", help="retraining/lds: warm-start finetuning from the "
                                                           "finetuned model (finetuned), from the recipe's "
                                                           "seeded init (fresh), or auto (finetuned when "
                                                           "task.finetune accepts init_model)."),
            cache: Optional[str] = typer.Option(None, help="Retraining cache folder (default: <out>/retraining-cache); "
                                                           "share it between processes of a split run."),
            shard: Optional[str] = typer.Option(None, help="i/N: retrain only every N-th job (offset i); run "
                                                           "again without --shard to write the report."),
            num_subsets: int = typer.Option(50, min=2, help="lds: number of random subsets M."),
            fraction: float = typer.Option(0.5, help="lds: fraction of the pretraining set each subset keeps."),
            subset_start: int = typer.Option(0, min=0, help="lds: retrain subsets from this one ..."),
            subset_stop: Optional[int] = typer.Option(None, help="lds: ... up to (excluding) this one."),
            sweep_proj_dims: Optional[str] = typer.Option(None, help="exact: also build and score indexes with "
                                                                     "these projection sizes (0: none), e.g. 64,256,1024."),
            sweep_preconditioners: Optional[str] = typer.Option(None, help="exact: ... and these preconditioners, "
                                                                           "e.g. identity,kfac,ekfac,hessian."),
            figures: bool = typer.Option(True, help="Write PNG figures next to the report."),
            threads: Optional[int] = typer.Option(None, min=1, help="torch CPU threads (e.g. 1 per process "
                                                                    "when running shards in parallel)."),
            progress_bar: bool = typer.Option(True, "--progress/--no-progress",
                                              help="Progress bars on a terminal; plain lines every 15 s on a "
                                                   "redirected stderr."),
            as_json: bool = typer.Option(False, "--json", help="Print a JSON summary instead of a table.")) -> None:
        """Evaluate an index: against exact influence, leave-out retraining or LDS, with baselines, on the
        same test points. Writes report.json (docs/evaluation_schema.md) and PNG figures."""
        from msif_index.evaluation import EvaluationConfig, evaluate
        from msif_index.evaluation.retraining import parse_shard
        from msif_index.task import load_task
        if threads:
            import torch
            torch.set_num_threads(threads)
        t = load_task(task)
        ids = tuple(parse_ids(test_ids, len(t.test_dataset()), "test")) if test_ids else None
        names = tuple(m.strip() for m in methods.split(",") if m.strip()) if methods else None
        pres = tuple(p.strip() for p in sweep_preconditioners.split(",") if p.strip()) if sweep_preconditioners else ()
        config = EvaluationConfig(
            against=against, test_ids=ids, num_test=num_test, test_select=test_select, k=k, methods=names,
            seed=seed, exact=exact,
            group_size=group_size, finetune_init=finetune_init, cache_dir=cache, shard=parse_shard(shard),
            num_subsets=num_subsets, fraction=fraction, subset_start=subset_start, subset_stop=subset_stop,
            sweep_proj_dims=_int_list(sweep_proj_dims, "--sweep-proj-dims", zero_is_none=True),
            sweep_preconditioners=pres, figures=figures)
        with warnings_kept() as said:
            result = evaluate(t, index, config, out, task_spec=task, progress_bar=None if progress_bar else False)
        not_min = [m for m in said if NOT_A_MINIMUM in m]
        r = result.report
        paths = {k_: str(v) for k_, v in result.paths.items()}
        if as_json:
            print_json({"status": r["status"], "against": r["against"], "report": paths["report"],
                        "figures": r["figures"], "test_ids": r["config"]["test_ids"], "summary": r["summary"],
                        "pooled": r["pooled"], "sweep": [{k_: v for k_, v in row.items() if k_ != "path"}
                                                         for row in r["sweep"]],
                        "retraining": r["retraining"], "skipped_methods": r["skipped_methods"],
                        "timings": r["timings"], "not_at_a_minimum": not_min})
            return
        typer.echo(SIGN_CONVENTION)
        head = (f"evaluation against {r['against']}: {_count(len(r['config']['test_ids']), 'test point')}, k={r['config']['k']}, "
                f"index {r['index']['path']} ({r['index']['preconditioner']}, k={r['index']['k']})")
        typer.echo(head)
        rt = r["retraining"]
        if rt:
            typer.echo(f"  retrainings: {rt['retrained']} run now, {rt['loaded_from_cache']} from the cache "
                       f"({rt['cache_dir']}); finetuning warm start: {rt['finetune_init']}")
        if r["status"] == "partial":
            typer.echo(f"  partial: {rt['missing']} of {rt['jobs']} retrainings are not cached yet; when every "
                       f"shard has finished, run the same command without --shard/--subset-* to write the report")
            typer.echo(f"report: {paths['report']}")
            return
        if r["against"] == "lds":
            typer.echo(f"  LDS over {rt['subsets_used']} subsets keeping {r['config']['fraction']:g} of the "
                       f"pretraining set (mean over test points of Spearman(predicted, actual))")
        print_summary(r)
        if not_min:
            typer.echo(f"  note: {len(not_min)} warning(s) above say a model is not at a minimum of its objective: "
                       f"influence assumes one, so these figures measure the formulas where they do not hold "
                       f"(exact influence is then their value at a saddle point); train to convergence first "
                       f"(README, 'Both stages at a minimum')")
        for name, why in r["skipped_methods"].items():
            typer.echo(f"  skipped {name}: {why}")
        if r["sweep"]:
            typer.echo("  sweep (mean Spearman / recall@k helpful vs exact, build seconds):")
            for row in r["sweep"]:
                m = row["metrics"]
                if row["error"]:
                    typer.echo(f"    {row['name']:<18} error: {row['error']}")
                else:
                    typer.echo(f"    {row['name']:<18} k={row['k']:<6} {_fmt(m.get('spearman'))} "
                               f"{_fmt(m.get('recall_at_k_helpful'))}  {row['build_s']:.1f}s")
        typer.echo(f"report: {paths['report']}")
        for name, p in r["figures"].items():
            typer.echo(f"figure ({name}): {p}")


def _count(n: int, noun: str) -> str:
    """'1 test point', '3 test points'."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"

"""`msif`: thin typer commands over msif_index's library functions.

Every user-caused error (msif_index.errors.MsifError) is printed as one line, exit status 2.
"""
from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback
import warnings
from pathlib import Path
from typing import Optional

import typer

from msif_index.config import help_text
from msif_index.errors import ConfigError, DiskFullError, MsifError, exception_text, is_interrupt

from .output import (SIGN_CONVENTION, parse_ids, print_json, print_ranking, ranking_result, test_point_info,
                     warnings_kept)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-stage influence index: which pretraining examples made a finetuned "
                       "model predict this? " + SIGN_CONVENTION)

TASK_HELP = "Task as FILE.py:NAME (NAME: a MultiStageTask instance, or a class/factory called with no arguments)."
H_TT_HELP = ("How the finetuning head's Hessian H_tt is inverted: auto (exact up to 8192 head parameters, "
             "ekfac beyond) | dense | kfac | ekfac.")
CG_HELP = "kfac / ekfac H_tt: conjugate-gradient steps with exact Hessian-vector products that refine it (default 5)."


def _preset_help(name: str) -> str:
    """A BuildConfig field's help text with its value in each preset (the option's default is the
    --preset's value)."""
    from msif_index.config import PRESETS

    def shown(v):
        if v is None:
            return {"damping": "auto", "proj_dim": "0 (none)", "proj_dim_per_layer": "unset"}.get(name, "unset")
        return str(v)
    text = help_text(name).replace("0 or None", "0")
    values = {p: shown(getattr(c, name)) for p, c in PRESETS.items()}
    if len(set(values.values())) == 1:
        return f"{text} Default: {values['default']}."
    return f"{text} Default, per --preset: " + ", ".join(f"{p} -> {v}" for p, v in values.items()) + "."


@app.command("check-task")
def check_task(task: str = typer.Option(..., help=TASK_HELP),
               stationarity: bool = typer.Option(
                   False, "--stationarity",
                   help="Also measure how far the pretrained and finetuned models are from the optima the "
                        "influence formulas assume: one pass over each dataset (about a training epoch)."),
               as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text.")) -> None:
    """Load and validate a task; print its parameter split (W, U, theta), dataset sizes, and which
    path its per-example gradients take (computed on 4 pretraining examples, as a build would);
    check that the second derivatives a build and an attach need can be taken (one Hessian-vector
    product of each stage's loss)."""
    from msif_index.gradients.probe import probe_gradients, probe_second_derivatives
    from msif_index.task import load_task, split_parameters
    t = load_task(task)
    grads = probe_gradients(t)
    probe_second_derivatives(t)
    optima = None
    if stationarity:
        from msif_index.stationarity import stationarity as measure
        optima = measure(t, progress_bar=False if as_json else None)
    pre, fin = t.pretrained_model(), t.finetuned_model()
    w, u = split_parameters(t, pre)
    _, theta = split_parameters(t, fin)
    params = dict(pre.named_parameters())
    fparams = dict(fin.named_parameters())
    info = {
        "task": task, "finetuning": t.finetuning, "alpha": t.alpha,
        "n_pretrain": len(t.pretrain_dataset()), "n_finetune": len(t.finetune_dataset()),
        "n_test": len(t.test_dataset()),
        "dim_W": sum(params[n].numel() for n in w), "dim_U": sum(params[n].numel() for n in u),
        "dim_theta": sum(fparams[n].numel() for n in theta),
        "W": w, "U": u, "theta": theta, "gradients": grads,
    }
    if optima is not None:
        info["stationarity"] = optima
    if as_json:
        print_json(info)
        return
    typer.echo(f"task {task}: OK ({t.finetuning} finetuning" +
               (f", alpha={t.alpha}" if t.finetuning == "proximal" else "") + ")")
    typer.echo(f"  pretraining n={info['n_pretrain']}  finetuning m={info['n_finetune']}  "
               f"test={info['n_test']}")
    typer.echo(f"  W     ({info['dim_W']} params): {', '.join(w)}")
    typer.echo(f"  U     ({info['dim_U']} params): {', '.join(u) or '-'}")
    typer.echo(f"  theta ({info['dim_theta']} params): {', '.join(theta)}")
    typer.echo(f"  per-example gradients: factored (Kronecker) for {', '.join(grads['kronecker']) or '-'}; "
               f"dense path for {', '.join(grads['dense']) or '-'}")
    if grads["dense_batched"] is False:
        from msif_index.autodiff import VMAP_LOOP_HINT
        typer.echo(f"  the dense path runs one example at a time (vmap cannot batch it), slower: {VMAP_LOOP_HINT}")
    if optima is not None:
        _echo_stationarity(optima, t.finetuning)


def _echo_stationarity(optima: dict, finetuning: str) -> None:
    """check-task --stationarity's lines: each stage's relative gradient, and a warning above the bar."""
    from msif_index.exact import negative_text
    from msif_index.stationarity import RELATIVE_WARN
    sampled = optima["pretraining"]["sampled"]
    typer.echo(f"  stationarity: |gradient of the objective| / RMS |gradient of one example| ({sampled} sampled; "
               f"stationary: <= {RELATIVE_WARN:g})")
    params = {"pretraining": "W, U", "finetuning": "theta" if finetuning == "frozen" else "W, theta"}
    for stage, r in optima.items():
        verdict = "stationary" if r["relative"] <= RELATIVE_WARN else "NOT stationary"
        typer.echo(f"    {stage:<11} ({params[stage]}, {r['examples']} examples): {r['relative']:.1e}  "
                   f"(|grad| {r['grad_norm']:.1e}, one example's {r['example_grad_rms']:.1e})  {verdict}")
        h = r.get("hessian") or {}
        if not h.get("checked"):
            curvature = f"not checked ({h.get('why', 'not measured')}; build-index and msif exact check it)"
        elif h.get("negative"):
            curvature = f"{negative_text(h['negative'])}: a saddle point or nonconvex region"
        else:
            curvature = "no negative eigenvalue"
        verdict = ("NOT at a minimum" if not r["at_optimum"] else "at a minimum" if h.get("checked")
                   else "stationary (the Hessian's sign not checked)")
        typer.echo(f"    {'':<11} Hessian: {curvature}  ->  {verdict}")
    for stage, r in optima.items():
        if r["relative"] > RELATIVE_WARN:
            typer.echo(f"  warning: the {stage} model is not at a minimum of its objective ({r['relative']:.1e} above "
                       f"{RELATIVE_WARN:g}): influence assumes one, so the index ranks less reliably; train that "
                       f"stage longer, in eval mode (msif evaluates the models so: batch norm statistics and "
                       f"dropout change the objective), or measure with `msif evaluate`", err=True)
        elif not r["at_optimum"]:
            typer.echo(f"  warning: the {stage} model is not at a minimum of its objective: its gradient is small but "
                       f"its Hessian has negative eigenvalues (a saddle point), and influence assumes a minimum; "
                       f"train that model on to its minimum, from another start if it stays there "
                       f"(msif_index.training.fit steps down along negative curvature on models of up to 4,000 "
                       f"parameters)", err=True)


@app.command("exact")
def exact(task: str = typer.Option(..., help=TASK_HELP),
          test_ids: str = typer.Option(..., help="Comma-separated test example ids, e.g. 3,17."),
          k: int = typer.Option(10, min=1, help="How many pretraining examples to list."),
          direction: str = typer.Option("helpful", help="helpful | harmful."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Exact multi-stage influence with dense Hessians (small models only: the ground truth)."""
    import copy

    import torch

    from msif_index.data import full_batch, move
    from msif_index.errors import ShapeError
    from msif_index.exact import exact_influence
    from msif_index.task import load_task
    t = load_task(task)
    ids = parse_ids(test_ids, len(t.test_dataset()), "test")
    _check_direction(direction)
    batch = full_batch(t.test_dataset(), ids)
    infl = exact_influence(t, batch)
    scores, order = torch.sort(infl, dim=1, descending=(direction == "harmful"))
    with torch.no_grad():                 # as exact_influence computes: a float64 CPU copy of the model
        model = copy.deepcopy(t.finetuned_model()).to(device="cpu", dtype=torch.float64).eval()
        values = t.measurement(model, move(batch, device="cpu", dtype=torch.float64)).detach()
    if values.shape != (len(ids),):
        raise ShapeError(f"measurement returned shape {tuple(values.shape)} for {len(ids)} test examples; it "
                         f"must return one value per example")
    values = values.tolist()
    result = ranking_result("exact", direction, None, ids, order[:, :k].tolist(), scores[:, :k].tolist(),
                            test_point_info(t, ids, values))
    if as_json:
        print_json(result)
    else:
        print_ranking(result, t.pretrain_dataset())


@app.command("build-index")
def build_index_cmd(
        task: str = typer.Option(..., help=TASK_HELP),
        out: str = typer.Option(None, help="Index folder (default: indexes/<task file's name>, or "
                                "indexes/<its folder's name> for a file named task.py)."),
        preset: str = typer.Option("default", help="Starting config: default | exact | fast."),
        preconditioner: Optional[str] = typer.Option(None, help=_preset_help("preconditioner")),
        proj_dim: Optional[int] = typer.Option(None, "--proj-dim", help=_preset_help("proj_dim")),
        proj_dim_per_layer: Optional[int] = typer.Option(None, help=_preset_help("proj_dim_per_layer")),
        damping: Optional[float] = typer.Option(None, help=_preset_help("damping")),
        fisher: Optional[str] = typer.Option(None, help=_preset_help("fisher")),
        dtype: Optional[str] = typer.Option(None, help=_preset_help("dtype")),
        compute_dtype: Optional[str] = typer.Option(None, help=_preset_help("compute_dtype")),
        stats_examples: Optional[int] = typer.Option(None, help=_preset_help("stats_examples")),
        hessian_examples: Optional[int] = typer.Option(None, help=_preset_help("hessian_examples")),
        batch_size: Optional[int] = typer.Option(None, help=_preset_help("batch_size")),
        shard_rows: Optional[int] = typer.Option(None, help=_preset_help("shard_rows")),
        device: Optional[str] = typer.Option(None, help=_preset_help("device")),
        factory: Optional[str] = typer.Option(None, help=_preset_help("factory")),
        seed: Optional[int] = typer.Option(None, help=_preset_help("seed")),
        overwrite: bool = typer.Option(False, help="Replace an index built with another config; with the same "
                                       "config, check every row and file and rebuild a damaged index (only its "
                                       "search structure when only that is damaged)."),
        attach: bool = typer.Option(True, help="Attach the task's finetuned model after building."),
        as_json: bool = typer.Option(False, "--json", help="Print the manifest summary as JSON.")) -> None:
    """Build (or resume) the pretraining influence index: projected, preconditioned gradients -> HDF5 + FAISS."""
    from pathlib import Path

    from msif_index.build import build_index
    from msif_index.config import PRESETS
    from msif_index.index import InfluenceIndex
    from msif_index.task import load_task
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    changes = {k: v for k, v in dict(preconditioner=preconditioner, proj_dim_per_layer=proj_dim_per_layer,
                                      damping=damping, fisher=fisher, dtype=dtype, compute_dtype=compute_dtype,
                                      stats_examples=stats_examples, hessian_examples=hessian_examples,
                                      batch_size=batch_size, shard_rows=shard_rows, device=device, factory=factory,
                                      seed=seed).items() if v is not None}
    if proj_dim is not None:
        changes["proj_dim"] = proj_dim or None
    config = PRESETS[preset].with_(**changes)
    t = load_task(task)
    out_dir = Path(out) if out else default_index_dir(task)
    manifest = out_dir / "manifest.json"
    before = manifest.stat().st_mtime_ns if manifest.is_file() else None
    old_factory, old_rows = _factory_of(manifest) if before is not None else (None, None)
    from msif_index.preconditioners import NEGATIVE_HEAD
    with warnings_kept() as said:
        path = build_index(t, out_dir, config, overwrite=overwrite)
    reused = before is not None and manifest.is_file() and manifest.stat().st_mtime_ns == before
    with warnings.catch_warnings():
        if any(NEGATIVE_HEAD in m for m in said):     # the build said it: not again at the open
            warnings.filterwarnings("ignore", message=f".*: {NEGATIVE_HEAD}", category=RuntimeWarning)
        index = InfluenceIndex.open(path, huge_pages=False)              # one process, no queries
    with index:
        key = index.attach(t, validate=False, label=task) if attach else None
        m = index.manifest
    # only the search structure rebuilt (another --factory, or a damaged faiss file, over the same rows)
    switched = (not reused and old_factory is not None and m.get("search_rebuilt_from") == old_factory
                and old_rows is not None and m.get("checksums", {}).get("rows") == old_rows)
    summary = {"index": str(path), "reused": reused, "search_rebuilt_from": old_factory if switched else None,
               "n": m["n"], "k": m["k"], "preconditioner": m["preconditioner"]["name"],
               "fisher": m["config"].get("fisher"), "factory": m["config"]["factory"],
               "damping_used": m["preconditioner"]["damping_used"], "timings": m["timings"], "attached": key}
    if as_json:
        print_json(summary)
        return
    stats = f", {m['config']['fisher']} statistics" if m["preconditioner"]["name"] in ("gauss-newton", "kfac", "ekfac") else ""
    typer.echo(f"index {path}: n={m['n']} rows of k={m['k']} ({m['preconditioner']['name']} preconditioner{stats}, "
               f"{m['config']['factory']} search)")
    if reused:
        typer.echo("  already built with this config: nothing rebuilt" + (" (every row and file checked)" if overwrite else ""))
    elif switched:
        change = (f"{old_factory} -> {m['config']['factory']}" if old_factory != m["config"]["factory"]
                  else m["config"]["factory"])
        typer.echo(f"  search index rebuilt over the same rows: {change} "
                   f"({m['timings'].get('search_rebuild_s', 0.0):.2f}s; no gradient computed)")
    elif m["timings"]:
        typer.echo("  " + "  ".join(f"{k[:-2]} {v:.2f}s" for k, v in m["timings"].items()))
    if key:
        typer.echo(f"  attached finetuned model {key} ({t.finetuning})")


def _factory_of(manifest) -> tuple[Optional[str], Optional[str]]:
    """The search factory and the rows' checksum an existing index's manifest names (None, None when
    it cannot be read)."""
    import json
    try:
        m = json.loads(manifest.read_text())
        return m["config"]["factory"], m.get("checksums", {}).get("rows")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None, None


@app.command("info")
def info_cmd(index: str = typer.Option(..., help="Index folder (from msif build-index)."),
             verify: bool = typer.Option(False, "--verify", help="Also read every row and check every checksum "
                                                                "(seconds per GB); exit 1 if something is damaged."),
             as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """What an index holds (config, sizes, timings, attached finetuned models), or how far an unfinished
    build got; reads no rows unless --verify."""
    from msif_index.info import describe
    d = describe(index, verify=verify)
    _print_info(d, as_json)
    if verify and not d["complete"] and not as_json:
        typer.echo("  --verify applies to a finished index (the resumed build checks its shards as it goes)")
    if verify and d.get("problems"):
        raise typer.Exit(1)


def _compression(d: dict) -> str:
    """How many coordinates the projection keeps of how many parameters (W and U)."""
    k_raw, params = d.get("k_raw"), d.get("num_params")
    if not d.get("proj_dim") or not isinstance(k_raw, int) or not isinstance(params, int) or params <= 0:
        return ""
    if k_raw >= params:
        return f" ({k_raw:,} coordinates for {params:,} parameters: no compression)"
    return f" ({k_raw:,} coordinates for {params:,} parameters)"


def _print_info(d: dict, as_json: bool) -> None:
    """msif info's output: JSON, or the readable lines."""
    from msif_index.lock import writer_text
    if as_json:
        print_json(d)
        return
    mb = {k: f"{v / 2**20:.1f} MB" if v >= 2**20 else f"{v / 2**10:.0f} KB" for k, v in d["bytes"].items() if v}
    if not d["complete"]:
        state = "unfinished build" if d["writer_pid"] is None else f"build running ({writer_text(d['writer_pid'])})"
        then = f"{d['resume']} to resume it" if d["writer_pid"] is None else d["resume"]
        hvps = d.get("hvps_saved")
        saved = f": {hvps[0]:,} of {hvps[1]:,} HVP rows saved" if hvps and not d["statistics_done"] else ""
        typer.echo(f"{state} in {d['index']}: {d['rows_done']} of {d['n']} rows in "
                   f"{d['shards_done']} of {d['shards_total']} shards ({d['preconditioner']} preconditioner, "
                   f"statistics {'done' if d['statistics_done'] else 'not done'}{saved}); {then}")
        return
    damping = d["damping_used"]
    if isinstance(damping, dict):
        damping = ", ".join(f"{k} {v:.3g}" if isinstance(v, (int, float)) else f"{k} -"
                            for k, v in list(damping.items())[:3]) + (" ..." if len(damping) > 3 else "")
    about = [f"rows in the {d['row_basis']} basis"]
    if damping not in (None, "", {}):
        relative = d.get("damping")
        if relative == 0:
            about.append("no damping")
        else:
            about.append((f"damping {relative:g} x the mean eigenvalue (--damping), absolute: {damping}"
                          if isinstance(relative, (int, float)) else f"damping used: {damping}"))
    if d["statistics"]:
        about.append(f"{d['statistics']} statistics")
    typer.echo(f"index {d['index']}: n={d['n']} rows of k={d['k']} ({d['dtype']})"
               + (f", msif {d['version']}" if d["version"] else ""))
    typer.echo(f"  preconditioner {d['preconditioner']} ({'; '.join(about)}), projection "
               + (f"proj_dim={d['proj_dim']}" if d["proj_dim"] else "none (exact)") + _compression(d)
               + f", seed {d['seed']}")
    neg = d.get("negative_eigenvalues")
    if neg:
        needed = neg.get("damping_needed")
        what = ("not clamped: the exact preconditioner inverts them as they are" if neg.get("clamped") is False
                else "clamped to 0")
        below = "below minus the damping" if neg.get("damping") else "negative"
        typer.echo(f"  warning: {neg['count']} of {neg['of']} eigenvalues of the projected pretraining Hessian were "
                   f"{below} (down to {neg['min']:.3g}; {what}): the pretrained model is not at "
                   f"a minimum of its loss" + (f"; a --damping above {needed:.2g} covers them"
                                               if needed and neg.get("clamped") is not False else ""))
    typer.echo(f"  search {d['factory']}; W = {', '.join(d['w_names'])}")
    typer.echo(f"  fingerprints: W {d['fingerprints'].get('W')}, U {d['fingerprints'].get('U')}, "
               f"pretraining data {d['data_fingerprint']}")
    typer.echo("  files: " + ", ".join(f"{k} {v}" for k, v in mb.items()))
    if d["timings"]:
        resumed = d.get("resumed")
        how = ""
        if resumed:                 # the timings are those of the run that finished the build
            rows = resumed.get("rows_computed")
            rows = f"{rows:,}" if isinstance(rows, int) else str(rows)      # (a hand-edited record: as it is)
            hvps = resumed.get("hvps_loaded")
            how = (f" (the run that resumed it: {rows} of {d['n']:,} rows computed, "
                   f"preconditioner {'loaded' if resumed.get('preconditioner_loaded') else 'fitted'}"
                   + (f" from {hvps:,} saved HVP rows and the rest" if isinstance(hvps, int) and hvps else "") + ")")
        typer.echo(f"  built in{how} " + ", ".join(f"{k[:-2]} {v:.2f}s" for k, v in d["timings"].items()))
    if not d["attached"]:
        typer.echo("  no finetuned model attached (msif attach, or msif query attaches it)")
    for a in d["attached"]:
        what = a.get("error") or (f"{a['finetuning']}" + (f" alpha={a['alpha']:g}" if a["alpha"] is not None
                                                           else "") + (f", H_tt {a['h_tt']}" if a["h_tt"] else ""))
        typer.echo(f"  attached {a['key']}" + (f" ({a['label']})" if a.get("label") else "") + f": {what}")
        for matrix, neg in (a.get("negative") or {}).items():
            typer.echo(f"    warning: its {matrix} has {neg['count']} of {neg['of']} negative eigenvalues: the "
                       f"finetuned model is not at a minimum of its finetuning objective")
    if d["writer_pid"] is not None:
        typer.echo(f"  a build ({writer_text(d['writer_pid'])}) is writing this folder now (e.g. an --overwrite rebuild)")
    for problem in d["problems"]:
        typer.echo(f"  problem: {problem}")
    if d.get("verified") and not d["problems"]:
        typer.echo("  verified: every row, file checksum and attached operator reads back intact")


@app.command("attach")
def attach_cmd(index: str = typer.Option(..., help="Index folder (from msif build-index)."),
               task: str = typer.Option(..., help=TASK_HELP),
               h_tt: str = typer.Option("auto", "--h-tt", help=H_TT_HELP),
               cg_iters: Optional[int] = typer.Option(None, "--cg-iters", min=0, help=CG_HELP),
               as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Attach the task's finetuned model to an index (precomputes the finetune-side operator once)."""
    from msif_index.index import InfluenceIndex
    from msif_index.task import load_task
    t = load_task(task)
    with InfluenceIndex.open(index, huge_pages=False) as idx:
        key = idx.attach(t, validate=False, h_tt=h_tt, cg_iters=cg_iters, label=task)
        info = idx.operator(key).info
    if as_json:
        print_json({"index": index, "attached": key, "finetuning": t.finetuning, "h_tt": info.get("h_tt")})
    else:
        typer.echo(f"attached finetuned model {key} ({t.finetuning}, {info.get('h_tt')} H_tt) to {index}")


@app.command("query")
def query_cmd(index: str = typer.Option(..., help="Index folder (from msif build-index)."),
              task: str = typer.Option(..., help=TASK_HELP),
              test_ids: str = typer.Option(..., help="Comma-separated test example ids, e.g. 3,17."),
              k: int = typer.Option(10, min=1, help="How many pretraining examples per test point."),
              direction: str = typer.Option("helpful", help="helpful | harmful."),
              exact_rerank: Optional[int] = typer.Option(
                  None, help="Search this many candidates and rescore them exactly (SVD<r>: its candidates)."),
              nprobe: Optional[int] = typer.Option(None, help="IVF indexes: lists to visit (recall vs speed)."),
              h_tt: str = typer.Option("auto", "--h-tt", help=H_TT_HELP),
              cg_iters: Optional[int] = typer.Option(None, "--cg-iters", min=0, help=CG_HELP),
              as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Top pretraining examples for test points of the task's finetuned model, by index search."""
    from msif_index.data import full_batch
    from msif_index.index import InfluenceIndex
    from msif_index.task import load_task
    t = load_task(task)
    ids = parse_ids(test_ids, len(t.test_dataset()), "test")
    _check_direction(direction)
    with InfluenceIndex.open(index, huge_pages=False) as idx:       # one batch of queries: not worth it
        idx.attach(t, validate=False, h_tt=h_tt, cg_iters=cg_iters, label=task)
        batch = full_batch(t.test_dataset(), ids)
        res = idx.query(batch, k=k, direction=direction, exact_rerank=exact_rerank, nprobe=nprobe, test_ids=ids)
        values = idx.measurements(batch, res.finetuned)
    res_json = res.to_dict()
    out = ranking_result("index", res.direction, res.finetuned, ids, res_json["ids"], res_json["scores"],
                         test_point_info(t, ids, values))
    if as_json:
        print_json(out)
    else:
        print_ranking(out, t.pretrain_dataset())


def _check_direction(direction: str) -> None:
    if direction not in ("helpful", "harmful"):
        raise ConfigError(f"--direction must be 'helpful' or 'harmful', got {direction!r}")


from .evaluate_cmd import register as _reg_evaluate; _reg_evaluate(app)  # noqa: E402,E702
from .demo_cmd import register as _reg_demo; _reg_demo(app)  # noqa: E402,E702


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings on the command line: one line each, without the source line Python adds."""
    typer.echo(f"warning: {message}", err=True)


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM (``kill PID``, a job scheduler's stop) ends a command as Ctrl-C does: what is being
    written is discarded, finished work (a build's shards) stays, and the rerun resumes."""
    _TERMINATED.set()
    raise KeyboardInterrupt


_TERMINATED = threading.Event()


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: run the app, turning MsifError into one line on stderr (exit 2); Ctrl-C
    exits 130 and SIGTERM 143, each with one line (saying to rerun the command where that resumes)."""
    shown = warnings.showwarning
    warnings.showwarning = _warning_line
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        rc = app(args=argv, standalone_mode=False)
    except DiskFullError as e:
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            traceback.print_exception(e)
        typer.echo(f"error: {e}", err=True)
        # HDF5 may still hold writes that failed on the full disk; the normal interpreter exit would
        # retry them while closing its files (and can crash doing so). Every finished file is already
        # fsynced and renamed, and the next run removes the temporary ones, so exit at once.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(2)
    except MsifError as e:
        if not is_interrupt(e):
            if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
                traceback.print_exception(e)      # with what caused it (the task's code, torch)
            typer.echo(f"error: {e}", err=True)
            sys.exit(2)
        rc = 130
    except KeyboardInterrupt:
        rc = 130
    except OSError as e:
        line = _os_error_line(e) or _task_error_line(e)
        if line is None:
            raise
        typer.echo(f"error: {line}", err=True)
        sys.exit(2)
    except Exception as e:  # click usage errors carry their own exit code
        click_exception, exit_, abort = _usage_exceptions()
        if isinstance(e, click_exception):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, exit_):
            sys.exit(getattr(e, "exit_code", 0))
        if isinstance(e, abort):
            sys.exit(1)
        if is_interrupt(e):
            rc = 130
        else:
            line = _task_error_line(e)
            if line is None:
                raise
            typer.echo(f"error: {line}", err=True)
            sys.exit(2)
    finally:
        warnings.showwarning = shown
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    # typer turns Ctrl-C into exit code 130 and, without standalone mode, returns it
    resume = "; rerun the same command to resume" if _resumable(argv) else ""
    if rc == 130 and _TERMINATED.is_set():
        typer.echo(f"terminated (SIGTERM){resume}", err=True)
        sys.exit(143)
    if rc == 130:
        typer.echo(f"interrupted{resume}", err=True)
    if isinstance(rc, int) and rc:
        sys.exit(rc)


#: the commands whose finished work stays on disk, so that running them again continues
_RESUMABLE = {"build-index", "evaluate", "demo"}


def default_index_dir(task_spec: str) -> Path:
    """indexes/<the task file's name without .py>, or indexes/<its folder's name> for a file named
    task.py (examples/digits/task.py:task -> indexes/digits)."""
    f = Path(task_spec.rsplit(":", 1)[0]).resolve()
    name = f.parent.name if f.stem == "task" else f.stem
    return Path("indexes") / (name or "index")


def _resumable(argv: Optional[list[str]]) -> bool:
    """Whether the command in ``argv`` (default: the process's) resumes when run again."""
    words = sys.argv[1:] if argv is None else argv
    command = next((w for w in words if not w.startswith("-")), None)
    return command in _RESUMABLE


def _os_error_line(e: OSError) -> Optional[str]:
    """One line for the file-system errors a user fixes outside msif (permissions, a read-only or
    full disk); None for the others, which keep their traceback."""
    fixes = {errno.EACCES: "check the folder's permissions", errno.EPERM: "check the folder's permissions",
             errno.EROFS: "the file system is read-only: use a writable folder",
             errno.ENOSPC: "free some space and run the same command again",
             errno.EDQUOT: "free some space (disk quota) and run the same command again"}
    if e.errno not in fixes:
        return None
    where = f"{e.filename}: " if e.filename else ""
    return f"{where}{e.strerror or e}; {fixes[e.errno]}"


#: environment variable: "1" shows the full traceback of errors raised by the task's own code, and
#: of msif's one-line errors (with what caused them)
TRACEBACK_ENV = "MSIF_TRACEBACK"


def _task_error_line(e: BaseException) -> Optional[str]:
    """One line for an exception the task's own code raised (a missing weights file, a bug in a
    loss), naming the file and line; None for msif's own errors, which keep their traceback, and
    always with MSIF_TRACEBACK=1."""
    from msif_index.task import task_code_location
    if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
        return None
    where = task_code_location(e)
    if where is None:
        return None
    return (f"the task's code raised {exception_text(e)} ({where}); fix it there, or set {TRACEBACK_ENV}=1 "
            f"for the full traceback")


def _usage_exceptions() -> tuple[tuple[type, ...], tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Exit, Abort) classes, each a tuple: typer's own (typer >= 0.2x vendors click
    as typer._click and raises its classes, even where a separate click is installed too) and
    click's, where click is importable (older typer raises those)."""
    import importlib

    found: dict[str, list[type]] = {"ClickException": [], "Exit": [typer.Exit], "Abort": [typer.Abort]}
    for name in ("typer._click.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for kind, classes in found.items():
            cls = getattr(module, kind, None)
            if isinstance(cls, type) and cls not in classes:
                classes.append(cls)
    return tuple(found["ClickException"]), tuple(found["Exit"]), tuple(found["Abort"])


if __name__ == "__main__":
    main()

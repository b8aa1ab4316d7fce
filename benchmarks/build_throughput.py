"""Build throughput of the pretraining influence index (issue "Build the pretraining influence index").

Run:  python benchmarks/build_throughput.py            (about 6 min on a 2-core CPU)
      python benchmarks/build_throughput.py --quick    (smaller n, fewer variants: a few minutes)
Prints tables and writes build_throughput.json next to this file. Not part of the test suite.

What it measures, for a 784-512-512 MLP backbone and a small CNN backbone (benchmarks/common.py:
untrained seeded weights, synthetic MNIST-shaped data with random labels, float32, batch 256,
proj_dim 4096; W = backbone, U = a Linear(.., 10) pretraining head):

(a) ``build_index`` end to end (statistics on the seeded subsample + featurize + preconditioning +
    HDF5 shard writes + linking; task construction excluded), in examples/s, for the default
    preconditioner ('auto' = ekfac here) and identity / kfac / gauss-newton, with a breakdown of
    where the time goes (wrappers around the library's functions);
(b) one batched training step on the same model and batch (zero_grad, forward, mean loss backward,
    SGD step): the practical limit. Every build is bracketed by training-step measurements (before
    and after, same process) and reported as a ratio, because the machine is shared and timings
    drift. Also a training epoch over the first 20,480 examples (the build's batch loader, fetch +
    collate, and the same step): Bergson's 0.40x, LoGra's 0.12x and TRAK's 0.0004x are ratios to an
    epoch, so build/epoch is the column to set beside them (the target stays build/step);
(c) a naive per-example loop: torch.autograd.grad per example for the full W gradient, then a dense
    Gaussian projection to k=4096 (generated in 8192-column chunks with a fixed seed as
    msif_index.projection.gaussian_chunks does). The projection matmul is timed on a few chunks
    and extrapolated linearly to all d/8192 chunks; generating P is excluded (a naive
    implementation could keep the 11 GB matrix), so the naive number is optimistic;
(d) peak RSS of a build at n = 10k and n = 100k, each in a fresh subprocess (ru_maxrss), plus the
    RSS before the build started;
(e) write-path variants of the MLP build: float16 storage, the rows written in the caller's thread
    (msif_index.store.BACKGROUND_SHARD_WRITES off; the default writes them from a background
    thread), the background thread's writes through the page cache (msif_index.store.
    USE_DIRECT_WRITES off; the default writes whole pages with O_DIRECT), and committed shards'
    pages kept in the page cache (msif_index.store.DROP_SHARD_PAGES off) instead of dropped.

torch and faiss use --threads threads (default 2). Targets (issue): build >= 0.6x (MLP) / 0.4x (CNN)
of the training step's throughput, >= 20x the naive loop, and the same peak RSS at 10k and 100k
(within ~10%).
"""
from __future__ import annotations

import argparse
import copy
import functools
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import common  # noqa: E402
from common import (TASKS, current_rss_mb, fmt_table, machine, median, peak_rss_mb, run_child,  # noqa: E402
                    save_json, setup_threads)

BATCH = 256
PROJ_DIM = 4096
PRECONDITIONERS = ("ekfac", "identity", "kfac", "gauss-newton")


# ------------------------------------------------------------------------------------------------
# instrumentation: where a build's time goes


class Timers:
    """Wall-clock seconds spent inside selected library functions during a build."""

    def __init__(self) -> None:
        self.t: dict[str, float] = {}
        self._undo: list[tuple[Any, str, Any]] = []

    def wrap(self, obj: Any, name: str, label: str) -> None:
        f = getattr(obj, name)
        timers = self.t

        @functools.wraps(f)
        def g(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                timers[label] = timers.get(label, 0.0) + time.perf_counter() - t0

        self._undo.append((obj, name, f))
        setattr(obj, name, g)

    def install(self) -> None:
        import msif_index.build as B
        import msif_index.preconditioners as P
        import msif_index.store as S
        from msif_index.gradients import capture as C
        self.wrap(C.GradientProjector, "project_batch", "gradient capture (project_batch)")
        for cls in (P.Preconditioner, P.KroneckerEigen, P.DenseInverse):
            if "apply" in cls.__dict__:
                self.wrap(cls, "apply", "preconditioner apply")
        # kfac / ekfac featurize: rows rotated in the capture (or by rotate), then stored_rows; the
        # base class's stored_rows calls the (wrapped) apply
        for name in ("stored_rows", "rotate"):
            self.wrap(P.KroneckerEigen, name, "preconditioner apply")
        for cls in (P.Preconditioner, P.KroneckerEigen):
            if "fit" in cls.__dict__:
                self.wrap(cls, "fit", "preconditioner fit (statistics)")
        self.wrap(S.RowWriter, "write", "row write (RowWriter.write, caller's thread)")
        # with the background writer (the default) this runs in its thread, beside the rest
        self.wrap(S.RowWriter, "_write_block", "pwrite + row hashes (writer thread, overlapping)")
        self.wrap(S.RowWriter, "__exit__", "shard commit (flush, fsync, rename)")
        self.wrap(B, "link_shards", "link shards (rows.h5)")
        orig = B.batches
        timers = self.t

        def batches(*a, **k):
            it = orig(*a, **k)
            while True:
                t0 = time.perf_counter()
                try:
                    item = next(it)
                except StopIteration:
                    return
                finally:
                    timers["data loading + collate"] = timers.get("data loading + collate", 0.0) + \
                        time.perf_counter() - t0
                yield item

        self._undo.append((B, "batches", orig))
        B.batches = batches

    def uninstall(self) -> None:
        for obj, name, f in reversed(self._undo):
            setattr(obj, name, f)
        self._undo.clear()


# ------------------------------------------------------------------------------------------------
# the pieces


def sgd_step(task):
    """step(batch): one SGD step (zero_grad, forward, mean loss backward, step) of a copy of the
    pretraining model."""
    import torch
    model = copy.deepcopy(task.pretrained_model())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(batch) -> None:
        opt.zero_grad(set_to_none=False)
        task.pretrain_loss(model, batch).mean().backward()
        opt.step()

    return step


def train_step(task) -> tuple[Any, Any]:
    """(step function, batch): one SGD step of the pretraining model on a fixed batch of 256."""
    step, batch = sgd_step(task), task.pretrain_dataset().batch(range(BATCH))
    return (lambda: step(batch)), batch


def train_eps(step, steps: int = 12) -> float:
    """Training-step throughput (examples/s) from the median of ``steps`` timed steps."""
    return BATCH / median(common.timeit(step, repeats=steps, warmup=1))


def train_epoch_eps(task, examples: int = 20480) -> float:
    """Throughput (examples/s) of a training epoch over the first ``examples`` pretraining examples:
    the build's batch loader (msif_index.data.batches: fetch + collate) and an SGD step per batch of
    256. The anchors' figures (Bergson 0.40x, LoGra 0.12x, TRAK 0.0004x) are ratios to an epoch."""
    from msif_index.data import batches
    step = sgd_step(task)
    ds = task.pretrain_dataset()
    ids = range(min(examples, len(ds)))

    def epoch() -> None:
        for _, batch in batches(ds, BATCH, ids):
            step(batch)

    epoch()                                        # warm-up
    t0 = time.perf_counter()
    epoch()
    return len(ids) / (time.perf_counter() - t0)


def one_build(task, out: Path, config, timers: Timers | None = None) -> dict[str, Any]:
    from msif_index.build import build_index
    shutil.rmtree(out, ignore_errors=True)
    if timers is not None:
        timers.t.clear()
        timers.install()
    try:
        t0 = time.perf_counter()
        build_index(task, out, config, progress_bar=False)
        wall = time.perf_counter() - t0
    finally:
        if timers is not None:
            timers.uninstall()
    manifest = json.loads((out / "manifest.json").read_text())
    n = manifest["n"]
    res = {"n": n, "k": manifest["k"], "preconditioner": manifest["preconditioner"]["name"],
           "dtype": manifest["config"]["dtype"], "wall_s": wall, "examples_per_s": n / wall,
           "timings": manifest["timings"]}
    if timers is not None:
        res["breakdown_s"] = dict(sorted(timers.t.items(), key=lambda kv: -kv[1]))
    shutil.rmtree(out, ignore_errors=True)
    return res


def naive_loop(task, examples: int, chunks_timed: int = 2) -> dict[str, Any]:
    """Per-example autograd.grad of the full W gradient + dense Gaussian projection to k=4096."""
    import torch
    from msif_index.projection import CHUNK_COLS, gaussian_chunks
    from msif_index.task import split_parameters
    model = copy.deepcopy(task.pretrained_model())
    model.eval()
    w, _ = split_parameters(task, model)
    params = dict(model.named_parameters())
    plist = [params[n] for n in w]
    d = sum(p.numel() for p in plist)
    ds = task.pretrain_dataset()
    g_all = torch.empty(examples, d)
    # warm-up
    x, y = ds.batch([0])
    torch.autograd.grad(task.pretrain_loss(model, (x, y))[0], plist)
    t0 = time.perf_counter()
    for i in range(examples):
        x, y = ds.batch([i])
        loss = task.pretrain_loss(model, (x, y))[0]
        grads = torch.autograd.grad(loss, plist)
        torch.cat([g.reshape(-1) for g in grads], out=g_all[i])
    t_grad = time.perf_counter() - t0
    out = torch.zeros(examples, PROJ_DIM)
    t_mm, t_gen, cols = 0.0, 0.0, 0
    gen = gaussian_chunks(PROJ_DIM, d, seed=0, dtype=torch.float32)
    for c in range(chunks_timed):
        t1 = time.perf_counter()
        start, stop, p = next(gen)
        t2 = time.perf_counter()
        out.addmm_(g_all[:, start:stop], p.t())
        t3 = time.perf_counter()
        t_gen += t2 - t1
        t_mm += t3 - t2
        cols += stop - start
    n_chunks = -(-d // CHUNK_COLS)
    t_proj = t_mm * d / cols                       # matmul cost scales with the number of columns
    t_gen_all = t_gen * d / cols
    total = t_grad + t_proj
    return {"examples": examples, "d_W": d, "k": PROJ_DIM, "chunks": n_chunks, "chunks_timed": chunks_timed,
            "grad_s_per_example": t_grad / examples, "proj_s_per_example": t_proj / examples,
            "P_generation_s_per_pass": t_gen_all,
            "examples_per_s": examples / total,
            "note": "projection matmul timed on the first chunks (8192 columns each) and extrapolated "
                    "linearly to all columns; generating P excluded (it would add P_generation_s_per_pass "
                    "per batch of examples)"}


# ------------------------------------------------------------------------------------------------
# children (one fresh process each)


def _malloc(args: dict[str, Any]) -> bool:
    """The allocator settings of a child, before anything is measured: build_index's (as a build
    leaves them; the training-step baseline then runs under the same ones), or glibc's defaults."""
    import os

    from msif_index.allocator import ENV, keep_freed_memory
    if args.get("malloc_defaults"):
        os.environ[ENV] = "0"
        return False
    return keep_freed_memory()


def child_throughput(args: dict[str, Any]) -> dict[str, Any]:
    import msif_index.store as S
    from msif_index.config import BuildConfig
    tuned = _malloc(args)
    setup_threads(args["threads"])
    model, n = args["model"], args["n"]
    task = TASKS[model](n)
    step, _ = train_step(task)
    tmp = Path(tempfile.mkdtemp(prefix=f"msif_bench_{model}_", dir=args.get("tmp")))
    timers = Timers()
    runs = []
    try:
        for rnd in range(args["rounds"]):
            for variant in args["variants"]:
                pre, dtype = variant["preconditioner"], variant.get("dtype", "float32")
                saved = S.BACKGROUND_SHARD_WRITES, S.USE_DIRECT_WRITES, S.DROP_SHARD_PAGES
                S.BACKGROUND_SHARD_WRITES = variant.get("background", saved[0])
                S.USE_DIRECT_WRITES = variant.get("direct", saved[1])
                S.DROP_SHARD_PAGES = not variant.get("keep_pages", not saved[2])
                cfg = BuildConfig(proj_dim=PROJ_DIM, batch_size=BATCH, preconditioner=pre, dtype=dtype)
                before = train_eps(step)
                try:
                    res = one_build(task, tmp / "index", cfg, timers)
                finally:
                    S.BACKGROUND_SHARD_WRITES, S.USE_DIRECT_WRITES, S.DROP_SHARD_PAGES = saved
                after = train_eps(step)
                train = 0.5 * (before + after)
                epoch = train_epoch_eps(task)
                res.update({"variant": variant["name"] + ("" if tuned else ", glibc malloc defaults"),
                            "malloc_tuned": tuned, "round": rnd, "train_examples_per_s": train,
                            "train_before": before, "train_after": after,
                            "build_over_train": res["examples_per_s"] / train,
                            "train_epoch_examples_per_s": epoch,
                            "build_over_epoch": res["examples_per_s"] / epoch})
                runs.append(res)
                print(json.dumps({"progress": f"{model} {variant['name']} round {rnd}: "
                                  f"{res['examples_per_s']:.0f} ex/s, train {train:.0f} ex/s"}), flush=True)
        naive = None
        if args.get("naive_examples"):
            naive = naive_loop(task, args["naive_examples"])
            naive["train_examples_per_s"] = train_eps(step)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"model": model, "n": n, "runs": runs, "naive": naive}


def child_rss(args: dict[str, Any]) -> dict[str, Any]:
    from msif_index.config import BuildConfig
    tuned = _malloc(args)
    setup_threads(args["threads"])
    model, n = args["model"], args["n"]
    task = TASKS[model](n)
    step, _ = train_step(task)
    train_before = train_eps(step)
    del step
    import gc
    gc.collect()
    rss_before = current_rss_mb()
    peak_before = peak_rss_mb()
    tmp = Path(tempfile.mkdtemp(prefix=f"msif_rss_{model}_", dir=args.get("tmp")))
    try:
        res = one_build(task, tmp / "index", BuildConfig(proj_dim=PROJ_DIM, batch_size=BATCH), Timers())
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    peak = peak_rss_mb()
    step, _ = train_step(task)
    train_after = train_eps(step)
    train = 0.5 * (train_before + train_after)
    res.update({"model": model, "malloc_tuned": tuned, "rss_before_mb": rss_before, "peak_before_build_mb": peak_before,
                "peak_rss_mb": peak, "train_examples_per_s": train, "train_before": train_before,
                "train_after": train_after, "build_over_train": res["examples_per_s"] / train})
    return res


def child_progress(args: dict[str, Any]) -> dict[str, Any]:
    """Cost of one progress-bar update (rich, forced on), per call."""
    import io
    import contextlib
    from msif_index.progress import progress
    calls = 2000
    with contextlib.redirect_stderr(io.StringIO()):
        with progress(calls, "bench", enabled=True) as advance:
            t0 = time.perf_counter()
            for _ in range(calls):
                advance(BATCH)
            dt = time.perf_counter() - t0
    return {"advance_s_per_call": dt / calls}


CHILDREN = {"throughput": child_throughput, "rss": child_rss, "progress": child_progress}


# ------------------------------------------------------------------------------------------------
# the report


def summarize(result: dict[str, Any]) -> str:
    lines = []
    tp_rows = []
    for tp in result["throughput"]:
        by: dict[str, list] = {}
        for r in tp["runs"]:
            by.setdefault(r["variant"], []).append(r)
        for name, rs in by.items():
            tp_rows.append({"model": tp["model"], "n": tp["n"], "variant": name, "k": rs[0]["k"],
                            "build ex/s": median([r["examples_per_s"] for r in rs]),
                            "train ex/s": median([r["train_examples_per_s"] for r in rs]),
                            "build/train": median([r["build_over_train"] for r in rs]),
                            "epoch ex/s": median([r.get("train_epoch_examples_per_s", float("nan")) for r in rs]),
                            "build/epoch": median([r.get("build_over_epoch", float("nan")) for r in rs]),
                            "stats s": median([r["timings"]["statistics_s"] for r in rs]),
                            "featurize s": median([r["timings"]["featurize_s"] for r in rs]),
                            "runs": len(rs)})
    lines.append("(a)/(b) build_index vs one training step (interleaved, same process; ratio = build/train; the target's"
                 " measure), and vs a training epoch (the build's batch loader + step; the anchors' measure):")
    lines.append(fmt_table(tp_rows, [("model", "model"), ("n", "n"), ("variant", "variant"), ("k", "k"),
                                     ("build ex/s", "build ex/s"), ("train ex/s", "train ex/s"),
                                     ("build/train", "build/train"), ("epoch ex/s", "epoch ex/s"),
                                     ("build/epoch", "build/epoch"), ("stats s", "stats s"),
                                     ("featurize s", "featurize s"), ("runs", "runs")]))
    lines.append("")
    lines.append("where the default build's time goes (share of wall time; first default run of each model, then the "
                 "largest-n RSS run; the writer thread's share overlaps the others):")
    for tp in result["throughput"]:
        r = next((r for r in tp["runs"] if r["variant"] == "default (ekfac)"), None)
        if r is None:
            continue
        parts = ", ".join(f"{k} {100 * v / r['wall_s']:.0f}%" for k, v in r["breakdown_s"].items())
        lines.append(f"  {tp['model']} n={tp['n']} ({r['wall_s']:.1f}s): {parts}")
    shown = set()
    for r in result.get("rss", []):
        if r["model"] not in shown and r["n"] == max(x["n"] for x in result["rss"] if x["model"] == r["model"]):
            shown.add(r["model"])
            parts = ", ".join(f"{k} {100 * v / r['wall_s']:.0f}%" for k, v in r["breakdown_s"].items())
            lines.append(f"  {r['model']} n={r['n']} ({r['wall_s']:.1f}s): {parts}")
    lines.append("")
    nv_rows = []
    for tp in result["throughput"]:
        nv = tp.get("naive")
        if not nv:
            continue
        default = [r for r in tp["runs"] if r["variant"] == "default (ekfac)"]
        b = median([r["examples_per_s"] for r in default]) if default else float("nan")
        nv_rows.append({"model": tp["model"], "d_W": nv["d_W"], "naive ex/s": nv["examples_per_s"],
                        "grad ms/ex": 1e3 * nv["grad_s_per_example"], "proj ms/ex": 1e3 * nv["proj_s_per_example"],
                        "build ex/s": b, "build/naive": b / nv["examples_per_s"]})
    if nv_rows:
        lines.append("(c) naive per-example loop + dense projection to k=4096 (P generation excluded):")
        lines.append(fmt_table(nv_rows, [("model", "model"), ("d_W", "d_W"), ("naive ex/s", "naive ex/s"),
                                         ("grad ms/ex", "grad ms/ex"), ("proj ms/ex", "proj ms/ex"),
                                         ("build ex/s", "build ex/s (default)"), ("build/naive", "build/naive")]))
        lines.append("")
    if result.get("rss"):
        lines.append("(d) peak RSS of a default build, fresh process per n:")
        lines.append(fmt_table(result["rss"], [("model", "model"), ("n", "n"), ("rss_before_mb", "RSS before MB"),
                                               ("peak_rss_mb", "peak RSS MB"), ("examples_per_s", "build ex/s"),
                                               ("train_examples_per_s", "train ex/s"),
                                               ("build_over_train", "build/train")]))
        lines.append("")
    if result.get("progress"):
        lines.append(f"progress bar: {1e6 * result['progress']['advance_s_per_call']:.0f} us per update "
                     f"(one update per batch of {BATCH})")
    lines.append("")
    lines += common.format_targets(result["targets"])
    return "\n".join(lines)


def targets(result: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    goal = {"mlp": 0.6, "cnn": 0.4}
    for tp in result["throughput"]:
        default = [r for r in tp["runs"] if r["variant"] == "default (ekfac)"]
        rss_n = [r for r in result.get("rss", []) if r["model"] == tp["model"]]
        big = None
        if rss_n:                                   # the median run at the largest n
            top = [r for r in rss_n if r["n"] == max(x["n"] for x in rss_n)]
            top.sort(key=lambda r: r["build_over_train"])
            big = top[len(top) // 2]
        if default:
            ratio = median([r["build_over_train"] for r in default])
            out.append({"what": f"{tp['model']}: build >= {goal[tp['model']]}x training step (n={tp['n']})",
                        "met": ratio >= goal[tp["model"]], "value": f"{ratio:.2f}x"})
        if big is not None:
            runs = sorted(r["build_over_train"] for r in rss_n if r["n"] == big["n"])
            out.append({"what": f"{tp['model']}: build >= {goal[tp['model']]}x training step (n={big['n']}, "
                                f"median of {len(runs)} fresh-process runs)",
                        "met": big["build_over_train"] >= goal[tp["model"]],
                        "value": f"{big['build_over_train']:.2f}x (runs: {', '.join(f'{x:.2f}' for x in runs)})"})
        nv = tp.get("naive")
        if nv and default:
            r = median([r["examples_per_s"] for r in default]) / nv["examples_per_s"]
            out.append({"what": f"{tp['model']}: build >= 20x the naive loop (build at n={tp['n']})",
                        "met": r >= 20, "value": f"{r:.0f}x"})
        if nv and big is not None:
            r = big["examples_per_s"] / nv["examples_per_s"]
            out.append({"what": f"{tp['model']}: build >= 20x the naive loop (build at n={big['n']})",
                        "met": r >= 20, "value": f"{r:.0f}x"})
        ns = sorted({r["n"] for r in rss_n})
        if len(ns) >= 2:
            lo = max(r["peak_rss_mb"] for r in rss_n if r["n"] == ns[0])
            hi = max(r["peak_rss_mb"] for r in rss_n if r["n"] == ns[-1])
            rel = hi / lo - 1
            out.append({"what": f"{tp['model']}: peak RSS at n={ns[-1]} within 10% of n={ns[0]} (max over runs)",
                        "met": abs(rel) <= 0.10,
                        "value": f"{lo:.0f} MB -> {hi:.0f} MB ({100 * rel:+.1f}%)"})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--quick", action="store_true", help="smaller n, default preconditioner only, no RSS at 100k")
    ap.add_argument("--threads", type=int, default=common.THREADS)
    ap.add_argument("--models", default="mlp,cnn")
    ap.add_argument("--n", type=int, default=None, help="examples per throughput build (default 20000 MLP, 8192 CNN)")
    ap.add_argument("--rounds", type=int, default=2, help="repetitions of each build variant")
    ap.add_argument("--preconditioners", default=",".join(PRECONDITIONERS))
    ap.add_argument("--no-write-variants", action="store_true")
    ap.add_argument("--rss-n", default="10000,100000", help="n values of the RSS runs ('' to skip)")
    ap.add_argument("--rss-models", default="mlp,cnn")
    ap.add_argument("--rss-repeats", type=int, default=5, help="fresh-process builds per (model, n)")
    ap.add_argument("--naive-examples", type=int, default=256)
    ap.add_argument("--tmp", default=None, help="folder for the temporary indexes (default: system temp)")
    ap.add_argument("--out", default=str(HERE / "build_throughput.json"))
    args = ap.parse_args()
    if args.child:
        spec = json.loads(args.child)
        res = CHILDREN[spec.pop("kind")](spec)
        print(json.dumps(res, default=float), flush=True)
        return

    setup_threads(args.threads)
    script = Path(__file__).resolve()
    models = [m for m in args.models.split(",") if m]
    pres = [p for p in args.preconditioners.split(",") if p]
    rss_n = [int(x) for x in args.rss_n.split(",") if x]
    if args.quick:
        pres, rss_n = pres[:1], [n for n in rss_n if n <= 10000] + [30000]
        args.rounds = 1
    result: dict[str, Any] = {"machine": machine(), "threads": args.threads, "batch_size": BATCH,
                              "proj_dim": PROJ_DIM, "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "throughput": [], "rss": []}
    t_start = time.perf_counter()
    for model in models:
        n = args.n or (20000 if model == "mlp" else 8192)
        if args.quick:
            n = min(n, 8192)
        variants = [{"name": f"default ({p})" if p == "ekfac" else p, "preconditioner": p} for p in pres]
        if model == "mlp" and not args.no_write_variants and not args.quick:
            variants += [{"name": "ekfac, float16 rows", "preconditioner": "ekfac", "dtype": "float16"},
                         {"name": "ekfac, writes in the caller's thread", "preconditioner": "ekfac",
                          "background": False},
                         {"name": "ekfac, background writes via page cache", "preconditioner": "ekfac",
                          "direct": False},
                         {"name": "ekfac, shard pages kept (old)", "preconditioner": "ekfac", "keep_pages": True}]
        rounds_variants = variants
        # gauss-newton's fit (a dense k x k eigendecomposition) is slow: one round only
        spec = {"kind": "throughput", "threads": args.threads, "model": model, "n": n, "rounds": args.rounds,
                "variants": [v for v in rounds_variants if v["preconditioner"] != "gauss-newton"],
                "naive_examples": args.naive_examples, "tmp": args.tmp}
        print(f"== throughput {model} n={n}: {', '.join(v['name'] for v in spec['variants'])}", flush=True)
        tp = run_child(script, spec, timeout=7200)
        gn = [v for v in variants if v["preconditioner"] == "gauss-newton"]
        if gn:
            print(f"== throughput {model} n={n}: gauss-newton (1 round)", flush=True)
            extra = run_child(script, {**spec, "variants": gn, "rounds": 1, "naive_examples": 0}, timeout=7200)
            tp["runs"] += extra["runs"]
        if not args.quick:
            # the same default build in a fresh process with glibc's malloc settings left alone
            print(f"== throughput {model} n={n}: default, glibc malloc defaults", flush=True)
            plain = run_child(script, {**spec, "variants": variants[:1], "naive_examples": 0,
                                       "malloc_defaults": True}, timeout=7200)
            tp["runs"] += plain["runs"]
        result["throughput"].append(tp)
    for model in [m for m in args.rss_models.split(",") if m in models]:
        for rep in range(args.rss_repeats):
            for n in rss_n:
                print(f"== peak RSS {model} n={n} (run {rep + 1}/{args.rss_repeats})", flush=True)
                result["rss"].append(run_child(script, {"kind": "rss", "threads": args.threads, "model": model,
                                                        "n": n, "tmp": args.tmp}, timeout=7200))
    result["progress"] = run_child(script, {"kind": "progress"})
    result["targets"] = targets(result)
    result["total_s"] = time.perf_counter() - t_start
    text = summarize(result)
    result["table"] = text
    print()
    print(text)
    save_json(Path(args.out), result)
    print(f"\nwrote {args.out} ({result['total_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()

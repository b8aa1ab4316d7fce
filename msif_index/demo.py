"""``msif demo``: the bundled default pipeline on real data, from a fresh machine to a picture.

run_demo() takes examples/mnist_to_digits/task.py (a small CNN pretrained on 5,000 real MNIST digits
and finetuned on scikit-learn's upsampled 8x8 digits; see that file), trains its models (or loads
them from the model cache), builds the influence index with the default BuildConfig, attaches both
finetuned models (frozen and proximal), asks which pretraining digits were most helpful and most
harmful for a handful of test digits (misclassified ones first), prints one table per test digit and
draws them into ``<out>/report.png``.

Sign convention: I(z, x_t) = d loss(x_t) / d eps of up-weighting pretraining example z;
I < 0: helpful (a proponent), I > 0: harmful (an opponent). Nothing is downloaded.
"""
from __future__ import annotations

import importlib.util
import os
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .atomic import atomic_path, write_bytes_atomic
from .build import MANIFEST, build_index, index_folder_entries
from .config import BuildConfig
from .data import full_batch
from .errors import ConfigError, OutputExistsError
from .index import InfluenceIndex
from .training import torch_threads

SIGN_CONVENTION = ("I(z, x_t) = d loss(x_t) / d eps of up-weighting pretraining example z: "
                   "negative = helpful (proponent), positive = harmful (opponent)")

#: the full demo: the task file's defaults (its ``task`` and ``proximal_task``, sharing their model cache)
FULL: dict[str, Any] = {}
#: --quick: a shrunken demo for tests and a first look (fewer digits and epochs; well under a minute)
QUICK: dict[str, Any] = dict(n_pretrain=500, n_finetune=40, n_test=60, epochs=10, proximal_iters=30)
#: alpha of the proximal finetuning: F + alpha/2 ||W - W*||^2
ALPHA = 1.0
#: the quick demo's index: a smaller projection, so it needs the Kronecker (ekfac) preconditioner
#: explicitly (``auto`` would choose the projected Hessian for so small a projection, which is slower here)
QUICK_CONFIG = BuildConfig(proj_dim=1024, preconditioner="ekfac")

_MARKER = "# msif demo index\n"
_README = _MARKER + """
Written by `msif demo` (msif_index/demo.py): an influence index over the MNIST pretraining digits
of examples/mnist_to_digits/task.py, with its frozen and proximal finetuned models attached
(operators/), and report.png, the picture of the most helpful and most harmful pretraining digits
for a few test digits. Rerunning `msif demo` reuses everything here; delete the folder to start over.
The trained model weights are cached next to this folder (in `<this folder>-models/`).
"""


def _say(msg: str, verbose: bool) -> None:
    if verbose:
        print(f"msif demo: {msg}", file=sys.stderr, flush=True)


def example_task_file() -> Path:
    """examples/mnist_to_digits/task.py of the repository msif_index was installed from (editable
    install), else of the current folder."""
    here = Path(__file__).resolve().parent
    for root in (here.parent, Path.cwd()):
        path = root / "examples" / "mnist_to_digits" / "task.py"
        if path.is_file():
            return path
    raise ConfigError("msif demo needs examples/mnist_to_digits/task.py: run it from a checkout of the "
                      "msif-index repository (pip install -e .) or from the folder that holds examples/")


def load_example_module(path: Path | None = None) -> ModuleType:
    """Import the example task file as a module (its ``MnistToDigitsTask`` builds the demo's tasks)."""
    path = path or example_task_file()
    name = "msif_demo_mnist_to_digits"
    if name in sys.modules and getattr(sys.modules[name], "__file__", None) == str(path):
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def default_cache_dir(out_dir: Path) -> Path:
    """Trained weights live next to the index folder (an index folder must hold only index files)."""
    return out_dir.parent / f"{out_dir.name}-models"


def make_tasks(quick: bool = False, cache_dir: str | Path | None = None, verbose: bool = True,
               alpha: float = ALPHA) -> tuple[Any, Any]:
    """The demo's (frozen, proximal) tasks, sharing one pretrained model through the model cache."""
    module = load_example_module()
    settings = QUICK if quick else FULL
    frozen = module.MnistToDigitsTask("frozen", cache_dir=cache_dir, verbose=verbose, **settings)
    proximal = module.MnistToDigitsTask("proximal", alpha=alpha, cache_dir=cache_dir, verbose=verbose, **settings)
    return frozen, proximal


def _prepare_out(out: Path) -> bool:
    """Whether the demo may write into ``out``: a new or empty folder, or one the demo wrote (its
    README says so). Fails at once, before any training, on a folder holding anything but index files."""
    if not out.exists():
        return True
    entries = index_folder_entries(out)
    readme = out / "README.md"
    return not entries or (readme.is_file() and readme.read_text(errors="replace").startswith(_MARKER))


def auto_threads() -> int:
    """Torch threads for the demo: torch's own setting, less the cores other processes keep busy
    (1-minute load average), at least 1. On an oversubscribed CPU, OpenMP threads that wait for each
    other make the gradient passes several times slower than one thread does."""
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    free = (os.cpu_count() or 1) - int(round(busy))
    return max(1, min(torch.get_num_threads(), free))


def run_demo(out_dir: str | Path = "indexes/demo", quick: bool = False, cache_dir: str | Path | None = None,
             k: int = 5, n_queries: int = 6, config: BuildConfig | None = None, show: bool = True,
             verbose: bool = True, progress_bar: bool | None = None, threads: int | None = None
             ) -> dict[str, Any]:
    """Train (or load), index, attach, query and draw; return a summary dict.

    Args:
        out_dir: the index folder (also gets report.png and a README.md).
        quick: the shrunken demo (QUICK settings and QUICK_CONFIG) instead of the full one.
        cache_dir: trained model weights (default: ``<out_dir>-models`` next to ``out_dir``).
        k: helpful and harmful pretraining digits shown per test digit.
        n_queries: test digits explained (misclassified by the frozen model first, then correct ones).
        config: the index's BuildConfig (default: BuildConfig(), or QUICK_CONFIG with ``quick``).
        show: print the tables on stdout. verbose: progress messages on stderr.
        threads: torch CPU threads (default: auto_threads()).

    Returns {"index", "report", "manifest", "n", "k", "preconditioner", "models", "queries", "seconds",
    "sign_convention", ...}; each query holds the test id, label, the predictions and, per finetuned
    model, the helpful and harmful ids (0 <= id < n), their MNIST labels and scores I(z, x_t).
    """
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be >= 1, got {threads}")
    n_threads = threads or auto_threads()
    with torch_threads(n_threads):
        summary = _run(Path(out_dir), quick, cache_dir, k, n_queries, config, show, verbose, progress_bar,
                       n_threads)
    return summary


def _run(out: Path, quick: bool, cache_dir: str | Path | None, k: int, n_queries: int,
         config: BuildConfig | None, show: bool, verbose: bool, progress_bar: bool | None,
         n_threads: int) -> dict[str, Any]:
    t_start = time.perf_counter()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir(out)
    if k < 1 or n_queries < 1:
        raise ConfigError(f"k and n_queries must be >= 1, got k={k}, n_queries={n_queries}")
    if not _prepare_out(out):
        raise OutputExistsError(f"{out} holds an index that msif demo did not write (no demo README.md); "
                                f"choose another --out")
    config = config or (QUICK_CONFIG if quick else BuildConfig())
    timings: dict[str, float] = {}

    _say(f"{'quick' if quick else 'full'} demo into {out} (trained models cached in {cache}; "
         f"{n_threads} torch thread{'s' if n_threads > 1 else ''})", verbose)
    frozen, proximal = make_tasks(quick, cache, verbose)
    t0 = time.perf_counter()
    frozen.pretrained_model()
    frozen.finetuned_model()
    proximal.finetuned_model()
    timings["train_s"] = time.perf_counter() - t0

    _say(f"indexing the {len(frozen.pretrain_dataset())} MNIST pretraining digits (once; reused afterwards)",
         verbose)
    t0 = time.perf_counter()
    write_bytes_atomic(out / "README.md", _README.encode())      # marks the folder as the demo's
    path = build_index(frozen, out, config, overwrite=True, progress_bar=progress_bar)
    timings["index_s"] = time.perf_counter() - t0

    with InfluenceIndex.open(path) as index:
        m = index.manifest
        _say(f"index: n={m['n']} rows of k={m['k']}, {m['preconditioner']['name']} preconditioner; "
             f"attaching the frozen and the proximal finetuned models", verbose)
        t0 = time.perf_counter()
        keys = {"frozen": index.attach(frozen, progress_bar=progress_bar),
                "proximal": index.attach(proximal, progress_bar=progress_bar)}
        timings["attach_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        xt, yt = frozen.test_dataset()[:]
        models = {"frozen": frozen.finetuned_model(), "proximal": proximal.finetuned_model()}
        with torch.no_grad():
            preds = {s: mdl(xt).argmax(1) for s, mdl in models.items()}
        test_ids = _pick_tests(yt, preds["frozen"], n_queries)
        batch = full_batch(frozen.test_dataset(), test_ids)
        pre_y = frozen.pretrain_dataset()[:][1]
        results: dict[str, dict[str, Any]] = {}
        for style, key in keys.items():
            results[style] = {d: index.query(batch, k=min(k, index.n), direction=d, finetuned=key,
                                             test_ids=test_ids)
                              for d in ("helpful", "harmful")}
        timings["query_s"] = time.perf_counter() - t0
        n, k_cols, pre_name = index.n, index.k, m["preconditioner"]["name"]

    queries = []
    for q, tid in enumerate(test_ids):
        entry: dict[str, Any] = {"test_id": tid, "label": int(yt[tid]),
                                 "pred": {s: int(preds[s][tid]) for s in keys}}
        for style in keys:
            entry[style] = {}
            for d, res in results[style].items():
                ids = [int(i) for i in res.ids[q] if i >= 0]
                entry[style][d] = {"ids": ids, "labels": [int(pre_y[i]) for i in ids],
                                   "scores": [float(s) for s in res.scores[q][: len(ids)]]}
        queries.append(entry)

    info = frozen.info()
    info.update(proximal.info())
    summary: dict[str, Any] = {
        "index": str(path), "manifest": str(path / MANIFEST), "report": str(out / "report.png"),
        "cache_dir": str(cache), "quick": quick, "threads": n_threads, "n": n, "k": k_cols, "preconditioner": pre_name,
        "models": {s: {"key": keys[s], "test_accuracy": float((preds[s] == yt).float().mean()),
                       **({"alpha": proximal.alpha} if s == "proximal" else {})} for s in keys},
        "training": info, "queries": queries, "sign_convention": SIGN_CONVENTION,
    }
    t0 = time.perf_counter()
    draw_report(summary, frozen, out / "report.png")
    timings["report_s"] = time.perf_counter() - t0
    timings["total_s"] = time.perf_counter() - t_start
    summary["seconds"] = {key: round(v, 2) for key, v in timings.items()}
    if show:
        print(format_tables(summary))
    _say(f"done in {timings['total_s']:.0f}s; report: {out / 'report.png'}", verbose)
    return summary


def _pick_tests(y: torch.Tensor, pred: torch.Tensor, n_queries: int) -> list[int]:
    """Up to half of them misclassified test digits, the rest correctly classified ones (each by id);
    misclassified first."""
    wrong = (pred != y).nonzero().flatten().tolist()
    right = (pred == y).nonzero().flatten().tolist()
    n_wrong = min(len(wrong), max(1, n_queries // 2))
    picked = wrong[:n_wrong] + right[: n_queries - n_wrong]
    picked += wrong[n_wrong: n_wrong + n_queries - len(picked)]
    return picked


def format_tables(summary: dict[str, Any]) -> str:
    """One table per test digit: rank, MNIST id, label and score of the helpful and harmful digits."""
    lines = [f"Scores: {summary['sign_convention']}.",
             f"Index: {summary['index']} (n={summary['n']} MNIST digits, k={summary['k']}, "
             f"{summary['preconditioner']} preconditioner)."]
    accs = ", ".join(f"{s} {v['test_accuracy']:.1%}" for s, v in summary["models"].items())
    lines.append(f"Finetuned test accuracy on the upsampled sklearn digits: {accs}.")
    for q in summary["queries"]:
        for style in summary["models"]:
            ok = "correct" if q["pred"][style] == q["label"] else "WRONG"
            lines.append("")
            lines.append(f"test digit {q['test_id']}: true {q['label']}, {style} model predicts "
                         f"{q['pred'][style]} ({ok})")
            lines.append(f"  {'rank':>4}  | {'helpful id':>10} {'label':>5} {'score':>10}  "
                         f"| {'harmful id':>10} {'label':>5} {'score':>10}")
            h, o = q[style]["helpful"], q[style]["harmful"]
            for r in range(max(len(h["ids"]), len(o["ids"]))):
                left = (f"{h['ids'][r]:>10} {h['labels'][r]:>5} {h['scores'][r]:>10.3e}"
                        if r < len(h["ids"]) else " " * 27)
                right = (f"{o['ids'][r]:>10} {o['labels'][r]:>5} {o['scores'][r]:>10.3e}"
                         if r < len(o["ids"]) else "")
                lines.append(f"  {r + 1:>4}  | {left}  | {right}")
    lines.append("")
    lines.append(f"report: {summary['report']}")
    return "\n".join(lines)


def draw_report(summary: dict[str, Any], task: Any, path: Path) -> None:
    """report.png: per test digit and finetuned model, the test image, then its most helpful and
    most harmful MNIST pretraining images with their scores (written atomically)."""
    from matplotlib.figure import Figure        # no pyplot: renders with Agg, never touches a GUI backend

    styles = list(summary["models"])
    queries = summary["queries"]
    k = max(max(len(q[s][d]["ids"]) for s in styles for d in ("helpful", "harmful")) for q in queries)
    rows = len(queries) * len(styles)
    cols = 3 + 2 * k                                # test image, gap, k helpful, gap, k harmful
    fig = Figure(figsize=(1.2 * cols, 1.45 * rows + 0.5))
    grid = fig.add_gridspec(rows, cols, width_ratios=[1, 0.3] + [1] * k + [0.3] + [1] * k, hspace=0.6,
                            wspace=0.1)
    pre, test = task.pretrain_dataset(), task.test_dataset()
    for qi, q in enumerate(queries):
        for si, style in enumerate(styles):
            r = qi * len(styles) + si
            ax = fig.add_subplot(grid[r, 0])
            _image(ax, test[q["test_id"]][0])
            wrong = q["pred"][style] != q["label"]
            ax.set_title(f"test {q['test_id']}\ntrue {q['label']}, {style[:4]}. pred {q['pred'][style]}",
                         fontsize=7, color="firebrick" if wrong else "black")
            for d, start, color in (("helpful", 2, "darkgreen"), ("harmful", 3 + k, "firebrick")):
                res = q[style][d]
                for j in range(k):
                    ax = fig.add_subplot(grid[r, start + j])
                    if j >= len(res["ids"]):
                        ax.axis("off")
                        continue
                    i = res["ids"][j]
                    _image(ax, pre[i][0])
                    ax.set_title(f"#{i} ({res['labels'][j]})\nI={res['scores'][j]:.2g}", fontsize=6.5, color=color)
    fig.subplots_adjust(left=0.01, right=0.995, top=1 - 0.55 / (1.45 * rows + 0.5), bottom=0.01)
    for label, first, color in (("most helpful pretraining digits (I < 0)", 2, "darkgreen"),
                                ("most harmful pretraining digits (I > 0)", 3 + k, "firebrick")):
        left = grid[0, first].get_position(fig).x0
        right = grid[0, first + k - 1].get_position(fig).x1
        fig.text(0.5 * (left + right), 0.998, label, ha="center", va="top", fontsize=10, color=color)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            fig.savefig(f, format="png", dpi=110)


def _image(ax: Any, x: torch.Tensor) -> None:
    ax.imshow(np.asarray(x.detach().float().reshape(28, 28)), cmap="gray_r", vmin=0.0, vmax=1.0)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_linewidth(0.5)

"""`msif demo`: the bundled default pipeline on real data, from a fresh machine to a picture."""
from __future__ import annotations

from typing import Optional

import typer

from .output import print_json


def register(app: typer.Typer) -> None:
    """Add the `demo` command to the app."""

    @app.command("demo")
    def demo(out: Optional[str] = typer.Option(None, help="Index folder; report.png is written into it "
                                                          "(default indexes/demo, or indexes/demo-quick with "
                                                          "--quick). Trained models are cached in <out>-models/."),
             quick: bool = typer.Option(False, "--quick", help="A shrunken demo (500 MNIST digits, fewer "
                                                               "epochs, a smaller projection): well under a "
                                                               "minute."),
             k: int = typer.Option(5, min=1, help="Helpful and harmful pretraining digits per test digit."),
             n_queries: int = typer.Option(6, "--queries", min=1,
                                           help="Test digits to explain (misclassified ones first)."),
             threads: Optional[int] = typer.Option(None, min=1, help="Torch CPU threads (default: the cores "
                                                                     "not busy with other processes)."),
             as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of tables."),
             ) -> None:
        """Pretrain a small CNN on 5,000 real MNIST digits, finetune it on scikit-learn's digits (frozen
        and proximal), index the pretraining set, and show which MNIST digits helped and hurt a few test
        digits: tables here, pictures in <out>/report.png. Nothing is downloaded; the first run trains
        (0.5-1.5 minutes on a 2-core CPU), later runs reuse the cached models and index."""
        from msif_index.demo import run_demo
        out = out or ("indexes/demo-quick" if quick else "indexes/demo")   # the two never rebuild each other
        summary = run_demo(out, quick=quick, k=k, n_queries=n_queries, show=not as_json, threads=threads)
        if as_json:
            print_json(summary)

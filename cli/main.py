"""`msif`: thin typer commands over msif_index's library functions.

Every user-caused error (msif_index.errors.MsifError) is printed as one line, exit status 2.
"""
from __future__ import annotations

import json
import sys
from typing import Any, Callable, Optional

import typer

from msif_index.errors import ConfigError, MsifError

from .output import SIGN_CONVENTION, parse_ids, print_json, print_ranking

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Multi-stage influence index: which pretraining examples made a finetuned "
                       "model predict this? " + SIGN_CONVENTION)

TASK_HELP = "Task as FILE.py:NAME (NAME: a MultiStageTask instance, or a class/factory called with no arguments)."


@app.command("check-task")
def check_task(task: str = typer.Option(..., help=TASK_HELP),
               as_json: bool = typer.Option(False, "--json", help="Print JSON instead of text.")) -> None:
    """Load and validate a task; print its parameter split (W, U, theta) and dataset sizes."""
    from msif_index.task import load_task, split_parameters
    t = load_task(task)
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
        "W": w, "U": u, "theta": theta,
    }
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


@app.command("exact")
def exact(task: str = typer.Option(..., help=TASK_HELP),
          test_ids: str = typer.Option(..., help="Comma-separated test example ids, e.g. 3,17."),
          k: int = typer.Option(10, min=1, help="How many pretraining examples to list."),
          direction: str = typer.Option("helpful", help="helpful | harmful."),
          as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table.")) -> None:
    """Exact multi-stage influence with dense Hessians (small models only: the ground truth)."""
    import torch

    from msif_index.data import full_batch
    from msif_index.exact import exact_influence
    from msif_index.task import load_task
    t = load_task(task)
    ids = parse_ids(test_ids, len(t.test_dataset()), "test")
    _check_direction(direction)
    infl = exact_influence(t, full_batch(t.test_dataset(), ids))
    scores, order = torch.sort(infl, dim=1, descending=(direction == "harmful"))
    result = {"method": "exact", "direction": direction, "test_ids": ids,
              "ids": order[:, :k].tolist(), "scores": scores[:, :k].tolist()}
    if as_json:
        print_json(result)
    else:
        print_ranking(result, t.pretrain_dataset())


def _check_direction(direction: str) -> None:
    if direction not in ("helpful", "harmful"):
        raise ConfigError(f"--direction must be 'helpful' or 'harmful', got {direction!r}")


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: run the app, turning MsifError into one line on stderr (exit 2)."""
    try:
        app(args=argv, standalone_mode=False)
    except MsifError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    except Exception as e:  # click usage errors carry their own exit code
        import click
        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit):
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()

"""Progress bars (rich) with items/s and ETA on a terminal; plain lines when stderr is not one.

Without a terminal (a log file, nohup, CI, a notebook) a long phase prints one line to stderr at most
every ``PLAIN_EVERY_S`` seconds, then a last one when it ends; a phase shorter than that prints
nothing. ``enabled=False`` is silent either way.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn,
                           TimeElapsedColumn, TimeRemainingColumn)

#: without a terminal, a progress line at most this often (seconds)
PLAIN_EVERY_S = 15.0


@contextlib.contextmanager
def progress(total: int, description: str, unit: str = "ex", enabled: bool | None = None, initial: int = 0
             ) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n)``. ``enabled=None``: a bar when stderr is a terminal, plain lines otherwise;
    ``True``: a bar; ``False``: nothing. ``initial``: items done before (a resumed run's), counted
    in the total done but not in the rate."""
    if enabled is not None and not enabled:         # False, or a falsy stand-in (0, numpy's False_)
        yield lambda n: None
        return
    if enabled is None and not sys.stderr.isatty():
        with _plain(total, description, unit, initial) as advance:
            yield advance
        return
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TaskProgressColumn(),
               TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"),
               TimeRemainingColumn())
    # on stderr, like the plain lines: stdout carries results (`msif query --json > file`)
    with Progress(*columns, transient=False, console=Console(stderr=True)) as bar:
        task = bar.add_task(description, total=total, rate="", completed=initial)

        def advance(n: int) -> None:
            bar.advance(task, n)
            speed = bar.tasks[0].speed
            if speed:
                bar.update(task, rate=f"{speed:,.0f} {unit}/s")

        yield advance


@contextlib.contextmanager
def _plain(total: int, description: str, unit: str, initial: int = 0) -> Iterator[Callable[[int], None]]:
    start = time.monotonic()
    state = {"done": initial, "last": start, "printed": False, "shown": -1}

    def line(now: float) -> None:
        done, elapsed = state["done"], now - start
        rate = (done - initial) / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * done / total:.0f}%)" if total else ""
        eta = f", ETA {(total - done) / rate:,.0f} s" if rate > 0 and total >= done else ""
        print(f"{description}: {done:,}/{total:,} {unit}{share}, {rate:,.0f} {unit}/s, {elapsed:,.0f} s{eta}",
              file=sys.stderr, flush=True)
        state["last"], state["printed"], state["shown"] = now, True, done

    def advance(n: int) -> None:
        state["done"] += n
        now = time.monotonic()
        if now - state["last"] >= PLAIN_EVERY_S:
            line(now)

    yield advance
    if state["printed"] and state["shown"] != state["done"]:      # the last line, unless just shown
        line(time.monotonic())

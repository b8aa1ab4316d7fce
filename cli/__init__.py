"""The `msif` command line (installed as msif_index.cli): thin typer commands over library functions."""
from __future__ import annotations


def run() -> None:
    """The `msif` console entry point. While it loads the command line (torch and typer: about a
    second) Ctrl-C and SIGTERM are held, not raised: a KeyboardInterrupt raised inside torch's C++
    module initialization aborted the process (``terminate called after throwing an instance of
    'pybind11::error_already_set'``) or printed a long traceback. Once loaded, a held signal ends
    the command with one line (exit 130 or 143), as ``main.main`` does for one that lands later.
    A signal the process ignores (SIGINT in a job a script started with ``&``) stays ignored."""
    import signal
    import sys
    held: list[int] = []
    previous = {}
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not signal.SIG_IGN:
            previous[s] = signal.signal(s, lambda signum, frame: held.append(signum))
    try:
        from .main import main
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)    # None: set outside Python
    if held:
        terminated = signal.SIGTERM in held
        sys.stderr.write("terminated (SIGTERM)\n" if terminated else "interrupted\n")
        raise SystemExit(143 if terminated else 130)
    main()

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
    try:
        main()
    except SystemExit as e:
        _exit_now(e.code)
    _exit_now(0)


def _exit_now(code: object) -> None:
    """End a finished command at once: Ctrl-C and SIGTERM ignored from here on, the atexit handlers
    run, stdout and stderr flushed, then ``os._exit``. Skips the interpreter's own teardown (module
    and C++ destructors: about a second with torch and faiss loaded on a 2-core machine, 0.4 s for
    torch alone), which made every command a second slower and left a window in which a Ctrl-C
    after the work was done (and said so) ended the process with exit 130 and no message. Every
    file msif writes is closed (and fsynced where it matters) before its command returns."""
    import atexit
    import os
    import signal
    import sys
    import threading
    try:
        # as Python's own exit: threading's shutdown hooks (an executor's idle workers are woken by
        # one), then the non-daemon threads joined
        shutdown = getattr(threading, "_shutdown", None)
        if shutdown is not None:
            shutdown()
        else:                               # pragma: no cover - every CPython 3.x has it
            for t in threading.enumerate():
                if t is not threading.current_thread() and not t.daemon:
                    t.join()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        code = 130
    for s in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(s) is not signal.SIG_IGN:
            signal.signal(s, signal.SIG_IGN)
    atexit._run_exitfuncs()
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:                                   # SystemExit("message"): as Python ends it
        try:
            sys.stderr.write(f"{code}\n")
        except (OSError, ValueError):
            pass
        status = 1
    _flush_everything(sys.stdout, sys.stderr)
    os._exit(status)


def _flush_everything(*first: object) -> None:
    """Flush what a normal exit would: ``first`` (stdout, stderr), every Python file object still
    open for writing (a log file the task's code left open), and C's stdio buffers (an extension's
    printf into a pipe). Errors are ignored: a closed pipe (`msif query ... | head`)."""
    import gc
    import io
    streams = list(first)
    try:
        # type(), not isinstance: isinstance reads __class__, which some lazy objects answer with a
        # warning (torch.distributed.reduce_op's FutureWarning, printed at the end of every command)
        streams += [o for o in gc.get_objects() if issubclass(type(o), io.IOBase) and o not in streams]
    except Exception:  # noqa: BLE001 - best effort
        pass
    for stream in streams:
        try:
            if not stream.closed and stream.writable():
                stream.flush()
        except Exception:  # noqa: BLE001 - a closed pipe, a detached or half-built stream
            pass
    try:
        import ctypes
        ctypes.CDLL(None).fflush(None)
    except Exception:  # noqa: BLE001 - no C library to ask (not Linux / macOS)
        pass

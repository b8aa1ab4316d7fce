"""Warnings that point at the user's code: the first frame outside msif_index."""
from __future__ import annotations

import contextlib
import importlib
import os
import sys
import threading
import warnings

#: this package's folder: frames there are skipped when a warning looks for the caller, except the
#: command line's (installed as msif_index.cli; a checkout keeps it in cli/, outside the package)
_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep
_CLI = _PACKAGE + "cli" + os.sep


def outside_package() -> int:
    """The warnings stacklevel, for the function that calls this, of the first frame outside msif_index
    (and contextlib, whose decorators wrap some of its functions)."""
    frame, level = sys._getframe(1), 1
    while frame is not None and ((frame.f_code.co_filename.startswith(_PACKAGE)
                                  and not frame.f_code.co_filename.startswith(_CLI))
                                 or frame.f_code.co_filename == contextlib.__file__):
        frame, level = frame.f_back, level + 1
    return level


def warn_user(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn`` at the first caller outside msif_index (the user's line; the CLI's in a
    ``msif`` command), however deep inside the package the warning arises."""
    warnings.warn(message, category, stacklevel=outside_package())


_JVP_DECOMPOSITIONS = False
_JVP_LOCK = threading.Lock()


def load_jvp_decompositions() -> None:
    """Import torch's forward-mode decompositions (``torch._decomp.decompositions_for_jvp``) once, with
    the ``torch.jit.script`` DeprecationWarnings it raises on torch 2.13 silenced: torch loads it at
    the first forward-mode derivative (every second-order path of msif), and its ~18 warnings come
    from torch's own code, not the user's. Called lazily: the import takes about 0.2 s."""
    global _JVP_DECOMPOSITIONS
    if _JVP_DECOMPOSITIONS:
        return
    with _JVP_LOCK:          # catch_warnings changes the process's filters: one thread at a time
        if _JVP_DECOMPOSITIONS:
            return
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated",
                                    category=DeprecationWarning)
            try:
                importlib.import_module("torch._decomp.decompositions_for_jvp")
            except ImportError:              # another torch layout: its warnings, if any, are shown
                pass
        _JVP_DECOMPOSITIONS = True

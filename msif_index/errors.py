"""Errors users can cause. Each kind is one exception type; the CLI prints its message as one line.

Every message says what is wrong and what to do about it.
"""
from __future__ import annotations

import difflib
import functools
import re
from contextlib import contextmanager
from typing import Any, Callable, Iterator, TypeVar


#: the remedy every error about a damaged or mismatched index ends with
REBUILD = "rebuild the index with `msif build-index ... --overwrite`"

def closest_name(name: str, known: list[str]) -> str | None:
    """The closest of ``known`` names to ``name`` (a typo, or a prefix too many / too few), or None."""
    close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.6)
    if close:
        return close[0]
    return next((k for k in known if k.endswith("." + str(name)) or str(name).endswith("." + k)), None)


class MsifError(Exception):
    """Base of every error msif-index raises on purpose (bad input, mismatches, corrupt files)."""


class TaskError(MsifError):
    """The user's task (models, datasets, losses, settings) is invalid."""


class ConfigError(MsifError):
    """A configuration value is out of range, or differs from the one an index was built with."""


class ShapeError(MsifError):
    """An input tensor or batch has the wrong shape."""


class IndexMismatchError(MsifError):
    """A task's models do not match the index (other pretrained weights, other architecture)."""


class CorruptIndexError(MsifError):
    """An index file is missing, truncated, half-written or corrupted."""


class OutputExistsError(MsifError):
    """The output folder holds something that is not this index."""


class NonFiniteError(MsifError):
    """A gradient, loss or score is NaN or infinite."""


class TooLargeError(MsifError):
    """A model is too large for a dense (exact) computation."""


class BusyError(MsifError):
    """Another process is writing the same index folder (msif_index.lock)."""


class DiskFullError(MsifError):
    """The disk ran out of space while writing; nothing already written was damaged."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when the message is empty): what
    one-line errors quote of the exception that caused them."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def exception_text(exc: BaseException) -> str:
    """``"KeyError: 'label'"``: the exception's type and the first line of its message (the type
    alone when the message is empty)."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


#: torch's text for a KeyboardInterrupt raised inside its C++ code (vmap, decompositions), alone or as
#: the last line of a TorchScript interpreter failure (LayerNorm's backward)
_TORCH_INTERRUPT = re.compile(r"(?:^|RuntimeError: )KeyboardInterrupt(?::|$)", re.MULTILINE)


def is_interrupt(e: BaseException) -> bool:
    """Whether ``e`` is Ctrl-C (or SIGTERM, which the command line raises as it), possibly in
    disguise: torch reraises a KeyboardInterrupt raised inside its C++ code as ``RuntimeError:
    KeyboardInterrupt: ...``, inside a TorchScript function as a many-line "The following operation
    failed in the TorchScript interpreter" whose last line is that one; msif may wrap either in one
    of its own errors (the original then on ``__cause__`` / ``__context__``)."""
    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, KeyboardInterrupt) or (isinstance(cur, RuntimeError)
                                                  and _TORCH_INTERRUPT.search(str(cur))):
            return True
        cur = cur.__cause__ or cur.__context__
    return False


#: what to do when torch has no forward-mode derivative of an operation (every second-order path
#: of msif is forward-over-reverse)
FORWARD_AD_HINT = ("attention (nn.MultiheadAttention, nn.TransformerEncoderLayer, "
                   "F.scaled_dot_product_attention) has them on the math kernel: run the model's forward "
                   "under torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)")


@contextmanager
def forward_ad_errors(what: str) -> Iterator[None]:
    """Turn torch's ``NotImplementedError: Trying to use forward AD with <op> ...`` (an operation of
    the model without a forward-mode derivative, which ``what`` needs) into one TaskError line."""
    try:
        yield
    except NotImplementedError as e:
        if "forward AD" not in str(e) and "forward mode AD" not in str(e):
            raise
        raise TaskError(f"{what} needs second derivatives (forward-over-reverse), and torch has no "
                        f"forward-mode derivative of an operation in the model ({first_line(e)}); "
                        f"{FORWARD_AD_HINT}") from e


#: command-line options whose Python form is not a BuildConfig / EvaluationConfig field of that name
_PYTHON_FORMS = {
    "--overwrite": "build_index(..., overwrite=True)",
    "--device": "BuildConfig(device=...) or InfluenceIndex.open(..., device=...)",
    "--out": "the out_dir argument",
    "--preset": "msif_index.config.PRESETS[name]",
    "--stationarity": "msif_index.stationarity.stationarity(task)",
    "--h-tt": "InfluenceIndex.attach(..., h_tt=...)",
}
_NO_FORM = {"--json", "--help", "--quick"}
_FLAG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def python_forms(message: str) -> str | None:
    """``"From Python: --overwrite is build_index(..., overwrite=True); ..."`` for the command-line
    options a message names (None when it names none): every message words its remedy as the
    command line does, and this note, added where the Python API raises it, translates."""
    flags = [f for f in dict.fromkeys(_FLAG.findall(message)) if f not in _NO_FORM]
    if not flags:
        return None
    forms: dict[str, str] = {f: _PYTHON_FORMS[f] for f in flags if f in _PYTHON_FORMS}
    if len(forms) < len(flags):                  # the config classes, only when a message needs them
        from .config import BuildConfig
        from .evaluation.runner import EvaluationConfig
        for flag in flags:
            name = flag[2:].replace("-", "_")
            if flag in forms:
                continue
            if name in BuildConfig.__dataclass_fields__:
                forms[flag] = f"BuildConfig({name}=...)"
            elif name in EvaluationConfig.__dataclass_fields__:
                forms[flag] = f"EvaluationConfig({name}=...)"
    forms = {f: forms[f] for f in flags if f in forms}
    if not forms:
        return None
    return "From Python: " + "; ".join(f"{flag} is {form}" for flag, form in forms.items())


F = TypeVar("F", bound=Callable[..., Any])


def python_api(fn: F) -> F:
    """Decorate a public Python entry point: an MsifError leaving it gets a note (PEP 678, shown
    below the message in a traceback) saying what the command-line options it names are in Python.
    The command line prints the message alone."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except MsifError as e:
            notes = getattr(e, "__notes__", [])
            if not any(n.startswith("From Python: ") for n in notes):
                try:                     # never hide the error itself
                    form = python_forms(str(e))
                    if form and hasattr(e, "add_note"):
                        e.add_note(form)
                    elif form:                   # Python 3.10: no add_note, the same attribute
                        e.__notes__ = [*notes, form]
                except Exception:
                    pass
            raise
    return wrapper  # type: ignore[return-value]

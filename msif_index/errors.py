"""Errors users can cause. Each kind is one exception type; the CLI prints its message as one line.

Every message says what is wrong and what to do about it.
"""
from __future__ import annotations


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

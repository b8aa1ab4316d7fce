"""Seeded, deterministic random projections with E[P^T P] = I (MATH.md, "Why an index works").

A projection P of shape [k, d] has i.i.d. entries N(0, 1/k), so E[P^T P] = I and inner products
are kept in expectation (Johnson-Lindenstrauss): (P u).(P v) ~= u.v with an error of order
||u|| ||v|| / sqrt(k).

Determinism: every matrix is generated on the CPU, in float64, by ``torch.Generator`` objects
seeded from an integer seed, then cast and moved; the same seed gives bit-identical matrices on
every machine and in every process. Columns are generated in chunks of ``CHUNK_COLS``
columns, chunk ``c`` from its own generator seeded by ``chunk_seed(seed, c)`` (chunk 0 uses
``seed`` itself), so that a [k, d] matrix with a huge d can be applied chunk by chunk, without
ever existing at once, and still equal ``gaussian_projection(k, d, seed)`` exactly.

When ``rows`` is None or ``rows >= cols`` there is nothing to compress: the projection is the
identity of size ``cols`` (exact, no randomness).
"""
from __future__ import annotations

import math
import zlib
from typing import Iterator

import torch

from .errors import ConfigError

#: columns per independently seeded chunk of a Gaussian projection (part of the format: changing
#: it changes every projection, so it is recorded in ``GradientProjector.config()``)
CHUNK_COLS = 8192
#: name of the generation scheme, stored in index manifests
SCHEME = "gaussian-n01/k-float64-cpu-colchunk8192-v1"

_MASK63 = (1 << 63) - 1


def block_seed(base_seed: int, name: str) -> int:
    """A seed for the projection named ``name``, derived from ``base_seed``.

    Stable across processes, machines and Python versions (uses ``zlib.crc32``, not ``hash()``).
    Returns a non-negative integer below 2**63.
    """
    key = f"{int(base_seed)}/{name}".encode("utf-8")
    hi = zlib.crc32(b"msif-hi:" + key)
    lo = zlib.crc32(b"msif-lo:" + key)
    return ((hi << 32) | lo) & _MASK63


def chunk_seed(seed: int, chunk: int) -> int:
    """The generator seed of column chunk ``chunk`` of the projection seeded by ``seed``."""
    if chunk == 0 and 0 <= seed <= _MASK63:
        return int(seed)
    return block_seed(seed, f"chunk{chunk}")


def is_identity(rows: int | None, cols: int) -> bool:
    """True when a [rows, cols] projection is the identity (no compression)."""
    return rows is None or rows >= cols


def _check(rows: int | None, cols: int) -> None:
    if cols < 1:
        raise ConfigError(f"projection needs at least one column, got cols={cols}")
    if rows is not None and rows < 1:
        raise ConfigError(f"projection dimension must be a positive integer or None, got {rows}")


def _gaussian_chunk(rows: int, start: int, stop: int, seed: int) -> torch.Tensor:
    """Columns [start, stop) of the float64 CPU projection; start must be a chunk boundary."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(chunk_seed(seed, start // CHUNK_COLS))
    m = torch.randn(rows, stop - start, generator=gen, dtype=torch.float64)
    return m.mul_(1.0 / math.sqrt(rows))


def gaussian_chunks(
    rows: int,
    cols: int,
    seed: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yield ``(start, stop, P[:, start:stop])`` for the Gaussian projection [rows, cols].

    Each chunk holds at most ``CHUNK_COLS`` columns; chunks are generated on demand, so the full
    matrix never exists. Concatenating the chunks gives ``gaussian_projection(rows, cols, seed)``
    (for rows < cols).
    """
    _check(rows, cols)
    dtype = dtype or torch.get_default_dtype()
    for start in range(0, cols, CHUNK_COLS):
        stop = min(start + CHUNK_COLS, cols)
        yield start, stop, _gaussian_chunk(rows, start, stop, seed).to(dtype=dtype, device=device)


def gaussian_projection(
    rows: int | None,
    cols: int,
    seed: int,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """The projection matrix [rows, cols] with entries N(0, 1/rows), so that E[P^T P] = I.

    Generated on the CPU in float64 from ``seed`` (identical on every machine), then cast to
    ``dtype`` (default: torch's default dtype) and moved to ``device``. If ``rows`` is None or
    ``rows >= cols``, returns the identity of size ``cols`` instead (no projection: exact).
    """
    _check(rows, cols)
    dtype = dtype or torch.get_default_dtype()
    if is_identity(rows, cols):
        return torch.eye(cols, dtype=dtype, device=device)
    parts = [_gaussian_chunk(rows, s, min(s + CHUNK_COLS, cols), seed) for s in range(0, cols, CHUNK_COLS)]
    full = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    return full.to(dtype=dtype, device=device)


def project_chunked(
    x: torch.Tensor,
    rows: int | None,
    seed: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ P.T`` for x of shape [Q, cols] and P = gaussian_projection(rows, cols, seed).

    P is generated chunk by chunk (``CHUNK_COLS`` columns at a time) and never exists at once.
    Returns [Q, rows] (or x itself, copied into ``out`` when given, for the identity case).
    Computed in x's dtype on x's device; written into ``out`` (shape [Q, rows']) when given.
    """
    if x.dim() != 2:
        raise ValueError(f"project_chunked expects a [Q, d] matrix, got shape {tuple(x.shape)}")
    q, cols = x.shape
    if is_identity(rows, cols):
        if out is None:
            return x.clone()
        out.copy_(x)
        return out
    if out is None:
        out = torch.empty(q, rows, dtype=x.dtype, device=x.device)
    for start, stop, p in gaussian_chunks(rows, cols, seed, dtype=x.dtype, device=x.device):
        # beta=0 on the first chunk: whatever ``out`` held before (even NaN) is ignored
        out.addmm_(x[:, start:stop], p.t(), beta=0.0 if start == 0 else 1.0)
    return out


def gram_chunked(rows: int | None, cols: int, seed: int, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``P @ P.T`` [rows, rows] for P = gaussian_projection(rows, cols, seed), computed chunk by chunk."""
    _check(rows, cols)
    dtype = dtype or torch.get_default_dtype()
    if is_identity(rows, cols):
        return torch.eye(cols, dtype=dtype, device=device)
    acc = torch.zeros(rows, rows, dtype=torch.float64)
    for _, _, p in gaussian_chunks(rows, cols, seed, dtype=torch.float64):
        acc.addmm_(p, p.t())
    return acc.to(dtype=dtype, device=device)

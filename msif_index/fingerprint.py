"""Fingerprints of model weights: a sha256 over names, shapes, dtypes and raw bytes.

Any changed weight, shape, dtype or parameter name changes the fingerprint, so an index can
tell whether a task's models are the ones it was built from.
"""
from __future__ import annotations

import hashlib
from typing import Mapping

import numpy as np
import torch

__all__ = ["fingerprint_tensors", "short"]

_CHUNK_ELEMS = 1 << 24  # hash large tensors piecewise so no more than ~64 MiB is copied at once


def _update_tensor(h: "hashlib._Hash", t: torch.Tensor) -> None:
    t = t.detach()
    if t.layout != torch.strided:
        t = t.to_dense()
    if t.is_complex():
        t = torch.view_as_real(t)
    flat = t.reshape(-1)
    n = flat.numel()
    for s in range(0, n, _CHUNK_ELEMS):
        piece = flat[s : s + _CHUNK_ELEMS].to("cpu").contiguous()
        if piece.dtype == torch.bool:
            piece = piece.to(torch.uint8)
        h.update(piece.view(torch.uint8).numpy())


def fingerprint_tensors(tensors: Mapping[str, "torch.Tensor | np.ndarray"]) -> str:
    """sha256 hex digest over the sorted names, shapes, dtypes and raw bytes of ``tensors``.

    Tensors on any device are copied to the CPU piecewise (contiguous); numpy arrays are
    accepted too (a numpy array and the torch tensor of the same values hash alike).
    """
    h = hashlib.sha256()
    h.update(b"msif-fingerprint-v1\0")
    for name in sorted(tensors):
        t = tensors[name]
        if isinstance(t, np.ndarray):
            t = torch.from_numpy(np.ascontiguousarray(t))
        elif not isinstance(t, torch.Tensor):
            t = torch.as_tensor(t)
        dtype = str(t.dtype).replace("torch.", "")
        header = f"{name}\0{tuple(t.shape)}\0{dtype}\0{t.numel()}\0".encode("utf-8")
        h.update(len(header).to_bytes(8, "little"))
        h.update(header)
        _update_tensor(h, t)
    return h.hexdigest()


def short(fp: str) -> str:
    """The first 12 characters of a fingerprint, for messages."""
    return fp[:12]

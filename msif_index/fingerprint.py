"""Fingerprints of model weights and datasets: sha256 over names, shapes, dtypes and raw bytes.

Any changed weight, shape, dtype or parameter name changes a model's fingerprint, so an index can
tell whether a task's models are the ones it was built from; a dataset's fingerprint covers its
length and a fixed sample of its examples (``fingerprint_dataset``).
"""
from __future__ import annotations

import contextlib
import hashlib
import random
from typing import Any, Iterator, Mapping

import numpy as np
import torch

__all__ = ["DATASET_SAMPLE", "fingerprint_dataset", "fingerprint_tensors", "short"]

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


#: examples a dataset fingerprint hashes: the first, the last and a seeded sample of the rest
DATASET_SAMPLE = 16


def dataset_sample_ids(n: int, count: int = DATASET_SAMPLE) -> list[int]:
    """The sorted ids ``fingerprint_dataset`` hashes: 0, n - 1 and a fixed-seed sample (all if n <= count)."""
    if n <= count:
        return list(range(n))
    rest = 1 + np.random.default_rng(0).choice(n - 2, size=count - 2, replace=False)   # O(count), not O(n)
    return sorted({0, n - 1, *(int(i) for i in rest)})


@contextlib.contextmanager
def _seeded_rngs(seed: int = 0) -> Iterator[None]:
    """torch's CPU, Python's and numpy's global generators seeded, then restored: a dataset whose
    __getitem__ draws random augmentations from them gives the same examples every time."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        # the CPU generator only: torch.manual_seed would reseed the CUDA generators too, which
        # fork_rng(devices=[]) does not restore (the caller's CUDA random state would be reset)
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def fingerprint_dataset(dataset: Any, count: int = DATASET_SAMPLE) -> str:
    """sha256 hex digest of a map-style dataset's length and the collated batch of ``count`` fixed
    examples (``dataset_sample_ids``; tensors by dtype, shape and bytes, other leaves by repr),
    fetched with the global random generators seeded (random augmentations drawn from them repeat).

    A cheap check, not a proof: it tells a different dataset (another length, other or reordered
    examples at the sampled ids) from the one an index was built from, not a change elsewhere."""
    from torch.utils._pytree import tree_flatten

    from .data import fetch

    n = len(dataset)
    ids = dataset_sample_ids(n, count)
    with _seeded_rngs(), torch.no_grad():
        batch = fetch(dataset, ids) if ids else None
    leaves, spec = tree_flatten(batch)
    h = hashlib.sha256()
    h.update(f"msif-dataset-v1\0{n}\0{ids}\0{spec}\0".encode("utf-8"))
    tensors = {}
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, (torch.Tensor, np.ndarray)):
            tensors[f"{i:06d}"] = leaf
        else:
            h.update(f"{i}\0{type(leaf).__name__}\0{leaf!r}\0".encode("utf-8"))
    h.update(fingerprint_tensors(tensors).encode("ascii"))
    return h.hexdigest()


def short(fp: str) -> str:
    """The first 12 characters of a fingerprint, for messages."""
    return fp[:12]

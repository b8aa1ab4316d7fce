"""Batching map-style datasets (an example's id is its position) and moving batches."""
from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.data import Dataset, TensorDataset

from .errors import ShapeError
from .task import collate


def fetch(dataset: Dataset, ids: Sequence[int]) -> Any:
    """The collated batch of ``ids``: ``collate([dataset[i] for i in ids])``, fetched in one indexing
    operation per tensor for a ``TensorDataset`` (exact type: a subclass may override __getitem__), and
    through ``dataset.__getitems__(ids)`` (torch's batched-fetch protocol, as DataLoader uses it) where
    the dataset defines it. Both give the same batch as the per-item collate."""
    if type(dataset) is TensorDataset and len(ids):
        idx = torch.as_tensor(list(ids), dtype=torch.long)
        return tuple(t[idx] for t in dataset.tensors)
    getitems = getattr(dataset, "__getitems__", None)
    items = getitems(list(ids)) if getitems is not None else [dataset[i] for i in ids]
    try:
        return collate(items)
    except (RuntimeError, TypeError, ValueError) as e:
        raise _collate_error(list(ids), items, e) from None


def _structure(item: Any) -> Any:
    """An item's layout: container types, tensor shapes and dtypes, other leaves' types."""
    leaves, spec = tree_flatten(item)
    return spec, [(tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else type(x).__name__ for x in leaves]


def _collate_error(ids: list[int], items: list, exc: BaseException) -> ShapeError:
    """A one-line error naming the first example whose layout differs from the batch's first one."""
    first = _structure(items[0]) if items else None
    for i, item in zip(ids, items):
        if _structure(item) != first:
            return ShapeError(f"example {i} of the dataset does not match example {ids[0]} of its batch "
                              f"({_describe(item)} against {_describe(items[0])}); every example must have "
                              f"the same layout and shapes")
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return ShapeError(f"examples {ids[0]}..{ids[-1]} cannot be batched ({msg})")


def _describe(item: Any) -> str:
    leaves, _ = tree_flatten(item)
    parts = [f"{list(x.shape)} {str(x.dtype).replace('torch.', '')}" if isinstance(x, torch.Tensor)
             else type(x).__name__ for x in leaves]
    return ", ".join(parts[:4]) + (", ..." if len(parts) > 4 else "")


def batches(dataset: Dataset, batch_size: int, ids: Sequence[int] | None = None
            ) -> Iterator[tuple[list[int], Any]]:
    """Yield (ids, collated batch) over ``ids`` (default: all examples in order)."""
    if ids is None:
        ids = range(len(dataset))  # type: ignore[arg-type]
    ids = list(ids)
    for s in range(0, len(ids), batch_size):
        chunk = ids[s:s + batch_size]
        yield chunk, fetch(dataset, chunk)


#: how a batch looks, in the errors about one that does not
BATCH_FORM = ("pass a batch as the task's losses take one, torch tensors (or numpy arrays) with the batch "
              "dimension first, e.g. msif_index.data.full_batch(task.test_dataset(), ids)")


def full_batch(dataset: Dataset, ids: Sequence[int] | None = None) -> Any:
    """Every example (or those in ``ids``) as one batch."""
    if ids is None:
        ids = range(len(dataset))  # type: ignore[arg-type]
    ids = list(ids)
    if not ids:
        raise ShapeError("full_batch needs at least one id (a collate function cannot build an empty batch); "
                         "for no test points pass tensors with a batch dimension of 0")
    return fetch(dataset, ids)


def move(batch: Any, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Any:
    """Move tensors of a batch to ``device``; cast floating tensors to ``dtype``; numpy arrays become
    tensors first (``torch.as_tensor``, as a DataLoader's collate makes them). A batch that is a
    tensor, or a flat list / tuple of tensors, already there is returned as it is (a one-example
    query calls this once: the general tree walk costs tens of microseconds)."""
    if _already_there(batch, device, dtype):
        return batch

    def one(t: Any) -> Any:
        if isinstance(t, np.ndarray) and t.dtype.kind in "biuf":    # numbers (not strings, objects)
            t = torch.as_tensor(np.ascontiguousarray(t))             # (negative strides: a copy)
        if not isinstance(t, torch.Tensor):
            return t
        if dtype is not None and t.is_floating_point():
            t = t.to(dtype)
        return t.to(device) if device is not None else t
    return tree_map(one, batch)


def _already_there(batch: Any, device: torch.device | str | None, dtype: torch.dtype | None) -> bool:
    items = batch if type(batch) in (list, tuple) else (batch,)
    want = None if device is None else torch.device(device)
    for t in items:
        if type(t) is not torch.Tensor:
            return False
        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
            return False
        if want is not None and (want.type != "cpu" or t.device.type != "cpu"):
            return False
    return True


def batch_size_of(batch: Any) -> int:
    """Number of examples in a collated batch (leading dim of its first tensor)."""
    first = batch[0] if type(batch) in (list, tuple) and batch else batch
    if type(first) is torch.Tensor and first.dim():              # the usual (x, y) batch: no tree walk
        return int(first.shape[0])
    leaves = [t for t in torch.utils._pytree.tree_leaves(batch) if isinstance(t, torch.Tensor)]
    if not leaves:
        raise ValueError("a batch must contain at least one tensor")
    return int(leaves[0].shape[0])

"""Flat-vector views of a model's loss, and exact first/second derivatives of them.

Second derivatives use forward-over-reverse (``jvp`` of ``grad``), vmapped over directions.
On torch 2.13 ``torch.func.hessian`` / ``jacrev(jacrev(f))`` give wrong cross terms through
``nn.LayerNorm``'s weight; forward-over-reverse and double backward are right (tested against
finite differences in tests/test_autodiff.py).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jvp, vmap

from .errors import TaskError, closest_name
from .warn import load_jvp_decompositions

LossFn = Callable[[nn.Module, Any], torch.Tensor]


class _LossCall(nn.Module):
    """Wraps ``loss_fn(model, batch)`` so ``functional_call`` can swap the model's parameters."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: Any) -> torch.Tensor:  # noqa: D102
        return self.loss_fn(self.model, batch)


def _missing_text(missing: Sequence[str], known: Sequence[str]) -> str:
    """One line naming parameters a model lacks, with the closest names it has (a typo, or a
    prefix such as 'module.' or 'backbone.' too many or too few)."""
    hints = []
    for name in missing[:3]:
        close = closest_name(name, list(known))
        if close:
            hints.append(f"{name!r} -> {close!r}?")
    text = f"parameter(s) {list(missing)} not in the model (named_parameters())"
    if hints:
        return f"{text}; did you mean: {', '.join(hints)}"
    return f"{text}; it has {len(known)}, e.g. {known[:4]}"


class FlatParams:
    """The parameters ``names`` of ``model`` as one flat vector (concatenated ``p.reshape(-1)``)."""

    def __init__(self, model: nn.Module, names: Sequence[str]):
        params = dict(model.named_parameters())
        missing = [n for n in names if n not in params]
        if missing:
            raise TaskError(_missing_text(missing, list(params)))
        self.model = model
        self.names = list(names)
        self.shapes = [params[n].shape for n in self.names]
        self.sizes = [params[n].numel() for n in self.names]
        self.dim = sum(self.sizes)

    def get(self) -> torch.Tensor:
        """Current values, flat and detached."""
        params = dict(self.model.named_parameters())
        if not self.names:
            return torch.zeros(0)
        return torch.cat([params[n].detach().reshape(-1) for n in self.names])

    def set(self, vec: torch.Tensor) -> None:
        """Write a flat vector back into the model (in place, no grad)."""
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for n, piece in zip(self.names, self.split(vec)):
                params[n].copy_(piece)

    def split(self, vec: torch.Tensor) -> list[torch.Tensor]:
        """Views of a flat vector (last dim) shaped like each parameter (leading dims kept)."""
        lead = vec.shape[:-1]
        return [p.reshape(*lead, *s) for p, s in zip(vec.split(self.sizes, dim=-1), self.shapes)]

    def as_dict(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.split(vec)))

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate per-parameter tensors [..., *shape] into [..., dim]."""
        parts = []
        for n, s in zip(self.names, self.shapes):
            t = tensors[n]
            parts.append(t.reshape(*t.shape[: t.dim() - len(s)], -1))
        return torch.cat(parts, dim=-1)

    def loss(self, loss_fn: LossFn) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        """``f(vec, batch) -> Tensor[B]``: per-example losses with these parameters set to ``vec``."""
        call = _LossCall(self.model, loss_fn)

        def f(vec: torch.Tensor, batch: Any) -> torch.Tensor:
            swapped = {"model." + n: p for n, p in self.as_dict(vec).items()}
            return functional_call(call, swapped, (batch,))

        return f


def hvp(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Hessian-vector product of a scalar function, forward-over-reverse."""
    load_jvp_decompositions()
    return jvp(grad(fn), (x,), (v,))[1]


def dense_hessian(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  chunk: int = 256, advance: Callable[[int], None] | None = None) -> torch.Tensor:
    """Full Hessian of a scalar function of a flat vector, by vmapped HVPs over basis chunks
    (``advance(rows)`` after each chunk, for a progress bar)."""
    d = x.numel()
    eye = torch.eye(d, dtype=x.dtype, device=x.device)
    rows = []
    for i in range(0, d, chunk):
        rows.append(vmap(lambda v: hvp(fn, x, v))(eye[i:i + chunk]))
        if advance is not None:
            advance(rows[-1].shape[0])
    h = torch.cat(rows, dim=0)
    return 0.5 * (h + h.T)


def batched_objective(f: Callable[[torch.Tensor, Any], torch.Tensor], batches: Sequence[Any],
                      n: int, weights: Sequence[torch.Tensor] | None = None
                      ) -> Callable[[torch.Tensor], torch.Tensor]:
    """``vec -> (1/n) sum_batches sum_b w_b f(vec, batch)_b`` (the mean data loss)."""

    def obj(vec: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for i, b in enumerate(batches):
            losses = f(vec, b)
            if weights is not None:
                losses = losses * weights[i]
            total = total + losses.sum()
        return total / n

    return obj


#: what the warning of ``vmap_or_loop`` suggests for the usual cause
VMAP_LOOP_HINT = ("nn.LSTM / nn.GRU / nn.RNN called without an initial state cannot be batched by vmap: pass hx "
                  "explicitly, zeros built from the input (e.g. x.new_zeros(num_layers, x.shape[0], hidden_size)), "
                  "to let it batch them")
_loop_warned: set[str] = set()


def vmap_or_loop(fn: Callable, in_dims: tuple, args: tuple, what: str, try_vmap: bool = True,
                 **vmap_kwargs: Any) -> tuple[Any, bool]:
    """(``vmap(fn, in_dims)(*args)``, True); when vmap cannot batch ``fn`` (RuntimeError or ValueError
    while tracing, e.g. torch's RNNs, whose default initial state ignores vmap's batch), (``fn`` on
    each example in a Python loop, stacked, False): the same values, one example at a time, with a
    warning once per ``what``. An error the loop meets too is vmap's original one, raised as is.

    ``try_vmap=False`` goes straight to the loop (a caller that saw vmap fail on the same function
    before: a model vmap cannot batch stays so), and an error is then the loop's own."""
    first: BaseException | None = None
    if try_vmap:
        try:
            return vmap(fn, in_dims=in_dims, **vmap_kwargs)(*args), True
        except (RuntimeError, ValueError) as exc:
            first = exc
    tree_map = torch.utils._pytree.tree_map
    batched = [a for a, d in zip(args, in_dims) if d == 0]
    n = torch.utils._pytree.tree_leaves(batched[0])[0].shape[0]
    outs = []
    try:
        for i in range(n):
            outs.append(fn(*[tree_map(lambda t: t[i], a) if d == 0 else a for a, d in zip(args, in_dims)]))
    except (RuntimeError, ValueError):
        if first is None:
            raise
        raise first from None
    if first is not None and what not in _loop_warned:
        _loop_warned.add(what)
        from .errors import first_line
        from .warn import warn_user
        warn_user(f"vmap cannot batch the per-example gradients of {what} ({first_line(first)}); they are "
                  f"computed one example at a time, which is slower. {VMAP_LOOP_HINT}")
    return tree_map(lambda *xs: torch.stack(xs), outs[0], *outs[1:]), False


def per_example_grads(f: Callable[[torch.Tensor, Any], torch.Tensor], vec: torch.Tensor,
                      batch: Any) -> torch.Tensor:
    """[B, dim]: gradient of each example's loss, via vmap over a batch of one (or a loop, where
    vmap cannot batch the model: ``vmap_or_loop``)."""

    def single(v: torch.Tensor, example: Any) -> torch.Tensor:
        one = torch.utils._pytree.tree_map(lambda t: t.unsqueeze(0), example)
        return f(v, one)[0]

    return vmap_or_loop(grad(single), (None, 0), (vec, batch), "the model's parameters")[0]

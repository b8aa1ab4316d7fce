"""Per-example projected gradients: ``GradientProjector``.

Row b of ``project_batch`` is P g_b, where g_b is the gradient of the b-th per-example loss with
respect to the chosen parameters and P = blockdiag(P_block) is a seeded random projection with
E[P^T P] = I (``msif_index.projection``); blocks are laid out one after another (see
``msif_index.gradients.blocks``).

Kronecker blocks (Linear, Conv2d, Embedding) never form a per-example gradient: a forward hook
captures the module's input and projects it (a P_in^T), the gradient w.r.t. the module's output is
projected (delta P_out^T), and the block's row is the sum over positions of the outer products, one
batched multiply. One forward and one backward serve every Kronecker block; the backward only
computes gradients w.r.t. the module outputs (no weight gradients). The output gradients come
straight from that backward, except for a module whose outputs are modified in place after it
returns (an in-place ReLU): a tensor hook on the output catches its gradient, and the module's
weight drives the backward. Every module gets the hook on the first pass; from then on only those
seen modified (the version counter tells; a pass that finds an unhooked output modified reruns).

Dense blocks use torch.func: vmap over the examples of grad of a functional_call that swaps just
those parameters, each example fed to ``loss_fn`` as a batch of one, followed by the seeded
Gaussian projection applied in column chunks.

Assumptions: ``loss_fn(model, batch)`` returns one loss per example, loss b depends only on
example b, and every Kronecker module sees tensors whose first dimension is the batch dimension.
The first call checks that hooks see all of each Kronecker weight's gradient (a weight used outside
its module's forward, e.g. ``F.linear(x, emb.weight)``, is caught: pass ``dense_modules``), and that
example 0's row is its own gradient (an input that is not batch-first is caught even when its first
dimension equals the batch size).
"""
from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ..autodiff import vmap_or_loop
from ..errors import ConfigError, NonFiniteError, ShapeError, TaskError, TooLargeError, first_line
from ..projection import (
    CHUNK_COLS,
    SCHEME,
    block_seed,
    gaussian_projection,
    gram_chunked,
    is_identity,
    project_chunked,
)
from .blocks import Block, plan_blocks

#: matrix() refuses to build more entries than this
MAX_MATRIX_ENTRIES = 50_000_000
#: dense-block projections with at most this many entries are kept in memory between calls
CACHE_DENSE_ENTRIES = 1 << 24
#: unprojected conv2d blocks with at most this many patch entries (+ bias) capture their inputs by a
#: convolution with one-hot kernels instead of unfold (cheaper while the kernels are few)
CONV_IDENTITY_MAX = 64


def _out_seed(seed: int, name: str) -> int:
    return block_seed(seed, f"{name}/out")


def _in_seed(seed: int, name: str) -> int:
    return block_seed(seed, f"{name}/in")


def _dense_seed(seed: int, name: str) -> int:
    return block_seed(seed, f"{name}/dense")


class _Call:
    """What one call of a Kronecker module left behind."""

    __slots__ = ("a", "ids", "delta", "output", "version", "n", "hooked")

    def __init__(self):
        self.a = None        # [B, T, k_in] projected inputs (or [B, T] ids for exact embeddings)
        self.ids = None      # [B, T] token ids (embedding)
        self.delta = None    # [B, T, k_out] projected output gradients
        self.output = None
        self.version = 0
        self.n = 0           # leading (batch) dimension seen
        self.hooked = False  # a tensor hook on the output captures delta (else: taken from autograd.grad)


class _KronState:
    """Projection pieces of one Kronecker block, and its hooks."""

    def __init__(self, block: Block, module: nn.Module, seed: int, dtype, device):
        self.block = block
        self.module = module
        b = block
        self.d_in_w = b.d_in - int(b.bias)
        # P_out [k_out, d_out]; None = identity
        self.p_out_t = None
        if not is_identity(b.k_out, b.d_out):
            self.p_out_t = gaussian_projection(b.k_out, b.d_out, _out_seed(seed, b.name), dtype, device).t().contiguous()
        p_in = None
        if not is_identity(b.k_in, b.d_in):
            p_in = gaussian_projection(b.k_in, b.d_in, _in_seed(seed, b.name), dtype, device)
        self._set_p_in(p_in, dtype, device)
        self.calls: list[_Call] = []
        self.dtype = dtype
        #: whether the module's outputs get a tensor hook. True until a pass has shown that they are
        #: not modified in place after the module returns; then their gradients come straight from
        #: autograd.grad (a Python tensor hook costs tens of microseconds per call, most of a
        #: one-example query). Set back to True, for good, when an output turns out modified.
        self.hook_outputs = True

    def _set_p_in(self, p_in: torch.Tensor | None, dtype, device) -> None:
        """P_in [k_in, d_in] (None = identity) and the forms the hooks use: weight columns and bias
        column, the embedding's gather table, the conv2d kernels."""
        b, module = self.block, self.module
        self.p_in = p_in
        self.p_in_w_t = None
        self.p_in_b = None
        self.gather = None
        if p_in is not None:
            if b.kind == "embedding":
                g = p_in.t().contiguous()  # [num_embeddings, k_in]: row i = projected one-hot of i
                pad = module.padding_idx
                if pad is not None:
                    g[pad].zero_()
                self.gather = g
            else:
                self.p_in_w_t = p_in[:, : self.d_in_w].t().contiguous()
                self.p_in_b = p_in[:, self.d_in_w].contiguous() if b.bias else None
        # conv2d: the projected patches are themselves a convolution of the input with P_in's rows as
        # kernels (and P_in's bias column as the bias), which is much faster than unfold + matmul
        # (no [B, C*kh*kw, L] patch matrix). Identity P_in with few patch entries uses the same
        # route with one-hot kernels; large identity P_in (exact mode) keeps unfold.
        self.conv_w = None
        self.conv_b = None
        if b.kind == "conv2d" and (self.p_in is not None or b.d_in <= CONV_IDENTITY_MAX):
            p = self.p_in if self.p_in is not None else torch.eye(b.d_in, dtype=dtype, device=device)
            w = module.weight
            self.conv_w = p[:, : self.d_in_w].reshape(p.shape[0], *w.shape[1:]).contiguous()
            self.conv_b = p[:, self.d_in_w].contiguous() if b.bias else None

    def rotated(self, left: torch.Tensor | None, right: torch.Tensor | None) -> "_KronState":
        """A copy whose block rows are left^T Phi right instead of Phi (Phi = P_out G P_in^T): its
        P_out is left^T P_out and its P_in right^T P_in (None: that side unchanged)."""
        new = copy.copy(self)
        new.calls = []
        if left is not None:
            new.p_out_t = torch.matmul(self.p_out_matrix().to(left.device).t(), left.to(self.dtype)).contiguous()
        if right is not None:
            p_in = torch.matmul(right.to(self.dtype).t(), self.p_in_matrix().to(right.device)).contiguous()
            new._set_p_in(p_in, self.dtype, p_in.device)
        return new

    def p_out_matrix(self):
        b = self.block
        if self.p_out_t is None:
            return torch.eye(b.d_out, dtype=self.dtype, device=self._device())
        return self.p_out_t.t().contiguous()

    def p_in_matrix(self):
        b = self.block
        if self.p_in is None:
            return torch.eye(b.d_in, dtype=self.dtype, device=self._device())
        return self.p_in

    def _device(self):
        for t in (self.p_out_t, self.p_in):
            if t is not None:
                return t.device
        return None


class _LossModule(nn.Module):
    """Wraps ``loss_fn(model, batch)`` so that torch.func.functional_call can swap parameters."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model = model
        self._loss_fn = loss_fn

    def forward(self, batch):
        return self._loss_fn(self.model, batch)


def _check_loss_dtype(losses: torch.Tensor) -> None:
    """TaskError for integer or bool losses: they carry no gradient, and every row would be 0."""
    if not (losses.is_floating_point() or losses.is_complex()):
        raise TaskError(f"loss_fn must return floating-point losses, got {losses.dtype}: an integer or bool "
                        f"value (a count, a 0/1 correctness) has no gradient; return the loss itself (e.g. "
                        f"cross-entropy with reduction='none')")


def _all_finite(t: torch.Tensor) -> bool:
    """True when every entry is finite. One cheap reduction; the exact (slower) test only runs when
    the sum is not finite (NaN/inf entries, or finite entries whose sum overflows)."""
    if t.numel() == 0:
        return True
    if bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


class GradientProjector:
    """Projects per-example gradients of ``param_names`` of ``model`` to ``dim`` numbers each.

    Args:
        model: any torch module (left in the mode the caller set; never modified).
        param_names: names from ``model.named_parameters()``.
        proj_dim: total projected dimension (allocation: ``msif_index.gradients.blocks``), or None
            for the exact mode (every projection an identity: rows are the exact gradients, permuted).
        seed: base seed; each block's matrices are seeded by ``block_seed(seed, name + suffix)``.
        dtype, device: of the projections and of the rows (default: those of the first parameter).
        proj_dim_per_layer: per-block overrides (int for all blocks, or dict name -> int | None).
        dense_modules: module names whose parameters must use the dense (torch.func) path.
        check: verify on the first ``project_batch`` call that hooks see all of each Kronecker
            weight's gradient (costs one extra weight-gradient computation, once).

    Attributes: ``blocks`` (list of Block), ``dim`` (row length), ``param_names``, ``d`` (number
    of parameter entries).
    """

    def __init__(
        self,
        model: nn.Module,
        param_names: Sequence[str],
        proj_dim: int | None = None,
        seed: int = 0,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        proj_dim_per_layer: Mapping[str, int | None] | int | None = None,
        dense_modules: Sequence[str] = (),
        check: bool = True,
        plan: Sequence[Block] | None = None,
    ):
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"seed must be an integer, got {seed!r}")
        self.model = model
        if plan is None:
            self.blocks: list[Block] = plan_blocks(model, param_names, proj_dim, seed, proj_dim_per_layer,
                                                   dense_modules)
        else:
            self.blocks = _check_plan(model, param_names, plan)
        self.param_names: list[str] = list(param_names)
        self.proj_dim = proj_dim
        self.proj_dim_per_layer = proj_dim_per_layer
        self.seed = seed
        self.dim: int = sum(b.dim for b in self.blocks)
        params = dict(model.named_parameters())
        self._params = {n: params[n] for n in self.param_names}
        first = self._params[self.param_names[0]]
        self.dtype = dtype or first.dtype
        if not self.dtype.is_floating_point:
            raise ConfigError(f"dtype must be a floating point dtype, got {self.dtype}")
        self.device = torch.device(device) if device is not None else first.device
        if self.device.type == "cuda" and self.device.index is None:   # "cuda" -> "cuda:0": tensors report an index
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.d: int = sum(p.numel() for p in self._params.values())
        self._offsets: dict[str, int] = {}
        off = 0
        for n in self.param_names:
            self._offsets[n] = off
            off += self._params[n].numel()
        modules = dict(model.named_modules())
        self._kron: list[_KronState] = []
        self._dense: list[Block] = []
        self._dense_cache: dict[str, torch.Tensor | None] = {}
        for b in self.blocks:
            if b.kronecker:
                self._kron.append(_KronState(b, modules[b.name], seed, self.dtype, self.device))
            else:
                self._dense.append(b)
                if not is_identity(b.k_out, b.d_out) and b.k_out * b.d_out <= CACHE_DENSE_ENTRIES:
                    self._dense_cache[b.name] = gaussian_projection(
                        b.k_out, b.d_out, _dense_seed(seed, b.name), self.dtype, self.device)
        self._need_check = bool(check) and bool(self._kron)
        self._need_dense_check = bool(check) and bool(self._dense)
        #: whether vmap batched the last dense pass (False: one example at a time, and later passes
        #: go straight to the loop: vmap is not retried; None: no pass yet)
        self.dense_batched: bool | None = None

    def rotated(self, rotations: Mapping[str, tuple[torch.Tensor | None, torch.Tensor | None]]) -> "GradientProjector":
        """A projector over the same model and blocks whose Kronecker block ``name`` gives rows
        left^T Phi right for ``rotations[name] = (left [k_out, k_out], right [k_in, k_in])`` (its
        projections rotated: the same cost per row). The kfac / ekfac build folds the first half of
        the preconditioner into the capture this way. Whether the hooks see every gradient does not
        depend on the projections: checked once, by this projector or the rotated one."""
        unknown = set(rotations) - {st.block.name for st in self._kron}
        if unknown:
            raise ConfigError(f"rotated: no Kronecker block named {', '.join(sorted(unknown))}")
        new = copy.copy(self)
        new._kron = [st.rotated(*rotations[st.block.name]) if st.block.name in rotations else st.rotated(None, None)
                     for st in self._kron]
        return new

    @classmethod
    def from_blocks(cls, model: nn.Module, param_names: Sequence[str], blocks: Sequence[Block], seed: int,
                    dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                    check: bool = True) -> "GradientProjector":
        """The projector a saved plan describes (same blocks, seeds, dims), on another model with
        parameters of the same names and shapes (e.g. W of the finetuned model)."""
        return cls(model, param_names, seed=seed, dtype=dtype, device=device, check=check, plan=blocks)

    # ----------------------------------------------------------------------------------------
    # description

    def config(self) -> dict:
        """JSON-serializable description of the projection (store it in an index manifest)."""
        per = self.proj_dim_per_layer
        if isinstance(per, Mapping):
            per = {str(k): v for k, v in per.items()}
        return {
            "scheme": SCHEME,
            "chunk_cols": CHUNK_COLS,
            "proj_dim": self.proj_dim,
            "proj_dim_per_layer": per,
            "seed": self.seed,
            "dim": self.dim,
            "num_params": self.d,
            "param_names": list(self.param_names),
            "blocks": [b.to_dict() for b in self.blocks],
        }

    def __repr__(self) -> str:
        kinds = {}
        for b in self.blocks:
            kinds[b.kind] = kinds.get(b.kind, 0) + 1
        return f"GradientProjector(dim={self.dim}, d={self.d}, blocks={kinds}, seed={self.seed})"

    # ----------------------------------------------------------------------------------------
    # per-example gradients

    def project_batch(self, loss_fn: Callable[[nn.Module, Any], torch.Tensor], batch: Any,
                      out: torch.Tensor | None = None, check_finite: bool = True) -> torch.Tensor:
        """Rows P g_b [B, dim] for the per-example losses ``loss_fn(model, batch)`` (shape [B]).

        Written into ``out`` ([B, dim], this projector's dtype and device) when given.
        ``check_finite``: NonFiniteError when a loss or a row is NaN or infinite (a caller that
        checks what it computes from the rows may skip it: the two reductions cost about 0.1 ms,
        an eighth of a one-example call).
        """
        restore = []
        try:
            for p in self._params.values():
                if not p.requires_grad:
                    p.requires_grad_(True)
                    restore.append(p)
            with torch.inference_mode(False), torch.enable_grad():
                n = None
                if self._kron:
                    n, out = self._kron_pass(loss_fn, batch, out, check_finite)
                if self._dense:
                    out = self._dense_pass(loss_fn, batch, out, n)
        finally:
            for p in restore:
                p.requires_grad_(False)
        if check_finite and not _all_finite(out):
            raise NonFiniteError("a projected per-example gradient is NaN or infinite; check the model and loss")
        return out

    def _check_out(self, out, n):
        if out is None:
            return torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
        if tuple(out.shape) != (n, self.dim):
            raise ShapeError(f"out has shape {tuple(out.shape)}, expected ({n}, {self.dim})")
        if out.dtype != self.dtype or out.device != self.device:
            raise ShapeError(f"out is {out.dtype} on {out.device}, expected {self.dtype} on {self.device}")
        return out

    def _kron_pass(self, loss_fn, batch, out, check_finite=True):
        result = self._kron_pass_once(loss_fn, batch, out, check_finite)
        if result is None:          # an unhooked output was modified in place: again, with hooks there
            result = self._kron_pass_once(loss_fn, batch, out, check_finite)
        return result

    def _kron_pass_once(self, loss_fn, batch, out, check_finite=True):
        """(n, rows); None when an output captured without a tensor hook was modified in place after
        its module returned (its gradient is then out of reach: the module's outputs get hooks from
        now on, and the caller runs the pass again)."""
        handles = []
        for st in self._kron:
            st.calls = []
            handles.append(st.module.register_forward_hook(self._make_forward_hook(st), with_kwargs=True))
        try:
            losses = loss_fn(self.model, batch)
        finally:
            for h in handles:
                h.remove()
        try:
            if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
                shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
                raise ShapeError(f"loss_fn must return one loss per example (shape [B]), got {shape}")
            _check_loss_dtype(losses)
            n = losses.shape[0]
            if check_finite and not _all_finite(losses.detach()):
                raise NonFiniteError("loss_fn returned a NaN or infinite loss")
            for st in self._kron:
                for c in st.calls:
                    if c.n != n:
                        raise ShapeError(
                            f"module '{st.block.name}' saw a leading dimension of {c.n} but loss_fn returned "
                            f"{n} losses; per-example gradients need the batch dimension first "
                            f"(or list it in dense_modules: {[st.block.name]!r})")
            redo = False
            for st in self._kron:
                if any(c.output is not None and not c.hooked and c.output._version != c.version for c in st.calls):
                    st.hook_outputs = redo = True
            if redo:
                return None
            out = self._check_out(out, n)
            check = self._need_check
            drivers, seen = [], set()
            for st in self._kron:
                for c in st.calls:
                    if c.output is None:
                        continue
                    # a hooked output modified in place: its module's weight still drives the hook
                    t = c.output if c.output._version == c.version else st.module.weight
                    if id(t) not in seen:
                        seen.add(id(t))
                        drivers.append(t)
            check_params = []
            if check:
                for st in self._kron:
                    for pn in st.block.params:
                        p = self._params[pn]
                        if id(p) not in seen:
                            seen.add(id(p))
                            drivers.append(p)
                        check_params.append(pn)
            grads = first = None
            if check and n > 1 and losses.requires_grad:
                # example 0's own gradient (its hooks fire too, then the batch's backward below
                # overwrites what they captured): the rows must not mix examples
                first = torch.autograd.grad(losses[0], [self._params[pn] for pn in check_params],
                                            retain_graph=True, allow_unused=True)
            if drivers and losses.requires_grad:
                grads = torch.autograd.grad(losses.sum(), drivers, allow_unused=True)
            pos = {id(t): i for i, t in enumerate(drivers)}
            for st in self._kron:
                if grads is not None:
                    for c in st.calls:
                        if c.output is not None and not c.hooked:
                            g = grads[pos[id(c.output)]]
                            if g is not None:
                                c.delta = self._delta(st, g)
                self._kron_rows(st, out)
            if check:
                def dense(g, p):
                    if g is None:
                        return torch.zeros_like(p).unsqueeze(0)
                    return (g.to_dense() if g.is_sparse else g).unsqueeze(0)

                full = {pn: dense(grads[pos[id(self._params[pn])]] if grads is not None else None,
                                  self._params[pn]) for pn in check_params}
                own = None if first is None else {pn: dense(g, self._params[pn]) for pn, g in zip(check_params, first)}
                self._need_check = not self._verify(out, full, own)
            for st in self._kron:
                # outputs seen unmodified in this pass need no tensor hook from now on
                if st.hook_outputs and st.calls and all(c.output is None or c.output._version == c.version
                                                        for c in st.calls):
                    st.hook_outputs = False
        finally:
            for st in self._kron:
                # break the reference cycle output -> grad_fn -> tensor hook -> call -> output: it runs
                # through autograd's C++ graph, which Python's garbage collector cannot see, so without
                # this every batch's captured tensors and module outputs stayed alive (memory grew
                # with the number of batches: ~45 MB per batch of 256 for a small CNN)
                for c in st.calls:
                    c.output = c.a = c.delta = c.ids = None
                st.calls = []
        return n, out

    def _delta(self, st: _KronState, g: torch.Tensor) -> torch.Tensor:
        """A module output's gradient -> [B, T, k_out] projected output gradients (delta P_out^T)."""
        g = g.detach()
        if g.dtype != self.dtype or g.device != self.device:
            g = g.to(dtype=self.dtype, device=self.device)
        if st.block.kind == "conv2d":
            d = g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)  # [B, L, C_out]
        else:
            d = g.reshape(g.shape[0], -1, g.shape[-1])  # [B, T, d_out]
        if st.p_out_t is not None:
            d = torch.matmul(d, st.p_out_t)
        return d

    def _make_forward_hook(self, st: _KronState):
        b = st.block
        dtype, device = self.dtype, self.device

        def tensor_hook(call: _Call):
            def hook(g):
                call.delta = self._delta(st, g)
            return hook

        def forward_hook(mod, args, kwargs, output):
            x = args[0] if args else kwargs.get("input")
            if not isinstance(x, torch.Tensor) or not isinstance(output, torch.Tensor):
                raise TaskError(f"module '{b.name}' was called without a tensor input; "
                                f"list it in dense_modules: {[b.name]!r}")
            call = _Call()
            call.n = x.shape[0] if x.dim() else 0
            if b.kind == "linear":
                if x.dim() < 2:
                    raise ShapeError(f"module '{b.name}' got an input of shape {tuple(x.shape)}; "
                                     "per-example gradients need a leading batch dimension")
                a = x.detach().reshape(x.shape[0], -1, x.shape[-1])
                if a.dtype != dtype or a.device != device:
                    a = a.to(dtype=dtype, device=device)
                call.a = self._proj_in_linear(st, a)
            elif b.kind == "conv2d":
                if x.dim() != 4:
                    raise ShapeError(f"module '{b.name}' got an input of shape {tuple(x.shape)}; "
                                     "per-example gradients need a batched [B, C, H, W] input")
                xd = x.detach()
                if xd.dtype != dtype or xd.device != device:
                    xd = xd.to(dtype=dtype, device=device)
                call.a = self._proj_in_conv(st, xd)
            else:  # embedding
                if x.dim() < 1:
                    raise ShapeError(f"module '{b.name}' got a scalar input; per-example gradients need a batch dimension")
                ids = x.detach().reshape(x.shape[0], -1).to(device)
                call.ids = ids
                if st.gather is not None:
                    call.a = st.gather[ids]  # [B, T, k_in]
            replaced = None
            if output.requires_grad:
                if st.hook_outputs and output._base is not None:
                    # a view (F.linear on a [B, T, d] input with a bias): an in-place op on it later
                    # rewrites autograd's graph through its base, and a hook on the view would never
                    # fire; the module returns a copy instead, and the hook goes on the copy
                    output = replaced = output.clone()
                call.output = output
                call.version = output._version
                if st.hook_outputs:
                    call.hooked = True
                    output.register_hook(tensor_hook(call))
            st.calls.append(call)
            return replaced

        return forward_hook

    @staticmethod
    def _proj_in_linear(st: _KronState, a: torch.Tensor) -> torch.Tensor:
        """[B, T, d_in_w] inputs -> [B, T, k_in] (bias column of 1 included)."""
        if st.p_in_w_t is None:
            if not st.block.bias:
                return a
            return torch.cat([a, a.new_ones(a.shape[0], a.shape[1], 1)], dim=2)
        if st.p_in_b is not None:
            if a.shape[1] == 1:
                return torch.addmm(st.p_in_b, a[:, 0], st.p_in_w_t).unsqueeze(1)
            return torch.matmul(a, st.p_in_w_t).add_(st.p_in_b)
        return torch.matmul(a, st.p_in_w_t)

    @staticmethod
    def _proj_in_conv(st: _KronState, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] inputs -> [B, L, k_in] projected patches (bias column of 1 included)."""
        m = st.module
        if isinstance(m.padding, str) or m.padding_mode != "zeros":
            mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
            x = F.pad(x, m._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        else:
            padding = m.padding
        if st.conv_w is not None:
            a = F.conv2d(x, st.conv_w, st.conv_b, stride=m.stride, padding=padding, dilation=m.dilation)
            return a.reshape(a.shape[0], a.shape[1], -1).transpose(1, 2)  # [B, L, k_in] (a view)
        u = F.unfold(x, m.kernel_size, dilation=m.dilation, padding=padding, stride=m.stride)  # [B, CKK, L]
        u = u.transpose(1, 2)  # [B, L, CKK]
        if st.p_in_w_t is None:
            if not st.block.bias:
                return u
            return torch.cat([u, u.new_ones(u.shape[0], u.shape[1], 1)], dim=2)
        a = torch.matmul(u, st.p_in_w_t)
        if st.p_in_b is not None:
            a.add_(st.p_in_b)
        return a

    def _kron_rows(self, st: _KronState, out: torch.Tensor) -> None:
        """Sum over calls and positions of the outer products delta (x) a, into out's block columns."""
        b = st.block
        n = out.shape[0]
        view = out[:, b.offset:b.offset + b.dim].view(n, b.k_out, b.k_in)
        first = True
        for c in st.calls:
            if c.delta is None:
                continue
            d = c.delta  # [B, T, k_out]
            if b.kind == "embedding" and st.gather is None:
                # exact: scatter the output gradients into the token columns
                ids = c.ids
                if st.module.padding_idx is not None:
                    d = d * (ids != st.module.padding_idx).unsqueeze(-1).to(d.dtype)
                if first:
                    view.zero_()
                view.scatter_add_(2, ids.unsqueeze(1).expand(n, b.k_out, ids.shape[1]), d.transpose(1, 2))
            elif d.shape[1] == 1:
                dv, av = d[:, 0, :, None], c.a[:, 0, None, :]
                if first:
                    torch.mul(dv, av, out=view)
                else:
                    view.addcmul_(dv, av)
            else:
                # a batched product into a contiguous result, then one copy: baddbmm_ straight into
                # the strided block of ``out`` falls back to one small matmul per example
                prod = torch.bmm(d.transpose(1, 2), c.a)
                if first:
                    view.copy_(prod)
                else:
                    view.add_(prod)
            first = False
        if first:
            view.zero_()

    def _dense_pass(self, loss_fn, batch, out, n):
        from torch.func import functional_call, grad

        leaves, spec = tree_flatten(batch)
        if n is None:
            for leaf in leaves:
                if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1:
                    n = leaf.shape[0]
                    break
            else:
                raise ShapeError("the batch holds no tensor with a batch dimension; per-example gradients need one")
        out = self._check_out(out, n)
        bidx = [i for i, leaf in enumerate(leaves)
                if isinstance(leaf, torch.Tensor) and leaf.dim() >= 1 and leaf.shape[0] == n]
        wrapper = _LossModule(self.model, loss_fn)
        names = [pn for blk in self._dense for pn in blk.params]
        psub = {"model." + pn: self._params[pn].detach() for pn in names}

        def one(ps, *examples):
            ls = list(leaves)
            for i, ex in zip(bidx, examples):
                ls[i] = ex.unsqueeze(0)
            loss = functional_call(wrapper, ps, (tree_unflatten(ls, spec),))
            _check_loss_dtype(loss)
            if loss.numel() != 1:
                raise ShapeError(f"loss_fn must return one loss per example; a batch of 1 gave shape {tuple(loss.shape)}")
            return loss.sum(), loss.detach().reshape(())

        try:
            # no_grad outside the transform: grad still differentiates with respect to psub, but the
            # parameters outside the dense blocks (which require grad) leave no autograd history on
            # g, so the rows written into ``out`` carry none (``out`` may be a view of a larger
            # buffer that later batches write into in place)
            with torch.no_grad():
                (g, own), self.dense_batched = vmap_or_loop(
                    grad(one, has_aux=True), (None,) + (0,) * len(bidx), (psub, *[leaves[i] for i in bidx]),
                    f"the dense-path parameters {names}", try_vmap=self.dense_batched is not False,
                    randomness="different")
        except (ShapeError, NonFiniteError, TaskError):
            raise
        except (RuntimeError, ValueError) as exc:
            raise TaskError(
                f"per-example gradients of the dense-path parameters {names} (torch.func.vmap over loss_fn, "
                f"one example at a time) failed: {first_line(exc)}") from exc
        if self._need_dense_check and n > 1:
            self._need_dense_check = not self._check_dense_losses(loss_fn, batch, own, [leaves[i] for i in bidx])
        for blk in self._dense:
            gb = g["model." + blk.name].reshape(n, -1)
            if gb.dtype != self.dtype or gb.device != self.device:
                gb = gb.to(dtype=self.dtype, device=self.device)
            self._dense_project(blk, gb, out[:, blk.offset:blk.offset + blk.dim])
        return out

    def _check_dense_losses(self, loss_fn, batch, own: torch.Tensor, sliced: list) -> bool:
        """First call: the dense path's one-example losses (each batch tensor whose first dimension is
        B cut into its B examples) must equal ``loss_fn`` on the whole batch; TaskError otherwise.
        It catches a tensor shared by all examples whose first dimension happens to equal B (cut,
        every example sees one row of it), and examples that interact (batch norm in training mode,
        a loss divided by a batch total). A random loss (dropout kept on, masks drawn in loss_fn),
        whose two evaluations on the same batch differ, is not checked. False (not checked: the next
        call checks) when a loss is not finite."""
        with torch.no_grad():
            whole = loss_fn(self.model, batch)
        if not isinstance(whole, torch.Tensor) or tuple(whole.shape) != tuple(own.shape):
            return True                  # the shape errors are the Kronecker path's and the vmap's to give
        a, b = own.detach().double(), whole.detach().double()
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            return False
        # the least precise of the rows', losses' and dense parameters' dtypes (as _verify)
        dtypes = [self.dtype, own.dtype, whole.dtype] + [self._params[pn].dtype for blk in self._dense
                                                         for pn in blk.params]
        eps = max(torch.finfo(d).eps for d in dtypes if d.is_floating_point)
        rel = 1e-8 if eps < 1e-10 else max(1e-3, 8 * eps)
        diff = (a - b).abs()
        scale = float(torch.maximum(a.abs(), b.abs()).max())
        if float(diff.max()) <= rel * scale + 8 * eps:        # (an absolute floor: tiny losses, one ulp apart)
            return True
        with torch.no_grad():
            again = loss_fn(self.model, batch)
        if not isinstance(again, torch.Tensor) or not torch.equal(again.detach().double(), b):
            return True                  # a random loss: its examples cannot be compared
        i = int(diff.argmax())
        shapes = ", ".join(str(list(t.shape)) for t in sliced)
        raise TaskError(
            f"example {i}'s loss computed alone ({float(a[i]):.8g}) differs from its loss in the batch "
            f"({float(b[i]):.8g}; relative difference {float(diff[i]) / max(scale, 1e-300):.2g}): the per-example "
            f"gradients of {[blk.name for blk in self._dense]} cut every batch tensor whose first dimension is the "
            f"batch size ({shapes}) into examples, so a tensor shared by all examples must not have it first "
            f"(pass it through the task, not the batch), and an example's loss must not depend on the others "
            f"(batch norm in training mode, a loss divided by a batch total)")

    def _dense_project(self, blk: Block, x: torch.Tensor, out_view: torch.Tensor) -> None:
        """out_view [Q, k] = x [Q, numel] projected by the dense block's matrix."""
        if is_identity(blk.k_out, blk.d_out):
            out_view.copy_(x)
            return
        p = self._dense_cache.get(blk.name)
        if p is not None:
            out_view.addmm_(x, p.t(), beta=0.0)
            return
        project_chunked(x, blk.k_out, _dense_seed(self.seed, blk.name), out=out_view)

    def _verify(self, out: torch.Tensor, full: dict[str, torch.Tensor],
                own: dict[str, torch.Tensor] | None = None) -> bool:
        """Check the hooks' rows summed over the batch against the autograd gradient of the batch,
        and row 0 against example 0's own gradient (``own``; it catches a module whose input's first
        dimension is not the batch but happens to equal it, which the sum cannot see); False (not
        checked: the next call checks) when any of them is not finite."""
        ref = torch.empty(1, self.dim, dtype=self.dtype, device=self.device)
        # the tolerance of the least precise of the rows' and the parameters' dtypes (the reference
        # gradients are computed in the parameters' dtype): 1e-8 for float64, else 1e-3 or 8 machine
        # epsilons (bfloat16: 0.06; the check is after mixing, which is off by order 1)
        eps = max(torch.finfo(d).eps for d in [self.dtype] + [self._params[st.block.params[0]].dtype
                                                             for st in self._kron])
        rel = 1e-8 if eps < 1e-10 else max(1e-3, 8 * eps)
        for st in self._kron:
            b = st.block
            cols = slice(b.offset, b.offset + b.dim)
            ours = out[:, cols]
            # (the hooks' vector, its scale, the reference gradients, what a mismatch means)
            checks = [(ours.sum(0), ours.norm(dim=1).sum().item(), full,
                       "its weight also gets gradient from outside the module's forward (e.g. tied embeddings, "
                       "F.linear(x, m.weight)); list it in the task's dense_modules")]
            if own is not None:
                checks.append((ours[0], ours[0].norm().item(), own,
                               "example 0's row differs from its own gradient, so the rows mix examples: the "
                               "module's input does not have the batch dimension first (e.g. [T, B, d] or a "
                               "position embedding called without one), or examples interact (batch norm in "
                               "training mode); pass batch-first inputs, put the model in eval mode, or list it "
                               "in the task's dense_modules"))
            for vec, norm, grads, meaning in checks:
                self._kron_dense_rows(st, grads, ref[:, cols])
                theirs = ref[0, cols]
                scale = norm + theirs.norm().item()
                if not math.isfinite(scale):
                    return False
                if not (vec - theirs).norm().item() <= rel * scale + 1e-30:
                    raise TaskError(f"module '{b.name}': {meaning}: {[b.name]!r}")
        return True

    # ----------------------------------------------------------------------------------------
    # full gradients / vectors

    def _grab(self, grads: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
        if name not in grads:
            raise ShapeError(f"project_dense: no entry for parameter '{name}'")
        g = grads[name]
        p = self._params[name]
        if not isinstance(g, torch.Tensor):
            raise ShapeError(f"project_dense: the entry for '{name}' is not a tensor")
        if g.is_sparse:
            g = g.to_dense()
        if tuple(g.shape) == tuple(p.shape):
            g = g.unsqueeze(0)
        if tuple(g.shape[1:]) != tuple(p.shape):
            raise ShapeError(f"project_dense: '{name}' has shape {tuple(g.shape)}, expected [Q, {', '.join(map(str, p.shape))}]")
        return g.to(dtype=self.dtype, device=self.device)

    def _kron_dense_rows(self, st: _KronState, grads, out_view: torch.Tensor) -> None:
        b = st.block
        w = self._grab(grads, b.params[0])
        q = w.shape[0]
        if b.kind == "embedding":
            g = w.transpose(1, 2)  # [Q, dim, num]
        else:
            g = w.reshape(q, b.d_out, -1)
            if b.bias:
                g = torch.cat([g, self._grab(grads, b.params[1]).reshape(q, b.d_out, 1)], dim=2)
        if st.p_out_t is not None:
            g = torch.matmul(st.p_out_t.t(), g)  # [Q, k_out, d_in]
        if st.p_in is not None:
            g = torch.matmul(g, st.p_in.t())  # [Q, k_out, k_in]
        out_view.view(q, b.k_out, b.k_in).copy_(g)

    def project_dense(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """[Q, dim]: the vectors ``grads[name]`` (each [Q, *param.shape], or param.shape for Q=1)
        projected through the same P as ``project_batch``. Entries not in ``param_names`` are ignored."""
        q = None
        for n in self.param_names:
            g = self._grab(grads, n)
            if q is None:
                q = g.shape[0]
            elif g.shape[0] != q:
                raise ShapeError(f"project_dense: '{n}' holds {g.shape[0]} vectors, other entries {q}")
        out = torch.empty(q, self.dim, dtype=self.dtype, device=self.device)
        for st in self._kron:
            b = st.block
            self._kron_dense_rows(st, grads, out[:, b.offset:b.offset + b.dim])
        for blk in self._dense:
            x = self._grab(grads, blk.name).reshape(q, -1)
            self._dense_project(blk, x, out[:, blk.offset:blk.offset + blk.dim])
        return out

    # ----------------------------------------------------------------------------------------
    # explicit matrices

    def _block_columns(self, b: Block) -> torch.Tensor:
        """Global column (position in the concatenation of p.reshape(-1), param_names order) of each
        column of the block's own (row-major [d_out, d_in]) layout."""
        j = torch.arange(b.d_out * b.d_in)
        if b.kind == "dense":
            return j + self._offsets[b.params[0]]
        o, i = j // b.d_in, j % b.d_in
        ow = self._offsets[b.params[0]]
        if b.kind == "embedding":
            return ow + i * b.d_out + o
        dw = b.d_in - int(b.bias)
        cols = ow + o * dw + i
        if b.bias:
            is_b = i == dw
            cols[is_b] = self._offsets[b.params[1]] + o[is_b]
        return cols

    def _block_matrix(self, b: Block, st: _KronState | None) -> torch.Tensor:
        if b.kronecker:
            return torch.kron(st.p_out_matrix(), st.p_in_matrix())
        if is_identity(b.k_out, b.d_out):
            return torch.eye(b.d_out, dtype=self.dtype, device=self.device)
        p = self._dense_cache.get(b.name)
        if p is not None:
            return p
        return gaussian_projection(b.k_out, b.d_out, _dense_seed(self.seed, b.name), self.dtype, self.device)

    def matrix(self) -> torch.Tensor:
        """The explicit P [dim, d]; columns follow the concatenation of p.reshape(-1) in
        ``param_names`` order. For tests and the exact mode; raises TooLargeError above 5e7 entries."""
        if self.dim * self.d > MAX_MATRIX_ENTRIES:
            raise TooLargeError(
                f"the projection matrix would have {self.dim} x {self.d} entries (limit {MAX_MATRIX_ENTRIES}); "
                "use project_dense or fewer parameters")
        full = torch.zeros(self.dim, self.d, dtype=self.dtype, device=self.device)
        states = {st.block.name: st for st in self._kron}
        for b in self.blocks:
            m = self._block_matrix(b, states.get(b.name) if b.kronecker else None)
            cols = self._block_columns(b).to(self.device)
            full[b.offset:b.offset + b.dim].index_copy_(1, cols, m)
        return full

    def gram(self) -> torch.Tensor:
        """P P^T [dim, dim] (block diagonal; Kronecker blocks kron(P_out P_out^T, P_in P_in^T)),
        computed without forming P."""
        gm = torch.zeros(self.dim, self.dim, dtype=self.dtype, device=self.device)
        for b in self.blocks:
            sl = slice(b.offset, b.offset + b.dim)
            gm[sl, sl] = self.gram_block(b)
        return gm

    def gram_block(self, b: Block) -> torch.Tensor:
        """The diagonal block of P P^T of block ``b`` ([b.dim, b.dim]), alone."""
        if b.kronecker:
            st = next(st for st in self._kron if st.block.name == b.name)
            po, pi = st.p_out_matrix(), st.p_in_matrix()
            return torch.kron(po @ po.t(), pi @ pi.t())
        if b.name in self._dense_cache and self._dense_cache[b.name] is not None:
            p = self._dense_cache[b.name]
            return p @ p.t()
        k = None if is_identity(b.k_out, b.d_out) else b.k_out
        return gram_chunked(k, b.d_out, _dense_seed(self.seed, b.name), self.dtype, self.device)


def _check_plan(model: nn.Module, param_names: Sequence[str], plan: Sequence[Block]) -> list[Block]:
    """Validate a saved plan against a model: every listed parameter in exactly one block, shapes equal,
    offsets contiguous."""
    params = dict(model.named_parameters())
    modules = dict(model.named_modules())
    covered: list[str] = []
    off = 0
    for b in plan:
        if b.offset != off:
            raise ConfigError(f"projection plan block {b.name} starts at column {b.offset}, expected {off}")
        off += b.dim
        for n in b.params:
            if n not in params:
                raise ConfigError(f"projection plan names parameter {n!r}, which the model does not have")
        numel = sum(params[n].numel() for n in b.params)
        if numel != b.numel:
            raise ConfigError(f"projection plan block {b.name} has {b.numel} entries, the model's "
                              f"parameters {numel}: the architecture differs from the one the index was built on")
        if b.kronecker and b.name not in modules:
            raise ConfigError(f"projection plan block {b.name} is not a module of the model")
        covered.extend(b.params)
    if sorted(covered) != sorted(param_names):
        raise ConfigError("projection plan does not cover exactly the given parameters")
    return list(plan)

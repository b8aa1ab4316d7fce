"""``probe_gradients``: a task's per-example gradients on a few examples, as a build computes them.

``msif check-task`` runs it, so that a task whose per-example gradients fail (or can only be taken
one example at a time) is reported before a build, not during it.
"""
from __future__ import annotations

import copy
import warnings
from typing import Any

from .capture import GradientProjector


def probe_gradients(task: Any, examples: int = 4, proj_dim: int | None = 4096) -> dict[str, Any]:
    """Per-example projected gradients of the pretraining loss over (W, U) on the first ``examples``
    pretraining examples, on an eval-mode CPU copy of the pretrained model (as ``build_index``).

    Returns ``{"kronecker": [module names], "dense": [parameter names], "dense_batched": bool | None}``:
    the modules that take the factored (Kronecker) path, the parameters that take the dense path
    (torch.func per-example gradients, then a seeded projection), and whether vmap batches the dense
    path (False: one example at a time, slower; None: no dense path). Raises what a build would
    raise on these examples (TaskError, ShapeError, NonFiniteError), with its one-line message.
    """
    from ..autodiff import VMAP_LOOP_HINT
    from ..data import full_batch, move
    from ..task import split_parameters

    model = copy.deepcopy(task.pretrained_model()).to("cpu")    # 4 examples: the CPU will do
    model.eval()
    w, u = split_parameters(task, model)
    dtype = next(model.parameters()).dtype
    projector = GradientProjector(model, w + u, proj_dim=proj_dim, dtype=dtype,
                                  dense_modules=list(task.dense_modules))
    data = task.pretrain_dataset()
    batch = move(full_batch(data, range(min(int(examples), len(data)))), "cpu", dtype)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        projector.project_batch(task.pretrain_loss, batch)
    for c in caught:       # the loop's hint is in the result (check-task prints it); the rest, as raised
        if VMAP_LOOP_HINT not in str(c.message):
            warnings.warn_explicit(c.message, c.category, c.filename, c.lineno)
    dense = [p for b in projector.blocks if not b.kronecker for p in b.params]
    return {"kronecker": [b.name for b in projector.blocks if b.kronecker], "dense": dense,
            "dense_batched": projector.dense_batched}


def probe_second_derivatives(task: Any, examples: int = 2) -> None:
    """One Hessian-vector product (forward-over-reverse, as msif computes every second derivative)
    of the finetuning loss over (W, theta) on the finetuned model (every attach: B needs the mixed
    term F_Wt) and of the pretraining loss over (W, U) on the pretrained model (the 'hessian' and
    'exact' preconditioners, which the default 'auto' picks for small models, and ``msif exact``),
    on the first ``examples`` examples of each dataset, on eval-mode CPU copies. The finetuning
    side raises the one-line TaskError an attach would (for example, attention on a fused kernel,
    which has no forward-mode derivative); the pretraining side raises it where the default build
    would use the 'hessian' preconditioner, and otherwise warns (ekfac and the others need none)."""
    import torch

    from ..autodiff import FlatParams, hvp
    from ..build import resolve_config
    from ..config import BuildConfig
    from ..data import full_batch, move
    from ..errors import TaskError, forward_ad_errors
    from ..task import split_parameters
    from ..warn import warn_user

    stages = (("attaching a finetuned model (the finetune-side operator, needed by every query)",
               task.finetuned_model, task.finetune_loss, task.finetune_dataset),
              ("the pretraining Hessian (build-index's 'hessian' / 'exact' preconditioners, msif exact)",
               task.pretrained_model, task.pretrain_loss, task.pretrain_dataset))
    for stage, (what, model_of, loss_fn, data_of) in enumerate(stages):
        model = copy.deepcopy(model_of()).to("cpu")
        model.eval()
        first, second = split_parameters(task, model)
        flat = FlatParams(model, first + second)
        if flat.dim == 0:
            continue
        dtype = next(model.parameters()).dtype
        data = data_of()
        batch = move(full_batch(data, range(min(int(examples), len(data)))), "cpu", dtype)
        f = flat.loss(loss_fn)
        x = flat.get()
        v = torch.randn(x.shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64).to(x.dtype)
        try:
            with forward_ad_errors(what):
                hvp(lambda vec: f(vec, batch).sum(), x, v)
        except TaskError as e:
            default = resolve_config(task, BuildConfig()).preconditioner if stage else ""
            if stage == 0 or default in ("hessian", "exact"):
                raise
            warn_user(f"{e}; a build with the default preconditioner ({default}) does not need them, but "
                      f"--preconditioner hessian / exact and msif exact do")


__all__ = ["probe_gradients", "probe_second_derivatives"]

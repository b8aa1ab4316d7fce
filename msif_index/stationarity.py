"""How far a task's models are from the optima that the influence formulas assume.

MATH.md differentiates optimality conditions: (W*, U*) = argmin G and the finetuned optimum, theta_hat
(frozen) or (theta_hat, W_hat) (proximal). A model that training left short of its optimum still
gets an index, but a worse one (a trial: Spearman against exact influence 0.41 on an unconverged
transformer, 0.975 on a converged one). For each stage this measures

    relative = || grad of the stage's objective || / RMS_i || grad of example i's loss ||

the gradient of the whole objective (mean loss over the full dataset plus its weight decay, and for
proximal finetuning the proximal term alpha/2 ||W - W*||^2) against the typical example's gradient
(root mean square over a seeded sample), over the parameters that stage trains: (W, U) of the
pretrained model; theta (frozen) or (W, theta) (proximal) of the finetuned one. At an optimum the
numerator vanishes while the per-example gradients do not. Models trained to convergence give
~1e-8 or less; an untrained one ~1e-2 or more, though with noisy labels the examples' gradients
cancel in the mean, down to about 1/sqrt(n). ``RELATIVE_WARN`` is a heuristic bar, not a guarantee.
"""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn

from .data import batches, full_batch, move
from .errors import MsifError, TaskError, first_line, python_api
from .progress import progress
from .task import MultiStageTask, eval_mode, require_shared_parameters, split_parameters

#: above this relative gradient a stage is reported as not at an optimum
RELATIVE_WARN = 1e-3
#: examples per stage whose own gradients give the typical per-example gradient
SAMPLE = 64
#: stages with at most this many trained parameters also get their dense Hessian's eigenvalues
#: checked (a vanishing gradient is also what a saddle point has); above, build-index's hessian
#: preconditioner and msif exact check them
HESSIAN_MAX_PARAMS = 2048
#: ... and at most this many (parameters x examples): a dense Hessian is that many per-example
#: Hessian-vector rows (a 728-parameter LSTM over 300 sequences of 12 tokens: about 10 s on 2 cores)
HESSIAN_MAX_WORK = 2_000_000


@python_api
def stationarity(task: MultiStageTask, batch_size: int = 256, sample: int = SAMPLE,
                 seed: int = 0, progress_bar: bool | None = None,
                 hessian_max_params: int = HESSIAN_MAX_PARAMS,
                 hessian_max_work: int = HESSIAN_MAX_WORK) -> dict[str, dict[str, Any]]:
    """{"pretraining": ..., "finetuning": ...}, each {"params", "grad_norm", "example_grad_rms",
    "examples", "sampled", "relative", "hessian", "at_optimum"}; one pass over each dataset plus
    ``sample`` single-example backward passes per stage. Models stay where they are (their device and
    dtype) and are evaluated in eval mode, as a build does.

    ``hessian``: for a stage of at most ``hessian_max_params`` parameters and ``hessian_max_work``
    parameters x examples, the negative eigenvalues
    of its objective's dense float64 Hessian (``exact.negative_curvature``: {"checked": True,
    "negative": record or None}); above, or where its second derivatives cannot be taken,
    {"checked": False, "why": ...}. ``at_optimum``: the relative gradient within ``RELATIVE_WARN``
    and no negative eigenvalue found."""
    require_shared_parameters(task)
    pre, fin = task.pretrained_model(), task.finetuned_model()
    w, u = split_parameters(task, pre)
    _, theta = split_parameters(task, fin)
    pre_params = _params(pre, w + u)
    fin_names = theta if task.finetuning == "frozen" else w + theta
    fin_params = _params(fin, fin_names)

    def pretrain_extra() -> torch.Tensor | None:
        if not task.pretrain_weight_decay:
            return None
        return 0.5 * task.pretrain_weight_decay * sum((p.double() ** 2).sum() for p in pre_params.values())

    star = {n: p.detach().clone() for n, p in _params(pre, w).items()}

    def finetune_extra() -> torch.Tensor | None:
        terms = []
        if task.finetune_weight_decay:
            terms.append(0.5 * task.finetune_weight_decay
                         * sum((fin_params[n].double() ** 2).sum() for n in theta))
        if task.finetuning == "proximal":
            terms.append(0.5 * task.alpha * sum(((fin_params[n] - star[n].to(fin_params[n])).double() ** 2).sum()
                                                for n in w))
        return sum(terms) if terms else None

    out = {
        "pretraining": _stage("pretraining", pre, pre_params, task.pretrain_loss, task.pretrain_dataset(),
                              pretrain_extra, batch_size, sample, seed, progress_bar),
        "finetuning": _stage("finetuning", fin, fin_params, task.finetune_loss, task.finetune_dataset(),
                             finetune_extra, batch_size, sample, seed, progress_bar),
    }
    for stage, params in (("pretraining", pre_params), ("finetuning", fin_params)):
        r = out[stage]
        r["hessian"] = _curvature(task, stage, sum(p.numel() for p in params.values()), r["examples"],
                                  hessian_max_params, hessian_max_work, progress_bar)
        r["at_optimum"] = r["at_optimum"] and not r["hessian"].get("negative")
    return out


def _curvature(task: MultiStageTask, stage: str, d: int, n: int, max_params: int, max_work: int,
               progress_bar: bool | None) -> dict[str, Any]:
    """The stage objective's dense Hessian checked for negative eigenvalues, where it is small enough."""
    from .exact import finetune_objective_hessian, negative_curvature, pretrain_hessian
    if d > max_params:
        return {"checked": False, "why": f"{d:,} parameters, above {max_params:,}"}
    if d * n > max_work:
        return {"checked": False, "why": f"{d:,} parameters x {n:,} examples, above {max_work:,}"}
    try:
        with progress(d, f"{stage} Hessian", unit="rows", enabled=progress_bar) as advance:
            h = (pretrain_hessian(task, advance=advance) if stage == "pretraining"
                 else finetune_objective_hessian(task, advance=advance))
    except MsifError as e:
        return {"checked": False, "why": str(e).split(";")[0]}
    except (RuntimeError, NotImplementedError, ValueError, TypeError) as e:
        # e.g. an autograd.Function without forward-mode support: the gradient check above still holds
        return {"checked": False, "why": f"its second derivatives failed: {first_line(e)}"}
    return {"checked": True, "negative": negative_curvature(h)}


def _params(model: nn.Module, names: list[str]) -> dict[str, nn.Parameter]:
    params = dict(model.named_parameters())
    return {n: params[n] for n in names}


def _stage(name: str, model: nn.Module, params: dict[str, nn.Parameter], loss_fn: Callable,
           dataset, extra: Callable[[], torch.Tensor | None], batch_size: int, sample: int, seed: int,
           progress_bar: bool | None) -> dict[str, Any]:
    plist = list(params.values())
    device = plist[0].device
    n = len(dataset)
    if n == 0:
        raise TaskError(f"the {name} dataset is empty: there is no objective to be at the optimum of")
    total = [torch.zeros(p.shape, dtype=torch.float64, device=device) for p in plist]
    restore = [p for p in plist if not p.requires_grad]
    for p in restore:
        p.requires_grad_(True)
    rng = torch.Generator().manual_seed(seed)
    picked = torch.randperm(n, generator=rng)[:min(sample, n)].tolist()
    try:
        with eval_mode(model), torch.enable_grad():
            with progress(n, f"{name} gradient", enabled=progress_bar) as advance:
                for ids, batch in batches(dataset, batch_size):
                    losses = loss_fn(model, move(batch, device=device))
                    grads = torch.autograd.grad(losses.sum(), plist, allow_unused=True)
                    for t, g in zip(total, grads):
                        if g is not None:
                            t.add_(g.to(torch.float64))
                    advance(len(ids))
            for t in total:
                t.div_(n)
            reg = extra()
            if reg is not None:
                for t, g in zip(total, torch.autograd.grad(reg, plist, allow_unused=True)):
                    if g is not None:
                        t.add_(g.to(torch.float64))
            grad_norm = math.sqrt(sum(float((t ** 2).sum()) for t in total))
            squares = []
            for i in picked:
                loss = loss_fn(model, move(full_batch(dataset, [i]), device=device))
                grads = torch.autograd.grad(loss.sum(), plist, allow_unused=True)
                squares.append(sum(float((g.to(torch.float64) ** 2).sum()) for g in grads if g is not None))
    finally:
        for p in restore:
            p.requires_grad_(False)
    rms = math.sqrt(sum(squares) / len(squares)) if squares else 0.0
    if rms > 0:
        relative = grad_norm / rms
    else:
        relative = 0.0 if grad_norm == 0 else math.inf
    return {"params": list(params), "grad_norm": grad_norm, "example_grad_rms": rms, "examples": n,
            "sampled": len(picked), "relative": relative, "at_optimum": bool(relative <= RELATIVE_WARN)}

"""The methods an evaluation compares, each giving a score for every (test point, pretraining example).

Every method returns scores [Q, n] in the influence convention of MATH.md: negative = helpful,
positive = harmful; "removing z changes the test loss by about -score / n" holds in units only for the
methods measured in units of influence (``index``, ``single_stage``, ``exact``). The others are
similarities turned into that convention (higher similarity = more helpful = more negative score);
correlations and top-k metrics do not depend on their units.

    index         the index under evaluation: I ~ -q_t . s_z (InfluenceIndex.scores)
    grad_sim      gradient similarity: a second index built with BuildConfig(preconditioner='identity')
                  (same projection), i.e. -(P_W v_t) . (P_W grad_W g(z)): no H_G^{-1}
    repr_sim      representation similarity: -cos(f(x_t), f(z)) of shared-backbone features (see
                  ``backbone_features``): the finetuned model's features of the test point, the
                  pretrained model's features of the pretraining example
    single_stage  influence ignoring the chaining through finetuning: -(P_W grad_W l(x_t)) . s_z with the
                  index's rows s_z and the finetuned model's plain test gradient (no finetune-side
                  correction F_Wt H_tt^{-1} grad_theta l, no proximal operator)
    exact         msif_index.exact_influence (dense Hessians; small models only): the reference
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..build import build_index
from ..config import BuildConfig
from ..data import batches, move
from ..errors import MsifError, TaskError
from ..exact import exact_influence
from ..index import InfluenceIndex
from ..progress import progress
from ..task import MultiStageTask, split_parameters, trainable

METHODS = ("index", "grad_sim", "repr_sim", "single_stage", "exact")
DESCRIPTIONS = {
    "index": "the evaluated index: I(z, x_t) ~ -q_t . s_z",
    "grad_sim": "gradient similarity: identity-preconditioned index (no H_G^{-1}), same projection",
    "repr_sim": "representation similarity: -cos(backbone features of x_t, of z)",
    "single_stage": "single-stage influence: -(P_W grad_W l(x_t)) . s_z, no finetune-side chaining",
    "exact": "exact multi-stage influence (dense Hessians), the reference",
}
UNITS = {"index": "influence", "grad_sim": "similarity", "repr_sim": "similarity",
         "single_stage": "influence", "exact": "influence"}
#: ``exact='auto'`` computes exact influence only when both dense Hessians have at most this many rows
AUTO_EXACT_PARAMS = 5000
#: folder (inside the report folder) of the identity-preconditioned index of ``grad_sim``
GRAD_SIM_DIR = Path("baselines") / "identity-index"


@dataclass
class MethodScores:
    """One method's scores [Q, n] (influence convention) and how long they took."""

    name: str
    scores: np.ndarray
    seconds: float
    info: dict[str, Any]


@dataclass
class Context:
    """What every method needs: the task, the opened and attached index, the test points, a folder."""

    task: MultiStageTask
    index: InfluenceIndex
    key: str                 # the attached finetuned model
    test_ids: list[int]
    test_batch: Any
    out_dir: Path
    progress_bar: bool | None = None
    batch_size: int = 256


# ------------------------------------------------------------------------------------------------
# the methods


def index_scores(ctx: Context) -> tuple[np.ndarray, dict]:
    return ctx.index.scores(ctx.test_batch, finetuned=ctx.key), {}


def grad_sim_scores(ctx: Context) -> tuple[np.ndarray, dict]:
    """Scores of an identity-preconditioned index built (once, then reused) in the report folder."""
    base = BuildConfig.from_dict(ctx.index.manifest["config"])
    if base.preconditioner == "identity":
        return ctx.index.scores(ctx.test_batch, finetuned=ctx.key), {"index": str(ctx.index.path)}
    config = base.with_(preconditioner="identity", damping=None, factory="Flat")
    path = build_index(ctx.task, ctx.out_dir / GRAD_SIM_DIR, config, overwrite=True,
                       progress_bar=ctx.progress_bar)
    with InfluenceIndex.open(path, device="cpu") as idx:
        idx.attach(ctx.task, validate=False, progress_bar=ctx.progress_bar)
        return idx.scores(ctx.test_batch), {"index": str(path)}


def single_stage_scores(ctx: Context) -> tuple[np.ndarray, dict]:
    """-(P_W grad_W l) . s_z: the test gradient w.r.t. W at the finetuned model, unchained."""
    att = ctx.index._attached[ctx.key]
    batch = move(ctx.test_batch, dtype=att.projector.dtype)
    with att.lock:
        pw = att.projector.project_batch(ctx.task.measurement, batch).detach().to(torch.float64).numpy()
    pw = ctx.index.to_row_basis(pw)        # kfac / ekfac rows are stored in the eigenbasis
    out = np.empty((pw.shape[0], ctx.index.n), dtype=np.float64)
    for start, block in ctx.index.store.iter_blocks(65536, dtype=np.float64):
        out[:, start:start + len(block)] = -(pw @ block.T)
    return out, {}


def repr_sim_scores(ctx: Context) -> tuple[np.ndarray, dict]:
    """-cos(f(x_t), f(z)) over every pretraining example (bounded memory: one batch of features)."""
    task = ctx.task
    fin = _eval_copy(task.finetuned_model())
    pre = _eval_copy(task.pretrained_model())
    how = feature_source(task, pre)
    ft = backbone_features(task, fin, task.measurement, ctx.test_batch).to(torch.float64)
    ft = ft / ft.norm(dim=1, keepdim=True).clamp_min(1e-30)
    dataset = task.pretrain_dataset()
    n = len(dataset)  # type: ignore[arg-type]
    out = np.empty((ft.shape[0], n), dtype=np.float64)
    with progress(n, "repr_sim features", enabled=ctx.progress_bar) as advance:
        for ids, batch in batches(dataset, ctx.batch_size):
            fz = backbone_features(task, pre, task.pretrain_loss, batch).to(torch.float64)
            if fz.shape[1] != ft.shape[1]:
                raise TaskError(f"backbone features of pretraining examples have {fz.shape[1]} numbers but "
                                f"those of test points {ft.shape[1]}; define task.features(model, batch)")
            fz = fz / fz.norm(dim=1, keepdim=True).clamp_min(1e-30)
            out[:, ids[0]:ids[-1] + 1] = -(ft @ fz.T).numpy()
            advance(len(ids))
    return out, {"features": how}


def exact_scores(ctx: Context) -> tuple[np.ndarray, dict]:
    return exact_influence(ctx.task, ctx.test_batch).numpy(), {}


SCORERS: dict[str, Callable[[Context], tuple[np.ndarray, dict]]] = {
    "index": index_scores, "grad_sim": grad_sim_scores, "repr_sim": repr_sim_scores,
    "single_stage": single_stage_scores, "exact": exact_scores}


def compute_methods(ctx: Context, names: list[str]) -> tuple[dict[str, MethodScores], dict[str, str]]:
    """Scores of each named method; a method that cannot run here is skipped with its reason."""
    done: dict[str, MethodScores] = {}
    skipped: dict[str, str] = {}
    for name in names:
        t0 = time.perf_counter()
        try:
            scores, info = SCORERS[name](ctx)
        except MsifError as e:
            if name == "index":
                raise
            skipped[name] = f"{type(e).__name__}: {e}"
            continue
        scores = np.asarray(scores, dtype=np.float64)
        if scores.shape != (len(ctx.test_ids), ctx.index.n):
            raise TaskError(f"method {name} returned scores of shape {scores.shape}, expected "
                            f"({len(ctx.test_ids)}, {ctx.index.n})")
        done[name] = MethodScores(name, scores, time.perf_counter() - t0, info)
    return done, skipped


def exact_feasible(task: MultiStageTask, limit: int = AUTO_EXACT_PARAMS) -> tuple[bool, str]:
    """(whether exact influence's dense Hessians over (W, U) and (theta, W) have at most ``limit`` rows,
    the reason when they do not)."""
    pre, fin = task.pretrained_model(), task.finetuned_model()
    pp, fp = trainable(pre), trainable(fin)
    w, u = split_parameters(task, pre)
    _, theta = split_parameters(task, fin)
    d_pre = sum(pp[n].numel() for n in w + u)
    d_fin = sum(fp[n].numel() for n in theta) + sum(fp[n].numel() for n in w)
    if max(d_pre, d_fin) > limit:
        return False, (f"its dense Hessians of {d_pre} and {d_fin} parameters exceed the automatic limit of "
                       f"{limit}; pass --exact on to compute it anyway (slow)")
    return True, ""


# ------------------------------------------------------------------------------------------------
# backbone features (repr_sim)


def _eval_copy(model: nn.Module) -> nn.Module:
    m = copy.deepcopy(model)
    m.eval()
    return m


def shared_modules(task: MultiStageTask, model: nn.Module) -> list[str]:
    """Modules (names) holding at least one parameter, every one of them in shared_parameters."""
    shared = set(task.shared_parameters)
    out = []
    for name, mod in model.named_modules():
        names = [f"{name}.{p}" if name else p for p, _ in mod.named_parameters()]
        if names and all(p in shared for p in names):
            out.append(name)
    return out


def feature_source(task: MultiStageTask, model: nn.Module) -> str:
    """How ``backbone_features`` gets features for this task (reported in the evaluation JSON)."""
    if callable(getattr(task, "features", None)):
        return "task.features(model, batch)"
    mods = shared_modules(task, model)
    return ("output of the last shared module to run (forward hook), among: " + ", ".join(mods[:8])
            + (", ..." if len(mods) > 8 else ""))


def backbone_features(task: MultiStageTask, model: nn.Module, loss_fn: Callable, batch: Any) -> torch.Tensor:
    """Features [B, F] of a batch under ``model``'s shared backbone.

    The optional task hook ``features(model, batch) -> Tensor[B, ...]`` wins when the task defines it.
    Otherwise: ``loss_fn(model, batch)`` runs once (no grad) with forward hooks on every module whose
    parameters are all shared (in W), and the output of the last of them to finish is taken (for a
    backbone container listed whole in W that is the container itself), flattened per example.
    """
    first = next(model.parameters())
    batch = move(batch, device=first.device, dtype=first.dtype)
    hook = getattr(task, "features", None)
    with torch.no_grad():
        if callable(hook):
            feats = hook(model, batch)
            if not isinstance(feats, torch.Tensor):
                raise TaskError(f"task.features(model, batch) must return a tensor, got {type(feats).__name__}")
            return feats.detach().reshape(feats.shape[0], -1).cpu()
        names = shared_modules(task, model)
        if not names:
            raise TaskError("no module holds only shared parameters, so repr_sim has no backbone output; "
                            "define task.features(model, batch)")
        modules = dict(model.named_modules())
        seen: list[tuple[str, Any]] = []
        handles = [modules[nm].register_forward_hook(lambda m, a, o, nm=nm: seen.append((nm, o)))
                   for nm in names]
        try:
            losses = loss_fn(model, batch)
        finally:
            for h in handles:
                h.remove()
    if not seen:
        raise TaskError("the shared modules never ran in the loss's forward pass; define task.features(model, batch)")
    name, out = seen[-1]
    if isinstance(out, (tuple, list)):
        out = next((o for o in out if isinstance(o, torch.Tensor)), None)
    b = int(losses.shape[0])
    if not isinstance(out, torch.Tensor) or out.dim() == 0 or out.shape[0] != b:
        raise TaskError(f"the output of shared module {name!r} is not [batch, ...] (batch {b}); "
                        f"define task.features(model, batch) to give repr_sim its features")
    return out.detach().reshape(b, -1).cpu()

"""The task contract: how users hand msif-index their pretrain -> finetune pipeline.

Notation of MATH.md:
    W      shared parameters (``task.shared_parameters``), present in both models
    U      every other trainable parameter of ``pretrained_model()``   (pretraining head)
    theta  every other trainable parameter of ``finetuned_model()``    (finetuning head)
    G(W, U)     = mean_i pretrain_loss(z_i) + pretrain_weight_decay/2 * ||(W, U)||^2
    F(theta, W) = mean_j finetune_loss(x_j) + finetune_weight_decay/2 * ||theta||^2
    l(x_t)      = measurement(finetuned_model, x_t)   (default: the finetuning loss)
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import inspect
import math
import sys
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, default_collate

from .errors import ShapeError, TaskError, closest_name, exception_text

FINETUNING_STYLES = ("frozen", "proximal")


class MultiStageTask(ABC):
    """A pretrain -> finetune pipeline, subclassed by users.

    Required: the two models, the three datasets, the two per-example losses and
    ``shared_parameters``. Optional: ``measurement`` (default: the finetuning loss),
    ``finetuning`` ("frozen" or "proximal"), ``alpha`` (proximal strength), the two weight
    decays, and the retraining hooks ``pretrain`` / ``finetune`` used by retraining evaluation.

    Sign convention (MATH.md): the influence I(z, x_t) = d l(x_t) / d eps of up-weighting z in
    pretraining. I < 0: z is helpful (more weight lowers the test loss); I > 0: harmful.
    """

    #: names (as in ``model.named_parameters()``) of the shared parameters W, identical in both models
    shared_parameters: Sequence[str] = ()
    #: "frozen": W fixed while finetuning; "proximal": W finetuned under (alpha/2)||W - W*||^2
    finetuning: str = "frozen"
    #: proximal strength (only used when finetuning == "proximal")
    alpha: float = 0.0
    #: the pretraining objective adds pretrain_weight_decay/2 * ||(W, U)||^2
    pretrain_weight_decay: float = 0.0
    #: the finetuning objective adds finetune_weight_decay/2 * ||theta||^2
    finetune_weight_decay: float = 0.0
    #: names (as in ``model.named_modules()``) of Linear / Conv2d / Embedding modules whose gradients
    #: take the exact per-example path (torch.func) instead of the Kronecker-factored hooks: a module
    #: whose weight is also used outside its forward (tied input and output embeddings) or whose
    #: input is not batch-first. The build names such a module when it meets one.
    dense_modules: Sequence[str] = ()

    @abstractmethod
    def pretrained_model(self) -> nn.Module:
        """The pretrained model, holding W* and U*."""

    @abstractmethod
    def finetuned_model(self) -> nn.Module:
        """The finetuned model, holding theta_hat and W_hat (W_hat == W* when finetuning is frozen)."""

    @abstractmethod
    def pretrain_dataset(self) -> Dataset:
        """Map-style dataset of pretraining examples z_1..z_n; an example's id is its position."""

    @abstractmethod
    def finetune_dataset(self) -> Dataset:
        """Map-style dataset of finetuning examples x_1..x_m."""

    @abstractmethod
    def test_dataset(self) -> Dataset:
        """Map-style dataset of test points x_t."""

    @abstractmethod
    def pretrain_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example pretraining loss g(z; W, U), shape [B], unreduced."""

    @abstractmethod
    def finetune_loss(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example finetuning loss f(x; theta, W), shape [B], unreduced."""

    def pretrain_fisher_losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Optional. Pseudo-losses L [B, R] whose per-example gradients give the Gauss-Newton matrix:
        sum_r grad L[b, r] grad L[b, r]^T = J_b^T H_out,b J_b for example b (H_out: the loss's Hessian
        in the model's output). For cross-entropy use :func:`cross_entropy_fisher_losses`, which
        returns sqrt(p_c) * (-log p_c) with p detached: its outer products sum to
        E_{y ~ p}[grad l_y grad l_y^T], the true Fisher, which equals the Gauss-Newton matrix there.

        When defined, gauss-newton / kfac / ekfac fit their statistics to this matrix instead of the
        empirical Fisher of the data's targets (``BuildConfig.fisher``; README, "Why auto").
        """
        raise NotImplementedError(f"{type(self).__name__} does not define pretrain_fisher_losses(model, batch)")

    def finetune_fisher_losses(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Optional. The same as ``pretrain_fisher_losses`` for the finetuned model and finetuning
        batches: when defined, Kronecker-factored H_tt (heads above 8192 parameters, or
        ``attach(h_tt='kfac' | 'ekfac')``) fits the Gauss-Newton matrix of the head instead of the
        empirical Fisher of the finetuning targets (msif_index.head_curvature).
        """
        raise NotImplementedError(f"{type(self).__name__} does not define finetune_fisher_losses(model, batch)")

    def measurement(self, model: nn.Module, batch: Any) -> torch.Tensor:
        """Per-example test measurement l(x_t; theta, W), shape [B]. Default: the finetuning loss."""
        return self.finetune_loss(model, batch)

    # Optional retraining hooks (used by `msif evaluate --against retraining|lds`).
    def pretrain(self, dataset: Dataset, init_model: nn.Module) -> nn.Module:
        """Retrain the pretrained model on ``dataset`` (warm start from ``init_model`` allowed)."""
        raise NotImplementedError(f"{type(self).__name__} does not define pretrain(dataset, init_model)")

    def finetune(self, pretrained_model: nn.Module) -> nn.Module:
        """Finetune ``pretrained_model`` exactly as the task's recipe does; return the finetuned model."""
        raise NotImplementedError(f"{type(self).__name__} does not define finetune(pretrained_model)")


def cross_entropy_fisher_losses(logits: torch.Tensor) -> torch.Tensor:
    """[B, C] pseudo-losses sqrt(p_c) * (-log softmax(logits)_c) with p = softmax(logits) detached: the
    ``pretrain_fisher_losses`` of a cross-entropy classifier (``return cross_entropy_fisher_losses(model(x))``)."""
    logp = torch.log_softmax(logits, dim=-1)
    return -logp * logp.detach().exp().sqrt()


def _defines(task: MultiStageTask, hook: str) -> bool:
    return getattr(type(task), hook) is not getattr(MultiStageTask, hook)


def has_fisher_losses(task: MultiStageTask) -> bool:
    """Whether the task defines ``pretrain_fisher_losses`` (the Gauss-Newton statistics hook)."""
    return _defines(task, "pretrain_fisher_losses")


def has_finetune_fisher_losses(task: MultiStageTask) -> bool:
    """Whether the task defines ``finetune_fisher_losses`` (the head's Gauss-Newton statistics hook)."""
    return _defines(task, "finetune_fisher_losses")


def fisher_loss_columns(fisher_losses: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module,
                        probe: Any, hook: str) -> list[Callable[[nn.Module, Any], torch.Tensor]]:
    """One per-example loss per pseudo-loss column r of ``fisher_losses(model, batch)`` [B, R] (a
    ``*_fisher_losses`` hook named ``hook``), R read from the batch ``probe``; each column checks the
    shape it is given, so a hook that returns the wrong shape fails with one line."""
    with torch.no_grad():
        out = fisher_losses(model, probe)
    if out.dim() != 2:
        raise ShapeError(f"{hook} must return [B, R] (R pseudo-losses per example), got {tuple(out.shape)}")
    r_count = int(out.shape[1])

    def column(r: int) -> Callable[[nn.Module, Any], torch.Tensor]:
        def loss(mdl: nn.Module, batch: Any) -> torch.Tensor:
            val = fisher_losses(mdl, batch)
            if val.dim() != 2 or val.shape[1] != r_count:
                raise ShapeError(f"{hook} must return [B, {r_count}] (R pseudo-losses per example), "
                                 f"got {tuple(val.shape)}")
            return val[:, r]
        return loss

    return [column(r) for r in range(r_count)]


def collate(items: list) -> Any:
    """A batch is the default collate of dataset items."""
    return default_collate(items)


def trainable(model: nn.Module) -> dict[str, nn.Parameter]:
    """Trainable parameters by name, in the model's order."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def split_parameters(task: MultiStageTask, model: nn.Module) -> tuple[list[str], list[str]]:
    """(W names, other trainable names) of a model: (W, U) for the pretrained model,
    (W, theta) for the finetuned one. W keeps the order of ``task.shared_parameters``."""
    shared = set(task.shared_parameters)
    return list(task.shared_parameters), [n for n in trainable(model) if n not in shared]


def _first_batch(dataset: Dataset, size: int) -> Any:
    n = len(dataset)  # type: ignore[arg-type]
    return collate([dataset[i] for i in range(min(size, n))])


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """``model`` in eval mode inside the block (msif computes on eval copies: batch norm on its running
    statistics, dropout off), each module's training flag restored after. A forward pass of a model
    in training mode would also update its batch norm statistics."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


def _check_loss(name: str, fn, model: nn.Module, batch: Any, expected: int) -> None:
    try:
        with torch.no_grad(), eval_mode(model):
            out = fn(model, batch)
    except Exception as e:  # noqa: BLE001 - the user's code; report it in one line
        where = task_code_location(e)
        raise TaskError(f"{name}(model, batch) failed on a batch of {expected}: {exception_text(e)}"
                        + _at(where)) from None
    if not isinstance(out, torch.Tensor) or out.shape != (expected,):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise TaskError(f"{name} must return one loss per example (shape [{expected}]), got {shape}; "
                        f"do not reduce with .mean() or .sum()")
    if not out.is_floating_point():
        raise TaskError(f"{name} must return floating-point losses (differentiable), got {_dtype(out)}")
    if not torch.isfinite(out).all():
        raise TaskError(f"{name} returned non-finite values on the first {expected} examples")


def require_task(task: Any) -> None:
    """TaskError, one line, unless ``task`` is a MultiStageTask (a spec string is loaded first)."""
    if not isinstance(task, MultiStageTask):
        hint = (": load a 'FILE.py:NAME' spec with msif_index.task.load_task(spec) first"
                if isinstance(task, (str, Path)) else "")
        raise TaskError(f"a task must subclass msif_index.MultiStageTask, got {type(task).__name__}{hint}")


def _check_shared_list(task: MultiStageTask) -> None:
    if isinstance(task.shared_parameters, str) or not len(task.shared_parameters):
        raise TaskError("shared_parameters must list the names of the shared parameters W "
                        "(e.g. ['embed.weight', 'embed.bias'])")


def _check_shared_names(shared: Any, pp: dict, fp: dict | None) -> None:
    for label, params in (("pretrained_model()", pp), ("finetuned_model()", fp)):
        if params is None:
            continue
        for name in shared:
            if name not in params:
                close = closest_name(name, list(params))
                hint = f"; did you mean {close!r}?" if close else ""
                raise TaskError(f"shared parameter {name!r} is not in {label}; it has {_some(params)}{hint}")


def require_shared_parameters(task: MultiStageTask, finetuned: bool = True) -> None:
    """The cheap part of ``validate_task`` that the Python entry points (build_index,
    exact_influence, stationarity, attach without validation) run: a task, and every name of
    shared_parameters in the pretrained (and finetuned) model, else one TaskError line."""
    require_task(task)
    _check_shared_list(task)
    pp = dict(task.pretrained_model().named_parameters())
    fp = dict(task.finetuned_model().named_parameters()) if finetuned else None
    _check_shared_names(task.shared_parameters, pp, fp)


def validate_task(task: MultiStageTask) -> None:
    """Check a task once, failing with one clear line (TaskError) naming what is wrong."""
    require_task(task)
    if task.finetuning not in FINETUNING_STYLES:
        raise TaskError(f"finetuning must be 'frozen' or 'proximal', got {task.finetuning!r}")
    if task.finetuning == "proximal" and not (isinstance(task.alpha, (int, float)) and task.alpha > 0
                                              and math.isfinite(task.alpha)):
        raise TaskError(f"proximal finetuning needs alpha > 0 (the proximal strength), got {task.alpha!r}")
    for attr in ("pretrain_weight_decay", "finetune_weight_decay"):
        v = getattr(task, attr)
        if not (isinstance(v, (int, float)) and v >= 0 and math.isfinite(v)):
            raise TaskError(f"{attr} must be a finite number >= 0, got {v!r}")
    _check_shared_list(task)
    pre, fin = task.pretrained_model(), task.finetuned_model()
    for label, m in (("pretrained_model()", pre), ("finetuned_model()", fin)):
        if not isinstance(m, nn.Module):
            raise TaskError(f"{label} must return a torch.nn.Module, got {type(m).__name__}")
    pp, fp = dict(pre.named_parameters()), dict(fin.named_parameters())
    _check_shared_names(task.shared_parameters, pp, fp)
    for name in task.shared_parameters:
        if pp[name].shape != fp[name].shape:
            raise TaskError(f"shared parameter {name!r} has shape {tuple(pp[name].shape)} in the "
                            f"pretrained model but {tuple(fp[name].shape)} in the finetuned model")
        if not pp[name].requires_grad:
            raise TaskError(f"shared parameter {name!r} does not require grad in pretrained_model()")
        if task.finetuning == "frozen":
            a = pp[name].detach().cpu()
            b = fp[name].detach().cpu().to(a.dtype)
            if torch.equal(a, b):
                continue
            if pp[name].dtype != fp[name].dtype:
                raise TaskError(f"finetuning is 'frozen' but shared parameter {name!r} is {_dtype(pp[name])} in "
                                f"pretrained_model() and {_dtype(fp[name])} in finetuned_model(), with other values; "
                                f"give both models one dtype (the finetuned model must hold the pretrained W itself)")
            diff = float((a.double() - b.double()).abs().max())
            raise TaskError(f"finetuning is 'frozen' but shared parameter {name!r} differs between "
                            f"pretrained_model() and finetuned_model() (max |difference| {diff:.3g}); give "
                            f"the finetuned model the pretrained W, or set finetuning = 'proximal' (with alpha)")
    problem = frozen_buffer_problem(task, pre, fin) if task.finetuning == "frozen" else None
    if problem:
        raise TaskError(f"finetuning is 'frozen' but {problem}")
    same = [n for n in split_parameters(task, fin)[1]
            if n in pp and pp[n].shape == fp[n].shape and pp[n].dtype == fp[n].dtype
            and torch.equal(pp[n].detach().cpu(), fp[n].detach().cpu())]
    if same:
        from .warn import warn_user
        warn_user(f"parameter(s) {same[:4]}{' ...' if len(same) > 4 else ''} are in both models with the same "
                  f"values but not in shared_parameters, so they count as finetuning parameters (theta) that "
                  f"finetuning left unchanged: if they are part of the shared backbone (a norm layer's weight "
                  f"and bias, say), list them in shared_parameters")
    if not split_parameters(task, fin)[1]:
        raise TaskError("finetuned_model() has no trainable parameters besides the shared ones (theta is empty)")
    if not isinstance(task.dense_modules, (list, tuple)) or not all(isinstance(m, str) for m in task.dense_modules):
        raise TaskError(f"dense_modules must list module names (e.g. ['embed']), got {task.dense_modules!r}")
    modules = set(dict(pre.named_modules())) | set(dict(fin.named_modules()))
    for name in task.dense_modules:
        if name not in modules:
            raise TaskError(f"dense_modules names {name!r}, which is a module of neither model")
    for label, ds_fn in (("pretrain_dataset()", task.pretrain_dataset),
                         ("finetune_dataset()", task.finetune_dataset),
                         ("test_dataset()", task.test_dataset)):
        ds = ds_fn()
        if not hasattr(ds, "__len__") or not hasattr(ds, "__getitem__"):
            raise TaskError(f"{label} must be a map-style dataset (with __len__ and __getitem__)")
        if len(ds) == 0:
            raise TaskError(f"{label} is empty")
    b = 2
    _check_loss("pretrain_loss", task.pretrain_loss, pre, _first_batch(task.pretrain_dataset(), b),
                min(b, len(task.pretrain_dataset())))
    _check_loss("finetune_loss", task.finetune_loss, fin, _first_batch(task.finetune_dataset(), b),
                min(b, len(task.finetune_dataset())))
    _check_loss("measurement", task.measurement, fin, _first_batch(task.test_dataset(), b),
                min(b, len(task.test_dataset())))


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def state_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's persistent floating-point buffers (batch norm running statistics, ...), by name:
    state that what the model computes depends on. Non-persistent buffers (caches a forward pass may
    fill, such as rotary tables) and integer ones (counters, masks) are left out."""
    saved = set(model.state_dict(keep_vars=True))
    return {n: b for n, b in model.named_buffers() if n in saved and b is not None and b.is_floating_point()}


def w_buffers(task: MultiStageTask, model: nn.Module) -> dict[str, torch.Tensor]:
    """``state_buffers`` of the modules that hold W: part of what W computes, so frozen finetuning
    needs them unchanged too."""
    shared = set(task.shared_parameters)
    owners = {name.rpartition(".")[0] for name in shared}
    return {n: b for n, b in state_buffers(model).items() if n.rpartition(".")[0] in owners}


def frozen_buffer_problem(task: MultiStageTask, pre: nn.Module, fin: nn.Module) -> str | None:
    """Why the finetuned model's buffers of W's modules are not the pretrained model's (frozen
    finetuning needs them equal, as W itself), or None."""
    a, b = w_buffers(task, pre), w_buffers(task, fin)
    moved = [n for n in a if n in b and not torch.equal(a[n].detach().cpu(), b[n].detach().cpu().to(a[n].dtype))]
    if not moved:
        return None
    names = ", ".join(moved[:4]) + (", ..." if len(moved) > 4 else "")
    other = [n for n in moved if a[n].dtype != b[n].dtype]
    if other:
        n = other[0]
        return (f"buffers of W's modules ({names}) are {_dtype(a[n])} in pretrained_model() and {_dtype(b[n])} in "
                f"finetuned_model(), with other values; give both models one dtype")
    return (f"buffers of W's modules differ between pretrained_model() and finetuned_model() ({names}: batch norm "
            f"statistics updated while finetuning?); finetune with those modules in eval mode, or copy the "
            f"pretrained buffers into the finetuned model")


def _some(params: dict) -> str:
    names = list(params)
    return ", ".join(names[:6]) + (", ..." if len(names) > 6 else "")


#: folders of the task files load_task imported: code under them is the user's
_TASK_FOLDERS: set[Path] = set()
_PACKAGE_DIR = Path(__file__).resolve().parent


@functools.lru_cache(maxsize=1)
def _installed_code_dirs() -> tuple[Path, ...]:
    """Python's standard library and installed packages (a task folder may contain them: a virtual
    environment or pyenv under the home folder)."""
    import sysconfig
    dirs = {Path(sysconfig.get_paths()[k]).resolve() for k in ("stdlib", "platstdlib", "purelib", "platlib")
            if sysconfig.get_paths().get(k)}
    return tuple(sorted(dirs))


def _outside_code(filename: str) -> Path | None:
    """The resolved file of a frame when it is nobody's library: a real file outside msif_index, the
    standard library and installed packages (else None: <frozen os>, <string>, site-packages ...)."""
    if filename.startswith("<"):                 # <frozen os>, <string>, <eval_with_key>.N ...
        return None
    try:
        f = Path(filename).resolve()
        if not f.is_file():
            return None
    except (OSError, ValueError):
        return None
    if f.is_relative_to(_PACKAGE_DIR) or {"site-packages", "dist-packages"} & set(f.parts):
        return None
    if any(f.is_relative_to(d) for d in _installed_code_dirs()):
        return None
    return f


def _is_task_code(filename: str) -> bool:
    f = _outside_code(filename)
    return f is not None and any(f.is_relative_to(d) for d in _TASK_FOLDERS)


def _is_msif_code(module: Any, filename: str) -> bool:
    """msif's own frames: the package and its command line (installed as msif_index.cli)."""
    if str(module or "").split(".")[0] == "msif_index":
        return True
    return not filename.startswith("<") and Path(filename).resolve().is_relative_to(_PACKAGE_DIR)


def user_raise_site(exc: BaseException) -> str | None:
    """``"FILE:LINE in FUNC"`` where ``exc`` was raised when that is the user's own code (its
    innermost frame is a file outside msif_index, the standard library and installed packages, and,
    once load_task has loaded a task file, under its folder or the working folder: an editable
    install elsewhere is a library); None when torch, msif or a library raised it. An error of a
    torch operation written on the task's own line (``x.view(...)``) is raised there too, hence the
    messages' "a bug there, or a batch it cannot take"."""
    tb = exc.__traceback__
    if tb is None:
        return None
    while tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code
    filename = code.co_filename
    if _is_msif_code(tb.tb_frame.f_globals.get("__name__"), filename):
        return None
    f = _outside_code(filename)
    if f is None:
        return None
    if _TASK_FOLDERS and not any(f.is_relative_to(d) for d in (*_TASK_FOLDERS, Path.cwd().resolve())):
        return None
    return f"{_shown(filename)}:{tb.tb_lineno} in {code.co_name}"


def task_code_location(exc: BaseException) -> str | None:
    """``"FILE:LINE in FUNC"`` of the task's own code that raised ``exc`` (the innermost frame of a
    file in a loaded task file's folder, outside msif_index), when no msif_index frame comes after
    it; None otherwise (the error is msif's, or the task was not loaded by load_task)."""
    tb, entries = exc.__traceback__, []
    while tb is not None:
        code = tb.tb_frame.f_code
        entries.append((code.co_filename, tb.tb_lineno, code.co_name, tb.tb_frame.f_globals.get("__name__")))
        tb = tb.tb_next
    last_user = last_msif = -1
    for i, (filename, _, _, module) in enumerate(entries):
        if _is_msif_code(module, filename):
            last_msif = i
        elif _is_task_code(filename):
            last_user = i
    if last_user < 0 or last_msif > last_user:
        return None
    filename, line, func, _ = entries[last_user]
    return f"{_shown(filename)}:{line} in {func}"


def _shown(filename: str) -> str:
    """A file name relative to the working folder where it lies under it."""
    try:
        return str(Path(filename).resolve().relative_to(Path.cwd()))
    except ValueError:
        return filename


def load_task(spec: str, validate: bool = True) -> MultiStageTask:
    """Load ``"path/to/file.py:NAME"``: NAME an instance, or a class / factory called with no arguments."""
    if ":" not in spec:
        raise TaskError(f"task must be given as FILE.py:NAME (e.g. examples/digits/task.py:task), got {spec!r}")
    path_s, name = spec.rsplit(":", 1)
    path = Path(path_s)
    if not path.is_file():
        hint = f"; did you mean {path_s}.py:{name}?" if Path(path_s + ".py").is_file() else ""
        raise TaskError(f"task file {path_s!r} does not exist{hint}")
    # the same name in every process (Python's str hash is salted per process), so objects pickled
    # from the task file's classes (torch.save of a whole model) load in the next command
    mod_name = f"msif_user_task_{hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]}"
    module = sys.modules.get(mod_name)
    if module is None:
        # the task file's folder goes on sys.path (as `python FILE.py` does), so it can import
        # modules next to it, at load time or later from inside its methods
        folder = str(path.resolve().parent)
        _TASK_FOLDERS.add(Path(folder))
        if folder not in sys.path:
            sys.path.insert(0, folder)
        spec_obj = importlib.util.spec_from_file_location(mod_name, path)
        if spec_obj is None or spec_obj.loader is None:
            raise TaskError(f"cannot import {path_s!r} as a Python file")
        module = importlib.util.module_from_spec(spec_obj)
        sys.modules[mod_name] = module
        try:
            spec_obj.loader.exec_module(module)
        except Exception as e:  # noqa: BLE001
            del sys.modules[mod_name]
            where = None if isinstance(e, SyntaxError) else task_code_location(e)   # its text has the line
            raise TaskError(f"importing {path_s} failed: {exception_text(e)}" + _at(where)) from None
    if not hasattr(module, name):
        found = [k for k, v in vars(module).items() if not k.startswith("_") and
                 (isinstance(v, MultiStageTask) or (inspect.isclass(v) and issubclass(v, MultiStageTask)
                                                    and v is not MultiStageTask and not inspect.isabstract(v)))]
        hint = f"; it defines {', '.join(found)}" if found else "; it defines no MultiStageTask"
        raise TaskError(f"{path_s} has no attribute {name!r}{hint}")
    obj = getattr(module, name)
    if inspect.isclass(obj) and not issubclass(obj, MultiStageTask):
        raise TaskError(f"{spec} is the class {obj.__name__}, not a msif_index.MultiStageTask")
    called = False
    if inspect.isclass(obj) or (callable(obj) and not isinstance(obj, MultiStageTask)):
        try:
            obj, called = obj(), True
        except Exception as e:  # noqa: BLE001
            where = task_code_location(e)
            raise TaskError(f"calling {name}() from {path_s} failed: {exception_text(e)}" + _at(where)) from None
    if not isinstance(obj, MultiStageTask):
        what = f"{name}() from {path_s} returned" if called else f"{spec} is"
        kind = type(obj).__name__
        article = "an" if kind[:1].lower() in "aeiou" else "a"
        raise TaskError(f"{what} {article} {kind}, not a msif_index.MultiStageTask")
    if validate:
        validate_task(obj)
    return obj


def _at(where: str | None) -> str:
    return f" ({where})" if where else ""

"""msif_index.stationarity: how far a task's models are from the optima the influence formulas assume.

- converged models (the digits task, both finetuning styles) read ~1e-10 or less, weight decay and the
  proximal term included (without them the gradients at these optima are ~1e-3 of an example's);
- the gradient norm and the per-example RMS equal a brute-force float64 computation over the whole
  dataset (one batch) and the same seeded sample;
- a perturbed stage is flagged, the other is not;
- ``msif check-task --stationarity`` prints and returns it (JSON), with a warning line for a stage
  off its optimum.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import json
import math

import pytest
import torch
from torch import nn

from msif_index.data import full_batch
from msif_index.stationarity import RELATIVE_WARN, stationarity
from tests.held_task import HeldTask, random_data


def test_converged_tasks_are_at_their_optima(digits_frozen, digits_proximal):
    for task in (digits_frozen, digits_proximal):
        r = stationarity(task, progress_bar=False)
        w = list(task.shared_parameters)
        u = [n for n in r["pretraining"]["params"] if n not in w]
        assert r["pretraining"]["params"] == w + u and u
        theta = [n for n in r["finetuning"]["params"] if n not in w]
        assert r["finetuning"]["params"] == (theta if task.finetuning == "frozen" else w + theta)
        for stage in ("pretraining", "finetuning"):
            assert r[stage]["relative"] < 1e-8, (task.finetuning, stage, r[stage])
            assert r[stage]["at_optimum"] and r[stage]["example_grad_rms"] > 0.05
            assert r[stage]["sampled"] == min(64, r[stage]["examples"])


class _Net(nn.Module):
    def __init__(self, classes: int):
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.head = nn.Linear(3, classes)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


class _Untrained(HeldTask):
    shared_parameters = ("embed.weight", "embed.bias")
    finetuning = "proximal"
    alpha = 0.7
    pretrain_weight_decay = 0.05
    finetune_weight_decay = 0.2

    def __init__(self):
        g = torch.Generator().manual_seed(3)
        torch.manual_seed(3)
        self.pre, self.fin = _Net(3).double(), _Net(2).double()
        with torch.no_grad():           # W_hat near, not at, W*: the proximal term contributes
            self.fin.embed.weight.copy_(self.pre.embed.weight + 0.1)
            self.fin.embed.bias.copy_(self.pre.embed.bias)
        self.data = random_data(g, ((23, 3), (11, 2), (4, 2)))


def _brute(task, model, names, loss_fn, data, reg, ids):
    params = dict(model.named_parameters())
    plist = [params[n] for n in names]
    objective = loss_fn(model, full_batch(data)).mean() + reg(params)
    grad_norm = math.sqrt(sum(float((g ** 2).sum()) for g in torch.autograd.grad(objective, plist)))
    squares = [sum(float((g ** 2).sum()) for g in torch.autograd.grad(loss_fn(model, full_batch(data, [i])).sum(), plist))
               for i in ids]
    return grad_norm, math.sqrt(sum(squares) / len(squares))


@pytest.mark.parametrize("finetuning", ["proximal", "frozen"])
def test_gradient_and_example_rms_equal_brute_force(finetuning):
    task = _Untrained()
    task.finetuning = finetuning
    r = stationarity(task, batch_size=5, sample=7, seed=11, progress_bar=False)
    w, u, theta = ["embed.weight", "embed.bias"], ["head.weight", "head.bias"], ["head.weight", "head.bias"]
    fin_names = theta if finetuning == "frozen" else w + theta
    star = {n: p.detach().clone() for n, p in task.pre.named_parameters()}

    def pre_reg(p):
        return 0.5 * task.pretrain_weight_decay * sum((p[n] ** 2).sum() for n in w + u)

    def fin_reg(p):
        out = 0.5 * task.finetune_weight_decay * sum((p[n] ** 2).sum() for n in theta)
        if finetuning == "proximal":
            out = out + 0.5 * task.alpha * sum(((p[n] - star[n]) ** 2).sum() for n in w)
        return out

    for stage, model, names, loss_fn, data, reg in (
            ("pretraining", task.pre, w + u, task.pretrain_loss, task.data[0], pre_reg),
            ("finetuning", task.fin, fin_names, task.finetune_loss, task.data[1], fin_reg)):
        n = len(data)
        ids = torch.randperm(n, generator=torch.Generator().manual_seed(11))[:7].tolist()
        grad_norm, rms = _brute(task, model, names, loss_fn, data, reg, ids)
        got = r[stage]
        assert got["params"] == names and got["examples"] == n and got["sampled"] == 7
        assert got["grad_norm"] == pytest.approx(grad_norm, rel=1e-10)
        assert got["example_grad_rms"] == pytest.approx(rms, rel=1e-10)
        assert got["relative"] == pytest.approx(grad_norm / rms, rel=1e-10)
        assert got["relative"] > RELATIVE_WARN and not got["at_optimum"]       # untrained
    # the parameters' requires_grad flags are left as they were
    assert all(p.requires_grad for p in task.pre.parameters())


def test_a_stage_moved_off_its_optimum_is_flagged(digits_frozen):
    moved = copy.copy(digits_frozen)
    pre = copy.deepcopy(digits_frozen.pretrained_model())
    with torch.no_grad():
        pre.embed.weight.add_(1e-2 * torch.randn(pre.embed.weight.shape, generator=torch.Generator().manual_seed(0),
                                                  dtype=pre.embed.weight.dtype))
    moved.pretrained_model = lambda: pre
    r = stationarity(moved, progress_bar=False)
    assert not r["pretraining"]["at_optimum"] and r["pretraining"]["relative"] > RELATIVE_WARN
    assert r["finetuning"]["at_optimum"]                 # the finetuned model is untouched

    moved = copy.copy(digits_frozen)
    fin = copy.deepcopy(digits_frozen.finetuned_model())
    with torch.no_grad():
        fin.head.bias[0] += 0.1          # (shifting both logits alike would change nothing)
    moved.finetuned_model = lambda: fin
    r = stationarity(moved, progress_bar=False)
    assert r["pretraining"]["at_optimum"]
    assert not r["finetuning"]["at_optimum"] and r["finetuning"]["relative"] > RELATIVE_WARN


def test_check_task_stationarity_text_and_json(tmp_path, capsys):
    from msif_index.cli.main import main
    path = tmp_path / "untrained_task.py"
    path.write_text("import torch\nfrom torch import nn\n\nfrom tests.held_task import HeldTask, random_data\n\n"
                    + inspect.getsource(_Net) + "\n" + inspect.getsource(_Untrained) + "\ntask = _Untrained()\n")
    main(["check-task", "--task", f"{path}:task", "--stationarity"])
    captured = capsys.readouterr()
    assert "stationarity: |gradient of the objective| / RMS |gradient of one example|" in captured.out
    assert "pretraining (W, U, 23 examples)" in captured.out and "NOT stationary" in captured.out
    assert "Hessian: " in captured.out and "NOT at a minimum" in captured.out
    assert "finetuning  (W, theta, 11 examples)" in captured.out
    assert "warning: the pretraining model is not at a minimum of its objective" in captured.err
    main(["check-task", "--task", f"{path}:task", "--stationarity", "--json"])
    info = json.loads(capsys.readouterr().out)
    assert set(info["stationarity"]) == {"pretraining", "finetuning"}
    assert info["stationarity"]["finetuning"]["params"] == ["embed.weight", "embed.bias", "head.weight", "head.bias"]
    main(["check-task", "--task", f"{path}:task", "--json"])          # not asked: not measured
    assert "stationarity" not in json.loads(capsys.readouterr().out)


def _brute_hessian(model, names, loss_fn, data, reg):
    """The stage objective's Hessian by autograd's double backward over the flat parameters."""
    params = dict(model.named_parameters())
    shapes = [params[n].shape for n in names]
    sizes = [params[n].numel() for n in names]
    batch = full_batch(data)

    def objective(flat):
        pieces = dict(zip(names, (t.reshape(sh) for t, sh in zip(flat.split(sizes), shapes))))
        full = {**{k: v.detach() for k, v in params.items()}, **pieces}
        return torch.func.functional_call(model, full, (batch[0],)).log_softmax(1).gather(
            1, batch[1][:, None]).neg().mean() + reg(full)
    flat = torch.cat([params[n].detach().reshape(-1) for n in names])
    return torch.autograd.functional.hessian(objective, flat)


def _count(evals):
    return int((evals < -1e-9 * evals.abs().max()).sum())


@pytest.mark.parametrize("finetuning", ["proximal", "frozen"])
def test_the_hessian_check_counts_what_eigvalsh_counts(finetuning):
    """The oracle: eigvalsh of each stage's Hessian by double backward (weight decay and the proximal
    term included); the untrained task has negative eigenvalues in its pretraining stage."""
    task = _Untrained()
    task.finetuning = finetuning
    r = stationarity(task, progress_bar=False)
    w, head = ["embed.weight", "embed.bias"], ["head.weight", "head.bias"]
    star = {n: p.detach().clone() for n, p in task.pre.named_parameters()}
    pre = _brute_hessian(task.pre, w + head, None, task.data[0],
                         lambda p: 0.5 * task.pretrain_weight_decay * sum((p[n] ** 2).sum() for n in w + head))
    fin_names = head if finetuning == "frozen" else head + w

    def fin_reg(p):
        out = 0.5 * task.finetune_weight_decay * sum((p[n] ** 2).sum() for n in head)
        if finetuning == "proximal":
            out = out + 0.5 * task.alpha * sum(((p[n] - star[n]) ** 2).sum() for n in w)
        return out
    fin = _brute_hessian(task.fin, fin_names, None, task.data[1], fin_reg)
    counts = []
    for stage, h in (("pretraining", pre), ("finetuning", fin)):
        got = r[stage]["hessian"]
        expected = _count(torch.linalg.eigvalsh(h))
        assert got["checked"] is True
        assert (got["negative"] or {}).get("count", 0) == expected, (stage, got, expected)
        if expected:
            assert got["negative"]["min"] == pytest.approx(float(torch.linalg.eigvalsh(h).min()), rel=1e-8)
        counts.append(expected)
    assert counts[0] > 0


def test_a_stationary_saddle_point_is_not_a_minimum(capsys):
    """Zero weights, balanced classes: every gradient vanishes exactly (each layer's is multiplied by
    the other's zeros, the head bias's by the balanced labels), and the cross terms make a saddle.
    The gradient check alone called this 'at an optimum'."""
    task = _Untrained()
    task.finetuning = "frozen"
    with torch.no_grad():
        for prm in task.pre.parameters():
            prm.zero_()
    x = torch.randn(24, 4, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    y = torch.arange(24) % 3
    x = x + 2.0 * nn.functional.one_hot(y, 4).to(x.dtype)       # inputs correlated with the labels
    task.data[0] = torch.utils.data.TensorDataset(x, y)
    optima = stationarity(task, progress_bar=False)
    r = optima["pretraining"]
    assert r["grad_norm"] < 1e-14 and r["relative"] <= RELATIVE_WARN
    assert r["hessian"]["negative"]["count"] >= 1 and not r["at_optimum"]
    from msif_index.cli.main import _echo_stationarity
    capsys.readouterr()
    _echo_stationarity(optima, "frozen")
    out = capsys.readouterr()
    assert "  stationary" in out.out and "a saddle point or nonconvex region  ->  NOT at a minimum" in out.out
    assert "its gradient is small but its Hessian has negative eigenvalues" in out.err
    assert stationarity(task, progress_bar=False, hessian_max_params=10)["pretraining"]["hessian"] == {
        "checked": False, "why": "27 parameters, above 10"}
    assert stationarity(task, progress_bar=False, hessian_max_work=27 * 24 - 1)["pretraining"]["hessian"] == {
        "checked": False, "why": "27 parameters x 24 examples, above 647"}
    assert stationarity(task, progress_bar=False, hessian_max_work=27 * 24)["pretraining"]["hessian"]["checked"]


class _LegacyTanh(torch.autograd.Function):
    """An autograd.Function without setup_context: plain autograd only (no torch.func transforms)."""

    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - y ** 2)


class _LegacyNet(_Net):
    def forward(self, x):
        return self.head(_LegacyTanh.apply(self.embed(x)))


def test_second_derivatives_that_fail_leave_the_gradient_check_standing():
    """Before the Hessian check was caught, such a model's `check-task --stationarity` stopped with an
    error blaming the task's code; now the Hessian reads 'not checked', with the reason."""
    task = _Untrained()
    legacy_pre, legacy_fin = _LegacyNet(3).double(), _LegacyNet(2).double()
    legacy_pre.load_state_dict(task.pre.state_dict())
    legacy_fin.load_state_dict(task.fin.state_dict())
    task.pre, task.fin = legacy_pre, legacy_fin
    r = stationarity(task, progress_bar=False)
    for stage in ("pretraining", "finetuning"):
        h = r[stage]["hessian"]
        assert h["checked"] is False and h["why"], h
        assert r[stage]["relative"] > RELATIVE_WARN and not r[stage]["at_optimum"]


def test_the_hessian_check_reports_progress(monkeypatch):
    """A progress bar over each stage's Hessian rows (it can take a minute at the size limits)."""
    import msif_index.stationarity as S
    seen = {}

    @contextlib.contextmanager
    def fake_progress(total, description, unit="ex", enabled=None):
        seen[description] = [total, 0]

        def advance(n):
            seen[description][1] += n
        yield advance
    monkeypatch.setattr(S, "progress", fake_progress)
    task = _Untrained()
    S.stationarity(task, progress_bar=False)
    assert seen["pretraining Hessian"] == [27, 27] and seen["finetuning Hessian"] == [23, 23], seen

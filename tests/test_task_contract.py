"""Bad tasks fail at load time with one clear line (TaskError)."""
from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import msif_index
from msif_index.errors import TaskError
from msif_index.task import split_parameters, validate_task


class Net(nn.Module):
    def __init__(self, out: int, hidden: int = 3):
        super().__init__()
        self.embed = nn.Linear(4, hidden)
        self.head = nn.Linear(hidden, out)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


class Tiny(msif_index.MultiStageTask):
    shared_parameters = ("embed.weight", "embed.bias")

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(8, 4, generator=g)
        self.y = torch.randint(0, 2, (8,), generator=g)
        self.pre, self.fin = Net(3), Net(2)
        self.fin.embed.load_state_dict(self.pre.embed.state_dict())     # frozen finetuning: W* kept

    def pretrained_model(self):
        return self.pre

    def finetuned_model(self):
        return self.fin

    def pretrain_dataset(self):
        return TensorDataset(self.x, self.y)

    finetune_dataset = test_dataset = pretrain_dataset

    def pretrain_loss(self, model, batch):
        x, y = batch
        return nn.functional.cross_entropy(model(x), y, reduction="none")

    finetune_loss = pretrain_loss


def test_valid_task_passes_and_splits():
    t = Tiny()
    validate_task(t)
    assert split_parameters(t, t.pre) == (["embed.weight", "embed.bias"], ["head.weight", "head.bias"])


def test_frozen_finetuning_with_another_w_is_refused_at_load():
    """finetuning 'frozen' means the finetuned model holds W* itself: a W that moved (or was never
    loaded) is one line at validation, naming the parameter; proximal finetuning may move it."""
    t = Tiny()
    with torch.no_grad():
        t.fin.embed.bias[0] += 0.5
    with pytest.raises(TaskError) as e:
        validate_task(t)
    assert "'embed.bias'" in _one_line(e) and "frozen" in _one_line(e) and "0.5" in _one_line(e)
    t.finetuning, t.alpha = "proximal", 1.0
    validate_task(t)


def _one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and len(msg) < 300
    return msg


def test_missing_shared_parameter():
    t = Tiny()
    t.shared_parameters = ("embed.weight", "encoder.bias")
    with pytest.raises(TaskError) as e:
        validate_task(t)
    assert "encoder.bias" in _one_line(e)


def test_shared_shape_mismatch():
    t = Tiny()
    t.fin = Net(2, hidden=5)
    with pytest.raises(TaskError) as e:
        validate_task(t)
    assert "shape" in _one_line(e)


def test_reduced_loss():
    t = Tiny()
    t.pretrain_loss = lambda model, batch: nn.functional.cross_entropy(model(batch[0]), batch[1])
    with pytest.raises(TaskError) as e:
        validate_task(t)
    assert "one loss per example" in _one_line(e)


def test_non_finite_loss():
    t = Tiny()
    t.finetune_loss = lambda model, batch: model(batch[0])[:, 0] * float("nan")
    with pytest.raises(TaskError) as e:
        validate_task(t)
    assert "non-finite" in _one_line(e)


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("inf")])
def test_proximal_needs_positive_alpha(alpha):
    t = Tiny()
    t.finetuning, t.alpha = "proximal", alpha
    with pytest.raises(TaskError) as e:
        validate_task(t)
    assert "alpha" in _one_line(e)


def test_unknown_finetuning_style():
    t = Tiny()
    t.finetuning = "partial"
    with pytest.raises(TaskError) as e:
        validate_task(t)
    assert "frozen" in _one_line(e)


def test_load_task_errors(tmp_path):
    with pytest.raises(TaskError):
        msif_index.load_task("no_colon.py")
    with pytest.raises(TaskError) as e:
        msif_index.load_task(str(tmp_path / "missing.py") + ":task")
    assert "does not exist" in _one_line(e)
    f = tmp_path / "t.py"
    f.write_text(textwrap.dedent("""
        x = 3
        def broken():
            raise RuntimeError("boom")
        def make_data():
            return (1, 2)
        raise_at_import = False
    """))
    with pytest.raises(TaskError) as e:
        msif_index.load_task(f"{f}:nothing")
    assert "no attribute" in _one_line(e) and "defines no MultiStageTask" in _one_line(e)
    with pytest.raises(TaskError) as e:
        msif_index.load_task("examples/digits/task.py:nope")
    assert "it defines" in _one_line(e) and "proximal_task" in _one_line(e) and "task" in _one_line(e)
    with pytest.raises(TaskError) as e:                   # a class that is not a task: said, not called
        msif_index.load_task("examples/digits/task.py:DigitsNet")
    assert "not a msif_index.MultiStageTask" in _one_line(e)
    with pytest.raises(TaskError) as e:
        msif_index.load_task(f"{f}:x")
    assert "t.py:x is an int, not a msif_index.MultiStageTask" in _one_line(e)
    with pytest.raises(TaskError) as e:                   # FILE without its .py: the right spelling suggested
        msif_index.load_task(f"{tmp_path / 't'}:x")
    assert _one_line(e).endswith(f"does not exist; did you mean {tmp_path / 't'}.py:x?")
    with pytest.raises(TaskError) as e:                   # a function that returns something else: said so
        msif_index.load_task(f"{f}:make_data")
    assert "make_data() from" in _one_line(e) and "returned a tuple, not a msif_index.MultiStageTask" in _one_line(e)
    with pytest.raises(TaskError) as e:
        msif_index.load_task(f"{f}:broken")
    assert "boom" in _one_line(e)


def test_task_file_imports_a_module_next_to_it(tmp_path):
    """The task file's folder is on sys.path while it loads and afterwards (an import inside a method)."""
    import sys
    folder = tmp_path / "mytask"
    folder.mkdir()
    (folder / "helpers_for_msif_test.py").write_text("SCALE = 7\n")
    (folder / "late_helper_for_msif_test.py").write_text("VALUE = 11\n")
    (folder / "task.py").write_text(textwrap.dedent("""
        import helpers_for_msif_test
        from msif_index import MultiStageTask

        class T(MultiStageTask):
            shared_parameters = ()
            def pretrained_model(self): ...
            def finetuned_model(self): ...
            def pretrain_dataset(self): ...
            def finetune_dataset(self): ...
            def test_dataset(self): ...
            def pretrain_loss(self, model, batch): ...
            def finetune_loss(self, model, batch): ...
            def late(self):
                import late_helper_for_msif_test
                return late_helper_for_msif_test.VALUE

        task = T()
        task.scale = helpers_for_msif_test.SCALE
    """))
    try:
        t = msif_index.load_task(f"{folder / 'task.py'}:task", validate=False)
        assert t.scale == 7 and t.late() == 11
    finally:
        for name in ("helpers_for_msif_test", "late_helper_for_msif_test"):
            sys.modules.pop(name, None)
        if str(folder) in sys.path:
            sys.path.remove(str(folder))


def test_exact_refuses_large_models(digits_frozen):
    from msif_index.data import full_batch
    from msif_index.errors import TooLargeError
    from msif_index.exact import exact_influence
    with pytest.raises(TooLargeError) as e:
        exact_influence(digits_frozen, full_batch(digits_frozen.test_dataset(), [0]), max_params=100)
    assert "build-index" in _one_line(e)


def test_cross_entropy_fisher_losses_give_the_gauss_newton_matrix():
    """sum_c grad L_c grad L_c^T = J^T (diag p - p p^T) J (the cross-entropy Gauss-Newton matrix, J the
    Jacobian of the logits), float64, for each example."""
    from torch.func import functional_call, jacrev

    from msif_index.task import cross_entropy_fisher_losses

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 5)).double()
    names = [n for n, _ in model.named_parameters()]
    params = {n: p.detach() for n, p in model.named_parameters()}
    x = torch.randn(2, 3, dtype=torch.float64)
    for b in range(2):
        def logits(flat_params):
            return functional_call(model, flat_params, (x[b:b + 1],))[0]
        jac = jacrev(logits)(params)                                  # name -> [C, *shape]
        j = torch.cat([jac[n].reshape(5, -1) for n in names], 1)       # [C, d]
        p = torch.softmax(logits(params), -1)
        ggn = j.T @ (torch.diag(p) - torch.outer(p, p)) @ j
        rows = []
        for c in range(5):
            model.zero_grad()
            cross_entropy_fisher_losses(model(x[b:b + 1]))[0, c].backward()
            rows.append(torch.cat([q.grad.reshape(-1) for q in model.parameters()]))
        g = torch.stack(rows)
        torch.testing.assert_close(g.T @ g, ggn, rtol=1e-10, atol=1e-12)


def test_move_returns_batches_already_in_place_and_converts_the_rest():
    from msif_index.data import move
    x, y = torch.randn(3, 4), torch.arange(3)
    batch = (x, y)
    assert move(batch, "cpu", torch.float32) is batch                 # nothing to do: the same object
    assert move([x, y], None, None)[0] is x
    moved = move(batch, "cpu", torch.float64)                          # floating tensors cast, ints kept
    assert moved[0].dtype == torch.float64 and torch.equal(moved[0], x.double()) and moved[1] is y
    nested = {"x": x, "pair": (x, y)}                                 # the general path: any pytree
    out = move(nested, "cpu", torch.float64)
    assert out["pair"][0].dtype == torch.float64 and out["pair"][1].dtype == torch.int64


class AttentionNet(nn.Module):
    """One self-attention step through F.scaled_dot_product_attention ([B, heads, L, E] inputs), on
    its default CPU kernel (no forward-mode derivative) or on the math kernel."""

    def __init__(self, c: int, math: bool):
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, c)
        self.math = math

    def forward(self, x):
        from torch.nn.attention import SDPBackend, sdpa_kernel

        h = self.mix(x).unsqueeze(1)                                # [B, 1 head, L, E]
        if self.math:
            with sdpa_kernel(SDPBackend.MATH):
                a = nn.functional.scaled_dot_product_attention(h, h, h)
        else:
            a = nn.functional.scaled_dot_product_attention(h, h, h)
        return self.head(a.squeeze(1).mean(1))


class AttentionTask(msif_index.MultiStageTask):
    shared_parameters = ("mix.weight", "mix.bias")
    pretrain_weight_decay = 0.1
    finetune_weight_decay = 0.1

    def __init__(self, math: bool):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.pre, self.fin = AttentionNet(3, math).double(), AttentionNet(2, math).double()
        self.fin.mix.load_state_dict(self.pre.mix.state_dict())
        self.data = [TensorDataset(torch.randn(m, 3, 4, generator=g, dtype=torch.float64),
                                   torch.randint(0, c, (m,), generator=g)) for m, c in ((12, 3), (6, 2), (2, 2))]

    def pretrained_model(self): return self.pre
    def finetuned_model(self): return self.fin
    def pretrain_dataset(self): return self.data[0]
    def finetune_dataset(self): return self.data[1]
    def test_dataset(self): return self.data[2]

    def pretrain_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

    def finetune_loss(self, model, batch):
        return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("math", [False, True])
def test_an_op_without_forward_mode_derivatives_is_one_line_naming_the_fix(tmp_path, math):
    """Second derivatives are forward-over-reverse: attention on torch's default CPU kernel has no
    forward-mode derivative. The Hessian preconditioner, attach and exact influence then fail with one
    TaskError naming the math kernel, and on the math kernel (the fix the message gives) all three
    work and agree (exact preset against exact_influence, 1e-8)."""
    import warnings

    from msif_index.build import build_index
    from msif_index.config import PRESETS, BuildConfig
    from msif_index.data import full_batch
    from msif_index.exact import exact_influence
    from msif_index.index import InfluenceIndex

    task = AttentionTask(math)
    batch = full_batch(task.test_dataset(), [0, 1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")          # torch: no vmap batching rule for the flash kernel
        if not math:
            with pytest.raises(TaskError, match=r"'exact' preconditioner .*forward AD.*SDPBackend\.MATH"):
                build_index(task, tmp_path / "exact", PRESETS["exact"])
            path = build_index(task, tmp_path / "ekfac", BuildConfig(proj_dim=8, preconditioner="ekfac"))
            with InfluenceIndex.open(path) as index, \
                    pytest.raises(TaskError, match=r"attaching a finetuned model .*SDPBackend\.MATH"):
                index.attach(task)
            with pytest.raises(TaskError, match=r"exact influence .*SDPBackend\.MATH"):
                exact_influence(task, batch)
            return
        with InfluenceIndex.open(build_index(task, tmp_path / "exact", PRESETS["exact"])) as index:
            index.attach(task)
            got = index.scores(batch)
        ref = exact_influence(task, batch).numpy()
    assert abs(got - ref).max() / abs(ref).max() < 1e-8


def test_a_task_files_classes_pickle_across_processes(tmp_path):
    """load_task named the task's module after Python's salted str hash, so a model of the task file's
    own class saved whole (torch.save) in one `msif` command failed to load in the next: "No module
    named 'msif_user_task_4114073308566945305'". The name is now the same in every process."""
    import os
    import subprocess
    import sys
    task_file = tmp_path / "pickled.py"
    task_file.write_text("import torch\nclass Net(torch.nn.Module):\n"
                         "    def __init__(self):\n        super().__init__()\n"
                         "        self.lin = torch.nn.Linear(2, 1)\n"
                         "task = None\n")
    saved = tmp_path / "net.pt"
    code = ("import sys, torch\nfrom msif_index.task import load_task\n"
            "try:\n"
            f"    load_task({str(task_file) + ':task'!r}, validate=False)\n"
            "except Exception:\n    pass    # task = None: not a task, but the module is loaded\n"
            "mod = [m for n, m in sys.modules.items() if n.startswith('msif_user_task_')][0]\n"
            f"if sys.argv[1] == 'save': torch.save(mod.Net(), {str(saved)!r})\n"
            f"else: print(type(torch.load({str(saved)!r}, weights_only=False)).__name__)\n")
    for seed, step in (("1", "save"), ("2", "load")):
        proc = subprocess.run([sys.executable, "-c", code, step], capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONHASHSEED": seed})
        assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "Net"

"""The `msif` command line: help, build-index + query --json on the digits task, one-line errors."""
from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from msif_index.cli.main import main
from msif_index.data import full_batch
from msif_index.index import InfluenceIndex
from msif_index.lock import folder_lock

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "task.py"
MSIF = [sys.executable, "-m", "msif_index.cli.main"]

# a task that needs no training, so a fresh `msif` process loads it in a moment
TINY_TASK = '''
import torch
from torch import nn
from torch.utils.data import TensorDataset
import msif_index


class Net(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.embed = nn.Linear(4, 3)
        self.head = nn.Linear(3, c)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))


class Tiny(msif_index.MultiStageTask):
    shared_parameters = ("embed.weight", "embed.bias")
    finetune_weight_decay = 0.1

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        torch.manual_seed(0)
        self.pre, self.fin = Net(3), Net(2)
        self.fin.embed.load_state_dict(self.pre.embed.state_dict())
        self.data = [TensorDataset(torch.randn(m, 4, generator=g), torch.randint(0, c, (m,), generator=g))
                     for m, c in ((16, 3), (8, 2), (4, 2))]

    def pretrained_model(self): return self.pre
    def finetuned_model(self): return self.fin
    def pretrain_dataset(self): return self.data[0]
    def finetune_dataset(self): return self.data[1]
    def test_dataset(self): return self.data[2]
    def pretrain_loss(self, model, batch): return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")
    def finetune_loss(self, model, batch): return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")


task = Tiny()
'''


def _strict_json(text: str):
    """JSON as the standard defines it (no NaN / Infinity)."""
    def bad(constant):
        raise AssertionError(f"not valid JSON: {constant}")
    return json.loads(text, parse_constant=bad)


def _msif(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(MSIF + list(args), cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "tiny_task.py"
    path.write_text(TINY_TASK)
    return path


def test_the_default_index_folder_is_named_after_the_task_file(tmp_path, tiny, monkeypatch, capsys):
    """indexes/<file name>, or indexes/<folder name> for a task.py: two task files in one folder get
    two indexes (the folder's name for both once made one overwrite-refusing clash)."""
    from msif_index.cli.main import default_index_dir
    assert default_index_dir("examples/digits/task.py:task") == Path("indexes/digits")
    assert default_index_dir("/somewhere/trial/mytask.py:proximal_task") == Path("indexes/mytask")
    monkeypatch.chdir(tmp_path)
    main(["build-index", "--task", f"{tiny}:task", "--preconditioner", "identity", "--proj-dim", "8"])
    assert (tmp_path / "indexes" / "tiny_task" / "manifest.json").is_file()
    assert "indexes/tiny_task" in capsys.readouterr().out


def test_check_task_fails_when_second_derivatives_cannot_be_taken(tmp_path, capsys):
    """An operation without a forward-mode derivative (a custom autograd.Function without jvp here;
    attention on a fused kernel in practice) passes the per-example gradient probe but not the
    Hessian-vector product every attach needs: check-task says so in one line, exit 2, instead of
    a build that fails at its end."""
    src = TINY_TASK.replace("class Net(nn.Module):", """class Sq(torch.autograd.Function):
    @staticmethod
    def forward(x):
        return x * x

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return 2 * x * g


class Net(nn.Module):""").replace("return self.head(torch.tanh(self.embed(x)))",
                                  "return self.head(Sq.apply(torch.tanh(self.embed(x))))")
    f = tmp_path / "no_jvp_task.py"
    f.write_text(src)
    with pytest.raises(SystemExit) as e:
        main(["check-task", "--task", f"{f}:task"])
    err = [x for x in capsys.readouterr().err.strip().split("\n") if x.startswith("error")]
    assert e.value.code == 2 and len(err) == 1, err
    assert "needs second derivatives (forward-over-reverse)" in err[0] and "jvp" in err[0], err
    assert "attaching a finetuned model" in err[0]

    # only the pretraining loss without one, on a model whose default build is ekfac (no HVPs): a
    # warning, and the check passes; on the tiny model, whose default build is 'hessian', an error
    only_pre = src.replace("return self.head(Sq.apply(torch.tanh(self.embed(x))))",
                           "return self.head(torch.tanh(self.embed(x)))").replace(
        "def pretrain_loss(self, model, batch): return nn.functional.cross_entropy(model(batch[0]),",
        "def pretrain_loss(self, model, batch): return nn.functional.cross_entropy(Sq.apply(model(batch[0])),")
    assert only_pre.count("Sq.apply") == 1
    for width, fails in ((3, True), (3000, False)):
        f = tmp_path / f"pre_no_jvp_{width}.py"
        f.write_text(only_pre.replace("nn.Linear(4, 3)", f"nn.Linear(4, {width})").replace(
            "nn.Linear(3, c)", f"nn.Linear({width}, c)"))
        if fails:
            with pytest.raises(SystemExit) as e:
                main(["check-task", "--task", f"{f}:task"])
            err = capsys.readouterr().err
            assert e.value.code == 2 and "the pretraining Hessian" in err, err
            continue
        main(["check-task", "--task", f"{f}:task"])
        got = capsys.readouterr()
        assert ": OK (" in got.out and "the pretraining Hessian" in got.err, got
        assert "default preconditioner (ekfac) does not need them" in got.err, got.err


def test_help_lists_the_commands():
    proc = _msif("--help")
    assert proc.returncode == 0, proc.stderr
    for command in ("build-index", "attach", "query", "exact", "check-task", "info", "evaluate", "demo"):
        assert command in proc.stdout
    assert "negative = helpful" in proc.stdout.replace("\n", " ")       # the sign convention, once


def test_build_index_exposes_every_config_field_with_its_preset_defaults(tmp_path, tiny, capsys):
    """Every BuildConfig field is a build-index option, its help gives each preset's value, and the
    options reach the saved config."""
    from dataclasses import fields

    from msif_index.config import BuildConfig
    proc = subprocess.run(MSIF + ["build-index", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.translate({ord(c): " " for c in "│╭╮╰╯─"}).split())     # rich's box, unwrapped
    for f in fields(BuildConfig):
        assert f"--{f.name.replace('_', '-')}" in text, f.name
    assert "Default, per --preset: default -> 4096, exact -> 0 (none), fast -> 1024." in text
    assert "Rows per resumable shard of the featurize pass. Default: 16384." in text
    main(["build-index", "--task", f"{tiny}:task", "--out", str(tmp_path / "idx"), "--preconditioner", "kfac",
          "--stats-examples", "5", "--shard-rows", "6", "--proj-dim", "8", "--no-attach", "--json"])
    capsys.readouterr()
    config = json.loads((tmp_path / "idx" / "manifest.json").read_text())["config"]
    assert config["stats_examples"] == 5 and config["shard_rows"] == 6 and config["preconditioner"] == "kfac"
    # another --factory: the command says only the search index was rebuilt
    base = ["build-index", "--task", f"{tiny}:task", "--out", str(tmp_path / "idx"), "--preconditioner", "kfac",
            "--stats-examples", "5", "--proj-dim", "8", "--no-attach"]
    main(base + ["--factory", "HNSW8"])
    assert "search index rebuilt over the same rows: Flat -> HNSW8" in capsys.readouterr().out
    main(base + ["--factory", "Flat", "--json"])
    summary = _strict_json(capsys.readouterr().out)
    assert summary["search_rebuilt_from"] == "HNSW8" and summary["factory"] == "Flat" and not summary["reused"]


def test_build_index_then_query_json_on_digits(tmp_path, capsys, digits_frozen):
    """In-process (the session's trained digits task is reused: load_task caches the module)."""
    out = tmp_path / "idx"
    task_spec = f"{DIGITS}:task"
    main(["build-index", "--task", task_spec, "--out", str(out), "--proj-dim", "128",
          "--preconditioner", "kfac", "--json"])
    summary = _strict_json(capsys.readouterr().out)
    assert summary["n"] == 300 and summary["preconditioner"] == "kfac" and summary["attached"]
    assert (out / "manifest.json").exists() and (out / "operators" / f"{summary['attached']}.h5").exists()

    test_ids = [0, 3, 4, 5]
    for direction in ("helpful", "harmful"):
        main(["query", "--index", str(out), "--task", task_spec, "--test-ids", "0,3-5", "--k", "7",
              "--direction", direction, "--json"])
        res = _strict_json(capsys.readouterr().out)
        assert res["test_ids"] == test_ids and res["direction"] == direction and res["method"] == "index"
        ids, scores = np.array(res["ids"]), np.array(res["scores"])
        assert ids.shape == scores.shape == (4, 7)
        assert ((ids >= 0) & (ids < 300)).all() and all(len(set(row)) == 7 for row in ids.tolist())
        if direction == "helpful":
            assert (np.diff(scores, axis=1) >= 0).all()            # most negative (helpful) first
        else:
            assert (np.diff(scores, axis=1) <= 0).all()
        with InfluenceIndex.open(out) as index:                     # the same as the library's answer
            index.attach(digits_frozen)
            lib = index.query(full_batch(digits_frozen.test_dataset(), test_ids), k=7, direction=direction)
        np.testing.assert_array_equal(ids, lib.ids)
        np.testing.assert_allclose(scores, lib.scores, rtol=1e-6)
        # what the ranking is about: each test point's label and loss on the finetuned model
        test = digits_frozen.test_dataset()
        assert res["test_labels"] == [int(test[i][1]) for i in test_ids]
        loss = digits_frozen.finetune_loss(digits_frozen.finetuned_model(), full_batch(test, test_ids))
        np.testing.assert_allclose(res["test_measurement"], loss.detach().numpy(), rtol=1e-9)
        assert res["measurement"] == "finetuning loss"

    main(["query", "--index", str(out), "--task", task_spec, "--test-ids", "2", "--k", "3"])
    text = capsys.readouterr().out
    loss2 = float(digits_frozen.finetune_loss(digits_frozen.finetuned_model(),
                                              full_batch(digits_frozen.test_dataset(), [2]))[0].detach())
    assert "negative = helpful" in text
    assert f"test 2 (label {int(digits_frozen.test_dataset()[2][1])}, loss {loss2:.4g}): most helpful" in text

    # the same command again with --overwrite: the healthy index is checked, not rebuilt, and says so;
    # a damaged one is rebuilt with one warning line
    main(["build-index", "--task", task_spec, "--out", str(out), "--proj-dim", "128", "--preconditioner", "kfac",
          "--overwrite", "--no-attach"])
    captured = capsys.readouterr()
    assert "nothing rebuilt (every row and file checked)" in captured.out
    (out / "rows.h5").unlink()
    main(["build-index", "--task", task_spec, "--out", str(out), "--proj-dim", "128", "--preconditioner", "kfac",
          "--overwrite", "--no-attach"])
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("warning: rebuilding the damaged index"), captured.err
    assert "nothing rebuilt" not in captured.out

    # a Kronecker-factored H_tt, attached as its own operator next to the dense one
    main(["attach", "--index", str(out), "--task", task_spec, "--h-tt", "ekfac", "--cg-iters", "2", "--json"])
    res = _strict_json(capsys.readouterr().out)
    assert res["h_tt"] == "ekfac" and res["attached"] != summary["attached"]
    assert len(list((out / "operators").glob("*.h5"))) == 2


@pytest.mark.parametrize("case", ["bad-test-ids", "reversed-test-id-range", "test-id-out-of-range",
                                  "missing-task-file", "task-without-name", "missing-index"])
def test_errors_are_one_line_with_exit_code_2(tmp_path, tiny, case):
    spec = f"{tiny}:task"
    args = {
        "bad-test-ids": ["exact", "--task", spec, "--test-ids", "1,x"],
        "reversed-test-id-range": ["exact", "--task", spec, "--test-ids", "3-1"],
        "test-id-out-of-range": ["query", "--index", str(tmp_path / "idx"), "--task", spec, "--test-ids", "2,9"],
        "missing-task-file": ["check-task", "--task", f"{tmp_path / 'nowhere.py'}:task"],
        "task-without-name": ["build-index", "--task", str(tiny), "--out", str(tmp_path / "idx")],
        "missing-index": ["query", "--index", str(tmp_path / "nope"), "--task", spec, "--test-ids", "0"],
    }[case]
    proc = _msif(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    lines = proc.stderr.strip("\n").split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    expected = {"bad-test-ids": "1,x", "reversed-test-id-range": "write 1-3", "test-id-out-of-range": "[9]", "missing-task-file": "nowhere.py",
                "task-without-name": "FILE.py:NAME", "missing-index": "nope"}[case]
    assert expected in lines[0]


def test_tiny_task_works_end_to_end_in_a_fresh_process(tmp_path, tiny):
    """The same process boundary as a user's: build-index, then query in another process."""
    out = tmp_path / "idx"
    proc = _msif("build-index", "--task", f"{tiny}:task", "--out", str(out), "--preset", "exact", "--json")
    assert proc.returncode == 0, proc.stderr
    assert _strict_json(proc.stdout)["n"] == 16
    proc = _msif("query", "--index", str(out), "--task", f"{tiny}:task", "--test-ids", "0-3", "--k", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    res = _strict_json(proc.stdout)
    ids = np.array(res["ids"])
    assert ids.shape == (4, 16) and all(sorted(row) == list(range(16)) for row in ids.tolist())
    proc = _msif("info", "--index", str(out))                 # what the index holds, attached models included
    assert proc.returncode == 0, proc.stderr
    assert f"index {out}: n=16 rows" in proc.stdout and "preconditioner exact" in proc.stdout
    assert "attached " in proc.stdout and "frozen" in proc.stdout
    with folder_lock(out):                                     # another build writing the folder (this process)
        proc = _msif("build-index", "--task", f"{tiny}:task", "--out", str(out), "--preset", "exact", "--overwrite")
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
        assert f"being written by another msif build (process {os.getpid()})" in proc.stderr
        proc = _msif("info", "--index", str(out))
        assert f"a build (process {os.getpid()}) is writing this folder now" in proc.stdout
    # the exact command ranks the same way (exact preset), with the same test point information
    proc = _msif("exact", "--task", f"{tiny}:task", "--test-ids", "0-3", "--k", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    ex = _strict_json(proc.stdout)
    # one schema for both commands: the same keys in the same order (exact has no attached model)
    assert list(ex) == list(res) and ex["method"] == "exact" and ex["finetuned"] is None
    assert res["finetuned"] and isinstance(res["finetuned"], str)
    np.testing.assert_allclose(ex["scores"], res["scores"], rtol=1e-6, atol=1e-12)
    assert ex["test_labels"] == res["test_labels"] and len(ex["test_labels"]) == 4
    np.testing.assert_allclose(ex["test_measurement"], res["test_measurement"], rtol=1e-6)


@pytest.mark.parametrize("args, expected", [(["query", "--bogus"], "No such option: --bogus"),
                                            (["build-index"], "Missing option"),
                                            (["no-such-command"], "No such command")])
def test_usage_errors_exit_2_without_traceback(args, expected):
    """Usage errors come from click (typer < 0.2x) or typer's vendored click: both give click's short
    usage message and exit code 2, never a traceback."""
    proc = _msif(*args)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert expected in proc.stderr and "Traceback" not in proc.stderr


def test_usage_errors_exit_2_where_another_click_is_installed(monkeypatch, capsys):
    """typer >= 0.2x raises its vendored click's exceptions even where a separate click package is
    importable (the H200 machine: typer 0.27 beside click 8): those must be caught as well. A stand-in
    `click` whose exception classes typer never raises plays that package here."""
    import types

    fake = types.ModuleType("click")
    fake.exceptions = types.ModuleType("click.exceptions")
    for name in ("ClickException", "Exit", "Abort"):
        setattr(fake.exceptions, name, type(name, (Exception,), {}))
    monkeypatch.setitem(sys.modules, "click", fake)
    monkeypatch.setitem(sys.modules, "click.exceptions", fake.exceptions)
    with pytest.raises(SystemExit) as e:
        main(["no-such-command"])
    assert e.value.code == 2
    assert "No such command" in capsys.readouterr().err


def test_query_nprobe_reaches_the_ivf_index(tmp_path, tiny):
    """--nprobe is passed to an IVF index (all lists visited: the exact top-k), and refused by
    others with one line."""
    out = tmp_path / "ivf"
    proc = _msif("build-index", "--task", f"{tiny}:task", "--out", str(out), "--factory", "IVF2,Flat", "--json")
    assert proc.returncode == 0, proc.stderr
    proc = _msif("query", "--index", str(out), "--task", f"{tiny}:task", "--test-ids", "0,1", "--k", "16",
                 "--nprobe", "2", "--json")
    assert proc.returncode == 0, proc.stderr
    ids = np.array(_strict_json(proc.stdout)["ids"])
    assert all(sorted(row) == list(range(16)) for row in ids.tolist())
    flat = tmp_path / "flat"
    assert _msif("build-index", "--task", f"{tiny}:task", "--out", str(flat), "--json").returncode == 0
    proc = _msif("query", "--index", str(flat), "--task", f"{tiny}:task", "--test-ids", "0", "--nprobe", "2")
    assert proc.returncode == 2 and "nprobe applies only to IVF" in proc.stderr and "Traceback" not in proc.stderr


# What torch raises for Ctrl-C landing inside a TorchScript function (LayerNorm's backward during the
# statistics phase's HVPs): many lines, the KeyboardInterrupt only on the last one.
TORCHSCRIPT_INTERRUPT = ("The following operation failed in the TorchScript interpreter.\n"
                         "Traceback of TorchScript (most recent call last):\n"
                         '  File "<string>", line 48, in layer_norm_backward\n'
                         "RuntimeError: KeyboardInterrupt: <EMPTY MESSAGE>\n")


@pytest.mark.parametrize("raised", ["KeyboardInterrupt", "RuntimeError('KeyboardInterrupt: <EMPTY MESSAGE>')",
                                    f"RuntimeError({TORCHSCRIPT_INTERRUPT!r})"])
def test_ctrl_c_exits_130_with_one_line(tmp_path, tiny, raised):
    """typer turns Ctrl-C into exit code 130 and, outside standalone mode, returns it: the command must
    not look successful (exit 0) or silent. Ctrl-C inside torch's C++ code (vmap, a LayerNorm
    decomposition) comes back as ``RuntimeError: KeyboardInterrupt: ...``, inside TorchScript as a
    many-line RuntimeError ending in that line (was: a 60-line traceback, exit 1): the same one line."""
    path = tmp_path / "interrupted.py"
    path.write_text(tiny.read_text() + "\nclass Interrupted(Tiny):\n"
                    f"    def pretrain_loss(self, model, batch): raise {raised}\n\n"
                    "task = Interrupted()\n")
    proc = _msif("build-index", "--task", f"{path}:task", "--out", str(tmp_path / "idx"))
    assert proc.returncode == 130, (proc.returncode, proc.stderr)
    assert proc.stderr.strip() == "interrupted; rerun the same command to resume", proc.stderr


def test_sigterm_exits_143_with_one_line_and_the_rerun_finishes(tmp_path, tiny):
    """SIGTERM (what `kill PID` and job schedulers send) ends a build as Ctrl-C does: one line, exit
    143 (was: killed silently), no temporary file left; the same command then finishes the index."""
    path = tmp_path / "terminated.py"
    flag = tmp_path / "terminate"
    flag.write_text("")
    path.write_text(tiny.read_text() + "\nimport os, signal\nclass Terminated(Tiny):\n"
                    "    def pretrain_loss(self, model, batch):\n"
                    f"        if os.path.exists({str(flag)!r}) and model.training is False and batch[0].shape[0] > 2:\n"
                    "            os.kill(os.getpid(), signal.SIGTERM)\n"
                    "        return super().pretrain_loss(model, batch)\n\n"
                    "task = Terminated()\n")
    out = tmp_path / "idx"
    proc = _msif("build-index", "--task", f"{path}:task", "--out", str(out), "--no-attach")
    assert proc.returncode == 143, (proc.returncode, proc.stderr)
    assert proc.stderr.strip().splitlines()[-1] == "terminated (SIGTERM); rerun the same command to resume"
    assert "Traceback" not in proc.stderr
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name]
    flag.unlink()
    proc = _msif("build-index", "--task", f"{path}:task", "--out", str(out), "--no-attach")
    assert proc.returncode == 0, proc.stderr
    assert (out / "manifest.json").exists()


@pytest.mark.parametrize("message", ["KeyboardInterrupt: <EMPTY MESSAGE>", TORCHSCRIPT_INTERRUPT])
def test_ctrl_c_inside_torch_outside_task_code_exits_130(tmp_path, tiny, capsys, monkeypatch, message):
    """torch's RuntimeError('KeyboardInterrupt: ...') raised outside the task's code (not wrapped in
    an msif error): exit 130 and the one line too."""
    import msif_index.build

    def interrupted(*args, **kwargs):
        raise RuntimeError(message)
    monkeypatch.setattr(msif_index.build, "build_index", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["build-index", "--task", f"{tiny}:task", "--out", str(tmp_path / "idx")])
    assert e.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted; rerun the same command to resume"


@pytest.mark.parametrize("err", [errno.EROFS, errno.EACCES, errno.ENOSPC])
def test_file_system_errors_are_one_line(tmp_path, tiny, capsys, monkeypatch, err):
    """A read-only, forbidden or full folder: one line naming the file and what to do, exit 2."""
    import msif_index.build

    def refuse(*args, **kwargs):
        raise OSError(err, os.strerror(err), str(tmp_path / "idx" / "rows.h5"))
    monkeypatch.setattr(msif_index.build, "build_index", refuse)
    with pytest.raises(SystemExit) as e:
        main(["build-index", "--task", f"{tiny}:task", "--out", str(tmp_path / "idx")])
    assert e.value.code == 2
    lines = capsys.readouterr().err.strip().split("\n")
    assert len(lines) == 1 and lines[0].startswith("error: ") and "rows.h5" in lines[0], lines
    assert os.strerror(err) in lines[0]


def test_errors_in_the_task_code_are_one_line_naming_the_line(tmp_path, tiny, capsys, monkeypatch):
    """An exception the task's own code raises (a missing weights file, a bug in a loss) is one line
    with its type, message and FILE:LINE in FUNC, exit 2; MSIF_TRACEBACK=1 lets it through. Errors
    of msif's own code keep their traceback."""
    monkeypatch.chdir(tmp_path)
    src = tiny.read_text()
    missing = tmp_path / "missing_weights_task.py"
    missing.write_text(src.replace("    def pretrained_model(self): return self.pre",
                                   "    def pretrained_model(self):\n        return torch.load('no_such_weights.pt')"))
    line = 1 + missing.read_text().splitlines().index("        return torch.load('no_such_weights.pt')")
    with pytest.raises(SystemExit) as e:
        main(["check-task", "--task", f"{missing}:task"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().split("\n")
    assert len(err) == 1 and err[0].startswith("error: the task's code raised FileNotFoundError"), err
    assert f"missing_weights_task.py:{line} in pretrained_model" in err[0] and "MSIF_TRACEBACK=1" in err[0]

    broken = tmp_path / "broken_loss_task.py"         # the task check's own message gets the line too
    broken.write_text(src.replace("    def pretrain_loss(self, model, batch): return",
                                  "    def pretrain_loss(self, model, batch): raise KeyError('label'); return"))
    with pytest.raises(SystemExit) as e:
        main(["build-index", "--task", f"{broken}:task", "--out", str(tmp_path / "idx"), "--no-attach"])
    err = capsys.readouterr().err.strip().split("\n")
    assert e.value.code == 2 and len(err) == 1 and "KeyError: 'label'" in err[0], err
    assert "broken_loss_task.py:" in err[0] and "in pretrain_loss" in err[0]

    late = tmp_path / "late_error_task.py"            # raised inside the build's gradient pass (batches of 16)
    late.write_text(src.replace("    def pretrain_loss(self, model, batch): return",
                                "    def pretrain_loss(self, model, batch):\n"
                                "        if len(batch[0]) > 2: raise ValueError('corrupt example')\n"
                                "        return"))
    with pytest.raises(SystemExit) as e:
        main(["build-index", "--task", f"{late}:task", "--out", str(tmp_path / "idx2"), "--no-attach",
              "--preconditioner", "identity"])
    err = capsys.readouterr().err.strip().split("\n")
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: the task's code raised ValueError: corrupt example (late_error_task.py:"), err

    # raised inside the standard library called from the task, run from the task's folder: the task's
    # line is named, not "<frozen os>"
    env = tmp_path / "env_task.py"
    env.write_text(src.replace("import torch\n", "import os\nimport torch\n", 1).replace(
        "    def pretrained_model(self): return self.pre",
        "    def pretrained_model(self): return os.environ['MSIF_NO_SUCH_VARIABLE']"))
    with pytest.raises(SystemExit):
        main(["check-task", "--task", f"{env}:task"])
    err = capsys.readouterr().err.strip()
    assert "KeyError: 'MSIF_NO_SUCH_VARIABLE' (env_task.py:" in err and "in pretrained_model" in err, err

    monkeypatch.setenv("MSIF_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError):
        main(["check-task", "--task", f"{missing}:task"])
    monkeypatch.delenv("MSIF_TRACEBACK")

    import msif_index.task

    def internal(*args, **kwargs):
        raise RuntimeError("a bug in msif")
    monkeypatch.setattr(msif_index.task, "split_parameters", internal)
    with pytest.raises(RuntimeError, match="a bug in msif"):
        main(["check-task", "--task", f"{tiny}:task"])


def test_a_query_the_tasks_measurement_fails_on_names_its_line(tmp_path, tiny, capsys, monkeypatch):
    """msif query on a task whose measurement raises: one line naming the task's file and line (not
    a "does not fit" batch, which msif itself built from the task's test set); MSIF_TRACEBACK=1 also
    prints the traceback down to the task's raise."""
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "idx"
    main(["build-index", "--task", f"{tiny}:task", "--out", str(out), "--preconditioner", "identity",
          "--proj-dim", "8"])
    capsys.readouterr()
    bad = tmp_path / "bad_measurement_task.py"
    bad.write_text(TINY_TASK.replace("\n\ntask = Tiny()", "\n    def measurement(self, model, batch):\n"
                                     "        if len(batch[0]) == 1:  # the task check's batch of 2 passes\n"
                                     "            raise ValueError('boom in my measurement')\n"
                                     "        return self.finetune_loss(model, batch)\n\n\ntask = Tiny()"))
    line = 1 + bad.read_text().splitlines().index("            raise ValueError('boom in my measurement')")
    with pytest.raises(SystemExit) as e:
        main(["query", "--index", str(out), "--task", f"{bad}:task", "--test-ids", "0"])
    err = [x for x in capsys.readouterr().err.strip().split("\n") if x.startswith("error")]
    assert e.value.code == 2 and len(err) == 1, err
    assert err[0].startswith("error: the task's code raised ValueError: boom in my measurement"), err
    assert f"bad_measurement_task.py:{line} in measurement" in err[0]
    monkeypatch.setenv("MSIF_TRACEBACK", "1")
    with pytest.raises(SystemExit):
        main(["query", "--index", str(out), "--task", f"{bad}:task", "--test-ids", "0"])
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "raise ValueError('boom in my measurement')" in err
    assert err.strip().splitlines()[-1].startswith("error: the task's code raised ValueError")


RNN_TASK = TINY_TASK.replace("""        self.embed = nn.Linear(4, 3)
        self.head = nn.Linear(3, c)

    def forward(self, x):
        return self.head(torch.tanh(self.embed(x)))""", """        self.embed = nn.Linear(4, 3)
        self.rnn = nn.LSTM(3, 3, batch_first=True)
        self.head = nn.Linear(3, c)

    def forward(self, x):
        out, _ = self.rnn(torch.tanh(self.embed(x)).unsqueeze(1))
        return self.head(out[:, -1])""").replace("self.pre, self.fin = Net(3), Net(2)",
                                          "self.pre, self.fin = Net(3).double(), Net(2).double()").replace(
    "torch.randn(m, 4, generator=g)", "torch.randn(m, 4, generator=g).double()")


def test_check_task_reports_the_per_example_gradient_paths(tmp_path, tiny, capsys):
    """check-task computes per-example gradients on a few examples, as a build would: it names the
    factored and the dense blocks, says when vmap cannot batch the dense path (an LSTM without an
    initial state: one example at a time, with the fix), and fails in one line where the build
    would (a weight used outside its module, which the factored path cannot see)."""
    main(["check-task", "--task", f"{tiny}:task", "--json"])
    grads = _strict_json(capsys.readouterr().out)["gradients"]
    assert grads == {"kronecker": ["embed", "head"], "dense": [], "dense_batched": None}

    assert "self.rnn" in RNN_TASK and "Net(3).double()" in RNN_TASK     # float64: torch's LSTM kernel vmap fails on
    rnn = tmp_path / "rnn_task.py"
    rnn.write_text(RNN_TASK)
    main(["check-task", "--task", f"{rnn}:task"])
    out = capsys.readouterr().out
    assert "factored (Kronecker) for embed, head; dense path for rnn.weight_ih_l0" in out, out
    assert "one example at a time (vmap cannot batch it)" in out and "pass hx explicitly" in out
    hx = tmp_path / "rnn_hx_task.py"          # an initial state built from the input: vmap batches it
    hx.write_text(RNN_TASK.replace("self.rnn(torch.tanh(self.embed(x)).unsqueeze(1))",
                                   "self.rnn(torch.tanh(self.embed(x)).unsqueeze(1), "
                                   "(x.new_zeros(1, x.shape[0], 3), x.new_zeros(1, x.shape[0], 3)))"))
    main(["check-task", "--task", f"{hx}:task", "--json"])
    assert _strict_json(capsys.readouterr().out)["gradients"]["dense_batched"] is True

    shared = tmp_path / "shared_weight_task.py"     # embed.weight also used outside its module
    shared.write_text(TINY_TASK.replace("return self.head(torch.tanh(self.embed(x)))",
                                        "return self.head(torch.tanh(self.embed(x))) "
                                        "* (1 + 0.5 * (x @ self.embed.weight.T)[:, :1])"))
    assert "* (1 + 0.5 * (x @ self.embed.weight.T)" in shared.read_text()
    with pytest.raises(SystemExit) as e:
        main(["check-task", "--task", f"{shared}:task"])
    err = capsys.readouterr().err.strip().split("\n")
    assert e.value.code == 2 and len(err) == 1 and err[0].startswith("error: ") and "embed" in err[0], err


def test_full_disk_during_a_build_is_one_line_and_the_rerun_resumes(tmp_path, tiny):
    """A real full disk: a 900 KiB tmpfs in a private mount namespace (`unshare -rm`; skipped, with the
    reason, where this Linux forbids unprivileged namespaces).

    1. With the free-space checks off (a disk filled by another writer after they passed), the build
       stops when HDF5 meets the full disk: the one-line DiskFullError, exit 2, no traceback and no
       crash (HDF5's failed writes are not retried at exit); the finished shard stays, the temporary
       one is gone.
    2. The same command with the checks on stops at once, before any gradient, with one line naming
       the space the remaining rows need; the finished shard is untouched.
    3. With space again, the same command resumes to a complete index."""
    import shutil
    if shutil.which("unshare") is None:
        pytest.skip("needs util-linux unshare")
    big = tmp_path / "big_task.py"
    big.write_text(tiny.read_text().replace("for m, c in ((16, 3), (8, 2), (4, 2))",
                                            "for m, c in ((40000, 3), (8, 2), (4, 2))"))
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    args = ["build-index", "--task", f"{big}:task", "--out", str(mnt / "idx"), "--preconditioner", "ekfac",
            "--proj-dim", "8", "--no-attach"]
    unchecked = tmp_path / "unchecked.py"
    unchecked.write_text("import sys\nimport msif_index.build, msif_index.store\n"
                         "msif_index.build.check_free_space = msif_index.store.check_free_space = lambda *a: None\n"
                         "from msif_index.cli.main import main\nmain(sys.argv[1:])\n")
    cmd = " ".join(MSIF + args)
    cmd_unchecked = " ".join([sys.executable, str(unchecked)] + args)
    script = (f"mount -t tmpfs -o size=900k tmpfs {mnt} || exit 99; {cmd_unchecked} 2> {tmp_path}/err1; "
              f"echo rc=$?; ls -a {mnt}/idx/shards; {cmd} 2> {tmp_path}/err2; echo rc1=$?; ls -a {mnt}/idx/shards; "
              f"mount -o remount,size=16m {mnt}; {cmd} --json > {tmp_path}/second.json; echo rc2=$?")
    proc = subprocess.run(["unshare", "-rm", "sh", "-c", script], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    if proc.returncode == 99 or "unshare:" in proc.stderr:
        pytest.skip(f"no private tmpfs here: {proc.stderr.strip()[:120]}")
    assert "rc=2" in proc.stdout, (proc.stdout, proc.stderr)
    err = [line for line in (tmp_path / "err1").read_text().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: disk full while writing"), err
    listings = proc.stdout.split("rc1=")
    assert "shard_00000.h5" in listings[0] and ".tmp-" not in proc.stdout      # finished shard kept, temp gone
    assert "rc1=2" in proc.stdout, proc.stdout
    err = [line for line in (tmp_path / "err2").read_text().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: not enough free space for the rows of 23,616 examples"), err
    assert "shard_00000.h5" in listings[1]
    assert "rc2=0" in proc.stdout, proc.stdout
    assert _strict_json((tmp_path / "second.json").read_text())["n"] == 40000


def test_json_output_is_strict_and_labels_are_scalars(capsys):
    """--json never prints NaN / Infinity (not JSON): they become null; a label is the item's second
    entry when it is one finite number or string (tensor, numpy or Python), else null."""
    import torch

    from msif_index.cli.output import label_value, print_json
    print_json({"a": [1.0, float("nan"), float("inf")], "b": np.array([2.0, -np.inf]), "c": "x"})
    assert _strict_json(capsys.readouterr().out) == {"a": [1.0, None, None], "b": [2.0, None], "c": "x"}
    items = [(0, torch.tensor(3)), (0, torch.tensor([1, 2])), (0, np.int64(4)), (0, 2.5), (0, float("nan")),
             (0, "cat"), (0, np.array([7])), (0, None), (0,), (0, 5, 99), "no tuple"]
    assert [label_value(items, i) for i in range(len(items))] == [3, None, 4, 2.5, None, "cat", 7, None, None,
                                                                  5, None]
    # Hugging Face style dict items: a scalar "label" / "labels" entry; a token sequence's is not shown
    items = [{"input_ids": torch.arange(4), "label": torch.tensor(1)}, {"x": 0, "labels": "neg"},
             {"input_ids": torch.arange(4), "labels": torch.arange(4)}, {"input_ids": torch.arange(4)}]
    assert [label_value(items, i) for i in range(len(items))] == [1, "neg", None, None]


def test_id_ranges_are_checked_before_they_are_expanded():
    """'0-1000000000000' is refused in one line at once, not after expanding a huge range in memory."""
    import time

    from msif_index.cli.output import parse_ids
    from msif_index.errors import ConfigError
    t0 = time.perf_counter()
    with pytest.raises(ConfigError) as e:
        parse_ids("0-1000000000000", 60, "test")
    assert time.perf_counter() - t0 < 1.0
    assert "0..59" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError):
        parse_ids("-3-2", 60, "test")
    assert parse_ids("3,5-7", 60, "test") == [3, 5, 6, 7]
    assert parse_ids(" 3, 5 ", 60, "test") == [3, 5]


@pytest.mark.parametrize("text,says", [("0,,1", "empty item"), ("0,1,", "empty item"), (",", "empty item"),
                                        ("0,0", "id 0 is given twice"), ("1-5,3", "id 3 is given twice")])
def test_id_lists_with_empty_items_or_repeats_are_refused(text, says):
    """'0,,1' is not read as 0,1 (a typo drops nothing silently) and '0,0' does not run test 0 twice."""
    from msif_index.cli.output import parse_ids
    from msif_index.errors import ConfigError
    with pytest.raises(ConfigError, match=says) as e:
        parse_ids(text, 60, "test")
    assert "\n" not in str(e.value)


def test_ranking_table_says_when_an_approximate_index_found_fewer(capsys):
    """-1 ids (an IVF search that visited too few lists) are not rows of the table: a line says how
    many were found."""
    from msif_index.cli.output import print_ranking

    print_ranking({"test_ids": [4], "direction": "helpful", "ids": [[3, 7, -1, -1]],
                   "scores": [[-2.0, -1.0, None, float("nan")]]})
    out = capsys.readouterr().out
    assert "found 2 of 4" in out and "--nprobe" in out
    assert len([ln for ln in out.splitlines() if ln.strip()[:1].isdigit()]) == 2
    print_ranking({"test_ids": [4], "direction": "helpful", "ids": [[3, 7]], "scores": [[-2.0, -1.0]]})
    assert "found" not in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:the projected pretraining Hessian")
@pytest.mark.parametrize("damaged", ["preconditioner.h5", "shard", "operator"])
def test_info_verify_finds_a_truncated_file_that_plain_info_does_not_read(tmp_path, tiny, capsys, damaged):
    """msif info reads headers only (instant at any n); --verify reads every row and checks every
    checksum: a truncated preconditioner.h5, shard or attached operator is one problem line and exit
    1 (a trial found plain info silent about the first two, and --verify exiting 0 on the third); a
    healthy index gets a line saying it was verified."""
    from msif_index.build import build_index
    from msif_index.config import BuildConfig
    from msif_index.task import load_task
    task = load_task(f"{tiny}:task")
    out = build_index(task, tmp_path / "idx", BuildConfig(proj_dim=8, shard_rows=8), progress_bar=False)
    with InfluenceIndex.open(out) as index:
        index.attach(task, progress_bar=False)
    main(["info", "--index", str(out), "--verify"])                  # healthy: no problem, exit 0
    text = capsys.readouterr().out
    assert "problem:" not in text and "verified: every row" in text
    assert "projection proj_dim=8 (8 coordinates for " in text        # how much the projection keeps
    victim = {"preconditioner.h5": out / "preconditioner.h5", "shard": sorted((out / "shards").iterdir())[-1],
              "operator": next((out / "operators").glob("*.h5"))}[damaged]
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    main(["info", "--index", str(out)])
    text = capsys.readouterr().out
    assert "verified" not in text
    # plain info reads headers only: a damaged shard or preconditioner.h5 is not seen; an operator's
    # seal (a checksum of its small file) is checked even then, and said, with exit 0
    assert ("problem: the finetune operator" in text) == (damaged == "operator"), text
    with pytest.raises(SystemExit) as e:
        main(["info", "--index", str(out), "--verify"])
    text = capsys.readouterr().out
    assert e.value.code == 1
    from msif_index.info import describe
    assert describe(out, verify=True)["verified"] is False
    problems = [line for line in text.splitlines() if line.startswith("  problem:")]
    remedy = "the next attach of this model computes it again" if damaged == "operator" else "--overwrite"
    assert len(problems) == 1 and remedy in problems[0], text
    # a shard is read through rows.h5 (virtual datasets over the shards), whose error the message
    # carries: it names the shard too (before: only rows.h5), as truncated
    names = {"shard": (f"shards/{victim.name} is truncated",), "preconditioner.h5": ("preconditioner",),
             "operator": (f"finetune operator {victim.stem} is damaged",)}[damaged]
    assert any(name in problems[0] for name in names), problems


def test_an_ignored_sigint_stays_ignored_while_the_command_line_loads():
    """A job a script starts with `&` ignores SIGINT: the entry point must not turn that into exit 130."""
    code = ("import os, signal, sys\n"
            "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
            "class SignalMidImport:\n"
            "    def find_spec(self, name, path, target=None):\n"
            "        if name == 'msif_index.cli.main':\n"
            "            os.kill(os.getpid(), signal.SIGINT)\n"
            "sys.meta_path.insert(0, SignalMidImport())\n"
            "import msif_index.cli\n"
            "sys.argv = ['msif', 'info', '--index', 'nowhere']\n"
            "msif_index.cli.run()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "no msif index in nowhere" in proc.stderr, (proc.returncode, proc.stderr)


@pytest.mark.parametrize("sig, code, line", [("SIGINT", 130, "interrupted"), ("SIGTERM", 143, "terminated (SIGTERM)")])
def test_a_signal_while_the_command_line_loads_is_one_line(sig, code, line):
    """Ctrl-C in the first second or two of any `msif` command (torch, faiss and typer loading)
    printed a 14-28-line KeyboardInterrupt traceback from inside `import torch`, or aborted the process
    from torch's C++ initialization: the console entry point (msif_index.cli:run) holds SIGINT and
    SIGTERM while it loads the command line, then ends with one line. `import msif_index` loads
    neither torch nor faiss, so the hold covers them."""
    finder = ("import os, signal, sys\n"
              "class SignalMidImport:\n"
              "    def find_spec(self, name, path, target=None):\n"
              "        if name == 'msif_index.cli.main':\n"
              f"            os.kill(os.getpid(), signal.{sig})\n"
              "sys.meta_path.insert(0, SignalMidImport())\n"
              "import msif_index, msif_index.cli\n"
              "assert 'torch' not in sys.modules and 'faiss' not in sys.modules\n"
              "sys.argv = ['msif', 'info', '--index', 'nowhere']\n"
              "msif_index.cli.run()\n")
    proc = subprocess.run([sys.executable, "-c", finder], capture_output=True, text=True, timeout=60)
    assert proc.returncode == code and proc.stderr == line + "\n", (proc.returncode, proc.stderr)


@pytest.mark.parametrize("delay", [0.3, 0.7])
def test_a_real_ctrl_c_during_startup_exits_130_without_a_traceback(tmp_path, delay):
    """The installed console script, SIGINT while it starts: one line, exit 130, whichever side of
    the command line's loading it lands on (at 0.3 s it once aborted inside torch's C++
    initialization: exit -6). Not in the interpreter's own first milliseconds, before any of msif
    runs (Python's default: a traceback from its startup imports)."""
    import shutil
    import signal
    import time
    script = shutil.which("msif", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the msif console script is not installed next to this Python (pip install -e .)")
    proc = subprocess.Popen([script, "info", "--index", str(tmp_path / "nowhere")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    if proc.returncode == 2:                 # finished before the signal (a fast machine): its error
        assert "no msif index" in err
        return
    assert proc.returncode == 130 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err


def test_the_console_entry_point_ends_a_finished_command_at_once(tmp_path, tiny):
    """msif_index.cli:run ends with os._exit once the command is done (the interpreter's teardown of
    torch and faiss took about a second, during which a Ctrl-C ended a finished build with exit 130
    and no message), after what Python's own exit does that matters: non-daemon threads joined,
    atexit handlers run, stdout flushed (a pipe gets everything), the exit status kept."""
    out = tmp_path / "idx"
    main(["build-index", "--task", f"{tiny}:task", "--out", str(out), "--preconditioner", "identity",
          "--proj-dim", "8"])
    code = ("import atexit, concurrent.futures, sys, threading, time\n"
            f"atexit.register(lambda: open({str(tmp_path / 'atexit')!r}, 'w').close())\n"
            "def late():\n"
            "    time.sleep(0.5)\n"
            f"    open({str(tmp_path / 'thread')!r}, 'w').close()\n"
            "threading.Thread(target=late).start()\n"
            "pool = concurrent.futures.ThreadPoolExecutor(2)       # left open: its idle workers\n"
            "pool.submit(sum, [1, 2]).result()\n"
            f"log = open({str(tmp_path / 'log')!r}, 'w')            # left open, its text buffered\n"
            "log.write('buffered line')\n"
            "sys.argv = ['msif'] + sys.argv[1:]\n"
            "import msif_index.cli\n"
            "msif_index.cli.run()\n")
    proc = subprocess.run([sys.executable, "-c", code, "info", "--index", str(out), "--json"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["n"] == 16
    assert "Warning" not in proc.stderr, proc.stderr     # the flush's object scan once warned (reduce_op)
    assert (tmp_path / "atexit").exists() and (tmp_path / "thread").exists()
    assert (tmp_path / "log").read_text() == "buffered line"
    proc = subprocess.run([sys.executable, "-c", code, "info", "--index", str(tmp_path / "nowhere")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no msif index in"), proc.stderr


def test_ctrl_c_in_a_command_with_nothing_to_resume_does_not_say_rerun(tmp_path, tiny, capsys, monkeypatch):
    """`msif exact` said "interrupted; rerun the same command to resume" though it keeps nothing:
    only build-index, evaluate and demo, whose finished work stays on disk, say to rerun."""
    import msif_index.exact

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(msif_index.exact, "exact_influence", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["exact", "--task", f"{tiny}:task", "--test-ids", "0"])
    assert e.value.code == 130 and capsys.readouterr().err == "interrupted\n"


def test_info_says_when_the_projection_keeps_every_coordinate():
    """A trial read `projection proj_dim=4096` at k = 196 as compression; the line now says how many
    coordinates it keeps of how many parameters."""
    from msif_index.cli.main import _compression
    assert _compression({"proj_dim": 4096, "k_raw": 196, "num_params": 196}) == \
        " (196 coordinates for 196 parameters: no compression)"
    assert _compression({"proj_dim": 1024, "k_raw": 1058, "num_params": 669706}) == \
        " (1,058 coordinates for 669,706 parameters)"
    assert _compression({"proj_dim": None, "k_raw": 43, "num_params": 43}) == ""      # the exact preset


@pytest.mark.parametrize("against, shown, hidden", [
    ("exact", ["(rec@k+/-", "prec@k+/-"], ["pooled-r =", "*_own"]),
    ("retraining", ["prec@k+/-", "*_own", "pooled-r ="], ["(rec@k+/-", " rec@k+/-"]),
    ("lds", ["pooled-r ="], ["rec@k+/-", "prec@k+/-", "*_own"])])
def test_the_evaluation_tables_legend_names_only_the_columns_shown(capsys, against, shown, hidden):
    from msif_index.cli.evaluate_cmd import print_summary
    from msif_index.evaluation.report import HEADLINE
    row = {m: 0.5 for m in HEADLINE[against]}
    print_summary({"against": against, "summary": {"index": row}, "pooled": {"index": {"pearson": 0.4}}})
    legend = capsys.readouterr().out.strip().splitlines()[-1]
    assert all(s in legend for s in shown) and not any(h in legend for h in hidden), legend


def test_info_labels_each_attached_model_with_what_attached_it(tmp_path, tiny, capsys):
    """`msif info` showed attached models by key alone, so two heads of one index could not be told
    apart: each operator records the FILE.py:NAME it was first attached as (the Python API: the
    task's class name, or attach(label=...))."""
    from msif_index.operator import FinetuneOperator
    out = tmp_path / "idx"
    main(["build-index", "--task", f"{tiny}:task", "--out", str(out), "--preconditioner", "identity",
          "--proj-dim", "8"])
    (key,) = [f.stem for f in (out / "operators").glob("*.h5")]
    assert FinetuneOperator.load(out / "operators" / f"{key}.h5").label == f"{tiny}:task"
    capsys.readouterr()
    main(["info", "--index", str(out)])
    assert f"attached {key} ({tiny}:task): frozen" in capsys.readouterr().out
    main(["info", "--index", str(out), "--json"])
    assert json.loads(capsys.readouterr().out)["attached"][0]["label"] == f"{tiny}:task"
    from msif_index.task import load_task
    task = load_task(f"{tiny}:task")
    task.fin = type(task.fin)(2)                       # another head: another operator, labelled in Python
    task.fin.embed.load_state_dict(task.pre.embed.state_dict())
    with InfluenceIndex.open(out, huge_pages=False) as index:
        other = index.attach(task, progress_bar=False)
        named = index.attach(task, progress_bar=False, label="ignored: the operator is cached")
    assert other == named != key
    assert FinetuneOperator.load(out / "operators" / f"{other}.h5").label == "Tiny"

"""Every warning of the package points at the user's line (the first frame outside msif_index),
however deep inside the package it arises: before, each call site guessed a stacklevel, and
InfluenceIndex.open's warning pointed inside msif_index.evaluation when an evaluation opened it."""
from __future__ import annotations

import inspect
import os
import warnings

import msif_index.warn as W


def _package_chain(depth: int):
    """A chain of ``depth`` functions whose code lives in a file inside the package (as far as frames
    tell), the innermost calling warn_user."""
    src = "def f0():\n    warn_user('deep')\n"
    for i in range(1, depth):
        src += f"def f{i}():\n    f{i - 1}()\n"
    ns = {"warn_user": W.warn_user}
    exec(compile(src, os.path.join(W._PACKAGE, "evaluation", "somewhere.py"), "exec"), ns)
    return ns[f"f{depth - 1}"]


def test_a_warning_deep_in_the_package_points_at_the_caller():
    for depth in (1, 2, 5):
        fn = _package_chain(depth)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            line = inspect.currentframe().f_lineno + 1
            fn()
        assert len(rec) == 1 and rec[0].category is RuntimeWarning and str(rec[0].message) == "deep"
        assert rec[0].filename == __file__ and rec[0].lineno == line, (depth, rec[0].filename, rec[0].lineno)


def test_the_open_of_an_index_that_records_negative_eigenvalues_points_at_the_caller(tmp_path):
    from msif_index.build import build_index
    from msif_index.config import BuildConfig
    from msif_index.index import InfluenceIndex

    from .test_build import TinyTask

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = build_index(TinyTask(), tmp_path / "exact", BuildConfig(proj_dim=None, preconditioner="exact",
                                                                      damping=0.0), progress_bar=False)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        InfluenceIndex.open(out).close()
    mine = [r for r in rec if "not at a minimum" in str(r.message)]
    assert len(mine) == 1 and mine[0].filename == __file__


def test_the_installed_command_line_counts_as_the_caller():
    """Installed, the CLI lives in msif_index/cli/: its frames are the caller (a checkout keeps it
    outside the package, where nothing is skipped anyway)."""
    inner = _package_chain(2)
    ns = {"inner": inner}
    exec(compile("def command():\n    inner()\n", os.path.join(W._PACKAGE, "cli", "main.py"), "exec"), ns)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        ns["command"]()
    assert len(rec) == 1 and rec[0].filename == os.path.join(W._PACKAGE, "cli", "main.py") and rec[0].lineno == 2


def test_second_derivatives_do_not_show_torchs_jit_deprecation_warnings():
    """torch 2.13 scripts its forward-mode decompositions with torch.jit.script at the first jvp and
    warns ~18 times from its own code (was: in every user's output with warnings shown, and filtered
    in this project's pytest config); msif loads them once with those warnings silenced. A fresh
    process: the module is imported once per process."""
    import subprocess
    import sys
    code = ("import torch, msif_index.autodiff as A\n"
            "x = torch.randn(3, dtype=torch.float64)\n"
            "f = lambda v: torch.nn.functional.cross_entropy(v[None], torch.tensor([1]))\n"
            "h = A.dense_hessian(f, x)\n"
            "assert h.shape == (3, 3)\n"
            "import torch._decomp.decompositions_for_jvp  # loaded: what warned before\n")
    proc = subprocess.run([sys.executable, "-W", "always::DeprecationWarning", "-c", code],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "torch.jit.script" not in proc.stderr, proc.stderr

"""Sign convention and the proximal -> frozen limit of exact influence."""
from __future__ import annotations

import pytest
import torch

from msif_index.data import full_batch
from msif_index.exact import exact_influence

from .conftest import DIGITS


def _measure(task, pre, fin, ids):
    with torch.no_grad():
        return task.measurement(fin, full_batch(task.test_dataset(), ids))


def test_sign_convention_by_removal(digits_frozen):
    """Removing the most helpful example raises the test loss; the most harmful lowers it."""
    task = digits_frozen
    t = 3
    infl = exact_influence(task, full_batch(task.test_dataset(), [t]))[0]
    n = infl.numel()
    base = _measure(task, None, task.finetuned_model(), [t])
    for idx, expected_sign in ((int(infl.argmin()), +1), (int(infl.argmax()), -1)):
        w = torch.ones(n, dtype=torch.float64)
        w[idx] = 0.0
        pre = task.pretrain(task.pretrain_dataset(), task.pretrained_model(), weights=w)
        fin = task.finetune(pre, init_model=task.finetuned_model())
        change = float(_measure(task, pre, fin, [t]) - base)
        predicted = float(-infl[idx] / n)
        assert change * expected_sign > 0, (idx, change, predicted)
        assert predicted * expected_sign > 0


def test_proximal_tends_to_frozen(digits_frozen):
    """rel. difference proximal vs frozen shrinks roughly as 1/alpha (MATH.md stage 2b)."""
    import msif_index
    frozen = digits_frozen
    test = full_batch(frozen.test_dataset(), [0, 1, 2, 3])
    ref = exact_influence(frozen, test)
    rels = []
    for alpha in (10.0, 100.0, 1000.0):
        prox = msif_index.load_task(f"{DIGITS}:DigitsTask", validate=False)
        prox.finetuning, prox.alpha = "proximal", alpha
        prox.__dict__["_pretrained"] = frozen.pretrained_model()
        prox.__dict__["_finetuned"] = prox.finetune(frozen.pretrained_model(),
                                                    init_model=frozen.finetuned_model())
        infl = exact_influence(prox, test)
        rels.append(float((infl - ref).norm() / ref.norm()))
    assert rels[0] > rels[1] > rels[2]
    assert 4 < rels[1] / rels[2] < 25, rels
    assert rels[2] < 1e-2, rels


def test_unknown_style_or_missing_alpha_is_refused(digits_frozen):
    """Any other style (a typo) or proximal without a positive alpha would give all-zero influences."""
    from msif_index.errors import ConfigError
    test = full_batch(digits_frozen.test_dataset(), [0])
    for kwargs in ({"finetuning": "Frozen"}, {"finetuning": "proximal", "alpha": 0.0},
                   {"finetuning": "proximal", "alpha": float("nan")}):
        with pytest.raises(ConfigError):
            exact_influence(digits_frozen, test, **kwargs)
    assert exact_influence(digits_frozen, test, finetuning="proximal", alpha=1.0).abs().max() > 0


def test_exact_preconditioner_refuses_damping(digits_frozen, tmp_path):
    from msif_index.build import build_index
    from msif_index.config import PRESETS, BuildConfig
    from msif_index.errors import ConfigError
    with pytest.raises(ConfigError, match="no damping"):
        build_index(digits_frozen, tmp_path / "idx", PRESETS["exact"].with_(damping=0.1))
    assert not (tmp_path / "idx").exists()
    # a manifest of an earlier build with a damping still reads
    assert BuildConfig.from_dict({**PRESETS["exact"].to_dict(), "damping": 0.1}).damping == 0.1

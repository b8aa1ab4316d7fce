"""msif_index.training.fit: reaches the optimum the influence formulas assume, and says when it did not."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msif_index.training import fit


def _problem():
    torch.manual_seed(0)
    x = torch.randn(60, 5, dtype=torch.float64)
    y = (x[:, 0] + 0.3 * torch.randn(60, dtype=torch.float64) > 0).long()
    model = nn.Linear(5, 2).double()
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    return model, loss, [(x, y)]


def _caught(**kw):
    model, loss, data = _problem()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        gnorm = fit(model, ["weight", "bias"], loss, data, 60, l2=1e-2, **kw)
    return gnorm, [str(r.message) for r in rec if "fit stopped" in str(r.message)]


def test_fit_converges_silently():
    gnorm, msgs = _caught()
    assert gnorm <= 1e-11 and msgs == []


@pytest.mark.parametrize("warn", [True, False])
def test_fit_that_stops_short_warns_unless_told_not_to(warn):
    gnorm, msgs = _caught(max_iter=1, newton_max_dim=0, warn=warn)
    assert gnorm > 1e-11
    if warn:
        assert len(msgs) == 1 and f"{gnorm:.1e}" in msgs[0] and "call fit again" in msgs[0], msgs
    else:
        assert msgs == []

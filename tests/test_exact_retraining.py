"""exact_influence against actual retraining of both stages (MATH.md's check, as a test)."""
from __future__ import annotations

import copy

import pytest
import torch

from msif_index.data import full_batch
from msif_index.exact import exact_influence

TEST_IDS = [0, 1, 2]


def retrained_measurement(task, weights: torch.Tensor) -> torch.Tensor:
    """Retrain pretraining with per-example weights, then finetuning (both warm-started)."""
    pre = task.pretrain(task.pretrain_dataset(), task.pretrained_model(), weights=weights)
    fin = task.finetune(pre, init_model=task.finetuned_model())
    with torch.no_grad():
        return task.measurement(fin, full_batch(task.test_dataset(), TEST_IDS))


@pytest.mark.parametrize("style", ["frozen", "proximal"])
def test_exact_influence_equals_retraining_derivative(style, digits_frozen, digits_proximal):
    task = digits_frozen if style == "frozen" else digits_proximal
    infl = exact_influence(task, full_batch(task.test_dataset(), TEST_IDS))
    n = infl.shape[1]
    # the two largest |I| for the first test point, and one more in the middle of the ranking
    order = infl[0].abs().argsort(descending=True)
    chosen = [int(order[0]), int(order[1]), int(order[n // 4])]
    eps = 1e-4
    for i in chosen:
        w_plus = torch.ones(n, dtype=torch.float64)
        w_minus = torch.ones(n, dtype=torch.float64)
        # G + eps g(z_i) = (1/n) sum_j w_j g_j with w_i = 1 + n eps
        w_plus[i] += n * eps
        w_minus[i] -= n * eps
        actual = (retrained_measurement(task, w_plus) - retrained_measurement(task, w_minus)) / (2 * eps)
        predicted = infl[:, i]
        rel = (predicted - actual).abs() / actual.abs().clamp_min(1e-12)
        big = actual.abs() > 1e-3 * infl.abs().max()
        assert big.any()
        assert (rel[big] < 0.02).all(), f"{style} z={i}: predicted {predicted}, retrained {actual}"

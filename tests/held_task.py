"""A task base for small test tasks that hold their models and data as attributes."""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset

import msif_index


def random_data(g: torch.Generator, sizes: tuple[tuple[int, int], ...], d: int = 4) -> list[TensorDataset]:
    """One float64 classification dataset [m, d] per (m, classes): pretraining, finetuning, test."""
    return [TensorDataset(torch.randn(m, d, generator=g, dtype=torch.float64), torch.randint(0, c, (m,), generator=g))
            for m, c in sizes]


class HeldTask(msif_index.MultiStageTask):
    """``self.pre`` / ``self.fin``: the models; ``self.data``: [pretraining, finetuning, test];
    cross-entropy losses on (x, y) batches."""

    pre: nn.Module
    fin: nn.Module
    data: list[TensorDataset]

    def pretrained_model(self): return self.pre
    def finetuned_model(self): return self.fin
    def pretrain_dataset(self): return self.data[0]
    def finetune_dataset(self): return self.data[1]
    def test_dataset(self): return self.data[2]
    def pretrain_loss(self, model, batch): return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")
    def finetune_loss(self, model, batch): return nn.functional.cross_entropy(model(batch[0]), batch[1], reduction="none")

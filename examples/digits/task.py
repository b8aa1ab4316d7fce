"""Example task: pretrain a digit classifier, finetune its embedding for parity.

Data: scikit-learn's bundled 8x8 digits (no download). Pretraining: 10-way digit classification on
n_pretrain images. Finetuning: a different task, even vs odd, on other images, with a new head on top
of the shared nonlinear embedding W = (embed.weight, embed.bias): tanh(embed(x)).
Both stages have weight decay and are trained to convergence in float64 (L-BFGS + Newton polish),
so exact influence (msif_index.exact_influence) holds and can be checked against retraining.

    task            frozen finetuning (W fixed, only the parity head trains)
    proximal_task   proximal finetuning (W trains too, under (alpha/2)||W - W*||^2)

Use it from the command line as examples/digits/task.py:task (or :proximal_task).
"""
from __future__ import annotations

import copy
from functools import cached_property

import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import Dataset, Subset, TensorDataset

import msif_index
from msif_index.data import full_batch
from msif_index.training import fit, torch_threads


class DigitsNet(nn.Module):
    """x -> head(tanh(embed(x))): a shared nonlinear embedding and a task head."""

    def __init__(self, hidden: int, classes: int):
        super().__init__()
        self.embed = nn.Linear(64, hidden)
        self.head = nn.Linear(hidden, classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def _cross_entropy(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


class DigitsTask(msif_index.MultiStageTask):
    shared_parameters = ("embed.weight", "embed.bias")

    def __init__(self, finetuning: str = "frozen", alpha: float = 1.0, n_pretrain: int = 300,
                 n_finetune: int = 120, n_test: int = 60, hidden: int = 12, seed: int = 0,
                 pretrain_weight_decay: float = 1e-3, finetune_weight_decay: float = 1e-3):
        self.finetuning = finetuning
        self.alpha = alpha
        self.pretrain_weight_decay = pretrain_weight_decay
        self.finetune_weight_decay = finetune_weight_decay
        self.hidden, self.seed = hidden, seed
        digits = load_digits()
        x = torch.tensor(digits.data, dtype=torch.float64) / 16.0
        y = torch.tensor(digits.target, dtype=torch.long)
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
        a, b, c = n_pretrain, n_pretrain + n_finetune, n_pretrain + n_finetune + n_test
        self._pretrain = TensorDataset(x[order[:a]], y[order[:a]])
        self._finetune = TensorDataset(x[order[a:b]], y[order[a:b]] % 2)
        self._test = TensorDataset(x[order[b:c]], y[order[b:c]] % 2)

    # --- the contract -----------------------------------------------------------------------
    def pretrain_dataset(self) -> Dataset:
        return self._pretrain

    def finetune_dataset(self) -> Dataset:
        return self._finetune

    def test_dataset(self) -> Dataset:
        return self._test

    def pretrain_loss(self, model, batch):
        return _cross_entropy(model, batch)

    def pretrain_fisher_losses(self, model, batch):
        # optional hook: gauss-newton / kfac / ekfac fit the Gauss-Newton matrix (README, "Why auto")
        return msif_index.cross_entropy_fisher_losses(model(batch[0]))

    def finetune_loss(self, model, batch):
        return _cross_entropy(model, batch)

    def finetune_fisher_losses(self, model, batch):
        # optional: Kronecker-factored H_tt (large heads) fits the head's Gauss-Newton matrix
        return msif_index.cross_entropy_fisher_losses(model(batch[0]))

    def pretrained_model(self) -> nn.Module:
        return self._pretrained

    def finetuned_model(self) -> nn.Module:
        return self._finetuned

    # --- the recipe (also the retraining hooks) -----------------------------------------------
    def pretrain(self, dataset: Dataset, init_model: nn.Module | None = None,
                 weights: torch.Tensor | None = None) -> nn.Module:
        """Train (W, U) to convergence on ``dataset``; ``weights`` scale each example's loss."""
        if init_model is None:
            torch.manual_seed(self.seed)
            init_model = DigitsNet(self.hidden, 10).double()
        model = copy.deepcopy(init_model)
        names = [n for n, _ in model.named_parameters()]
        with torch_threads(1):      # bitwise the same weights in every process
            fit(model, names, _cross_entropy, [full_batch(dataset)], len(dataset),
                weights=None if weights is None else [weights], l2=self.pretrain_weight_decay)
        return model

    def finetune(self, pretrained_model: nn.Module, init_model: nn.Module | None = None) -> nn.Module:
        """New parity head on the pretrained embedding; frozen or proximal as the task says."""
        if init_model is None:
            torch.manual_seed(self.seed + 1)
            init_model = DigitsNet(self.hidden, 2).double()
            init_model.embed.load_state_dict(pretrained_model.embed.state_dict())
        model = copy.deepcopy(init_model)
        w_star = torch.cat([pretrained_model.embed.weight.detach().reshape(-1),
                            pretrained_model.embed.bias.detach()])
        data = [full_batch(self._finetune)]
        m = len(self._finetune)
        head = ["head.weight", "head.bias"]
        if self.finetuning == "frozen":
            model.embed.load_state_dict(pretrained_model.embed.state_dict())
            with torch_threads(1):
                fit(model, head, _cross_entropy, data, m, l2=self.finetune_weight_decay)
        else:
            d_head = sum(p.numel() for p in model.head.parameters())
            l2 = torch.cat([torch.full((d_head,), float(self.finetune_weight_decay)),
                            torch.full((w_star.numel(),), float(self.alpha))]).double()
            center = torch.cat([torch.zeros(d_head, dtype=torch.float64), w_star])
            with torch_threads(1):
                fit(model, head + list(self.shared_parameters), _cross_entropy, data, m, l2=l2, center=center)
        return model

    @cached_property
    def _pretrained(self) -> nn.Module:
        return self.pretrain(self._pretrain)

    @cached_property
    def _finetuned(self) -> nn.Module:
        return self.finetune(self._pretrained)


task = DigitsTask("frozen")
proximal_task = DigitsTask("proximal", alpha=1.0)

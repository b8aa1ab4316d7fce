"""Every second-order path against central finite differences (float64), LayerNorm included."""
from __future__ import annotations

import torch
from torch import nn

from msif_index.autodiff import FlatParams, batched_objective, dense_hessian, hvp, per_example_grads


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.lin(x))))


def _setup():
    torch.manual_seed(0)
    model = Net().double()
    with torch.no_grad():  # move LayerNorm off its (1, 0) init so its cross terms matter
        model.norm.weight.add_(torch.randn(4, dtype=torch.float64))
        model.norm.bias.add_(torch.randn(4, dtype=torch.float64))
    x = torch.randn(6, 3, dtype=torch.float64)
    y = torch.randint(0, 2, (6,))
    loss = lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none")
    flat = FlatParams(model, [n for n, _ in model.named_parameters()])
    f = flat.loss(loss)
    return flat, f, (x, y)


def _fd_hessian(fn, x, h=1e-5):
    d = x.numel()
    grad = torch.func.grad(fn)
    cols = []
    for i in range(d):
        e = torch.zeros(d, dtype=x.dtype)
        e[i] = h
        cols.append((grad(x + e) - grad(x - e)) / (2 * h))
    return torch.stack(cols, 1)


def test_dense_hessian_matches_finite_differences_through_layernorm():
    flat, f, batch = _setup()
    obj = batched_objective(f, [batch], 6)
    x = flat.get()
    h = dense_hessian(obj, x, chunk=7)
    fd = _fd_hessian(obj, x)
    assert torch.allclose(h, fd, atol=1e-7, rtol=1e-6)
    ln = slice(16, 20)   # norm.weight block vs everything: the cross terms torch.func.hessian gets wrong
    assert torch.allclose(h[ln], fd[ln], atol=1e-7, rtol=1e-6)


def test_hvp_matches_finite_differences():
    flat, f, batch = _setup()
    obj = batched_objective(f, [batch], 6)
    x = flat.get()
    v = torch.randn(flat.dim, dtype=torch.float64)
    grad = torch.func.grad(obj)
    fd = (grad(x + 1e-5 * v) - grad(x - 1e-5 * v)) / 2e-5
    assert torch.allclose(hvp(obj, x, v), fd, atol=1e-7, rtol=1e-6)


def test_per_example_grads_match_loop():
    flat, f, (xb, yb) = _setup()
    x = flat.get()
    pg = per_example_grads(f, x, (xb, yb))
    for i in range(6):
        g = torch.func.grad(lambda v: f(v, (xb[i:i + 1], yb[i:i + 1]))[0])(x)
        assert torch.allclose(pg[i], g, atol=1e-12)

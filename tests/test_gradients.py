"""Per-example projected gradients (msif_index.gradients) against brute-force autograd."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from msif_index.errors import ConfigError, ShapeError, TaskError, TooLargeError
from msif_index.gradients import GradientProjector, plan_blocks
from msif_index.projection import block_seed

B, T = 5, 4


class Net(nn.Module):
    """Every block kind: Linear with/without bias (one on a sequence, one called twice, one followed
    by an in-place ReLU), Conv2d with stride/padding, Embedding with padding_idx, LayerNorm and a
    raw nn.Parameter (dense fallback)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(11, 4, padding_idx=0)
        self.seq = nn.Linear(4, 5)                       # applied on [B, T, 4]
        self.ln = nn.LayerNorm(5)
        self.conv = nn.Conv2d(2, 3, 3, stride=2, padding=1)
        self.fc = nn.Linear(12 + 5, 6, bias=False)
        self.mix = nn.Linear(6, 6)                       # called twice
        self.scale = nn.Parameter(torch.randn(6))
        self.head = nn.Linear(6, 3)

    def forward(self, img, ids):
        h = torch.tanh(self.ln(self.seq(self.emb(ids)))).mean(1)
        c = torch.tanh(self.conv(img)).flatten(1)
        z = F.relu(self.fc(torch.cat([c, h], 1)), inplace=True) + 0.1
        z = torch.tanh(self.mix(torch.tanh(self.mix(z)))) * self.scale
        return self.head(z)


def loss_fn(model, batch):
    img, ids, y = batch
    return F.cross_entropy(model(img, ids), y, reduction="none")


def make(seed=0):
    torch.manual_seed(seed)
    model = Net().double()
    img = torch.randn(B, 2, 4, 4, dtype=torch.float64)
    ids = torch.randint(0, 11, (B, T))
    ids[0, 1] = 0
    ids[2, :2] = 0  # padding tokens
    y = torch.randint(0, 3, (B,))
    return model, (img, ids, y)


def brute_force(model, batch, names):
    """[B, d] exact per-example gradients, one example at a time, in ``names`` order."""
    params = dict(model.named_parameters())
    frozen = [params[n] for n in names if not params[n].requires_grad]
    for p in frozen:
        p.requires_grad_(True)
    rows = []
    try:
        for b in range(batch[0].shape[0]):
            one = tuple(t[b:b + 1] for t in batch)
            gs = torch.autograd.grad(loss_fn(model, one)[0], [params[n] for n in names], allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                                   for n, g in zip(names, gs)]))
    finally:
        for p in frozen:
            p.requires_grad_(False)
    return torch.stack(rows)


def per_param(model, batch, names):
    """{name: [B, *shape]} exact per-example gradients."""
    full = brute_force(model, batch, names)
    params = dict(model.named_parameters())
    out, off = {}, 0
    for n in names:
        k = params[n].numel()
        out[n] = full[:, off:off + k].reshape(-1, *params[n].shape)
        off += k
    return out



@pytest.fixture(scope="module")
def setup():
    model, batch = make()
    names = [n for n, _ in model.named_parameters()]
    return model, batch, names, brute_force(model, batch, names)


def test_plan_kinds(setup):
    model, _, names, _ = setup
    blocks = plan_blocks(model, names, None, 0)
    kinds = {b.name: b.kind for b in blocks}
    assert kinds == {"emb": "embedding", "seq": "linear", "ln.weight": "dense", "ln.bias": "dense",
                     "conv": "conv2d", "fc": "linear", "mix": "linear", "scale": "dense", "head": "linear"}
    by = {b.name: b for b in blocks}
    assert (by["seq"].d_out, by["seq"].d_in, by["seq"].bias) == (5, 5, True)
    assert (by["fc"].d_out, by["fc"].d_in, by["fc"].bias) == (6, 17, False)
    assert (by["conv"].d_out, by["conv"].d_in) == (3, 2 * 9 + 1)
    assert (by["emb"].d_out, by["emb"].d_in) == (4, 11)
    assert sum(b.dim for b in blocks) == sum(p.numel() for p in model.parameters())
    offs = [b.offset for b in blocks]
    assert offs == sorted(offs) and offs[0] == 0


@pytest.mark.parametrize("proj_dim", [None, 120])
def test_rows_match_brute_force(setup, proj_dim):
    model, batch, names, g = setup
    proj = GradientProjector(model, names, proj_dim=proj_dim, seed=1)
    if proj_dim is not None:
        assert proj.dim < proj.d and abs(proj.dim - proj_dim) <= proj_dim // 4
    rows = proj.project_batch(loss_fn, batch)
    p = proj.matrix()
    torch.testing.assert_close(rows, g @ p.t(), rtol=1e-6, atol=1e-10)
    if proj_dim is None:
        # exact mode: P is a permutation matrix
        assert p.shape[0] == p.shape[1]
        assert set(p.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(p.sum(0), torch.ones(p.shape[1], dtype=p.dtype))
        assert torch.equal(p.sum(1), torch.ones(p.shape[0], dtype=p.dtype))
        torch.testing.assert_close(rows @ p, g, rtol=1e-6, atol=1e-10)
    # written into a given buffer, reused across calls
    out = torch.full((B, proj.dim), float("nan"), dtype=torch.float64)
    assert proj.project_batch(loss_fn, batch, out=out) is out
    torch.testing.assert_close(out, rows, rtol=0, atol=0)


def test_output_hooks_only_where_outputs_are_modified_in_place(setup):
    """After the first pass, output gradients come from autograd.grad except for modules whose
    outputs are modified in place (fc, by the in-place ReLU), which keep a tensor hook."""
    model, batch, names, g = setup
    proj = GradientProjector(model, names, proj_dim=120, seed=1)
    first = proj.project_batch(loss_fn, batch)
    hooked = {st.block.name: st.hook_outputs for st in proj._kron}
    assert hooked == {"emb": False, "seq": False, "conv": False, "fc": True, "mix": False, "head": False}
    second = proj.project_batch(loss_fn, batch)
    torch.testing.assert_close(second, first, rtol=0, atol=0)
    torch.testing.assert_close(second, g @ proj.matrix().t(), rtol=1e-6, atol=1e-10)


class Switch(nn.Module):
    """a's output doubled in place or not, by a flag: the same function either way."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(4, 2)
        self.in_place = False

    def forward(self, x):
        h = self.a(x)
        h = h.mul_(2.0) if self.in_place else h * 2.0
        return self.b(torch.tanh(h))


def test_output_modified_in_place_later_is_caught_and_redone():
    torch.manual_seed(0)
    model = Switch().double()
    x, y = torch.randn(B, 3, dtype=torch.float64), torch.randint(0, 2, (B,))

    def lf(m, batch):
        return F.cross_entropy(m(batch[0]), batch[1], reduction="none")

    names = [n for n, _ in model.named_parameters()]
    proj = GradientProjector(model, names, proj_dim=None, seed=0)
    want = torch.stack([torch.cat([gr.reshape(-1) for gr in torch.autograd.grad(
        lf(model, (x[i:i + 1], y[i:i + 1]))[0], list(model.parameters()))]) for i in range(B)]) @ proj.matrix().t()
    torch.testing.assert_close(proj.project_batch(lf, (x, y)), want, rtol=1e-10, atol=1e-12)
    assert not proj._kron[0].hook_outputs              # a's outputs were not modified: no hook next time
    model.in_place = True                               # now they are: the pass notices and runs again
    torch.testing.assert_close(proj.project_batch(lf, (x, y)), want, rtol=1e-10, atol=1e-12)
    assert proj._kron[0].hook_outputs
    torch.testing.assert_close(proj.project_batch(lf, (x, y)), want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("proj_dim", [None, 120])
def test_project_dense_matches_rows(setup, proj_dim):
    model, batch, names, _ = setup
    proj = GradientProjector(model, names, proj_dim=proj_dim, seed=2)
    rows = proj.project_batch(loss_fn, batch)
    full = per_param(model, batch, names)
    torch.testing.assert_close(proj.project_dense(full), rows, rtol=1e-6, atol=1e-10)
    # a single vector (param shapes, no Q) is Q = 1
    one = {n: v[3] for n, v in full.items()}
    torch.testing.assert_close(proj.project_dense(one), rows[3:4], rtol=1e-6, atol=1e-10)
    with pytest.raises(ShapeError):
        proj.project_dense({n: v for n, v in full.items() if n != "seq.bias"})


def test_unlisted_params_do_not_contribute_and_model_is_untouched():
    model, batch = make(1)
    model.conv.bias.requires_grad_(False)  # frozen but listed
    names = ["seq.weight", "seq.bias", "conv.weight", "conv.bias", "head.weight", "scale"]
    # head.bias is trainable and unlisted -> head.weight is dense; conv is whole -> conv2d
    kinds = {b.name: b.kind for b in plan_blocks(model, names, None)}
    assert kinds == {"seq": "linear", "conv": "conv2d", "scale": "dense", "head.weight": "dense"}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for proj_dim in (None, 40):
        proj = GradientProjector(model, names, proj_dim=proj_dim, seed=5)
        rows = proj.project_batch(loss_fn, batch)
        torch.testing.assert_close(rows, brute_force(model, batch, names) @ proj.matrix().t(),
                                   rtol=1e-6, atol=1e-10)
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.grad is None, n
        assert p.requires_grad == flags[n], n
    for m in model.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks and not m._backward_hooks, m
        assert not getattr(m, "_forward_hooks_with_kwargs", {}), m


def test_determinism_and_seeds(setup):
    model, _, names, _ = setup
    a = GradientProjector(model, names, proj_dim=120, seed=7).matrix()
    b = GradientProjector(model, names, proj_dim=120, seed=7).matrix()
    c = GradientProjector(model, names, proj_dim=120, seed=8).matrix()
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert block_seed(7, "seq/out") == block_seed(7, "seq/out")


def test_gram_and_config(setup):
    model, _, names, _ = setup
    proj = GradientProjector(model, names, proj_dim=120, seed=3)
    p = proj.matrix()
    torch.testing.assert_close(proj.gram(), p @ p.t(), rtol=1e-10, atol=1e-12)
    cfg = json.loads(json.dumps(proj.config()))
    assert cfg["dim"] == proj.dim and cfg["seed"] == 3 and cfg["proj_dim"] == 120
    assert [b["name"] for b in cfg["blocks"]] == [b.name for b in proj.blocks]
    exact = GradientProjector(model, names, proj_dim=None)
    torch.testing.assert_close(exact.gram(), torch.eye(exact.dim, dtype=torch.float64))


@pytest.mark.parametrize("k", [256, 1024, 4096])
def test_jl_inner_products(k):
    # Kronecker projector of one Linear block, P = P_out (x) P_in with k_out = k_in = sqrt(k).
    # For random u, v the error (Pu).(Pv) - u.v has standard deviation about
    # ||u|| ||v|| sqrt(1/k + 1/(k_out d_in) + 1/(k_in d_out)) ~ 1.12 ||u|| ||v|| / sqrt(k) here;
    # tested bound: |err| <= 4 ||u|| ||v|| / sqrt(k) for each of 6 pairs.
    lin = nn.Linear(512, 512, bias=False).double()
    proj = GradientProjector(lin, ["weight"], proj_dim=k, seed=k)
    assert proj.dim == k and proj.blocks[0].k_out == proj.blocks[0].k_in
    gen = torch.Generator().manual_seed(k)
    u = torch.randn(6, 512, 512, generator=gen, dtype=torch.float64)
    v = torch.randn(6, 512, 512, generator=gen, dtype=torch.float64) + 0.5 * u  # correlated pairs
    pu, pv = proj.project_dense({"weight": u}), proj.project_dense({"weight": v})
    err = (pu * pv).sum(1) - (u * v).sum((1, 2))
    bound = 4 * u.flatten(1).norm(dim=1) * v.flatten(1).norm(dim=1) / k ** 0.5
    assert (err.abs() <= bound).all(), (err / bound).tolist()


def test_grouped_conv_falls_back_to_dense():
    torch.manual_seed(0)

    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
            self.head = nn.Linear(4 * 16, 3)

        def forward(self, img, ids):
            return self.head(torch.tanh(self.conv(img)).flatten(1))

    model = G().double()
    batch = (torch.randn(B, 4, 4, 4, dtype=torch.float64), torch.zeros(B, 1, dtype=torch.long),
             torch.randint(0, 3, (B,)))
    names = [n for n, _ in model.named_parameters()]
    for proj_dim in (None, 50):
        proj = GradientProjector(model, names, proj_dim=proj_dim, seed=0)
        assert [b.kind for b in proj.blocks] == ["dense", "dense", "linear"]
        rows = proj.project_batch(loss_fn, batch)
        torch.testing.assert_close(rows, brute_force(model, batch, names) @ proj.matrix().t(),
                                   rtol=1e-6, atol=1e-10)


def test_allocation_rule_and_overrides():
    mlp = nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))
    names = [n for n, _ in mlp.named_parameters()]
    blocks = plan_blocks(mlp, names, 4096)
    assert [(b.k_out, b.k_in) for b in blocks] == [(43, 43), (43, 43), (10, 43)]
    assert sum(b.dim for b in blocks) == 4128
    # per-layer overrides: the rest share what is left
    blocks = plan_blocks(mlp, names, 8192, proj_dim_per_layer={"4": None, "0.weight": 100})
    by = {b.name: b for b in blocks}
    assert (by["4"].k_out, by["4"].k_in) == (10, 513)  # exact
    assert by["0"].dim == 100
    assert (by["2"].k_out, by["2"].k_in) == (54, 54)  # 8192 - 100 - 5130 = 2962 left: 54^2 = 2916
    with pytest.raises(ConfigError):
        plan_blocks(mlp, names, 4096, proj_dim_per_layer={"4": None})  # nothing left for the rest
    blocks = plan_blocks(mlp, names, None, proj_dim_per_layer=256)
    assert [b.dim for b in blocks] == [256, 256, 260]  # 10 x 26: |260 - 256| < |250 - 256|
    with pytest.raises(ConfigError):
        plan_blocks(mlp, names, 4096, proj_dim_per_layer={"nope": 3})
    with pytest.raises(ConfigError):
        plan_blocks(mlp, names, 0)
    with pytest.raises(TaskError):
        plan_blocks(mlp, ["0.weight", "missing"], 10)
    # proj_dim >= number of parameters: exact
    assert all(b.exact for b in plan_blocks(mlp, names, 10 ** 9))


def test_user_errors(setup):
    model, batch, names, _ = setup
    proj = GradientProjector(model, names, proj_dim=120)
    with pytest.raises(ShapeError):
        proj.project_batch(loss_fn, batch, out=torch.empty(B, proj.dim + 1, dtype=torch.float64))
    with pytest.raises(ShapeError):
        proj.project_batch(lambda m, b: loss_fn(m, b).sum(), batch)
    big = nn.Linear(4000, 4000, bias=False)
    with pytest.raises(TooLargeError):
        GradientProjector(big, ["weight"], proj_dim=None).matrix()


def test_weight_used_outside_its_module_is_caught():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(7, 3)
            self.mid = nn.Linear(3, 3)

        def forward(self, img, ids):
            h = torch.tanh(self.mid(self.emb(ids))).mean(1)
            return F.linear(h, self.emb.weight)[:, :3]  # tied output head

    torch.manual_seed(0)
    model = Tied().double()
    batch = (torch.zeros(B, 1), torch.randint(0, 7, (B, T)), torch.randint(0, 3, (B,)))
    names = [n for n, _ in model.named_parameters()]
    with pytest.raises(TaskError, match="dense_modules"):
        GradientProjector(model, names, proj_dim=20).project_batch(loss_fn, batch)
    proj = GradientProjector(model, names, proj_dim=20, dense_modules=["emb"])
    assert proj.blocks[0].kind == "dense"
    torch.testing.assert_close(proj.project_batch(loss_fn, batch),
                               brute_force(model, batch, names) @ proj.matrix().t(), rtol=1e-6, atol=1e-10)


def test_conv_padding_modes_dilation_and_kwargs_call():
    class C(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(2, 3, 3, padding="same", dilation=2, padding_mode="reflect")
            self.b = nn.Conv2d(3, 2, (3, 2), stride=2, padding=(1, 0), padding_mode="circular", bias=False)
            self.head = nn.Linear(2 * 3 * 3, 3)

        def forward(self, img, ids):
            h = torch.tanh(self.b(torch.tanh(self.a(img))))
            return self.head(input=h.flatten(1))

    torch.manual_seed(0)
    model = C().double()
    batch = (torch.randn(B, 2, 5, 6, dtype=torch.float64), torch.zeros(B, 1, dtype=torch.long),
             torch.randint(0, 3, (B,)))
    names = [n for n, _ in model.named_parameters()]
    g = brute_force(model, batch, names)
    for proj_dim in (None, 30):
        proj = GradientProjector(model, names, proj_dim=proj_dim, seed=0)
        assert [b.kind for b in proj.blocks] == ["conv2d", "conv2d", "linear"]
        torch.testing.assert_close(proj.project_batch(loss_fn, batch), g @ proj.matrix().t(), rtol=1e-6, atol=1e-10)


def test_non_finite_batches_checked_on_request():
    """A NaN input: NonFiniteError by default, NaN rows (the finite examples' rows unchanged) with
    check_finite=False; the first-call hook check is deferred, not failed, on a non-finite batch."""
    model, batch = make(3)
    names = [n for n, _ in model.named_parameters()]
    good = GradientProjector(model, names, proj_dim=60, seed=2).project_batch(loss_fn, batch)
    img = batch[0].clone()
    img[1, 0, 0, 0] = float("nan")
    bad = (img, *batch[1:])
    proj = GradientProjector(model, names, proj_dim=60, seed=2)
    from msif_index.errors import NonFiniteError
    with pytest.raises(NonFiniteError):
        proj.project_batch(loss_fn, bad)
    rows = proj.project_batch(loss_fn, bad, check_finite=False)
    assert torch.isnan(rows[1]).any() and torch.isfinite(rows[[0, 2, 3, 4]]).all()
    torch.testing.assert_close(rows[[0, 2, 3, 4]], good[[0, 2, 3, 4]], rtol=1e-10, atol=1e-12)
    assert proj._need_check                      # not verified on NaN rows: the next finite call checks
    torch.testing.assert_close(proj.project_batch(loss_fn, batch), good, rtol=1e-10, atol=1e-12)
    assert not proj._need_check


@pytest.mark.parametrize("proj_dim", [None, 120])
def test_rotated_projector_gives_rotated_rows(setup, proj_dim):
    """rotated({block: (L, R)}): each listed Kronecker block's rows are L^T Phi R (Linear on a
    sequence and called twice, Conv2d, Embedding with padding; identity or Gaussian projections),
    other blocks unchanged, float64 to 1e-10; the original projector is untouched."""
    model, batch, names, _ = setup
    proj = GradientProjector(model, names, proj_dim=proj_dim, seed=4)
    raw = proj.project_batch(loss_fn, batch)
    g = torch.Generator().manual_seed(5)
    kron = [b for b in proj.blocks if b.kronecker]
    rots = {b.name: (torch.randn(b.k_out, b.k_out, generator=g, dtype=torch.float64),
                     torch.randn(b.k_in, b.k_in, generator=g, dtype=torch.float64)) for b in kron[:-1]}
    rows = proj.rotated(rots).project_batch(loss_fn, batch)
    want = raw.clone()
    for b in kron[:-1]:
        left, right = rots[b.name]
        phi = raw[:, b.offset:b.offset + b.dim].reshape(-1, b.k_out, b.k_in)
        want[:, b.offset:b.offset + b.dim] = (left.T @ phi @ right).reshape(-1, b.dim)
    torch.testing.assert_close(rows, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(proj.project_batch(loss_fn, batch), raw, rtol=0, atol=0)
    with pytest.raises(ConfigError):
        proj.rotated({"no-such-block": (None, None)})


def _brute(model, loss, batch, names):
    """[B, d] exact per-example gradients of ``loss(model, batch)`` (batch: a tuple of batch-first tensors)."""
    params = dict(model.named_parameters())
    rows = []
    for b in range(batch[0].shape[0]):
        gs = torch.autograd.grad(loss(model, tuple(t[b:b + 1] for t in batch))[0], [params[n] for n in names],
                                 allow_unused=True)
        rows.append(torch.cat([(torch.zeros_like(params[n]) if g is None else g).reshape(-1)
                               for n, g in zip(names, gs)]))
    return torch.stack(rows)


class _SeqFFN(nn.Module):
    """A transformer-style FFN on [B, T, d]: F.linear with a bias on a 3-D input returns a view, and
    the in-place ReLU then rewrites autograd's graph through its base."""

    def __init__(self, d=5, h=7, inplace=True):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, h), nn.Linear(h, 3)
        self.act = nn.ReLU(inplace=inplace)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x))).mean(1)


def _seq_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize("check", [True, False])
@pytest.mark.parametrize("proj_dim", [None, 30])
def test_in_place_op_on_a_view_output_keeps_its_gradient(check, proj_dim):
    torch.manual_seed(0)
    model = _SeqFFN().double()
    batch = (torch.randn(4, 6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 1]))
    names = [n for n, _ in model.named_parameters()]
    ref = _brute(model, _seq_loss, batch, names)
    proj = GradientProjector(model, names, proj_dim=proj_dim, check=check)
    p = proj.matrix()
    for _ in range(2):                                  # the first call finds the in-place op, then hooks
        rows = proj.project_batch(_seq_loss, batch)
        torch.testing.assert_close(rows, ref @ p.T, rtol=1e-10, atol=1e-12)


class _PosNet(nn.Module):
    """Learned positions called without a batch dimension: pos sees [T], not [B, T]."""

    def __init__(self, vocab=11, t=6, d=4):
        super().__init__()
        self.tok, self.pos, self.out = nn.Embedding(vocab, d), nn.Embedding(t, d), nn.Linear(d, 3)

    def forward(self, ids):
        return self.out(self.tok(ids) + self.pos(torch.arange(ids.shape[1]))).mean(1)


def test_module_input_without_a_leading_batch_dimension_is_refused_even_when_sizes_match():
    """B == T: the leading dimension passes the size check, and the batch sum of the rows is right;
    only the comparison of one example's row with its own gradient sees the mixing."""
    torch.manual_seed(0)
    model = _PosNet().double()
    names = [n for n, _ in model.named_parameters()]
    for b in (4, 6):                                     # B != T: the size check; B == T: the example check
        batch = (torch.randint(0, 11, (b, 6)), torch.randint(0, 3, (b,)))
        with pytest.raises((ShapeError, TaskError), match="batch dimension"):
            GradientProjector(model, names, proj_dim=None).project_batch(_seq_loss, batch)
    layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=False).double().eval()

    def seq_first(model, batch):
        (x,) = batch
        return model(x.transpose(0, 1)).pow(2).sum((0, 2))            # [T, B, d] in, one loss per b

    x = torch.randn(6, 6, 4, dtype=torch.float64)
    names = [n for n, _ in layer.named_parameters()]
    with pytest.raises(TaskError, match="batch dimension") as e:
        GradientProjector(layer, names, proj_dim=None).project_batch(seq_first, (x,))
    assert "linear" in str(e.value)


def test_dense_path_refuses_a_shared_batch_tensor_whose_size_equals_the_batch():
    """A tensor every example shares (here a [4, 5] table of prompts, each example's loss uses all
    of it) with B == 4 rows is cut into examples by the dense path's vmap: each example would see one
    row, and its gradient would be silently wrong. The first call compares the one-example losses
    with the batch's and refuses; with B != 4 the same tensor is left whole and the rows are right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 3), nn.LayerNorm(3)).double()
    names = ["1.weight", "1.bias"]                                  # LayerNorm: the dense path
    table = torch.randn(4, 5, dtype=torch.float64)

    def loss(m, batch):
        x, prompts = batch
        return m(x + prompts.mean(0)).pow(2).sum(1)                # one loss per example, prompts shared

    for b in (3, 4):
        batch = (torch.randn(b, 5, dtype=torch.float64), table)
        proj = GradientProjector(model, names, proj_dim=None)
        if b == 4:
            with pytest.raises(TaskError, match=r"differs from its loss in the batch.*\[4, 5\]"):
                proj.project_batch(loss, batch)
            continue
        rows = proj.project_batch(loss, batch)
        params = dict(model.named_parameters())
        ref = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(
            loss(model, (batch[0][i:i + 1], table))[0], [params[n] for n in names])]) for i in range(b)])
        assert ((rows - ref @ proj.matrix().T).norm() / ref.norm()).item() < 1e-10


def test_dense_path_check_passes_random_losses_and_rounding():
    """The first-call comparison of one-example and batch losses must not refuse a random loss (its
    two batch evaluations differ, so it is not compared), nor rounding: its tolerance is the least
    precise dtype's (a float32 model's, even when the loss is float64) with an absolute floor for
    tiny losses; a real difference is refused."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3)).eval()
    names = ["1.weight", "1.bias"]
    batch = (torch.randn(16, 8), torch.randint(0, 3, (16,)))

    def mc_dropout(m, b):                    # dropout kept on in eval mode: a different loss every call
        return F.cross_entropy(m[2](F.dropout(m[1](m[0](b[0])), 0.3, training=True)), b[1], reduction="none")

    rows = GradientProjector(model, names, proj_dim=None).project_batch(mc_dropout, batch)
    assert rows.shape == (16, 16) and torch.isfinite(rows).all()
    proj = GradientProjector(model, names, proj_dim=None)
    ok = proj._check_dense_losses
    whole = torch.tensor([2.0, 1.0, 3.0], dtype=torch.float64)            # the batch's losses, float64
    assert ok(lambda m, b: whole, batch, (whole * (1 + 1e-5)).float(), [])   # float32 rounding: passes
    tiny = torch.full((3,), 5e-5)
    assert ok(lambda m, b: tiny, batch, tiny + torch.tensor([0.0, 1.19e-7, 0.0]), [])   # one ulp at 1.0
    with pytest.raises(TaskError, match="example 1's loss computed alone"):
        ok(lambda m, b: whole, batch, (whole * torch.tensor([1.0, 1.01, 1.0], dtype=torch.float64)).float(), [])


@pytest.mark.parametrize("names", [["0.weight", "0.bias"], ["1.weight", "1.bias"]])   # Kronecker / exact path
@pytest.mark.parametrize("as_dtype", [torch.long, torch.bool])
def test_integer_or_bool_losses_are_refused(names, as_dtype):
    """A loss with no gradient (a 0/1 correctness, a count) gave all-zero rows without a word."""
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))

    def loss(m, batch):
        return (m(batch[0]).sum(1) > 0).to(as_dtype)

    with pytest.raises(TaskError, match="floating-point losses"):
        GradientProjector(model, names, proj_dim=None).project_batch(loss, (torch.randn(5, 4),))


def test_float32_model_with_a_float64_projector_passes_the_first_call_check():
    torch.manual_seed(0)
    model = _SeqFFN(inplace=False)
    batch = (torch.randn(4, 6, 5), torch.tensor([0, 1, 2, 1]))
    names = [n for n, _ in model.named_parameters()]
    proj = GradientProjector(model, names, proj_dim=None, dtype=torch.float64)
    rows = proj.project_batch(_seq_loss, batch)                    # the check's tolerance: float32's
    ref = _brute(model, _seq_loss, batch, names).double() @ proj.matrix().T
    assert ((rows - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_models_pass_the_first_call_check(dtype):
    """The check's tolerance follows the least precise dtype (bfloat16 rounding of one row is ~4e-3)."""
    for seed in range(3):
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 10)).to(dtype)
        x, y = torch.randn(64, 32).to(dtype), torch.randint(0, 10, (64,))
        names = [n for n, _ in model.named_parameters()]
        rows = GradientProjector(model, names, proj_dim=64, dtype=dtype).project_batch(
            lambda m, b: F.cross_entropy(m(b[0]).float(), b[1], reduction="none"), (x, y))
        assert rows.shape[0] == 64 and torch.isfinite(rows).all()


class _Recurrent(nn.Module):
    """Embedding -> LSTM (no initial state given: torch builds it with the batch vmap does not see)
    -> Linear on the last step."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.rnn = nn.LSTM(4, 6, batch_first=True)
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        out, _ = self.rnn(self.emb(x))
        return self.head(out[:, -1])


def _rnn_loss(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1], reduction="none")


@pytest.mark.parametrize("proj_dim", [None, 40])
def test_modules_vmap_cannot_batch_fall_back_to_a_loop(proj_dim):
    """nn.LSTM without an initial state fails under torch.func.vmap; its per-example gradients are
    then computed one example at a time (warned once, naming the fix), exact against brute force,
    and so are exact influence's per-example gradients (autodiff.per_example_grads)."""
    import warnings

    import msif_index.autodiff as autodiff
    torch.manual_seed(0)
    model = _Recurrent().double()
    batch = (torch.randint(0, 10, (5, 7)), torch.randint(0, 2, (5,)))
    names = [n for n, _ in model.named_parameters()]
    proj = GradientProjector(model, names, proj_dim=proj_dim, dtype=torch.float64)
    autodiff._loop_warned.clear()
    traced = []
    real_vmap = autodiff.vmap

    def counting_vmap(*a, **kw):
        traced.append(1)
        return real_vmap(*a, **kw)

    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        autodiff.vmap = counting_vmap
        try:
            rows = proj.project_batch(_rnn_loss, batch)
            first_pass = len(traced)
            again = proj.project_batch(_rnn_loss, batch)    # vmap failed once: not retried
        finally:
            autodiff.vmap = real_vmap
    assert first_pass == 1 and len(traced) == 1 and proj.dense_batched is False
    msgs = [str(r.message) for r in rec if "one example at a time" in str(r.message)]
    assert len(msgs) == 1 and "pass hx explicitly" in msgs[0], [str(r.message) for r in rec]
    ref = _brute(model, _rnn_loss, batch, names)
    torch.testing.assert_close(again, rows, rtol=0, atol=0)
    params, off, grads = dict(model.named_parameters()), 0, {}
    for n in names:
        grads[n] = ref[:, off:off + params[n].numel()].reshape(-1, *params[n].shape)
        off += params[n].numel()
    torch.testing.assert_close(rows, proj.project_dense(grads), rtol=1e-10, atol=1e-12)
    flat = autodiff.FlatParams(model, names)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = autodiff.per_example_grads(flat.loss(_rnn_loss), flat.get(), batch)
    torch.testing.assert_close(g, ref, rtol=1e-10, atol=1e-12)


def test_a_model_the_loop_cannot_run_either_keeps_vmaps_error():
    """A model that fails one example at a time too is the task's error: the dense path's TaskError
    names vmap's message, no loop warning."""
    import warnings

    class Broken(_Recurrent):
        def forward(self, x):
            return super().forward(x) @ torch.ones(3, 2, dtype=torch.float64)

    model = Broken().double()
    names = ["rnn.weight_ih_l0"]
    proj = GradientProjector(model, names, proj_dim=None, dtype=torch.float64)
    with warnings.catch_warnings(record=True) as rec, pytest.raises(TaskError, match="vmap over loss_fn"):
        warnings.simplefilter("always")
        proj.project_batch(_rnn_loss, (torch.randint(0, 10, (3, 7)), torch.randint(0, 2, (3,))))
    assert not [r for r in rec if "one example at a time" in str(r.message)]

"""The fast paths added for build throughput (benchmarks/build_throughput.py) give the same results
as the straightforward computations they replace."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from msif_index.errors import NonFiniteError
from msif_index.gradients import GradientProjector, plan_blocks
from msif_index.preconditioners import make_preconditioner
from msif_index.store import RowStore, RowWriter, ShardedWriter


# ----------------------------------------------------------------------------- conv capture


class _ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 3, 3, padding=1)                          # small identity P_in
        self.c2 = nn.Conv2d(3, 8, 3, stride=2, dilation=2, padding=2)    # projected P_in
        self.c3 = nn.Conv2d(8, 4, 2, bias=False, padding="same", padding_mode="reflect")
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        x = torch.tanh(self.c1(x))
        x = torch.tanh(self.c2(x))
        x = torch.tanh(self.c3(x))
        return self.head(x.flatten(1))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y, reduction="none")


def test_conv_capture_by_convolution_matches_unfold():
    torch.manual_seed(0)
    model = _ConvNet().double()
    names = [n for n, _ in model.named_parameters()]
    batch = (torch.randn(5, 2, 8, 8, dtype=torch.float64), torch.randint(0, 3, (5,)))
    fast = GradientProjector(model, names, proj_dim=60, seed=3)
    kinds = {st.block.name: st.conv_w is not None for st in fast._kron if st.block.kind == "conv2d"}
    assert kinds == {"c1": True, "c2": True, "c3": True}
    assert any(st.p_in is not None for st in fast._kron if st.block.name == "c2")
    slow = GradientProjector(model, names, proj_dim=60, seed=3)
    for st in slow._kron:
        st.conv_w = st.conv_b = None                   # the unfold + matmul route
    a = fast.project_batch(_loss, batch)
    b = slow.project_batch(_loss, batch)
    torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and both equal P applied to the exact per-example gradients
    p = fast.matrix()
    params = dict(model.named_parameters())
    rows = []
    for i in range(5):
        g = torch.autograd.grad(_loss(model, (batch[0][i:i + 1], batch[1][i:i + 1]))[0], [params[n] for n in names])
        rows.append(p @ torch.cat([t.reshape(-1) for t in g]))
    torch.testing.assert_close(a, torch.stack(rows), rtol=1e-8, atol=1e-10)


# ----------------------------------------------------------------------------- preconditioner apply


def _fitted(name, dtype=torch.float64):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    names = [n for n, _ in model.named_parameters()]
    blocks = plan_blocks(model, names, 40, 0, None)
    w_blocks = [b.name != "4" for b in blocks]
    pre = make_preconditioner(name, blocks, w_blocks, 0.1, 1e-3, None)
    dim = sum(b.dim for b in blocks)
    rows = torch.randn(64, dim, dtype=torch.float64)
    rows[:, blocks[0].offset:blocks[0].offset + blocks[0].k_in] = 0.0   # a dead unit: exact zero rows of S
    pre.fit(lambda: iter([rows]), 64)
    return pre, blocks, rows.to(dtype)


def _dense_reference(pre, rows):
    out = []
    for i, b in enumerate(pre._wb):
        q = torch.kron(pre.qs[i], pre.qa[i])
        m_inv = (q * pre.inv_eig[i].reshape(-1)) @ q.T
        out.append(rows[:, b.offset:b.offset + b.dim].double() @ m_inv.T)
    return torch.cat(out, 1)


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kronecker_apply_matches_dense_inverse(name, dtype):
    pre, blocks, rows = _fitted(name, dtype)
    got = pre.apply(rows)
    assert got.dtype == dtype and got.shape == (rows.shape[0], pre.dim_w)
    ref = _dense_reference(pre, rows)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol * float(ref.abs().max()))
    # non-contiguous rows (a column slice of a wider buffer) give the same result
    wide = torch.zeros(rows.shape[0], rows.shape[1] + 7, dtype=dtype)
    wide[:, 3:3 + rows.shape[1]] = rows
    torch.testing.assert_close(pre.apply(wide[:, 3:3 + rows.shape[1]]), got)
    # a new state (load_state_dict) is used, not the cached matrices of the old one
    state = {k: v * (2.0 if k.endswith("inv_eig") else 1.0) for k, v in pre.state_dict().items()}
    pre.load_state_dict(state)
    torch.testing.assert_close(pre.apply(rows), 2 * got)


def _brute_kronecker_fit(name, blocks, w_blocks, rows):
    """S, A, E||Phi||^2, eigenbases and (ekfac) refitted eigenvalues by per-example loops in float64."""
    rows = rows.double()
    n = rows.shape[0]
    out = []
    for b, w in zip(blocks, w_blocks):
        if not w:
            continue
        mats = [rows[z, b.offset:b.offset + b.dim].reshape(b.k_out, b.k_in) for z in range(n)]
        s = sum(m @ m.T for m in mats) / n
        a = sum(m.T @ m for m in mats) / n
        es, qs = torch.linalg.eigh(s)
        ea, qa = torch.linalg.eigh(a)
        if name == "kfac":
            lam = torch.outer(es.clamp_min(0), ea.clamp_min(0)) / (sum(float((m * m).sum()) for m in mats) / n)
        else:
            lam = sum((qs.T @ m @ qa) ** 2 for m in mats) / n
        out.append((qs, qa, lam))
    return out


@pytest.mark.parametrize("name", ["kfac", "ekfac"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_kronecker_fit_matches_per_example_loops(name, dtype):
    """fit's block products (float32 rows: products in float32, sums and eigendecompositions in
    float64) equal the per-example float64 definition; blocks of rows of any size give the same."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    names = [n for n, _ in model.named_parameters()]
    blocks = plan_blocks(model, names, 40, 0, None)
    w_blocks = [b.name != "4" for b in blocks]
    rows = torch.randn(50, sum(b.dim for b in blocks), dtype=torch.float64).to(dtype)
    pre = make_preconditioner(name, blocks, w_blocks, 0.1, 1e-3, None)
    pre.fit(lambda: (rows[i:i + 16] for i in range(0, 50, 16)), 50)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    for i, (qs, qa, lam) in enumerate(_brute_kronecker_fit(name, blocks, w_blocks, rows)):
        # eigenvectors are defined up to sign: compare the projectors Q diag(1/(lam + d)) Q^T
        got = torch.kron(pre.qs[i], pre.qa[i]) @ torch.diag(pre.inv_eig[i].reshape(-1)) @ torch.kron(pre.qs[i], pre.qa[i]).T
        damp = pre.damping_used[pre._wb[i].name]
        assert damp == pytest.approx(0.1 * float(lam.mean()), rel=tol * 10)
        want = torch.kron(qs, qa) @ torch.diag(1.0 / (lam.reshape(-1) + 1e-3 + damp)) @ torch.kron(qs, qa).T
        torch.testing.assert_close(got, want, rtol=tol * 100, atol=tol * 100 * float(want.abs().max()))


@pytest.mark.parametrize("name", ["identity", "gauss-newton"])
def test_identity_and_dense_apply(name):
    pre, blocks, rows = _fitted(name)
    got = pre.apply(rows)
    if name == "identity":
        torch.testing.assert_close(got, rows[:, pre.w_cols])
    else:
        torch.testing.assert_close(got, rows @ pre.inv_w)
        pre.load_state_dict({"inv_w": (2 * pre.inv_w).numpy()})
        torch.testing.assert_close(pre.apply(rows), 2 * got)
    assert got.is_contiguous()


def test_identity_apply_with_scattered_w_columns():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 3), nn.Tanh(), nn.Linear(3, 2))
    blocks = plan_blocks(model, [n for n, _ in model.named_parameters()], None, 0, None)
    w_blocks = [True, False, True]                    # W columns are not one range
    pre = make_preconditioner("identity", blocks, w_blocks, 0.1, 0.0, None)
    rows = torch.randn(7, sum(b.dim for b in blocks))
    torch.testing.assert_close(pre.apply(rows), rows[:, pre.w_cols])


# ----------------------------------------------------------------------------- row store write path


def _rows(a, b, k=6):
    return np.arange(a * k, b * k, dtype=np.float32).reshape(b - a, k) / 7.0


def test_background_writer_writes_the_same_file(tmp_path):
    buf = np.empty((4, 6), dtype=np.float32)
    for bg in (False, True):
        with RowWriter(tmp_path / f"{bg}.h5", 22, 6, "float32", attrs={"a": 1}, background=bg) as w:
            for s in range(0, 22, 4):
                e = min(22, s + 4)
                buf[: e - s] = _rows(s, e)               # the caller reuses its buffer
                w.write(s, buf[: e - s])
    with RowStore.open(tmp_path / "False.h5") as a, RowStore.open(tmp_path / "True.h5") as b:
        np.testing.assert_array_equal(a.read(0, 22), _rows(0, 22))
        np.testing.assert_array_equal(b.read(0, 22), _rows(0, 22))
        assert a.attrs == b.attrs


def test_background_writer_errors(tmp_path, monkeypatch):
    # a finiteness error is raised by write itself, and nothing is saved
    with pytest.raises(NonFiniteError):
        with RowWriter(tmp_path / "nan.h5", 4, 6, background=True) as w:
            w.write(0, _rows(0, 2))
            bad = _rows(2, 4)
            bad[0, 0] = np.nan
            w.write(2, bad)
    # an error of the writer thread surfaces (here on exit) and nothing is saved
    calls = {"n": 0}
    real = RowWriter._write_block

    def failing(self, start, stop, out, *scales):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("simulated write failure")
        real(self, start, stop, out, *scales)

    monkeypatch.setattr(RowWriter, "_write_block", failing)
    with pytest.raises(OSError, match="simulated"):
        with RowWriter(tmp_path / "fail.h5", 4, 6, background=True) as w:
            w.write(0, _rows(0, 2))
            w.write(2, _rows(2, 4))
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_sharded_writer_background(tmp_path):
    sw = ShardedWriter(tmp_path / "s", 10, 6, "float16", shard_rows=4, background=True)
    for start, stop in sw.pending_ranges():
        with sw.shard(sw.shard_index(start)) as w:
            w.write(start, _rows(start, stop))
    assert sw.is_complete()
    got = np.concatenate([b for _, b in sw.iter_blocks(3)])
    np.testing.assert_array_equal(got, _rows(0, 10).astype(np.float16).astype(np.float32))


def test_sharded_writer_background_commit(tmp_path):
    """Commits from a background thread give the same shards; every reader-facing method waits for
    the commit in flight; the next shard starts before the previous commit has ended."""
    plain = ShardedWriter(tmp_path / "a", 10, 6, "float32", shard_rows=4)
    bg = ShardedWriter(tmp_path / "b", 10, 6, "float32", shard_rows=4, background_commit=True)
    for sw in (plain, bg):
        for start, stop in list(sw.pending_ranges()):
            with sw.shard(sw.shard_index(start)) as w:
                w.write(start, _rows(start, stop))
    assert bg._committing is not None                     # the last shard's commit may still run
    assert bg.is_complete() and bg._committing is None    # ... is_complete waited for it
    for i in range(3):
        assert (tmp_path / "b" / f"shard_{i:05d}.h5").read_bytes() != b""
    got = np.concatenate([b for _, b in bg.iter_blocks(3)])
    np.testing.assert_array_equal(got, np.concatenate([b for _, b in plain.iter_blocks(3)]))
    assert not [p for p in (tmp_path / "b").iterdir() if ".tmp-" in p.name]


def test_sharded_writer_background_commit_disk_full(tmp_path, monkeypatch):
    """A commit that fails in the background (disk full at fsync) is raised by the next wait, the
    shard's temporary file is removed and the shard counts as not written."""
    import errno
    import os

    from msif_index.errors import DiskFullError

    sw = ShardedWriter(tmp_path / "s", 8, 6, "float32", shard_rows=4, background_commit=True)

    def no_space(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", no_space)
    with sw.shard(0) as w:
        w.write(0, _rows(0, 4))
    with pytest.raises(DiskFullError):
        sw.wait_commits()
    monkeypatch.undo()
    assert sw.pending_shards() == [0, 1]
    assert not [p for p in (tmp_path / "s").iterdir() if ".tmp-" in p.name]
    for start, stop in list(sw.pending_ranges()):       # the rerun writes both
        with sw.shard(sw.shard_index(start)) as w:
            w.write(start, _rows(start, stop))
    assert sw.is_complete()
    np.testing.assert_array_equal(np.concatenate([b for _, b in sw.iter_blocks(8)]), _rows(0, 8))


def test_float16_conversion_and_overflow(tmp_path):
    x = np.random.default_rng(0).standard_normal((9, 5)).astype(np.float32) * 100
    with RowWriter(tmp_path / "h.h5", 9, 5, "float16") as w:
        w.write(0, x)
    with RowStore.open(tmp_path / "h.h5") as st:
        np.testing.assert_array_equal(st.read(0, 9, dtype=np.float16), x.astype(np.float16))
    x[4, 2] = 1e6                 # beyond float16's 65504: the row is stored scaled, and read back
    with RowWriter(tmp_path / "o.h5", 9, 5, "float16") as w:
        w.write(0, torch.from_numpy(x))
    with RowStore.open(tmp_path / "o.h5") as st:
        np.testing.assert_allclose(st.read(0, 9), x, rtol=2.0 ** -11, atol=2.0 ** -11 * 100)
        np.testing.assert_array_equal(st.read(0, 4), x[:4].astype(np.float16).astype(np.float32))
    x[4, 2] = np.inf
    with pytest.raises(NonFiniteError, match="NaN or infinite"):
        with RowWriter(tmp_path / "i.h5", 9, 5, "float16") as w:
            w.write(0, x)


def test_project_batch_frees_captured_tensors():
    """Module outputs (and what the hooks captured) die with the call: no growth per batch."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = _ConvNet()
    names = [n for n, _ in model.named_parameters()]
    proj = GradientProjector(model, names, proj_dim=60, seed=3)
    refs = []
    handles = [m.register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))
               for m in (model.c1, model.c2, model.head)]
    batch = (torch.randn(4, 2, 8, 8), torch.randint(0, 3, (4,)))
    for _ in range(2):
        proj.project_batch(_loss, batch)
    for h in handles:
        h.remove()
    gc.collect()
    assert len(refs) == 6 and all(r() is None for r in refs)

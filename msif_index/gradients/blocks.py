"""Splitting a chosen list of parameters into projection blocks, and sizing each block.

A *block* is a group of parameters whose per-example gradient is projected together:

* Kronecker kinds (``linear``, ``conv2d``, ``embedding``): the block's per-example gradient is a
  matrix G of shape [d_out, d_in] and it is projected as P_out G P_in^T ([k_out, k_in], stored
  row-major), i.e. by P = P_out (x) P_in. G = sum over positions t of delta_t a_t^T, where a_t is
  the module's input and delta_t the gradient of the loss at the module's output, so neither G nor
  P is ever formed.

  - ``linear`` (nn.Linear): G = [grad_weight | grad_bias]; d_in = in_features + 1 when the bias is
    in the block (the bias is an extra input column of constant 1).
  - ``conv2d`` (nn.Conv2d, groups == 1): the same with grad_weight reshaped to
    [out_channels, in_channels*kh*kw] and a_t the unfolded input patches.
  - ``embedding`` (nn.Embedding): G = grad_weight^T, shape [embedding_dim, num_embeddings]:
    d_out = embedding_dim, d_in = num_embeddings, a_t = one-hot of the token id.

* ``dense``: any other parameter (norm scales, raw nn.Parameters, a module only partly selected,
  conv with groups > 1, subclasses of the module types above, weights shared between modules).
  The block's gradient is p.grad.reshape(-1) (d_out = numel, d_in = 1) projected by one Gaussian
  matrix [k, numel] (k_out = k, k_in = 1).

Allocation rule of ``proj_dim`` (the TOTAL row dimension), one common side ``s`` for all blocks:
a Kronecker block gets k_out = min(d_out, s), k_in = min(d_in, s); a dense block gets
k = min(numel, s*s). The total T(s) is non-decreasing in s; ``s`` is the value whose T(s) is
closest to ``proj_dim`` (ties go to the smaller s), so the total exceeds ``proj_dim`` by at most
half of one step T(s+1) - T(s) (e.g. 784-512-512-10 MLP with biases, proj_dim=4096: s=43,
total 4128). If ``proj_dim`` is at least the number of parameters every block is exact.
``proj_dim=None`` means no projection at all (exact mode: every P is an identity).

``proj_dim_per_layer`` overrides blocks: an int gives every block that target; a dict maps a
block name (module name for Kronecker blocks, parameter name for dense blocks; a parameter name of
a Kronecker block also selects that block) to a target int, or None for "exact". A Kronecker block
with target k gets the common side s_b whose min(d_out,s_b)*min(d_in,s_b) is closest to k; a dense
block gets min(numel, k). When ``proj_dim`` is an int, the blocks not overridden share what is left
of it (proj_dim minus the overridden dims) by the rule above.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

from torch import nn

from ..errors import ConfigError, TaskError

KRONECKER_KINDS = ("linear", "conv2d", "embedding")
KINDS = KRONECKER_KINDS + ("dense",)


@dataclass(frozen=True)
class Block:
    """One projection block (see the module docstring).

    name: module name (Kronecker kinds) or parameter name (dense).
    kind: 'linear' | 'conv2d' | 'embedding' | 'dense'.
    params: parameter names (as in ``model.named_parameters()``) in the block, weight first.
    d_out, d_in: shape of the block's gradient matrix (dense: numel, 1).
    k_out, k_in: projected sides (dense: k, 1); equal to d_out / d_in where not projected.
    dim: k_out * k_in, the block's number of columns in a projected row.
    offset: first column of the block in a projected row.
    bias: whether the block's last input column is a bias (linear/conv2d only).
    """

    name: str
    kind: str
    params: tuple[str, ...]
    d_out: int
    d_in: int
    k_out: int
    k_in: int
    dim: int
    offset: int
    bias: bool = False

    @property
    def kronecker(self) -> bool:
        return self.kind in KRONECKER_KINDS

    @property
    def numel(self) -> int:
        """Number of parameter entries (= gradient entries) in the block."""
        return self.d_out * self.d_in

    @property
    def exact(self) -> bool:
        """True when the block is not compressed (its projection is a permutation)."""
        return self.k_out == self.d_out and self.k_in == self.d_in

    def to_dict(self) -> dict:
        d = asdict(self)
        d["params"] = list(self.params)
        return d


# --------------------------------------------------------------------------------------------
# which parameters go together


def _kron_kind(module: nn.Module) -> str | None:
    """Kind of a module that can be a Kronecker block (exact types: subclasses may override forward)."""
    t = type(module)
    if t is nn.Linear:
        return "linear"
    if t is nn.Conv2d and module.groups == 1:
        return "conv2d"
    if t is nn.Embedding and not module.scale_grad_by_freq:
        return "embedding"
    return None


def _raw_blocks(model: nn.Module, param_names: Sequence[str], dense_modules: Sequence[str]) -> list[dict]:
    """Blocks (without sizes) in model order: dicts with name, kind, params, d_out, d_in, bias."""
    if isinstance(param_names, str):
        raise TaskError("param_names must be a list of parameter names, not a single string")
    names = list(param_names)
    if not names:
        raise TaskError("param_names is empty: list at least one parameter of the model")
    canonical = dict(model.named_parameters())
    seen: set[str] = set()
    for n in names:
        if n not in canonical:
            raise TaskError(f"parameter '{n}' is not in model.named_parameters(); use those names")
        if n in seen:
            raise TaskError(f"parameter '{n}' is listed twice in param_names")
        seen.add(n)
    id2name = {id(p): n for n, p in canonical.items()}

    # how many distinct modules hold each parameter (tied weights -> dense)
    owners: dict[int, int] = {}
    for m in {id(m): m for m in model.modules()}.values():
        for p in m.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1

    mod_names = {n for n, _ in model.named_modules()}
    for n in dense_modules:
        if n not in mod_names:
            raise TaskError(f"dense_modules names '{n}', which is not a module of the model")
    force_dense = set(dense_modules)

    kron_of_param: dict[str, dict] = {}
    for mname, m in model.named_modules():
        kind = _kron_kind(m)
        if kind is None or mname in force_dense:
            continue
        direct = list(m.named_parameters(recurse=False))
        weight = m.weight
        if id2name.get(id(weight)) not in seen:
            continue
        ok = True
        members = []
        for local, p in direct:
            cname = id2name.get(id(p))
            if owners.get(id(p), 0) > 1:
                ok = False  # shared with another module: its gradient comes from several places
            if cname in seen:
                members.append((local, cname))
            elif p.requires_grad:
                ok = False  # trainable but not selected: the module is only partly in the block
        if not ok:
            continue
        bias = any(local == "bias" for local, _ in members)
        params = tuple(c for local, c in sorted(members, key=lambda x: x[0] != "weight"))
        if kind == "linear":
            d_out, d_in = m.out_features, m.in_features + int(bias)
        elif kind == "conv2d":
            kh, kw = m.kernel_size
            d_out, d_in = m.out_channels, m.in_channels * kh * kw + int(bias)
        else:
            d_out, d_in = m.embedding_dim, m.num_embeddings
        blk = dict(name=mname, kind=kind, params=params, d_out=d_out, d_in=d_in, bias=bias)
        for c in params:
            kron_of_param[c] = blk

    out: list[dict] = []
    emitted: set[int] = set()
    for n, p in canonical.items():
        if n not in seen:
            continue
        blk = kron_of_param.get(n)
        if blk is not None:
            if id(blk) not in emitted:
                emitted.add(id(blk))
                out.append(blk)
            continue
        out.append(dict(name=n, kind="dense", params=(n,), d_out=p.numel(), d_in=1, bias=False))
    return out


# --------------------------------------------------------------------------------------------
# sizes


def _side_dims(b: dict, s: int) -> tuple[int, int]:
    if b["kind"] == "dense":
        return min(b["d_out"], s * s), 1
    return min(b["d_out"], s), min(b["d_in"], s)


def _total(blocks: list[dict], s: int) -> int:
    t = 0
    for b in blocks:
        ko, ki = _side_dims(b, s)
        t += ko * ki
    return t


def _s_max(blocks: list[dict]) -> int:
    m = 1
    for b in blocks:
        if b["kind"] == "dense":
            r = 1
            while r * r < b["d_out"]:
                r *= 2
            m = max(m, r)
        else:
            m = max(m, b["d_out"], b["d_in"])
    return m


def _choose_side(blocks: list[dict], target: int) -> int:
    """The side s whose total is closest to ``target`` (ties: smaller s)."""
    hi = _s_max(blocks)
    if _total(blocks, hi) <= target:
        return hi
    lo = 1
    if _total(blocks, lo) >= target:
        return lo
    # smallest s with T(s) >= target (T(lo) < target <= T(hi))
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _total(blocks, mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi if _total(blocks, hi) - target < target - _total(blocks, lo) else lo


def _check_dim(value, what: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{what} must be a positive integer or None, got {value!r}")


def plan_blocks(
    model: nn.Module,
    param_names: Sequence[str],
    proj_dim: int | None,
    seed: int = 0,
    proj_dim_per_layer: Mapping[str, int | None] | int | None = None,
    dense_modules: Sequence[str] = (),
) -> list[Block]:
    """The projection blocks of ``param_names`` in model module order, with their sizes.

    nn.Linear, nn.Conv2d (groups == 1) and nn.Embedding modules (exact types) whose trainable
    parameters are all in ``param_names`` (and not shared with another module) become Kronecker
    blocks; every other listed parameter becomes its own 'dense' block, as do the parameters of
    modules named in ``dense_modules``. ``proj_dim`` is the TOTAL row dimension, allocated by the
    rule of this module's docstring (one common side s; the total exceeds proj_dim by at most half
    a step of s); ``None`` means no projection (exact). ``proj_dim_per_layer`` overrides blocks
    (int: all blocks; dict: block name or parameter name -> int or None). ``seed`` does not change
    the plan; it is accepted so that a plan and its projector are made from the same arguments.
    """
    _check_dim(proj_dim, "proj_dim")
    raw = _raw_blocks(model, param_names, dense_modules)

    target: dict[int, int | None] = {}  # index -> per-block target (None = exact)
    if isinstance(proj_dim_per_layer, Mapping):
        by_name: dict[str, int] = {}
        for i, b in enumerate(raw):
            by_name[b["name"]] = i
            for pn in b["params"]:
                by_name.setdefault(pn, i)
        for key, val in proj_dim_per_layer.items():
            if key not in by_name:
                raise ConfigError(
                    f"proj_dim_per_layer names '{key}', which is not a block or listed parameter; "
                    f"blocks are {[b['name'] for b in raw]}"
                )
            _check_dim(val, f"proj_dim_per_layer['{key}']")
            target[by_name[key]] = val
    elif proj_dim_per_layer is not None:
        _check_dim(proj_dim_per_layer, "proj_dim_per_layer")
        target = {i: proj_dim_per_layer for i in range(len(raw))}

    sizes: dict[int, tuple[int, int]] = {}
    for i, t in target.items():
        b = raw[i]
        if t is None:
            sizes[i] = (b["d_out"], b["d_in"])
        else:
            sizes[i] = _side_dims(b, _choose_side([b], t))
    rest = [i for i in range(len(raw)) if i not in target]
    if rest:
        rest_blocks = [raw[i] for i in rest]
        if proj_dim is None:
            for i in rest:
                sizes[i] = (raw[i]["d_out"], raw[i]["d_in"])
        else:
            left = proj_dim - sum(ko * ki for ko, ki in sizes.values())
            if left < len(rest):
                raise ConfigError(
                    f"proj_dim={proj_dim} leaves {left} dimensions for {len(rest)} blocks after "
                    f"proj_dim_per_layer; raise proj_dim or override fewer blocks"
                )
            s = _choose_side(rest_blocks, left)
            for i in rest:
                sizes[i] = _side_dims(raw[i], s)

    blocks: list[Block] = []
    offset = 0
    for i, b in enumerate(raw):
        ko, ki = sizes[i]
        blocks.append(Block(name=b["name"], kind=b["kind"], params=tuple(b["params"]), d_out=b["d_out"],
                            d_in=b["d_in"], k_out=ko, k_in=ki, dim=ko * ki, offset=offset, bias=b["bias"]))
        offset += ko * ki
    return blocks

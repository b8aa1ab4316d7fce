"""Validated, frozen configuration of a build, with help text; saved into the index and compared on reuse."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import ConfigError
from .preconditioners import PRECONDITIONERS

#: ``auto`` uses the projected Hessian while the dense projection has at most this many entries
AUTO_HESSIAN_ENTRIES = 50_000_000
#: default relative damping of ``hessian``: over every pretraining example, and over a subsample
#: (``hessian_examples`` < n), whose Hessian misses the curvature of the examples left out, so that
#: a light damping inflates their scores (README, "Why auto")
HESSIAN_DAMPING = 1e-3
SUBSAMPLED_HESSIAN_DAMPING = 0.1
DTYPES = ("float32", "float16", "float64")
COMPUTE_DTYPES = ("auto", "float32", "float64")
FISHERS = ("gauss-newton", "empirical")


def _help(text: str, default: Any) -> Any:
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class BuildConfig:
    """How the pretraining side of the index is built (``msif build-index`` options)."""

    proj_dim: int | None = _help(
        "Total projected dimension k of a row over (W, U) (split across layers); 0 or None: no "
        "projection (exact, small models only).", 4096)
    proj_dim_per_layer: int | None = _help(
        "Per-layer projected dimension (overrides proj_dim's split for every layer).", None)
    preconditioner: str = _help(
        "H~^{-1}: auto | identity | gauss-newton | kfac | ekfac | hessian | exact (see README). auto: "
        "hessian when the dense projection fits (k x dim(W,U) <= 5e7), else ekfac.", "auto")
    damping: float | None = _help(
        "Damping as a fraction of the mean eigenvalue of the preconditioner; unset (None): 1e-3 for "
        "hessian over every example, 0.1 for hessian over a subsample (n > hessian_examples), 0 for "
        "exact, 0.1 otherwise.", None)
    hessian_examples: int = _help(
        "Pretraining examples (seeded subsample) for the 'hessian' preconditioner's HVPs.", 4096)
    stats_examples: int = _help(
        "Pretraining examples (seeded subsample) for the statistics of gauss-newton / kfac / ekfac; with "
        "fisher=gauss-newton, gradient rows (examples x the task's R pseudo-losses).", 8192)
    fisher: str = _help(
        "Curvature of gauss-newton / kfac / ekfac: gauss-newton (task.pretrain_fisher_losses: the true "
        "Fisher / Gauss-Newton matrix) | empirical (gradients at the data's targets) | auto (gauss-newton "
        "when the task defines pretrain_fisher_losses).", "auto")
    seed: int = _help("Seed of the random projection (and of subsamples).", 0)
    dtype: str = _help("Storage dtype of the stored rows: float32 | float16 (half the disk; each row "
                       "scaled by a power of two, so any magnitude fits) | float64.", "float32")
    compute_dtype: str = _help("Dtype of gradient computation: auto (the model's; float32 for a float16 / bfloat16 model) | float32 | float64.", "auto")
    batch_size: int = _help("Pretraining examples per batch.", 256)
    device: str = _help("Torch device of the gradient computation: cpu, cuda, cuda:1 ...", "cpu")
    factory: str = _help("Search index: Flat (exact), SVD<r> (msif's two-stage index: candidates in "
                         "the rows' top-r principal subspace, rescored exactly; e.g. SVD128; fastest "
                         "SVD128,PQ64fs, with a 4-bit fast-scan PQ stage in front), or a FAISS "
                         "inner-product factory string (IVF1024,Flat, HNSW32, IVF256,PQ32 ...).", "Flat")
    shard_rows: int = _help("Rows per resumable shard of the featurize pass.", 16384)

    def __post_init__(self) -> None:
        if self.proj_dim == 0 and not isinstance(self.proj_dim, bool):
            object.__setattr__(self, "proj_dim", None)          # 0 = no projection, as on the command line
        if self.proj_dim is not None and (isinstance(self.proj_dim, bool) or not isinstance(self.proj_dim, int)
                                          or self.proj_dim < 1):
            raise ConfigError(f"proj_dim must be a positive integer, or 0 / None for no projection, got {self.proj_dim!r}")
        if self.proj_dim_per_layer is not None and (isinstance(self.proj_dim_per_layer, bool)
                                                    or not isinstance(self.proj_dim_per_layer, int)
                                                    or self.proj_dim_per_layer < 1):
            raise ConfigError(f"proj_dim_per_layer must be a positive integer, got {self.proj_dim_per_layer!r}")
        if self.preconditioner not in PRECONDITIONERS + ("auto",):
            raise ConfigError(f"unknown preconditioner {self.preconditioner!r}; choose auto or one of "
                              f"{', '.join(PRECONDITIONERS)}")
        if self.damping is not None and not (self.damping >= 0):
            raise ConfigError(f"damping must be >= 0, got {self.damping!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ConfigError(f"compute_dtype must be one of {', '.join(COMPUTE_DTYPES)}, got {self.compute_dtype!r}")
        if self.fisher not in FISHERS + ("auto",):
            raise ConfigError(f"fisher must be auto, {' or '.join(FISHERS)}, got {self.fisher!r}")
        for name in ("batch_size", "shard_rows", "hessian_examples", "stats_examples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)!r}")

    def resolved(self, num_params: int, k: int, n: int | None = None) -> "BuildConfig":
        """``auto`` preconditioner and ``None`` damping made concrete for a model with ``num_params``
        parameters in (W, U), a row of ``k`` columns and ``n`` pretraining examples (None: hessian's
        subsample taken to cover them all)."""
        pre = self.preconditioner
        if pre == "auto":
            pre = "hessian" if k * num_params <= AUTO_HESSIAN_ENTRIES else "ekfac"
        damping = self.damping
        if damping is None:
            hessian = HESSIAN_DAMPING if n is None or self.hessian_examples >= n else SUBSAMPLED_HESSIAN_DAMPING
            damping = {"hessian": hessian, "exact": 0.0}.get(pre, 0.1)
        return replace(self, preconditioner=pre, damping=damping)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "BuildConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def with_(self, **changes: Any) -> "BuildConfig":
        return replace(self, **changes)

    def identity_fields(self) -> dict[str, Any]:
        """The fields that change the stored rows (batch size, device, shard size and the search
        factory do not: another factory rebuilds only the search structure over the same rows)."""
        d = self.to_dict()
        for k in ("batch_size", "device", "shard_rows", "factory"):
            d.pop(k)
        return d


def _fields_doc(cls: type) -> str:
    """``cls``'s docstring followed by each field's name, default and help text, so that
    ``help(BuildConfig)`` and IDEs show what ``msif build-index --help`` shows."""
    lines = [cls.__doc__.strip(), "", "Fields (name = default: help):"]
    for f in fields(cls):
        lines.append(f"    {f.name} = {f.default!r}: {f.metadata['help']}")
    return "\n".join(lines)


#: named starting points (``--preset``)
PRESETS: dict[str, BuildConfig] = {
    "default": BuildConfig(),
    "exact": BuildConfig(proj_dim=None, preconditioner="exact", damping=0.0, compute_dtype="float64",
                         dtype="float64"),
    "fast": BuildConfig(proj_dim=1024, preconditioner="kfac", dtype="float16"),
}


def _presets_doc() -> str:
    """The presets as ``help(BuildConfig)`` lists them: each one's fields that differ from the default."""
    lines = ["", "Presets (msif_index.config.PRESETS[name], `msif build-index --preset name`; "
             "cfg.with_(field=...) changes one):"]
    for name, cfg in PRESETS.items():
        changed = {f.name: getattr(cfg, f.name) for f in fields(BuildConfig)
                   if getattr(cfg, f.name) != f.default}
        lines.append(f"    {name}: " + (", ".join(f"{k}={v!r}" for k, v in changed.items()) or "the defaults"))
    return "\n".join(lines)


BuildConfig.__doc__ = _fields_doc(BuildConfig) + "\n" + _presets_doc()


def help_text(name: str) -> str:
    """The help text of a BuildConfig field (used by the CLI)."""
    for f in fields(BuildConfig):
        if f.name == name:
            return f.metadata["help"]
    raise KeyError(name)

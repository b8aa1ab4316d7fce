"""msif-index: multi-stage influence (Chen et al., NeurIPS 2020) as a searchable index.

Sign convention: I(z, x_t) = d l(x_t) / d eps for up-weighting pretraining example z by eps.
I < 0: z is helpful (a proponent); I > 0: z is harmful (an opponent).
"""
from .config import BuildConfig
from .errors import MsifError
from .exact import exact_influence
from .task import MultiStageTask, cross_entropy_fisher_losses, load_task, validate_task

__all__ = ["BuildConfig", "InfluenceIndex", "MsifError", "MultiStageTask", "QueryResult", "build_index",
           "cross_entropy_fisher_losses", "exact_influence", "load_task", "validate_task"]

# the build and the index import faiss: loaded on first use, so `import msif_index` works without it
_LAZY = {"build_index": "build", "InfluenceIndex": "index", "QueryResult": "index"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__version__ = "0.1.0"

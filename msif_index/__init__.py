"""msif-index: multi-stage influence (Chen et al., NeurIPS 2020) as a searchable index.

Sign convention: I(z, x_t) = d l(x_t) / d eps for up-weighting pretraining example z by eps.
I < 0: z is helpful (a proponent); I > 0: z is harmful (an opponent).
"""
from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BuildConfig", "EvaluationConfig", "InfluenceIndex", "MsifError", "MultiStageTask", "QueryResult",
           "build_index", "cross_entropy_fisher_losses", "evaluate", "exact_influence", "load_task",
           "validate_task"]

# every name is loaded on first use: `import msif_index` imports neither torch nor faiss, so the `msif`
# command's entry point (msif_index.cli.run) runs before them and holds Ctrl-C while they load
_LAZY = {"BuildConfig": "config", "MsifError": "errors", "exact_influence": "exact",
         "MultiStageTask": "task", "cross_entropy_fisher_losses": "task", "load_task": "task",
         "validate_task": "task", "build_index": "build", "InfluenceIndex": "index", "QueryResult": "index",
         "evaluate": "evaluation.runner", "EvaluationConfig": "evaluation.runner"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    try:                                   # a submodule, as `import msif_index; msif_index.errors` had it
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

"""The faiss module, or one clear line saying how to install it.

faiss-cpu and faiss-gpu install the same ``faiss`` module and cannot both be installed, so neither
is a core dependency: ``pip install "msif-index[cpu]"`` (default) or ``"msif-index[gpu]"``.
"""
from __future__ import annotations

from .errors import MsifError

try:
    import faiss  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised by a subprocess test with faiss hidden
    raise MsifError('faiss is not installed: pip install "msif-index[cpu]" (or "msif-index[gpu]" on a '
                    'CUDA machine, without faiss-cpu)') from e

"""What an index folder holds, without loading its rows: ``describe(path)`` (``msif info``).

Reads the manifest (or, for a build that has not finished, build.json and the committed shards)
and the attached operators' headers; opens no row store and builds no search structure, so it
answers in milliseconds whatever n is.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from .atomic import read_json
from .build import BUILD_FILE, FAISS_NAMES, MANIFEST, OPERATORS, PRECOND, ROWS, SHARDS, _faiss_name
from .errors import CorruptIndexError


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return 0


def _operators(path: Path) -> list[dict[str, Any]]:
    """The attached finetuned models: key, finetuning style, alpha, how H_tt was formed."""
    import json

    import h5py

    out = []
    for f in sorted((path / OPERATORS).glob("*.h5")) if (path / OPERATORS).is_dir() else []:
        entry: dict[str, Any] = {"key": f.stem, "bytes": f.stat().st_size}
        try:
            with h5py.File(f, "r") as h:
                info = json.loads(h.attrs["info"])
                entry.update(finetuning=str(h.attrs["finetuning"]), alpha=float(h.attrs["alpha"]),
                             h_tt=info.get("h_tt"), b_shape=list(h["b"].shape))
        except (OSError, KeyError, ValueError, TypeError, RuntimeError):
            entry["error"] = "unreadable (attach the model again to recompute it)"
        out.append(entry)
    return out


def describe(path: str | Path) -> dict[str, Any]:
    """A JSON-ready summary of the index (or unfinished build) in ``path``; CorruptIndexError when
    the folder holds neither."""
    from .index import _check_manifest

    p = Path(path)
    if (p / MANIFEST).is_file():
        m = read_json(p / MANIFEST, "the index manifest")
        _check_manifest(p / MANIFEST, m)
        cfg, pre = m["config"], m["preconditioner"]
        faiss_file = _faiss_name(m)
        return {
            "index": str(p), "complete": True, "version": m.get("version"),
            "n": m["n"], "k": m["k"], "dtype": cfg.get("dtype"),
            "preconditioner": pre.get("name"), "row_basis": pre.get("row_basis", "parameter"),
            "damping_used": pre.get("damping_used"), "fisher": cfg.get("fisher"),
            "proj_dim": cfg.get("proj_dim"), "seed": cfg.get("seed"), "factory": cfg.get("factory"),
            "w_names": m["w_names"], "u_names": m.get("u_names", []),
            "fingerprints": m.get("fingerprint_short", {}),
            "data_fingerprint": (m["identity"].get("data") or "")[:12] or None,
            "timings": m.get("timings", {}),
            "bytes": {"rows (shards)": _size(p / SHARDS) + _size(p / ROWS), "preconditioner": _size(p / PRECOND),
                      "search": _size(p / faiss_file) if faiss_file in FAISS_NAMES else 0,
                      "operators": _size(p / OPERATORS)},
            "attached": _operators(p),
        }
    if (p / BUILD_FILE).is_file():
        b = read_json(p / BUILD_FILE, "the build's " + BUILD_FILE)
        try:
            n = int(b["identity"]["n"])
            shard_rows = min(int(b["config"]["shard_rows"]), max(n, 1))
            cfg = b["config"]
        except (KeyError, TypeError, ValueError):
            raise CorruptIndexError(f"{p / BUILD_FILE} is damaged; rerun the build with --overwrite") from None
        done = sorted((p / SHARDS).glob("shard_*.h5")) if (p / SHARDS).is_dir() else []
        rows_done = sum(min(shard_rows, n - int(f.stem.split("_")[1]) * shard_rows) for f in done
                        if f.stem.split("_")[1].isdigit())
        return {"index": str(p), "complete": False, "n": n, "preconditioner": cfg.get("preconditioner"),
                "proj_dim": cfg.get("proj_dim"), "factory": cfg.get("factory"),
                "shards_done": len(done), "shards_total": math.ceil(n / shard_rows),
                "rows_done": rows_done, "statistics_done": (p / PRECOND).is_file(),
                "bytes": {"rows (shards)": _size(p / SHARDS)},
                "resume": "rerun the same msif build-index command"}
    raise CorruptIndexError(f"no msif index in {p} (no {MANIFEST}); build one with msif build-index")

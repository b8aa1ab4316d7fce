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
from .build import (BUILD_FILE, FAISS_NAMES, MANIFEST, OPERATORS, PRECOND, ROWS, SHARDS, _faiss_name,
                    saved_hvp_rows)
from .errors import CorruptIndexError
from .fingerprint import short
from .lock import lock_holder, writer_text
from .operator import verify_file
from .search import built_at_open


def _size(path: Path) -> int:
    """Bytes of a file, or of the files in a folder (temporary files of a running build skipped)."""
    files = [path] if path.is_file() else ([p for p in path.rglob("*") if not p.name.startswith(".")]
                                           if path.is_dir() else [])
    total = 0
    for f in files:
        try:
            if f.is_file():
                total += f.stat().st_size
        except OSError:                 # removed meanwhile (a build renaming its shards)
            pass
    return total


def _operators(path: Path) -> list[dict[str, Any]]:
    """The attached finetuned models: key, finetuning style, alpha, how H_tt was formed."""
    import json

    import h5py

    out = []
    for f in sorted((path / OPERATORS).glob("*.h5")) if (path / OPERATORS).is_dir() else []:
        entry: dict[str, Any] = {"key": f.stem}
        try:
            entry["bytes"] = f.stat().st_size
            verify_file(f)                       # HDF5 can crash on a damaged file: its seal first
            with h5py.File(f, "r", locking=False) as h:
                info = json.loads(h.attrs["info"])
                finetuning = str(h.attrs["finetuning"])
                info = info if isinstance(info, dict) else {}
                negative = {what: info[key] for what, key in (("H_tt", "h_tt_negative"),
                                                               ("Schur complement", "schur_negative"))
                            if info.get(key)}
                entry.update(label=str(h.attrs.get("label", "")) or None, finetuning=finetuning,
                             alpha=float(h.attrs["alpha"]) if finetuning == "proximal" else None,
                             h_tt=info.get("h_tt"), b_shape=list(h["b"].shape), negative=negative or None)
        except CorruptIndexError as e:
            entry["error"] = f"{getattr(e, 'reason', 'damaged')} (the next attach of this model computes it again)"
        except (OSError, KeyError, ValueError, TypeError, RuntimeError):
            entry["error"] = "unreadable (the next attach of this model computes it again)"
        out.append(entry)
    return out


def _shards_done(folder: Path, n: int) -> tuple[int, int, int | None]:
    """(shards, rows, their shard_rows) committed for a build of ``n`` rows, from each shard's own
    header (files that are not shards of such a build do not count; shard_rows None without one)."""
    import h5py

    shards = rows = 0
    size = None
    for f in sorted(folder.glob("shard_*.h5")) if folder.is_dir() else []:
        try:
            with h5py.File(f, "r") as h:
                a = h.attrs
                if int(a["total_rows"]) != n:
                    continue
                start, stop, per = int(a["shard_start"]), int(a["shard_stop"]), int(a["shard_rows"])
        except (OSError, KeyError, ValueError, TypeError, RuntimeError):
            continue
        if 0 <= start < stop <= n and per >= 1:
            shards += 1
            rows += stop - start
            size = per
    return shards, rows, size


def describe(path: str | Path, verify: bool = False) -> dict[str, Any]:
    """A JSON-ready summary of the index (or unfinished build) in ``path``; CorruptIndexError when
    the folder holds neither. ``verify``: also read every stored row and check every file's checksum
    (what a query would meet; seconds per GB), adding what is damaged to ``problems``."""
    from .index import _check_manifest

    p = Path(path)
    if (p / MANIFEST).is_file():
        m = read_json(p / MANIFEST, "the index manifest")
        _check_manifest(p / MANIFEST, m)
        cfg, pre = m["config"], m["preconditioner"]
        faiss_file = _faiss_name(m)
        problems = []
        if not built_at_open(cfg["factory"]) and not (p / str(faiss_file)).is_file():
            problems.append(f"the search index file {faiss_file} is missing: msif build-index ... --overwrite "
                            f"rebuilds it from the rows")
        elif verify:
            from .build import _search_damage
            damage = _search_damage(p)
            if damage:
                problems.append(f"{damage}: msif build-index ... --overwrite rebuilds it from the rows")
        if verify:
            from .build import index_damage
            damage = index_damage(p)
            if damage:
                problems.append(f"{damage}: rerun the build with --overwrite (it rebuilds what is damaged)")
        attached = _operators(p)                 # (verify_file checks each operator's seal)
        problems += [f"the finetune operator {a['key']} is {a['error']}" for a in attached if "error" in a]
        fisher = cfg.get("fisher") if pre.get("name") in ("gauss-newton", "kfac", "ekfac") else None
        timings = {k: v for k, v in (m.get("timings") or {}).items() if isinstance(v, (int, float))}
        return {
            "index": str(p), "complete": True, "version": m.get("version"),
            "n": m["n"], "k": m["k"], "dtype": cfg.get("dtype"),
            "preconditioner": pre.get("name"), "row_basis": pre.get("row_basis", "parameter"),
            "damping": pre.get("damping"), "damping_used": pre.get("damping_used"), "statistics": fisher,
            "negative_eigenvalues": pre.get("negative_eigenvalues"),
            "proj_dim": cfg.get("proj_dim"), "seed": cfg.get("seed"), "factory": cfg.get("factory"),
            "k_raw": m.get("k_raw"), "num_params": (m.get("projector") or {}).get("num_params"),
            "w_names": m["w_names"], "u_names": m.get("u_names") or [],
            "fingerprints": {k: short(v) for k, v in m["fingerprints"].items() if isinstance(v, str)},
            "data_fingerprint": short(m["identity"]["data"]) if isinstance(m["identity"].get("data"), str) else None,
            "timings": timings, "resumed": m.get("resumed") if isinstance(m.get("resumed"), dict) else None,
            "bytes": {"rows": _size(p / SHARDS) + _size(p / ROWS), "preconditioner": _size(p / PRECOND),
                      "search": _size(p / faiss_file) if faiss_file in FAISS_NAMES else 0,
                      "operators": _size(p / OPERATORS)},
            "attached": attached, "verified": verify and not problems,
            "writer_pid": lock_holder(p),             # e.g. an --overwrite rebuild running beside it
            "problems": problems,
        }
    if (p / BUILD_FILE).is_file():
        b = read_json(p / BUILD_FILE, "the build's " + BUILD_FILE)
        try:
            n = int(b["identity"]["n"])
            shard_rows = min(int(b["config"]["shard_rows"]), max(n, 1))
            cfg = b["config"]
            if n < 0 or shard_rows < 1:
                raise ValueError
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CorruptIndexError(f"{p / BUILD_FILE} is damaged; rerun the build with --overwrite") from None
        shards, rows, written_per_shard = _shards_done(p / SHARDS, n)
        writer = lock_holder(p)
        shard_rows = written_per_shard or shard_rows      # build.json may hold a refused rerun's setting
        return {"index": str(p), "complete": False, "n": n, "preconditioner": cfg.get("preconditioner"),
                "proj_dim": cfg.get("proj_dim"), "factory": cfg.get("factory"),
                "shards_done": shards, "shards_total": math.ceil(n / shard_rows) if n else 0,
                "rows_done": rows, "statistics_done": (p / PRECOND).is_file(), "hvps_saved": saved_hvp_rows(p),
                "bytes": {"rows": _size(p / SHARDS)}, "writer_pid": writer,
                "resume": ("rerun the same msif build-index command" if writer is None
                           else f"wait for the build running in {writer_text(writer)}")}
    writer = lock_holder(p)
    if writer is not None:                  # a build checking its task, before it writes build.json
        raise CorruptIndexError(f"a build ({writer_text(writer)}) is starting in {p}; wait for it to finish")
    raise CorruptIndexError(f"no msif index in {p} (no {MANIFEST}); build one with msif build-index")

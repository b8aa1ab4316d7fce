"""Where a CUDA build spends its time (one short run on a CUDA machine; not part of the test suite).

Run:  python benchmarks/gpu_profile.py --n 100000 --out gpu_profile.json
For the 784-512-512 MLP (and, with ``--models mlp,cnn``, the small CNN at n / 3; batch 256,
proj_dim 4096, default preconditioner), on ``cuda`` and on ``cpu`` in one process, for each write
variant (``--variants``: ``default``: the writes in a background thread with O_DIRECT pages,
and ``foreground``: the writes in the caller's thread, msif_index.store.BACKGROUND_SHARD_WRITES off): wall time of ``build_index``, the manifest's phase
timings, the time to read the pretraining batches alone (the synthetic data are made on the CPU),
one batched training step; then (unless ``--no-profile``) the first build once more under cProfile,
whose top functions are printed and saved, so that host-device synchronisation and CPU-side
writing show where they land.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import torch  # noqa: E402

import common  # noqa: E402
from gpu_check import train_eps_on  # noqa: E402


def _build(task, device: str, out: Path) -> dict[str, Any]:
    from msif_index.build import build_index
    from msif_index.config import BuildConfig
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    build_index(task, out, BuildConfig(proj_dim=4096, batch_size=256, device=device), progress_bar=False)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    wall = time.perf_counter() - t0
    return {"device": device, "wall_s": wall, "timings": json.loads((out / "manifest.json").read_text())["timings"]}


def _read_batches_s(task, n: int, batch_size: int = 256) -> float:
    data = task.pretrain_dataset()
    t0 = time.perf_counter()
    for a in range(0, n, batch_size):
        data.batch(range(a, min(n, a + batch_size)))
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--out", default=str(HERE / "gpu_profile.json"))
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--models", default="mlp")
    ap.add_argument("--variants", default="default,foreground")
    ap.add_argument("--no-profile", action="store_true")
    args = ap.parse_args()
    from msif_index import store as S
    tmp = Path(tempfile.mkdtemp(prefix="msif_gpu_profile_"))
    devices = ["cuda", "cpu"] if torch.cuda.is_available() else ["cpu"]
    result: dict[str, Any] = {"n": args.n, "torch": torch.__version__, "cpu_threads": torch.get_num_threads(),
                              "builds": []}
    print(json.dumps(result), flush=True)
    first = None
    for model in args.models.split(","):
        n = args.n if model == "mlp" else args.n // 3
        task = common.mlp_task(n) if model == "mlp" else common.cnn_task(n)
        result[f"read_batches_s_{model}"] = _read_batches_s(task, n)
        first = first or task
        for device in devices:
            train = train_eps_on(task, device)
            for variant in args.variants.split(","):
                saved = S.BACKGROUND_SHARD_WRITES
                S.BACKGROUND_SHARD_WRITES = variant != "foreground"
                try:
                    row = _build(task, device, tmp / f"{model}_{device}_{variant}")
                finally:
                    S.BACKGROUND_SHARD_WRITES = saved
                row.update(model=model, n=n, variant=variant, train_examples_per_s=train,
                           build_examples_per_s=n / row["wall_s"])
                row["build_over_train"] = row["build_examples_per_s"] / train
                result["builds"].append(row)
                print(json.dumps(row), flush=True)
                Path(args.out).write_text(json.dumps(result, indent=2))
    if not args.no_profile:
        prof = cProfile.Profile()
        prof.enable()
        _build(first, devices[0], tmp / "profiled")
        prof.disable()
        text = io.StringIO()
        stats = pstats.Stats(prof, stream=text).sort_stats("tottime")
        stats.print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        result["profile"] = text.getvalue()
        print(result["profile"])
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Shared fixtures: the digits example task (trained once per session, float64)."""
from __future__ import annotations

import os

# OpenMP threads that spin while waiting make torch many times slower when the CPU is shared
# (measured 7.6x on one test); set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "examples" / "digits" / "task.py"


@pytest.fixture(scope="session")
def digits_frozen():
    import msif_index
    return msif_index.load_task(f"{DIGITS}:task")


@pytest.fixture(scope="session")
def digits_proximal():
    import msif_index
    return msif_index.load_task(f"{DIGITS}:proximal_task")

"""Shared fixtures: the digits example task (trained once per session, float64)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

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

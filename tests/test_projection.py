"""Seeded random projections (msif_index.projection)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from msif_index.errors import ConfigError
from msif_index.projection import (
    CHUNK_COLS,
    block_seed,
    gaussian_chunks,
    gaussian_projection,
    gram_chunked,
    project_chunked,
)


def test_block_seed_is_stable_across_processes():
    here = block_seed(7, "layers.0.fc")
    code = "from msif_index.projection import block_seed; print(block_seed(7, 'layers.0.fc'))"
    there = int(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                               env={"PYTHONHASHSEED": "123", "PATH": ""},
                               cwd=Path(__file__).resolve().parents[1]).stdout)
    assert here == there
    assert 0 <= here < 2**63
    assert block_seed(7, "a") != block_seed(7, "b")
    assert block_seed(7, "a") != block_seed(8, "a")


def test_gaussian_projection_deterministic_and_scaled():
    a = gaussian_projection(64, 300, seed=3, dtype=torch.float64)
    b = gaussian_projection(64, 300, seed=3, dtype=torch.float64)
    c = gaussian_projection(64, 300, seed=4, dtype=torch.float64)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.shape == (64, 300)
    # entries N(0, 1/rows): the variance of 19200 samples is 1/64 within a few percent
    assert abs(a.var().item() * 64 - 1) < 0.05
    # float32 is the float64 matrix rounded
    assert torch.equal(gaussian_projection(64, 300, seed=3, dtype=torch.float32), a.float())


def test_identity_when_not_compressing():
    for rows in (None, 10, 12):
        p = gaussian_projection(rows, 10, seed=0, dtype=torch.float64)
        assert torch.equal(p, torch.eye(10, dtype=torch.float64))
    with pytest.raises(ConfigError):
        gaussian_projection(0, 10, seed=0)


def test_chunks_concatenate_to_the_matrix():
    cols = 2 * CHUNK_COLS + 5
    full = gaussian_projection(8, cols, seed=11, dtype=torch.float64)
    parts = list(gaussian_chunks(8, cols, seed=11, dtype=torch.float64))
    assert [(s, e) for s, e, _ in parts] == [(0, CHUNK_COLS), (CHUNK_COLS, 2 * CHUNK_COLS), (2 * CHUNK_COLS, cols)]
    assert torch.equal(torch.cat([p for _, _, p in parts], dim=1), full)
    x = torch.randn(3, cols, dtype=torch.float64)
    torch.testing.assert_close(project_chunked(x, 8, seed=11), x @ full.t(), rtol=1e-12, atol=1e-12)
    out = torch.full((3, 8), float("nan"), dtype=torch.float64)
    assert project_chunked(x, 8, seed=11, out=out) is out
    torch.testing.assert_close(out, x @ full.t(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gram_chunked(8, cols, seed=11, dtype=torch.float64), full @ full.t(),
                               rtol=1e-12, atol=1e-12)


def test_expected_gram_is_identity():
    # E[P^T P] = I: averaged over seeds, P^T P approaches the identity (error ~ 1/sqrt(rows * seeds))
    acc = torch.zeros(20, 20, dtype=torch.float64)
    n = 200
    for s in range(n):
        p = gaussian_projection(16, 20, seed=s, dtype=torch.float64)
        acc += p.t() @ p
    acc /= n
    assert (acc - torch.eye(20, dtype=torch.float64)).abs().max() < 6 / (16 * n) ** 0.5

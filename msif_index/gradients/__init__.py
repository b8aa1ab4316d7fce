"""Per-example projected gradients over a chosen list of parameters of any torch model.

``plan_blocks`` splits the parameters into projection blocks (Kronecker blocks for nn.Linear,
nn.Conv2d and nn.Embedding; 'dense' blocks for everything else) and sizes them;
``GradientProjector`` computes rows P g_b for every example b of a batch, projects arbitrary
vectors over the parameters through the same P (``project_dense``), and exposes P (``matrix``),
P P^T (``gram``) and a JSON description (``config``) for index manifests.
"""
from .blocks import KINDS, KRONECKER_KINDS, Block, plan_blocks
from .capture import GradientProjector

__all__ = ["Block", "GradientProjector", "KINDS", "KRONECKER_KINDS", "plan_blocks"]

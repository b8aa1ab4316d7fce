"""Retrieval evaluation: against exact influence, retraining (LOO, LDS) and baselines.

    from msif_index.evaluation import EvaluationConfig, evaluate
    result = evaluate(task, "indexes/digits", EvaluationConfig(against="lds", num_subsets=50), "reports/lds")
    result.report["summary"]["index"]["lds"]

Modules: metrics (correlations, tie-aware recall@k, sign precision@k), baselines (the compared methods:
index, grad_sim, repr_sim, single_stage, exact), against_exact (and the configuration sweep),
retraining (retraining hooks + on-disk cache), loo (leave-out protocol), lds (linear datamodeling
score), report (the JSON schema, docs/evaluation_schema.md), figures (PNGs), runner (``evaluate``).
Sign convention: every score is I(z, x_t)-like: negative = helpful, positive = harmful; removing z
changes the test measurement by about -I / n.
"""
from .baselines import METHODS, backbone_features
from .metrics import pearson, spearman
from .report import SCHEMA_VERSION, SchemaError, validate_report
from .retraining import Retrainer, task_fingerprint
from .runner import EvaluationConfig, EvaluationResult, evaluate

__all__ = ["EvaluationConfig", "EvaluationResult", "METHODS", "Retrainer", "SCHEMA_VERSION", "SchemaError",
           "backbone_features", "evaluate", "pearson", "spearman", "task_fingerprint", "validate_report"]

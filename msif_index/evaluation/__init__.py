"""Retrieval evaluation: against exact influence, retraining (LOO, LDS) and baselines."""

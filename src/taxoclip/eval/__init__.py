"""Evaluation: metrics at every rank, zero-shot scoring, baselines on the same features, the report."""

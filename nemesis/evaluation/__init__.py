"""Evaluation: accuracy of a prompt from cached features, metrics, zero-shot baselines."""

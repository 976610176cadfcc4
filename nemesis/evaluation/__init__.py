"""Evaluation: accuracy of a prompt from cached features, metrics, zero-shot baselines, and prompts read in words
(the vocabulary tokens nearest to each context vector)."""

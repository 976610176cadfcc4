"""Formats and files: prompt checkpoints (ours and Dassl's), sweep tables, run state."""

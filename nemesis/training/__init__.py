"""Training: run configs, the trainer and its phases, grids of runs."""

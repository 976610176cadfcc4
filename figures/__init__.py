"""Recipes that regenerate the paper's figures from runs and sweeps, and the CPU demo that draws them."""

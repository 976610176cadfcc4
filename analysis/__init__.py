"""Analysis of sweeps and training runs: Low-Norm Effect frequency, norm trajectories, figures, reports.

Works on result files and run folders with pandas; needs no model, except `transport`, which
evaluates a PLOT prompt to draw its transport plans. The public names below are
imported on first use, so the CLI can read `analysis.defaults` without pandas or matplotlib.
"""

from __future__ import annotations

from nemesis.lazy import lazy_attributes

_PUBLIC = {
    "Inputs": "results",
    "PaperLayout": "layout",
    "Report": "report",
    "Run": "results",
    "Table": "tables",
    "add_mcnemar": "low_norm_effect",
    "base_to_new_table": "tables",
    "build_report": "report",
    "dataset_name": "labels",
    "depth_table_and_figure": "plots",
    "domain_generalization_table": "tables",
    "epoch_frame": "trajectories",
    "few_shot_results": "tables",
    "few_shot_table": "tables",
    "frequency_table_and_figure": "plots",
    "harmonic_mean": "tables",
    "lne_by_depth": "low_norm_effect",
    "lne_by_layer": "low_norm_effect",
    "lne_depth_table": "tables",
    "lne_frequency": "low_norm_effect",
    "lne_frequency_table": "tables",
    "load_evals": "results",
    "load_inputs": "results",
    "load_runs": "results",
    "load_sweep": "low_norm_effect",
    "load_sweeps": "results",
    "make_report": "report",
    "mark_cells": "low_norm_effect",
    "mark_occurrences": "low_norm_effect",
    "mcnemar_exact_p": "low_norm_effect",
    "mean_change_by_position": "low_norm_effect",
    "method_label": "labels",
    "method_label_from_config": "labels",
    "plot_few_shot_curve": "plots",
    "plot_frequency": "plots",
    "plot_frequency_table": "plots",
    "plot_lne_by_depth": "plots",
    "plot_norms": "plots",
    "plot_position_heatmap": "plots",
    "plot_transport": "transport",
    "position_norm_frame": "trajectories",
    "read_correctness": "results",
    "runs_frame": "results",
    "save_figure": "plots",
    "step_frame": "trajectories",
    "transport_figure": "transport",
    "unfinished_runs": "tables",
    "write_report": "report",
    "write_table": "tables",
}

__all__ = sorted(_PUBLIC)

__getattr__ = lazy_attributes(__name__, _PUBLIC)

"""Analysis of sweeps and training runs: Low-Norm Effect frequency, norm trajectories, figures, reports.

Works on result files and run folders with pandas; needs no model.
"""

from .labels import dataset_name, method_label, method_label_from_config
from .low_norm_effect import (
    add_mcnemar,
    lne_frequency,
    mark_cells,
    mark_occurrences,
    mcnemar_exact_p,
    mean_change_by_position,
)
from .plots import (
    frequency_table_and_figure,
    plot_few_shot_curve,
    plot_frequency,
    plot_frequency_table,
    plot_norms,
    plot_position_heatmap,
    save_figure,
)
from .report import Report, build_report, make_report, write_report
from .results import (
    Inputs,
    Run,
    load_evals,
    load_inputs,
    load_runs,
    load_sweeps,
    read_correctness,
    runs_frame,
)
from .tables import (
    Table,
    base_to_new_table,
    domain_generalization_table,
    few_shot_results,
    few_shot_table,
    harmonic_mean,
    lne_frequency_table,
    unfinished_runs,
    write_table,
)
from .trajectories import epoch_frame, position_norm_frame, step_frame

__all__ = [
    "Inputs",
    "Report",
    "Run",
    "Table",
    "add_mcnemar",
    "base_to_new_table",
    "build_report",
    "dataset_name",
    "domain_generalization_table",
    "epoch_frame",
    "few_shot_results",
    "few_shot_table",
    "frequency_table_and_figure",
    "harmonic_mean",
    "lne_frequency",
    "lne_frequency_table",
    "load_evals",
    "load_inputs",
    "load_runs",
    "load_sweeps",
    "make_report",
    "mark_cells",
    "mark_occurrences",
    "mcnemar_exact_p",
    "mean_change_by_position",
    "method_label",
    "method_label_from_config",
    "plot_few_shot_curve",
    "plot_frequency",
    "plot_frequency_table",
    "plot_norms",
    "plot_position_heatmap",
    "position_norm_frame",
    "read_correctness",
    "runs_frame",
    "save_figure",
    "step_frame",
    "unfinished_runs",
    "write_report",
    "write_table",
]

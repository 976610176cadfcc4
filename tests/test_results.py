"""Loading sweep tables, run folders and eval records: kinds sorted, schemas checked, errors named."""

from __future__ import annotations

import json

import pytest

from analysis import epoch_frame, load_evals, load_inputs, load_runs, load_sweeps, runs_frame
from analysis.results import DUPLICATE_CELLS
from nemesis.errors import NemesisError

from .analysis_helpers import (
    checkpoint_rows,
    eval_record,
    increasing,
    reducing,
    write_evals,
    write_run,
    write_sweep,
)


def test_inputs_are_sorted_by_kind(tmp_path):
    write_run(tmp_path / "runs" / "a", [50.0, 60.0])
    write_sweep(tmp_path / "sweep.parquet", [checkpoint_rows("c", [reducing(gained=1)])])
    write_evals(tmp_path / "evals.jsonl", [eval_record()])
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "few_shot.csv").write_text("a,b\n1,2\n")  # a report's CSV is not a sweep
    inputs = load_inputs([tmp_path])
    assert len(inputs.runs) == 1 and len(inputs.cells) == 2 and len(inputs.evals) == 1


def test_run_summary_and_epochs(tmp_path):
    write_run(tmp_path / "r", [50.0, 61.0, None], mean_norms=[0.8, 1.0, 1.1], method="nemesis", beta=0.0, weight=50.0)
    (run,) = load_runs([tmp_path / "r"])
    assert run.final_test_acc == 61.0  # the last evaluated epoch
    summary = runs_frame([run])
    assert summary.loc[0, "method_label"] == "CoOp+Nemesis (PAN, weight 50)"
    epochs = epoch_frame([run])
    assert epochs["mean_norm"].tolist() == [0.8, 1.0, 1.1] and epochs["epoch"].tolist() == [1, 2, 3]
    assert not run.finished  # its last epoch (3 of 3) was not evaluated: the trainer always evaluates it


def test_finished_runs(tmp_path):
    write_run(tmp_path / "done", [50.0, None, 60.0])
    write_run(tmp_path / "stopped", [50.0, 55.0], epochs=5)  # 2 of 5 epochs
    write_run(tmp_path / "no-prompt", [50.0, 55.0], prompt=False)
    runs = {run.name: run for run in load_runs([tmp_path])}
    assert {name: run.finished for name, run in runs.items()} == {"done": True, "stopped": False, "no-prompt": False}
    summary = runs_frame(list(runs.values())).set_index("name")
    assert summary["finished"].to_dict() == {"done": True, "no-prompt": False, "stopped": False}


def test_a_cell_in_several_tables_is_loaded_once(tmp_path):
    # A default-grid table and a paper-preset table of the same checkpoint share the original row
    # and the tau = 0.001 cell; an old copy of the default table sits in a subfolder.
    default = write_sweep(tmp_path / "default.parquet", [checkpoint_rows("c", [reducing(gained=1), increasing()])])
    write_sweep(tmp_path / "paper.parquet", [checkpoint_rows("c", [reducing(gained=1)])])
    (tmp_path / "old").mkdir()
    write_sweep(tmp_path / "old" / "default.parquet", [checkpoint_rows("c", [reducing(gained=1), increasing()])])
    cells = load_sweeps([default, tmp_path])
    assert len(cells) == 3 and cells["cell_id"].is_unique
    assert cells.attrs[DUPLICATE_CELLS] == 5
    assert set(cells["results_file"]) == {str(default)}  # the first file's rows are kept
    inputs = load_inputs([tmp_path / "paper.parquet", default])
    assert len(inputs.cells) == 3 and inputs.duplicate_cells == 2
    assert inputs.cells.set_index("op")["results_file"]["original"] == str(tmp_path / "paper.parquet")
    assert load_sweeps([default]).attrs[DUPLICATE_CELLS] == 0


def test_eval_label_falls_back_to_method_config(tmp_path):
    record = eval_record(method="nemesis", method_config={"beta": 0.0, "weight": 10.0})
    del record["method_label"]
    evals = load_evals([write_evals(tmp_path / "e.jsonl", [record])])
    assert evals.loc[0, "method_label"] == "CoOp+Nemesis (PAN, weight 10)"


def test_bad_files_name_the_problem(tmp_path):
    record = eval_record()
    del record["accuracy"], record["subsample"]
    write_evals(tmp_path / "e.jsonl", [record])
    with pytest.raises(NemesisError, match="lack keys subsample, accuracy"):
        load_evals([tmp_path / "e.jsonl"])
    (tmp_path / "m.jsonl").write_text('{"kind": "step"}\n')
    with pytest.raises(NemesisError, match="holds no evaluation records"):
        load_evals([tmp_path / "m.jsonl"])
    run = write_run(tmp_path / "run", [50.0])
    with (run / "metrics.jsonl").open("a") as handle:
        handle.write("{not json\n")
    with pytest.raises(NemesisError, match="line 3 is not JSON"):
        load_runs([run])
    (run / "config.json").write_text(json.dumps({"shots": 1}))
    with pytest.raises(NemesisError, match="lacks keys dataset, prompt_method"):
        load_runs([run])
    with pytest.raises(NemesisError, match="not a run folder"):
        load_runs([tmp_path / "e.jsonl"])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(NemesisError, match="not a run folder, sweep table"):
        load_inputs([tmp_path / "notes.txt"])
    with pytest.raises(NemesisError, match="no such file or folder"):
        load_inputs([tmp_path / "missing"])

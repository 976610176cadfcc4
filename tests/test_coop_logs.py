"""`nemesis report` on CoOp / Dassl output trees: their log.txt result blocks and folder names."""

from __future__ import annotations

import pandas as pd
from typer.testing import CliRunner

from analysis.coop_logs import read_dassl_log
from nemesis_cli.main import app
from tests.analysis_helpers import write_dassl_log, write_run


def _tree(output):
    results = {}
    for dataset in ("oxford_pets", "dtd"):
        for shots in (1, 16):
            for seed in (1, 2):
                accuracy = 80.0 + shots / 4 + seed + (dataset == "dtd") * -20
                folder = output / dataset / "CoOp" / f"rn50_{shots}shots" / "nctx16_cscFalse_ctpend" / f"seed{seed}"
                write_dassl_log(folder, accuracy)
                results[(dataset, shots, seed)] = accuracy
    # A run still training, and a base-class run: neither belongs in the few-shot table.
    write_dassl_log(output / "dtd" / "CoOp" / "rn50_16shots" / "nctx16_cscFalse_ctpend" / "seed3", None)
    base = output / "base2new" / "train_base" / "dtd" / "shots_16" / "CoOp" / "vit_b16_c4" / "seed1"
    write_dassl_log(base, 70.0, backbone="ViT-B/16")
    return results


def test_a_log_gives_an_eval_record(tmp_path):
    folder = tmp_path / "output" / "oxford_pets" / "CoOp" / "rn50_16shots" / "nctx16_cscFalse_ctpend" / "seed2"
    record = read_dassl_log(write_dassl_log(folder, 87.6, total=3669))
    assert (record["dataset"], record["shots"], record["seed"], record["method"]) == ("oxford_pets", 16, 2, "coop")
    assert (record["model"], record["n"], record["accuracy"], record["macro_f1"]) == ("RN50", 3669, 87.6, 87.2)
    assert record["subsample"] == "all" and record["method_label"] == "CoOp (Dassl log)"
    assert read_dassl_log(write_dassl_log(tmp_path / "unfinished" / "dtd" / "seed1", None)) is None
    base = tmp_path / "output" / "base2new" / "train_base" / "dtd" / "shots_16" / "CoOp" / "vit_b16_c4" / "seed1"
    record = read_dassl_log(write_dassl_log(base, 70.0, backbone="ViT-B/16"))
    assert (record["subsample"], record["model"]) == ("base", "ViT-B-16")


def test_report_tabulates_a_coop_output_tree_beside_our_runs(tmp_path):
    results = _tree(tmp_path / "output")
    write_run(tmp_path / "ours" / "pets-16", [70.0, 75.0], dataset="oxford_pets", shots=16, model="RN50")
    args = ["report", str(tmp_path / "output"), str(tmp_path / "ours"), "--out", str(tmp_path / "report")]
    result = CliRunner().invoke(app, [*args, "--no-paper"])
    assert result.exit_code == 0, result.output
    table = pd.read_csv(tmp_path / "report" / "few_shot.csv")
    markdown = (tmp_path / "report" / "few_shot.md").read_text()
    assert "| CoOp (Dassl log) | 16 |" in markdown and "| CoOp | 16 |" in markdown  # their rows beside ours
    pets_16 = (results[("oxford_pets", 16, 1)] + results[("oxford_pets", 16, 2)]) / 2
    assert f"{pets_16:.2f}" in markdown
    theirs = table[(table["method"] == "CoOp (Dassl log)") & (table["dataset"] == "dtd") & (table["shots"] == 16)]
    assert list(theirs["seeds"]) == [2]  # seed 3 is still training: not counted

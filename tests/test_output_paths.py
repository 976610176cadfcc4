"""Output paths: every command creates missing parent folders of --out and refuses an unwritable
location in one line before any work (here: a location below a regular file, unwritable even for root)."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from nemesis.atomic import prepare_output
from nemesis.errors import NemesisError
from nemesis_cli.main import app
from tests.analysis_helpers import checkpoint_rows, reducing, write_sweep

from .conftest import fails_with_one_line


@pytest.fixture
def blocked(tmp_path):
    """A path whose parent is a file: no command can write there."""
    (tmp_path / "a-file").write_text("not a folder")
    return tmp_path / "a-file" / "sub" / "out"


@pytest.mark.parametrize(
    "command",
    [
        ["train", "--dataset", "fashion_mnist", "--model", "tiny", "--pretrained", "none"],
        ["eval", "missing-checkpoint.safetensors"],
        ["corrupt", "missing-checkpoint.safetensors"],
        ["plot-frequency", "missing.parquet"],
        ["plot-norms", "missing-run"],
        ["report", "missing-run"],
        ["demo"],
        ["prompt", "export-dassl", "missing-checkpoint.safetensors"],
        ["pretrain-tiny"],
    ],
    ids=lambda command: command[0] if command[0] != "prompt" else "export-dassl",
)
def test_unwritable_out_fails_in_one_line_before_any_work(command, blocked):
    # The inputs do not even exist: the location is checked first, so the error names it.
    fails_with_one_line([*command, "--out", str(blocked)], "cannot write to")


def test_missing_parent_folders_are_created(tmp_path):
    table = write_sweep(tmp_path / "sweep.parquet", [checkpoint_rows("c", [reducing(gained=1)])])
    figure = tmp_path / "new" / "deeper" / "fig"
    result = CliRunner().invoke(app, ["plot-frequency", str(table), "--out", str(figure)])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new" / "deeper" / "fig.png").is_file()
    report = tmp_path / "also" / "new" / "report"
    result = CliRunner().invoke(app, ["report", str(table), "--out", str(report)])
    assert result.exit_code == 0, result.output
    assert (report / "lne_frequency.md").is_file()


def test_prepare_output_names_what_is_wrong(tmp_path):
    (tmp_path / "folder").mkdir()
    with pytest.raises(NemesisError, match="is a folder; pass a file name"):
        prepare_output(tmp_path / "folder")
    (tmp_path / "file").write_text("x")
    with pytest.raises(NemesisError, match="is a file; pass a folder"):
        prepare_output(tmp_path / "file", folder=True)
    assert prepare_output(tmp_path / "x" / "y.csv") == tmp_path / "x" / "y.csv"
    assert not (tmp_path / "x").exists()  # folders are created when something is written, not before
    assert sorted(path.name for path in tmp_path.iterdir()) == ["file", "folder"]  # the probe file is gone

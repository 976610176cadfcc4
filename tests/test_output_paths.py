"""Output paths: every command creates missing parent folders of --out and refuses an unwritable
location in one line before any work (here: a location below a regular file, unwritable even for root)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from nemesis.atomic import prepare_output
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.files.checkpoint import PromptMetadata, save_prompt
from nemesis_cli.main import app
from tests.analysis_helpers import checkpoint_rows, reducing, write_run, write_sweep

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
        ["plot-depth", "missing.parquet"],
        ["plot-norms", "missing-run"],
        ["plot-transport", "missing-checkpoint.safetensors", "--image", "0"],
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


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """What the writing commands read: a data folder, a CoOp and a PLOT prompt, a sweep table and a run folder."""
    folder = tmp_path_factory.mktemp("inputs")
    make_coop_folder(folder / "data", "oxford_pets", ["red apple", "green leaf", "blue sky"], per_class=(2, 2, 2))
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(0))
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=2, seed=1, prompt_method="coop")
    return {
        "data": folder / "data",
        "prompt": save_prompt(folder / "prompt.safetensors", ctx, metadata),
        "plot_prompt": save_prompt(
            folder / "plot.safetensors", torch.stack([ctx] * 2), dataclasses.replace(metadata, prompt_method="plot")
        ),
        "sweep": write_sweep(folder / "sweep.parquet", [checkpoint_rows("c", [reducing(gained=1)])]),
        "run": write_run(folder / "runs" / "coop-1", [50.0, 60.0]),
    }


def _data(inputs) -> list[str]:
    return ["--root", str(inputs["data"]), "--device", "cpu"]


class _Stub:
    """Stands in for the slow part of `demo` and `pretrain-tiny`, recording where it was asked to write."""

    def __init__(self, result) -> None:
        self.result, self.out = result, None

    def __call__(self, out=None, **_) -> object:
        self.out = Path(out)
        return self.result


PLOT_TRANSPORT = ["--image", "0", "--pretrained", "none"]
TRAIN = ["--model", "tiny", "--pretrained", "none", "--shots", "2", "--n-ctx", "4", "--epochs", "1"]
# command(inputs) -> arguments without --out, and the file the command writes under --out ("": --out itself)
WRITING_COMMANDS = {
    "train": (lambda inputs: ["train", "--dataset", "oxford_pets", *_data(inputs), *TRAIN], "prompt.safetensors"),
    "eval": (lambda inputs: ["eval", str(inputs["prompt"]), "--pretrained", "none", *_data(inputs)], ""),
    "corrupt": (
        lambda inputs: ["corrupt", str(inputs["prompt"]), "--pretrained", "none", *_data(inputs), "--rescale", "0.5"],
        "",
    ),
    "plot-frequency": (lambda inputs: ["plot-frequency", str(inputs["sweep"])], ".png"),
    "plot-norms": (lambda inputs: ["plot-norms", str(inputs["run"])], ".png"),
    "plot-transport": (
        lambda inputs: ["plot-transport", str(inputs["plot_prompt"]), *PLOT_TRANSPORT, *_data(inputs)],
        ".png",
    ),
    "report": (lambda inputs: ["report", str(inputs["sweep"])], "lne_frequency.md"),
    "export-dassl": (
        lambda inputs: ["prompt", "export-dassl", str(inputs["prompt"])],
        "prompt_learner/model.pth.tar-0",
    ),
    "demo": (lambda inputs: ["demo"], None),  # minutes of work: its pipeline is stubbed
    "pretrain-tiny": (lambda inputs: ["pretrain-tiny"], None),  # a minute of pretraining: stubbed
}


@pytest.mark.parametrize("name", list(WRITING_COMMANDS))
def test_every_writing_command_creates_missing_out_folders(name, inputs, tmp_path, monkeypatch):
    arguments, written = WRITING_COMMANDS[name]
    out = tmp_path / "new" / "deeper" / {"eval": "evals.jsonl", "corrupt": "lne.parquet"}.get(name, "out")
    stub = None
    if name == "demo":
        stub = _Stub(SimpleNamespace(runs=[], sweep=None, base_to_new=None, figures=[], report=[]))
        monkeypatch.setattr("figures.demo_pipeline.run_demo", stub)
    elif name == "pretrain-tiny":
        stub = _Stub(SimpleNamespace(path=out, seconds=0.0, zero_shot_accuracy=0.0))
        monkeypatch.setattr("nemesis.model.tiny.pretrain_tiny", stub)
    result = CliRunner().invoke(app, [*arguments(inputs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    if stub is not None:
        assert stub.out == out  # accepted: the folders are created by the stubbed writer
    elif written.startswith(".") or not written:
        assert Path(f"{out}{written}").is_file(), sorted(path.name for path in out.parent.iterdir())
    else:
        assert (out / written).is_file()

"""`nemesis prompt info` and `export-dassl` through typer's runner: output and exit codes."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from nemesis.files.checkpoint import PromptMetadata, save_prompt
from nemesis_cli.main import app

from .conftest import fails_with_one_line
from .test_checkpoint import write_dassl_checkpoint

runner = CliRunner()


def test_info_shows_metadata_and_norms(tmp_path):
    ctx = torch.zeros(3, 64)
    ctx[1, 0] = 2.5
    path = save_prompt(tmp_path / "p.safetensors", ctx, PromptMetadata(model="tiny", dataset="fashion_mnist"))
    result = runner.invoke(app, ["prompt", "info", str(path), "--model", "tiny"])
    assert result.exit_code == 0, result.output
    assert "fashion_mnist" in result.output and "2.5000" in result.output and "(3, 64)" in result.output


def test_info_reads_dassl_folders(tmp_path):
    write_dassl_checkpoint(tmp_path / "run", (torch.ones(16, 512)).half(), epoch=10)
    result = runner.invoke(app, ["prompt", "info", str(tmp_path / "run"), "--model", "RN50"])
    assert result.exit_code == 0, result.output
    assert "dassl" in result.output and "22.6274" in result.output  # sqrt(512)


def test_info_of_a_dassl_file_shows_the_named_model_and_what_its_tensor_says(tmp_path):
    write_dassl_checkpoint(tmp_path / "run", torch.ones(16, 512).half(), epoch=10)
    result = runner.invoke(app, ["prompt", "info", str(tmp_path / "run"), "--model", "RN50"])
    assert result.exit_code == 0, result.output
    shown = {
        parts[0]: parts[1].strip() for line in result.output.splitlines() if len(parts := line.split(None, 1)) == 2
    }
    assert shown["model"] == "RN50 (--model; the file does not record it)"
    assert (shown["n_ctx"], shown["text_width"], shown["class_specific"]) == ("16", "512", "False")
    assert shown["activation"] == "not recorded" and shown["pretrained"] == "not recorded"


def test_bad_input_exits_2_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    fails_with_one_line(["prompt", "info", str(tmp_path / "empty")], "looked for prompt.safetensors, prompt_learner/")
    fails_with_one_line(["prompt", "info", str(tmp_path / "missing.pth")], "not found")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    fails_with_one_line(["prompt", "info", str(tmp_path / "notes.txt")], "not a torch checkpoint")
    write_dassl_checkpoint(tmp_path / "run", torch.zeros(16, 512), epoch=1)
    fails_with_one_line(["prompt", "info", str(tmp_path / "run"), "--model", "tiny"], "does not match the text width")
    fails_with_one_line(["prompt", "info", str(tmp_path / "run"), "--model", "ViT-B-33"], "unknown model")
    torch.save({"state_dict": {"ctx": torch.full((4, 512), float("nan"))}}, tmp_path / "nan.pth")
    fails_with_one_line(["prompt", "info", str(tmp_path / "nan.pth")], "NaN or Inf")


def test_export_dassl_creates_a_missing_folder_but_not_for_a_bad_checkpoint(tmp_path):
    path = save_prompt(tmp_path / "p.safetensors", torch.zeros(4, 64), PromptMetadata())
    fails_with_one_line(
        ["prompt", "export-dassl", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "nope")], "not found"
    )
    assert not (tmp_path / "nope").exists()
    result = runner.invoke(app, ["prompt", "export-dassl", str(path), "--out", str(tmp_path / "new" / "run")])
    assert result.exit_code == 0 and (tmp_path / "new/run/prompt_learner/model.pth.tar-0").is_file()
    (tmp_path / "out").mkdir()
    result = runner.invoke(app, ["prompt", "export-dassl", str(path), "--out", str(tmp_path / "out"), "--epoch", "3"])
    assert result.exit_code == 0 and (tmp_path / "out/prompt_learner/model.pth.tar-3").is_file()

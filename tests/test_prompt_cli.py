"""`nemesis prompt info`, `interpret` and `export-dassl` through typer's runner: output and exit codes."""

from __future__ import annotations

import json

import pytest
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


# --- nemesis prompt interpret ---------------------------------------------------------------------

WORDS = "a photo of a"


def _words_ctx(tiny, words: str = WORDS) -> torch.Tensor:
    """Context vectors that are the tiny model's token embeddings of `words`, one per word."""
    return tiny.model.token_embedding.weight.detach()[tiny.tokenizer.encode(words)].clone()  # [M, W]


def _interpreted(*args: object) -> list[dict]:
    result = runner.invoke(app, ["prompt", "interpret", *map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _nearest(rows: list[dict], key: str | None = None, index: int | None = None) -> list[tuple[str, float]]:
    """The nearest token and its distance at each position, of one class or prompt."""
    chosen = [row for row in rows if row["rank"] == 1 and (key is None or row[key] == index)]
    return [(row["token"], row["distance"]) for row in sorted(chosen, key=lambda row: row["position"])]


def test_interpret_finds_the_words_a_unified_ctx_was_built_from(tiny, tmp_path):
    ctx = _words_ctx(tiny)
    path = save_prompt(tmp_path / "p.safetensors", ctx, PromptMetadata(model="tiny", pretrained="none"))
    rows = _interpreted(path, "--topk", 3)
    assert _nearest(rows) == [(word, 0.0) for word in WORDS.split()]
    assert len(rows) == 4 * 3 and {row["class"] for row in rows} == {row["prompt"] for row in rows} == {None}
    for row in rows:
        assert row["norm"] == pytest.approx(float(ctx[row["position"]].norm()), rel=1e-6)
    result = runner.invoke(app, ["prompt", "interpret", str(path), "--topk", "1"])
    assert result.exit_code == 0, result.output
    lines = [line.split("│") for line in result.output.splitlines() if line.startswith("│")]
    shown = [(cells[1].strip(), cells[2].strip(), cells[3].strip()) for cells in lines]
    assert shown == [
        (str(j), f"{float(ctx[j].norm()):.4f}", f"{word} (0.0000)") for j, word in enumerate(WORDS.split())
    ]


def test_interpret_reads_class_specific_ctx_per_class(tiny, tmp_path):
    other = "an image of the"
    ctx = torch.stack([_words_ctx(tiny), _words_ctx(tiny, other)])  # [2, 4, W]
    metadata = PromptMetadata(model="tiny", pretrained="none", classnames=["shirt", "boot"])
    rows = _interpreted(save_prompt(tmp_path / "p.safetensors", ctx, metadata), "--topk", 2)
    assert _nearest(rows, "class", 0) == [(word, 0.0) for word in WORDS.split()]
    assert _nearest(rows, "class", 1) == [(word, 0.0) for word in other.split()]
    assert {(row["class"], row["classname"]) for row in rows} == {(0, "shirt"), (1, "boot")}
    for row in rows:
        assert row["norm"] == pytest.approx(float(ctx[row["class"], row["position"]].norm()), rel=1e-6)
    result = runner.invoke(app, ["prompt", "interpret", str(tmp_path / "p.safetensors")])
    assert "class 0 (shirt)" in result.output and "class 1 (boot)" in result.output


def test_interpret_reads_plot_ctx_per_prompt(tiny, tmp_path):
    ctx = torch.stack([_words_ctx(tiny), _words_ctx(tiny).flip(0), 3 * _words_ctx(tiny)])  # [N=3, 4, W]
    metadata = PromptMetadata(model="tiny", pretrained="none", prompt_method="plot")
    rows = _interpreted(save_prompt(tmp_path / "p.safetensors", ctx, metadata), "--prompt-method", "plot")
    assert _nearest(rows, "prompt", 0) == [(word, 0.0) for word in WORDS.split()]
    assert _nearest(rows, "prompt", 1) == [(word, 0.0) for word in reversed(WORDS.split())]
    assert all(distance > 0 for _, distance in _nearest(rows, "prompt", 2))  # scaled: off every token
    assert {row["class"] for row in rows} == {None} and {row["prompt"] for row in rows} == {0, 1, 2}
    for row in rows:
        assert row["norm"] == pytest.approx(float(ctx[row["prompt"], row["position"]].norm()), rel=1e-6)
    result = runner.invoke(app, ["prompt", "interpret", str(tmp_path / "p.safetensors")])
    assert "PLOT prompt" in result.output and "prompt 2" in result.output


def test_interpret_reads_a_dassl_coop_file_with_the_named_model(tiny, tmp_path):
    write_dassl_checkpoint(tmp_path / "run", _words_ctx(tiny).half(), epoch=5)  # CoOp saves fp16
    fails_with_one_line(["prompt", "interpret", str(tmp_path / "run")], "does not name its model; pass --model")
    fails_with_one_line(["prompt", "interpret", str(tmp_path / "run"), "--model", "tiny"], "name the weights of tiny")
    rows = _interpreted(tmp_path / "run", "--model", "tiny", "--pretrained", "none", "--epoch", 5)
    rounding = (_words_ctx(tiny).half().float() - _words_ctx(tiny)).norm(dim=-1)  # [M]: what fp16 moved
    nearest = [row for row in rows if row["rank"] == 1]
    assert [row["token"] for row in nearest] == WORDS.split()
    assert [row["distance"] for row in nearest] == pytest.approx(rounding.tolist())


def test_interpret_writes_the_table_as_json_or_csv(tiny, tmp_path):
    import pandas as pd

    path = save_prompt(tmp_path / "p.safetensors", _words_ctx(tiny), PromptMetadata(model="tiny", pretrained="none"))
    rows = _interpreted(path, "--topk", 2)
    for name in ("table.json", "table.csv"):
        result = runner.invoke(app, ["prompt", "interpret", str(path), "--topk", "2", "--out", str(tmp_path / name)])
        assert result.exit_code == 0 and f"wrote {tmp_path / name}" in result.output
    assert json.loads((tmp_path / "table.json").read_text()) == rows
    args = ["prompt", "interpret", str(path), "--topk", "2", "--json", "--out", str(tmp_path / "t.json")]
    both = runner.invoke(app, args)
    assert both.exit_code == 0 and json.loads(both.stdout) == rows  # "wrote" goes to stderr: stdout stays JSON
    table = pd.read_csv(tmp_path / "table.csv")
    assert list(table.columns) == list(rows[0]) and table["token"].tolist() == [row["token"] for row in rows]
    assert table["distance"].tolist() == pytest.approx([row["distance"] for row in rows])


def test_interpret_bad_input_exits_2_with_one_line(tiny, tmp_path):
    good = save_prompt(tmp_path / "p.safetensors", _words_ctx(tiny), PromptMetadata(model="tiny", pretrained="none"))
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    fails_with_one_line(["prompt", "interpret", str(tmp_path / "notes.txt")], "not a torch checkpoint")
    fails_with_one_line(["prompt", "interpret", str(tmp_path / "missing.pth")], "not found")
    fails_with_one_line(["prompt", "interpret", str(good), "--topk", "0"], "--topk 0: choose a number of tokens")
    fails_with_one_line(["prompt", "interpret", str(good), "--topk", "-2"], "--topk -2")
    wide = save_prompt(tmp_path / "wide.safetensors", torch.ones(4, 512), PromptMetadata(model="tiny"))
    fails_with_one_line(["prompt", "interpret", str(wide), "--pretrained", "none"], "does not match the text width 64")
    fails_with_one_line(["prompt", "interpret", str(good), "--model", "RN50", "--pretrained", "none"], "text width 512")
    text_file = tmp_path / "t.txt"
    fails_with_one_line(["prompt", "interpret", str(good), "--out", str(text_file)], "written as .json or .csv")
    assert not text_file.exists()

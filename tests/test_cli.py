"""The `nemesis` application itself: light start-up, --version, `nemesis models`."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from nemesis import __version__
from nemesis_cli.main import app

HEAVY = ("torch", "open_clip", "pandas", "matplotlib")


def test_importing_the_cli_loads_no_heavy_library():
    # A fresh interpreter: this test process has long imported everything.
    code = f"import sys, nemesis_cli.main; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"importing nemesis_cli.main loaded {loaded}"


def test_every_help_builds_without_heavy_libraries():
    # Building each command's help inspects every option declaration, defaults included.
    commands = ["train", "eval", "corrupt", "plot-frequency", "plot-norms", "plot-transport", "report", "demo"]
    commands += ["models", "plot-depth"]
    code = (
        "import sys\nfrom typer.testing import CliRunner\nfrom nemesis_cli.main import app\n"
        f"for command in {commands!r} + [['prompt', 'info'], ['prompt', 'interpret'], ['data', 'check']]:\n"
        "    args = (command if isinstance(command, list) else [command]) + ['--help']\n"
        "    result = CliRunner().invoke(app, args)\n"
        "    assert result.exit_code == 0, (args, result.output)\n"
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))\n"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert loaded == "", f"--help loaded {loaded}"


@pytest.mark.parametrize(
    "command", [["train"], ["corrupt"], ["eval"], ["report"], ["prompt", "info"], ["prompt", "interpret"], ["models"]]
)
def test_flags_show_no_value_type_in_help(command):
    result = CliRunner().invoke(app, [*command, "--help"], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "--help" in result.output and "<bool>" not in result.output
    assert command != ["train"] or "--epochs                   <int>" in result.output  # valued options keep theirs


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"nemesis {__version__}"


def test_models_lists_clip_style_towers_and_their_tags():
    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0, result.output
    rows = {line.split("\t")[0]: line.split("\t")[1:] for line in result.output.splitlines()}
    assert "openai" in rows["RN50"][0].split(", ")
    assert rows["tiny"] == ["fmnist", "CLIP-style text tower"]
    assert "xlm-roberta-base-ViT-B-32" not in rows  # Hugging Face text tower: only with --all
    everything = CliRunner().invoke(app, ["models", "--all"])
    line = next(line for line in everything.output.splitlines() if line.startswith("xlm-roberta-base-ViT-B-32\t"))
    assert "not supported: Hugging Face text tower" in line


def test_models_agrees_with_the_text_encoder_on_built_models(tiny):
    # The config-level judgement `nemesis models` prints is the one the text encoder applies.
    from nemesis.model.backbone import text_tower_problem
    from nemesis.model.text_encoder import TextEncoder

    assert text_tower_problem("tiny") is None
    TextEncoder(tiny.model, "tiny", tiny.tokenizer)  # accepted, as listed

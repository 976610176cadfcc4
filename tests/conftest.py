"""Shared fixtures: models are built once per session (random weights, no network)."""

from __future__ import annotations

import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
from typer.testing import CliRunner, Result

from nemesis.model.backbone import load_clip
from nemesis_cli.main import app


@functools.cache
def cached_backbone(name: str):
    return load_clip(name)


@pytest.fixture
def tiny():
    return cached_backbone("tiny")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test writes its caches under a temporary folder, never the user's."""
    monkeypatch.setenv("NEMESIS_CACHE", str(tmp_path_factory.getbasetemp() / "nemesis-cache"))


@pytest.fixture(scope="session")
def pretrained_tiny(tmp_path_factory):
    """The `tiny` weights pretrained on Fashion-MNIST: trained once per session, into the test cache."""
    from nemesis.model.tiny import pretrained_tiny_weights

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEMESIS_CACHE", str(tmp_path_factory.getbasetemp() / "nemesis-cache"))
        return pretrained_tiny_weights(progress=False)


def fails_with_one_line(args: list[str], expected: str) -> Result:
    """Run `nemesis ARGS`: it must exit with code 2 and print one line holding `expected`."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and expected in lines[0], result.output
    return result

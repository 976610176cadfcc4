"""Shared fixtures: models are built once per session (random weights, no network)."""

from __future__ import annotations

import functools
import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from nemesis.backbone import load_clip


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
    from nemesis.tiny import pretrained_tiny_weights

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("NEMESIS_CACHE", str(tmp_path_factory.getbasetemp() / "nemesis-cache"))
        return pretrained_tiny_weights(progress=False)

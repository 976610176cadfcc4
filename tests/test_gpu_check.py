"""`make gpu-check` in its CPU mode: the same checks at reduced size, so the script cannot rot between
GPU runs; a check broken on purpose fails the run."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up while it runs
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.slow
def test_every_check_holds_on_the_cpu(gpu_check, tmp_path, capsys):
    report = tmp_path / "checks.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--json", str(report)]) == 0
    checks = json.loads(report.read_text())
    marks = {check["name"]: check["ok"] for check in checks}
    assert [name for name, ok in marks.items() if ok is False] == []
    parts = (
        "evaluation autocast vs fp32",
        "sweep LNE decisions",
        "training --precision amp",
        "torchrun",
        "PLOT Sinkhorn",
    )
    for part in parts:
        assert any(name.startswith(part) and ok for name, ok in marks.items()), part
    out = capsys.readouterr().out
    assert out.splitlines()[-1].startswith("ok") and "0 of" in out.splitlines()[-1]


def test_a_broken_check_fails_the_run(gpu_check, monkeypatch, capsys):
    real = gpu_check.evaluate_cells

    def one_wrong_cell(setup, ctx, cells, *args, **kwargs):
        outcome = real(setup, ctx, cells, *args, **kwargs)
        outcome.correct[1:] = ~outcome.correct[1:]  # every corrupted cell's correctness flipped
        return outcome

    monkeypatch.setattr(gpu_check, "evaluate_cells", one_wrong_cell)
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "evaluation"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("FAILED") and "sweep LNE decisions" in line for line in lines)
    assert lines[-1].startswith("FAILED")


def test_a_check_that_raises_is_a_failed_check_and_the_others_run(gpu_check, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("CUDA error: an illegal memory access")

    monkeypatch.setattr(gpu_check, "training_check", broken)
    assert gpu_check.main(["--device", "cpu", "--quick", "--only", "training,memory"]) == 1
    out = capsys.readouterr().out
    assert "FAILED  training" in out and "illegal memory access" in out and "peak GPU memory" in out
    assert torch.cuda.is_available() or "measured on CUDA only" in out

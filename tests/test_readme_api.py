"""The README's Python API examples run as they stand, in order, in one namespace (as a notebook would)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def api_examples() -> list[str]:
    """The ```python blocks of the README's "Python API" section."""
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## Python API") :]
    section = section[: section.index("\n## ", 1)]
    return re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)


def test_the_section_has_an_example_for_every_job():
    code = "\n".join(api_examples())
    for call in ("train(", "train_grid(", "evaluate(", "corrupt.sweep(", "load_sweep(", "lne_frequency(",
                 "plot_frequency(", "plot_norms(", "make_report("):  # fmt: skip
        assert call in code, call


@pytest.mark.slow
def test_the_readme_api_examples_run(tmp_path, monkeypatch, pretrained_tiny, capsys):
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for example in api_examples():
        exec(compile(example, str(README), "exec"), namespace)
    assert (tmp_path / "runs" / "nemesis" / "prompt.safetensors").is_file()
    assert len(list((tmp_path / "runs" / "grid").rglob("prompt.safetensors"))) == 4
    assert namespace["summary"].computed > 0 and (tmp_path / "lne.parquet").is_file()
    assert {"lne_frequency.png", "norms.png"} <= {path.name for path in (tmp_path / "figures").iterdir()}
    assert namespace["written"] and all(path.is_file() for path in namespace["written"])
    # The building blocks give the accuracy `evaluate` reported.
    scores, labels, result = namespace["scores"], namespace["labels"], namespace["result"]
    accuracy = 100.0 * float((scores[0].argmax(-1) == labels).float().mean())
    assert accuracy == pytest.approx(result.accuracy, abs=1e-4) and isinstance(scores, torch.Tensor)  # float32 mean
    assert "grid: 4 trained" in capsys.readouterr().out

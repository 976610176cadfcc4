"""Live logs (`--report-to`): TensorBoard events and offline wandb hold the values of metrics.jsonl, at the
training step; reporting changes nothing a run learns nor what a resume accepts; metrics.jsonl is strict JSON."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import nemesis.training.trainer as trainer
from nemesis.errors import NemesisError
from nemesis.methods import preset
from nemesis.training.configs import TrainConfig, read_run_config, resume_config
from nemesis.training.reporting import check_reporters, reporter_names
from nemesis.training.trainer import train
from nemesis_cli.main import app

from .test_trainer import infinite_logits, pets, small_config  # noqa: F401  (pets: the data fixture; 4 steps an epoch)


def metrics_rows(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def expected_series(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """What the events should hold, worked out here from the rows (not with the reporter's own code):
    `<kind>/<key>[/<position>]` per number, at a step row's step, an epoch row at its epoch's last step."""
    series: dict[str, list[tuple[int, float]]] = {}
    step = 0
    for row in rows:
        step = row.get("step", step)
        for key, value in row.items():
            if key in ("kind", "step") or value is None:
                continue
            values = enumerate(value) if isinstance(value, list) else [(None, value)]
            for position, entry in values:
                tag = f"{row['kind']}/{key}" + ("" if position is None else f"/{position}")
                series.setdefault(tag, []).append((step, float(entry)))
    return series


def event_series(folder) -> dict[str, list[tuple[int, float]]]:
    """The scalars of the run's events as TensorBoard's own reader loads them."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep every event
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def assert_same_series(events: dict, expected: dict) -> None:
    assert sorted(events) == sorted(expected)
    for tag, points in expected.items():
        # Event files store float32: compare the rows' values rounded as TensorBoard stores them.
        assert [(step, np.float32(value)) for step, value in events[tag]] == [
            (step, np.float32(value)) for step, value in points
        ], tag


# --- TensorBoard ---------------------------------------------------------------------------------


def test_tensorboard_events_hold_the_values_of_metrics_jsonl(pets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    config = small_config(pets, **preset("pan"), positions=2, eval_every=2, report_to="tensorboard")
    train(config, out, progress=False)
    rows = metrics_rows(out)
    events = event_series(out)
    assert_same_series(events, expected_series(rows))
    # Every kind of value the issue names, one series per position for norms and PAN's alpha.
    for tag in ("step/ce_loss", "step/norm_loss", "step/lr", "step/train_acc", "epoch/test_acc", "epoch/mean_norm"):
        assert tag in events, tag
    assert {f"step/norms/{position}" for position in range(4)} <= set(events)
    assert {f"step/alpha/{position}" for position in range(4)} <= set(events)
    assert any(value != 0 for tag in events if tag.startswith("step/alpha/") for _, value in events[tag])
    # Test accuracy at the last step of epochs 2 and 3 (4 steps an epoch; eval every 2 epochs, and the last).
    assert [step for step, _ in events["epoch/test_acc"]] == [8, 12]
    assert read_run_config(out).report_to == "tensorboard"


def test_a_resumed_run_shows_each_step_once(pets, tmp_path, monkeypatch):  # noqa: F811
    """A kill after an epoch's rows were logged but before its state was saved: the resume replays that
    epoch, and TensorBoard shows its steps once, with the values metrics.jsonl keeps."""
    out = tmp_path / "run"
    config = small_config(pets, report_to="tensorboard")
    save_state = trainer.save_state

    class Killed(Exception):
        pass

    def killed_before_epoch_2_is_saved(path, state):
        if state.epoch == 2:
            raise Killed
        save_state(path, state)

    monkeypatch.setattr(trainer, "save_state", killed_before_epoch_2_is_saved)
    with pytest.raises(Killed):
        train(config, out, progress=False)
    assert [step for step, _ in event_series(out)["step/ce_loss"]] == list(range(1, 9))  # epoch 2 logged
    monkeypatch.setattr(trainer, "save_state", save_state)
    train(config, out, resume=True, progress=False)
    rows = metrics_rows(out)
    assert [row["step"] for row in rows if row["kind"] == "step"] == list(range(1, 13))
    assert_same_series(event_series(out), expected_series(rows))


def test_a_resume_may_start_reporting(pets, tmp_path):  # noqa: F811
    """`nemesis train --out RUN --resume --report-to tensorboard` continues a run trained without it."""
    out = tmp_path / "run"

    def stop_after_epoch_1(epoch):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(small_config(pets, epochs=2), out, progress=False, on_epoch_end=stop_after_epoch_1)
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume", "--report-to", "tensorboard"])
    assert result.exit_code == 0, result.output
    assert read_run_config(out).report_to == "tensorboard"
    later = [row for row in metrics_rows(out) if row["epoch"] == 2]  # the epoch trained with reporting on
    assert_same_series(event_series(out), expected_series(later))
    assert [step for step, _ in event_series(out)["step/ce_loss"]] == [5, 6, 7, 8]


def test_reporting_changes_nothing_a_run_learns(pets, tmp_path):  # noqa: F811
    plain, reported = tmp_path / "plain", tmp_path / "reported"
    train(small_config(pets, epochs=2), plain, progress=False)
    train(small_config(pets, epochs=2, report_to="tensorboard"), reported, progress=False)
    assert metrics_rows(plain) == metrics_rows(reported)
    first, second = load_file(plain / "prompt.safetensors"), load_file(reported / "prompt.safetensors")
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    # The learned tensors and their momenta (the global generator's state differs between any two runs of
    # one process: the second reads the feature cache the first wrote).
    first, second = load_file(plain / "state.safetensors"), load_file(reported / "state.safetensors")
    assert all(torch.equal(first[key], second[key]) for key in ("ctx", "momentum"))


def test_only_the_folders_writer_reports(pets, tmp_path):  # noqa: F811
    """Under torchrun rank 0 alone writes the run folder, its live logs included."""
    out = tmp_path / "run"
    config = small_config(pets, epochs=1, report_to="tensorboard").resolved()
    folder = trainer._RunFolder(out, writes=False, created=True, emptied=False)
    assert trainer._open_reporter(config, folder, None).reporters == []
    assert not out.exists()


def test_each_run_of_a_grid_has_its_own_events(pets, tmp_path):  # noqa: F811
    common = ["train", "--dataset", "oxford_pets", "--root", str(pets), "--shots", "4", "--model", "tiny"]
    common += ["--pretrained", "none", "--n-ctx", "4", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, [*common, "--seed", "1,2", "--report-to", "tensorboard", "--out", str(tmp_path)])
    assert result.exit_code == 0, result.output
    folders = sorted(path.parent for path in tmp_path.glob("oxford_pets/**/metrics.jsonl"))
    assert [folder.name for folder in folders] == ["seed1", "seed2"]
    for folder in folders:
        assert_same_series(event_series(folder), expected_series(metrics_rows(folder)))


def test_a_diverged_run_leaves_no_folder_with_its_events(pets, tmp_path, infinite_logits):  # noqa: F811
    with pytest.raises(NemesisError, match="diverged in epoch 1"):
        train(small_config(pets, report_to="tensorboard"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


# --- wandb ---------------------------------------------------------------------------------------


class FakeWandb(types.ModuleType):
    """Stands in for the wandb package: records init, log and finish."""

    def __init__(self) -> None:
        super().__init__("wandb")
        self.calls: list[tuple] = []

    def init(self, **options):
        self.calls.append(("init", options))
        return self

    def log(self, values, step=None):
        self.calls.append(("log", values, step))

    def finish(self):
        self.calls.append(("finish",))


def test_wandb_logs_offline_under_the_run_folder(pets, tmp_path, monkeypatch):  # noqa: F811
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    out = tmp_path / "run"
    train(small_config(pets, epochs=2, report_to="tensorboard,wandb"), out, progress=False)
    (init, options), *logs, finish = fake.calls
    assert init == "init" and finish == ("finish",)
    assert options["mode"] == "offline" and options["dir"] == str(out)
    assert options["config"]["report_to"] == "tensorboard,wandb"
    logged: dict[str, list[tuple[int, float]]] = {}
    for _, values, step in logs:
        for tag, value in values.items():
            logged.setdefault(tag, []).append((step, value))
    assert logged == expected_series(metrics_rows(out))  # wandb keeps float64: the very values
    assert event_series(out)  # and TensorBoard's events beside them


def test_a_missing_backend_is_one_error_line_before_any_work(pets, tmp_path, monkeypatch):  # noqa: F811
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` fails as if not installed
    out = tmp_path / "run"
    with pytest.raises(NemesisError, match=r"--report-to wandb needs the wandb package.*nemesis-prompts\[wandb\]"):
        train(small_config(pets, report_to="wandb"), out, progress=False)
    assert not out.exists()
    common = ["train", "--dataset", "oxford_pets", "--root", str(pets), "--model", "tiny", "--pretrained", "none"]
    result = CliRunner().invoke(app, [*common, "--report-to", "wandb", "--out", str(out)])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and result.output.startswith("error: --report-to wandb needs")
    assert not out.exists()


def test_missing_tensorboard_is_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.delitem(sys.modules, "torch.utils.tensorboard", raising=False)
    with pytest.raises(NemesisError, match="needs the tensorboard package"):
        check_reporters(("tensorboard",))


# --- the option ----------------------------------------------------------------------------------


def test_report_to_names():
    assert reporter_names("tensorboard, WANDB,tensorboard") == ("tensorboard", "wandb")
    assert reporter_names("none") == reporter_names("") == reporter_names(None) == ()
    assert reporter_names(["wandb"]) == ("wandb",)  # a list, from Python
    with pytest.raises(NemesisError, match="unknown --report-to backend 'tensorbord'; choose tensorboard, wandb"):
        reporter_names("tensorbord")


def test_reporting_is_a_runtime_option(tmp_path):
    """config.json records it; files written before it existed still read; a resume may change it."""
    config = TrainConfig(dataset="dtd", epochs=2, device="cpu", report_to="tensorboard")
    values = json.loads(json.dumps(config.to_json()))
    assert values["report_to"] == "tensorboard" and TrainConfig.from_json(values) == config
    older = {key: value for key, value in values.items() if key != "report_to"}  # config.json of earlier runs
    assert TrainConfig.from_json(older).report_to == "none" and TrainConfig.from_json(older).reporters == ()
    assert TrainConfig(dataset="dtd", report_to=["wandb", "tensorboard"]).report_to == "wandb,tensorboard"
    assert trainer._config_digest(TrainConfig.from_json(older)) == trainer._config_digest(config)
    resumed, warnings = resume_config(config, {"report_to": "wandb"}, tmp_path)
    assert resumed.reporters == ("wandb",) and warnings == []


def test_cli_report_to_tensorboard_and_an_unknown_backend(pets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    common = ["train", "--dataset", "oxford_pets", "--root", str(pets), "--shots", "4", "--model", "tiny"]
    common += ["--pretrained", "none", "--n-ctx", "4", "--epochs", "1", "--batch-size", "4", "--device", "cpu"]
    result = CliRunner().invoke(app, [*common, "--report-to", "tensorboard", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert_same_series(event_series(out), expected_series(metrics_rows(out)))
    unknown = CliRunner().invoke(app, [*common, "--report-to", "tensorbord", "--out", str(tmp_path / "other")])
    assert unknown.exit_code == 2
    assert unknown.output == "error: unknown --report-to backend 'tensorbord'; choose tensorboard, wandb or none\n"
    assert not (tmp_path / "other").exists()

"""Grids in one `nemesis train` call: the tree, backbone reuse, skip / resume / failures, bad input."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

import nemesis.data.feature_cache as feature_cache
import nemesis.training.train_grid as train_grid
from nemesis.data.datasets import load_dataset
from nemesis.data.testing import make_coop_folder
from nemesis.files.checkpoint import load_prompt
from nemesis.methods import PRESETS, preset
from nemesis.training.configs import TrainConfig
from nemesis.training.train_grid import parse_values, plan_grid, run_folder, run_grid
from nemesis_cli.main import app

from .conftest import cached_backbone, fails_with_one_line
from .distributed_helpers import prompt_ctx, run_folders, subprocess_environment

CLASSNAMES = ["red apple", "green leaf", "blue sky", "yellow sun"]
SMALL = ["--model", "tiny", "--pretrained", "none", "--n-ctx", "4", "--epochs", "2", "--batch-size", "4",
         "--lr", "0.05", "--device", "cpu", "--eval-every", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("grid-data")
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(4, 1, 3), image_size=28)
    return root


def grid_args(root, out, datasets="oxford_pets", shots="1,2", seeds="1,2", methods="coop,pan") -> list[str]:
    return ["train", "--dataset", datasets, "--root", str(root), "--shots", shots, "--seed", seeds,
            "--method", methods, *SMALL, "--out", str(out)]  # fmt: skip


def folder_of(out, method: str, shots: int, seed: int) -> Path:
    """The run folder of a grid of SMALL runs (n_ctx 4) on oxford_pets."""
    config = TrainConfig(dataset="oxford_pets", model="tiny", n_ctx=4, shots=shots, seed=seed, **preset(method))
    return run_folder(out, method, config)


def test_lists_and_presets():
    assert parse_values("1, 2,4", "shots", int) == [1, 2, 4] and parse_values(None, "shots") is None
    assert PRESETS["pen"] == {"prompt_method": "coop", "penalty": "nemesis", "beta": 1.0}
    assert PRESETS["pan"] == {"prompt_method": "coop", "penalty": "nemesis", "beta": 0.0}


def test_a_failed_run_is_reported_at_the_end_and_the_others_go_on(data_root, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    real_train = train_grid.train

    def failing(config, folder, **options):
        if config.seed == 2:
            raise RuntimeError("the GPU fell off")
        return real_train(config, folder, **options)

    monkeypatch.setattr(train_grid, "train", failing)
    arguments = grid_args(data_root, out, shots="1", seeds="1,2,3", methods="coop")
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1, result.output
    assert "grid: 2 trained, 0 skipped (finished before), 1 failed" in result.output
    failed_folder = folder_of(out, "coop", 1, 2)
    assert f"failed: {failed_folder}: RuntimeError: the GPU fell off" in result.output
    monkeypatch.setattr(train_grid, "train", real_train)
    again = CliRunner().invoke(app, arguments)
    assert again.exit_code == 0 and "grid: 1 trained, 2 skipped" in again.output, again.output


def test_an_interrupted_grid_resumes_to_the_uninterrupted_prompts(data_root, tmp_path, monkeypatch):
    def plan(out):
        options = dict(root=str(data_root), model="tiny", pretrained=None, n_ctx=4, epochs=3, batch_size=4,
                       lr=0.05, device="cpu", eval_every=0)  # fmt: skip
        return plan_grid(out, options, datasets=["oxford_pets"], methods=["coop", "pan"], shots=[2], seeds=[1])

    run_grid(plan(tmp_path / "whole"), progress=False)
    real_train = train_grid.train

    def interrupted(config, folder, **options):
        def stop(epoch):
            if config.method_name == "coop+nemesis" and epoch == 2:
                raise KeyboardInterrupt

        return real_train(config, folder, on_epoch_end=stop, **options)

    monkeypatch.setattr(train_grid, "train", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_grid(plan(tmp_path / "cut"), progress=False)
    monkeypatch.setattr(train_grid, "train", real_train)
    summary = run_grid(plan(tmp_path / "cut"), progress=False)
    assert [run.method for run in summary.skipped] == ["coop"] and [run.method for run in summary.done] == ["pan"]
    for folder in run_folders(tmp_path / "whole"):
        assert torch.equal(prompt_ctx(tmp_path / "whole" / folder), prompt_ctx(tmp_path / "cut" / folder)), folder
        epochs = (tmp_path / "cut" / folder / "metrics.jsonl").read_text().count('"kind": "epoch"')
        assert epochs == 3, folder  # nothing lost, nothing duplicated


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"methods": "coop,pun"},
            "unknown method 'pun'; choose one of coop, cocoop, plot, vpt, ivlp, maple, promptsrc, prefix, nemesis, "
            "pen, pan",
        ),
        ({"seeds": ""}, "--seed is empty"),
        ({"shots": "1,,2"}, "--shots '1,,2' has an empty entry"),
        ({"shots": "one"}, "--shots 'one' must be a comma-separated list of ints"),
        ({"seeds": "1,1"}, "would both write"),
        ({"datasets": "oxford_pets,OxfordPets"}, "would both write"),
        ({"shots": "1,9"}, "more than the 4 training images"),
    ],
)
def test_bad_grids_are_one_line_and_write_nothing(data_root, tmp_path, change, message):
    out = tmp_path / "runs"
    fails_with_one_line(grid_args(data_root, out, **change), message)
    assert not out.exists()


def test_a_preset_and_a_contradicting_option_are_refused(data_root, tmp_path):
    out = tmp_path / "runs"
    fails_with_one_line([*grid_args(data_root, out, methods="pen,coop"), "--beta", "0.5"], "--method pen sets beta 1.0")
    assert not out.exists()


def test_a_grid_over_runs_of_other_options_is_refused(data_root, tmp_path):
    out = tmp_path / "runs"
    first = CliRunner().invoke(
        app,
        [*grid_args(data_root, out, shots="1", seeds="1", methods="coop"), "--tree"],
    )
    assert first.exit_code == 0, first.output
    assert run_folders(out) == [folder_of(out, "coop", 1, 1).relative_to(out)]
    fails_with_one_line([*grid_args(data_root, out, shots="1", seeds="1,2", methods="coop"), "--lr", "0.1"],
                        "cannot resume")  # fmt: skip
    assert len(run_folders(out)) == 1


def test_a_cache_entry_is_encoded_once_when_two_ask_at_once(tmp_path, monkeypatch):
    """Two workers (threads here, torchrun ranks in use) miss the cache together: one encodes, one reads."""
    backbone = cached_backbone("tiny")
    dataset = load_dataset("oxford_pets", make_coop_folder(tmp_path, "oxford_pets", CLASSNAMES, (1, 1, 3)).parent)
    real_encode = feature_cache._encode

    def slow_encode(*args, **kwargs):
        threading.Event().wait(0.5)  # both workers have missed the cache by now
        return real_encode(*args, **kwargs)

    monkeypatch.setattr(feature_cache, "_encode", slow_encode)
    before = feature_cache.encoded_images
    results = []
    workers = [
        threading.Thread(
            target=lambda: results.append(
                feature_cache.encode_split(backbone, dataset, "test", cache_dir=tmp_path / "cache", progress=False)
            )
        )
        for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert feature_cache.encoded_images - before == len(dataset.test)
    assert torch.equal(results[0][0], results[1][0])


ENCODE_IN_A_PROCESS = """
import sys, threading
import nemesis.data.feature_cache as feature_cache
from nemesis.model.backbone import load_clip
from nemesis.files.checkpoint import load_prompt
from nemesis.data.datasets import load_dataset

real_encode = feature_cache._encode
def slow_encode(*args, **kwargs):
    threading.Event().wait(2.0)  # the other process has missed the cache by now
    return real_encode(*args, **kwargs)
feature_cache._encode = slow_encode
dataset = load_dataset("oxford_pets", sys.argv[1])
features, _ = feature_cache.encode_split(load_clip("tiny"), dataset, "test", cache_dir=sys.argv[2], progress=False)
print(feature_cache.encoded_images, float(features.sum()))
"""


@pytest.mark.slow
def test_two_processes_missing_one_entry_encode_it_once(tmp_path):
    """As torchrun ranks do: two processes ask for the same missing entry at once; one encodes it."""
    root = make_coop_folder(tmp_path, "oxford_pets", CLASSNAMES, (1, 1, 3)).parent
    command = [sys.executable, "-c", ENCODE_IN_A_PROCESS, str(root), str(tmp_path / "cache")]
    environment = subprocess_environment()
    workers = [subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [worker.communicate(timeout=300)[0].split() for worker in workers]
    assert all(worker.returncode == 0 for worker in workers)
    assert sorted(int(encoded) for encoded, _ in outputs) == [0, len(CLASSNAMES) * 3]  # one encoded, one read
    assert outputs[0][1] == outputs[1][1]  # the same features


def test_two_presets_of_the_same_settings_train_once_with_one_warning(data_root, tmp_path):
    out = tmp_path / "runs"
    result = CliRunner().invoke(app, grid_args(data_root, out, shots="1", seeds="1", methods="nemesis,pen,pan"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.output.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --method nemesis and pen resolve to the same settings; their runs are trained "
                        "once, under nemesis"]  # fmt: skip
    assert run_folders(out) == [folder_of(out, method, 1, 1).relative_to(out)
                                for method in ("nemesis", "pan")]  # fmt: skip
    assert "2 trained" in result.output
    # With --beta 0, nemesis is pan.
    options = {"beta": 0.0, "root": str(data_root), "model": "tiny", "pretrained": None}
    grid = plan_grid(tmp_path / "other", options, datasets=["oxford_pets"], methods=["nemesis", "pan"], shots=[1])
    assert [run.method for run in grid.runs] == ["nemesis"] and len(grid.warnings) == 1


def test_a_grid_rerun_with_other_epochs_extends_with_a_warning_or_is_refused(data_root, tmp_path):
    out = tmp_path / "runs"
    arguments = grid_args(data_root, out, shots="1", seeds="1,2", methods="coop")
    assert CliRunner().invoke(app, arguments).exit_code == 0
    folder = folder_of(out, "coop", 1, 1)
    before = (folder / "metrics.jsonl").read_text()
    fails_with_one_line([*arguments, "--epochs", "1"], "--epochs 1 (the run has 2)")
    assert (folder / "metrics.jsonl").read_text() == before
    longer = CliRunner().invoke(app, [*arguments, "--epochs", "3"])
    assert longer.exit_code == 0, longer.output
    assert "warning: 2 runs of the grid continue to 3 epochs (trained for 2)" in longer.output
    assert "grid: 2 trained, 0 skipped" in longer.output
    assert load_prompt(folder / "prompt.safetensors").metadata.epoch == 3
    assert (folder / "metrics.jsonl").read_text().count('"kind": "epoch"') == 3
    assert (folder / "log.txt").read_text().count("* accuracy:") == 1  # the earlier result block replaced
    again = CliRunner().invoke(app, [*arguments, "--epochs", "3"])
    assert again.exit_code == 0 and "grid: 0 trained, 2 skipped" in again.output and "warning" not in again.output
    # without --epochs each run keeps its own, as --resume does: nothing is extended to the default
    unsaid = [arg for index, arg in enumerate(arguments) if "--epochs" not in arguments[index - 1 : index + 1]]
    kept = CliRunner().invoke(app, unsaid)
    assert kept.exit_code == 0 and "grid: 0 trained, 2 skipped" in kept.output and "warning" not in kept.output
    assert load_prompt(folder / "prompt.safetensors").metadata.epoch == 3


def test_a_torchrun_grid_summary_gives_the_jobs_time_not_rank_0s(monkeypatch):
    """Rank 0 may finish its share first: its summary waits for the slowest rank and counts that time."""

    class WaitingRanks(train_grid.Ranks):
        def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
            time.sleep(0.3)  # the other rank is still training
            return tensor

    grid = train_grid.TrainGrid([], tree=True, resume=False)
    grid.runs.append(SimpleNamespace(config=SimpleNamespace(device="cpu")))
    monkeypatch.setattr(train_grid.distributed, "start", lambda device: WaitingRanks(rank=0, world_size=2))
    monkeypatch.setattr(train_grid.distributed, "stop", lambda: None)
    monkeypatch.setattr(train_grid.torch.distributed, "get_backend", lambda: "gloo")
    monkeypatch.setattr(train_grid, "run_grid", lambda grid, ranks, **options: train_grid.GridSummary())
    summary = train_grid.run_grid_job(grid, progress=False)
    assert summary.seconds >= 0.3


def test_a_planned_grid_checks_each_run_folder_once(tmp_path, monkeypatch):
    """Planning checks every run's folder; the runs then train without checking it again."""
    import nemesis.training.trainer as trainer

    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(2, 1, 2), image_size=28)
    checked = []
    real = trainer.check_run_folder

    def counted(out_dir, config, resume):
        checked.append(Path(out_dir).name)
        return real(out_dir, config, resume)

    monkeypatch.setattr(trainer, "check_run_folder", counted)
    monkeypatch.setattr(train_grid, "check_run_folder", counted)
    options = dict(root=str(root), model="tiny", pretrained=None, epochs=1, batch_size=4, n_ctx=4, device="cpu")
    grid = plan_grid(tmp_path / "runs", options, datasets=["oxford_pets"], shots=[1], seeds=[1, 2])
    run_grid(grid, progress=False)
    assert sorted(checked) == ["seed1", "seed2"]  # once each, when planned


def test_grids_differing_in_prompt_settings_share_an_out_in_dassl_folders(data_root, tmp_path):
    out = tmp_path / "runs"
    for n_ctx in ("4", "2"):
        result = CliRunner().invoke(app, [*grid_args(data_root, out, shots="1", seeds="1", methods="coop"),
                                          "--tree", "--n-ctx", n_ctx])  # fmt: skip
        assert result.exit_code == 0, result.output
    assert [str(folder) for folder in run_folders(out)] == [
        "oxford_pets/coop/tiny_1shots/nctx2_cscFalse_ctpend/seed1",
        "oxford_pets/coop/tiny_1shots/nctx4_cscFalse_ctpend/seed1",
    ]
    config = TrainConfig(dataset="oxford_pets", model="tiny", shots=1, **preset("cocoop"))
    assert run_folder(out, "cocoop", config).relative_to(out).parts[3] == "nctx4_ctpend_init-a_photo_of_a"


def test_a_grid_written_before_settings_folders_goes_on_in_place(data_root, tmp_path):
    out = tmp_path / "runs"
    arguments = [*grid_args(data_root, out, shots="1", seeds="1", methods="coop"), "--tree"]
    assert CliRunner().invoke(app, arguments).exit_code == 0
    folder = folder_of(out, "coop", 1, 1)
    earlier = folder.parent.parent / "seed1"  # the layout of grids before settings folders
    folder.rename(earlier)
    folder.parent.rmdir()
    again = CliRunner().invoke(app, arguments)
    assert again.exit_code == 0 and "grid: 0 trained, 1 skipped" in again.output, again.output
    longer = CliRunner().invoke(app, [*arguments, "--epochs", "3"])
    assert longer.exit_code == 0 and "grid: 1 trained, 0 skipped" in longer.output, longer.output
    assert run_folders(out) == [earlier.relative_to(out)]
    assert load_prompt(earlier / "prompt.safetensors").metadata.epoch == 3

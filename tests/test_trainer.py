"""The trainer: config checks, run folder, I5 (frozen CLIP), exact resume, the CLI, and end to end on tiny."""

from __future__ import annotations

import hashlib
import json
import math
import re

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import nemesis.training.trainer as trainer
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.files.checkpoint import load_prompt
from nemesis.files.run_state import Journal, read_finished_metrics
from nemesis.methods import preset
from nemesis.methods.protocol import build_learner
from nemesis.model.backbone import load_clip
from nemesis.model.tiny import read_tiny_info
from nemesis.training.configs import TrainConfig, default_epochs, read_run_config
from nemesis.training.trainer import learning_rate, train
from nemesis_cli.main import app

CLASSNAMES = ["red apple", "green leaf", "blue sky", "yellow sun"]
RUN_FILES = ("config.json", "metrics.jsonl", "log.txt", "prompt.safetensors", "state.safetensors")


@pytest.fixture
def pets(tmp_path):
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(4, 2, 3), image_size=28)
    return root


def small_config(root, **options) -> TrainConfig:
    """A few seconds of training: tiny with random weights, 4 classes x 4 shots, batch 4."""
    values = dict(
        dataset="oxford_pets", root=str(root), shots=4, seed=2, model="tiny", pretrained=None,
        n_ctx=4, epochs=3, batch_size=4, lr=0.05, device="cpu",
    )  # fmt: skip
    return TrainConfig(**(values | options))


def checksum(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rows(folder, kind):
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


class Interrupted(Exception):
    """Stops a run between epochs, its state saved, as a kill would."""


def train_until_interrupted(config: TrainConfig, out, after_epoch: int) -> None:
    """Train `config` into `out` and stop it after epoch `after_epoch`."""

    def stop(epoch):
        if epoch == after_epoch:
            raise Interrupted

    with pytest.raises(Interrupted):
        train(config, out, progress=False, on_epoch_end=stop)


# --- config ------------------------------------------------------------------------------------


def test_coop_defaults_and_epochs_from_shots():
    config = TrainConfig(dataset="oxford_pets")
    assert (config.lr, config.momentum, config.weight_decay, config.batch_size) == (0.002, 0.9, 5e-4, 32)
    assert (config.warmup_epochs, config.warmup_lr, config.model, config.pretrained) == (
        1,
        1e-5,
        "RN50",
        "openai",
    )
    assert [default_epochs("dtd", shots) for shots in (1, 2, 4, 8, 16)] == [50, 100, 100, 200, 200]
    assert default_epochs("imagenet", 16) == 50
    assert TrainConfig(dataset="dtd", shots=2).resolved().epochs == 100
    assert TrainConfig(dataset="dtd", shots=2, epochs=7).resolved().epochs == 7


def test_learning_rate_is_constant_warmup_then_cosine():
    config = TrainConfig(dataset="dtd", epochs=10).resolved()
    assert learning_rate(config, 0) == 1e-5
    assert learning_rate(config, 1) == pytest.approx(0.002)
    assert learning_rate(config, 6) == pytest.approx(0.001 * (1 + math.cos(math.pi * 5 / 10)))
    assert all(learning_rate(config, e) > learning_rate(config, e + 1) for e in range(1, 9))


def test_config_json_round_trip_and_official_override():
    config = TrainConfig(dataset="OxfordPets", **preset("nemesis"), beta=0.0, official_override=True).resolved()
    assert config.dataset == "oxford_pets" and (config.weight, config.pan_weight) == (1.0, 50.0)
    assert config.schedule.value == "constant"
    values = config.to_json()
    assert values["nemesis"] == {
        "beta": 0.0, "weight": 1.0, "norm": "2", "schedule": "constant", "positions": 1,
        "corrupt_weight": 0.5, "pan_weight": 50.0, "official_override": True,
    }  # fmt: skip
    assert TrainConfig.from_json(json.loads(json.dumps(values))) == config
    assert TrainConfig(dataset="dtd").to_json()["nemesis"] is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"prompt_method": "soup"}, "unknown prompt method .soup.; choose one of coop, cocoop, plot"),
        ({**preset("nemesis"), "beta": -0.1}, "beta must be between 0 and 1"),
        ({**preset("nemesis"), "positions": 17}, "positions"),
        ({**preset("nemesis"), "weight": -1}, "weight must be 0 or more"),
        ({"dataset": "pets"}, "unknown dataset 'pets'"),
        ({"precision": "fp8"}, "unknown precision 'fp8'"),
        ({"shots": 0}, "shots must be at least 1"),
        ({"class_position": "left"}, "unknown class position 'left'"),
        ({"crop_scale": 0}, "crop_scale must be in"),
        ({"crop_scale": 1.5}, "crop_scale must be in"),
    ],
)
def test_bad_config_is_refused(options, message):
    with pytest.raises(NemesisError, match=message):
        TrainConfig(**({"dataset": "dtd"} | options))


def test_runs_saved_before_crop_scale_existed_still_resume():
    import hashlib
    import json

    from nemesis.training.trainer import RESUMABLE_CHANGES, _config_digest

    config = TrainConfig(dataset="dtd", epochs=2, device="cpu")
    # A config.json of those days: no crop_scale, method_options nor penalty_options, and one word for
    # method and penalty.
    later = ("crop_scale", "method_options", "penalty_options", "penalty")
    older = {k: v for k, v in config.to_json().items() if k not in later}
    older["method"] = older.pop("prompt_method")
    compared = {key: value for key, value in older.items() if key not in RESUMABLE_CHANGES}
    saved = hashlib.sha256(json.dumps(compared, sort_keys=True).encode()).hexdigest()  # in states saved then
    assert _config_digest(TrainConfig.from_json(older)) == saved
    assert _config_digest(TrainConfig(dataset="dtd", epochs=2, device="cpu", crop_scale=1.0)) != _config_digest(config)


# --- training ----------------------------------------------------------------------------------


def test_run_folder_holds_every_file_and_row(pets, tmp_path):
    out = tmp_path / "run"
    config = small_config(pets, **preset("nemesis"), beta=0.5, positions=2, save_every=2, eval_every=2)
    train(config, out, progress=False)
    for name in RUN_FILES:
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["epoch-0002.safetensors"]

    saved = json.loads((out / "config.json").read_text())
    for key in ("dataset", "shots", "seed", "prompt_method", "penalty", "model", "pretrained", "subsample", "epochs"):
        assert key in saved
    assert saved["nemesis"]["beta"] == 0.5 and saved["epochs"] == 3
    assert read_run_config(out) == config.resolved()

    steps, epochs = rows(out, "step"), rows(out, "epoch")
    assert len(steps) == 3 * 4 and [row["step"] for row in steps] == list(range(1, 13))
    assert set(steps[0]) == {
        "kind",
        "epoch",
        "step",
        "lr",
        "ce_loss",
        "norm_loss",
        "train_acc",
        "norms",
        "alpha",
    }
    assert all(len(row["norms"]) == 4 and len(row["alpha"]) == 4 for row in steps)
    assert steps[0]["lr"] == 1e-5 and steps[-1]["epoch"] == 3
    assert all(row["norm_loss"] > 0 for row in steps)
    assert [row["epoch"] for row in epochs] == [1, 2, 3]
    assert set(epochs[0]) == {"kind", "epoch", "test_acc", "norms", "mean_norm", "fro_norm"}
    assert epochs[0]["test_acc"] is None and 0 <= epochs[1]["test_acc"] <= 100 and epochs[2]["test_acc"] is not None

    prompt = load_prompt(out / "prompt.safetensors")
    metadata = prompt.metadata
    assert (metadata.model, metadata.pretrained, metadata.dataset, metadata.shots, metadata.seed) == (
        "tiny",
        None,
        "oxford_pets",
        4,
        2,
    )
    assert metadata.penalty == "nemesis" and metadata.penalty_config["beta"] == 0.5 and metadata.epoch == 3
    assert metadata.classnames == CLASSNAMES and metadata.weights_id and metadata.subsample == "all"
    assert metadata.activation == "gelu"  # tiny's own activation, recorded with the prompt
    assert torch.allclose(torch.tensor(epochs[-1]["norms"]), prompt.ctx.norm(dim=-1))

    log = (out / "log.txt").read_text().splitlines()
    # Dassl's closing lines around CoOp's result block, in Dassl's words (dassl/engine/trainer.py).
    assert log[-10:-6] == ["Finish training", "Deploy the last-epoch model", "Evaluate on the *test* set", "=> result"]
    assert log[-6].startswith("* total: 12") and log[-5].startswith("* correct: ")
    assert log[-4].startswith("* accuracy: ") and log[-4].endswith("%")
    assert log[-3].startswith("* error: ") and log[-2].startswith("* macro_f1: ")
    assert re.fullmatch(r"Elapsed: \d+:\d\d:\d\d", log[-1])


def train_leaving_the_backbone_unchanged(config: TrainConfig, out, monkeypatch):
    """Train `config` into `out`; the one backbone the run built must be bit-identical afterwards (I5).
    Returns that backbone."""
    built = []

    def recording_load_clip(*args, **kwargs):
        built.append(load_clip(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(trainer, "load_clip", recording_load_clip)
    before = checksum(load_clip(config.model, config.pretrained).model)
    train(config, out, progress=False)
    assert len(built) == 1 and checksum(built[0].model) == before
    return built[0]


def test_training_changes_ctx_only_i5(pets, tmp_path, monkeypatch):
    config = small_config(pets, **preset("nemesis"), beta=0.5, class_specific=True)
    train_leaving_the_backbone_unchanged(config, tmp_path / "run", monkeypatch)
    ctx = load_prompt(tmp_path / "run" / "prompt.safetensors").ctx
    assert ctx.shape == (4, 4, 64)


@pytest.mark.parametrize("train_views", [0, 2])
def test_resume_ends_with_the_uninterrupted_prompt(pets, tmp_path, train_views):
    config = small_config(pets, **preset("nemesis"), beta=0.5, epochs=5, train_views=train_views)
    train(config, tmp_path / "whole", progress=False)
    train_until_interrupted(config, tmp_path / "cut", after_epoch=2)
    assert not (tmp_path / "cut" / "prompt.safetensors").exists()
    # Rows of an epoch that did not finish must not survive: fake a torn tail.
    with open(tmp_path / "cut" / "metrics.jsonl", "a") as file:
        file.write('{"kind": "step", "epoch": 3, "step": 9')
    train(config, tmp_path / "cut", resume=True, progress=False)

    whole = load_file(str(tmp_path / "whole" / "prompt.safetensors"))["ctx"]
    resumed = load_file(str(tmp_path / "cut" / "prompt.safetensors"))["ctx"]
    assert torch.equal(whole, resumed)
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == (tmp_path / "cut" / "metrics.jsonl").read_text()
    assert "resumed after epoch 2" in (tmp_path / "cut" / "log.txt").read_text()


def test_state_holds_tensors_and_json_only(pets, tmp_path):
    train(small_config(pets, epochs=2), tmp_path / "run", progress=False)
    state = load_file(str(tmp_path / "run" / "state.safetensors"))
    assert {"ctx", "momentum", "torch_rng"} <= set(state)
    assert state["torch_rng"].dtype == torch.uint8


def test_existing_run_and_changed_options_are_refused(pets, tmp_path):
    out = tmp_path / "run"
    train(small_config(pets, epochs=1), out, progress=False)
    with pytest.raises(NemesisError, match="already holds a run; pass --resume"):
        train(small_config(pets, epochs=1), out, progress=False)
    with pytest.raises(NemesisError, match=r"cannot resume .* \(seed: 2 -> 3"):
        train(small_config(pets, epochs=1, seed=3), out, resume=True, progress=False)


# --- CLI ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--method", "soup"], "unknown method 'soup'"),
        (["--method", "nemesis", "--beta", "1.5"], "beta must be between 0 and 1"),
        (["--method", "nemesis", "--positions", "5"], "positions (NP) must be between 1 and n_ctx = 4"),
        (["--method", "nemesis", "--positions", "0"], "positions"),
        (["--method", "nemesis", "--weight", "-2"], "weight must be 0 or more"),
        (["--shots", "5"], "more than the 4 training images of class 'red apple'"),
        (["--norm", "3"], "unknown norm '3'"),
        (["--model", "ViT-B-33"], "unknown model 'ViT-B-33'"),
    ],
)
def test_cli_refuses_bad_input_with_one_line_and_writes_nothing(pets, tmp_path, arguments, message):
    out = tmp_path / "run"
    base = [
        "train",
        "--dataset",
        "oxford_pets",
        "--root",
        str(pets),
        "--model",
        "tiny",
        "--pretrained",
        "none",
    ]
    base += ["--n-ctx", "4", "--shots", "4", "--out", str(out)]
    result = CliRunner().invoke(app, base + arguments)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], result.output
    assert not out.exists()
    assert not (pets / "oxford_pets" / "split_fewshot").exists()


def test_cli_resume_alone_reuses_the_run_config(pets, tmp_path):
    out = tmp_path / "run"
    config = small_config(pets, epochs=2)
    with pytest.raises(RuntimeError):
        train(config, out, progress=False, on_epoch_end=lambda epoch: (_ for _ in ()).throw(RuntimeError()))
    result = CliRunner().invoke(app, ["train", "--out", str(out), "--resume"])
    assert result.exit_code == 0, result.output
    assert "resumed after epoch 1" in result.output and "* accuracy: " in result.output
    missing = CliRunner().invoke(app, ["train", "--out", str(tmp_path / "other")])
    assert missing.exit_code == 2 and "--dataset is required" in missing.output


# --- end to end on the embedded default ---------------------------------------------------------


@pytest.mark.slow
def test_fashion_mnist_coop_beats_zero_shot_and_nemesis_lowers_the_norm(pretrained_tiny, tmp_path):
    zero_shot = read_tiny_info(pretrained_tiny)["zero_shot_accuracy"]
    assert 50 <= zero_shot <= 85
    common = ["--dataset", "fashion_mnist", "--model", "tiny", "--pretrained", "fmnist", "--shots", "16"]
    common += ["--seed", "1", "--epochs", "40", "--train-views", "8", "--save-every", "20", "--device", "cpu"]
    runs = {}
    for method in ("coop", "nemesis"):
        out = tmp_path / method
        result = CliRunner().invoke(app, ["train", *common, "--method", method, "--out", str(out)])
        assert result.exit_code == 0, result.output
        for name in RUN_FILES:
            assert (out / name).is_file(), (method, name)
        assert sorted(p.name for p in (out / "checkpoints").iterdir()) == [
            "epoch-0020.safetensors",
            "epoch-0040.safetensors",
        ]
        runs[method] = rows(out, "epoch")[-1]
        assert len(rows(out, "epoch")) == 40 and rows(out, "step")[-1]["step"] == 40 * 5
    assert runs["coop"]["test_acc"] > zero_shot + 2
    assert runs["nemesis"]["mean_norm"] < runs["coop"]["mean_norm"]


def test_unknown_device_is_one_line():
    from nemesis.model.backbone import resolve_device

    with pytest.raises(NemesisError, match="unknown device 'bogus'"):
        resolve_device("bogus")
    assert resolve_device("cpu") == "cpu"


def coop_parse_test_res(directory, keyword: str = "accuracy", end_signal: str = "Finish training") -> list[float]:
    """The default mode of CoOp's `parse_test_res.py DIRECTORY`, rebuilt from its documented behaviour.

    Every non-hidden subfolder of DIRECTORY (sorted) must hold `log.txt`; in it, lines are read
    stripped, and only after a line equal to `end_signal` does the regex `\\* <keyword>: ([\\.\\deE+-]+)%`
    count (the last match wins). Files without a match are left out; none at all fails.
    """
    pattern = re.compile(rf"\* {keyword}: ([\.\deE+-]+)%")
    values = []
    for subdir in sorted(path for path in directory.iterdir() if not path.name.startswith(".")):
        log = subdir / "log.txt"
        assert log.is_file(), log
        good_to_go, value = False, None
        for line in log.read_text().splitlines():
            line = line.strip()
            good_to_go = good_to_go or line == end_signal
            if good_to_go and (match := pattern.search(line)):
                value = float(match.group(1))
        if value is not None:
            values.append(value)
    assert values, f"Nothing found in {directory}"
    return values


def test_coop_parse_test_res_reads_a_folder_of_our_runs(pets, tmp_path):
    runs = tmp_path / "runs"
    for seed in (1, 2):
        train(small_config(pets, seed=seed, epochs=2), runs / f"seed{seed}", progress=False)
    final = [rows(runs / f"seed{seed}", "epoch")[-1]["test_acc"] for seed in (1, 2)]
    assert coop_parse_test_res(runs) == [round(value, 1) for value in final]
    assert coop_parse_test_res(runs, "macro_f1") and len(coop_parse_test_res(runs, "error")) == 2


# --- divergence ---------------------------------------------------------------------------------


def test_a_prompt_whose_norms_overflow_stops_the_run_in_one_line(pets, tmp_path):
    # One step of lr 1e30 leaves ctx finite (entries ~1e27) but its squared norms overflow fp32 to inf.
    out = tmp_path / "run"
    arguments = ["train", "--dataset", "oxford_pets", "--root", str(pets), "--model", "tiny", "--pretrained", "none",
                 "--n-ctx", "4", "--shots", "4", "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0",
                 "--lr", "1e30", "--device", "cpu", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert errors == [result.output.strip().splitlines()[-1]], result.output  # one line, the last
    assert "diverged in epoch 1: the prompt's norms are no longer finite (lr 1e+30)" in errors[0]
    assert not out.exists()


@pytest.mark.parametrize(
    ("lr", "expected"),
    [
        ("1e30", "--precision fp16 applies lr in fp16, whose largest value is 65504; got 1e+30"),
        ("60000", "diverged in epoch 1: the prompt is no longer finite (lr 60000)"),
    ],
)
def test_fp16_with_a_huge_lr_stops_in_one_line(pets, tmp_path, lr, expected):
    # fp16 SGD takes lr as an fp16 factor (beyond 65504 it would raise inside the optimiser) and
    # overflows the prompt to inf long before fp32 would.
    out = tmp_path / "run"
    arguments = ["train", "--dataset", "oxford_pets", "--root", str(pets), "--model", "tiny", "--pretrained", "none",
                 "--n-ctx", "4", "--shots", "4", "--epochs", "1", "--batch-size", "16", "--warmup-epochs", "0",
                 "--lr", lr, "--precision", "fp16", "--device", "cpu", "--out", str(out)]  # fmt: skip
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines[-1].startswith("error:") and expected in lines[-1], result.output
    assert sum(line.startswith("error:") for line in lines) == 1 and "Traceback" not in result.output
    assert not out.exists()


@pytest.fixture
def infinite_logits(monkeypatch):
    """Every learner the trainer builds gives infinite logits: its first step diverges."""
    build = trainer.build_learner

    def build_with_infinite_logits(*args, **kwargs):
        learner = build(*args, **kwargs)
        logits = learner.logits
        learner.logits = lambda images: logits(images) + float("inf")
        return learner

    monkeypatch.setattr(trainer, "build_learner", build_with_infinite_logits)


def test_non_finite_logits_stop_the_run(pets, tmp_path, infinite_logits):
    with pytest.raises(NemesisError, match="diverged in epoch 1: the logits are no longer finite"):
        train(small_config(pets), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_metrics_rows_are_strict_json(tmp_path):
    """A non-finite value is written null, never `Infinity` or `NaN` (not JSON), and reads back as None."""
    journal = Journal(tmp_path, echo=None)
    journal.rows.append({"kind": "epoch", "epoch": 1, "test_acc": math.nan, "norms": [1.5, math.inf, -math.inf]})
    journal.flush_rows()

    def refuse(token):
        raise AssertionError(f"{token} is not JSON")

    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert json.loads(line, parse_constant=refuse) == {
        "kind": "epoch",
        "epoch": 1,
        "test_acc": None,
        "norms": [1.5, None, None],
    }
    assert read_finished_metrics(tmp_path / "metrics.jsonl", 1) == line + "\n"  # as a resume reads it


# --- precision ----------------------------------------------------------------------------------


def test_fp16_holds_the_prompt_in_fp16_and_loses_updates_below_its_resolution(pets, tmp_path):
    # One warm-up epoch at lr 1e-6: fp32 moves every ctx entry, while in fp16 (the official code's
    # PREC) most updates are below half the fp16 spacing of their entry and are lost.
    initial = build_learner("coop", load_clip("tiny"), CLASSNAMES, n_ctx=4, seed=2).ctx.detach()
    changed = {}
    for precision in ("fp32", "fp16"):
        config = small_config(pets, epochs=1, warmup_epochs=1, warmup_lr=1e-6, precision=precision)
        ctx = load_prompt(train(config, tmp_path / precision, progress=False) / "prompt.safetensors").ctx
        start = initial.half().float() if precision == "fp16" else initial
        changed[precision] = float((ctx != start).float().mean())
        assert torch.equal(ctx.half().float(), ctx) == (precision == "fp16")  # fp16 values, stored as fp32
    assert changed["fp32"] > 0.95 and changed["fp16"] < 0.5, changed
    assert json.loads((tmp_path / "fp16" / "config.json").read_text())["precision"] == "fp16"


def test_fp16_text_passes_run_on_a_half_text_side_beside_the_fp32_image_tower(pets, tmp_path):
    backbones = {}
    train(small_config(pets, precision="fp16", epochs=1), tmp_path / "run", progress=False, backbones=backbones)
    (fp32,) = [backbone for key, backbone in backbones.items() if "fp16" not in key]
    (fp16,) = [backbone for key, backbone in backbones.items() if "fp16" in key]
    assert fp16.model.visual is fp32.model.visual and fp16.model.token_embedding.weight.dtype == torch.float16
    assert fp32.model.token_embedding.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_fp16_resumes_to_the_uninterrupted_prompt(pets, tmp_path, method):
    config = small_config(pets, prompt_method=method, precision="fp16", batch_size=8)
    whole = load_prompt(train(config, tmp_path / "whole", progress=False) / "prompt.safetensors")
    train_until_interrupted(config, tmp_path / "cut", after_epoch=1)
    train(config, tmp_path / "cut", resume=True, progress=False)
    resumed = load_prompt(tmp_path / "cut" / "prompt.safetensors")
    assert torch.equal(resumed.ctx, whole.ctx)
    assert all(torch.equal(resumed.extra[name], whole.extra[name]) for name in whole.extra)
    for tensor in [resumed.ctx, *resumed.extra.values()]:  # ctx and CoCoOp's meta-net were fp16 parameters
        assert torch.equal(tensor.half().float(), tensor)

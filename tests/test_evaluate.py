"""`nemesis eval`: I3 (cached features give the live accuracy), cache reuse, result block, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from nemesis.data import feature_cache
from nemesis.data.datasets import load_dataset
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import coop_result_block, evaluate, macro_f1, resolve_target
from nemesis.files.checkpoint import PromptCheckpoint, PromptMetadata, export_dassl, load_checkpoint, save_prompt
from nemesis.methods.coop.learner import PromptedCLIP, PromptLearner
from nemesis_cli.main import app

from .conftest import cached_backbone, fails_with_one_line
from .test_checkpoint import write_dassl_checkpoint

runner = CliRunner()
CLASSES = ["red square", "green circle", "blue star", "yellow moon"]


@pytest.fixture
def pets_root(tmp_path):
    make_coop_folder(tmp_path / "data", "oxford_pets", classnames=CLASSES, per_class=(2, 1, 6))
    return tmp_path / "data"


def _prompt(tmp_path, ctx=None, **metadata):
    ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.5 if ctx is None else ctx
    values = {"model": "tiny", "dataset": "oxford_pets", "classnames": CLASSES} | metadata
    return save_prompt(tmp_path / "prompt.safetensors", ctx, PromptMetadata(**values))


def test_cached_accuracy_equals_live_encoding(tmp_path, pets_root):
    checkpoint = load_checkpoint(_prompt(tmp_path))
    cache = tmp_path / "cache"
    target = resolve_target(checkpoint, pretrained="none")
    result = evaluate(target, root=pets_root, cache_dir=cache, device="cpu", progress=False)

    clip = cached_backbone("tiny")
    data = load_dataset("oxford_pets", pets_root)
    with torch.no_grad():
        images = torch.stack([clip.preprocess(data.open_image(sample)) for sample in data.test])
        live_features = clip.model.encode_image(images)
        learner = PromptLearner(clip, data.classnames, ctx=checkpoint.ctx)
        live = PromptedCLIP(learner).logits(live_features).argmax(dim=-1)
    labels = torch.tensor([sample.label for sample in data.test])
    assert result.n == len(data.test) == 24
    assert result.correct == int((live == labels).sum())
    assert result.accuracy == pytest.approx(100.0 * result.correct / result.n)


def test_second_run_encodes_no_image(tmp_path, pets_root):
    path = _prompt(tmp_path)
    args = ["eval", str(path), "--pretrained", "none", "--root", str(pets_root), "--cache-dir", str(tmp_path / "cache")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    encoded = feature_cache.encoded_images
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert feature_cache.encoded_images == encoded
    assert "* accuracy:" in second.output and "* macro_f1:" in second.output
    assert first.output.splitlines()[-5:] == second.output.splitlines()[-5:]


def test_dassl_checkpoint_named_model_and_record(tmp_path, pets_root):
    write_dassl_checkpoint(tmp_path / "seed1", torch.randn(16, 64) * 0.02, epoch=5)
    out = tmp_path / "eval.jsonl"
    args = ["eval", str(tmp_path / "seed1"), "--model", "tiny", "--pretrained", "none", "--dataset", "oxford_pets"]
    args += [
        "--root",
        str(pets_root),
        "--shots",
        "16",
        "--seed",
        "1",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    for _ in range(2):
        result = runner.invoke(app, args)
        assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 2 and records[0]["kind"] == "eval"
    assert records[0]["shots"] == 16 and records[0]["seed"] == 1 and records[0]["n"] == 24


def test_macro_f1_and_result_block():
    labels = torch.tensor([0, 0, 1, 1])
    predicted = torch.tensor([0, 1, 1, 1])
    # class 0: tp 1, fn 1 -> 2/3; class 1: tp 2, fp 1 -> 4/5
    assert macro_f1(predicted, labels) == pytest.approx(100 * (2 / 3 + 4 / 5) / 2)
    block = coop_result_block(3669, 3283, 89.25)
    assert block.splitlines() == [
        "=> result",
        "* total: 3,669",
        "* correct: 3,283",
        "* accuracy: 89.5%",
        "* error: 10.5%",
        "* macro_f1: 89.2%",
    ]


def _fails_with_one_line(args, expected, cache):
    fails_with_one_line([*args, "--pretrained", "none", "--cache-dir", str(cache)], expected)
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))


def test_bad_input_writes_nothing(tmp_path, pets_root):
    cache = tmp_path / "cache"
    path = _prompt(tmp_path)
    _fails_with_one_line(["eval", str(path), "--root", str(tmp_path / "nowhere")], "oxford_pets", cache)
    _fails_with_one_line(
        ["eval", str(path), "--root", str(pets_root), "--dataset", "oxford_petz"], "oxford_petz", cache
    )
    specific = save_prompt(tmp_path / "specific.safetensors", torch.zeros(3, 4, 64), PromptMetadata(model="tiny"))
    args = ["eval", str(specific), "--root", str(pets_root), "--dataset", "oxford_pets"]
    _fails_with_one_line(args, "class-specific ctx has 3 classes", cache)
    # a partial dataset: one test image deleted
    next((pets_root / "oxford_pets" / "images").rglob("*.png")).unlink()
    _fails_with_one_line(["eval", str(path), "--root", str(pets_root)], "missing", cache)
    (tmp_path / "a-file").write_text("not a folder")
    _fails_with_one_line(
        ["eval", str(path), "--root", str(pets_root), "--out", str(tmp_path / "a-file/x.jsonl")], "cannot write", cache
    )


@pytest.mark.slow
def test_random_tiny_prompt_on_fashion_mnist_end_to_end(tmp_path):
    ctx = torch.randn(16, 64, generator=torch.Generator().manual_seed(1)) * 0.02
    path = save_prompt(tmp_path / "fm.safetensors", ctx, PromptMetadata(model="tiny", dataset="fashion_mnist"))
    out = tmp_path / "evals.jsonl"
    args = ["eval", str(path), "--pretrained", "none", "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "* total: 10,000" in result.output
    record = json.loads(out.read_text())
    assert record["dataset"] == "fashion_mnist" and record["n"] == 10000
    assert 0.0 <= record["accuracy"] <= 100.0 and record["accuracy"] == pytest.approx(
        float(result.output.split("* accuracy: ")[1].split("%")[0]), abs=0.05
    )


def test_other_weights_than_training_are_noted(tmp_path, pets_root):
    path = _prompt(tmp_path, weights_id="sha256:feed")
    args = ["eval", str(path), "--pretrained", "none", "--root", str(pets_root), "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "note: the prompt was trained with weights sha256:feed but runs with random-seed0" in result.output


def test_prompt_trained_under_another_activation_is_noted(tmp_path, pets_root):
    path = _prompt(tmp_path, activation="quickgelu", weights_id="random-seed0+quickgelu")
    args = ["eval", str(path), "--root", str(pets_root), "--cache-dir", str(tmp_path / "cache")]
    result = runner.invoke(app, [*args, "--activation", "gelu"])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "trained under QuickGELU but runs under GELU; pass --activation quickgelu" in notes[0]
    # Without --activation the prompt's own weights come with the activation it recorded.
    result = runner.invoke(app, args)
    assert result.exit_code == 0 and "note:" not in result.output and "activation quickgelu" in result.output


def test_coop_checkpoint_under_gelu_is_noted_as_not_recording_its_activation(tmp_path, pets_root):
    dassl = write_dassl_checkpoint(tmp_path / "coop", torch.zeros(4, 64))
    args = ["eval", str(dassl), "--model", "tiny", "--pretrained", "none", "--dataset", "oxford_pets"]
    result = runner.invoke(app, [*args, "--root", str(pets_root), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "does not record the activation it was trained under; it runs under GELU" in notes[0]
    assert "pass --activation quickgelu for their checkpoints" in notes[0]
    quick = runner.invoke(app, [*args, "--activation", "quickgelu", "--root", str(pets_root)])
    assert quick.exit_code == 0 and "note:" not in quick.output  # CoOp's own activation: nothing to say


def test_exported_gelu_base_class_cocoop_prompt_gets_no_false_notes(tmp_path, pets_root):
    """Our GELU-trained CoCoOp prompt of the base classes, exported to Dassl and evaluated back with
    --base-to-new: no claim that it was trained under QuickGELU or on all classes; each thing the file
    does not record is said once, with what is assumed."""
    from .test_cocoop_checkpoint import write_cocoop_dassl_checkpoint

    cocoop = load_checkpoint(write_cocoop_dassl_checkpoint(tmp_path / "cocoop", half=False)[0])
    ours = PromptMetadata(
        model="tiny", activation="gelu", dataset="oxford_pets", subsample="base", prompt_method="cocoop"
    )
    (tmp_path / "export").mkdir()
    exported = export_dassl(PromptCheckpoint(cocoop.ctx, ours, extra=cocoop.extra), tmp_path / "export")
    args = ["eval", str(exported), "--model", "tiny", "--pretrained", "none", "--dataset", "oxford_pets"]
    result = runner.invoke(app, [*args, "--base-to-new", "--root", str(pets_root), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert "QuickGELU but runs" not in result.output and "not trained on the base classes only" not in result.output
    notes = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert len(notes) == 2, notes
    assert "does not record the activation it was trained under; it runs under GELU" in notes[0]
    assert "does not record the classes it was trained on" in notes[1] and "assuming the base classes" in notes[1]


def test_coop_checkpoint_of_a_multi_token_init_runs_with_coops_layout(tmp_path, pets_root):
    """CoOp trained with ctx_init "an X-ray of a" saves 4 vectors; --ctx-init restores the frozen "of a"."""
    from nemesis.evaluation.evaluate import prepare_evaluation, resolve_target

    clip = cached_backbone("tiny")
    tokens = clip.tokenizer.encode("an X-ray of a")[:4]
    with torch.no_grad():
        ctx = clip.model.token_embedding.weight[torch.tensor(tokens)].clone()  # CoOp's init, untrained
    checkpoint = load_checkpoint(write_dassl_checkpoint(tmp_path / "coop", ctx))
    named = {"model": "tiny", "pretrained": "none", "dataset": "oxford_pets"}
    target = resolve_target(checkpoint, ctx_init="an X-ray of a", **named)
    setup = prepare_evaluation(target, root=pets_root, cache_dir=tmp_path / "cache", device="cpu", progress=False)
    texts = [f"an X-ray of a {name}." for name in CLASSES]
    with torch.no_grad():
        difference = setup.learner.text_features() - clip.model.encode_text(clip.tokenizer(texts))
    assert difference.abs().max().item() <= 1e-5 and setup.source["ctx_init"] == "an X-ray of a"
    with pytest.raises(NemesisError, match=r"--ctx-init 'a photo of the thing' has 5 words but .* holds 4"):
        resolve_target(checkpoint, ctx_init="a photo of the thing", **named)


# --- which weights: named, or the prompt's own record; never random by omission ------------------


def test_model_without_weights_is_refused_and_random_weights_are_named(tmp_path, pets_root):
    """A prompt that records no weights, with --model and no --pretrained: one line saying how to
    name them, nothing written; --pretrained none runs on random weights and records them as such."""
    out = tmp_path / "evals.jsonl"
    path = _prompt(tmp_path)  # model tiny, weights not recorded
    args = ["eval", str(path), "--model", "tiny", "--root", str(pets_root), "--out", str(out)]
    result = fails_with_one_line(args, "does not record its weights")
    assert "--pretrained fmnist" in result.output and "none for random weights" in result.output
    assert not out.exists()
    zero_shot = ["eval", "--zero-shot", "--model", "tiny", "--dataset", "oxford_pets", "--root", str(pets_root)]
    fails_with_one_line(zero_shot, "--zero-shot needs the weights of tiny: --pretrained fmnist")

    result = runner.invoke(app, [*args, "--pretrained", "none", "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "model tiny, random weights" in result.output
    record = json.loads(out.read_text())
    assert record["pretrained"] is None and record["weights_id"] == "random-seed0"


def test_prompt_trained_on_random_weights_runs_on_them_unnamed(tmp_path, pets_root):
    path = _prompt(tmp_path, weights_id="random-seed0")  # what `nemesis train --pretrained none` records
    result = runner.invoke(app, ["eval", str(path), "--root", str(pets_root), "--cache-dir", str(tmp_path / "cache")])
    assert result.exit_code == 0, result.output
    assert "model tiny, random weights" in result.output


def test_recorded_weights_are_used_only_when_they_are_a_tag_of_the_model():
    from nemesis.evaluation.evaluate import choose_weights

    def chosen(used, named=None, **metadata):
        checkpoint = PromptCheckpoint(torch.zeros(4, 64), PromptMetadata(**metadata), "p.safetensors")
        return choose_weights(checkpoint, used, named)

    assert chosen("RN50", model="RN50", pretrained="openai") == "openai"
    assert chosen("tiny", model="tiny", pretrained="fmnist") == "fmnist"
    assert chosen("tiny", "none", model="tiny", pretrained="fmnist") is None  # named weights win
    assert chosen("tiny", model="tiny", pretrained="none") is None  # recorded random weights
    assert chosen("tiny", "w.pt", model="tiny", pretrained="/etc/passwd") == "w.pt"
    with pytest.raises(NemesisError, match=r"records weights '/etc/passwd', which is not a pretrained tag of tiny"):
        chosen("tiny", model="tiny", pretrained="/etc/passwd")
    with pytest.raises(NemesisError, match=r"records weights 'openai', which is not a pretrained tag of tiny"):
        chosen("tiny", model="tiny", pretrained="openai")
    with pytest.raises(NemesisError, match=r"was trained on RN50; name the weights of tiny: pass --pretrained fmnist"):
        chosen("tiny", model="RN50", pretrained="openai")


def test_eval_takes_an_output_tree_and_prints_the_mean_over_seeds(tmp_path, pets_root):
    """A CoOp output tree of 3 seeds at 16 shots and one run at 2 shots: every checkpoint is evaluated,
    then one line gives the 16-shot mean ± std over its 3 seeds (none for the lone 2-shot run)."""
    import statistics

    output = tmp_path / "output" / "oxford_pets" / "CoOp"
    for shots, seed in ((16, 1), (16, 2), (16, 3), (2, 1)):
        ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed + shots)) * 0.5
        write_dassl_checkpoint(output / f"rn50_{shots}shots" / "nctx4_cscFalse_ctpend" / f"seed{seed}", ctx, epoch=5)
    out = tmp_path / "evals.jsonl"
    args = ["eval", str(tmp_path / "output"), "--model", "tiny", "--pretrained", "none", "--root", str(pets_root)]
    result = runner.invoke(app, [*args, "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted((row["shots"], row["seed"]) for row in records) == [(2, 1), (16, 1), (16, 2), (16, 3)]
    accuracies = [row["accuracy"] for row in records if row["shots"] == 16]
    means = [line for line in result.output.splitlines() if line.startswith("mean over seeds")]
    mean, std = statistics.mean(accuracies), statistics.stdev(accuracies)
    setting = "oxford_pets, CoOp (random weights), 16 shots, all classes, tiny"
    assert means == [f"mean over seeds: {setting}: {mean:.2f}% ± {std:.2f} over 3 seeds (1, 2, 3)"]

    (tmp_path / "empty").mkdir()
    fails_with_one_line(["eval", str(tmp_path / "empty"), "--model", "tiny"], "prompt.safetensors")


def _seeded_prompts(folder, subsample="all"):
    """Prompts of seeds 1 and 2 (1 shot, random weights) in folder/seed1 and folder/seed2."""
    for seed in (1, 2):
        ctx = torch.randn(4, 64, generator=torch.Generator().manual_seed(seed)) * 0.5
        metadata = dict(prompt_method="coop", shots=1, seed=seed, weights_id="random-seed0", subsample=subsample)
        (folder / f"seed{seed}").mkdir(parents=True)
        (folder / f"seed{seed}" / "config.json").write_text("{}")  # a run folder
        _prompt(folder / f"seed{seed}", ctx, **metadata)


def test_the_mean_over_seeds_counts_each_seed_once_and_names_the_repeat(tmp_path, pets_root):
    """A copied seed folder and the same prompt given twice are one seed: the mean is over seeds 1 and 2,
    one note names the repeat; the line says "1 shot" and that the weights were random."""
    import shutil
    import statistics

    _seeded_prompts(tmp_path / "runs")
    shutil.copytree(tmp_path / "runs" / "seed1", tmp_path / "copy" / "seed1")
    (tmp_path / "copy" / "seed1" / "config.json").unlink()  # a folder holding a prompt file is taken too
    again = tmp_path / "runs" / "seed1" / "prompt.safetensors"
    out = tmp_path / "evals.jsonl"
    paths = [str(tmp_path / "runs"), str(tmp_path / "copy"), str(again)]
    result = runner.invoke(app, ["eval", *paths, "--root", str(pets_root), "--device", "cpu", "--out", str(out)])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [record["seed"] for record in records] == [1, 2, 1, 1]  # every checkpoint is evaluated and recorded
    mean = statistics.mean(record["accuracy"] for record in records[:2])
    std = statistics.stdev(record["accuracy"] for record in records[:2])
    means = [line for line in result.output.splitlines() if line.startswith("mean over seeds")]
    setting = "oxford_pets, CoOp (random weights), 1 shot, all classes, tiny"
    assert means == [f"mean over seeds: {setting}: {mean:.2f}% ± {std:.2f} over 2 seeds (1, 2)"]
    (note,) = [line for line in result.output.splitlines() if line.startswith("note:")]
    assert "seed 1 was given 3 times" in note and str(tmp_path / "copy" / "seed1" / "prompt.safetensors") in note


def test_the_means_over_seeds_of_base_to_new_end_with_their_h(tmp_path, pets_root):
    from analysis.tables import harmonic_mean

    _seeded_prompts(tmp_path / "runs", subsample="base")
    args = ["eval", str(tmp_path / "runs"), "--base-to-new", "--root", str(pets_root), "--device", "cpu"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "evals.jsonl")])
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in (tmp_path / "evals.jsonl").read_text().splitlines()]
    base, new = (
        sum(record["accuracy"] for record in records if record["subsample"] == part) / 2 for part in ("base", "new")
    )
    means = [line for line in result.output.splitlines() if line.startswith("mean over seeds")]
    assert len(means) == 3 and means[0].startswith("mean over seeds: oxford_pets, CoOp (random weights), 1 shot, base")
    setting = "oxford_pets, CoOp (random weights), 1 shot, tiny"
    h = harmonic_mean(base, new)
    assert means[2] == f"mean over seeds: {setting}: base {base:.2f}%, new {new:.2f}%, H of the means {h:.2f}%"


def test_a_later_prompt_without_weights_is_refused_before_any_record(tmp_path, pets_root):
    good = _prompt(tmp_path, weights_id="random-seed0")
    (tmp_path / "other").mkdir()
    unnamed = _prompt(tmp_path / "other")  # records no weights
    out = tmp_path / "evals.jsonl"
    args = ["eval", str(good), str(unnamed), "--root", str(pets_root), "--out", str(out)]
    fails_with_one_line(args, "does not record its weights")
    assert not out.exists()

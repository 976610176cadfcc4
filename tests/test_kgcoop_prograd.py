"""KgCoOp and ProGrad (issue 23): their terms against plain references written from their published
definitions, ProGrad's zero-padded init, their users' Dassl files (as KgCoOp and ProGrad save them)
evaluated and swept with their identity read from output-tree paths, their presets trained, and bad
input refused in one line."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from collections import OrderedDict

import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

from nemesis.constants import RUN_METRICS, RUN_PROMPT
from nemesis.data.templates import init_phrase
from nemesis.data.testing import make_coop_folder
from nemesis.files.checkpoint import load_checkpoint, load_prompt
from nemesis.methods import preset
from nemesis.methods.protocol import build_learner
from nemesis.penalties import penalty_label
from nemesis.penalties.base import TrainingStep
from nemesis.penalties.kgcoop import kgcoop_term
from nemesis.penalties.prograd import prograd_term
from nemesis.training.configs import TrainConfig, read_run_config
from nemesis.training.trainer import train
from nemesis_cli.main import app

from .conftest import cached_backbone, fails_with_one_line
from .test_cocoop_checkpoint import save_as_dassl
from .test_trainer import CLASSNAMES, pets, small_config  # noqa: F401  (pets: the data fixture)

PETS_TEMPLATE_WORDS = "a type of pet, a photo of a"  # ProGrad's OxfordPets template before the class name
KGCOOP_PETS_TEMPLATE = "a photo of a {}, a type of pet."
BATCH = 6


def _config(name: str, model: str, **options) -> TrainConfig:
    return TrainConfig(dataset="oxford_pets", model=model, pretrained=None, device="cpu", **(preset(name) | options))


@functools.cache
def _double(model: str):
    """The model's text side in float64: the terms and their references then agree far below 1e-6 (in fp32
    the gradients' rounding alone is a few 1e-6: they sum class terms that nearly cancel)."""
    backbone = cached_backbone(model)
    text_side = copy.deepcopy(backbone.model)
    text_side.visual = torch.nn.Identity()  # the terms read image features, never pixels
    return dataclasses.replace(backbone, model=text_side.double())


def _learner(config: TrainConfig, backbone):
    options = dataclasses.asdict(config.prompt_config())
    return build_learner("coop", backbone, CLASSNAMES, **options, seed=config.seed).double()


def _images(backbone, seed: int = 0) -> torch.Tensor:
    width = backbone.model.text_projection.shape[-1]
    return torch.randn(BATCH, width, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)  # [B, D]


def _reference_text(backbone, template: str) -> list[torch.Tensor]:
    """open_clip's encode_text of the template for each class, one prompt at a time."""
    with torch.no_grad():
        return [backbone.model.encode_text(backbone.tokenizer([template.format(name)]))[0] for name in CLASSNAMES]


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def _softmax(row: list[torch.Tensor]) -> list[torch.Tensor]:
    total = sum(value.exp() for value in row)
    return [value.exp() / total for value in row]


def _step(learner, images, labels, logits, text_features=None) -> TrainingStep:
    return TrainingStep(
        learner, images, labels, epoch=0, epochs=1, count_correct=None, random=lambda purpose: torch.Generator(),
        logits=logits, text_features=text_features,
    )  # fmt: skip


# --- the terms against their definitions -------------------------------------------------------------------


@pytest.mark.parametrize("model", ["tiny", "ViT-B-32"])
def test_kgcoop_loss_equals_its_definition(model):
    """L = CE + w * (1 - mean_c cos(t_c, t_c^hand)), t^hand from KgCoOp's OxfordPets template."""
    backbone = _double(model)
    config = _config("kgcoop", model, penalty_options={"kgcoop_weight": "3.5"})
    learner = _learner(config, backbone)
    assert learner.n_ctx == 4 and learner.ctx_init == "a photo of a"  # KgCoOp's forced init
    images, labels = _images(backbone), torch.arange(BATCH) % len(CLASSNAMES)
    logits, text = learner.logits_and_text_features(images)
    torch.testing.assert_close(logits, learner.logits(images), rtol=0, atol=0)  # one pass serves both
    part = kgcoop_term(config, learner).loss(_step(learner, images, labels, logits, text))

    hand = _reference_text(backbone, KGCOOP_PETS_TEMPLATE)
    cosines = [_cosine(text[c].detach(), hand[c]) for c in range(len(CLASSNAMES))]
    expected = 3.5 * (1 - sum(cosines) / len(CLASSNAMES))
    assert abs(float(part.value.detach()) - float(expected)) <= 1e-6
    assert float(expected) > 1e-3  # the prompt is not the hand-crafted one: the check has teeth
    assert part.value.requires_grad  # a part of the loss, with gradients to ctx


def _reference_prograd_gradient(learner, backbone, images, labels, strength, temperature):
    """ProGrad's update from its definition, sample by sample: CE = mean_b -log q_b,y and KL = T^2 mean_b
    sum_c -p_bc log q'_bc, q = softmax(z), p = softmax(teacher / T), q' = softmax(z / T), the teacher zero-shot
    CLIP on ProGrad's template; g = grad CE, u = grad KL / ||grad KL||; the update is g - lambda (g . u) u when
    g . u < 0. Returns it, g, whether they conflict, and KL's value."""
    hand = _reference_text(backbone, PETS_TEMPLATE_WORDS + " {}.")
    scale = backbone.model.logit_scale.exp()
    logits = learner.logits(images)  # [B, n_cls], with the graph to ctx
    n_classes = len(CLASSNAMES)
    cross_entropy, kl = 0.0, 0.0
    for b in range(BATCH):
        row = [logits[b, c] for c in range(n_classes)]
        teacher = [scale * _cosine(images[b], hand[c]) for c in range(n_classes)]
        cross_entropy = cross_entropy - _softmax(row)[int(labels[b])].log() / BATCH
        targets = _softmax([value / temperature for value in teacher])
        predicted = _softmax([value / temperature for value in row])
        kl = kl - sum(targets[c] * predicted[c].log() for c in range(n_classes)) * temperature**2 / BATCH
    (g,) = torch.autograd.grad(cross_entropy, [learner.ctx], retain_graph=True)
    (k,) = torch.autograd.grad(kl, [learner.ctx])
    unit = k / k.norm()
    along = (g * unit).sum()
    return (g - strength * along * unit if along < 0 else g), g, bool(along < 0), float(kl.detach())


@pytest.mark.parametrize(("model", "strength", "temperature"), [("tiny", 1.0, 1.0), ("ViT-B-32", 0.8, 2.0)])
def test_prograd_projected_gradient_equals_its_definition(model, strength, temperature):
    backbone = _double(model)
    options = {"prograd_lambda": strength, "prograd_temperature": temperature}
    config = _config("prograd", model, penalty_options=options)
    learner = _learner(config, backbone)
    images = _images(backbone, seed=1)
    term = prograd_term(config, learner)
    with torch.no_grad():  # labels the teacher finds least likely: the two gradients conflict
        labels = term.teacher_logits(learner, images).argmin(dim=-1)

    logits = learner.logits(images)
    part = term.loss(_step(learner, images, labels, logits))
    assert float(part.value) == 0.0  # the distillation term only gives a direction
    torch.nn.functional.cross_entropy(logits, labels).backward()
    term.after_backward(learner)
    projected = learner.ctx.grad.detach().clone()

    learner.ctx.grad = None
    reference = _reference_prograd_gradient(learner, backbone, images, labels, strength, temperature)
    expected, plain, conflict, kl = reference
    assert conflict and (expected - plain).abs().max() > 1e-4  # the projection acted, far above the bound
    assert (projected - expected).abs().max() <= 1e-6
    assert abs(part.logs["prograd_kl"] - kl) <= 1e-6 * max(1.0, abs(kl))


def test_prograd_leaves_an_agreeing_gradient_alone():
    backbone = _double("tiny")
    config = _config("prograd", "tiny")
    learner = _learner(config, backbone)
    images = _images(backbone, seed=2)
    term = prograd_term(config, learner)
    with torch.no_grad():
        labels = term.teacher_logits(learner, images).argmax(dim=-1)  # the teacher's own answers
    logits = learner.logits(images)
    term.loss(_step(learner, images, labels, logits))
    torch.nn.functional.cross_entropy(logits, labels).backward()
    plain = learner.ctx.grad.detach().clone()
    term.after_backward(learner)
    _, _, conflict, _ = _reference_prograd_gradient(learner, backbone, images, labels, 1.0, 1.0)
    assert not conflict and torch.equal(learner.ctx.grad, plain)


@pytest.mark.parametrize("model", ["tiny", "ViT-B-32"])
def test_prograd_starts_its_first_vectors_at_zero(model):
    backbone = _double(model)
    learner = _learner(_config("prograd", model), backbone)
    words = len(PETS_TEMPLATE_WORDS.split())  # 8 of ProGrad's 16 vectors hold the template's words
    norms = learner.ctx.detach().norm(dim=-1)
    assert learner.n_ctx == 16 and torch.all(norms[: 16 - words] == 0) and torch.all(norms[16 - words :] > 0)
    tokens = backbone.tokenizer.encode(PETS_TEMPLATE_WORDS)  # 9 tokens: "pet," is two
    weight = backbone.model.token_embedding.weight.detach()
    assert torch.equal(learner.ctx.detach()[16 - words :], weight[tokens[:words]])
    assert learner.frozen_init_tokens == tokens[words:]  # the last "a" stays in the prompt, after ctx


def test_kgcoop_and_prograd_take_the_datasets_templates():
    assert init_phrase("oxford_pets") == PETS_TEMPLATE_WORDS and init_phrase("dtd") == "a texture of"
    assert _config("prograd", "tiny").prompt_config().ctx_init == PETS_TEMPLATE_WORDS
    fmnist = TrainConfig(dataset="fashion_mnist", **preset("prograd"))
    assert fmnist.ctx_init == "a photo of a" and fmnist.resolved().epochs == 200  # CoOp's epochs for 16 shots
    kgcoop = TrainConfig(dataset="dtd", **preset("kgcoop"))
    assert (kgcoop.batch_size, kgcoop.resolved().epochs) == (128, 100)  # KgCoOp's configs, whatever the shots
    assert TrainConfig(dataset="dtd", **preset("kgcoop"), epochs=3, batch_size=8).resolved().epochs == 3


# --- training ---------------------------------------------------------------------------------------------


def _one_step(root, out, **options):
    config = small_config(root, epochs=1, batch_size=16, warmup_epochs=0, **options)
    train(config, out, progress=False)
    rows = [json.loads(line) for line in (out / RUN_METRICS).read_text().splitlines()]
    return load_prompt(out / RUN_PROMPT), [row for row in rows if row["kind"] == "step"]


def test_kgcoop_step_adds_the_gradient_of_its_distance(pets, tmp_path):  # noqa: F811
    """One SGD step from the same start with and without the term: they differ by lr * w * grad of the
    distance at the start (momentum's first buffer is the gradient; weight decay is the same in both): the
    trainer hands the term the text features of the step's own pass."""
    weight = 1000.0  # large, so the term's share stands far above float rounding
    init = {"ctx_init": "a photo of a", "n_ctx": None}
    plain, _ = _one_step(pets, tmp_path / "plain", **init)
    kg, steps = _one_step(pets, tmp_path / "kg", **preset("kgcoop"), n_ctx=None,
                          penalty_options={"kgcoop_weight": weight})  # fmt: skip
    backbone = cached_backbone("tiny")
    learner = build_learner("coop", backbone, CLASSNAMES, ctx_init="a photo of a")
    text = learner.text_features()
    hand = _reference_text(backbone, KGCOOP_PETS_TEMPLATE)
    distance = 1 - sum(_cosine(text[c], hand[c]) for c in range(len(CLASSNAMES))) / len(CLASSNAMES)
    (gradient,) = torch.autograd.grad(weight * distance, [learner.ctx])
    # In fp32, through the text tower the two gradients round apart by a few 1e-6 of their size.
    torch.testing.assert_close(kg.ctx - plain.ctx, -steps[0]["lr"] * gradient, rtol=1e-3, atol=1e-6)
    assert (kg.ctx - plain.ctx).abs().max() > 1e-3
    assert steps[0]["kgcoop_loss"] == pytest.approx(weight * float(distance.detach()), rel=1e-5)
    assert kg.metadata.penalty == "kgcoop" and kg.metadata.penalty_config == {
        "kgcoop_weight": weight,
        "kgcoop_template": KGCOOP_PETS_TEMPLATE,
    }


def test_prograd_without_projection_is_coop_with_its_init(pets, tmp_path):  # noqa: F811
    """lambda 0 removes nothing, and the distillation term adds nothing to the loss: CoOp's step exactly."""
    init = {"ctx_init": PETS_TEMPLATE_WORDS, "n_ctx": 16, "method_options": {"pad_init": True}}
    plain, _ = _one_step(pets, tmp_path / "plain", **init)
    off, steps = _one_step(pets, tmp_path / "off", **preset("prograd"), n_ctx=16, penalty_options={"prograd_lambda": 0})
    assert torch.equal(off.ctx, plain.ctx) and steps[0]["prograd_kl"] > 0
    assert off.metadata.prompt_config["pad_init"] and off.metadata.penalty_config["prograd_lambda"] == 0


def test_every_preset_trains_in_a_grid_and_resumes(pets, tmp_path):  # noqa: F811
    names = "kgcoop,kgcoop-nemesis,prograd,prograd-nemesis"
    args = ["train", "--dataset", "oxford_pets", "--root", str(pets), "--shots", "4", "--seed", "2", "--model", "tiny",
            "--pretrained", "none", "--epochs", "2", "--batch-size", "8", "--lr", "0.05", "--device", "cpu",
            "--method", names, "--out", str(tmp_path / "grid")]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    expected = {"kgcoop": ("kgcoop", 4), "kgcoop-nemesis": ("kgcoop+nemesis", 4),
                "prograd": ("prograd", 16), "prograd-nemesis": ("prograd+nemesis", 16)}  # fmt: skip
    for name, (penalty, n_ctx) in expected.items():
        (run,) = (tmp_path / "grid" / "oxford_pets" / name).glob("tiny_4shots/*/seed2")
        prompt = load_checkpoint(run)
        assert (prompt.prompt_method, prompt.metadata.penalty, prompt.ctx.shape[0]) == ("coop", penalty, n_ctx)
        assert torch.isfinite(prompt.ctx).all() and read_run_config(run).epochs == 2
        if name.startswith("prograd"):
            assert run.parent.name == "nctx16_cscFalse_ctpend_init-a_type_of_pet_a_photo_of_a_padded"
    assert penalty_label("prograd+nemesis") == "+ProGrad+Nemesis"
    again = CliRunner().invoke(app, [*args[:-4], "--epochs", "3", "--method", names, "--out", str(tmp_path / "grid")])
    assert again.exit_code == 0, again.output  # each run continues to 3 epochs
    for name in expected:
        (run,) = (tmp_path / "grid" / "oxford_pets" / name).glob("tiny_4shots/*/seed2")
        assert load_checkpoint(run).metadata.epoch == 3


# --- their users' Dassl files --------------------------------------------------------------------------------


class _KgCoOpPromptLearner(torch.nn.Module):
    """The parameters and buffers of KgCoOp's PromptLearner, with its names: ctx from "a photo of a", the
    unused `bias_vectors` [1, 512] and `meta_net` (Linear(512, 512), ReLU), the token buffers."""

    def __init__(self, backbone, n_cls: int) -> None:
        super().__init__()
        embedding = backbone.model.token_embedding(backbone.tokenizer(["a photo of a"]))[0].detach()
        width = embedding.shape[-1]
        self.ctx = torch.nn.Parameter(embedding[1:5].clone())
        self.bias_vectors = torch.nn.Parameter(torch.randn(1, 512) * 0.02)
        self.meta_net = torch.nn.Sequential(
            OrderedDict([("linear1", torch.nn.Linear(512, 512)), ("relu", torch.nn.ReLU(inplace=True))])
        )
        self.register_buffer("token_prefix", torch.randn(n_cls, 1, width))
        self.register_buffer("token_suffix", torch.randn(n_cls, 77 - 1 - 4, width))


class _ProGradPromptLearner(torch.nn.Module):
    """ProGrad's PromptLearner: ctx [16, W], zeros then the dataset's template words; the token buffers."""

    def __init__(self, backbone, n_cls: int) -> None:
        super().__init__()
        learner = build_learner("coop", backbone, CLASSNAMES, n_ctx=16, ctx_init=PETS_TEMPLATE_WORDS, pad_init=True)
        self.ctx = torch.nn.Parameter(learner.ctx.detach() + 0.01)  # trained a little
        width = learner.ctx.shape[-1]
        self.register_buffer("token_prefix", torch.randn(n_cls, 1, width))
        self.register_buffer("token_suffix", torch.randn(n_cls, 77 - 1 - 16, width))


@pytest.fixture
def official(tmp_path):
    """A KgCoOp base-to-new tree (its scripts' `shots_<K>_<w>` folder) and a ProGrad few-shot tree."""
    backbone = cached_backbone("tiny")
    kgcoop = tmp_path / "output/base2new/train_base/oxford_pets/shots_4_8.0/KgCoOp/vit_b16_ep100_ctxv1/seed1"
    prograd = tmp_path / "output/oxford_pets/ProGrad/rn50_4shots/nctx16_cscFalse_ctpend/seed2"
    # under PREC fp16 (both trainers' default), fp16 tensors
    kgcoop_file, kgcoop_learner = save_as_dassl(kgcoop, _KgCoOpPromptLearner(backbone, 2).half(), 100)
    prograd_file, prograd_learner = save_as_dassl(prograd, _ProGradPromptLearner(backbone, 4).half(), 100)
    kgcoop_state, prograd_state = kgcoop_learner.state_dict(), prograd_learner.state_dict()
    assert set(kgcoop_state) == {"ctx", "bias_vectors", "token_prefix", "token_suffix",
                                 "meta_net.linear1.weight", "meta_net.linear1.bias"}  # fmt: skip
    return {"kgcoop": (kgcoop, kgcoop_file, kgcoop_state), "prograd": (prograd, prograd_file, prograd_state)}


def test_official_files_read_with_their_identity(official, tmp_path):
    kgcoop_run, kgcoop_file, kgcoop_state = official["kgcoop"]
    for where in (kgcoop_run, kgcoop_file.parent, kgcoop_file):
        prompt = load_checkpoint(where)
        assert (prompt.prompt_method, prompt.metadata.penalty, prompt.extra) == ("coop", "kgcoop", {})
        assert (prompt.metadata.dataset, prompt.metadata.shots, prompt.metadata.seed) == ("oxford_pets", 4, 1)
        assert prompt.metadata.subsample == "base" and prompt.metadata.epoch == 100
        assert torch.equal(prompt.ctx, kgcoop_state["ctx"].float())
    prograd_run, _, prograd_state = official["prograd"]
    prompt = load_checkpoint(prograd_run)
    assert (prompt.prompt_method, prompt.metadata.penalty, prompt.metadata.shots) == ("coop", "prograd", 4)
    assert prompt.config.pad_init and prompt.config.ctx_init == PETS_TEMPLATE_WORDS  # its prompt's frozen "a"
    assert torch.equal(prompt.ctx, prograd_state["ctx"].float())

    loose = tmp_path / "loose"  # outside a tree, KgCoOp's own key tells its files
    loose.mkdir()
    (loose / "model.pth.tar-5").write_bytes(kgcoop_file.read_bytes())
    prompt = load_checkpoint(loose / "model.pth.tar-5")
    assert (prompt.prompt_method, prompt.metadata.penalty, prompt.metadata.dataset) == ("coop", "kgcoop", None)


def test_official_files_evaluate_and_sweep(official, tmp_path):
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(1, 1, 3), image_size=28)
    common = ["--model", "tiny", "--pretrained", "none", "--root", str(root), "--device", "cpu"]
    for name, (run, _, _) in official.items():
        result = CliRunner().invoke(app, ["eval", str(run), *common, "--out", str(tmp_path / f"{name}.jsonl")])
        assert result.exit_code == 0, result.output
        record = json.loads((tmp_path / f"{name}.jsonl").read_text())
        assert (record["method"], record["penalty"], record["dataset"]) == ("coop", name, "oxford_pets")
        expected_n = 6 if name == "kgcoop" else 12  # base-to-new: 2 base classes of 4
        assert record["n"] == expected_n
    table = tmp_path / "sweep.parquet"
    args = ["corrupt", str(tmp_path / "output"), *common, "--rescale", "0.5", "--replace", "0", "--out", str(table)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    frame = pd.read_parquet(table)
    assert set(zip(frame.method, frame.penalty, strict=True)) == {("coop", "kgcoop"), ("coop", "prograd")}
    assert len(frame) == (1 + 2 * 4) + (1 + 2 * 16)  # the original and two cells per position of each prompt


# --- bad input ---------------------------------------------------------------------------------------------


def test_bad_penalty_input_is_one_line(pets):  # noqa: F811
    common = ["train", "--dataset", "oxford_pets", "--root", str(pets), "--model", "tiny", "--pretrained", "none",
              "--device", "cpu", "--out", "never"]  # fmt: skip
    fails_with_one_line([*common, "--method", "kgcoop", "--penalty-option", "w=8"], "penalty kgcoop has no option 'w'")
    fails_with_one_line([*common, "--method", "coop", "--penalty-option", "kgcoop_weight=8"], "has no option")
    fails_with_one_line([*common, "--method", "kgcoop", "--penalty-option", "kgcoop_weight"], "is not NAME=VALUE")
    fails_with_one_line([*common, "--method", "kgcoop", "--penalty-option", "kgcoop_weight=x"], "must be float")
    fails_with_one_line([*common, "--method", "kgcoop", "--penalty-option", "kgcoop_weight=-1"], "0 or more")
    fails_with_one_line([*common, "--method", "prograd", "--penalty-option", "prograd_temperature=0"], "above 0")
    fails_with_one_line([*common, "--method", "cocoop+kgcoop"], "penalty kgcoop runs on coop only, not on cocoop")
    fails_with_one_line([*common, "--method", "plot+prograd"], "penalty prograd runs on coop only, not on plot")
    fails_with_one_line([*common, "--method", "prograd", "--n-ctx", "4"], "more than the 4 context vectors")
    fails_with_one_line([*common, "--method", "kgcoop", "--ctx-init", "a photo"], "use --method coop+kgcoop")
    fails_with_one_line(
        [*common, "--method", "prograd", "--method-option", "pad_init=false"], "--method-option pad_init=false"
    )

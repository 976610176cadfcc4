"""One conformance suite over every registered prompt method (issue 19, item 6).

Each check runs for every name in `nemesis.methods.METHODS`, so a newly registered method gets it
by registering, and for two methods defined and registered only here, with one call each:
`coop-shift` (CoOp with a second learned tensor) and `coop-mean2` (two prompts [2, M, W] per class,
averaged: PLOT's ctx shape). The last test runs both through every command of the CLI.
"""

from __future__ import annotations

import dataclasses
import json

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from typer.testing import CliRunner

from analysis.report import make_report
from corrupt.grid import ORIGINAL_CELL, parse_grid
from nemesis.checksum import tensors_sha256
from nemesis.constants import LOCAL_FEATURES, PATCH_TOKENS
from nemesis.data.datasets import load_dataset
from nemesis.data.feature_cache import encode_split
from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import prepare_evaluation, resolve_target
from nemesis.files.checkpoint import PromptMetadata, load_checkpoint, load_prompt, save_prompt, shape_fits
from nemesis.methods import METHODS, MethodSpec, register_method
from nemesis.methods.cocoop.learner import embed_dim_of
from nemesis.methods.coop import CoOpConfig, checked_text_options
from nemesis.methods.coop.learner import PromptedCLIP, PromptLearner
from nemesis.methods.protocol import CorruptionSite, PromptMethod, build_learner, planned_sites
from nemesis.model.backbone import load_clip
from nemesis.model.clip_models import text_width, vision_width
from nemesis.penalties.losses import position_norms
from nemesis.training.configs import TrainConfig
from nemesis.unpickle import load_torch_file
from nemesis_cli.main import app

from .conftest import cached_backbone, fails_with_one_line
from .test_sweep import _backbones, _sweep
from .test_trainer import CLASSNAMES, small_config, train_leaving_the_backbone_unchanged

N_CTX = 4
REGISTERED = list(METHODS)  # at collection: every method the toolkit registers


# --- a method defined only here ------------------------------------------------------------------


class ShiftedCoOp(PromptLearner):
    """CoOp with a second learned tensor: one shift [W] added to every context vector."""

    method = "coop-shift"

    def __init__(self, clip, classnames, shift: torch.Tensor | None = None, **options) -> None:
        super().__init__(clip, classnames, **options)  # CoOp's options
        width = self.ctx.shape[-1]
        self.shift = torch.nn.Parameter(torch.zeros(width, device=self.ctx.device) if shift is None else shift.clone())

    def extra_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {"shift": self.shift}

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        text = self.encode((self.ctx + self.shift).unsqueeze(0))[0]  # [n_cls, D]
        return PromptedCLIP(self).logits(image_features, text)

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor:
        return super().similarities(image_features, ctx_variants + self.shift)

    def for_classnames(self, classnames: list[str]) -> ShiftedCoOp:
        other = super().for_classnames(classnames)  # CoOp's learner with the same ctx and options
        options = dict(class_specific=self.class_specific, class_position=self.class_position, ctx_init=self.ctx_init)
        return ShiftedCoOp(self.clip, classnames, ctx=other.ctx.detach(), shift=self.shift.detach(), **options)


class AveragedCoOp(nn.Module):
    """Two unified prompts [2, M, W] for every class, their text features averaged (PLOT's ctx shape)."""

    method = "coop-mean2"
    image_inputs = ("pooled",)

    def __init__(self, clip, classnames, n_ctx: int = 16, seed: int = 0, ctx: torch.Tensor | None = None, **options):
        super().__init__()
        n_ctx = n_ctx if ctx is None else ctx.shape[-2]
        self.prompts = PromptLearner(clip, classnames, n_ctx=n_ctx, seed=seed, **options)  # the layout and text pass
        if ctx is None:
            shape = (2, *self.prompts.ctx.shape)
            ctx = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02
        if ctx.dim() != 3 or ctx.shape[0] != 2:
            raise NemesisError(f"{self.method} learns ctx [2, M, W], not {tuple(ctx.shape)}")
        self.prompts.ctx.requires_grad_(False)  # unused: ctx below is what is learned
        self.ctx = nn.Parameter(ctx.detach().float().clone().to(self.prompts.ctx.device))
        self.clip = clip

    n_ctx = property(lambda self: self.prompts.n_ctx)
    n_classes = property(lambda self: self.prompts.n_classes)
    classnames = property(lambda self: self.prompts.classnames)
    class_specific = property(lambda self: False)
    class_position = property(lambda self: self.prompts.class_position)

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        return {}

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor:
        n_variants, _, n_ctx, width = ctx_variants.shape  # [K, 2, M, W]
        text = self.prompts.encode(ctx_variants.reshape(n_variants * 2, n_ctx, width))  # [2K, n_cls, D]
        text = F.normalize(text.float(), dim=-1).reshape(n_variants, 2, self.n_classes, -1).mean(1)  # [K, n_cls, D]
        images = F.normalize(image_features.float(), dim=-1)  # [B, D]
        return images @ F.normalize(text, dim=-1).transpose(1, 2)  # [K, B, n_cls]

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        scale = self.clip.model.logit_scale.exp().float()
        return scale * self.similarities(image_features, self.ctx.unsqueeze(0))[0]

    def for_classnames(self, classnames: list[str]) -> AveragedCoOp:
        options = dict(class_position=self.class_position, ctx_init=self.prompts.ctx_init)
        return AveragedCoOp(self.clip, classnames, ctx=self.ctx.detach(), **options)

    def norms(self, p: float = 2.0) -> torch.Tensor:
        return position_norms(self.ctx, p)

    def corruption_sites(self) -> list[CorruptionSite]:
        return self.corruption_sites_for(tuple(self.ctx.shape))

    @classmethod
    def corruption_sites_for(cls, ctx_shape: tuple[int, ...]) -> list[CorruptionSite]:
        """Position j of prompt n (ctx[n]), and position j of every prompt at once (all of ctx)."""
        prompts = [CorruptionSite(f"prompt {n}", index=(n,)) for n in range(ctx_shape[0])]
        return [*prompts, CorruptionSite("every prompt")]


@dataclasses.dataclass
class ShiftConfig(CoOpConfig):
    """CoOp's options; the tensors are CoOp's and the shift."""

    def tensor_shapes(self, embed_dim, text_width, n_classes, vision_width=None) -> dict[str, tuple]:
        return super().tensor_shapes(embed_dim, text_width, n_classes) | {"shift": (text_width,)}


@dataclasses.dataclass
class AveragedConfig:
    """Two prompts of n_ctx vectors; no class-specific variant."""

    n_ctx: int = 16
    ctx_init: str | None = None
    class_position: str = "end"

    def __post_init__(self) -> None:
        checked_text_options(self)

    def tensor_shapes(self, embed_dim, text_width, n_classes, vision_width=None) -> dict[str, tuple]:
        return {"ctx": (2, self.n_ctx, text_width)}

    @classmethod
    def from_dassl(cls, ctx_shape, class_position) -> AveragedConfig:
        return cls(n_ctx=ctx_shape[-2], class_position=class_position or "end")


SPECS = {
    ShiftedCoOp.method: MethodSpec(
        ShiftedCoOp.method, "CoOp+Shift", ShiftedCoOp, ShiftConfig, dassl_trainers=("CoOpShift",)
    ),
    AveragedCoOp.method: MethodSpec(
        AveragedCoOp.method, "CoOp, 2 prompts", AveragedCoOp, AveragedConfig, dassl_trainers=("CoOpMean2",)
    ),
}
TEST_METHODS = list(SPECS)
SHIFT, MEAN2 = TEST_METHODS


@pytest.fixture(autouse=True)
def _registered():
    """Registering a method: one call each (undone after each test)."""
    for spec in SPECS.values():
        register_method(spec)
    yield
    for name in SPECS:
        del METHODS[name]


def label(name: str) -> str:
    """The label the method declares: tables and legends show it."""
    return METHODS[name].label


def methods() -> list[str]:
    """Every registered method, then the methods defined here."""
    return [*REGISTERED, *TEST_METHODS]


# --- shared pieces -------------------------------------------------------------------------------


def _learner(name: str, seed: int = 0) -> PromptMethod:
    """A learner of `name` on tiny whose every learned tensor is random (so round trips are not trivial)."""
    learner = build_learner(name, cached_backbone("tiny"), CLASSNAMES, n_ctx=N_CTX, seed=seed)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in learner.extra_parameters().values():
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return learner


def _saved(learner: PromptMethod, path) -> PromptMetadata:
    """Save the learner's tensors with its method named; return what the file must then record: the
    method's options as its tensors say them, and the text width."""
    metadata = PromptMetadata(
        model="tiny", dataset="oxford_pets", shots=2, seed=1, prompt_method=learner.method, epoch=1
    )
    save_prompt(path, learner.ctx.detach(), metadata, learner.extra_parameters())
    options = dataclasses.asdict(METHODS[learner.method].options(n_ctx=N_CTX))
    return dataclasses.replace(metadata, prompt_config=options, text_width=learner.ctx.shape[-1])


def _features(learner: PromptMethod, n: int = 5, seed: int = 0) -> torch.Tensor:
    """Random image features of the kind the learner takes: pooled [B, D], local [B, T, D] (T = tiny's 17), or
    patch embeddings [B, T, W] (W: tiny's image-tower width)."""
    width = embed_dim_of(cached_backbone("tiny"))
    if PATCH_TOKENS in learner.image_inputs:
        return torch.randn(n, 17, vision_width("tiny"), generator=torch.Generator().manual_seed(seed))
    shape = (n, 17, width) if LOCAL_FEATURES in learner.image_inputs else (n, width)
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _clip_checksum(backbone) -> str:
    return tensors_sha256(backbone.model.state_dict())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(2, 1, 2), image_size=28)
    return root


@pytest.fixture(scope="module")
def runs() -> dict:
    """Method -> (its one-epoch run folder, the backbone it trained on): each method is trained once."""
    return {}


def _train_once(name: str, runs: dict, data_root, tmp_path_factory, monkeypatch):
    """One epoch on tiny (random weights, 4 classes x 2 shots), leaving the CLIP weights unchanged (I5).
    A method that is not trained here (PromptSRC): the refusal is checked and the test ends."""
    if not METHODS[name].trains:
        with pytest.raises(NemesisError, match="is not offered"):
            small_config(data_root, prompt_method=name, shots=2, epochs=1, batch_size=4, n_ctx=N_CTX)
        pytest.skip(f"{name} is read and evaluated, not trained; its refusal to train was checked")
    if name not in runs:
        config = small_config(data_root, prompt_method=name, shots=2, epochs=1, batch_size=4, n_ctx=N_CTX)
        out = tmp_path_factory.mktemp(f"run-{name}")
        runs[name] = (out, train_leaving_the_backbone_unchanged(config, out, monkeypatch))
    return runs[name]


# --- the checks ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", methods())
def test_learner_satisfies_the_protocol(name):
    learner = _learner(name)
    assert isinstance(learner, PromptMethod)
    assert learner.method == name and METHODS[name].learner_class() is type(learner)
    assert (learner.n_ctx, learner.n_classes, learner.classnames) == (N_CTX, len(CLASSNAMES), CLASSNAMES)
    assert learner.norms().shape == (N_CTX,)
    tiny = cached_backbone("tiny")
    spec = METHODS[name]
    widths = dict(text_width=text_width("tiny"), vision_width=vision_width("tiny"))
    shapes = spec.tensor_shapes(spec.options(n_ctx=N_CTX), embed_dim_of(tiny), n_classes=len(CLASSNAMES), **widths)
    learned = {"ctx": learner.ctx, **learner.extra_parameters()}
    assert set(learned) == set(shapes)  # None in a declared shape: any size (a prompt stack's depth)
    assert all(shape_fits(learned[key].shape, shapes[key]) for key in shapes), (learned, shapes)
    other = learner.for_classnames(["a", "b"])
    assert type(other) is type(learner) and other.n_classes == 2 and torch.equal(other.ctx, learner.ctx)
    extra = learner.extra_parameters()
    assert all(torch.equal(other.extra_parameters()[key], extra[key]) for key in extra)


# The corruption sites each method declares (names as sweep tables show them).
SITE_NAMES = {"coop": [""], "cocoop": [""], SHIFT: [""], MEAN2: ["prompt 0", "prompt 1", "every prompt"]}


@pytest.mark.parametrize("name", methods())
def test_corruption_sites_are_declared_and_fit_the_ctx(name):
    learner = _learner(name)
    sites = learner.corruption_sites()
    learned = {"ctx": learner.ctx, **learner.extra_parameters()}
    # What sweeps plan with before a learner is built, from the checkpoint's tensor shapes alone.
    assert sites == planned_sites(type(learner), {key: tuple(value.shape) for key, value in learned.items()})
    if name in SITE_NAMES:
        assert [site.name for site in sites] == SITE_NAMES[name]
    assert len({site.name for site in sites}) == len(sites) and all(site.tensor in learned for site in sites)
    for site in sites:
        tensor = learned[site.tensor].detach()
        part = site.part(tensor)  # [..., M, W]: positions on axis -2
        assert part.shape[site.POSITION_AXIS] == learner.n_ctx and part.shape[-1] == tensor.shape[-1]


@pytest.mark.parametrize("name", methods())
def test_prompt_file_round_trip(name, tmp_path):
    learner = _learner(name)
    metadata = _saved(learner, tmp_path / "prompt.safetensors")
    loaded = load_prompt(tmp_path / "prompt.safetensors")
    assert loaded.prompt_method == name
    assert dataclasses.asdict(loaded.metadata) == dataclasses.asdict(metadata)
    assert torch.equal(loaded.ctx, learner.ctx.detach())
    extra = learner.extra_parameters()
    assert set(loaded.extra) == set(extra) and all(torch.equal(loaded.extra[k], extra[k].detach()) for k in extra)
    # Rebuilt from the file, the learner gives the same similarities.
    rebuilt = build_learner(name, cached_backbone("tiny"), CLASSNAMES, ctx=loaded.ctx, extra=loaded.extra)
    features, variants = _features(learner), learner.ctx.detach().unsqueeze(0)
    with torch.no_grad():
        assert torch.equal(rebuilt.similarities(features, variants), learner.similarities(features, variants))


@pytest.mark.parametrize("name", methods())
def test_prompt_interpret_reads_every_vector_of_ctx(name, tmp_path):
    """`nemesis prompt interpret`: a ctx whose every vector row is the embedding of "a photo of a" reads
    back as those words at distance 0, in every class or prompt of the method's layout."""
    learner = _learner(name)
    tiny = cached_backbone("tiny")
    words = tiny.model.token_embedding.weight.detach()[tiny.tokenizer.encode("a photo of a")]  # [N_CTX, W]
    with torch.no_grad():
        learner.ctx.copy_(words.expand_as(learner.ctx))
    _saved(learner, tmp_path / "prompt.safetensors")
    args = ["prompt", "interpret", str(tmp_path / "prompt.safetensors"), "--pretrained", "none", "--json"]
    result = CliRunner().invoke(app, args)
    if METHODS[name].ctx_tower() != "text":  # VPT's image tokens, prefix tuning's keys and values
        assert result.exit_code == 2 and "no vocabulary reads it" in result.output
        return
    assert result.exit_code == 0, result.output
    nearest = [row for row in json.loads(result.stdout) if row["rank"] == 1]
    assert len(nearest) == learner.ctx.numel() // learner.ctx.shape[-1]  # every vector of ctx, once
    assert [row["token"] for row in nearest] == ["a", "photo", "of", "a"] * (len(nearest) // N_CTX)
    assert {row["distance"] for row in nearest} == {0.0}


@pytest.mark.parametrize("name", methods())
def test_dassl_round_trip(name, tmp_path):
    """`nemesis prompt export-dassl`, read back as a Dassl run folder: the same tensors and method. Methods
    whose official trainer saves the whole model get that file (the random tiny towers the prompt was
    trained on, their key layout) in their trainer's folder."""
    learner = _learner(name)
    _saved(learner, tmp_path / "prompt.safetensors")
    out = tmp_path / "dassl" / "oxford_pets" / METHODS[name].dassl_trainers[0] / "seed1"  # the method's tree
    args = ["prompt", "export-dassl", str(tmp_path / "prompt.safetensors"), "--out", str(out), "--pretrained", "none"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    layout = METHODS[name].dassl_layout
    folder = layout.folder if layout is not None else "prompt_learner"
    assert (out / folder / "model.pth.tar-1").is_file()
    if layout is not None:  # the whole model: frozen towers beside the prompt rows
        state = load_torch_file(out / folder / "model.pth.tar-1", tensors=lambda key: False)["state_dict"]
        assert "image_encoder.conv1.weight" in state and "text_encoder.text_projection" in state
        assert "ctx" not in state and layout.stacks[0].first in state
    back = load_checkpoint(out)
    assert back.metadata.source_format == "dassl" and back.prompt_method == name and back.metadata.epoch == 1
    assert torch.equal(back.ctx, learner.ctx.detach())
    extra = learner.extra_parameters()
    assert set(back.extra) == set(extra) and all(torch.equal(back.extra[k], extra[k].detach()) for k in extra)


@pytest.mark.parametrize("name", methods())
def test_a_cell_in_a_batch_equals_the_cell_alone_i4(name):
    learner = _learner(name)
    features = _features(learner)
    generator = torch.Generator().manual_seed(5)
    ctx = learner.ctx.detach()
    variants = torch.stack([ctx, ctx * 0.5, ctx + torch.randn(ctx.shape, generator=generator)])  # [K, ..., M, W]
    with torch.no_grad():
        batched = learner.similarities(features, variants)  # [K, B, n_cls]
        assert batched.shape == (3, len(features), len(CLASSNAMES))
        for index in range(len(variants)):
            alone = learner.similarities(features, variants[index : index + 1])[0]
            torch.testing.assert_close(batched[index], alone, rtol=0, atol=1e-5)  # I1/I2's bound: matmuls batch
            assert torch.equal(batched[index].argmax(-1), alone.argmax(-1))
    assert not torch.allclose(batched[0], batched[2])  # the variants differ, so the check has teeth


@pytest.mark.parametrize("name", methods())
def test_one_epoch_changes_only_the_learned_tensors_i5(name, runs, data_root, tmp_path_factory, monkeypatch):
    out, backbone = _train_once(name, runs, data_root, tmp_path_factory, monkeypatch)  # asserts the CLIP checksum
    assert _clip_checksum(backbone) == _clip_checksum(load_clip("tiny"))  # and by nemesis.checksum
    prompt = load_prompt(out / "prompt.safetensors")
    assert prompt.prompt_method == name and prompt.metadata.epoch == 1
    untrained = build_learner(name, backbone, CLASSNAMES, n_ctx=N_CTX, seed=2)  # the run's seed
    assert not torch.equal(prompt.ctx, untrained.ctx.detach())
    extra = untrained.extra_parameters()
    assert set(prompt.extra) == set(extra)
    assert all(not torch.equal(prompt.extra[k], extra[k].detach()) for k in extra)


def _check_two_cell_sweep(name: str, checkpoint, data_root, out) -> None:
    """A two-cell sweep of `checkpoint` writes the original row and 2 cells at each of the method's
    corruption sites, through the method's own learner."""
    summary = _sweep([checkpoint], out, parse_grid(rescale="0.5,3", positions="0"), data_root)
    table = pd.read_parquet(out)
    shapes = {key: tuple(value.shape) for key, value in load_checkpoint(checkpoint).tensors.items()}
    sites = planned_sites(METHODS[name].learner_class(), shapes)
    assert len(table) == 1 + 2 * len(sites) and summary.computed == len(table)  # the original row once
    assert list(table["op"]).count(ORIGINAL_CELL.op) == 1 and set(table["method"]) == {name}
    corrupted = table[table["op"] != ORIGINAL_CELL.op]
    assert corrupted["site"].value_counts().to_dict() == {site.name: 2 for site in sites}
    towers = corrupted[["site", "tower", "layer"]].drop_duplicates().astype(object).itertuples(index=False)
    declared = {(site.name, site.tower, pd.NA if site.layer is None else site.layer) for site in sites}
    assert {tuple(row) for row in towers} == declared
    target = resolve_target(load_checkpoint(checkpoint), pretrained="none")
    setup = prepare_evaluation(target, root=data_root, device="cpu", backbones=_backbones(), progress=False)
    assert type(setup.learner) is METHODS[name].learner_class()


def _report_label(paths, out) -> str:
    """The method label of the one few-shot row `nemesis report` builds from `paths`."""
    make_report(paths, out)
    few_shot = pd.read_csv(out / "few_shot.csv")
    rows = few_shot[few_shot["dataset"] == "oxford_pets"]
    assert len(rows) == 1, few_shot
    return rows["method"].iloc[0]


@pytest.mark.parametrize("name", methods())
def test_two_cell_sweep_of_the_trained_prompt(name, runs, data_root, tmp_path, tmp_path_factory, monkeypatch):
    out, _ = _train_once(name, runs, data_root, tmp_path_factory, monkeypatch)
    _check_two_cell_sweep(name, out, data_root, tmp_path / "sweep.parquet")


@pytest.mark.parametrize("name", methods())
def test_two_cell_sweep_of_a_saved_prompt(name, data_root, tmp_path):
    """The sweep without the trainer: a prompt file the learner saved."""
    _saved(_learner(name), tmp_path / "prompt.safetensors")
    _check_two_cell_sweep(name, tmp_path / "prompt.safetensors", data_root, tmp_path / "sweep.parquet")


@pytest.mark.parametrize("name", methods())
def test_report_row_of_the_trained_run(name, runs, data_root, tmp_path, tmp_path_factory, monkeypatch):
    out, _ = _train_once(name, runs, data_root, tmp_path_factory, monkeypatch)
    assert _report_label([out], tmp_path / "report") == f"{label(name)} (random weights)"


@pytest.mark.parametrize("name", methods())
def test_report_row_of_an_evaluated_saved_prompt(name, data_root, tmp_path):
    """`nemesis eval --out` of a prompt file the learner saved, then `nemesis report` of that record."""
    _saved(_learner(name), tmp_path / "prompt.safetensors")
    evals = tmp_path / "evals.jsonl"
    args = ["eval", str(tmp_path / "prompt.safetensors"), "--root", str(data_root), "--pretrained", "none"]
    result = CliRunner().invoke(app, [*args, "--device", "cpu", "--out", str(evals)])
    assert result.exit_code == 0, result.output
    assert _report_label([evals], tmp_path / "report") == f"{label(name)} (random weights)"


@pytest.mark.parametrize("name", methods())
def test_eval_saves_the_logits_it_scored(name, data_root, tmp_path):
    """`nemesis eval --save-logits`: logit scale x the learner's similarities on the test split, in its
    order, with its labels; their arg-max gives the accuracy the command reports."""
    from safetensors.torch import load_file

    learner = _learner(name)
    _saved(learner, tmp_path / "prompt.safetensors")
    output = _command("eval", tmp_path / "prompt.safetensors", "--root", data_root, "--pretrained", "none",
                      "--device", "cpu", "--save-logits", tmp_path / "logits.safetensors")  # fmt: skip
    saved = load_file(tmp_path / "logits.safetensors")
    data = load_dataset("oxford_pets", data_root)
    features, labels = encode_split(learner.clip, data, "test", inputs=learner.image_inputs[0], progress=False)
    with torch.no_grad():
        expected = learner.clip.model.logit_scale.exp() * learner.similarities(features, learner.ctx[None])[0]
    assert saved["logits"].shape == (len(data.test), len(CLASSNAMES)) and saved["logits"].dtype == torch.float32
    torch.testing.assert_close(saved["logits"], expected, rtol=0, atol=1e-4)
    assert torch.equal(saved["labels"], labels)
    accuracy = 100.0 * float((saved["logits"].argmax(-1) == saved["labels"]).float().mean())
    assert f"accuracy: {accuracy:.1f}%" in output


def _command(*args) -> str:
    result = CliRunner().invoke(app, [str(argument) for argument in args])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.parametrize("name", TEST_METHODS)
def test_every_command_runs_a_method_defined_here(name, data_root, tmp_path):
    """Registered in this module only: `nemesis train`, `eval`, `corrupt`, `report`, `prompt info` and
    `prompt interpret` take it."""
    run, evals, sweep = tmp_path / "run", tmp_path / "evals.jsonl", tmp_path / "sweep.parquet"
    _command(
        "train", "--method", name, "--dataset", "oxford_pets", "--root", data_root, "--model", "tiny",
        "--pretrained", "none", "--shots", 2, "--epochs", 1, "--batch-size", 4, "--n-ctx", N_CTX,
        "--device", "cpu", "--out", run,
    )  # fmt: skip
    assert load_prompt(run / "prompt.safetensors").prompt_method == name
    _command("eval", run, "--root", data_root, "--device", "cpu", "--out", evals)
    assert json.loads(evals.read_text().splitlines()[0])["method"] == name
    _command("corrupt", run, "--root", data_root, "--rescale", "0.5,3", "--positions", "0", "--device", "cpu",
             "--out", sweep)  # fmt: skip
    table = pd.read_parquet(sweep)
    sites = METHODS[name].learner_class().corruption_sites_for(tuple(load_prompt(run / "prompt.safetensors").ctx.shape))
    assert len(table) == 1 + 2 * len(sites) and set(table["method"]) == {name}  # the original, 2 cells per site
    _command("report", run, evals, sweep, "--out", tmp_path / "report")
    few_shot = pd.read_csv(tmp_path / "report" / "few_shot.csv")
    assert set(few_shot["method"]) == {f"{label(name)} (random weights)"}
    assert f"{label(name)} prompt" in _command("prompt", "info", run)
    assert f"{label(name)} prompt" in _command("prompt", "interpret", run)


def test_each_command_reads_and_checks_each_checkpoint_once(data_root, tmp_path, monkeypatch):
    """Resolve once: `eval` and `corrupt` read a prompt file once and check its tensors against the model
    once before the data is known (and once more with the class count), then hand the result on."""
    import nemesis.files.checkpoint as checkpoint_module

    path = tmp_path / "prompt.safetensors"
    _saved(_learner("cocoop"), path)
    reads, checks = [], []
    real_load, real_check = checkpoint_module.load_prompt, checkpoint_module.PromptCheckpoint.check_model
    monkeypatch.setattr(checkpoint_module, "load_prompt", lambda *args: reads.append(1) or real_load(*args))

    def counted_check(self, model, embed_dim, text_width, n_classes=None):
        checks.append(n_classes)
        return real_check(self, model, embed_dim, text_width, n_classes)

    monkeypatch.setattr(checkpoint_module.PromptCheckpoint, "check_model", counted_check)
    common = ["--root", data_root, "--pretrained", "none", "--device", "cpu"]
    _command("eval", path, *common)
    assert len(reads) == 1 and checks == [None, len(CLASSNAMES)]
    reads.clear(), checks.clear()
    _command("corrupt", path, *common, "--rescale", "0.5", "--positions", "0", "--out", tmp_path / "s.parquet")
    assert len(reads) == 1 and checks == [None, len(CLASSNAMES)]


def test_what_a_file_does_not_record_stays_unknown(tmp_path):
    """A prompt file without our description, and records that named no method, claim no penalty."""
    from safetensors.torch import save_file

    from analysis.labels import method_label
    from nemesis.methods import split_method

    save_file({"ctx": torch.zeros(4, 64)}, str(tmp_path / "bare.safetensors"))
    bare = load_prompt(tmp_path / "bare.safetensors")
    assert (bare.prompt_method, bare.metadata.penalty) == ("coop", None)
    assert split_method("unknown") == ("unknown", "unknown") and split_method("nemesis") == ("coop", "nemesis")
    assert method_label("coop", penalty="unknown") == "CoOp (penalty not recorded)"


@dataclasses.dataclass
class PositionsOnlyConfig:
    """A method whose options name no context length or init phrase (as vision prompts' may not)."""

    n_prompts: int = 2

    def tensor_shapes(self, embed_dim, text_width, n_classes) -> dict[str, tuple]:
        return {"ctx": (self.n_prompts, 4, text_width)}


def test_a_method_without_coop_options_takes_none_of_them(monkeypatch):
    spec = MethodSpec("positions-only", "Positions only", AveragedCoOp, PositionsOnlyConfig)
    monkeypatch.setitem(METHODS, spec.name, spec)
    config = TrainConfig(dataset="dtd", prompt_method=spec.name, penalty="nemesis")
    assert config.n_ctx is None and config.ctx_init is None
    assert TrainConfig.from_json(config.resolved().to_json()).prompt_config() == PositionsOnlyConfig()
    with pytest.raises(NemesisError, match="--n-ctx is not an option of positions-only"):
        TrainConfig(dataset="dtd", prompt_method=spec.name, n_ctx=8)


def test_save_logits_takes_one_prompt_on_one_class_set(data_root, tmp_path):
    for index in range(2):
        _saved(_learner("coop", seed=index), tmp_path / f"p{index}.safetensors")
    common = ["--root", str(data_root), "--pretrained", "none", "--save-logits", str(tmp_path / "l.safetensors")]
    fails_with_one_line(["eval", str(tmp_path / "p0.safetensors"), str(tmp_path / "p1.safetensors"), *common],
                        "writes one prompt's logits; 2 prompts were given")  # fmt: skip
    fails_with_one_line(["eval", str(tmp_path / "p0.safetensors"), "--base-to-new", *common], "drop --base-to-new")
    assert not (tmp_path / "l.safetensors").exists()

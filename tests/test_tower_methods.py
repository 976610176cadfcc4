"""VPT, IVLP, MaPLe and PromptSRC as methods: each learner's similarities equal a plain reference of the
whole model written here from the methods' definitions (issue 24, items 1-2), and a sweep cell at a
deep site (layers reused) equals the same cell computed from the tower's input.

Reference: "a photo of a <class>." tokenised, the text stack's row 0 written over positions 1..n
(its first n tokens), rows 1.. over positions 1..n before text layers 1..; image tokens built by
hand, the vision stack's row 0 appended after the patches before ln_pre (MaPLe: Linear_l of the text
row l), rows 1.. over the last n tokens before image layers 1..; class-token pooling; cosine.
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.files.checkpoint import PromptMetadata, load_prompt, save_prompt
from nemesis.methods import preset
from nemesis.methods.protocol import build_learner
from nemesis.model.vision_prompts import patch_embeddings
from nemesis.tensors import CorruptionSite
from nemesis.training.trainer import train
from nemesis_cli.main import app

from .conftest import cached_backbone
from .test_trainer import small_config, train_until_interrupted

CLASSNAMES = ["golden retriever", "dog", "sea lion"]
TOLERANCE = 1e-5
METHODS = ["vpt", "ivlp", "maple", "promptsrc"]


def _learner(method: str, backbone, **options):
    learner = build_learner(method, backbone, CLASSNAMES, seed=3, **options)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # prompts large enough to move the features (init is 0.02)
        learner.ctx.add_(torch.randn(learner.ctx.shape, generator=generator) * 0.3)
        for tensor in learner.extra_parameters().values():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)
    return learner


def _reference_text(backbone, stack: torch.Tensor | None) -> torch.Tensor:
    """Text features [C, D]: the whole 77-token prompts, explicit layer loop."""
    model = backbone.model
    token_ids = backbone.tokenizer([f"a photo of a {name}." for name in CLASSNAMES])
    if stack is None:  # VPT: the hand-crafted prompt
        return model.encode_text(token_ids)
    n = stack.shape[-2]
    x = model.token_embedding(token_ids).clone()
    x[:, 1 : 1 + n] = stack[0]  # the phrase's first n tokens are learned, the rest stays text
    x = x + model.positional_embedding
    for layer, block in enumerate(model.transformer.resblocks):
        if 1 <= layer < stack.shape[0]:
            x = x.clone()
            x[:, 1 : 1 + n] = stack[layer]
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(len(CLASSNAMES)), token_ids.argmax(dim=-1)] @ model.text_projection


def _reference_images(backbone, images: torch.Tensor, stack: torch.Tensor | None) -> torch.Tensor:
    """Image features [B, D]: prompts appended after the patches before ln_pre, the last n replaced deeper."""
    visual = backbone.model.visual
    x = visual.conv1(images).flatten(2).transpose(1, 2)  # [B, P, W]
    batch, _, width = x.shape
    x = torch.cat([visual.class_embedding.expand(batch, 1, width), x], dim=1) + visual.positional_embedding
    depth = 0 if stack is None else stack.shape[0]
    if depth:
        x = torch.cat([x, stack[0].expand(batch, -1, -1)], dim=1)
    x = visual.ln_pre(x)
    for layer, block in enumerate(visual.transformer.resblocks):
        if 1 <= layer < depth:
            x = x.clone()
            x[:, -stack.shape[-2] :] = stack[layer]
        x = block(x)
    return visual.ln_post(x[:, 0]) @ visual.proj


def _reference_stacks(learner, tensors: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(text stack, vision stack) of the learned tensors, from the method's definition."""
    ctx = tensors["ctx"]
    if learner.method == "vpt":
        return tensors.get("text_prompts"), ctx
    if learner.method == "maple":
        weight, bias = tensors["projection.weight"], tensors["projection.bias"]
        vision = torch.stack([F.linear(ctx[layer], weight[layer], bias[layer]) for layer in range(len(weight))])
        return ctx, vision
    return ctx, tensors["vision_prompts"]


def _reference_similarities(learner, backbone, images, tensors) -> torch.Tensor:
    text_stack, vision_stack = _reference_stacks(learner, tensors)
    text = F.normalize(_reference_text(backbone, text_stack), dim=-1)
    image = F.normalize(_reference_images(backbone, images, vision_stack), dim=-1)
    return image @ text.T  # [B, C]


def _images(backbone, count: int = 3) -> torch.Tensor:
    size = backbone.image_size
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(5))


def _learned(learner) -> dict[str, torch.Tensor]:
    return {"ctx": learner.ctx.detach(), **{k: v.detach() for k, v in learner.extra_parameters().items()}}


@pytest.mark.parametrize("model", ["tiny", "ViT-B-32"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_equals_the_reference_model(model, method):
    backbone = cached_backbone(model)
    learner = _learner(method, backbone, n_ctx=2 if method != "vpt" else 3)
    images = _images(backbone)
    with torch.no_grad():
        patches = patch_embeddings(backbone.model.visual, images)  # what the feature cache holds
        ours = learner.similarities(patches, learner.ctx.detach().unsqueeze(0))[0]
        reference = _reference_similarities(learner, backbone, images, _learned(learner))
        assert (ours - reference).abs().max().item() <= TOLERANCE
        # The training logits are logit_scale x the same similarities.
        scale = backbone.model.logit_scale.exp()
        assert (learner.logits(patches) - scale * reference).abs().max().item() <= TOLERANCE * scale


def test_maple_ivlp_and_vpt_on_vit_b16_at_their_depths():
    """MaPLe at depth 9 with 2 tokens, IVLP 4+4 at depth 9 (PromptSRC's) and VPT's 8 tokens at depth 12 on
    ViT-B-16's 197 tokens."""
    backbone = cached_backbone("ViT-B-16")
    images = _images(backbone, count=2)
    with torch.no_grad():
        patches = patch_embeddings(backbone.model.visual, images)
        cases = {"maple": {}, "ivlp": {"n_ctx": 4, "text_depth": 9, "vision_depth": 9}, "vpt": {}}
        depths = {"maple": {"text": 9, "vision": 9}, "ivlp": {"text": 9, "vision": 9}, "vpt": {"vision": 12}}
        for method, options in cases.items():
            learner = _learner(method, backbone, **options)
            assert learner.depths == depths[method]
            ours = learner.similarities(patches, learner.ctx.detach().unsqueeze(0))[0]
            reference = _reference_similarities(learner, backbone, images, _learned(learner))
            assert (ours - reference).abs().max().item() <= TOLERANCE


SITE_CASES = [(method, "tiny", {}) for method in METHODS] + [
    ("vpt", "ViT-B-32", {"vision_depth": 3}),  # prompts in 3 of 12 layers: the last one's scale carries on
    ("ivlp", "ViT-B-32", {"text_depth": 3, "vision_depth": 2}),
]


@pytest.mark.parametrize(("method", "model", "options"), SITE_CASES)
def test_a_cell_at_a_deep_site_equals_the_reference_of_its_variant(method, model, options):
    """Sweep cells at every site: the learner told the site reuses what is the same below its layer; each
    variant's scores equal the reference model under that variant."""
    backbone = cached_backbone(model)
    learner = _learner(method, backbone, n_ctx=2, **options)
    images = _images(backbone, count=4)
    patches = patch_embeddings(backbone.model.visual, images).detach()
    for site in learner.corruption_sites():
        own = _learned(learner)[site.tensor]
        variants = own.unsqueeze(0).repeat(3, 1, 1, 1)
        variants[1][site.index][1] *= 4.0  # RESCALE position 1 of the site's layer
        variants[2][site.index][0] = torch.randn(own.shape[-1], generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            scores = learner.similarities(patches, variants, site=site)  # [3, B, C]
            for k in range(3):
                reference = _reference_similarities(
                    learner, backbone, images, _learned(learner) | {site.tensor: variants[k]}
                )
                assert (scores[k] - reference).abs().max().item() <= TOLERANCE, (site, k)
        assert not torch.allclose(scores[0], scores[2])  # the corruption changes the scores
        assert torch.allclose(scores[0], scores[1], atol=1e-6) == _rescaling_is_a_no_op(learner, site), site


def _rescaling_is_a_no_op(learner, site) -> bool:
    """Where RESCALE cannot change a pre-LN CLIP (up to LayerNorm's eps): within its layer a prompt acts only
    through the block's LayerNorm, and its own output is replaced at the next prompted layer or dropped by
    pooling. So: every layer but the last prompted one, and that one too when it is the tower's last; the
    vision prompt of layer 0 also goes through ln_pre. Not the text ctx of layer 0 (positional embedding
    added first) nor MaPLe's text prompts (its vision prompt t W p + b is no rescaling)."""
    if learner.method == "maple" or (site.tower == "text" and site.layer == 0):
        return False
    depth = learner.depths[site.tower]
    layers = learner._layers(site.tower)
    return site.layer < depth - 1 or depth == layers or (site.tower == "vision" and site.layer == 0)


def test_maple_text_corruption_changes_the_vision_prompt_through_its_projection():
    """Rescaling MaPLe's text prompt of layer l by t gives the vision prompt t * W p + b, not t * (W p + b)."""
    learner = _learner("maple", cached_backbone("tiny"), n_ctx=2)
    ctx = learner.ctx.detach()
    rescaled = ctx.clone()
    rescaled[1, 0] *= 3.0
    stacks = learner.stacks({"ctx": rescaled.unsqueeze(0)})
    weight, bias = learner.projection_weight.detach(), learner.projection_bias.detach()
    torch.testing.assert_close(stacks["vision"][0, 1, 0], 3.0 * (weight[1] @ ctx[1, 0]) + bias[1])
    assert not torch.allclose(stacks["vision"][0, 1, 0], 3.0 * (weight[1] @ ctx[1, 0] + bias[1]))


@pytest.mark.parametrize("method", METHODS)
def test_gradients_reach_every_learned_tensor_and_nothing_else(method):
    backbone = cached_backbone("tiny")
    learner = _learner(method, backbone, n_ctx=2)
    patches = patch_embeddings(backbone.model.visual, _images(backbone)).detach()
    loss = F.cross_entropy(learner.logits(patches), torch.tensor([0, 1, 2])) + learner.mean_prompt_norm()
    loss.backward()
    learned = _learned(learner)
    for name, tensor in {"ctx": learner.ctx, **learner.extra_parameters()}.items():
        assert tensor.grad is not None and tensor.grad.abs().sum() > 0, name
    assert all(parameter.grad is None for parameter in backbone.model.parameters())
    assert len(learned) == {"vpt": 1, "ivlp": 2, "maple": 3, "promptsrc": 2}[method]


def test_pun_averages_every_norm_or_every_tower():
    """Nemesis's PUN over IVLP's two stacks: every (tower, layer, position) norm weighs the same, or each
    tower's mean does (`norm_average`)."""
    backbone = cached_backbone("tiny")
    for average in ("every-norm", "every-tower"):
        learner = _learner("ivlp", backbone, n_ctx=2, vision_depth=1, norm_average=average)
        text = learner.ctx.detach().norm(dim=-1)  # [2, 2]
        vision = learner.extra_parameters()["vision_prompts"].detach().norm(dim=-1)  # [1, 2]
        expected = (
            torch.cat([text.flatten(), vision.flatten()]).mean()
            if average == "every-norm"
            else (text.mean() + vision.mean()) / 2
        )
        torch.testing.assert_close(learner.mean_prompt_norm().detach(), expected)


def test_sites_name_tower_and_layer():
    learner = _learner("ivlp", cached_backbone("tiny"), n_ctx=2)
    sites = learner.corruption_sites()
    assert [(site.name, site.tensor, site.tower, site.layer) for site in sites] == [
        ("text layer 0", "ctx", "text", 0),
        ("text layer 1", "ctx", "text", 1),
        ("vision layer 0", "vision_prompts", "vision", 0),
        ("vision layer 1", "vision_prompts", "vision", 1),
    ]
    assert sites[3] == CorruptionSite("vision layer 1", tensor="vision_prompts", index=(1,), tower="vision", layer=1)


# --- training: Nemesis, resume, fp16 ------------------------------------------------------------------


@pytest.fixture
def pets(tmp_path):
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", TRAIN_CLASSES, per_class=(4, 2, 3), image_size=28)
    return root


TRAIN_CLASSES = ["abyssinian", "beagle", "bombay", "boxer"]


@pytest.mark.parametrize(("method", "options"), [("ivlp-nemesis", {"beta": 0.5}), ("maple-nemesis", {}),
                                                 ("vpt-nemesis", {"precision": "fp16"})])  # fmt: skip
def test_tower_prompts_resume_to_the_uninterrupted_run(pets, tmp_path, method, options):
    """Trained with Nemesis (PUN over both towers; PAN's variants re-encode the images), interrupted after
    epoch 1 and resumed: every learned tensor equals the uninterrupted run's, bit for bit."""
    config = small_config(pets, **preset(method), n_ctx=2, epochs=2, **options)
    whole = load_prompt(train(config, tmp_path / "whole", progress=False) / "prompt.safetensors")
    train_until_interrupted(config, tmp_path / "cut", after_epoch=1)
    train(config, tmp_path / "cut", resume=True, progress=False)
    resumed = load_prompt(tmp_path / "cut" / "prompt.safetensors")
    assert torch.equal(resumed.ctx, whole.ctx) and set(resumed.extra) == set(whole.extra)
    assert all(torch.equal(resumed.extra[name], whole.extra[name]) for name in whole.extra)
    untrained = build_learner(preset(method)["prompt_method"], cached_backbone("tiny"), TRAIN_CLASSES, n_ctx=2, seed=2)
    assert not torch.equal(whole.ctx, untrained.ctx.detach())
    norm_losses = [row["norm_loss"] for row in _rows(tmp_path / "whole", "step")]
    assert all(value > 0 for value in norm_losses)  # Nemesis acted on every step


def _rows(folder, kind: str) -> list[dict]:
    lines = (folder / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


def test_promptsrc_is_read_not_trained(pets):
    with pytest.raises(NemesisError, match="training PromptSRC is not offered"):
        small_config(pets, prompt_method="promptsrc")


def test_vpt_with_coop_context_learns_a_text_stack_of_one_layer(tmp_path):
    """VPT with text_depth 1: CoOp's context beside the image prompts, saved as `text_prompts`, read back, and
    swept at its own site; equal to the reference with that ctx in the text prompt."""
    backbone = cached_backbone("tiny")
    learner = _learner("vpt", backbone, n_ctx=2, text_depth=1, ctx_init="a photo of a")
    assert set(learner.extra_parameters()) == {"text_prompts"} and learner.extra_parameters()["text_prompts"].shape == (
        1,
        2,
        64,
    )
    with torch.no_grad():
        learner.extra_parameters()["text_prompts"].add_(0.3)
    images = _images(backbone)
    patches = patch_embeddings(backbone.model.visual, images).detach()
    with torch.no_grad():
        ours = learner.similarities(patches, learner.ctx.detach().unsqueeze(0))[0]
        text = F.normalize(_reference_text(backbone, learner.extra_parameters()["text_prompts"].detach()), dim=-1)
        image = F.normalize(_reference_images(backbone, images, learner.ctx.detach()), dim=-1)
        assert (ours - image @ text.T).abs().max().item() <= TOLERANCE
    assert [site.name for site in learner.corruption_sites()] == ["vision layer 0", "vision layer 1", "text layer 0"]
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", prompt_method="vpt")
    metadata.prompt_config = {"n_ctx": 2, "text_depth": 1, "ctx_init": "a photo of a"}
    save_prompt(tmp_path / "p.safetensors", learner.ctx.detach(), metadata, learner.extra_parameters())
    loaded = load_prompt(tmp_path / "p.safetensors")
    assert torch.equal(loaded.extra["text_prompts"], learner.extra_parameters()["text_prompts"].detach())
    # Their VPT trainer's checkpoint has no key for a learned text side: exporting there is refused.
    out = tmp_path / "dassl" / "oxford_pets" / "VPT" / "seed1"
    arguments = ["prompt", "export-dassl", str(tmp_path / "p.safetensors"), "--out", str(out), "--pretrained", "none"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 2 and "has no place for text_prompts" in result.output and not out.exists()


def test_nemesis_pun_in_training_takes_every_towers_norms():
    """The Nemesis term of a training step: PUN is the learner's mean over both towers' prompts (MaPLe: its
    projected image prompts too), not ctx's alone, times the weight A."""
    from types import SimpleNamespace

    from nemesis.penalties import NemesisConfig
    from nemesis.penalties.losses import NemesisTerm

    learner = _learner("maple", cached_backbone("tiny"), n_ctx=2)
    step = SimpleNamespace(learner=learner, epoch=0, epochs=1, count_correct=None, random=lambda purpose: None)
    part = NemesisTerm(NemesisConfig(beta=1.0, weight=3.0, schedule="constant")).loss(step)
    expected = 3.0 * learner.mean_prompt_norm().detach()
    torch.testing.assert_close(part.value.detach(), expected)
    assert abs(float(expected) - 3.0 * float(learner.norms().detach().mean())) > 1e-3  # not ctx's own mean

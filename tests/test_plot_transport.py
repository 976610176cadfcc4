"""`nemesis plot-transport` (issue 22, item 8): a PLOT prompt's transport plans of one test image, drawn.

The plans are the ones behind evaluation's scores (their weighted sum with the cosine similarities is
the image's similarity for the class, from the Sinkhorn run of the image's block), and the figure
shows N panels per class on one colour scale.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from matplotlib.image import AxesImage
from typer.testing import CliRunner

from analysis.layout import PaperLayout
from analysis.transport import PANEL_LABEL, ImageTransport, plot_transport, transport_figure
from nemesis.data.testing import make_coop_folder
from nemesis.evaluation.evaluate import prepare_evaluation, resolve_target
from nemesis.files.checkpoint import PromptMetadata, load_checkpoint, save_prompt
from nemesis.methods.cocoop.learner import embed_dim_of
from nemesis.methods.plot.learner import PLOTLearner
from nemesis.methods.protocol import build_learner
from nemesis_cli.main import app

from .conftest import cached_backbone, fails_with_one_line
from .test_trainer import CLASSNAMES

N_PROMPTS, N_CTX = 4, 4
TEST_PER_CLASS = 2


def _save(method: str, path, **options) -> None:
    learner = build_learner(method, cached_backbone("tiny"), CLASSNAMES, n_ctx=N_CTX, seed=3, **options)
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=2, seed=1, prompt_method=method, epoch=1)
    save_prompt(path, learner.ctx.detach(), metadata, learner.extra_parameters())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(2, 1, TEST_PER_CLASS), image_size=28)
    return root


@pytest.fixture(scope="module")
def plot_prompt(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "plot.safetensors"
    _save("plot", path)
    return path


def _embed_dim() -> int:
    return embed_dim_of(cached_backbone("tiny"))


def _tokens_and_text(learner: PLOTLearner, features: torch.Tensor):
    return learner._tokens(features), learner.prompt_features(learner.ctx.detach().unsqueeze(0))[0]  # [N, n_cls, D]


def test_plans_weighted_by_the_similarities_give_the_blockwise_similarities():
    ctx = torch.randn(N_PROMPTS, N_CTX, 64, generator=torch.Generator().manual_seed(0)) * 0.5
    learner = PLOTLearner(cached_backbone("tiny"), CLASSNAMES, ctx=ctx, sinkhorn_batch=2)
    features = torch.randn(5, 17, _embed_dim(), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = learner.similarities(features, ctx.unsqueeze(0))[0]  # [B, n_cls], one run per 2 images
        tokens, text = _tokens_and_text(learner, features)
        for image in (0, 3, 4):  # the first block, the second's second image, the last block of one
            classes = [2, 0]
            plans = learner.plans(features, image, classes)
            assert plans.shape == (2, 17, N_PROMPTS)
            for plan, cls in zip(plans, classes, strict=True):
                pair = torch.einsum("td,nd->tn", tokens[image], text[:, cls])  # [T, N] cosine similarities
                torch.testing.assert_close((plan * pair).sum(), expected[image, cls], rtol=1e-6, atol=1e-6)


def test_plans_of_spatial_tokens_leave_the_global_token_out():
    learner = PLOTLearner(cached_backbone("tiny"), CLASSNAMES, n_prompts=2, n_ctx=N_CTX)
    learner.image_tokens = "spatial"  # as on a ModifiedResNet (tiny, a ViT, is refused spatial tokens when built)
    features = torch.randn(3, 17, _embed_dim(), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        plans = learner.plans(features, 1, [0])
    assert plans.shape == (1, 16, 2) and not learner.includes_global_token


def test_plans_refuse_an_image_outside_the_features():
    learner = PLOTLearner(cached_backbone("tiny"), CLASSNAMES, n_prompts=2, n_ctx=N_CTX)
    with pytest.raises(Exception, match="not one of the 3 images"):
        learner.plans(torch.randn(3, 17, _embed_dim()), 3, [0])


def test_plans_sum_to_the_evaluations_similarities(plot_prompt, data_root):
    target = resolve_target(load_checkpoint(plot_prompt), pretrained="none")
    setup = prepare_evaluation(target, root=data_root, device="cpu", progress=False)
    learner = setup.learner
    with torch.inference_mode():
        evaluated = learner.similarities(setup.features, learner.ctx.detach().unsqueeze(0))[0]  # [N_img, n_cls]
        tokens, text = _tokens_and_text(learner, setup.features)
        image = setup.features.shape[0] - 1
        label = int(setup.labels[image])
        plan = learner.plans(setup.features, image, [label])[0]
        pair = torch.einsum("td,nd->tn", tokens[image], text[:, label])
    torch.testing.assert_close((plan * pair).sum(), evaluated[image, label], rtol=1e-6, atol=1e-6)


def test_the_command_writes_the_figure(plot_prompt, data_root, tmp_path):
    out = tmp_path / "transport"
    args = ["plot-transport", str(plot_prompt), "--image", "1", "--out", str(out), "--root", str(data_root)]
    result = CliRunner().invoke(app, [*args, "--pretrained", "none", "--device", "cpu", "--column", "single"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "transport.png").stat().st_size > 0 and (tmp_path / "transport.pdf").stat().st_size > 0
    assert f"wrote {out}.png" in result.output


def test_the_figure_has_n_panels_per_class_on_one_colour_scale(plot_prompt, data_root):
    figure = transport_figure(plot_prompt, 2, root=data_root, device="cpu", pretrained="none")
    panels = [axes for axes in figure.axes if axes.get_label() == PANEL_LABEL]
    assert len(panels) == 2 * N_PROMPTS
    images = [image for axes in panels for image in axes.get_images()]
    assert {image.get_clim() for image in images} == {images[0].get_clim()}  # one scale for all
    titles = [axes.get_title() for axes in panels]
    assert sum(title.startswith("true:") for title in titles) == N_PROMPTS
    assert all("prompt" in title and "global token" in title for title in titles)
    colour_bars = [axes for axes in figure.axes if axes not in panels and not axes.get_images()]
    assert len(colour_bars) == 1  # the shared scale's bar; the remaining axes show the image
    shown = [axes for axes in figure.axes if axes not in panels and axes.get_images()]
    assert len(shown) == 1 and isinstance(shown[0].get_images()[0], AxesImage)


def test_a_figure_without_its_image_or_global_token():
    plans = np.random.default_rng(0).random((2, 49, 3))  # the 7 x 7 grid of RN50 at 224 px, spatial tokens only
    transport = ImageTransport(0, "dtd", ("banded", "dotted"), plans, global_token=False)
    figure = plot_transport(transport, PaperLayout.column("single"))
    panels = [axes for axes in figure.axes if axes.get_label() == PANEL_LABEL]
    assert len(panels) == 6 and panels[0].get_images()[0].get_array().shape == (7, 7)
    assert not any("global" in axes.get_title() for axes in panels)


def test_a_coop_prompt_is_refused_in_one_line(data_root, tmp_path):
    path = tmp_path / "coop.safetensors"
    _save("coop", path)
    args = ["plot-transport", str(path), "--image", "0", "--out", str(tmp_path / "f"), "--root", str(data_root)]
    fails_with_one_line([*args, "--pretrained", "none", "--device", "cpu"], "draws the transport plans of PLOT")
    assert not list(tmp_path.glob("f*"))


def test_an_image_out_of_range_is_refused_in_one_line(plot_prompt, data_root, tmp_path):
    n_images = TEST_PER_CLASS * len(CLASSNAMES)
    args = ["plot-transport", str(plot_prompt), "--out", str(tmp_path / "f"), "--root", str(data_root)]
    options = ["--pretrained", "none", "--device", "cpu"]
    fails_with_one_line([*args, "--image", str(n_images), *options], f"its test split has {n_images}")
    fails_with_one_line([*args, "--image", "-1", *options], "images count from 0")


def test_method_options_reach_the_plans(plot_prompt, data_root, tmp_path):
    out = tmp_path / "per-image"
    args = ["plot-transport", str(plot_prompt), "--image", "3", "--out", str(out), "--root", str(data_root)]
    options = ["--pretrained", "none", "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--method-option", "sinkhorn_batch=1", *options])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "per-image.png").is_file()
    # tiny is a ViT: PLOT's spatial tokens (a ModifiedResNet's grid) are refused before anything is drawn.
    fails_with_one_line([*args, "--method-option", "image_tokens=spatial", *options], "ModifiedResNet")

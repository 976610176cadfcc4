"""PLOT's transport plans, shown: where on a test image each prompt of a class puts its transport mass.

`transport_figure` evaluates a PLOT prompt as `nemesis eval` does and draws, for one test image, the
plans of its true and its predicted class: one panel per prompt, each the spatial tokens' share of
the prompt's mass on the image grid, on one colour scale. The plans come from the Sinkhorn run the
evaluation makes (the image's block of test images), so they are the ones behind its logits.

torch and the model load inside `transport_figure`; drawing needs matplotlib and numpy only.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure
from PIL import Image, ImageOps

from nemesis.errors import NemesisError

from .labels import dataset_name
from .layout import DEFAULT_LAYOUT, PaperLayout
from .plots import new_figure

ROLES = ("true", "predicted")  # the figure's two rows
COLOUR_MAP = "viridis"
PANEL_LABEL = "transport panel"  # the label of every plan's axes, so tests and callers can find them


@dataclass(frozen=True)
class ImageTransport:
    """What the figure shows of one test image: its plans for the true and the predicted class."""

    image_index: int
    dataset: str
    classnames: tuple[str, str]  # the true and the predicted class
    plans: np.ndarray  # [2, T, N]: the plans of those classes over the transport's T tokens and N prompts
    global_token: bool  # whether token 0 (the global one) is among the T tokens
    image: Image.Image | None = None  # the image as the model sees it (centre square), None if unreadable


def transport_figure(
    checkpoint: str | os.PathLike, image_index: int, *, layout: PaperLayout = DEFAULT_LAYOUT, **options: Any
) -> Figure:
    """The transport-plan figure of test image `image_index` under a PLOT prompt (a file, run folder or
    Dassl file); `options` are `image_transport`'s (root, device, model, pretrained, dataset...)."""
    return plot_transport(image_transport(checkpoint, image_index, **options), layout)


def image_transport(
    checkpoint: str | os.PathLike,
    image_index: int,
    *,
    root: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
    device: str | None = None,
    epoch: int | None = None,
    prompt_method: str | None = None,
    **target_options: Any,
) -> ImageTransport:
    """The plans of test image `image_index` for its true and predicted class, as evaluation computes them."""
    from nemesis.evaluation.evaluate import prepare_evaluation, resolve_target
    from nemesis.files.checkpoint import load_checkpoint
    from nemesis.training.configs import run_root

    if image_index < 0:
        raise NemesisError(f"--image {image_index} is not a test image; images count from 0")
    prompt = load_checkpoint(checkpoint, epoch, prompt_method)
    target = resolve_target(prompt, **target_options)
    if not hasattr(prompt.spec.learner_class(), "plans"):  # before any model is built or image encoded
        raise NemesisError(
            f"{prompt.path} holds a {prompt.spec.label} prompt; plot-transport draws the transport plans of "
            "PLOT prompts (--prompt-method plot names a PLOT Dassl file)"
        )
    root = root if root is not None else run_root(prompt.path)  # a run folder knows where its data was
    setup = prepare_evaluation(target, root=root, cache_dir=cache_dir, device=device, progress=False)
    n_images = setup.features.shape[0]
    if image_index >= n_images:
        raise NemesisError(
            f"--image {image_index} is not a test image of {target.dataset}: its test split has {n_images} "
            f"(0 to {n_images - 1})"
        )
    true_class = int(setup.labels[image_index])
    predicted_class = _predicted_class(setup.learner, setup.features, image_index)
    plans = _plans(setup.learner, setup.features, image_index, [true_class, predicted_class])
    classnames = setup.dataset.classnames
    return ImageTransport(
        image_index=image_index,
        dataset=target.dataset,
        classnames=(classnames[true_class], classnames[predicted_class]),
        plans=plans,
        global_token=setup.learner.includes_global_token,
        image=_model_view(setup.dataset, setup.dataset.test[image_index], setup.backbone.image_size),
    )


@contextlib.contextmanager
def _evaluation_precision(device: Any) -> Iterator[None]:
    """Inference mode under evaluation's autocast, so the plans and prediction are those behind its logits."""
    import torch

    from nemesis.precision import autocast_policy

    with torch.inference_mode(), autocast_policy(device).context():
        yield


def _predicted_class(learner: Any, features: Any, image_index: int) -> int:
    """The class evaluation predicts for the image: its block's Sinkhorn run is the same alone as in the split."""
    block = learner.sinkhorn_batch
    start = image_index // block * block
    with _evaluation_precision(features.device):
        scores = learner.similarities(features[start : start + block], learner.ctx.detach().unsqueeze(0))
    return int(scores[0, image_index - start].argmax())


def _plans(learner: Any, features: Any, image_index: int, classes: list[int]) -> np.ndarray:
    with _evaluation_precision(features.device):
        return learner.plans(features, image_index, classes).float().cpu().numpy()


def _model_view(dataset: Any, sample: Any, size: int) -> Image.Image | None:
    """The image cropped to its centre square as the model's preprocessing does (the token grid covers
    that square); None when the file cannot be read, so the figure goes without it."""
    try:
        image = dataset.open_image(sample)
    except (OSError, NemesisError):
        return None
    return ImageOps.fit(image, (size, size), method=Image.Resampling.BICUBIC)


# ----------------------------------------------------------------------------- drawing


def spatial_grid(n_tokens: int) -> tuple[int, int]:
    """H x W of `n_tokens` spatial tokens: the square grid of a square model input."""
    side = math.isqrt(n_tokens)
    if side * side != n_tokens:
        raise NemesisError(f"{n_tokens} spatial tokens are not a square grid; cannot place them on the image")
    return side, side


def mass_shares(plans: np.ndarray) -> np.ndarray:
    """Each token's share (%) of its prompt's transport mass: plans [..., T, N] over their column sums."""
    return 100.0 * plans / plans.sum(axis=-2, keepdims=True)


def plot_transport(transport: ImageTransport, layout: PaperLayout = DEFAULT_LAYOUT) -> Figure:
    """Two rows (true class, predicted class) of N panels, one per prompt: the spatial tokens' share of
    the prompt's mass on the H x W grid, all on one colour scale; the image first, when it was read."""
    shares = mass_shares(transport.plans)  # [2, T, N]
    spatial = shares[:, 1:] if transport.global_token else shares  # [2, HW, N]
    height, width = spatial_grid(spatial.shape[1])
    n_prompts = shares.shape[-1]
    image_columns = 1 if transport.image is not None else 0
    columns = n_prompts + image_columns
    share = 0.9 / columns  # of the figure's width, for one panel beside the colour bar
    panel_in = 0.9 * layout.width_in / columns
    with layout.fonts():
        figure = new_figure(layout, min(2 * panel_in * height / width + 1.3, 0.9 * layout.width_in + 1.3))
        grid = figure.add_gridspec(2, columns)
        if transport.image is not None:
            _draw_image(figure.add_subplot(grid[:, 0]), transport, layout, share)
        largest = float(spatial.max())
        panels, image = [], None
        for row, (role, classname) in enumerate(zip(ROLES, transport.classnames, strict=True)):
            for prompt in range(n_prompts):
                axes = figure.add_subplot(grid[row, image_columns + prompt])
                image = axes.imshow(
                    spatial[row, :, prompt].reshape(height, width), cmap=COLOUR_MAP, vmin=0.0, vmax=largest
                )
                axes.set_axis_off()
                axes.set_label(PANEL_LABEL)
                title = f"{role}: {classname}\nprompt {prompt + 1}"
                if transport.global_token:
                    title += f", global token {shares[row, 0, prompt]:.0f}%"
                axes.set_title(layout.wrap(title, share, layout.small_size), fontsize=layout.small_size)
                panels.append(axes)
        figure.colorbar(image, ax=panels, label=layout.wrap("share of the prompt's mass (%)", 0.3), shrink=0.9)
        figure.suptitle(layout.wrap(_title(transport), size=layout.title_size))
    for axes in figure.axes:  # ticks made after the font settings are gone keep the small size
        axes.tick_params(labelsize=layout.small_size)
    return figure


def _draw_image(axes: Any, transport: ImageTransport, layout: PaperLayout, share: float) -> None:
    axes.imshow(transport.image)
    axes.set_axis_off()
    axes.set_title(layout.wrap(f"test image {transport.image_index}", share, layout.small_size))


def _title(transport: ImageTransport) -> str:
    true, predicted = transport.classnames
    verdict = "correct" if true == predicted else f"predicted {predicted}"
    mass = "; global token's share in the titles" if transport.global_token else ""
    return (
        f"PLOT transport plans, {dataset_name(transport.dataset)} test image {transport.image_index} "
        f"(true {true}, {verdict}){mass}"
    )

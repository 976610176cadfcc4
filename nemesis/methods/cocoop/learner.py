"""CoCoOp (Zhou et al., CVPR 2022): context vectors shifted by a meta-net of each image's feature.

Per image i: ctx_i = ctx + meta_net(normalize(f_i)) (the shift added to every context position),
and image i is classified against the text features of its own prompts [SOS] ctx_i [class] [.] [EOT].
The meta-net is Linear(D, D // 16) - ReLU - Linear(D // 16, W), named as in CoOp's repository so
its state dict keys (`meta_net.linear1.weight`, ...) are those of CoCoOp's Dassl checkpoints.

The (image, class) prompt rows go through the CoOp learner's shared-prefix text pass ([SOS] + each
image's context once, the class suffixes against it, cut at end-of-text), a bounded number of
images at a time, so memory does not grow with the number of images or classes.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...constants import POOLED_FEATURES
from ...errors import NemesisError
from ...model.clip_models import Backbone
from ...tensors import WHOLE_CTX, CorruptionSite, position_norms
from ..coop.learner import ClassPosition, PromptLearner
from . import META_NET, META_NET_REDUCTION

ROWS_PER_PASS = 4096  # (image, class) prompt rows handed to the text pass at once: bounds memory


class MetaNet(nn.Module):
    """Linear(D, D // 16) - ReLU - Linear(D // 16, W): one shift of the context per image."""

    def __init__(self, embed_dim: int, text_width: int) -> None:
        super().__init__()
        hidden = embed_dim // META_NET_REDUCTION
        if hidden < 1:
            raise NemesisError(f"image features of width {embed_dim} are too narrow for CoCoOp's meta-net (D // 16)")
        self.linear1 = nn.Linear(embed_dim, hidden)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden, text_width)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        # A meta-net held in fp16 (`--precision fp16`, as CoCoOp's own) takes fp16 features.
        return self.linear2(self.relu(self.linear1(image_features.to(self.linear1.weight.dtype))))


def embed_dim_of(clip: Backbone) -> int:
    """Width D of the model's image (and projected text) features."""
    visual = clip.model.visual
    width = getattr(visual, "output_dim", None)
    if width is None:
        raise NemesisError(f"model '{clip.name}' does not say its image-feature width; CoCoOp needs it")
    return int(width)


class CoCoOp(nn.Module):
    """CoCoOp's learner: unified ctx [M, W], a meta-net, and per-image text features [B, n_cls, D]."""

    method = "cocoop"
    image_inputs = (POOLED_FEATURES,)

    def __init__(
        self,
        clip: Backbone,
        classnames: list[str],
        n_ctx: int = 4,
        class_specific: bool = False,
        seed: int = 0,
        ctx: torch.Tensor | None = None,
        **prompt_options: Any,
    ) -> None:
        """`prompt_options` are PromptLearner's: ctx_init, class_position, chunk_size, token_budget."""
        super().__init__()
        if class_specific or (ctx is not None and ctx.dim() != 2):
            raise NemesisError("CoCoOp learns one unified context [M, W]; class-specific ctx is CoOp's (csc)")
        self.prompts = PromptLearner(clip, classnames, n_ctx=n_ctx, seed=seed, ctx=ctx, **prompt_options)
        self.clip = clip
        device = self.prompts.ctx.device
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the meta-net's default init, fixed by the run's seed
            self.meta_net = MetaNet(embed_dim_of(clip), self.prompts.encoder.width).to(device)

    # --- what every prompt method exposes -------------------------------------------------------

    @property
    def ctx(self) -> nn.Parameter:
        return self.prompts.ctx

    @property
    def classnames(self) -> list[str]:
        return self.prompts.classnames

    @property
    def n_classes(self) -> int:
        return self.prompts.n_classes

    @property
    def n_ctx(self) -> int:
        return self.prompts.n_ctx

    @property
    def class_specific(self) -> bool:
        return False

    @property
    def class_position(self) -> ClassPosition:
        return self.prompts.class_position

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{META_NET}.{name}": parameter for name, parameter in self.meta_net.named_parameters()}

    def norms(self, p: float = 2.0) -> torch.Tensor:
        """Per-position norms [M] of the learned ctx (before any image's shift)."""
        return position_norms(self.ctx, p)

    def for_classnames(self, classnames: list[str]) -> CoCoOp:
        """The same context and meta-net for other class names (base-to-new, domain shift)."""
        other = CoCoOp(
            self.clip,
            classnames,
            class_position=self.class_position,
            ctx=self.ctx.detach(),
            ctx_init=self.prompts.ctx_init,  # for the frozen rest of the init phrase; ctx itself is kept
            chunk_size=self.prompts.chunk_size,
            token_budget=self.prompts.token_budget,
        )
        other.meta_net.load_state_dict(self.meta_net.state_dict())
        return other

    # --- features -----------------------------------------------------------------------------

    def shifted_ctx(self, image_features: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Each image's context [B, M, W]: ctx [M, W] plus the meta-net's shift of the normalised feature."""
        ctx = self.ctx if ctx is None else ctx
        image = F.normalize(image_features.float(), dim=-1)  # [B, D]
        shift = self.meta_net(image)  # [B, W]
        return ctx.unsqueeze(0) + shift.unsqueeze(1)  # [B, M, W]

    def encode_shifted(self, shifted: torch.Tensor) -> torch.Tensor:
        """Text features [B, n_cls, D] of every class's prompt under each image's context [B, M, W].

        The single place CoCoOp's (image, class) rows are encoded: the CoOp learner's shared-prefix
        pass, each image's context one variant, so [SOS] + ctx_i runs once per image and every class
        suffix attends to it, in token-budgeted chunks cut after the end-of-text token.
        """
        return self.prompts.encode(shifted)

    def text_features(self, image_features: torch.Tensor, ctx: torch.Tensor | None = None) -> torch.Tensor:
        """Projected, unnormalised text features [B, n_cls, D] of each image's own prompts."""
        return self.encode_shifted(self.shifted_ctx(image_features, ctx))

    def _images_per_pass(self) -> int:
        return max(1, ROWS_PER_PASS // self.n_classes)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Training logits [B, n_cls]: each image against its own text features, times the logit scale."""
        image = F.normalize(image_features.float(), dim=-1)  # [B, D]
        rows = []
        for start in range(0, image.shape[0], self._images_per_pass()):
            features = image_features[start : start + self._images_per_pass()]
            text = F.normalize(self.text_features(features).float(), dim=-1)  # [b, n_cls, D]
            rows.append(torch.einsum("bd,bcd->bc", image[start : start + len(features)], text))
        return self.clip.model.logit_scale.exp().float() * torch.cat(rows)

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [K, B, n_cls] of each image with its own prompts, under K ctx variants [K, M, W].

        A variant changes ctx before the meta-net's shift is added (corruption acts on the learned ctx).
        """
        image = F.normalize(image_features.float(), dim=-1)  # [B, D]
        shift = self.meta_net(image)  # [B, W]: the same for every variant
        step = self._images_per_pass()
        out = []
        for variant in ctx_variants:
            rows = []
            for start in range(0, image.shape[0], step):
                shifted = variant.unsqueeze(0) + shift[start : start + step].unsqueeze(1)  # [b, M, W]
                text = F.normalize(self.encode_shifted(shifted).float(), dim=-1)  # [b, n_cls, D]
                rows.append(torch.einsum("bd,bcd->bc", image[start : start + step], text))
            out.append(torch.cat(rows))
        return torch.stack(out)  # [K, B, n_cls]

    def corruption_sites(self) -> list[CorruptionSite]:
        """Where sweeps corrupt CoCoOp's prompt: `corruption_sites_for` its ctx."""
        return self.corruption_sites_for(tuple(self.ctx.shape))

    @classmethod
    def corruption_sites_for(cls, ctx_shape: tuple[int, ...]) -> list[CorruptionSite]:
        """One site, all of ctx [M, W]: a variant changes ctx before the meta-net's shift is added."""

        return [WHOLE_CTX]

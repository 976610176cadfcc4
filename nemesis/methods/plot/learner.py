"""PLOT's prompt learner: N prompts per class ("X X ... X <class>.", ctx [N, M, W]) whose text features
are matched to an image's local features by optimal transport (`transport`).

The text side is CoOp's: the N prompts are N context variants of CoOp's unified prompt, so they run
through the same shared-prefix text pass, and K variants of PLOT's ctx are K x N variants there.
The image side is the local features [B, T, D] of `nemesis.model.local_features` (T tokens, the
global one first). Evaluation runs one Sinkhorn per `sinkhorn_batch` images, in the order given (the
official code's test batches of 100); training, one per training batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip.modified_resnet import ModifiedResNet

from ...constants import LOCAL_FEATURES
from ...errors import NemesisError
from ...model.clip_models import Backbone
from ...model.text_encoder import DEFAULT_TOKEN_BUDGET
from ...tensors import WHOLE_CTX, CorruptionSite
from ..coop.learner import PromptLearner
from . import ALL_TOKENS, OFFICIAL, OFFICIAL_TEST_BATCH, SPATIAL_TOKENS
from .transport import transport_plans, transport_scores

# Entries of the similarity tensor of one pass (16 MiB in fp32): variants side by side only while small,
# as one CPU thread runs a variant's small tensors faster than many variants' large ones (benchmarks/plot.py).
SIMILARITY_BUDGET = 2**22


class PLOTLearner(PromptLearner):
    """N learned prompts per class, `ctx` [N, M, W], scored against local image features by transport."""

    method = "plot"
    image_inputs = (LOCAL_FEATURES,)
    # The official PLOTNemesis sums Nemesis's norm penalties over the N prompts (and averages over
    # positions): N times the penalty of the prompts' mean norms, which is what the losses compute.
    norm_penalty_factor: float
    # Set by the trainer during a step of a batch sharded over processes: Sinkhorn then stops as it
    # would on the whole batch (its official rule averages over the batch).
    batch_sum = None

    def __init__(
        self,
        clip: Backbone,
        classnames: list[str],
        n_prompts: int = 4,
        n_ctx: int = 16,
        class_position: str = "end",
        image_tokens: str = ALL_TOKENS,
        stopping: str = OFFICIAL,
        sinkhorn_batch: int = OFFICIAL_TEST_BATCH,
        global_logit: bool = False,
        seed: int = 0,
        ctx: torch.Tensor | None = None,
        chunk_size: int | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> None:
        if image_tokens == SPATIAL_TOKENS and not isinstance(clip.model.visual, ModifiedResNet):
            raise NemesisError(
                f"PLOT's spatial image tokens are a ModifiedResNet's grid; {clip.name} takes image_tokens=all"
            )
        self.n_prompts = ctx.shape[0] if ctx is not None else n_prompts
        self.image_tokens, self.stopping, self.sinkhorn_batch = image_tokens, stopping, sinkhorn_batch
        self.global_logit = global_logit
        self.norm_penalty_factor = float(self.n_prompts)
        super().__init__(
            clip,
            classnames,
            n_ctx=n_ctx,
            class_position=class_position,
            seed=seed,
            ctx=ctx,
            chunk_size=chunk_size,
            token_budget=token_budget,
        )

    # --- construction (CoOp's, with the prompt axis) -------------------------------------------

    def _initial_ctx(self, init_tokens: list[int] | None, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(self.n_prompts, self.n_ctx, self.encoder.width, generator=generator) * 0.02

    def _checked_ctx(self, ctx: torch.Tensor) -> torch.Tensor:
        ctx = ctx.detach().float().clone().to(self.encoder.token_embedding.weight.device)
        if ctx.dim() != 3 or ctx.shape[-1] != self.encoder.width:
            raise NemesisError(
                f"PLOT ctx of shape {tuple(ctx.shape)} is not [N, M, {self.encoder.width}] for model '{self.clip.name}'"
            )
        if not torch.isfinite(ctx).all():
            raise NemesisError("ctx contains NaN or Inf values")
        return ctx

    def for_classnames(self, classnames: list[str]) -> PLOTLearner:
        """The same prompts for other class names (base-to-new, domain shift)."""
        return PLOTLearner(
            self.clip,
            classnames,
            image_tokens=self.image_tokens,
            stopping=self.stopping,
            sinkhorn_batch=self.sinkhorn_batch,
            global_logit=self.global_logit,
            ctx=self.ctx.detach(),
            chunk_size=self.chunk_size,
            token_budget=self.token_budget,
        )

    # --- features and scores -------------------------------------------------------------------

    def prompt_features(self, ctx_variants: torch.Tensor) -> torch.Tensor:
        """Normalised text features [K, N, n_cls, D] of K variants of ctx ([K, N, M, W])."""
        return F.normalize(self._raw_prompt_features(ctx_variants), dim=-1)

    def _raw_prompt_features(self, ctx_variants: torch.Tensor) -> torch.Tensor:
        """Projected, unnormalised text features [K, N, n_cls, D] of K variants of ctx."""
        n_variants = ctx_variants.shape[0]
        flat = ctx_variants.reshape(n_variants * self.n_prompts, self.n_ctx, ctx_variants.shape[-1])
        features = self.encode(flat).float()  # [K * N, n_cls, D]
        return features.reshape(n_variants, self.n_prompts, self.n_classes, -1)

    def _text_sides(self, ctx_variants: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The transport's normalised prompt features [K, N, n_cls, D] and, with `global_logit`, the
        normalised mean of each class's N prompt features [K, n_cls, D] (as the PLOT authors pool them)."""
        raw = self._raw_prompt_features(ctx_variants)
        pooled = F.normalize(raw.mean(dim=1), dim=-1) if self.global_logit else None
        return F.normalize(raw, dim=-1), pooled

    def _global_similarities(self, image_features: torch.Tensor, pooled: torch.Tensor | None) -> torch.Tensor | float:
        """cos(global token, pooled prompt features) [K, B, n_cls], or 0 without `global_logit`."""
        if pooled is None:
            return 0.0
        return torch.einsum("bd,kcd->kbc", F.normalize(image_features[:, 0].float(), dim=-1), pooled)

    @property
    def includes_global_token(self) -> bool:
        """Whether the transport's image side starts with token 0, the global one (else only spatial tokens)."""
        return self.image_tokens == ALL_TOKENS

    def _tokens(self, image_features: torch.Tensor) -> torch.Tensor:
        """Normalised image tokens [B, T, D] the transport uses: all, or the spatial ones (token 0 dropped)."""
        if image_features.dim() != 3:
            raise NemesisError(f"PLOT takes local image features [B, T, D], not {tuple(image_features.shape)}")
        tokens = image_features[:, 1:] if self.image_tokens == SPATIAL_TOKENS else image_features
        return F.normalize(tokens.float(), dim=-1)

    def transport_similarities(self, image_features: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """sum(T * sim) [K, B, n_cls] of image features [B, T, D] and normalised text [K, N, n_cls, D],
        one Sinkhorn run over all B images per variant; variants side by side, as many as
        `SIMILARITY_BUDGET` entries of [B, n_cls, T, N] allow."""
        tokens = self._tokens(image_features)  # [B, T, D]
        n_images, n_tokens = tokens.shape[:2]
        per_variant = n_images * self.n_classes * n_tokens * self.n_prompts
        group = max(1, SIMILARITY_BUDGET // per_variant)
        scores = []
        for part in text.split(group):
            pairs = self._pair_similarities(tokens, part)  # [k, B * n_cls, T, N]
            scores.append(
                transport_scores(pairs, self.stopping, self.batch_sum).reshape(part.shape[0], n_images, self.n_classes)
            )
        return torch.cat(scores)

    def _pair_similarities(self, tokens: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [K, B * n_cls, T, N] of normalised tokens [B, T, D] and text [K, N, n_cls, D]:
        the (image, class) pairs of one Sinkhorn run per variant, image-major."""
        similarities = torch.einsum("btd,kncd->kbctn", tokens, text)  # [K, B, n_cls, T, N]
        return similarities.flatten(1, 2)

    def plans(self, image_features: torch.Tensor, image_index: int, classes: list[int]) -> torch.Tensor:
        """Transport plans [len(classes), T, N] that the learner's own prompt gives image `image_index` of
        `image_features` [N_img, T_img, D] (the evaluation's order) for `classes`; T counts the tokens the
        transport uses (`_tokens`).

        The official stopping rule is one decision per run, so the plan is taken from the run evaluation
        makes: the one over the image's block of `sinkhorn_batch` images and all classes."""
        n_images = image_features.shape[0]
        if not 0 <= image_index < n_images:
            raise NemesisError(f"image {image_index} is not one of the {n_images} images (0 to {n_images - 1})")
        start = image_index // self.sinkhorn_batch * self.sinkhorn_batch
        tokens = self._tokens(image_features[start : start + self.sinkhorn_batch])  # the image's block
        text = self.prompt_features(self.ctx.detach().unsqueeze(0))  # [1, N, n_cls, D]
        pairs = self._pair_similarities(tokens, text)  # [1, B * n_cls, T, N]
        block_plans = transport_plans(pairs, self.stopping, self.batch_sum)[0].unflatten(
            0, (tokens.shape[0], self.n_classes)
        )
        return block_plans[image_index - start, list(classes)]  # [len(classes), T, N]

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor:
        """Transport similarities [K, B, n_cls] of local features [B, T, D] under K ctx variants, one
        Sinkhorn run per `sinkhorn_batch` images in the order given (each variant its own run)."""
        return self.scorer(ctx_variants)(image_features)

    def scorer(self, ctx_variants: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """`similarities` under K ctx variants as a function of the images, the prompts encoded once."""
        text, pooled = self._text_sides(ctx_variants)

        def score(image_features: torch.Tensor) -> torch.Tensor:
            blocks = image_features.split(self.sinkhorn_batch)
            transport = torch.cat([self.transport_similarities(block, text) for block in blocks], dim=1)
            return transport + self._global_similarities(image_features, pooled)

        return score

    @property
    def image_block(self) -> int:
        """Images scored together: one Sinkhorn run per `sinkhorn_batch` (its stopping rule is the run's)."""
        return self.sinkhorn_batch

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Training logits [B, n_cls]: logit scale x transport similarity, one Sinkhorn over the batch;
        gradients reach ctx through the similarities, not through the plan."""
        text, pooled = self._text_sides(self.ctx.unsqueeze(0))
        scores = self.transport_similarities(image_features, text) + self._global_similarities(image_features, pooled)
        return self.clip.model.logit_scale.exp().float() * scores[0]

    def text_features(self, cut: bool = True) -> torch.Tensor:
        """Projected, unnormalised text features [N, n_cls, D] of the current prompts."""
        return self.encode(self.ctx, cut=cut)

    # --- corruption sites ----------------------------------------------------------------------

    def corruption_sites(self) -> list[CorruptionSite]:
        return self.corruption_sites_for(tuple(self.ctx.shape))

    @classmethod
    def corruption_sites_for(cls, ctx_shape: tuple[int, ...]) -> list[CorruptionSite]:
        """Position j of every prompt at once (the one PLOT corruption the official code has: PAN's)."""
        return [WHOLE_CTX]

    @classmethod
    def optional_corruption_sites_for(cls, ctx_shape: tuple[int, ...]) -> list[CorruptionSite]:
        """Position j of prompt n alone, one site per prompt (`nemesis corrupt --all-sites`)."""
        return [CorruptionSite(f"prompt {n}", index=(n,)) for n in range(ctx_shape[0])]

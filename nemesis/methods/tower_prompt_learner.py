"""The learner of prompts inside the towers (VPT, IVLP, MaPLe, PromptSRC): one class, configured by
the method's options (`nemesis.methods.tower_prompts`); each method's room subclasses it by name.

Text prompts: a stack [dt, n, Wt]. Row 0 is CoOp's unified context after the start token (the
prompt reads "<ctx> <the init phrase's other words> <class>."), run by CoOp's text pass; rows
1..dt-1 replace positions 1..n at the inputs of text layers 1..dt-1, inside the shared prefix, so
the prefix still runs once per variant. Without text prompts (VPT) the text side is the fixed
hand-crafted prompt "a photo of a {}.".

Vision prompts: a stack [dv, n, Wv] (MaPLe: row l = Linear_l(text row l), computed), entering the
ViT from its patch embeddings, which the feature cache holds (image input "patches"): row 0
appended after the patches (or KMnP's place after the class token), rows 1..dv-1 replacing the
prompt slots at layers 1..dv-1.

Sweeps pass the corrupted site: a variant that differs from the prompt from layer l of the image
tower on runs the image blocks from l on hidden states computed once per chunk of variants
(for a text site of an uncoupled method, the image features are computed once).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ..constants import CTX_TENSOR, PATCH_TOKENS
from ..data.templates import DEFAULT_TEMPLATE
from ..errors import NemesisError
from ..model.clip_models import Backbone
from ..model.text_encoder import DEFAULT_TOKEN_BUDGET
from ..model.vision_prompts import check_vision_prompts, insert_prompts, pool_prompted, run_blocks, token_width
from ..penalties.hand_crafted import prompt_features
from ..tensors import CorruptionSite, position_norms
from .coop.learner import PromptLearner, phrase_prompts
from .tower_prompts import (
    EVERY_TOWER,
    PROJECTION_BIAS,
    PROJECTION_WEIGHT,
    TEXT_TOWER,
    VISION_TOWER,
    TowerPromptsConfig,
    stack_name,
)

PROMPT_INIT_STD = 0.02  # N(0, 0.02^2): the deep prompts' init in MaPLe, IVLP and PromptSRC
# Image tokens per vision pass (variants x images x sequence length): bounds activation memory.
VISION_TOKEN_BUDGET = 2**17

Stacks = dict[str, torch.Tensor]  # tower -> prompt stacks [K, depth, n, W], one per variant


class TowerPromptLearner(nn.Module):
    """Prompt stacks in one or both CLIP towers; `ctx` is the stack of the method's first tower."""

    method: ClassVar[str] = ""
    config_class: ClassVar[type[TowerPromptsConfig]] = TowerPromptsConfig
    image_inputs = (PATCH_TOKENS,)
    scores_sites = True  # `scorer` and `similarities` take the corrupted site (layer reuse)

    def __init__(
        self,
        clip: Backbone,
        classnames: list[str],
        seed: int = 0,
        ctx: torch.Tensor | None = None,
        chunk_size: int | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        **options: Any,
    ) -> None:
        super().__init__()
        if not classnames:
            raise NemesisError("no class names given")
        if ctx is not None:
            options["n_ctx"] = ctx.shape[-2]
        self.options = self.config_class(**options)
        self.clip, self.chunk_size, self.token_budget = clip, chunk_size, token_budget
        self.classnames = [name.replace("_", " ") for name in classnames]
        self.depths = self._depths(ctx)
        self.placement = self.options.vision_placement
        generator = torch.Generator().manual_seed(seed)
        device = clip.model.logit_scale.device
        self.text = self._text_side() if TEXT_TOWER in self.depths else None
        if self.text is None:
            self.register_buffer("fixed_text_features", self._hand_crafted_features(), persistent=False)
        first = self.options.first_tower
        if ctx is None:
            ctx = self._initial_stack(first, generator)
        self.ctx = nn.Parameter(self._checked_stack(ctx, first).to(device))
        self.second_tower = None  # the other tower's stack, when it is learned apart (IVLP's image, VPT's text)
        if self.options.coupled and VISION_TOWER in self.depths:
            weight, bias = self._projections(generator)
            self.projection_weight = nn.Parameter(weight.to(device))
            self.projection_bias = nn.Parameter(bias.to(device))
        elif len(self.options.towers()) > 1:
            self.second_tower = self.options.towers()[1]
            self.second_stack = nn.Parameter(self._initial_stack(self.second_tower, generator).to(device))

    # --- construction ---------------------------------------------------------------------------

    def _layers(self, tower: str) -> int:
        model = self.clip.model
        blocks = model.transformer.resblocks if tower == TEXT_TOWER else model.visual.transformer.resblocks
        return len(blocks)

    def _depths(self, ctx: torch.Tensor | None) -> dict[str, int]:
        """Prompted layers per tower: the configured depth capped at the tower's layers (the first tower's
        from ctx when given)."""
        configured = {TEXT_TOWER: self.options.text_depth, VISION_TOWER: self.options.vision_depth}
        check_vision_prompts(self.clip.model.visual, self.clip.name)  # patch embeddings are its image input
        depths = {tower: min(depth, self._layers(tower)) for tower, depth in configured.items() if depth > 0}
        if ctx is not None:
            first = self.options.first_tower
            if ctx.dim() != 3 or not 1 <= ctx.shape[0] <= self._layers(first):
                raise NemesisError(
                    f"{self.method} ctx of shape {tuple(ctx.shape)} is not a {first} prompt stack [depth, n, W] "
                    f"for the {self._layers(first)} {first} layers of model '{self.clip.name}'"
                )
            depths[first] = ctx.shape[0]
            if self.options.coupled and VISION_TOWER in depths:
                depths[VISION_TOWER] = min(ctx.shape[0], self._layers(VISION_TOWER))
        return depths

    def _width(self, tower: str) -> int:
        model = self.clip.model
        return model.token_embedding.weight.shape[1] if tower == TEXT_TOWER else token_width(model.visual)

    def _initial_stack(self, tower: str, generator: torch.Generator) -> torch.Tensor:
        """A tower's stack at the start of training: N(0, 0.02^2) (KMnP's prepended prompts: Xavier-uniform),
        the text stack's row 0 from the init phrase when it has at least n tokens."""
        shape = (self.depths[tower], self.options.n_ctx, self._width(tower))
        if tower == VISION_TOWER and self.placement == "prepend":
            patch = self.clip.model.visual.conv1.weight.shape[-1]
            bound = math.sqrt(6.0 / (3 * patch * patch + shape[-1]))  # KMnP's Xavier-uniform of the patch projection
            return (torch.rand(shape, generator=generator) * 2 - 1) * bound
        stack = torch.randn(shape, generator=generator) * PROMPT_INIT_STD
        if tower == TEXT_TOWER and self.text.ctx_init is not None:
            stack[0] = self.text.ctx.detach().cpu()  # the phrase's first n token embeddings
        return stack

    def _text_side(self) -> PromptLearner:
        """CoOp's layout and text pass for the layer-0 text prompt (its own ctx unused and frozen)."""
        n, init = self.options.n_ctx, self.options.ctx_init
        options = {"chunk_size": self.chunk_size, "token_budget": self.token_budget}
        if init is not None and len(self.clip.tokenizer.encode(init.replace("_", " "))) >= n:
            return phrase_prompts(self.clip, self.classnames, init, n, **options)  # its first n tokens learned
        # As MaPLe and IVLP: a phrase shorter than n leaves ctx random and "X X ..." in the text.
        text = PromptLearner(self.clip, self.classnames, n_ctx=n, **options)
        text.ctx.requires_grad_(False)
        return text

    def _projections(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """MaPLe's Linear_l(Wt -> Wv) per vision layer, stacked: weight [dv, Wv, Wt], bias [dv, Wv]; nn.Linear's
        init (uniform within 1 / sqrt(Wt))."""
        depth, text_width, vision_width = self.depths[VISION_TOWER], self._width(TEXT_TOWER), self._width(VISION_TOWER)
        bound = 1.0 / math.sqrt(text_width)
        weight = (torch.rand(depth, vision_width, text_width, generator=generator) * 2 - 1) * bound
        bias = (torch.rand(depth, vision_width, generator=generator) * 2 - 1) * bound
        return weight, bias

    def _checked_stack(self, stack: torch.Tensor, tower: str) -> torch.Tensor:
        stack = stack.detach().float().clone()
        expected = (self.depths[tower], self.options.n_ctx, self._width(tower))
        if tuple(stack.shape) != expected:
            raise NemesisError(f"{self.method} {tower} prompts of shape {tuple(stack.shape)}; expected {expected}")
        if not torch.isfinite(stack).all():
            raise NemesisError(f"{self.method} {tower} prompts contain NaN or Inf values")
        return stack

    def _hand_crafted_features(self) -> torch.Tensor:
        """Normalised text features [n_cls, D] of "a photo of a {}." (VPT's fixed text side)."""
        return prompt_features(self.clip, [DEFAULT_TEMPLATE.format(name) for name in self.classnames])

    # --- the prompts ----------------------------------------------------------------------------

    @property
    def n_ctx(self) -> int:
        return self.options.n_ctx

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def _learned(self) -> dict[str, torch.Tensor]:
        """Every learned tensor by checkpoint name."""
        return {CTX_TENSOR: self.ctx, **self.extra_parameters()}

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        if self.second_tower is not None:
            return {self.options.tensor_name(self.second_tower): self.second_stack}
        if hasattr(self, "projection_weight"):
            return {PROJECTION_WEIGHT: self.projection_weight, PROJECTION_BIAS: self.projection_bias}
        return {}

    def stacks(self, variants: dict[str, torch.Tensor] | None = None) -> Stacks:
        """Each prompted tower's stacks [K, depth, n, W] from learned tensors [K, ...] by checkpoint name
        (default: the learner's own, K = 1); MaPLe's vision stack is projected from the text stack."""
        tensors = {name: tensor.unsqueeze(0) for name, tensor in self._learned().items()}
        tensors |= variants or {}
        stacks = {tower: tensors[self.options.tensor_name(tower)] for tower in self.options.towers()}
        if PROJECTION_WEIGHT in tensors:
            text = tensors[CTX_TENSOR][:, : self.depths[VISION_TOWER]]  # [K, dv, n, Wt]
            weight, bias = tensors[PROJECTION_WEIGHT], tensors[PROJECTION_BIAS]  # [1, dv, Wv, Wt], [1, dv, Wv]
            stacks[VISION_TOWER] = text @ weight.transpose(-1, -2) + bias.unsqueeze(-2)  # [K, dv, n, Wv]
        return stacks

    def prompt_tensors(self) -> dict[str, torch.Tensor]:
        """Every tower's prompt stack [depth, n, W] as the model uses it (MaPLe's vision one projected), with
        gradients: what Nemesis's norms are taken of."""
        return {tower: stack[0] for tower, stack in self.stacks().items()}

    def norms(self, p: float = 2.0) -> torch.Tensor:
        """Per-position norms [n] of ctx, averaged over its layers."""
        return position_norms(self.ctx, p)

    def mean_prompt_norm(self, p: float = 2.0) -> torch.Tensor:
        """PUN over every tower: the mean of every (tower, layer, position) norm, or with norm_average
        every-tower, the mean of each tower's mean norm."""
        norms = [torch.linalg.vector_norm(stack, ord=p, dim=-1).reshape(-1) for stack in self.prompt_tensors().values()]
        if self.options.norm_average == EVERY_TOWER:
            return torch.stack([tower.mean() for tower in norms]).mean()
        return torch.cat(norms).mean()

    # --- features -------------------------------------------------------------------------------

    def text_features(self, stacks: Stacks) -> torch.Tensor:
        """Text features [K, n_cls, D] (K = 1 when the text side is fixed or not among the stacks' variants)."""
        if self.text is None:
            return self.fixed_text_features.unsqueeze(0)
        text = stacks[TEXT_TOWER]  # [K, dt, n, Wt]
        deep = [text[:, layer] for layer in range(1, text.shape[1])]
        return self.text.encode(text[:, 0], deep_prompts=deep)

    def hidden_states(self, patches: torch.Tensor, vision: torch.Tensor, last: int) -> torch.Tensor:
        """Hidden states [B, T + n, Wv] entering image layer `last` of patch embeddings [B, T, Wv] under one
        vision stack [dv, n, Wv]."""
        visual = self.clip.model.visual
        x = insert_prompts(visual, patches, vision[0], self.placement)
        return run_blocks(visual, x, list(vision), self.placement, first=0, last=last)

    def image_features(
        self, patches: torch.Tensor, vision: torch.Tensor | None, first: int = 0, entering: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Image features [K, B, D] of patch embeddings [B, T, Wv] under K vision stacks [K, dv, n, Wv] (None:
        no vision prompts, K = 1). With `first` > 0, `entering` [B, T + n, Wv] are the hidden states entering
        layer `first`, the same under every stack: the blocks run from there."""
        visual = self.clip.model.visual
        if vision is None:
            x = run_blocks(visual, insert_prompts(visual, patches, None), ())
            return pool_prompted(visual, x, 0).unsqueeze(0)
        n_variants, (n_images, length) = vision.shape[0], patches.shape[:2]
        per_pass = max(1, VISION_TOKEN_BUDGET // (n_images * length))
        rows = []
        for start in range(0, n_variants, per_pass):
            chunk = vision[start : start + per_pass]  # [k, dv, n, Wv]
            k = chunk.shape[0]
            layers = [row.repeat_interleave(n_images, dim=0) for row in chunk.unbind(1)]  # dv x [k * B, n, Wv]
            if first > 0:
                x = entering.repeat(k, 1, 1)
            else:
                x = insert_prompts(visual, patches.repeat(k, 1, 1), layers[0], self.placement)
            x = run_blocks(visual, x, layers, self.placement, first=first)
            rows.append(pool_prompted(visual, x, chunk.shape[-2], self.placement).reshape(k, n_images, -1))
        return torch.cat(rows)

    def _scores(self, images: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [K, B, n_cls] of image features [K or 1, B, D] and text features [K or 1, n_cls, D]."""
        return F.normalize(images.float(), dim=-1) @ F.normalize(text.float(), dim=-1).transpose(1, 2)

    # --- the prompt-method interface (nemesis.methods.protocol) ----------------------------------

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Training logits [B, n_cls] of patch embeddings [B, T, Wv], with gradients to every learned tensor."""
        stacks = self.stacks()
        scale = self.clip.model.logit_scale.exp().float()
        images = self.image_features(image_features, stacks.get(VISION_TOWER))
        return scale * self._scores(images, self.text_features(stacks))[0]

    def similarities(
        self, image_features: torch.Tensor, ctx_variants: torch.Tensor, site: CorruptionSite | None = None
    ) -> torch.Tensor:
        """Cosine similarities [K, B, n_cls] of patch embeddings under K variants of the site's tensor (ctx)."""
        return self.scorer(ctx_variants, site)(image_features)

    def scorer(
        self, variants: torch.Tensor, site: CorruptionSite | None = None
    ) -> Callable[[torch.Tensor], torch.Tensor]:
        """`similarities` as a function of the images: the text side encoded once, and the image side run
        from the layer where the variants start to differ from the learner's own prompt."""
        name = CTX_TENSOR if site is None else site.tensor
        own = self._learned()[name].detach()
        stacks = self.stacks({name: variants})
        tower = next(tower for tower in self.options.towers() if self.options.tensor_name(tower) == name)
        text_changes = tower == TEXT_TOWER
        vision_changes = VISION_TOWER in stacks and (tower == VISION_TOWER or self.options.coupled)
        text = self.text_features(stacks if text_changes else self.stacks())
        first = self._first_changed_layer(variants, own) if vision_changes else 0

        def score(images: torch.Tensor) -> torch.Tensor:
            if not vision_changes:
                return self._scores(self.image_features(images, self.stacks().get(VISION_TOWER)), text)
            entering = None
            if first > 0:
                entering = self.hidden_states(images, self.stacks()[VISION_TOWER][0], first)
            return self._scores(self.image_features(images, stacks[VISION_TOWER], first, entering), text)

        return score

    def _first_changed_layer(self, variants: torch.Tensor, own: torch.Tensor) -> int:
        """The first stack row (layer) at which any variant [K, depth, ...] differs from `own` [depth, ...] in
        what reaches the image tower (0 for projection variants); layers before it need no re-run."""
        if variants.dim() != own.dim() + 1 or variants.shape[1] != own.shape[0] or own.dim() != 3:
            return 0
        differs = (variants != own.unsqueeze(0)).flatten(2).any(-1).any(0)  # [depth]
        changed = torch.nonzero(differs).flatten()
        return int(changed[0]) if len(changed) else 0

    def for_classnames(self, classnames: list[str]) -> TowerPromptLearner:
        """The same prompts for other class names (base-to-new, domain shift)."""
        other = type(self)(
            self.clip,
            classnames,
            ctx=self.ctx.detach(),
            chunk_size=self.chunk_size,
            token_budget=self.token_budget,
            **{name: value for name, value in vars(self.options).items() if name != "n_ctx"},
        )
        with torch.no_grad():
            for name, parameter in other.extra_parameters().items():
                parameter.copy_(self.extra_parameters()[name])
        return other

    def corruption_sites(self) -> list[CorruptionSite]:
        return self.corruption_sites_of({name: tuple(t.shape) for name, t in self._learned().items()})

    @classmethod
    def corruption_sites_for(cls, ctx_shape: tuple[int, ...]) -> list[CorruptionSite]:
        """Each layer of ctx's stack (the first tower's); `corruption_sites_of` adds the other tower's."""
        return cls.corruption_sites_of({CTX_TENSOR: ctx_shape})

    @classmethod
    def corruption_sites_of(cls, shapes: dict[str, tuple[int, ...]]) -> list[CorruptionSite]:
        """One site per (tower, layer) of the learned stacks, by their shapes: "text layer 0", ...; MaPLe's
        text sites change the vision prompts through the projections, as the model computes them."""
        config = cls.config_class
        towers = {CTX_TENSOR: config.first_tower} | {stack_name(t): t for t in (TEXT_TOWER, VISION_TOWER)}
        return [
            CorruptionSite(
                f"{towers[name]} layer {layer}", tensor=name, index=(layer,), tower=towers[name], layer=layer
            )
            for name in (CTX_TENSOR, *config.possible_tensor_names())
            if name in shapes
            for layer in range(shapes[name][0])
        ]

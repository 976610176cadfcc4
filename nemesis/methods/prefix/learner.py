"""Prefix tuning's learner: learned keys and values in every layer of the text tower.

The text side is "a photo of a <class>." through CoOp's layout and text pass (its context fixed to the
words' embeddings), with the learned keys and values before every layer's own (`TextEncoder`'s
`kv_prefix`): [SOS] "a photo of a" is the same for every class, so it runs once per variant.
Reparameterised, the learned tensors are the embedding and the MLP and ctx is what they give;
otherwise ctx itself is learned.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...constants import CTX_TENSOR, POOLED_FEATURES
from ...errors import NemesisError
from ...model.clip_models import Backbone
from ...model.text_encoder import DEFAULT_TOKEN_BUDGET
from ...tensors import CorruptionSite, position_norms
from ..coop.learner import PromptedCLIP, PromptLearner, phrase_prompts
from . import PREFIX_PROMPT, PrefixConfig

DIRECT_INIT_STD = 0.02  # a prefix learned directly starts from N(0, 0.02^2), as CoOp's context does
KEY_VALUE = ("key", "value")  # ctx[l, 0] and ctx[l, 1]
# The sweep table's `tower` of a site: the text tower's keys or values, so tables and figures keep them apart.
KEY_VALUE_TOWERS = ("text keys", "text values")


class PrefixLearner(nn.Module):
    """P learned keys and values per text layer, ctx [layers, 2, P, W]."""

    method = "prefix"
    image_inputs = (POOLED_FEATURES,)

    def __init__(
        self,
        clip: Backbone,
        classnames: list[str],
        n_ctx: int = 8,
        reparameterize: bool = True,
        hidden: int = 512,
        seed: int = 0,
        ctx: torch.Tensor | None = None,
        chunk_size: int | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
    ) -> None:
        super().__init__()
        self.clip = clip
        self.options = PrefixConfig(
            n_ctx=n_ctx if ctx is None else ctx.shape[-2], reparameterize=reparameterize, hidden=hidden
        )
        self.text = self._text_side(classnames, chunk_size, token_budget)
        self.layers = len(self.text.encoder.tower.transformer.resblocks)
        self.width = self.text.encoder.width
        device = self.text.ctx.device
        generator = torch.Generator().manual_seed(seed)
        self.reparameterized = reparameterize and ctx is None  # a given prefix is evaluated as it is
        if self.reparameterized:
            self.embedding = nn.Parameter(torch.randn(self.n_ctx, self.width, generator=generator).to(device))
            self.mlp = self._mlp(generator).to(device)
        else:
            prefix = ctx if ctx is not None else torch.randn(self.shape, generator=generator) * DIRECT_INIT_STD
            self.prefix = nn.Parameter(self._checked(prefix).to(device))

    def _text_side(self, classnames: list[str], chunk_size: int | None, token_budget: int) -> PromptLearner:
        """CoOp's layout of "a photo of a <class>.", the four words a fixed context (shared by every class)."""
        words = len(self.clip.tokenizer.encode(PREFIX_PROMPT))
        return phrase_prompts(
            self.clip, classnames, PREFIX_PROMPT, words, chunk_size=chunk_size, token_budget=token_budget
        )

    def _mlp(self, generator: torch.Generator) -> nn.Sequential:
        """Linear(W, hidden) - Tanh - Linear(hidden, layers x 2 x W), nn.Linear's init drawn from `generator`."""
        mlp = nn.Sequential(
            nn.Linear(self.width, self.options.hidden),
            nn.Tanh(),
            nn.Linear(self.options.hidden, self.layers * 2 * self.width),
        )
        with torch.no_grad():
            for linear in (mlp[0], mlp[2]):
                bound = 1.0 / math.sqrt(linear.in_features)
                for tensor in (linear.weight, linear.bias):
                    tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)
        return mlp

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.layers, 2, self.n_ctx, self.width)

    def _checked(self, prefix: torch.Tensor) -> torch.Tensor:
        prefix = prefix.detach().float().clone()
        if tuple(prefix.shape) != self.shape:
            raise NemesisError(
                f"prefix of shape {tuple(prefix.shape)}; model '{self.clip.name}' takes [layers, 2, P, W] = "
                f"{list(self.shape)}"
            )
        if not torch.isfinite(prefix).all():
            raise NemesisError("the prefix contains NaN or Inf values")
        return prefix

    # --- the prompt -----------------------------------------------------------------------------

    @property
    def ctx(self) -> torch.Tensor:
        """The keys and values [layers, 2, P, W]: learned, or what the reparameterisation gives (with gradients
        to the embedding and the MLP)."""
        if not self.reparameterized:
            return self.prefix
        flat = self.mlp(self.embedding)  # [P, layers x 2 x W]
        return flat.reshape(self.n_ctx, self.layers, 2, self.width).permute(1, 2, 0, 3)

    @property
    def n_ctx(self) -> int:
        return self.options.n_ctx

    @property
    def n_classes(self) -> int:
        return self.text.n_classes

    @property
    def classnames(self) -> list[str]:
        return self.text.classnames

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        """What training updates, by name: the embedding and the MLP, or ctx itself."""
        if not self.reparameterized:
            return {CTX_TENSOR: self.prefix}
        return {"embedding": self.embedding, **{f"mlp.{name}": p for name, p in self.mlp.named_parameters()}}

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """None: prompt files carry ctx alone (the reparameterisation is dropped after training)."""
        return {}

    def norms(self, p: float = 2.0) -> torch.Tensor:
        """Per-index norms [P], averaged over layers and keys/values."""
        return position_norms(self.ctx, p)

    # --- scores ---------------------------------------------------------------------------------

    def text_features(self, variants: torch.Tensor) -> torch.Tensor:
        """Text features [K, n_cls, D] under K prefixes [K, layers, 2, P, W]."""
        words = self.text.ctx.detach().expand(variants.shape[0], -1, -1)
        return self.text.encode(words, kv_prefix=variants)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        return PromptedCLIP(self.text).logits(image_features, self.text_features(self.ctx.unsqueeze(0))[0])

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor:
        return self.scorer(ctx_variants)(image_features)

    def scorer(self, ctx_variants: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        text = F.normalize(self.text_features(ctx_variants).float(), dim=-1)  # [K, n_cls, D]
        return lambda image_features: F.normalize(image_features.float(), dim=-1) @ text.transpose(1, 2)

    def for_classnames(self, classnames: list[str]) -> PrefixLearner:
        options = {"chunk_size": self.text.chunk_size, "token_budget": self.text.token_budget}
        return PrefixLearner(self.clip, classnames, ctx=self.ctx.detach(), hidden=self.options.hidden, **options)

    def corruption_sites(self) -> list[CorruptionSite]:
        return self.corruption_sites_for(tuple(self.ctx.shape))

    @classmethod
    def corruption_sites_for(cls, ctx_shape: tuple[int, ...]) -> list[CorruptionSite]:
        """One site per (layer, key or value): "layer 3 key", tower "text keys"; its positions are the P indices."""
        return [
            CorruptionSite(
                f"layer {layer} {KEY_VALUE[kind]}", index=(layer, kind), tower=KEY_VALUE_TOWERS[kind], layer=layer
            )
            for layer in range(ctx_shape[0])
            for kind in range(2)
        ]

"""CoOp's prompt learner on open_clip: learnable context vectors around each class name.

Prompt = [SOS] ctx_1..ctx_M [class tokens] [.] [EOT] (class position `end`), or with the class
name in the middle of the context or in front of it. Only `ctx` is a parameter; the token
embeddings of everything else are frozen buffers, and the CLIP tower is driven by `TextEncoder`.

An init phrase works as in CoOp: M is its number of words, ctx starts as the embeddings of its
first M BPE tokens, and any further tokens of the phrase stay in the prompt, frozen, right after
ctx ("an X-ray of a" is 6 tokens: 4 learned, "of a" frozen), so the prompt reads as the phrase.
ProGrad's padded init (`pad_init`) keeps M: with k the phrase's word count, ctx starts as M - k
zero vectors followed by the embeddings of its first k tokens, the rest frozen after ctx as above.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ...choices import ClassPosition
from ...constants import POOLED_FEATURES
from ...errors import NemesisError
from ...model.clip_models import Backbone
from ...model.deep_prompts import LayerPrompts
from ...model.text_encoder import DEFAULT_TOKEN_BUDGET, TextEncoder
from ...tensors import WHOLE_CTX, CorruptionSite, at_least_fp32, position_norms
from ...wording import plural
from . import init_word_count

PLACEHOLDER = "X"  # CoOp's stand-in word for context positions before their embeddings are swapped in


class PromptLearner(nn.Module):
    """Learnable context `ctx` ([M, W] unified, or [n_cls, M, W] class-specific) and its text features."""

    share_prefix = True  # run [SOS] + the shared context once per variant (False: whole prompts, for checks)

    def __init__(
        self,
        clip: Backbone,
        classnames: list[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        class_position: ClassPosition | str = "end",
        seed: int = 0,
        ctx: torch.Tensor | None = None,
        chunk_size: int | None = None,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        pad_init: bool = False,
    ) -> None:
        super().__init__()
        if not classnames:
            raise NemesisError("no class names given")
        try:
            class_position = ClassPosition(class_position)
        except ValueError:
            choices = ", ".join(p.value for p in ClassPosition)
            raise NemesisError(f"unknown class position '{class_position}'; choose one of {choices}") from None
        self.clip = clip
        self.encoder = TextEncoder(clip.model, clip.name, clip.tokenizer)
        self.classnames = [name.replace("_", " ") for name in classnames]
        self.class_specific = class_specific
        self.class_position = class_position
        ctx_init = ctx_init.replace("_", " ") if ctx_init else None  # CoOp accepts "a_photo_of_a"
        self.ctx_init = ctx_init
        self.pad_init = pad_init
        self.chunk_size = chunk_size  # at most this many prompts per text pass (None: as the token budget allows)
        self.token_budget = token_budget  # at most this many tokens (prompts x cut length) per text pass

        init_tokens = self._words(ctx_init) if ctx_init else None
        if init_tokens is not None and not pad_init:
            n_ctx = init_word_count(ctx_init)
        if ctx is not None:
            n_ctx = ctx.shape[-2]
        if n_ctx < 1:
            raise NemesisError(f"n_ctx must be at least 1, got {n_ctx}")
        self.n_ctx = n_ctx
        # The init phrase's tokens that become context vectors: n_ctx, or its word count when padded.
        self.init_vectors = init_word_count(ctx_init) if init_tokens is not None and pad_init else n_ctx
        if self.init_vectors > n_ctx:
            raise NemesisError(f"ctx init '{ctx_init}' has more words than the {n_ctx} context vectors")
        # CoOp (and ProGrad) keep the init phrase's tokens beyond those in the prompt, frozen.
        self.frozen_init_tokens = init_tokens[self.init_vectors :] if init_tokens is not None else []
        if self.frozen_init_tokens and class_position is not ClassPosition.end:
            raise NemesisError(
                f"ctx init '{ctx_init}' has more tokens ({len(init_tokens)}) than words ({n_ctx}); CoOp's layout for "
                "such an init keeps the rest of the phrase before the class name, so use class position end"
            )
        if init_tokens is not None and len(init_tokens) < self.init_vectors:
            raise NemesisError(
                f"ctx init '{ctx_init}' has {plural(len(init_tokens), 'token')} for "
                f"{plural(self.init_vectors, 'context vector')}"
            )
        if ctx is None:
            ctx = self._initial_ctx(init_tokens, seed)
        self.ctx = nn.Parameter(self._checked_ctx(ctx))

        token_ids, ctx_index = self._layout()
        device = self.encoder.token_embedding.weight.device
        self.register_buffer("token_ids", token_ids.to(device), persistent=False)  # [n_cls, L]
        self.register_buffer("ctx_index", ctx_index.to(device), persistent=False)  # [n_cls, M]
        self.register_buffer("pool_index", self.encoder.pool_index(token_ids).to(device), persistent=False)
        with torch.no_grad():
            frozen = self.encoder.token_embedding(self.token_ids)  # [n_cls, L, W]
        self.register_buffer("frozen_embeddings", frozen.float(), persistent=False)

    # --- construction -------------------------------------------------------------------------

    def _words(self, text: str) -> list[int]:
        return list(self.clip.tokenizer.encode(text))

    def _initial_ctx(self, init_tokens: list[int] | None, seed: int) -> torch.Tensor:
        width = self.encoder.width
        if init_tokens is not None:
            weight = self.encoder.token_embedding.weight
            learned = init_tokens[: self.init_vectors]  # CoOp: the first n_ctx BPE tokens of the phrase
            with torch.no_grad():
                words = weight[torch.tensor(learned, device=weight.device)].detach().float().cpu()  # [k, W]
            zeros = words.new_zeros(self.n_ctx - len(learned), width)  # ProGrad's padding: [M - k, W]
            ctx = torch.cat([zeros, words])  # [M, W]
            if self.class_specific:
                ctx = ctx.expand(len(self.classnames), -1, -1).clone()  # [n_cls, M, W]
            return ctx
        shape = (len(self.classnames), self.n_ctx, width) if self.class_specific else (self.n_ctx, width)
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=generator) * 0.02  # N(0, 0.02^2), CoOp's init

    def _checked_ctx(self, ctx: torch.Tensor) -> torch.Tensor:
        ctx = ctx.detach().float().clone().to(self.encoder.token_embedding.weight.device)
        width = self.encoder.width
        if ctx.shape[-1] != width:
            raise NemesisError(
                f"ctx width {ctx.shape[-1]} does not match the text width {width} of model '{self.clip.name}'"
            )
        expected_dims = 3 if self.class_specific else 2
        if ctx.dim() != expected_dims:
            kind = "class-specific [n_cls, M, W]" if self.class_specific else "unified [M, W]"
            raise NemesisError(f"ctx of shape {tuple(ctx.shape)} is not {kind}")
        if self.class_specific and ctx.shape[0] != len(self.classnames):
            raise NemesisError(
                f"class-specific ctx has {ctx.shape[0]} classes but {len(self.classnames)} class names were given"
            )
        if not torch.isfinite(ctx).all():
            raise NemesisError("ctx contains NaN or Inf values")
        return ctx

    def _layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids of every class's templated prompt and where its context vectors go."""
        m = self.n_ctx
        half = m // 2
        rows, index_rows = [], []
        context_length = self.encoder.tower.positional_embedding.shape[0]
        frozen = torch.tensor(self.frozen_init_tokens, dtype=torch.long)
        for name in self.classnames:
            n_name = len(self._words(name)) + len(frozen)
            if self.class_position is ClassPosition.end:
                text = " ".join([PLACEHOLDER] * m + [name]) + "."
                positions = list(range(1, 1 + m))
            elif self.class_position is ClassPosition.middle:
                text = " ".join([PLACEHOLDER] * half + [name] + [PLACEHOLDER] * (m - half)) + "."
                positions = list(range(1, 1 + half)) + list(range(1 + half + n_name, 1 + m + n_name))
            else:
                text = " ".join([name] + [PLACEHOLDER] * m) + "."
                positions = list(range(1 + n_name, 1 + n_name + m))
            ids = self.clip.tokenizer([text])[0]
            if len(frozen):  # end position: the rest of the init phrase between ctx and the class name
                ids = torch.cat([ids[: 1 + m], frozen.to(ids.dtype), ids[1 + m : context_length - len(frozen)]])
            if m + n_name + 3 > context_length:
                raise NemesisError(
                    f"prompt for class '{name}' with {m} context tokens exceeds the context length {context_length}"
                )
            placeholder_id = self._words(PLACEHOLDER)[0]
            assert all(int(ids[p]) == placeholder_id for p in positions), f"context layout broken for '{name}'"
            rows.append(ids)
            index_rows.append(torch.tensor(positions))
        return torch.stack(rows), torch.stack(index_rows)

    # --- features -----------------------------------------------------------------------------

    @property
    def n_classes(self) -> int:
        return len(self.classnames)

    def prompt_embeddings(self, ctx: torch.Tensor, classes: torch.Tensor, length: int | None = None) -> torch.Tensor:
        """Token embeddings [R, length, W] of the prompts of `classes` [R] with context `ctx` ([R, M, W]).

        Only the first `length` positions (default: all) are assembled: a cut pass needs no more.
        """
        return self._assemble(ctx, classes, 0, self.frozen_embeddings.shape[1] if length is None else length)

    def _assemble(self, ctx: torch.Tensor, classes: torch.Tensor, start: int, end: int) -> torch.Tensor:
        """Positions start..end-1 [R, end - start, W] of the prompts of `classes` [R] with context `ctx` [R, m, W].

        `ctx` holds the context vectors that fall in that range, the last m of each prompt's M.
        """
        base = self.frozen_embeddings[classes, start:end]  # [R, end - start, W]
        if ctx.shape[1] == 0:
            return base
        index = self.ctx_index[classes, self.n_ctx - ctx.shape[1] :] - start  # [R, m]
        index = index.unsqueeze(-1).expand(-1, -1, base.shape[-1])  # [R, m, W]
        return base.scatter(1, index, ctx.to(base.dtype))

    @property
    def shared_context(self) -> int:
        """Context vectors before the class name that every class shares (0 when nothing is shared).

        Unified ctx with the class name at the end or in the middle: [SOS] + those vectors is the same
        prefix for every class, so the text tower runs it once per ctx variant.
        """
        if self.class_specific or self.class_position is ClassPosition.front or not self.share_prefix:
            return 0
        return self.n_ctx if self.class_position is ClassPosition.end else self.n_ctx // 2

    def encode(
        self,
        ctx_variants: torch.Tensor,
        cut: bool = True,
        deep_prompts: LayerPrompts = (),
        kv_prefix: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Text features [K, n_cls, D] for K context variants ([K, M, W], or [K, n_cls, M, W] class-specific).

        Shared prefixes ([SOS] + the context before the class name) run once per variant; the
        class-dependent rest of every (variant, class) prompt runs against them, in chunks of at
        most `token_budget` tokens ordered by end-of-text position, each assembled only up to its
        cut. Class-specific ctx and class-first prompts share nothing and take the cut pass of
        whole prompts, likewise chunked. `deep_prompts` (IVLP's, MaPLe's: [n, W] or [K, n, W] per layer
        1..depth-1) replace positions 1..n at those layers' inputs; `kv_prefix` (prefix tuning's keys and
        values, [layers, 2, P, W] or [K, ...]) go before every layer's own.
        """
        shared = self.shared_context
        n_variants, width = ctx_variants.shape[0], ctx_variants.shape[-1]
        if shared:
            start = self.frozen_embeddings[0, :1].expand(n_variants, 1, width)  # [K, 1, W]: [SOS]
            prefixes = torch.cat([start.to(ctx_variants.dtype), ctx_variants[:, :shared]], dim=1)  # [K, 1 + shared, W]
        else:
            prefixes = ctx_variants.new_zeros(n_variants, 0, width)  # [K, 0, W]: whole prompts
        prefix_length = prefixes.shape[1]

        def build_suffixes(variant_rows: torch.Tensor, class_rows: torch.Tensor, length: int) -> torch.Tensor:
            # Only this chunk's ctx rows are gathered: [B, M, W] class-specific, else [B, M - shared, W].
            ctx = ctx_variants[variant_rows, class_rows] if self.class_specific else ctx_variants[variant_rows, shared:]
            return self._assemble(ctx, class_rows, prefix_length, length)

        return self.encoder.encode_prefixed(
            prefixes,
            build_suffixes,
            self.pool_index,
            self.frozen_embeddings.shape[1],
            token_budget=self.token_budget,
            max_prompts=self.chunk_size,
            cut=cut,
            deep_prompts=deep_prompts,
            kv_prefix=kv_prefix,
        )

    def text_features(self, cut: bool = True) -> torch.Tensor:
        """Projected, unnormalised text features [n_cls, D] of the current prompt, like `encode_text`."""
        return self.encode(self.ctx.unsqueeze(0), cut=cut)[0]

    def for_classnames(self, classnames: list[str]) -> PromptLearner:
        """The same context for other class names (base-to-new, domain shift)."""
        if self.class_specific and len(classnames) != self.n_classes:
            raise NemesisError(
                f"class-specific ctx has {self.n_classes} classes; it cannot serve {len(classnames)} other classes"
            )
        return PromptLearner(
            self.clip,
            classnames,
            class_specific=self.class_specific,
            class_position=self.class_position,
            ctx=self.ctx.detach(),
            ctx_init=self.ctx_init,  # for the frozen rest of the init phrase; ctx itself is kept
            pad_init=self.pad_init,
            chunk_size=self.chunk_size,
            token_budget=self.token_budget,
        )

    def norms(self, p: float = 2.0) -> torch.Tensor:
        """Per-position norms [M]; class-specific ctx: mean over classes (DESIGN section 5)."""
        return position_norms(self.ctx, p)

    # --- the prompt-method interface (nemesis.methods.protocol) ----------------------------------

    method = "coop"  # registry name: the learner ignores image features
    image_inputs = (POOLED_FEATURES,)

    def logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Training logits [B, n_cls] of image features [B, D], with gradients to ctx."""
        return PromptedCLIP(self).logits(image_features)

    def logits_and_text_features(self, image_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`logits` and the text features [n_cls, D] they came from, of one text pass (KgCoOp reads both)."""
        text_features = self.text_features()
        return PromptedCLIP(self).logits(image_features, text_features), text_features

    def similarities(self, image_features: torch.Tensor, ctx_variants: torch.Tensor) -> torch.Tensor:
        """Cosine similarities [K, B, n_cls] of image features [B, D] under K ctx variants."""
        return self.scorer(ctx_variants)(image_features)

    def scorer(self, ctx_variants: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        """`similarities` under K ctx variants as a function of the images, the text encoded once."""
        text = F.normalize(self.encode(ctx_variants).float(), dim=-1)  # [K, n_cls, D]
        return lambda image_features: F.normalize(image_features.float(), dim=-1) @ text.transpose(1, 2)

    def extra_parameters(self) -> dict[str, nn.Parameter]:
        """Learned tensors besides ctx that a checkpoint carries, by checkpoint name: none for CoOp."""
        return {}

    def corruption_sites(self) -> list[CorruptionSite]:
        """Where sweeps corrupt CoOp's prompt: `corruption_sites_for` its ctx."""
        return self.corruption_sites_for(tuple(self.ctx.shape))

    @classmethod
    def corruption_sites_for(cls, ctx_shape: tuple[int, ...]) -> list[CorruptionSite]:
        """One site, all of ctx: position j of ctx [M, W], or of every class of class-specific ctx [n_cls, M, W]."""

        return [WHOLE_CTX]


def phrase_prompts(clip: Backbone, classnames: list[str], phrase: str, n: int, **options) -> PromptLearner:
    """The prompts "<phrase> <class>." with ctx the embeddings of the phrase's first n tokens, frozen (the rest
    of the phrase stays text after them, as CoOp builds it): the text side of learners whose own prompts lie
    elsewhere (deep prompts, prefix keys and values); `options` are `PromptLearner`'s."""
    first = clip.tokenizer.encode(phrase.replace("_", " "))[:n]
    weight = clip.model.token_embedding.weight
    with torch.no_grad():
        words = weight[torch.tensor(first, device=weight.device)].detach().float()  # [n, W]
    prompts = PromptLearner(clip, classnames, ctx=words, ctx_init=phrase, **options)
    prompts.ctx.requires_grad_(False)
    return prompts


class PromptedCLIP(nn.Module):
    """Classifies image features with the learner's prompts: logit_scale * cos(image, text)."""

    def __init__(self, learner: PromptLearner) -> None:
        super().__init__()
        self.learner = learner
        self.logit_scale = learner.clip.model.logit_scale

    def logits(self, image_features: torch.Tensor, text_features: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [N, n_cls] for image features [N, D]."""
        if text_features is None:
            text_features = self.learner.text_features()
        image = F.normalize(at_least_fp32(image_features), dim=-1)
        text = F.normalize(at_least_fp32(text_features), dim=-1)
        return at_least_fp32(self.logit_scale.exp()) * image @ text.T

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.logits(image_features)

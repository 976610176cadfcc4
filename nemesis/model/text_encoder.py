"""Running an open_clip text tower from token embeddings: cut at end-of-text, shared prefixes computed once.

This is the single entry point for text encoding: the prompt learner, the sweep engine and
training all call `TextEncoder`. Two passes, both exact:

- the cut pass (`__call__`): whole prompts, cut after the chunk's last end-of-text token (I2);
- the shared-prefix pass (`encode_pairs`, `encode_prefixed`): prompts made of one of V prefixes
  (e.g. [SOS] + unified ctx, one per ctx variant or per image) followed by one of C class
  suffixes. With a causal tower a prefix's hidden states do not depend on what follows, so each
  prefix runs once, its keys and values are kept per layer, and every (prefix, class) suffix
  attends to them. Towers where that does not hold fall back to the cut pass of whole prompts.

Both passes take deep text prompts (IVLP, MaPLe, PromptSRC): `deep_prompts[i - 1]` replaces the
hidden states at positions 1..n at the input of layer i (`deep_prompts.replace_tokens`). They lie
inside the shared prefix and are the same for every class, so the prefix still runs once per variant.

Both passes also take prefix tuning's learned keys and values (`kv_prefix`): at every layer, P keys
and P values put before the sequence's own, without position, seen by every token (the attention
mask [L, P + L]: prefix columns open, the rest causal). The shared prefix's cache then starts with
them, so suffixes attend to the learned vectors and the shared tokens alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from open_clip import transformer as open_clip_transformer
from torch import nn

from ..errors import NemesisError
from .deep_prompts import LayerPrompts, check_layer_prompts, replace_tokens, select_rows

POOL_TYPES = ("argmax", "eos", "first", "last")
# Tokens per text pass (prompts x cut length): bounds activation memory whatever the class-name lengths.
# 8192 is about what 256 whole prompts took before, so no pass needs more memory than then.
DEFAULT_TOKEN_BUDGET = 8192
# Matrix products on the CPU round rows in a partial block of rows differently from full blocks;
# the shared-prefix pass pads its rows to a multiple of this so results do not depend on batch size.
ROW_BLOCK = 8

# build_suffixes(prefix_rows [B], class_rows [B], length) -> suffix embeddings [B, length - Lp, W]
SuffixBuilder = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [V, heads, Lp, head_dim]
DEEP_TEXT_START = 1  # deep text prompts sit right after the start token, as the layer-0 ctx does
# Prefix tuning's learned keys and values: [layers, 2, P, W] (key, value; P vectors of the tower's width W, its
# heads side by side) for every sequence, or [B, layers, 2, P, W], one per sequence (per variant in sweeps).
KeyValuePrefix = torch.Tensor


class TextEncoder:
    """Drives a CLIP text tower's own modules (token embedding, transformer blocks, final norm, projection).

    Not an `nn.Module` on purpose: the frozen CLIP weights must not become parameters of the
    prompt learner that holds this encoder.
    """

    def __init__(self, model: nn.Module, model_name: str, tokenizer: object) -> None:
        tower = getattr(model, "text", model)  # CustomTextCLIP keeps its tower in `.text`
        needed = ("token_embedding", "positional_embedding", "transformer", "ln_final")
        if not all(hasattr(tower, part) for part in needed) or not hasattr(tokenizer, "sot_token_id"):
            raise NemesisError(
                f"model '{model_name}' has no CLIP-style text tower (token embedding + start/end tokens); "
                "soft prompts need one, e.g. ViT-B-32, RN50 or tiny"
            )
        if not getattr(tower.transformer, "batch_first", False):
            raise NemesisError(
                f"model '{model_name}': this open_clip runs text sequence-first; install open_clip>=2.26.1"
            )
        if getattr(tower, "cls_emb", None) is not None or getattr(tower, "use_pad_mask", False):
            raise NemesisError(
                f"model '{model_name}' uses a class token or padding mask in its text tower; not supported"
            )
        self.pool_type = getattr(tower, "text_pool_type", getattr(tower, "pool_type", "argmax"))
        if self.pool_type not in POOL_TYPES:
            raise NemesisError(
                f"model '{model_name}' pools text with '{self.pool_type}'; supported: {', '.join(POOL_TYPES)}"
            )
        self.tower = tower
        self.eos_id = getattr(tower, "text_eos_id", getattr(tower, "eos_id", None))
        self.sot_token_id = tokenizer.sot_token_id
        self.eot_token_id = tokenizer.eot_token_id
        self.attn_mask = tower.attn_mask
        # Causal attention + pooling at the end-of-text token: nothing after that token can change
        # the result, so the sequence is cut there (I2).
        self.can_cut = self.attn_mask is not None and self.pool_type in ("argmax", "eos")
        # ... and a prefix's hidden states do not depend on what follows it, so prefixes can be shared,
        # where every block is one this module knows how to run with cached keys and values.
        self.can_share = self.can_cut and _is_causal(self.attn_mask) and _blocks_supported(tower.transformer)

    @property
    def token_embedding(self) -> nn.Embedding:
        return self.tower.token_embedding

    @property
    def width(self) -> int:
        return self.tower.token_embedding.weight.shape[1]

    @property
    def context_length(self) -> int:
        return self.tower.positional_embedding.shape[0]

    def pool_index(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Position whose hidden state becomes the text feature, per sequence [B]."""
        batch, length = token_ids.shape
        if self.pool_type == "argmax":
            return token_ids.argmax(dim=-1)
        if self.pool_type == "eos":
            return (token_ids == self.eos_id).int().argmax(dim=-1)
        if self.pool_type == "first":
            return torch.zeros(batch, dtype=torch.long, device=token_ids.device)
        return torch.full((batch,), length - 1, dtype=torch.long, device=token_ids.device)

    # --- the cut pass ----------------------------------------------------------------------------

    def __call__(
        self,
        embeddings: torch.Tensor,
        pool_index: torch.Tensor,
        cut: bool = True,
        deep_prompts: LayerPrompts = (),
        kv_prefix: KeyValuePrefix | None = None,
    ) -> torch.Tensor:
        """Projected, unnormalised text features [B, D] from token embeddings [B, L, W].

        deep_prompts[i - 1] ([n, W], or [B, n, W] one per row) replaces positions 1..n at the input of layer i;
        `kv_prefix` ([layers, 2, P, W] or [B, layers, 2, P, W]): learned keys and values before every layer's own.
        """
        tower = self.tower
        cast_dtype = tower.transformer.get_cast_dtype()
        length = embeddings.shape[1]
        if cut and self.can_cut:
            length = int(pool_index.max()) + 1
        x = embeddings[:, :length].to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
        mask = None if self.attn_mask is None else self.attn_mask[:length, :length]
        if kv_prefix is not None:
            x = self._prefixed_transformer(x, deep_prompts, kv_prefix)
        elif len(deep_prompts):
            x = self._deep_transformer(x, mask, deep_prompts)
        else:  # open_clip's own loop (and its gradient checkpointing)
            x = tower.transformer(x, attn_mask=mask)
        x = tower.ln_final(x)  # [B, length, W]
        pooled = x[torch.arange(x.shape[0], device=x.device), pool_index]  # [B, W]
        return self._project(pooled)

    def _deep_transformer(self, x: torch.Tensor, mask: torch.Tensor | None, deep_prompts: LayerPrompts) -> torch.Tensor:
        """open_clip's transformer loop on x [B, L, W] with the deep prompts swapped in before layers 1..depth-1."""
        self.check_deep_prompts(deep_prompts, x.shape[1])
        for layer, block in enumerate(self.tower.transformer.resblocks):
            if 1 <= layer <= len(deep_prompts):
                x = replace_tokens(x, deep_prompts[layer - 1], DEEP_TEXT_START)
            x = block(x, attn_mask=mask)
        return x

    def _prefixed_transformer(
        self, x: torch.Tensor, deep_prompts: LayerPrompts, kv_prefix: KeyValuePrefix
    ) -> torch.Tensor:
        """The block loop on x [B, L, W] with the learned keys and values before each layer's own (causal rest)."""
        self.check_kv_prefix(kv_prefix)
        if len(deep_prompts):
            self.check_deep_prompts(deep_prompts, x.shape[1])
        batch, length = x.shape[:2]
        mask = _causal_mask(length, kv_prefix.shape[-2] + length, x.device)  # prefix columns open
        for layer, block in enumerate(self.tower.transformer.resblocks):
            if 1 <= layer <= len(deep_prompts):
                x = replace_tokens(x, deep_prompts[layer - 1], DEEP_TEXT_START)
            x, _, _ = _run_block(block, x, mask, self._layer_prefix(kv_prefix, layer, batch, block))
        return x

    def check_kv_prefix(self, kv_prefix: KeyValuePrefix) -> None:
        """Refuse learned keys and values that are not [layers, 2, P, W] (or [B, ...]) for this tower, or a tower
        whose blocks this module cannot run with them (ValueError)."""
        layers = len(self.tower.transformer.resblocks)
        if kv_prefix.dim() not in (4, 5) or kv_prefix.shape[-4:-2] != (layers, 2) or kv_prefix.shape[-1] != self.width:
            raise ValueError(
                f"prefix keys and values of shape {tuple(kv_prefix.shape)}; expected [{layers}, 2, P, {self.width}] "
                "(or one per sequence in front)"
            )
        if not (self.can_cut and _is_causal(self.attn_mask) and _blocks_supported(self.tower.transformer)):
            raise ValueError("prefix tuning needs a causal text tower of open_clip's own blocks")

    @staticmethod
    def _layer_prefix(
        kv_prefix: KeyValuePrefix, layer: int, batch: int, block: nn.Module
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer `layer`'s learned keys and values as attention takes them: [B, heads, P, head_dim] each."""
        heads = block.attn.num_heads
        pair = kv_prefix[..., layer, :, :, :]  # [2, P, W] or [B, 2, P, W]
        pair = pair.expand(batch, *pair.shape[-3:]) if pair.dim() == 3 else pair
        count, width = pair.shape[-2:]
        split = pair.reshape(batch, 2, count, heads, width // heads).transpose(2, 3)  # [B, 2, heads, P, head_dim]
        return split[:, 0], split[:, 1]

    def check_deep_prompts(self, deep_prompts: LayerPrompts, length: int) -> None:
        """Refuse deep prompts that do not fit the tower or a sequence (or shared prefix) of `length` tokens."""
        blocks = len(self.tower.transformer.resblocks)
        check_layer_prompts(deep_prompts, self.width, blocks - 1, "deep text")  # layers 1..blocks-1
        n = deep_prompts[0].shape[-2] if len(deep_prompts) else 0
        if DEEP_TEXT_START + n > length:
            raise ValueError(f"deep text prompts of {n} tokens do not fit after the start token of {length} tokens")

    def _project(self, pooled: torch.Tensor) -> torch.Tensor:
        projection = self.tower.text_projection
        if projection is None:
            return pooled
        if isinstance(projection, nn.Linear):
            return projection(pooled)
        return pooled @ projection

    # --- the shared-prefix pass ------------------------------------------------------------------

    def encode_pairs(
        self,
        prefixes: torch.Tensor,
        suffixes: torch.Tensor,
        suffix_pool_index: torch.Tensor,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        deep_prompts: LayerPrompts = (),
        kv_prefix: KeyValuePrefix | None = None,
    ) -> torch.Tensor:
        """Text features [V, C, D] of every prompt `prefixes[v] + suffixes[c]`.

        prefixes: token embeddings [V, Lp, W] of positions 0..Lp-1 (e.g. [SOS] + ctx, one row per
            ctx variant or per image), without positional embeddings.
        suffixes: token embeddings [C, Ls, W] of positions Lp..Lp+Ls-1 (class tokens, '.', [EOT], padding).
        suffix_pool_index: [C] position of each suffix's pooled token (its end-of-text) in the WHOLE
            prompt, so Lp <= index < Lp + Ls (what `pool_index` gives for the prompt's token ids).

        Each prefix runs through the tower once; every (prefix, class) suffix then attends to the
        prefix's cached keys and values, in chunks of at most `token_budget` tokens ordered by
        end-of-text position, each cut after its last end-of-text token. Equal to the cut pass of
        the concatenated prompts (to float rounding); towers without a causal mask (or with blocks
        this module does not know) run exactly that. Differentiable w.r.t. prefixes and suffixes.
        deep_prompts: [n, W] or [V, n, W] (one per prefix) per layer 1..depth-1, inside the prefix (Lp >= 1 + n).
        kv_prefix: learned keys and values [layers, 2, P, W] or [V, layers, 2, P, W] (one per prefix).
        """
        prefix_length = prefixes.shape[1]
        total_length = prefix_length + suffixes.shape[1]

        def build(prefix_rows: torch.Tensor, class_rows: torch.Tensor, length: int) -> torch.Tensor:
            return suffixes[class_rows, : length - prefix_length]

        return self.encode_prefixed(
            prefixes,
            build,
            suffix_pool_index,
            total_length,
            token_budget,
            deep_prompts=deep_prompts,
            kv_prefix=kv_prefix,
        )

    def encode_prefixed(
        self,
        prefixes: torch.Tensor,
        build_suffixes: SuffixBuilder,
        pool_index: torch.Tensor,
        total_length: int,
        token_budget: int = DEFAULT_TOKEN_BUDGET,
        max_prompts: int | None = None,
        cut: bool = True,
        deep_prompts: LayerPrompts = (),
        kv_prefix: KeyValuePrefix | None = None,
    ) -> torch.Tensor:
        """`encode_pairs` with suffixes built per chunk, so they may depend on the prefix row too.

        `build_suffixes(prefix_rows [B], class_rows [B], length)` returns the embeddings [B, length - Lp, W]
        of the pairs' positions Lp..length-1; `pool_index` [C] is per class (in the whole prompt);
        `total_length` is the uncut prompt length. Prefixes of length 0 or `cut=False` give the
        plain (cut or full-length) pass of whole prompts, assembled chunk by chunk.
        `deep_prompts` and `kv_prefix` as in `encode_pairs` (with prefixes of length 0 they go into the whole
        prompts). Returns [V, C, D].
        """
        n_prefixes, prefix_length = prefixes.shape[:2]
        n_classes = pool_index.shape[0]
        cut = cut and self.can_cut
        share = cut and self.can_share and prefix_length > 0
        if cut:
            if int(pool_index.min()) < prefix_length:
                raise ValueError("every pooled position must lie after the shared prefix")
            order = torch.argsort(pool_index.cpu(), stable=True)  # classes by end-of-text position
        else:
            order = torch.arange(n_classes)
        lengths = (pool_index.cpu()[order] + 1).tolist() if cut else [total_length] * n_classes
        order = order.to(pool_index.device)
        cache = self.prefix_keys_values(prefixes, deep_prompts, kv_prefix) if share else None
        features = []
        for first, last, length in _chunks(lengths, n_prefixes, token_budget, max_prompts):
            flat = torch.arange(first, last, device=pool_index.device)  # pair r * V + v: r-th class by length
            prefix_rows, class_rows = flat % n_prefixes, order[flat // n_prefixes]
            suffix = build_suffixes(prefix_rows, class_rows, length)  # [B, length - Lp, W]
            pooled_at = pool_index[class_rows]
            if share:
                features.append(self._suffix_pass(cache, prefix_rows, suffix, pooled_at, prefix_length))
            else:
                prompts = torch.cat([prefixes[prefix_rows].to(suffix.dtype), suffix], dim=1)  # [B, length, W]
                rows_prefix = kv_prefix[prefix_rows] if kv_prefix is not None and kv_prefix.dim() == 5 else kv_prefix
                features.append(self(prompts, pooled_at, cut, select_rows(deep_prompts, prefix_rows), rows_prefix))
        ordered = torch.cat(features).reshape(n_classes, n_prefixes, -1)  # [C sorted by length, V, D]
        inverse = torch.argsort(order)
        return ordered[inverse].transpose(0, 1)  # [V, C, D]

    def prefix_keys_values(
        self, prefixes: torch.Tensor, deep_prompts: LayerPrompts = (), kv_prefix: KeyValuePrefix | None = None
    ) -> KeysValues:
        """Run prefixes [V, Lp, W] through every block once; their keys and values per layer.

        deep_prompts[i - 1] ([n, W] or [V, n, W]) replaces positions 1..n at the input of layer i: as the
        whole prompt's, since with a causal mask those positions never see the suffixes. With `kv_prefix`
        the prefix attends to the learned keys and values too, and each layer's cache starts with them.
        """
        tower = self.tower
        cast_dtype = tower.transformer.get_cast_dtype()
        n_prefixes, length, width = prefixes.shape
        x = prefixes.to(cast_dtype) + tower.positional_embedding[:length].to(cast_dtype)
        # Trailing padding positions (harmless: causal) keep the row count a multiple of ROW_BLOCK.
        padded = _round_up(length, ROW_BLOCK)
        x = torch.cat([x, x.new_zeros(n_prefixes, padded - length, width)], dim=1)  # [V, padded, W]
        learned = 0 if kv_prefix is None else kv_prefix.shape[-2]
        mask = _causal_mask(padded, learned + padded, x.device)
        if len(deep_prompts):
            self.check_deep_prompts(deep_prompts, length)
        if kv_prefix is not None:
            self.check_kv_prefix(kv_prefix)
        cache = []
        for layer, block in enumerate(tower.transformer.resblocks):
            if 1 <= layer <= len(deep_prompts):
                x = replace_tokens(x, deep_prompts[layer - 1], DEEP_TEXT_START)
            past = None if kv_prefix is None else self._layer_prefix(kv_prefix, layer, n_prefixes, block)
            x, keys, values = _run_block(block, x, mask, past)
            keys, values = keys[:, :, :length], values[:, :, :length]
            if past is not None:  # the learned keys and values first, as the suffixes see them
                keys, values = (
                    torch.cat([past[0].to(keys.dtype), keys], dim=2),
                    torch.cat([past[1].to(values.dtype), values], dim=2),
                )
            cache.append((keys, values))
        return cache

    def _suffix_pass(
        self,
        cache: KeysValues,
        prefix_rows: torch.Tensor,
        suffix: torch.Tensor,
        pool_index: torch.Tensor,
        prefix_length: int,
    ) -> torch.Tensor:
        """Features [B, D] of suffixes [B, Ls, W] attending to their prefix rows' cached keys and values.

        Only each suffix's tokens up to its end-of-text go through the blocks, packed into one row
        per token (no chunk pays for its longest class name); attention alone sees them padded.
        """
        tower = self.tower
        cast_dtype = tower.transformer.get_cast_dtype()
        length = suffix.shape[1]
        end = prefix_length + length
        x = suffix.to(cast_dtype) + tower.positional_embedding[prefix_length:end].to(cast_dtype)  # [B, Ls, W]
        real = torch.arange(length, device=x.device) <= (pool_index - prefix_length).unsqueeze(1)  # [B, Ls]
        packing = _Packing(real)
        x = packing.pack(x)  # [T, W]
        cached = cache[0][0].shape[2]  # the prefix's keys (after any learned ones)
        mask = _causal_mask(length, cached + length, x.device)  # suffix queries see the prefix and earlier suffix keys
        for block, (keys, values) in zip(tower.transformer.resblocks, cache, strict=True):
            x, _, _ = _run_block(block, x, mask, (keys[prefix_rows], values[prefix_rows]), packing)
        pooled = x[real.sum(dim=1).cumsum(dim=0) - 1]  # [B, W]: each suffix's end-of-text row
        return self._project(tower.ln_final(pooled))  # a per-token norm: pooling first changes nothing


class _Packing:
    """The real tokens of a padded batch [B, L] as rows [T, C] and back.

    T is rounded up to a multiple of ROW_BLOCK with zero rows, so every prompt's numbers are the
    same whatever else shares its chunk (I4).
    """

    def __init__(self, real: torch.Tensor) -> None:
        self.batch, self.length = real.shape
        self.index = real.flatten().nonzero().squeeze(1)  # [T] positions in the flattened batch
        self.rows = _round_up(self.index.numel(), ROW_BLOCK)

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, C] -> [rows, C]."""
        rows = padded.reshape(self.batch * self.length, -1)[self.index]
        return torch.cat([rows, rows.new_zeros(self.rows - rows.shape[0], rows.shape[1])])

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[rows, C] -> [B, L, C], zeros where there is no token."""
        channels = packed.shape[1]
        padded = packed.new_zeros(self.batch * self.length, channels)
        padded = padded.index_copy(0, self.index, packed[: self.index.numel()])
        return padded.reshape(self.batch, self.length, channels)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _causal_mask(queries: int, keys: int, device: torch.device) -> torch.Tensor:
    """Additive mask [queries, keys] for the last `queries` of `keys` positions: -inf on later keys."""
    mask = torch.full((queries, keys), float("-inf"), device=device)
    return mask.triu(keys - queries + 1)


def _chunks(lengths: list[int], repeats: int, token_budget: int, max_prompts: int | None):
    """(first, last, cut length) of consecutive pairs; pair p has length lengths[p // repeats] (non-decreasing)."""
    total = len(lengths) * repeats
    first = 0
    while first < total:
        last = first + 1
        while last < total and (last + 1 - first) * lengths[last // repeats] <= token_budget:
            if max_prompts is not None and last - first >= max_prompts:
                break
            last += 1
        yield first, last, lengths[(last - 1) // repeats]
        first = last


# --- running open_clip's blocks with cached keys and values ----------------------------------------


def _is_causal(mask: torch.Tensor) -> bool:
    """Every position is blind to later ones (open_clip's causal mask is additive, -inf above the diagonal)."""
    above = torch.triu(torch.ones_like(mask, dtype=torch.bool), diagonal=1)
    blocked = torch.isneginf(mask) if mask.dtype != torch.bool else mask
    return bool(blocked[above].all()) and not bool(blocked[~above].any())


def _blocks_supported(transformer: nn.Module) -> bool:
    if type(transformer) not in (open_clip_transformer.Transformer, open_clip_transformer.CustomTransformer):
        return False
    return all(_block_supported(block) for block in transformer.resblocks)


def _block_supported(block: nn.Module) -> bool:
    if type(block) is open_clip_transformer.ResidualAttentionBlock:
        attention = block.attn
        return (
            not hasattr(block, "ln_1_kv")
            and type(attention) is nn.MultiheadAttention
            and attention._qkv_same_embed_dim
            and attention.batch_first
            and attention.bias_k is None
            and not attention.add_zero_attn
            and attention.dropout == 0.0
        )
    if type(block) is open_clip_transformer.CustomResidualAttentionBlock:
        attention = block.attn
        # Scaled cosine attention is left to open_clip's own forward.
        return (
            type(attention) is open_clip_transformer.Attention
            and attention.logit_scale is None
            and attention.attn_drop.p == 0.0
        )
    return False


def _run_block(
    block: nn.Module,
    x: torch.Tensor,
    mask: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    packing: _Packing | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One residual block on x [B, L, W] (or its packed rows [T, W]) after `past` keys/values [B, heads, P, head_dim].

    Returns the block's output and the keys and values of x's own positions. `mask` [L, P + L] is
    the causal mask for these queries.
    """
    attended, keys, values = _attend(block.attn, block.ln_1(x), mask, past, packing)
    if isinstance(block, open_clip_transformer.CustomResidualAttentionBlock):
        attended = block.ln_attn(attended)
    x = x + block.ls_1(attended)
    x = x + block.ls_2(block.mlp(block.ln_2(x)))
    return x, keys, values


def _attend(
    attention: nn.Module,
    h: torch.Tensor,
    mask: torch.Tensor,
    past: tuple[torch.Tensor, torch.Tensor] | None,
    packing: _Packing | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention of h [B, L, W] over past + own keys, as nn.MultiheadAttention or open_clip's Attention do it."""
    projected = F.linear(h, attention.in_proj_weight, attention.in_proj_bias)  # [B, L, 3W] or packed [T, 3W]
    if packing is not None:
        projected = packing.unpack(projected)  # [B, L, 3W]
    batch, length, width = projected.shape[0], projected.shape[1], h.shape[-1]
    heads = attention.num_heads
    query, key, value = projected.chunk(3, dim=-1)
    query, key, value = (part.reshape(batch, length, heads, -1).transpose(1, 2) for part in (query, key, value))
    custom = isinstance(attention, open_clip_transformer.Attention)
    if custom:
        query, key = attention.ln_q(query), attention.ln_k(key)
    own_keys, own_values = key, value  # [B, heads, L, head_dim]
    if past is not None:
        key = torch.cat([past[0].to(key.dtype), key], dim=2)
        value = torch.cat([past[1].to(value.dtype), value], dim=2)
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask.to(query.dtype))
    if custom and attention.head_scale is not None:
        out = out * attention.head_scale
    out = out.transpose(1, 2).reshape(batch, length, width)
    if packing is not None:
        out = packing.pack(out)  # [T, W]
    out = attention.out_drop(attention.out_proj(attention.ln_inner(out))) if custom else attention.out_proj(out)
    return out, own_keys, own_values


def normalize(features: torch.Tensor) -> torch.Tensor:
    return F.normalize(features, dim=-1)

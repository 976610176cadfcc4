"""Reading a soft prompt in words: the vocabulary tokens nearest to each context vector.

As CoOp's `interpret_prompt.py`: the Euclidean distance from each context vector to every row of
the model's token embedding matrix, the k nearest decoded to words, beside each position's L2 norm.
Every ctx layout is read the same way, [..., M, W]: CoOp's [M, W], class-specific [n_cls, M, W]
(per class), CoCoOp's [M, W] (without the image's meta-net shift), PLOT's [N, M, W] (per prompt).

Distances are computed on the CPU in fp32, over chunks of context vectors, so a class-specific
prompt of 1,000 classes never holds its [n_cls x M, V] distance matrix whole.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import os
import warnings
from dataclasses import astuple, dataclass, fields
from pathlib import Path
from typing import Any

import torch

from ..atomic import write_text_atomic
from ..errors import NemesisError, NemesisNote
from ..files.checkpoint import PromptCheckpoint, load_checkpoint
from ..model.backbone import embed_dim, load_clip, model_config, text_width
from ..model.text_encoder import TextEncoder
from .evaluate import choose_weights, weights_mismatch

DEFAULT_TOPK = 3  # CoOp's script takes k as a required argument; its COOP.md runs it with 3
DEFAULT_VOCABULARY_SIZE = 49408  # CLIP's BPE vocabulary, open_clip's default where a config names none
DISTANCE_BUDGET = 2**24  # entries of one chunk's distance matrix (64 MiB in fp32)
RERANK_SLACK = 16  # extra candidates per vector whose distances are recomputed exactly
TABLE_FORMATS = (".json", ".csv")  # what `write_table` writes, by the file's suffix
WORD_PIECE_MARK = "-"  # shown after a token that does not end a word (BPE's piece without `</w>`)


@dataclass(frozen=True)
class NearestToken:
    """One row of the table: the `rank`-th nearest token to one context vector."""

    class_index: int | None  # the class of a class-specific ctx [n_cls, M, W]; None otherwise
    classname: str | None  # its name, when the prompt records its classes
    prompt: int | None  # the prompt of a ctx with several per class ([N, M, W], PLOT); None otherwise
    position: int  # j of ctx_j, from 0 as `nemesis corrupt --positions` counts
    norm: float  # ||ctx_j||_2 of this class's or prompt's vector
    rank: int  # 1 for the nearest token
    token: str  # the token as the tokenizer decodes it, without the end-of-word space
    token_id: int
    word_end: bool  # whether the token ends a word (`</w>`); a piece continues into the next token
    distance: float  # Euclidean, in fp32

    @classmethod
    def columns(cls) -> list[str]:
        """The table's column names, in order."""
        return ["class" if item.name == "class_index" else item.name for item in fields(cls)]

    def record(self) -> dict[str, Any]:
        """The row as plain values, its class index under the key `class`."""
        return dict(zip(self.columns(), astuple(self), strict=True))

    @property
    def title(self) -> str | None:
        """Which class or prompt the row belongs to, as a heading; None for a ctx of one prompt."""
        if self.class_index is not None:
            return f"class {self.class_index}" + (f" ({self.classname})" if self.classname else "")
        return None if self.prompt is None else f"prompt {self.prompt}"

    @property
    def shown(self) -> str:
        """The token as a reader sees it: a word piece marked, an empty or spaced token quoted."""
        text = self.token if self.token and self.token == "".join(self.token.split()) else repr(self.token)
        return text if self.word_end else text + WORD_PIECE_MARK


@dataclass(frozen=True)
class PromptInterpretation:
    """The nearest tokens of every context vector of one prompt, and where they were looked up."""

    path: Path | None
    label: str  # the prompt method's label
    ctx_shape: tuple[int, ...]
    model: str
    weights_id: str
    topk: int
    rows: list[NearestToken]

    def blocks(self) -> list[tuple[str | None, list[list[NearestToken]]]]:
        """The rows as a reader takes them: per class or prompt (its title; None for a single prompt),
        per position, the nearest tokens in rank order."""
        blocks: dict[str | None, dict[int, list[NearestToken]]] = {}
        for row in self.rows:
            blocks.setdefault(row.title, {}).setdefault(row.position, []).append(row)
        return [(title, list(positions.values())) for title, positions in blocks.items()]

    def records(self) -> list[dict[str, Any]]:
        """The table as plain rows (JSON, CSV, pandas), one per (class or prompt, position, rank)."""
        return [row.record() for row in self.rows]


def interpret_prompt(
    checkpoint: PromptCheckpoint | str | os.PathLike,
    *,
    topk: int = DEFAULT_TOPK,
    model: str | None = None,
    pretrained: str | None = None,
    epoch: int | None = None,
    prompt_method: str | None = None,
) -> PromptInterpretation:
    """The `topk` vocabulary tokens nearest to each context vector of a prompt (a file, run folder,
    Dassl file or a loaded checkpoint), on `model`'s token embeddings with `pretrained` weights.

    Model and weights are chosen as `nemesis eval` chooses them: named ones win over the prompt's
    record, a Dassl file needs both named (`none`: random weights). Every check runs before the model loads.
    """
    if not isinstance(checkpoint, PromptCheckpoint):
        checkpoint = load_checkpoint(checkpoint, epoch, prompt_method)
    if checkpoint.spec.ctx_tower() != "text":
        raise NemesisError(
            f"{checkpoint.path}: {checkpoint.spec.label}'s ctx holds {checkpoint.spec.ctx_tower()} vectors, not "
            "text-token embeddings; no vocabulary reads it"
        )
    model = model or checkpoint.metadata.model
    if model is None:
        raise NemesisError(f"{checkpoint.path}: the checkpoint does not name its model; pass --model (e.g. RN50)")
    weights = choose_weights(checkpoint, model, pretrained)
    checkpoint.check_model(model, embed_dim(model), text_width(model))
    _check_topk(topk, model_config(model)["text_cfg"].get("vocab_size", DEFAULT_VOCABULARY_SIZE))
    embedding, tokenizer, weights_id = _vocabulary(model, weights)
    if (note := weights_mismatch(checkpoint, {"weights_id": weights_id})) is not None:
        warnings.warn(note, NemesisNote, stacklevel=2)
    distances, token_ids = nearest_tokens(checkpoint.ctx, embedding, topk)
    rows = _rows(checkpoint, distances, token_ids, tokenizer)
    shape = tuple(checkpoint.ctx.shape)
    return PromptInterpretation(checkpoint.path, checkpoint.spec.label, shape, model, weights_id, topk, rows)


def check_table_path(path: str | os.PathLike) -> None:
    """Refuse a table path whose suffix names no format this writes, before any work."""
    if Path(path).suffix.lower() not in TABLE_FORMATS:
        raise NemesisError(f"--out {path}: the table is written as {' or '.join(TABLE_FORMATS)}; name such a file")


def write_table(interpretation: PromptInterpretation, path: str | os.PathLike) -> Path:
    """Write the table atomically: JSON (a list of rows) or CSV, as the suffix says."""
    check_table_path(path)
    records = interpretation.records()
    if Path(path).suffix.lower() == ".json":
        write_text_atomic(path, json.dumps(records, indent=1) + "\n")
        return Path(path)
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(NearestToken.columns()), lineterminator="\n")
    writer.writeheader()
    writer.writerows(records)
    write_text_atomic(path, text.getvalue())
    return Path(path)


def _check_topk(topk: int, vocabulary_size: int) -> None:
    """Refuse a k the table cannot have, before the model loads (its config knows the vocabulary's size)."""
    if not 1 <= topk <= vocabulary_size:
        raise NemesisError(f"--topk {topk}: choose a number of tokens from 1 to the vocabulary's {vocabulary_size}")


def _vocabulary(model: str, weights: str | None) -> tuple[torch.Tensor, Any, str]:
    """The token embedding matrix [V, W] in fp32 on the CPU, the tokenizer, and the weights' identity."""
    with warnings.catch_warnings():
        # The activation is part of the text transformer, not of the token embeddings: no note about it here.
        warnings.simplefilter("ignore", NemesisNote)
        backbone = load_clip(model, weights, device="cpu")
    encoder = TextEncoder(backbone.model, model, backbone.tokenizer)  # refuses towers without CLIP's tokens
    embedding = encoder.token_embedding.weight.detach().float()  # a view when the weights are fp32 already
    return embedding, backbone.tokenizer, backbone.weights_id


def nearest_tokens(ctx: torch.Tensor, embedding: torch.Tensor, topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances [..., M, k] and indices [..., M, k] of the `topk` rows of `embedding` [V, W]
    nearest to each vector of `ctx` [..., M, W], nearest first, in fp32 on the CPU.

    Candidates come from the fast form |x|^2 + |e|^2 - 2 x.e, which loses digits when x is close
    to e; the distances of the best `topk + RERANK_SLACK` are then recomputed as |x - e|, so a
    vector equal to a token's embedding is at distance exactly 0 and ranked first.
    """
    embedding = embedding.detach().to("cpu", torch.float32)
    vectors = ctx.detach().to("cpu", torch.float32).reshape(-1, ctx.shape[-1])  # [R, W]
    squared = embedding.square().sum(dim=-1)  # [V]
    chunk = max(1, DISTANCE_BUDGET // embedding.shape[0])
    candidates = min(topk + RERANK_SLACK, embedding.shape[0])
    distances, indices = [], []
    for block in vectors.split(chunk):
        approximate = squared + block.square().sum(dim=-1, keepdim=True) - 2 * block @ embedding.T  # [c, V]
        nearest = approximate.topk(candidates, dim=-1, largest=False).indices  # [c, candidates]
        exact = torch.linalg.vector_norm(block[:, None, :] - embedding[nearest], dim=-1)  # [c, candidates]
        order = exact.argsort(dim=-1, stable=True)[:, :topk]
        distances.append(exact.gather(-1, order))
        indices.append(nearest.gather(-1, order))
    shape = (*ctx.shape[:-1], topk)
    return torch.cat(distances).reshape(shape), torch.cat(indices).reshape(shape)


def token_text(tokenizer: Any, token_id: int) -> tuple[str, bool]:
    """A token as the tokenizer decodes it, stripped, and whether it ends a word.

    open_clip's `SimpleTokenizer.decode` turns BPE's end-of-word mark `</w>` into a space, so
    "photo</w>" and the piece "photo" (of "photography") differ only by it. Special tokens
    (start and end of text) are whole words.
    """
    if token_id not in getattr(tokenizer, "decoder", {}):
        return f"<token {token_id}>", True  # a row of the embedding the tokenizer has no entry for
    decoded = tokenizer.decode([token_id])
    special = token_id in getattr(tokenizer, "all_special_ids", ())
    return decoded.strip(), special or decoded[-1:].isspace()


def _rows(
    checkpoint: PromptCheckpoint, distances: torch.Tensor, token_ids: torch.Tensor, tokenizer: Any
) -> list[NearestToken]:
    """One row per (class or prompt, position, rank); the leading axes of ctx are read as one index."""
    ctx = checkpoint.ctx
    norms = torch.linalg.vector_norm(ctx.reshape(-1, *ctx.shape[-2:]), dim=-1).tolist()  # [P, M]
    distances = distances.reshape(len(norms), *distances.shape[-2:]).tolist()  # [P, M, k]
    token_ids = token_ids.reshape(len(norms), *token_ids.shape[-2:]).tolist()
    per_class = ctx.dim() > 2 and checkpoint.class_specific
    classnames = checkpoint.metadata.classnames or []
    decoded = functools.cache(functools.partial(token_text, tokenizer))  # each token decoded once
    rows = []
    for index, position_norms in enumerate(norms):
        where = {
            "class_index": index if per_class else None,
            "classname": classnames[index] if per_class and len(classnames) == len(norms) else None,
            "prompt": index if ctx.dim() > 2 and not per_class else None,
        }
        for position, norm in enumerate(position_norms):
            nearest = zip(distances[index][position], token_ids[index][position], strict=True)
            rows += [
                NearestToken(**where, position=position, norm=norm, rank=rank, token=decoded(token_id)[0],
                             token_id=token_id, word_end=decoded(token_id)[1], distance=distance)
                for rank, (distance, token_id) in enumerate(nearest, 1)
            ]  # fmt: skip
    return rows

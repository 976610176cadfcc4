"""`nemesis.evaluation.interpretation`: nearest vocabulary tokens of context vectors, on the tiny model
(random weights), against a plain full distance matrix."""

from __future__ import annotations

import pytest
import torch

from nemesis.errors import NemesisError
from nemesis.evaluation.interpretation import interpret_prompt, nearest_tokens, token_text
from nemesis.files.checkpoint import PromptMetadata, save_prompt

WORDS = "a photo of a"


def _embedding(backbone) -> torch.Tensor:
    return backbone.model.token_embedding.weight.detach()


def test_nearest_tokens_equal_a_full_distance_matrix_in_float64():
    generator = torch.Generator().manual_seed(0)
    embedding = torch.randn(3000, 32, generator=generator)
    ctx = torch.randn(5, 7, 32, generator=generator)  # leading axes are kept
    distances, indices = nearest_tokens(ctx, embedding, 4)
    full = torch.cdist(ctx.reshape(-1, 32).double(), embedding.double())  # [35, V]
    expected = full.topk(4, largest=False)
    assert distances.shape == indices.shape == (5, 7, 4) and distances.dtype == torch.float32
    assert torch.equal(indices.reshape(-1, 4), expected.indices)
    torch.testing.assert_close(distances.reshape(-1, 4).double(), expected.values, rtol=1e-5, atol=1e-5)


def test_vectors_equal_to_token_embeddings_are_at_distance_exactly_zero(tiny, monkeypatch):
    import nemesis.evaluation.interpretation as interpretation

    monkeypatch.setattr(interpretation, "DISTANCE_BUDGET", 3 * 49408)  # chunks of 3 vectors: every chunk path runs
    ids = tiny.tokenizer.encode(WORDS)
    ctx = _embedding(tiny)[ids].repeat(2, 1)  # [8, W]: more vectors than one chunk
    distances, indices = nearest_tokens(ctx, _embedding(tiny), 2)
    assert indices[:, 0].tolist() == ids * 2
    assert distances[:, 0].tolist() == [0.0] * 8 and bool((distances[:, 1] > 0).all())


def test_tokens_decode_as_words_and_pieces_are_told_apart(tiny):
    tokenizer = tiny.tokenizer
    assert token_text(tokenizer, tokenizer.encoder["photo</w>"]) == ("photo", True)
    assert token_text(tokenizer, tokenizer.encoder["photo"]) == ("photo", False)  # the piece of "photography"
    assert token_text(tokenizer, tokenizer.sot_token_id) == ("<start_of_text>", True)
    assert token_text(tokenizer, 10**6) == ("<token 1000000>", True)  # a row the tokenizer does not know


def test_interpret_prompt_rows_per_class_with_names_and_norms(tiny, tmp_path):
    ids = tiny.tokenizer.encode(WORDS)
    ctx = torch.stack([_embedding(tiny)[ids], 2 * _embedding(tiny)[ids]])  # class 1: twice as long
    metadata = PromptMetadata(model="tiny", pretrained="none", classnames=["cat", "dog"])
    found = interpret_prompt(save_prompt(tmp_path / "p.safetensors", ctx, metadata), topk=2)
    assert found.ctx_shape == (2, 4, 64) and found.weights_id == "random-seed0" and len(found.rows) == 2 * 4 * 2
    first = [row for row in found.rows if row.class_index == 0 and row.rank == 1]
    assert [row.token for row in first] == WORDS.split() and {row.distance for row in first} == {0.0}
    assert {row.classname for row in found.rows} == {"cat", "dog"} and {row.prompt for row in found.rows} == {None}
    norms = {(row.class_index, row.position): row.norm for row in found.rows}
    for (index, position), norm in norms.items():
        assert norm == pytest.approx(float(ctx[index, position].norm()), rel=1e-6)
    titles = [title for title, _ in found.blocks()]
    assert titles == ["class 0 (cat)", "class 1 (dog)"]
    assert list(found.records()[0]) == ["class", "classname", "prompt", "position", "norm", "rank", "token",
                                        "token_id", "word_end", "distance"]  # fmt: skip


def test_interpret_prompt_checks_before_the_model_loads(tmp_path, monkeypatch):
    import nemesis.evaluation.interpretation as interpretation

    monkeypatch.setattr(interpretation, "load_clip", lambda *args, **kwargs: pytest.fail("the model was loaded"))
    path = save_prompt(tmp_path / "p.safetensors", torch.ones(4, 64), PromptMetadata(model="tiny", pretrained="none"))
    with pytest.raises(NemesisError, match="--topk 0"):
        interpret_prompt(path, topk=0)
    with pytest.raises(NemesisError, match="--topk 50000"):
        interpret_prompt(path, topk=50000)
    with pytest.raises(NemesisError, match="does not match the text width 512"):
        interpret_prompt(path, model="RN50", pretrained="none")
    with pytest.raises(NemesisError, match="name the weights of RN50"):
        interpret_prompt(path, model="RN50")

"""Backbone loading: names, weights identities and offline failures."""

from __future__ import annotations

import pytest
import torch

import nemesis.model.backbone as backbone
from nemesis.errors import NemesisError
from nemesis.model.backbone import load_clip, text_width


def test_tiny_is_registered_frozen_and_reproducible():
    first, second = load_clip("tiny"), load_clip("tiny")
    assert first.weights_id == second.weights_id == "random-seed0"
    assert not first.model.training
    assert all(not parameter.requires_grad for parameter in first.model.parameters())
    for (name, a), (_, b) in zip(first.model.state_dict().items(), second.model.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert first.image_size == 28 and text_width("tiny") == 64


def test_local_weights_file_is_identified_by_content(tmp_path):
    model = load_clip("tiny").model
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    loaded = load_clip("tiny", str(path))
    assert loaded.weights_id.startswith("sha256:")
    state = model.state_dict()
    state["logit_scale"] = state["logit_scale"] + 1
    other = tmp_path / "other.pt"
    torch.save(state, other)
    assert load_clip("tiny", str(other)).weights_id != loaded.weights_id


def test_unknown_model_names_alternatives():
    with pytest.raises(NemesisError, match=r"unknown model 'ViT-B-33'.*ViT-B-32"):
        load_clip("ViT-B-33")


def test_unknown_tag_lists_known_tags():
    with pytest.raises(NemesisError, match=r"unknown pretrained tag 'nope'.*openai"):
        load_clip("RN50", "nope")


def test_tiny_without_weights_suggests_its_own_tag():
    # train's default --pretrained openai on tiny: the hint names fmnist, tiny's one tag
    with pytest.raises(NemesisError, match=r"unknown pretrained tag 'openai' for tiny \(known tags: fmnist\)"):
        load_clip("tiny", "openai")


def test_offline_tag_fails_at_once_saying_how_to_supply_a_file(monkeypatch, caplog):
    import open_clip

    def never(*args, **kwargs):
        raise AssertionError("open_clip was asked to build the model")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", never)
    offline = r"not downloaded yet and HF_HUB_OFFLINE is set.*--pretrained PATH"
    offline += r".*to try the toolkit offline: --model tiny --pretrained fmnist"
    with pytest.raises(NemesisError, match=offline):
        load_clip("RN50", "openai")
    assert not caplog.records  # no logging line before the error


def test_unreachable_hub_fails_at_once(monkeypatch):
    import socket

    def unreachable(*args, **kwargs):
        raise OSError("Network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(NemesisError, match=r"huggingface.co cannot be reached"):
        load_clip("RN50", "openai")


def test_offline_cli_eval_is_one_line(tmp_path):
    from nemesis.files.checkpoint import PromptMetadata, save_prompt

    from .conftest import fails_with_one_line

    prompt = save_prompt(tmp_path / "p.safetensors", torch.zeros(4, 512), PromptMetadata(dataset="fashion_mnist"))
    fails_with_one_line(["eval", str(prompt), "--model", "RN50", "--pretrained", "openai"], "not downloaded yet")


def test_missing_weights_file():
    with pytest.raises(NemesisError, match="weights file not found"):
        load_clip("tiny", "/no/such/weights.pt")


def test_text_tower_without_clip_layout_is_refused():
    from nemesis.methods.coop.learner import PromptLearner

    # An open_clip model whose tokenizer is not CLIP's (Hugging Face tokenizer, no start token)
    clip = load_clip("tiny")
    clip.tokenizer = object()
    with pytest.raises(NemesisError, match="no CLIP-style text tower"):
        PromptLearner(clip, ["a", "b"])


def test_openai_tags_build_with_quick_gelu(monkeypatch, tmp_path):
    """CoOp's OpenAI CLIP uses QuickGELU; open_clip's RN50/ViT configs default to GELU."""
    import open_clip

    from nemesis.model.backbone import uses_quick_gelu

    assert uses_quick_gelu("RN50", "openai") and uses_quick_gelu("ViT-B-16", "openai")
    assert not uses_quick_gelu("ViT-B-32", "laion2b_s34b_b79k") and not uses_quick_gelu("RN50", None)
    # Stand in for the download with a file of the right shapes, then check the built activation.
    weights = tmp_path / "rn50.pt"
    torch.save(load_clip("RN50").model.state_dict(), weights)
    monkeypatch.setattr(open_clip.factory, "download_pretrained", lambda *args, **kwargs: str(weights))
    monkeypatch.setattr(backbone, "_weights_cached", lambda config: True)  # as if downloaded before
    clip = load_clip("RN50", "openai")
    activations = {type(module).__name__ for module in clip.model.modules() if "GELU" in type(module).__name__}
    assert activations == {"QuickGELU"} and clip.weights_id == "tag:openai+quickgelu"


def test_plain_file_of_an_openai_architecture_notes_the_guessed_activation(tmp_path):
    """No --activation for a plain state dict of an OpenAI architecture: GELU, with a one-line note."""
    from nemesis.errors import NemesisNote
    from nemesis.model.backbone import Activation

    from .conftest import cached_backbone

    weights = tmp_path / "vit-b-32.pt"
    torch.save({key: value.half() for key, value in cached_backbone("ViT-B-32").model.state_dict().items()}, weights)
    with pytest.warns(NemesisNote, match=r"vit-b-32\.pt is a plain weights file: building ViT-B-32 with GELU.*"
                      r"--activation quickgelu"):  # fmt: skip
        guessed = load_clip("ViT-B-32", str(weights))
    assert guessed.activation is Activation.gelu
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", NemesisNote)  # a named activation is no guess
        quick = load_clip("ViT-B-32", str(weights), activation="quickgelu")
    assert quick.activation is Activation.quickgelu
    assert {type(m).__name__ for m in quick.model.modules() if "GELU" in type(m).__name__} == {"QuickGELU"}
    assert quick.weights_id != guessed.weights_id and quick.weights_id.startswith(guessed.weights_id)


def test_the_two_activations_never_share_cached_features(tmp_path):
    from nemesis.data.datasets import load_dataset
    from nemesis.data.feature_cache import encode_split
    from nemesis.data.testing import make_coop_folder

    make_coop_folder(tmp_path / "data", "oxford_pets", classnames=["a", "b"], per_class=(1, 1, 2), image_size=28)
    data = load_dataset("oxford_pets", tmp_path / "data")
    weights = tmp_path / "tiny.pt"
    torch.save(load_clip("tiny").model.state_dict(), weights)
    cache = tmp_path / "cache"
    gelu, _ = encode_split(load_clip("tiny", str(weights), activation="gelu"), data, "test", cache_dir=cache)
    quick, _ = encode_split(load_clip("tiny", str(weights), activation="quickgelu"), data, "test", cache_dir=cache)
    assert len(list(cache.glob("*.safetensors"))) == 2 and not torch.equal(gelu, quick)


def test_activation_choices_and_contradictions_are_one_line():
    with pytest.raises(NemesisError, match=r"unknown activation 'relu'; choose one of quickgelu, gelu"):
        load_clip("tiny", activation="relu")
    with pytest.raises(NemesisError, match=r"--activation gelu contradicts the model name RN50-quickgelu; use --model"):
        load_clip("RN50-quickgelu", activation="gelu")

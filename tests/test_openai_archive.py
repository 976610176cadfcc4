"""OpenAI's CLIP TorchScript archives as --pretrained FILE: read without running, QuickGELU, checked architecture."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile

import open_clip
import pytest
import torch

from nemesis.data.testing import write_openai_archive
from nemesis.errors import NemesisError
from nemesis.model.backbone import Activation, load_clip
from nemesis.model.openai_archive import METADATA_TENSORS, read_openai_archive

from .conftest import fails_with_one_line

# A small CLIP in OpenAI's layout, with and without QuickGELU, like RN50 / RN50-quickgelu.
SMALL = "archive-test-vit"
SMALL_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 1, "layers": 2},
}


@pytest.fixture(scope="module")
def small_configs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("configs")
    (folder / f"{SMALL}.json").write_text(json.dumps({**SMALL_CONFIG, "quick_gelu": False}))
    (folder / f"{SMALL}-quickgelu.json").write_text(json.dumps({**SMALL_CONFIG, "quick_gelu": True}))
    open_clip.add_model_config(folder)
    return SMALL


def _features(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=generator)
    texts = open_clip.get_tokenizer(SMALL)(["a photo of a cat.", "an X-ray of a lung.", "x"])
    with torch.no_grad():
        return model.encode_image(images), model.encode_text(texts)


def _activations(model: torch.nn.Module) -> set[str]:
    return {type(module).__name__ for module in model.modules() if "GELU" in type(module).__name__}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_archive_gives_quickgelu_and_the_features_of_the_quickgelu_state_dict(small_configs, tmp_path, dtype):
    source = load_clip(f"{SMALL}-quickgelu").model
    archive = write_openai_archive(source, tmp_path / "ViT-small.pt", dtype=dtype)
    # The same weights, rounded as the archive stores them, as a plain open_clip state dict.
    state_file = tmp_path / "state.pt"
    torch.save({key: value.to(dtype).float() for key, value in source.state_dict().items()}, state_file)

    from_archive = load_clip(SMALL, str(archive))
    reference = load_clip(f"{SMALL}-quickgelu", str(state_file))
    assert from_archive.activation is Activation.quickgelu and _activations(from_archive.model) == {"QuickGELU"}
    assert from_archive.weights_id.startswith("sha256:") and from_archive.weights_id.endswith("+quickgelu")
    for ours, theirs in zip(_features(from_archive.model), _features(reference.model), strict=True):
        assert (ours - theirs).abs().max() <= 1e-5
    # The check can fail: the same weights under GELU give other features.
    gelu = load_clip(SMALL, str(state_file), activation="gelu")
    assert (_features(gelu.model)[1] - _features(reference.model)[1]).abs().max() > 1e-4


def test_archive_tensors_come_from_its_storages_and_metadata_is_dropped(small_configs, tmp_path):
    source = load_clip(f"{SMALL}-quickgelu").model
    archive = write_openai_archive(source, tmp_path / "a.pt", dtype=torch.float16)
    state = read_openai_archive(archive)
    assert set(state) == set(source.state_dict())  # no metadata tensors, no attention masks
    assert not set(METADATA_TENSORS) & set(state)
    assert all(tensor.dtype == torch.float16 for tensor in state.values())
    for key, value in source.state_dict().items():
        assert torch.equal(state[key].float(), value.half().float()), key


class _RunsACommand:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_archive(path, marker) -> None:
    """A zip in TorchScript's layout whose pickle names os.system."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"weight": _RunsACommand(str(marker))}, protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        archive.writestr("evil/code/__torch__/model.py", "class CLIP(Module):\n  pass\n")
        archive.writestr("evil/version", "3\n")


def test_archive_naming_os_system_is_refused_and_nothing_runs(small_configs, tmp_path, tiny):
    archive, marker = tmp_path / "evil.pt", tmp_path / "ran"
    _crafted_archive(archive, marker)
    with pytest.raises(NemesisError, match=r"refusing to load .*evil\.pt.*system"):
        read_openai_archive(archive)
    assert not marker.exists()

    from nemesis.files.checkpoint import PromptMetadata, save_prompt

    prompt = save_prompt(tmp_path / "p.safetensors", torch.zeros(4, 64), PromptMetadata(dataset="fashion_mnist"))
    fails_with_one_line(["eval", str(prompt), "--model", SMALL, "--pretrained", str(archive)], "refusing to load")
    assert not marker.exists()


def test_archive_of_another_architecture_is_one_line_naming_both(small_configs, tmp_path, tiny):
    archive = write_openai_archive(load_clip(f"{SMALL}-quickgelu").model, tmp_path / "small.pt")
    with pytest.raises(NemesisError, match=r"small\.pt holds a CLIP of another architecture .*--model tiny;"):
        load_clip("tiny", str(archive))
    from nemesis.files.checkpoint import PromptMetadata, save_prompt

    prompt = save_prompt(tmp_path / "p.safetensors", torch.zeros(4, 64), PromptMetadata(dataset="fashion_mnist"))
    result = fails_with_one_line(["eval", str(prompt), "--model", "tiny", "--pretrained", str(archive)], "small.pt")
    assert "--model tiny" in result.output


def test_openai_architectures_are_named_in_the_mismatch(monkeypatch, tmp_path):
    """A ViT-B-16 archive given with --model RN50: the line names both (shapes from the meta device)."""
    import nemesis.model.openai_archive as openai_archive

    with torch.device("meta"):
        vit_b_16 = open_clip.create_model("ViT-B-16", pretrained=None, device="meta").state_dict()
    monkeypatch.setattr(openai_archive, "read_openai_archive", lambda path: dict(vit_b_16))
    with pytest.raises(NemesisError, match=r"holds OpenAI's ViT-B-16, which does not fit --model RN50; pass --model"):
        openai_archive.read_openai_weights(tmp_path / "ViT-B-16.pt", "RN50")


def test_a_torch_save_zip_is_not_taken_for_an_archive(tmp_path):
    from nemesis.model.openai_archive import is_openai_archive

    path = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, path)
    assert not is_openai_archive(path)
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    assert not is_openai_archive(io.BytesIO(buffer.getvalue()))

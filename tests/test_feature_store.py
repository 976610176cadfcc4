"""Cache entries written a batch at a time and read back a block at a time: the file is the safetensors
entry a whole write gives, and evaluation, saved logits and sweeps over streamed features equal them held
whole, reading no more than one block of images at once."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file, safe_open

from nemesis.checksum import tensors_sha256
from nemesis.data import feature_cache
from nemesis.data.datasets import load_dataset
from nemesis.data.feature_store import StoredFeatures, file_checksum, stored_features, write_entry
from nemesis.data.testing import make_coop_folder
from nemesis.evaluation import metrics
from nemesis.evaluation.metrics import class_logits, predictions
from nemesis.files.checkpoint import PromptMetadata, save_prompt
from nemesis.methods.coop.learner import PromptLearner
from nemesis.methods.plot.learner import PLOTLearner

from .conftest import cached_backbone

CLASSNAMES = ["red apple", "green leaf", "blue sky"]


def _written(path, features: torch.Tensor, labels: torch.Tensor, batch: int = 3) -> None:
    with write_entry(path, labels, {"model": "tiny"}) as writer:
        for part in features.split(batch):
            writer.append(part)


def test_an_entry_written_in_batches_is_the_safetensors_file_a_whole_write_gives(tmp_path):
    features, labels = torch.randn(10, 3, 4), torch.arange(10) % 3
    path = tmp_path / "entry.safetensors"
    _written(path, features, labels)
    loaded = load_file(path)
    assert torch.equal(loaded["features"], features) and torch.equal(loaded["labels"], labels)
    with safe_open(str(path), framework="pt") as file:
        metadata = file.metadata()
    expected = tensors_sha256({"features": features, "labels": labels})
    assert metadata["sha256"] == expected == file_checksum(path)
    assert json.loads(metadata["nemesis"]) == {"model": "tiny"}


def test_an_entry_appears_only_when_whole(tmp_path):
    path = tmp_path / "entry.safetensors"
    with pytest.raises(RuntimeError), write_entry(path, torch.arange(4), {}) as writer:
        writer.append(torch.randn(2, 5))
        raise RuntimeError("the encoder failed")
    with (
        pytest.raises(ValueError, match="2 feature rows were written for 4 labels"),
        write_entry(path, torch.arange(4), {}) as writer,
    ):
        writer.append(torch.randn(2, 5))
    assert list(tmp_path.iterdir()) == []


def test_an_empty_split_is_an_empty_entry(tmp_path):
    path = tmp_path / "entry.safetensors"
    _written(path, torch.zeros(0, 0), torch.zeros(0, dtype=torch.int64))
    assert load_file(path)["features"].shape == (0, 0)
    assert file_checksum(path) == tensors_sha256({"features": torch.zeros(0, 0), "labels": torch.zeros(0).long()})


def test_stored_features_give_the_rows_the_tensor_holds(tmp_path):
    features = torch.randn(10, 3, 4)
    path = tmp_path / "entry.safetensors"
    _written(path, features, torch.arange(10))
    stored = stored_features(path)
    assert isinstance(stored, StoredFeatures)
    assert (len(stored), stored.shape, stored.dim(), stored.row_bytes) == (10, features.shape, 3, 48)
    assert torch.equal(stored[2:7], features[2:7]) and torch.equal(stored[8:], features[8:])
    assert [block.shape[0] for block in stored.split(4)] == [4, 4, 2]
    assert torch.equal(torch.cat(list(stored.split(4))), features)
    assert stored.to("cpu")[0:1].device == torch.device("cpu")


def test_a_changed_byte_changes_the_checksum_and_the_entry_is_encoded_again(tmp_path, monkeypatch):
    make_coop_folder(tmp_path / "data", "oxford_pets", CLASSNAMES, per_class=(1, 1, 3), image_size=28)
    data, tiny = load_dataset("oxford_pets", tmp_path / "data"), cached_backbone("tiny")
    monkeypatch.setattr(feature_cache, "RESIDENT_LIMIT_BYTES", 0)  # every entry streamed
    whole = feature_cache.encode_split(tiny, data, "test", cache_dir=tmp_path / "cache", progress=False)[0]
    (path,) = (tmp_path / "cache").glob("*.safetensors")
    recorded = file_checksum(path)
    content = bytearray(path.read_bytes())
    content[-100] ^= 1  # a bit of the last image's features
    path.write_bytes(bytes(content))
    assert file_checksum(path) != recorded
    before = feature_cache.encoded_images
    again = feature_cache.encode_split(tiny, data, "test", cache_dir=tmp_path / "cache", progress=False)[0]
    assert feature_cache.encoded_images - before == len(data.test)
    assert torch.equal(again[0 : len(again)], whole[0 : len(whole)])


@pytest.fixture
def streamed_split(tmp_path, monkeypatch):
    """The local test features of 21 images held whole, then the same entry streamed in blocks of 8
    images; returns both, and the largest number of rows one read took."""
    make_coop_folder(tmp_path / "data", "oxford_pets", CLASSNAMES, per_class=(2, 1, 7), image_size=28)
    data, tiny = load_dataset("oxford_pets", tmp_path / "data"), cached_backbone("tiny")
    cache = tmp_path / "cache"
    whole, labels = feature_cache.encode_split(tiny, data, "test", cache_dir=cache, progress=False, inputs="local")
    monkeypatch.setattr(feature_cache, "RESIDENT_LIMIT_BYTES", 0)
    before = feature_cache.encoded_images
    stored, _ = feature_cache.encode_split(tiny, data, "test", cache_dir=cache, progress=False, inputs="local")
    assert isinstance(stored, StoredFeatures) and feature_cache.encoded_images == before
    row_bytes = whole[0].numel() * 4
    monkeypatch.setattr(metrics, "STREAM_BLOCK_BYTES", 9 * row_bytes)  # 9 images: 8 for PLOT's blocks of 4
    largest = [0]
    read = StoredFeatures.__getitem__

    def counted(self, rows):
        block = read(self, rows)
        largest[0] = max(largest[0], block.shape[0])
        return block

    monkeypatch.setattr(StoredFeatures, "__getitem__", counted)
    return tiny, whole, stored, labels, largest


def _variants(ctx: torch.Tensor) -> torch.Tensor:
    noise = torch.randn(ctx.shape, generator=torch.Generator().manual_seed(3)) * 0.1
    return torch.stack([ctx, ctx * 0.5, ctx + noise])


def test_plot_scored_from_streamed_features_equals_them_held_whole(streamed_split):
    tiny, whole, stored, _, largest = streamed_split
    learner = PLOTLearner(tiny, CLASSNAMES, n_ctx=4, sinkhorn_batch=4, seed=1)
    variants = _variants(learner.ctx.detach())
    assert torch.equal(predictions(learner, stored, variants), predictions(learner, whole, variants))
    scale = tiny.model.logit_scale
    assert torch.equal(class_logits(learner, stored, scale), class_logits(learner, whole, scale))
    assert largest[0] == 8  # two Sinkhorn blocks of 4 at a time, never the split's 21 images


def test_coop_scored_from_streamed_features_equals_them_held_whole(tmp_path, monkeypatch):
    make_coop_folder(tmp_path / "data", "oxford_pets", CLASSNAMES, per_class=(2, 1, 7), image_size=28)
    data, tiny = load_dataset("oxford_pets", tmp_path / "data"), cached_backbone("tiny")
    whole, _ = feature_cache.encode_split(tiny, data, "test", cache_dir=tmp_path / "cache", progress=False)
    monkeypatch.setattr(feature_cache, "RESIDENT_LIMIT_BYTES", 0)
    stored, _ = feature_cache.encode_split(tiny, data, "test", cache_dir=tmp_path / "cache", progress=False)
    monkeypatch.setattr(metrics, "STREAM_BLOCK_BYTES", 5 * stored.row_bytes)
    learner = PromptLearner(tiny, CLASSNAMES, n_ctx=4, seed=1)
    variants = _variants(learner.ctx.detach())
    assert torch.equal(predictions(learner, stored, variants), predictions(learner, whole, variants))
    scale = tiny.model.logit_scale
    torch.testing.assert_close(
        class_logits(learner, stored, scale), class_logits(learner, whole, scale), rtol=0, atol=1e-5
    )


def test_eval_and_a_sweep_of_a_plot_prompt_streamed_equal_them_held_whole(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from nemesis_cli.main import app

    make_coop_folder(tmp_path / "data", "oxford_pets", CLASSNAMES, per_class=(2, 1, 7), image_size=28)
    learner = PLOTLearner(cached_backbone("tiny"), CLASSNAMES, n_ctx=4, sinkhorn_batch=4, seed=2)
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=2, seed=1, prompt_method="plot", epoch=1)
    save_prompt(tmp_path / "prompt.safetensors", learner.ctx.detach(), metadata, {})
    common = ["--root", str(tmp_path / "data"), "--pretrained", "none", "--device", "cpu",
              "--method-option", "sinkhorn_batch=4"]  # fmt: skip

    def run(name: str) -> tuple[dict, pd.DataFrame]:
        logits = tmp_path / f"{name}.safetensors"
        for command in (["eval", "--save-logits", str(logits)], ["corrupt", "--out", str(tmp_path / f"{name}.parquet"),
                        "--rescale", "0.001,2", "--replace", "0,1", "--positions", "0,3"]):  # fmt: skip
            result = CliRunner().invoke(app, [command[0], str(tmp_path / "prompt.safetensors"), *command[1:], *common])
            assert result.exit_code == 0, result.output
        table = pd.read_parquet(tmp_path / f"{name}.parquet").sort_values("cell_id")
        return load_file(logits), table.reset_index(drop=True)

    whole_logits, whole_table = run("whole")
    monkeypatch.setattr(feature_cache, "RESIDENT_LIMIT_BYTES", 0)
    monkeypatch.setattr(metrics, "STREAM_BLOCK_BYTES", 1)  # one Sinkhorn block of 4 images at a time
    blocks, read = [], StoredFeatures.__getitem__
    monkeypatch.setattr(StoredFeatures, "__getitem__", lambda self, rows: blocks.append(rows) or read(self, rows))
    streamed_logits, streamed_table = run("streamed")
    assert blocks and all(rows.stop - rows.start <= 4 for rows in blocks)
    assert torch.equal(streamed_logits["logits"], whole_logits["logits"])
    assert torch.equal(streamed_logits["labels"], whole_logits["labels"])
    assert len(whole_table) == 9
    pd.testing.assert_frame_equal(streamed_table, whole_table)

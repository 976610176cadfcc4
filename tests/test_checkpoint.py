"""Prompt checkpoints: our safetensors format, Dassl files through the restricted unpickler, export."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch

from nemesis.errors import NemesisError
from nemesis.files.checkpoint import (
    PromptMetadata,
    export_dassl,
    find_dassl_file,
    load_checkpoint,
    load_prompt,
    save_prompt,
)
from nemesis.unpickle import PickledObject, load_pickle, load_torch_file


def write_dassl_checkpoint(folder, ctx, epoch=50):
    """A checkpoint exactly as Dassl's `save_checkpoint` writes it for CoOp's prompt learner."""
    parameter = torch.nn.Parameter(ctx.clone())
    optimizer = torch.optim.SGD([parameter], lr=0.002, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epoch)
    parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    scheduler.step()
    n_cls = 3
    content = {
        "state_dict": {
            "ctx": ctx,
            "token_prefix": torch.zeros(n_cls, 1, ctx.shape[-1], dtype=ctx.dtype),
            "token_suffix": torch.zeros(n_cls, 60, ctx.shape[-1], dtype=ctx.dtype),
        },
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        # Dassl's warm-up scheduler state holds the wrapped scheduler object itself, pickled
        "scheduler": {"successor": scheduler, "warmup_epoch": 1, "cons_lr": 1e-5, "last_epoch": epoch},
        "val_result": np.float64(71.5),
    }
    folder = folder / "prompt_learner"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"model.pth.tar-{epoch}"
    torch.save(content, path)
    return path


def test_safetensors_round_trip(tmp_path):
    ctx = torch.randn(2, 16, 64)
    metadata = PromptMetadata(
        model="tiny",
        classnames=["a", "b"],
        dataset="fashion_mnist",
        shots=4,
        seed=1,
        prompt_method="coop",
        penalty="nemesis",
        penalty_config={"beta": 1.0},
        epoch=7,
    )
    path = save_prompt(tmp_path / "p.safetensors", ctx, metadata)
    loaded = load_checkpoint(path)
    assert torch.equal(loaded.ctx, ctx)
    assert loaded.metadata.classnames == ["a", "b"] and loaded.metadata.penalty_config == {"beta": 1.0}
    assert loaded.metadata.prompt_config["n_ctx"] == 16 and loaded.metadata.text_width == 64 and loaded.class_specific
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]  # no temporary file left


def test_unknown_metadata_keys_warn(tmp_path):
    path = save_prompt(tmp_path / "p.safetensors", torch.randn(4, 64), PromptMetadata())
    from safetensors.torch import load_file, save_file

    save_file(load_file(str(path)), str(path), metadata={"nemesis": '{"model": "tiny", "future_key": 1}'})
    with pytest.warns(UserWarning, match="future_key"):
        assert load_prompt(path).metadata.model == "tiny"


def test_dassl_fp16_checkpoint_round_trips(tmp_path):
    ctx = (torch.randn(16, 512) * 0.02).half()
    path = write_dassl_checkpoint(tmp_path / "seed1", ctx, epoch=50)
    for where in (path, path.parent, tmp_path / "seed1"):
        loaded = load_checkpoint(where)
        assert loaded.ctx.dtype == torch.float32
        assert torch.equal(loaded.ctx, ctx.float())
        assert loaded.metadata.epoch == 50 and loaded.metadata.source_format == "dassl"
    content = load_torch_file(path)
    assert isinstance(content["scheduler"]["successor"], PickledObject)
    assert content["scheduler"]["successor"].pickled_class == "torch.optim.lr_scheduler.CosineAnnealingLR"


def test_latest_epoch_unless_named(tmp_path):
    run = tmp_path / "seed1"
    for epoch in (5, 10, 50):
        write_dassl_checkpoint(run, torch.full((4, 512), float(epoch)), epoch=epoch)
    assert find_dassl_file(run).name == "model.pth.tar-50"
    assert load_checkpoint(run, epoch=10).ctx[0, 0].item() == 10.0
    with pytest.raises(NemesisError, match="epoch 7"):
        load_checkpoint(run, epoch=7)


class _RunsCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model.pth.tar-1"
    torch.save({"state_dict": {"ctx": torch.zeros(4, 512)}, "epoch": 1, "payload": _RunsCommand(marker)}, path)
    with pytest.raises(NemesisError, match="system"):
        load_checkpoint(path)
    plain = tmp_path / "split.pkl"
    plain.write_bytes(pickle.dumps({"train": [_RunsCommand(marker)]}))
    with pytest.raises(NemesisError, match="system"):
        load_pickle(plain)
    assert not marker.exists()


def test_export_is_readable_by_coop_style_loading(tmp_path):
    ctx = torch.randn(16, 512)
    checkpoint = load_checkpoint(save_prompt(tmp_path / "p.safetensors", ctx, PromptMetadata(epoch=200)))
    (tmp_path / "out").mkdir()
    target = export_dassl(checkpoint, tmp_path / "out")
    assert target == tmp_path / "out" / "prompt_learner" / "model.pth.tar-200"
    # CoOp's load_model: torch.load, then load_state_dict(state_dict, strict=False) on the prompt learner
    content = torch.load(target, map_location="cpu", weights_only=True)
    learner = torch.nn.Module()
    learner.ctx = torch.nn.Parameter(torch.zeros(16, 512))
    learner.load_state_dict(content["state_dict"], strict=False)
    assert torch.equal(learner.ctx.data, ctx) and content["epoch"] == 200
    assert torch.equal(load_checkpoint(tmp_path / "out").ctx, ctx)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a torch checkpoint"),
        (b"hello, world", "not a torch checkpoint"),
    ],
)
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "file.bin"
    path.write_bytes(content)
    with pytest.raises(NemesisError, match=message):
        load_checkpoint(path)


def test_bad_ctx_values(tmp_path):
    torch.save({"state_dict": {"ctx": torch.full((4, 512), float("inf"))}, "epoch": 1}, tmp_path / "inf.pth")
    with pytest.raises(NemesisError, match="NaN or Inf"):
        load_checkpoint(tmp_path / "inf.pth")
    torch.save({"state_dict": {"weight": torch.zeros(3)}}, tmp_path / "other.pth")
    with pytest.raises(NemesisError, match="no state_dict"):
        load_checkpoint(tmp_path / "other.pth")
    with pytest.raises(NemesisError, match="not found"):
        load_checkpoint(tmp_path / "missing.pth")


def test_atomic_outputs_get_ordinary_permissions(tmp_path):
    import stat

    previous = os.umask(0o022)
    try:
        path = save_prompt(tmp_path / "p.safetensors", torch.zeros(2, 4), PromptMetadata())
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_dassl_class_position_comes_from_coop_folder_names(tmp_path):
    run = tmp_path / "output/oxford_pets/CoOp/rn50_16shots/nctx16_cscFalse_ctpmiddle/seed1"
    write_dassl_checkpoint(run, torch.zeros(16, 512), epoch=3)
    assert load_checkpoint(run).metadata.prompt_config["class_position"] == "middle"
    official = tmp_path / "output/oxford_pets/CoOp_Nemesis/alpha1_nctx16_cscFalse_ctpfront_nttwo/seed2"
    write_dassl_checkpoint(official, torch.zeros(16, 512), epoch=3)
    assert load_checkpoint(official).metadata.prompt_config["class_position"] == "front"
    write_dassl_checkpoint(tmp_path / "plain", torch.zeros(16, 512), epoch=3)
    assert load_checkpoint(tmp_path / "plain").metadata.prompt_config["class_position"] == "end"


def test_run_folder_final_prompt_epochs_and_unfinished_runs(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.json").write_text("{}")
    for epoch in (2, 4):
        save_prompt(
            run / f"checkpoints/epoch-{epoch:04d}.safetensors",
            torch.full((4, 8), float(epoch)),
            PromptMetadata(epoch=epoch),
        )
    assert load_checkpoint(run).metadata.epoch == 4  # unfinished: the latest saved epoch
    assert load_checkpoint(run, epoch=2).ctx[0, 0].item() == 2.0
    with pytest.raises(NemesisError, match=r"no epoch 3 yet \(saved epochs: 2, 4\)"):
        load_checkpoint(run, epoch=3)
    save_prompt(run / "prompt.safetensors", torch.full((4, 8), 6.0), PromptMetadata(epoch=6))
    assert load_checkpoint(run).metadata.epoch == 6 and load_checkpoint(run, epoch=6).ctx[0, 0].item() == 6.0

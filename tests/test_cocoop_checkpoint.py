"""CoCoOp checkpoints: our safetensors file with the meta-net, CoCoOp's Dassl files in and out, bad input."""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import torch
from typer.testing import CliRunner

from nemesis.data.testing import make_coop_folder
from nemesis.files.checkpoint import PromptCheckpoint, PromptMetadata, export_dassl, load_checkpoint, save_prompt
from nemesis.methods.cocoop.learner import MetaNet
from nemesis_cli.main import app

from .conftest import fails_with_one_line
from .test_checkpoint import write_dassl_checkpoint


class _CoCoOpPromptLearner(torch.nn.Module):
    """The parameters and buffers of CoCoOp's PromptLearner, with its attribute names."""

    def __init__(self, n_cls: int, n_ctx: int, embed_dim: int, width: int) -> None:
        super().__init__()
        self.ctx = torch.nn.Parameter(torch.randn(n_ctx, width) * 0.02)
        self.meta_net = torch.nn.Sequential(
            OrderedDict(
                [
                    ("linear1", torch.nn.Linear(embed_dim, embed_dim // 16)),
                    ("relu", torch.nn.ReLU(inplace=True)),
                    ("linear2", torch.nn.Linear(embed_dim // 16, width)),
                ]
            )
        )
        self.register_buffer("token_prefix", torch.randn(n_cls, 1, width))
        self.register_buffer("token_suffix", torch.randn(n_cls, 77 - 1 - n_ctx, width))


def write_cocoop_dassl_checkpoint(folder, n_cls=5, n_ctx=4, embed_dim=64, width=64, epoch=10, half=True):
    """A checkpoint as Dassl's `save_checkpoint` writes CoCoOp's prompt learner (fp16, PREC "fp16")."""
    learner = _CoCoOpPromptLearner(n_cls, n_ctx, embed_dim, width)
    return save_as_dassl(folder, learner.half() if half else learner, epoch)


def save_as_dassl(folder, learner: torch.nn.Module, epoch: int):
    """`<folder>/prompt_learner/model.pth.tar-<epoch>` as Dassl's `save_checkpoint` writes a prompt learner
    after a step: its state dict, SGD's and the scheduler's state (pickled objects), a numpy val_result."""
    optimizer = torch.optim.SGD(learner.parameters(), lr=0.002, momentum=0.9, weight_decay=5e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epoch)
    for parameter in learner.parameters():
        parameter.grad = torch.ones_like(parameter)
    optimizer.step()
    scheduler.step()
    content = {
        "state_dict": learner.state_dict(),
        "epoch": epoch,
        "optimizer": optimizer.state_dict(),
        "scheduler": {"successor": scheduler, "warmup_epoch": 1, "cons_lr": 1e-5, "last_epoch": epoch},
        "val_result": np.float64(81.2),
    }
    path = folder / "prompt_learner" / f"model.pth.tar-{epoch}"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content, path)
    return path, learner


def test_cocoop_dassl_checkpoint_round_trips_and_exports(tmp_path):
    path, learner = write_cocoop_dassl_checkpoint(tmp_path / "seed1")
    state = learner.state_dict()
    for where in (path, path.parent, tmp_path / "seed1"):
        loaded = load_checkpoint(where)
        assert loaded.prompt_method == "cocoop" and loaded.metadata.epoch == 10
        assert torch.equal(loaded.ctx, state["ctx"].float())
        assert set(loaded.extra) == {f"meta_net.linear{i}.{k}" for i in (1, 2) for k in ("weight", "bias")}
        assert all(torch.equal(tensor, state[name].float()) for name, tensor in loaded.extra.items())

    # our file keeps the meta-net; its Dassl export loads back with the same tensors
    ours = save_prompt(tmp_path / "p.safetensors", loaded.ctx, PromptMetadata(epoch=10), loaded.extra)
    again = load_checkpoint(ours)
    assert again.prompt_method == "cocoop" and again.metadata.prompt_method == "cocoop"
    (tmp_path / "out").mkdir()
    target = export_dassl(again, tmp_path / "out")
    exported = load_checkpoint(target)
    assert torch.equal(exported.ctx, loaded.ctx)
    assert all(torch.equal(exported.extra[name], tensor) for name, tensor in loaded.extra.items())
    # CoCoOp's load_model: drop the token buffers, load_state_dict(strict=False) into its prompt learner
    content = torch.load(target, map_location="cpu", weights_only=True)
    fresh = _CoCoOpPromptLearner(5, 4, 64, 64)
    fresh.load_state_dict(content["state_dict"], strict=False)
    assert torch.equal(fresh.meta_net.linear2.weight.data, loaded.extra["meta_net.linear2.weight"])


def test_our_meta_net_has_cocoops_state_dict_keys():
    theirs = _CoCoOpPromptLearner(2, 4, 64, 64).meta_net.state_dict()
    ours = MetaNet(64, 64).state_dict()
    assert {name: tensor.shape for name, tensor in ours.items()} == {
        name: tensor.shape for name, tensor in theirs.items()
    }


def test_cocoop_dassl_checkpoint_evaluates(tmp_path):
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", ["red apple", "green leaf", "blue sky", "yellow sun"], per_class=(1, 1, 2))
    write_cocoop_dassl_checkpoint(tmp_path / "seed1", half=False)
    result = CliRunner().invoke(
        app,
        ["eval", str(tmp_path / "seed1"), "--model", "tiny", "--pretrained", "none", "--dataset", "oxford_pets",
         "--root", str(root), "--subsample", "base", "--prompt-method", "cocoop", "--device", "cpu",
         "--out", str(tmp_path / "evals.jsonl")],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "evals.jsonl").read_text())
    assert (record["method"], record["subsample"], record["n"]) == ("cocoop", "base", 4)


def test_bad_cocoop_input_is_one_line(tmp_path):
    coop = write_dassl_checkpoint(tmp_path / "coop", torch.randn(4, 64))
    cocoop, _ = write_cocoop_dassl_checkpoint(tmp_path / "cocoop")
    wide, _ = write_cocoop_dassl_checkpoint(tmp_path / "wide", embed_dim=512)  # meta-net of a 512-wide model
    common = ["--model", "tiny", "--pretrained", "none", "--dataset", "fashion_mnist", "--device", "cpu"]
    fails_with_one_line(["eval", str(coop), *common, "--prompt-method", "cocoop"], "is a coop checkpoint, not cocoop")
    fails_with_one_line(["eval", str(cocoop), *common, "--prompt-method", "coop"], "is a cocoop checkpoint, not coop")
    fails_with_one_line(["eval", str(wide), *common], "meta_net.linear1.weight has shape (32, 512)")
    fails_with_one_line(["prompt", "info", str(wide), "--model", "tiny"], "image width 64")
    fails_with_one_line(["eval", str(cocoop), *common, "--prompt-method", "soup"], "unknown prompt method 'soup'")


def test_a_cocoop_file_in_a_coop_tree_is_read_as_cocoop_with_its_meta_net(tmp_path):
    """The trainer folder names the method only when the file holds that method's tensors: a CoCoOp
    file copied into a CoOp tree keeps its meta-net, and a CoOp file in a CoCoOp tree reads as CoOp."""
    tree = tmp_path / "output" / "oxford_pets" / "CoOp" / "rn50_16shots" / "nctx4_cscFalse_ctpend" / "seed1"
    path, _ = write_cocoop_dassl_checkpoint(tree)
    loaded = load_checkpoint(path)
    assert loaded.prompt_method == "cocoop" and len(loaded.extra) == 4
    coop_tree = tmp_path / "output" / "dtd" / "CoCoOp" / "vit_b16_c4" / "seed1"
    export_dassl(PromptCheckpoint(torch.zeros(4, 64), PromptMetadata()), coop_tree, epoch=3)
    assert load_checkpoint(coop_tree).prompt_method == "coop"

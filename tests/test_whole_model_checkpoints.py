"""Whole-model Dassl checkpoints of the official MaPLe, IVLP, PromptSRC and VPT trainers (issue 24, item 3).

The files are written here exactly as those trainers save them (random ViT-B-16 towers, key names,
dtypes, Dassl's dict, their run trees); reading one gives our prompt, whose learner scores as the
plain reference of tests/test_tower_methods.py on the file's raw tensors. Bad files fail in one line,
the frozen towers are checked against the backbone, exports read back, and a file of hundreds of MB
is read without holding its towers.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from nemesis.data.testing import make_coop_folder
from nemesis.errors import NemesisError
from nemesis.evaluation.evaluate import export_backbone
from nemesis.files.checkpoint import export_dassl, load_checkpoint
from nemesis.files.whole_model import check_frozen_weights, frozen_mismatch
from nemesis.methods.protocol import build_learner
from nemesis.model.vision_prompts import patch_embeddings
from nemesis.unpickle import UnreadTensor, load_torch_file
from nemesis_cli.main import app

from .conftest import cached_backbone, fails_with_one_line
from .test_tower_methods import CLASSNAMES, TOLERANCE, _images, _reference_similarities

MODEL = "ViT-B-16"
RUN = ("output", "base2new", "train_base", "oxford_pets", "shots_16")
# method: (trainer folder, config folder, model folder, epoch)
TREES = {
    "maple": ("MaPLe", "vit_b16_c2_ep5_batch4_2ctx", "MultiModalPromptLearner", 5),
    "ivlp": ("IVLP", "vit_b16_c2_ep5_batch4_2+2ctx", "VLPromptLearner", 5),
    "promptsrc": ("PromptSRC", "vit_b16_c2_ep20_batch4_4+4ctx", "VLPromptLearner", 20),
    "vpt": ("VPT", "vit_b16_c2_ep5_batch4_4", "prompt_learner", 5),
}
# (tokens per layer, depth) of each trainer's base-to-novel config
SHAPES = {"maple": (2, 9), "ivlp": (2, 12), "promptsrc": (4, 9), "vpt": (8, 12)}


@functools.cache
def _frozen_towers(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """CustomCLIP's frozen parts of the random ViT-B-16: image_encoder.*, text_encoder.* (no token_embedding)."""
    model = cached_backbone(MODEL).model
    state = {f"image_encoder.{k}": v.detach().to(dtype).clone() for k, v in model.visual.state_dict().items()}
    for key, value in model.state_dict().items():
        if key.startswith(("transformer.", "positional_embedding", "ln_final.", "text_projection")):
            state[f"text_encoder.{key}"] = value.detach().to(dtype).clone()
    state["logit_scale"] = model.logit_scale.detach().to(dtype).clone()
    return state


def _random(shape, generator, scale, dtype=torch.float32) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * scale).to(dtype)


def _prompt_keys(method: str, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The learned keys as the official trainer saves them (ctx and proj fp16, block prompts fp32)."""
    n, depth = SHAPES[method]
    state = {}
    if method == "maple":
        state["prompt_learner.ctx"] = _random((n, 512), generator, 0.3, torch.float16)
        state["prompt_learner.proj.weight"] = _random((768, 512), generator, 0.05, torch.float16)
        state["prompt_learner.proj.bias"] = _random((768,), generator, 0.05, torch.float16)
        for i in range(depth - 1):
            state[f"prompt_learner.compound_prompts_text.{i}"] = _random((n, 512), generator, 0.3)
            state[f"prompt_learner.compound_prompt_projections.{i}.weight"] = _random((768, 512), generator, 0.05)
            state[f"prompt_learner.compound_prompt_projections.{i}.bias"] = _random((768,), generator, 0.05)
        return state
    if method != "vpt":
        state["prompt_learner.ctx"] = _random((n, 512), generator, 0.3, torch.float16)
        for i in range(1, depth):
            state[f"text_encoder.transformer.resblocks.{i}.VPT_shallow"] = _random((n, 512), generator, 0.3)
    state["image_encoder.VPT"] = _random((n, 768), generator, 0.3)
    for i in range(1, depth):
        state[f"image_encoder.transformer.resblocks.{i}.VPT_shallow"] = _random((n, 768), generator, 0.3)
    return state


def _dassl_file(path: Path, state: dict, epoch: int) -> Path:
    """Dassl's save_checkpoint: the state dict, epoch, optimizer and scheduler state, val_result."""
    momentum = {0: {"momentum_buffer": torch.zeros(4, 512)}}
    optimizer = {"state": momentum, "param_groups": [{"lr": 0.0035, "momentum": 0.9, "params": [0]}]}
    content = {"state_dict": state, "epoch": epoch, "optimizer": optimizer, "scheduler": {"last_epoch": epoch}}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(content | {"val_result": None}, path)
    return path


def _tree_file(root: Path, method: str) -> Path:
    trainer, config, folder, epoch = TREES[method]
    return root.joinpath(*RUN, trainer, config, "seed1", folder, f"model.pth.tar-{epoch}")


@pytest.fixture(scope="module")
def trees(tmp_path_factory) -> tuple[Path, dict[str, dict[str, torch.Tensor]]]:
    """The four trainers' files in their trees (random towers, random prompts); the learned keys of each."""
    root = tmp_path_factory.mktemp("whole-model")
    generator = torch.Generator().manual_seed(11)
    half, full = _frozen_towers(torch.float16), None
    learned = {}
    for method in TREES:
        learned[method] = _prompt_keys(method, generator)
        if method == "vpt":  # its trainer runs CLIP in fp32
            full = _frozen_towers(torch.float32)
            state = full | learned[method]
        else:
            n_ctx = SHAPES[method][0]
            buffers = {  # the prompt learner's token buffers for 3 classes (their loaders drop them)
                "prompt_learner.token_prefix": torch.zeros(3, 1, 512, dtype=torch.float16),
                "prompt_learner.token_suffix": torch.zeros(3, 76 - n_ctx, 512, dtype=torch.float16),
            }
            state = half | buffers | learned[method]
        if method == "promptsrc":  # its second, zero-shot image tower
            visual = {k.removeprefix("image_encoder."): v for k, v in half.items() if k.startswith("image_encoder.")}
            state |= {f"prompt_learner.ZS_image_encoder.{k}": v.clone() for k, v in visual.items()}
        _dassl_file(_tree_file(root, method), state, TREES[method][3])
    return root, learned


def _raw_stacks(method: str, keys: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our tensors from the trainer's keys, by the issue's mapping (independent of the reader)."""

    def stack(first: str, deeper: str, numbers) -> torch.Tensor:
        return torch.stack([keys[first].float(), *(keys[deeper.format(i)].float() for i in numbers)])

    depth = SHAPES[method][1]
    image = ("image_encoder.VPT", "image_encoder.transformer.resblocks.{}.VPT_shallow", range(1, depth))
    if method == "vpt":
        return {"ctx": stack(*image)}
    if method == "maple":
        deeper = "prompt_learner.compound_prompt_projections.{}"
        return {
            "ctx": stack("prompt_learner.ctx", "prompt_learner.compound_prompts_text.{}", range(depth - 1)),
            "projection.weight": stack("prompt_learner.proj.weight", deeper + ".weight", range(depth - 1)),
            "projection.bias": stack("prompt_learner.proj.bias", deeper + ".bias", range(depth - 1)),
        }
    text = ("prompt_learner.ctx", "text_encoder.transformer.resblocks.{}.VPT_shallow", range(1, depth))
    return {"ctx": stack(*text), "vision_prompts": stack(*image)}


@pytest.mark.parametrize("method", list(TREES))
def test_each_trainers_file_reads_and_scores_as_the_reference(trees, method):
    root, learned = trees
    run = _tree_file(root, method).parent.parent
    checkpoint = load_checkpoint(run)  # the run folder: its model folder, latest epoch
    raw = _raw_stacks(method, learned[method])
    assert checkpoint.prompt_method == method and checkpoint.metadata.source_format == "dassl"
    assert checkpoint.tensors.keys() == raw.keys()
    assert all(torch.equal(checkpoint.tensors[name], raw[name]) for name in raw)
    metadata = checkpoint.metadata
    assert (metadata.dataset, metadata.shots, metadata.seed, metadata.subsample) == ("oxford_pets", 16, 1, "base")
    assert metadata.epoch == TREES[method][3] and metadata.penalty == "none"
    n_ctx, depth = SHAPES[method]
    config = checkpoint.config
    assert config.n_ctx == n_ctx and config.ctx_init == (None if method == "vpt" else "a photo of a")
    assert (config.text_depth, config.vision_depth) == (0 if method == "vpt" else depth, depth)
    assert set(checkpoint.frozen) == {"visual.conv1.weight", "visual.proj", "text_projection"}

    backbone = cached_backbone(MODEL)
    checkpoint.check_model(MODEL, 512, 512)
    assert frozen_mismatch(checkpoint.frozen, backbone.model) is None  # fp16 copies of the same towers
    learner = build_learner(
        method, backbone, CLASSNAMES, ctx=checkpoint.ctx, extra=checkpoint.extra, **vars(checkpoint.config)
    )
    images = _images(backbone, count=2)
    with torch.no_grad():
        ours = learner.similarities(patch_embeddings(backbone.model.visual, images), checkpoint.ctx.unsqueeze(0))[0]
        reference = _reference_similarities(learner, backbone, images, raw)
    assert (ours - reference).abs().max().item() <= TOLERANCE


def test_the_trainer_folder_tells_promptsrc_from_ivlp_and_the_file_wins_elsewhere(trees, tmp_path):
    root, _ = trees
    assert load_checkpoint(_tree_file(root, "promptsrc"), prompt_method="promptsrc").prompt_method == "promptsrc"
    outside = tmp_path / "model.pth.tar-20"  # no tree: the zero-shot tower says PromptSRC
    outside.symlink_to(_tree_file(root, "promptsrc"))
    assert load_checkpoint(outside).prompt_method == "promptsrc"
    assert load_checkpoint(_tree_file(root, "ivlp")).prompt_method == "ivlp"


def test_a_promptsrc_tree_without_the_second_tower_is_still_promptsrc(tmp_path):
    path = _small_file(tmp_path, "promptsrc")  # IVLP's keys, no zero-shot tower, in PromptSRC's tree
    assert load_checkpoint(path).prompt_method == "promptsrc"
    assert load_checkpoint(path, prompt_method="ivlp").prompt_method == "ivlp"  # the same keys, named


def test_only_the_tensors_asked_for_are_read(tmp_path):
    """`load_torch_file(tensors=...)`: wanted keys come back as tensors (a view of a shared storage too),
    the others as UnreadTensor with dtype and shape; containers and plain values are kept."""
    base = torch.arange(12, dtype=torch.float16)
    content = {"state_dict": {"a": base[:4], "b": base[4:].view(2, 4), "c": torch.ones(3)}, "rest": [base, 5]}
    torch.save(content, tmp_path / "file.pth")
    read = load_torch_file(tmp_path / "file.pth", tensors=lambda key: key in ("b", "c"))
    state = read["state_dict"]
    assert isinstance(state["a"], UnreadTensor) and (state["a"].dtype, state["a"].shape) == (torch.float16, (4,))
    assert torch.equal(state["b"], base[4:].view(2, 4)) and torch.equal(state["c"], torch.ones(3))
    assert isinstance(read["rest"][0], UnreadTensor) and read["rest"][1] == 5  # under the key "rest"


def test_export_writes_their_layout_and_reads_back(trees, tmp_path):
    root, _ = trees
    original = _tree_file(root, "maple")
    checkpoint = load_checkpoint(original)
    backbone = export_backbone(checkpoint, MODEL, "none")
    target = export_dassl(checkpoint, tmp_path / "seed1", backbone=backbone)
    assert target == tmp_path / "seed1" / "MultiModalPromptLearner" / "model.pth.tar-5"
    back = load_checkpoint(target)
    assert back.prompt_method == "maple" and back.tensors.keys() == checkpoint.tensors.keys()
    assert all(torch.equal(back.tensors[k], checkpoint.tensors[k]) for k in checkpoint.tensors)

    def layout(path: Path) -> dict[str, tuple]:
        state = load_torch_file(path, tensors=lambda key: False)["state_dict"]  # shapes and dtypes only
        return {key: (tuple(value.shape), value.dtype) for key, value in state.items()}

    written, theirs = layout(target), layout(original)
    theirs = {k: v for k, v in theirs.items() if "token_" not in k}  # buffers their loaders drop
    assert written.keys() == theirs.keys()
    for key, (shape, dtype) in theirs.items():  # frozen fp16 as theirs; the prompts fp32 (lossless)
        assert written[key] == (shape, torch.float32 if key.startswith("prompt_learner.") else dtype)


# --- bad files: one line, exit 2 ----------------------------------------------------------------------


def _small_file(tmp_path: Path, method: str, change=None) -> Path:
    """A file of `method`'s keys with only a few frozen tensors (enough to be a whole model), changed by `change`."""
    keys = _prompt_keys(method, torch.Generator().manual_seed(3))
    frozen = _frozen_towers(torch.float16)
    state = {k: v for k, v in frozen.items() if k in ("image_encoder.conv1.weight", "image_encoder.proj")}
    state |= {k: v for k, v in frozen.items() if ".resblocks." in k and k.endswith("ln_1.bias")}  # the blocks
    state |= keys
    if change is not None:
        change(state)
    trainer, config, folder, _ = TREES[method]
    return _dassl_file(tmp_path.joinpath("oxford_pets", trainer, config, "seed1", folder, "model.pth.tar-5"), state, 5)


def _drop(key):
    return lambda state: state.pop(key)


def _widen(key):
    return lambda state: state.__setitem__(key, torch.zeros(2, 640))


def _deepen(state):
    state["image_encoder.transformer.resblocks.12.VPT_shallow"] = torch.zeros(8, 768)


BAD_FILES = [
    ("maple", ["--prompt-method", "ivlp"], None, "holds MaPLe's prompt"),
    ("ivlp", ["--prompt-method", "maple"], None, "holds IVLP's prompt"),
    ("promptsrc", ["--prompt-method", "ivlp"], None, "prompt_learner.ZS_image_encoder"),
    ("ivlp", ["--prompt-method", "vpt"], None, "--prompt-method ivlp"),
    ("maple", [], _drop("prompt_learner.proj.weight"), "prompt_learner.proj.weight"),
    ("vpt", [], _drop("image_encoder.VPT"), "image_encoder.VPT"),
    ("ivlp", [], _drop("text_encoder.transformer.resblocks.3.VPT_shallow"), "not consecutively"),
    ("maple", [], _drop("prompt_learner.compound_prompts_text.7"), "different depths"),
    ("ivlp", [], _widen("text_encoder.transformer.resblocks.2.VPT_shallow"), "one shape"),
    ("ivlp", [], _widen("prompt_learner.ctx"), "one shape"),
    ("vpt", [], _deepen, "vision tower has 12"),
]


@pytest.mark.parametrize(("method", "flags", "change", "expected"), BAD_FILES)
def test_a_bad_file_fails_in_one_line(tmp_path, method, flags, change, expected):
    if method == "promptsrc":
        marker = lambda state: state.__setitem__("prompt_learner.ZS_image_encoder.proj", torch.zeros(768, 512))  # noqa: E731
        path = _small_file(tmp_path, method, marker)
    else:
        path = _small_file(tmp_path, method, change)
    fails_with_one_line(["eval", str(path), "--model", MODEL, "--pretrained", "none", *flags], expected)


def test_prompts_of_another_width_than_the_model_fail(tmp_path):
    def narrow(state):
        for key in [k for k in state if "image_encoder" in k and "VPT" in k]:
            state[key] = torch.zeros(2, 512)

    path = _small_file(tmp_path, "ivlp", narrow)
    fails_with_one_line(["eval", str(path), "--model", MODEL, "--pretrained", "none"], "vision_prompts has shape")


def test_other_frozen_weights_than_the_backbones_are_refused(tmp_path):
    """A tree of the file's own towers evaluates; towers that are not the backbone's are refused in one line."""
    data = tmp_path / "data"
    make_coop_folder(data, "oxford_pets", CLASSNAMES, per_class=(1, 1, 1), image_size=32)
    common = ["--model", MODEL, "--root", str(data), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu"]
    _small_file(tmp_path / "good", "ivlp")
    result = CliRunner().invoke(app, ["eval", str(tmp_path / "good"), "--pretrained", "none", *common])  # a tree
    assert result.exit_code == 0 and "VLPromptLearner" in result.output, result.output

    def other(state):
        state["image_encoder.conv1.weight"] = state["image_encoder.conv1.weight"] * 1.5

    bad = _small_file(tmp_path / "bad", "ivlp", other)
    fails_with_one_line(["eval", str(bad), "--pretrained", "none", *common], "--pretrained none")
    with pytest.raises(NemesisError, match=r"visual\.conv1\.weight"):
        check_frozen_weights(load_checkpoint(bad), cached_backbone(MODEL), None)


# --- memory ---------------------------------------------------------------------------------------

# The peak resident set of the reading process alone: /proc's VmHWM belongs to the process's own memory
# map, whereas ru_maxrss keeps the peak of the map replaced at exec (the forked test process's).
_MEASURE = textwrap.dedent(
    """
    import json, resource, sys
    from nemesis.files.checkpoint import load_checkpoint

    def status(field):
        with open("/proc/self/status") as lines:
            return int(next(line for line in lines if line.startswith(field + ":")).split()[1]) * 1024

    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # the peak so far (imports) is forgotten: VmHWM restarts from the resident set
    before = status("VmRSS")
    checkpoint = load_checkpoint(sys.argv[1])
    after = status("VmHWM")
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"before": before, "after": after, "maxrss": maxrss, "method": checkpoint.prompt_method}))
    """
)


def test_a_file_of_hundreds_of_mb_is_read_without_its_towers(trees):
    """The largest file (VPT's fp32 towers, ~500 MB): reading it grows the peak RSS by far less than its size."""
    root, _ = trees
    path = max((_tree_file(root, method) for method in TREES), key=lambda p: p.stat().st_size)
    size = path.stat().st_size
    assert size > 400 * 2**20
    out = subprocess.run([sys.executable, "-c", _MEASURE, str(path)], capture_output=True, text=True, check=True)
    measured = json.loads(out.stdout.strip().splitlines()[-1])
    growth = measured["after"] - measured["before"]
    print(f"file {size / 2**20:.0f} MB, peak RSS growth {growth / 2**20:.1f} MB, ratio {growth / size:.3f}")
    assert growth < 2 * size  # the acceptance bound
    assert growth < 0.25 * size  # and in fact: the towers are never read

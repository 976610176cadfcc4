"""PLOT against the official computation, written here plainly from its published definition (issue 22):
an official PLOTNemesis run folder (fp16 ctx [4, 16, 512] and token buffers) evaluated on an RN50 given as
an OpenAI archive with random weights, real images, fp32.

The reference: OpenAI's attention pool with every token as a query (`F.multi_head_attention_forward`
with the pool's own weights, as the official `clip_plot` does), the 77-token text pass of "X X ... X
<class>." with ctx swapped in for the X's, and Sinkhorn in loops over the test split in batches of 100
images, stopped when the mean change of r over the batch falls below 1e-2 (or after 100 iterations)."""

from __future__ import annotations

import math

import open_clip
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from typer.testing import CliRunner

from nemesis.data.datasets import load_dataset
from nemesis.data.testing import make_coop_folder, write_openai_archive
from nemesis_cli.main import app

CLASSNAMES = ["banded", "blotchy", "braided", "bubbly", "bumpy"]
N_PROMPTS, N_CTX = 4, 16
TEST_PER_CLASS = 25  # 125 test images: an official batch of 100 and one of 25


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """The data folder, the archive, the official run folder, and the random model they hold."""
    root = tmp_path_factory.mktemp("plot-parity")
    make_coop_folder(root / "data", "dtd", CLASSNAMES, per_class=(2, 1, TEST_PER_CLASS), image_size=64)
    torch.manual_seed(0)
    model = open_clip.create_model("RN50-quickgelu", pretrained=None).eval()  # QuickGELU: OpenAI's weights
    _calibrate(model, _images(root)[0])
    model.logit_scale.data.fill_(math.log(100))  # CLIP's trained scale, at which the tolerance is stated
    archive = write_openai_archive(model, root / "RN50.pt")
    run = root / "output/dtd/PLOTNemesis/Beta-1.0/rn50_16shots/N4_alpha1_cw0.5_pn1_nctx16_cscFalse_ctpend_nttwo/seed1"
    # Seed 3: the prompt predicts three classes, and both corrupted cells change its count of correct images.
    ctx = (torch.randn(N_PROMPTS, N_CTX, 512, generator=torch.Generator().manual_seed(3)) * 0.3).half()
    rows = N_PROMPTS * len(CLASSNAMES)
    state = {
        "ctx": ctx,
        "token_prefix": torch.zeros(rows, 1, 512).half(),
        "token_suffix": torch.zeros(rows, 60, 512).half(),
    }
    (run / "prompt_learner").mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": 50, "optimizer": None, "scheduler": None, "val_result": None},
               run / "prompt_learner" / "model.pth.tar-50")  # fmt: skip
    return root, archive, run, model, ctx.float()


def _calibrate(model, images: torch.Tensor) -> None:
    """Batch-norm statistics of the test images, so the random image tower's features depend on the image
    (with the initial statistics every image gets nearly the same features, and one class wins them all)."""
    for module in model.visual.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None  # a plain average over the one batch
    model.visual.train()
    with torch.no_grad():
        model.visual(images)
    model.eval()


def _images(root) -> tuple[torch.Tensor, torch.Tensor]:
    """The test split in its order, through CLIP's test transform (resize, centre crop, normalise)."""
    from PIL import Image

    data = load_dataset("dtd", root / "data")
    preprocess = open_clip.image_transform(224, is_train=False)
    images = torch.stack([preprocess(Image.open(sample.path).convert("RGB")) for sample in data.test])
    return images, torch.tensor([sample.label for sample in data.test])


def _local_features(model, images: torch.Tensor) -> torch.Tensor:
    """[T = 50, B, D]: the attention pool with every token as its query."""
    visual = model.visual
    with torch.no_grad():
        x = visual.stem(images)
        x = visual.layer4(visual.layer3(visual.layer2(visual.layer1(x))))
        pool = visual.attnpool
        x = x.flatten(2).permute(2, 0, 1)  # [HW, B, C]
        x = torch.cat([x.mean(dim=0, keepdim=True), x]) + pool.positional_embedding[:, None, :]
        tokens, _ = F.multi_head_attention_forward(
            query=x, key=x, value=x, embed_dim_to_check=x.shape[-1], num_heads=pool.num_heads,
            q_proj_weight=pool.q_proj.weight, k_proj_weight=pool.k_proj.weight, v_proj_weight=pool.v_proj.weight,
            in_proj_weight=None, in_proj_bias=torch.cat([pool.q_proj.bias, pool.k_proj.bias, pool.v_proj.bias]),
            bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
            out_proj_weight=pool.c_proj.weight, out_proj_bias=pool.c_proj.bias,
            use_separate_proj_weight=True, training=False, need_weights=False,
        )  # fmt: skip
    return tokens


def _text_features(model, ctx: torch.Tensor) -> torch.Tensor:
    """[N, n_cls, D]: "X X ... X <class>." with ctx[n] swapped in for the X's, the full 77-token pass."""
    tokens = open_clip.tokenize([" ".join(["X"] * N_CTX) + " " + name + "." for name in CLASSNAMES])
    features = []
    with torch.no_grad():
        for n in range(ctx.shape[0]):
            x = model.token_embedding(tokens).clone()
            x[:, 1 : 1 + N_CTX] = ctx[n]
            x = model.transformer(x + model.positional_embedding, attn_mask=model.attn_mask)
            x = model.ln_final(x)
            features.append(x[torch.arange(len(CLASSNAMES)), tokens.argmax(dim=-1)] @ model.text_projection)
    return torch.stack(features)


def _sinkhorn(sim: torch.Tensor) -> torch.Tensor:
    """One official run over pairs [P, T, N]: the plan [P, T, N]."""
    kernel = torch.exp(-(1 - sim) / 0.1)
    r, c = torch.ones(sim.shape[:2]), torch.ones(sim.shape[0], sim.shape[2])
    for _ in range(100):
        previous = r
        r = (1 / sim.shape[1]) / torch.einsum("ptn,pn->pt", kernel, c)
        c = (1 / sim.shape[2]) / torch.einsum("ptn,pt->pn", kernel, r)
        if (r - previous).abs().mean() < 1e-2:
            break
    return r[:, :, None] * kernel * c[:, None, :]


def _official_logits(model, tokens: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
    """Logits [B, n_cls], one Sinkhorn per test batch of 100 images."""
    text = F.normalize(_text_features(model, ctx), dim=-1)  # [N, n_cls, D]
    image = F.normalize(tokens, dim=-1)  # [T, B, D]
    logits = []
    for start in range(0, image.shape[1], 100):
        batch = image[:, start : start + 100]
        sim = torch.einsum("mbd,ncd->bcmn", batch, text)  # [b, n_cls, T, N]
        flat = sim.reshape(-1, *sim.shape[2:])
        scores = (_sinkhorn(flat) * flat).sum(dim=(1, 2)).reshape(sim.shape[:2])
        logits.append(model.logit_scale.exp() * scores)
    return torch.cat(logits)


def _nemesis(*arguments) -> str:
    result = CliRunner().invoke(app, [str(argument) for argument in arguments])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.mark.slow
def test_plot_nemesis_run_folder_gives_the_official_logits_and_corruption_counts(setting, tmp_path):
    root, archive, run, model, ctx = setting
    common = ["--prompt-method", "plot", "--model", "RN50", "--pretrained", archive, "--dataset", "dtd",
              "--root", root / "data", "--device", "cpu", "--cache-dir", tmp_path / "cache"]  # fmt: skip
    _nemesis("eval", run, *common, "--save-logits", tmp_path / "logits.safetensors")
    saved = load_file(tmp_path / "logits.safetensors")
    images, labels = _images(root)
    tokens = _local_features(model, images)
    expected = _official_logits(model, tokens, ctx)
    assert torch.equal(saved["labels"], labels)
    assert (saved["logits"] - expected).abs().max() <= 1e-3  # at logit scale 100
    assert torch.equal(saved["logits"].argmax(-1), expected.argmax(-1))
    assert len(expected.argmax(-1).unique()) >= 3  # a prompt that tells images apart, so the checks can fail
    # Corruption at position 3 of every prompt: RESCALE 0.001 and REPLACE 0 (the zero vector).
    table = tmp_path / "sweep.csv"
    _nemesis("corrupt", run, *common, "--rescale", "0.001", "--replace", "0", "--positions", "3", "--csv",
             "--out", table)  # fmt: skip
    import pandas as pd

    rows = pd.read_csv(table).set_index("op")
    original = int((expected.argmax(-1) == labels).sum())
    for op, variant in (("rescale", ctx.clone()), ("replace", ctx.clone())):
        variant[:, 3] = variant[:, 3] * 0.001 if op == "rescale" else 0.0
        correct = int((_official_logits(model, tokens, variant).argmax(-1) == labels).sum())
        assert correct != original  # the corruption changes the count, so matching it means something
        assert round(rows.loc[op, "accuracy"] * len(labels) / 100) == correct, op
    assert rows.loc["rescale", "method"] == "plot"

"""PLOT: the batched Sinkhorn against a plain one written from the published definition and the official
stopping rule, and the learner's scores against CoOp's text pass and that plain transport."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nemesis.errors import NemesisError
from nemesis.methods.coop.learner import PromptLearner
from nemesis.methods.plot import CONVERGED, OFFICIAL, PLOTConfig
from nemesis.methods.plot.learner import PLOTLearner
from nemesis.methods.plot.transport import transport_plans

from .conftest import cached_backbone

CLASSNAMES = ["red apple", "green leaf", "blue sky"]


def plain_sinkhorn(similarities: torch.Tensor, threshold: float = 1e-2, iterations: int = 100) -> torch.Tensor:
    """One official run over P pairs [P, T, N]: r, c from ones, r = u / (K c), c = v / (K^T r), stop when the
    mean |r - r_prev| over all pairs is below 1e-2 or after 100 iterations; T = diag(r) K diag(c)."""
    pairs, tokens, prompts = similarities.shape
    kernel = torch.exp(-(1 - similarities.double()) / 0.1)
    r, c = torch.ones(pairs, tokens, dtype=torch.float64), torch.ones(pairs, prompts, dtype=torch.float64)
    for _ in range(iterations):
        previous = r
        r = (1 / tokens) / torch.einsum("ptn,pn->pt", kernel, c)
        c = (1 / prompts) / torch.einsum("ptn,pt->pn", kernel, r)
        if (r - previous).abs().mean() < threshold:
            break
    return r[:, :, None] * kernel * c[:, None, :]


def test_variants_side_by_side_equal_their_own_official_runs():
    generator = torch.Generator().manual_seed(0)
    similarities = torch.rand(3, 6, 5, 4, generator=generator) * 2 - 1  # [K, P, T, N]
    similarities[1] *= 0.05  # a flat variant stops after fewer iterations than the others
    similarities[2] *= 3
    plans = transport_plans(similarities, OFFICIAL)
    for variant in range(3):
        expected = plain_sinkhorn(similarities[variant]).float()
        torch.testing.assert_close(plans[variant], expected, rtol=1e-5, atol=1e-7)
    batched_alone = [transport_plans(similarities[k : k + 1], OFFICIAL)[0] for k in range(3)]
    assert all(torch.equal(plans[k], batched_alone[k]) for k in range(3))


def test_converged_plans_meet_both_marginals_per_pair():
    similarities = torch.rand(2, 7, 5, 4, generator=torch.Generator().manual_seed(1)) * 2 - 1
    plans = transport_plans(similarities, CONVERGED)
    torch.testing.assert_close(plans.sum(-1), torch.full(plans.shape[:-1], 1 / 5), atol=1e-5, rtol=0)
    torch.testing.assert_close(plans.sum(-2), torch.full((*plans.shape[:-2], 4), 1 / 4), atol=1e-5, rtol=0)
    official = transport_plans(similarities, OFFICIAL)
    assert not torch.allclose(official, plans, atol=1e-6)  # the official rule stops earlier


def _learner(**options) -> PLOTLearner:
    ctx = torch.randn(3, 4, 64, generator=torch.Generator().manual_seed(2)) * 0.5
    return PLOTLearner(cached_backbone("tiny"), CLASSNAMES, ctx=ctx, **options)


def _local_features(n_images: int, n_tokens: int = 5) -> torch.Tensor:
    width = cached_backbone("tiny").model.text_projection.shape[-1]
    return torch.randn(n_images, n_tokens, width, generator=torch.Generator().manual_seed(3))


def _plain_scores(learner: PLOTLearner, images: torch.Tensor, ctx: torch.Tensor, drop_global: bool) -> torch.Tensor:
    """Scores [B, n_cls] from CoOp's text pass of each prompt and the plain official Sinkhorn over all pairs."""
    coop = PromptLearner(learner.clip, CLASSNAMES, n_ctx=ctx.shape[1])
    text = torch.stack([coop.encode(ctx[n : n + 1])[0] for n in range(ctx.shape[0])])  # [N, n_cls, D]
    text = F.normalize(text.float(), dim=-1)
    tokens = F.normalize((images[:, 1:] if drop_global else images).float(), dim=-1)
    similarities = torch.einsum("btd,ncd->bctn", tokens, text)  # [B, n_cls, T, N]
    flat = similarities.reshape(-1, *similarities.shape[2:])
    plans = plain_sinkhorn(flat)
    return (plans * flat.double()).sum(dim=(1, 2)).reshape(images.shape[0], -1).float()


@pytest.mark.parametrize("image_tokens", ["all", "spatial"])
def test_scores_equal_the_plain_transport_one_run_per_block_of_images(image_tokens):
    learner = _learner(sinkhorn_batch=4)
    learner.image_tokens = image_tokens  # tiny is a ViT, whose spatial tokens PLOT refuses: the arithmetic is the same
    images = _local_features(10)
    variants = torch.stack([learner.ctx.detach(), learner.ctx.detach() * 0.3])  # [K, N, M, W]
    with torch.no_grad():
        scores = learner.similarities(images, variants)  # [K, B, n_cls]
    assert scores.shape == (2, 10, 3)
    for k in range(2):
        expected = torch.cat(
            [_plain_scores(learner, block, variants[k], image_tokens == "spatial") for block in images.split(4)]
        )
        torch.testing.assert_close(scores[k], expected, rtol=0, atol=2e-5)
    whole = _plain_scores(learner, images, variants[0], image_tokens == "spatial")
    assert not torch.allclose(scores[0], whole, atol=1e-7)  # blocks of 4 are not one run of 10


def test_the_global_logit_adds_the_global_token_against_the_mean_prompt():
    """`global_logit` (the PLOT authors' ImageNet setting, with spatial tokens): the transport's score plus
    cos(token 0, the normalised mean of each class's N unnormalised prompt features), in evaluation and
    in the training logits."""
    learner = _learner(sinkhorn_batch=4, global_logit=True)
    learner.image_tokens = "spatial"  # tiny is a ViT; the arithmetic is a ModifiedResNet's
    images = _local_features(6)
    ctx = learner.ctx.detach()
    coop = PromptLearner(learner.clip, CLASSNAMES, n_ctx=ctx.shape[1])
    text = torch.stack([coop.encode(ctx[n : n + 1])[0] for n in range(ctx.shape[0])]).float()  # [N, n_cls, D]
    pooled = F.normalize(text.mean(dim=0), dim=-1)  # [n_cls, D]
    global_scores = F.normalize(images[:, 0], dim=-1) @ pooled.T  # [B, n_cls]
    transport = torch.cat([_plain_scores(learner, block, ctx, True) for block in images.split(4)])
    with torch.no_grad():
        scores = learner.similarities(images, ctx[None])[0]
        logits = learner.logits(images[:4])
    torch.testing.assert_close(scores, transport + global_scores, rtol=0, atol=2e-5)
    scale = learner.clip.model.logit_scale.exp()
    torch.testing.assert_close(logits, scale * (transport[:4] + global_scores[:4]), rtol=0, atol=2e-4)
    assert (global_scores.abs() > 1e-3).any()  # the term is not vanishing


def test_training_logits_carry_gradients_to_ctx_only_through_the_similarities():
    learner = _learner()
    images = _local_features(4)
    logits = learner.logits(images)
    with torch.no_grad():
        expected = learner.clip.model.logit_scale.exp() * learner.similarities(images, learner.ctx[None])[0]
    torch.testing.assert_close(logits.detach(), expected, rtol=1e-6, atol=1e-5)
    logits.sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0


def test_prompts_and_options_are_checked():
    assert PLOTConfig().tensor_shapes(1024, 512, 10) == {"ctx": (4, 16, 512)}
    assert PLOTConfig.from_dassl((4, 16, 512), None) == PLOTConfig()
    assert PLOTConfig().folder_name() == "N4_nctx16_ctpend"
    with pytest.raises(NemesisError, match="class position end"):
        PLOTConfig(class_position="front")
    with pytest.raises(NemesisError, match="stopping rule"):
        PLOTConfig(stopping="never")
    with pytest.raises(NemesisError, match="is not \\[N, M, 64\\]"):
        PLOTLearner(cached_backbone("tiny"), CLASSNAMES, ctx=torch.zeros(4, 64))
    with pytest.raises(NemesisError, match="local image features"):
        _learner().similarities(torch.zeros(2, 64), _learner().ctx[None])


def test_nemesis_pun_on_plot_sums_over_prompts_as_the_official_code():
    """Official PLOTNemesis PUN: A * s(e) * sum_n mean_j ||ctx[n, j]||_2 (the norms summed over the N prompts)."""
    from nemesis.penalties import NemesisConfig
    from nemesis.penalties.base import TrainingStep
    from nemesis.penalties.losses import NemesisTerm, schedule_weight

    learner = _learner()
    config = NemesisConfig(beta=1.0, weight=2.0)
    step = TrainingStep(learner, _local_features(2), torch.tensor([0, 1]), epoch=3, epochs=10,
                        count_correct=None, random=lambda purpose: torch.Generator())  # fmt: skip
    part = NemesisTerm(config).loss(step)
    ctx = learner.ctx.detach()
    expected = 2.0 * schedule_weight("logistic", 3, 10) * sum(ctx[n].norm(dim=-1).mean() for n in range(3))
    torch.testing.assert_close(part.value.detach(), expected, rtol=1e-6, atol=0)


# --- official PLOT / PLOTNemesis files --------------------------------------------------------------


def _official_file(folder, ctx: torch.Tensor, prefix_rows: int | None, epoch: int = 50):
    """`prompt_learner/model.pth.tar-<E>` as Dassl writes it: fp16 ctx and the token buffers."""
    state = {"ctx": ctx.half()}
    if prefix_rows is not None:
        width = ctx.shape[-1]
        state |= {"token_prefix": torch.zeros(prefix_rows, 1, width).half(),
                  "token_suffix": torch.zeros(prefix_rows, 60, width).half()}  # fmt: skip
    path = folder / "prompt_learner" / f"model.pth.tar-{epoch}"
    path.parent.mkdir(parents=True)
    torch.save({"state_dict": state, "epoch": epoch, "optimizer": None, "scheduler": None, "val_result": None}, path)
    return path


def test_official_plot_nemesis_run_folders_read_as_plot_with_nemesis(tmp_path):
    from nemesis.files.checkpoint import load_checkpoint

    run = (
        tmp_path / "output/dtd/PLOTNemesis/Beta-1.0/rn50_16shots/N4_alpha1_cw0.5_pn1_nctx16_cscFalse_ctpend_nttwo/seed2"
    )
    ctx = torch.randn(4, 16, 512) * 0.02
    _official_file(run, ctx, prefix_rows=4 * 47)
    prompt = load_checkpoint(run)
    assert (prompt.prompt_method, prompt.metadata.penalty) == ("plot", "nemesis")
    assert (prompt.metadata.dataset, prompt.metadata.shots, prompt.metadata.seed) == ("dtd", 16, 2)
    assert prompt.config == PLOTConfig() and torch.equal(prompt.ctx, ctx.half().float())


def test_plot_files_outside_a_tree_are_told_from_class_specific_coop_by_their_buffers(tmp_path):
    from nemesis.files.checkpoint import load_checkpoint

    ctx = torch.randn(4, 16, 512) * 0.02
    plot = load_checkpoint(_official_file(tmp_path / "plot", ctx, prefix_rows=4 * 10))
    assert plot.prompt_method == "plot" and plot.config.n_prompts == 4
    coop = load_checkpoint(_official_file(tmp_path / "coop", ctx, prefix_rows=4))  # CSC for 4 classes
    assert coop.prompt_method == "coop" and coop.config.class_specific
    bare = _official_file(tmp_path / "bare", ctx, prefix_rows=None)  # the layout alone cannot tell
    assert load_checkpoint(bare).prompt_method == "coop"
    named = load_checkpoint(bare, prompt_method="plot")
    assert named.prompt_method == "plot" and named.config == PLOTConfig()


def test_an_exported_plot_prompt_reads_back_as_plot_outside_a_tree(tmp_path):
    """`export_dassl` of a PLOT prompt that records its classes writes N x n_cls zero `token_prefix` rows
    (Dassl's loaders drop them), so the file reads back as PLOT, not as class-specific CoOp; torch's
    safe loader reads it."""
    from nemesis.files.checkpoint import PromptMetadata, export_dassl, load_checkpoint, save_prompt

    ctx = torch.randn(4, 16, 512) * 0.02
    metadata = PromptMetadata(model="RN50", dataset="dtd", prompt_method="plot", classnames=CLASSNAMES)
    save_prompt(tmp_path / "prompt.safetensors", ctx, metadata, {})
    exported = export_dassl(load_checkpoint(tmp_path / "prompt.safetensors"), tmp_path / "export", epoch=3)
    state = torch.load(exported, weights_only=True)["state_dict"]
    assert state["token_prefix"].shape == (4 * len(CLASSNAMES), 1, 512) and not state["token_prefix"].any()
    back = load_checkpoint(exported)
    assert back.prompt_method == "plot" and torch.equal(back.ctx, ctx)


def test_a_dassl_file_named_as_the_other_method_is_one_line(tmp_path):
    """A PLOT Dassl file given as CoOp (in its PLOT tree or not), and a class-specific CoOp file given as
    PLOT: the buffers say which it is, so each is refused in one line naming the right method."""
    from nemesis.data.testing import make_coop_folder

    from .conftest import fails_with_one_line

    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(2, 1, 3), image_size=28)
    ctx = torch.randn(4, 4, 64) * 0.02
    plot = _official_file(tmp_path / "output/oxford_pets/PLOT/tiny_2shots/N4/seed1", ctx, prefix_rows=4 * 3)
    coop = _official_file(tmp_path / "coop", ctx[:3], prefix_rows=3)  # class-specific, 3 classes
    common = ["--root", str(root), "--model", "tiny", "--pretrained", "none", "--dataset", "oxford_pets"]
    fails_with_one_line(["eval", str(plot), *common, "--prompt-method", "coop"], "holds a PLOT prompt")
    fails_with_one_line(
        ["corrupt", str(plot), *common, "--prompt-method", "coop", "--out", str(tmp_path / "t.parquet")],
        "pass --prompt-method plot",
    )
    fails_with_one_line(["eval", str(coop), *common, "--prompt-method", "plot"], "holds a CoOp prompt")


# --- PLOT's options from the command line (`--method-option`) ------------------------------------------


def test_method_options_train_evaluate_and_refuse_in_one_line(tmp_path):
    from safetensors.torch import load_file
    from typer.testing import CliRunner

    from nemesis.data.testing import make_coop_folder
    from nemesis.files.checkpoint import load_prompt
    from nemesis.training.configs import TrainConfig, read_run_config
    from nemesis_cli.main import app

    from .conftest import fails_with_one_line

    assert (
        TrainConfig(dataset="dtd", prompt_method="plot", method_options={"n_prompts": "2"}).prompt_config().n_prompts
        == 2
    )
    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(2, 1, 3), image_size=28)
    common = ["--root", str(root), "--device", "cpu"]
    train = ["train", "--dataset", "oxford_pets", "--method", "plot", "--model", "tiny", "--pretrained", "none",
             "--shots", "2", "--epochs", "1", "--n-ctx", "4", *common]  # fmt: skip
    result = CliRunner().invoke(app, [*train, "--method-option", "n_prompts=2", "--out", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    assert load_prompt(tmp_path / "run" / "prompt.safetensors").ctx.shape == (2, 4, 64)
    assert read_run_config(tmp_path / "run").method_options == {"n_prompts": 2}
    logits = {}
    for rule in ("official", "converged"):
        out = tmp_path / f"{rule}.safetensors"
        args = [
            "eval",
            str(tmp_path / "run"),
            *common,
            "--method-option",
            f"stopping={rule}",
            "--save-logits",
            str(out),
        ]
        assert CliRunner().invoke(app, args).exit_code == 0
        logits[rule] = load_file(out)["logits"]
    assert not torch.allclose(logits["official"], logits["converged"], atol=1e-6)
    fails_with_one_line([*train, "--method-option", "prompts=2", "--out", str(tmp_path / "x")],
                        "plot has no option 'prompts'")  # fmt: skip
    fails_with_one_line([*train, "--method-option", "n_ctx=2", "--out", str(tmp_path / "x")], "--n-ctx has its own")
    fails_with_one_line([*train, "--method-option", "n_prompts", "--out", str(tmp_path / "x")], "is not NAME=VALUE")
    fails_with_one_line(["eval", str(tmp_path / "run"), *common, "--method-option", "image_tokens=spatial"],
                        "spatial image tokens are a ModifiedResNet's grid")  # fmt: skip
    assert not (tmp_path / "x").exists()


def test_a_sweep_with_all_sites_corrupts_every_prompt_alone_too(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from nemesis.data.testing import make_coop_folder
    from nemesis.files.checkpoint import PromptMetadata, save_prompt
    from nemesis_cli.main import app

    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(2, 1, 3), image_size=28)
    learner = _learner()
    metadata = PromptMetadata(model="tiny", dataset="oxford_pets", shots=2, seed=1, prompt_method="plot", epoch=1)
    save_prompt(tmp_path / "prompt.safetensors", learner.ctx.detach(), metadata)
    args = ["corrupt", str(tmp_path / "prompt.safetensors"), "--root", str(root), "--pretrained", "none", "--device",
            "cpu", "--rescale", "0.5", "--positions", "1", "--out", str(tmp_path / "s.parquet")]  # fmt: skip
    result = CliRunner().invoke(app, [*args, "--all-sites"])
    assert result.exit_code == 0, result.output
    table = pd.read_parquet(tmp_path / "s.parquet")
    corrupted = table[table["op"] == "rescale"]
    assert sorted(corrupted["site"]) == ["", "prompt 0", "prompt 1", "prompt 2"]  # every prompt, then each alone
    single = corrupted.set_index("site")
    assert single.loc["", "norm_after"] < single.loc["", "norm_before"]
    with torch.no_grad():  # prompt 1 alone: position 1 of that prompt scaled, the others kept
        variant = learner.ctx.detach().clone()
        variant[1, 1] *= 0.5
        assert single.loc["prompt 1", "norm_after"] == pytest.approx(float(variant[1, 1].norm()), rel=1e-5)


@pytest.mark.parametrize(
    ("ctx", "extra", "expected"),
    [
        (torch.randn(4, 16, 512) * 0.02, ["--prompt-method", "coop"], "is a plot checkpoint, not coop"),
        (torch.randn(4, 16, 512) * 0.02, [], "ctx width 512 does not match the text width 64"),
        (torch.full((4, 16, 64), float("nan")), [], "NaN"),
    ],
)
def test_bad_plot_input_is_one_line(tmp_path, ctx, extra, expected):
    from safetensors.torch import save_file

    from nemesis.data.testing import make_coop_folder

    from .conftest import fails_with_one_line

    root = tmp_path / "data"
    make_coop_folder(root, "oxford_pets", CLASSNAMES, per_class=(2, 1, 3), image_size=28)
    header = {"nemesis": '{"format_version": 2, "model": "tiny", "dataset": "oxford_pets", "prompt_method": "plot"}'}
    save_file({"ctx": ctx}, str(tmp_path / "prompt.safetensors"), metadata=header)  # as given, unchecked
    args = ["eval", str(tmp_path / "prompt.safetensors"), "--root", str(root), "--pretrained", "none", *extra]
    fails_with_one_line(args, expected)


def _sharded_plans(shards: list[torch.Tensor]) -> list[torch.Tensor]:
    """Official plans of each shard [K, P_i, T, N] of one batch, threads standing in for ranks that share
    the stopping decisions through `batch_sum`; a rank making calls the other does not breaks the barrier."""
    import threading

    barrier, sums, plans = threading.Barrier(len(shards), timeout=30), [None] * len(shards), [None] * len(shards)

    def batch_sum(index: int):
        def summed(tensor: torch.Tensor) -> torch.Tensor:
            sums[index] = tensor.clone()
            barrier.wait()
            total = sum(sums)
            barrier.wait()  # all have read before any writes again
            return total

        return summed

    def run(index: int) -> None:
        plans[index] = transport_plans(shards[index], OFFICIAL, batch_sum(index))

    threads = [threading.Thread(target=run, args=(index,)) for index in range(len(shards))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(plan is not None for plan in plans), "a rank failed (see its thread's exception)"
    return plans


def test_a_sharded_batch_stops_as_the_whole_batch_with_batch_sum():
    """Two shards of one batch: with `batch_sum` their Sinkhorn runs stop when the whole batch's would, so
    their plans are the whole batch's; each on its own, they differ."""
    similarities = torch.rand(1, 8, 5, 4, generator=torch.Generator().manual_seed(4)) * 2 - 1
    similarities[:, :4] *= 0.05  # a flat shard, which alone would stop after a few iterations
    whole = transport_plans(similarities, OFFICIAL)
    shards = [similarities[:, :4], similarities[:, 4:]]
    torch.testing.assert_close(torch.cat(_sharded_plans(shards), dim=1), whole, rtol=1e-6, atol=1e-8)
    alone = torch.cat([transport_plans(shard, OFFICIAL) for shard in shards], dim=1)
    assert not torch.allclose(alone, whole, atol=1e-6)


def test_sharded_variants_that_stop_at_different_iterations_leave_every_rank_alike():
    """Variants leave the iterations as they stop; sharded, every rank drops the same ones at once (their
    decisions are the whole batch's), so shards of unequal size still match the whole batch."""
    similarities = _mixed_variants()
    whole = transport_plans(similarities, OFFICIAL)
    shards = [similarities[:, :2], similarities[:, 2:]]  # 2 and 4 pairs
    torch.testing.assert_close(torch.cat(_sharded_plans(shards), dim=1), whole, rtol=1e-6, atol=1e-8)


def _loop_run(similarities: torch.Tensor, threshold: float, iterations: int, mean: bool) -> tuple[torch.Tensor, int]:
    """Plans [P, T, N] of one plain fp32 Sinkhorn run over P pairs, and the iteration it stopped at: the
    change is the mean of |r - r_prev| over the run (official) or its largest (a single pair, converged)."""
    kernel = torch.exp(-(1.0 - similarities) / 0.1)
    n_pairs, n_tokens, n_prompts = kernel.shape
    r, c = torch.ones(n_pairs, n_tokens), torch.ones(n_pairs, n_prompts)
    for step in range(1, iterations + 1):
        new_r = (1.0 / n_tokens) / (kernel @ c.unsqueeze(-1)).squeeze(-1)
        new_c = (1.0 / n_prompts) / (kernel.transpose(-1, -2) @ new_r.unsqueeze(-1)).squeeze(-1)
        change = (new_r - r).abs()
        r, c = new_r, new_c
        if (change.mean() if mean else change.amax()) < threshold:
            return r.unsqueeze(-1) * kernel * c.unsqueeze(-2), step
    return r.unsqueeze(-1) * kernel * c.unsqueeze(-2), iterations


def _mixed_variants() -> torch.Tensor:
    """Similarities [4, 6, 5, 4] whose official runs stop at 4, 14, 57 and 100 (the cap) iterations."""
    similarities = torch.rand(4, 6, 5, 4, generator=torch.Generator().manual_seed(6)) * 2 - 1
    return similarities * torch.tensor([0.02, 0.3, 1.0, 3.0]).view(4, 1, 1, 1)


@pytest.mark.parametrize("group_bytes", [None, 1], ids=["variants-at-once", "one-variant-a-group"])
def test_official_variants_that_stop_apart_equal_their_plain_runs(monkeypatch, group_bytes):
    """Stopped variants leave the iterations (and on CPU variants may go a group at a time): the plans
    stay those of one plain run per variant, to 1e-7."""
    if group_bytes is not None:
        monkeypatch.setattr("nemesis.methods.plot.transport.CPU_GROUP_BYTES", group_bytes)
    similarities = _mixed_variants()
    plans = transport_plans(similarities, OFFICIAL)
    runs = [_loop_run(variant, 1e-2, 100, mean=True) for variant in similarities]
    assert len({step for _, step in runs}) == 4  # every variant stops at its own iteration
    torch.testing.assert_close(plans, torch.stack([plan for plan, _ in runs]), rtol=0, atol=1e-7)


def test_converged_pairs_that_stop_apart_equal_their_plain_runs():
    """Each pair stops on its own; once most have, the running ones are gathered into smaller tensors: the
    plans stay those of one plain run per pair, to 1e-7."""
    similarities = torch.rand(2, 12, 5, 4, generator=torch.Generator().manual_seed(5)) * 2 - 1
    similarities = similarities * torch.logspace(-2, 0.5, 12).view(1, 12, 1, 1)  # flat to sharp pairs
    plans = transport_plans(similarities, CONVERGED)
    runs = [_loop_run(pair.unsqueeze(0), 1e-6, 1000, mean=False) for pair in similarities.flatten(0, 1)]
    steps = sorted(step for _, step in runs)
    assert steps[len(steps) // 2] * 2 < steps[-1]  # over half stop long before the last: gathered out
    expected = torch.cat([plan for plan, _ in runs]).reshape(plans.shape)
    torch.testing.assert_close(plans, expected, rtol=0, atol=1e-7)

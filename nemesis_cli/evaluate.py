"""`nemesis eval`: test accuracy of a prompt checkpoint from cached image features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nemesis.atomic import prepare_output
from nemesis.configs import run_root
from nemesis.errors import NemesisError

from .common import ACTIVATION_HELP, CTX_INIT_HELP, reports_errors

Option = typer.Option


@reports_errors
def eval_command(
    checkpoint: Annotated[
        Path | None,
        typer.Argument(help="Our prompt file or run folder, or a CoOp/Nemesis checkpoint (none with --zero-shot)."),
    ] = None,
    dataset: Annotated[str | None, Option(help="Dataset key (default: the checkpoint's own).")] = None,
    root: Annotated[
        Path | None, Option(help="Folder holding the CoOp-format datasets (default: a run folder's own).")
    ] = None,
    model: Annotated[str | None, Option(help="open_clip model (needed for CoOp checkpoints).")] = None,
    pretrained: Annotated[
        str | None, Option(help="Weights: an open_clip tag, a local file, or an OpenAI CLIP archive (RN50.pt).")
    ] = None,
    activation: Annotated[str | None, Option(help=ACTIVATION_HELP)] = None,
    ctx_init: Annotated[str | None, Option(help=CTX_INIT_HELP)] = None,
    shots: Annotated[int | None, Option(help="Shots the prompt was trained with (recorded only).")] = None,
    seed: Annotated[int | None, Option(help="Seed the prompt was trained with (recorded only).")] = None,
    subsample: Annotated[str | None, Option(help="Classes to test: all, base or new.")] = None,
    epoch: Annotated[int | None, Option(help="Epoch of a CoOp run folder (default: the latest).")] = None,
    cache_dir: Annotated[Path | None, Option(help="Feature cache folder (default: the user cache).")] = None,
    device: Annotated[str | None, Option(help="cpu or cuda (default: cuda when available).")] = None,
    out: Annotated[Path | None, Option(help="Append the result as one JSON line to this file.")] = None,
    zero_shot: Annotated[
        bool,
        Option("--zero-shot", help="No prompt: CLIP with CoOp's hand-crafted template for the dataset (a baseline)."),
    ] = False,
) -> None:
    """Evaluate a prompt on a dataset's test split and print CoOp's result block.

    Dataset, shots, seed and class position of CoOp checkpoints are read from their output-tree
    path (`output/<dataset>/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1`) unless given.

    Example: nemesis eval output/imagenet/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1
    --model RN50 --pretrained openai --dataset imagenet_sketch --root ~/data

    Example: nemesis eval --zero-shot --model RN50 --pretrained openai --dataset dtd --root ~/data --out evals.jsonl
    """
    from nemesis.checkpoint import load_checkpoint
    from nemesis.evaluate import evaluate, weights_mismatch

    if out is not None:
        prepare_output(out)
    if zero_shot:
        from nemesis.zero_shot import zero_shot_evaluate

        if checkpoint is not None:
            raise NemesisError("--zero-shot evaluates no prompt; drop the checkpoint argument")
        if model is None or dataset is None:
            raise NemesisError("--zero-shot needs --model and --dataset (e.g. --model RN50 --pretrained openai)")
        if pretrained in ("none", ""):
            pretrained = None
        result = zero_shot_evaluate(model, pretrained, dataset, root, subsample or "all", cache_dir, device)
        _report(result, out)
        return
    if checkpoint is None:
        raise NemesisError("pass a prompt checkpoint or run folder, or --zero-shot for the hand-crafted baseline")
    if root is None:
        root = run_root(checkpoint)  # a run folder knows where its data was
    prompt = load_checkpoint(checkpoint, epoch)
    if subsample in ("base", "new") and prompt.metadata.source_format != "dassl" and prompt.metadata.subsample == "all":
        typer.echo(
            f"warning: --subsample {subsample} on a prompt trained on all classes: its '{subsample}' classes were "
            "seen in training, so this is not a base-to-new result",
            err=True,
        )
    result = evaluate(
        prompt,
        model=model,
        pretrained=pretrained,
        activation=activation,
        ctx_init=ctx_init,
        dataset=dataset,
        root=root,
        shots=shots,
        seed=seed,
        subsample=subsample,
        cache_dir=cache_dir,
        device=device,
    )
    if (note := weights_mismatch(prompt, result.source)) is not None:
        typer.echo(f"note: {note}", err=True)
    _report(result, out)


def _report(result, out: Path | None) -> None:
    from nemesis.evaluate import append_record

    source = result.source
    weights = source["pretrained"] or "random weights (pass --pretrained TAG or FILE for real ones)"
    typer.echo(f"{source['checkpoint']} on {source['dataset']} ({source['subsample']} classes)")
    typer.echo(f"model {source['model']}, {weights}, activation {source['activation']}")
    typer.echo(result.result_block())
    if out is not None:
        append_record(out, result.record())
        typer.echo(f"appended to {out}")

"""`nemesis eval`: test accuracy of a prompt checkpoint from cached image features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nemesis.errors import NemesisError

from .common import reports_errors

Option = typer.Option


@reports_errors
def eval_command(
    checkpoint: Annotated[Path, typer.Argument(help="Our prompt file or run folder, or a CoOp/Nemesis checkpoint.")],
    dataset: Annotated[str | None, Option(help="Dataset key (default: the checkpoint's own).")] = None,
    root: Annotated[Path | None, Option(help="Folder holding the CoOp-format datasets.")] = None,
    model: Annotated[str | None, Option(help="open_clip model (needed for CoOp checkpoints).")] = None,
    pretrained: Annotated[str | None, Option(help="Weights: an open_clip tag or a local file.")] = None,
    shots: Annotated[int | None, Option(help="Shots the prompt was trained with (recorded only).")] = None,
    seed: Annotated[int | None, Option(help="Seed the prompt was trained with (recorded only).")] = None,
    subsample: Annotated[str | None, Option(help="Classes to test: all, base or new.")] = None,
    epoch: Annotated[int | None, Option(help="Epoch of a CoOp run folder (default: the latest).")] = None,
    prompt_method: Annotated[
        str | None, Option(help="Refuse checkpoints of another prompt method: coop or cocoop (default: any).")
    ] = None,
    cache_dir: Annotated[Path | None, Option(help="Feature cache folder (default: the user cache).")] = None,
    device: Annotated[str | None, Option(help="cpu or cuda (default: cuda when available).")] = None,
    out: Annotated[Path | None, Option(help="Append the result as one JSON line to this file.")] = None,
) -> None:
    """Evaluate a prompt on a dataset's test split and print CoOp's result block.

    Example: nemesis eval output/imagenet/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1
    --model RN50 --pretrained openai --dataset imagenet_sketch --root ~/data --shots 16 --seed 1
    """
    from nemesis.checkpoint import load_checkpoint
    from nemesis.evaluate import append_record, evaluate, weights_mismatch

    if out is not None and not out.parent.is_dir():
        raise NemesisError(f"--out: folder {out.parent} does not exist; create it first")
    prompt = load_checkpoint(checkpoint, epoch, prompt_method)
    result = evaluate(
        prompt,
        model=model,
        pretrained=pretrained,
        dataset=dataset,
        root=root,
        shots=shots,
        seed=seed,
        subsample=subsample,
        cache_dir=cache_dir,
        device=device,
    )
    source = result.source
    weights = source["pretrained"] or "random weights (pass --pretrained TAG or FILE for real ones)"
    typer.echo(f"{source['checkpoint']} on {source['dataset']} ({source['subsample']} classes)")
    typer.echo(f"model {source['model']}, {weights}")
    if (note := weights_mismatch(prompt, source)) is not None:
        typer.echo(f"note: {note}", err=True)
    typer.echo(result.result_block())
    if out is not None:
        append_record(out, result.record())
        typer.echo(f"appended to {out}")

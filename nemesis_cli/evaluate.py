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
    checkpoints: Annotated[
        list[Path], typer.Argument(help="Our prompt files or run folders, or CoOp/CoCoOp/Nemesis checkpoints.")
    ],
    dataset: Annotated[str | None, Option(help="Dataset key (default: the checkpoint's own).")] = None,
    root: Annotated[Path | None, Option(help="Folder holding the CoOp-format datasets.")] = None,
    model: Annotated[str | None, Option(help="open_clip model (needed for CoOp checkpoints).")] = None,
    pretrained: Annotated[str | None, Option(help="Weights: an open_clip tag or a local file.")] = None,
    shots: Annotated[int | None, Option(help="Shots the prompt was trained with (recorded only).")] = None,
    seed: Annotated[int | None, Option(help="Seed the prompt was trained with (recorded only).")] = None,
    subsample: Annotated[str | None, Option(help="Classes to test: all, base or new.")] = None,
    base_to_new: Annotated[
        bool, Option("--base-to-new", help="Test each prompt on the base and on the new classes (and print H).")
    ] = False,
    epoch: Annotated[int | None, Option(help="Epoch of a CoOp run folder (default: the latest).")] = None,
    prompt_method: Annotated[
        str | None, Option(help="Refuse checkpoints of another prompt method: coop or cocoop (default: any).")
    ] = None,
    cache_dir: Annotated[Path | None, Option(help="Feature cache folder (default: the user cache).")] = None,
    device: Annotated[str | None, Option(help="cpu or cuda (default: cuda when available).")] = None,
    out: Annotated[Path | None, Option(help="Append each result as one JSON line to this file.")] = None,
) -> None:
    """Evaluate prompts on a dataset's test split and print CoOp's result block.

    Example: nemesis eval output/imagenet/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1
    --model RN50 --pretrained openai --dataset imagenet_sketch --root ~/data --shots 16 --seed 1;
    base-to-new: nemesis eval runs/b2n-* --base-to-new --out evals.jsonl, then nemesis report evals.jsonl
    """
    from nemesis.checkpoint import load_checkpoint
    from nemesis.evaluate import append_record, evaluate, evaluate_base_to_new, weights_mismatch

    if out is not None and not out.parent.is_dir():
        raise NemesisError(f"--out: folder {out.parent} does not exist; create it first")
    if base_to_new and subsample is not None:
        raise NemesisError("--base-to-new tests both base and new classes; drop --subsample")
    prompts = [load_checkpoint(checkpoint, epoch, prompt_method) for checkpoint in checkpoints]  # all checked first
    options = dict(
        model=model, pretrained=pretrained, dataset=dataset, root=root, shots=shots, seed=seed,
        cache_dir=cache_dir, device=device, backbones={},
    )  # fmt: skip
    for prompt in prompts:
        if base_to_new:
            results = evaluate_base_to_new(prompt, **options)
        else:
            results = [evaluate(prompt, subsample=subsample, **options)]
        for index, result in enumerate(results):
            source = result.source
            typer.echo(f"{source['checkpoint']} on {source['dataset']} ({source['subsample']} classes)")
            if index == 0:
                weights = source["pretrained"] or "random weights (pass --pretrained TAG or FILE for real ones)"
                typer.echo(f"model {source['model']}, {weights}")
                if (note := weights_mismatch(prompt, source)) is not None:
                    typer.echo(f"note: {note}", err=True)
            typer.echo(result.result_block())
            if out is not None:
                append_record(out, result.record())
        if base_to_new:
            from analysis.tables import harmonic_mean  # pandas: only when asked for

            base, new = (result.accuracy for result in results)
            typer.echo(f"base {base:.2f}%, new {new:.2f}%, H {harmonic_mean(base, new):.2f}%")
            if prompt.metadata.subsample != "base":
                typer.echo(f"note: {prompt.path} was not trained on the base classes only", err=True)
    if out is not None:
        typer.echo(f"appended {len(prompts) * (2 if base_to_new else 1)} records to {out}")

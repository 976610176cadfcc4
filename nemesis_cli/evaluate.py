"""`nemesis eval`: test accuracy of a prompt checkpoint from cached image features."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from nemesis.atomic import prepare_output
from nemesis.errors import NemesisError
from nemesis.training.configs import run_root
from nemesis.wording import plural

from .common import ActivationOption, CtxInitOption, MethodOptionOption, ModelOption, WeightsOption, reports_errors

Option = typer.Option


@reports_errors
def eval_command(
    checkpoints: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Our prompt files or run folders, CoOp/CoCoOp/Nemesis checkpoints, or output trees holding them "
            "(none with --zero-shot)."
        ),
    ] = None,
    dataset: Annotated[str | None, Option(help="Dataset key (default: the checkpoint's own).")] = None,
    root: Annotated[
        Path | None, Option(help="Folder holding the CoOp-format datasets (default: a run folder's own).")
    ] = None,
    model: ModelOption = None,
    pretrained: WeightsOption = None,
    activation: ActivationOption = None,
    ctx_init: CtxInitOption = None,
    shots: Annotated[int | None, Option(help="Shots the prompt was trained with (recorded only).")] = None,
    seed: Annotated[int | None, Option(help="Seed the prompt was trained with (recorded only).")] = None,
    subsample: Annotated[str | None, Option(help="Classes to test: all, base or new.")] = None,
    base_to_new: Annotated[
        bool, Option("--base-to-new", help="Test on the base, then the new classes and print H (also --zero-shot).")
    ] = False,
    epoch: Annotated[int | None, Option(help="Epoch of a CoOp run folder (default: the latest).")] = None,
    prompt_method: Annotated[
        str | None,
        Option(
            help="The prompt method: names a Dassl file's (e.g. plot), refuses our files of another (default: any)."
        ),
    ] = None,
    cache_dir: Annotated[Path | None, Option(help="Feature cache folder (default: the user cache).")] = None,
    device: Annotated[str | None, Option(help="cpu or cuda (default: cuda when available).")] = None,
    out: Annotated[Path | None, Option(help="Append each result as one JSON line to this file.")] = None,
    zero_shot: Annotated[
        bool,
        Option("--zero-shot", help="No prompt: CLIP with CoOp's hand-crafted template for the dataset (a baseline)."),
    ] = False,
    method_option: MethodOptionOption = None,
    save_logits: Annotated[
        Path | None,
        Option(
            help="Write the logits [N_images, n_cls] (test order) and labels to this safetensors file (one prompt)."
        ),
    ] = None,
) -> None:
    """Evaluate prompts on a dataset's test split and print CoOp's result block.

    Folders that are not run folders are searched as output trees (as `corrupt` does); settings
    evaluated with several seeds end with one line of their mean ± std over the seeds.

    Dataset, shots, seed and class position of CoOp checkpoints are read from their output-tree
    path (`output/<dataset>/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1`) unless given.

    Example: nemesis eval output/imagenet/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1
    --model RN50 --pretrained openai --dataset imagenet_sketch --root ~/data;
    base-to-new: nemesis eval runs/b2n-* --base-to-new --out evals.jsonl, then nemesis report evals.jsonl

    Example: nemesis eval --zero-shot --model RN50 --pretrained openai --dataset dtd --root ~/data --out evals.jsonl
    """
    from nemesis.evaluation.evaluate import (
        append_record,
        evaluate,
        evaluate_base_to_new,
        resolve_target,
        weights_mismatch,
    )
    from nemesis.files.checkpoint import load_checkpoint
    from nemesis.methods import option_pairs

    if out is not None:
        prepare_output(out)
    if save_logits is not None:
        if base_to_new or zero_shot:
            given = "--base-to-new" if base_to_new else "--zero-shot"
            raise NemesisError(f"--save-logits writes the logits of one prompt on one class set; drop {given}")
        prepare_output(save_logits)
    if base_to_new and subsample is not None:
        raise NemesisError("--base-to-new tests both base and new classes; drop --subsample")
    if zero_shot:
        if checkpoints:
            raise NemesisError("--zero-shot evaluates no prompt; drop the checkpoint argument")
        options = dict(root=root, cache_dir=cache_dir, device=device, activation=activation)
        _zero_shot(model, pretrained, dataset, subsample, base_to_new, out, **options)
        return
    if not checkpoints:
        raise NemesisError("pass a prompt checkpoint or run folder, or --zero-shot for the hand-crafted baseline")
    locations = _checkpoint_locations(checkpoints)
    if save_logits is not None and len(locations) > 1:
        raise NemesisError(f"--save-logits writes one prompt's logits; {len(locations)} prompts were given")
    prompts = [load_checkpoint(location, epoch, prompt_method) for location in locations]  # all checked first
    for prompt in prompts:
        if (
            subsample in ("base", "new")
            and prompt.metadata.source_format != "dassl"
            and prompt.metadata.subsample == "all"
        ):
            typer.echo(
                f"warning: --subsample {subsample} on a prompt trained on all classes: its '{subsample}' classes "
                "were seen in training, so this is not a base-to-new result",
                err=True,
            )
    # Model, dataset and weights of every prompt, resolved and checked once, before any is evaluated or recorded.
    named = dict(model=model, pretrained=pretrained, activation=activation, ctx_init=ctx_init, dataset=dataset)
    named["method_options"] = option_pairs(method_option or [])
    targets = [resolve_target(prompt, **named, shots=shots, seed=seed, subsample=subsample) for prompt in prompts]
    backbones: dict = {}
    evaluated = []
    for prompt, target in zip(prompts, targets, strict=True):
        options = dict(
            root=root if root is not None else run_root(prompt.path),  # a run folder knows where its data was
            cache_dir=cache_dir, device=device, backbones=backbones,
        )  # fmt: skip
        if base_to_new:
            results = evaluate_base_to_new(target, **options)
        else:
            results = [evaluate(target, save_logits=save_logits, **options)]
        evaluated += results
        for index, result in enumerate(results):
            _report(result, header=index == 0)
            if index == 0 and (note := weights_mismatch(prompt, result.source)) is not None:
                typer.echo(f"note: {note}", err=True)
            if out is not None:
                append_record(out, result.record())
        if base_to_new:
            _print_harmonic_mean(results)
            if not prompt.records_trained_classes:
                typer.echo(
                    f"note: {prompt.path} does not record the classes it was trained on (a CoOp file outside a "
                    "base2new/train_base tree); assuming the base classes, as --base-to-new does",
                    err=True,
                )
            elif prompt.metadata.subsample != "base":
                typer.echo(f"note: {prompt.path} was not trained on the base classes only", err=True)
    _print_seed_means(evaluated)
    if out is not None:
        typer.echo(f"appended {plural(len(evaluated), 'record')} to {out}")


def _checkpoint_locations(paths: list[Path]) -> list[Path]:
    """The checkpoints among `paths`: files and run folders as given, other folders searched as output
    trees the way `corrupt` searches them (our run folders and CoOp / Dassl runs)."""
    from corrupt.inputs import find_checkpoints
    from nemesis.constants import RUN_CONFIG

    # A run folder of ours is taken as it is, so an unfinished one says what it lacks.
    found: list[Path] = []
    for path in paths:
        found += [path] if (path / RUN_CONFIG).is_file() else find_checkpoints([path])
    return found


SEED_GROUP = ("model", "weights_id", "activation", "dataset", "train_dataset", "method", "shots", "subsample")


def _seed_rows(results: list):
    """The results as rows of `analysis.tables.count_each_prompt_once`: what results must share to be
    seeds of one setting (weights, data, method and its settings, shots, classes), the seed, and where
    each came from. A result on random weights carries their mark in its method label."""
    import pandas as pd  # only when there is more than one result

    from analysis.labels import RANDOM_WEIGHTS_MARK, is_random_weights, method_label

    rows = []
    for result in results:
        source = result.source
        config = source.get("penalty_config") or {}
        beta, weight = config.get("beta"), config.get("weight")
        label = source.get("method_label") or method_label(source["method"], beta, weight, source.get("penalty"))
        if is_random_weights(source.get("pretrained"), source.get("weights_id")) and RANDOM_WEIGHTS_MARK not in label:
            label += RANDOM_WEIGHTS_MARK
        row = {key: source.get(key) for key in SEED_GROUP if key != "method"}
        row |= {"method": label, "pretrained": source.get("pretrained"), "seed": source.get("seed")}
        rows.append(row | {"checkpoint": source["checkpoint"], "accuracy": result.accuracy})
    return pd.DataFrame(rows)


def _print_seed_means(results: list) -> None:
    """One line per setting evaluated with several seeds: mean ± std over them (sample std, as `report`).
    Each seed of a setting counts once: a copied run folder, or one checkpoint given twice (as a run
    folder and as its prompt.safetensors), is one seed, and a note names the repeat (as `report` does).
    With --base-to-new, a setting with means on both splits ends with H of the means."""
    import statistics

    if len(results) < 2:
        return
    import pandas as pd

    from analysis.labels import RANDOM_WEIGHTS_MARK, weights_names
    from analysis.tables import count_each_prompt_once, harmonic_mean

    seed_keys = [*SEED_GROUP, "seed"]
    rows, repeated = count_each_prompt_once(_seed_rows(results), seed_keys, "checkpoint", "mean over seeds")
    for note in repeated:
        typer.echo(f"note: {note}", err=True)
    random = rows["method"].str.endswith(RANDOM_WEIGHTS_MARK)
    names = {}  # several real weights of one model: each line names its weights, as the LNE tables do
    for _model, group in rows[~random].groupby("model", dropna=False, sort=False):
        names |= {key: name for key, name in weights_names(group["weights_id"]).items() if name}
    splits: dict[tuple, dict[str, float]] = {}
    for key, members in rows.groupby(list(SEED_GROUP), dropna=False, sort=False):
        if len(members) < 2:
            continue
        key = tuple(None if pd.isna(value) else value for value in key)
        model, weights_id, _, dataset, trained_on, label, shots, subsample = key
        if weights_id in names:
            label += f" ({names[weights_id]})"
        accuracies = members["accuracy"].astype(float).tolist()
        seeds = ", ".join("n/a" if pd.isna(seed) else str(int(seed)) for seed in members["seed"])
        where = dataset if trained_on in (None, dataset) else f"{dataset} (trained on {trained_on})"
        shots_text = "shots not recorded" if shots is None else plural(int(shots), "shot")
        mean, std = statistics.mean(accuracies), statistics.stdev(accuracies)
        setting = f"{where}, {label}, {shots_text}"
        typer.echo(
            f"mean over seeds: {setting}, {subsample} classes, {model}: "
            f"{mean:.2f}% ± {std:.2f} over {plural(len(members), 'seed')} ({seeds})"
        )
        splits.setdefault((setting, model), {})[subsample] = mean
        if {"base", "new"} <= set(splits[(setting, model)]):
            base, new = splits[(setting, model)]["base"], splits[(setting, model)]["new"]
            typer.echo(
                f"mean over seeds: {setting}, {model}: base {base:.2f}%, new {new:.2f}%, "
                f"H of the means {harmonic_mean(base, new):.2f}%"
            )


def _zero_shot(
    model: str | None,
    pretrained: str | None,
    dataset: str | None,
    subsample: str | None,
    base_to_new: bool,
    out: Path | None,
    **options,
) -> None:
    """The hand-crafted prompt of CoOp on all classes, one subset, or base then new (`--base-to-new`)."""
    from nemesis.evaluation.evaluate import append_record
    from nemesis.evaluation.zero_shot import zero_shot_base_to_new, zero_shot_evaluate
    from nemesis.model.backbone import example_tag, named_weights

    if model is None or dataset is None:
        raise NemesisError("--zero-shot needs --model and --dataset (e.g. --model RN50 --pretrained openai)")
    if pretrained is None:  # random weights are a choice, never what a missing option gives
        raise NemesisError(
            f"--zero-shot needs the weights of {model}: --pretrained {example_tag(model)} (a pretrained tag), "
            "a weights file, or none for random weights"
        )
    weights = named_weights(pretrained)
    if base_to_new:
        results = zero_shot_base_to_new(model, weights, dataset, **options)
    else:
        results = [zero_shot_evaluate(model, weights, dataset, subsample=subsample or "all", **options)]
    for index, result in enumerate(results):
        _report(result, header=index == 0)
    if base_to_new:
        _print_harmonic_mean(results)
    if out is not None:
        for result in results:
            append_record(out, result.record())
        typer.echo(f"appended {plural(len(results), 'record')} to {out}")


def _print_harmonic_mean(results) -> None:
    from analysis.tables import harmonic_mean  # pandas: only when asked for

    base, new = (result.accuracy for result in results)
    typer.echo(f"base {base:.2f}%, new {new:.2f}%, H {harmonic_mean(base, new):.2f}%")


def _report(result, header: bool = True) -> None:
    source = result.source
    typer.echo(f"{source['checkpoint']} on {source['dataset']} ({source['subsample']} classes)")
    if header:
        weights = source["pretrained"] or "random weights (pass --pretrained TAG or FILE for real ones)"
        typer.echo(f"model {source['model']}, {weights}, activation {source['activation']}")
    typer.echo(result.result_block())

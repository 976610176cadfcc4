"""`nemesis train` (CoOp, CoCoOp, PLOT, KgCoOp, ProGrad, their Nemesis variants) and `nemesis pretrain-tiny`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Annotated

import typer

from nemesis.atomic import prepare_output
from nemesis.constants import RUN_CONFIG
from nemesis.methods import option_pairs
from nemesis.training.configs import TrainConfig, ignored_nemesis_options, read_run_config, resume_config
from nemesis.training.option_files import read_train_options

from .common import ActivationOption, is_main_rank, reports_errors

Option = typer.Option
DEFAULTS = {spec.name: spec.default for spec in dataclasses.fields(TrainConfig)}


def _default(name: str) -> str:
    value = DEFAULTS[name]
    return f" (default: {getattr(value, 'value', value)})"


@reports_errors
def train(
    out: Annotated[
        Path,
        Option(
            help="Run folder to write (config.json, metrics.jsonl, log.txt, prompt); for a grid, the folder of "
            "the tree <dataset>/<method>/<model>_<shots>shots/seed<seed>."
        ),
    ],
    dataset: Annotated[
        str | None,
        Option(
            help="Dataset key, e.g. oxford_pets, imagenet, or fashion_mnist (needs no --root); a list a,b for a grid."
        ),
    ] = None,
    root: Annotated[Path | None, Option(help="Folder holding the CoOp-format datasets.")] = None,
    shots: Annotated[str | None, Option(help="Training images per class, or a list 1,2,4." + _default("shots"))] = None,
    seed: Annotated[
        str | None,
        Option(help="Seed of the few-shot draw, init and data order, or a list 1,2,3." + _default("seed")),
    ] = None,
    method: Annotated[
        str | None,
        Option(
            help="A prompt method (coop, cocoop, plot), <method>+<penalties> (nemesis, kgcoop, prograd, joined by +), "
            "or a preset: nemesis (CoOp+Nemesis), pen (Nemesis PUN, beta 1), pan (beta 0), cocoop-nemesis, "
            "plot-nemesis, kgcoop, kgcoop-nemesis, prograd, prograd-nemesis; or a list." + _default("prompt_method")
        ),
    ] = None,
    model: Annotated[str | None, Option(help="open_clip model." + _default("model"))] = None,
    pretrained: Annotated[
        str | None,
        Option(help="open_clip tag or weights file; 'none' for random weights." + _default("pretrained")),
    ] = None,
    activation: ActivationOption = None,
    subsample: Annotated[str | None, Option(help="Classes: all, base or new." + _default("subsample"))] = None,
    n_ctx: Annotated[int | None, Option(help="Context vectors M (default: 16; CoCoOp: 'a photo of a').")] = None,
    ctx_init: Annotated[
        str | None,
        Option(
            help="Initialise ctx from these words, e.g. 'a photo of a'; 'template': the dataset's hand-crafted words "
            "(ProGrad's)."
        ),
    ] = None,
    class_specific: Annotated[bool, Option("--class-specific", help="One ctx per class (CoOp's CSC).")] = False,
    class_position: Annotated[
        str | None, Option(help="Class name at the end, middle or front." + _default("class_position"))
    ] = None,
    method_option: Annotated[
        list[str] | None,
        Option(
            "--method-option",
            help="Another option of the method as NAME=VALUE, repeatable (PLOT: n_prompts=4, image_tokens=all|spatial, "
            "stopping=official|converged).",
        ),
    ] = None,
    penalty_option: Annotated[
        list[str] | None,
        Option(
            "--penalty-option",
            help="An option of the run's penalty as NAME=VALUE, repeatable (KgCoOp: kgcoop_weight=8; ProGrad: "
            "prograd_lambda=1, prograd_temperature=1).",
        ),
    ] = None,
    epochs: Annotated[
        int | None,
        Option(help="Epochs (default: CoOp's, 50 / 100 / 200 for 1 / 2-4 / 8-16 shots; CoCoOp 10; KgCoOp 100)."),
    ] = None,
    batch_size: Annotated[int | None, Option(help="Images per step (default: 32; CoCoOp 1; KgCoOp 128).")] = None,
    lr: Annotated[float | None, Option(help="SGD learning rate, cosine schedule." + _default("lr"))] = None,
    momentum: Annotated[float | None, Option(help="SGD momentum." + _default("momentum"))] = None,
    weight_decay: Annotated[float | None, Option(help="SGD weight decay." + _default("weight_decay"))] = None,
    warmup_lr: Annotated[float | None, Option(help="Warm-up learning rate." + _default("warmup_lr"))] = None,
    warmup_epochs: Annotated[int | None, Option(help="Constant-lr warm-up epochs." + _default("warmup_epochs"))] = None,
    beta: Annotated[float | None, Option(help="Nemesis: PUN share, 1 = PUN, 0 = PAN." + _default("beta"))] = None,
    weight: Annotated[float | None, Option(help="Nemesis: penalty weight A." + _default("weight"))] = None,
    norm: Annotated[str | None, Option(help="Nemesis: norm p, 1, 2 or inf." + _default("norm"))] = None,
    schedule: Annotated[str | None, Option(help="Nemesis: logistic or constant." + _default("schedule"))] = None,
    positions: Annotated[int | None, Option(help="Nemesis: PAN positions NP per step." + _default("positions"))] = None,
    corrupt_weight: Annotated[
        float | None, Option(help="Nemesis: PAN rescaling CW." + _default("corrupt_weight"))
    ] = None,
    pan_weight: Annotated[float | None, Option(help="Nemesis: PAN's weight instead of A.")] = None,
    official_override: Annotated[
        bool,
        Option("--official-override", help="Nemesis on food101/oxford_pets: PAN weight 50, constant schedule."),
    ] = False,
    train_views: Annotated[
        int | None,
        Option(help="0: live augmentation; K: K cached augmented views." + _default("train_views")),
    ] = None,
    crop_scale: Annotated[
        float | None,
        Option(
            help="Smallest area of the random resized crop (Dassl's RRCROP_SCALE); 1: flips only."
            + _default("crop_scale")
        ),
    ] = None,
    precision: Annotated[
        str | None,
        Option(
            help="fp32, amp (autocast on CUDA), or fp16: the official CoOp / CoCoOp / Nemesis code's, CLIP's text "
            "tower and the learned tensors in fp16, so updates below fp16's resolution are lost."
            + _default("precision")
        ),
    ] = None,
    device: Annotated[str | None, Option(help="cpu, cuda, cuda:1 (default: cuda when available).")] = None,
    eval_every: Annotated[
        int | None, Option(help="Test accuracy every N epochs; 0: last only." + _default("eval_every"))
    ] = None,
    save_every: Annotated[
        int | None, Option(help="Checkpoint every N epochs; 0: none." + _default("save_every"))
    ] = None,
    cache_dir: Annotated[Path | None, Option(help="Image-feature cache (default: the user cache).")] = None,
    report_to: Annotated[
        str | None,
        Option(
            help="Live logs besides metrics.jsonl: tensorboard (events in <run>/tensorboard), wandb (offline, in "
            "<run>/wandb), tensorboard,wandb or none; each needs its package (pip install 'nemesis-prompts[wandb]')."
        ),
    ] = None,
    resume: Annotated[
        bool, Option("--resume", help="Continue the run in --out; alone, it reuses the run's config.json.")
    ] = False,
    tree: Annotated[
        bool, Option("--tree", help="Write the grid's tree under --out even for a single combination.")
    ] = False,
    config: Annotated[
        Path | None,
        Option(
            help="Options from a YAML or JSON file named as on this command line (a run's config.json works); "
            "lists for a grid; options given here override it."
        ),
    ] = None,
) -> None:
    """Train CoOp, CoCoOp, PLOT, KgCoOp, ProGrad or their Nemesis variants on few-shot data and write a run
    folder, or a grid.

    Lists (--dataset a,b --shots 1,2,4 --seed 1,2,3 --method coop,pen,pan) train every combination
    in one process, one run folder each under --out; a rerun skips finished runs and resumes the
    others, a failed run is reported at the end (exit code 1) without stopping the rest. Under
    `torchrun --nproc-per-node N` the ranks split the grid's runs; a single run shards each batch.

    Example: nemesis train --dataset oxford_pets --root ~/data --shots 16 --method nemesis --out runs/pets

    Example: nemesis train --dataset oxford_pets,dtd --root ~/data --shots 1,2,4,8,16 --seed 1,2,3
    --method coop,pen,pan --out runs/

    Example (base-to-new): --method cocoop-nemesis --beta 0 --weight 20 --subsample base

    Example (a run's options with another seed): nemesis train --config runs/pets/config.json --seed 2 --out runs/pets2
    """
    # First, while the parameters are the only locals.
    options = {name: value for name, value in locals().items() if name not in ("out", "resume", "tree", "config")}
    from nemesis.training.train_grid import parse_values, plan_grid, run_grid_job, single_run_grid, single_run_options

    given = {name: value for name, value in options.items() if value is not None and value is not False}
    if config is not None:
        given = read_train_options(config) | given
    if "method_option" in given:  # merged over a config file's, name by name
        given["method_options"] = given.get("method_options", {}) | option_pairs(given.pop("method_option"))
    if "penalty_option" in given:
        pairs = option_pairs(given.pop("penalty_option"), "--penalty-option", "kgcoop_weight=8")
        given["penalty_options"] = given.get("penalty_options", {}) | pairs
    runtime = {name: str(given[name]) for name in ("root", "cache_dir") if name in given}
    given |= runtime
    if resume and not tree and (out / RUN_CONFIG).is_file():  # one run folder, continued from its config.json
        config, warnings = resume_config(read_run_config(out), single_run_options(given), out)
        grid = single_run_grid(config, out)
    else:
        axes = {name: given.pop(name, None) for name in ("dataset", "method", "shots", "seed")}
        grid = plan_grid(
            out,
            given,
            datasets=parse_values(axes["dataset"], "dataset"),
            methods=parse_values(axes["method"], "method"),
            shots=parse_values(axes["shots"], "shots", int),
            seeds=parse_values(axes["seed"], "seed", int),
            tree=tree,
            resume=resume,
        )
        warnings = list(grid.warnings)
    # Nemesis-only options that no run of the call uses change nothing: say so.
    ignored = set.intersection(*(set(ignored_nemesis_options(run.config, given)) for run in grid.runs))
    if ignored:
        shown = ", ".join(sorted(ignored))
        verb = "applies" if len(ignored) == 1 else "apply"
        methods = ", ".join(sorted({run.method for run in grid.runs}))
        warnings.append(f"{shown} only {verb} to Nemesis methods; ignored for --method {methods}")
    for line in warnings if is_main_rank() else ():  # under torchrun, once
        typer.echo(f"warning: {line}", err=True)
    prepare_output(out, folder=True)
    try:
        summary = run_grid_job(grid)
    except KeyboardInterrupt:
        if grid.tree:
            typer.echo("interrupted; rerun the same command to resume the grid", err=True)
        else:
            from nemesis.files.run_state import RUN_STATE, load_state

            state = grid.runs[0].folder / RUN_STATE  # saved after every finished epoch
            epoch = load_state(state).epoch if state.is_file() else 0
            typer.echo(f"interrupted after epoch {epoch}; rerun with --resume", err=True)
        raise typer.Exit(code=130) from None
    for run, error in summary.failed:
        typer.echo(f"failed: {run.folder}: {error}", err=True)
    if summary.main:
        typer.echo(summary.line() if grid.tree else f"wrote {grid.runs[0].folder}")
    if summary.counts[2]:
        raise typer.Exit(code=1)


@reports_errors
def pretrain_tiny_command(
    force: Annotated[bool, Option("--force", help="Pretrain again even when cached weights exist.")] = False,
    out: Annotated[Path | None, Option(help="Write the weights here instead of the user cache.")] = None,
) -> None:
    """Pretrain the embedded `tiny` CLIP on Fashion-MNIST (cached; `--pretrained fmnist` uses it).

    Example: nemesis pretrain-tiny
    """
    from nemesis.model.tiny import pretrain_tiny, read_tiny_info, weights_path

    cached = weights_path()
    if out is None and cached.is_file() and not force:
        info = read_tiny_info(cached)
        typer.echo(f"cached: {cached} (--force pretrains again)")
        typer.echo(f"zero-shot accuracy on Fashion-MNIST test: {info['zero_shot_accuracy']:.2f}%")
        return
    if out is not None:
        prepare_output(out)
    result = pretrain_tiny(out=out)
    typer.echo(f"wrote {result.path} (pretrained in {result.seconds:.1f} s)")
    typer.echo(f"zero-shot accuracy on Fashion-MNIST test: {result.zero_shot_accuracy:.2f}%")

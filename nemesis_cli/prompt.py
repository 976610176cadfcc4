"""`nemesis prompt ...`: inspect and convert prompt checkpoints."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from nemesis.atomic import prepare_output

from .common import ModelOption, WeightsOption, reports_errors

if TYPE_CHECKING:  # torch loads inside the commands, so `--help` answers at once
    from nemesis.evaluation.interpretation import PromptInterpretation

app = typer.Typer(help="Inspect and convert prompt checkpoints.", no_args_is_help=True)

CheckpointArgument = Annotated[
    Path,
    typer.Argument(help="Our .safetensors prompt or run folder, or a CoOp/Nemesis (Dassl) file or folder."),
]
EpochOption = Annotated[int | None, typer.Option(help="Epoch of a Dassl folder (default: the latest).")]
MethodOption = Annotated[
    str | None, typer.Option(help="Refuse checkpoints of another prompt method, e.g. coop (default: any).")
]


@app.command()
@reports_errors
def info(
    checkpoint: CheckpointArgument,
    epoch: EpochOption = None,
    model: Annotated[str | None, typer.Option(help="Check the prompt fits this open_clip model's text width.")] = None,
    prompt_method: MethodOption = None,
) -> None:
    """Show a checkpoint's metadata, ctx shape and per-position norms.

    Example: nemesis prompt info output/oxford_pets/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1 --model RN50
    """
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from nemesis.files.checkpoint import load_checkpoint
    from nemesis.model.backbone import embed_dim, text_width
    from nemesis.tensors import position_norms

    prompt = load_checkpoint(checkpoint, epoch, prompt_method)
    if model is not None:
        prompt.check_model(model, embed_dim(model), text_width(model))
    console = Console(highlight=False)  # file contents are shown as they are: no markup, no highlighting
    console.print(Text(str(prompt.path), style="bold"))
    console.print(f"{prompt.spec.label} prompt: ctx shape {tuple(prompt.ctx.shape)}")
    for name, tensor in prompt.extra.items():
        console.print(f"{name} shape {tuple(tensor.shape)}")
    metadata = Table(show_header=False, box=None)
    for key, value in vars(prompt.metadata).items():
        if key == "prompt_config":  # the method's options, one row each
            for option, setting in value.items():
                metadata.add_row(option, Text(_shown(option, setting, prompt.metadata.source_format, model)))
            continue
        metadata.add_row(key, Text(_shown(key, value, prompt.metadata.source_format, model)))
    console.print(metadata)
    norms = Table("position", "L2 norm", title="per-position norms")
    for position, norm in enumerate(position_norms(prompt.ctx).tolist()):
        norms.add_row(str(position), f"{norm:.4f}")
    console.print(norms)


def _shown(key: str, value: object, source_format: str, model: str | None) -> str:
    """A metadata value as `info` shows it; what a Dassl file does not record says so."""
    if key == "classnames" and isinstance(value, list) and value:
        return f"{len(value)}: {', '.join(value[:8])}{' ...' if len(value) > 8 else ''}"
    if value is None and source_format == "dassl":
        return f"{model} (--model; the file does not record it)" if key == "model" and model else "not recorded"
    return str(value)


@app.command()
@reports_errors
def interpret(
    checkpoint: CheckpointArgument,
    topk: Annotated[int, typer.Option(help="Nearest tokens shown per position (CoOp's COOP.md uses 3).")] = 3,
    model: ModelOption = None,
    pretrained: WeightsOption = None,
    epoch: EpochOption = None,
    prompt_method: MethodOption = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the table as JSON rows instead of the text table.")
    ] = False,
    out: Annotated[Path | None, typer.Option(help="Also write the table to this file: .json (rows) or .csv.")] = None,
) -> None:
    """Show the vocabulary tokens nearest to each context vector (Euclidean distance to the model's token
    embeddings, as CoOp's interpret_prompt.py) with each position's L2 norm; per class for class-specific
    ctx, per prompt for PLOT. A token that does not end a word (a BPE piece) is shown with a trailing -.

    Example: nemesis prompt interpret output/oxford_pets/CoOp/rn50_16shots/nctx16_cscFalse_ctpend/seed1
    --model RN50 --pretrained openai --topk 5
    """
    from nemesis.evaluation.interpretation import check_table_path, interpret_prompt, write_table

    if out is not None:
        check_table_path(out)
        prepare_output(out)
    interpretation = interpret_prompt(
        checkpoint, topk=topk, model=model, pretrained=pretrained, epoch=epoch, prompt_method=prompt_method
    )
    if out is not None:
        write_table(interpretation, out)
    if json_output:
        typer.echo(json.dumps(interpretation.records(), indent=1))
    else:
        _print_interpretation(interpretation)
    if out is not None:
        typer.echo(f"wrote {out}", err=json_output)  # stdout stays one JSON document


def _print_interpretation(found: PromptInterpretation) -> None:
    """One table per class or prompt: position, L2 norm, the nearest tokens with their distances."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    from nemesis.evaluation.interpretation import WORD_PIECE_MARK

    console = Console(highlight=False)  # tokens are shown as they are: no markup, no highlighting
    console.print(Text(str(found.path), style="bold"))
    console.print(
        Text(
            f"{found.label} prompt: ctx shape {found.ctx_shape}; model {found.model}, weights {found.weights_id}; "
            f"the {found.topk} nearest tokens by Euclidean distance"
        )
    )
    for title, positions in found.blocks():
        table = Table("position", "L2 norm", "nearest tokens (distance)", title=title)
        for nearest in positions:
            tokens = "  ".join(f"{row.shown} ({row.distance:.4f})" for row in nearest)
            table.add_row(str(nearest[0].position), f"{nearest[0].norm:.4f}", Text(tokens))
        console.print(table)
    if any(not row.word_end for row in found.rows):
        console.print(Text(f"a trailing {WORD_PIECE_MARK} marks a word piece: a token that does not end a word"))


@app.command("export-dassl")
@reports_errors
def export(
    checkpoint: CheckpointArgument,
    out: Annotated[Path, typer.Option(help="Run folder to write prompt_learner/model.pth.tar-<E> into.")],
    epoch: Annotated[int | None, typer.Option(help="Epoch number in the file name (default: the prompt's).")] = None,
    prompt_method: MethodOption = None,
    model: Annotated[
        str | None, typer.Option(help="Model whose frozen towers a whole-model file holds (default: the prompt's).")
    ] = None,
    pretrained: WeightsOption = None,
) -> None:
    """Write a prompt in its official trainer's layout so that code loads it: CoOp's prompt_learner/ file;
    for MaPLe, IVLP, PromptSRC and VPT the whole model (frozen towers of the weights the prompt was
    trained on, and its prompts) in MultiModalPromptLearner/, VLPromptLearner/ or prompt_learner/.

    Example: nemesis prompt export-dassl runs/pets-16/prompt.safetensors --out coop_output/pets/seed1
    """
    from nemesis.evaluation.evaluate import export_backbone
    from nemesis.files.checkpoint import export_dassl, load_checkpoint

    prepare_output(out, folder=True)
    prompt = load_checkpoint(checkpoint, prompt_method=prompt_method)  # first: a bad one leaves no folder behind
    backbone = export_backbone(prompt, model, pretrained)
    target = export_dassl(prompt, out, epoch, backbone)  # creates --out and its missing parents
    typer.echo(f"wrote {target}")


@app.command("export-peft")
@reports_errors
def export_peft(
    checkpoint: CheckpointArgument,
    out: Annotated[
        Path, typer.Option(help="Adapter folder to write (adapter_model.safetensors, adapter_config.json).")
    ],
    prompt_method: MethodOption = None,
    model: Annotated[str | None, typer.Option(help="The prompt's model (default: the one it records).")] = None,
) -> None:
    """Write a prefix-tuning prompt as a PEFT adapter: prompt_embeddings [P, layers x 2 x W] (the final keys and
    values), which `nemesis` reads back from the folder.

    Example: nemesis prompt export-peft runs/pets-prefix --out pets-prefix-adapter
    """
    from nemesis.files.checkpoint import export_peft as write_adapter
    from nemesis.files.checkpoint import load_checkpoint

    prepare_output(out, folder=True)
    prompt = load_checkpoint(checkpoint, prompt_method=prompt_method)
    typer.echo(f"wrote {write_adapter(prompt, out, model)}")

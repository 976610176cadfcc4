"""What every command shares: turning user errors into one line on stderr and exit code 2."""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import typer
from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer's own copy of click
from typer.core import TyperGroup, TyperOption

from nemesis.errors import NemesisError, NemesisNote

Command = TypeVar("Command", bound=Callable[..., Any])

CTX_INIT_HELP = "The init phrase a CoOp checkpoint was trained with (its tokens beyond n_ctx stay in the prompt)."
ACTIVATION_HELP = (
    "quickgelu or gelu (default: the weights' own: QuickGELU for openai tags and OpenAI archives, "
    "GELU with a note for other files)."
)


def _display_type_rich(option: TyperOption, ctx: Any) -> str | None:
    """A flag takes no value, so its help shows none: typer's rich help labels every flag `<bool>`
    (its plain help, like click's, shows nothing)."""
    return None if option.is_flag else _typer_display_type_rich(option, ctx)


_typer_display_type_rich = TyperOption.display_type_rich
TyperOption.display_type_rich = _display_type_rich

# The options of the commands that read prompt checkpoints (eval, corrupt) and must know their model.
ModelOption = Annotated[str | None, typer.Option(help="open_clip model (needed for CoOp checkpoints).")]
WeightsOption = Annotated[
    str | None,
    typer.Option(
        help="Weights: an open_clip tag, a local file, an OpenAI CLIP archive (RN50.pt), or none for random weights "
        "(default: the tag or random weights the prompt records; a file it records must be named)."
    ),
]
ActivationOption = Annotated[str | None, typer.Option(help=ACTIVATION_HELP)]
CtxInitOption = Annotated[str | None, typer.Option(help=CTX_INIT_HELP)]
# The options of every command that draws figures (plot-frequency, plot-norms, plot-transport, report, demo).
WidthOption = Annotated[
    float | None,
    typer.Option(
        "--width",
        help="Printed width of the figures in points (72 to an inch), e.g. \\columnwidth; fonts stay >= 7 pt there. "
        "Not with --column.",
        show_default=False,
    ),
]
ColumnOption = Annotated[
    str | None,
    typer.Option(
        "--column",
        help="single (397 pt) or double (826 pt, the default): the ICLR / NeurIPS text widths. Not with --width.",
        show_default=False,
    ),
]


def is_main_rank() -> bool:
    """Whether this process speaks for the job: always, except on torchrun's ranks other than 0.

    Every rank runs the same checks on the same input and fails or warns alike, so rank 0 says it once.
    """
    return os.environ.get("RANK", "0") == "0" or os.environ.get("WORLD_SIZE", "1") == "1"  # as nemesis.distributed


def fail(message: str) -> typer.Exit:
    """Print `message` as the one error line (rank 0 alone under torchrun) and return the exit to raise."""
    if is_main_rank():
        typer.echo(f"error: {' '.join(message.split())}", err=True)  # one line, whatever the message held
    return typer.Exit(code=2)


def _show_note(show_other: Callable[..., None], message: Warning | str, category: type[Warning], *args: Any) -> None:
    """Library notes (`NemesisNote`) as one `note:` line on stderr; other warnings as Python shows them."""
    if issubclass(category, NemesisNote):
        typer.echo(f"note: {' '.join(str(message).split())}", err=True)
    else:
        show_other(message, category, *args)


def reports_errors(command: Command) -> Command:
    """Decorate a command so bad input ends with one line and exit code 2, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always", NemesisNote)
                warnings.showwarning = functools.partial(_show_note, warnings.showwarning)
                return command(*args, **kwargs)
        except NemesisError as error:
            raise fail(str(error)) from None
        except FileNotFoundError as error:
            raise fail(f"file not found: {error.filename or error}") from None

    return wrapper  # type: ignore[return-value]


def _usage_line(error: UsageError) -> typer.Exit:
    """A usage mistake (missing argument, unknown option) as the one error line, like every other error."""
    where = error.ctx.command_path if error.ctx is not None else "nemesis"
    return fail(f"{error.format_message()} (see {where} --help)")


class OneLineErrorsGroup(TyperGroup):
    """The root command group: usage errors become one line on stderr with exit code 2, not a usage panel."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().make_context(*args, **kwargs)
        except NoArgsIsHelpError:
            raise  # a bare command group prints its help
        except UsageError as error:
            raise _usage_line(error) from None

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except NoArgsIsHelpError:
            raise
        except UsageError as error:
            raise _usage_line(error) from None


MethodOptionOption = Annotated[
    list[str] | None,
    typer.Option(
        "--method-option",
        help="An option of the prompt method as NAME=VALUE, repeatable (PLOT: image_tokens=all|spatial, "
        "stopping=official|converged, sinkhorn_batch=100).",
    ),
]

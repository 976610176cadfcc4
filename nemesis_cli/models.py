"""`nemesis models`: the open_clip models and pretrained tags the toolkit accepts."""

from __future__ import annotations

from typing import Annotated

import typer

from .common import reports_errors


@reports_errors
def models(
    all_models: Annotated[
        bool, typer.Option("--all", help="Also list models whose text tower cannot take soft prompts.")
    ] = False,
) -> None:
    """List open_clip model names, their pretrained tags, and whether their text tower takes soft prompts.

    `tiny` is the embedded default (`--pretrained fmnist`); any model also takes `--pretrained none`
    (random weights) or a local weights file.

    Example: nemesis models
    """
    import open_clip

    from nemesis.model.backbone import text_tower_problem

    for name in open_clip.list_models():
        problem = text_tower_problem(name)
        if problem is not None and not all_models:
            continue
        tags = list(open_clip.list_pretrained_tags_by_model(name))
        if name == "tiny":
            tags.append("fmnist")
        tower = "CLIP-style text tower" if problem is None else f"not supported: {problem}"
        typer.echo(f"{name}\t{', '.join(tags) or '-'}\t{tower}")

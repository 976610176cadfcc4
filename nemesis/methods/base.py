"""What a prompt method declares to the rest of the toolkit: its `MethodSpec`.

Light to import (no torch): the CLI, configs, path readers and labels use specs; the learner class
(the torch code, satisfying `nemesis.methods.protocol.PromptMethod`) is imported when first built.
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class TrainingDefaults:
    """Training options whose defaults differ between methods (the rest are shared)."""

    batch_size: int = 32
    epochs: int | None = None  # None: CoOp's count for the shots


@dataclass(frozen=True)
class MethodSpec:
    """One prompt method: its name, label, options, learner and Dassl layout.

    `config` is the method's options dataclass; its fields are the training options the method
    takes (each also a `nemesis train` option) and its defaults are the method's. It may define
    `from_options(**given)` (given options only; the rest default) and `from_dassl(ctx_shape,
    class_position)` (what a Dassl file's tensors and path say), and must define
    `tensor_shapes(embed_dim, text_width, n_classes, vision_width)`: the prompt tensors it learns, by
    name and shape. A config whose ctx is not in the text tower says so by `first_tower` ("vision").
    """

    name: str  # registry name, written into prompt files, run configs and tables
    label: str  # how tables and legends name it: "CoOp"
    learner: str | type  # the learner class, or "module:Class" to import on first use
    config: type  # the options dataclass
    training: TrainingDefaults = TrainingDefaults()
    dassl_trainers: tuple[str, ...] = ()  # trainer folder names in Dassl output trees ("CoOp")
    trains: bool = True  # False: its users' prompts are read, evaluated and swept, but `nemesis train` refuses it
    peft_type: str | None = None  # the PEFT adapter type its prompts are exported as and read from (PREFIX_TUNING)
    # Its official trainer saves the whole model (frozen towers and prompts): where the prompts lie in that
    # file (a `nemesis.methods.whole_model_layout.WholeModelLayout`); None: CoOp's prompt-only `state_dict`.
    dassl_layout: Any = None

    def learner_class(self) -> type:
        if isinstance(self.learner, type):
            return self.learner
        module, _, name = self.learner.partition(":")
        return getattr(importlib.import_module(module), name)

    def option_names(self) -> tuple[str, ...]:
        return tuple(spec.name for spec in dataclasses.fields(self.config))

    def options(self, **given: Any) -> Any:
        """The method's config from the options given (None: not given, the method's default)."""
        given = {name: value for name, value in given.items() if value is not None}
        maker = getattr(self.config, "from_options", self.config)
        return maker(**given)

    def tensor_shapes(
        self,
        config: Any,
        embed_dim: int | None = None,
        text_width: int | None = None,
        n_classes: int | None = None,
        vision_width: int | None = None,
    ) -> dict[str, tuple[int | None, ...]]:
        """Every tensor the method learns, by checkpoint name, and its shape on a model of image width D,
        text width W and image-tower token width `vision_width` for `n_classes` classes (None: not known,
        any size)."""
        return config.tensor_shapes(embed_dim, text_width, n_classes, vision_width)

    def fits_dassl(self, shapes: dict[str, tuple[int, ...]]) -> bool:
        """Whether a Dassl state dict with these tensor shapes (buffers such as `token_prefix` included)
        can be this method's, by the config's optional `dassl_fits` (without it: yes). It tells methods
        apart whose learned tensors have the same names (CoOp's class-specific ctx and PLOT's prompts)."""
        fits = getattr(self.config, "dassl_fits", None)
        return fits(shapes) if fits is not None else True

    def dassl_buffers(self, config: Any, ctx_shape: tuple[int, ...], n_classes: int | None) -> dict[str, tuple]:
        """Shapes of the buffers an export writes beside the learned tensors so the file reads back as this
        method's (`fits_dassl`), by the config's optional `dassl_buffer_shapes`; Dassl's loaders drop them."""
        shapes = getattr(config, "dassl_buffer_shapes", None)
        return shapes(ctx_shape, n_classes) if shapes is not None else {}

    def settings_folder(self, config: Any) -> str | None:
        """The folder naming the method's settings in a grid's tree (CoOp: `nctx16_cscFalse_ctpend`), from
        the config's optional `folder_name()`; None: no such folder."""
        name = getattr(config, "folder_name", None)
        return name() if name is not None else None

    def check_classnames(
        self, config: Any, classnames: list[str], token_count: Callable[[str], int], context_length: int
    ) -> None:
        """Refuse, before any model is built, classes the method's text prompts cannot hold: the config's
        optional `check_classnames` (methods without text prompts define none)."""
        check = getattr(config, "check_classnames", None)
        if check is not None:
            check(classnames, token_count, context_length)

    def ctx_tower(self) -> str:
        """The tower ctx's vectors enter: "text" (CoOp's context, ...), or "vision" (VPT)."""
        return getattr(self.config, "first_tower", "text")

    def options_from_dassl(self, ctx_shape: tuple[int, ...], class_position: str | None) -> Any:
        """The config a Dassl file of this method implies: its tensors' shapes and its path."""
        maker = getattr(self.config, "from_dassl", None)
        if maker is not None:
            return maker(ctx_shape, class_position)
        return self.config()

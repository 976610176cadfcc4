"""How a method's official Dassl trainer files its prompts inside a whole-model checkpoint: data a method
declares on its `MethodSpec` (`dassl_layout`), read and written by `nemesis.files.whole_model`.

The muzairkhattak trainers (MaPLe, IVLP, PromptSRC, their VPT) register the whole `CustomCLIP`, so
`state_dict` holds the frozen towers (`image_encoder.*`, `text_encoder.*`) beside the prompts, each
prompt stack spread over one key for layer 0 and one numbered key per deeper layer. Light to import:
no torch (dtypes are named).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PromptStackKeys:
    """Where the rows of one of our stacks [depth, ...] lie: row 0 at `first`, row l (l >= 1) at
    `deeper.format(l - 1 + first_number)`; all rows of one shape."""

    tensor: str  # our checkpoint name ("ctx", "vision_prompts", "projection.weight")
    first: str  # the key of layer 0: "prompt_learner.ctx"
    deeper: str  # the key of deeper layers with `{}` for its number: "...resblocks.{}.VPT_shallow"
    first_number: int = 1  # the number of layer 1's key (IVLP numbers by block: 1; MaPLe's lists from 0)
    tower: str = "text"  # the tower whose layers the stack prompts: its depth is capped at that tower's layers
    first_dtype: str = "float32"  # as the official code saves row 0 (MaPLe's and IVLP's ctx are fp16)
    deeper_dtype: str = "float32"  # ... and the deeper rows (parameters inside the blocks stay fp32)
    optional: bool = False  # absent entirely: the stack has depth 0 (IVLP's deep language prompting)


@dataclass(frozen=True)
class WholeModelLayout:
    """A method's prompts in its trainer's whole-model checkpoint."""

    folder: str  # the registered model's folder in the run: `<run>/<folder>/model.pth.tar-<E>`
    stacks: tuple[PromptStackKeys, ...]  # the first is ctx's
    depth_options: dict[str, tuple[str, ...]]  # our tensor -> the config fields its depth sets
    same_depth: bool = False  # every stack has one depth (MaPLe's projections follow its text prompts)
    frozen_dtype: str = "float16"  # the frozen towers' dtype as saved (CLIP's convert_weights: fp16)
    # A second frozen image tower under this key prefix (PromptSRC's zero-shot tower): this method's files
    # hold it and tell it apart from a method of the same prompt keys, whose files never do.
    image_tower_copy: str | None = None

    def keys_of(self, stack: PromptStackKeys, depth: int) -> list[str]:
        """The keys of a stack of `depth` rows, layer 0's first."""
        return [stack.first, *(stack.deeper.format(layer - 1 + stack.first_number) for layer in range(1, depth))]

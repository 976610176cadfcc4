"""Whole-model Dassl checkpoints: the muzairkhattak trainers' files holding frozen CLIP towers and prompts.

MaPLe, IVLP, PromptSRC and their VPT register the whole `CustomCLIP`, so `model.pth.tar-<E>` holds
`image_encoder.*` and `text_encoder.*` (hundreds of MB, fp16) beside a few kB of prompts, each
prompt stack spread over numbered keys. Each method declares where (`MethodSpec.dassl_layout`, a
`nemesis.methods.whole_model_layout.WholeModelLayout`); this module reads the stacks back into our
tensors (only those keys' storages are read), tells the methods apart by the keys a file holds, keeps
a few frozen tensors to check the backbone against, and writes our prompts back in their layout.
The registry (`nemesis.methods.METHODS`) is passed in as `methods`.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..atomic import atomic_path
from ..constants import DASSL_FILE_PREFIX
from ..errors import NemesisError
from ..methods.base import MethodSpec
from ..methods.whole_model_layout import PromptStackKeys, WholeModelLayout
from ..unpickle import UnreadTensor

# CustomCLIP's frozen parts: the image tower and the text encoder's modules (no token_embedding).
IMAGE_TOWER, TEXT_TOWER = "image_encoder.", "text_encoder."
LOGIT_SCALE = "logit_scale"
TEXT_ENCODER_PARTS = ("transformer.", "positional_embedding", "ln_final.", "text_projection")
# A few frozen tensors kept to check the backbone against: the file's key -> our model's state-dict name.
REFERENCE_WEIGHTS = {
    IMAGE_TOWER + "conv1.weight": "visual.conv1.weight",
    IMAGE_TOWER + "proj": "visual.proj",
    TEXT_TOWER + "text_projection": "text_projection",
}
_TOWER_BLOCK = {"text": re.compile(r"text_encoder\.transformer\.resblocks\.(\d+)\."),
                "vision": re.compile(r"image_encoder\.transformer\.resblocks\.(\d+)\.")}  # fmt: skip


Methods = Mapping[str, MethodSpec]  # the registry, by name


def layouts(methods: Methods) -> dict[str, WholeModelLayout]:
    """Every method whose official trainer saves the whole model, by method name."""
    return {spec.name: spec.dassl_layout for spec in methods.values() if spec.dassl_layout is not None}


def folders(methods: Methods) -> tuple[str, ...]:
    """The folders those trainers file their checkpoints in (`MultiModalPromptLearner`, ...), without repeats."""
    return tuple(dict.fromkeys(layout.folder for layout in layouts(methods).values()))


def is_whole_model(names: Any) -> bool:
    """Whether a Dassl state dict with these keys holds a whole model (frozen towers) rather than prompts."""
    return any(name.startswith((IMAGE_TOWER, TEXT_TOWER)) for name in names if isinstance(name, str))


def wanted(name: str, methods: Methods) -> bool:
    """Whether the reader needs a key's tensor: a prompt row of some method's layout or a reference weight
    (the frozen towers are never read)."""
    return name in REFERENCE_WEIGHTS or any(_is_prompt_key(layout, name) for layout in layouts(methods).values())


def _is_prompt_key(layout: WholeModelLayout, name: str) -> bool:
    return any(name == stack.first or _deeper_pattern(stack).fullmatch(name) for stack in layout.stacks)


@functools.cache
def _deeper_pattern(stack: PromptStackKeys) -> re.Pattern:
    return re.compile(re.escape(stack.deeper).replace(r"\{\}", r"(\d{1,4})"))


@dataclass
class WholeModelPrompt:
    """What a whole-model file holds of ours: the method, its config, our tensors and reference weights."""

    spec: MethodSpec
    config: Any
    tensors: dict[str, torch.Tensor]  # ctx and the method's other tensors, fp32
    frozen: dict[str, torch.Tensor]  # our state-dict name -> the file's frozen tensor, as saved


def read_whole_model(
    state: dict, methods: Methods, requested: str | None, trained: str | None, origin: str
) -> WholeModelPrompt:
    """Our prompt from a whole-model `state_dict` (tensors not asked for are `UnreadTensor`s): the method
    `requested`, else the trainer folder's `trained`, when the file's keys are its, else the one whose they are."""
    spec = methods[_method_of(set(state), methods, requested, trained, origin)]
    layout = spec.dassl_layout
    stacks = {stack.tensor: _read_stack(state, stack, origin) for stack in layout.stacks}
    stacks = {name: stack for name, stack in stacks.items() if stack is not None}
    depths = {name: stack.shape[0] for name, stack in stacks.items()}
    if layout.same_depth and len(set(depths.values())) > 1:
        raise NemesisError(f"{origin}: its {spec.label} prompt stacks have different depths {depths}; they must match")
    n_ctx = stacks["ctx"].shape[-2]
    for name, stack in stacks.items():
        if stack.dim() == 3 and name != "ctx" and stack.shape[-2] != n_ctx and name in layout.depth_options:
            raise NemesisError(
                f"{origin}: {name} has {stack.shape[-2]} prompt tokens per layer but ctx {n_ctx}; "
                f"{spec.label} here takes the same count in both towers"
            )
    options = {option: depths.get(name, 0) for name, names in layout.depth_options.items() for option in names}
    try:
        config = spec.options(n_ctx=n_ctx, **options)
    except (TypeError, ValueError, NemesisError) as error:
        raise NemesisError(f"{origin}: its prompts do not make a {spec.label} prompt ({error})") from None
    frozen = {ours: state[key] for key, ours in REFERENCE_WEIGHTS.items() if isinstance(state.get(key), torch.Tensor)}
    return WholeModelPrompt(spec, config, stacks, frozen)


def _fit(
    layout: WholeModelLayout, names: set[str], prompt_keys: set[str], methods: Methods
) -> tuple[list[str], list[str]]:
    """(the layout's required keys the file lacks, the file's prompt keys or second tower the layout does
    not hold): both empty when the file is this layout's."""
    missing = [stack.first for stack in layout.stacks if not stack.optional and stack.first not in names]
    foreign = sorted(name for name in prompt_keys if not _is_prompt_key(layout, name))
    copies = {other.image_tower_copy for other in layouts(methods).values()} - {None}
    for prefix in sorted(copies):
        held = any(name.startswith(prefix) for name in names)
        if prefix == layout.image_tower_copy and not held:
            missing.append(prefix + "*")
        elif prefix != layout.image_tower_copy and held:
            foreign.append(prefix + "*")
    return missing, foreign


def _method_of(names: set[str], methods: Methods, requested: str | None, trained: str | None, origin: str) -> str:
    prompt_keys = {name for name in names if wanted(name, methods) and name not in REFERENCE_WEIGHTS}
    fits = {name: _fit(layout, names, prompt_keys, methods) for name, layout in layouts(methods).items()}
    fitting = [name for name, (missing, foreign) in fits.items() if not missing and not foreign]

    def holds(name: str | None) -> bool:
        """The file is `name`'s, its second tower aside (a copy without it, or with it stripped)."""
        return name in fits and not fits[name][1] and all(key.endswith("*") for key in fits[name][0])

    # the method named, else the trainer folder's, when the file's prompt keys are its own
    if holds(requested if requested is not None else trained):
        return requested if requested is not None else trained
    if requested is not None:
        wanted_spec = methods[requested]
        if fitting:
            found = methods[fitting[0]]
            evidence = fits[requested][1][0] if requested in fits and fits[requested][1] else found.dassl_layout.folder
            raise NemesisError(
                f"{origin} holds {found.label}'s prompt ({evidence}), not {wanted_spec.label}'s; "
                f"pass --prompt-method {found.name}"
            )
        if requested not in fits:
            raise NemesisError(
                f"{origin} is a whole-model checkpoint (frozen CLIP towers and prompts), which {wanted_spec.label}'s "
                f"trainer does not write; pass the method of the trainer that wrote it"
            )
    if fitting:
        return fitting[0]
    # No layout fits: say what the closest one (the one named, else the trainer's, else fewest misses) lacks.
    closest = requested or (trained if trained in fits else None)
    closest = closest or min(fits, key=lambda name: len(fits[name][0]) + len(fits[name][1]))
    missing, foreign = fits[closest]
    label = methods[closest].label
    if missing:
        raise NemesisError(f"{origin}: a {label} checkpoint holds {missing[0]}, which this file lacks")
    raise NemesisError(f"{origin} holds {foreign[0]}, which a {label} checkpoint never holds; it is not {label}'s")


def _read_stack(state: dict, stack: PromptStackKeys, origin: str) -> torch.Tensor | None:
    """One stack [depth, ...] from its rows (layer 0's key, then consecutive numbered keys); None: absent."""
    pattern = _deeper_pattern(stack)
    matches = (pattern.fullmatch(name) for name in state if isinstance(name, str))
    numbers = sorted(int(match.group(1)) for match in matches if match)
    if stack.first not in state:
        if stack.optional and not numbers:
            return None
        raise NemesisError(f"{origin}: it holds no {stack.first}, the prompt of layer 0")
    expected = list(range(stack.first_number, stack.first_number + len(numbers)))
    if numbers != expected:
        shown = stack.deeper.format("N")
        raise NemesisError(
            f"{origin}: the layers of {shown} are numbered {numbers}, not consecutively from {stack.first_number}; "
            "a layer's prompt is missing"
        )
    depth = 1 + len(numbers)
    keys = [stack.first, *(stack.deeper.format(number) for number in numbers)]
    blocks = (_TOWER_BLOCK[stack.tower].match(name) for name in state if isinstance(name, str) and name not in keys)
    layers = {int(match.group(1)) for match in blocks if match}  # the tower's own blocks, not the prompts
    if layers and depth > len(layers):
        raise NemesisError(
            f"{origin}: {stack.tensor} has prompts for {depth} layers but the file's {stack.tower} tower has "
            f"{len(layers)}"
        )
    rows = [_row(state[key], key, origin) for key in keys]
    for key, row in zip(keys[1:], rows[1:], strict=True):
        if row.shape != rows[0].shape:
            raise NemesisError(
                f"{origin}: {key} has shape {tuple(row.shape)} but {stack.first} has {tuple(rows[0].shape)}; "
                "every layer's prompt has one shape"
            )
    return torch.stack(rows)  # [depth, ...]


def _row(tensor: Any, key: str, origin: str) -> torch.Tensor:
    if not isinstance(tensor, torch.Tensor) or tensor.layout != torch.strided or not tensor.is_floating_point():
        raise NemesisError(f"{origin}: {key} is not a dense floating-point tensor")
    if not 1 <= tensor.dim() <= 2 or tensor.numel() == 0:
        raise NemesisError(f"{origin}: {key} has shape {tuple(tensor.shape)}, not one layer's prompt [n, W] or [W]")
    tensor = tensor.detach().to(torch.float32).contiguous()
    if not torch.isfinite(tensor).all():
        raise NemesisError(f"{origin}: {key} contains NaN or Inf values")
    return tensor


# --- the backbone against the file's frozen towers ------------------------------------------------

# fp16 rounding (and PromptSRC's Gaussian aggregation re-summing the frozen weights in fp16) moves a weight by
# a few of its units in the last place; other weights differ by far more.
FROZEN_RTOL = 1e-2


def frozen_mismatch(frozen: dict[str, torch.Tensor], model: torch.nn.Module) -> str | None:
    """The first reference weight (our name) in which `model` differs from the file's frozen towers, else None."""
    ours = model.state_dict()
    for name, saved in frozen.items():
        if name not in ours:
            continue
        mine = ours[name].detach().cpu()
        if mine.shape != saved.shape:
            return name
        mine = mine.to(saved.dtype).float()  # the backbone as the file stores it
        saved = saved.float()
        scale = float(saved.abs().max()) if saved.numel() else 0.0
        if not torch.allclose(mine, saved, rtol=FROZEN_RTOL, atol=FROZEN_RTOL * scale):
            return name
    return None


def check_frozen_weights(checkpoint: Any, backbone: Any, pretrained: str | None) -> None:
    """Refuse a backbone whose weights are not the frozen towers a whole-model checkpoint was trained on."""
    frozen = getattr(checkpoint, "frozen", None)
    if not frozen:
        return
    name = frozen_mismatch(frozen, backbone.model)
    if name is not None:
        shown = pretrained if pretrained is not None else "none"
        raise NemesisError(
            f"{checkpoint.path}: its frozen CLIP weights ({name}) are not those of --pretrained {shown} "
            f"({backbone.weights_id}); pass --pretrained with the weights it was trained on (openai for the "
            "official code)"
        )


# --- writing their layout -------------------------------------------------------------------------


def _frozen_state(backbone: Any, layout: WholeModelLayout) -> dict[str, torch.Tensor]:
    """The frozen towers under CustomCLIP's keys, in the layout's dtype (the text encoder without token_embedding)."""
    dtype = getattr(torch, layout.frozen_dtype)
    model = backbone.model

    def saved(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.detach().to("cpu", dtype).clone()

    state = {IMAGE_TOWER + key: saved(value) for key, value in model.visual.state_dict().items()}
    state |= {
        TEXT_TOWER + key: saved(value)
        for key, value in model.state_dict().items()
        if key.startswith(TEXT_ENCODER_PARTS) and not key.startswith("visual.")
    }
    if layout.image_tower_copy is not None:
        state |= {layout.image_tower_copy + key: saved(value) for key, value in model.visual.state_dict().items()}
    state[LOGIT_SCALE] = saved(model.logit_scale)
    return state


def prompt_state(layout: WholeModelLayout, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our stacks as the layout's rows, fp32 (their loaders cast each into its parameter's dtype)."""
    state = {}
    for stack in layout.stacks:
        if stack.tensor not in tensors:
            continue
        rows = tensors[stack.tensor].detach().cpu().float()
        state |= {key: rows[layer].clone() for layer, key in enumerate(layout.keys_of(stack, len(rows)))}
    return state


def export_whole_model(checkpoint: Any, backbone: Any, out_dir: Path, epoch: int) -> Path:
    """Write `<out_dir>/<folder>/model.pth.tar-<E>` in the method's official layout: the frozen towers of
    `backbone` (the weights the prompt was trained on) and our prompts as their rows."""
    layout = checkpoint.spec.dassl_layout
    unlaid = sorted(set(checkpoint.tensors) - {stack.tensor for stack in layout.stacks})
    if unlaid:  # e.g. VPT with CoOp's context: its trainer has no key for it
        raise NemesisError(
            f"{checkpoint.path}: the official {checkpoint.spec.label} checkpoint has no place for {', '.join(unlaid)}; "
            "keep the prompt in our file"
        )
    target = Path(out_dir) / layout.folder / f"{DASSL_FILE_PREFIX}{epoch}"
    state = _frozen_state(backbone, layout) | prompt_state(layout, checkpoint.tensors)
    content = {"state_dict": state, "epoch": epoch, "optimizer": None, "scheduler": None, "val_result": None}
    with atomic_path(target) as temporary:
        torch.save(content, temporary)
    return target


__all__ = [
    "UnreadTensor",
    "WholeModelPrompt",
    "check_frozen_weights",
    "export_whole_model",
    "folders",
    "frozen_mismatch",
    "is_whole_model",
    "read_whole_model",
    "wanted",
]

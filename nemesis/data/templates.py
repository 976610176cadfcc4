"""Hand-crafted prompts per dataset: CoOp's zero-shot templates and the variants KgCoOp and ProGrad use.

Keyed by CoOp's dataset folder names; a dataset without its own template takes "a photo of a {}.".
Light to import (no torch): training configs resolve ProGrad's init phrase from here.

- `TEMPLATES`: CoOp's `CUSTOM_TEMPLATES` (its zero-shot trainer), the zero-shot baseline's.
- `KGCOOP_TEMPLATES`: KgCoOp's copy, which differs for DTD only.
- `PROGRAD_TEMPLATES`: ProGrad's, reordered so that every word comes before the class name: its
  init phrase is the template's words ("a type of pet, a photo of a") and its zero-shot teacher
  reads these same prompts.
"""

from __future__ import annotations

DEFAULT_TEMPLATE = "a photo of a {}."
TEMPLATES = {
    "oxford_pets": "a photo of a {}, a type of pet.",
    "oxford_flowers": "a photo of a {}, a type of flower.",
    "fgvc_aircraft": "a photo of a {}, a type of aircraft.",
    "dtd": "{} texture.",
    "eurosat": "a centered satellite photo of {}.",
    "stanford_cars": "a photo of a {}.",
    "food101": "a photo of {}, a type of food.",
    "sun397": "a photo of a {}.",
    "caltech101": "a photo of a {}.",
    "ucf101": "a photo of a person doing {}.",
    "imagenet": "a photo of a {}.",
    "imagenet_sketch": "a photo of a {}.",
    "imagenetv2": "a photo of a {}.",
    "imagenet_a": "a photo of a {}.",
    "imagenet_r": "a photo of a {}.",
}
KGCOOP_TEMPLATES = TEMPLATES | {"dtd": "a photo of a {}, a type of texture."}
PROGRAD_TEMPLATES = TEMPLATES | {
    "oxford_pets": "a type of pet, a photo of a {}.",
    "oxford_flowers": "a type of flower, a photo of a {}.",
    "fgvc_aircraft": "a type of aircraft, a photo of a {}.",
    "dtd": "a texture of {}.",
    "food101": "a type of food, a photo of {}.",
}

# `ctx_init` naming the dataset's hand-crafted words (ProGrad's init), resolved when the dataset is known.
TEMPLATE_INIT = "template"
_CLASS_AT_END = " {}."


def template_for(dataset: str, templates: dict[str, str] = TEMPLATES) -> str:
    """The dataset's template in `templates` (CoOp's by default), "a photo of a {}." when it has none."""
    return templates.get(dataset, DEFAULT_TEMPLATE)


def init_phrase(dataset: str) -> str:
    """The words of the dataset's ProGrad template before the class name ("a type of pet, a photo of a")."""
    template = template_for(dataset, PROGRAD_TEMPLATES)
    assert template.endswith(_CLASS_AT_END), f"ProGrad's template for {dataset} must end with the class name"
    return template.removesuffix(_CLASS_AT_END)

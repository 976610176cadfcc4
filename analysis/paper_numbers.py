"""Published numbers of the Nemesis paper (ICLR 2024), as data for reference rows in reports.

Source: shared/reference/paper-numbers.md (read from the paper's figures and tables). The few-shot
averages and LNE frequencies were read off plots (about +-0.5): `APPROXIMATE` marks them.
These are facts for comparison, never expected outputs of tests. The paper's tables call PUN "PEN";
the labels here use the toolkit's one vocabulary (PUN, PAN, beta, weight), as `method_label` does.
"""

from __future__ import annotations

# Domain generalisation: RN50, 16 shots, source ImageNet. method -> dataset key -> accuracy (%).
DOMAIN_GENERALIZATION_SETTING = {"model": "RN50", "shots": 16, "source": "imagenet"}
DOMAIN_GENERALIZATION = {
    "CoOp": {
        "imagenet": 62.70,
        "imagenetv2": 55.04,
        "imagenet_sketch": 32.64,
        "imagenet_a": 22.44,
        "imagenet_r": 54.60,
    },
    "CoOp+Nemesis (PUN, weight 1)": {
        "imagenet": 62.96,
        "imagenetv2": 55.48,
        "imagenet_sketch": 33.64,
        "imagenet_a": 22.96,
        "imagenet_r": 55.72,
    },
    "CoOp+Nemesis (PUN, weight 10)": {
        "imagenet": 63.08,
        "imagenetv2": 55.50,
        "imagenet_sketch": 34.34,
        "imagenet_a": 23.40,
        "imagenet_r": 56.78,
    },
    "CoOp+Nemesis (PAN, weight 1)": {
        "imagenet": 63.28,
        "imagenetv2": 55.16,
        "imagenet_sketch": 32.70,
        "imagenet_a": 22.48,
        "imagenet_r": 54.72,
    },
    "CoOp+Nemesis (PAN, weight 10)": {
        "imagenet": 63.14,
        "imagenetv2": 55.20,
        "imagenet_sketch": 33.50,
        "imagenet_a": 23.30,
        "imagenet_r": 56.68,
    },
}

# Base-to-new, average over the 11 datasets (CoCoOp based). method -> (base, new, H).
BASE_TO_NEW_AVERAGE = {
    "CoCoOp": (80.8, 72.6, 76.5),
    "CoCoOp+Nemesis (PUN, weight 1)": (80.7, 72.6, 76.4),
    "CoCoOp+Nemesis (PUN, weight 10)": (80.4, 73.2, 76.6),
    "CoCoOp+Nemesis (PUN, weight 20)": (80.5, 73.3, 76.7),
    "CoCoOp+Nemesis (PAN, weight 1)": (80.4, 72.6, 76.3),
    "CoCoOp+Nemesis (PAN, weight 10)": (80.5, 73.3, 76.7),
    "CoCoOp+Nemesis (PAN, weight 20)": (80.3, 73.9, 77.0),
}

# Few-shot classification, average over the 11 datasets (approximate). method -> shots -> accuracy (%).
FEW_SHOT_AVERAGE = {
    "CoOp": {1: 59.2, 2: 62.2, 4: 66.3, 8: 69.8, 16: 73.1},
    "CoOp+Nemesis (PUN)": {1: 59.8, 2: 64.0, 4: 67.8, 8: 71.1, 16: 74.0},
    "CoOp+Nemesis (PAN)": {1: 59.8, 2: 63.2, 4: 67.4, 8: 71.5, 16: 74.6},
}

# The prompt method and penalty of the paper's LNE counts: CoOp prompts, no penalty.
LNE_PROMPTS = ("coop", "none")

# Low-Norm Effect frequency (approximate; the paper does not say exactly what it counts).
# dataset key -> shots -> number of occurrences.
LNE_FREQUENCY = {
    "oxford_pets": {1: 40, 2: 53, 4: 34, 8: 42, 16: 25},
    "food101": {1: 43, 2: 30, 4: 29, 8: 36, 16: 16},
    "imagenet": {1: 34, 2: 18, 4: 13, 8: 11, 16: 9},
    "stanford_cars": {1: 35, 2: 5, 4: 4, 8: 1, 16: 1},
    "caltech101": {1: 32, 2: 20, 4: 11, 8: 4, 16: 2},
    "dtd": {1: 23, 2: 14, 4: 4, 8: 2, 16: 2},
    "sun397": {1: 8, 2: 12, 4: 11, 8: 5, 16: 5},
    "ucf101": {1: 6, 2: 11, 4: 12, 8: 0, 16: 2},
    "fgvc_aircraft": {1: 9, 2: 0, 4: 0, 8: 4, 16: 0},
    "eurosat": {1: 8, 2: 5, 4: 2, 8: 2, 16: 2},
    "oxford_flowers": {1: 2, 2: 1, 4: 0, 8: 1, 16: 1},
}

APPROXIMATE = frozenset({"FEW_SHOT_AVERAGE", "LNE_FREQUENCY"})

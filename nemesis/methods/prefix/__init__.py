"""Prefix tuning (Li & Liang, ACL 2021) of CLIP's text tower: P learned keys and values per layer, put
before the layer's own and seen by every token, the rest of the input the zero-shot prompt
"a photo of a {}.".

The learned prompt, ctx [layers, 2, P, W], holds layer l's P keys (ctx[l, 0]) and P values
(ctx[l, 1]), each a vector of the tower's width with its heads side by side (the numbers of
[layers, 2, heads, P, head_dim], so a key is one vector for norms and corruptions). Trained by
default through Li & Liang's reparameterisation, an embedding of P vectors through Linear - Tanh -
Linear to layers x 2 x W, which is dropped after training: prompt files carry ctx alone.
The learner is `nemesis.methods.prefix.learner.PrefixLearner`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

from ...errors import NemesisError
from ..base import MethodSpec, TrainingDefaults

PREFIX_PROMPT = "a photo of a"  # the zero-shot prompt's words before the class name: the rest of the input
KEYS_VALUES = "key and value"  # what ctx's vectors are: attention's, not token embeddings


@dataclass
class PrefixConfig:
    """Prefix tuning's options: P = 8 vectors, reparameterised through an MLP of hidden width 512."""

    n_ctx: int = 8  # P, the learned keys (and values) per layer
    reparameterize: bool = True  # train through Embedding(P, W) - Linear - Tanh - Linear (Li & Liang)
    hidden: int = 512  # the reparameterisation's hidden width (Li & Liang's mid_dim)

    first_tower: ClassVar[str] = KEYS_VALUES

    def __post_init__(self) -> None:
        if self.n_ctx < 1 or self.hidden < 1:
            raise NemesisError(f"prefix tuning needs P >= 1 and a hidden width >= 1, got {self.n_ctx}, {self.hidden}")

    def tensor_shapes(
        self, embed_dim: int | None, text_width: int | None, n_classes: int | None, vision_width: int | None = None
    ) -> dict[str, tuple[int | None, ...]]:
        """ctx [layers, 2, P, W] (any number of layers: the model's)."""
        return {"ctx": (None, 2, self.n_ctx, text_width)}

    @classmethod
    def from_dassl(cls, ctx_shape: tuple[int, ...], class_position: str | None) -> PrefixConfig:
        return cls(n_ctx=ctx_shape[-2])

    def check_classnames(self, classnames: list[str], token_count: Callable[[str], int], context_length: int) -> None:
        longest = max(classnames, key=token_count)
        if token_count(f"{PREFIX_PROMPT} {longest}.") + 2 > context_length:
            raise NemesisError(f"the prompt for class '{longest}' exceeds the context length {context_length}")

    def folder_name(self) -> str:
        """`P8_mlp512` (reparameterised) or `P8_direct`."""
        return f"P{self.n_ctx}_" + (f"mlp{self.hidden}" if self.reparameterize else "direct")


SPEC = MethodSpec(
    name="prefix",
    label="Prefix",
    learner="nemesis.methods.prefix.learner:PrefixLearner",
    config=PrefixConfig,
    training=TrainingDefaults(batch_size=32, epochs=None),
    dassl_trainers=("PrefixTuning",),  # no official Dassl trainer: the folder name our Dassl exports take
    peft_type="PREFIX_TUNING",
)

"""Content checksums (nemesis.checksum): what they cover, checked against hashlib directly."""

from __future__ import annotations

import hashlib

import torch

from nemesis.checksum import tensors_sha256


def _reference(tensors: dict[str, torch.Tensor], header: str = "") -> str:
    """The definition: header, then per tensor in name order its name, dtype, shape and C-order bytes."""
    digest = hashlib.sha256(header.encode())
    for key in sorted(tensors):
        array = tensors[key].detach().numpy()
        digest.update(f"{key}:{tensors[key].dtype}:{tuple(tensors[key].shape)}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def test_checksum_follows_its_definition_for_every_shape():
    tensors = {
        "logit_scale": torch.tensor(4.6052),  # 0-dim, as in every CLIP state dict
        "ctx": torch.randn(4, 8, generator=torch.Generator().manual_seed(0)),
        "empty": torch.zeros(0, 3),
        "half": torch.ones(2, 2, dtype=torch.float16),
        "columns": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
    }
    assert tensors_sha256(tensors, "header") == _reference(tensors, "header")


def test_checksum_changes_with_a_bit_a_shape_or_a_name():
    ctx = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    base = tensors_sha256({"ctx": ctx})
    flipped = ctx.clone()
    flipped.view(torch.int32)[0, 0] ^= 1
    assert tensors_sha256({"ctx": flipped}) != base
    assert tensors_sha256({"ctx": ctx.reshape(8, 4)}) != base
    assert tensors_sha256({"other": ctx}) != base

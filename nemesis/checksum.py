"""Content checksums of saved tensors, so a changed bit in a cache entry or a resume state is noticed."""

from __future__ import annotations

import hashlib

import torch


def tensors_sha256(tensors: dict[str, torch.Tensor], header: str = "") -> str:
    """SHA-256 of `header` and every tensor's name, dtype, shape and bytes (in name order)."""
    digest = hashlib.sha256(header.encode())
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        # Flattened first: a 0-dim tensor (CLIP's logit_scale) has no byte view; the bytes are the same.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()

"""Content checksums of saved tensors, so a changed bit in a cache entry or a resume state is noticed."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch


class TensorDigest:
    """SHA-256 over tensors given in name order, each as its name, dtype and shape, then its bytes.

    The bytes may come in pieces (a cache entry written or read a block at a time), so a file never
    has to be held whole to be checked."""

    def __init__(self, header: str = "") -> None:
        self._digest = hashlib.sha256(header.encode())

    def start(self, key: str, dtype: torch.dtype, shape: Sequence[int]) -> None:
        """Begin tensor `key`: its bytes follow through `update`."""
        self._digest.update(f"{key}:{dtype}:{tuple(int(size) for size in shape)}".encode())

    def update(self, data: bytes | memoryview) -> None:
        self._digest.update(data)

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's bytes in row-major order (flattened first: a 0-dim tensor, CLIP's logit_scale, has no byte view)."""
    tensor = tensor.detach().cpu().contiguous()
    return tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""


def tensors_sha256(tensors: dict[str, torch.Tensor], header: str = "") -> str:
    """SHA-256 of `header` and every tensor's name, dtype, shape and bytes (in name order)."""
    digest = TensorDigest(header)
    for key in sorted(tensors):
        digest.start(key, tensors[key].dtype, tensors[key].shape)
        digest.update(tensor_bytes(tensors[key]))
    return digest.hexdigest()

"""Cache entries too large to hold: written a batch at a time, read back a block of images at a time.

An entry is a safetensors file (`features` float32, then `labels` int64, a sha256 of both in its
metadata). ImageNet's test split as local features is about 10 GB on RN50, so the encoder appends
each batch to the file as it comes (`EntryWriter`), and evaluation reads rows of it on demand
(`StoredFeatures`): memory holds one block of images, never the split. The files are plain
safetensors files, the same as entries written whole; the checksum is the one `tensors_sha256`
gives, computed over the bytes as they pass.
"""

from __future__ import annotations

import contextlib
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..atomic import atomic_path
from ..checksum import TensorDigest, tensor_bytes

FEATURES = "features"
LABELS = "labels"
CHECKSUM_KEY = "sha256"  # of the entry's tensors, in its metadata, checked on every read
READ_BYTES = 64 * 2**20  # how much of a file one read takes while checking its checksum
_HEADER_LIMIT = 2**24  # a larger header is not one this module wrote: the file is unreadable
_PLACEHOLDER = "0" * 64  # the checksum's place in the header, filled in when the last byte is written
_DTYPES = {"F32": torch.float32, "I64": torch.int64}  # safetensors' names of the two dtypes entries hold


class EntryWriter:
    """Writes an entry's `features` [N, ...] batch by batch, then its `labels` [N] and checksum.

    Use through `write_entry`, which makes the file appear only when it is whole."""

    def __init__(self, file: Any, labels: torch.Tensor, summary: dict) -> None:
        self._file, self._labels, self._summary = file, labels.to(torch.int64), summary
        self._digest = TensorDigest()
        self._rows = 0
        self._checksum_at: int | None = None

    def append(self, rows: torch.Tensor) -> None:
        """The next rows of `features` [b, ...], in order."""
        rows = rows.detach().to(torch.float32).cpu().contiguous()
        if self._checksum_at is None:
            self._start(tuple(rows.shape[1:]))
        self._rows += rows.shape[0]
        if self._rows > len(self._labels):
            raise ValueError(f"more feature rows than the entry's {len(self._labels)} labels")
        data = tensor_bytes(rows)
        self._digest.update(data)
        self._file.write(data)

    def _start(self, row_shape: tuple[int, ...]) -> None:
        n_rows = len(self._labels)
        shape = (n_rows, *row_shape)
        feature_bytes = 4 * int(np.prod(shape))
        tensors = {
            FEATURES: {"dtype": "F32", "shape": list(shape), "data_offsets": [0, feature_bytes]},
            LABELS: {"dtype": "I64", "shape": [n_rows], "data_offsets": [feature_bytes, feature_bytes + 8 * n_rows]},
        }
        metadata = {"nemesis": json.dumps(self._summary), CHECKSUM_KEY: _PLACEHOLDER}
        header = json.dumps({"__metadata__": metadata, **tensors}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        self._checksum_at = 8 + header.rindex(_PLACEHOLDER.encode())
        self._file.write(struct.pack("<Q", len(header)) + header)
        self._digest.start(FEATURES, torch.float32, shape)

    def finish(self) -> None:
        """Write the labels and the checksum; every row must have been appended."""
        if self._checksum_at is None:
            self._start((0,))  # no rows at all: an empty [0, 0] entry
        if self._rows != len(self._labels):
            raise ValueError(f"{self._rows} feature rows were written for {len(self._labels)} labels")
        self._digest.start(LABELS, torch.int64, self._labels.shape)
        data = tensor_bytes(self._labels)
        self._digest.update(data)
        self._file.write(data)
        self._file.seek(self._checksum_at)
        self._file.write(self._digest.hexdigest().encode())


@contextlib.contextmanager
def write_entry(path: Path, labels: torch.Tensor, summary: dict) -> Iterator[EntryWriter]:
    """`with write_entry(path, labels, summary) as writer: writer.append(batch)...`: the entry appears at
    `path` only once every row, the labels and the checksum are written; on error nothing does."""
    with atomic_path(path) as temporary, open(temporary, "wb") as file:
        writer = EntryWriter(file, labels, summary)
        yield writer
        writer.finish()


def entry_layout(path: Path) -> tuple[dict, int] | None:
    """An entry's safetensors header (tensor entries and `__metadata__`) and where its data starts, or
    None when the file cannot be such an entry."""
    try:
        with open(path, "rb") as file:
            prefix = file.read(8)
            if len(prefix) != 8:
                return None
            (size,) = struct.unpack("<Q", prefix)
            if size > _HEADER_LIMIT:
                return None
            header = json.loads(file.read(size))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return (header, 8 + size) if isinstance(header, dict) else None


class StoredFeatures:
    """The `features` [N, ...] of an entry on disk, read a block of rows at a time.

    It stands where a features tensor would (`len`, `shape`, `dim()`, `device`, `.to(device)`,
    slicing rows, `split`), and what it gives are tensors on its device; `blocks` is how evaluation
    walks it."""

    def __init__(self, path: Path, start: int, shape: tuple[int, ...], device: torch.device | str = "cpu") -> None:
        self.path, self._start, self.shape = Path(path), start, torch.Size(shape)
        self.device = torch.device(device)
        self.dtype = torch.float32
        self._row_values = int(np.prod(shape[1:]))

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return len(self.shape)

    @property
    def row_bytes(self) -> int:
        return 4 * self._row_values

    def to(self, device: torch.device | str) -> StoredFeatures:
        return StoredFeatures(self.path, self._start, tuple(self.shape), device)

    def __getitem__(self, rows: slice) -> torch.Tensor:
        if not isinstance(rows, slice) or rows.step not in (None, 1):
            raise TypeError("stored features are read by a slice of consecutive rows")
        first, stop, _ = rows.indices(len(self))
        count = max(0, stop - first)
        offset = self._start + first * self.row_bytes
        values = np.fromfile(self.path, dtype=np.float32, count=count * self._row_values, offset=offset)
        if values.size != count * self._row_values:
            raise OSError(f"{self.path} ended before row {stop} of its features")
        return torch.from_numpy(values).view(count, *self.shape[1:]).to(self.device)

    def split(self, size: int) -> Iterator[torch.Tensor]:
        """Consecutive blocks of `size` rows (the last may be shorter), as `Tensor.split` gives them."""
        for first in range(0, len(self), size):
            yield self[first : first + size]

    def float(self) -> StoredFeatures:
        return self


def stored_features(path: Path, device: torch.device | str = "cpu") -> StoredFeatures | None:
    """The `features` of the entry at `path`, unread, or None when its header does not describe them."""
    layout = entry_layout(path)
    if layout is None:
        return None
    header, data_start = layout
    entry = header.get(FEATURES)
    if not isinstance(entry, dict) or entry.get("dtype") != "F32" or entry.get("data_offsets", [None])[0] != 0:
        return None
    return StoredFeatures(path, data_start, tuple(entry["shape"]), device)


def file_checksum(path: Path) -> str | None:
    """The sha256 `tensors_sha256` gives of the entry's tensors, computed from the file a block at a time
    (None when the file is not an entry of float32 features and int64 labels)."""
    layout = entry_layout(path)
    if layout is None:
        return None
    header, data_start = layout
    digest = TensorDigest()
    tensors = sorted((key, value) for key, value in header.items() if key != "__metadata__")
    try:
        with open(path, "rb") as file:
            for key, entry in tensors:
                begin, end = entry["data_offsets"]
                digest.start(key, _DTYPES[entry["dtype"]], entry["shape"])
                file.seek(data_start + begin)
                remaining = end - begin
                while remaining > 0:
                    data = file.read(min(READ_BYTES, remaining))
                    if not data:
                        return None
                    digest.update(data)
                    remaining -= len(data)
    except (OSError, KeyError, TypeError, ValueError):
        return None
    return digest.hexdigest()


def read_labels(path: Path) -> torch.Tensor | None:
    """The entry's `labels` [N] (int64), read alone."""
    layout = entry_layout(path)
    if layout is None:
        return None
    header, data_start = layout
    entry = header.get(LABELS)
    if not isinstance(entry, dict) or entry.get("dtype") != "I64":
        return None
    begin, end = entry["data_offsets"]
    values = np.fromfile(path, dtype=np.int64, count=(end - begin) // 8, offset=data_start + begin)
    return torch.from_numpy(values)

"""Crafted hostile files: pickles written opcode by opcode, torch archives laid out by hand.

Each builder writes the bytes an attacker would, so the tests exercise the reader on exactly what it
would meet, not on what torch.save happens to produce.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
import zipfile
from pathlib import Path

import torch


class Pickle:
    """A pickle assembled from raw opcodes (protocol 2 unless an opcode needs more)."""

    def __init__(self, protocol: int = 2) -> None:
        self.data = bytearray(pickle.PROTO + bytes([protocol]) if protocol >= 2 else b"")

    def raw(self, data: bytes) -> Pickle:
        self.data += data
        return self

    def global_(self, module: str, name: str) -> Pickle:
        return self.raw(pickle.GLOBAL + f"{module}\n{name}\n".encode())

    def stack_global(self, module: str, name: str) -> Pickle:
        return self.text(module).text(name).raw(pickle.STACK_GLOBAL)

    def text(self, value: str) -> Pickle:
        encoded = value.encode()
        return self.raw(pickle.BINUNICODE + struct.pack("<I", len(encoded)) + encoded)

    def integer(self, value: int) -> Pickle:
        if 0 <= value < 2**31:
            return self.raw(pickle.BININT + struct.pack("<i", value))
        encoded = pickle.encode_long(value)
        return self.raw(pickle.LONG1 + bytes([len(encoded)]) + encoded)

    def none(self) -> Pickle:
        return self.raw(pickle.NONE)

    def mark(self) -> Pickle:
        return self.raw(pickle.MARK)

    def tuple(self) -> Pickle:
        return self.raw(pickle.TUPLE)

    def empty_dict(self) -> Pickle:
        return self.raw(pickle.EMPTY_DICT)

    def setitem(self) -> Pickle:
        return self.raw(pickle.SETITEM)

    def reduce(self) -> Pickle:
        return self.raw(pickle.REDUCE)

    def build(self) -> Pickle:
        return self.raw(pickle.BUILD)

    def pop(self) -> Pickle:
        return self.raw(pickle.POP)

    def stop(self) -> bytes:
        return bytes(self.data + pickle.STOP)

    def call(self, module: str, name: str, *text_args: str) -> Pickle:
        """module.name(*text_args) through GLOBAL and REDUCE: the classic `__reduce__` payload."""
        self.global_(module, name).mark()
        for argument in text_args:
            self.text(argument)
        return self.tuple().reduce()


def shell_payload(marker: Path) -> bytes:
    """`os.system("touch MARKER")`, exactly what `__reduce__` of a malicious object pickles."""
    return Pickle().call("os", "system", f"touch {marker}").stop()


def storage_id(pickler: Pickle, key: str, numel: int, storage_type: str = "FloatStorage") -> Pickle:
    """Push torch's persistent id of a storage: ('storage', torch.<type>, key, 'cpu', numel) then BINPERSID."""
    pickler.mark().text("storage").global_("torch", storage_type).text(key).text("cpu").integer(numel).tuple()
    return pickler.raw(pickle.BINPERSID)


def int_tuple(pickler: Pickle, values: tuple[int, ...]) -> Pickle:
    pickler.mark()
    for value in values:
        pickler.integer(value)
    return pickler.tuple()


def tensor(
    pickler: Pickle,
    key: str,
    numel: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    offset: int = 0,
    storage_type: str = "FloatStorage",
) -> Pickle:
    """Push `_rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())` as torch pickles a tensor."""
    pickler.global_("torch._utils", "_rebuild_tensor_v2").mark()
    storage_id(pickler, key, numel, storage_type).integer(offset)
    int_tuple(pickler, size)
    int_tuple(pickler, stride)
    pickler.raw(pickle.NEWFALSE).global_("collections", "OrderedDict").raw(pickle.EMPTY_TUPLE).reduce()
    return pickler.tuple().reduce()


def dassl_content(pickler: Pickle, push_ctx) -> bytes:
    """{'state_dict': {'ctx': <push_ctx>}, 'epoch': 1}: the smallest file load_dassl accepts."""
    pickler.empty_dict().text("state_dict").empty_dict().text("ctx")
    push_ctx(pickler)
    return pickler.setitem().setitem().text("epoch").integer(1).setitem().stop()


def write_torch_zip(
    path: Path,
    data_pkl: bytes,
    storages: dict[str, bytes] | None = None,
    compression: int = zipfile.ZIP_STORED,
) -> Path:
    """A zip-format torch file as torch.save lays it out: <name>/data.pkl, <name>/data/<key>, byteorder, version."""
    with zipfile.ZipFile(path, "w", compression=compression) as archive:
        archive.writestr("archive/data.pkl", data_pkl)
        archive.writestr("archive/byteorder", b"little")
        for key, data in (storages or {}).items():
            archive.writestr(f"archive/data/{key}", data)
        archive.writestr("archive/version", b"3\n")
    return path


def ctx_file(path: Path, ctx: torch.Tensor) -> Path:
    """A legitimate Dassl-style checkpoint holding `ctx`, written by hand in torch's zip layout."""
    flat = ctx.contiguous().float()
    stride = flat.stride()

    def push(pickler: Pickle) -> None:
        tensor(pickler, "0", flat.numel(), tuple(flat.shape), stride)

    return write_torch_zip(path, dassl_content(Pickle(), push), {"0": flat.numpy().tobytes()})


def legacy_file(path: Path, marker: Path) -> Path:
    """torch's legacy (pre-zip) format, which torch.load reads with a `('module', ...)` persistent id path."""
    content = {"state_dict": {"ctx": torch.zeros(4, 8)}, "note": str(marker)}
    torch.save(content, path, _use_new_zipfile_serialization=False)
    return path


def tar_file(path: Path) -> Path:
    """torch's ancient tar format, with its `pickle` member a symlink to /dev/stdin (reading it would hang)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name in ("storages", "tensors"):
            info = tarfile.TarInfo(name)
            payload = pickle.dumps(0)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
        link = tarfile.TarInfo("pickle")
        link.type = tarfile.SYMTYPE
        link.linkname = "/dev/stdin"
        archive.addfile(link)
    return path

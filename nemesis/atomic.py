"""Atomic file writes (a temporary file in the target folder, then a rename, so readers never see half a
file) and advisory file locks for files that several processes write."""

from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .errors import NemesisError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on error it is removed."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)  # missing parent folders of an output are created
    except OSError as error:
        raise NemesisError(f"cannot create the output folder {path.parent} ({error.strerror or error})") from None
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary)
    try:
        yield temporary
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())  # the bytes reach the disk before the rename makes them visible
        # mkstemp creates owner-only files; give the result the mode a plain open() would have
        os.chmod(temporary, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_umask())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, shared: bool = False, create: bool = True) -> Iterator[bool]:
    """Hold an advisory lock (fcntl.flock) on the file `path` for the block: shared or exclusive.

    Shared holders run together; an exclusive holder waits for them and they for it. With
    `create=False` a missing lock file is not created and nothing is locked (a reader on a folder
    nobody has written to, or cannot write to); the value says whether a lock is held. The lock
    file itself stays: removing it would let two processes lock two different files.
    """
    path = Path(path)
    if not create and not path.exists():
        yield False
        return
    try:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o666) if create else os.open(path, os.O_RDONLY)
    except OSError as error:
        raise NemesisError(
            f"cannot open the lock file {path} ({error.strerror}); check the folder's permissions"
        ) from error
    try:
        fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        yield True
    finally:
        os.close(handle)  # closing releases the lock


def prepare_output(path: str | os.PathLike, folder: bool = False, option: str = "--out") -> Path:
    """Check an output location before any work: the folder that will hold it, or its nearest existing
    ancestor when folders are missing (they are created on writing), must be a writable folder;
    a file is created and removed there to prove it. Nothing is left behind, so bad input that fails
    later still writes nothing.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise NemesisError(f"{option} {path} is a file; pass a folder")
    if not folder and path.is_dir():
        raise NemesisError(f"{option} {path} is a folder; pass a file name")
    existing = path if folder and path.is_dir() else path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, "Not a directory")
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise NemesisError(f"{option} {path}: cannot write to {existing} ({reason}); pass a writable place") from None
    return path

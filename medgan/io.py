"""Atomic files and folders, content hashing and JSON: the only place medgan writes bytes to disk directly."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from numpy.lib import format as npformat

_UMASK = os.umask(0)
os.umask(_UMASK)  # read once: os.umask can only be read by setting it


def atomic_write_bytes(path: str | os.PathLike, data: bytes | list, *, durable: bool = True) -> Path:
    """Write `data` (bytes, or a list of bytes-like pieces written in order) to `path` so a reader sees the old file
    or the new one, never half of one.

    `durable` flushes the bytes to the disk before the rename (fsync), so the file survives a power cut too. Without
    it, the file is still whole or absent after the process is killed; a file that is checked when read back (an
    ingest part, against its digests) can skip the wait.

    Example:
        >>> atomic_write_bytes("out/report.bin", b"...")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs get the usual permissions
        with os.fdopen(fd, "wb") as f:
            for piece in data if isinstance(data, list) else [data]:
                f.write(piece)
            f.flush()
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def atomic_write_npy(path: str | os.PathLike, array: np.ndarray, *, durable: bool = True) -> Path:
    """Write an array as a ``.npy`` file atomically, straight from its memory (no serialised copy)."""
    array = np.ascontiguousarray(array)
    head = npy_header(array.dtype, array.shape)
    return atomic_write_bytes(path, [head, memoryview(array).cast("B") if array.size else b""], durable=durable)


def npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header of a C-order array, for writing its bytes after it piece by piece."""
    head = io.BytesIO()
    npformat.write_array_header_1_0(head, {"descr": npformat.dtype_to_descr(np.dtype(dtype)), "fortran_order": False,
                                           "shape": tuple(shape)})  # fmt: skip
    return head.getvalue()


def atomic_write_text(path: str | os.PathLike, text: str, *, durable: bool = True) -> Path:
    """Write UTF-8 text atomically (see `atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode("utf-8"), durable=durable)


def to_json(obj: Any, *, compact: bool = False) -> str:
    """Stable JSON: sorted keys, numpy scalars and paths converted; indented for people, or `compact` (one line,
    ~10x faster to write: the indented form runs on json's pure-Python encoder) for machine-only files."""

    def default(o: Any) -> Any:
        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
        if isinstance(o, Path):
            return str(o)
        if isinstance(o, (set, frozenset)):
            return sorted(o)
        raise TypeError(f"{type(o).__name__} is not JSON serialisable")

    if compact:
        return json.dumps(obj, separators=(",", ":"), sort_keys=True, default=default) + "\n"
    return json.dumps(obj, indent=2, sort_keys=True, default=default) + "\n"


def atomic_write_json(path: str | os.PathLike, obj: Any, *, compact: bool = False, durable: bool = True) -> Path:
    """Write `obj` as stable JSON atomically (see `to_json`, `atomic_write_bytes`)."""
    return atomic_write_text(path, to_json(obj, compact=compact), durable=durable)


def read_json(path: str | os.PathLike) -> Any:
    """Read a JSON file, naming the file in the error when it is not valid JSON."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e}); was it written by medgan and completely?") from e


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike, *, keep_partial: bool = True) -> Iterator[Path]:
    """Build a folder at `<final>.partial` and rename it to `final` only when the block finishes.

    An interrupted build leaves `<final>.partial` behind so the next run can resume from it; an existing `final`
    is replaced only after the new one is complete.

    Example:
        >>> with atomic_dir("datasets/ct") as tmp:
        ...     (tmp / "dataset.json").write_text("{}")
    """
    final = Path(final)
    partial = final.with_name(final.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    try:
        yield partial
    except BaseException:
        if not keep_partial:
            shutil.rmtree(partial, ignore_errors=True)
        raise
    old = None
    if final.exists():
        # A fresh name, so a folder of the user's that happens to be called <final>.old is never touched.
        old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, old)
    os.replace(partial, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def sha256_array_header(dtype: np.dtype, shape: tuple[int, ...], h: Any | None = None) -> Any:
    """Feed the dtype and shape that `sha256_array` hashes before the bytes (to hash an array written in pieces)."""
    h = h or hashlib.sha256()
    h.update(f"{np.dtype(dtype).str}{tuple(shape)}".encode())
    return h


def sha256_array(array: np.ndarray, h: Any | None = None, chunk_rows: int = 4096) -> Any:
    """Feed an array's dtype, shape and C-order bytes into a SHA-256 (chunked, so memmaps stay out of RAM)."""
    h = sha256_array_header(array.dtype, array.shape, h)
    if array.ndim == 0 or len(array) == 0:
        h.update(np.ascontiguousarray(array).tobytes())
        return h
    for i in range(0, len(array), chunk_rows):
        h.update(memoryview(np.ascontiguousarray(array[i : i + chunk_rows])).cast("B"))  # no bytes copy
    return h


def write_all(f: Any, data: bytes | memoryview) -> None:
    """Write all of `data` to an unbuffered file (a raw write may take only part of it)."""
    view = memoryview(data).cast("B")
    while view:
        view = view[f.write(view) :]


def append_file(f: Any, path: str | os.PathLike, offset: int, size: int) -> None:
    """Append `size` bytes of `path` from `offset` to the unbuffered file `f`: copy_file_range where the kernel has it
    (no copy through Python), else reads and writes.

    Raises:
        ValueError: `path` holds fewer than ``offset + size`` bytes (a damaged file), naming it.
    """
    with open(path, "rb", buffering=0) as src:
        left = size
        try:
            while left:
                n = os.copy_file_range(src.fileno(), f.fileno(), left, offset + size - left)
                if n == 0:
                    break
                left -= n
        except (AttributeError, OSError):  # not Linux, or a file system that refuses it: plain copy
            src.seek(offset + size - left)
            while left and (block := src.read(min(left, 1 << 22))):
                write_all(f, block)
                left -= len(block)
    if left:
        raise ValueError(f"{path}: {left} of {size} image bytes missing (a damaged part)")

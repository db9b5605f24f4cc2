"""The one path layer: every file or folder a user names (data, latents, workdir, checkpoints,
reference statistics, weights) may be local or remote (`gs://bucket/...`), and is read and written
through etils `epath` (TensorFlow's gfile or gcsfs behind it for gs://).

What a reader must know: an object store has no rename and no fsync, and an object appears only
once its upload is complete. So `atomic_write` writes the final name directly there (tmp + fsync +
rename locally), and a library that can only write local files (ArrayRecordWriter) writes into
`local_file(path)`, which uploads on success. Libraries with their own gs:// support (orbax and
tensorstore, array_record's reader, TensorBoard) get `native(path)`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

from etils import epath

PathLike = str | os.PathLike


def path(p: PathLike) -> epath.Path:
    return epath.Path(p)


def is_remote(p: PathLike) -> bool:
    """Whether `p` names an object store (gs://, s3://, ...), not the local file system."""
    return "://" in os.fspath(p)


def native(p: PathLike) -> str:
    """The path as a string for libraries that open gs:// themselves (orbax, array_record, ...)."""
    return os.fspath(p)


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(p: PathLike, data: bytes) -> None:
    """Write `data` so that a reader sees the old or the new file, never half of it."""
    if is_remote(p):
        path(p).write_bytes(data)
        return
    p = os.fspath(p)
    tmp = p + ".tmp"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, p)
    fsync_dir(os.path.dirname(os.path.abspath(p)))


@contextlib.contextmanager
def reading(p) -> Iterator:
    """A binary file object for a path (local or remote), or `p` itself when it is already one
    (for numpy/zipfile readers that take either)."""
    if hasattr(p, "read"):
        yield p
        return
    with path(p).open("rb") as f:
        yield f


@contextlib.contextmanager
def local_file(p: PathLike) -> Iterator[str]:
    """A local file name to write `p` through: `p` itself when local; for a remote `p` a temporary
    file that is uploaded to `p` when the block succeeds (and removed either way)."""
    if not is_remote(p):
        yield os.fspath(p)
        return
    tmp_dir = tempfile.mkdtemp(prefix="pf-upload-")
    try:
        local = os.path.join(tmp_dir, path(p).name)
        yield local
        path(local).copy(path(p), overwrite=True)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)

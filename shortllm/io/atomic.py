"""Atomic output: a reader sees the old file/directory or the complete new one, never a partial one.

Everything a user keeps (scores, plans, reports, checkpoints) is written to a temporary name in the
target's own directory (same filesystem, so the final rename is atomic) and renamed into place.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import IO, Iterator


def _default_mode(base: int) -> int:
    """`base` filtered by the process umask: mkstemp/mkdtemp create 0600/0700, the user expects 0644/0755."""
    umask = os.umask(0)
    os.umask(umask)
    return base & ~umask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem allows fsync on a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "w", durable: bool = False) -> Iterator[IO]:
    """Open a temp file beside `path`; on a clean exit it replaces `path`, on an error it is deleted.

    durable=True also fsyncs the data and the rename (for checkpoints that must survive a power cut)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, path)
        if durable:
            _fsync_dir(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_file(path) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp path (same suffix) for writers that take a file name (matplotlib, safetensors)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, _default_mode(0o666))
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def temp_dir_beside(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, _default_mode(0o777))
    return tmp


def publish_dir(tmp: Path, out: Path, overwrite: bool, exists_error: type[Exception] = FileExistsError) -> None:
    """Rename the finished directory `tmp` to `out`.

    Without overwrite a plain rename publishes: it fails when another writer created `out` meanwhile, so
    of two concurrent writers one wins and the other gets `exists_error`, and nothing is replaced
    silently. With overwrite an existing `out` is moved aside first and restored if the rename fails."""
    if not overwrite:
        try:
            os.rename(tmp, out)
        except OSError as exc:
            if out.exists():
                raise exists_error(f"{out} already exists (another writer finished first); choose another "
                                   "output dir or pass overwrite=True") from exc
            raise
        return
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

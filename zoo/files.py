"""Files on disk: written so that nothing half-written ever carries a final name, and hashed."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from zoo.errors import DiskFull

DEFAULT_NEXT_STEP = "write elsewhere, then try again"
MODELS_DIR_NEXT_STEP = "point --models-dir at a disk with room, then try again"


@contextlib.contextmanager
def disk_errors(path: Path, *, next_step: str = MODELS_DIR_NEXT_STEP) -> Iterator[None]:
    """Turn 'no space left on device' while writing `path` into DiskFull."""
    try:
        yield
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFull(
                f"no disk space left writing {path} ({exc.strerror}); the previous file is intact. "
                f"Free some disk space or {next_step}"
            ) from exc
        raise


def atomic_write(
    path: Path, write: Callable[[str], None], *, next_step: str = DEFAULT_NEXT_STEP
) -> None:
    """Call write(tmp_path) on a temporary file beside `path`, fsync it, then os.replace it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    try:
        with disk_errors(path, next_step=next_step):
            write(tmp_name)
            with open(tmp_name, "rb+") as tmp:
                os.fsync(tmp.fileno())
            os.replace(tmp_name, path)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)


def write_json(path: Path, payload: Any, *, next_step: str = DEFAULT_NEXT_STEP) -> None:
    """JSON written atomically (UTF-8, readable indentation)."""
    text = json.dumps(payload, indent=2, default=str, ensure_ascii=False) + "\n"
    atomic_write(
        path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"), next_step=next_step
    )


def copy_file(source: Path, dest: Path) -> None:
    """Copy `source` to `dest` atomically (temporary file beside `dest`, then os.replace)."""
    atomic_write(dest, lambda tmp: shutil.copyfile(source, tmp), next_step=MODELS_DIR_NEXT_STEP)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()

"""Writing files so that nothing half-written ever carries a final name."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from zoo.download import disk_errors

DEFAULT_NEXT_STEP = "write elsewhere, then try again"


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

"""The workspace's cache of imports: a model's normalised graph and its fidelity verdict.

Normalising a graph (opset upgrade, constant folding) and checking the converted module against
onnxruntime cost seconds on every run, and their result depends only on the file's bytes and the
libraries doing the work. So a checked import is stored under `MODELS_DIR/.cache/imports/` as the
normalised `.onnx`, with the verdict (fidelity figures, notes, the file's own opset) in one of its
metadata entries, keyed by the source file's sha256 and the versions of onnx, onnxslim, onnx2torch,
torch and onnxruntime. A later run converts the stored graph (a fraction of a second) instead.

Entries are written atomically and belong to the same size budget and `zoo cache` listing as
the feature caches; a damaged entry is removed and the import done again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.diskcache import keep_within_budget, touch
from zoo.errors import ZooError
from zoo.files import atomic_write, sha256_file

if TYPE_CHECKING:
    import onnx

VERSION = 1  # bump when normalisation or the verdict changes meaning
SUFFIX = ".onnx"
VERDICT_KEY = "zoo.import_verdict"  # the metadata entry holding the verdict in a cached graph


def cache_key(onnx_path: str | os.PathLike[str], **settings: Any) -> str:
    """The file's sha256, the libraries' versions and the caller's `settings` (opset, tolerance)."""
    from importlib.metadata import version

    import onnx
    import onnxruntime
    import torch

    fields = {
        "sha256": sha256_file(onnx_path),
        "version": VERSION,
        "settings": settings,
        "onnx": onnx.__version__,
        "onnxslim": version("onnxslim"),
        "onnx2torch": version("onnx2torch"),
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def load(cache_dir: Path, key: str) -> tuple[onnx.ModelProto, dict[str, Any]] | None:
    """The normalised graph stored under `key` and its verdict; None if absent or damaged."""
    import onnx

    path = Path(cache_dir) / f"{key}{SUFFIX}"
    if not path.exists():
        return None
    try:
        model = onnx.load(str(path))
        verdict = _pop_verdict(model)
    except Exception:  # a cut or foreign file: protobuf and json fail in many ways
        discard(cache_dir, key)  # a damaged entry is imported again, never trusted
        return None
    touch(path)
    return model, verdict


def store(cache_dir: Path, key: str, model: onnx.ModelProto, verdict: dict[str, Any]) -> None:
    """Keep a normalised graph and its verdict; a cache that cannot be written only costs time."""

    entry = model.metadata_props.add(key=VERDICT_KEY, value=json.dumps(verdict))
    try:
        payload = model.SerializeToString()
    except ValueError:  # over protobuf's 2 GB: such a model is imported every time
        return
    finally:
        model.metadata_props.remove(entry)
    with contextlib.suppress(OSError, ZooError):
        atomic_write(Path(cache_dir) / f"{key}{SUFFIX}", lambda tmp: Path(tmp).write_bytes(payload))
        keep_within_budget(cache_dir)


def discard(cache_dir: Path, key: str) -> None:
    """Remove an entry found unusable; the import is done again and stored afresh."""
    (Path(cache_dir) / f"{key}{SUFFIX}").unlink(missing_ok=True)


def _pop_verdict(model: onnx.ModelProto) -> dict[str, Any]:
    """The verdict stored in a cached graph, removed from its metadata (the graph is as imported)."""
    for entry in model.metadata_props:
        if entry.key == VERDICT_KEY:
            verdict = json.loads(entry.value)
            model.metadata_props.remove(entry)
            return verdict
    raise KeyError(VERDICT_KEY)

"""Reading ONNX files safely: recognise what is not a model, and keep external data in its folder."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from zoo.catalog import load_catalog
from zoo.errors import InvalidModelFile, UnsafeFile, ZooError
from zoo.legacy import ORT_MIN_OPSET, runnable

if TYPE_CHECKING:
    import onnx

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/"


def lfs_pointer_entry(head: bytes) -> str | None:
    """The catalog model a Git LFS pointer points at (its oid is the entry's sha256), else None."""
    if not head.lstrip().startswith(LFS_POINTER_PREFIX):
        return None
    found = re.search(rb"^oid sha256:([0-9a-f]{64})\s*$", head, re.MULTILINE)
    if found is None:
        return None

    try:
        entry = load_catalog().by_sha256(found.group(1).decode())
    except ZooError:  # a broken private catalog: the pointer is still a pointer
        return None
    return entry.name if entry is not None else None


def describe_non_model(head: bytes) -> str | None:
    """Name what the first bytes of a file are when they are clearly not an ONNX model, else None."""
    stripped = head.lstrip()
    if not head:
        return "an empty file"
    if stripped.startswith(LFS_POINTER_PREFIX):
        target = lfs_pointer_entry(head)
        to = f" to the catalog's {target} (`zoo fetch {target}` downloads it)" if target else ""
        return f"a Git LFS pointer{to}, not the model itself (the server no longer serves the LFS object)"
    lowered = stripped[:512].lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head", b"<body")):
        return "an HTML page (an error or login page), not a model"
    if lowered.startswith((b"{", b"[")) and b'"error"' in lowered:
        return "a JSON error message, not a model"
    return None


# What a local file is when it is not a model, and what to do about it (a downloaded file is
# judged by `describe_non_model`: there the server is to blame, here the way the file was saved).
_IMAGES_GO = "pass the .onnx model file first (images go after it: zoo predict MODEL.onnx IMAGES..., or to --data)"
_RAW_LINK = "download the raw file (on GitHub/Hugging Face: the 'raw'/'download' link)"
_LOCAL_KINDS: tuple[tuple[tuple[bytes, ...], str, str], ...] = (
    ((b"<!doctype html", b"<html", b"<head", b"<body", b"<?xml"), "an HTML page",
     "was it saved from a browser? D" + _RAW_LINK[1:]),
    ((LFS_POINTER_PREFIX,), "a Git LFS pointer",
     "run `git lfs pull` in its repository, or " + _RAW_LINK),
    ((b"{", b"["), "a JSON file", "pass the .onnx model file itself"),
    ((b"PK\x03\x04",), "a zip archive (a PyTorch .pt/.pth checkpoint is one too)",
     "unzip it and pass the .onnx inside, or export the PyTorch model to ONNX first"),
    ((b"\x89PNG",), "a PNG image", _IMAGES_GO),
    ((b"\xff\xd8\xff",), "a JPEG image", _IMAGES_GO),
    ((b"GIF8",), "a GIF image", "pass the .onnx model file"),
    ((b"%PDF",), "a PDF document", "pass the .onnx model file"),
    ((b"\x1f\x8b",), "gzip-compressed data",
     "if it is a zoo .tar.gz archive, pass it under a name ending in .tar.gz"),
)  # fmt: skip


def local_non_model(head: bytes, *, label: str) -> str | None:
    """One line saying what a local file is when it is clearly not an ONNX model, else None."""
    if not head:
        return f"{label} is an empty file, not an ONNX model: the download or copy did not finish; get the file again"
    target = lfs_pointer_entry(head)
    if target is not None:
        return (
            f"{label} is a Git LFS pointer to the catalog's {target}, not the model itself: "
            f"run `zoo fetch {target}` to download it"
        )
    stripped = head.lstrip()
    lowered = stripped[:512].lower()
    for prefixes, what, next_step in _LOCAL_KINDS:
        if lowered.startswith(tuple(p.lower() for p in prefixes)) or head.startswith(prefixes):
            return f"{label} is {what}, not an ONNX model: {next_step}"
    return None


def _external_tensors(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    from onnx.external_data_helper import _get_all_tensors, uses_external_data

    return [tensor for tensor in _get_all_tensors(model) if uses_external_data(tensor)]


def check_external_data(model: onnx.ModelProto, model_dir: Path) -> None:
    """Refuse external-data references that leave `model_dir` or read past the end of their file."""
    base = Path(os.path.realpath(model_dir))
    for tensor in _external_tensors(model):
        info = {entry.key: entry.value for entry in tensor.external_data}
        location = info.get("location", "")
        where = f"tensor {tensor.name!r} points at external data {location!r}"
        if not location or os.path.isabs(location) or location.startswith(("/", "\\")):
            raise UnsafeFile(
                f"{where}, an absolute path; external data must sit beside the model in {base}"
            )
        parts = Path(location).parts
        if ".." in parts or any(":" in part for part in parts):
            raise UnsafeFile(
                f"{where}, which leaves the model folder; external data must sit beside the model in {base}"
            )
        target = base / location
        # Check each component for links before resolving, so a symlinked folder cannot smuggle a path out.
        probe = base
        for part in parts:
            probe = probe / part
            if probe.is_symlink():
                raise UnsafeFile(
                    f"{where}, which is a symbolic link; copy the real file into {base}"
                )
        if not target.is_file():
            raise InvalidModelFile(
                f"{where}, which does not exist; put the data file beside the model in {base}"
            )
        resolved = Path(os.path.realpath(target))
        if base != resolved and base not in resolved.parents:
            raise UnsafeFile(
                f"{where}, which resolves outside {base}; external data must sit beside the model"
            )
        stat = target.stat()
        if stat.st_nlink > 1:
            raise UnsafeFile(
                f"{where}, which is a hard link to another file; copy the real file into {base}"
            )
        offset = int(info.get("offset", 0) or 0)
        length = info.get("length")
        end = offset + int(length) if length is not None else offset
        if offset < 0 or end > stat.st_size:
            raise InvalidModelFile(
                f"{where} at bytes {offset}..{end}, past the end of the {stat.st_size}-byte file; the model is damaged, fetch it again"
            )


def load_onnx(path: str | os.PathLike[str], *, load_external_data: bool = True) -> onnx.ModelProto:
    """Load an ONNX model, refusing non-models and external data that escapes the model's folder."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise InvalidModelFile(f"{path} is not a file; pass the path of an .onnx model")
    with open(path, "rb") as handle:
        head = handle.read(1024)
    target = lfs_pointer_entry(head)
    if target is not None:
        raise InvalidModelFile(local_non_model(head, label=str(path)))
    what = describe_non_model(head)
    if what is not None:
        raise InvalidModelFile(f"{path} is {what}; fetch the model again (zoo fetch NAME --force)")
    # A file no download turns into (an image, an archive, a document): the path, not the fetch, is wrong.
    said = local_non_model(head, label=str(path))
    if said is not None:
        raise InvalidModelFile(said)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except RecursionError as exc:
        raise InvalidModelFile(
            f"{path} is nested too deeply to be a real ONNX model; it was refused"
        ) from exc
    except Exception as exc:  # protobuf raises DecodeError and friends; none of them is a model
        raise InvalidModelFile(
            f"{path} is not a valid ONNX model ({type(exc).__name__}); fetch it again (zoo fetch NAME --force)"
        ) from exc
    if not model.graph.node and not model.graph.initializer:
        raise InvalidModelFile(
            f"{path} holds no ONNX graph; fetch it again (zoo fetch NAME --force)"
        )
    if load_external_data and _external_tensors(model):
        check_external_data(model, path.parent)
        from onnx.external_data_helper import load_external_data_for_model

        load_external_data_for_model(model, str(path.parent))
    return model


def _varint(handle: BinaryIO) -> int | None:
    value = shift = 0
    while True:
        byte = handle.read(1)
        if not byte:
            return None
        value |= (byte[0] & 0x7F) << shift
        if byte[0] < 0x80:
            return value
        shift += 7
        if shift > 63:
            return None


def declared_opset(path: str | os.PathLike[str]) -> int | None:
    """The standard-domain opset a model file declares, read without parsing its graph.

    Walks ModelProto's top-level fields and skips the graph's bytes, so asking costs no more for
    a 500 MB file than for a small one. None when the file is not a readable model.
    """
    from onnx import OperatorSetIdProto

    opset_field, lengths, fixed = 8, 2, {0: 0, 1: 8, 5: 4}
    try:
        with open(path, "rb") as handle:
            while (tag := _varint(handle)) is not None:
                field, wire = tag >> 3, tag & 7
                if wire == lengths:
                    size = _varint(handle)
                    if size is None:
                        return None
                    if field == opset_field:
                        entry = OperatorSetIdProto.FromString(handle.read(size))
                        if entry.domain in ("", "ai.onnx"):
                            return entry.version
                    else:
                        handle.seek(size, os.SEEK_CUR)
                elif wire == 0:
                    if _varint(handle) is None:
                        return None
                elif wire in fixed:
                    handle.seek(fixed[wire], os.SEEK_CUR)
                else:
                    return None
    except (OSError, ValueError):
        return None
    return None


def load_runnable(
    path: str | os.PathLike[str], *, load_external_data: bool = True
) -> onnx.ModelProto:
    """`load_onnx`, upgraded to an opset onnxruntime runs when the file is older (see zoo.legacy)."""

    return runnable(load_onnx(path, load_external_data=load_external_data))


def runnable_source(path: str | os.PathLike[str]) -> str | bytes:
    """What to hand onnxruntime for a file: its path, or its upgraded bytes when its opset is old."""

    opset = declared_opset(path)
    if opset is None or opset >= ORT_MIN_OPSET:
        return os.fspath(path)  # onnxruntime says itself what is wrong with an unreadable file
    return load_runnable(path).SerializeToString()

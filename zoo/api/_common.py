"""What every API function shares: the workspace, the catalog, preprocessing flags, silence."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:
    from zoo.catalog import Catalog
    from zoo.preprocess import PreprocessRequest

# A JSON file of extra catalog entries (`zoo --catalog`), a loaded Catalog, or None: $ZOO_CATALOG.
CatalogLike = Union[str, os.PathLike, "Catalog", None]
# A preset name ("imagenet"), a request, or the flags by name ({"preset": "caffe", "mean": ...}).
PreprocessLike = Union[str, "PreprocessRequest", Mapping[str, Any], None]
Log = Callable[[str], None]
PathLike = str | os.PathLike


def silent(_message: str) -> None:
    """The default `log`: library functions print nothing unless asked."""


def logger(log: Log | None) -> Log:
    return log if log is not None else silent


def models_dir_of(models_dir: PathLike | None) -> Path:
    """The workspace: as given, else $ZOO_MODELS_DIR, else ./models (the CLI's default)."""
    chosen = models_dir if models_dir is not None else os.environ.get("ZOO_MODELS_DIR") or "models"
    return Path(chosen).expanduser()


def catalog_file(catalog: CatalogLike) -> str | None:
    """The file of extra entries a catalog argument names (None for a loaded Catalog or none)."""
    if catalog is None:
        return os.environ.get("ZOO_CATALOG") or None
    return os.fspath(catalog) if isinstance(catalog, (str, os.PathLike)) else None


def catalog_of(catalog: CatalogLike) -> Catalog:
    """The built-in catalog plus the extra entries of `catalog` (a loaded Catalog as it is)."""
    from zoo.catalog import Catalog, load_catalog

    if isinstance(catalog, Catalog):
        return catalog
    return load_catalog(catalog_file(catalog))


def preprocess_request(preprocess: PreprocessLike) -> PreprocessRequest:
    """`preprocess=` as a request: a preset name, a request, or the command line's flags by name."""
    from zoo.options import PREPROCESS, checked
    from zoo.preprocess import PreprocessRequest

    if isinstance(preprocess, PreprocessRequest):
        return preprocess
    flags = {"preset": preprocess} if isinstance(preprocess, str) else dict(preprocess or {})
    for key in ("mean", "std"):  # (0.5, 0.5, 0.5) from Python, "0.5,0.5,0.5" from the shell
        if isinstance(flags.get(key), Sequence) and not isinstance(flags[key], str):
            flags[key] = ",".join(str(v) for v in flags[key])
    if flags.get("scale") is not None:
        flags["scale"] = str(flags["scale"])
    return PreprocessRequest.from_flags(**checked(flags, PREPROCESS, command="preprocess"))


def preprocess_flags(request: PreprocessRequest) -> dict[str, Any]:
    """The command-line values that give `request` again (for worker processes)."""
    flags: dict[str, Any] = request.to_dict()
    for key in ("mean", "std"):
        if key in flags:
            flags[key] = ",".join(str(v) for v in flags[key])
    return flags


def paths(images: PathLike | Sequence[PathLike]) -> list[str]:
    """One image, folder or glob, or several, as the command line's list of arguments."""
    if isinstance(images, (str, os.PathLike)):
        return [os.fspath(images)]
    return [os.fspath(image) for image in images]

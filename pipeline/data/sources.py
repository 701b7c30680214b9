"""Data sources: what a user passes as `--data`, read, checked and split into a `DataSplit`.

Sources (`load_source`):
- `builtin:digits`: scikit-learn's 1,797 8x8 handwritten digits, white ink on black.
- a folder with one subfolder per class (ImageFolder; class order = sorted folder names);
- a folder with `train/`, `val/` (or `valid/`, `validation/`) and optional `test/`, each holding
  class folders; without `val/`, validation is carved from `train/`; without `test/`, test is empty;
- a CSV of `path,label[,split]` rows, paths relative to the CSV, header optional. Integer labels
  are ordered numerically ("2" before "10"), other labels alphabetically.
Hidden files and folders and non-image extensions are ignored. Symlinks are followed (files and
folders) when they lead to a regular file; symlinked folder cycles are visited once. Every image
is decoded once at load time (JPEGs at reduced scale) so that training never meets a bad file.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pipeline.core.samples import DataSplit, Sample
from pipeline.data.images import (
    BUILTIN_PREFIX,
    BUILTIN_SETS,
    MAX_PIXELS,
    find_unreadable,
    is_image_name,
    scan_class_folder,
    visible_dirs,
)
from pipeline.data.split import split_samples
from zoo.errors import DataError

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
# Duplicates kept together: samples -> a group id per sample (pipeline.train.twins makes one).
GroupBy = Callable[[Sequence[Sample]], Sequence[int]]
CSV_COLUMNS = {  # header cell -> column meaning; anything else is ignored
    **dict.fromkeys(("path", "file", "filename", "filepath", "image"), "path"),
    **dict.fromkeys(("label", "class", "category", "target"), "label"),
    "split": "split",
}


# ----------------------------------------------------------------------------- scanning


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9._-]+", "-", name.lower()).strip("-.")
    return slug[:40] or "data"


def _scan_image_folder(
    root: Path, skipped: list[tuple[str, str]], class_names: Sequence[str] | None = None
) -> dict[str, list[str]]:
    """Class name -> image paths for a folder of class folders."""
    class_dirs = {p.name: p for p in visible_dirs(root)}
    loose = [p.name for p in root.iterdir() if p.is_file() and is_image_name(p.name)]
    if loose:
        log.warning("ignored %d image(s) directly in %s (not in a class folder)", len(loose), root)
    names = sorted(class_dirs) if class_names is None else class_names
    by_class: dict[str, list[str]] = {}
    for name in names:
        if name not in class_dirs:
            continue
        paths = scan_class_folder(class_dirs[name], skipped)
        if not paths:
            raise DataError(
                f"class folder {class_dirs[name]} holds no images; add images to it or remove it"
            )
        by_class[name] = paths
    return by_class


# ----------------------------------------------------------------------------- sources


@dataclass
class _Collected:
    """What a source lists before validation: labelled paths per part ("all" when unsplit)."""

    class_names: list[str]
    parts: dict[str, list[tuple[str, str]]]  # part -> (path, class name)
    name: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def mirror_safe(split: DataSplit) -> bool:
    """Whether horizontal flips keep every class what it is: False for built-in digits."""
    if split.source.startswith(BUILTIN_PREFIX):
        name = split.source[len(BUILTIN_PREFIX) :]
        return BUILTIN_SETS[name].mirror_safe if name in BUILTIN_SETS else True
    return True


def load_source(
    src: str | os.PathLike[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    strict: bool = False,
    max_pixels: int = MAX_PIXELS,
    group_by: GroupBy | None = None,
) -> DataSplit:
    """Read a data source, check every image decodes, and split it (stratified, seeded).

    `group_by` gives a group id per sample of what zoo splits itself (duplicates share one, see
    pipeline.train.twins); each group then stays inside one part. Built-in sets are not grouped.
    """
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise DataError(
            f"val fraction {val_fraction} + test fraction {test_fraction} must stay below 1; "
            "lower one of them"
        )
    fractions = {"seed": seed, "val_fraction": val_fraction, "test_fraction": test_fraction}
    src = os.fspath(src)
    if src.startswith(BUILTIN_PREFIX):
        return _load_builtin(src, **fractions)
    # Absolute paths, so that a saved split reloads from any working directory.
    path = Path(src).expanduser().absolute()
    if not path.exists():
        raise DataError(
            f"data source {src} does not exist; pass a folder of class folders, a CSV of "
            "path,label rows, or builtin:digits"
        )
    if path.is_file():
        if path.suffix.lower() != ".csv":
            raise DataError(
                f"{src} is a file but not a .csv; pass a CSV of path,label rows or a folder"
            )
        collected = _collect_csv(path)
    elif folders := _split_folders(path):
        collected = _collect_presplit(path, folders)
    else:
        collected = _collect_image_folder(path)
    return _finish(
        collected,
        source=str(path),
        strict=strict,
        max_pixels=max_pixels,
        group_by=group_by,
        **fractions,
    )


def _load_builtin(src: str, *, seed: int, val_fraction: float, test_fraction: float) -> DataSplit:
    name = src[len(BUILTIN_PREFIX) :]
    entry = BUILTIN_SETS.lookup(name)
    class_names, labels = entry.labels()
    samples = [Sample(f"{src}#{i}", label) for i, label in enumerate(labels)]
    train, val, test = split_samples(
        samples, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    return DataSplit(class_names, train, val, test, name, entry.recommended_size, [], src)


def _holds_images(folder: Path) -> bool:
    """Whether image files lie directly in `folder` (a class folder's look, not a split folder's)."""
    return any(p.is_file() and is_image_name(p.name) for p in folder.iterdir())


def _split_folders(root: Path) -> dict[str, Path]:
    """Part -> folder when `root` is laid out as train/ val/ test/, else {}.

    `train/` holding class folders (or standing beside val/ or test/) makes a split layout; a
    `train/` of loose images among other class folders is just a class named "train". Other
    folders beside the splits are named in a warning and left out, never merged.
    """
    dirs = visible_dirs(root)
    parts: dict[str, Path] = {}
    others: list[Path] = []
    for folder in dirs:
        part = SPLIT_FOLDERS.get(folder.name.lower())
        if part is None:
            others.append(folder)
        elif part in parts:
            raise DataError(
                f"{root} has both {parts[part].name}/ and {folder.name}/; keep one of them"
            )
        else:
            parts[part] = folder
    if "train" not in parts:
        return {}
    train_has_classes = bool(visible_dirs(parts["train"]))
    if not train_has_classes and len(parts) == 1:
        return {}  # a class folder named "train" among others is just a class
    for folder in parts.values():
        if not visible_dirs(folder) and _holds_images(folder):
            raise DataError(
                f"{folder} holds images directly, not class folders; sort them into "
                f"{folder.name}/<class>/ folders (one per class)"
            )
    classes = [f.name for f in others if _holds_images(f)]
    if classes:
        raise DataError(
            f"{root} holds both split folders ({', '.join(p.name + '/' for p in parts.values())}) and "
            f"class folders ({', '.join(c + '/' for c in classes[:4])}); move the class folders into "
            "the splits, or pass one folder of class folders"
        )
    if others:
        log.warning(
            "ignored folder(s) beside %s in %s: %s (not train/, val/ or test/; rename one to use it)",
            "/".join(p.name for p in parts.values()),
            root,
            ", ".join(f.name + "/" for f in others[:6]) + (" …" if len(others) > 6 else ""),
        )
    return parts


def _collect_image_folder(root: Path) -> _Collected:
    skipped: list[tuple[str, str]] = []
    by_class = _scan_image_folder(root, skipped)
    parts = {"all": [(p, name) for name, paths in by_class.items() for p in paths]}
    return _Collected(sorted(by_class), parts, _slug(root.absolute().name), skipped)


def _collect_presplit(root: Path, folders: dict[str, Path]) -> _Collected:
    skipped: list[tuple[str, str]] = []
    class_names = sorted({d.name for folder in folders.values() for d in visible_dirs(folder)})
    parts: dict[str, list[tuple[str, str]]] = {}
    for part, folder in folders.items():
        by_class = _scan_image_folder(folder, skipped, class_names)
        entries = [(p, name) for name, paths in by_class.items() for p in paths]
        if entries or part == "train":
            parts[part] = entries
        elif part == "val":
            log.warning("%s holds no images; validation is carved from train/ instead", folder)
        else:
            log.warning("%s holds no images; the run is measured on the validation split", folder)
    return _Collected(class_names, parts, _slug(root.absolute().name), skipped)


def _collect_csv(path: Path) -> _Collected:
    base = path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            rows = [
                (n, row)
                for n, row in enumerate(csv.reader(handle), 1)
                if any(c.strip() for c in row)
            ]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(
            f"cannot read CSV {path} ({exc}); save it as UTF-8 with path,label rows"
        ) from exc
    columns = {"path": 0, "label": 1, "split": 2}
    if rows and not is_image_name(rows[0][1][0].strip()):  # the first row is a header
        header = [CSV_COLUMNS.get(c.strip().lower()) for c in rows.pop(0)[1]]
        columns = {k: header.index(k) for k in ("path", "label", "split") if k in header}
        if "path" not in columns or "label" not in columns:
            raise DataError(f"CSV {path} has a header without `path` and `label` columns; add them")
    skipped: list[tuple[str, str]] = []
    parts: dict[str, list[tuple[str, str]]] = {}
    for line, row in rows:
        cells = [c.strip() for c in row]
        if len(cells) <= max(columns["path"], columns["label"]) or not cells[columns["label"]]:
            skipped.append((f"{path}:{line}", "row without a path and a label"))
            continue
        file = str(base / cells[columns["path"]])
        split_col = columns.get("split")
        split_cell = (
            cells[split_col].lower() if split_col is not None and split_col < len(cells) else ""
        )
        part = SPLIT_FOLDERS.get(split_cell, "all" if not split_cell else None)
        if part is None:
            raise DataError(f"{path}:{line}: unknown split {split_cell!r}; use train, val or test")
        if not is_image_name(file):
            skipped.append((file, "not an image file name"))
        elif not os.path.isfile(file):
            skipped.append((file, "file not found"))
        else:
            parts.setdefault(part, []).append((file, cells[columns["label"]]))
    if "all" in parts and len(parts) > 1:
        raise DataError(
            f"CSV {path} gives a split for some rows only; fill the split column on every row"
        )
    labels = {label for entries in parts.values() for _, label in entries}
    numeric = all(re.fullmatch(r"[+-]?\d+", label) for label in labels)
    class_names = sorted(labels, key=(lambda s: (int(s), s)) if numeric else None)
    return _Collected(class_names, parts, _slug(path.stem), skipped)


def _describe(skipped: Sequence[tuple[str, str]], limit: int = 3) -> str:
    shown = "; ".join(f"{os.path.basename(p)} ({reason})" for p, reason in skipped[:limit])
    more = f"; and {len(skipped) - limit} more" if len(skipped) > limit else ""
    return shown + more


def _finish(
    collected: _Collected,
    *,
    source: str,
    strict: bool,
    max_pixels: int,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    group_by: GroupBy | None = None,
) -> DataSplit:
    """Validate the listed images, apply the class rules, and split what is not yet split."""
    readable = _readable(collected, source=source, strict=strict, max_pixels=max_pixels)
    _check_classes(collected.class_names, readable.parts, source)
    train, val, test = _train_val_test(
        readable.parts,
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        group_by=group_by,
    )
    counts = _per_class(train, len(collected.class_names))
    small = [n for n, c in zip(collected.class_names, counts, strict=True) if c < 2]
    if small:
        log.warning("class(es) with fewer than 2 training images: %s", ", ".join(small[:5]))
    return DataSplit(
        collected.class_names,
        train,
        val,
        test,
        collected.name,
        None,
        readable.skipped,
        source,
        given_split="all" not in readable.parts,
    )


class _Readable(NamedTuple):
    """The samples whose images decode, per part, and every file left out with why."""

    parts: dict[str, list[Sample]]
    skipped: list[tuple[str, str]]


def _readable(collected: _Collected, *, source: str, strict: bool, max_pixels: int) -> _Readable:
    """Decode every listed image once; refuse (`strict`) or warn about the files that fail."""
    all_paths = [p for entries in collected.parts.values() for p, _ in entries]
    bad = find_unreadable(all_paths, max_pixels=max_pixels)
    skipped = collected.skipped + sorted(bad.items())
    if skipped and strict:
        raise DataError(
            f"{len(skipped)} unusable file(s) in {source}: {_describe(skipped)}; "
            "remove them or run without --strict"
        )
    if skipped:
        log.warning("skipped %d unusable file(s): %s", len(skipped), _describe(skipped))
    index = {name: i for i, name in enumerate(collected.class_names)}
    parts = {
        part: [Sample(p, index[name]) for p, name in entries if p not in bad]
        for part, entries in collected.parts.items()
    }
    return _Readable(parts, skipped)


def _check_classes(class_names: list[str], parts: dict[str, list[Sample]], source: str) -> None:
    """Refuse data without training images, a class without any, or fewer than two classes."""
    pool = parts.get("all", parts.get("train", []))
    present = {s.label for s in pool}
    if not pool and parts and "all" not in parts and "train" not in parts:
        raise DataError(
            f"no training images in {source}, only {'/'.join(sorted(parts))} rows; mark some rows train"
        )
    if not pool:
        raise DataError(f"no readable images found in {source}; put images in one folder per class")
    for i, name in enumerate(class_names):
        if i not in present:
            raise DataError(
                f"class {name!r} has no readable training images in {source}; "
                "add images for it or remove it"
            )
    if len(class_names) < 2:
        raise DataError(
            f"only one class ({class_names[0]!r}) in {source}; a classifier needs at "
            "least two: add a folder (or label) per class"
            + _deeper_hint(Path(source), class_names[0])
        )


def _train_val_test(
    parts: dict[str, list[Sample]],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    group_by: GroupBy | None = None,
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """Split an unsplit source; carve validation from train when a split source has none."""
    if "all" in parts:
        pool = parts["all"]
        groups = group_by(pool) if group_by is not None else None
        return split_samples(
            pool, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction, groups=groups
        )
    train, val, test = parts["train"], parts.get("val"), parts.get("test", [])
    if val is None:  # carve validation from train, keeping train:val at 60:20 by default
        share = val_fraction / (1 - test_fraction) if "test" in parts else val_fraction
        groups = group_by(train) if group_by is not None else None
        train, val, _ = split_samples(
            train, seed=seed, val_fraction=share, test_fraction=0, groups=groups
        )
    return train, val, test


def _deeper_hint(source: Path, only_class: str) -> str:
    """When the one class folder holds folders itself, the folder the user probably meant."""
    folder = source / only_class
    if folder.is_dir() and visible_dirs(folder):
        return f" (or pass {folder} if its folders are the classes)"
    return ""


def _per_class(samples: Sequence[Sample], n_classes: int) -> list[int]:
    return np.bincount([s.label for s in samples], minlength=n_classes).tolist()

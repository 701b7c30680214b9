"""Data sources, train/val/test splits and the torch Dataset that feeds training.

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
import dataclasses
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from pipeline.images import (
    BUILTIN_PREFIX,
    BUILTIN_SETS,
    MAX_PIXELS,
    augmented_tensor,
    build_augmentation,
    find_unreadable,
    is_image_name,
    open_image,
    preprocess_image,
    scan_class_folder,
    visible_dirs,
)
from zoo.catalog import Preprocess
from zoo.errors import DataError

log = logging.getLogger(__name__)

SPLIT_FOLDERS = {
    "train": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "test": "test",
}
SPLIT_JSON_VERSION = 1
CSV_COLUMNS = {  # header cell -> column meaning; anything else is ignored
    **dict.fromkeys(("path", "file", "filename", "filepath", "image"), "path"),
    **dict.fromkeys(("label", "class", "category", "target"), "label"),
    "split": "split",
}


class Sample(NamedTuple):
    """One labelled image: a file path, or "builtin:<set>#<index>"."""

    ref: str
    label: int


@dataclass
class DataSplit:
    """A data source split into train/val/test, with the files it skipped and why."""

    class_names: list[str]
    train: list[Sample]
    val: list[Sample]
    test: list[Sample]
    source_name: str  # short slug for run folder names, e.g. "digits"
    recommended_size: int | None = None  # built-in sets only: input size used unless given
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    source: str = ""  # what the user passed, absolute where it is a path

    def counts(self, split: str) -> list[int]:
        """Images per class in one of "train", "val", "test"."""
        per_class = [0] * len(self.class_names)
        for sample in getattr(self, split):
            per_class[sample.label] += 1
        return per_class

    def to_json(self) -> str:
        """The split as JSON, exact enough for `from_json` to rebuild it."""
        payload = {
            "version": SPLIT_JSON_VERSION,
            **{
                k: v
                for k, v in dataclasses.asdict(self).items()
                if k not in ("train", "val", "test")
            },
            **{name: [list(s) for s in getattr(self, name)] for name in ("train", "val", "test")},
        }
        return json.dumps(payload, ensure_ascii=False, indent=1)

    @classmethod
    def from_json(cls, text: str) -> DataSplit:
        """Rebuild a split written by `to_json`."""
        try:
            raw = json.loads(text)
            if raw.get("version") != SPLIT_JSON_VERSION:
                raise ValueError(f"version {raw.get('version')!r}")
            return cls(
                class_names=[str(c) for c in raw["class_names"]],
                **{
                    k: [Sample(str(r), int(y)) for r, y in raw[k]] for k in ("train", "val", "test")
                },
                source_name=str(raw["source_name"]),
                recommended_size=raw.get("recommended_size"),
                skipped=[(str(p), str(r)) for p, r in raw.get("skipped", [])],
                source=str(raw.get("source", "")),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise DataError(
                f"split file is malformed ({type(exc).__name__}: {exc}); start a new run with `zoo adapt`"
            ) from exc

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the split as JSON (UTF-8), atomically."""
        from zoo.files import atomic_write

        text = self.to_json()
        atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DataSplit:
        """Read a split written by `save`."""
        try:
            return cls.from_json(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise DataError(f"split file {path} does not exist; check the run folder") from exc


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


# ----------------------------------------------------------------------------- splitting


def stratified_split(
    labels: Sequence[int], *, seed: int, val_fraction: float, test_fraction: float
) -> tuple[list[int], list[int], list[int]]:
    """Indices of a per-class shuffled train/val/test split (exactly stratified, seeded).

    Tiny classes degrade gracefully: 1 image -> train only; 2 -> train + val; 3 or more -> at
    least one image in each part whose fraction is non-zero.
    """
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    for label in sorted(by_class):
        members = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        n = len(members)
        n_val = round(n * val_fraction)
        n_test = round(n * test_fraction)
        if n >= 2 and val_fraction > 0:
            n_val = max(1, n_val)
        if n >= 3 and test_fraction > 0:
            n_test = max(1, n_test)
        while n - n_val - n_test < 1:  # keep at least one training image
            if n_test > 0:
                n_test -= 1
            else:
                n_val -= 1
        parts[2].extend(members[:n_test])
        parts[1].extend(members[n_test : n_test + n_val])
        parts[0].extend(members[n_test + n_val :])
    return sorted(parts[0]), sorted(parts[1]), sorted(parts[2])


def _split_samples(
    samples: list[Sample], *, seed: int, val_fraction: float, test_fraction: float
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    idx = stratified_split(
        [s.label for s in samples],
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
    )
    return tuple([samples[i] for i in part] for part in idx)  # type: ignore[return-value]


def subsample_per_class(samples: Sequence[Sample], n: int, *, seed: int) -> list[Sample]:
    """At most `n` samples of each class, chosen at random with `seed`, in their original order."""
    if n < 1:
        raise DataError(f"--train-per-class must be at least 1, not {n}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for index, sample in enumerate(samples):
        by_class.setdefault(sample.label, []).append(index)
    keep: list[int] = []
    for label in sorted(by_class):
        members = by_class[label]
        keep.extend(
            members if len(members) <= n else rng.choice(members, n, replace=False).tolist()
        )
    return [samples[i] for i in sorted(keep)]


# ----------------------------------------------------------------------------- sources


@dataclass
class _Collected:
    """What a source lists before validation: labelled paths per part ("all" when unsplit)."""

    class_names: list[str]
    parts: dict[str, list[tuple[str, str]]]  # part -> (path, class name)
    name: str
    skipped: list[tuple[str, str]] = field(default_factory=list)


def load_source(
    src: str | os.PathLike[str],
    *,
    seed: int = 0,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    strict: bool = False,
    max_pixels: int = MAX_PIXELS,
) -> DataSplit:
    """Read a data source, check every image decodes, and split it (stratified, seeded)."""
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
    elif _split_folders(path):
        collected = _collect_presplit(path)
    else:
        collected = _collect_image_folder(path)
    return _finish(collected, source=str(path), strict=strict, max_pixels=max_pixels, **fractions)


def _load_builtin(src: str, *, seed: int, val_fraction: float, test_fraction: float) -> DataSplit:
    name = src[len(BUILTIN_PREFIX) :]
    if name not in BUILTIN_SETS:
        known = ", ".join(BUILTIN_PREFIX + n for n in BUILTIN_SETS)
        raise DataError(f"unknown built-in data set {src!r}; use one of {known}")
    entry = BUILTIN_SETS[name]
    class_names, labels = entry.labels()
    samples = [Sample(f"{src}#{i}", label) for i, label in enumerate(labels)]
    train, val, test = _split_samples(
        samples, seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
    )
    return DataSplit(class_names, train, val, test, name, entry.recommended_size, [], src)


def _split_folders(root: Path) -> dict[str, Path]:
    """Part -> folder when `root` is laid out as train/ val/ test/, else {}."""
    dirs = visible_dirs(root)
    parts = {SPLIT_FOLDERS.get(d.name.lower()): d for d in dirs}
    if "train" not in parts or None in parts:
        return {}  # a class folder named "train" among others is just a class
    if len(parts) != len(dirs):
        raise DataError(f"{root} has both val/ and valid/ (or similar); keep one of them")
    return parts  # type: ignore[return-value]


def _collect_image_folder(root: Path) -> _Collected:
    skipped: list[tuple[str, str]] = []
    by_class = _scan_image_folder(root, skipped)
    parts = {"all": [(p, name) for name, paths in by_class.items() for p in paths]}
    return _Collected(sorted(by_class), parts, _slug(root.absolute().name), skipped)


def _collect_presplit(root: Path) -> _Collected:
    folders = _split_folders(root)
    skipped: list[tuple[str, str]] = []
    class_names = sorted({d.name for folder in folders.values() for d in visible_dirs(folder)})
    parts: dict[str, list[tuple[str, str]]] = {}
    for part, folder in folders.items():
        by_class = _scan_image_folder(folder, skipped, class_names)
        parts[part] = [(p, name) for name, paths in by_class.items() for p in paths]
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
) -> DataSplit:
    """Validate the listed images, apply the class rules, and split what is not yet split."""
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
    pool = parts.get("all", parts.get("train", []))
    present = {s.label for s in pool}
    if not pool:
        raise DataError(f"no readable images found in {source}; put images in one folder per class")
    for name, i in index.items():
        if i not in present:
            raise DataError(
                f"class {name!r} has no readable training images in {source}; "
                "add images for it or remove it"
            )
    if len(collected.class_names) < 2:
        raise DataError(
            f"only one class ({collected.class_names[0]!r}) in {source}; a classifier needs at "
            "least two: add a folder (or label) per class"
        )
    if "all" in parts:
        train, val, test = _split_samples(
            parts["all"], seed=seed, val_fraction=val_fraction, test_fraction=test_fraction
        )
    else:
        train, val, test = parts["train"], parts.get("val"), parts.get("test", [])
        if val is None:  # carve validation from train, keeping train:val at 60:20 by default
            share = val_fraction / (1 - test_fraction) if "test" in parts else val_fraction
            train, val, _ = _split_samples(train, seed=seed, val_fraction=share, test_fraction=0)
    small = [
        n
        for n, c in zip(collected.class_names, _per_class(train, len(index)), strict=True)
        if c < 2
    ]
    if small:
        log.warning("class(es) with fewer than 2 training images: %s", ", ".join(small[:5]))
    return DataSplit(collected.class_names, train, val, test, collected.name, None, skipped, source)


def _per_class(samples: Sequence[Sample], n_classes: int) -> list[int]:
    return np.bincount([s.label for s in samples], minlength=n_classes).tolist()


# ----------------------------------------------------------------------------- torch dataset


class ImageDataset(torch.utils.data.Dataset):
    """Samples -> (float32 tensor in the model's layout, label); augmentation on request.

    With `seed`, augmentation replays exactly from run to run yet differs between epochs with no
    help from the caller: each sample's k-th draw is seeded by (seed, k, index), and inside
    DataLoader workers (fresh copies every epoch) by the loader's per-epoch base seed too.
    `set_epoch` pins the draws of an epoch explicitly. Without `seed` the global torch RNG is used.
    """

    def __init__(
        self,
        samples: Sequence[Sample],
        preprocess: Preprocess,
        *,
        augment: str = "none",
        seed: int | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.augment = augment
        self.transform = None if augment == "none" else build_augmentation(augment, preprocess)
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels
        self._draws: dict[int, int] = {}  # index -> augmentations drawn so far in this process

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draws of another epoch (only matters with `seed`)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        ref, label = self.samples[index]
        img = open_image(ref, channels=self.preprocess.channels, max_pixels=self.max_pixels)
        if self.transform is None:
            return torch.from_numpy(preprocess_image(img, self.preprocess)), label
        if self.seed is None:
            return augmented_tensor(img, self.preprocess, self.transform), label
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self._draw_seed(index))
            return augmented_tensor(img, self.preprocess, self.transform), label

    def _draw_seed(self, index: int) -> int:
        draw = self._draws.get(index, 0)
        self._draws[index] = draw + 1
        worker = torch.utils.data.get_worker_info()
        # Workers start from a copy each epoch, so their draw counts restart; the loader's base
        # seed (worker seed minus worker id) is what tells one epoch from the next there.
        epoch_seed = 0 if worker is None else worker.seed - worker.id
        # Tuples of ints hash the same in every process (no hash randomisation for ints).
        return hash((self.seed, self.epoch, epoch_seed, draw, index)) & 0x7FFF_FFFF_FFFF_FFFF

"""The photo sets of benchmark 8, made from class folders of real photos (flowers5).

- Phone photos: each source photo cut to 4:3, upscaled to 4032×3024 and re-encoded as a JPEG,
  the size of a 12 MP phone camera's picture.
- Crops: random 256×256 crops of the source photos, as many as asked, for the growth curve.

A set is built once per work folder: a `.complete` file written last names its recipe, so a
rerun with the same recipe reuses it and a half-built one is never taken. Smaller sets are
hard-linked subsets of a larger one (the first files of each class), so every size holds the
same kind of photos.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

PHONE_SIZE = (4032, 3024)  # a 12 MP phone photo, landscape
PHONE_QUALITY = 90
CROP_SIZE = 256
CROP_QUALITY = 90
MARKER = ".complete"  # hidden: zoo's folder scan ignores it


def class_sources(source: Path) -> dict[str, list[Path]]:
    """Image files of each class folder of `source`, sorted; classes without images left out."""
    from pipeline.data.images import is_image_name, visible_dirs

    classes = {
        folder.name: sorted(p for p in folder.iterdir() if p.is_file() and is_image_name(p.name))
        for folder in visible_dirs(source)
    }
    return {name: files for name, files in classes.items() if files}


def per_class(count: int, classes: int) -> list[int]:
    """`count` images shared out over `classes` as evenly as possible, the first classes first."""
    return [count // classes + (index < count % classes) for index in range(classes)]


def build_once(folder: Path, recipe: str, build: Callable[[Path], None]) -> Path:
    """`folder`, made by `build(staging)` unless a finished one with the same recipe is there."""
    marker = folder / MARKER
    if marker.is_file() and marker.read_text() == recipe:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    build(staging)
    (staging / MARKER).write_text(recipe)  # last: a set without it was interrupted
    staging.rename(folder)
    return folder


def count_images(folder: Path) -> int:
    """Image files in the class folders of `folder`."""
    return sum(len(files) for files in class_sources(folder).values())


def _save_phone_photo(source: Path, target: Path) -> None:
    from PIL import Image

    with Image.open(source) as opened:
        img = opened.convert("RGB")
    width, height = img.size
    aspect = PHONE_SIZE[0] / PHONE_SIZE[1]
    if width / height > aspect:  # too wide: keep the centre 4:3
        cut = round(height * aspect)
        img = img.crop(((width - cut) // 2, 0, (width - cut) // 2 + cut, height))
    else:
        cut = round(width / aspect)
        img = img.crop((0, (height - cut) // 2, width, (height - cut) // 2 + cut))
    img.resize(PHONE_SIZE, Image.Resampling.BILINEAR).save(target, "JPEG", quality=PHONE_QUALITY)


def phone_photos(source: Path, folder: Path, *, count: int) -> Path:
    """`count` phone-size JPEGs in class folders, made from the first photos of each class."""

    def build(staging: Path) -> None:
        jobs = []
        classes = class_sources(source)
        for (name, files), wanted in zip(
            classes.items(), per_class(count, len(classes)), strict=True
        ):
            (staging / name).mkdir()
            for index in range(wanted):
                jobs.append((files[index % len(files)], staging / name / f"{index:05d}.jpg"))
        # Pillow releases the GIL while resizing and encoding: threads use every core.
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda job: _save_phone_photo(*job), jobs))

    recipe = f"phone {PHONE_SIZE} q{PHONE_QUALITY} {count} from {source}"
    return build_once(folder, recipe, build)


def _save_crops(source: Path, targets: list[Path], *, seed: int) -> None:
    """Random square crops of one photo (a quarter to all of its shorter side), resized to 256."""
    from PIL import Image

    rng = random.Random(f"{seed}/{source.name}")  # the k-th crop of a photo never changes
    with Image.open(source) as opened:
        img = opened.convert("RGB")
    width, height = img.size
    for target in targets:
        side = round(min(width, height) * rng.uniform(0.5, 1.0))
        left, top = rng.randint(0, width - side), rng.randint(0, height - side)
        crop = img.crop((left, top, left + side, top + side))
        crop.resize((CROP_SIZE, CROP_SIZE), Image.Resampling.BILINEAR).save(
            target, "JPEG", quality=CROP_QUALITY
        )


def random_crops(source: Path, folder: Path, *, count: int, seed: int = 0) -> Path:
    """`count` 256×256 JPEG crops in class folders; every photo of a class is used in turn.

    The k-th crop of photo i is named k_i, so the first files of a class (in name order) spread
    over all its photos: that is what `subset` takes.
    """

    def build(staging: Path) -> None:
        jobs = []
        classes = class_sources(source)
        for (name, files), wanted in zip(
            classes.items(), per_class(count, len(classes)), strict=True
        ):
            (staging / name).mkdir()
            for number, photo in enumerate(files):
                rounds = range(number, wanted, len(files))  # this photo's crop indices
                targets = [staging / name / f"{k // len(files):04d}_{number:04d}.jpg" for k in rounds]  # fmt: skip
                if targets:
                    jobs.append((photo, targets))
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            list(pool.map(lambda job: _save_crops(job[0], job[1], seed=seed), jobs))

    recipe = f"crops {CROP_SIZE} q{CROP_QUALITY} seed {seed} {count} from {source}"
    return build_once(folder, recipe, build)


def subset(full: Path, folder: Path, *, count: int) -> Path:
    """The first `count` images of `full` (shared out over its classes), hard-linked into `folder`."""

    def build(staging: Path) -> None:
        classes = class_sources(full)
        for (name, files), wanted in zip(
            classes.items(), per_class(count, len(classes)), strict=True
        ):
            if wanted > len(files):
                raise ValueError(f"{full / name} has {len(files)} images, not {wanted}")
            (staging / name).mkdir()
            for path in files[:wanted]:
                os.link(path, staging / name / path.name)

    recipe = (
        f"first {count} of {full}: " + (full / MARKER).read_text()
    )  # a rebuilt `full`, a new subset
    return build_once(folder, recipe, build)

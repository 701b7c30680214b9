"""What the data check needs of every image file, read once and cached: its bytes' sha256, its
size, whether it has colour, and a small grey thumbnail.

The thumbnail (THUMB_PX square, aspect squashed) is what near-duplicate verification compares
pixel by pixel (pipeline.train.twins). Facts are kept in the workspace cache
(`.cache/facts/<key>.npy`), the key naming every image by path, size and modification time, so a
second `zoo check` or `zoo adapt` on the same files reads them back instead of decoding again.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.diskcache import cache_root, keep_within_budget, touch
from pipeline.core.progress import track
from pipeline.data.images import BUILTIN_PREFIX, UnreadableImage, open_image
from zoo.files import atomic_write, sha256_file

FACTS_VERSION = 1  # part of every key: a change in what is stored makes old entries unused
THUMB_PX = 48  # side of the grey thumbnail
# A pixel whose channels differ by more than this (of 255) has colour; JPEG noise on a grey
# photo saved as RGB stays below it.
COLOUR_STEP = 12
COLOUR_SHARE = 0.02  # an image with colour in at least this share of its pixels is in colour
FACT_DTYPE = np.dtype(
    [
        ("digest", "S32"),  # sha256 of the file's bytes (of the pixels for a built-in image)
        ("width", "<i4"),  # as stored, before EXIF rotation; 0 when unreadable
        ("height", "<i4"),
        ("grey", "u1"),  # 1: no colour (grey or black-and-white), 0: colour
        ("thumb", "u1", (THUMB_PX, THUMB_PX)),  # grey thumbnail
    ]
)


@dataclass(frozen=True)
class FileFacts:
    """One row of FACT_DTYPE per image, in the order the images were asked for."""

    refs: list[str]
    table: np.ndarray  # FACT_DTYPE records

    def digest(self, index: int) -> str:
        return bytes(self.table["digest"][index]).hex()

    @property
    def thumbs(self) -> np.ndarray:
        """[N, THUMB_PX, THUMB_PX] uint8."""
        return self.table["thumb"]

    @property
    def grey(self) -> np.ndarray:
        return self.table["grey"].astype(bool)

    @property
    def short_side(self) -> np.ndarray:
        return np.minimum(self.table["width"], self.table["height"])

    def subset(self, indices: Sequence[int]) -> FileFacts:
        return FileFacts([self.refs[i] for i in indices], self.table[np.asarray(indices, int)])


def facts_dir(models_dir: str | os.PathLike[str]) -> Path:
    """Where a workspace keeps file facts."""
    return cache_root(models_dir) / "facts"


def facts_key(refs: Sequence[str]) -> str:
    """The cache key of the facts of `refs`: each image by path, size and modification time."""
    stamps = []
    for ref in refs:
        try:
            stat = os.stat(ref)
            stamps.append([ref, stat.st_size, stat.st_mtime_ns])
        except (OSError, ValueError):
            stamps.append([ref, 0, 0])
    payload = json.dumps({"v": FACTS_VERSION, "thumb": THUMB_PX, "refs": stamps})
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def file_facts(refs: Sequence[str], *, cache_dir: Path | None) -> FileFacts:
    """The facts of every image in `refs`, from the cache when it has them (None: no cache)."""
    refs = list(refs)
    path = Path(cache_dir) / f"{facts_key(refs)}.npy" if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            table = np.load(path, allow_pickle=False)
            if table.dtype == FACT_DTYPE and len(table) == len(refs):
                touch(path)
                return FileFacts(refs, table)
        except (OSError, ValueError, EOFError):
            pass
        path.unlink(missing_ok=True)  # damaged: computed again, never trusted
    table = _read_all(refs)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as handle:
                np.save(handle, table, allow_pickle=False)

        atomic_write(path, write)
        keep_within_budget(path.parent)
    return FileFacts(refs, table)


def _read_all(refs: Sequence[str]) -> np.ndarray:
    table = np.zeros(len(refs), dtype=FACT_DTYPE)
    # Pillow releases the GIL while decoding and hashlib while hashing: threads help.
    with (
        ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool,
        track("reading image files", len(refs)) as bar,
    ):
        for index, row in enumerate(pool.map(read_facts, refs)):
            table[index] = row
            bar.advance()
    return table


def read_facts(ref: str) -> tuple[bytes, int, int, int, np.ndarray]:
    """One FACT_DTYPE row for the image `ref`; an unreadable one gets size 0 and a blank thumb."""
    blank = np.zeros((THUMB_PX, THUMB_PX), np.uint8)
    try:
        if ref.startswith(BUILTIN_PREFIX):
            img = open_image(ref)
            digest = hashlib.sha256(img.tobytes()).digest()
            width, height = img.size
        else:
            digest = bytes.fromhex(sha256_file(ref))
            with Image.open(ref) as header:
                width, height = header.size
            img = open_image(ref, draft=2 * THUMB_PX)
    except (UnreadableImage, OSError, ValueError, SyntaxError, EOFError):
        return (b"", 0, 0, 0, blank)
    grey, thumb = looks(img)
    return (digest, width, height, int(grey), thumb)


def looks(img: Image.Image) -> tuple[bool, np.ndarray]:
    """(whether `img` has no colour, its THUMB_PX grey thumbnail)."""
    small = img.convert("RGB").resize((THUMB_PX, THUMB_PX), Image.Resampling.BILINEAR)
    pixels = np.asarray(small, dtype=np.int16)
    spread = pixels.max(axis=2) - pixels.min(axis=2)
    grey = float(np.mean(spread > COLOUR_STEP)) < COLOUR_SHARE
    return grey, np.asarray(small.convert("L"), dtype=np.uint8)

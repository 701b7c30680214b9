"""Images from anywhere: every awkward file decodes correctly or is one UnreadableImage, a
decompression bomb is refused from its header, and odd folders and names are handled."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from image_builders import (
    write_cmyk_jpeg,
    write_gray16_png,
    write_la_png,
    write_palette_transparent_png,
    write_png_bomb,
    write_random_bytes,
    write_rgb,
    write_rgba_png,
    write_truncated_jpeg,
    write_zero_bytes,
)
from PIL import Image, ImageFile

from pipeline.data.images import UnreadableImage, find_unreadable, open_image
from pipeline.data.sources import load_source

BAD: dict[str, tuple[Callable[[Path], Path], str]] = {
    "zero-bytes": (lambda p: write_zero_bytes(p / "a.png"), "empty file"),
    "truncated-jpeg": (lambda p: write_truncated_jpeg(p / "a.jpg"), "cannot decode|truncated"),
    "random-bytes-png": (lambda p: write_random_bytes(p / "a.png"), "not an image"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_broken_files_are_one_unreadable_image_error(kind: str, tmp_path: Path) -> None:
    write, says = BAD[kind]
    path = write(tmp_path)
    with pytest.raises(UnreadableImage, match=says) as caught:
        open_image(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
    assert find_unreadable([str(path)]).keys() == {str(path)}


# kind -> (writer, channels, pixel (row, col), expected value at that pixel)
GOOD: dict[str, tuple[Callable[[Path], Path], int, tuple[int, int], tuple[int, ...]]] = {
    "1x1": (lambda p: write_rgb(p / "a.png", size=(1, 1), seed=3), 3, (0, 0), ()),
    "cmyk": (lambda p: write_cmyk_jpeg(p / "a.jpg", (255, 0, 0)), 3, (8, 8), (255, 0, 0)),
    "rgba": (lambda p: write_rgba_png(p / "a.png"), 3, (0, 7), (255, 255, 255)),
    "p-transparent": (
        lambda p: write_palette_transparent_png(p / "a.png"),
        3,
        (0, 7),
        (255, 255, 255),
    ),  # fmt: skip
    "la": (lambda p: write_la_png(p / "a.png", gray=60), 1, (0, 0), (60,)),
    "gray16-mid": (lambda p: write_gray16_png(p / "a.png", 32896), 1, (0, 0), (128,)),
}


@pytest.mark.parametrize("kind", list(GOOD))
def test_awkward_but_valid_images_decode_to_the_right_pixels(kind: str, tmp_path: Path) -> None:
    write, channels, (row, col), expected = GOOD[kind]
    img = open_image(write(tmp_path), channels=channels)
    assert img.mode == ("L" if channels == 1 else "RGB")
    pixel = np.atleast_1d(np.asarray(img)[row, col]).astype(int)
    if expected:
        # JPEG (CMYK) is lossy: a few levels off; PNG is exact. 16-bit is not saturated to 255.
        assert np.abs(pixel - np.array(expected)).max() <= 25, (kind, pixel)
    assert find_unreadable([str(tmp_path / os.listdir(tmp_path)[0])]) == {}


def test_decompression_bomb_is_refused_from_the_header(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bomb = write_png_bomb(tmp_path / "bomb.png", side=30_000)
    assert bomb.stat().st_size < 1_000_000  # 900 megapixels in under a megabyte
    decoded: list[str] = []
    real_load = ImageFile.ImageFile.load

    def watched_load(self: ImageFile.ImageFile) -> object:
        decoded.append(self.filename)
        return real_load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", watched_load)
    started = time.perf_counter()
    with pytest.raises(UnreadableImage, match="bomb"):
        open_image(bomb)
    with pytest.raises(UnreadableImage, match="exceeds the limit"):
        open_image(write_png_bomb(tmp_path / "small.png", side=2_000), max_pixels=1_000_000)
    assert time.perf_counter() - started < 2
    assert decoded == []  # no pixel buffer was ever allocated
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's own guard stays on


def test_odd_folders_names_extensions_and_links(tmp_path: Path) -> None:
    root = tmp_path / "data"
    names = ["with space", "café", "猫と犬"]
    for index, name in enumerate(names):
        for number, ext in enumerate([".JPG", ".PNG", ".JPEG", ".Tif", ".WEBP"]):
            write_rgb(root / name / f"img{number}{ext}", seed=10 * index + number, fmt=None)
    outside = write_rgb(tmp_path / "elsewhere" / "real.png", seed=99)
    os.symlink(outside, root / "café" / "linked.png")
    (root / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (root / "café" / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    write_rgb(root / ".git" / "objects" / "x.png", seed=98)  # a hidden folder is never a class
    write_rgb(root / "猫と犬" / ".git" / "y.png", seed=97)  # nor searched inside a class
    split = load_source(str(root))
    assert split.class_names == sorted(names)
    used = {s.ref for part in (split.train, split.val, split.test) for s in part}
    assert len(used) == 16 and split.skipped == []
    assert str(root / "café" / "linked.png") in used
    assert not any(".git" in ref or "DS_Store" in ref for ref in used)
    for ref in used:
        assert open_image(ref).size == (24, 16)

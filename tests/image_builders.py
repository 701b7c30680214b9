"""Builders that write test images of every awkward kind, plus small data-set layouts."""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from PIL import Image


def write_rgb(
    path: Path, *, size: tuple[int, int] = (24, 16), seed: int = 0, fmt: str | None = None
) -> Path:
    """A random-noise RGB image (distinct per seed), format from the extension unless `fmt`."""
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path, format=fmt)
    return path


def write_solid(
    path: Path, color: tuple[int, int, int], *, size: tuple[int, int] = (16, 16)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write_truncated_jpeg(path: Path) -> Path:
    """A JPEG cut in half: the header opens, the pixels do not decode."""
    buffer = io.BytesIO()
    rng = np.random.default_rng(1)
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buffer, "JPEG")
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path


def write_zero_bytes(path: Path) -> Path:
    path.write_bytes(b"")
    return path


def write_random_bytes(path: Path, *, n: int = 2048) -> Path:
    path.write_bytes(np.random.default_rng(2).integers(0, 256, n, dtype=np.uint8).tobytes())
    return path


def write_cmyk_jpeg(path: Path, rgb: tuple[int, int, int] = (255, 0, 0)) -> Path:
    """A CMYK JPEG (Pillow writes the Adobe marker with inverted CMYK, like Photoshop)."""
    Image.new("RGB", (16, 16), rgb).convert("CMYK").save(path, "JPEG", quality=95)
    return path


def write_rgba_png(path: Path) -> Path:
    """Left half opaque red, right half fully transparent."""
    pixels = np.zeros((8, 8, 4), dtype=np.uint8)
    pixels[:, :4] = (255, 0, 0, 255)
    Image.fromarray(pixels, "RGBA").save(path)
    return path


def write_palette_transparent_png(path: Path) -> Path:
    """A P-mode PNG whose palette index 0 is transparent (left half) and 1 is blue."""
    img = Image.new("P", (8, 8), 0)
    img.putpalette([0, 0, 0, 0, 0, 255] + [0] * (254 * 3))
    img.paste(1, (0, 0, 4, 8))
    img.save(path, transparency=0)
    return path


def write_la_png(path: Path, gray: int = 60) -> Path:
    """An LA PNG: top half opaque `gray`, bottom half transparent."""
    pixels = np.zeros((8, 8, 2), dtype=np.uint8)
    pixels[:4] = (gray, 255)
    Image.fromarray(pixels, "LA").save(path)
    return path


def write_gray16_png(path: Path, value: int = 32896) -> Path:
    """A 16-bit grayscale PNG filled with `value` (32896 = 128 * 257, mid-gray)."""
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(path)
    return path


def write_exif_rotated_jpeg(path: Path) -> Path:
    """A 20 wide x 10 high JPEG whose EXIF says "rotate 90 degrees" (orientation 6)."""
    img = Image.new("RGB", (20, 10), (0, 128, 0))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(path, "JPEG", exif=exif)
    return path


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    body = kind + payload
    return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)


def write_png_bomb(path: Path, *, side: int = 30_000) -> Path:
    """A valid 1-bit PNG of side x side black pixels that compresses to a few hundred KB."""
    row = b"\x00" * (1 + (side + 7) // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    rows_per_chunk = 512
    chunks = []
    for start in range(0, side, rows_per_chunk):
        chunks.append(compressor.compress(row * min(rows_per_chunk, side - start)))
    chunks.append(compressor.flush())
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit grayscale
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(chunks))
        + _png_chunk(b"IEND", b"")
    )
    return path


def make_image_folder(
    root: Path, counts: Mapping[str, int], *, size: tuple[int, int] = (24, 16)
) -> Path:
    """root/<class>/<i>.png with counts[class] distinct images each."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_rgb(root / name / f"{i:03d}.png", size=size, seed=1000 * c + i)
    return root


def build_awkward_folder(root: Path) -> dict[str, list[str]]:
    """An ImageFolder holding every awkward kind of file; returns the names expected bad/good.

    Classes: "café au lait", "猫" and "plain". Bad files must be skipped, good ones used, and the
    ignored ones (hidden, non-image, .git) never listed at all.
    """
    cafe, cat, plain = root / "café au lait", root / "猫", root / "plain"
    for folder in (cafe, cat, plain):
        folder.mkdir(parents=True)
    good = [
        write_rgb(cafe / "normal.png", seed=1),
        write_rgb(cafe / "UPPER.JPG", seed=2, fmt="JPEG"),
        write_cmyk_jpeg(cafe / "cmyk.jpg"),
        write_rgba_png(cafe / "rgba.png"),
        write_palette_transparent_png(cat / "palette.png"),
        write_la_png(cat / "la.png"),
        write_gray16_png(cat / "gray16.png"),
        write_rgb(cat / "one.png", size=(1, 1), seed=3),
        write_exif_rotated_jpeg(plain / "rotated.jpg"),
        write_rgb(plain / "a.bmp", seed=4),
        write_rgb(plain / "b.webp", seed=5),
    ]
    target = write_rgb(root.parent / f"{root.name}-outside" / "target.png", seed=6)
    link = plain / "linked.png"
    os.symlink(target, link)
    good.append(link)
    bad = [
        write_truncated_jpeg(cafe / "truncated.jpg"),
        write_zero_bytes(cat / "empty.png"),
        write_random_bytes(plain / "noise.png"),
    ]
    ignored = [cafe / ".DS_Store", plain / "notes.txt", plain / ".hidden.png"]
    ignored[0].write_bytes(b"\x00\x00\x00\x01Bud1")
    ignored[1].write_text("not an image")
    write_rgb(ignored[2], seed=7)
    git = root / ".git"
    git.mkdir()
    write_rgb(git / "object.png", seed=8)
    (git / "HEAD").write_text("ref: refs/heads/main\n")
    return {
        "good": [str(p) for p in good],
        "bad": [str(p) for p in bad],
        "ignored": [str(p) for p in [*ignored, git / "object.png"]],
    }

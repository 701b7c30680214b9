"""Image files in, model inputs out: finding and decoding images, built-in image sets,
eval preprocessing and training augmentation.

Decoding rules (the same for training, validation at load time, and `zoo predict`):
- EXIF orientation is applied, so a phone photo is seen upright.
- Transparency (RGBA, LA, PA, P with a transparent colour) is composited on WHITE: most
  transparent images are icons, product shots and scans drawn on a light page.
- 16-bit images (I;16, I;16B, I) are brought to 8 bits by dividing by 257, which keeps
  16-bit mid-gray at 8-bit mid-gray; Pillow's own convert("L") saturates them to white.
- CMYK JPEGs (Adobe inverted ones included, which Pillow's decoder un-inverts) become RGB.
- A model that takes one channel gets ITU-R 601 luma (Pillow's "L"), MNIST-style.
- Images over `max_pixels` are refused from the header alone, before any pixel is decoded.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
from PIL import Image, ImageOps

from pipeline.core.progress import track
from pipeline.core.registry import Registry
from zoo.catalog import Preprocess
from zoo.errors import DataError

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"})
MAX_PIXELS = 89_478_485  # Pillow's own warning threshold (~ 9459 x 9459)
BACKGROUND = 255  # transparent pixels become white (see the module docstring)
BUILTIN_PREFIX = "builtin:"
VALIDATION_DRAFT = 64  # JPEGs are validated at >= 64 px per side: fast, and still a full decode


class UnreadableImage(DataError):
    """One image file that cannot be decoded (empty, truncated, not an image, too large)."""


def is_image_name(name: str) -> bool:
    """True for a file name with an accepted image extension (any case), hidden files excluded."""
    base = os.path.basename(name)
    return not base.startswith(".") and os.path.splitext(base)[1].lower() in IMAGE_EXTENSIONS


class BuiltinSet(NamedTuple):
    """A data set shipped with a dependency, addressed as "builtin:<name>", images as "#<index>"."""

    name: str
    recommended_size: int  # input size used unless the user gives one
    labels: Callable[[], tuple[list[str], list[int]]]  # -> class names, label per image
    render: Callable[[int], Image.Image]  # image index -> PIL image (L or RGB)
    mirror_safe: bool = True  # False where a mirrored image is another class or none (digits)


BUILTIN_SETS: Registry[BuiltinSet] = Registry(
    "built-in data set", error=DataError, shown=lambda name: BUILTIN_PREFIX + name
)


def register_builtin(entry: BuiltinSet) -> BuiltinSet:
    """Add a built-in set; refuses a name already taken."""
    return BUILTIN_SETS.add(entry.name, entry)


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    # 0..16 ink -> 0..255, white ink on black like MNIST.
    pixels = np.rint(bunch.images * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return pixels, bunch.target.astype(np.int64)


def _digits_render(index: int) -> Image.Image:
    if index < 0:
        raise IndexError(index)
    return Image.fromarray(_digits()[0][index], mode="L")


register_builtin(
    BuiltinSet(
        "digits",
        64,
        lambda: ([str(d) for d in range(10)], _digits()[1].tolist()),
        _digits_render,
        mirror_safe=False,  # a mirrored 2 or 7 is no digit at all
    )
)


def _render_builtin(ref: str) -> Image.Image:
    name, _, index = ref[len(BUILTIN_PREFIX) :].partition("#")
    try:
        return BUILTIN_SETS[name].render(int(index))
    except (KeyError, ValueError, IndexError) as exc:
        raise UnreadableImage(
            f"{ref!r} is not a built-in image; use builtin:digits#<0..1796>"
        ) from exc


def open_image(
    path: str | os.PathLike[str],
    *,
    channels: int = 3,
    max_pixels: int = MAX_PIXELS,
    draft: int | None = None,
) -> Image.Image:
    """Decode an image file (or a "builtin:" ref) to 8-bit RGB, or L when `channels` is 1.

    `draft` lets JPEG decode at a reduced scale of at least that many pixels per side; load-time
    validation uses it so that checking thousands of photos stays fast.
    """
    ref = os.fspath(path)
    if ref.startswith(BUILTIN_PREFIX):
        return _to_channels(_render_builtin(ref), channels)
    try:
        if os.path.getsize(ref) == 0:
            raise UnreadableImage(f"{ref}: empty file (0 bytes)")
        # Pillow's own check in Image.open warns above MAX_IMAGE_PIXELS and raises above twice
        # that; ours below refuses from the header alone, before any pixel is decoded. (No
        # warnings.catch_warnings here: it is not thread-safe and validation runs in threads.)
        with Image.open(ref) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise UnreadableImage(_too_large(ref, width, height, max_pixels))
            if draft and img.format == "JPEG":
                img.draft(img.mode, (draft, draft))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_channels(_to_8bit(img), channels)
    except Image.DecompressionBombError as exc:
        raise UnreadableImage(f"{ref}: refused as a decompression bomb ({exc})") from exc
    except UnreadableImage:
        raise
    except FileNotFoundError as exc:
        raise UnreadableImage(f"{ref}: file not found") from exc
    except Image.UnidentifiedImageError as exc:
        raise UnreadableImage(f"{ref}: not an image Pillow can read") from exc
    except (
        OSError,
        ValueError,
        SyntaxError,
        EOFError,
        MemoryError,
    ) as exc:
        # SyntaxError and EOFError are what some Pillow plugins raise for malformed headers.
        reason = str(exc) or type(exc).__name__
        raise UnreadableImage(f"{ref}: cannot decode ({reason})") from exc


def decode_size(preprocess: Preprocess) -> int:
    """Pixels per side the preprocessing resizes to first: decoding needs no more than that."""
    return max(preprocess.resize, preprocess.crop)


def open_for(
    path: str | os.PathLike[str], preprocess: Preprocess, *, max_pixels: int = MAX_PIXELS
) -> Image.Image:
    """Decode an image for `preprocess`: JPEGs at the smallest DCT scale still >= its resize.

    A 12 MP phone photo then decodes at 1/8 or 1/4 scale, several times faster than in full, and
    the resize that follows sees nearly the same pixels (tests/test_images.py measures how near).
    """
    return open_image(
        path, channels=preprocess.channels, max_pixels=max_pixels, draft=decode_size(preprocess)
    )


def _too_large(ref: str, width: int, height: int, limit: int) -> str:
    return (
        f"{ref}: {width}x{height} = {width * height:,} pixels exceeds the limit of {limit:,} "
        "(possible decompression bomb); shrink the image or raise the pixel limit"
    )


def _to_8bit(img: Image.Image) -> Image.Image:
    """Any Pillow mode -> "L", "RGB" or "RGBA" (alpha kept for compositing)."""
    mode = img.mode
    if mode in ("L", "RGB") and "transparency" in img.info:
        return img.convert("RGBA")  # a tRNS colour key in a gray or RGB PNG
    if mode in ("L", "RGB", "RGBA"):
        return img
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        return Image.fromarray(_wide_to_uint8(np.asarray(img)), mode="L")
    if mode == "P":
        # A palette transparency must go through RGBA, or Pillow drops it (and warns).
        return img.convert("RGBA" if "transparency" in img.info else "RGB")
    if mode in ("LA", "La", "PA", "RGBa"):
        return img.convert("RGBA")
    if mode == "1":
        return img.convert("L")
    return img.convert("RGB")  # CMYK, YCbCr, RGBX, HSV, LAB ...


def _wide_to_uint8(values: np.ndarray) -> np.ndarray:
    """16/32-bit integer or float pixels -> uint8 without saturating."""
    is_float = values.dtype.kind == "f"
    values = values.astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if is_float and low >= 0 and high <= 1.0:
        scaled = values * 255.0  # float images in [0, 1]
    elif is_float and low >= 0 and high <= 255.0:
        scaled = values  # float images in [0, 255]
    elif not is_float and low >= 0 and high <= 65535:
        scaled = values / 257.0  # 16-bit: 65535 / 257 == 255 exactly, mid-gray stays mid-gray
    else:
        # Out-of-range data: use its real range rather than clipping it.
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return np.clip(np.rint(scaled), 0, 255).astype(np.uint8)


def _to_channels(img: Image.Image, channels: int) -> Image.Image:
    img = _to_8bit(img)
    if img.mode == "RGBA":
        background = Image.new("RGBA", img.size, (BACKGROUND, BACKGROUND, BACKGROUND, 255))
        img = Image.alpha_composite(background, img).convert("RGB")
    if channels == 1:
        return img if img.mode == "L" else img.convert("L")
    if channels == 3:
        return img if img.mode == "RGB" else img.convert("RGB")
    raise DataError(f"models with {channels} input channels are not supported; use 1 or 3")


# ----------------------------------------------------------------------------- files


def visible_dirs(folder: Path) -> list[Path]:
    """Sub-folders of `folder` that are not hidden, sorted."""
    return sorted(p for p in folder.iterdir() if not p.name.startswith(".") and p.is_dir())


def scan_class_folder(folder: Path, skipped: list[tuple[str, str]]) -> list[str]:
    """Image files under a class folder, recursively, sorted; hidden entries ignored."""
    found: list[str] = []
    seen_dirs: set[str] = set()
    for current, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(current)
        if real in seen_dirs:  # a symlink cycle: visit each real folder once
            dirs[:] = []
            continue
        seen_dirs.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not is_image_name(name):
                continue
            path = os.path.join(current, name)
            try:
                mode = os.stat(path).st_mode  # follows symlinks
            except OSError:
                skipped.append((path, "broken symlink"))
                continue
            if not stat.S_ISREG(mode):  # FIFOs or devices would block or never end
                skipped.append((path, "not a regular file"))
                continue
            found.append(path)
    return found


def _whole_by_header(path: str, max_pixels: int) -> bool:
    """True when the file's structure says it is whole, without decoding a pixel.

    A JPEG whose header parses and whose last two bytes are the end-of-image marker (a cut file
    has none), a PNG whose chunks all pass their CRC (`verify`). False means "decode it to be
    sure": other formats, JPEGs with data after the marker, anything odd or too large.
    """
    if path.startswith(BUILTIN_PREFIX):
        return False
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                return False  # open_image refuses it with the reason
            if img.format == "JPEG":
                with open(path, "rb") as handle:
                    handle.seek(-2, os.SEEK_END)
                    return handle.read(2) == b"\xff\xd9"
            if img.format == "PNG":
                img.verify()
                return True
    except Exception:  # noqa: BLE001 - any doubt: the decode below gives the reason
        return False
    return False


def find_unreadable(paths: Iterable[str], *, max_pixels: int = MAX_PIXELS) -> dict[str, str]:
    """Path -> reason for every image that does not decode.

    JPEGs and PNGs whose structure is whole are checked from their headers and markers alone,
    so the decode that computes is the only one; the rest are decoded (JPEGs at reduced scale).
    A JPEG damaged inside but whole in structure is found when it is decoded for training.
    """

    def check(path: str) -> tuple[str, str | None]:
        try:
            if not _whole_by_header(path, max_pixels):
                open_image(path, max_pixels=max_pixels, draft=VALIDATION_DRAFT).close()
            return path, None
        except UnreadableImage as exc:
            return path, str(exc).removeprefix(f"{path}: ")

    unique = list(dict.fromkeys(paths))
    bad = {}
    # Pillow releases the GIL while decoding, so threads do help here.
    with (
        ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 1) + 1)) as pool,
        track("checking images", len(unique)) as bar,
    ):
        for path, reason in pool.map(check, unique):
            bar.advance()
            if reason is not None:
                bad[path] = reason
    return bad


# ----------------------------------------------------------------------------- preprocessing


def resize_for(img: Image.Image, preprocess: Preprocess) -> Image.Image:
    """The deterministic resize step: shorter side -> resize (aspect kept), or resize x resize."""
    size = max(preprocess.resize, preprocess.crop)
    width, height = img.size
    if preprocess.resize_mode == "direct":
        target = (size, size)
    elif preprocess.resize_mode == "shorter":
        # Same rounding as torchvision's Resize(int): the longer side is truncated.
        if width <= height:
            target = (size, max(size, int(size * height / width)))
        else:
            target = (max(size, int(size * width / height)), size)
    else:
        raise DataError(
            f"unknown resize_mode {preprocess.resize_mode!r}; use 'shorter' or 'direct'"
        )
    return img if img.size == target else img.resize(target, Image.Resampling.BILINEAR)


def center_crop(img: Image.Image, crop: int) -> Image.Image:
    """The centre crop x crop square, placed as torchvision's CenterCrop places it."""
    width, height = img.size
    left = int(round((width - crop) / 2.0))
    top = int(round((height - crop) / 2.0))
    return img.crop((left, top, left + crop, top + crop))


def normalize(img: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """uint8 image -> float32 (C,H,W) or (H,W,C): x = (pixel*scale - mean)/std in model order."""
    pixels = np.asarray(img, dtype=np.float32)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    if preprocess.bgr and pixels.shape[2] == 3:
        pixels = pixels[:, :, ::-1]
    channels = pixels.shape[2]
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    if mean.size not in (1, channels) or std.size not in (1, channels):
        raise DataError(
            f"preprocessing has {mean.size} mean / {std.size} std values for a {channels}-channel "
            "input; fix the model's preprocess entry in the catalog"
        )
    values = (pixels * np.float32(preprocess.scale) - mean) / std
    if preprocess.layout == "NCHW":
        values = values.transpose(2, 0, 1)
    elif preprocess.layout != "NHWC":
        raise DataError(f"unknown layout {preprocess.layout!r}; use NCHW or NHWC")
    return np.ascontiguousarray(values, dtype=np.float32)


def preprocess_image(img: Image.Image, preprocess: Preprocess) -> np.ndarray:
    """Deterministic eval preprocessing of a decoded image: resize, centre crop, normalise."""
    img = _to_channels(img, preprocess.channels)
    return normalize(center_crop(resize_for(img, preprocess), preprocess.crop), preprocess)


@dataclass(frozen=True)
class Augmentation:
    """PIL -> PIL training transform: the model's own resize, then random steps to crop x crop.

    A plain object (no lambdas) so DataLoader workers can pickle it under any start method.
    """

    preprocess: Preprocess
    random_steps: Callable[[Image.Image], Image.Image] | None  # None: centre crop (eval)

    def __call__(self, img: Image.Image) -> Image.Image:
        # Augment after the model's own resize, so crops cover the same field of view as eval.
        img = resize_for(img, self.preprocess)
        if self.random_steps is None:
            return center_crop(img, self.preprocess.crop)
        return self.random_steps(img)


# Augmentation levels form a registry: name -> builder(crop size, flip) -> random steps (or None).
AugmentationBuilder = Callable[[int, bool], Callable[[Image.Image], Image.Image] | None]
AUGMENTATIONS: Registry[AugmentationBuilder] = Registry("augmentation", error=DataError)


def register_augmentation(name: str) -> Callable[[AugmentationBuilder], AugmentationBuilder]:
    """Decorator adding an augmentation level; refuses a name already taken."""
    return AUGMENTATIONS.decorator(name)


def build_augmentation(level: str, preprocess: Preprocess, *, flip: bool = True) -> Augmentation:
    """The PIL -> PIL transform for an augmentation level; the result is crop x crop.

    `flip=False` leaves out horizontal mirroring, for data whose classes a mirror changes.
    """
    return Augmentation(preprocess, AUGMENTATIONS.lookup(level)(preprocess.crop, flip))


@register_augmentation("none")
def _no_augmentation(crop: int, flip: bool) -> None:
    return None


@register_augmentation("light")
def _light_augmentation(crop: int, flip: bool) -> Callable[[Image.Image], Image.Image]:
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.RandomResizedCrop(crop, scale=(0.7, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5 if flip else 0.0),
        ]
    )


@register_augmentation("strong")
def _strong_augmentation(crop: int, flip: bool) -> Callable[[Image.Image], Image.Image]:
    from torchvision.transforms import v2

    # RandomAffine only fills with a constant; padding with edge pixels first and cropping the
    # centre back gives the "nearest" border fill of the usual practice. 0.75 x crop per side
    # covers 30 degrees + 10 degrees shear + 0.8 zoom-out + 0.2 shift.
    pad = (crop * 3 + 3) // 4
    shift = 0.2 * crop / (crop + 2 * pad)  # 0.2 of the image, as a fraction of the padded one
    return v2.Compose(
        [
            v2.RandomResizedCrop(crop, scale=(0.7, 1.0), antialias=True),
            v2.RandomHorizontalFlip(0.5 if flip else 0.0),
            v2.Pad(pad, padding_mode="edge"),
            v2.RandomAffine(
                degrees=30,
                translate=(shift, shift),
                scale=(0.8, 1.2),
                shear=10,
                interpolation=v2.InterpolationMode.BILINEAR,
            ),
            v2.CenterCrop(crop),
            v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.02),
        ]
    )


def augmented_tensor(
    img: Image.Image, preprocess: Preprocess, transform: Callable[[Image.Image], Image.Image]
) -> torch.Tensor:
    """Apply a PIL transform, then normalise exactly as eval does; a float32 tensor."""
    import torch

    img = transform(_to_channels(img, preprocess.channels))
    return torch.from_numpy(normalize(img, preprocess))

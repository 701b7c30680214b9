"""Decoding at the size the model needs: JPEG draft (DCT scaling) against a full decode."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data.images import decode_size, open_for, open_image, preprocess_image
from zoo.preprocess import PRESETS

pytestmark = pytest.mark.slow  # full decodes of 2400 x 1800 JPEGs

IMAGENET = PRESETS["imagenet"]  # shorter side 256, centre crop 224
# Measured on 20 flowers5 photos upscaled to 4032x3024 and re-encoded at quality 92: the
# normalised tensors of a draft and a full decode differ by 0.007 on average (0.4 of a pixel
# level out of 255) and by at most 0.19 at any single value; draft was 8.6x faster.
MEAN_TOLERANCE = 0.02
MAX_TOLERANCE = 0.5


def photo_like(size: tuple[int, int], *, seed: int = 0) -> Image.Image:
    """Smooth gradients, shapes with edges and mild grain: what phone photos have, not noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    base = np.stack([200 * x + 30 * y, 120 + 80 * y * x, 220 - 150 * y + 0 * x], axis=2)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(12):
        x0, y0 = rng.integers(0, width - 200), rng.integers(0, height - 200)
        w, h = rng.integers(100, width // 3), rng.integers(100, height // 3)
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour, outline=(0, 0, 0), width=6)
    grain = rng.normal(0, 6, (height, width, 3))
    img = img.filter(ImageFilter.GaussianBlur(2))
    return Image.fromarray(np.clip(np.asarray(img) + grain, 0, 255).astype(np.uint8), "RGB")


@pytest.fixture(scope="module")
def big_jpeg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("decode") / "photo.jpg"
    photo_like((2400, 1800)).save(path, quality=92)
    return path


def test_draft_decodes_at_reduced_scale_but_not_below_the_resize(big_jpeg: Path) -> None:
    img = open_for(big_jpeg, IMAGENET)
    assert min(img.size) >= decode_size(IMAGENET) == 256
    assert img.size[0] <= 2400 // 4  # 1/4 or 1/8 of the full size, not the full decode
    assert open_image(big_jpeg).size == (2400, 1800)


def test_draft_and_full_decode_give_the_same_tensor(big_jpeg: Path) -> None:
    full = preprocess_image(open_image(big_jpeg), IMAGENET)
    draft = preprocess_image(open_for(big_jpeg, IMAGENET), IMAGENET)
    assert full.shape == draft.shape == (3, 224, 224)
    difference = np.abs(full - draft)
    assert difference.mean() < MEAN_TOLERANCE, difference.mean()
    assert difference.max() < MAX_TOLERANCE, difference.max()
    # ...while another photo differs by far more: the comparison can fail.
    other = preprocess_image(open_image(_other(big_jpeg)), IMAGENET)
    assert np.abs(full - other).mean() > 10 * MEAN_TOLERANCE


def _other(path: Path) -> Path:
    other = path.with_name("other.jpg")
    if not other.exists():
        photo_like((2400, 1800), seed=1).save(other, quality=92)
    return other


def test_draft_keeps_exif_orientation(tmp_path: Path) -> None:
    """A portrait photo stored landscape with EXIF orientation 6 comes out upright both ways."""
    upright = photo_like((1200, 1800), seed=2)
    stored = upright.transpose(Image.Transpose.ROTATE_90)  # what the camera wrote: 1800 x 1200
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = tmp_path / "portrait.jpg"
    stored.save(path, quality=95, exif=exif)
    reference = preprocess_image(upright, IMAGENET)
    for decoded in (open_image(path), open_for(path, IMAGENET)):
        assert decoded.size[0] < decoded.size[1]  # portrait
        assert np.abs(preprocess_image(decoded, IMAGENET) - reference).mean() < 2 * MEAN_TOLERANCE


def test_non_jpeg_and_builtin_images_decode_in_full(tmp_path: Path) -> None:
    path = tmp_path / "photo.png"
    photo_like((600, 400)).save(path)
    assert open_for(path, IMAGENET).size == (600, 400)
    assert open_for("builtin:digits#0", IMAGENET.at_size(64)).size == (8, 8)


def test_checking_whole_jpegs_and_pngs_reads_headers_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation decodes nothing of a whole JPEG or PNG; a cut file is still decoded and refused."""
    from PIL import Image

    from pipeline.data import images

    whole_jpeg, whole_png = tmp_path / "a.jpg", tmp_path / "b.png"
    Image.new("RGB", (640, 480), (10, 200, 30)).save(whole_jpeg, quality=90)
    noise = np.random.default_rng(0).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(whole_png)
    cut_jpeg, cut_png = tmp_path / "c.jpg", tmp_path / "d.png"
    cut_jpeg.write_bytes(whole_jpeg.read_bytes()[:-200])
    cut_png.write_bytes(whole_png.read_bytes()[: whole_png.stat().st_size // 2])
    trailer = tmp_path / "e.jpg"  # some phones append data after the end-of-image marker
    trailer.write_bytes(whole_jpeg.read_bytes() + b"MOTION-PHOTO-DATA")
    decoded: list[str] = []
    real_open = images.open_image

    def counting_open(path: str, **kwargs: object) -> object:
        decoded.append(Path(path).name)
        return real_open(path, **kwargs)

    monkeypatch.setattr(images, "open_image", counting_open)
    paths = [str(p) for p in (whole_jpeg, whole_png, cut_jpeg, cut_png, trailer)]
    bad = images.find_unreadable(paths)
    assert sorted(Path(p).name for p in bad) == ["c.jpg", "d.png"]
    assert sorted(decoded) == ["c.jpg", "d.png", "e.jpg"]  # the whole ones were never decoded

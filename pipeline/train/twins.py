"""Near duplicates: pairs of images that are the same picture, found on the frozen features and
confirmed on the pixels.

Cosine similarity of the frozen features alone cannot tell a flipped, cropped, recoloured copy
from another photo of the same kind of flower: measured on flowers5 with EfficientNet-Lite0,
copies fall to 0.71 while distinct photos of single flowers on dark ground reach 0.9. Two
measured corrections make the pair score:
- local scaling: a pair's cosine counts against how similar each image is to its ordinary
  neighbours (the mean cosine of its 6th to 10th nearest; a copy stands out of its own
  neighbourhood, a generic photo does not; small duplicate groups do not raise it);
- pixel agreement: the best normalised cross-correlation of the two grey thumbnails over
  flips, crops and shifts (a copy aligns, another photo of a daisy does not).

    score = 2 cos(a, b) - density(a) - density(b) + PIXEL_WEIGHT * ncc(a, b)

The threshold is measured on the data itself: augmented copies (flip, crop, colour, JPEG
re-encode) of a few of its images are scored against their originals, and the threshold keeps
all but CALIBRATION_MISS of them (`calibrate`).
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from pipeline.core.samples import Sample
from pipeline.data.facts import looks
from pipeline.data.images import open_image, preprocess_image
from pipeline.train.features import EVAL_BATCH, FeatureCache, load_cached, store_cached

PIXEL_WEIGHT = 3.0  # measured: the weight that best separates copies from look-alikes
DENSITY_RANKS = (5, 10)  # the neighbours (0-based ranks) whose mean cosine is an image's density
CANDIDATES = 5  # nearest neighbours of each image considered as its twin
BLOCK = 1024  # rows of the similarity matrix computed at once
WINDOW_PX = 24  # thumbnails are compared at this size
CROP_SCALES = (1.0, 0.95, 0.9, 0.85, 0.8)  # the shares of a thumbnail tried as the other's view
SHIFT_PX = 2  # step of the crop offsets, in thumbnail pixels
CALIBRATION_COPIES = 96  # augmented copies measured to set the threshold
CALIBRATION_MISS = 0.10  # the share of those copies the threshold may miss (their recipe is harsher than most copies)
COPY_RECIPE = "twins-copies-v1"  # names the copies in the feature cache's key
CHANCE_QUANTILE = 0.99  # of the scores of pairs joining two classes: the threshold's floor
CHANCE_PAIRS = 20  # such pairs needed before the floor is trusted
MIN_COMPARE_PX = 32  # images mostly smaller than this are not compared: too few pixels
# Everything a stored result depends on besides the images and the model (part of its cache key).
SETTINGS = (
    f"w{PIXEL_WEIGHT}-d{DENSITY_RANKS}-k{CANDIDATES}-v{WINDOW_PX}{CROP_SCALES}{SHIFT_PX}"
    f"-c{CALIBRATION_COPIES}-m{CALIBRATION_MISS}-q{CHANCE_QUANTILE}-{COPY_RECIPE}"
)


@dataclass(frozen=True)
class Pair:
    """Two images (indices into the checked list) and their pair score."""

    a: int
    b: int
    score: float


@dataclass(frozen=True)
class Calibration:
    """The threshold and what it was measured on."""

    threshold: float
    copies: int  # augmented copies scored
    scores: list[float]  # their scores against their originals, lowest first
    floor: float | None = None  # the chance floor, when it raised the threshold (`chance_floor`)

    def to_dict(self) -> dict[str, object]:
        return {
            "copies": self.copies,
            "raised_to_chance_floor": self.floor,
            "kept": 1 - CALIBRATION_MISS,
            "recipe": "flip, crop to 80-95% per side, brightness and saturation x0.8-1.2, JPEG q70-90",
            "lowest_scores": [round(s, 3) for s in self.scores[:5]],
        }


def unit_rows(features: np.ndarray) -> np.ndarray:
    """Pooled features as float32 rows of length one."""
    rows = features.reshape(len(features), -1) if features.ndim == 2 else features.mean((2, 3))
    rows = rows.astype(np.float32)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def nearest(
    unit: np.ndarray, others: np.ndarray, *, count: int, same: bool
) -> tuple[np.ndarray, np.ndarray]:
    """(indices, cosines) of the `count` rows of `others` nearest each row of `unit`, best first.

    `same`: `unit` is `others`, and a row is not its own neighbour.
    """
    count = max(1, min(count, len(others) - (1 if same else 0)))
    found_index = np.zeros((len(unit), count), dtype=np.int64)
    found_sim = np.zeros((len(unit), count), dtype=np.float32)
    for start in range(0, len(unit), BLOCK):
        sims = unit[start : start + BLOCK] @ others.T
        if same:
            rows = np.arange(len(sims))
            sims[rows, rows + start] = -np.inf
        top = np.argpartition(-sims, count - 1, axis=1)[:, :count]
        top_sims = np.take_along_axis(sims, top, axis=1)
        order = np.argsort(-top_sims, axis=1)
        found_index[start : start + BLOCK] = np.take_along_axis(top, order, axis=1)
        found_sim[start : start + BLOCK] = np.take_along_axis(top_sims, order, axis=1)
    return found_index, found_sim


def density(neighbour_sims: np.ndarray) -> np.ndarray:
    """Each image's mean cosine to its ordinary neighbours (DENSITY_RANKS, or what there is)."""
    low, high = DENSITY_RANKS
    if neighbour_sims.shape[1] <= low:
        low = max(0, neighbour_sims.shape[1] - 1)
    return neighbour_sims[:, low:high].mean(axis=1)


# ----------------------------------------------------------------------------- pixels


def _normalised(rows: np.ndarray) -> np.ndarray:
    rows = rows - rows.mean(axis=-1, keepdims=True)
    return rows / np.maximum(np.linalg.norm(rows, axis=-1, keepdims=True), 1e-6)


@functools.lru_cache(maxsize=8)
def _window_index(side: int, scales: tuple[float, ...]) -> tuple[np.ndarray, ...]:
    """Where each crop's WINDOW_PX x WINDOW_PX cells begin and end in a flattened integral image
    of a side x side thumbnail: (bottom-right, top-right, bottom-left, top-left, cell area)."""
    corners: list[list[np.ndarray]] = [[], [], [], [], []]
    for scale in scales:
        width = scale * side
        offsets = np.arange(0, side - width + 1e-6, SHIFT_PX) if scale < 1 else np.zeros(1)
        cells = np.arange(WINDOW_PX + 1) * width / WINDOW_PX
        edges = np.round(offsets[:, None] + cells).astype(int)
        y0, y1 = edges[:, None, :-1, None], edges[:, None, 1:, None]
        x0, x1 = edges[None, :, None, :-1], edges[None, :, None, 1:]
        stride = side + 1
        for slot, flat in enumerate(
            (y1 * stride + x1, y0 * stride + x1, y1 * stride + x0, y0 * stride + x0)
        ):
            corners[slot].append(flat.reshape(-1, WINDOW_PX * WINDOW_PX))
        area = np.maximum((y1 - y0) * (x1 - x0), 1)
        corners[4].append(np.broadcast_to(area, flat.shape).reshape(-1, WINDOW_PX * WINDOW_PX))
    return tuple(np.concatenate(c) for c in corners)


def views(thumb: np.ndarray, scales: Sequence[float] = CROP_SCALES) -> np.ndarray:
    """[V, WINDOW_PX**2] normalised crops of a thumbnail (each scale at every SHIFT_PX offset),
    as area averages through an integral image."""
    side = thumb.shape[0]
    integral = np.pad(thumb.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0))).ravel()
    br, tr, bl, tl, area = _window_index(side, tuple(scales))
    sums = integral[br] - integral[tr] - integral[bl] + integral[tl]
    return _normalised(sums / area).astype(np.float32)


def pixel_agreement(thumbs: np.ndarray, pairs: Sequence[tuple[int, int]]) -> np.ndarray:
    """The best thumbnail correlation of each pair over crops, shifts and a horizontal flip."""
    partners: dict[int, list[int]] = {}
    for a, b in pairs:
        partners.setdefault(a, []).append(b)
        partners.setdefault(b, []).append(a)
    whole = {i: views(thumbs[i], (1.0,))[0] for i in partners}
    best: dict[tuple[int, int], float] = {}
    for image, others in partners.items():
        crops = np.concatenate([views(thumbs[image]), views(thumbs[image][:, ::-1])])
        agreement = (crops @ np.stack([whole[o] for o in others]).T).max(axis=0)
        for other, value in zip(others, agreement, strict=True):
            key = (min(image, other), max(image, other))
            best[key] = max(best.get(key, -1.0), float(value))
    return np.array([best[(min(a, b), max(a, b))] for a, b in pairs], dtype=np.float32)


# ----------------------------------------------------------------------------- pairs


def scored_pairs(unit: np.ndarray, thumbs: np.ndarray, *, at_least: float) -> list[Pair]:
    """Each image with its CANDIDATES nearest, scored, where the score can reach `at_least`."""
    if len(unit) < 2:
        return []
    index, sims = nearest(unit, unit, count=max(CANDIDATES, DENSITY_RANKS[1]), same=True)
    dens = density(sims)
    found: dict[tuple[int, int], float] = {}
    for a in range(len(unit)):
        for b, sim in zip(index[a, :CANDIDATES], sims[a, :CANDIDATES], strict=True):
            local = 2 * float(sim) - dens[a] - dens[int(b)]
            if local + PIXEL_WEIGHT >= at_least:  # could reach it if the pixels agree fully
                found[(min(a, int(b)), max(a, int(b)))] = local
    candidates = sorted(found)
    agreement = pixel_agreement(thumbs, candidates)
    pairs = [
        Pair(a, b, found[(a, b)] + PIXEL_WEIGHT * float(ncc))
        for (a, b), ncc in zip(candidates, agreement, strict=True)
    ]
    return sorted(pairs, key=lambda p: -p.score)


def chance_floor(pairs: Sequence[Pair], labels: Sequence[int]) -> float | None:
    """Where chance look-alikes score: the CHANCE_QUANTILE of the pairs joining two classes.

    Two images of different classes are rarely one picture, so their scores show how far chance
    similarity reaches in this data (8x8 digits: past the copies' own); the top share is left
    out, as it may hold real duplicates under two labels. None with too few such pairs.
    """
    across = [p.score for p in pairs if labels[p.a] != labels[p.b]]
    if len(across) < CHANCE_PAIRS:
        return None
    return float(np.quantile(across, CHANCE_QUANTILE))


def groups_of(count: int, links: Sequence[tuple[int, int]]) -> list[int]:
    """A group id per item (the smallest index of its group) from linked pairs: union-find."""
    parent = list(range(count))

    def root(item: int) -> int:
        while parent[item] != item:
            parent[item] = parent[parent[item]]
            item = parent[item]
        return item

    for a, b in links:
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    return [root(item) for item in range(count)]


# ----------------------------------------------------------------------------- calibration


def augmented_copy(img: Image.Image, rng: np.random.Generator) -> Image.Image:
    """A copy as data sets make them: maybe flipped, cropped, recoloured, JPEG re-encoded."""
    img = img.convert("RGB")
    if rng.random() < 0.5:
        img = ImageOps.mirror(img)
    width, height = img.size
    share = rng.uniform(0.8, 0.95)
    crop_w, crop_h = max(1, round(width * share)), max(1, round(height * share))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    img = img.crop((left, top, left + crop_w, top + crop_h))
    img = ImageEnhance.Brightness(img).enhance(rng.uniform(0.8, 1.2))
    img = ImageEnhance.Color(img).enhance(rng.uniform(0.8, 1.2))
    encoded = io.BytesIO()
    img.save(encoded, "JPEG", quality=int(rng.integers(70, 91)))
    return Image.open(io.BytesIO(encoded.getvalue())).convert("RGB")


def _copies(samples: Sequence[Sample]) -> list[Image.Image]:
    rng = np.random.default_rng(0)  # the same copies every time: their features are cached
    return [augmented_copy(open_image(s.ref), rng) for s in samples]


def copy_features(
    cache: FeatureCache, originals: Sequence[Sample], copies: Sequence[Image.Image]
) -> np.ndarray:
    """The frozen features of in-memory copies, cached under their originals' key."""
    key = cache.key(originals, f"{cache.feature_name}#{COPY_RECIPE}")
    keep = bool(cache.model_sha256)
    found = load_cached(cache.cache_dir, key) if keep else None
    if found is not None and len(found) == len(copies):
        return found
    session = cache.session(cache.feature_name)
    batches = [
        np.stack(
            [preprocess_image(img, cache.preprocess) for img in copies[start : start + EVAL_BATCH]]
        )
        for start in range(0, len(copies), EVAL_BATCH)
    ]
    from pipeline.core.sessions import run_batches

    result = run_batches(
        session, input_name=cache.input_name, batches=(b.astype(np.float32) for b in batches)
    )
    if keep:
        store_cached(cache.cache_dir, key, result)
    return result


def calibrate(
    cache: FeatureCache, samples: Sequence[Sample], unit: np.ndarray, thumbs: np.ndarray
) -> Calibration:
    """The threshold that keeps all but CALIBRATION_MISS of measured augmented copies.

    Copies of CALIBRATION_COPIES images spread over the list are scored against their originals
    as if they were in the data (their density taken among its images).
    """
    count = min(CALIBRATION_COPIES, len(samples))
    chosen = np.unique(np.linspace(0, len(samples) - 1, count).round().astype(int))
    originals = [samples[i] for i in chosen]
    copies = _copies(originals)
    copy_unit = unit_rows(copy_features(cache, originals, copies))
    cos = np.sum(copy_unit * unit[chosen], axis=1)
    # As if the copy were in the data: the original is among the copy's neighbours, and the copy
    # among the original's (in place of the original itself, its rank 0 here).
    _, copy_sims = nearest(copy_unit, unit, count=DENSITY_RANKS[1], same=False)
    _, own_sims = nearest(unit[chosen], unit, count=DENSITY_RANKS[1] + 1, same=False)
    own_sims = -np.sort(-np.concatenate([cos[:, None], own_sims[:, 1:]], axis=1), axis=1)
    own_density, copy_density = density(own_sims), density(copy_sims)
    copy_thumbs = np.stack([looks(img)[1] for img in copies])
    both = np.concatenate([thumbs[chosen], copy_thumbs])
    agreement = pixel_agreement(both, [(i, len(chosen) + i) for i in range(len(chosen))])
    scores = np.sort(2 * cos - own_density - copy_density + PIXEL_WEIGHT * agreement)
    threshold = float(np.quantile(scores, CALIBRATION_MISS)) if len(scores) else 2.0 + PIXEL_WEIGHT
    return Calibration(threshold, len(scores), [float(s) for s in scores])

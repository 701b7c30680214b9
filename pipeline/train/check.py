"""The data check on frozen features: duplicates, likely label errors, and the file-only checks,
put together into one `DataCheck` (pipeline.data.check).

Features are taken once for every image of the source in one canonical order (sorted paths),
so that the split grouping, `zoo check` and `zoo adapt` share one cache entry, and each part's
own entry (what a `feature` run reads) is filled from it (`source_features`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.samples import DataSplit, Sample
from pipeline.data.check import (
    PARTS,
    DataCheck,
    Suspect,
    Twin,
    balance_line,
    class_balance,
    labelled_parts,
    names,
    odd_colour,
    short_name,
    small_images,
    too_few_to_split,
)
from pipeline.data.facts import FileFacts, file_facts
from pipeline.train import twins
from pipeline.train.features import FeatureCache, load_cached, store_cached
from pipeline.train.label_issues import rank_labels

SUSPECTS_KEPT = 200  # label suspects written to check.json, most likely first
TWINS_RECORD = "twins-v1"  # names the scored pairs in the feature cache's key


def canonical(samples: Sequence[Sample]) -> list[Sample]:
    """Each image once, by sorted ref: the order every cache entry of a whole source uses.

    An image listed twice keeps its first label (cache keys name images by ref alone).
    """
    labels: dict[str, int] = {}
    for sample in samples:
        labels.setdefault(sample.ref, sample.label)
    return [Sample(ref, labels[ref]) for ref in sorted(labels)]


def source_features(
    cache: FeatureCache, split: DataSplit | None, pool: Sequence[Sample]
) -> np.ndarray:
    """Frozen features of `canonical(pool)`; with `split`, its parts' own cache entries filled too.

    When the canonical entry is missing but every part is cached (a `feature` run came first),
    the parts are put together instead of computing anything.
    """
    order = canonical(pool)
    value = cache.feature_name
    keep = bool(cache.model_sha256)
    features = load_cached(cache.cache_dir, cache.key(order, value)) if keep else None
    parts = {p: getattr(split, p) for p in PARTS if getattr(split, p)} if split else {}
    if features is None and keep and parts:
        cached = {p: load_cached(cache.cache_dir, cache.key(s, value)) for p, s in parts.items()}
        if all(c is not None and len(c) == len(parts[p]) for p, c in cached.items()):
            rows = {
                s.ref: row for p, c in cached.items() for s, row in zip(parts[p], c, strict=True)
            }
            features = np.stack([rows[s.ref] for s in order])
            store_cached(cache.cache_dir, cache.key(order, value), features)
    if features is None or len(features) != len(order):
        features = cache.features(order)
    if keep:
        position = {s.ref: i for i, s in enumerate(order)}
        for samples in parts.values():
            key = cache.key(samples, value)
            if not (Path(cache.cache_dir) / f"{key}.npy").exists():
                store_cached(cache.cache_dir, key, features[[position[s.ref] for s in samples]])
    return features


@dataclass
class Twins:
    """Duplicate pairs among `refs` (indices into it) and what the threshold was measured on."""

    exact: list[tuple[int, int]]
    near: list[twins.Pair]
    calibration: twins.Calibration | None

    def groups(self, count: int) -> list[int]:
        return twins.groups_of(count, [*self.exact, *((p.a, p.b) for p in self.near)])


def comparable(facts: FileFacts) -> bool:
    """Whether images are large enough for near duplicates to be told (not 8x8 digits)."""
    return len(facts.refs) >= 3 and np.median(facts.short_side) >= twins.MIN_COMPARE_PX


def find_twins(
    cache: FeatureCache | None,
    order: Sequence[Sample],
    features: np.ndarray | None,
    facts: FileFacts,
) -> Twins:
    """Exact duplicates by file hash, near ones by pair score over the measured threshold
    (none without features, or for images too small to compare)."""
    first: dict[bytes, int] = {}
    exact = []
    for index in range(len(order)):
        digest = bytes(facts.table["digest"][index])
        if digest and digest in first:
            exact.append((first[digest], index))
        elif digest:
            first[digest] = index
    if cache is None or features is None or not comparable(facts):
        return Twins(exact, [], None)
    labels = [s.label for s in order]
    # Scored once per model, preprocessing, image files and labels: a second check reads them.
    digest = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes()).hexdigest()[:12]
    key = cache.key(order, f"{cache.feature_name}#{TWINS_RECORD}-{twins.SETTINGS}-{digest}")
    stored = load_cached(cache.cache_dir, key) if cache.model_sha256 else None
    if stored is not None:
        near, calibration = _twins_from_array(stored)
        return Twins(exact, near, calibration)
    unit = twins.unit_rows(features)
    calibration = twins.calibrate(cache, order, unit, facts.thumbs)
    scored = twins.scored_pairs(unit, facts.thumbs, at_least=calibration.threshold)
    floor = twins.chance_floor(scored, labels)
    if floor is not None and floor > calibration.threshold:
        calibration = dataclasses.replace(calibration, threshold=floor, floor=floor)
    groups = twins.groups_of(len(order), exact)
    near = [p for p in scored if p.score >= calibration.threshold and groups[p.a] != groups[p.b]]
    if cache.model_sha256:
        store_cached(cache.cache_dir, key, _twins_to_array(near, calibration))
    return Twins(exact, near, calibration)


def _twins_to_array(near: Sequence[twins.Pair], calibration: twins.Calibration) -> np.ndarray:
    """[threshold, floor or NaN, copies, lowest copy scores x5 (NaN-filled), then a, b, score per pair]."""
    lowest = (list(calibration.scores[:5]) + [np.nan] * 5)[:5]
    floor = np.nan if calibration.floor is None else calibration.floor
    head = [calibration.threshold, floor, calibration.copies, *lowest]
    return np.array(head + [v for p in near for v in (p.a, p.b, p.score)], dtype=np.float64)


def _twins_from_array(stored: np.ndarray) -> tuple[list[twins.Pair], twins.Calibration]:
    threshold, floor, copies = (float(v) for v in stored[:3])
    lowest = [float(v) for v in stored[3:8] if not np.isnan(v)]
    rows = stored[8:].reshape(-1, 3)
    near = [twins.Pair(int(a), int(b), float(score)) for a, b, score in rows]
    calibration = twins.Calibration(
        threshold, int(copies), lowest, None if np.isnan(floor) else floor
    )
    return near, calibration


def check_split(
    split: DataSplit,
    *,
    cache: FeatureCache,
    facts_dir: Path | None,
    model_name: str,
    split_fixed: bool,
    seed: int = 0,
) -> DataCheck:
    """Every check on `split` with the frozen features of `cache`'s model."""
    started = time.perf_counter()
    items = labelled_parts(split)
    refs = [s.ref for s, _ in items]
    order = canonical([s for s, _ in items])
    facts = file_facts([s.ref for s in order], cache_dir=facts_dir)
    position = {s.ref: i for i, s in enumerate(order)}
    item_facts = facts.subset([position[r] for r in refs])
    features = source_features(cache, split, [s for s, _ in items])
    found = find_twins(cache, order, features, facts)
    pairs = _twin_records(items, order, found)
    colour_set, odd = odd_colour(refs, item_facts)
    check = DataCheck(
        source=split.source,
        model=model_name,
        images=len(order),
        class_names=list(split.class_names),
        split_fixed=split_fixed,
        balance=class_balance(split),
        twins=pairs,
        groups=_groups(order, found),
        threshold=found.calibration.threshold if found.calibration else None,
        calibration=found.calibration.to_dict() if found.calibration else {},
        small=small_images(refs, item_facts, input_px=cache.preprocess.crop),
        odd_colour=odd,
        colour_set=colour_set,
        too_few=too_few_to_split(split),
        unreadable=len(split.skipped),
    )
    check = _with_suspects(check, split, items, features[[position[r] for r in refs]], seed=seed)
    return dataclasses.replace(
        check, notes=notes(check), seconds=round(time.perf_counter() - started, 2)
    )


def _twin_records(
    items: Sequence[tuple[Sample, str]], order: Sequence[Sample], found: Twins
) -> list[Twin]:
    """Twins between the split's images: a pair of canonical images becomes a pair of items."""
    where: dict[str, list[str]] = {}
    for sample, part in items:
        where.setdefault(sample.ref, []).append(part)
    # One file listed twice (a CSV naming it in two parts) is its own exact twin.
    records = [Twin(ref, ref, at[0], at[1], "exact") for ref, at in where.items() if len(at) > 1]
    for kind, links in (
        ("exact", [(a, b, None) for a, b in found.exact]),
        ("near", [(p.a, p.b, p.score) for p in found.near]),
    ):
        for a, b, score in links:
            ref_a, ref_b = order[a].ref, order[b].ref
            score = None if score is None else round(float(score), 3)
            records.append(Twin(ref_a, ref_b, where[ref_a][0], where[ref_b][0], kind, score))
    return records


def _groups(order: Sequence[Sample], found: Twins) -> list[list[str]]:
    """The duplicate groups of two images or more, as refs."""
    by_group: dict[int, list[str]] = {}
    for sample, group in zip(order, found.groups(len(order)), strict=True):
        by_group.setdefault(group, []).append(sample.ref)
    return [refs for refs in by_group.values() if len(refs) > 1]


def _with_suspects(
    check: DataCheck,
    split: DataSplit,
    items: Sequence[tuple[Sample, str]],
    features: np.ndarray,
    *,
    seed: int,
) -> DataCheck:
    """The likely label errors among train and validation images (the test split is not read)."""
    chosen = [i for i, (_, part) in enumerate(items) if part != "test"]
    labels = np.array([items[i][0].label for i in chosen], dtype=np.int64)
    present = np.unique(labels)
    if len(present) < 2 or np.bincount(labels)[present].min() < 2:
        return check
    ranking = rank_labels(
        twins.unit_rows(features[chosen]), labels, classes=len(split.class_names), seed=seed
    )
    suspects = []
    for position in ranking.order[:SUSPECTS_KEPT]:
        sample, part = items[chosen[position]]
        suggested = int(np.argmax(ranking.probabilities[position]))
        if suggested == sample.label:
            continue  # the probe agrees with the label, only not confidently
        suspects.append(
            Suspect(
                sample.ref,
                part,
                split.class_names[sample.label],
                split.class_names[suggested],
                round(float(ranking.quality[position]), 4),
            )
        )
    return dataclasses.replace(check, suspects=suspects, flagged=int(ranking.flagged.sum()))


def notes(check: DataCheck) -> list[str]:
    """One line per finding, as `zoo check` prints them and `zoo adapt` logs them."""
    lines = []
    exact = [t for t in check.twins if t.kind == "exact"]
    near = [t for t in check.twins if t.kind == "near"]
    if check.twins:
        where = ", ".join(f"{k} {v}" for k, v in check.cross_split().items())
        lines.append(
            f"duplicates: {len(exact)} exact and {len(near)} near pair(s) ({where}): "
            + names(f"{t.a} = {Path(t.b).name}" for t in check.twins)
        )
    if check.threshold is None and check.images >= 3:
        lines.append(
            "near duplicates not compared: most images are under 32 px, too few pixels to tell "
            "a copy (exact copies are still found)"
        )
    leaking = check.twinned("test")
    if check.split_fixed and leaking:
        lines.append(
            f"warning: {len(leaking)} of the test images have a twin in training or validation; metrics are given twice, "
            "on the whole test split and on the test images without one (remove the copies for one honest figure)"
        )
    if check.suspects and not check.flagged:
        lines.append("likely label errors: none flagged")
    elif check.suspects:
        top = ", ".join(
            f"{short_name(s.ref)} ({s.given} → {s.suggested}?)" for s in check.suspects[:3]
        )
        lines.append(f"likely label errors: {check.flagged} flagged; most likely: {top}")
    if check.balance.imbalanced:
        lines.append(f"class balance: {balance_line(check.balance)}")
    if check.small:
        lines.append(
            f"{len(check.small)} image(s) much smaller than the input (upscaled more than 2x): {names(check.small)}"
        )
    if check.odd_colour:
        what = (
            "grey image(s) in a colour set" if check.colour_set else "colour image(s) in a grey set"
        )
        lines.append(f"{len(check.odd_colour)} {what}: {names(check.odd_colour)}")
    if check.too_few:
        lines.append(
            f"too few images to split into train, validation and test: {', '.join(check.too_few)} (add at least 3 per class)"
        )
    if check.unreadable:
        lines.append(
            f"{check.unreadable} file(s) skipped: they do not decode (remove or re-save them)"
        )
    return lines

"""The data check: what is wrong with a data set before anything trains on it.

This module holds the record a check produces (`DataCheck`, written as a run's check.json and
printed by `zoo check`) and the checks that need only the files: exact duplicates by file hash,
images too small for the input, grey images in a colour set (or the reverse), classes with too
few images to split, and the class balance. The checks that need the frozen features (near
duplicates, likely label errors) are pipeline.train.twins and pipeline.train.label_issues;
pipeline.train.check puts them together.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.samples import DataSplit, Sample
from pipeline.data.facts import FileFacts
from zoo.errors import ZooError
from zoo.files import write_json

CHECK_VERSION = 1
CHECK_FILE = "check.json"  # in a run directory, beside run.json
PARTS = ("train", "val", "test")
IMBALANCE_RATIO = 3.0  # largest / smallest training class from which training balances by default
SMALL_SHARE = 0.5  # shorter side below this share of the input size: upscaled more than 2x
ODD_COLOUR_SHARE = (
    0.2  # the grey images of a colour set (or the reverse) are named up to this share
)
MIN_TO_SPLIT = 3  # images a class needs for one each in train, validation and test
EXAMPLES = 5  # file names shown in a one-line note


@dataclass(frozen=True)
class Twin:
    """Two images that are the same picture: byte-identical ("exact") or nearly ("near")."""

    a: str  # image refs, as in split.json
    b: str
    split_a: str  # "train", "val" or "test"
    split_b: str
    kind: str  # "exact" or "near"
    score: float | None = None  # the near-duplicate pair score (pipeline.train.twins); None: exact


@dataclass(frozen=True)
class Suspect:
    """An image whose label the feature probe, cross-validated, finds unlikely."""

    ref: str
    split: str
    given: str  # the label it has
    suggested: str  # the label the out-of-fold probe gives it
    quality: float  # the out-of-fold probability of the given label: low is suspicious


@dataclass(frozen=True)
class Balance:
    """Training images per class, and how far apart the largest and the smallest are."""

    counts: dict[str, int]
    smallest: str
    largest: str
    ratio: float | None  # largest / smallest; None when the smallest has none

    @property
    def imbalanced(self) -> bool:
        return self.ratio is None or self.ratio >= IMBALANCE_RATIO


@dataclass(frozen=True)
class DataCheck:
    """What `zoo check` found, and what a run's check.json holds."""

    source: str
    model: str  # whose frozen features the feature checks used; "" when they did not run
    images: int
    class_names: list[str]
    split_fixed: bool  # True: the user's folders (or CSV column) fixed the split
    balance: Balance
    twins: list[Twin] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)  # duplicate groups of 2+ images
    threshold: float | None = None  # near-duplicate pair score from which a pair counts
    calibration: dict[str, Any] = field(default_factory=dict)  # how the threshold was measured
    suspects: list[Suspect] = field(default_factory=list)  # most likely label errors first
    flagged: int = 0  # images the label check flags as likely errors
    small: list[str] = field(default_factory=list)  # images too small for the input size
    odd_colour: list[str] = field(default_factory=list)  # grey in a colour set, or the reverse
    colour_set: bool = True  # whether most images have colour
    too_few: list[str] = field(default_factory=list)  # classes with too few images to split
    unreadable: int = 0  # files skipped because they do not decode
    notes: list[str] = field(default_factory=list)  # one line per finding, for the log
    seconds: float = 0.0
    version: int = CHECK_VERSION

    def to_dict(self) -> dict[str, Any]:
        return {
            **dataclasses.asdict(self),
            "imbalanced": self.balance.imbalanced,
            "cross_split": self.cross_split(),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DataCheck:
        """The record `to_dict` wrote; ZooError when it is not one."""
        try:
            if raw.get("version") != CHECK_VERSION:
                raise ValueError(f"version {raw.get('version')!r}")
            known = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in raw.items() if k in known}
            values["balance"] = Balance(**raw["balance"])
            values["twins"] = [Twin(**t) for t in raw.get("twins", [])]
            values["suspects"] = [Suspect(**s) for s in raw.get("suspects", [])]
            return cls(**values)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ZooError(
                f"check.json is malformed ({type(exc).__name__}: {exc}); run `zoo check` again"
            ) from exc

    def save(self, path: Path) -> None:
        write_json(Path(path), self.to_dict())

    @classmethod
    def load(cls, path: Path) -> DataCheck | None:
        """check.json in a run, None when the run has none."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise ZooError(f"{path} is damaged ({exc}); run `zoo check` again") from exc

    def cross_split(self) -> dict[str, int]:
        """Duplicate pairs by the parts they join: {"train-test": 3, "train-train": 1, ...}."""
        counts: dict[str, int] = {}
        for twin in self.twins:
            a, b = sorted((twin.split_a, twin.split_b), key=PARTS.index)
            counts[f"{a}-{b}"] = counts.get(f"{a}-{b}", 0) + 1
        return counts

    def twinned(self, part: str, others: Sequence[str] = ("train", "val")) -> set[str]:
        """The images of `part` that have a duplicate in one of `others` (the parts training sees)."""
        found = set()
        for twin in self.twins:
            sides = ((twin.split_a, twin.split_b, twin.a), (twin.split_b, twin.split_a, twin.b))
            for mine, theirs, ref in sides:
                if mine == part and theirs in others:
                    found.add(ref)
        return found


# ----------------------------------------------------------------------------- file-only checks


def labelled_parts(split: DataSplit) -> list[tuple[Sample, str]]:
    """Every sample of a split with its part, train first: the order the checks number images in."""
    return [(sample, part) for part in PARTS for sample in getattr(split, part)]


def class_balance(split: DataSplit) -> Balance:
    """The training images per class, the smallest and largest class, and their ratio."""
    counts = split.counts("train")
    names = split.class_names
    smallest = int(np.argmin(counts)) if counts else 0
    largest = int(np.argmax(counts)) if counts else 0
    ratio = None if not counts or counts[smallest] == 0 else counts[largest] / counts[smallest]
    return Balance(
        counts=dict(zip(names, counts, strict=True)),
        smallest=names[smallest] if names else "",
        largest=names[largest] if names else "",
        ratio=None if ratio is None else round(ratio, 3),
    )


def small_images(refs: Sequence[str], facts: FileFacts, *, input_px: int) -> list[str]:
    """Images whose shorter side is under SMALL_SHARE of the input: mostly upscaled blur."""
    short = facts.short_side
    return [ref for ref, side in zip(refs, short, strict=True) if 0 < side < SMALL_SHARE * input_px]


def odd_colour(refs: Sequence[str], facts: FileFacts) -> tuple[bool, list[str]]:
    """(whether most images have colour, the images that differ) when those are few; else none."""
    grey = facts.grey
    colour_set = float(np.mean(grey)) <= 0.5 if len(grey) else True
    odd = [ref for ref, g in zip(refs, grey, strict=True) if g == colour_set]
    if len(odd) > ODD_COLOUR_SHARE * len(refs):
        return colour_set, []  # a mixed set: nothing is odd in it
    return colour_set, odd


def too_few_to_split(split: DataSplit) -> list[str]:
    """Classes with fewer than MIN_TO_SPLIT images in all: one each for train, val and test."""
    totals = np.sum([split.counts(part) for part in PARTS], axis=0)
    return [
        name for name, total in zip(split.class_names, totals, strict=True) if total < MIN_TO_SPLIT
    ]


def short_name(ref: str) -> str:
    """An image's name with its folder ("roses/a.jpg"): class folders often reuse file names."""
    path = Path(ref)
    return f"{path.parent.name}/{path.name}" if path.parent.name else path.name


def names(refs: Iterable[str], limit: int = EXAMPLES) -> str:
    """A few file names for a one-line note: "a/1.jpg, a/2.jpg, b/1.jpg and 4 more"."""
    shown = list(refs)
    text = ", ".join(short_name(ref) for ref in shown[:limit])
    return text + (f" and {len(shown) - limit} more" if len(shown) > limit else "")


def balance_line(balance: Balance) -> str:
    """ "10.0x between the largest training class (daisy, 120) and the smallest (roses, 12)"."""
    ratio = "a class without training images" if balance.ratio is None else f"{balance.ratio:.1f}x"
    largest, smallest = balance.largest, balance.smallest
    return (
        f"{ratio} between the largest training class ({largest}, {balance.counts.get(largest, 0)}) "
        f"and the smallest ({smallest}, {balance.counts.get(smallest, 0)})"
    )

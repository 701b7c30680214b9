"""Drawing a train/val/test split of labelled samples, and the torch Dataset that feeds training.

Where samples come from (folders, CSV files, built-in sets) is `pipeline.data.sources`; the
`Sample` and `DataSplit` records themselves, as split.json holds them, are `pipeline.core.samples`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from pipeline.data.images import (
    MAX_PIXELS,
    augmented_tensor,
    build_augmentation,
    open_for,
    preprocess_image,
)
from zoo.catalog import Preprocess
from zoo.errors import DataError

if TYPE_CHECKING:
    from pipeline.core.samples import Sample

# ----------------------------------------------------------------------------- splitting


def stratified_split(
    labels: Sequence[int],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    groups: Sequence[int] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Indices of a per-class shuffled train/val/test split (exactly stratified, seeded).

    Tiny classes degrade gracefully: 1 image -> train only; 2 -> train + val; 3 or more -> at
    least one image in each part whose fraction is non-zero. With `groups` (a group id per
    sample: duplicates share one), each group goes whole into one part, counted in the class of
    its first sample; without groups, or with every group a single sample, the split is the same.
    """
    rng = np.random.default_rng(seed)
    parts: tuple[list[int], list[int], list[int]] = ([], [], [])
    by_class = _units_by_class(labels, groups)
    for label in sorted(by_class):
        units = [by_class[label][i] for i in rng.permutation(len(by_class[label]))]
        n = sum(len(unit) for unit in units)
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
        left = list(units)
        for part, wanted in ((2, n_test), (1, n_val)):
            # A group that would overfill the part trains instead: test and validation never
            # take more than their share, so training keeps at least one image.
            taken, rest = 0, []
            for unit in left:
                if taken + len(unit) <= wanted:
                    parts[part].extend(unit)
                    taken += len(unit)
                else:
                    rest.append(unit)
            left = rest
        parts[0].extend(index for unit in left for index in unit)
    return sorted(parts[0]), sorted(parts[1]), sorted(parts[2])


def _units_by_class(
    labels: Sequence[int], groups: Sequence[int] | None
) -> dict[int, list[list[int]]]:
    """Class -> its units (lists of sample indices that split together), by first index."""
    units: dict[object, list[int]] = {}
    for index in range(len(labels)):
        key = index if groups is None else ("group", groups[index])
        units.setdefault(key, []).append(index)
    by_class: dict[int, list[list[int]]] = {}
    for unit in units.values():  # dicts keep insertion order: units by their first index
        by_class.setdefault(labels[unit[0]], []).append(unit)
    return by_class


def split_samples(
    samples: list[Sample],
    *,
    seed: int,
    val_fraction: float,
    test_fraction: float,
    groups: Sequence[int] | None = None,
) -> tuple[list[Sample], list[Sample], list[Sample]]:
    """`stratified_split` applied to samples: (train, val, test), `groups` kept whole."""
    idx = stratified_split(
        [s.label for s in samples],
        seed=seed,
        val_fraction=val_fraction,
        test_fraction=test_fraction,
        groups=groups,
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
        flip: bool = True,
        seed: int | None = None,
        max_pixels: int = MAX_PIXELS,
    ) -> None:
        self.samples = list(samples)
        self.preprocess = preprocess
        self.augment = augment
        self.transform = (
            None if augment == "none" else build_augmentation(augment, preprocess, flip=flip)
        )
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
        img = open_for(ref, self.preprocess, max_pixels=self.max_pixels)
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

"""The loaders of one run: images for the whole model, or the frozen part's output for the top.

`pipeline.train.fastpath` picks which; these build them. The frozen part's output comes from a
`FeatureCache`: computed once and cached when the images do not change between epochs, or run
per batch in onnxruntime when they do (augmentation) or when the cache has no room for it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset, WeightedRandomSampler

from pipeline.core.distributed import SINGLE, Workers
from pipeline.core.sessions import as_input_type, session_input_type
from pipeline.data.split import ImageDataset
from pipeline.train.features import EVAL_BATCH, FeatureCache

if TYPE_CHECKING:
    from pipeline.core.samples import DataSplit, Sample
    from pipeline.train.loop import TrainConfig
    from zoo.catalog import Preprocess


class Loaders(NamedTuple):
    """A run's batches: a training loader for any batch size, and the evaluation loaders."""

    make_train: Callable[[int], Iterable]
    val: Iterable
    test: Iterable


@dataclass
class _TrainLoader:
    """The training loader for a batch size; with `frozen`, its batches go through the cut `cut`."""

    dataset: Any
    dist: Workers
    seed: int
    options: dict[str, Any] = field(default_factory=dict)  # passed on to the DataLoader
    frozen: FeatureCache | None = None
    cut: str = ""
    draws: Sequence[float] | None = None  # per training image: drawn with replacement by these

    def __call__(self, batch_size: int) -> Iterable:
        if self.draws is not None and self.dist.alone:
            # The sampler shares the loader's generator, which the epoch loop reseeds.
            generator = torch.Generator().manual_seed(self.seed)
            sampler = WeightedRandomSampler(
                list(self.draws), len(self.draws), replacement=True, generator=generator
            )
            loader = DataLoader(
                self.dataset, batch_size, sampler=sampler, generator=generator, **self.options
            )
        else:
            loader = self.dist.train_loader(
                self.dataset, batch_size, seed=self.seed, **self.options
            )
        if self.frozen is None:
            return loader
        return _PrefixBatches(loader, self.frozen.session(self.cut), self.frozen.input_name)


def drawn_by_class(
    make_train: Callable[[int], Iterable], train: Sequence[Sample], config: TrainConfig
) -> Callable[[int], Iterable]:
    """`make_train` drawing each class equally often when `config` balances by a sampler."""
    if config.balance != "sampler" or not config.class_weights:
        return make_train
    weights = config.class_weights
    return dataclasses.replace(make_train, draws=[weights[s.label] for s in train])


def image_loaders(
    split: DataSplit,
    preprocess: Preprocess,
    *,
    augment: str,
    flip: bool = True,
    config: TrainConfig,
    dist: Workers = SINGLE,
) -> Loaders:
    """Loaders of images, decoded and preprocessed (augmented for training) by DataLoader workers."""
    workers = 4 if config.device == "cuda" else 0
    options = {"num_workers": workers, "pin_memory": config.device == "cuda"}
    train_set = ImageDataset(split.train, preprocess, augment=augment, flip=flip, seed=config.seed)
    return Loaders(
        _TrainLoader(train_set, dist, config.seed, options),
        _image_eval_loader(split.val, preprocess, dist=dist, options=options),
        _image_eval_loader(split.test, preprocess, dist=dist, options=options),
    )


def _image_eval_loader(
    samples: Sequence[Sample], preprocess: Preprocess, *, dist: Workers, options: dict[str, Any]
) -> DataLoader:
    """This worker's shard of an evaluation split, as preprocessed images."""
    shard = [samples[i] for i in dist.shard(len(samples))]  # gathered again by evaluate()
    return DataLoader(ImageDataset(shard, preprocess), batch_size=EVAL_BATCH, **options)


class _PrefixBatches:
    """Batches of augmented images with the frozen prefix applied by onnxruntime per batch.

    Yields (prefix output, labels) like a loader over cached prefixes, but the images differ every
    epoch. Exposes the wrapped loader's `generator` and `sampler`, which the epoch loop reseeds.
    """

    def __init__(self, loader: Any, session: Any, input_name: str) -> None:
        self.loader, self.session, self.input_name = loader, session, input_name
        self.generator = getattr(loader, "generator", None)
        self.sampler = getattr(loader, "sampler", None)
        self.dtype = session_input_type(session)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, Any]]:
        for images, labels in self.loader:
            batch = np.ascontiguousarray(as_input_type(images.numpy(), self.dtype))
            output = self.session.run(None, {self.input_name: batch})[0]
            yield torch.from_numpy(np.asarray(output, dtype=np.float32)), labels


class _RowsDataset:
    """(cached prefix row, label) read from disk per item: memory does not grow with the data."""

    def __init__(self, rows: Any, labels: Sequence[int], indices: Sequence[int]) -> None:
        self.rows, self.labels, self.indices = rows, list(labels), list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Any, int]:
        index = self.indices[item]
        return torch.from_numpy(self.rows.take([index])[0]), self.labels[index]


def feature_loaders(
    cache: FeatureCache,
    split: DataSplit,
    *,
    cut: str,
    seed: int,
    train_dist: Workers = SINGLE,
    augment: str = "none",
    flip: bool = True,
    storage: str = "float32",
) -> Loaders:
    """Loaders of the frozen part's output, cut at `cut`, for the run that trains the rest.

    `cache.dist` shares the extraction, `train_dist` the training.

    - At the feature tensor (a head alone trains), the pooled features are small: computed once,
      cached, and held in memory.
    - Deeper cuts (frozen prefixes) are cached on disk as `storage` and read by rows, so memory
      stays flat as the data grows; when the cache budget cannot hold them, the prefix runs per
      batch instead.
    - With `augment` the training images change every epoch: their batches go through the
      prefix in onnxruntime as they come, and only validation and test are cached.
    """
    on_disk = cut != cache.feature_name and cache.dist.alone and bool(cache.model_sha256)
    wanted = {"validation": split.val, "test": split.test}
    if augment != "none":
        cache.log(
            f"running the frozen part with onnxruntime (cut at {cut}): once for the "
            f"{len(split.val) + len(split.test)} validation and test images, per batch for the "
            f"{len(split.train)} augmented training images"
        )
    else:
        total = len(split.train) + len(split.val) + len(split.test)
        cache.log(f"running the frozen part once with onnxruntime ({total} images, cut at {cut})")
        wanted = {"training": split.train, **wanted}
    datasets = {
        name: _cached_split(cache, samples, cut=cut, on_disk=on_disk, storage=storage)
        for name, samples in wanted.items()
    }
    per_batch = [name for name, dataset in datasets.items() if dataset is None]
    if per_batch:
        cache.log(
            f"the frozen part's output for the {', '.join(per_batch)} images does not fit the "
            "cache budget (ZOO_CACHE_BUDGET_GB) or the free disk: it runs per batch instead"
        )
    train_set = datasets.get("training")
    if train_set is None:  # augmented, or no room to cache: images through the prefix per batch
        images = ImageDataset(split.train, cache.preprocess, augment=augment, flip=flip, seed=seed)
        make_train = _TrainLoader(images, train_dist, seed, frozen=cache, cut=cut)
    else:
        make_train = _TrainLoader(train_set, train_dist, seed)
    return Loaders(
        make_train,
        _eval_loader(cache, datasets["validation"], split.val, cut=cut, dist=train_dist),
        _eval_loader(cache, datasets["test"], split.test, cut=cut, dist=train_dist),
    )


def _cached_split(
    cache: FeatureCache, samples: Sequence[Sample], *, cut: str, on_disk: bool, storage: str
) -> Any | None:
    """The split's cached outputs as a dataset, or None to run its prefix per batch."""
    if not on_disk:
        feats = cache.features(samples, cut)
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        return TensorDataset(torch.from_numpy(feats), labels)
    if not samples:
        return TensorDataset(torch.zeros(0), torch.zeros(0, dtype=torch.long))
    rows = cache.rows(samples, cut, storage=storage)
    if rows is None:
        return None
    return _RowsDataset(rows, [s.label for s in samples], range(len(samples)))


def _eval_loader(
    cache: FeatureCache, dataset: Any, samples: Sequence[Sample], *, cut: str, dist: Workers
) -> Iterable:
    """This worker's shard of an evaluation split, from its cached `dataset` or per batch."""
    shard = list(dist.shard(len(samples)))
    if dataset is None:  # no room to cache: unaugmented images through the prefix per batch
        images = ImageDataset([samples[i] for i in shard], cache.preprocess)
        loader = DataLoader(images, batch_size=EVAL_BATCH)
        return _PrefixBatches(loader, cache.session(cut), cache.input_name)
    if isinstance(dataset, _RowsDataset):
        return DataLoader(_RowsDataset(dataset.rows, dataset.labels, shard), batch_size=EVAL_BATCH)
    index = torch.tensor(shard, dtype=torch.long)
    subset = TensorDataset(*(t[index] for t in dataset.tensors))
    return DataLoader(subset, batch_size=EVAL_BATCH * 4)

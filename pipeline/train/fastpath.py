"""How the batches reach the trainable part: images through the whole model, or cached features.

Only as much of the network runs per epoch as needs to. With the `feature` strategy and no
augmentation the frozen backbone's output never changes, so onnxruntime computes it once
(cut graph, cached on disk) and training touches only the head. With augmentation on a CPU the
frozen prefix still runs in onnxruntime, per batch of augmented images, and torch computes
gradients only through the layers that train.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from pipeline.core.distributed import SINGLE, Workers
from pipeline.core.sessions import ort_session, run_batches, run_each

if TYPE_CHECKING:
    import numpy as np

    from pipeline.data.split import DataSplit, Sample
    from pipeline.train.loop import TrainConfig
    from zoo.catalog import Preprocess

EVAL_BATCH = 64


@dataclass
class TrainingSetup:
    """The module that sees the batches, its plan, and the loaders; `description` names the path."""

    model: nn.Module
    plan: Any
    make_train_loader: Callable[[int], Iterable]
    val_loader: Iterable
    test_loader: Iterable
    description: str
    dist: Workers = SINGLE  # the context training runs under (SINGLE: rank 0 trains alone)
    # Pooled train and validation features when only the head trains on cached features: the
    # head is then solved on them (pipeline.train.solve) instead of trained batch by batch.
    head_features: tuple[Any, Any] | None = None


def preprocessed_batch(samples: Sequence[Sample], preprocess: Preprocess) -> np.ndarray:
    """Eval-preprocessed images stacked into one float32 array in the model's layout."""
    import numpy as np

    from pipeline.data.images import open_for, preprocess_image

    arrays = [preprocess_image(open_for(s.ref, preprocess), preprocess) for s in samples]
    return np.stack(arrays).astype(np.float32)


def _image_loaders(
    split: DataSplit,
    preprocess: Preprocess,
    *,
    augment: str,
    flip: bool = True,
    config: TrainConfig,
    dist: Workers = SINGLE,
) -> tuple[Callable[[int], Iterable], Iterable, Iterable]:
    from torch.utils.data import DataLoader

    from pipeline.data.split import ImageDataset

    workers = 4 if config.device == "cuda" else 0
    pin = config.device == "cuda"
    train_set = ImageDataset(split.train, preprocess, augment=augment, flip=flip, seed=config.seed)

    def make_train_loader(batch_size: int) -> Iterable:
        return dist.train_loader(
            train_set, batch_size, seed=config.seed, num_workers=workers, pin_memory=pin
        )

    def eval_loader(samples: Sequence[Sample]) -> DataLoader:
        shard = [samples[i] for i in dist.shard(len(samples))]  # gathered again by evaluate()
        return DataLoader(
            ImageDataset(shard, preprocess),
            batch_size=EVAL_BATCH,
            num_workers=workers,
            pin_memory=pin,
        )

    return make_train_loader, eval_loader(split.val), eval_loader(split.test)


def _counted(batch: np.ndarray, bar: Any) -> np.ndarray:
    """`batch`, after advancing `bar` by its number of images."""
    bar.advance(len(batch))
    return batch


def _cut_session(imported: Any, value: str, made: dict[str, Any]) -> Any:
    """An onnxruntime session over the imported graph from its input to the ONNX value `value`,
    made once per `made` (one per run, shared by its splits)."""
    from pipeline.train import features

    if value not in made:
        probe = imported.probe
        cut = features.cut_at(imported.onnx_model, input_name=probe.input_name, output_name=value)
        made[value] = ort_session(cut)
    return made[value]


def cached_features(
    *,
    imported: Any,
    samples: Sequence[Sample],
    preprocess: Preprocess,
    cache_dir: Path,
    model_sha256: str,
    log: Callable[[str], None],
    value: str | None = None,
    dist: Workers = SINGLE,
    sessions: dict[str, Any] | None = None,
) -> np.ndarray:
    """The ONNX value `value` (default: the feature tensor) for `samples`, via onnxruntime, cached.

    Under `dist` every rank computes a shard and gets the whole array; rank 0 keeps the cache.
    `sessions` keeps the cut graph's onnxruntime session between calls (one per run, not per split).
    """
    import numpy as np

    from pipeline.core.progress import track
    from pipeline.train import features

    probe = imported.probe
    value = value or probe.feature_name
    if not samples:
        return np.empty((0,), dtype=np.float32)
    key = features.cache_key(
        model_sha256=model_sha256 or "unknown",
        feature_name=value,
        preprocess=preprocess.to_dict(),
        refs=[s.ref for s in samples],
    )
    found = features.load_cached(cache_dir, key) if model_sha256 and dist.is_main else None
    found = dist.broadcast_object(found)
    if found is not None and len(found) == len(samples):
        return found
    session = _cut_session(imported, value, {} if sessions is None else sessions)

    def compute(part: Sequence[Sample]) -> np.ndarray:
        with track(f"computing features of {len(part)} images", len(part)) as bar:
            batches = (
                _counted(preprocessed_batch(part[i : i + EVAL_BATCH], preprocess), bar)
                for i in range(0, len(part), EVAL_BATCH)
            )
            return run_batches(session, input_name=probe.input_name, batches=batches)

    result = dist.shard_features(compute, samples)
    if model_sha256 and dist.is_main:
        features.store_cached(cache_dir, key, result)
    return result


class _PrefixBatches:
    """Batches of augmented images with the frozen prefix applied by onnxruntime per batch.

    Yields (prefix output, labels) like a loader over cached prefixes, but the images differ every
    epoch. Exposes the wrapped loader's `generator` and `sampler`, which the epoch loop reseeds.
    """

    def __init__(self, loader: Any, session: Any, input_name: str) -> None:
        from pipeline.core.sessions import session_input_type

        self.loader, self.session, self.input_name = loader, session, input_name
        self.generator = getattr(loader, "generator", None)
        self.sampler = getattr(loader, "sampler", None)
        self.dtype = session_input_type(session)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Any:
        import numpy as np
        import torch

        from pipeline.core.sessions import as_input_type

        for images, labels in self.loader:
            batch = np.ascontiguousarray(as_input_type(images.numpy(), self.dtype))
            output = self.session.run(None, {self.input_name: batch})[0]
            yield torch.from_numpy(np.asarray(output, dtype=np.float32)), labels


# Frozen-prefix outputs are stored as float16: half the disk and reads of float32 (see BENCHMARKS.md
# for the accuracy measured against float32); pooled features for the head stay float32.
PREFIX_STORAGE = "float16"


class _RowsDataset:
    """(cached prefix row, label) read from disk per item: memory does not grow with the data."""

    def __init__(self, rows: Any, labels: Sequence[int], indices: Sequence[int]) -> None:
        self.rows, self.labels, self.indices = rows, list(labels), list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[Any, int]:
        import torch

        index = self.indices[item]
        return torch.from_numpy(self.rows.take([index])[0]), self.labels[index]


def prefix_rows(
    *,
    imported: Any,
    samples: Sequence[Sample],
    preprocess: Preprocess,
    cache_dir: Path,
    model_sha256: str,
    value: str,
    sessions: dict[str, Any],
) -> Any | None:
    """The ONNX value `value` for `samples`, cached on disk and read by rows (`features.Rows`).

    Computed batch by batch straight into the cache file. None when the cache's size budget or
    the free disk cannot hold it: the caller then runs the prefix per batch instead.
    """
    import itertools
    import shutil

    import numpy as np

    from pipeline.core.diskcache import budget_bytes
    from pipeline.core.progress import track
    from pipeline.train import features

    key = features.cache_key(
        model_sha256=model_sha256,
        feature_name=value,
        preprocess=preprocess.to_dict(),
        refs=[s.ref for s in samples],
        storage=PREFIX_STORAGE,
    )
    found = features.open_rows(cache_dir, key)
    if found is not None and len(found) == len(samples):
        return found
    session = _cut_session(imported, value, sessions)
    with track(f"caching the frozen part for {len(samples)} images", len(samples)) as bar:
        batches = run_each(
            session,
            input_name=imported.probe.input_name,
            batches=(
                _counted(preprocessed_batch(samples[i : i + EVAL_BATCH], preprocess), bar)
                for i in range(0, len(samples), EVAL_BATCH)
            ),
        )
        first = next(batches)
        need = first[0].size * np.dtype(PREFIX_STORAGE).itemsize * len(samples)
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        if need > min(budget_bytes(), shutil.disk_usage(cache_dir).free // 2):
            return None
        return features.store_rows(
            cache_dir,
            key,
            itertools.chain([first], batches),
            count=len(samples),
            dtype=PREFIX_STORAGE,
        )


def _feature_loaders(
    *,
    imported: Any,
    split: DataSplit,
    preprocess: Preprocess,
    config: TrainConfig,
    cache_dir: Path,
    model_sha256: str,
    log: Callable[[str], None],
    value: str | None = None,
    dist: Workers = SINGLE,
    train_dist: Workers = SINGLE,
    augment: str = "none",
    flip: bool = True,
) -> tuple[Callable[[int], Iterable], Iterable, Iterable]:
    """Loaders of the frozen part's output: `dist` shares the extraction, `train_dist` the training.

    - At the feature tensor (a head alone trains), the pooled features are small: computed once,
      cached, and held in memory.
    - Deeper cuts (frozen prefixes) are cached on disk and read by rows, so memory stays flat as
      the data grows; when the cache budget cannot hold them, the prefix runs per batch instead.
    - With `augment` the training images change every epoch: their batches go through the
      prefix in onnxruntime as they come, and only validation and test are cached.
    """
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from pipeline.data.split import ImageDataset

    sessions: dict[str, Any] = {}
    cut = value or imported.probe.feature_name
    on_disk = cut != imported.probe.feature_name and dist.alone and bool(model_sha256)
    per_batch: list[str] = []  # the splits whose prefix runs per batch (no room to cache it)

    def session() -> Any:
        return _cut_session(imported, cut, sessions)

    def in_memory(samples: Sequence[Sample]) -> TensorDataset:
        feats = cached_features(
            imported=imported,
            samples=samples,
            preprocess=preprocess,
            cache_dir=cache_dir,
            model_sha256=model_sha256,
            log=log,
            value=value,
            dist=dist,
            sessions=sessions,
        )
        labels = torch.tensor([s.label for s in samples], dtype=torch.long)
        return TensorDataset(torch.from_numpy(feats), labels)

    def cached(samples: Sequence[Sample], name: str) -> Any:
        """The split's cached outputs as a dataset, or None to run its prefix per batch."""
        if not on_disk:
            return in_memory(samples)
        if not samples:
            return TensorDataset(torch.zeros(0), torch.zeros(0, dtype=torch.long))
        rows = prefix_rows(
            imported=imported,
            samples=samples,
            preprocess=preprocess,
            cache_dir=cache_dir,
            model_sha256=model_sha256,
            value=cut,
            sessions=sessions,
        )
        if rows is None:
            per_batch.append(name)
            return None
        return _RowsDataset(rows, [s.label for s in samples], range(len(samples)))

    def eval_loader_of(dataset: Any, samples: Sequence[Sample]) -> Iterable:
        shard = list(train_dist.shard(len(samples)))
        if dataset is None:  # no room to cache: unaugmented images through the prefix per batch
            images = ImageDataset([samples[i] for i in shard], preprocess)
            return _PrefixBatches(
                DataLoader(images, batch_size=EVAL_BATCH), session(), imported.probe.input_name
            )
        if isinstance(dataset, _RowsDataset):
            return DataLoader(
                _RowsDataset(dataset.rows, dataset.labels, shard), batch_size=EVAL_BATCH
            )
        index = torch.tensor(shard, dtype=torch.long)
        return DataLoader(
            TensorDataset(*(t[index] for t in dataset.tensors)), batch_size=EVAL_BATCH * 4
        )

    if augment != "none":
        log(
            f"running the frozen part with onnxruntime (cut at {cut}): once for the "
            f"{len(split.val) + len(split.test)} validation and test images, per batch for the "
            f"{len(split.train)} augmented training images"
        )
        train_set = None
    else:
        total = len(split.train) + len(split.val) + len(split.test)
        log(f"running the frozen part once with onnxruntime ({total} images, cut at {cut})")
        train_set = cached(split.train, "training")
    val_set, test_set = cached(split.val, "validation"), cached(split.test, "test")
    if per_batch:
        log(
            f"the frozen part's output for the {', '.join(per_batch)} images does not fit the "
            "cache budget (ZOO_CACHE_BUDGET_GB) or the free disk: it runs per batch instead"
        )
    train_images = (
        ImageDataset(split.train, preprocess, augment=augment, flip=flip, seed=config.seed)
        if augment != "none" or (on_disk and train_set is None)
        else None
    )

    def make_train_loader(batch_size: int) -> Iterable:
        if train_images is None:
            return train_dist.train_loader(train_set, batch_size, seed=config.seed)
        loader = train_dist.train_loader(train_images, batch_size, seed=config.seed)
        return _PrefixBatches(loader, session(), imported.probe.input_name)

    return (
        make_train_loader,
        eval_loader_of(val_set, split.val),
        eval_loader_of(test_set, split.test),
    )


class _SuffixModel(nn.Module):
    """The trainable top of an adapted model: frozen-prefix output in, logits out (shared weights).

    With `channels_last` a 4-D prefix output is laid out [N, H, W, C] in memory (same shape):
    oneDNN's depthwise convolutions, most of a mobile network's backward pass, run ~2.4x faster
    so on a CPU, and a whole training step of Lite0's top 4 blocks ~1.3x (BENCHMARKS.md).
    """

    def __init__(
        self, suffix: Any, pool: nn.Module, head: nn.Module, *, channels_last: bool = False
    ) -> None:
        super().__init__()
        self.suffix, self.pool, self.head = suffix, pool, head
        self.channels_last = channels_last
        if channels_last:
            import torch

            self.suffix.to(memory_format=torch.channels_last)

    def forward(self, prefix_output: Any) -> Any:
        if self.channels_last and prefix_output.dim() == 4:
            import torch

            prefix_output = prefix_output.contiguous(memory_format=torch.channels_last)
        return self.head(self.pool(self.suffix(prefix_output)))


class _PlanOn:
    """A FreezePlan applied to the whole adapted model while batches go through a part of it."""

    def __init__(self, plan: Any, adapted: nn.Module) -> None:
        self.plan, self.adapted = plan, adapted

    def apply(self, model: nn.Module, epoch: int) -> bool:
        return self.plan.apply(self.adapted, epoch)

    def train_mode(self, model: nn.Module) -> None:
        self.plan.train_mode(self.adapted)

    def param_groups(self, model: nn.Module, **kwargs: Any) -> list[dict[str, Any]]:
        return self.plan.param_groups(self.adapted, **kwargs)


def _pooled(model: _SuffixModel, loader: Any, *, dim: int = 0) -> Any:
    """The [N, D] inputs of the head over a loader of cached features, in split order.

    `dim` is D for a split without images (a run without validation images), whose cache is empty.
    """
    import torch

    from pipeline.train.solve import FeatureSet

    cached, labels = loader.dataset.tensors
    if len(cached) == 0:
        return FeatureSet(torch.zeros(0, dim), labels)
    with torch.no_grad():
        features = model.pool(model.suffix(cached.to(next(model.head.parameters()).device)))
    return FeatureSet(features.float().cpu(), labels)


def suffix_from(adapted: nn.Module, boundary: str) -> Any | None:
    """The backbone from ONNX value `boundary` to the feature tensor, as a GraphModule sharing weights.

    None when a tensor other than `boundary` crosses the cut (then the prefix cannot be cached).
    """
    from torch import fx

    from pipeline.surgery.head import _value_node

    backbone = adapted.backbone
    start = _value_node(backbone, adapted.onnx_outputs, boundary)
    graph = fx.Graph()
    env: dict[Any, Any] = {}
    seen_start = False
    for node in backbone.graph.nodes:
        if node is start:
            env[node] = graph.placeholder("prefix_output")
            seen_start = True
            continue
        if not seen_start:
            if node.op == "get_attr":
                env[node] = graph.node_copy(node, lambda arg: env[arg])
            continue
        if any(isinstance(a, fx.Node) and a not in env for a in node.all_input_nodes):
            return None
        env[node] = graph.node_copy(node, lambda arg: env[arg])
    suffix = fx.GraphModule(backbone, graph)  # references, not copies: training updates `adapted`
    suffix.graph.eliminate_dead_code()
    suffix.recompile()
    return suffix


def prepare(
    *,
    strategy: str,
    augment: str,
    flip: bool = True,
    imported: Any,
    adapted: nn.Module,
    plan: Any,
    split: DataSplit,
    preprocess: Preprocess,
    config: TrainConfig,
    cache_dir: Path,
    model_sha256: str,
    log: Callable[[str], None],
    fast: bool = True,
    dist: Workers = SINGLE,
) -> TrainingSetup:
    """Pick the fastest path that gives the same result as training the whole model on images.

    `fast=False` forces the plain path (the tests compare both). Under `dist` the workers share
    the feature extraction; a head on cached features then trains on rank 0 alone (syncing its
    few gradients would cost more than computing them), everything else trains under DDP.
    """
    # On a GPU torch runs the frozen prefix faster than onnxruntime on the CPU would per batch.
    per_batch = augment != "none" and config.device == "cpu"
    if fast and (augment == "none" or per_batch) and strategy in ("feature", "finetune"):
        # What is frozen never changes: onnxruntime computes it (cut at the first trainable
        # layer, or at the feature tensor for `feature`), once for unaugmented images and per
        # batch for augmented ones, and torch trains the top.
        plan.apply(adapted, 0)  # the saved model records the frozen part as frozen
        boundary = plan.frozen_prefix_end(0)
        suffix = suffix_from(adapted, boundary) if boundary else None
        if suffix is not None:
            head_only = boundary == imported.probe.feature_name
            # A head alone is too small to be worth syncing: rank 0 trains it on everyone's features.
            train_dist = SINGLE if head_only else dist
            make_train, val, test = _feature_loaders(
                imported=imported,
                split=split,
                preprocess=preprocess,
                config=config,
                cache_dir=cache_dir,
                model_sha256=model_sha256,
                log=log,
                value=boundary,
                dist=dist,
                train_dist=train_dist,
                augment=augment,
                flip=flip,
            )
            model = _SuffixModel(
                suffix,
                adapted.pool,
                adapted.head,
                channels_last=config.device == "cpu" and not head_only,
            ).to(config.device)
            what = (
                "cached onnxruntime features"
                if head_only
                else "frozen prefix cached by onnxruntime"
            )
            if augment != "none":
                what = "augmented images through the frozen part in onnxruntime, per batch"
            pooled = None
            if head_only and augment == "none":
                train_features = _pooled(model, make_train(1))
                dim = train_features.features.shape[1]
                pooled = (train_features, _pooled(model, val, dim=dim))
            return TrainingSetup(
                model, _PlanOn(plan, adapted), make_train, val, test, what, train_dist, pooled
            )
    make_train, val, test = _image_loaders(
        split, preprocess, augment=augment, flip=flip, config=config, dist=dist
    )
    model = adapted.to(config.device)
    if config.channels_last:
        import torch

        model = model.to(memory_format=torch.channels_last)
    return TrainingSetup(model, plan, make_train, val, test, "images through the whole model", dist)

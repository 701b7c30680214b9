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

import torch
from torch import fx, nn

from pipeline.core.distributed import SINGLE, Workers
from pipeline.surgery.head import _value_node
from pipeline.surgery.strategies import get_strategy
from pipeline.train.features import EVAL_BATCH as EVAL_BATCH  # re-exported: its old home
from pipeline.train.features import FeatureCache
from pipeline.train.features import preprocessed_batch as preprocessed_batch  # re-exported
from pipeline.train.loaders import drawn_by_class, feature_loaders, image_loaders
from pipeline.train.solve import FeatureSet

if TYPE_CHECKING:
    import numpy as np

    from pipeline.core.samples import DataSplit, Sample
    from pipeline.train.loop import TrainConfig
    from zoo.catalog import Preprocess

# Frozen-prefix outputs are stored as float16: half the disk and reads of float32 (see BENCHMARKS.md
# for the accuracy measured against float32); pooled features for the head stay float32.
PREFIX_STORAGE = "float16"


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

    `FeatureCache.features` for one call. Under `dist` every rank computes a shard and gets the
    whole array; rank 0 keeps the cache. `sessions` keeps the cut graph's onnxruntime session
    between calls (one per run, not per split).
    """
    cache = FeatureCache(
        imported=imported,
        preprocess=preprocess,
        cache_dir=cache_dir,
        model_sha256=model_sha256,
        log=log,
        dist=dist,
        sessions={} if sessions is None else sessions,
    )
    return cache.features(samples, value)


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
            self.suffix.to(memory_format=torch.channels_last)

    def forward(self, prefix_output: Any) -> Any:
        if self.channels_last and prefix_output.dim() == 4:
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


def _frozen_part_setup(
    cache: FeatureCache,
    *,
    adapted: nn.Module,
    plan: Any,
    split: DataSplit,
    config: TrainConfig,
    augment: str,
    flip: bool,
) -> TrainingSetup | None:
    """Torch trains the top on the frozen part's output from `cache`; None when it cannot be cut."""
    plan.apply(adapted, 0)  # the saved model records the frozen part as frozen
    boundary = plan.frozen_prefix_end(0)
    suffix = suffix_from(adapted, boundary) if boundary else None
    if suffix is None:
        return None
    head_only = boundary == cache.feature_name
    # A head alone is too small to be worth syncing: rank 0 trains it on everyone's features.
    train_dist = SINGLE if head_only else cache.dist
    make_train, val, test = feature_loaders(
        cache,
        split,
        cut=boundary,
        seed=config.seed,
        train_dist=train_dist,
        augment=augment,
        flip=flip,
        storage=PREFIX_STORAGE,
    )
    make_train = drawn_by_class(make_train, split.train, config)
    model = _SuffixModel(
        suffix, adapted.pool, adapted.head, channels_last=config.device == "cpu" and not head_only
    ).to(config.device)
    what = "cached onnxruntime features" if head_only else "frozen prefix cached by onnxruntime"
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
    if fast and (augment == "none" or per_batch) and get_strategy(strategy).fast_path:
        # What is frozen never changes: onnxruntime computes it (cut at the first trainable
        # layer, or at the feature tensor for `feature`), once for unaugmented images and per
        # batch for augmented ones, and torch trains the top.
        cache = FeatureCache(
            imported=imported,
            preprocess=preprocess,
            cache_dir=cache_dir,
            model_sha256=model_sha256,
            log=log,
            dist=dist,
        )
        setup = _frozen_part_setup(
            cache,
            adapted=adapted,
            plan=plan,
            split=split,
            config=config,
            augment=augment,
            flip=flip,
        )
        if setup is not None:
            return setup
    make_train, val, test = image_loaders(
        split, preprocess, augment=augment, flip=flip, config=config, dist=dist
    )
    make_train = drawn_by_class(make_train, split.train, config)
    model = adapted.to(config.device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return TrainingSetup(model, plan, make_train, val, test, "images through the whole model", dist)

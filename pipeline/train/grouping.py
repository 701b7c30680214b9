"""Duplicates kept inside one part of every split zoo makes.

`load_source` takes a `group_by` (pipeline.data.sources); `split_grouper` is the one `zoo adapt`,
`zoo compare`, `zoo rank` and `zoo check` all pass, so that the same `--seed` gives the same
split in each. It groups on the frozen features of one model whatever model a run adapts: the
bundled EfficientNet-Lite0, taken from the workspace when fetched, else built once into the
workspace's cache (fetching it would change which model `zoo adapt` takes by default).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pipeline.convert import importcache
from pipeline.convert.normalisation import normalise
from pipeline.convert.probe import probe
from pipeline.core.samples import Sample
from pipeline.data.facts import facts_dir, file_facts
from pipeline.train.check import canonical, comparable, find_twins, source_features
from pipeline.train.features import FeatureCache
from zoo.bundled import DEFAULT_BUNDLED, build_bundled
from zoo.errors import NotFound
from zoo.files import atomic_write, sha256_file
from zoo.onnxfile import load_onnx
from zoo.workspace import Workspace


class Backbone(NamedTuple):
    """What a FeatureCache needs of a model: its normalised graph and where its features are."""

    onnx_model: Any
    probe: Any


@dataclass
class TwinGrouper:
    """The `group_by` of `load_source`: a group id per sample, duplicates sharing one.

    The same features whatever model a run adapts (the grouping model's, made on first use by
    `make_cache`), so that the same `--seed` gives the same split in `zoo rank`, `zoo compare`
    and `zoo adapt`.
    """

    make_cache: Callable[[], FeatureCache]
    facts_dir: Path | None
    log: Callable[[str], None]
    found: list[list[str]] = field(default_factory=list)  # the groups of the last call
    _cache: FeatureCache | None = None

    def feature_cache(self) -> FeatureCache:
        """The grouping model's FeatureCache, made once (opening the graph takes seconds)."""
        if self._cache is None:
            self._cache = self.make_cache()
        return self._cache

    def __call__(self, samples: Sequence[Sample]) -> list[int]:
        order = canonical(samples)
        if len(order) < 3:
            return list(range(len(samples)))
        facts = file_facts([s.ref for s in order], cache_dir=self.facts_dir)
        # Images too small to compare are grouped by their bytes alone: no model needed.
        cache = self.feature_cache() if comparable(facts) else None
        features = source_features(cache, None, order) if cache is not None else None
        groups = find_twins(cache, order, features, facts).groups(len(order))
        group_of = dict(zip((s.ref for s in order), groups, strict=True))
        by_group: dict[int, list[str]] = {}
        for sample in samples:
            by_group.setdefault(group_of[sample.ref], []).append(sample.ref)
        self.found = [refs for refs in by_group.values() if len(refs) > 1]
        if self.found:
            images = sum(len(g) for g in self.found)
            self.log(
                f"kept {len(self.found)} group(s) of duplicate images ({images} images) "
                "inside one part of the split each"
            )
        return [group_of[s.ref] for s in samples]


def split_grouper(workspace: Workspace, log: Callable[[str], None]) -> TwinGrouper:
    """The grouping every split zoo makes goes through (the bundled EfficientNet-Lite0's)."""
    return TwinGrouper(lambda: grouping_cache(workspace, log), facts_dir(workspace.models_dir), log)


_GRAPHS: dict[str, Backbone] = {}  # normalised bundled graphs by sha256, made once per process


def grouping_cache(workspace: Workspace, log: Callable[[str], None]) -> FeatureCache:
    """The frozen backbone of the bundled EfficientNet-Lite0, at its own preprocessing."""
    path, sha256 = bundled_file(workspace)
    if sha256 not in _GRAPHS:
        _GRAPHS[sha256] = _normalised_backbone(workspace, path)
    return FeatureCache(
        imported=_GRAPHS[sha256],
        preprocess=workspace.catalog.resolve(DEFAULT_BUNDLED).preprocess,
        cache_dir=workspace.features_dir,
        model_sha256=sha256,
        log=log,
    )


def _normalised_backbone(workspace: Workspace, path: Path) -> Backbone:
    # Normalising the graph takes seconds: kept with the checked imports, keyed by the file.
    key = importcache.cache_key(path, purpose="frozen features")
    found = importcache.load(workspace.imports_dir, key)
    graph = found[0] if found else normalise(load_onnx(path))[0]
    if found is None:
        importcache.store(workspace.imports_dir, key, graph, {})
    return Backbone(graph, probe(graph))


_BUILT: dict[str, Path] = {}  # bundled files built by this process: copied, not built again


def bundled_file(workspace: Workspace) -> tuple[Path, str]:
    """The bundled EfficientNet-Lite0: the workspace's fetched copy, else one built into its cache.

    Not fetched into the workspace: that would change which model `zoo adapt` takes by default.
    """
    try:
        opened = workspace.open(DEFAULT_BUNDLED)
        return opened.path, opened.card["sha256"]
    except NotFound:
        pass
    built = workspace.cache_dir / "bundled" / f"{DEFAULT_BUNDLED}.onnx"
    if not built.is_file():
        earlier = _BUILT.get(DEFAULT_BUNDLED)
        if earlier is not None and earlier.is_file():
            atomic_write(built, lambda tmp: shutil.copyfile(earlier, tmp))
        else:
            build_bundled(built, name=DEFAULT_BUNDLED)
        _BUILT[DEFAULT_BUNDLED] = built
    return built, sha256_file(built)

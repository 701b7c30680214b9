"""The one Registry helper behind runtimes, augmentations, strategies, built-in sets and head kinds."""

from __future__ import annotations

import pytest

from pipeline.core.registry import Registry
from zoo.errors import DataError, NotFound, UnsupportedModel


def test_registry_keeps_order_refuses_duplicates_and_lists_known_names() -> None:
    colours: Registry[int] = Registry("colour", also=("black",))

    @colours.decorator("red", lambda fn: fn())
    def red() -> int:
        return 1

    colours.add("green", 2)
    assert red() == 1  # the decorator hands back what it decorated
    assert list(colours) == ["red", "green"] and colours["green"] == 2 and len(colours) == 2
    assert colours.names() == ["black", "red", "green"]
    assert "red" in colours and "blue" not in colours and colours.get("blue") is None
    with pytest.raises(ValueError, match="colour 'red' is already registered"):
        colours.add("red", 3)
    with pytest.raises(ValueError, match="already registered"):
        colours.add("black", 3)
    assert colours["red"] == 1  # the refused entry replaced nothing
    with pytest.raises(NotFound, match=r"unknown colour 'blue'; choose from black, red, green$"):
        colours.lookup("blue")
    with pytest.raises(KeyError):
        colours["blue"]


def test_registry_error_class_and_shown_names() -> None:
    sets: Registry[str] = Registry("set", error=DataError, shown=lambda n: "builtin:" + n)
    sets.add("digits", "d")
    with pytest.raises(DataError, match=r"unknown set 'builtin:x'; choose from builtin:digits"):
        sets.lookup("x")
    assert sets.lookup("digits") == "d"


def test_the_pipeline_registries_share_the_helper() -> None:
    from pipeline.convert.probe import HEAD_KINDS, head_kind
    from pipeline.data.images import AUGMENTATIONS, BUILTIN_SETS, build_augmentation
    from pipeline.data.sources import load_source
    from pipeline.export.runtimes import RUNTIME_CHECKS, runtime_check
    from pipeline.surgery import STRATEGIES, get_strategy
    from zoo.catalog import Preprocess

    for registry in (AUGMENTATIONS, BUILTIN_SETS, HEAD_KINDS, RUNTIME_CHECKS, STRATEGIES):
        assert isinstance(registry, Registry) and len(registry) >= 1
    with pytest.raises(NotFound, match="choose from ort, opencv"):
        runtime_check("coreml")
    with pytest.raises(NotFound, match="unknown strategy 'x'; choose from feature, finetune"):
        get_strategy("x")
    with pytest.raises(UnsupportedModel, match="unknown head kind 'x'; choose from gemm"):
        head_kind("x")
    with pytest.raises(DataError, match="unknown augmentation 'x'; choose from none, light"):
        build_augmentation("x", Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3))
    with pytest.raises(DataError, match="'builtin:x'; choose from builtin:digits"):
        load_source("builtin:x")

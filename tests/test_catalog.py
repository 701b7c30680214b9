"""The catalog: every zoo classifier as data, aliases, private catalogs."""

from __future__ import annotations

import json
import re

import pytest

from zoo.catalog import BUNDLED_NAME, Preprocess, describe_entry, load_catalog
from zoo.errors import NotFound, ZooError


def test_catalog_holds_every_zoo_classifier_and_the_bundled_model() -> None:
    catalog = load_catalog()
    zoo_entries = [e for e in catalog.values() if e.source == "onnx-model-zoo"]
    assert len(zoo_entries) == 94
    assert BUNDLED_NAME in catalog
    for entry in zoo_entries:
        assert re.fullmatch(r"[0-9a-f]{64}", entry.sha256), entry.name
        assert entry.size and entry.size > 0
        assert entry.urls[0].startswith("https://huggingface.co/onnxmodelzoo/")
        assert entry.urls[-1].startswith("https://github.com/onnx/models/")
        assert entry.layout in ("NCHW", "NHWC")


@pytest.mark.parametrize(
    ("alias", "name"),
    [
        ("mobilenet", "mobilenetv2-12"),
        ("resnet", "resnet50-v1-12"),
        ("squeezenet", "squeezenet1.1-7"),
        ("efficientnet", "efficientnet-lite4-11"),
        ("MobileNet", "mobilenetv2-12"),
        ("lite0", BUNDLED_NAME),
    ],
)
def test_aliases_resolve_to_sensible_defaults(alias: str, name: str) -> None:
    assert load_catalog().resolve(alias).name == name


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(NotFound, match="did you mean.*mobilenet.*zoo list"):
        load_catalog().resolve("mobilnet")


def test_quirks_are_recorded() -> None:
    catalog = load_catalog()
    lite4 = catalog.resolve("efficientnet-lite4-11")
    assert lite4.layout == "NHWC" and lite4.input_name == "images:0"
    assert lite4.output_kind == "probabilities"
    assert lite4.preprocess == Preprocess(
        mean=(127.0,) * 3, std=(128.0,) * 3, scale=1.0, resize=256, crop=224, layout="NHWC"
    )
    assert catalog.resolve("densenet-12").output_kind == "logits-4d"
    assert catalog.resolve("squeezenet1.0-12").output_kind == "probabilities-4d"
    googlenet = catalog.resolve("googlenet-12").preprocess
    assert googlenet.bgr and googlenet.scale == 1.0 and googlenet.resize_mode == "direct"
    mnist = catalog.resolve("mnist").preprocess
    assert mnist.channels == 1 and mnist.crop == 28


def test_info_flags_doubtful_preprocessing() -> None:
    catalog = load_catalog()
    unknown = dict(describe_entry(catalog.resolve("inception-v2-9")))
    assert unknown["preprocessing"].startswith("unknown")
    low = [e for e in catalog.values() if e.preprocess_confidence == "low"][0]
    assert "verify before trusting" in dict(describe_entry(low))["preprocessing"]


def test_preprocess_at_size_keeps_the_crop_ratio() -> None:
    imagenet = Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3)
    assert imagenet.at_size(112).resize == 128 and imagenet.at_size(112).crop == 112
    assert Preprocess.from_dict(imagenet.to_dict()) == imagenet


def test_preprocess_input_shape_follows_the_layout() -> None:
    gray_nhwc = Preprocess(mean=(0.5,), std=(0.5,), crop=28, layout="NHWC", channels=1)
    assert gray_nhwc.input_shape() == (28, 28, 1)
    assert gray_nhwc.input_shape("NCHW") == (1, 28, 28)
    assert Preprocess(mean=(0.5,) * 3, std=(0.5,) * 3).input_shape() == (3, 224, 224)


def test_private_catalog_merges_and_overrides(tmp_path, monkeypatch) -> None:
    private = tmp_path / "private.json"
    private.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "name": "acme-net",
                        "aliases": ["acme"],
                        "urls": ["http://models.internal/acme.onnx"],
                        "sha256": "AB" * 32,
                        "size": 10,
                        "input": {"name": "x", "shape": [1, 3, 96, 96], "layout": "NCHW"},
                        "preprocess": {
                            "mean": [0, 0, 0],
                            "std": [1, 1, 1],
                            "crop": 96,
                            "resize": 96,
                        },
                    }
                ]
            }
        )
    )
    catalog = load_catalog(private)
    entry = catalog.resolve("acme")
    assert entry.source == "user" and entry.sha256 == "ab" * 32 and entry.preprocess.crop == 96
    assert len(catalog) == 98  # 94 zoo files, 3 bundled models, 1 private entry
    monkeypatch.setenv("ZOO_CATALOG", str(private))
    assert "acme-net" in load_catalog()


def test_broken_private_catalog_is_one_clear_error(tmp_path) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ZooError, match="not valid JSON"):
        load_catalog(bad)
    bad.write_text(json.dumps([{"aliases": []}]))
    with pytest.raises(ZooError, match="malformed"):
        load_catalog(bad)
    with pytest.raises(NotFound, match="does not exist"):
        load_catalog(tmp_path / "missing.json")

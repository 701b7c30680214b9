"""zoo.workspace: finding fetched models again, checking them, listing them, naming them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from httpserver import LocalServer, http_server, no_proxy
from test_cache import MODEL, MODEL_SHA, OTHER, OTHER_SHA, catalog_of, entry

from zoo.cache import fetch
from zoo.errors import ChecksumMismatch, InvalidModelFile, NotFound, ZooError
from zoo.workspace import check_name, default_name, latest_model, list_workspace, open_model

__all__ = ["http_server", "no_proxy"]  # fixtures used by name


def test_open_model_detects_corruption_and_force_repairs(
    http_server: LocalServer, tmp_path: Path
) -> None:
    url = http_server.serve("/tiny-1.onnx", MODEL)
    models = tmp_path / "models"
    catalog = catalog_of(entry((url,)))
    fetched = fetch("tiny", models_dir=models, catalog=catalog, progress=False)
    path, card = open_model("tiny", models_dir=models, catalog=catalog)  # an alias finds it too
    assert path == fetched.path and card["sha256"] == MODEL_SHA

    with open(fetched.path, "r+b") as handle:  # one flipped byte, as a bad disk would
        handle.seek(len(MODEL) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0xFF]))
    with pytest.raises(ChecksumMismatch, match="zoo fetch tiny-1 --force"):
        open_model("tiny-1", models_dir=models, catalog=catalog)
    repaired = fetch("tiny-1", models_dir=models, catalog=catalog, force=True, progress=False)
    assert not repaired.cached
    assert open_model("tiny-1", models_dir=models, catalog=catalog).path.read_bytes() == MODEL
    assert (models / "blobs" / MODEL_SHA).read_bytes() == MODEL
    with pytest.raises(NotFound, match="zoo fetch nothing-here"):
        open_model("nothing-here", models_dir=models, catalog=catalog)


def test_list_and_latest(tmp_path: Path) -> None:
    models = tmp_path / "models"
    assert list_workspace(models) == [] and latest_model(models) is None
    for name, data in (("b-model", MODEL), ("a-model", OTHER)):
        source = tmp_path / f"{name}.onnx"
        source.write_bytes(data)
        fetch(str(source), models_dir=models, catalog=catalog_of(), progress=False)
    listed = list_workspace(models)
    assert [m.name for m in listed] == ["a-model", "b-model"]
    assert [m.sha256 for m in listed] == [OTHER_SHA, MODEL_SHA]
    assert latest_model(models).name == "a-model"  # type: ignore[union-attr]


def test_names(tmp_path: Path) -> None:
    assert default_name("https://host/a/mobilenetv2-12.tar.gz?x=1") == "mobilenetv2-12"
    assert default_name("/tmp/My Model (2).onnx") == "My-Model--2"
    assert default_name("https://host/") == "model"
    assert check_name("resnet50-v1-7") == "resnet50-v1-7"
    for bad in ("../up", "blobs", ".hidden", "a/b", ""):
        with pytest.raises(ZooError, match="--name my-model"):
            check_name(bad)


def test_open_model_plain_file_and_damaged_card(tmp_path: Path) -> None:
    models = tmp_path / "models"
    plain = tmp_path / "mine.onnx"
    plain.write_bytes(MODEL)
    opened = open_model(str(plain), models_dir=models, catalog=catalog_of())
    assert (
        opened.path == plain
        and opened.card["sha256"] == MODEL_SHA
        and opened.card["name"] == "mine"
    )
    fetched = fetch(str(plain), models_dir=models, catalog=catalog_of(), progress=False)
    (fetched.card_path).write_text("{not json")
    with pytest.raises(InvalidModelFile, match="zoo fetch mine --force"):
        open_model("mine", models_dir=models, catalog=catalog_of())
    assert list_workspace(models) == []  # a model without a readable card is not listed


def test_open_model_names_a_run_directory_or_folder_given_as_the_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models"
    run = tmp_path / "runs" / "flowers"
    run.mkdir(parents=True)
    (run / "run.json").write_text("{}")
    with pytest.raises(NotFound, match=r"is a run of `zoo adapt`, not a model: pass an \.onnx"):
        open_model(str(run), models_dir=models, catalog=catalog_of())
    (run / "model.onnx").write_bytes(MODEL)  # exported: that file is what to pass
    with pytest.raises(NotFound, match=f"pass {run / 'model.onnx'}, or a fetched model's name"):
        open_model(str(run), models_dir=models, catalog=catalog_of())
    with pytest.raises(NotFound, match="runs/ is a folder, not a model"):
        open_model(f"{tmp_path}/runs/", models_dir=models, catalog=catalog_of())
    # A bare name is a model still to fetch, even beside a folder of that name.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(NotFound, match="run `zoo fetch runs` first"):
        open_model("runs", models_dir=models, catalog=catalog_of())


@pytest.mark.slow
def test_a_bundled_model_opens_without_a_fetch(tmp_path: Path) -> None:
    """The bundled EfficientNet-Lite models are built offline: naming one is enough."""
    from zoo.cache import open_or_build
    from zoo.catalog import load_catalog

    models = tmp_path / "models"
    with pytest.raises(NotFound, match="run `zoo fetch lite0` first"):  # opening alone: no
        open_model("lite0", models_dir=models, catalog=load_catalog())
    opened = open_or_build("lite0", models_dir=models, catalog=load_catalog())
    assert opened.path == models / "efficientnet-lite0" / "model.onnx" and opened.path.is_file()
    assert opened.card["name"] == "efficientnet-lite0"
    with pytest.raises(NotFound, match="run `zoo fetch mobilenetv2-12` first"):  # not bundled
        open_or_build("mobilenetv2-12", models_dir=models, catalog=load_catalog())

"""A file is known by what it is: catalog entries by sha256, preprocessing from the user, refusals in one line."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import shutil
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from httpserver import LocalServer, http_server, no_proxy, tiny_model_bytes
from image_builders import make_image_folder
from onnx import TensorProto, helper, numpy_helper
from onnx_builders import gemm_head, nhwc_softmax, save

from cli import main
from zoo import cache, quantized
from zoo.cache import fetch
from zoo.catalog import IMAGENET_PREPROCESS, ArchiveSpec, Catalog, ModelEntry, Preprocess
from zoo.errors import InvalidModelFile, UnsupportedModel, ZooError
from zoo.preprocess import (
    PRESETS,
    InputSignature,
    PreprocessRequest,
    input_signature,
    model_preprocess,
    resolve_preprocess,
)
from zoo.workspace import card_entry, open_model

__all__ = ["http_server", "no_proxy"]  # fixtures used by name

MODEL = tiny_model_bytes(seed=1)
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
OFFLINE = ("http://nonexistent.invalid/tiny-1.onnx",)
TINY_PRE = Preprocess(mean=(0.5,), std=(0.25,), resize=4, resize_mode="direct", crop=4, channels=1)


def tiny_entry(**changes: object) -> ModelEntry:
    entry = ModelEntry(
        name="tiny-1",
        family="tiny",
        urls=OFFLINE,
        sha256=MODEL_SHA,
        size=len(MODEL),
        opset=13,
        input_name="x",
        input_shape=(None, 4),
        layout="NCHW",
        output_kind="logits",
        num_classes=3,
        preprocess=TINY_PRE,
        preprocess_confidence="high",
        preprocess_note="",
        top1=None,
        licence="MIT",
        path="validated/vision/classification/tiny/model/tiny-1.onnx",
    )
    return dataclasses.replace(entry, **changes)  # type: ignore[arg-type]


@pytest.fixture()
def untrusted_probe_forbidden(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Records every child-process probe: a file the catalog vouches for must not need one."""
    probed: list[Path] = []
    monkeypatch.setattr("zoo.cache.probe_in_child", lambda path, **_: probed.append(path))
    return probed


def card_of(result: cache.FetchResult) -> dict:
    return json.loads(result.card_path.read_text())


# --- 1. identity by sha256 ------------------------------------------------------------------


def test_local_file_with_a_catalog_sha_takes_the_entry_and_is_trusted(
    tmp_path: Path, untrusted_probe_forbidden: list[Path]
) -> None:
    local = tmp_path / "downloaded copy.onnx"
    local.write_bytes(MODEL)
    models, catalog = tmp_path / "models", Catalog([tiny_entry()])
    result = fetch(str(local), models_dir=models, catalog=catalog, progress=False)
    assert result.name == "tiny-1" and card_of(result)["entry"]["name"] == "tiny-1"
    assert card_of(result)["entry"]["preprocess"]["crop"] == 4
    assert untrusted_probe_forbidden == []  # trusted like a catalog download
    named = fetch(local.as_uri(), name="mine", models_dir=models, catalog=catalog, progress=False)
    assert named.name == "mine" and card_of(named)["entry"]["name"] == "tiny-1"
    # A file of other content keeps its file name, has no entry and is probed in a child.
    other = tmp_path / "other.onnx"
    other.write_bytes(tiny_model_bytes(seed=2))
    plain = fetch(str(other), models_dir=models, catalog=catalog, progress=False)
    assert plain.name == "other" and card_of(plain)["entry"] is None
    assert len(untrusted_probe_forbidden) == 1


def test_fetch_by_name_then_the_same_file_locally_is_one_model(tmp_path: Path) -> None:
    local = tmp_path / "tiny-1.onnx"
    local.write_bytes(MODEL)
    models = tmp_path / "models"
    catalog = Catalog([tiny_entry(urls=(local.as_uri(),))])
    first = fetch("tiny-1", models_dir=models, catalog=catalog, progress=False)
    again = fetch(str(local), models_dir=models, catalog=catalog, progress=False)
    assert again.cached and again.name == first.name == "tiny-1"


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_tar_gz_is_known_by_its_model_or_its_own_sha(
    tmp_path: Path, untrusted_probe_forbidden: list[Path]
) -> None:
    archive = _tar_gz({"tiny/model.onnx": MODEL, "tiny/test_data_set_0/input_0.pb": b"x"})
    local = tmp_path / "bundle.tar.gz"
    local.write_bytes(archive)
    models = tmp_path / "models"
    by_model = fetch(str(local), models_dir=models, catalog=Catalog([tiny_entry()]), progress=False)
    assert by_model.name == "tiny-1" and card_of(by_model)["entry"]["name"] == "tiny-1"
    assert not (models / "bundle").exists()
    # The zoo's own archive, recognised before anything is extracted.
    spec = {"path": "t/tiny-1.tar.gz", "sha256": hashlib.sha256(archive).hexdigest(), "size": 1}
    catalog = Catalog([tiny_entry(archive=ArchiveSpec(urls=(), **spec))])
    plan = cache._plan(str(local), catalog=catalog, name=None, sha256=None, mirror=None)
    assert plan.name == "tiny-1" and plan.entry is not None and plan.sha256 == MODEL_SHA
    assert untrusted_probe_forbidden == []


def test_url_without_a_name_is_named_by_the_catalog_or_its_file(
    http_server: LocalServer, tmp_path: Path, untrusted_probe_forbidden: list[Path]
) -> None:
    models, catalog = tmp_path / "models", Catalog([tiny_entry()])
    known = http_server.serve("/files/renamed.onnx", MODEL)
    result = fetch(known, models_dir=models, catalog=catalog, progress=False)
    assert result.name == "tiny-1" and card_of(result)["entry"]["name"] == "tiny-1"
    nameless = http_server.serve("/download", MODEL)
    assert fetch(nameless, models_dir=models, catalog=catalog, progress=False).name == "tiny-1"
    unknown = http_server.serve("/get?id=3", tiny_model_bytes(seed=3))
    with pytest.raises(ZooError, match="pass --name"):
        fetch(unknown, models_dir=models, catalog=catalog, progress=False)
    by_file = http_server.serve("/models/classifier.onnx", tiny_model_bytes(seed=3))
    assert fetch(by_file, models_dir=models, catalog=catalog, progress=False).name == "classifier"
    assert untrusted_probe_forbidden == [] or len(untrusted_probe_forbidden) == 1


def test_card_without_entry_finds_it_by_sha256(tmp_path: Path) -> None:
    catalog = Catalog([tiny_entry()])
    folder = tmp_path / "models" / "old"
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(MODEL)
    card = {"name": "old", "source": "file:///x", "source_url": "", "sha256": MODEL_SHA,
            "size": len(MODEL), "entry": None}  # fmt: skip
    (folder / "card.json").write_text(json.dumps(card))
    path, opened = open_model("old", models_dir=tmp_path / "models", catalog=catalog)
    assert card_entry(opened, catalog).name == "tiny-1"
    assert model_preprocess(opened, path, catalog=catalog) == TINY_PRE
    with pytest.raises(UnsupportedModel, match="--preprocess imagenet"):
        model_preprocess(opened, path, catalog=Catalog([]))


# --- 2. preprocessing for files the catalog does not know ----------------------------------


def test_presets_and_flags_layer_over_what_is_known() -> None:
    nchw_224 = input_signature(gemm_head())._replace(size=224)
    imagenet = resolve_preprocess(None, PreprocessRequest(preset="imagenet"), nchw_224, name="m")
    assert imagenet == IMAGENET_PREPROCESS
    caffe = resolve_preprocess(None, PreprocessRequest(preset="caffe"), None, name="m")
    assert caffe.bgr and caffe.scale == 1.0 and caffe.std == (1.0, 1.0, 1.0)
    assert (caffe.resize, caffe.crop) == (256, 224)
    inception = PRESETS["inception"]
    assert inception.mean == (0.5,) * 3 and inception.scale == pytest.approx(1 / 255)
    raw = resolve_preprocess(None, PreprocessRequest(preset="raw", size=96), None, name="m")
    assert (raw.resize, raw.crop, raw.resize_mode, raw.mean) == (96, 96, "direct", (0.0,) * 3)
    # --size keeps the preset's 256/224 ratio; explicit flags win over the preset.
    flags = PreprocessRequest.from_flags(
        preset="imagenet", size="112", mean="0.5", std="0.5,0.5,0.5", scale="1/255", bgr=True
    )
    sized = resolve_preprocess(None, flags, None, name="m")
    assert (sized.resize, sized.crop, sized.mean, sized.bgr) == (128, 112, (0.5,) * 3, True)
    # Flags over a known entry keep its layout, channels and size.
    layered = resolve_preprocess(TINY_PRE, PreprocessRequest(std=(0.5,)), None, name="m")
    assert (layered.std, layered.crop, layered.channels) == ((0.5,), 4, 1)
    with pytest.raises(UnsupportedModel, match=r"--preprocess imagenet\|inception\|caffe\|raw"):
        resolve_preprocess(None, PreprocessRequest(size=64), None, name="m")
    for bad in ({"mean": "1,2"}, {"scale": "x"}, {"std": "0"}):
        with pytest.raises(ZooError, match="--"):
            PreprocessRequest.from_flags(**bad)


def test_layout_channels_and_size_are_probed_and_overridable() -> None:
    nhwc = input_signature(nhwc_softmax())
    assert (nhwc.layout, nhwc.channels, nhwc.size, nhwc.name) == ("NHWC", 3, 8, "images:0")
    pre = resolve_preprocess(None, PreprocessRequest(preset="imagenet"), nhwc, name="m")
    assert (pre.layout, pre.crop, pre.resize) == ("NHWC", 8, 9)
    gray = nhwc._replace(layout="NCHW", channels=1, size=28)
    mono = resolve_preprocess(None, PreprocessRequest(preset="imagenet"), gray, name="m")
    assert mono.channels == 1 and len(mono.mean) == 1 and mono.input_shape() == (1, 28, 28)
    forced = PreprocessRequest(preset="raw", layout="NHWC", channels=1, size=16)
    silent = InputSignature("x", None, None, None)  # dynamic dims: the flags decide
    over = resolve_preprocess(None, forced, silent, name="m")
    assert over.input_shape() == (16, 16, 1) and over.mean == (0.0,)
    for contradiction in ({"size": 16}, {"layout": "NCHW"}, {"channels": 1}):
        with pytest.raises(ZooError, match=r"\(fixed in its graph\), not --"):
            resolve_preprocess(
                None, PreprocessRequest(preset="raw", **contradiction), nhwc, name="m"
            )


@pytest.mark.slow
def test_fetch_with_flags_records_a_user_entry_and_adapt_uses_it(tmp_path: Path) -> None:
    source = save(gemm_head(), tmp_path / "mine.onnx")
    models = tmp_path / "models"
    runner = CliRunner()
    ask = runner.invoke(main, ["--models-dir", str(models), "fetch", str(source)])
    assert ask.exit_code == 0
    data = make_image_folder(tmp_path / "data", {"a": 6, "b": 6}, size=(12, 12))
    adapt_args = ["--models-dir", str(models), "adapt", "mine", "--data", str(data)]
    cheap = ["--strategy", "feature", "--epochs", "1", "--out", str(tmp_path / "run")]
    refused = runner.invoke(main, [*adapt_args, *cheap])
    assert refused.exit_code == 1 and "--preprocess imagenet|inception|caffe|raw" in refused.stderr
    assert not (tmp_path / "run").exists()  # refused before a run directory was made
    given = runner.invoke(
        main, ["--models-dir", str(models), "fetch", str(source), "--preprocess", "inception"]
    )
    assert given.exit_code == 0, given.stderr
    entry = json.loads((models / "mine" / "card.json").read_text())["entry"]
    assert entry["source"] == "user" and entry["num_classes"] == 5
    assert entry["preprocess"]["mean"] == [0.5, 0.5, 0.5] and entry["preprocess"]["crop"] == 8
    done = runner.invoke(main, [*adapt_args, *cheap, "--mean", "0.4"])
    assert done.exit_code == 0, done.stderr
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["preprocess"]["mean"] == [0.4, 0.4, 0.4] and record["preprocess"]["crop"] == 8
    assert record["options"]["preprocess"]["mean"] == [0.4]


def _with_zoo_metadata(model: onnx.ModelProto, preprocess: Preprocess) -> onnx.ModelProto:
    from pipeline.export.write import encode_metadata

    props = encode_metadata(
        {"labels": ["cat", "dog", "fox", "owl", "elk"], "preprocess": preprocess}
    )
    for key, value in props.items():
        model.metadata_props.add(key=key, value=value)
    return model


def test_a_zoo_exported_file_needs_no_flags(tmp_path: Path) -> None:
    carried = dataclasses.replace(PRESETS["caffe"], resize=9, crop=8)
    source = save(_with_zoo_metadata(gemm_head(), carried), tmp_path / "exported.onnx")
    result = fetch(str(source), models_dir=tmp_path / "models", catalog=Catalog([]), progress=False)
    entry = card_of(result)["entry"]
    assert entry["num_classes"] == 5 and Preprocess.from_dict(entry["preprocess"]) == carried
    # A card written before (entry null) still finds it in the file.
    card = {**card_of(result), "entry": None}
    assert model_preprocess(card, result.path, catalog=Catalog([])) == carried


def test_predict_takes_the_flags_for_a_bare_file(tmp_path: Path) -> None:
    from image_builders import write_rgb

    source = save(gemm_head(), tmp_path / "bare.onnx")
    image = write_rgb(tmp_path / "x.png", size=(20, 20), seed=1)
    runner = CliRunner()
    refused = runner.invoke(main, ["predict", str(source), str(image)])
    assert refused.exit_code == 1 and "--preprocess" in refused.stderr
    done = runner.invoke(
        main, ["predict", str(source), str(image), "--preprocess", "raw", "--json"]
    )
    assert done.exit_code == 0, done.stderr
    top = json.loads(done.stdout)["predictions"][0]["top"]
    assert len(top) == 5 and {t["label"] for t in top} == {"0", "1", "2", "3", "4"}


# --- 3. quantized files -------------------------------------------------------------------


def _quantized_graph(kind: str) -> onnx.ModelProto:
    scale = numpy_helper.from_array(np.array(0.1, dtype=np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, dtype=np.uint8), "z")
    if kind == "qdq":
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"]),
        ]
        out_type = TensorProto.FLOAT
    else:
        nodes = [
            helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
            helper.make_node("QLinearAdd", ["q", "s", "z", "q", "s", "z", "s", "z"], ["y"],
                             domain="com.microsoft"),
        ]  # fmt: skip
        out_type = TensorProto.UINT8
    graph = helper.make_graph(
        nodes,
        "q",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", out_type, [1, 4])],
        [scale, zero],
    )
    opsets = [helper.make_opsetid("", 13), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 7
    return model


@pytest.mark.parametrize("kind", ["qdq", "qlinear"])
def test_quantized_graphs_are_refused_naming_the_float_sibling(tmp_path: Path, kind: str) -> None:
    from pipeline.convert import import_model

    models, catalog = tmp_path / "models", Catalog([tiny_entry()])
    sibling = save(
        _quantized_graph(kind), tmp_path / f"tiny-1-{'qdq' if kind == 'qdq' else 'int8'}.onnx"
    )
    with pytest.raises(UnsupportedModel, match=r"quantized model .*fetch `tiny-1` \(fp32\)"):
        fetch(str(sibling), models_dir=models, catalog=catalog, progress=False)
    orphan = save(_quantized_graph(kind), tmp_path / "orphan.onnx")
    with pytest.raises(UnsupportedModel, match="bring the float"):
        fetch(str(orphan), models_dir=models, catalog=catalog, progress=False)
    assert not models.exists() or not any(p.name != "blobs" and not p.name.startswith(".") for p in models.iterdir())  # fmt: skip
    with pytest.raises(UnsupportedModel, match="quantized model"):
        import_model(orphan, name="orphan")
    # `zoo check MODEL` and `zoo rank` open the frozen backbone without torch: the same line.
    from pipeline.train.rank import open_backbone

    with pytest.raises(UnsupportedModel, match="quantized model"):
        open_backbone(orphan, name="orphan")


def test_adapting_a_quantized_file_names_the_float_model_not_its_preprocessing(
    tmp_path: Path,
) -> None:
    """No --preprocess makes a quantized graph trainable: the one error says what would."""
    from click.testing import CliRunner

    from cli import main

    orphan = save(_quantized_graph("qlinear"), tmp_path / "orphan.onnx")
    argv = ["--models-dir", str(tmp_path / "models"), "adapt", str(orphan), "--data", "builtin:digits"]  # fmt: skip
    result = CliRunner().invoke(main, argv)
    assert result.exit_code != 0
    assert "quantized model" in result.output and "bring the float" in result.output
    assert "preprocesses images" not in result.output


def test_the_zoos_quantized_files_are_known_by_sha256(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    listed = quantized.QuantizedFile("tiny-1-int8", MODEL_SHA, "int8 (QLinear ops)", "tiny-1")
    monkeypatch.setattr(quantized, "known_quantized", lambda: {MODEL_SHA: listed})
    local = tmp_path / "renamed.onnx"
    local.write_bytes(MODEL)
    with pytest.raises(UnsupportedModel, match=r"the zoo's int8-quantized tiny-1 .*fetch `tiny-1`"):
        fetch(str(local), models_dir=tmp_path / "models", catalog=Catalog([]), progress=False)
    assert len(quantized.QUANTIZED_FILE.read_text()) > 0
    assert len(json.loads(quantized.QUANTIZED_FILE.read_text())) == 24


# --- 4. non-model files -------------------------------------------------------------------


def _zip_bytes() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("model.onnx", MODEL)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "said"),
    [
        (b"<!DOCTYPE html>\n<html><body>GitHub</body></html>", "an HTML page, not an ONNX model: was it saved from a browser"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 3\n", "a Git LFS pointer"),
        (b"", "an empty file"),
        (_zip_bytes(), "a zip archive"),
        (b'{"model": "resnet"}', "a JSON file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(32), "a PNG image"),
    ],
)  # fmt: skip
def test_a_local_non_model_is_named_as_what_it_is(
    tmp_path: Path, content: bytes, said: str
) -> None:
    local = tmp_path / "saved-page.onnx"
    local.write_bytes(content)
    with pytest.raises(InvalidModelFile, match="saved-page.onnx is") as caught:
        fetch(str(local), models_dir=tmp_path / "models", catalog=Catalog([]), progress=False)
    assert said in str(caught.value) and "network" not in str(caught.value)
    code = CliRunner().invoke(main, ["--models-dir", str(tmp_path / "m"), "fetch", str(local)])
    assert code.exit_code == 1 and len(code.stderr.strip().splitlines()) == 1


# --- real material ------------------------------------------------------------------------


def test_real_zoo_files_are_known_by_sha256(shared_dir: Path, tmp_path: Path) -> None:
    from zoo.catalog import load_catalog

    catalog = load_catalog()
    models = tmp_path / "models"
    local = fetch(str(shared_dir / "models" / "mnist-8.onnx"), models_dir=models, catalog=catalog, progress=False)  # fmt: skip
    assert local.name == "mnist-8" and card_of(local)["entry"]["name"] == "mnist-8"
    mirror = tmp_path / "mirror" / "validated/vision/classification/mnist/model"
    mirror.mkdir(parents=True)
    shutil.copy(shared_dir / "models" / "mnist-8.onnx", mirror)
    by_name = fetch("mnist-8", mirror=str(tmp_path / "mirror"), models_dir=tmp_path / "m2", catalog=catalog, progress=False)  # fmt: skip
    assert card_of(by_name)["entry"]["name"] == "mnist-8"
    int8 = shared_dir / "models" / "shufflenet-v2-12-int8.onnx"
    with pytest.raises(UnsupportedModel, match=r"fetch `shufflenet-v2-12` \(fp32\)"):
        fetch(str(int8), models_dir=models, catalog=catalog, progress=False)
    # Fetched before this refusal existed (any name): inspect says the same.
    old = models / "old"
    old.mkdir()
    shutil.copy(int8, old / "model.onnx")
    card = {"name": "old", "source": "x", "source_url": "x", "size": 1, "entry": None,
            "sha256": hashlib.sha256(int8.read_bytes()).hexdigest()}  # fmt: skip
    (old / "card.json").write_text(json.dumps(card))
    inspect = CliRunner().invoke(main, ["--models-dir", str(models), "inspect", "old"])
    assert inspect.exit_code == 1 and "fetch `shufflenet-v2-12` (fp32)" in inspect.stderr


def test_real_third_party_file_takes_a_preset(shared_dir: Path, tmp_path: Path) -> None:
    source = shared_dir / "models" / "pp-lcnet-orientation.onnx"
    request = PreprocessRequest(preset="imagenet")
    result = fetch(str(source), name="lcnet", preprocess=request, models_dir=tmp_path, catalog=Catalog([]), progress=False)  # fmt: skip
    entry = card_of(result)["entry"]
    assert entry["num_classes"] == 4 and entry["input_name"] == "x"
    assert Preprocess.from_dict(entry["preprocess"]) == IMAGENET_PREPROCESS


def test_preprocess_flags_reach_distributed_workers(tmp_path: Path) -> None:
    import click

    from cli import _argv_of

    seen: list[list[str]] = []
    adapt = main.commands["adapt"]
    original = adapt.callback

    @click.pass_context
    def capture(ctx: click.Context, **_: object) -> None:
        seen.append(_argv_of(ctx))

    adapt.callback = capture
    try:
        flags = ["--preprocess", "caffe", "--mean", "1,2,3", "--rgb", "--layout", "nhwc"]
        CliRunner().invoke(main, ["adapt", "m.onnx", *flags], catch_exceptions=False)
    finally:
        adapt.callback = original
    argv = seen[0]
    assert argv[argv.index("--preprocess") + 1] == "caffe" and "--rgb" in argv
    assert argv[argv.index("--mean") + 1] == "1,2,3" and argv[argv.index("--layout") + 1] == "NHWC"
    assert "--size" not in argv and "--bgr" not in argv

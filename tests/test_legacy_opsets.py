"""Opset 1-6 files: upgraded before anything opens them (zoo.legacy), through fetch -> verify."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from legacy_builders import KINDS, legacy_classifier, save
from onnx import TensorProto, helper, numpy_helper

from cli import main
from zoo.catalog import load_catalog
from zoo.errors import UnsupportedModel
from zoo.legacy import (
    TARGET_OPSET,
    UnupgradableModel,
    newest_sibling,
    refusal,
    runnable,
    upgrade_opset,
)
from zoo.onnxfile import declared_opset, runnable_source

SIZE = 16
CLASSES = 3


def run_ort(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options)
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def sample(kind: str) -> np.ndarray:
    channels = 1 if kind == "cntk" else 3
    return np.random.default_rng(1).standard_normal((1, channels, SIZE, SIZE)).astype(np.float32)


# --- the upgrade itself ----------------------------------------------------------------------

# What each kind's old idioms must be reported as, at opsets before 5 and at opset 6.
EXPECTED_NOTES = {
    "caffe": (
        ["Reshape shape attribute made an input", "Gemm broadcast dropped", "Dropout"],
        ["Gemm broadcast dropped", "Dropout is_test dropped"],
    ),
    "bn": (
        ["BatchNormalization consumed_inputs/is_test/spatial dropped (3 nodes)", "Sum"],
        ["BatchNormalization is_test/spatial dropped (3 nodes)"],
    ),
    "squeeze": (
        ["Relu consumed_inputs dropped", "Softmax over trailing 1x1 axes kept as one node"],
        ["Softmax over trailing 1x1 axes kept as one node"],
    ),
    "shuffle": (
        ["Reshape shape attribute made an input (2 nodes)", "BatchNormalization"],
        ["Gemm broadcast dropped"],
    ),
    "cntk": (
        [
            "Add consumed_inputs/broadcast/axis dropped",
            "2 broadcast initializers given trailing 1s",
        ],
        ["Add broadcast/axis dropped", "2 broadcast initializers given trailing 1s"],
    ),
}


@pytest.mark.parametrize("opset", [1, 3, 6])
@pytest.mark.parametrize("kind", KINDS)
def test_upgrade_matches_the_same_network_built_today(kind: str, opset: int) -> None:
    old = legacy_classifier(kind, opset)
    x = sample(kind)
    with pytest.raises(Exception, match="implementation|data type"):
        run_ort(old, x)  # what a user met before: no kernels for the old opset
    upgrade = upgrade_opset(old)
    assert (upgrade.from_opset, upgrade.to_opset) == (opset, TARGET_OPSET)
    onnx.checker.check_model(upgrade.model)
    reference = run_ort(legacy_classifier(kind, TARGET_OPSET), x)
    np.testing.assert_allclose(run_ort(upgrade.model, x), reference, atol=1e-5)
    early, late = EXPECTED_NOTES[kind]
    summary = upgrade.summary()
    assert summary.startswith(f"upgraded from opset {opset} to {TARGET_OPSET}: ")
    for phrase in early if opset < 5 else late:
        assert phrase in summary, summary
    assert "value_info entr" in summary and "unnamed nodes named after their outputs" in summary
    assert all(node.name for node in upgrade.model.graph.node)
    # The stored original is never touched: the upgrade works on a copy.
    assert default_opset_of(old) == opset


def default_opset_of(model: onnx.ModelProto) -> int:
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def test_notes_name_each_old_idiom() -> None:
    upgrade = upgrade_opset(legacy_classifier("bn", 3))
    assert upgrade.notes == (
        "BatchNormalization consumed_inputs/is_test/spatial dropped (3 nodes)",
        "Relu consumed_inputs dropped (3 nodes)",
        "Sum consumed_inputs dropped (1 node)",
        "Reshape shape attribute made an input (1 node)",
        "Gemm broadcast dropped (1 node)",
        "1 value_info entry of undefined type dropped",
        "15 unnamed nodes named after their outputs",
    )


def test_runnable_leaves_new_files_alone() -> None:
    modern = legacy_classifier("bn", TARGET_OPSET)
    assert runnable(modern) is modern
    assert default_opset_of(runnable(legacy_classifier("bn", 6))) == TARGET_OPSET


def _one_node(
    node: onnx.NodeProto, opset: int, inits: list[onnx.TensorProto] = ()
) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        list(inits),
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 4
    return model


def test_broadcast_along_an_axis_of_a_computed_tensor_is_unsqueezed() -> None:
    # Add(broadcast=1, axis=1) of a [C] tensor computed in the graph: B needs trailing 1s, and
    # onnx's own rewrite unsqueezes to A's full rank (wrong), so zoo inserts the Unsqueeze itself.
    nodes = [
        helper.make_node("ReduceMean", ["x"], ["mean"], axes=[0, 2, 3], keepdims=0),
        helper.make_node("Add", ["x", "mean"], ["y"], broadcast=1, axis=1),
    ]
    graph = helper.make_graph(
        nodes,
        "bias",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 4, 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 6)])
    model.ir_version = 3
    upgrade = upgrade_opset(model)
    assert "1 broadcast input unsqueezed" in upgrade.notes
    x = np.random.default_rng(0).standard_normal((1, 3, 4, 4)).astype(np.float32)
    expected = x + x.mean(axis=(0, 2, 3))[:, None, None]
    np.testing.assert_allclose(run_ort(upgrade.model, x), expected, atol=1e-6)


def _stats(shape: tuple[int, ...]) -> list[onnx.TensorProto]:
    return [numpy_helper.from_array(np.ones(shape, np.float32), name) for name in "sbmv"]


@pytest.mark.parametrize(
    ("model", "reason"),
    [
        (
            _one_node(helper.make_node("Pad", ["x"], ["y"], paddings=[0, 0, 1, 1, 0, 0, 1, 1]), 1),
            "cannot upgrade Pad past opset 1",
        ),
        (
            _one_node(
                helper.make_node(
                    "BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], spatial=0, is_test=1
                ),
                6,
                _stats((3, 4, 4)),
            ),
            "spatial must have value 1",
        ),
        (
            _one_node(helper.make_node("ImageScaler", ["x"], ["y"], scale=1.0), 6),
            "ImageScaler is not an ONNX operator",
        ),
        (
            _one_node(
                helper.make_node(
                    "BatchNormalization", ["x", "s", "b", "m", "v"], ["y", "m"], is_test=0
                ),
                6,
                _stats((3,)),
            ),
            "training-only output",
        ),
    ],
    ids=["pad-1", "bn-spatial0", "experimental-op", "bn-training-output"],
)
def test_what_cannot_be_upgraded_is_said_in_one_line(model: onnx.ModelProto, reason: str) -> None:
    with pytest.raises(UnupgradableModel) as caught:
        upgrade_opset(model)
    assert isinstance(caught.value, UnsupportedModel)
    assert reason in caught.value.reason and "\n" not in str(caught.value)
    assert str(caught.value).endswith("re-export it at opset 7 or newer")


def test_newest_sibling_is_the_same_model_at_its_newest_opset() -> None:
    catalog = load_catalog()
    expected = {
        "bvlcalexnet-3": "bvlcalexnet-12",
        "squeezenet1.0-6": "squeezenet1.0-12",
        "resnet50-caffe2-v1-3": "resnet50-caffe2-v1-9",
        "shufflenet-6": "shufflenet-9",
        "inception-v2-3": "inception-v2-9",
        "vgg19-caffe2-6": "vgg19-caffe2-9",
        "mnist-1": "mnist-12",
    }
    for name, sibling in expected.items():
        assert newest_sibling(catalog, catalog[name]).name == sibling
    old = [entry for entry in catalog.values() if entry.opset is not None and entry.opset < 7]
    assert len(old) == 25 and all(newest_sibling(catalog, entry) for entry in old)
    error = refusal(
        UnupgradableModel(3, "no adapter"),
        name="bvlcalexnet-3",
        entry=catalog["bvlcalexnet-3"],
        catalog=catalog,
    )
    assert str(error) == (
        "bvlcalexnet-3 (opset 3) cannot be upgraded to an opset onnxruntime runs (no adapter); "
        "fetch bvlcalexnet-12 instead"
    )


def test_declared_opset_reads_the_header_only(tmp_path: Path) -> None:
    old = save(legacy_classifier("caffe", 3), tmp_path / "old.onnx")
    new = save(legacy_classifier("caffe", TARGET_OPSET), tmp_path / "new.onnx")
    assert declared_opset(old) == 3 and declared_opset(new) == TARGET_OPSET
    assert declared_opset(tmp_path / "missing.onnx") is None
    (tmp_path / "page.html").write_text("<html>not a model</html>")
    assert declared_opset(tmp_path / "page.html") is None
    assert runnable_source(new) == str(new)
    upgraded = onnx.load_from_string(runnable_source(old))
    assert default_opset_of(upgraded) == TARGET_OPSET


def test_real_cntk_file_taken_back_to_old_opsets_upgrades_to_the_same_outputs(
    shared_dir: Path,
) -> None:
    # The zoo's mnist-8 (CNTK) written at opsets 1/3/6 by onnx's own converter has mnist-1's idioms.
    from onnx import version_converter

    real = onnx.load(str(shared_dir / "models" / "mnist-8.onnx"))
    x = np.random.default_rng(0).standard_normal((1, 1, 28, 28)).astype(np.float32)
    reference = run_ort(real, x)
    for opset in (1, 3, 6):
        old = version_converter.convert_version(real, opset)
        np.testing.assert_allclose(run_ort(upgrade_opset(old).model, x), reference, atol=1e-4)


# --- through the command line ----------------------------------------------------------------


def zoo(*args: str, models_dir: Path, catalog: Path | None = None) -> tuple[int, str, str]:
    prefix = ["--models-dir", str(models_dir)] + (["--catalog", str(catalog)] if catalog else [])
    result = CliRunner().invoke(main, [*prefix, *args], catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def catalog_entry(name: str, path: Path, *, family: str, opset: int, kind: str = "bn") -> dict:
    channels = 1 if kind == "cntk" else 3
    return {
        "name": name,
        "family": family,
        "opset": opset,
        "urls": [path.as_uri()],
        "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "size": path.stat().st_size,
        "input": {"layout": "NCHW"},
        "output_kind": {"squeeze": "probabilities-4d", "cntk": "logits"}.get(kind, "probabilities"),
        "num_classes": CLASSES,
        "preprocess": {
            "mean": [0.5] * channels,
            "std": [0.25] * channels,
            "resize": SIZE,
            "crop": SIZE,
            "channels": channels,
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kind", "opset"), [("bn", 1), ("caffe", 3), ("squeeze", 6), ("cntk", 1), ("cntk", 6)]
)
def test_old_opset_classifier_goes_fetch_inspect_adapt_export_verify(
    tmp_path: Path, kind: str, opset: int
) -> None:
    from image_builders import write_rgb

    name = f"old-{kind}-{opset}"
    path = save(legacy_classifier(kind, opset), tmp_path / f"{name}.onnx")
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps([catalog_entry(name, path, family=f"old-{kind}", opset=opset, kind=kind)])
    )
    models = tmp_path / "models"

    code, _, err = zoo("fetch", name, models_dir=models, catalog=catalog)
    assert code == 0, err
    stored = models / name / "model.onnx"
    # The stored file keeps its bytes: its sha256 is still the catalog's.
    assert stored.read_bytes() == path.read_bytes()

    code, out, err = zoo("inspect", name, "--json", models_dir=models, catalog=catalog)
    assert code == 0, err
    report = json.loads(out)
    assert (report["opset"], report["upgraded_opset"]) == (opset, TARGET_OPSET)
    assert report["opset_line"] == f"{opset} (upgraded to 13 for onnxruntime and the importer)"
    assert report["notes"][0].startswith(f"upgraded from opset {opset} to 13: ")
    assert report["probe"]["num_classes"] == CLASSES
    code, out, err = zoo("inspect", name, models_dir=models, catalog=catalog)
    assert code == 0 and "upgraded to 13 for onnxruntime and the importer" in out

    run = tmp_path / "run"
    code, out, err = zoo(
        "adapt", name, "--data", "builtin:digits", "--epochs", "1", "--strategy", "finetune",
        "--train-per-class", "5", "--image-size", str(SIZE), "--device", "cpu", "--out", str(run),
        "--json", models_dir=models, catalog=catalog,
    )  # fmt: skip
    assert code == 0, err
    assert (run / "metrics.json").exists()

    code, out, err = zoo("export", str(run), "--json", models_dir=models, catalog=catalog)
    assert code == 0, err
    exported = run / "model.onnx"
    assert declared_opset(exported) >= TARGET_OPSET

    code, out, err = zoo("verify", str(exported), models_dir=models, catalog=catalog)
    assert code == 0, err
    # The original file runs too, upgraded on the way into onnxruntime.
    image = write_rgb(tmp_path / "photo.png", size=(SIZE, SIZE), seed=3)
    code, out, err = zoo(
        "predict", str(stored), str(image), "--json", models_dir=models, catalog=catalog
    )
    assert code == 0, err
    assert len(json.loads(out)["predictions"][0]["top"]) == CLASSES
    # verify on the original (fixed batch 1, no zoo metadata): a verdict, opencv reading it upgraded.
    code, out, err = zoo("verify", str(stored), "--runtimes", "ort,opencv", models_dir=models)
    assert code == 1 and "internal error" not in err
    # OpenCV gets the upgraded bytes too; whether it supports each layer (Gemm) is its own affair.
    assert "opencv: " in out + err and "no class names" in out + err
    if kind == "squeeze":
        assert "opencv: pass" in out + err


def unupgradable(tmp_path: Path) -> Path:
    """A classifier-shaped opset-1 file with a Pad-1, which onnx cannot upgrade."""
    model = legacy_classifier("caffe", 1)
    pad = helper.make_node("Pad", ["data_0"], ["padded"], paddings=[0, 0, 0, 0, 0, 0, 0, 0])
    for node in model.graph.node:
        if "data_0" in node.input:
            node.input[list(node.input).index("data_0")] = "padded"
    model.graph.node.insert(0, pad)
    return save(model, tmp_path / "alexnet-old.onnx")


def test_catalog_file_that_cannot_be_upgraded_is_refused_naming_its_sibling(tmp_path: Path) -> None:
    path = unupgradable(tmp_path)
    newer = save(legacy_classifier("caffe", TARGET_OPSET), tmp_path / "alexnet-new.onnx")
    catalog = tmp_path / "catalog.json"
    catalog.write_text(
        json.dumps(
            [
                catalog_entry("tinyalex-1", path, family="tinyalex", opset=1),
                catalog_entry("tinyalex-13", newer, family="tinyalex", opset=13),
            ]
        )
    )
    code, out, err = zoo("fetch", "tinyalex-1", models_dir=tmp_path / "models", catalog=catalog)
    assert code == 1 and out == ""
    lines = err.strip().splitlines()
    assert lines == [
        "zoo: error: tinyalex-1 (opset 1) cannot be upgraded to an opset onnxruntime runs "
        "(onnx's version converter cannot upgrade Pad past opset 1); fetch tinyalex-13 instead"
    ]
    assert not (tmp_path / "models" / "tinyalex-1").exists()


def test_local_files_at_old_opsets_are_upgraded_in_the_child_check(tmp_path: Path) -> None:
    # A file nobody vouched for is opened in a child process: the upgrade happens there too.
    models = tmp_path / "models"
    good = save(legacy_classifier("shuffle", 3), tmp_path / "mine.onnx")
    code, out, err = zoo("fetch", str(good), "--name", "mine", models_dir=models)
    assert code == 0, err
    assert (models / "mine" / "model.onnx").read_bytes() == good.read_bytes()

    bad = unupgradable(tmp_path)
    code, _, err = zoo("fetch", str(bad), "--name", "bad", models_dir=models)
    assert code == 1
    assert err.strip().splitlines() == [
        "zoo: error: bad (opset 1) cannot be upgraded to an opset onnxruntime runs "
        "(onnx's version converter cannot upgrade Pad past opset 1); "
        "re-export it at opset 7 or newer"
    ]

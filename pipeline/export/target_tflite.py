"""The `tflite` target: a LiteRT (TensorFlow Lite) flatbuffer for phones and microcontrollers.

    RUN/deploy/tflite/model.tflite     float32, NHWC input
                      README.md, labels.txt, preprocess.json

Converted by onnx2tf, which runs in its own virtual environment (`.venv-tflite`, made by `make`
from pipeline/export/tflite-requirements.txt): onnx2tf and TensorFlow pin numpy, onnx,
onnxruntime, opencv-python and protobuf versions that would silently break zoo's own (README,
"Deploy"). The result runs here with `ai-edge-litert`. Three workarounds keep onnx2tf offline and
honest: it downloads a calibration sample for small fixed-batch image inputs unless one lies in
its working directory, it rewrites its `-i` file in place, and it finds `onnxsim` on PATH.
LiteRT has no antialiased resize, so an embedded file takes pixels resized and cropped by the app.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator, Sequence
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

MODEL_FILE = "model.tflite"
ROOT = Path(__file__).resolve().parents[2]  # the checkout, where `make` puts .venv-tflite
CALIBRATION = "calibration_image_sample_data_20x128x128x3_float32.npy"  # onnx2tf's sample name
CONVERT_SECONDS = 1800  # onnx2tf on 2 cores: ~45 s for efficientnet-lite0, minutes for big models
CHUNK = 64  # images per invoke, to bound memory
HOW_TO_GET = "run `make tflite-venv` for onnx2tf and `pip install -e \".[deploy]\"` for ai-edge-litert (`make test` and `make demo` do both)"  # fmt: skip


def tflite_venv() -> Path:
    """onnx2tf's virtual environment: $ZOO_TFLITE_VENV, else .venv-tflite in the checkout."""
    return Path(os.environ.get("ZOO_TFLITE_VENV") or ROOT / ".venv-tflite")


def tflite_missing() -> str | None:
    """None when onnx2tf's venv and ai-edge-litert are installed, else what is missing."""
    if importlib.util.find_spec("ai_edge_litert") is None:
        return "ai-edge-litert is not installed"
    python = tflite_venv() / "bin" / "python"
    if not os.access(python, os.X_OK):
        return f"onnx2tf's virtual environment {tflite_venv()} is missing"
    return None


def onnx2tf_command(source: TargetInput, work: Path) -> list[str]:
    """The onnx2tf call on the copy in `work`: float32, quiet, NHWC inputs kept as they are."""
    command = [str(tflite_venv() / "bin" / "python"), "-m", "onnx2tf"]
    command += ["-i", str(work / "model.onnx"), "-o", str(work / "out"), "-n"]
    if source.embedded or source.preprocess.layout == "NHWC":
        # onnx2tf reads 4-D inputs as NCHW and transposes them; pixels are NHWC already.
        command += ["-kat", source.input_name]
    return command


def convert_tflite(source: TargetInput, folder: Path) -> Path:
    """ONNX -> float32 .tflite by onnx2tf in its own venv, with README, labels and preprocessing."""
    with tempfile.TemporaryDirectory(prefix="zoo-onnx2tf-") as tmp:
        work = Path(tmp)
        # onnx2tf rewrites its input file (simplified, renamed ops): it gets a copy.
        shutil.copyfile(source.onnx_path, work / "model.onnx")
        # Offline, onnx2tf would download this sample for some inputs; it looks in its cwd first.
        sample = np.random.default_rng(0).uniform(0, 1, (20, 128, 128, 3)).astype(np.float32)
        np.save(work / CALIBRATION, sample)
        path = f"{tflite_venv() / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"  # its onnxsim
        env = {**os.environ, "PATH": path, "CUDA_VISIBLE_DEVICES": "-1", "TF_CPP_MIN_LOG_LEVEL": "3"}  # fmt: skip
        try:
            done = subprocess.run(onnx2tf_command(source, work), cwd=work, env=env, capture_output=True, text=True, timeout=CONVERT_SECONDS)  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise ZooError(f"onnx2tf took over {CONVERT_SECONDS} s on {source.onnx_path.name}; export the other targets without tflite") from exc  # fmt: skip
        produced = work / "out" / "model_float32.tflite"
        if done.returncode != 0 or not produced.is_file():
            raise UnsupportedModel(
                f"onnx2tf could not convert {source.onnx_path.name} ({_last_error(done)}); "
                "check the file with `zoo verify FILE --runtimes tflite`, or export without tflite"
            )
        shutil.copyfile(produced, folder / MODEL_FILE)
    write_companions(folder, source)
    (folder / "README.md").write_text(readme(source))
    return folder / MODEL_FILE


def _last_error(done: subprocess.CompletedProcess[str]) -> str:
    """The line of onnx2tf's output that says what went wrong (its last error, else its last line)."""
    lines = [line.strip() for line in (done.stdout + "\n" + done.stderr).splitlines() if line.strip()]  # fmt: skip
    errors = [line for line in lines if "Error" in line or "ERROR" in line]
    return ((errors or lines or [f"exit status {done.returncode}"])[-1])[:300]


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """LiteRT's C++ prints "Created TensorFlow Lite XNNPACK delegate" on fd 2; keep it off screen."""
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def interpreter(model_path: Path) -> Any:
    """A LiteRT interpreter on every core (XNNPACK), tensors not yet allocated."""
    from ai_edge_litert.interpreter import Interpreter

    with _quiet_stderr():
        return Interpreter(model_path=str(model_path), num_threads=os.cpu_count() or 1)


def run_tflite(
    model_path: Path, inputs: np.ndarray | Sequence[np.ndarray], *, output: str = "probs"
) -> np.ndarray:
    """Probabilities [N, C] from LiteRT, or another output's values; NCHW float inputs are fed
    transposed to NHWC."""
    runner = interpreter(model_path).get_signature_runner()
    (input_name, detail), *_ = runner.get_input_details().items()
    signature = list(detail["shape_signature"])
    outputs = list(runner.get_output_details())
    if output not in outputs and output != "probs":
        raise ZooError(f"tflite: the flatbuffer has no {output} output; export again")
    read = output if output in outputs else outputs[0]  # a file without `probs`: its first
    fixed = signature[0] if signature and signature[0] > 0 else None
    rows = []
    for batch in as_batches(inputs, fixed or CHUNK):
        batch = _nhwc(batch, signature).astype(detail["dtype"], copy=False)
        with _quiet_stderr():
            rows.append(runner(**{input_name: batch})[read])
    if output != "probs":
        return np.concatenate(rows).reshape(-1)
    return probs_of(np.concatenate(rows), named_probs=read == "probs")


def _nhwc(batch: np.ndarray, signature: list[int]) -> np.ndarray:
    """`batch` as the flatbuffer's input takes it: NCHW images moved to NHWC where it expects so."""

    def fits(shape: tuple[int, ...]) -> bool:
        return len(shape) == len(signature) and all(s in (-1, d) for s, d in zip(signature[1:], shape[1:], strict=False))  # fmt: skip

    if batch.ndim == 4 and not fits(batch.shape) and fits(batch.transpose(0, 2, 3, 1).shape):
        return np.ascontiguousarray(batch.transpose(0, 2, 3, 1))
    return batch


def readme(source: TargetInput) -> str:
    """The folder's README.md: how to run the flatbuffer with LiteRT in Python, and what it takes."""
    pre = source.preprocess
    size, channels, classes = pre.crop, pre.channels, len(source.labels)
    if source.embedded:
        takes = f"**uint8** pixels, **NHWC** `[N, {size}, {size}, {channels}]`. Scaling, normalisation and layout are inside the file, the resize is not (LiteRT has no antialiased resize): the app resizes and crops as below"  # fmt: skip
        feed = app_resize_python(pre)
    else:
        takes = f"**float32**, **NHWC** `[N, {size}, {size}, {channels}]` (onnx2tf moved the channels last), preprocessed as `preprocess.json` says (x = (pixel * scale - mean) / std)"  # fmt: skip
        feed = f"pixels = preprocessed  # float32 [1, {size}, {size}, {channels}], see preprocess.json"  # fmt: skip
    return f"""# LiteRT (TensorFlow Lite) flatbuffer

Written by `zoo export --target tflite` (onnx2tf, float32); it agreed with the PyTorch model on
the run's held-out images, run by the `ai-edge-litert` interpreter.

- Input: {takes}.
- Output `probs`: probabilities `[N, {classes}]` in the order of `labels.txt`.
{ood_readme(source)}
```python
import numpy as np
from PIL import Image
from ai_edge_litert.interpreter import Interpreter
runner = Interpreter(model_path="model.tflite").get_signature_runner()
labels = open("labels.txt").read().splitlines()
{feed}
probs = runner(**{{next(iter(runner.get_input_details())): pixels}})["probs"][0]
print(labels[int(np.argmax(probs))], float(probs.max()))
```
"""


TFLITE = register_target(
    DeployTarget(
        name="tflite",
        title="LiteRT (TensorFlow Lite) flatbuffer",
        extra=HOW_TO_GET,
        missing=tflite_missing,
        convert=convert_tflite,
        run=run_tflite,
        main_file=MODEL_FILE,
    )
)

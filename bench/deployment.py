"""Benchmark 4: the exported model in onnxruntime against the PyTorch model it came from; INT8 against fp32.

The adapted model (bundled efficientnet-lite0 with a new 10-class head) is exported by
`pipeline.export.write.export_model` and quantised by `pipeline.export.quantize.quantize_int8`, as
`zoo export --int8` does. Batch-1 latency and batch-N throughput, interleaved.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.common import (
    Scale,
    Section,
    bundled_onnx,
    digits_split,
    interleave,
    markdown_table,
    median,
    preprocess_at,
    spread,
)

KEY = "deploy"
TITLE = "4. Deployment: onnxruntime against PyTorch, INT8 against fp32"
IMAGE_SIZE = 224
CALIBRATION_IMAGES = 32


def _torch_runner(model: Any) -> Callable[[Any], Any]:
    import torch

    model.eval()

    def infer(batch: Any) -> Any:
        with torch.inference_mode():
            return model(torch.from_numpy(batch))

    return infer


def _ort_runner(path: Path, provider: str = "CPUExecutionProvider") -> Callable[[Any], Any]:
    from pipeline.core.sessions import create_session

    session = create_session(path, provider)
    input_name = session.get_inputs()[0].name
    return lambda batch: session.run(["logits"], {input_name: batch})


def per_call_seconds(infer: Callable[[Any], Any], batch: Any, *, calls: int) -> float:
    """Median seconds of `calls` calls of `infer(batch)`."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        infer(batch)
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def exported_models(work: Path) -> tuple[Any, Path, Path, Any]:
    """(adapted torch model, fp32 ONNX path, INT8 ONNX path, a preprocessed image batch source)."""
    from pipeline.export.quantize import quantize_int8
    from pipeline.export.write import export_model
    from pipeline.surgery.build import build_model
    from pipeline.train.fastpath import preprocessed_batch

    split = digits_split(images=CALIBRATION_IMAGES)
    preprocess = preprocess_at(IMAGE_SIZE)
    _, adapted = build_model(
        bundled_onnx(work), num_classes=len(split.class_names), hidden=None, dropout=0.0, seed=0
    )
    adapted.eval()
    fp32 = export_model(
        adapted,
        work / "deploy" / "model.onnx",
        input_name="input",
        layout="NCHW",
        input_shape=(3, IMAGE_SIZE, IMAGE_SIZE),
        metadata={"labels": split.class_names, "preprocess": preprocess.to_dict()},
    ).path
    images = preprocessed_batch(split.train, preprocess)
    int8 = quantize_int8(fp32, calibration=images, input_name="input").path
    return adapted, fp32, int8, images


def run(scale: Scale, *, work: Path) -> Section:
    """Batch-1 latency and batch throughput: torch vs onnxruntime fp32 vs onnxruntime INT8."""
    import numpy as np

    adapted, fp32, int8, images = exported_models(work)
    engines = {
        "PyTorch (eager, inference_mode)": _torch_runner(adapted),
        "onnxruntime fp32": _ort_runner(fp32),
        "onnxruntime INT8": _ort_runner(int8),
    }
    single = np.ascontiguousarray(images[:1])
    reps = int(np.ceil(scale.deploy_batch / len(images)))
    batch = np.ascontiguousarray(np.concatenate([images] * reps)[: scale.deploy_batch])
    latency = interleave(
        {name: lambda f=f: per_call_seconds(f, single, calls=scale.deploy_latency_calls) for name, f in engines.items()},
        repetitions=scale.repetitions,
        warmup=True,
    )  # fmt: skip
    throughput = interleave(
        {
            name: lambda f=f: per_call_seconds(f, batch, calls=scale.deploy_batch_calls)
            for name, f in engines.items()
        },
        repetitions=scale.repetitions,
        warmup=True,
    )
    torch_name, fp32_name, int8_name = engines
    rows = []
    for name in engines:
        rows.append(
            [
                name,
                1000 * median(latency[name]),
                spread([1000 * s for s in latency[name]]),
                scale.deploy_batch / median(throughput[name]),
            ]
        )
    ratios = [
        ["batch-1 latency, PyTorch ÷ onnxruntime fp32", f"{median(latency[torch_name]) / median(latency[fp32_name]):.2f}×"],
        [f"batch-{scale.deploy_batch} throughput, onnxruntime fp32 ÷ PyTorch", f"{median(throughput[torch_name]) / median(throughput[fp32_name]):.2f}×"],
        ["batch-1 latency, fp32 ÷ INT8 (onnxruntime)", f"{median(latency[fp32_name]) / median(latency[int8_name]):.2f}×"],
        [f"batch-{scale.deploy_batch} throughput, INT8 ÷ fp32 (onnxruntime)", f"{median(throughput[fp32_name]) / median(throughput[int8_name]):.2f}×"],
    ]  # fmt: skip
    sizes = f"fp32 file {fp32.stat().st_size / 1e6:.1f} MB, INT8 file {int8.stat().st_size / 1e6:.1f} MB."
    body = [
        f"Adapted efficientnet-lite0 (10-class head) at {IMAGE_SIZE} px, exported with the verification gate, "
        f"INT8 = static QDQ (uint8 activations, int8 per-channel weights, the classifier float) calibrated on {len(images)} "
        "training images. Latency: median of "
        f"{scale.deploy_latency_calls} batch-1 calls per repetition; throughput: median of "
        f"{scale.deploy_batch_calls} batch-{scale.deploy_batch} calls per repetition; {scale.repetitions} interleaved repetitions after a warm-up. Ratios > 1 mean "
        "the second engine is faster.",
        markdown_table(["ratio", "value"], ratios),
        markdown_table(
            [
                "engine",
                "batch-1 latency ms (context)",
                "range ms",
                f"batch-{scale.deploy_batch} img/s (context)",
            ],
            rows,
        ),  # fmt: skip
        sizes,
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))

"""Benchmark 7 (CUDA only): bf16 autocast + channels_last against fp32 for fine-tuning; onnxruntime's
CUDA provider against PyTorch for inference. Same model as benchmarks 2 and 4.

Without CUDA the section says "not run: no GPU". The measuring functions take the device as an
argument, so the CPU tests run the same code paths on the CPU.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.common import Scale, Section, bundled_onnx, interleave, markdown_table, median, spread
from bench.converted_training import train_step_seconds
from bench.deployment import _ort_runner, exported_models, per_call_seconds

KEY = "gpu"
TITLE = "7. GPU: bf16 + channels_last fine-tuning; onnxruntime CUDA against PyTorch"
IMAGE_SIZE = 224
BATCH = 32
ORT_PROVIDER = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}


def finetune_rows(
    model: Any, *, device: str, batch: int, size: int, steps: int, repetitions: int
) -> list[list[Any]]:
    """img/s of forward+backward with bf16 autocast + channels_last against fp32, interleaved."""
    import torch

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    times = interleave(
        {
            "fp32": lambda: train_step_seconds(
                model, inputs, labels, steps=steps, channels_last=False, device=device
            ),  # fmt: skip
            "bf16 + channels_last": lambda: train_step_seconds(
                model, inputs, labels, steps=steps, channels_last=True, amp=True, device=device
            ),  # fmt: skip
        },
        repetitions=repetitions,
        warmup=True,
    )
    speed_up = median(times["fp32"]) / median(times["bf16 + channels_last"])
    return [
        [f"fine-tuning fwd+bwd, batch {batch}", name, batch / median(t), spread(t), f"{median(times['fp32']) / median(t):.2f}×"]
        for name, t in times.items()
    ] + [["", "bf16 + channels_last ÷ fp32 img/s", f"{speed_up:.2f}×", "", ""]]  # fmt: skip


def inference_rows(
    model: Any, onnx_path: Path, images: Any, *, device: str, calls: int, repetitions: int
) -> list[list[Any]]:
    """Batch throughput of onnxruntime on `device`'s provider against PyTorch on `device`."""
    import torch

    model = model.to(device).eval()

    def on_device(batch: Any) -> Any:
        with torch.inference_mode():
            out = model(torch.from_numpy(batch).to(device))
        if device == "cuda":
            torch.cuda.synchronize()  # CUDA calls return before the work is done
        return out

    ort_infer = _ort_runner(onnx_path, ORT_PROVIDER[device])
    times = interleave(
        {
            "PyTorch": lambda: per_call_seconds(on_device, images, calls=calls),
            f"onnxruntime {ORT_PROVIDER[device]}": lambda: per_call_seconds(
                ort_infer, images, calls=calls
            ),  # fmt: skip
        },
        repetitions=repetitions,
        warmup=True,
    )
    base = median(times["PyTorch"])
    return [
        [f"inference, batch {len(images)}", name, len(images) / median(t), spread(t), f"{base / median(t):.2f}×"]
        for name, t in times.items()
    ]  # fmt: skip


def run(scale: Scale, *, work: Path) -> Section:
    """The GPU table, or the line that says why it was not run."""
    import numpy as np
    import torch

    columns = ["work", "engine", "img/s (context)", "s range", "speed-up over the first row"]
    if not torch.cuda.is_available():
        return Section(
            KEY,
            TITLE,
            [markdown_table(columns, [["all rows", "not run: no GPU", "", "", ""]])],
            command=scale.command(KEY),
        )
    from pipeline.surgery.build import build_model

    _, adapted = build_model(bundled_onnx(work), num_classes=10, hidden=None, dropout=0.0, seed=0)
    rows = finetune_rows(
        adapted,
        device="cuda",
        batch=BATCH,
        size=IMAGE_SIZE,
        steps=5,
        repetitions=scale.repetitions,
    )
    model, fp32, _, images = exported_models(work)
    batch = np.ascontiguousarray(np.concatenate([images] * (BATCH // len(images) + 1))[:BATCH])
    rows += inference_rows(
        model, fp32, batch, device="cuda", calls=5, repetitions=scale.repetitions
    )
    body = [
        f"{torch.cuda.get_device_name(0)}; adapted efficientnet-lite0 at {IMAGE_SIZE} px; "
        f"median of {scale.repetitions} interleaved repetitions after a warm-up.",
        markdown_table(columns, rows),
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))

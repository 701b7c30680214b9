"""Benchmark 3: training throughput of converted models against their native architectures.

Each native model (random weights) is exported to ONNX and imported back with `zoo`'s converter,
so both hold the same weights; forward+backward img/s is timed on the same batch, interleaved,
with channels_last off and on.
"""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

from bench.common import (
    Scale,
    Section,
    goal_verdict,
    interleave,
    markdown_table,
    median,
    spread,
)

KEY = "converted"
TITLE = "3. Training throughput of converted models"
GOAL = 0.95
ARCHS = ("efficientnet_lite0", "mobilenet_v2", "resnet18")


def native_model(arch: str) -> Any:
    """timm's efficientnet_lite0 or a torchvision model, random weights, seed 0."""
    import torch

    torch.manual_seed(0)
    if arch == "efficientnet_lite0":
        import timm

        return timm.create_model("efficientnet_lite0", pretrained=False)
    import torchvision

    return getattr(torchvision.models, arch)(weights=None)


def converted_model(native: Any, *, path: Path, size: int) -> Any:
    """`native` exported to ONNX (BatchNorm kept unfused, as in training) and imported by zoo."""
    import torch

    from pipeline.convert import import_model

    native.eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        native,
        torch.randn(1, 3, size, size),
        buffer,
        dynamo=False,
        opset_version=13,
        input_names=["input"],
        output_names=["logits"],
        do_constant_folding=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
    )
    path.write_bytes(buffer.getvalue())
    return import_model(path, check_fidelity=False).module


def train_step_seconds(
    model: Any, inputs: Any, labels: Any, *, steps: int, channels_last: bool, amp: bool = False, device: str = "cpu"
) -> float:  # fmt: skip
    """Median seconds of one forward+backward step (cross-entropy, gradients zeroed each step)."""
    import torch
    import torch.nn.functional as F

    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, memory_format=memory_format)
    inputs = inputs.to(device).contiguous(memory_format=memory_format)
    labels = labels.to(device)
    model.train()
    seconds = []
    for _ in range(steps):
        model.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=amp):
            loss = F.cross_entropy(model(inputs).float(), labels)
        loss.backward()
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    return median(seconds)


def op_profile(model: Any, inputs: Any, labels: Any, *, channels_last: bool) -> dict[str, float]:
    """Self CPU milliseconds per operator over one forward+backward step (after one warm-up step)."""
    from torch.profiler import ProfilerActivity, profile

    train_step_seconds(model, inputs, labels, steps=1, channels_last=channels_last)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        train_step_seconds(model, inputs, labels, steps=1, channels_last=channels_last)
    return {e.key: e.self_cpu_time_total / 1000 for e in prof.key_averages()}


def median_profiles(
    models: dict[str, Any], inputs: Any, labels: Any, *, channels_last: bool, repetitions: int
) -> dict[str, dict[str, float]]:
    """Per model, the median over interleaved profiled steps of each operator's self time."""
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in models}
    for _ in range(repetitions):
        for name, model in models.items():
            runs[name].append(op_profile(model, inputs, labels, channels_last=channels_last))
    return {
        name: {
            op: median([profile.get(op, 0.0) for profile in profiles])
            for op in set().union(*profiles)
        }
        for name, profiles in runs.items()
    }


def profile_table(native: dict[str, float], converted: dict[str, float], *, top: int = 8) -> str:
    """The operators that take the most self CPU time in either model, side by side."""
    keys = sorted(
        set(native) | set(converted),
        key=lambda k: max(native.get(k, 0.0), converted.get(k, 0.0)),
        reverse=True,
    )[:top]
    rows = [[k, native.get(k, 0.0), converted.get(k, 0.0)] for k in keys]
    return markdown_table(["operator", "native self ms", "converted self ms"], rows)


def run(scale: Scale, *, work: Path) -> Section:
    """One row per architecture and memory format: converted ÷ native img/s."""
    import torch

    batch, size = scale.convert_batch, scale.convert_size
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(batch, 3, size, size, generator=generator)
    labels = torch.randint(0, 1000, (batch,), generator=generator)
    rows, worst, worst_case = [], float("inf"), None
    for arch in ARCHS:
        native = native_model(arch)
        converted = converted_model(native, path=work / f"{arch}.onnx", size=size)
        for channels_last in (False, True):
            times = interleave(
                {
                    name: lambda m=model, cl=channels_last: train_step_seconds(
                        m, inputs, labels, steps=scale.convert_steps, channels_last=cl
                    )
                    for name, model in (("native", native), ("converted", converted))
                },
                repetitions=scale.convert_repetitions,
                warmup=True,
            )
            relative = median(times["native"]) / median(times["converted"])
            if relative < worst:
                worst, worst_case = relative, (arch, native, converted, channels_last)
            rows.append(
                [
                    arch,
                    "on" if channels_last else "off",
                    f"{relative:.3f}×",
                    goal_verdict(relative, GOAL),
                    batch / median(times["native"]),
                    batch / median(times["converted"]),
                    f"{spread(times['native'])} / {spread(times['converted'])}",
                ]
            )
    body = [
        f"Forward+backward of the whole model (train mode), batch {batch} at {size} px, random inputs; each "
        f"repetition is the median of {scale.convert_steps} steps after one untimed warm-up round; the row "
        f"is the median of {scale.convert_repetitions} interleaved repetitions. Goal: converted ≥ {GOAL:g}× native.",
        markdown_table(
            [
                "model",
                "channels_last",
                "converted ÷ native img/s",
                "verdict",
                "native img/s (context)",
                "converted img/s (context)",
                "step s range native / converted",
            ],
            rows,
        ),  # fmt: skip
        f"Worst ratio: {worst:.3f}×.",
    ]
    if worst < GOAL and worst_case is not None:
        arch, native, converted, channels_last = worst_case
        body += [
            f"Profile of the worst row ({arch}, channels_last {'on' if channels_last else 'off'}): "
            f"self CPU time per operator of one forward+backward step under torch.profiler, median of "
            f"{scale.convert_repetitions} interleaved profiled steps, for the operators that take the most in "
            "either model.",
            profile_table(
                **median_profiles(
                    {"native": native, "converted": converted},
                    inputs,
                    labels,
                    channels_last=channels_last,
                    repetitions=scale.convert_repetitions,
                )
            ),
        ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))

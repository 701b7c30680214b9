"""Benchmark 10: the deployment targets against onnxruntime, from one adapted model.

efficientnet-lite0 with a `feature` head solved on flowers5 (../shared/datasets; built-in digits
when absent) is exported with `zoo export --target all`: each target converted by its own tool and
gated on the run's held-out photos. Then, in one run and interleaved: batch-1 latency and batch-N
throughput of each target's own runtime as a ratio to onnxruntime on the CPU (onnxruntime CUDA and
TensorRT rows where an NVIDIA GPU is present), file size, conversion time, agreement with PyTorch on
the held-out photos, and for the files that take pixels of any size (onnxruntime with
`--embed-preprocess`, the web page), top-1 agreement with `zoo predict` on every photo of the set.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import (
    MODEL_NAME,
    Scale,
    Section,
    interleave,
    markdown_table,
    median,
)
from bench.deployment import per_call_seconds

KEY = "targets"
TITLE = "10. Deployment targets: OpenVINO, LiteRT (TFLite) and onnxruntime-web against onnxruntime"
SHARED_DIR = Path(os.environ.get("ZOO_SHARED", Path(__file__).resolve().parents[2] / "shared"))
GPU_PROVIDERS = {"onnxruntime CUDA": "CUDAExecutionProvider", "onnxruntime TensorRT": "TensorrtExecutionProvider"}  # fmt: skip
WEB_LATENCY = Path(__file__).resolve().parent / "web_latency.mjs"  # times it inside node


def _adapted_run(work: Path, scale: Scale) -> tuple[Any, str]:
    """A `feature` run of efficientnet-lite0 on flowers5 (or digits); its data source."""
    import zoo

    models = work / "targets-models"
    zoo.fetch(MODEL_NAME, models_dir=models)
    flowers = SHARED_DIR / "datasets" / "flowers5"
    data = str(flowers) if flowers.is_dir() else "builtin:digits"
    per_class = None if scale.name == "full" else 10
    run = zoo.adapt(
        MODEL_NAME,
        data=data,
        strategy="feature",
        train_per_class=per_class,
        models_dir=models,
        out=models / "run",
    )
    return run, data


def _cpu_runners(run_dir: Path) -> dict[str, Callable[[np.ndarray], Any]]:
    """name -> a function of an NCHW float batch, each in its target's own runtime, set up once."""
    from pipeline.core.sessions import create_session
    from pipeline.export.target_openvino import compiled
    from pipeline.export.target_tflite import interpreter

    session = create_session(run_dir / "model.onnx", "CPUExecutionProvider")
    name = session.get_inputs()[0].name
    runners: dict[str, Callable[[np.ndarray], Any]] = {
        "onnxruntime (CPU)": lambda batch: session.run(["probs"], {name: batch})
    }
    xml = run_dir / "deploy" / "openvino" / "model.xml"
    if xml.is_file():
        request = compiled(xml).create_infer_request()
        runners["OpenVINO (CPU, f32)"] = lambda batch: request.infer({0: batch})
    flatbuffer = run_dir / "deploy" / "tflite" / "model.tflite"
    if flatbuffer.is_file():
        by_batch: dict[int, Any] = {}

        def litert(batch: np.ndarray) -> Any:
            if len(batch) not in by_batch:  # one interpreter per batch size: resizing reallocates
                by_batch[len(batch)] = interpreter(flatbuffer).get_signature_runner()
            return by_batch[len(batch)](**{"input": np.ascontiguousarray(batch.transpose(0, 2, 3, 1))})  # fmt: skip

        runners["LiteRT (XNNPACK)"] = litert
    return runners


def _gpu_runners(onnx_path: Path) -> tuple[dict[str, Callable[[np.ndarray], Any]], list[str]]:
    """onnxruntime's CUDA and TensorRT providers where they run; why not, otherwise."""
    from pipeline.core.sessions import create_session
    from zoo.errors import NotFound

    runners, notes = {}, []
    try:  # asked without a driver, onnxruntime logs a page of errors for each provider
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return {}, [f"{', '.join(GPU_PROVIDERS)}: not measured (no NVIDIA driver on this machine)"]
    for label, provider in GPU_PROVIDERS.items():
        if provider == "TensorrtExecutionProvider" and importlib.util.find_spec("tensorrt") is None:
            notes.append(f"{label}: not measured (the `tensorrt` package is not installed)")
            continue
        try:
            session = create_session(onnx_path, provider)
        except NotFound as exc:
            notes.append(f"{label}: not measured ({str(exc).split(';')[0]})")
            continue
        name = session.get_inputs()[0].name
        runners[label] = lambda batch, s=session, n=name: s.run(["probs"], {n: batch})
    return runners, notes


def _timings(
    runners: dict[str, Callable[[np.ndarray], Any]],
    images: np.ndarray,
    scale: Scale,
    *,
    timed_alone: dict[str, Callable[[], float]],
) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Interleaved batch-1 seconds per call (with `timed_alone`, candidates that time themselves)
    and batch-N seconds per call, per runner."""
    single = np.ascontiguousarray(images[:1])
    reps = int(np.ceil(scale.deploy_batch / len(images)))
    batch = np.ascontiguousarray(np.concatenate([images] * reps)[: scale.deploy_batch])
    latency = interleave(
        {**{n: lambda f=f: per_call_seconds(f, single, calls=scale.deploy_latency_calls) for n, f in runners.items()}, **timed_alone},
        repetitions=scale.repetitions,
        warmup=True,
    )  # fmt: skip
    throughput = interleave(
        {n: lambda f=f: per_call_seconds(f, batch, calls=scale.deploy_batch_calls) for n, f in runners.items()},
        repetitions=scale.repetitions,
        warmup=True,
    )  # fmt: skip
    return latency, throughput


def _web_runner(model: Path, pixels: np.ndarray, scale: Scale) -> Callable[[], float]:
    """A candidate for `interleave`: median seconds of the web page's runtime on one image, timed
    inside node (bench/web_latency.mjs), so node's start-up and the model's load drop out."""
    import json
    import subprocess
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="zoo-web-bench-"))
    (folder / "pixels.bin").write_bytes(np.ascontiguousarray(pixels, dtype=np.uint8).tobytes())
    shape = ",".join(str(d) for d in pixels.shape)
    command = ["node", str(WEB_LATENCY), str(model), str(folder / "pixels.bin"), shape]

    def seconds() -> float:
        done = subprocess.run([*command, str(scale.deploy_latency_calls)], capture_output=True, text=True, check=True)  # fmt: skip
        return median(json.loads(done.stdout)["ms"]) / 1000

    return seconds


def _own_size_agreement(run: Any, data: str, embedded: Path) -> dict[str, float]:
    """Top-1 agreement with `zoo predict` (the plain file, Pillow) on every image of `data` at its
    own size: onnxruntime on the any-size file, and the web page's runtime."""
    import zoo
    from pipeline.data.images import open_image
    from pipeline.data.sources import load_source
    from pipeline.export.deploy_targets import run_onnxruntime
    from pipeline.export.targets import target_missing

    split = load_source(data, seed=0)
    refs = [s.ref for s in split.train + split.val + split.test]
    predicted = zoo.predictions(run.dir / "model.onnx", refs, top_k=1)
    python_top1 = [p.top[0][0] for p in predicted]
    labels = run.record.class_names
    pixels = [np.asarray(open_image(ref)) for ref in refs]
    found = {"onnxruntime, --embed-preprocess": run_onnxruntime(embedded, pixels)}
    if target_missing("web") is None:
        from pipeline.export.target_web import run_web

        found["web page (onnxruntime-web)"] = run_web(embedded, pixels)
    return {
        name: float(
            np.mean(
                [labels[i] == t for i, t in zip(probs.argmax(axis=1), python_top1, strict=True)]
            )
        )  # fmt: skip
        for name, probs in found.items()
    }


WEB = "web page (onnxruntime-web, node, 1 thread)"
RUNTIME_TARGET = {
    "onnxruntime (CPU)": "onnx",
    "OpenVINO (CPU, f32)": "openvino",
    "LiteRT (XNNPACK)": "tflite",
    "onnxruntime CUDA": "onnx",
    "onnxruntime TensorRT": "onnx",
    WEB: "web",
}


def _measure(run: Any, scale: Scale, work: Path) -> dict[str, Any]:
    """Latency and throughput per runtime (the web page's per image), interleaved where in-process."""
    from pipeline.core.rundir import RunDir
    from pipeline.data.images import center_crop, open_for, resize_for
    from pipeline.train.features import preprocessed_batch

    preprocess = run.record.preprocess
    samples = RunDir(run.dir).split().test[: scale.deploy_batch]
    images = preprocessed_batch(samples, preprocess)
    runners = _cpu_runners(run.dir)
    gpu, notes = _gpu_runners(run.dir / "model.onnx")
    runners.update(gpu)
    web_model, alone = run.dir / "deploy" / "web" / "model.onnx", {}
    if web_model.is_file():  # pixels already at the resize size: the page's resize is identity
        size = max(preprocess.resize, preprocess.crop)
        pixels = np.asarray(center_crop(resize_for(open_for(samples[0].ref, preprocess), preprocess), size))  # fmt: skip
        alone[WEB] = _web_runner(web_model, pixels, scale)
    latency, throughput = _timings(runners, images, scale, timed_alone=alone)
    return {"latency": latency, "throughput": throughput, "notes": notes, "load": os.getloadavg()}


def _rows(measured: dict[str, Any], gate: dict[str, Any], scale: Scale) -> list[list[Any]]:
    latency, throughput = measured["latency"], measured["throughput"]
    base_latency = median(latency["onnxruntime (CPU)"])
    base_rate = scale.deploy_batch / median(throughput["onnxruntime (CPU)"])
    rows = []
    for runtime, seconds in latency.items():
        report = gate.get(RUNTIME_TARGET[runtime])
        rate = scale.deploy_batch / median(throughput[runtime]) if runtime in throughput else None
        rows.append(
            [
                runtime,
                f"{median(seconds) / base_latency:.2f}×",
                "–" if rate is None else f"{rate / base_rate:.2f}×",
                1000 * median(seconds),
                "–" if rate is None else rate,
                "–" if report is None else f"{report.size / 1e6:.1f}",
                "–"
                if report is None or not report.convert_seconds
                else f"{report.convert_seconds:.1f}",  # fmt: skip
                "–" if report is None else f"{report.top1_agreement:.1%} of {report.images}",
                "–" if report is None else f"{report.max_prob_diff:.1e}",
            ]
        )
    return rows


def _fastest(measured: dict[str, Any], scale: Scale) -> str:
    """Which CPU runtime answers one image soonest, and which gets through batches fastest."""
    cpu = [n for n in measured["latency"] if "CUDA" not in n and "TensorRT" not in n]
    quickest = min(cpu, key=lambda n: median(measured["latency"][n]))
    batched = [n for n in cpu if n in measured["throughput"]]
    busiest = min(batched, key=lambda n: median(measured["throughput"][n]))
    return (
        f"**Fastest on this CPU:** {quickest} for one image at a time (batch-1 latency), "
        f"{busiest} for batches of {scale.deploy_batch} (throughput)."
    )


def run(scale: Scale, *, work: Path) -> Section:
    """Every target of one run: speed against onnxruntime, size, conversion, agreement."""
    import zoo
    from pipeline.export.deploy_targets import embedded_file

    adapted, data = _adapted_run(work, scale)
    summary = zoo.export(adapted, targets="all", models_dir=adapted.models_dir)
    gate = {report.target: report for report in summary.targets}
    embedded = embedded_file(adapted.dir / "model.onnx", adapted.record.preprocess, any_size=True, out=work / "embedded.onnx")  # fmt: skip
    measured = _measure(adapted, scale, work)
    agreement = _own_size_agreement(adapted, data, embedded)
    not_written = [r.line() for r in summary.targets if not r.passed]
    source = "flowers5 (1,000 photos, ≤320 px)" if "flowers5" in data else "built-in digits"
    body = [
        f"efficientnet-lite0 at {adapted.record.preprocess.crop} px with a `feature` head solved on {source}, "
        f"exported with `zoo export --target all`; each target gated on the run's {gate['onnx'].images} held-out "
        "images against PyTorch. Speed: median seconds per call over "
        f"{scale.deploy_latency_calls} batch-1 calls and {scale.deploy_batch_calls} batch-{scale.deploy_batch} "
        f"calls per repetition, {scale.repetitions} interleaved repetitions after a warm-up, every runtime on "
        "all cores in this process; ratios are to onnxruntime on the CPU in the same run (latency < 1× and "
        "throughput > 1× are faster). The web page's runtime runs one image at a time, single-threaded, in node "
        "(the page's own wasm build, timed inside node by bench/web_latency.mjs, interleaved with the others), on "
        f"pixels at the resize size. Load average at the end of the timings: {measured['load'][0]:.1f} on "
        f"{os.cpu_count()} cores (a shared machine: the ratios, measured side by side, are the figures to read).",
        markdown_table(
            [
                "runtime",
                "batch-1 latency ÷ onnxruntime",
                f"batch-{scale.deploy_batch} throughput ÷ onnxruntime",
                "batch-1 ms (context)",
                "img/s (context)",
                "file(s) MB",
                "conversion s",
                "top-1 agreement (held-out)",
                "max \\|prob diff\\|",
            ],  # fmt: skip
            _rows(measured, gate, scale),
        ),
        _fastest(measured, scale),
        "Top-1 agreement with `zoo predict` (Python: Pillow decode and resize, plain file) on every image of the "
        "set at its own size, for the files that take pixels of any size:",
        markdown_table(
            ["runtime", "top-1 agreement"], [[n, f"{a:.2%}"] for n, a in agreement.items()]
        ),
        *(measured["notes"] + not_written),
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))

"""`zoo export --target`: the gated ONNX file to every other deployment target, each gated again.

`export_run` (pipeline.export.deploy) writes and gates RUN/model.onnx as before, then calls
`export_targets`. The held-out images are prepared once in every form a target file takes
(`gate_images`), PyTorch answers once, and each target is converted from the ONNX file, run in its
own runtime and compared (`pipeline.export.targets.gate_target`). `--embed-preprocess` puts the
preprocessing in front of the classifier: the any-size graph where the runtime has an antialiased
Resize (onnxruntime, the web page), the fixed-size graph (crop x crop pixels, resized by the app)
where it has not (OpenVINO, LiteRT).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.sessions import create_session, fixed_batch, run_fixed
from pipeline.data.images import center_crop, open_for, preprocess_image, resize_for
from pipeline.export.embed import embed_preprocess
from pipeline.export.targets import (
    DEPLOY_DIR,
    GateImages,
    TargetInput,
    TargetReport,
    as_batches,
    compare_probs,
    gate_target,
    probs_of,
    require,
)
from pipeline.export.verify import torch_logits
from zoo.catalog import Preprocess
from zoo.errors import VerificationFailed
from zoo.onnxfile import load_onnx

if TYPE_CHECKING:
    from torch import nn

    from pipeline.core.samples import Sample
    from pipeline.export.deploy import LoadedRun

CHUNK = 64  # images per onnxruntime call
INT8_SKIPPED = "int8 skipped: --quantize int8 applies to the ONNX file only"


def _array(img: object) -> np.ndarray:
    pixels = np.asarray(img, dtype=np.uint8)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


def gate_images(
    model: nn.Module,
    preprocess: Preprocess,
    samples: Sequence[Sample],
    *,
    floats: np.ndarray | None = None,
) -> GateImages:
    """The held-out images in every form a target takes, and PyTorch's probabilities for them.

    `floats`: the Python preprocessing of `samples`, when the caller already has it.
    """
    size = max(preprocess.resize, preprocess.crop)
    rows: list[np.ndarray] = []
    resized, cropped, decoded = [], [], []
    for sample in samples:
        img = open_for(sample.ref, preprocess)  # as `zoo predict` decodes it
        if floats is None:
            rows.append(preprocess_image(img, preprocess))
        big = resize_for(img, preprocess)
        resized.append(_array(center_crop(big, size)))
        cropped.append(_array(center_crop(big, preprocess.crop)))
        # At its own size as `zoo predict` decodes it: a phone photo's JPEG at the smallest DCT
        # scale still above the resize size, so 256 of them fit in memory.
        decoded.append(_array(img))
    floats = np.stack(rows).astype(np.float32) if floats is None else floats
    logits = torch_logits(model, floats).astype(np.float64)
    return GateImages(
        names=[_short_name(s.ref) for s in samples],
        reference=probs_of(logits, named_probs=False),
        floats=floats,
        resized=np.stack(resized),
        cropped=np.stack(cropped),
        decoded=decoded,
    )


def _short_name(ref: str) -> str:
    return ref if ref.startswith("builtin:") else os.path.basename(ref)


def run_onnxruntime(model_path: Path, inputs: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """Probabilities [N, C] from onnxruntime on the CPU: the `probs` output, else a softmax."""
    session = create_session(model_path, "CPUExecutionProvider")
    names = [o.name for o in session.get_outputs()]
    output = "probs" if "probs" in names else names[0]
    input_name = session.get_inputs()[0].name
    rows = [
        run_fixed(session, [output], {input_name: batch})[0]
        for batch in as_batches(inputs, fixed_batch(session) or CHUNK)
    ]
    return probs_of(np.concatenate(rows), named_probs=output == "probs")


def embedded_file(onnx_path: Path, preprocess: Preprocess, *, any_size: bool, out: Path) -> Path:
    """The classifier at `onnx_path` behind its preprocessing, saved at `out`; its `probs` output
    first (a file without one: its first output)."""
    import onnx

    classifier = load_onnx(onnx_path)
    outputs = [o.name for o in classifier.graph.output]
    probs = "probs" if "probs" in outputs else outputs[0]
    merged = embed_preprocess(classifier, preprocess, any_size=any_size, probs_output=probs)
    onnx.save(merged, str(out))
    return out


@dataclass(frozen=True)
class ExportedFile:
    """The gated ONNX file and what every target's converter needs with it."""

    path: Path  # RUN/model.onnx (or --out), float input
    preprocess: Preprocess
    labels: tuple[str, ...]
    input_name: str

    def source(self, work: Path, *, embedded: bool, any_size: bool) -> TargetInput:
        """The converter's input: this file, or it behind its preprocessing (made once in `work`)."""
        if not embedded:
            return TargetInput(self.path, self.preprocess, self.labels, self.input_name)
        out = work / f"embedded-{'any' if any_size else 'fixed'}.onnx"
        if not out.is_file():
            embedded_file(self.path, self.preprocess, any_size=any_size, out=out)
        return TargetInput(out, self.preprocess, self.labels, "pixels", embedded=True)


def onnx_figures(
    onnx_path: Path, images: GateImages, *, embedded: bool, any_size: bool = True
) -> TargetReport:
    """onnxruntime on an ONNX file against PyTorch: the figures every other target also gets."""
    report = TargetReport("onnx", embedded=embedded, path=str(onnx_path))
    batch = images.inputs(embedded=embedded, any_size=any_size)
    compare_probs(report, images.reference, run_onnxruntime(onnx_path, batch), images.names)
    if embedded and any_size:
        probs = run_onnxruntime(onnx_path, images.decoded)
        same = probs.argmax(axis=1) == images.reference.argmax(axis=1)
        report.resize_agreement = float(same.mean()) if len(same) else None
        report.resize_disagreeing = [images.names[i] for i in np.flatnonzero(~same)]
    report.size = onnx_path.stat().st_size
    return report


def onnx_report(
    exported: ExportedFile, images: GateImages, *, embed: bool, work: Path, out: Path
) -> TargetReport:
    """The `onnx` target's figures on the same images; with `embed`, the any-size graph replaces
    `out` once it passes (else the plain file stays and the report says it failed)."""
    source = exported.source(work, embedded=embed, any_size=True)
    report = onnx_figures(source.onnx_path, images, embedded=embed)
    if embed and report.passed:  # copied beside the file first: the rename must not cross disks
        staged = out.with_name(f".{out.name}.embedded-{os.getpid()}")
        shutil.copyfile(source.onnx_path, staged)
        os.replace(staged, out)
    report.path = str(out)
    return report


def export_targets(
    names: Sequence[str],
    exported: ExportedFile,
    images: GateImages,
    *,
    deploy_dir: Path,
    embed: bool | None,
    quantized: bool = False,
    log: Callable[[str], None] = print,
) -> list[TargetReport]:
    """Every target in `names` from the exported file, each gated; one line printed per target.

    `embed`: the preprocessing inside each file; None takes each target's own default.
    """
    reports = []
    with tempfile.TemporaryDirectory(prefix="zoo-targets-") as tmp:
        work = Path(tmp)
        # Every target converts this copy: the embedded graph may replace the file itself.
        shutil.copyfile(exported.path, work / "model.onnx")
        out, exported = exported.path, dataclasses.replace(exported, path=work / "model.onnx")
        for name in names:
            if name == "onnx":
                report = onnx_report(exported, images, embed=bool(embed), work=work, out=out)
            else:
                target = require(name)
                embedded = target.embed_by_default if embed is None else embed
                source = exported.source(
                    work, embedded=embedded, any_size=embedded and target.takes_any_size
                )
                report = gate_target(name, source, images, deploy_dir=deploy_dir)
                if quantized:
                    report.notes.append(INT8_SKIPPED)
            reports.append(report)
            log(report.line())
            usage = None if name == "onnx" else require(name).usage
            if report.passed and usage is not None and report.path:
                log(usage(Path(report.path)))
    return reports


def deploy_dir_of(run_dir: Path) -> Path:
    """RUN/deploy: where every target but `onnx` is written."""
    return run_dir / DEPLOY_DIR


def export_run_targets(
    loaded: LoadedRun,
    onnx_path: Path,
    samples: Sequence[Sample],
    *,
    names: Sequence[str],
    floats: np.ndarray | None,
    embed: bool | None,
    quantized: bool,
    log: Callable[[str], None],
) -> list[TargetReport]:
    """`zoo export --target`: the gated ONNX file of a run (always the first target) to `names`.

    VerificationFailed when the ONNX file itself fails with the preprocessing inside, once the
    other targets are written.
    """
    log(f"deployment targets: {', '.join(dict.fromkeys(['onnx', *names]))}, each checked on {len(samples)} held-out images")  # fmt: skip
    images = gate_images(loaded.model, loaded.preprocess, samples, floats=floats)
    exported = ExportedFile(onnx_path, loaded.preprocess, tuple(loaded.split.class_names), loaded.record.input_name)  # fmt: skip
    ordered = ["onnx", *(n for n in names if n != "onnx")]
    reports = export_targets(ordered, exported, images, deploy_dir=deploy_dir_of(loaded.run_dir), embed=embed, quantized=quantized, log=log)  # fmt: skip
    if not reports[0].passed:
        raise VerificationFailed(
            f"{reports[0].line()}; {onnx_path.name} keeps the plain graph (float input). "
            "Export without --embed-preprocess, or send the images that disagree with the run"
        )
    return reports

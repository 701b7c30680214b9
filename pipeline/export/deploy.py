"""From a run to a deployable file and back: export with the gate, verify, predict, evaluate.

`zoo export`, `zoo verify`, `zoo predict` and `zoo evaluate` each call one function here. The
comparison itself is pipeline.export.verify's one oracle; the file format is pipeline.export.write's.
"""

from __future__ import annotations

import dataclasses
import glob
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core import runs
from pipeline.core.rundir import RunDir
from zoo.catalog import IMAGENET_LABELS_FILE
from zoo.errors import DataError, NotFound, VerificationFailed, ZooError

if TYPE_CHECKING:
    import numpy as np
    from torch import nn

    from pipeline.core.record import RunRecord
    from pipeline.core.results import Metrics
    from pipeline.core.samples import DataSplit, Sample
    from pipeline.core.trust import OodRecord
    from pipeline.export.verify import FileReport, VerifyInputs
    from zoo.catalog import Catalog, Preprocess
    from zoo.preprocess import PreprocessRequest

MAX_VERIFY_IMAGES = 256  # the test split is used whole up to this many images


@dataclass
class LoadedRun:
    """A run rebuilt: its record, split, preprocessing and the model with its best weights."""

    run_dir: Path
    record: RunRecord
    split: DataSplit
    preprocess: Preprocess
    model: nn.Module


def load_run(run_dir: Path, *, models_dir: Path, catalog: Catalog) -> LoadedRun:
    """Rebuild the adapted model of a run from its source model, run.json and best checkpoint."""
    from pipeline.core.checkpoint import load_weights
    from pipeline.surgery.build import build_model
    from pipeline.train.trust import trusted

    run = RunDir(run_dir)
    record = run.record()
    checkpoint = run.best_checkpoint
    if not checkpoint.exists():
        raise NotFound(
            f"{run.path} has no {checkpoint.name}: the run never finished an epoch; train it with zoo adapt"
        )
    if record.num_classes is None or record.head is None or record.preprocess is None:
        raise ZooError(f"{run.record_file} does not say how the run was built; re-run `zoo adapt`")
    onnx_path, _ = runs.open_source(
        record.source, models_dir=models_dir, catalog=catalog, run_dir=run.path
    )
    _, model = build_model(
        onnx_path,
        num_classes=record.num_classes,
        hidden=record.head.hidden,
        dropout=record.head.dropout,
        seed=record.seed,
    )
    load_weights(model, checkpoint)
    model = trusted(model, run.path)  # with its temperature and unknown score, once fitted
    model.eval()
    return LoadedRun(run.path, record, run.split(), record.preprocess, model)


def _images(samples: Sequence[Sample], preprocess: Preprocess) -> np.ndarray:
    from pipeline.train.fastpath import preprocessed_batch

    return preprocessed_batch(samples, preprocess)


def gate_split(split: DataSplit) -> tuple[str, list[Sample]]:
    """The images a run is judged on: its test split, or its validation split when it has no test split."""
    if split.test:
        return "test", split.test
    return "val", split.val


def gate_inputs(loaded: LoadedRun, *, limit: int = MAX_VERIFY_IMAGES) -> VerifyInputs:
    """The run's test split (or validation split) as real images, plus a few random tensors."""
    from pipeline.export.verify import VerifyInputs

    samples = gate_split(loaded.split)[1][:limit]
    if not samples:
        raise DataError(f"{loaded.run_dir} has no test or validation images to verify against")
    return VerifyInputs.from_arrays(
        _images(samples, loaded.preprocess), [s.label for s in samples], n_random=2
    )


@dataclass
class ExportSummary:
    """What `zoo export` prints."""

    path: Path
    verified: bool
    report: Any
    size: int
    opset: int
    int8: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)
    run_dir: Path | None = None  # the run exported; not part of the record
    # Every target of `--target` with its gate figures (pipeline.export.targets.TargetReport);
    # empty for a plain `--target onnx` export, whose figures are `report`'s.
    targets: list[Any] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": str(self.path),
            "verified": self.verified,
            "size": self.size,
            "opset": self.opset,
            "verify": self.report.to_dict() if self.report is not None else None,
            "int8": self.int8,
            "notes": self.notes,
            "targets": [target.to_dict() for target in self.targets],
        }


def export_run(
    run_dir: Path | None,
    *,
    models_dir: Path,
    catalog: Catalog,
    out: Path | None = None,
    opset: int = 17,
    atol: float = 1e-4,
    rtol: float = 1e-3,
    verify: bool = True,
    quantize: str | None = None,
    targets: str | Sequence[str] = "onnx",
    embed_preprocess: bool | None = None,
    keep: float | None = None,
    log: Callable[[str], None] = print,
) -> ExportSummary:
    """Export a run's model to ONNX with its metadata, gated by the verification oracle; then
    every other target of `targets` from that file, each gated (pipeline.export.deploy_targets)."""
    from pipeline.export.targets import parse_targets
    from pipeline.export.write import export_model

    names = parse_targets(targets)  # an unknown target is refused before anything is written
    run_dir = Path(run_dir) if run_dir else runs.latest_run(models_dir)
    loaded = load_run(run_dir, models_dir=models_dir, catalog=catalog)
    record = loaded.record
    metrics = RunDir(run_dir).metrics()
    inputs = gate_inputs(loaded)
    split_name = {"test": "test", "val": "validation"}[gate_split(loaded.split)[0]]
    log(
        f"exporting {run_dir.name} (opset {opset}) and checking it on {inputs.n_images} {split_name} images"
    )
    result = export_model(
        loaded.model,
        out or run_dir / "model.onnx",
        input_name=record.input_name,
        layout=loaded.preprocess.layout,
        input_shape=loaded.preprocess.input_shape(),
        opset=opset,
        metadata=_file_metadata(loaded, metrics, keep=keep, log=log),
        verify_inputs=inputs,
        atol=atol,
        rtol=rtol,
        verify=verify,
    )
    summary = ExportSummary(
        result.path, result.verified, result.report, result.size, result.opset, notes=result.notes
    )
    if quantize == "int8":
        summary.int8 = _quantize(loaded, result.path, inputs, log=log)
    summary.targets = _other_targets(loaded, summary, inputs, names, embed=embed_preprocess, quantized=quantize is not None, log=log)  # fmt: skip
    summary.run_dir = run_dir  # the caller records the export in the run (report/)
    return summary


def _file_metadata(
    loaded: LoadedRun, metrics: Metrics | None, *, keep: float | None, log: Callable[[str], None]
) -> dict[str, Any]:
    """What the exported file says about itself: classes, preprocessing, source, figures, trust."""
    record = loaded.record
    return {
        "labels": loaded.split.class_names,
        "preprocess": loaded.preprocess,
        "source": dataclasses.asdict(record.source),
        "strategy": record.strategy,
        "metrics": _exported_metrics(metrics),
        "input_name": record.input_name,
        "layout": loaded.preprocess.layout,
        "run": loaded.run_dir.name,
        **_trust_metadata(loaded, keep, log=log),
    }


def _trust_metadata(
    loaded: LoadedRun, keep: float | None, *, log: Callable[[str], None]
) -> dict[str, Any]:
    """zoo.calibration and zoo.ood of the file; with `keep`, the unknown threshold chosen again."""
    if keep is not None:
        ood = loaded.model.with_keep(keep)
        log(
            f"unknown past {ood.score} {ood.threshold:.4g}: keeps {ood.val_kept:.1%} of the "
            f"{ood.val_images} validation images (--keep {keep})"
        )
    return loaded.model.metadata()


def _other_targets(
    loaded: LoadedRun,
    summary: ExportSummary,
    inputs: VerifyInputs,
    names: list[str],
    *,
    embed: bool | None,
    quantized: bool,
    log: Callable[[str], None],
) -> list[Any]:
    """Every target but a plain ONNX file, each gated again (pipeline.export.deploy_targets)."""
    if names == ["onnx"] and not embed:
        return []  # today's export: the gate above said all there is to say
    from pipeline.export.deploy_targets import export_run_targets

    samples = gate_split(loaded.split)[1][: inputs.n_images]
    reports = export_run_targets(loaded, summary.path, samples, names=names, floats=inputs.images, embed=embed, quantized=quantized, log=log)  # fmt: skip
    summary.size = summary.path.stat().st_size  # the embedded graph may have replaced the file
    return reports


def _exported_metrics(metrics: Metrics | None) -> dict[str, Any]:
    """The run's headline figures, for the exported file's metadata (None each before the run is done)."""
    return {
        "accuracy": metrics.accuracy if metrics else None,
        "macro_f1": metrics.macro_f1 if metrics else None,
        "macro_precision": metrics.macro_precision if metrics else None,
        "macro_recall": metrics.macro_recall if metrics else None,
        "split": metrics.split if metrics else None,
    }


def _quantize(
    loaded: LoadedRun, fp32_path: Path, inputs: VerifyInputs, *, log: Callable[[str], None]
) -> dict[str, Any]:
    from pipeline.export.quantize import compare_int8, quantize_int8

    calibration = _images(loaded.split.train[:128], loaded.preprocess)
    log(f"quantizing to INT8, calibrated on {len(calibration)} training images")
    quantized = quantize_int8(
        fp32_path, calibration=calibration, input_name=loaded.record.input_name
    )
    report = compare_int8(fp32_path, quantized.path, inputs)
    summary = {
        "path": str(quantized.path),
        "size": quantized.size,
        "fp32_size": quantized.fp32_size,
        "ratio": round(quantized.ratio, 3),
        **report.to_dict(),
    }
    if not report.passed:
        quantized.path.unlink(missing_ok=True)
        raise VerificationFailed(
            f"INT8 accuracy {report.accuracy_int8:.2f}% is more than {report.max_drop} points below fp32 "
            f"{report.accuracy_fp32:.2f}%; the INT8 file was removed. Calibrate on more images or keep fp32"
        )
    return summary


def verify_file(
    onnx_path: Path,
    *,
    run_dir: Path | None,
    models_dir: Path,
    catalog: Catalog,
    runtimes: Sequence[str] = ("ort",),
    atol: float = 1e-4,
    rtol: float = 1e-3,
) -> FileReport:
    """`zoo verify`: metadata and outputs, the gate against the run's torch model (with --run), other runtimes.

    Without a run, random inputs of the file's own input shape stand in for images.
    """
    from pipeline.export.target_checks import (
        file_embedded,
        pixel_inputs,
        register_target_checks,
        verify_written,
    )
    from pipeline.export.verify import verify_file as check_file

    register_target_checks()  # --runtimes openvino,tflite,web: the deployment targets
    onnx_path = Path(onnx_path)
    torch_model, inputs, written = None, None, {}
    embedded = file_embedded(onnx_path)  # a file that takes pixels is checked on pixels
    if run_dir is not None:
        loaded = load_run(Path(run_dir), models_dir=models_dir, catalog=catalog)
        samples = gate_split(loaded.split)[1][:MAX_VERIFY_IMAGES]
        # Deployment targets: RUN/deploy/<target>/ as written, against PyTorch.
        written = verify_written(loaded, onnx_path, samples, runtimes)
        if embedded is None:
            torch_model, inputs = loaded.model, gate_inputs(loaded)
    if embedded is not None:
        inputs = pixel_inputs(onnx_path, any_size=embedded)
    others = [name for name in runtimes if name not in written]
    report = check_file(
        onnx_path, torch_model=torch_model, inputs=inputs, runtimes=others, atol=atol, rtol=rtol
    )
    report.runtimes.update(written)
    return report


def expand_images(patterns: Sequence[str]) -> list[Path]:
    """Files, folders (their images, recursively) and globs -> image paths, in a stable order."""
    from pipeline.data.images import is_image_name

    found: list[Path] = []
    for pattern in patterns:
        path = Path(pattern)
        if path.is_dir():
            found += sorted(
                p
                for p in path.rglob("*")
                if p.is_file() and is_image_name(p.name) and not p.name.startswith(".")
            )
        elif any(ch in pattern for ch in "*?["):
            found += sorted(
                Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file()
            )
        else:
            found.append(path)
    return found


@dataclass
class Prediction:
    image: str
    top: list[tuple[str, float]]  # (label, probability), best first
    error: str | None = None
    # The file's unknown score for the image (zoo.ood; None for a file without one), and whether
    # it is past the threshold: the image is "none of these" (never, with --no-reject).
    ood_score: float | None = None
    unknown: bool = False

    def to_dict(self) -> dict[str, Any]:
        if self.error:
            return {"image": self.image, "error": self.error}
        found = {
            "image": self.image,
            "top": [{"label": label, "probability": p} for label, p in self.top],
        }
        if self.ood_score is not None:
            found.update(unknown=self.unknown, ood_score=self.ood_score)
        return found

    def line(self) -> str:
        """What `zoo predict` prints for the image: its top labels, `unknown`, or why unreadable."""
        if self.error:
            return f"{self.image}: unreadable ({self.error})"
        top = ", ".join(f"{label} {prob:.3f}" for label, prob in self.top)
        if self.unknown:
            top = (
                f"unknown (unlike the training images, score {self.ood_score:.4g}; closest: {top})"
            )
        return f"{self.image}: {top}"


def _imagenet_or_numbered(count: int) -> list[str]:
    """ImageNet's class names for a 1000-class head; otherwise the class numbers."""
    if count == 1000:
        return IMAGENET_LABELS_FILE.read_text(encoding="utf-8").splitlines()
    return [str(i) for i in range(count)]


def labels_and_preprocess(
    onnx_path: Path, catalog: Catalog, request: PreprocessRequest | None = None
) -> tuple[list[str], Preprocess, str]:
    """From the file's zoo metadata, else its catalog entry (card beside it, or sha256), then the flags."""
    from pipeline.export.write import metadata_of
    from zoo.files import sha256_file
    from zoo.onnxfile import load_onnx
    from zoo.preprocess import PreprocessRequest, input_signature, resolve_preprocess
    from zoo.workspace import card_entry, read_card

    request = request or PreprocessRequest()
    model = load_onnx(onnx_path, load_external_data=False)
    metadata = metadata_of(model)
    input_name = metadata.input_name or model.graph.input[0].name
    base, labels = metadata.preprocess, list(metadata.labels)
    if not (labels and base):
        card = read_card(onnx_path.parent) if onnx_path.name == "model.onnx" else None
        card = card or {"sha256": sha256_file(onnx_path)}
        entry = card_entry(card, catalog)
        if entry is not None and entry.preprocess is not None:
            base, labels = entry.preprocess, _imagenet_or_numbered(entry.num_classes)
        elif not labels:
            dims = [d.dim_value for d in model.graph.output[0].type.tensor_type.shape.dim]
            labels = _imagenet_or_numbered(max(dims[1:], default=0))
    if base is None and not request.says_normalisation:
        raise ZooError(
            f"{onnx_path} has no zoo metadata (labels, preprocessing) and the catalog does not know it; "
            "pass --preprocess imagenet|inception|caffe|raw (or --mean/--std/--size), "
            "or export it with `zoo export`"
        )
    if request.given:
        signature = input_signature(model)
        base = resolve_preprocess(
            base, request, signature, name=onnx_path.name, commands="zoo predict or zoo evaluate"
        )
    return labels, base, input_name


def predict(
    onnx_path: Path,
    images: Sequence[str],
    *,
    catalog: Catalog,
    top_k: int = 5,
    provider: str = "cpu",
    preprocess: PreprocessRequest | None = None,
    reject: bool = True,
) -> list[Prediction]:
    """Top-K labels per image using only the ONNX file (and onnxruntime); `preprocess`: the user's
    flags. With `reject`, an image past the file's unknown threshold (zoo.ood) is `unknown`."""
    from pipeline.core.metadata import read_metadata
    from pipeline.core.sessions import as_input_type, create_session, run_fixed, session_input_type
    from pipeline.data.images import open_for
    from pipeline.export.embed import embedded_input, image_input

    onnx_path = Path(onnx_path)
    labels, preprocess, input_name = labels_and_preprocess(onnx_path, catalog, preprocess)
    session = create_session(
        onnx_path, "CUDAExecutionProvider" if provider == "cuda" else "CPUExecutionProvider"
    )
    paths = expand_images(images)
    if not paths:
        raise DataError(
            f"no images found in {' '.join(images)}; pass image files, folders or globs"
        )
    predictions = []
    output_names = [o.name for o in session.get_outputs()]
    ood = read_metadata(onnx_path).ood
    first = session.get_inputs()[0]  # with the preprocessing inside, it takes decoded pixels
    embedded = embedded_input(first.name, first.type, list(first.shape))
    for path in paths:
        try:
            img = open_for(str(path), preprocess)
            batch = image_input(img, preprocess, embedded=embedded)[None]
        except (ZooError, OSError) as exc:
            predictions.append(Prediction(str(path), [], error=str(exc)))
            continue
        outputs = dict(
            zip(
                output_names,
                run_fixed(
                    session, None, {input_name: as_input_type(batch, session_input_type(session))}
                ),
                strict=True,
            )
        )
        found = _prediction(str(path), outputs, labels, top_k=top_k)
        predictions.append(_judged(found, outputs, ood, reject=reject))
    return predictions


def _prediction(
    image: str, outputs: dict[str, np.ndarray], labels: Sequence[str], *, top_k: int
) -> Prediction:
    """The top-k labels of one image from the file's outputs: `probs`, else a softmax of the first."""
    import numpy as np

    if "probs" in outputs:
        probs = outputs["probs"].reshape(-1)
    else:
        scores = next(iter(outputs.values())).reshape(-1).astype(np.float64)
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
    order = np.argsort(-probs)[:top_k]
    names = labels if len(labels) == len(probs) else [str(i) for i in range(len(probs))]
    return Prediction(image, [(names[i], float(probs[i])) for i in order])


def _judged(
    found: Prediction, outputs: dict[str, np.ndarray], ood: OodRecord | None, *, reject: bool
) -> Prediction:
    """`found` with the image's unknown score, and `unknown` when it is past the threshold."""
    score = outputs.get(ood.output) if ood is not None else None
    if score is None:
        return found
    value = float(score.reshape(-1)[0])
    return dataclasses.replace(found, ood_score=value, unknown=reject and ood.is_unknown(value))

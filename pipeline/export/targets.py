"""Deployment targets: the exported ONNX file converted by each ecosystem's own tool, then gated.

A target is one registered `DeployTarget`: how to tell whether its tool is installed, how to convert
the run's ONNX file into a folder, and how to run the result in the target's own runtime. The gate
(`gate_target`) feeds the run's held-out images to PyTorch and to that runtime and writes the folder
only when they agree (`write_target`): top-1 agreement and the largest probability difference.

    RUN/model.onnx                      the `onnx` target (or --out), gated as before
    RUN/deploy/<target>/                every other target: its file(s), README.md, labels.txt,
                                        preprocess.json
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.metadata import read_metadata
from pipeline.core.registry import Registry
from pipeline.core.sessions import create_session, fixed_batch, run_fixed
from pipeline.core.trust import OodRecord
from zoo.catalog import Preprocess
from zoo.errors import ZooError

DEPLOY_DIR = "deploy"
MIN_TOP1_AGREEMENT = 0.995  # of the held-out images, float32 targets
MAX_PROB_DIFF = 1e-3  # largest |probability difference| from PyTorch, float32 targets
MAX_LISTED = 5  # disagreeing images named in the one-line verdict
MIN_RESIZE_AGREEMENT = 0.99  # embedded any-size files: top-1 on images of their own sizes
# The modules that register targets; imported on first use, so `import zoo` stays light.
TARGET_MODULES = (
    "pipeline.export.target_openvino",
    "pipeline.export.target_tflite",
    "pipeline.export.target_web",
)


@dataclass(frozen=True)
class TargetInput:
    """What a converter needs besides the ONNX file."""

    onnx_path: Path  # the gated ONNX file (float input, or uint8 pixels when embedded)
    preprocess: Preprocess  # the run's preprocessing
    labels: tuple[str, ...]
    input_name: str
    embedded: bool = False  # the file takes uint8 pixels and does its own preprocessing

    @functools.cached_property
    def ood(self) -> OodRecord | None:
        """The file's unknown score (its second output) and threshold; None for a file without one.
        Read once: the gate, the companions and the README all ask."""
        return read_metadata(self.onnx_path).ood


@dataclass(frozen=True)
class DeployTarget:
    """One deployment target: its tool, its converter and its runtime."""

    name: str  # as given to --target / --runtimes
    title: str  # e.g. "OpenVINO IR"
    extra: str  # how to install what it needs, for the one-line error
    missing: Callable[[], str | None]  # None when installed, else what is missing
    convert: Callable[[TargetInput, Path], Path]  # writes into the folder, returns the main file
    # main file, inputs -> probabilities [N, C]; with output="ood_score", that output's values [N]
    run: Callable[..., np.ndarray]
    takes_any_size: bool = False  # runs an embedded resize at any image size
    embed_by_default: bool = False  # the preprocessing goes inside the file unless told otherwise
    usage: Callable[[Path], str] | None = None  # folder -> how to use it, printed after it
    main_file: str = "model.onnx"  # the file in RUN/deploy/<name>/ that `run` takes


TARGETS: Registry[DeployTarget] = Registry("deployment target", also=("onnx",))


def register_target(target: DeployTarget) -> DeployTarget:
    TARGETS.add(target.name, target)
    return target


def load_targets() -> Registry[DeployTarget]:
    """The registry once every target module has registered its target."""
    for module in TARGET_MODULES:
        importlib.import_module(module)
    return TARGETS


def target_names() -> list[str]:
    """The targets besides `onnx`: the built-in ones in `TARGET_MODULES` order (whichever module was
    imported first), then any other in registration order."""
    builtin = [module.rsplit("target_", 1)[1] for module in TARGET_MODULES]
    return sorted(load_targets(), key=lambda n: builtin.index(n) if n in builtin else len(builtin))


def parse_targets(spec: str | Sequence[str]) -> list[str]:
    """`onnx,openvino` or `all` -> target names in registry order; `all` keeps the installed ones."""
    names = [n.strip() for n in (spec.split(",") if isinstance(spec, str) else spec) if n.strip()]
    known = ["onnx", *target_names()]
    if "all" in names:
        return ["onnx", *(n for n in target_names() if TARGETS[n].missing() is None)]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ZooError(
            f"unknown target {', '.join(unknown)}; choose from {', '.join(known)} or all"
        )
    return [n for n in known if n in names]


@dataclass
class TargetReport:
    """How a target's runtime agreed with PyTorch on the held-out images."""

    target: str
    images: int = 0
    top1_agreement: float = 0.0
    max_prob_diff: float = float("inf")
    disagreeing: list[str] = field(default_factory=list)  # image names whose top-1 differs
    path: str | None = None  # the target's folder once written
    size: int = 0  # bytes of the target's files
    convert_seconds: float = 0.0
    skipped: str | None = None  # why the target was not written (missing tool, failed conversion)
    notes: list[str] = field(default_factory=list)
    embedded: bool = False  # the file takes uint8 pixels and does its own preprocessing
    # Embedded any-size files: top-1 agreement with `zoo predict`'s Python path (Pillow) on the
    # images decoded at their own sizes; None where the app resizes (or nothing is embedded).
    resize_agreement: float | None = None
    resize_disagreeing: list[str] = field(default_factory=list)
    # A file with an unknown score (zoo.ood): the share of images on the same side of its
    # threshold as in onnxruntime, and the largest score difference; None without one.
    unknown_agreement: float | None = None
    max_score_diff: float | None = None

    @property
    def passed(self) -> bool:
        resize_ok = self.resize_agreement is None or self.resize_agreement >= MIN_RESIZE_AGREEMENT
        unknown_ok = self.unknown_agreement is None or self.unknown_agreement >= MIN_TOP1_AGREEMENT
        return (
            self.skipped is None
            and self.top1_agreement >= MIN_TOP1_AGREEMENT
            and self.max_prob_diff <= MAX_PROB_DIFF
            and resize_ok
            and unknown_ok
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "passed": self.passed,
            "images": self.images,
            "top1_agreement": self.top1_agreement,
            "max_prob_diff": self.max_prob_diff,
            "disagreeing": self.disagreeing,
            "path": self.path,
            "size": self.size,
            "convert_seconds": round(self.convert_seconds, 2),
            "skipped": self.skipped,
            "notes": self.notes,
            "embedded": self.embedded,
            "resize_agreement": self.resize_agreement,
            "resize_disagreeing": self.resize_disagreeing,
            "unknown_agreement": self.unknown_agreement,
            "max_score_diff": self.max_score_diff,
        }

    def line(self) -> str:
        """The one line `zoo export` prints for this target."""
        if self.skipped:
            return f"{self.target}: not written ({self.skipped})"
        figures = (
            f"top-1 agreement {self.top1_agreement:.1%} on {self.images} images, "
            f"max |prob diff| {self.max_prob_diff:.2e}"
        )
        if self.resize_agreement is not None:
            figures += f", {self.resize_agreement:.1%} at their own sizes"
        if self.unknown_agreement is not None:
            figures += f", unknown flag agreement {self.unknown_agreement:.1%}"
        if self.passed:
            notes = "".join(f"; {note}" for note in self.notes)
            return f"{self.target}: {self.path} ({figures}{notes})"
        disagreeing = self.disagreeing or self.resize_disagreeing
        shown = ", ".join(disagreeing[:MAX_LISTED])
        more = f" (+{len(disagreeing) - MAX_LISTED} more)" if len(disagreeing) > MAX_LISTED else ""
        disagree = f"; disagree on {shown}{more}" if disagreeing else ""
        return f"{self.target}: FAILED the gate, not written ({figures}{disagree})"


def compare_probs(
    report: TargetReport, reference: np.ndarray, probs: np.ndarray, names: Sequence[str]
) -> TargetReport:
    """Fill `report` with the agreement of `probs` with the PyTorch `reference` [N, C]."""
    reference = reference.reshape(len(reference), -1)
    probs = np.asarray(probs, dtype=np.float64).reshape(len(reference), -1)
    same = reference.argmax(axis=1) == probs.argmax(axis=1)
    report.images = len(reference)
    report.top1_agreement = float(same.mean()) if len(same) else 0.0
    report.max_prob_diff = float(np.abs(reference - probs).max()) if len(same) else 0.0
    report.disagreeing = [names[i] for i in np.flatnonzero(~same)]
    return report


def target_missing(name: str) -> str | None:
    """None when the target can be written here, else the one line that says how to get it."""
    target = load_targets().lookup(name)
    why = target.missing()
    return None if why is None else f"{why}; {target.extra}"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_companions(folder: Path, source: TargetInput) -> None:
    """labels.txt and preprocess.json beside a target's file, for apps that read them."""
    (folder / "labels.txt").write_text("\n".join(source.labels) + "\n", encoding="utf-8")
    preprocess = {**source.preprocess.to_dict(), "embedded": source.embedded}
    ood = source.ood
    if ood is not None:  # how an app tells "none of these" (the page reads it from here)
        preprocess["ood"] = {"output": ood.output, "score": ood.score, "threshold": ood.threshold}
    (folder / "preprocess.json").write_text(json.dumps(preprocess, indent=2) + "\n")


def ood_readme(source: TargetInput) -> str:
    """The README's line on the second output, the unknown score; empty for a file without one."""
    ood = source.ood
    if ood is None:
        return ""
    return (
        f"- Output `{ood.output}`: `[N]`, how unlike the training images each image is "
        f"({ood.score} distance in the model's feature space). Above **{ood.threshold:.6g}** "
        f"(`preprocess.json`'s `ood.threshold`, chosen to keep {ood.keep:.0%} of the validation "
        'images) the image is none of the labels: show "unknown" instead of the top label, as '
        "`zoo predict` does.\n"
    )


def publish(staging: Path, final: Path) -> None:
    """Replace `final` with the finished `staging` folder; an old target stays until then."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    try:
        staging.rename(final)
    except OSError:
        if old.exists():
            old.rename(final)
        raise
    shutil.rmtree(old, ignore_errors=True)


def staging_dir(deploy_dir: Path, name: str) -> Path:
    """A fresh folder beside the target's, so a failed conversion leaves nothing half-written."""
    deploy_dir.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{name}-", dir=deploy_dir))


def require(name: str) -> DeployTarget:
    """The registered target, or NotFound naming the known ones."""
    return load_targets().lookup(name)


def as_batches(inputs: np.ndarray | Sequence[np.ndarray], size: int) -> list[np.ndarray]:
    """Inputs in batches of at most `size`: an array [N, ...] in slices, a sequence of images of
    different sizes ([H, W, C] or [1, H, W, C]) one by one."""
    if isinstance(inputs, np.ndarray):
        return [np.ascontiguousarray(inputs[i : i + size]) for i in range(0, len(inputs), size)]
    items = [np.asarray(item) for item in inputs]
    return [np.ascontiguousarray(item[None] if item.ndim == 3 else item) for item in items]


def probs_of(outputs: np.ndarray, *, named_probs: bool) -> np.ndarray:
    """Probabilities [N, C]: the `probs` output as it is, any other output through a softmax."""
    values = np.asarray(outputs, dtype=np.float64).reshape(len(outputs), -1)
    if named_probs:
        return values
    values = np.exp(values - values.max(axis=1, keepdims=True))
    return values / values.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class GateImages:
    """The held-out images as each kind of target file takes them, with PyTorch's answers."""

    names: list[str]  # one per image, for the verdict
    reference: np.ndarray  # PyTorch probabilities [N, C] of the Python (Pillow) preprocessing
    floats: np.ndarray  # the model's float input [N, ...], preprocessed in Python
    resized: np.ndarray  # uint8 [N, S, S, C] resized by Pillow to S, the resize size: the
    # any-size graph's own resize is then the identity, so its numbers can be held to 1e-3
    cropped: np.ndarray  # uint8 [N, crop, crop, C]: what the fixed-size graph takes
    decoded: list[np.ndarray]  # uint8 [H, W, C] at their own sizes, decoded as `zoo predict` does

    def inputs(self, *, embedded: bool, any_size: bool) -> np.ndarray:
        """The batch a target file of that kind takes."""
        if not embedded:
            return self.floats
        return self.resized if any_size else self.cropped


def gate_target(
    name: str, source: TargetInput, images: GateImages, *, deploy_dir: Path
) -> TargetReport:
    """Convert, run on the held-out images, compare; RUN/deploy/<name>/ only when it passes.

    A missing tool or a failed conversion is a report with `skipped`, never an exception, so the
    other targets are still written; whatever the target left half-done is removed.
    """
    target = require(name)
    report = TargetReport(name, embedded=source.embedded)
    why = target_missing(name)
    if why is not None:
        report.skipped = why
        return report
    staging = staging_dir(deploy_dir, name)
    try:
        start = time.perf_counter()
        main = target.convert(source, staging)
        report.convert_seconds = time.perf_counter() - start
        any_size = source.embedded and target.takes_any_size
        batch = images.inputs(embedded=source.embedded, any_size=any_size)
        compare_probs(report, images.reference, target.run(main, batch), images.names)
        ood = source.ood
        if ood is not None:
            compare_unknown(report, source, batch, target.run(main, batch, output=ood.output))
        if any_size:
            _resize_agreement(report, images, target.run(main, images.decoded))
        report.size = folder_size(staging)
        if report.passed:
            publish(staging, deploy_dir / name)
            report.path = str(deploy_dir / name)
    except ZooError as exc:
        report.skipped = str(exc)
    except Exception as exc:  # a converter's or runtime's own error: the target alone fails
        message = " ".join(str(exc).split())[:300]
        report.skipped = f"{type(exc).__name__}: {message}; check the file with `zoo verify FILE --runtimes {name}`"  # fmt: skip
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def compare_unknown(
    report: TargetReport, source: TargetInput, batch: np.ndarray, scores: np.ndarray
) -> None:
    """The target's unknown scores against onnxruntime's on the same file and inputs: whether
    each image falls on the same side of the threshold (an app shows "unknown" alike)."""
    ood = source.ood
    assert ood is not None
    reference = onnx_output(source.onnx_path, batch, ood.output)
    scores = np.asarray(scores, dtype=np.float64).reshape(len(reference))
    same = (reference > ood.threshold) == (scores > ood.threshold)
    report.unknown_agreement = float(same.mean()) if len(same) else None
    report.max_score_diff = float(np.abs(reference - scores).max()) if len(same) else None


def onnx_output(onnx_path: Path, batch: np.ndarray, output: str) -> np.ndarray:
    """One output of an ONNX file in onnxruntime on the CPU, flattened to [N]."""
    session = create_session(onnx_path, "CPUExecutionProvider")
    name = session.get_inputs()[0].name
    step = fixed_batch(session) or 32
    rows = [
        run_fixed(session, [output], {name: batch[i : i + step]})[0]
        for i in range(0, len(batch), step)
    ]
    return np.concatenate(rows).astype(np.float64).reshape(len(batch))


def _resize_agreement(report: TargetReport, images: GateImages, probs: np.ndarray) -> None:
    """Top-1 agreement of images at their own sizes with PyTorch on Pillow's preprocessing."""
    probs = np.asarray(probs).reshape(len(images.decoded), -1)
    same = probs.argmax(axis=1) == images.reference.argmax(axis=1)
    report.resize_agreement = float(same.mean()) if len(same) else None
    report.resize_disagreeing = [images.names[i] for i in np.flatnonzero(~same)]


def app_resize_python(preprocess: Preprocess) -> str:
    """Python lines (Pillow) that resize and crop a photo as the run did, ending in `pixels`."""
    size, crop = max(preprocess.resize, preprocess.crop), preprocess.crop
    mode = "RGB" if preprocess.channels == 3 else "L"
    if preprocess.resize_mode == "direct":
        resize = f"img = img.resize(({size}, {size}), Image.BILINEAR)"
    else:  # the shorter side to `size`, the longer truncated, as torchvision's Resize(int)
        resize = (
            "w, h = img.size\n"
            f"img = img.resize(({size}, max({size}, int({size} * h / w))) if w <= h else "
            f"(max({size}, int({size} * w / h)), {size}), Image.BILINEAR)"
        )
    return (
        f'img = Image.open("photo.jpg").convert("{mode}")\n{resize}\n'
        f"left, top = round((img.width - {crop}) / 2), round((img.height - {crop}) / 2)\n"
        f"pixels = np.asarray(img.crop((left, top, left + {crop}, top + {crop})))"
        + ("[None, :, :, None]" if preprocess.channels == 1 else "[None]")
        + f"  # uint8 [1, {crop}, {crop}, {preprocess.channels}]"
    )

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

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.registry import Registry
from zoo.catalog import Preprocess
from zoo.errors import ZooError

DEPLOY_DIR = "deploy"
MIN_TOP1_AGREEMENT = 0.995  # of the held-out images, float32 targets
MAX_PROB_DIFF = 1e-3  # largest |probability difference| from PyTorch, float32 targets
MAX_LISTED = 5  # disagreeing images named in the one-line verdict


@dataclass(frozen=True)
class TargetInput:
    """What a converter needs besides the ONNX file."""

    onnx_path: Path  # the gated ONNX file (float input, or uint8 pixels when embedded)
    preprocess: Preprocess  # the run's preprocessing
    labels: tuple[str, ...]
    input_name: str
    embedded: bool = False  # the file takes uint8 pixels and does its own preprocessing


@dataclass(frozen=True)
class DeployTarget:
    """One deployment target: its tool, its converter and its runtime."""

    name: str  # as given to --target / --runtimes
    title: str  # e.g. "OpenVINO IR"
    extra: str  # how to install what it needs, for the one-line error
    missing: Callable[[], str | None]  # None when installed, else what is missing
    convert: Callable[[TargetInput, Path], Path]  # writes into the folder, returns the main file
    run: Callable[[Path, np.ndarray], np.ndarray]  # main file, inputs -> probabilities [N, C]
    takes_any_size: bool = False  # runs an embedded resize at any image size
    embed_by_default: bool = False  # the preprocessing goes inside the file unless told otherwise


TARGETS: Registry[DeployTarget] = Registry("deployment target", also=("onnx",))


def register_target(target: DeployTarget) -> DeployTarget:
    TARGETS.add(target.name, target)
    return target


def target_names() -> list[str]:
    """The targets besides `onnx`, in registration order."""
    return list(TARGETS)


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

    @property
    def passed(self) -> bool:
        return (
            self.skipped is None
            and self.top1_agreement >= MIN_TOP1_AGREEMENT
            and self.max_prob_diff <= MAX_PROB_DIFF
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
        }

    def line(self) -> str:
        """The one line `zoo export` prints for this target."""
        if self.skipped:
            return f"{self.target}: not written ({self.skipped})"
        figures = (
            f"top-1 agreement {self.top1_agreement:.1%} on {self.images} images, "
            f"max |prob diff| {self.max_prob_diff:.2e}"
        )
        if self.passed:
            return f"{self.target}: {self.path} ({figures})"
        shown = ", ".join(self.disagreeing[:MAX_LISTED])
        more = f" (+{len(self.disagreeing) - MAX_LISTED} more)" if len(self.disagreeing) > MAX_LISTED else ""  # fmt: skip
        disagree = f"; disagree on {shown}{more}" if self.disagreeing else ""
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
    target = TARGETS[name]
    why = target.missing()
    return None if why is None else f"{why}; {target.extra}"


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def write_companions(folder: Path, source: TargetInput) -> None:
    """labels.txt and preprocess.json beside a target's file, for apps that read them."""
    (folder / "labels.txt").write_text("\n".join(source.labels) + "\n", encoding="utf-8")
    preprocess = {**source.preprocess.to_dict(), "embedded": source.embedded}
    (folder / "preprocess.json").write_text(json.dumps(preprocess, indent=2) + "\n")


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
    return TARGETS.lookup(name)

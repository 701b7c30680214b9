"""The "Calibration and unknown inputs" section of report.html.

Drawn from run.json's `calibration` and `ood` (pipeline.core.trust) and the validation scores in
the run's trust.safetensors (pipeline.train.trust): the reliability diagram before and after the
temperature, the ECE, and the histogram of the validation images' unknown scores with the
threshold on it.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.record import RunRecord
from pipeline.core.rundir import RunDir
from pipeline.core.trust import CalibrationRecord, OodRecord, Reliability
from pipeline.report.page import columns, data_uri, esc, fmt, key_values, percent, warning

FIGURE_SIZE = (4.6, 3.6)  # inches, at the report's 110 dpi


def trust_section(run_dir: Path, record: RunRecord) -> str:
    """The section's HTML; how to get it for runs that have neither record."""
    if record.calibration is None and record.ood is None:
        return warning(
            "Not calibrated and no unknown threshold: the run predates them or did not finish; "
            "run <code>zoo adapt</code> again to get both."
        )
    parts = []
    if record.calibration is not None:
        parts.append(_calibration(record.calibration))
    if record.ood is not None:
        parts.append(_unknown(record.ood, _val_scores(RunDir(run_dir))))
    return columns(*parts)


def _calibration(calibration: CalibrationRecord) -> str:
    where = calibration.measured_on or "held-out"
    facts = key_values(
        {
            "temperature": fmt(calibration.temperature, digits=3),
            "fitted on": f"{calibration.fit_images} {calibration.fitted_on} images",
            f"{where} ECE before": fmt(calibration.ece_before, digits=4),
            f"{where} ECE after": fmt(calibration.ece_after, digits=4),
        }
    )
    note = (
        '<p class="muted">The exported file divides its logits by the temperature, so its '
        "<code>probs</code> are the calibrated ones. ECE: 15 equal-width confidence bins.</p>"
    )
    figure = _image(_reliability_png(calibration), "reliability diagram before and after")
    return f"<h3>Calibrated probabilities</h3>{facts}{figure}{note}"


def _unknown(ood: OodRecord, val_scores: np.ndarray | None) -> str:
    facts = key_values(
        {
            "score": ood.score,
            "threshold": fmt(ood.threshold, digits=4),
            "validation images kept": f"{percent(ood.val_kept)} (asked: {percent(ood.keep)})",
            "test images kept": percent(ood.test_kept),
            "output": ood.output,
        }
    )
    note = (
        '<p class="muted">An image scoring above the threshold is <b>unknown</b> in '
        "<code>zoo predict</code> and <code>zoo evaluate</code> (<code>--no-reject</code> turns "
        "that off); <code>zoo export --keep</code> chooses the threshold again.</p>"
    )
    if val_scores is None:
        return f"<h3>Unknown inputs</h3>{facts}{warning('No trust.safetensors in the run: no histogram.')}"  # fmt: skip
    figure = _image(_histogram_png(val_scores, ood), "histogram of validation scores")
    return f"<h3>Unknown inputs</h3>{facts}{figure}{note}"


def _val_scores(run: RunDir) -> np.ndarray | None:
    """The validation images' unknown scores, None when trust.safetensors is not readable."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        return load_file(str(run.trust_file))["val_scores"]
    except (SafetensorError, OSError, KeyError, ValueError):
        return None


def _image(png: bytes, alt: str) -> str:
    return f'<img class="plot" alt="{esc(alt)}" src="{data_uri(png, "image/png")}">'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def _bars(ax: Any, reliability: Reliability, *, label: str, offset: float, color: str) -> None:
    """One reliability curve: accuracy per confidence bin, as bars beside the other curve's."""
    bins = len(reliability.counts)
    width = 1.0 / bins
    centres = (np.arange(bins) + 0.5) * width
    accuracy = [np.nan if a is None else a for a in reliability.accuracy]
    ax.bar(centres + offset * width, accuracy, width=width / 2, color=color, alpha=0.8, label=f"{label} (ECE {reliability.ece:.3f})")  # fmt: skip


def _reliability_png(calibration: CalibrationRecord) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfectly calibrated")
    if calibration.before is not None:
        _bars(ax, calibration.before, label="before", offset=-0.25, color="#cf222e")
    if calibration.after is not None:
        _bars(ax, calibration.after, label="after", offset=0.25, color="#0969da")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1),
        xlabel="confidence (top-1 probability)",
        ylabel="accuracy",
        title=f"{calibration.measured_on or 'held-out'} images, T = {calibration.temperature:.3f}",
    )
    ax.legend(loc="upper left", fontsize=8)
    return _png(fig)


def _histogram_png(scores: np.ndarray, ood: OodRecord) -> bytes:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=FIGURE_SIZE)
    ax.hist(scores, bins=min(40, max(10, len(scores) // 5)), color="#0969da", alpha=0.8)
    ax.axvline(ood.threshold, color="#cf222e", linewidth=2, label=f"threshold {ood.threshold:.4g}")
    ax.set(
        xlabel=f"{ood.score} score (higher: less like the training images)",
        ylabel="validation images",
        title=f"{len(scores)} validation images, {percent(ood.val_kept)} kept",
    )
    ax.legend(fontsize=8)
    return _png(fig)

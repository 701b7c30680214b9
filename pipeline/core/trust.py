"""How far a run's outputs can be trusted: calibrated probabilities and "none of these".

Two typed records, written by `pipeline.train.trust` after training and read by export, predict,
evaluate and the report: `CalibrationRecord` (run.json's `calibration`: the temperature that
divides the logits before the softmax, with the reliability of the probabilities before and
after) and `OodRecord` (run.json's `ood`, and the exported file's `zoo.ood`: which score the graph
computes as its `ood_score` output, and the threshold past which an image is "unknown").
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ECE_BINS = 15  # equal-width confidence bins of the expected calibration error
OOD_OUTPUT = "ood_score"  # the exported graph's output: higher means less like the training images
# What the exported `logits` output holds, for the file's metadata. They are divided by the
# temperature, so that any runtime or app that takes their softmax gets the calibrated `probs`.
LOGITS_NOTE = "divided by the temperature: probs = softmax(logits); raw = logits * temperature"


@dataclass(frozen=True)
class Reliability:
    """Equal-width confidence bins over [0, 1]: the images, mean confidence and accuracy in each."""

    counts: list[int]
    confidence: list[float | None]  # mean top-1 probability of the bin's images; None when empty
    accuracy: list[float | None]  # share of them classified correctly; None when empty
    ece: float  # sum over bins of |accuracy - confidence| weighted by the bin's share of images

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Reliability:
        return cls(
            counts=[int(c) for c in raw["counts"]],
            confidence=list(raw["confidence"]),
            accuracy=list(raw["accuracy"]),
            ece=float(raw["ece"]),
        )


@dataclass(frozen=True)
class CalibrationRecord:
    """Temperature scaling of a run (run.json's `calibration`)."""

    temperature: float  # logits are divided by it before the softmax; 1.0 changes nothing
    fitted_on: str = "val"  # the split whose negative log-likelihood chose it
    fit_images: int = 0
    nll_before: float | None = None  # on the fitting split, at temperature 1 and after
    nll_after: float | None = None
    measured_on: str | None = None  # the split `before`/`after` describe ("test", or "val")
    before: Reliability | None = None
    after: Reliability | None = None

    @property
    def ece_before(self) -> float | None:
        return None if self.before is None else self.before.ece

    @property
    def ece_after(self) -> float | None:
        return None if self.after is None else self.after.ece

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> CalibrationRecord:
        values = _known(cls, raw)
        for name in ("before", "after"):
            if isinstance(values.get(name), Mapping):
                values[name] = Reliability.from_dict(values[name])
        return cls(**values)


@dataclass(frozen=True)
class OodRecord:
    """The out-of-distribution score and its threshold (run.json's `ood`, the file's `zoo.ood`)."""

    score: str  # which score: "mahalanobis" (pipeline.train.ood.SCORES names them all)
    threshold: float  # an image whose score is above it is "unknown"
    keep: float  # the share of validation images the threshold was chosen to keep
    output: str = OOD_OUTPUT  # the exported graph's output that holds the score
    val_images: int = 0  # validation images the threshold was chosen on
    val_kept: float | None = None  # the share of them it keeps (ties can keep a few more)
    test_kept: float | None = None  # the share of the held-out split it keeps

    def is_unknown(self, score: float) -> bool:
        """Whether an image with `score` is past the threshold."""
        return score > self.threshold

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> OodRecord:
        """The record `dataclasses.asdict` wrote; ValueError/TypeError when it is not one."""
        values = _known(cls, raw)
        values["threshold"], values["keep"] = float(raw["threshold"]), float(raw["keep"])
        return cls(**values)


def _known(kind: type, raw: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of `raw` that `kind` has fields for (a newer zoo's extra keys are dropped)."""
    names = {f.name for f in dataclasses.fields(kind)}
    return {k: v for k, v in raw.items() if k in names}

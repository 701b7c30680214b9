"""After training: calibrate the probabilities and fit the unknown score, for the run and its export.

`fit_trust` runs once the best weights are back. On the validation split it fits the temperature
(pipeline.train.calibrate) and chooses the threshold that keeps `--keep` of the images; the unknown
score (pipeline.train.ood) is fitted on the training images' pooled features, which the head's
input already is, as the images are (unaugmented). run.json gets the two records; the run's
trust.safetensors the score's tensors, and the validation and held-out logits, labels and scores
(`zoo export --keep` chooses the threshold again from the validation scores).

`TrustedModel` puts them around the adapted model for export: `forward` gives the logits divided
by the temperature (so every check that takes a softmax of the logits sees the calibrated
probabilities), `outputs` all that the exported graph outputs: those logits, their softmax, and
the score.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from pipeline.core.rundir import RunDir
from pipeline.core.trust import LOGITS_NOTE, OOD_OUTPUT, CalibrationRecord, OodRecord
from pipeline.data.split import ImageDataset
from pipeline.train.calibrate import calibrate
from pipeline.train.features import EVAL_BATCH
from pipeline.train.ood import DEFAULT_SCORE, fit_score, load_score, score, threshold_for
from zoo.errors import DataError, ZooError

if TYPE_CHECKING:
    from pipeline.core.rundir import LiveRecord
    from pipeline.train.loop import TrainConfig

DEFAULT_KEEP = 0.95  # share of in-distribution validation images the unknown threshold keeps
SCORER_PREFIX = "scorer."  # the score's tensors in trust.safetensors; Trust.tensors() beside them


class HeadInputs(NamedTuple):
    """One split as the head sees it: pooled features, logits and labels, in split order."""

    features: np.ndarray  # [N, D] float32
    logits: np.ndarray  # [N, C] float32, raw
    labels: np.ndarray  # [N] int64


def head_inputs(
    model: nn.Module, loader: Iterable, *, config: TrainConfig, dist: Any = None
) -> HeadInputs:
    """The pooled features entering `model.head` and the logits leaving it, for every batch.

    `model` is the adapted model or the trainable top of one (pipeline.train.fastpath): both end
    in `head`, whose input a hook records. Under several workers the shards are gathered.
    """
    captured: list[torch.Tensor] = []
    hook = model.head.register_forward_pre_hook(lambda _m, args: captured.append(args[0].float()))
    features, logits, labels = [], [], []
    model.eval()
    try:
        with torch.inference_mode():
            for inputs, batch_labels in loader:
                inputs = inputs.to(config.device)
                if config.channels_last and inputs.dim() == 4:
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                logits.append(torch.flatten(model(inputs), 1).float().cpu())
                features.append(captured.pop().flatten(1).cpu())
                labels.append(batch_labels.cpu())
    finally:
        hook.remove()
    if not labels:
        return HeadInputs(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.float32), np.zeros(0, np.int64))  # fmt: skip
    all_features, all_labels = torch.cat(features), torch.cat(labels)
    all_logits = torch.cat(logits)
    if dist is not None and dist.enabled:
        all_features, _ = dist.gather_split(all_features, all_labels)
        all_logits, all_labels = dist.gather_split(all_logits, all_labels)
    return HeadInputs(all_features.numpy(), all_logits.numpy(), all_labels.numpy().astype(np.int64))


@dataclasses.dataclass(frozen=True)
class Trust:
    """What `fit_trust` found: the two records, the fitted score, and what they were chosen and
    measured on (kept in trust.safetensors, so that a threshold or temperature can be chosen again)."""

    calibration: CalibrationRecord
    ood: OodRecord
    scorer: nn.Module
    val_scores: np.ndarray
    val: HeadInputs | None = None
    held_out: HeadInputs | None = None
    held_out_scores: np.ndarray | None = None

    def tensors(self) -> dict[str, np.ndarray]:
        """The arrays trust.safetensors keeps beside the score's own tensors."""
        found = {"val_scores": np.asarray(self.val_scores, np.float64)}
        for name, part in (("val", self.val), ("held_out", self.held_out)):
            if part is not None:
                found[f"{name}_logits"] = np.asarray(part.logits, np.float32)
                found[f"{name}_labels"] = np.asarray(part.labels, np.int64)
        if self.held_out_scores is not None:
            found["held_out_scores"] = np.asarray(self.held_out_scores, np.float64)
        return found


def fit_on(
    train: HeadInputs,
    val: HeadInputs,
    held_out: HeadInputs,
    *,
    num_classes: int,
    keep: float = DEFAULT_KEEP,
    held_out_split: str = "test",
    score_name: str = DEFAULT_SCORE,
) -> Trust:
    """Temperature and threshold on `val`, the score on `train`, both measured on `held_out`."""
    calibration = calibrate(
        val.logits,
        val.labels,
        measure_logits=held_out.logits,
        measure_labels=held_out.labels,
        measured_on=held_out_split,
    )
    temperature = calibration.temperature
    scorer = fit_score(score_name, train.features, train.labels, num_classes)
    val_scores = score(scorer, val.features, val.logits / temperature)
    threshold = threshold_for(val_scores, keep)
    held_scores = score(scorer, held_out.features, held_out.logits / temperature)
    ood = OodRecord(
        score=score_name,
        threshold=threshold,
        keep=keep,
        val_images=len(val_scores),
        val_kept=round(float(np.mean(val_scores <= threshold)), 6),
        test_kept=round(float(np.mean(held_scores <= threshold)), 6) if len(held_scores) else None,
    )
    return Trust(calibration, ood, scorer, val_scores, val, held_out, held_scores)


def fit_trust(
    setup: Any,
    *,
    record: LiveRecord,
    held_out_split: str,
    keep: float = DEFAULT_KEEP,
    config: TrainConfig,
    log: Callable[[str], None],
) -> Trust | None:
    """Calibrate and fit the unknown score on a trained run's loaders; record them in the run.

    Every worker takes part (the splits are gathered); the one that writes the run saves
    trust.safetensors, and run.json gets the records with the run's next save. A run whose data
    cannot support the fit is left uncalibrated, with one line saying why.
    """
    model, dist = setup.model, setup.dist
    held_loader = setup.test_loader if held_out_split == "test" else setup.val_loader
    val = head_inputs(model, setup.val_loader, config=config, dist=dist)
    held_out = head_inputs(model, held_loader, config=config, dist=dist)
    train = head_inputs(model, _unaugmented(setup.make_train_loader)(EVAL_BATCH), config=config, dist=dist)  # fmt: skip
    try:
        trust = fit_on(train, val, held_out, num_classes=val.logits.shape[1], keep=keep, held_out_split=held_out_split)  # fmt: skip
    except (DataError, ValueError, np.linalg.LinAlgError) as exc:
        log(f"no calibration or unknown threshold: {exc}")
        return None
    record.update(calibration=trust.calibration, ood=trust.ood)
    if record.writes:
        save_trust(record.run_dir, trust)
    calibration, ood = trust.calibration, trust.ood
    log(
        f"calibrated: temperature {calibration.temperature:.3f}, {held_out_split} ECE "
        f"{calibration.ece_before:.3f} -> {calibration.ece_after:.3f}; unknown past "
        f"{ood.score} {ood.threshold:.4g} (keeps {ood.val_kept:.0%} of validation images, "
        f"{ood.test_kept or 0:.0%} of {held_out_split})"
    )
    return trust


def _unaugmented(make_train_loader: Any) -> Any:
    """The run's training loader with its images as they are: the score describes the training
    images as validation, test and new images are seen (pipeline.train.loaders._TrainLoader)."""
    dataset = getattr(make_train_loader, "dataset", None)
    if isinstance(dataset, ImageDataset) and dataset.augment != "none":
        plain = ImageDataset(dataset.samples, dataset.preprocess)
        return dataclasses.replace(make_train_loader, dataset=plain)
    return make_train_loader


def save_trust(run: RunDir, trust: Trust) -> None:
    """trust.safetensors: the score's tensors, the validation and held-out logits and scores."""
    from safetensors.torch import save_file

    from zoo.files import atomic_write

    tensors = {SCORER_PREFIX + k: v.detach().cpu().contiguous() for k, v in trust.scorer.state_dict().items()}  # fmt: skip
    tensors.update({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in trust.tensors().items()})  # fmt: skip
    atomic_write(run.trust_file, lambda tmp: save_file(tensors, tmp))


def load_trust(run: RunDir, ood: OodRecord) -> tuple[nn.Module, np.ndarray]:
    """The score and the validation scores that trust.safetensors holds for run.json's `ood`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(run.trust_file))
        state = {k[len(SCORER_PREFIX) :]: v for k, v in tensors.items() if k.startswith(SCORER_PREFIX)}  # fmt: skip
        return load_score(ood.score, state), tensors["val_scores"].numpy()
    except (SafetensorError, OSError, ValueError, KeyError) as exc:
        raise ZooError(
            f"{run.trust_file} is missing or damaged ({exc!r}); re-run `zoo adapt` to fit the unknown score again"
        ) from exc


class TrustedModel(nn.Module):
    """An adapted model with its temperature and unknown score, as the exported graph computes it."""

    def __init__(
        self,
        model: nn.Module,
        *,
        calibration: CalibrationRecord | None = None,
        ood: OodRecord | None = None,
        scorer: nn.Module | None = None,
        val_scores: np.ndarray | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.calibration, self.ood, self.scorer = calibration, ood, scorer if ood else None
        self.val_scores = val_scores
        temperature = calibration.temperature if calibration else 1.0
        self.register_buffer("temperature", torch.tensor(float(temperature)))

    @property
    def output_names(self) -> tuple[str, ...]:
        return ("logits", "probs", OOD_OUTPUT) if self.scorer is not None else ("logits", "probs")

    def __getattr__(self, name: str) -> Any:
        """The adapted model's own parts (`backbone`, `head`, `embed`, ...) through the wrapper."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("model")  # absent while unpickling
            if inner is None:
                raise
            return getattr(inner, name)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The calibrated logits: the adapted model's divided by the temperature."""
        return torch.flatten(self.model(images), 1) / self.temperature

    def outputs(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(logits / temperature, their softmax[, unknown score]) in `output_names` order."""
        features = self.model.embed(images)
        scaled = torch.flatten(self.model.head(features), 1) / self.temperature
        probs = torch.softmax(scaled, dim=1)
        if self.scorer is None:
            return scaled, probs
        return scaled, probs, self.scorer(torch.flatten(features, 1), scaled)

    def with_keep(self, keep: float) -> OodRecord:
        """Choose the threshold again to keep `keep` of the validation images; the new record."""
        if self.ood is None or self.val_scores is None:
            raise ZooError(
                "this run has no unknown score (it was trained before zoo fitted one); "
                "re-run `zoo adapt` to get one, or export without --keep"
            )
        threshold = threshold_for(self.val_scores, keep)
        kept = round(float(np.mean(self.val_scores <= threshold)), 6)
        self.ood = dataclasses.replace(
            self.ood, threshold=threshold, keep=keep, val_kept=kept, test_kept=None
        )
        return self.ood

    def metadata(self) -> dict[str, Any]:
        """The exported file's `zoo.calibration` and `zoo.ood` (none before they were fitted)."""
        found: dict[str, Any] = {}
        if self.calibration is not None:
            found["calibration"] = {
                "temperature": self.calibration.temperature,
                "logits": LOGITS_NOTE,
                "ece_before": self.calibration.ece_before,
                "ece_after": self.calibration.ece_after,
                "measured_on": self.calibration.measured_on,
            }
        if self.ood is not None and self.scorer is not None:
            found["ood"] = dataclasses.asdict(self.ood)
        return found


def trusted(model: nn.Module, run_dir: Path) -> TrustedModel:
    """A run's adapted model with what its run.json and trust.safetensors say (if anything)."""
    run = RunDir(run_dir)
    record = run.record()
    scorer = val_scores = None
    if record.ood is not None:
        scorer, val_scores = load_trust(run, record.ood)
    return TrustedModel(
        model, calibration=record.calibration, ood=record.ood, scorer=scorer, val_scores=val_scores
    )

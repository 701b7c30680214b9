"""Temperature scaling: fitted on validation logits, measured by ECE, folded into the export."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax
from test_verify import LABELS, NUM_CLASSES, SHAPE, SIZE, image_inputs

from pipeline.core.metadata import read_metadata
from pipeline.core.record import RunRecord
from pipeline.core.sessions import create_session
from pipeline.core.trust import LOGITS_NOTE, CalibrationRecord, OodRecord
from pipeline.export.write import export_model
from pipeline.train.calibrate import calibrate, fit_temperature, nll, reliability
from pipeline.train.trust import TrustedModel
from zoo.catalog import IMAGENET_PREPROCESS


class TinyAdapted(torch.nn.Module):
    """What pipeline.surgery.head.AdaptedModel offers export: `embed` (pooled features) and `head`."""

    def __init__(self, seed: int = 0, width: int = 16) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.backbone = torch.nn.Sequential(
            torch.nn.Conv2d(3, width, 3, stride=2, padding=1),
            torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
        )
        self.head = torch.nn.Linear(width, NUM_CLASSES)
        with torch.no_grad():
            self.head.weight.mul_(20)  # sharp logits, as a fine-tuned network gives

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(images))


def over_confident(n: int = 4000, *, sharpen: float = 3.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """Logits `sharpen` times those of a calibrated model, and labels drawn from that model."""
    rng = np.random.default_rng(seed)
    honest = rng.normal(0, 2.0, (n, NUM_CLASSES))
    labels = np.array([rng.choice(NUM_CLASSES, p=p) for p in softmax(honest, axis=1)])
    return honest * sharpen, labels


def test_the_temperature_undoes_over_confidence() -> None:
    logits, labels = over_confident()
    temperature = fit_temperature(logits, labels)
    assert temperature == pytest.approx(3.0, rel=0.15)
    assert nll(logits, labels, temperature) < nll(logits, labels)
    before = reliability(softmax(logits, axis=1), labels).ece
    after = reliability(softmax(logits / temperature, axis=1), labels).ece
    assert after < before / 2, (before, after)
    # A calibrated model keeps a temperature near 1.
    assert fit_temperature(logits / 3.0, labels) == pytest.approx(1.0, rel=0.15)


def test_one_absurd_validation_image_does_not_set_the_temperature() -> None:
    logits, labels = over_confident(n=400, sharpen=1.0)
    absurd = np.zeros((1, NUM_CLASSES))
    absurd[0, 1] = 1500.0  # certain of class 1; the image is class 0
    with_it = np.concatenate([logits, absurd]), np.concatenate([labels, [0]])
    assert fit_temperature(*with_it) == pytest.approx(1.0, rel=0.2)
    assert nll(*with_it, cap=np.inf) > 3.0  # the plain NLL: this one image dominates it


def test_nothing_to_fit_on_keeps_the_logits() -> None:
    assert fit_temperature(np.zeros((0, NUM_CLASSES)), np.zeros(0, np.int64)) == 1.0
    assert fit_temperature(np.ones((4, 1)), np.zeros(4, np.int64)) == 1.0  # one class


def test_reliability_bins_by_hand() -> None:
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55], [0.5, 0.5]])
    labels = np.array([0, 1, 0, 0, 0])
    found = reliability(probs, labels, bins=10)
    assert sum(found.counts) == 5 and found.counts[9] == 2 and found.counts[5] == 2
    assert found.counts[4] == 1  # a confidence of exactly 0.5 is in (0.4, 0.5]
    assert found.accuracy[9] == 0.5 and found.confidence[9] == pytest.approx(0.95)
    assert found.accuracy[5] == 0.5 and found.confidence[5] == pytest.approx(0.55)
    # |0.5-0.95|*2/5 + |0.5-0.55|*2/5 + |1-0.5|*1/5
    assert found.ece == pytest.approx(0.45 * 0.4 + 0.05 * 0.4 + 0.5 * 0.2)
    assert found.confidence[0] is None and found.accuracy[0] is None


def test_calibrate_measures_another_split_before_and_after() -> None:
    logits, labels = over_confident(seed=1)
    record = calibrate(logits[:2000], labels[:2000], measure_logits=logits[2000:], measure_labels=labels[2000:])  # fmt: skip
    assert record.fitted_on == "val" and record.fit_images == 2000 and record.measured_on == "test"
    assert sum(record.before.counts) == sum(record.after.counts) == 2000
    assert record.ece_after < record.ece_before / 2 and record.nll_after < record.nll_before


def test_run_record_keeps_calibration_and_unknown() -> None:
    logits, labels = over_confident(n=300)
    calibration = calibrate(logits, labels, measure_logits=logits, measure_labels=labels)
    ood = OodRecord(score="mahalanobis", threshold=12.5, keep=0.95, val_images=60, val_kept=0.95)
    record = RunRecord(strategy="feature", calibration=calibration, ood=ood)
    again = RunRecord.from_dict(record.to_dict())
    assert again.calibration == calibration and again.ood == ood
    assert isinstance(again.calibration, CalibrationRecord)
    assert RunRecord.from_dict(RunRecord(strategy="feature").to_dict()).calibration is None


def test_the_export_folds_the_temperature_into_logits_and_probs(tmp_path: Path) -> None:
    inner = TinyAdapted().eval()
    calibration = CalibrationRecord(temperature=2.5)
    model = TrustedModel(inner, calibration=calibration)
    path = tmp_path / "model.onnx"
    metadata = {
        "labels": LABELS,
        "preprocess": IMAGENET_PREPROCESS.at_size(SIZE),
        **model.metadata(),
    }
    result = export_model(model, path, input_name="input", layout="NCHW", input_shape=SHAPE, metadata=metadata, verify_inputs=image_inputs())  # fmt: skip
    assert result.verified and result.report.passed
    batch = image_inputs().all_inputs
    session = create_session(path, "CPUExecutionProvider")
    assert [o.name for o in session.get_outputs()] == ["logits", "probs"]
    logits, probs = session.run(None, {"input": batch})
    with torch.no_grad():
        raw = inner(torch.from_numpy(batch)).numpy()
    np.testing.assert_allclose(logits, raw / 2.5, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(probs, softmax(raw / 2.5, axis=1), atol=1e-5)
    assert not np.allclose(probs, softmax(raw, axis=1), atol=1e-3)  # the softmax did change
    written = read_metadata(path).calibration
    assert written["temperature"] == 2.5 and written["logits"] == LOGITS_NOTE


def test_the_gate_fails_a_file_without_the_temperature(tmp_path: Path) -> None:
    from pipeline.export.verify import verify

    inner = TinyAdapted().eval()
    path = tmp_path / "plain.onnx"
    export_model(inner, path, input_name="input", layout="NCHW", input_shape=SHAPE, metadata={"labels": LABELS}, verify=False)  # fmt: skip
    calibrated = TrustedModel(inner, calibration=CalibrationRecord(temperature=2.5))
    report = verify(calibrated, path, image_inputs())
    assert not report.passed
    assert any("probs" in failure or "|diff|" in failure for failure in report.failures)

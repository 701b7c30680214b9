"""A run directory of `zoo adapt`: the names of the files it holds, and typed readers for them.

Every stage reads and writes a run's files through `RunDir`: run.json as a `RunRecord`,
split.json as a `DataSplit`, metrics.json as `Metrics`, history.csv and predictions.csv as their
rows. export.json and verification.json are the reports of `zoo export` and `zoo verify`, read
as the dicts those commands wrote.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pipeline.core.checkpoint import BEST_CHECKPOINT, RESUME_POINT
from pipeline.core.record import RunRecord
from pipeline.core.results import (
    EpochRecord,
    ImagePrediction,
    Metrics,
    read_history,
    read_metrics,
    read_predictions,
)
from pipeline.core.samples import DataSplit
from zoo.errors import NotFound, ZooError
from zoo.files import write_json

RUN_FILE = "run.json"  # the RunRecord
SPLIT_FILE = "split.json"  # the DataSplit the run trains, chooses and is measured on
METRICS_FILE = "metrics.json"  # Metrics on the held-out split, once the run is done
HISTORY_FILE = "history.csv"  # one EpochRecord per epoch
PREDICTIONS_FILE = "predictions.csv"  # one ImagePrediction per held-out image
EXPORT_RECORD = "export.json"  # the last successful `zoo export` of the run
VERIFY_RECORD = "verification.json"  # the last `zoo verify FILE --run RUN`
CURVES_PLOT = "curves.png"  # loss and accuracy per epoch
CONFUSION_PLOT = "confusion.png"
ROC_PLOT = "roc.png"  # two classes only
TRUST_FILE = "trust.safetensors"  # the unknown score's fitted tensors and validation scores


@dataclass(frozen=True)
class RunDir:
    """The files of one run directory, by what they hold."""

    path: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))

    @property
    def record_file(self) -> Path:
        return self.path / RUN_FILE

    @property
    def split_file(self) -> Path:
        return self.path / SPLIT_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def history_file(self) -> Path:
        return self.path / HISTORY_FILE

    @property
    def predictions_file(self) -> Path:
        return self.path / PREDICTIONS_FILE

    @property
    def export_file(self) -> Path:
        return self.path / EXPORT_RECORD

    @property
    def verification_file(self) -> Path:
        return self.path / VERIFY_RECORD

    @property
    def trust_file(self) -> Path:
        """What the unknown score needs (pipeline.train.trust); run.json's `ood` describes it."""
        return self.path / TRUST_FILE

    @property
    def best_checkpoint(self) -> Path:
        """The best epoch's weights: what export uses."""
        return self.path / BEST_CHECKPOINT

    @property
    def resume_point(self) -> Path:
        """The last complete epoch: weights, optimizer, loop state."""
        return self.path / RESUME_POINT

    def plot(self, name: str) -> Path:
        """One of the run's plots: CURVES_PLOT, CONFUSION_PLOT or ROC_PLOT."""
        return self.path / name

    def is_run(self) -> bool:
        """Whether the folder holds a run.json."""
        return self.record_file.is_file()

    def record(self) -> RunRecord:
        """run.json, with a clear error when the folder is not a run."""
        path = self.record_file
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError, IsADirectoryError) as exc:
            raise NotFound(
                f"{self.path} is not a run of `zoo adapt` (no {RUN_FILE}); pass a run directory"
            ) from exc
        except ValueError as exc:
            raise ZooError(f"{path} is damaged ({exc}); re-run `zoo adapt`") from exc
        return RunRecord.from_dict(raw, where=str(path))

    def write_record(self, record: RunRecord) -> None:
        """run.json, atomically."""
        write_json(self.record_file, record.to_dict())

    def split(self) -> DataSplit:
        """split.json; DataError when it is missing or damaged."""
        return DataSplit.load(self.split_file)

    def write_split(self, split: DataSplit) -> None:
        split.save(self.split_file)

    def metrics(self) -> Metrics | None:
        """metrics.json; None until the run is done, ZooError when it is damaged."""
        return read_metrics(self.metrics_file) if self.metrics_file.is_file() else None

    def history(self) -> list[EpochRecord]:
        """history.csv's epochs (L-BFGS passes for a solved head); [] before the first."""
        return read_history(self.history_file) if self.history_file.is_file() else []

    def predictions(self) -> list[ImagePrediction] | None:
        """predictions.csv; None for runs that are not done or predate it."""
        return read_predictions(self.predictions_file) if self.predictions_file.exists() else None

    def exported(self) -> dict[str, Any] | None:
        """export.json (an ExportSummary's figures); None before the first export."""
        return read_json(self.export_file)

    def verified(self) -> dict[str, Any] | None:
        """verification.json (a FileReport's figures); None before the first `zoo verify --run`."""
        return read_json(self.verification_file)


class LiveRecord:
    """The record of a run in progress: fields replaced as the run goes, run.json on `save`.

    Only the process that owns the run directory writes (`writes`); the others keep the record
    in step, so that every worker reads the same fields.
    """

    def __init__(self, run_dir: RunDir, record: RunRecord, *, writes: bool = True) -> None:
        self.run_dir = run_dir
        self.current = record
        self.writes = writes

    def update(self, changes: Mapping[str, Any] | None = None, /, **fields: Any) -> None:
        """Replace fields, by keyword or from a mapping of field names (a StrategyChoice's dict)."""
        self.current = replace(self.current, **{**(changes or {}), **fields})

    def save(self) -> None:
        if self.writes:
            self.run_dir.write_record(self.current)


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file of the run (or beside its files), None when it is not there."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ZooError(f"{path} is damaged ({exc}); re-run the command that wrote it") from exc

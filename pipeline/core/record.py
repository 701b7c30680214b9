"""run.json as one typed record: what a run of `zoo adapt` was asked, chose, trained and measured.

A run's record grows as the run goes: claimed (`status` "starting": the options and the model),
training (the strategy, hyperparameters, preprocessing, classes and split sizes), done (the
results). Fields a stage has not reached yet are None and left out of the file. Readers take the
fields, never the file's keys: `RunRecord.from_dict` is the one place that knows them.

Parts whose types belong to later stages (`auto`: pipeline.train.auto.AutoEvidence, `head_fit`:
pipeline.train.solve.HeadFit, `hyperparameters`: pipeline.train.loop.TrainConfig, `options`:
pipeline.core.options.AdaptOptions) are kept as those types' own dicts; their stages read them back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from pipeline.core.trust import CalibrationRecord, OodRecord
from zoo.catalog import Preprocess
from zoo.errors import ZooError

# 1: the layout of run.json since zoo 0.1. Files written before the version was recorded have the
# same layout and no "version" key; they read as 1.
RUN_RECORD_VERSION = 1


@dataclass(frozen=True)
class SourceRecord:
    """The model file a run trains from, by workspace name, path and sha256 (run.json's `source`)."""

    name: str | None = None  # the workspace name it was opened by
    path: str | None = None  # the file it was opened from
    sha256: str | None = None  # None in runs written before sha256s were recorded
    url: str | None = None  # where it was fetched from


@dataclass(frozen=True)
class HeadRecord:
    """The new classification head (run.json's `head`)."""

    hidden: int | None = None  # width of the hidden layer; None: a single linear layer
    dropout: float = 0.0


@dataclass(frozen=True)
class DataRecord:
    """The data a run trains on and its split sizes (run.json's `data`)."""

    source: str = ""  # what the user passed, absolute where it is a path
    train: int = 0
    val: int = 0
    test: int = 0
    skipped: int = 0  # unreadable files left out


class RecordedChoice(NamedTuple):
    """What trains and why, as run.json holds it (pipeline.train's StrategyChoice, field for field)."""

    strategy: str
    unfreeze: int | None  # top blocks that train; None: the strategy's own
    reason: str
    evidence: dict[str, Any] | None  # what `auto` measured; None otherwise


# Fields written together once the run starts training, nulls included (a reader sees
# "unfreeze": null, not a missing key); any other field is left out while it is None.
_TRAINING_FIELDS = frozenset(
    {
        "strategy",
        "strategy_reason",
        "unfreeze",
        "auto",
        "blocks",
        "hyperparameters",
        "preprocess",
        "input_name",
        "class_names",
        "num_classes",
        "head",
        "data",
        "seed",
        "device",
        "versions",
        "import_fidelity",
    }
)
_PARTS = {
    "source": SourceRecord,
    "head": HeadRecord,
    "data": DataRecord,
    "calibration": CalibrationRecord,
    "ood": OodRecord,
}


@dataclass(frozen=True)
class RunRecord:
    """run.json of a run directory, field by field in the file's order."""

    version: int = RUN_RECORD_VERSION
    tool: str = "zoo"
    created: str = ""  # ISO 8601 time the run was claimed, UTC
    status: str = "starting"  # "starting" (claimed), "training", "done"
    source: SourceRecord = SourceRecord()
    options: dict[str, Any] = field(default_factory=dict)  # AdaptOptions but out and resume
    # What trains: as given, what `auto` chose, or what a resumed run kept.
    strategy: str | None = None
    strategy_reason: str | None = None
    unfreeze: int | None = None
    auto: dict[str, Any] | None = None  # AutoEvidence.to_dict(); None unless `auto` chose
    blocks: list[str] | None = None  # the model's blocks, input side first
    hyperparameters: dict[str, Any] | None = None  # TrainConfig as a dict
    preprocess: Preprocess | None = None  # what the run trains with (and export writes)
    input_name: str | None = None  # the graph input's name, kept by export
    class_names: list[str] | None = None
    num_classes: int | None = None
    head: HeadRecord | None = None
    data: DataRecord | None = None
    seed: int | None = None
    device: str | None = None  # resolved: "cpu" or "cuda"
    versions: dict[str, str] | None = None  # Python and the packages the run used
    import_fidelity: dict[str, Any] | None = None  # ONNX against torch; None: unchecked
    distributed: dict[str, Any] | None = None  # world size and backend; None for one process
    augment: str | None = None  # the augmentation the training images got
    timings: dict[str, float] | None = None  # seconds per stage, filled as the run goes
    head_fit: dict[str, Any] | None = None  # HeadFit.to_dict() when the head was solved
    # The results, once done.
    best_epoch: int | None = None
    epochs_run: int | None = None
    stopped: str | None = None  # why training ended
    fast_path: str | None = None  # how the batches were fed
    test_accuracy: float | None = None  # on metrics_split's images
    metrics_split: str | None = None  # "test", or "val" for data without a test split
    seconds: float | None = None
    # How far the outputs can be trusted (pipeline.train.trust), once trained.
    calibration: CalibrationRecord | None = None  # the temperature and the ECE before and after
    ood: OodRecord | None = None  # the unknown score and its threshold
    # Keys this version does not know (a newer zoo's, or an older one's), written back unchanged.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def choice(self) -> RecordedChoice | None:
        """The strategy a resumed run keeps; None before one was chosen."""
        if not self.strategy:
            return None
        reason = self.strategy_reason or "chosen with --strategy"
        return RecordedChoice(self.strategy, self.unfreeze, reason, self.auto)

    def with_choice(self, choice: RecordedChoice) -> RunRecord:
        """This record with another choice (any object with RecordedChoice's fields)."""
        return dataclasses.replace(
            self,
            strategy=choice.strategy,
            strategy_reason=choice.reason,
            unfreeze=choice.unfreeze,
            auto=choice.evidence,
        )

    @property
    def trained_strategy(self) -> str:
        """The strategy that trains (what `auto` chose); before the choice, the one asked for."""
        return self.strategy or self.options.get("strategy") or "auto"

    @property
    def data_source(self) -> str | None:
        """The data the run trains on: as split, else as asked (before the split was recorded)."""
        return (self.data.source if self.data else None) or self.options.get("data")

    @property
    def train_per_class(self) -> int | None:
        """The cap on training images per class it was asked for (--train-per-class)."""
        return self.options.get("train_per_class")

    def to_dict(self) -> dict[str, Any]:
        """run.json's content: fields not reached yet are left out, unknown keys kept at the end."""
        written: dict[str, Any] = {}
        training = self.strategy is not None
        for part in dataclasses.fields(self):
            value = getattr(self, part.name)
            if part.name == "extra" or (
                value is None and not (training and part.name in _TRAINING_FIELDS)
            ):
                continue
            if isinstance(value, Preprocess):
                value = value.to_dict()
            elif dataclasses.is_dataclass(value):
                value = dataclasses.asdict(value)
            written[part.name] = value
        return {**written, **{k: v for k, v in self.extra.items() if k not in written}}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], *, where: str = "run.json") -> RunRecord:
        """The record a run.json holds; ZooError when it is not one this version can read."""
        if not isinstance(raw, Mapping):
            raise ZooError(
                f"{where} holds {type(raw).__name__}, not a run record; re-run `zoo adapt`"
            )
        version = raw.get("version", RUN_RECORD_VERSION)
        if not isinstance(version, int) or version > RUN_RECORD_VERSION:
            raise ZooError(
                f"{where} is version {version!r}, newer than this zoo reads "
                f"({RUN_RECORD_VERSION}); upgrade zoo to open the run"
            )
        known = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        values = {k: v for k, v in raw.items() if k in known}
        try:
            for name, part in _PARTS.items():
                if isinstance(values.get(name), Mapping):
                    values[name] = _part(part, values[name])
            if values.get("preprocess") is not None:
                values["preprocess"] = Preprocess.from_dict(values["preprocess"])
            return cls(**values, extra={k: v for k, v in raw.items() if k not in known})
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise ZooError(f"{where} is damaged ({exc!r}); re-run `zoo adapt`") from exc


def _part(kind: type, raw: Mapping[str, Any]) -> Any:
    """A nested part from its dict; keys this version does not know are dropped."""
    if hasattr(kind, "from_dict"):  # a part with parts of its own reads itself
        return kind.from_dict(raw)
    known = {f.name for f in dataclasses.fields(kind)}
    return kind(**{k: v for k, v in raw.items() if k in known})

"""What `zoo adapt` is asked for: `AdaptOptions`, and the options a resumed run was started with."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.record import RunRecord
from pipeline.core.rundir import RunDir
from zoo.errors import ZooError

if TYPE_CHECKING:
    from pipeline.core.distributed import DistContext
    from zoo.preprocess import PreprocessRequest


@dataclass(frozen=True)
class AdaptOptions:
    """Everything `zoo adapt` takes; defaults are the documented ones."""

    model: str | None = None  # workspace name or .onnx path; None: the most recently fetched
    data: str = "builtin:digits"
    classes: int | None = None
    strategy: str = "auto"
    unfreeze: int | None = None
    unfreeze_every: int = 1
    # None: by strategy (default_epochs). A `feature` head on cached features is solved instead.
    epochs: int | None = None
    batch_size: int = 32
    lr: float = 3e-4
    lr_decay: float | None = None  # None: by strategy (its registered lr_decay)
    optimizer: str = "adam"
    patience: int = 10
    label_smoothing: float = 0.0
    augment: str | None = None  # None: by strategy and data (default_augment)
    flip: bool | None = None  # horizontal flips in augmentation; None: unless the data forbids them
    image_size: int | None = None
    device: str = "auto"
    seed: int = 0
    out: Path | None = None
    resume: bool = False
    strict: bool = False
    train_per_class: int | None = None
    hidden: int | None = None
    dropout: float = 0.0
    # --preprocess/--mean/--std/... over what is known of the model (a PreprocessRequest, or its
    # to_dict() when a run is resumed from run.json); None: the model's known preprocessing.
    preprocess: PreprocessRequest | Mapping[str, Any] | None = None
    keep: float = 0.95  # share of validation images the unknown threshold keeps (--keep)
    # Unequal classes: "none", "weights" or "sampler"; None: class weights when the largest
    # training class has 3x the images of the smallest (pipeline.train.balance).
    balance: str | None = None


def resumed_options(options: AdaptOptions, previous: RunRecord) -> AdaptOptions:
    """The options a run was started with, for --resume (fields this version lacks are left out)."""
    known = {f.name for f in dataclasses.fields(AdaptOptions)} - {"out", "resume"}
    recorded = {k: v for k, v in previous.options.items() if k in known}
    return dataclasses.replace(options, **recorded, resume=True, out=options.out)


def previous_run(options: AdaptOptions, dist: DistContext) -> tuple[AdaptOptions, RunRecord | None]:
    """With --resume: the run's options and its run.json (read by the main worker); else None."""
    if not options.resume:
        return options, None
    if options.out is None:
        raise ZooError("--resume needs --out RUN_DIR, the run to continue")
    previous = dist.broadcast_object(RunDir(options.out).record() if dist.is_main else None)
    return resumed_options(options, previous), previous

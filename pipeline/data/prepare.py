"""A run's data: the split loaded and checked, the run directory claimed with the split in it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from pipeline.core import runs
from pipeline.core.distributed import DistContext
from pipeline.core.options import AdaptOptions
from pipeline.core.record import SourceRecord
from pipeline.core.rundir import RunDir
from pipeline.core.samples import DataSplit
from pipeline.data.sources import GroupBy, load_source, mirror_safe
from pipeline.data.split import subsample_per_class
from zoo.catalog import Preprocess
from zoo.errors import DataError


def resolve_preprocess(native: Preprocess, split: DataSplit, image_size: int | None) -> Preprocess:
    """The model's own preprocessing at the size this run trains at (--image-size, else the data's)."""
    size = image_size or split.recommended_size
    return native.at_size(size) if size and size != native.crop else native


def prepare_data(
    options: AdaptOptions, *, run_dir: Path | None, group_by: GroupBy | None = None
) -> DataSplit:
    """The split: reloaded from the run when resuming, else loaded, checked and maybe subsampled.

    `group_by` keeps duplicates inside one part of a split zoo makes (pipeline.train.check).
    """
    if run_dir is not None and RunDir(run_dir).split_file.exists():
        return RunDir(run_dir).split()
    split = load_source(options.data, seed=options.seed, strict=options.strict, group_by=group_by)
    if not split.val:  # the best epoch is chosen on it
        raise DataError(
            f"no validation images in {options.data}: every class has a single image; add at "
            "least one more image per class (or a val/ folder)"
        )
    found = len(split.class_names)
    if options.classes is not None and options.classes != found:
        shown = ", ".join(split.class_names[:12]) + (" …" if found > 12 else "")
        raise DataError(
            f"--classes {options.classes} was given, but {options.data} has {found} classes ({shown}); "
            "fix --classes or the data"
        )
    if options.train_per_class:
        split = dataclasses.replace(
            split,
            train=subsample_per_class(split.train, options.train_per_class, seed=options.seed),
        )
    return split


def claim_run(
    options: AdaptOptions,
    *,
    split: DataSplit | None,
    models_dir: Path,
    model_name: str,
    log: Callable[[str], None],
    group_by: GroupBy | None = None,
) -> tuple[Path, DataSplit]:
    """The run directory (--out, or a new one named after model and data) with its split saved."""
    run_dir = runs.claim_out_dir(options.out, resume=options.resume) if options.out else None
    split = split or prepare_data(options, run_dir=run_dir, group_by=group_by)
    if run_dir is None:
        base = f"{runs.slug(model_name)}-{runs.slug(split.source_name)}-{len(split.class_names)}c"
        run_dir = runs.new_run_dir(models_dir, base)
    if split.skipped:
        names = ", ".join(Path(p).name for p, _ in split.skipped[:3])
        more = " …" if len(split.skipped) > 3 else ""
        log(f"skipped {len(split.skipped)} unreadable file(s): {names}{more}")
    RunDir(run_dir).write_split(split)
    return run_dir, split


def shared_run_dir(
    options: AdaptOptions,
    source: SourceRecord,
    split: DataSplit | None,
    models_dir: Path,
    *,
    dist: DistContext,
    log: Callable[[str], None],
    group_by: GroupBy | None = None,
) -> tuple[Path, DataSplit]:
    """The run directory and split, claimed by the main worker and the same for all workers,
    whatever each machine's disk holds."""
    run_dir = None
    if dist.is_main:
        run_dir, split = claim_run(
            options,
            split=split,
            models_dir=models_dir,
            model_name=source.name,
            log=log,
            group_by=group_by,
        )
        if not options.resume:  # the model is on record before anything can interrupt the run
            RunDir(run_dir).write_record(runs.first_record(options, source=source))
    return dist.broadcast_object((run_dir, split))


def flip_for(options: AdaptOptions, split: DataSplit, log: Callable[[str], None]) -> bool:
    """Horizontal flips in augmentation: as --flip/--no-flip says, else unless the data forbids them."""
    if options.flip is not None:
        return options.flip
    safe = mirror_safe(split)
    if not safe and options.augment not in (None, "none"):
        log(
            f"no horizontal flips: mirrored {split.source_name} images change class (--flip forces them)"
        )
    return safe

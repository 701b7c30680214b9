"""Benchmark 5: transfer learning on real photos: the probe, every strategy, scratch and the defaults.

On each set (flowers5 and textures10 from ../shared/datasets, skipped with a note when absent, plus
builtin:digits as the case unlike ImageNet) every row uses the same seeded split: the linear probe
(`pipeline.train.rank.linear_probe` on frozen features, the bar a practitioner gets in a few lines),
`zoo adapt` with each strategy, and `zoo adapt` with every option at its default. Then the same rows
at fewer training images per class, for the plot. Accuracy is not a timing: one seeded run per cell.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from bench.common import MODEL_NAME, Scale, Section, markdown_table

if TYPE_CHECKING:
    from pipeline.core.samples import DataSplit

KEY = "transfer"
TITLE = "5. Transfer learning on real photos: probe, every strategy, scratch, defaults"
STRATEGIES = ("feature", "finetune", "gradual", "full", "scratch")
PROBE, DEFAULTS = "probe", "defaults"
ROWS = (PROBE, *STRATEGIES, DEFAULTS)
PLOT = (
    Path(__file__).resolve().parent / "figures" / "transfer.png"
)  # committed: BENCHMARKS.md shows it
ROOT = Path(__file__).resolve().parent.parent
SHARED_DIR = Path(os.environ.get("ZOO_SHARED", ROOT.parent / "shared"))


@dataclass(frozen=True)
class DataSet:
    """One data set of the benchmark and how its convolution-training rows are sized."""

    name: str
    source: str  # what `zoo adapt --data` takes
    train_per_class: int | None  # None: the whole training split
    train_size: int | None  # --image-size of finetune/gradual/full/scratch; None: adapt's default
    epochs: int  # --epochs of finetune/gradual/full/scratch


def data_sets(scale: Scale, shared: Path = SHARED_DIR) -> tuple[list[DataSet], list[str]]:
    """The sets to run, and a note for each real photo set that is not there."""
    found, missing = [], []
    for name in [n for n in ("flowers5", "textures10") if n in scale.transfer_sets]:
        folder = shared / "datasets" / name
        if folder.is_dir():
            found.append(DataSet(name, str(folder), scale.transfer_photo_per_class, scale.transfer_size, scale.transfer_epochs))  # fmt: skip
        else:
            missing.append(f"{name} skipped: {folder} is absent (it ships beside the repository, not in it)")  # fmt: skip
    if "digits" in scale.transfer_sets:
        found.append(DataSet("digits", "builtin:digits", scale.transfer_digits_per_class, None, scale.transfer_digits_epochs))  # fmt: skip
    return found, missing


def workspace(work: Path) -> Path:
    """A models dir with the bundled model fetched (offline), once per work folder."""
    from zoo.cache import fetch
    from zoo.catalog import load_catalog

    models_dir = Path(work) / "workspace"
    if not (models_dir / MODEL_NAME).exists():
        fetch(MODEL_NAME, models_dir=models_dir, catalog=load_catalog(), progress=False)
    return models_dir


def _split(data: DataSet, scale: Scale, per_class: int | None) -> DataSplit:
    """The seed-0 split `zoo adapt --seed 0` makes; training (and in quick runs all) parts subsampled."""
    from pipeline.adapt import AdaptOptions, prepare_data
    from pipeline.data.split import subsample_per_class

    split = prepare_data(
        AdaptOptions(data=data.source, train_per_class=per_class, seed=0), run_dir=None
    )
    if scale.transfer_eval_per_class:
        keep = scale.transfer_eval_per_class
        split = dataclasses.replace(
            split,
            val=subsample_per_class(split.val, keep, seed=0),
            test=subsample_per_class(split.test, keep, seed=0),
        )
    return split


@dataclass
class Row:
    """One cell of the table: a method on one split."""

    method: str
    accuracy: float
    seconds: float
    detail: str


def probe_row(split: DataSplit, *, models_dir: Path) -> Row:
    """The probe at the size `zoo adapt` uses by default on this data, on the same split."""
    from pipeline.core.diskcache import features_dir
    from pipeline.train.rank import native_preprocess, open_backbone, probe_split
    from zoo.catalog import load_catalog
    from zoo.workspace import open_model

    started = time.perf_counter()
    catalog = load_catalog()
    path, card = open_model(MODEL_NAME, models_dir=models_dir, catalog=catalog)
    preprocess = native_preprocess(card, path, catalog=catalog)
    if split.recommended_size:  # builtin:digits trains at 64 px unless told otherwise
        preprocess = preprocess.at_size(split.recommended_size)
    fit, _ = probe_split(
        open_backbone(path, name=MODEL_NAME),
        split,
        preprocess=preprocess,
        cache_dir=features_dir(models_dir),
        model_sha256=card["sha256"],
        with_test=True,
    )
    detail = f"C={fit.c:g}, val {100 * fit.val_accuracy:.1f}%, {preprocess.crop} px"
    return Row(PROBE, fit.test_accuracy or 0.0, time.perf_counter() - started, detail)


def adapt_row(
    method: str, split: DataSplit, data: DataSet, scale: Scale, *, models_dir: Path, out: Path
) -> Row:
    """`zoo adapt` on `split`: defaults, `feature` with its defaults, or a strategy at the set's size."""
    from pipeline.adapt import AdaptOptions, adapt
    from zoo.catalog import load_catalog

    options = AdaptOptions(model=MODEL_NAME, data=data.source, seed=0, out=out)
    if method == DEFAULTS and scale.transfer_default_epochs:
        options = dataclasses.replace(options, epochs=scale.transfer_default_epochs)
    elif method == "feature":
        options = dataclasses.replace(options, strategy="feature")
    elif method != DEFAULTS:
        epochs = data.epochs
        options = dataclasses.replace(
            options, strategy=method, epochs=epochs, patience=epochs, image_size=data.train_size
        )
    result = adapt(
        options, models_dir=models_dir, catalog=load_catalog(), log=lambda _m: None, split=split
    )
    chosen = f"{result.strategy}: " if method == DEFAULTS else ""
    detail = f"{chosen}best epoch {result.best_epoch} of {result.epochs_run}, {result.fast_path}"
    return Row(method, result.metrics.accuracy, result.seconds, detail)


def run_rows(
    data: DataSet,
    scale: Scale,
    per_class: int | None,
    *,
    models_dir: Path,
    work: Path,
    methods: Sequence[str] = ROWS[1:],
) -> tuple[list[Row], DataSplit]:
    """The probe and `methods` on one split of `data`."""
    split = _split(data, scale, per_class)
    rows = [probe_row(split, models_dir=models_dir)]
    for method in methods:
        out = work / "transfer" / f"{data.name}-{per_class or 'all'}-{method}"
        rows.append(adapt_row(method, split, data, scale, models_dir=models_dir, out=out))
    return rows, split


def plot(path: Path, curves: dict[str, dict[int, float]], *, title: str) -> None:
    """Test accuracy against training images per class, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method, by_size in curves.items():
        sizes = sorted(by_size)
        style = "s--" if method == PROBE else "o-"
        ax.plot(sizes, [100 * by_size[n] for n in sizes], style, label=method)
    ax.set(xlabel="training images per class", ylabel="test accuracy (%)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def _table(rows: Sequence[Row]) -> str:
    probe = next(r.accuracy for r in rows if r.method == PROBE)
    return markdown_table(
        ["method", "test accuracy %", "vs probe (points)", "s", "detail"],
        [
            [
                r.method,
                f"{100 * r.accuracy:.1f}",
                "-" if r.method == PROBE else f"{100 * (r.accuracy - probe):+.1f}",
                f"{r.seconds:.0f}",
                r.detail,
            ]
            for r in rows
        ],
    )


def _describe(data: DataSet, split: DataSplit, scale: Scale) -> str:
    per_class = round(len(split.train) / len(split.class_names))
    size = f"{data.train_size} px" if data.train_size else "the data's default size"
    return (
        f"### {data.name}\n\n{len(split.class_names)} classes; {len(split.train)} train "
        f"(~{per_class} per class) / {len(split.val)} val / {len(split.test)} test images, seed 0. "
        f"finetune, gradual, full and scratch: {data.epochs} epochs at {size}, no early stop."
    )


def run(scale: Scale, *, work: Path) -> Section:
    """Every method on every set, then on fewer images per class for the plot."""
    models_dir = workspace(work)
    sets, missing = data_sets(scale)
    body = [
        f"Model: bundled {MODEL_NAME}. Each set's rows share one seeded split (`--seed 0`, 60/20/20); "
        "test accuracy, and wall time in seconds (context only: the machine is shared). Rows: **probe** = "
        "`pipeline.train.rank.linear_probe`, scikit-learn LogisticRegression on standardised frozen features "
        "(C from 0.01/0.1/1 picked on validation), at the size `zoo adapt` uses by default (224 px for photos, "
        "64 px for digits); **feature** = `zoo adapt --strategy feature` with every other option at its default; "
        "**finetune/gradual/full/scratch** = `zoo adapt --strategy S` with the epochs and image size named per "
        "set (smaller than the defaults so that `make bench` stays within its time budget); **defaults** = "
        "`zoo adapt MODEL --data SET` with no other option"
        + (
            f" except `--epochs {scale.transfer_default_epochs}`"
            if scale.transfer_default_epochs
            else ""
        )
        + " (the detail names the strategy `auto` chose). The test split is used for nothing but these figures.",
        *missing,
    ]
    curves: dict[str, dict[int, float]] = {}
    plot_set, plot_full = sets[0], 0  # the first real photo set, else digits
    for data in sets:
        rows, split = run_rows(data, scale, data.train_per_class, models_dir=models_dir, work=work)
        body += [_describe(data, split, scale), _table(rows)]
        if data is plot_set:
            plot_full = round(len(split.train) / len(split.class_names))
            curves = {r.method: {plot_full: r.accuracy} for r in rows}
    # Fewer images per class: every method but the defaults, whose `auto` measurements and
    # longer training would double the benchmark's time (its budget is `make bench`'s).
    for per_class in [n for n in scale.transfer_plot_per_class if n < plot_full]:
        rows, _ = run_rows(plot_set, scale, per_class, models_dir=models_dir, work=work, methods=STRATEGIES)  # fmt: skip
        for r in rows:
            curves[r.method][per_class] = r.accuracy
    title = f"{MODEL_NAME} on {plot_set.name}"
    plot(PLOT, curves, title=title)
    table = [
        [
            method,
            *(
                f"{100 * curves[method][n]:.1f}" if n in curves[method] else "–"
                for n in sorted(curves[PROBE])
            ),
        ]  # fmt: skip
        for method in ROWS
    ]
    body += [
        f"### Accuracy against training images per class ({plot_set.name})",
        markdown_table(["method", *(f"{n}/class" for n in sorted(curves[PROBE]))], table),
        f"![test accuracy against training images per class]({PLOT.relative_to(ROOT).as_posix()})",
        "Per-row commands: `zoo adapt efficientnet-lite0 --data SET [--strategy S --epochs E --patience E "
        "--image-size PX] [--train-per-class N] --seed 0`; the probe has no command line (it is the bar).",
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))

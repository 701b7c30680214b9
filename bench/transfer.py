"""Benchmark 5: transfer against scratch, the claim every tutorial makes, on builtin:digits.

`zoo adapt` per strategy and training-set size, same epochs, seed and split; test accuracy and
the epoch of the best validation loss. Accuracy is not a timing, so one seeded run per cell.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from bench.common import MODEL_NAME, Scale, Section, markdown_table

KEY = "transfer"
TITLE = "5. Transfer against scratch (builtin:digits)"
STRATEGIES = ("scratch", "feature", "finetune", "gradual")
PLOT = (
    Path(__file__).resolve().parent / "figures" / "transfer.png"
)  # committed: BENCHMARKS.md shows it


def workspace(work: Path) -> Path:
    """A models dir with the bundled model fetched (offline), once per work folder."""
    from zoo.cache import fetch
    from zoo.catalog import load_catalog

    models_dir = Path(work) / "workspace"
    if not (models_dir / MODEL_NAME).exists():
        fetch(MODEL_NAME, models_dir=models_dir, catalog=load_catalog(), progress=False)
    return models_dir


def plot(path: Path, accuracy: dict[str, dict[int, float]], *, epochs: int) -> None:
    """Test accuracy against training images per class, one line per strategy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy, by_size in accuracy.items():
        sizes = sorted(by_size)
        ax.plot(sizes, [100 * by_size[n] for n in sizes], "o-", label=strategy)
    ax.set(
        xlabel="training images per class",
        ylabel="test accuracy (%)",
        title=f"efficientnet-lite0 on builtin:digits, {epochs} epochs",
    )
    ax.grid(alpha=0.3)
    ax.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def run(scale: Scale, *, work: Path) -> Section:
    """One adapt run per (strategy, images per class); a table and a plot."""
    from pipeline.adapt import AdaptOptions, adapt, prepare_data
    from zoo.catalog import load_catalog

    models_dir = workspace(work)
    catalog = load_catalog()
    epochs = scale.transfer_epochs
    accuracy: dict[str, dict[int, float]] = {s: {} for s in STRATEGIES}
    rows = []
    for per_class in scale.transfer_per_class:
        base = AdaptOptions(
            model=MODEL_NAME,
            data="builtin:digits",
            epochs=epochs,
            patience=epochs,  # no early stop: every strategy gets the same epochs
            train_per_class=per_class,
            device="cpu",
            seed=0,
        )
        split = prepare_data(base, run_dir=None)  # one split for all strategies
        for strategy in STRATEGIES:
            options = dataclasses.replace(
                base, strategy=strategy, out=work / "transfer" / f"{strategy}-{per_class}"
            )
            result = adapt(
                options, models_dir=models_dir, catalog=catalog, log=lambda _m: None, split=split
            )
            accuracy[strategy][per_class] = result.metrics.accuracy
            rows.append(
                [
                    per_class,
                    strategy,
                    f"{100 * result.metrics.accuracy:.1f}",
                    f"{result.best_epoch} of {result.epochs_run}",
                    result.trainable_params,
                    result.fast_path,
                    f"{result.seconds:.0f}",
                ]
            )
    plot(PLOT, accuracy, epochs=epochs)
    winners = {
        n: max(STRATEGIES, key=lambda s, n=n: accuracy[s][n]) for n in scale.transfer_per_class
    }
    best = "; ".join(
        f"{n} per class: {s} ({100 * accuracy[s][n]:.1f}%)" for n, s in winners.items()
    )
    sizes = ",".join(str(n) for n in scale.transfer_per_class)
    body = [
        f"`zoo adapt` on builtin:digits at the data set's recommended size (64 px), {epochs} epochs, seed 0, "
        f"no early stopping; the validation and test splits are the same for every row (test: {len(split.test)} "
        f"images). Training images per class: {sizes}. One seeded run per cell (accuracy, not timing). "
        "`scratch` starts from random weights scaled to unit variance on 32 training images (LSUV): the "
        "zoo file has BatchNorm folded away, and from torch's default initialisation it does not learn.",
        markdown_table(
            [
                "images/class",
                "strategy",
                "test accuracy %",
                "best val-loss epoch",
                "trainable params",
                "path",
                "s (context)",
            ],
            rows,
        ),  # fmt: skip
        f"Best strategy at each size: {best}.",
        f"![test accuracy against training images per class]({PLOT.relative_to(PLOT.parents[2]).as_posix()})",
        "Per-row command: `zoo adapt --model efficientnet-lite0 --data builtin:digits --strategy STRATEGY "
        f"--train-per-class N --epochs {epochs} --patience {epochs} --device cpu --seed 0`.",
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))

"""What every benchmark shares: interleaved timing, medians, tables, the machine, the data and model.

The machines are shared and noisy, so a figure is always a ratio of two things timed in the same
run on the same data, interleaved A, B, B, A, ... and summarised by the median of the repetitions.
"""

from __future__ import annotations

import contextlib
import os
import platform
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.core.samples import DataSplit
    from pipeline.train.loop import TrainConfig
    from zoo.catalog import Preprocess

RUN_COMMAND = ".venv/bin/python -m bench.run"
MODEL_NAME = "efficientnet-lite0"


@dataclass(frozen=True)
class Scale:
    """How much work each benchmark does: `FULL` for `make bench`, `QUICK` for the smoke run."""

    name: str
    repetitions: int  # timed repetitions per candidate, interleaved; the median is reported
    feature_images: int  # benchmark 1: images, epochs, and epochs of the plain loop actually timed
    feature_epochs: int
    feature_plain_epochs_timed: int  # every plain epoch does the same work: the rest is scaled
    finetune_images: int  # benchmarks 2 and 6
    finetune_epochs: int
    convert_batch: int  # benchmark 3
    convert_size: int
    convert_steps: int
    convert_repetitions: int  # step timings are the noisiest: more repetitions
    deploy_latency_calls: int  # benchmark 4: batch-1 calls per repetition
    deploy_batch: int
    deploy_batch_calls: int  # batch calls per repetition: one call alone is too noisy a figure
    transfer_sets: tuple[str, ...]  # benchmark 5: flowers5, textures10 (if present), digits
    transfer_photo_per_class: int | None  # training images per class (None: all)
    transfer_digits_per_class: int  # builtin:digits, the set unlike ImageNet
    transfer_digits_epochs: int  # epochs of the convolution-training rows on digits
    transfer_size: int  # px of the convolution-training rows on photos (defaults: the model's own)
    transfer_epochs: int  # epochs of those rows
    transfer_default_epochs: int | None  # None: the defaults row really runs the defaults
    transfer_eval_per_class: int | None  # validation and test images per class (None: all)
    transfer_plot_per_class: tuple[int, ...]  # smaller training sets for the plot
    memory_images: int  # benchmark 6: images, and runs per process kind (memory is not noisy)
    memory_repetitions: int
    scale_phone_photos: int  # benchmark 8 (a): 12 MP photos of the large set (the small: half)
    scale_repetitions: int  # (a): runs of each process, interleaved; the best is kept
    scale_growth_sizes: tuple[int, ...]  # (b): images per set; (c) runs on the smallest

    def command(self, only: str) -> str:
        """The command that reproduces one benchmark's rows."""
        return f"{RUN_COMMAND} --only {only}" + (" --quick" if self.name == "quick" else "")


FULL = Scale(
    name="full",
    repetitions=3,
    feature_images=500,
    feature_epochs=10,
    feature_plain_epochs_timed=1,
    finetune_images=256,
    finetune_epochs=2,
    convert_batch=16,
    convert_size=224,
    convert_steps=3,
    convert_repetitions=4,
    deploy_latency_calls=20,
    deploy_batch=32,
    deploy_batch_calls=5,
    transfer_sets=("flowers5", "textures10", "digits"),
    transfer_photo_per_class=None,
    transfer_digits_per_class=20,
    transfer_digits_epochs=10,
    transfer_size=128,
    transfer_epochs=3,
    transfer_default_epochs=None,
    transfer_eval_per_class=None,
    transfer_plot_per_class=(10, 20),
    memory_images=128,
    memory_repetitions=2,
    scale_phone_photos=400,
    scale_repetitions=2,
    scale_growth_sizes=(1000, 2500, 5000, 10000),
)

QUICK = Scale(
    name="quick",
    repetitions=3,
    feature_images=100,
    feature_epochs=2,
    feature_plain_epochs_timed=1,
    finetune_images=64,
    finetune_epochs=1,
    convert_batch=4,
    convert_size=96,
    convert_steps=2,
    convert_repetitions=3,
    deploy_latency_calls=5,
    deploy_batch=8,
    deploy_batch_calls=2,
    transfer_sets=("flowers5", "digits"),
    transfer_photo_per_class=4,
    transfer_digits_per_class=4,
    transfer_digits_epochs=1,
    transfer_size=64,
    transfer_epochs=1,
    transfer_default_epochs=1,
    transfer_eval_per_class=4,
    transfer_plot_per_class=(),
    memory_images=64,
    memory_repetitions=1,
    scale_phone_photos=40,
    scale_repetitions=1,
    scale_growth_sizes=(200, 500),
)


def interleave(
    candidates: Mapping[str, Callable[[], float]], *, repetitions: int, warmup: bool = False
) -> dict[str, list[float]]:
    """Run the candidates interleaved, `repetitions` times each; each returns its own seconds.

    Rounds alternate the order (A, B, then B, A, ...) so that neither candidate always runs
    right after the other: on a shared machine whatever comes second can inherit a warm cache or
    a busy neighbour. A candidate times itself so that it can leave its setup out of the figure.
    With `warmup`, one untimed round runs first (caches, lazy initialisation, allocator).
    """
    if repetitions < 1:
        raise ValueError("repetitions must be at least 1")
    if warmup:
        for run in candidates.values():
            run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    names = list(candidates)
    for round_index in range(repetitions):
        for name in names if round_index % 2 == 0 else reversed(names):
            times[name].append(float(candidates[name]()))
    return times


def timed(run: Callable[[], Any]) -> float:
    """Seconds `run()` takes, by the monotonic performance counter."""
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """median(numerator) / median(denominator): e.g. baseline seconds over our seconds = speed-up."""
    return median(numerator) / median(denominator)


def spread(values: Sequence[float]) -> str:
    """The range of the repetitions, to show how noisy a median is."""
    return f"{min(values):.3g}–{max(values):.3g}"


def goal_verdict(value: float, goal: float, *, higher_is_better: bool = True) -> str:
    """'met' or 'missed by X%' against a goal."""
    met = value >= goal if higher_is_better else value <= goal
    if met:
        return "met"
    short = (goal - value) / goal if higher_is_better else (value - goal) / goal
    return f"missed by {100 * short:.0f}%"


def markdown_table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub markdown table; floats keep three significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
        return str(value).replace("|", "\\|")

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


@dataclass
class Section:
    """One benchmark's part of BENCHMARKS.md: its tables, notes and the command behind them."""

    key: str
    title: str
    body: list[str] = field(default_factory=list)  # markdown paragraphs and tables, in order
    command: str = ""
    seconds: float = 0.0
    scale: str = ""  # "full" or "quick": sections of different runs can sit side by side

    def markdown(self) -> str:
        parts = [f"## {self.title}", *self.body]
        if self.command:
            parts.append(f"Reproduce every row above: `{self.command}`")
        parts.append(
            f"_Scale: {self.scale or 'unknown'}; benchmark wall time {self.seconds:.0f} s._"
        )
        return "\n\n".join(parts)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, str]:
    """The hardware, threads and versions a reader needs to compare figures."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    info = {
        "cpu": _cpu_model(),
        "cores (os.cpu_count)": str(os.cpu_count()),
        "torch threads": str(torch.get_num_threads()),
        "onnxruntime threads": "default (one per physical core)",
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none",
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    for package in ("torch", "torchvision", "timm", "onnx", "onnxruntime-gpu", "onnx2torch"):
        try:
            info[package] = version(package)
        except PackageNotFoundError:
            continue
    with contextlib.suppress(OSError):  # not every platform has a load average
        info["load average when written"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return info


# --- the data and the model every training benchmark uses -------------------------------------


def digits_split(*, images: int, seed: int = 0) -> DataSplit:
    """The first `images` train+val samples of builtin:digits as the training split (no val/test)."""
    import dataclasses

    from pipeline.data.sources import load_source

    split = load_source("builtin:digits", seed=seed)
    pool = [*split.train, *split.val]
    if images > len(pool):
        raise ValueError(f"builtin:digits has only {len(pool)} train+val images, not {images}")
    return dataclasses.replace(split, train=pool[:images], val=[], test=[])


def preprocess_at(size: int) -> Preprocess:
    """The bundled model's catalog preprocessing at `size` pixels."""
    from zoo.catalog import Preprocess, load_catalog

    preprocess = load_catalog().resolve(MODEL_NAME).preprocess
    if not isinstance(preprocess, Preprocess):
        preprocess = Preprocess.from_dict(preprocess)
    return preprocess.at_size(size) if size != preprocess.crop else preprocess


def bundled_onnx(work: Path) -> Path:
    """The bundled pretrained efficientnet-lite0 as ONNX, built once per work folder."""
    from zoo.bundled import build_bundled

    path = Path(work) / "efficientnet-lite0.onnx"
    return path if path.exists() else build_bundled(path)


def train_config(*, epochs: int, batch_size: int = 32, **overrides: Any) -> TrainConfig:
    from pipeline.train.loop import TrainConfig

    return TrainConfig(epochs=epochs, batch_size=batch_size, device="cpu", **overrides)


@dataclass
class PathTiming:
    """One timed run of a training path: set-up (feature caching), epochs, and their sum."""

    setup: float
    training: float

    @property
    def total(self) -> float:
        return self.setup + self.training


def time_training_path(
    *,
    onnx_path: Path,
    strategy: str,
    unfreeze: int | None,
    split: DataSplit,
    preprocess: Preprocess,
    config: TrainConfig,
    fast: bool,
    epochs: int,
    cache_dir: Path,
) -> PathTiming:
    """Build the model, then time `fastpath.prepare` and `epochs` epochs of `train_one_epoch`.

    Building the model is left out: both paths need it. No validation runs: the paths differ in
    how batches reach the trainable part, and that is what is timed. The feature cache is keyed
    by the model's sha256; passing none disables it, so every run pays for its own features.
    """
    from pipeline.surgery import make_plan
    from pipeline.surgery.build import build_model
    from pipeline.train import fastpath
    from pipeline.train.loop import make_optimizer, train_one_epoch

    imported, adapted = build_model(
        onnx_path, num_classes=len(split.class_names), hidden=None, dropout=0.0, seed=config.seed
    )
    plan = make_plan(adapted, strategy, unfreeze=unfreeze)
    started = time.perf_counter()
    setup = fastpath.prepare(
        strategy=strategy,
        augment="none",
        imported=imported,
        adapted=adapted,
        plan=plan,
        split=split,
        preprocess=preprocess,
        config=config,
        cache_dir=cache_dir,
        model_sha256="",
        log=lambda _message: None,
        fast=fast,
    )
    prepared = time.perf_counter()
    expected = "images through the whole model"
    if fast == (setup.description == expected):
        raise RuntimeError(f"asked for fast={fast}, got the path {setup.description!r}")
    setup.plan.apply(setup.model, 0)
    optimizer = make_optimizer(setup.plan.param_groups(setup.model, lr=config.lr), config)
    loader = setup.make_train_loader(config.batch_size)
    for epoch in range(epochs):
        train_one_epoch(
            setup.model,
            loader,
            optimizer,
            config=config,
            set_train_mode=setup.plan.train_mode,
            step_offset=epoch * len(loader),
            total_steps=epochs * len(loader),
        )
    return PathTiming(setup=prepared - started, training=time.perf_counter() - prepared)

"""Benchmark 1: frozen-backbone training, cached onnxruntime features against the classic loop.

The classic tutorial loop runs the frozen torch backbone forward in every epoch. `zoo adapt`
runs it once, in onnxruntime, and trains the head on the cached features. The floor is one
onnxruntime forward pass over the images (decoding and preprocessing included): the least work
any method must do.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from bench.common import (
    Scale,
    Section,
    bundled_onnx,
    digits_split,
    goal_verdict,
    interleave,
    markdown_table,
    median,
    preprocess_at,
    spread,
    time_training_path,
    train_config,
)

KEY = "feature"
TITLE = "1. Frozen-backbone training (`feature`, no augmentation)"
SPEED_UP_GOAL = 20.0
FLOOR_GOAL = 1.3
IMAGE_SIZE = 224


def floor_seconds(*, onnx_path: Path, split, preprocess) -> float:  # noqa: ANN001
    """One onnxruntime pass of the backbone (cut at the feature tensor) over the training images."""
    from pipeline.convert import import_model
    from pipeline.core import sessions
    from pipeline.train import fastpath, features

    imported = import_model(onnx_path, check_fidelity=False)
    probe = imported.probe
    cut = features.cut_at(
        imported.onnx_model, input_name=probe.input_name, output_name=probe.feature_name
    )
    session = sessions.ort_session(cut)
    samples = split.train
    started = time.perf_counter()
    batches = (
        fastpath.preprocessed_batch(samples[i : i + fastpath.EVAL_BATCH], preprocess)
        for i in range(0, len(samples), fastpath.EVAL_BATCH)
    )
    sessions.run_batches(session, input_name=probe.input_name, batches=batches)
    return time.perf_counter() - started


def run(scale: Scale, *, work: Path) -> Section:
    """Interleave zoo's path, the plain loop and the floor; report speed-up and floor overhead."""
    onnx_path = bundled_onnx(work)
    split = digits_split(images=scale.feature_images)
    preprocess = preprocess_at(IMAGE_SIZE)
    epochs, plain_epochs = (
        scale.feature_epochs,
        min(scale.feature_plain_epochs_timed, scale.feature_epochs),
    )
    config = train_config(epochs=epochs)
    stages: dict[str, list[tuple[float, float]]] = {"zoo": [], "plain": []}

    def path(name: str, *, fast: bool, timed_epochs: int) -> float:
        with tempfile.TemporaryDirectory(dir=work) as cache:
            timing = time_training_path(
                onnx_path=onnx_path,
                strategy="feature",
                unfreeze=None,
                split=split,
                preprocess=preprocess,
                config=config,
                fast=fast,
                epochs=timed_epochs,
                cache_dir=Path(cache),
            )
        # Every plain epoch repeats the same backbone forward passes: the untimed ones cost the same.
        training = timing.training * epochs / timed_epochs
        stages[name].append((timing.setup, training))
        return timing.setup + training

    times = interleave(
        {
            "zoo": lambda: path("zoo", fast=True, timed_epochs=epochs),
            "plain": lambda: path("plain", fast=False, timed_epochs=plain_epochs),
            "floor": lambda: floor_seconds(onnx_path=onnx_path, split=split, preprocess=preprocess),
        },
        repetitions=scale.repetitions,
    )
    zoo, plain, floor = (median(times[k]) for k in ("zoo", "plain", "floor"))
    speed_up, overhead = plain / zoo, zoo / floor
    images = len(split.train)
    rows = [
        ["plain loop: torch backbone forward every epoch", plain, spread(times["plain"]), images * epochs / plain, f"{speed_up:.2f}"],
        ["`zoo adapt`: cached onnxruntime features", zoo, spread(times["zoo"]), images * epochs / zoo, "1"],
        ["floor: one onnxruntime pass", floor, spread(times["floor"]), images / floor, f"{1 / overhead:.2f}"],
    ]  # fmt: skip
    zoo_setup = median([s for s, _ in stages["zoo"]])
    zoo_train = median([t for _, t in stages["zoo"]])
    ratios = markdown_table(
        ["ratio", "value", "goal", "verdict"],
        [
            ["speed-up (plain ÷ zoo)", f"{speed_up:.1f}×", f"≥ {SPEED_UP_GOAL:g}×", goal_verdict(speed_up, SPEED_UP_GOAL)],
            ["overhead against the floor (zoo ÷ floor)", f"{overhead:.2f}×", f"≤ {FLOOR_GOAL:g}×", goal_verdict(overhead, FLOOR_GOAL, higher_is_better=False)],
        ],
    )  # fmt: skip
    body = [
        f"{images} builtin:digits images at {IMAGE_SIZE} px, bundled efficientnet-lite0, {epochs} epochs, "
        f"batch 32, no validation pass in either path; median of {scale.repetitions} interleaved repetitions. "
        f"The plain loop's backbone work is the same in every epoch, so {plain_epochs} of its {epochs} epochs "
        f"are timed and scaled by {epochs / plain_epochs:g}.",
        ratios,
        markdown_table(
            ["path", "median s", "range s", "img/s (context)", "time ÷ zoo's"],
            [[r[0], r[1], r[2], r[3], r[4]] for r in rows],
        ),
        f"Where zoo's time goes (median): feature extraction {zoo_setup:.2f} s "
        f"({100 * zoo_setup / max(zoo, 1e-9):.0f}%), head training for {epochs} epochs {zoo_train:.2f} s.",
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))

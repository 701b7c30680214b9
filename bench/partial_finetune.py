"""Benchmark 2: partial fine-tuning (`finetune --unfreeze 2`), frozen prefix cached against plain torch.

Plain PyTorch runs every image through the whole model each epoch with `requires_grad=False` on
the frozen prefix. `zoo adapt` computes the prefix once in onnxruntime and trains only the top.
"""

from __future__ import annotations

import tempfile
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

KEY = "finetune"
TITLE = "2. Partial fine-tuning (`finetune --unfreeze 2`)"
GOAL = 2.0
IMAGE_SIZE = 224
UNFREEZE = 2
BATCH = 32


def run(scale: Scale, *, work: Path) -> Section:
    """Images per second of both paths, set-up (prefix caching) included, interleaved."""
    onnx_path = bundled_onnx(work)
    split = digits_split(images=scale.finetune_images)
    preprocess = preprocess_at(IMAGE_SIZE)
    epochs = scale.finetune_epochs
    config = train_config(epochs=epochs, batch_size=BATCH)
    stages: dict[str, list[tuple[float, float]]] = {"zoo": [], "plain": []}

    def path(name: str, *, fast: bool) -> float:
        with tempfile.TemporaryDirectory(dir=work) as cache:
            timing = time_training_path(
                onnx_path=onnx_path,
                strategy="finetune",
                unfreeze=UNFREEZE,
                split=split,
                preprocess=preprocess,
                config=config,
                fast=fast,
                epochs=epochs,
                cache_dir=Path(cache),
            )
        stages[name].append((timing.setup, timing.training))
        return timing.total

    times = interleave(
        {"zoo": lambda: path("zoo", fast=True), "plain": lambda: path("plain", fast=False)},
        repetitions=scale.repetitions,
    )
    images = len(split.train) * epochs
    zoo_rate, plain_rate = images / median(times["zoo"]), images / median(times["plain"])
    speed_up = zoo_rate / plain_rate
    setup, training = (median([s[i] for s in stages["zoo"]]) for i in (0, 1))
    plain_setup, plain_training = (median([s[i] for s in stages["plain"]]) for i in (0, 1))
    body = [
        f"{len(split.train)} builtin:digits images at {IMAGE_SIZE} px, bundled efficientnet-lite0, top "
        f"{UNFREEZE} blocks trainable, batch {BATCH}, {epochs} epoch(s), Adam; img/s = images × epochs ÷ "
        f"(set-up + training), median of {scale.repetitions} interleaved repetitions. With more epochs "
        "the cached prefix pays off more: its set-up is paid once.",
        markdown_table(
            ["ratio", "value", "goal", "verdict"],
            [
                [
                    "img/s, zoo ÷ plain",
                    f"{speed_up:.2f}×",
                    f"≥ {GOAL:g}× on CPU",
                    goal_verdict(speed_up, GOAL),
                ]
            ],
        ),  # fmt: skip
        markdown_table(
            ["path", "img/s (context)", "median s", "range s", "set-up s", "training s"],
            [
                [
                    "plain PyTorch, `requires_grad=False` on the prefix",
                    plain_rate,
                    median(times["plain"]),
                    spread(times["plain"]),
                    plain_setup,
                    plain_training,
                ],
                [
                    "`zoo adapt`: frozen prefix cached by onnxruntime",
                    zoo_rate,
                    median(times["zoo"]),
                    spread(times["zoo"]),
                    setup,
                    training,
                ],
            ],
        ),  # fmt: skip
        f"Where zoo's time goes (median): prefix caching {setup:.2f} s "
        f"({100 * setup / max(setup + training, 1e-9):.0f}%), training the top {training:.2f} s.",
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))

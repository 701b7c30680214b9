"""Benchmark 6: peak resident memory of zoo's fine-tuning path and of the plain PyTorch loop.

Each measurement is its own process (`python -m bench.memory --worker MODE ...`), so one's
allocations cannot hide in the other's peak; each child prints its own VmHWM (the kernel's
high-water mark of its resident set) for the parent to read. A third worker only imports and builds the model: the floor every process pays.
"""

from __future__ import annotations

import argparse
import re
import resource
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import (
    Scale,
    Section,
    bundled_onnx,
    digits_split,
    markdown_table,
    median,
    preprocess_at,
    time_training_path,
    train_config,
)

KEY = "memory"
TITLE = "6. Peak resident memory (`finetune`, batch 32, 224 px)"
IMAGE_SIZE = 224
BATCH = 32
UNFREEZE = 2
MODES = {
    "baseline": "imports and model only (no training)",
    "zoo": "`zoo adapt` path: frozen prefix cached by onnxruntime",
    "plain": "plain PyTorch loop, `requires_grad=False` on the prefix",
}


def own_peak_kib() -> int | None:
    """This process's peak resident set (VmHWM), or None where /proc is missing."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(r"^VmHWM:\s+(\d+)\s+kB", status, re.M)
    return int(match.group(1)) if match else None


def peak_rss_mib(argv: Sequence[str]) -> float:
    """Run a child process to completion and return its peak resident set size in MiB.

    The child's own VmHWM (a line `peak_kib N` on stdout) is preferred: `ru_maxrss` of a child
    that Python started with vfork also counts the parent's memory at the time of the spawn.
    """
    child = subprocess.Popen(list(argv), stdout=subprocess.PIPE, text=True)
    output, _ = child.communicate()
    if child.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited with {child.returncode}")
    reported = re.findall(r"^peak_kib (\d+)$", output, re.M)
    if reported:
        return int(reported[-1]) / 1024
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # fallback: the largest child so far
    return usage.ru_maxrss / 1024  # Linux reports KiB


def worker(mode: str, *, onnx_path: Path, images: int, work: Path) -> None:
    """The measured work: one epoch of fine-tuning on `images` images, or only the set-up."""
    split = digits_split(images=images)
    if mode == "baseline":
        from pipeline.surgery.build import build_model

        build_model(onnx_path, num_classes=10, hidden=None, dropout=0.0, seed=0)
        return
    time_training_path(
        onnx_path=onnx_path,
        strategy="finetune",
        unfreeze=UNFREEZE,
        split=split,
        preprocess=preprocess_at(IMAGE_SIZE),
        config=train_config(epochs=1, batch_size=BATCH),
        fast=mode == "zoo",
        epochs=1,
        cache_dir=work,
    )


def run(scale: Scale, *, work: Path) -> Section:
    """Peak RSS per mode, modes interleaved, median over the repetitions."""
    onnx_path = bundled_onnx(work)
    peaks: dict[str, list[float]] = {mode: [] for mode in MODES}
    repetitions = scale.memory_repetitions
    for _ in range(repetitions):
        for mode in MODES:
            with tempfile.TemporaryDirectory(dir=work) as cache:
                argv = [sys.executable, "-m", "bench.memory", "--worker", mode, "--onnx", str(onnx_path), "--images", str(scale.memory_images), "--work", cache]  # fmt: skip
                peaks[mode].append(peak_rss_mib(argv))
    zoo, plain, base = (median(peaks[m]) for m in ("zoo", "plain", "baseline"))
    rows = [[MODES[m], median(peaks[m]), median(peaks[m]) - base] for m in MODES]
    body = [
        f"{scale.memory_images} builtin:digits images at {IMAGE_SIZE} px, bundled efficientnet-lite0, top "
        f"{UNFREEZE} blocks trainable, batch {BATCH}, one epoch; each figure is a fresh process's peak RSS "
        f"(VmHWM), median of {repetitions} run(s).",
        markdown_table(
            ["ratio", "value"],
            [
                ["peak RSS, zoo ÷ plain", f"{zoo / plain:.2f}×"],
                [
                    "above the baseline process, zoo ÷ plain",
                    f"{(zoo - base) / max(plain - base, 1e-9):.2f}×",
                ],
            ],
        ),  # fmt: skip
        markdown_table(["process", "peak RSS MiB", "above baseline MiB"], rows),
        "zoo holds the cached prefix outputs of the whole training set in memory (float32); the plain "
        "loop holds one batch of activations for backward through the top blocks.",
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--worker", choices=sorted(MODES), required=True)
    parser.add_argument("--onnx", type=Path, required=True)
    parser.add_argument("--images", type=int, required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args(argv)
    worker(args.worker, onnx_path=args.onnx, images=args.images, work=args.work)
    peak = own_peak_kib()
    if peak is not None:
        print(f"peak_kib {peak}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

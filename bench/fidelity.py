"""Benchmark 9: decoding phone photos fast, and what the shortcuts cost in accuracy.

First the decoders, on one flowers5 photo upscaled to 4032x3024 and re-encoded (a phone photo),
and on the small original: Pillow's full decode, Pillow's draft mode (JPEG DCT scaling to the
resize size, what zoo uses) and `torchvision.io.decode_jpeg`, best of several, one thread.

`zoo adapt` decodes JPEGs at reduced scale (DCT scaling to the resize size) and keeps frozen-prefix
outputs on disk as float16. Both change the numbers a model sees. Each row here runs the same
`zoo adapt` command on the same seeded flowers5 split twice, in fresh processes and workspaces:
as shipped, and with full-size decoding and float32 prefixes (the worker patches those two module
attributes before running the CLI in-process). The goal of the issue: no more than 0.5 points lost.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from bench.common import MODEL_NAME, Scale, Section, markdown_table
from bench.transfer import SHARED_DIR

KEY = "fidelity"
TITLE = (
    "9. Decoding phone photos: Pillow draft, full decode, torchvision; accuracy of the shortcuts"
)
MODES = {"shipped": "draft decode, float16 prefixes", "exact": "full decode, float32 prefixes"}
GOAL_POINTS = 0.5


def decoder_rows(photo: Path, *, repetitions: int) -> list[list[object]]:
    """Milliseconds per decode, best of `repetitions`, for a 12 MP re-encoding and the original."""
    import io
    import time

    import torch
    from PIL import Image
    from torchvision.io import decode_jpeg

    def encoded(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=90)
        return buffer.getvalue()

    def pillow(data: bytes, draft: int | None) -> None:
        image = Image.open(io.BytesIO(data))
        if draft:
            image.draft("RGB", (draft, draft))
        image.load()

    def best(decode: object, data: object) -> float:
        decode(data)  # type: ignore[operator]
        times = []
        for _ in range(repetitions):
            started = time.perf_counter()
            decode(data)  # type: ignore[operator]
            times.append(time.perf_counter() - started)
        return 1000 * min(times)

    original = Image.open(photo).convert("RGB")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = []
        for label, image in (("4032x3024", original.resize((4032, 3024), Image.BICUBIC)), (f"{original.width}x{original.height}", original)):  # fmt: skip
            data = encoded(image)
            tensor = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            full, draft = (
                best(lambda d: pillow(d, None), data),
                best(lambda d: pillow(d, 256), data),
            )
            rows.append([label, full, draft, best(decode_jpeg, tensor), f"{full / draft:.1f}x"])
    finally:
        torch.set_num_threads(threads)
    return rows


def rows_for(scale: Scale) -> list[tuple[str, list[str]]]:
    """(row name, extra `zoo adapt` arguments) for the scale."""
    epochs = "3" if scale.name == "full" else "1"
    return [
        ("feature (defaults)", ["--strategy", "feature"]),
        (
            f"finetune top 4, no augmentation, {epochs} epochs (trains on the float16 cache)",
            ["--strategy", "finetune", "--unfreeze", "4", "--augment", "none", "--epochs", epochs],
        ),
    ]


def worker(mode: str, argv: Sequence[str]) -> None:
    """Run `zoo` in this process, as shipped or with exact decoding and float32 prefixes."""
    if mode == "exact":
        from pipeline.data import images
        from pipeline.train import fastpath, features

        images.decode_size = lambda preprocess: None  # open_for decodes at full size
        fastpath.PREFIX_STORAGE = "float32"
        features.DECODE = "full"  # a cache key of its own
    import cli

    cli.main(list(argv), standalone_mode=False)


def adapt_accuracy(mode: str, data: Path, extra: Sequence[str], *, work: Path) -> float:
    """Test accuracy of one `zoo adapt` run in a fresh process and workspace."""
    with tempfile.TemporaryDirectory(dir=work) as folder:
        models = Path(folder) / "models"
        base = [sys.executable, "-m", "bench.fidelity", "--worker", mode, "--"]
        subprocess.run([*base, "--models-dir", str(models), "fetch", MODEL_NAME], check=True, capture_output=True)  # fmt: skip
        run_dir = Path(folder) / "run"
        command = ["--models-dir", str(models), "adapt", MODEL_NAME, "--data", str(data), "--seed", "0", "--out", str(run_dir), *extra]  # fmt: skip
        subprocess.run([*base, *command], check=True, capture_output=True)
        return float(json.loads((run_dir / "run.json").read_text())["test_accuracy"])


def run(scale: Scale, *, work: Path) -> Section:
    data = SHARED_DIR / "datasets" / "flowers5"
    if not data.is_dir():
        body = [f"Skipped: {data} is absent (it ships beside the repository, not in it)."]
        return Section(KEY, TITLE, body, command=scale.command(KEY))
    photo = sorted((data / "daisy").iterdir())[0]
    decoders = decoder_rows(photo, repetitions=5 if scale.name == "full" else 2)
    table = []
    for name, extra in rows_for(scale):
        scores = {mode: adapt_accuracy(mode, data, extra, work=work) for mode in MODES}
        drop = 100 * (scores["exact"] - scores["shipped"]) + 0.0  # + 0.0: no "-0.0"
        verdict = "met" if drop <= GOAL_POINTS else f"missed ({drop:.1f} points lost)"
        table.append([name, f"{100 * scores['shipped']:.1f}%", f"{100 * scores['exact']:.1f}%", f"{0.0 - drop:+.1f}", verdict])  # fmt: skip
    body = [
        markdown_table(
            [
                "JPEG",
                "Pillow full ms",
                "Pillow draft to 256 px ms",
                "torchvision decode_jpeg ms",
                "draft speed-up",
            ],  # fmt: skip
            decoders,
        ),
        "zoo decodes with Pillow in draft mode: torchvision's decoder has no DCT scaling, so a phone "
        "photo costs it a full decode; on small photos every decoder takes under a millisecond.",
        "flowers5, `--seed 0` (600 train / 200 val / 200 test), bundled efficientnet-lite0; each "
        "cell is one `zoo adapt` run in a fresh process and workspace (test accuracy).",
        markdown_table(
            [
                "run",
                MODES["shipped"],
                MODES["exact"],
                "points (shipped − exact)",
                f"goal: ≥ −{GOAL_POINTS}",
            ],  # fmt: skip
            table,
        ),
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fidelity")
    parser.add_argument("--worker", choices=sorted(MODES), required=True)
    parser.add_argument("zoo_args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    zoo_args = args.zoo_args[1:] if args.zoo_args[:1] == ["--"] else args.zoo_args
    worker(args.worker, zoo_args)
    return 0


if __name__ == "__main__":
    sys.exit(main())

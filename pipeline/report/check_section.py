"""The "Data check" section of report.html, from RUN/check.json (pipeline.data.check): duplicate
pairs as thumbnails, the likely label errors with their given and suggested labels, the class
balance; and the held-out metrics again without the images that have a twin in training.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.core.rundir import RunDir
from pipeline.core.samples import DataSplit
from pipeline.data.check import CHECK_FILE, DataCheck, Suspect, Twin, balance_line
from pipeline.report.metrics import compute_metrics
from pipeline.report.page import bar, esc, fmt, percent, table, thumbnail, warning

PAIRS_SHOWN = 12
SUSPECTS_SHOWN = 12
THUMB_PX = 100
TWIN_FREE = "without_twins"  # metrics.json's key for the held-out figures without twinned images


def held_out_without_twins(
    run_dir: Path,
    split: DataSplit,
    *,
    labels: np.ndarray,
    scores: np.ndarray,
    metrics_split: str,
) -> dict[str, Any]:
    """metrics.json's extra figures: the held-out split without the images twinned in training.

    {} when the run has no check or none of its held-out images has a twin in training.
    """
    check = DataCheck.load(RunDir(run_dir).path / CHECK_FILE)
    others = ("train",) if metrics_split == "val" else ("train", "val")
    twinned = check.twinned(metrics_split, others) if check else set()
    held_out = split.test if metrics_split == "test" else split.val
    keep = [i for i, sample in enumerate(held_out) if sample.ref not in twinned]
    if not twinned or len(keep) == len(held_out) or not keep:
        return {}
    metrics = compute_metrics(
        np.asarray(labels)[keep], np.asarray(scores)[keep], split.class_names, split=metrics_split
    )
    return {
        TWIN_FREE: {
            "accuracy": metrics.accuracy,
            "macro_f1": metrics.macro_f1,
            "num_images": metrics.num_images,
            "excluded": len(held_out) - len(keep),
        }
    }


def data_check_section(run_dir: Path) -> str:
    """The section's HTML; a note saying how to get one when the run has no check.json."""
    run = RunDir(run_dir)
    check = DataCheck.load(run.path / CHECK_FILE)
    if check is None:
        return warning(
            "No data check in this run (it predates it, or it could not run): "
            "<code>zoo check --data SRC</code> runs it alone."
        )
    parts = [_findings(check), _twin_free(run)]
    parts += [_pairs(check.twins), _suspects(check.suspects, check.flagged), _balance(check)]
    return "".join(part for part in parts if part)


def _findings(check: DataCheck) -> str:
    if not check.notes:
        return f"<p>No problem found in {check.images} images (features of {esc(check.model)}).</p>"
    items = "".join(f"<li>{esc(line)}</li>" for line in check.notes)
    return f"<p>{check.images} images, features of {esc(check.model)}:</p><ul>{items}</ul>"


def _twin_free(run: RunDir) -> str:
    """The held-out figures twice: all images, and those without a twin in training."""
    try:
        raw = json.loads(run.metrics_file.read_text(encoding="utf-8"))
    except (FileNotFoundError, ValueError):
        return ""
    twin_free = raw.get(TWIN_FREE)
    if not twin_free:
        return ""
    split = raw.get("split", "test")
    rows = [
        (
            f"whole {split} split",
            percent(raw.get("accuracy")),
            fmt(raw.get("macro_f1")),
            raw.get("num_images"),
        ),
        (
            f"without the {twin_free['excluded']} with a twin in training",
            percent(twin_free["accuracy"]),
            fmt(twin_free["macro_f1"]),
            twin_free["num_images"],
        ),
    ]
    return "<h3>Held-out figures without duplicates</h3>" + table(
        ["images", "accuracy", "macro F1", "count"], rows, numeric=(1, 2, 3)
    )


def _image(ref: str) -> str:
    uri = thumbnail(ref, size=THUMB_PX)
    return f'<img alt="{esc(ref)}" src="{uri}">' if uri else '<div class="missing">not found</div>'


def _pairs(twins: Sequence[Twin]) -> str:
    if not twins:
        return ""
    cross = sorted(twins, key=lambda t: (t.split_a == t.split_b, -(t.score or 99)))
    figures = "".join(
        f'<figure class="twin">{_image(t.a)}{_image(t.b)}<figcaption>{esc(t.kind)} · '
        f"{esc(t.split_a)} / {esc(t.split_b)}"
        + (f" · score {t.score:.2f}" if t.score is not None else "")
        + f'<div class="name" title="{esc(t.a)}">{esc(Path(t.a).name)}</div>'
        f'<div class="name" title="{esc(t.b)}">{esc(Path(t.b).name)}</div></figcaption></figure>'
        for t in cross[:PAIRS_SHOWN]
    )
    more = f" (the first {PAIRS_SHOWN}, across splits first)" if len(twins) > PAIRS_SHOWN else ""
    return f'<h3>Duplicate pairs: {len(twins)}{more}</h3><div class="gallery">{figures}</div>'


def _suspects(suspects: Sequence[Suspect], flagged: int) -> str:
    if not suspects:
        return ""
    figures = "".join(
        f'<figure class="suspect">{_image(s.ref)}<figcaption>given <b>{esc(s.given)}</b><br>'
        f"suggested <b>{esc(s.suggested)}</b><br>p(given) {s.quality:.2f} · {esc(s.split)}"
        f'<div class="name" title="{esc(s.ref)}">{esc(Path(s.ref).name)}</div></figcaption></figure>'
        for s in suspects[:SUSPECTS_SHOWN]
    )
    return (
        f"<h3>Likely label errors: {flagged} flagged, the {min(len(suspects), SUSPECTS_SHOWN)} most "
        f'likely shown</h3><div class="gallery">{figures}</div>'
    )


def _balance(check: DataCheck) -> str:
    counts = check.balance.counts
    largest = max(counts.values(), default=0) or 1
    rows = [(esc(name), count, bar(count / largest)) for name, count in counts.items()]
    head = f"<h3>Class balance: {esc(balance_line(check.balance))}</h3>"
    return head + table(["class", "training images", ""], rows, numeric=(1,), raw=True)

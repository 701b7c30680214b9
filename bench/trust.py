"""Calibration and "none of these" (issue 26, items 2 and 3), measured on the real photo sets.

`make bench` runs it as benchmark "trust" (`python -m bench.run --only trust`); its parts also run
on their own, printing markdown:

    python -m bench.trust calibration         # ECE before/after: flowers5 finetune, textures10
                                              # feature, three seeds each (the runs are kept)
    python -m bench.trust candidates RUN      # the unknown-score candidates on a flowers5 run
    python -m bench.trust unknown RUN...      # the exported file in onnxruntime: AUROC, rejected,
                                              # kept, against textures10 and built-in digits

In-distribution: flowers5's held-out images. Out-of-distribution: every textures10 image and the
built-in digits (a fixed sample for the candidates, all 1,797 for the exported file).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import MODEL_NAME, Scale, Section, markdown_table
from bench.transfer import SHARED_DIR

KEY = "trust"
TITLE = "12. Calibration and unknown inputs (temperature, ECE, out-of-distribution score)"
FLOWERS = SHARED_DIR / "datasets" / "flowers5"
TEXTURES = SHARED_DIR / "datasets" / "textures10"
DIGITS = "builtin:digits"
CANDIDATE_DIGITS = 600  # digits sampled for the candidate table (the exported file sees all)
SEEDS = (0, 1, 2)


def _images_of(source: str) -> list[Any]:
    """Every image of a data source (all its splits)."""
    from pipeline.data.sources import load_source

    split = load_source(source, seed=0)
    return split.train + split.val + split.test


def _head_inputs(model: Any, samples: Sequence[Any], preprocess: Any, *, cache: Path) -> Any:
    """Pooled features, logits and labels of `samples` through the run's torch model (kept in
    `cache`, an .npz file, so that a second look costs nothing)."""
    import torch

    from pipeline.train.features import preprocessed_batch
    from pipeline.train.loop import TrainConfig
    from pipeline.train.trust import HeadInputs, head_inputs

    if cache.is_file():
        saved = np.load(cache)
        return HeadInputs(saved["features"], saved["logits"], saved["labels"])

    def batches() -> Any:
        for start in range(0, len(samples), 32):
            chunk = samples[start : start + 32]
            images = torch.from_numpy(preprocessed_batch(chunk, preprocess))
            yield images, torch.tensor([s.label for s in chunk])

    config = TrainConfig(epochs=1, device="cpu", channels_last=False)
    found = head_inputs(model, batches(), config=config)
    np.savez(cache, features=found.features, logits=found.logits, labels=found.labels)
    return found


def candidate_table(run_dir: Path, *, models_dir: Path) -> str:
    """AUROC of each registered score, fitted on the run's unaugmented training features."""
    from pipeline.export.deploy import load_run
    from pipeline.train.calibrate import fit_temperature
    from pipeline.train.ood import SCORES, auroc, fit_score, score, threshold_for
    from zoo.catalog import load_catalog

    loaded = load_run(run_dir, models_dir=models_dir, catalog=load_catalog())
    model, pre, split = loaded.model.model, loaded.preprocess, loaded.split
    digits = random.Random(0).sample(_images_of(DIGITS), CANDIDATE_DIGITS)
    parts = {"train": split.train, "val": split.val, "test": split.test, "textures10": _images_of(str(TEXTURES)), "digits": digits}  # fmt: skip
    (run_dir / "bench-trust").mkdir(exist_ok=True)
    found = {k: _head_inputs(model, v, pre, cache=run_dir / "bench-trust" / f"{k}.npz") for k, v in parts.items()}  # fmt: skip
    train, val, test = found["train"], found["val"], found["test"]
    unknown = {"textures10": found["textures10"], "digits": found["digits"]}
    temperature = fit_temperature(val.logits, val.labels)
    rows = []
    for name in SCORES:
        scorer = fit_score(name, train.features, train.labels, val.logits.shape[1])
        values = {
            key: score(scorer, part.features, part.logits / temperature)
            for key, part in {"val": val, "test": test, **unknown}.items()
        }
        threshold = threshold_for(values["val"], 0.95)
        row = [name]
        for key in unknown:
            row += [f"{auroc(values['test'], values[key]):.4f}", f"{np.mean(values[key] > threshold):.1%}"]  # fmt: skip
        rows.append([*row, f"{np.mean(values['test'] <= threshold):.1%}"])
    columns = ["score", "AUROC textures10", "rejected", "AUROC digits", "rejected", "flowers5 test kept"]  # fmt: skip
    return markdown_table(columns, rows)


def _adapted(data: Path, strategy: str, seed: int, *, models_dir: Path, out: Path, epochs: int | None = None) -> Path:  # fmt: skip
    """One `zoo adapt` run (kept when `out` already holds a finished one)."""
    import zoo

    record = out / "run.json"
    if not (record.is_file() and json.loads(record.read_text()).get("status") == "done"):
        shutil.rmtree(out, ignore_errors=True)
        zoo.adapt(MODEL_NAME, data=data, strategy=strategy, seed=seed, epochs=epochs, out=out, models_dir=models_dir, log=lambda _: None)  # fmt: skip
    return out


def _eces(run_dir: Path) -> list[float]:
    """Test ECE before, after the run's temperature (capped NLL, as `zoo adapt` fits it), after
    one fitted by the Brier score instead, and the floor; then the two temperatures. From the
    run's trust.safetensors, which keeps the validation and test logits."""
    from safetensors.numpy import load_file

    from pipeline.train.calibrate import calibrate

    saved = load_file(str(run_dir / "trust.safetensors"))
    fit = (saved["val_logits"], saved["val_labels"])
    held = {"measure_logits": saved["held_out_logits"], "measure_labels": saved["held_out_labels"]}
    nll, brier = calibrate(*fit, **held), calibrate(*fit, **held, objective="brier")
    floor = _ece_floor(saved["held_out_logits"] / nll.temperature)
    return [nll.ece_before, nll.ece_after, brier.ece_after, floor, nll.temperature, brier.temperature]  # fmt: skip


def _ece_floor(logits: np.ndarray, draws: int = 400) -> float:
    """The mean ECE of a perfectly calibrated model with these confidences on this many images:
    each image right with the probability it gives (what binning and sampling alone add)."""
    from scipy.special import softmax

    from pipeline.train.calibrate import reliability

    probs = softmax(np.asarray(logits, np.float64), axis=1)
    confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
    rng = np.random.default_rng(0)
    found = []
    for _ in range(draws):
        right = rng.random(len(confidence)) < confidence
        labels = np.where(right, predicted, (predicted + 1) % probs.shape[1])
        found.append(reliability(probs, labels).ece)
    return float(np.mean(found))


def calibration_table(*, models_dir: Path, work: Path, seeds: Sequence[int] = SEEDS, epochs: int | None = None) -> str:  # fmt: skip
    """Test ECE before and after the temperature (NLL and Brier), per seed, and their means."""
    rows = []
    for data, strategy in ((FLOWERS, "finetune"), (TEXTURES, "feature")):
        figures = []
        for seed in seeds:
            run_dir = _adapted(data, strategy, seed, models_dir=models_dir, out=work / f"{data.name}-{strategy}-{seed}", epochs=epochs)  # fmt: skip
            figures.append(_eces(run_dir))
            rows.append(
                [data.name, strategy, seed, *(f"{v:.4f}" for v in figures[-1]), run_dir.name]
            )
            print(rows[-1], file=sys.stderr, flush=True)
        mean = np.mean(figures, axis=0)
        goal = max(mean[0] / 2, 0.03)
        verdict = f"goal ≤ {goal:.4f}: {'met' if mean[1] <= goal else 'not met'}"
        rows.append([data.name, strategy, "mean", *(f"{v:.4f}" for v in mean), verdict])
    columns = ["data", "strategy", "seed", "test ECE before", "after", "after (Brier T)", "floor", "T", "T (Brier)", "run / goal"]  # fmt: skip
    return markdown_table(columns, rows)


def _onnx_outputs(session: Any, samples: Sequence[Any], preprocess: Any) -> dict[str, np.ndarray]:
    """Every output of the exported file for `samples`, from onnxruntime."""
    from pipeline.core.sessions import run_outputs
    from pipeline.train.features import preprocessed_batch

    names = [o.name for o in session.get_outputs()]
    batches = (preprocessed_batch(samples[i : i + 64], preprocess) for i in range(0, len(samples), 64))  # fmt: skip
    input_name = session.get_inputs()[0].name
    values = run_outputs(session, input_name=input_name, batches=batches, names=names)
    return dict(zip(names, values, strict=True))


def unknown_row(run_dir: Path, *, models_dir: Path, keep: float | None = None) -> list[Any]:
    """The run's exported file alone, in onnxruntime: AUROC, rejected and kept at its stored
    threshold (with `keep`, chosen again from the validation scores, as `zoo export --keep`)."""
    import zoo
    from pipeline.core.metadata import read_metadata
    from pipeline.core.rundir import RunDir
    from pipeline.core.sessions import create_session
    from pipeline.train.ood import auroc
    from zoo.catalog import load_catalog

    onnx_path = run_dir / "model.onnx"
    zoo.export(run_dir, out=onnx_path, keep=keep, models_dir=models_dir, catalog=load_catalog(), log=lambda _: None)  # fmt: skip
    metadata = read_metadata(onnx_path)
    ood, pre = metadata.ood, metadata.preprocess
    session = create_session(onnx_path, "CPUExecutionProvider")
    known = _onnx_outputs(session, RunDir(run_dir).split().test, pre)[ood.output]
    kept = float(np.mean(known <= ood.threshold))
    row: list[Any] = [run_dir.name, f"{ood.threshold:.4g}"]
    met = kept >= 0.93
    for source in (str(TEXTURES), DIGITS):
        scores = _onnx_outputs(session, _images_of(source), pre)[ood.output]
        area, rejected = auroc(known, scores), float(np.mean(scores > ood.threshold))
        met = met and area >= 0.95 and rejected >= 0.8
        row += [f"{area:.4f}", f"{rejected:.1%}"]
    return [*row, f"{kept:.1%}", "met" if met else "not met"]


def unknown_table(run_dirs: Sequence[Path], *, models_dir: Path, keep: float | None = None) -> str:
    """One `unknown_row` per run."""
    rows = [unknown_row(r, models_dir=models_dir, keep=keep) for r in run_dirs]
    columns = ["flowers5 run", "threshold", "AUROC textures10", "rejected", "AUROC digits", "rejected", "test kept", "goal"]  # fmt: skip
    return markdown_table(columns, rows)


def _target_scores(name: str, folder: Path, samples: Sequence[Any], pre: Any, output: str) -> np.ndarray:  # fmt: skip
    """The unknown score of `samples` from one written target, fed as its app would feed it."""
    import json

    from pipeline.data.images import open_for
    from pipeline.export.targets import load_targets
    from pipeline.train.features import preprocessed_batch

    target = load_targets()[name]
    embedded = json.loads((folder / "preprocess.json").read_text()).get("embedded")
    if embedded and not target.takes_any_size:
        raise SystemExit(
            f"{name}: a fixed-size embedded file; export it without --embed-preprocess"
        )
    scores = []
    for start in range(0, len(samples), 128):
        chunk = samples[start : start + 128]
        if embedded:  # decoded at their own sizes, as `zoo predict` decodes them
            inputs: Any = [np.asarray(open_for(s.ref, pre)) for s in chunk]
            inputs = [i[:, :, None] if i.ndim == 2 else i for i in inputs]
        else:
            inputs = preprocessed_batch(chunk, pre)
        scores.append(np.asarray(target.run(folder / target.main_file, inputs, output=output)))
    return np.concatenate(scores).astype(np.float64).reshape(len(samples))


def target_unknown_table(run_dir: Path) -> str:
    """The run's written targets (RUN/deploy/*), each in its own runtime: AUROC, rejected and
    kept at the threshold stored in the exported file, as `unknown_row` measures onnxruntime."""
    from pipeline.core.metadata import read_metadata
    from pipeline.core.rundir import RunDir
    from pipeline.train.ood import auroc

    metadata = read_metadata(run_dir / "model.onnx")
    ood, pre = metadata.ood, metadata.preprocess
    known_samples = RunDir(run_dir).split().test
    unknown = {source: _images_of(source) for source in (str(TEXTURES), DIGITS)}
    rows = []
    for folder in sorted(p for p in (run_dir / "deploy").iterdir() if p.is_dir()):
        known = _target_scores(folder.name, folder, known_samples, pre, ood.output)
        kept = float(np.mean(known <= ood.threshold))
        row: list[Any] = [folder.name, f"{ood.threshold:.4g}"]
        met = kept >= 0.93
        for samples in unknown.values():
            scores = _target_scores(folder.name, folder, samples, pre, ood.output)
            area, rejected = auroc(known, scores), float(np.mean(scores > ood.threshold))
            met = met and area >= 0.95 and rejected >= 0.8
            row += [f"{area:.4f}", f"{rejected:.1%}"]
        rows.append([*row, f"{kept:.1%}", "met" if met else "not met"])
    columns = ["target", "threshold", "AUROC textures10", "rejected", "AUROC digits", "rejected", "test kept", "goal"]  # fmt: skip
    return markdown_table(columns, rows)


def run(scale: Scale, *, work: Path) -> Section:
    """Benchmark "trust" of `make bench`: the three tables, on runs it trains in `work`."""
    if not FLOWERS.is_dir() or not TEXTURES.is_dir():
        body = [f"Skipped: {FLOWERS.parent} is absent (it ships beside the repository, not in it)."]
        return Section(KEY, TITLE, body, command=scale.command(KEY))
    import zoo

    models_dir, runs = work / "models", work / "trust-runs"
    zoo.fetch(MODEL_NAME, models_dir=models_dir)
    seeds, epochs = (SEEDS, None) if scale.name == "full" else ((0,), 1)
    calibration = calibration_table(models_dir=models_dir, work=runs, seeds=seeds, epochs=epochs)
    flowers_runs = [runs / f"flowers5-finetune-{seed}" for seed in seeds]
    candidates = candidate_table(flowers_runs[0], models_dir=models_dir)
    unknown = unknown_table(flowers_runs, models_dir=models_dir)
    zoo.export(flowers_runs[0], targets="all", models_dir=models_dir, log=lambda _: None)
    targets = target_unknown_table(flowers_runs[0])
    body = [
        "Test ECE (15 equal-width bins) before and after temperature scaling fitted on the "
        "validation split; `floor` is the ECE a perfectly calibrated model with the calibrated "
        "confidences would show on the same number of test images (binning and sampling alone).",
        calibration,
        f"The unknown-score candidates on `{flowers_runs[0].name}`, each fitted on the training "
        "images' pooled features (unaugmented), threshold keeping 95% of the validation images.",
        candidates,
        "The exported file alone, in onnxruntime, at its stored threshold, against every "
        "textures10 image and all 1,797 built-in digits. Goal: AUROC ≥ 0.95 on each, ≥ 80% of "
        "them rejected, ≥ 93% of flowers5's test images kept.",
        unknown,
        f"The same, in each deployment target of `{flowers_runs[0].name}` (`zoo export --target "
        "all`), each run in its own runtime and fed as its app would feed it.",
        targets,
    ]
    return Section(KEY, TITLE, body, command=scale.command(KEY))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=["candidates", "calibration", "unknown", "targets"])
    parser.add_argument("run", nargs="*", type=Path, help="flowers5 runs (candidates: one)")
    parser.add_argument("--keep", type=float, help="unknown: choose the threshold again")
    parser.add_argument("--models-dir", type=Path, default=Path(tempfile.gettempdir()) / "zoo-bench-trust")  # fmt: skip
    args = parser.parse_args(argv)
    if not FLOWERS.is_dir():
        sys.exit(f"no flowers5 at {FLOWERS}; set ZOO_SHARED to the folder that holds datasets/")
    import zoo

    zoo.fetch(MODEL_NAME, models_dir=args.models_dir)
    if args.what == "calibration":
        work = args.models_dir / "calibration-runs"
        print(calibration_table(models_dir=args.models_dir, work=work))
    elif not args.run:
        sys.exit(f"`{args.what}` needs RUN, a flowers5 run directory of zoo adapt")
    elif args.what == "candidates":
        print(candidate_table(args.run[0], models_dir=args.models_dir))
    elif args.what == "targets":
        print(target_unknown_table(args.run[0]))
    else:
        print(unknown_table(args.run, models_dir=args.models_dir, keep=args.keep))


if __name__ == "__main__":
    main()

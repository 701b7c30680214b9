"""`zoo rank`: which pretrained model suits this data? A linear probe on each one's frozen features.

Every candidate's frozen backbone runs once over the training and validation images (onnxruntime,
the model's own preprocessing, cached like `zoo adapt`'s features); a logistic regression on the
standardised features is fitted on the training split and scored on the validation split. The test
split is never read, so a later `zoo adapt` on the same `--seed` still has an untouched test set.
`linear_probe` is also the bar the benchmarks hold `zoo adapt` against.
"""

from __future__ import annotations

import dataclasses
import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from pipeline.convert import describe_ops, normalise, refuse_custom_domains, unconvertible_ops
from pipeline.convert.probe import probe
from pipeline.core.diskcache import features_dir
from pipeline.data.sources import load_source
from pipeline.train.fastpath import cached_features
from pipeline.train.grouping import split_grouper
from zoo.cache import open_or_build
from zoo.errors import DataError, NotFound, UnsupportedModel, ZooError
from zoo.onnxfile import load_onnx
from zoo.preprocess import model_preprocess
from zoo.quantized import refuse_quantized
from zoo.workspace import Workspace, list_workspace

if TYPE_CHECKING:
    import numpy as np
    import onnx

    from pipeline.convert.probe import ProbeResult
    from pipeline.core.samples import DataSplit, Sample
    from zoo.catalog import Catalog, Preprocess

# Inverse regularisation strengths tried, picked on the validation split: the usual linear-probe grid.
PROBE_C_GRID = (0.01, 0.1, 1.0)
PROBE_MAX_ITER = 2000  # lbfgs on standardised features converges well within this


@dataclass(frozen=True)
class ProbeFit:
    """A logistic-regression probe fitted on training features, its C picked on validation."""

    c: float  # the inverse regularisation strength chosen
    val_accuracy: float
    val_loss: float  # cross-entropy on validation: breaks ties between equal accuracies
    test_accuracy: float | None = None  # only when test features were given (benchmarks)
    model: Any = dataclasses.field(default=None, repr=False, compare=False)  # the fitted pipeline


def linear_probe(
    train_x: np.ndarray,
    train_y: Sequence[int],
    val_x: np.ndarray,
    val_y: Sequence[int],
    *,
    test_x: np.ndarray | None = None,
    test_y: Sequence[int] | None = None,
    grid: Sequence[float] = PROBE_C_GRID,
) -> ProbeFit:
    """Standardise, fit LogisticRegression for each C in `grid` on train, keep the best on val."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import log_loss
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    train_y, val_y = np.asarray(train_y), np.asarray(val_y)
    if len(val_y) == 0:
        raise DataError("the validation split is empty; add images so that each class has a few")
    if len(np.unique(train_y)) < 2:
        raise DataError("the training split holds fewer than two classes; add images")
    best: ProbeFit | None = None
    for c in grid:
        model = make_pipeline(
            StandardScaler(), LogisticRegression(C=c, max_iter=PROBE_MAX_ITER)
        ).fit(train_x, train_y)
        proba = model.predict_proba(val_x)
        classes = model.classes_
        accuracy = float(np.mean(classes[proba.argmax(1)] == val_y))
        # A class absent from train has no column: its validation images count as infinitely wrong.
        known = set(val_y.tolist()) <= set(classes.tolist())
        loss = float(log_loss(val_y, proba, labels=classes)) if known else float("inf")
        if best is None or (accuracy, -loss) > (best.val_accuracy, -best.val_loss):
            best = ProbeFit(c=c, val_accuracy=accuracy, val_loss=loss, model=model)
    assert best is not None  # the grid is never empty
    if test_x is not None and test_y is not None and len(test_y):
        test_accuracy = float(np.mean(best.model.predict(test_x) == np.asarray(test_y)))
        best = dataclasses.replace(best, test_accuracy=test_accuracy)
    return best


def pooled(features: np.ndarray) -> np.ndarray:
    """[N, C] features as they are; [N, C, H, W] ones averaged over H and W (what the head sees)."""
    return features.mean(axis=(2, 3)) if features.ndim == 4 else features.reshape(len(features), -1)


class FrozenBackbone(NamedTuple):
    """What `fastpath.cached_features` needs of a model: its normalised graph and where to cut it."""

    onnx_model: onnx.ModelProto
    probe: ProbeResult


def open_backbone(onnx_path: Path, *, name: str) -> FrozenBackbone:
    """The model's graph, normalised as `zoo adapt` imports it, with its head found (no torch)."""

    model = load_onnx(onnx_path)
    refuse_quantized(model, label=name, path=onnx_path)  # not "custom operators": its fp32 sibling
    refuse_custom_domains(model, name)
    normalised, _notes = normalise(model)
    missing = unconvertible_ops(normalised)
    if missing:
        # It would probe fine in onnxruntime, but `zoo adapt` could not train it: not a candidate.
        raise UnsupportedModel(
            f"uses operators onnx2torch cannot convert ({describe_ops(missing)}), so `zoo adapt` "
            "cannot train it; pick another model from `zoo list`"
        )
    return FrozenBackbone(normalised, probe(normalised))


def split_features(
    backbone: FrozenBackbone,
    samples: Sequence[Sample],
    *,
    preprocess: Preprocess,
    cache_dir: Path,
    model_sha256: str,
    sessions: dict[str, Any],
) -> np.ndarray:
    """Pooled frozen features of `samples`, through `zoo adapt`'s feature cache."""

    raw = cached_features(
        imported=backbone,
        samples=samples,
        preprocess=preprocess,
        cache_dir=cache_dir,
        model_sha256=model_sha256,
        log=lambda _message: None,
        sessions=sessions,
    )
    return pooled(raw)


def probe_split(
    backbone: FrozenBackbone,
    split: DataSplit,
    *,
    preprocess: Preprocess,
    cache_dir: Path,
    model_sha256: str,
    with_test: bool = False,
) -> tuple[ProbeFit, int]:
    """The linear probe of `backbone` on `split` (test accuracy too `with_test`); and the feature dim.

    Without `with_test` the test images are never read: that is how `zoo rank` calls it.
    """
    common = {
        "preprocess": preprocess,
        "cache_dir": cache_dir,
        "model_sha256": model_sha256,
        "sessions": {},
    }
    train_x = split_features(backbone, split.train, **common)
    val_x = split_features(backbone, split.val, **common)
    test = {}
    if with_test and split.test:
        test = {
            "test_x": split_features(backbone, split.test, **common),
            "test_y": [s.label for s in split.test],
        }
    fit = linear_probe(
        train_x, [s.label for s in split.train], val_x, [s.label for s in split.val], **test
    )
    return fit, int(train_x.shape[1])


@dataclass(frozen=True)
class RankedModel:
    """One candidate: its probe figures, or why it could not be probed."""

    name: str
    val_accuracy: float | None = None
    val_loss: float | None = None
    c: float | None = None
    feature_dim: int | None = None
    image_size: int | None = None  # the model's own input size, at which its features were taken
    images: int = 0  # images run through the backbone (train + val)
    seconds: float = 0.0  # fetch (bundled models), features and probe
    reason: str | None = None  # None when probed

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "seconds": round(self.seconds, 2)}


@dataclass
class RankResult:
    """Candidates best first (probed ones by validation accuracy), then those that could not be."""

    data: str
    seed: int
    class_names: list[str]
    train_images: int
    val_images: int
    models: list[RankedModel]
    seconds: float

    @property
    def best(self) -> RankedModel | None:
        return next((m for m in self.models if m.reason is None), None)

    @property
    def recommendation(self) -> str:
        if self.best is None:
            return "no candidate could be probed; fetch another model (`zoo list`) and rank again"
        seed = f" --seed {self.seed}" if self.seed else ""
        return f"adapt with: zoo adapt {self.best.name} --data {shlex.quote(self.data)}{seed}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "seed": self.seed,
            "classes": len(self.class_names),
            "train_images": self.train_images,
            "val_images": self.val_images,
            "seconds": round(self.seconds, 2),
            "best": self.best.name if self.best else None,
            "recommendation": self.recommendation,
            "models": [
                {"rank": i + 1 if m.reason is None else None, **m.to_dict()}
                for i, m in enumerate(self.models)
            ],
        }


def candidate_names(names: Sequence[str], *, models_dir: Path, catalog: Catalog) -> list[str]:
    """The models to rank: those named, else every fetched model plus the bundled ones."""

    if names:
        return list(dict.fromkeys(names))
    present = [m.name for m in list_workspace(models_dir)]
    bundled = [entry.name for entry in catalog.values() if entry.is_bundled]
    return list(dict.fromkeys([*bundled, *present]))


def _open_candidate(
    name: str, *, models_dir: Path, catalog: Catalog
) -> tuple[Path, dict[str, Any], str]:
    """A candidate's file and card; bundled catalog models are fetched (offline) when missing."""

    try:
        path, card = open_or_build(name, models_dir=models_dir, catalog=catalog)
    except NotFound:
        try:
            entry = catalog.resolve(name)
        except NotFound:
            raise NotFound(f"not in the workspace {models_dir} nor in the catalog") from None
        raise NotFound(f"not fetched yet; run `zoo fetch {entry.name}` first") from None
    return path, card, card.get("name") or name


def native_preprocess(card: dict[str, Any], path: Path, *, catalog: Catalog) -> Preprocess:
    """The model's own preprocessing, at its own size: the one rule `zoo adapt` uses too."""

    return model_preprocess(card, path, catalog=catalog, commands="zoo fetch")


def _rank_one(
    name: str, split: DataSplit, *, models_dir: Path, catalog: Catalog, log: Callable[[str], None]
) -> RankedModel:
    """Probe one candidate; any failure becomes its one-line reason."""
    started = time.perf_counter()
    images = len(split.train) + len(split.val)
    try:
        path, card, name = _open_candidate(name, models_dir=models_dir, catalog=catalog)
        preprocess = native_preprocess(card, path, catalog=catalog)
        backbone = open_backbone(path, name=name)
        log(f"{name}: features of {images} images at {preprocess.crop} px")
        fit, feature_dim = probe_split(
            backbone,
            split,
            preprocess=preprocess,
            cache_dir=features_dir(models_dir),
            model_sha256=card.get("sha256") or "",
        )
    except DataError:
        raise  # the data, not the model: no other candidate would do better
    except ZooError as exc:
        return RankedModel(name, seconds=time.perf_counter() - started, reason=str(exc))
    except Exception as exc:  # onnxruntime or onnx refusing one graph must not end the ranking
        first_line = str(exc).splitlines()[0][:160] if str(exc) else ""
        reason = f"could not be probed ({type(exc).__name__}: {first_line})"
        return RankedModel(name, seconds=time.perf_counter() - started, reason=reason)
    return RankedModel(
        name=name,
        val_accuracy=fit.val_accuracy,
        val_loss=fit.val_loss,
        c=fit.c,
        feature_dim=feature_dim,
        image_size=preprocess.crop,
        images=images,
        seconds=time.perf_counter() - started,
    )


def rank_models(
    names: Sequence[str],
    *,
    data: str,
    models_dir: Path,
    catalog: Catalog,
    seed: int = 0,
    strict: bool = False,
    log: Callable[[str], None] = print,
) -> RankResult:
    """Rank candidate models for `data` by linear-probe accuracy on its validation split."""

    started = time.perf_counter()
    models_dir = Path(models_dir)
    # The same split as `zoo adapt --seed`: duplicates grouped by the same model.
    grouper = split_grouper(Workspace.at(models_dir, catalog), log)
    split = load_source(data, seed=seed, strict=strict, group_by=grouper)
    if not split.train or not split.val:
        raise DataError(
            f"{data} gives {len(split.train)} training and {len(split.val)} validation images; "
            "ranking needs both: add images (a few per class at least)"
        )
    candidates = candidate_names(names, models_dir=models_dir, catalog=catalog)
    if not candidates:
        raise NotFound(
            f"no model to rank in {models_dir}; name one, e.g. `zoo rank efficientnet-lite0`"
        )
    ranked = [
        _rank_one(name, split, models_dir=models_dir, catalog=catalog, log=log)
        for name in candidates
    ]
    probed = sorted(
        (m for m in ranked if m.reason is None), key=lambda m: (-m.val_accuracy, m.val_loss)
    )
    return RankResult(
        data=data,
        seed=seed,
        class_names=split.class_names,
        train_images=len(split.train),
        val_images=len(split.val),
        models=[*probed, *(m for m in ranked if m.reason is not None)],
        seconds=time.perf_counter() - started,
    )


def pick_bundled(
    *, data: str, seed: int, strict: bool, workspace: Workspace, log: Callable[[str], None]
) -> str:
    """With no model named and none fetched: the bundled model whose linear probe scores best on
    `data`'s validation split (`zoo rank`'s measurement, the split `zoo adapt --seed` makes)."""
    result = rank_models(
        [],
        data=data,
        models_dir=workspace.models_dir,
        catalog=workspace.catalog,
        seed=seed,
        strict=strict,
        log=lambda _line: None,
    )
    best = result.best
    if best is None:
        raise NotFound(
            f"no model named and no bundled model could be probed on {data}; "
            "name one, e.g. `zoo adapt efficientnet-lite0`"
        )
    figures = ", ".join(
        f"{m.name} {m.val_accuracy:.1%}" for m in result.models if m.val_accuracy is not None
    )
    log(
        f"no model named and none fetched: using {best.name}, the best bundled model by a linear "
        f"probe on the validation split ({figures}; {result.seconds:.0f} s)"
    )
    return best.name

"""`zoo rank`: the linear probe, candidates, reasons for the unprobeable, the table and --json."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from image_builders import write_solid
from onnx_builders import SIZE, conv_head, gemm_head, save

from cli import main
from pipeline.train import rank
from zoo.catalog import IMAGENET_PREPROCESS, load_catalog
from zoo.errors import DataError
from zoo.files import sha256_file

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


def colour_folder(root: Path, *, per_class: int = 10) -> Path:
    """root/<colour>/<i>.png: plain colours with a little noise per image, easy to tell apart."""
    rng = np.random.default_rng(0)
    for name, rgb in COLOURS.items():
        for i in range(per_class):
            jitter = tuple(int(np.clip(v + rng.integers(-25, 26), 0, 255)) for v in rgb)
            write_solid(root / name / f"{i:02d}.png", jitter, size=(20, 14))
    return root


def blobs(n: int, *, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Three overlapping Gaussian classes in 20 dimensions, on very different feature scales."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 3
    centres = np.random.default_rng(99).standard_normal((3, 20))
    x = centres[labels] + 1.5 * rng.standard_normal((n, 20))
    return x * np.logspace(-2, 2, 20), labels


def test_linear_probe_picks_c_on_validation_like_scikit_learn() -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (blobs(n, seed=s) for n, s in [(60, 0), (60, 1), (90, 2)])  # fmt: skip
    fit = rank.linear_probe(train_x, train_y, val_x, val_y, test_x=test_x, test_y=test_y)
    scaler = StandardScaler().fit(train_x)
    by_c = {
        c: LogisticRegression(C=c, max_iter=2000).fit(scaler.transform(train_x), train_y)
        for c in rank.PROBE_C_GRID
    }
    val_acc = {c: m.score(scaler.transform(val_x), val_y) for c, m in by_c.items()}
    assert fit.c in rank.PROBE_C_GRID and fit.val_accuracy == pytest.approx(max(val_acc.values()))
    assert fit.val_accuracy == pytest.approx(val_acc[fit.c])
    assert fit.test_accuracy == pytest.approx(by_c[fit.c].score(scaler.transform(test_x), test_y))
    assert 0.5 < fit.test_accuracy < 1.0  # a real problem, not a trivial one
    with pytest.raises(DataError, match="validation split is empty"):
        rank.linear_probe(train_x, train_y, val_x[:0], val_y[:0])


def test_pooled_averages_spatial_features_only() -> None:
    flat = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert np.array_equal(rank.pooled(flat), flat)
    spatial = np.ones((2, 3, 4, 4), dtype=np.float32) * np.arange(3)[None, :, None, None]
    assert rank.pooled(spatial).tolist() == [[0, 1, 2], [0, 1, 2]]


def _entry(name: str, path: Path) -> dict:
    """A private catalog entry for a tiny local model, with preprocessing at its 8 px size."""
    preprocess = {**IMAGENET_PREPROCESS.to_dict(), "resize": SIZE, "crop": SIZE}
    return {
        "name": name,
        "urls": [str(path)],
        "sha256": sha256_file(path),
        "size": path.stat().st_size,
        "opset": 13,
        "input": {"name": "image", "shape": ["N", 3, SIZE, SIZE], "layout": "NCHW"},
        "num_classes": 5,
        "preprocess": {**preprocess, "confidence": "high"},
    }


@pytest.fixture
def tiny_zoo(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A workspace with two tiny models fetched through a private catalog, and the catalog file."""
    from zoo.cache import fetch

    files = {
        "tiny-gemm": save(gemm_head(), tmp_path / "gemm.onnx"),
        "tiny-conv": save(conv_head(), tmp_path / "conv.onnx"),  # spatial features: pooled
    }
    catalog_file = tmp_path / "private.json"
    catalog_file.write_text(json.dumps([_entry(n, p) for n, p in files.items()]))
    models_dir = tmp_path / "models"
    for name in files:
        fetch(name, models_dir=models_dir, catalog=load_catalog(catalog_file), progress=False)
    # Another graph than tiny-gemm: the same bytes would be known by their sha256 and documented.
    undocumented = save(gemm_head(softmax=True), tmp_path / "undocumented.onnx")
    return models_dir, catalog_file, undocumented


@pytest.mark.slow  # imports torch, onnx2torch and scikit-learn
def test_rank_probes_each_candidate_and_gives_reasons(tiny_zoo, tmp_path, monkeypatch) -> None:
    models_dir, catalog_file, undocumented = tiny_zoo
    data = colour_folder(tmp_path / "colours")
    seen: list[str] = []
    original = rank.split_features

    def recording(backbone, samples, **kwargs):  # noqa: ANN001, ANN003, ANN202
        seen.extend(s.ref for s in samples)
        return original(backbone, samples, **kwargs)

    monkeypatch.setattr(rank, "split_features", recording)
    result = rank.rank_models(
        ["tiny-gemm", "tiny-conv", str(undocumented), "mobilenetv2-12", "nosuchmodel"],
        data=str(data),
        models_dir=models_dir,
        catalog=load_catalog(catalog_file),
        log=lambda _m: None,
    )
    by_name = {m.name: m for m in result.models}
    assert [m.name for m in result.models[:2]] == sorted(
        ["tiny-gemm", "tiny-conv"], key=lambda n: (-by_name[n].val_accuracy, by_name[n].val_loss)
    )
    for name in ("tiny-gemm", "tiny-conv"):
        probed = by_name[name]
        assert probed.reason is None and 0 <= probed.val_accuracy <= 1
        assert probed.feature_dim == 6 and probed.image_size == SIZE
        assert probed.images == result.train_images + result.val_images == 24
    assert (
        "does not know how undocumented preprocesses images: pass --preprocess"
        in by_name["undocumented"].reason
    )
    assert "not fetched yet; run `zoo fetch mobilenetv2-12`" in by_name["mobilenetv2-12"].reason
    assert "nor in the catalog" in by_name["nosuchmodel"].reason
    assert result.best.name == result.models[0].name
    assert result.recommendation == f"adapt with: zoo adapt {result.best.name} --data {data}"
    # Only training and validation images are ever featurised: the test split stays untouched.
    from pipeline.data.sources import load_source

    split = load_source(str(data), seed=0)
    assert set(seen) == {s.ref for s in [*split.train, *split.val]}
    assert not set(seen) & {s.ref for s in split.test}


def test_rank_without_validation_images_is_one_clear_error(tiny_zoo, tmp_path) -> None:
    models_dir, catalog_file, _ = tiny_zoo
    data = colour_folder(tmp_path / "few", per_class=1)
    with pytest.raises(DataError, match="ranking needs both"):
        rank.rank_models(
            ["tiny-gemm"],
            data=str(data),
            models_dir=models_dir,
            catalog=load_catalog(catalog_file),
            log=lambda _m: None,
        )


def test_candidates_default_to_the_bundled_models_and_the_workspace(tiny_zoo) -> None:
    models_dir, catalog_file, _ = tiny_zoo
    catalog = load_catalog(catalog_file)
    assert rank.candidate_names([], models_dir=models_dir, catalog=catalog) == [
        "efficientnet-lite0",
        "efficientnet-lite1",
        "efficientnet-lite2",
        "tiny-conv",
        "tiny-gemm",
    ]
    named = rank.candidate_names(["b", "a", "b"], models_dir=models_dir, catalog=catalog)
    assert named == ["b", "a"]


def _zoo(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def test_rank_command_json_shape(tiny_zoo, tmp_path) -> None:
    models_dir, catalog_file, undocumented = tiny_zoo
    data = colour_folder(tmp_path / "colours")
    prefix = ["--models-dir", str(models_dir), "--catalog", str(catalog_file)]
    code, out, err = _zoo(*prefix, "rank", "tiny-gemm", str(undocumented), "--data", str(data), "--json")  # fmt: skip
    assert code == 0, err
    payload = json.loads(out)
    assert payload["best"] == "tiny-gemm" and payload["classes"] == 3
    assert (payload["train_images"], payload["val_images"]) == (18, 6)
    assert payload["recommendation"].startswith("adapt with: zoo adapt tiny-gemm --data ")
    first, second = payload["models"]
    assert first["rank"] == 1 and first["name"] == "tiny-gemm" and first["reason"] is None
    assert set(first) >= {"val_accuracy", "val_loss", "c", "feature_dim", "images", "seconds"}
    assert second["rank"] is None and second["val_accuracy"] is None
    assert "does not know how undocumented preprocesses images" in second["reason"]


@pytest.mark.slow
def test_rank_command_fetches_and_ranks_the_bundled_model(
    tmp_path, monkeypatch, bundled_onnx: Path
) -> None:
    from zoo import bundled

    built: list[str] = []

    def copy_prebuilt(dest: Path, *, name: str) -> Path:  # the session's export, not a new one
        built.append(name)
        return Path(shutil.copy(bundled_onnx, dest))

    monkeypatch.setattr(bundled, "build_bundled", copy_prebuilt)
    data = colour_folder(tmp_path / "colours")
    models_dir = tmp_path / "models"
    code, out, err = _zoo("--models-dir", str(models_dir), "rank", "lite0", "--data", str(data))
    assert code == 0, err
    assert built == ["efficientnet-lite0"]  # fetched on the way, offline
    assert "efficientnet-lite0" in out and "1280" in out and "224" in out
    assert f"adapt with: zoo adapt efficientnet-lite0 --data {data}" in out
    code, out, err = _zoo("--models-dir", str(models_dir), "rank", "lite0", "--data", str(data), "--json")  # fmt: skip
    (only,) = json.loads(out)["models"]
    assert only["val_accuracy"] == 1.0  # three plain colours: ImageNet features separate them


def test_adapt_with_no_model_in_a_fresh_workspace_takes_the_best_bundled_by_probe(
    tmp_path: Path,
) -> None:
    """Nothing named, nothing fetched: `zoo adapt` ranks the bundled models itself and says so."""
    data = colour_folder(tmp_path / "colours", per_class=6)
    workspace = tmp_path / "empty"
    out = tmp_path / "run"
    args = ["--models-dir", str(workspace), "adapt", "--data", str(data), "--strategy", "feature", "--out", str(out), "--json"]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())  # the console wraps long lines
    line = text[text.index("no model named and none fetched") :].split(" s)")[0]
    bundled = [e.name for e in load_catalog().values() if e.is_bundled]
    chosen = line.split("using ")[1].split(",")[0]
    assert chosen in bundled and all(name in line for name in bundled), line  # with the figures
    assert json.loads(result.output[result.output.rindex("\n{") :])["model"] == chosen
    # A second run in the same workspace takes the latest fetched model, as before.
    again = CliRunner().invoke(main, [*args[:-3], "--out", str(tmp_path / "again")])
    assert again.exit_code == 0 and "no model named" not in again.output, again.output

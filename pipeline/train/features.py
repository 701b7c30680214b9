"""The frozen backbone, run once: onnxruntime on the ONNX graph cut at the feature tensor, cached.

A frozen backbone never needs gradients, and on a CPU onnxruntime runs it several times faster
than PyTorch. With no augmentation its outputs do not change between epochs, so they are computed
once per (model, preprocessing, file list) and kept on disk; training the head then costs milliseconds.
A `FeatureCache` holds what that takes for one run (the graph, the preprocessing, the cache folder
and the model's sha256 that keys it, the log, the workers) and the cut sessions made so far.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import onnx
from onnx.utils import Extractor

from pipeline.core.diskcache import budget_bytes, keep_within_budget, touch
from pipeline.core.distributed import SINGLE, Workers
from pipeline.core.progress import Bar, track
from pipeline.core.sessions import ort_session, run_batches, run_each
from pipeline.data.images import open_for, preprocess_image
from zoo.files import atomic_write

if TYPE_CHECKING:
    from pipeline.core.samples import Sample
    from zoo.catalog import Preprocess

T = TypeVar("T")

DECODE = "draft-2"  # how cached images were decoded: JPEG DCT scaling to the resize size
EVAL_BATCH = 64  # images preprocessed and run together when nothing trains


def any_input_size(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy whose inputs and outputs take any batch and image size (fine-tuning may change the size).

    Shapes recorded for intermediate values are dropped: they were inferred at the original size.
    """
    flexible = onnx.ModelProto()
    flexible.CopyFrom(model)
    del flexible.graph.value_info[:]
    initializers = {t.name for t in flexible.graph.initializer}
    for value in [*flexible.graph.input, *flexible.graph.output]:
        if value.name in initializers or not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        channel_axis = 3 if len(dims) == 4 and dims[3].dim_value in (1, 3) else 1
        for axis, dim in enumerate(dims):
            if axis != channel_axis:
                dim.Clear()
                dim.dim_param = f"d{axis}"
    return flexible


def cut_at(model: onnx.ModelProto, *, input_name: str, output_name: str) -> onnx.ModelProto:
    """The sub-graph from the model input to `output_name` (the feature tensor), any input size."""
    return any_input_size(Extractor(model).extract_model([input_name], [output_name]))


def cache_key(
    *,
    model_sha256: str,
    feature_name: str,
    preprocess: dict[str, Any],
    refs: Sequence[str],
    storage: str = "float32",
) -> str:
    """What the cached features depend on: the model, the cut, the preprocessing and the images.

    An image counts by its path, size and modification time, so a photo replaced under the same
    name is computed again; `DECODE` names how images are decoded (JPEG draft since version 2);
    `storage` the element type on disk.
    """
    fields: dict[str, Any] = {
        "model": model_sha256,
        "cut": feature_name,
        "pre": preprocess,
        "refs": [[ref, *_file_stamp(ref)] for ref in refs],
        "decode": DECODE,
    }
    if storage != "float32":
        fields["storage"] = storage
    payload = json.dumps(fields, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _file_stamp(ref: str) -> tuple[int, int]:
    """(size, mtime in ns) of an image file; (0, 0) for a built-in image or a missing file."""
    try:
        stat = os.stat(ref)
    except (OSError, ValueError):
        return (0, 0)
    return (stat.st_size, stat.st_mtime_ns)


def load_cached(cache_dir: Path, key: str) -> np.ndarray | None:
    path = Path(cache_dir) / f"{key}.npy"
    if not path.exists():
        return None
    try:
        found = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError):
        path.unlink(missing_ok=True)  # a damaged cache entry is recomputed, never trusted
        return None
    touch(path)
    return found


def store_cached(cache_dir: Path, key: str, features: np.ndarray) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as handle:
            np.save(handle, features, allow_pickle=False)

    atomic_write(Path(cache_dir) / f"{key}.npy", write)
    keep_within_budget(cache_dir)


class Rows:
    """A cached [N, ...] array in a .npy file, read a few rows at a time with `os.pread`.

    Nothing is mapped or kept: memory stays flat whatever N is, and the kernel's page cache (not
    this process) holds what is read often. Rows come back as float32 whatever is stored.
    """

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        with open(self.path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            reader = {
                (1, 0): np.lib.format.read_array_header_1_0,
                (2, 0): np.lib.format.read_array_header_2_0,
            }.get(version)
            if reader is None:
                raise ValueError(f"unsupported .npy version {version}")
            shape, fortran_order, dtype = reader(handle)
            self.offset = handle.tell()
        if fortran_order or not shape:
            raise ValueError("not a C-ordered array of rows")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * self.dtype.itemsize
        if self.path.stat().st_size != self.offset + self.row_bytes * self.shape[0]:
            raise ValueError("truncated")
        # Held open: an entry evicted while this run reads it stays readable until it is done.
        self._fd = os.open(self.path, os.O_RDONLY)

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)

    def __len__(self) -> int:
        return self.shape[0]

    def take(self, indices: Sequence[int]) -> np.ndarray:
        """The rows at `indices`, as one float32 array."""
        out = np.empty((len(indices), *self.shape[1:]), dtype=np.float32)
        for slot, index in enumerate(indices):
            raw = os.pread(self._fd, self.row_bytes, self.offset + int(index) * self.row_bytes)
            out[slot] = np.frombuffer(raw, dtype=self.dtype).reshape(self.shape[1:])
        return out


def open_rows(cache_dir: Path, key: str) -> Rows | None:
    """The cached entry `key` read by rows; None (and a damaged entry removed) when absent."""
    path = Path(cache_dir) / f"{key}.npy"
    if not path.exists():
        return None
    try:
        rows = Rows(path)
    except (OSError, ValueError, EOFError):
        path.unlink(missing_ok=True)  # a damaged cache entry is recomputed, never trusted
        return None
    touch(path)
    return rows


def store_rows(
    cache_dir: Path, key: str, batches: Iterable[np.ndarray], *, count: int, dtype: str
) -> Rows:
    """Write `count` rows arriving in batches straight to the cache entry `key`, atomically.

    Only one batch is in memory at a time; the entry appears whole or not at all.
    """

    def write(tmp: str) -> None:
        written = 0
        with open(tmp, "wb") as handle:
            for batch in batches:
                if not written:
                    header = {
                        "descr": np.lib.format.dtype_to_descr(np.dtype(dtype)),
                        "fortran_order": False,
                        "shape": (count, *batch.shape[1:]),
                    }
                    np.lib.format.write_array_header_2_0(handle, header)
                handle.write(np.ascontiguousarray(batch, dtype=dtype).tobytes())
                written += len(batch)
        if written != count:
            raise ValueError(f"{written} rows computed for {count} images")

    path = Path(cache_dir) / f"{key}.npy"
    atomic_write(path, write)
    keep_within_budget(cache_dir)
    return Rows(path)


def default_threads() -> int:
    return max(1, min(os.cpu_count() or 1, 16))


def preprocessed_batch(samples: Sequence[Sample], preprocess: Preprocess) -> np.ndarray:
    """Eval-preprocessed images stacked into one float32 array in the model's layout."""
    arrays = [preprocess_image(open_for(s.ref, preprocess), preprocess) for s in samples]
    return np.stack(arrays).astype(np.float32)


@dataclass(kw_only=True)
class FeatureCache:
    """One run's frozen backbone in onnxruntime: any ONNX value of it for a list of images, cached.

    `sessions` keeps each cut graph's onnxruntime session, made once per run and shared by its
    splits. With no `model_sha256` nothing is read from or written to `cache_dir`.
    """

    imported: Any  # the model as imported: `onnx_model`, and `probe` (input and feature names)
    preprocess: Preprocess  # how images are prepared for it (eval preprocessing)
    cache_dir: Path  # where the outputs are kept, one .npy file per cache key
    model_sha256: str  # the model file's sha256, part of every key; "" keeps nothing on disk
    log: Callable[[str], None]  # the run's log
    dist: Workers = SINGLE  # the workers sharing the computation; rank 0 keeps the cache
    sessions: dict[str, Any] = field(default_factory=dict)  # cut sessions by ONNX value

    @property
    def input_name(self) -> str:
        return self.imported.probe.input_name

    @property
    def feature_name(self) -> str:
        """The ONNX value the head reads: the cut when only the head trains."""
        return self.imported.probe.feature_name

    def session(self, value: str) -> Any:
        """An onnxruntime session over the graph from its input to the ONNX value `value`."""
        if value not in self.sessions:
            model = self.imported.onnx_model
            cut = cut_at(model, input_name=self.input_name, output_name=value)
            self.sessions[value] = ort_session(cut)
        return self.sessions[value]

    def key(self, samples: Sequence[Sample], value: str, *, storage: str = "float32") -> str:
        """The cache key of `value` for `samples`, stored as `storage` (see `cache_key`)."""
        return cache_key(
            model_sha256=self.model_sha256 or "unknown",
            feature_name=value,
            preprocess=self.preprocess.to_dict(),
            refs=[s.ref for s in samples],
            storage=storage,
        )

    def batches(self, samples: Sequence[Sample], bar: Bar) -> Iterator[np.ndarray]:
        """The eval-preprocessed images of `samples`, EVAL_BATCH at a time, counted on `bar`."""
        for start in range(0, len(samples), EVAL_BATCH):
            batch = preprocessed_batch(samples[start : start + EVAL_BATCH], self.preprocess)
            bar.advance(len(batch))
            yield batch

    def features(self, samples: Sequence[Sample], value: str | None = None) -> np.ndarray:
        """The ONNX value `value` (default: the feature tensor) for `samples`, held in memory.

        Under `dist` every rank computes a shard and gets the whole array; rank 0 keeps the cache.
        """
        value = value or self.feature_name
        if not samples:
            return np.empty((0,), dtype=np.float32)
        key = self.key(samples, value)
        keep = bool(self.model_sha256) and self.dist.is_main
        found = self.dist.broadcast_object(load_cached(self.cache_dir, key) if keep else None)
        if found is not None and len(found) == len(samples):
            return found
        compute = functools.partial(self._computed, self.session(value))
        result = self.dist.shard_features(compute, samples)
        if keep:
            store_cached(self.cache_dir, key, result)
        return result

    def _computed(self, session: Any, samples: Sequence[Sample]) -> np.ndarray:
        with track(f"computing features of {len(samples)} images", len(samples)) as bar:
            batches = self.batches(samples, bar)
            return run_batches(session, input_name=self.input_name, batches=batches)

    def rows(self, samples: Sequence[Sample], value: str, *, storage: str) -> Rows | None:
        """The ONNX value `value` for `samples`, cached on disk as `storage` and read by rows.

        Computed batch by batch straight into the cache file. None when the cache's size budget or
        the free disk cannot hold it: the caller then runs the prefix per batch instead.
        """
        key = self.key(samples, value, storage=storage)
        found = open_rows(self.cache_dir, key)
        if found is not None and len(found) == len(samples):
            return found
        session = self.session(value)
        with track(f"caching the frozen part for {len(samples)} images", len(samples)) as bar:
            outputs = run_each(
                session, input_name=self.input_name, batches=self.batches(samples, bar)
            )
            first = next(outputs)
            need = first[0].size * np.dtype(storage).itemsize * len(samples)
            Path(self.cache_dir).mkdir(parents=True, exist_ok=True)
            if need > min(budget_bytes(), shutil.disk_usage(self.cache_dir).free // 2):
                return None
            return store_rows(
                self.cache_dir,
                key,
                itertools.chain([first], outputs),
                count=len(samples),
                dtype=storage,
            )

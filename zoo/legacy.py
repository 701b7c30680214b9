"""Old opsets: files written before opset 7 are upgraded before anything opens them.

onnxruntime only runs opset 7 and above ("Could not find an implementation for Relu(1)"), and
onnx2torch wants opset 9 or later. `onnx.version_converter` upgrades most old files once the idioms
it refuses are handled first:
- value_info entries of undefined element type (0), which the converter and onnxruntime reject;
- BatchNormalization/Dropout in training mode (`is_test=0`), and their unused training outputs
  (Caffe2's Dropout masks): a classifier file is run for inference;
- Add/Mul/... with `broadcast=1, axis=k` (a Caffe2/CNTK per-channel bias): B gets trailing 1s so
  numpy broadcasting gives the same result (the converter's own rewrite ignores `axis`);
- Reshape with a `shape` attribute (opset < 5): shapes downstream are unknown until it becomes a
  Reshape-5, so the converter runs once up to opset 6 and once more from there.
The converter itself drops `consumed_inputs`, `is_test`, `spatial=1` and Gemm's `broadcast`. After
it, a Softmax it wrapped in Flatten/Reshape over trailing 1x1 axes (SqueezeNet's [1, K, 1, 1]) is one
node again, and unnamed nodes are named after their outputs (module names in the importer). The
rewrites live in `zoo.legacy_rewrites`.

The stored file keeps its original bytes (its sha256 still matches the catalog); every reader
upgrades its in-memory copy through `upgrade_opset` or `runnable`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from zoo import legacy_rewrites as rewrites
from zoo.errors import UnupgradableModel

if TYPE_CHECKING:
    import onnx

    from zoo.catalog import Catalog, ModelEntry

ORT_MIN_OPSET = 7  # onnxruntime only guarantees opset 7 and above
TARGET_OPSET = 13  # what onnx2torch recommends: the importer and onnxruntime both see this
_LAST_OLD_OPSET = 6  # one converter pass up to here first, so Reshape-5 gives downstream shapes


@dataclass(frozen=True)
class Upgrade:
    """An upgraded copy of a model and what changed on the way."""

    model: onnx.ModelProto
    from_opset: int
    to_opset: int
    notes: tuple[str, ...]  # the old idioms that were rewritten, one phrase each

    @property
    def upgraded(self) -> bool:
        return self.to_opset != self.from_opset

    def summary(self) -> str:
        """One line, e.g. "upgraded from opset 3 to 13: BatchNormalization consumed_inputs dropped"."""
        head = f"upgraded from opset {self.from_opset} to {self.to_opset}"
        return f"{head}: {'; '.join(self.notes)}" if self.notes else head


def default_opset(model: onnx.ModelProto) -> int:
    """The model's opset of the standard ONNX domain (0 when it declares none)."""
    for entry in model.opset_import:
        if entry.domain in rewrites.ONNX_DOMAINS:
            return entry.version
    return 0


def needs_upgrade(model: onnx.ModelProto) -> bool:
    """True for a model onnxruntime has no kernels for: standard-domain opset 1 to 6."""
    return 0 < default_opset(model) < ORT_MIN_OPSET


def runnable(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself when onnxruntime runs it, else its copy upgraded to TARGET_OPSET."""
    return upgrade_opset(model).model if needs_upgrade(model) else model


def upgrade_opset(model: onnx.ModelProto, *, target: int = TARGET_OPSET) -> Upgrade:
    """A copy of `model` at opset `target`, old idioms rewritten first; UnupgradableModel if it cannot be."""
    import onnx
    from onnx import helper, version_converter

    opset = default_opset(model)
    if opset >= target:
        return Upgrade(model, opset, opset, ())
    work = onnx.ModelProto()
    work.CopyFrom(model)
    _unknown_ops(work, opset)
    notes = rewrites.old_idioms(work)
    notes += rewrites.drop_untyped_value_info(work)
    notes += rewrites.inference_mode(work, opset)
    try:
        if opset < _LAST_OLD_OPSET:
            # Up to opset 6 first: shape inference has nothing to go on past an Add-1 or Reshape-1.
            work = version_converter.convert_version(work, _LAST_OLD_OPSET)
        notes += rewrites.broadcast_axes(work, opset)
        work = version_converter.convert_version(work, target)
    except UnupgradableModel:
        raise
    except Exception as exc:  # the converter raises bare RuntimeErrors from C++ assertions
        raise UnupgradableModel(opset, _converter_reason(exc)) from exc
    rewrites.drop_untyped_value_info(
        work
    )  # the converter leaves untyped entries for nodes it inserts
    notes += rewrites.plain_softmax(work)
    notes += rewrites.name_nodes(work)
    work.ir_version = max(
        work.ir_version, helper.find_min_ir_version_for([helper.make_opsetid("", target)])
    )
    return Upgrade(work, opset, target, tuple(notes))


def _converter_reason(exc: Exception) -> str:
    """The converter's complaint in words, without its C++ file and line."""
    import re

    text = " ".join(str(exc).split())
    missing = re.search(r"No Adapter From Version \$?(\d+) for (\w+)", text)
    if missing:
        return f"onnx's version converter cannot upgrade {missing[2]} past opset {missing[1]}"
    if "failed:" in text:
        text = text.split("failed:", 1)[1].strip() or text
    return text[:200] or type(exc).__name__


def _unknown_ops(model: onnx.ModelProto, opset: int) -> None:
    """Refuse standard-domain ops that no ONNX opset defines (old experimental ops, typos)."""
    from onnx import defs

    for node in model.graph.node:
        if node.domain in rewrites.ONNX_DOMAINS and not defs.has(node.op_type):
            raise UnupgradableModel(
                opset, f"{node.op_type} is not an ONNX operator any more (an experimental op?)"
            )


def newest_sibling(catalog: Catalog, entry: ModelEntry) -> ModelEntry | None:
    """The same model at its newest opset onnxruntime runs: same name stem first, else same family."""
    import re

    def stem(name: str) -> str:
        return re.sub(r"-\d+$", "", name)

    runnable_entries = [
        other
        for other in catalog.values()
        if other.family == entry.family
        and other.name != entry.name
        and (other.opset or 0) >= ORT_MIN_OPSET
    ]
    same_stem = [other for other in runnable_entries if stem(other.name) == stem(entry.name)]
    pool = same_stem or runnable_entries
    return max(pool, key=lambda other: other.opset or 0, default=None)


def refusal(
    exc: UnupgradableModel,
    *,
    name: str,
    entry: ModelEntry | None = None,
    catalog: Catalog | None = None,
) -> UnupgradableModel:
    """The one-line refusal for `name`: its newest-opset catalog sibling, else re-export advice."""
    sibling = newest_sibling(catalog, entry) if entry is not None and catalog is not None else None
    advice = (
        f"fetch {sibling.name} instead"
        if sibling is not None
        else f"re-export it at opset {ORT_MIN_OPSET} or newer"
    )
    return UnupgradableModel(
        exc.opset,
        exc.reason,
        f"{name} (opset {exc.opset}) cannot be upgraded to an opset onnxruntime runs "
        f"({exc.reason}); {advice}",
    )

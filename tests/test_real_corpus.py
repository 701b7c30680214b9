"""Every command over every real file in ../shared/models and both real photo sets (issue 12,
acceptance 7): each ends in success or a one-line refusal, never an internal error or a traceback.

It runs `zoo` as a user does, one process per command (bench/compat.py, which also writes the
README's "Which models work" table). Skipped without ../shared; slow (minutes).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.compat import markdown, real_files, sweep  # noqa: E402

pytestmark = pytest.mark.slow
DATASETS = ("flowers5", "textures10")


def test_every_command_over_every_real_file_and_data_set_ends_cleanly(
    shared_dir: Path, tmp_path: Path
) -> None:
    files = real_files(shared_dir)
    assert files, f"no model files in {shared_dir / 'models'}"
    for name in DATASETS:
        assert (shared_dir / "datasets" / name).is_dir(), name
    rows = sweep(
        shared=shared_dir, work=tmp_path, datasets=DATASETS, train_per_class=3, built=False
    )
    assert [Path(r.path).name for r in rows] == [f.name for f in files]
    crashes = [
        f"{row.name} {step.name} ({' '.join(step.args)}):\n{step.output[-3000:]}"
        for row in rows
        for step in row.crashes()
    ]
    assert not crashes, markdown(rows) + "\n\n" + "\n\n".join(crashes)
    for row in rows:
        fetch = row.step("fetch")
        assert fetch is not None and fetch.exit_code is not None, row.name
        if fetch.ok:  # a fetched file goes on to inspect, and each data set to adapt once inspected
            inspect = row.step("inspect")
            assert inspect is not None and inspect.exit_code is not None
            if inspect.ok:
                assert len([s for s in row.steps if s.name == "adapt"]) == len(DATASETS)

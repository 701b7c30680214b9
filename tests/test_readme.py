"""The README's Python section runs as written: a doctest on the bundled model and built-in digits."""

from __future__ import annotations

import doctest
import re
import shutil
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_section() -> str:
    """The ```python block of the README's "## Python" section."""
    section = README.read_text(encoding="utf-8").split("\n## Python\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the Python section holds one ```python example"
    return blocks[0]


def test_the_example_is_six_lines_of_python() -> None:
    examples = doctest.DocTestParser().get_examples(python_section())
    assert len(examples) == 6 and examples[0].source.strip() == "import zoo"


@pytest.mark.slow
def test_the_readme_python_example_runs(
    bundled_workspace: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    one_torch_thread: None,
) -> None:
    models_dir = tmp_path / "models"
    shutil.copytree(bundled_workspace, models_dir, symlinks=True)
    monkeypatch.setenv("ZOO_MODELS_DIR", str(models_dir))
    test = doctest.DocTestParser().get_doctest(python_section(), {}, "README.md", str(README), 0)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    result = runner.run(test)
    assert result.failed == 0 and result.attempted == 6
    assert (models_dir / "efficientnet-lite0-digits-10c" / "model.onnx").is_file()

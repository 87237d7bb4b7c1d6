"""The README tells the truth: every setting is documented, and its quickstart runs."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from sessionkeeper import Settings

README = Path(__file__).resolve().parent.parent / "README.md"


def test_every_setting_is_in_the_readme() -> None:
    text = README.read_text()
    for name in Settings.model_fields:
        assert f"`SESSIONKEEPER_{name.upper()}`" in text, name


def test_the_python_quickstart_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks
    for block in blocks:
        result = subprocess.run(
            [sys.executable, "-c", block], cwd=tmp_path, capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr

"""The examples run as documented (the quick ones; the GPT-2 one compiles and is slow)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("script", ["custom_manifold.py", "resnet_inspect.py"])
def test_example_runs(script, tmp_path):
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "rewritten" in done.stdout

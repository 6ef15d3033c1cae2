"""ruff over the whole tree, with the settings in pyproject.toml."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.linter
def test_ruff():
    ruff = Path(sys.prefix) / 'bin' / 'ruff'
    exe = str(ruff) if ruff.exists() else shutil.which('ruff')
    if exe is None:
        pytest.skip('ruff is not installed')
    result = subprocess.run([exe, 'check', '--no-cache', '.'], cwd=REPO, capture_output=True,
                            text=True)
    assert result.returncode == 0, result.stdout + result.stderr

"""ament_flake8 over the package (the ROS 2 convention), where its wheel is installed.

It runs in a fresh interpreter: flake8 forks worker processes, and forking this pytest process
(which may hold rclpy and torch threads from other tests) can deadlock the children.
"""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('ament_flake8.main')
REPO = Path(__file__).resolve().parent.parent
PROBE = '''
import sys
from ament_flake8.main import main_with_errors
rc, errors = main_with_errors(argv=sys.argv[1:])
print("\\n".join(errors))
sys.exit(rc)
'''


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    result = subprocess.run(
        [sys.executable, '-c', PROBE, 'usn_perception', 'test', 'launch', 'bench', 'setup.py'],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f'code style errors / warnings:\n{result.stdout[-5000:]}'

"""ament_pep257 docstring checks (the ROS 2 convention), where its wheel is installed.

Two of ament's defaults are deliberately switched off: D213 (we put the summary on the first
line, PEP 257's other allowed form, D212) and D401 (properties and accessors get noun-phrase
summaries, "The shipped default model", which read better than forced imperatives).
"""

import pytest

main = pytest.importorskip('ament_pep257.main').main


@pytest.mark.linter
@pytest.mark.pep257
def test_pep257():
    rc = main(argv=['usn_perception', 'launch', 'setup.py', '--add-ignore', 'D213', 'D401'])
    assert rc == 0, 'Found code style errors / warnings'

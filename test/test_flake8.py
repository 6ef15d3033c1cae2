"""ament_flake8 over the package (the ROS 2 convention), where its wheel is installed."""

import pytest

main_with_errors = pytest.importorskip('ament_flake8.main').main_with_errors


@pytest.mark.flake8
@pytest.mark.linter
def test_flake8():
    rc, errors = main_with_errors(argv=['usn_perception', 'test', 'launch', 'bench', 'setup.py'])
    assert rc == 0, f'Found {len(errors)} code style errors / warnings:\n' + '\n'.join(errors)

"""The package is a real ament_python package: colcon builds and installs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
COPY_IGNORE = shutil.ignore_patterns('.venv', 'build', 'install', 'log', '.git', '__pycache__',
                                     '*.egg-info', 'demo_output', '.pytest_cache')


def test_package_xml_is_valid_for_catkin_pkg():
    catkin_pkg = pytest.importorskip('catkin_pkg.package')
    pkg = catkin_pkg.parse_package(str(REPO / 'package.xml'))
    pkg.validate()
    assert pkg.name == 'usn_perception'
    assert pkg.package_format == 3
    assert ET.parse(REPO / 'package.xml').find('export/build_type').text == 'ament_python'


@pytest.mark.slow
def test_colcon_build_installs_share_and_scripts(tmp_path: Path):
    colcon = Path(sys.prefix) / 'bin' / 'colcon'
    if not colcon.exists():
        pytest.skip('colcon is not installed in this environment')
    src = tmp_path / 'ws' / 'src' / 'usn_perception'
    shutil.copytree(REPO, src, ignore=COPY_IGNORE)
    ws = tmp_path / 'ws'
    env = {'PATH': f'{Path(sys.prefix) / "bin"}:/usr/bin:/bin', 'HOME': str(tmp_path),
           'COLCON_HOME': str(tmp_path / 'colcon_home'), 'PYTHONNOUSERSITE': '1'}

    listed = subprocess.run([str(colcon), 'list', '--base-paths', 'src'], cwd=ws, env=env,
                            capture_output=True, text=True, check=True).stdout
    assert 'usn_perception' in listed and '(ros.ament_python)' in listed, listed

    build = subprocess.run(
        [str(colcon), '--log-base', 'log', 'build', '--base-paths', 'src',
         '--event-handlers', 'console_direct-'],
        cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]

    share = ws / 'install' / 'usn_perception' / 'share' / 'usn_perception'
    for sub in ('package.xml', 'config/fastdds_loopback.xml'):
        assert (share / sub).is_file(), sub
    for sub in ('launch', 'config', 'models'):
        assert (share / sub).is_dir(), sub
    shipped = sorted(p.relative_to(REPO / 'models') for p in (REPO / 'models').rglob('*.pt'))
    for rel in shipped:
        assert (share / 'models' / rel).is_file(), rel
    lib = ws / 'install' / 'usn_perception' / 'lib' / 'usn_perception'
    assert (lib / 'usn-perception').is_file()

    probe = ('from ament_index_python.packages import get_package_share_directory as g; '
             'print(g("usn_perception"))')
    out = subprocess.run(
        ['bash', '-c', f'source install/setup.bash && "{sys.executable}" -c \'{probe}\''],
        cwd=ws, env=env, capture_output=True, text=True, check=True).stdout.strip()
    assert Path(out) == share
    helped = subprocess.run(
        ['bash', '-c', f'source install/setup.bash && "{lib / "usn-perception"}" --help'],
        cwd=ws, env=env, capture_output=True, text=True)
    assert helped.returncode == 0, helped.stderr
    assert 'make-dataset' in helped.stdout

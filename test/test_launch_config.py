"""The launch file and the parameter file agree with the package and the node.

``launch``/``launch_ros`` cannot be installed here, so the launch file is compiled and read
(its executable must be a console script of setup.py, its parameter file must ship), and the
YAML is loaded by the real rcl parser into a real node: every key must be a parameter the
node declares, with the value given. Under real ``launch_ros`` the description is also built.
"""

from __future__ import annotations

import ast
import importlib
import py_compile
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAUNCH = REPO / 'launch' / 'usn_perception.launch.py'
PARAMS = REPO / 'config' / 'usn_perception.yaml'


def _node_call() -> dict[str, ast.expr]:
    """Keyword arguments of the ``Node(...)`` action in the launch file."""
    tree = ast.parse(LAUNCH.read_text())
    for call in ast.walk(tree):
        if isinstance(call, ast.Call) and getattr(call.func, 'id', None) == 'Node':
            return {kw.arg: kw.value for kw in call.keywords}
    raise AssertionError('no Node(...) action in the launch file')


def _console_scripts() -> dict[str, str]:
    text = (REPO / 'setup.py').read_text()
    return dict(re.findall(r"'([\w-]+)\s*=\s*([\w.]+:\w+)'", text))


def _flatten(tree: dict, prefix: str = '') -> dict:
    out = {}
    for key, value in tree.items():
        name = f'{prefix}{key}'
        if isinstance(value, dict):
            out.update(_flatten(value, name + '.'))
        else:
            out[name] = value
    return out


def _yaml_parameters() -> dict:
    yaml = pytest.importorskip('yaml')
    doc = yaml.safe_load(PARAMS.read_text())
    assert list(doc) == ['/**'], 'the params file should match the node under any name'
    return _flatten(doc['/**']['ros__parameters'])


def test_launch_file_compiles():
    py_compile.compile(str(LAUNCH), doraise=True)


def test_launch_executable_is_a_console_script_with_a_main():
    kwargs = _node_call()
    assert ast.literal_eval(kwargs['package']) == 'usn_perception'
    executable = ast.literal_eval(kwargs['executable'])
    scripts = _console_scripts()
    assert executable in scripts, (
        f'setup.py has no console script {executable!r} (has {sorted(scripts)})')
    module, func = scripts[executable].split(':')
    assert callable(getattr(importlib.import_module(module), func))


def test_launch_parameter_file_ships():
    text = LAUNCH.read_text()
    assert "'config', 'usn_perception.yaml'" in text
    assert PARAMS.is_file()
    assert "tree('config', ('*.yaml'" in (REPO / 'setup.py').read_text()
    try:
        from ament_index_python.packages import get_package_share_directory

        share = Path(get_package_share_directory('usn_perception'))
    except Exception:  # noqa: BLE001 - not installed: the source tree check above stands
        return
    if (share / 'config').is_dir():
        assert (share / 'config' / 'usn_perception.yaml').is_file()


@pytest.mark.ros
def test_every_yaml_key_is_a_declared_parameter_and_applies(ros_domain, tmp_path: Path):
    """Load the file through rcl; a changed copy proves nested keys really reach the node."""
    import rclpy
    from rclpy.context import Context

    from usn_perception.ros.node import PARAMETERS, UsnPerceptionNode

    expected = _yaml_parameters()
    unknown = sorted(set(expected) - set(PARAMETERS))
    assert not unknown, f'YAML keys the node does not declare: {unknown}'
    changed = tmp_path / 'changed.yaml'
    text = PARAMS.read_text()
    assert 'margin_alpha: 0.02' in text
    changed.write_text(text.replace('margin_alpha: 0.02', 'margin_alpha: 0.07'))
    ctx = Context()
    rclpy.init(context=ctx)
    try:
        for path, overrides in ((PARAMS, {}), (changed, {'interval.margin_alpha': 0.07})):
            node = UsnPerceptionNode(context=ctx,
                                     cli_args=['--ros-args', '--params-file', str(path)])
            try:
                for name, value in {**expected, **overrides}.items():
                    assert node.has_parameter(name), name
                    assert node.get_parameter(name).value == value, name
            finally:
                node.destroy_node()
    finally:
        rclpy.shutdown(context=ctx)


def test_launch_description_builds_under_launch_ros():
    pytest.importorskip('launch_ros', reason='launch_ros is not installable here')
    spec = importlib.util.spec_from_file_location('usn_launch', LAUNCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    description = module.generate_launch_description()
    assert description.entities

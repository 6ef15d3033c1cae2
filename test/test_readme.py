"""README.md: its copy-paste examples run, and it keeps the sections users look for.

The examples of the "Offline tools" section are run by ``scripts/check_readme_examples.py``
(the convention is in its docstring); the slow test here runs them all in a temporary folder.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / 'README.md'
SCRIPT = REPO / 'scripts' / 'check_readme_examples.py'
#: Offline commands the README must show as runnable examples.
EXAMPLE_COMMANDS = ('make-dataset', 'train', 'evaluate', 'score', 'prune', 'certify',
                    'make-bag', 'eval-bag', 'replay')


def _checker():
    spec = importlib.util.spec_from_file_location('check_readme_examples', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def test_examples_cover_every_offline_command():
    examples = _checker().extract_examples(README.read_text(encoding='utf-8'))
    used = {ex.command.split()[1] for ex in examples if ex.command.startswith('usn-perception ')}
    assert set(EXAMPLE_COMMANDS) <= used, set(EXAMPLE_COMMANDS) - used
    for ex in examples:
        assert not re.match(r'(ros2|colcon|source)\s', ex.command), ex


def test_extraction_convention(tmp_path):
    checker = _checker()
    text = '\n'.join([
        '# t', '## Other', '```bash', 'echo not-this-section', '```', '## Offline tools',
        '```bash', 'source env.sh', '# a comment', 'echo one \\', '    two', 'ros2 launch x y',
        'colcon build', '```', '<!-- readme-check: skip (needs the network) -->', '```bash',
        'echo skipped', '```', '```python', 'print(1)', '```', '```bash', 'echo three', '```',
        '## Next', '```bash', 'echo after', '```'])
    examples = checker.extract_examples(text)
    assert [e.command for e in examples] == ['echo one two', 'echo three']
    assert examples[0].line == 10
    assert checker.run_examples(examples, tmp_path, log=lambda s: None)
    messages = []
    bad = [checker.Example(3, 'echo fine'), checker.Example(7, 'echo oops >&2; exit 4')]
    assert not checker.run_examples(bad, tmp_path, log=messages.append)
    assert 'README.md line 7 (exit status 4' in messages[-1] and 'oops' in messages[-1]


def test_readme_keeps_its_sections():
    text = README.read_text(encoding='utf-8')
    headings = re.findall(r'^## (.+)$', text, re.M)
    for heading in ('The two commands', 'What a certificate means', 'Certified default model',
                    'Offline tools', 'ROS 2 node', 'Building with colcon', 'Benchmarks'):
        assert heading in headings, heading
    assert 'make demo' in text and 'make test' in text
    scripts = re.findall(r'scripts/[\w./-]+\.(?:sh|py)', text)
    assert 'scripts/make_default_model.sh' in scripts
    for path in scripts:  # every script the README names exists
        assert (README.parent / path).is_file(), path


def _readme_default(value: object) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, str):
        return f'`{value}`' if value else '`""`'
    return str(value)


def test_readme_lists_every_node_parameter():
    pytest.importorskip('rclpy')
    from usn_perception.ros.node import PARAMETERS

    text = README.read_text(encoding='utf-8')
    for name, spec in PARAMETERS.items():
        row = re.search(rf'^\| `{re.escape(name)}` \| ([^|]+) \| (configure|runtime) \|',
                        text, re.M)
        assert row, f'README parameter table lacks {name}'
        assert row.group(1).strip() == _readme_default(spec.default), name
        assert (row.group(2) == 'configure') == spec.read_only, name


@pytest.mark.slow
@pytest.mark.ros
def test_readme_examples_run(ros_domain, tmp_path):
    """Every runnable README example, in order, in an empty folder (about 2 minutes)."""
    work = tmp_path / 'work'
    proc = subprocess.run([sys.executable, str(SCRIPT), '--workdir', str(work)],
                          capture_output=True, text=True, timeout=840,
                          env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert (work / 'reports' / 'replay' / 'comparison.json').is_file()

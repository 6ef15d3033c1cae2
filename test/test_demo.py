"""``usn-perception demo`` end to end on a tiny scale, and its refusals of bad input.

The demo replays a bag through a spawned node over DDS, so it runs in a child process (the
pytest process never starts DDS itself; see test_bag_replay.py) in the test's own ROS domain.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from usn_perception.cli import main


def _demo(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, '-m', 'usn_perception.cli', '--quiet', 'demo', '--out', str(out),
         *args], capture_output=True, text=True, timeout=600,
        env={**os.environ, 'OMP_NUM_THREADS': '1'})


@pytest.mark.slow
@pytest.mark.ros
def test_demo_end_to_end_on_a_tiny_scale(ros_domain, tiny_model, tmp_path):
    from usn_perception.detector import load_detector

    out = tmp_path / 'demo'
    tiny = ['--model', str(tiny_model), '--count', '30', '--images', '2',
            '--bag-source', 'synthetic']
    proc = _demo(out, *tiny, '--frames', '6')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f'outputs in {out.resolve()}' in proc.stdout
    assert '| model |' in proc.stdout and '| bag |' in proc.stdout and '6/6 ✔' in proc.stdout

    s = json.loads((out / 'summary.json').read_text())
    assert s['ok'] and s['out'] == str(out.resolve())
    # models: the one asked for, certified on the asked-for images, numbers = certify report
    det = load_detector(tiny_model)
    cert = json.loads((out / 'certify' / 'summary.json').read_text())
    test_set = json.loads((out / 'data' / 'test' / 'annotations.json').read_text())
    assert s['data']['test_images'] == len(test_set['images']) == 3
    assert s['data']['certified_images'] == 2
    [m] = s['models']
    assert m['sha256'] == det.sha256 == cert['models'][0]['model_sha256']
    assert m['certified_images'] == cert['models'][0]['images'] == 2
    assert m['certified_accuracy'] == cert['models'][0]['certified_accuracy']
    assert set(m['clean']['pck']) == set(m['certified_accuracy']) == {'2', '3', '5'}
    assert m['certify_ms_per_image'] > 0
    # bag: written, evaluated and replayed frame for frame, the node identical to offline
    b = s['bag']
    evaluated = json.loads((out / 'bag_eval' / 'summary.json').read_text())
    replayed = json.loads((out / 'bag_replay' / 'summary.json').read_text())
    comparison = json.loads((out / 'bag_replay' / 'comparison.json').read_text())
    assert b['source'] == 'synthetic' and b['frames'] == b['labelled'] == 6
    assert evaluated['frames'] == replayed['frames_sent'] == replayed['outputs_recorded'] == 6
    assert comparison['equal'] and comparison['identical'] == 6
    assert b['replay']['equal'] and b['certified_fraction'] == evaluated['certified_fraction']
    assert 'listening on' in (out / 'bag_replay' / 'node.log').read_text()
    # pictures and reports: every file the report links to exists
    assert len(s['debug_images']) == 4
    assert all((out / p).is_file() for p in s['debug_images'])
    report = (out / 'report.md').read_text()
    links = re.findall(r'\]\(([^)]+)\)', report)
    assert 'debug_frames.png' in links and 'certify/report.md' in links
    assert all((out / link).is_file() for link in links), links

    # a rerun replaces the parts of the earlier run (here: without the replay)
    proc = _demo(out, *tiny, '--frames', '4', '--no-replay')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((out / 'summary.json').read_text())
    assert s['bag']['frames'] == 4 and s['bag']['replay'] is None
    assert not (out / 'bag_replay').exists()
    assert json.loads((out / 'bag_eval' / 'summary.json').read_text())['frames'] == 4


@pytest.mark.parametrize('args,message', [
    (['--images', '0'], '--images must be at least 1'),
    (['--frames', '-3'], '--frames must be at least 1'),
    (['--count', '5'], '--count must be at least 10'),
    (['--model', '{tmp}/missing/model.json'], 'missing/model.json'),
])
def test_bad_options_fail_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / 'out'
    code = main(['--quiet', 'demo', '--out', str(out), '--no-replay',
                 *[a.format(tmp=tmp_path) for a in args]])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_refuses_a_folder_it_did_not_write(tmp_path, capsys, tiny_model):
    (tmp_path / 'keep.txt').write_text('precious')
    code = main(['--quiet', 'demo', '--out', str(tmp_path), '--no-replay', '--model',
                 str(tiny_model)])
    assert code == 1
    assert 'not a demo output folder' in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ['keep.txt']


def test_replay_needs_the_loopback_environment(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('ROS_AUTOMATIC_DISCOVERY_RANGE', raising=False)
    code = main(['--quiet', 'demo', '--out', str(tmp_path / 'out')])
    assert code == 1
    assert 'source env.sh' in capsys.readouterr().err

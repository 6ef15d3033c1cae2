"""`make bench` runs bench/run_all.py: every benchmark it names exists and parses its options."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'bench'))

from run_all import benchmarks, main  # noqa: E402

BENCHES = benchmarks('data.json')


def test_make_bench_target_runs_run_all():
    assert 'bench/run_all.py' in (REPO / 'Makefile').read_text()


@pytest.mark.parametrize('bench', BENCHES, ids=lambda b: b.name)
def test_every_benchmark_script_exists_and_accepts_its_arguments(bench):
    script = REPO / 'bench' / bench.argv[0]
    assert script.is_file()
    out = subprocess.run([sys.executable, str(script), '--help'], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for arg in bench.argv[1:]:
        if arg.startswith('--'):
            assert arg in out.stdout, f'{bench.name}: {arg} is not an option of {script.name}'


def test_run_all_lists_skips_and_refuses(capsys, tmp_path):
    assert main(['--list']) == 0
    assert 'cert-time' in capsys.readouterr().out
    assert main(['--only', 'nope']) == 2
    assert main(['--data', str(tmp_path / 'missing.json')]) == 2
    # Data benchmarks without their data are skipped, not failed.
    assert main(['--only', 'cert-time', '--only', 'bag']) == 0
    assert capsys.readouterr().out.count('skipped') == 2

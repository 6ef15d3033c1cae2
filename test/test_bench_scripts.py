"""`make bench` runs bench/run_all.py: every benchmark it names exists and parses its options."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / 'bench'))

from bench_node import MemorySampler, stage_medians  # noqa: E402
from bench_node import main as bench_node_main  # noqa: E402
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


def test_memory_sampler_samples_on_its_own_thread_until_stopped():
    sampler = MemorySampler(os.getpid(), period=0.01)
    sampler.start()
    time.sleep(0.2)  # the caller's loop runs meanwhile
    curve = sampler.stop()
    assert not sampler.is_alive()
    assert len(curve) >= 3
    times = [t for t, _ in curve]
    assert times == sorted(times) and times[0] < 0.05
    assert all(mem > 10 * 2**20 for _, mem in curve)  # this interpreter's memory, in bytes
    assert len(sampler.curve) == len(curve)  # nothing sampled after stop()


def test_stage_medians_summarise_every_window():
    windows = [{'certify_p95_ms': 30.0, 'infer_p50_ms': 5.0}, {'certify_p95_ms': 50.0},
               {'certify_p95_ms': 40.0, 'infer_p50_ms': 7.0}]
    assert stage_medians(windows) == {'certify_p95_ms': 40.0, 'infer_p50_ms': 6.0}
    assert stage_medians([]) == {}


def test_bench_node_refuses_a_sampling_period_that_would_spin():
    with pytest.raises(SystemExit) as exc:
        bench_node_main(['--mem-every', '0'])
    assert exc.value.code == 2

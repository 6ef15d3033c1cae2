"""Shared test fixtures: the loopback ROS environment, per-test ROS domains, small models.

The ROS environment comes from ``env.sh`` (the one place that defines it): when pytest was
not started through ``make test`` the file is sourced here, so a bare ``pytest`` is just as
safe. Every test that starts rclpy takes the ``ros_domain`` fixture, which gives it a ROS
domain of its own (parallel-safe under xdist) and checks the loopback settings are active.
"""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
ENV_FILE = REPO / 'env.sh'
LOOPBACK_KEYS = ('ROS_AUTOMATIC_DISCOVERY_RANGE', 'FASTDDS_DEFAULT_PROFILES_FILE',
                 'RMW_IMPLEMENTATION', 'ROS_DOMAIN_ID', 'AMENT_PREFIX_PATH')


def ros_environment() -> dict[str, str]:
    """The variables ``env.sh`` sets (sourced in a clean bash, venv taken from sys.prefix)."""
    import sys

    env = {'PATH': os.environ.get('PATH', ''), 'USN_VENV': sys.prefix,
           'HOME': os.environ.get('HOME', '/tmp')}
    out = subprocess.run(['bash', '-c', f'source "{ENV_FILE}" && env -0'], env=env,
                         capture_output=True, check=True).stdout
    pairs = (item.split('=', 1) for item in out.decode().split('\0') if '=' in item)
    return {k: v for k, v in pairs if k in LOOPBACK_KEYS or k == 'ROS_STATIC_PEERS'}


def pytest_configure(config: pytest.Config) -> None:
    """Apply env.sh unless the caller already did, and use one torch thread per process.

    Tests run in parallel (xdist) on a 2-core machine: torch's default of one thread per core
    then oversubscribes the CPU, and its spinning threads made small models ~100x slower.
    Subprocesses (the node, CLI runs) inherit OMP_NUM_THREADS=1. Freed memory stays in the
    process, as the CLI keeps it (``usn_perception.allocator``): the soundness tests run the
    same batched certificates and attacks again and again.
    """
    os.environ['OMP_NUM_THREADS'] = '1'
    import torch

    from usn_perception.allocator import keep_freed_memory

    torch.set_num_threads(1)
    keep_freed_memory()
    wanted = ros_environment()
    for key, value in wanted.items():
        if key == 'ROS_DOMAIN_ID' and os.environ.get(key):
            continue
        if key == 'AMENT_PREFIX_PATH' and value.split(':')[0] in os.environ.get(key, ''):
            continue
        os.environ[key] = value


_domains = itertools.count()


def _worker_index() -> int:
    worker = os.environ.get('PYTEST_XDIST_WORKER', 'gw0')
    return int(worker[2:]) if worker.startswith('gw') and worker[2:].isdigit() else 0


@pytest.fixture
def ros_domain(monkeypatch: pytest.MonkeyPatch) -> int:
    """A ROS domain id unique to this test (and worker); asserts the loopback settings."""
    assert os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') == 'LOCALHOST'
    profile = os.environ.get('FASTDDS_DEFAULT_PROFILES_FILE', '')
    assert profile.endswith('fastdds_loopback.xml') and Path(profile).is_file(), profile
    # Fast DDS accepts domain ids 0..232 over UDP; give each worker its own block of 40.
    domain = 1 + (_worker_index() % 5) * 40 + next(_domains) % 40
    monkeypatch.setenv('ROS_DOMAIN_ID', str(domain))
    return domain


@pytest.fixture(scope='session')
def repo_root() -> Path:
    """The source checkout."""
    return REPO


@pytest.fixture(scope='session')
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random detector on disk (64×48 input, widths 8, 5 keypoints), for fast tests."""
    import torch

    from usn_perception.model_io import save_model
    from usn_perception.network import DetectorConfig, build_network

    torch.manual_seed(0)
    config = DetectorConfig(input_size=(64, 48), widths=(8,) * 9)
    return save_model(build_network(config).eval(), config,
                      tmp_path_factory.mktemp('model') / 'model.json')

"""Worker processes: the same results as one pipeline, failures reported, workers replaced."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from usn_perception.certify import CertStatus
from usn_perception.detector import load_detector
from usn_perception.pipeline import FramePipeline, PipelineSettings
from usn_perception.workers import WorkerError, WorkerPool

SETTINGS = PipelineSettings(max_subboxes=2)  # no time limit: deterministic


def _frames(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(3)
    base = rng.random((48, 64))
    return [(np.clip((1 + 0.05 * np.sin(i)) * base + 0.02 * np.cos(i), 0, 1) * 255)
            .astype(np.uint8) for i in range(n)]


def _outcomes(pool: WorkerPool, n: int, timeout: float = 60.0) -> dict:
    got: dict = {}
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        for outcome in pool.collect(timeout=0.5):
            got[outcome.ticket] = outcome
    assert len(got) == n, f'{len(got)} of {n} outcomes'
    return got


@pytest.fixture
def pool(tiny_model: Path):
    made: list[WorkerPool] = []

    def make(**kwargs) -> WorkerPool:
        p = WorkerPool(str(tiny_model), **{'processes': 2, 'settings': SETTINGS, **kwargs})
        made.append(p)
        p.wait_ready()
        return p

    yield make
    for p in made:
        p.close()


def test_workers_certify_exactly_as_one_pipeline_does(pool, tiny_model: Path):
    workers = pool()
    here = FramePipeline(load_detector(str(tiny_model)), SETTINGS)
    measure = FramePipeline(load_detector(str(tiny_model)), SETTINGS)
    frames = _frames(6)
    expected, tickets = [], {}
    for i, frame in enumerate(frames):
        estimate = measure.measure(frame, i / 30)  # in order, in one place
        expected.append(here.process(frame, i / 30, interval=estimate))
        while not workers.idle():
            for outcome in workers.collect(timeout=0.5):
                tickets[outcome.ticket] = outcome
        tickets.setdefault('sent', []).append(workers.submit(frame, i / 30, estimate))
    sent = tickets.pop('sent')
    tickets.update(_outcomes(workers, len(sent) - len(tickets)))
    for ticket, want in zip(sent, expected, strict=True):
        got = tickets[ticket].result
        assert got is not None, tickets[ticket].error
        np.testing.assert_array_equal(got.keypoints, want.keypoints)
        np.testing.assert_array_equal(got.boxes, want.boxes)
        np.testing.assert_array_equal(got.status, want.status)
        assert got.interval.as_box() == want.interval.as_box()


def test_the_arrival_time_reaches_the_worker(pool):
    # The deadline counts from when the frame arrived at the caller, in another process.
    workers = pool(settings=PipelineSettings(max_subboxes=1, deadline_ms=5e3))
    measure = FramePipeline(load_detector(workers._args[0]), SETTINGS)
    frame = _frames(1)[0]
    estimate = measure.measure(frame, 0.0)
    late = workers.submit(frame, 0.0, estimate, time.monotonic() - 10.0)
    got = _outcomes(workers, 1)[late].result
    assert got.certify_stats.get('stopped') == 'deadline'
    assert (got.status == CertStatus.OUT_OF_BUDGET).all()
    fresh = workers.submit(frame, 0.1, estimate)  # arrived now
    got = _outcomes(workers, 1)[fresh].result
    assert got.certified.any() and 'max_ms' in got.certify_stats['budget']


def test_measure_then_process_is_process(tiny_model: Path):
    one = FramePipeline(load_detector(str(tiny_model)), SETTINGS)
    two = FramePipeline(load_detector(str(tiny_model)), SETTINGS)
    for i, frame in enumerate(_frames(3)):
        a = one.process(frame, i / 30)
        b = two.process(frame, i / 30, interval=two.measure(frame, i / 30))
        np.testing.assert_array_equal(a.boxes, b.boxes)
        assert a.interval.as_box() == b.interval.as_box()


def test_bad_frames_and_dead_workers_are_reported_and_the_pool_goes_on(pool):
    workers = pool()
    measure = FramePipeline(load_detector(workers._args[0]), SETTINGS)
    frame = _frames(1)[0]
    estimate = measure.measure(frame, 0.0)
    bad = np.full((48, 64), np.nan, np.float32)  # never measured: the worker must refuse it
    ticket = workers.submit(bad, 0.1, estimate)
    outcome = _outcomes(workers, 1)[ticket]
    assert outcome.result is None and outcome.bad_image and 'NaN' in outcome.error
    victim = next(w for w in workers._workers if w.state == 'idle')
    ticket = workers.submit(frame, 0.2, estimate)
    os.kill(victim.process.pid, signal.SIGKILL)
    outcome = _outcomes(workers, 1)[ticket]
    if outcome.result is None:  # the killed worker had it
        assert 'died' in outcome.error
    assert any('died' in f for f in workers.failures) and workers.restarts == 1
    workers.wait_ready()  # the replacement
    assert workers.alive() == 2
    ticket = workers.submit(frame, 0.3, estimate)
    assert _outcomes(workers, 1)[ticket].result is not None


def test_a_worker_that_cannot_start_fails_loudly(tmp_path: Path):
    broken = tmp_path / 'model.json'
    broken.write_text('{not json')
    workers = WorkerPool(str(broken), processes=1, settings=SETTINGS)
    try:
        with pytest.raises(WorkerError, match='could not start'):
            workers.wait_ready()
    finally:
        workers.close()


def test_a_worker_killed_while_starting_is_not_restarted(tiny_model: Path):
    workers = WorkerPool(str(tiny_model), processes=1, settings=SETTINGS)
    try:
        os.kill(workers._workers[0].process.pid, signal.SIGKILL)  # long before torch loads
        with pytest.raises(WorkerError, match='could not start'):
            workers.wait_ready()
        assert workers.restarts == 0 and workers.alive() == 0
    finally:
        workers.close()


def test_a_different_model_on_disk_is_refused(pool):
    with pytest.raises(WorkerError, match='could not start'):
        pool(processes=1, sha256='0' * 64)

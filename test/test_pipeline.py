"""The ROS-free per-frame pipeline: results, certification, thresholds, determinism."""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pytest
import torch

from usn_perception.certify import LEAF_WORK, CertStatus
from usn_perception.detector import Detector
from usn_perception.errors import ImageError
from usn_perception.interval import IntervalSettings
from usn_perception.network import DetectorConfig, build_network
from usn_perception.pipeline import (
    LEVEL_BACKOFF,
    LEVEL_DEADLINE_SHARE,
    FramePipeline,
    PipelineSettings,
)

CONFIG = DetectorConfig(input_size=(64, 48), widths=(8,) * 9)
FAST = PipelineSettings(max_subboxes=1)


@pytest.fixture(scope='module')
def detector() -> Detector:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    return Detector(build_network(CONFIG).eval(), CONFIG)


def _frames(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    base = rng.random((48, 64))
    return [(np.clip((1 + 0.05 * np.sin(i)) * base + 0.02 * np.cos(i), 0, 1) * 255)
            .astype(np.uint8) for i in range(n)]


def test_process_returns_keypoints_boxes_and_timings(detector: Detector):
    pipe = FramePipeline(detector, FAST)
    for i, frame in enumerate(_frames(3)):
        result = pipe.process(frame, i / 30)
    k = len(detector.keypoint_names)
    assert result.keypoints.shape == (k, 2) and result.boxes.shape == (k, 4)
    assert result.status.dtype == np.uint8 and result.scores.shape == (k,)
    np.testing.assert_allclose(result.keypoints, detector.predict(frame))
    assert result.interval.frames == 3 and result.interval.contains(1.0, 0.0)
    assert set(result.timings_ms) == {'infer', 'interval', 'certify', 'total'}
    certified = result.certified
    assert certified.any()
    b, p = result.boxes[certified], result.keypoints[certified]
    assert ((b[:, 0] <= p[:, 0]) & (p[:, 0] <= b[:, 1])
            & (b[:, 2] <= p[:, 1]) & (p[:, 1] <= b[:, 3])).all()
    assert result.certify_stats['subboxes'] == 1


def test_certification_off_and_score_threshold_skip(detector: Detector):
    frame = _frames(1)[0]
    off = FramePipeline(detector, PipelineSettings(certify=False)).process(frame, 0.0)
    assert (off.status == CertStatus.SKIPPED).all() and np.isnan(off.boxes).all()
    assert off.certify_stats == {} and off.certified_fraction == 0.0
    pipe = FramePipeline(detector, FAST)
    scores = pipe.process(frame, 0.0).scores
    cut = float(np.median(scores))
    pipe.configure(score_threshold=cut)
    result = pipe.process(frame, 0.1)
    low = result.scores < cut
    assert low.any() and (result.status[low] == CertStatus.SKIPPED).all()
    assert np.isnan(result.boxes[low]).all()
    assert (result.status[~low] != CertStatus.SKIPPED).all()


def test_same_frames_give_the_same_results(detector: Detector):
    def run() -> list[dict]:
        pipe = FramePipeline(detector, FAST)
        return [pipe.process(f, i / 30).to_json(timings=False)
                for i, f in enumerate(_frames(4, seed=3))]

    assert run() == run()


def test_fixed_mode_certifies_over_the_configured_box(detector: Detector):
    settings = PipelineSettings(max_subboxes=1, interval=IntervalSettings(
        mode='fixed', fixed_alpha=(0.95, 1.05), fixed_beta=(-0.01, 0.01)))
    result = FramePipeline(detector, settings).process(_frames(1)[0], 0.0)
    assert result.interval.alpha == pytest.approx((0.95, 1.05))
    assert result.interval.beta == pytest.approx((-0.01, 0.01))


def test_precision_reaches_the_certificate(detector: Detector):
    image = np.random.default_rng(3).random((48, 64))
    for precision in ('float64', 'auto'):
        pipe = FramePipeline(detector, PipelineSettings(max_subboxes=2, precision=precision))
        result = pipe.process(image, 0.0)
        assert result.certify_stats['precision'] == pipe.precision_in_use()
    with pytest.raises(ValueError, match='precision'):
        PipelineSettings(precision='half')


def test_exact_values_reach_the_certificate(detector: Detector):
    """The setting is the engine's: same boxes as certify_keypoints with that value."""
    from usn_perception.certify import Budget, certify_keypoints

    frames = _frames(2)
    for exact in (0, 12):
        pipe = FramePipeline(detector, PipelineSettings(max_subboxes=3, exact_values=exact))
        pipe.process(frames[0], 0.0)
        result = pipe.process(frames[1], 1 / 30)
        assert result.certify_stats['exact_values'] == exact
        ref = certify_keypoints(detector, frames[1], result.interval.as_box(), budget=Budget(3),
                                exact_values=exact)
        np.testing.assert_array_equal(result.boxes, ref.boxes)


def test_time_limit_sizes_the_partition_from_recent_frames(detector: Detector):
    plain = FramePipeline(detector, PipelineSettings(max_subboxes=4))
    plain.ms_per_subbox = 1e6  # ignored without a time limit: replays stay deterministic
    assert plain.subboxes_for_next_frame() == 4
    pipe = FramePipeline(detector, PipelineSettings(max_subboxes=4, budget_ms=1e4))
    assert pipe.subboxes_for_next_frame() == 1  # nothing measured yet: the smallest pass
    result = pipe.process(_frames(1)[0], 0.0)
    assert result.certify_stats['budget']['max_subboxes'] == 1
    assert 0.0 < pipe.ms_per_subbox <= result.timings_ms['certify'] + 1e-6
    assert pipe.subboxes_for_next_frame() == 4  # a 10 s limit affords the whole budget
    for rate, expected in ((3000.0, 3), (2500.0, 4), (2e4, 1)):
        pipe.ms_per_subbox = rate
        assert pipe.subboxes_for_next_frame() == expected
    pipe.ms_per_subbox = 3000.0
    result = pipe.process(_frames(2)[1], 1 / 30)
    assert result.certify_stats['budget']['max_subboxes'] == 3


def test_time_limit_sizes_level_plans_by_their_work(monkeypatch):
    # Where a frame clips on one side only the certificate is bounded at its level nodes,
    # whose cost is per network image and leaf, not per sub-box: the pipeline learns that
    # cost apart and gives the clip segments leaves of their own when the time allows.
    from test_free import homogeneous_shallow
    from test_levels import one_sided

    det = homogeneous_shallow(0, 'local-centroid')
    frame = one_sided(0, 'dark')
    fixed = IntervalSettings(mode='fixed', fixed_alpha=(0.95, 1.05), fixed_beta=(-0.03, 0.03))
    pipe = FramePipeline(det, PipelineSettings(max_subboxes=1, budget_ms=1e4, interval=fixed))
    assert pipe.level_work_for_next_frame(None) is None  # nothing measured yet
    first = pipe.process(frame, 0.0).certify_stats
    g = first['level_nodes']
    assert g > 0 and first['rows'] == 1 and first['budget']['level_work'] is None
    assert pipe.ms_per_level_work == pytest.approx(first['ms'] / first['level_work'])
    assert pipe.ms_per_subbox is None  # a level certificate says nothing of a sub-box's cost
    pipe.ms_per_level_work = 10.0
    assert pipe.level_work_for_next_frame(None) == 1000  # 1e4 ms at 10 ms a unit
    # what the frame has left, if less, with a share kept for the cost's noise
    assert pipe.level_work_for_next_frame(45.0) == int(LEVEL_DEADLINE_SHARE * 45.0 / 10.0)
    # one network image per node, two leaves, in the share of the 1e4-ms budget
    pipe.ms_per_level_work = LEVEL_DEADLINE_SHARE * 1e4 / (g + 2 * LEAF_WORK + 0.5)
    two = pipe.process(frame, 1 / 30).certify_stats
    assert two['budget']['level_work'] == g + 2 * LEAF_WORK and two['rows'] == 2
    assert two['level_work'] == g + 2 * LEAF_WORK
    # A plan the deadline cut was too big: the cost per unit backs off (a cut certificate
    # is not learned from, so without it every frame would be planned the same and cut).
    import usn_perception.pipeline as pipeline_module

    real = pipeline_module.certify_keypoints

    def slow_machine(*args, budget, **kwargs):  # the real engine, with almost no time left
        return real(*args, budget=replace(budget, max_ms=1e-6), **kwargs)

    monkeypatch.setattr(pipeline_module, 'certify_keypoints', slow_machine)
    pipe.configure(deadline_ms=1e3)
    pipe.ms_per_level_work = 10.0
    cut = pipe.process(frame, 2 / 30)
    monkeypatch.undo()
    assert cut.certify_stats['stopped'] == 'time'
    assert (cut.status == CertStatus.OUT_OF_BUDGET).all()
    assert pipe.ms_per_level_work == pytest.approx(10.0 * LEVEL_BACKOFF)
    replay = FramePipeline(det, PipelineSettings(max_subboxes=1, interval=fixed))
    replay.ms_per_level_work = 1e-3  # ignored without a time limit: replays stay deterministic
    assert replay.level_work_for_next_frame(None) is None
    assert replay.process(frame, 0.0).certify_stats['rows'] == 1


def test_time_limit_also_fits_the_camera_frame_period(detector: Detector):
    pipe = FramePipeline(detector, PipelineSettings(max_subboxes=4, budget_ms=1e4))
    frames = _frames(3)
    pipe.process(frames[0], 10.0)
    assert pipe.frame_period_ms is None and pipe.other_ms > 0.0  # one stamp: no period yet
    pipe.process(frames[1], 10.0 + 1 / 30)
    assert pipe.frame_period_ms == pytest.approx(1000 / 30)
    pipe.process(frames[2], 15.0)  # a pause is not a frame period
    assert pipe.frame_period_ms == pytest.approx(1000 / 30)
    pipe.ms_per_subbox, pipe.other_ms = 10.0, 5.0
    assert pipe.subboxes_for_next_frame() == 2  # (33.3 - 5) / 10 ms, not 1e4 / 10
    pipe.frame_period_ms = 1000.0
    assert pipe.subboxes_for_next_frame() == 4
    pipe.frame_period_ms = 3.0  # the period leaves nothing: still the smallest pass
    assert pipe.subboxes_for_next_frame() == 1
    pipe.reset()
    assert pipe.frame_period_ms is None
    plain = FramePipeline(detector, PipelineSettings(max_subboxes=4))  # replays: no clock
    plain.frame_period_ms, plain.other_ms, plain.ms_per_subbox = 33.0, 30.0, 1e3
    assert plain.subboxes_for_next_frame() == 4


def test_reported_arrivals_give_the_camera_period_not_the_processing_one(detector: Detector):
    # A node that keeps only the newest frame processes every other one of a 30 Hz stream
    # when a frame takes two periods: the period must stay the camera's 33 ms, or the next
    # frames would be planned to fill 67 ms and fall further behind.
    pipe = FramePipeline(detector, PipelineSettings(max_subboxes=4, budget_ms=1e4))
    frames = _frames(4)
    for i in range(8):
        pipe.note_arrival(20.0 + i / 30)
        if i % 2:
            pipe.process(frames[i // 2], 20.0 + i / 30)
    assert pipe.frame_period_ms == pytest.approx(1000 / 30)
    pipe.note_arrival(20.0 + 3 / 30)  # an older stamp (a replay restarting): not a period
    pipe.note_arrival(20.0 + 4 / 30)
    assert pipe.frame_period_ms == pytest.approx(1000 / 30)
    alone = FramePipeline(detector, PipelineSettings(max_subboxes=4, budget_ms=1e4))
    for i in (1, 3, 5):  # no reports: what it processes is all it knows
        alone.process(frames[0], 20.0 + i / 30)
    assert alone.frame_period_ms == pytest.approx(2000 / 30)


def test_deadline_counts_from_arrival_and_gives_up_only_when_time_is_out(detector: Detector):
    frames = _frames(3)
    pipe = FramePipeline(detector, PipelineSettings(max_subboxes=1, deadline_ms=1e4))
    free = FramePipeline(detector, FAST)
    on_time = pipe.process(frames[0], 0.0)  # arrived now: plenty of time
    ref = free.process(frames[0], 0.0)
    np.testing.assert_array_equal(on_time.boxes, ref.boxes)
    np.testing.assert_array_equal(on_time.status, ref.status)
    assert on_time.certified.any() and on_time.certify_stats['budget']['max_ms'] <= 1e4
    learned = pipe.ms_per_subbox
    # Arrived 11 s ago: past the deadline, nothing is certified and the keypoints still come.
    late = pipe.process(frames[1], 1 / 30, arrived=time.monotonic() - 11.0)
    assert (late.status == CertStatus.OUT_OF_BUDGET).all() and np.isnan(late.boxes).all()
    assert late.certify_stats == {'stopped': 'deadline', 'ms': 0.0}
    np.testing.assert_allclose(late.keypoints, detector.predict(frames[1]))
    assert pipe.ms_per_subbox == learned  # nothing ran: nothing learned
    # Less left than the recent certificates took: started all the same (skipping on the
    # learned cost would never learn again), and a certificate that finishes is learned.
    pipe.ms_per_subbox = 5e3
    tight = pipe.process(frames[2], 2 / 30, arrived=time.monotonic() - 6.0)
    assert tight.certified.any() and pipe.ms_per_subbox < 5e3
    # Enough left: the certificate gets what is left, capped by budget_ms.
    pipe.configure(budget_ms=50.0)
    pipe.ms_per_subbox = 1.0
    capped = pipe.process(frames[2], 3 / 30, arrived=time.monotonic() - 1.0)
    assert capped.certify_stats['budget']['max_ms'] == 50.0
    pipe.configure(budget_ms=None)
    left = pipe.process(frames[2], 4 / 30, arrived=time.monotonic() - 9.0)
    assert 0.0 < left.certify_stats['budget']['max_ms'] < 1e3


def test_bad_frames_raise_and_leave_the_window_alone(detector: Detector):
    pipe = FramePipeline(detector, FAST)
    pipe.process(_frames(1)[0], 0.0)
    bad = np.full((48, 64), np.nan, np.float32)
    with pytest.raises(ImageError):
        pipe.process(bad, 0.1)
    assert len(pipe.interval) == 1


@pytest.mark.parametrize('kwargs, word', [
    ({'readout': 'median'}, 'readout'),
    ({'method': 'magic'}, 'method'),
    ({'budget_ms': -1.0}, 'budget_ms'),
    ({'deadline_ms': 0.0}, 'deadline_ms'),
    ({'deadline_ms': float('inf')}, 'deadline_ms'),
    ({'max_subboxes': 0}, 'max_subboxes'),
    ({'max_width_px': 0.0}, 'max_width_px'),
    ({'score_threshold': 1.5}, 'score_threshold'),
    ({'exact_values': -1}, 'exact_values'),
    ({'level_nodes': -1}, 'level_nodes'),
])
def test_invalid_settings_are_refused(kwargs: dict, word: str):
    with pytest.raises(ValueError, match=word):
        PipelineSettings(**kwargs)


def test_describe_states_names_hash_and_pixel_convention(detector: Detector):
    doc = FramePipeline(detector).describe()
    assert doc['keypoint_names'] == list(detector.keypoint_names)
    assert 'top-left pixel is (0, 0)' in doc['pixel_convention']
    assert doc['status_codes'] == {'NOT_CERTIFIED': 0, 'CERTIFIED': 1, 'OUT_OF_BUDGET': 2,
                                   'SKIPPED': 3}
    assert doc['certify']['precision'] == 'auto'
    assert doc['certify']['precision_in_use'] == 'float32'  # the x86-64 CPU default


def test_pipeline_does_not_import_rclpy():
    """Walk the package imports of pipeline/interval (static, no subprocess): no ROS."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    todo, seen = ['usn_perception.pipeline', 'usn_perception.interval'], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = root / (name.replace('.', '/') + '.py')
        if not path.is_file():
            path = root / name.replace('.', '/') / '__init__.py'
        if not path.is_file():
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ''] if isinstance(node, ast.ImportFrom) else [])
            for mod in names:
                assert not mod.startswith(('rclpy', 'usn_perception.ros')), (name, mod)
                if mod.startswith('usn_perception'):
                    todo.append(mod)
    assert 'usn_perception.certify' in seen

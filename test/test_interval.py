"""The online θ-interval estimator on synthetic sequences with a known θ(t)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from usn_perception.errors import ImageError
from usn_perception.interval import (
    IntervalEstimator,
    IntervalSettings,
    frame_quantiles,
    relative_change,
)

RATE = 30.0


def _scene(seed: int = 0, shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A textured base image with intensities spread over [0.05, 0.95]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    smooth = 0.5 + 0.3 * np.sin(xx / 9.0) * np.cos(yy / 13.0)
    return np.clip(smooth + 0.15 * rng.standard_normal(shape), 0.05, 0.95)


def _theta(t: float) -> tuple[float, float]:
    """Absolute lighting at time t: contrast swings ±25 %, brightness ±0.08."""
    return 1.0 + 0.25 * math.sin(2 * math.pi * t / 3.0), 0.08 * math.sin(2 * math.pi * t / 2.2 + 1)


def _frame(base: np.ndarray, t: float, rng: np.random.Generator, noise: float) -> np.ndarray:
    alpha, beta = _theta(t)
    x = np.clip(alpha * base + beta + noise * rng.standard_normal(base.shape), 0, 1)
    return (x * 255 + 0.5).astype(np.uint8)


def _true_relative(t_recent: float, t_current: float) -> tuple[float, float]:
    """θ with x_recent = α·x_current + β, from the absolute θ of both frames."""
    a_r, b_r = _theta(t_recent)
    a_c, b_c = _theta(t_current)
    alpha = a_r / a_c
    return alpha, b_r - alpha * b_c


@pytest.mark.parametrize('noise', [0.0, 0.004])
def test_measured_box_contains_true_change_over_the_window(noise: float):
    base = _scene()
    rng = np.random.default_rng(1)
    settings = IntervalSettings(window_s=0.5, margin_alpha=0.02, margin_beta=0.02)
    est = IntervalEstimator(settings)
    times = np.arange(90) / RATE
    worst = 0.0
    for n, t in enumerate(times):
        box = est.update(_frame(base, t, rng, noise), t)
        assert box.reliable and box.contains(1.0, 0.0)
        window = [s for s in times[:n + 1] if t - s <= settings.window_s]
        assert box.frames == len(window)
        for s in window:
            a, b = _true_relative(s, t)
            assert box.contains(a, b), (t, s, (a, b), box)
        # Tight: no wider than the true change plus the margins and a little estimation error.
        true = np.array([_true_relative(s, t) for s in window])
        worst = max(worst, (box.alpha[1] - box.alpha[0]) - (np.ptp(true[:, 0]) + 0.04),
                    (box.beta[1] - box.beta[0]) - (np.ptp(true[:, 1]) + 0.04))
    assert worst < 0.02


def test_relative_change_is_exact_for_unsaturated_quantiles():
    base = _scene(3)
    q_cur = frame_quantiles(base)
    q_rec = frame_quantiles(np.clip(1.3 * base - 0.2, 0, 1))  # saturates both ends
    alpha, beta, residual = relative_change(q_rec, q_cur)
    assert alpha == pytest.approx(1.3, abs=1e-9) and beta == pytest.approx(-0.2, abs=1e-9)
    assert residual < 1e-9


def test_fixed_mode_returns_the_configured_box():
    est = IntervalEstimator(IntervalSettings(mode='fixed', fixed_alpha=(0.9, 1.1),
                                             fixed_beta=(-0.05, 0.05)))
    box = est.update(_scene(), 0.0)
    assert box.mode == 'fixed'
    assert box.alpha[0] <= 0.9 and box.alpha[1] >= 1.1
    assert box.alpha == pytest.approx((0.9, 1.1)) and box.beta == pytest.approx((-0.05, 0.05))
    assert all(float(np.float32(v)) == v for v in (*box.alpha, *box.beta))


def test_unmeasurable_frames_fall_back_to_the_fixed_box():
    settings = IntervalSettings(fixed_alpha=(0.5, 1.5), fixed_beta=(-0.2, 0.2))
    est = IntervalEstimator(settings)
    est.update(_scene(), 0.0)
    box = est.update(np.full((40, 40), 0.5), 0.03)  # flat: no contrast to measure
    assert not box.reliable
    assert box.alpha[0] <= 0.5 and box.alpha[1] >= 1.5
    assert box.beta[0] <= -0.2 and box.beta[1] >= 0.2


def test_static_scene_gives_identity_plus_margin_and_window_trims():
    est = IntervalEstimator(IntervalSettings(window_s=0.1, margin_alpha=0.01, margin_beta=0.03))
    base = (_scene() * 255).astype(np.uint8)
    for n in range(10):
        box = est.update(base, n / RATE)
    assert box.frames == 4  # stamps 0.2, 0.233, 0.267, 0.3: within 0.1 s of the last
    assert box.alpha == pytest.approx((0.99, 1.01), abs=1e-6)
    assert box.beta == pytest.approx((-0.03, 0.03), abs=1e-6)
    est.update(base, 0.0)  # time went backwards: the window restarts
    assert len(est) == 1


def test_estimates_are_deterministic():
    base = _scene(5)

    def run() -> list:
        rng = np.random.default_rng(7)
        est = IntervalEstimator()
        return [est.update(_frame(base, n / RATE, rng, 0.01), n / RATE).to_json()
                for n in range(20)]

    assert run() == run()


@pytest.mark.parametrize('kwargs, word', [
    ({'mode': 'adaptive'}, 'mode'),
    ({'fixed_alpha': (1.2, 0.8)}, 'exceeds'),
    ({'fixed_alpha': (0.0, 1.2)}, 'positive'),
    ({'fixed_alpha': (1.1, 1.2)}, 'identity'),
    ({'fixed_beta': (float('nan'), 0.1)}, 'finite'),
    ({'margin_alpha': -0.1}, 'margin_alpha'),
    ({'window_s': -1.0}, 'window_s'),
    ({'max_frames': 0}, 'max_frames'),
    ({'max_residual': -0.01}, 'max_residual'),
    ({'max_residual': float('inf')}, 'max_residual'),
])
def test_invalid_settings_are_refused_with_a_reason(kwargs: dict, word: str):
    with pytest.raises(ValueError, match=word):
        IntervalSettings(**kwargs)


def _other_scene(shape: tuple[int, int] = (120, 160)) -> np.ndarray:
    """A scene whose histogram is no affine map of :func:`_scene`'s: bimodal, a dark target."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    board = ((xx // 20 + yy // 20) % 2).astype(np.float64)
    return np.clip(0.15 + 0.65 * board + 0.03 * np.sin(xx / 5.0), 0.05, 0.95)


def test_scene_cut_frames_are_left_out_not_taken_for_lighting():
    """After a cut, Θ covers the new scene's lighting change, not the histogram jump."""
    rng = np.random.default_rng(2)
    scenes = [_scene(), _other_scene()]
    cut = 20
    times = np.arange(cut + 6) / RATE  # the window (0.5 s) still holds 10 frames of the old one
    boxes = {}
    for limit in (0.02, 0.0):
        est = IntervalEstimator(IntervalSettings(window_s=0.5, max_residual=limit))
        for n, t in enumerate(times):
            box = est.update(_frame(scenes[int(n >= cut)], t, rng, 0.004), t)
            if n < cut:
                assert box.excluded == 0  # lighting alone never looks like another scene
        boxes[limit] = box
    on, off = boxes[0.02], boxes[0.0]
    t_now = times[-1]
    after = [s for s in times[cut:] if t_now - s <= 0.5]
    assert on.frames == off.frames == 16 and len(after) == 6
    assert on.excluded == 10 and off.excluded == 0 and on.reliable and off.reliable
    for s in after:  # the new scene's own lighting change is still covered
        assert on.contains(*_true_relative(s, t_now))
    width = (on.alpha[1] - on.alpha[0], on.beta[1] - on.beta[0])
    assert width[0] < 0.2 and width[1] < 0.1
    # Off: the pre-cut frame's fit against a different histogram inflates Θ.
    off_width = (off.alpha[1] - off.alpha[0], off.beta[1] - off.beta[0])
    assert off_width[0] > width[0] + 0.1 or off_width[1] > width[1] + 0.1
    assert on.to_json()['excluded'] == 10


def test_bad_frames_raise_image_errors():
    with pytest.raises(ImageError):
        frame_quantiles(np.full((10, 10), np.nan))
    with pytest.raises(ImageError):
        frame_quantiles(np.zeros(5))

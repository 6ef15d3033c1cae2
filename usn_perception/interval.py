"""Online measurement of the brightness/contrast change a camera is seeing.

The certificate speaks about ``x'(θ) = clip(α·x + β, 0, 1)`` applied to the *current* frame.
To choose Θ online, every recent frame r is expressed relative to the current frame c as
``x_r ≈ α·x_c + β``, and Θ is the bounding box of those (α, β) plus a margin. The current
frame contributes θ = (1, 0), so Θ always holds the identity.

How (α, β) is measured: both frames are summarised by intensity quantiles (of a strided
subsample of the gray frame, a few thousand pixels). If ``r = clip(α·c + β)`` pixel-wise with
α > 0, the map is monotone, so every quantile obeys ``q_r(p) = clip(α·q_c(p) + β)``: the
unsaturated quantile pairs lie exactly on one line, whatever the scene. The line is fitted
robustly (Theil–Sen: the median of pairwise slopes, then the median intercept), which keeps
noise and small content changes from dominating. A frame that cannot be related (flat, fully
saturated, negative slope) makes the estimate *unreliable*, and the box then also covers the
configured fixed box, so a failed measurement never shrinks Θ. A frame that *can* be related
but only with a large quantile misfit (more than ``max_residual``) shows another scene — a cut,
a pan — rather than other lighting: its (α, β) would be an artefact of matching two different
intensity histograms (measured on three synthetic scenes: misfit ~0.002 within a scene under
lighting change, 0.03–0.22 across scenes), so it is left out of Θ and counted.

Nothing here depends on timing: the same frames with the same stamps give the same boxes.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from usn_perception.preprocess import image_to_float, to_gray

MODES = ('measured', 'fixed')
#: Quantile levels summarising a frame (the tails are dropped: they saturate first).
LEVELS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95)
#: A quantile at or beyond this distance from 0 or 1 counts as saturated (half a uint8 step).
SATURATION = 0.5 / 255.0
#: Two quantiles of the current frame closer than this give no usable slope.
MIN_SPREAD = 0.05
#: Smallest α a box may hold (α must stay positive for a PhotometricBox).
MIN_ALPHA = 1e-3


def _pair(value: object, name: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in value)  # type: ignore[union-attr]
    except (TypeError, ValueError) as exc:
        raise ValueError(f'{name} must be a (lo, hi) pair of numbers, got {value!r}') from exc
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError(f'{name} must be finite, got ({lo}, {hi})')
    if lo > hi:
        raise ValueError(f'{name}: lower bound {lo} exceeds upper bound {hi}')
    return lo, hi


@dataclass(frozen=True)
class IntervalSettings:
    """How Θ is chosen per frame; validated on construction (a bad value names itself).

    ``mode``: ``measured`` (sliding-window estimate) or ``fixed`` (``fixed_alpha`` ×
    ``fixed_beta``, which must hold (1, 0); also the fallback when a measurement is
    unreliable). ``margin_alpha`` and
    ``margin_beta`` widen the measured box on each side. ``window_s`` is the look-back in
    stamp seconds, ``max_frames`` caps the frames kept. ``max_residual`` (intensity units;
    0 = off): a window frame whose quantiles misfit the current frame's by more than this shows
    another scene (a cut, a pan), not other lighting, and is left out of Θ.
    """

    mode: str = 'measured'
    fixed_alpha: tuple[float, float] = (0.8, 1.2)
    fixed_beta: tuple[float, float] = (-0.1, 0.1)
    margin_alpha: float = 0.02
    margin_beta: float = 0.02
    window_s: float = 1.0
    max_frames: int = 120
    max_residual: float = 0.02

    def __post_init__(self) -> None:
        """Normalise and refuse settings that cannot describe a box."""
        if self.mode not in MODES:
            raise ValueError(f'interval mode must be one of {MODES}, got {self.mode!r}')
        alpha = _pair(self.fixed_alpha, 'fixed_alpha')
        if not alpha[0] > 0:
            raise ValueError(f'fixed_alpha must be positive (contrast gain), got {alpha}')
        beta = _pair(self.fixed_beta, 'fixed_beta')
        if not (alpha[0] <= 1.0 <= alpha[1] and beta[0] <= 0.0 <= beta[1]):
            raise ValueError(f'the fixed box alpha {alpha} x beta {beta} must hold the '
                             'identity (1, 0): the nominal prediction is certified with it')
        object.__setattr__(self, 'fixed_alpha', alpha)
        object.__setattr__(self, 'fixed_beta', beta)
        for name in ('margin_alpha', 'margin_beta'):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and 0.0 <= value <= 1.0):
                raise ValueError(f'{name} must lie in [0, 1], got {value}')
            object.__setattr__(self, name, value)
        window = float(self.window_s)
        if not (math.isfinite(window) and 0.0 <= window <= 3600.0):
            raise ValueError(f'window_s must lie in [0, 3600], got {window}')
        object.__setattr__(self, 'window_s', window)
        if int(self.max_frames) != self.max_frames or not 1 <= self.max_frames <= 10_000:
            raise ValueError(f'max_frames must be an integer in [1, 10000], got {self.max_frames}')
        object.__setattr__(self, 'max_frames', int(self.max_frames))
        limit = float(self.max_residual)
        if not (math.isfinite(limit) and 0.0 <= limit <= 1.0):
            raise ValueError(f'max_residual must lie in [0, 1] (0 = off), got {limit}')
        object.__setattr__(self, 'max_residual', limit)


@dataclass(frozen=True)
class IntervalEstimate:
    """Θ for one frame, and what it was made from.

    ``alpha``/``beta``: the box (float32-representable ends, rounded outward, so a float32
    message carries it exactly). ``changes``: (N, 2) measured (α, β) of each related frame of
    the window relative to the current one (the current frame's (1, 0) included).
    ``residual``: the largest quantile misfit of those fits. ``excluded``: window frames left
    out because their misfit exceeded ``max_residual`` (another scene). ``reliable``: every
    frame of the window could be related.
    """

    alpha: tuple[float, float]
    beta: tuple[float, float]
    mode: str
    frames: int
    changes: np.ndarray = field(repr=False)
    residual: float
    reliable: bool
    excluded: int = 0

    def contains(self, alpha: float, beta: float) -> bool:
        """Whether θ = (alpha, beta) lies in the closed box."""
        return self.alpha[0] <= alpha <= self.alpha[1] and self.beta[0] <= beta <= self.beta[1]

    def as_box(self):
        """The box as a :class:`usn_perception.bounds.box.PhotometricBox`."""
        from usn_perception.bounds.box import PhotometricBox

        return PhotometricBox(self.alpha, self.beta)

    def to_json(self) -> dict:
        """JSON form for reports and the node's info/diagnostics."""
        return {'alpha': list(self.alpha), 'beta': list(self.beta), 'mode': self.mode,
                'frames': self.frames, 'residual': self.residual, 'reliable': self.reliable,
                'excluded': self.excluded}


def frame_quantiles(image: np.ndarray, max_samples: int = 8192) -> np.ndarray:
    """Intensity quantiles (at :data:`LEVELS`) of a frame's gray values in [0, 1].

    The frame is subsampled with one integer stride on both axes (deterministic, no
    interpolation) to at most about ``max_samples`` pixels before the gray conversion, which
    keeps this well under a millisecond for VGA frames. Raises ``ImageError`` on bad frames.
    """
    arr = np.asarray(image)
    if arr.ndim < 2:
        from usn_perception.errors import ImageError

        raise ImageError(f'image must be HxW or HxWxC, got shape {arr.shape}')
    h, w = arr.shape[:2]
    stride = max(1, int(math.ceil(math.sqrt(h * w / max(1, max_samples)))))
    small = arr[::stride, ::stride]
    if small.shape[0] < 2 or small.shape[1] < 2:
        small = arr
    gray = to_gray(image_to_float(np.ascontiguousarray(small)))
    return np.quantile(gray.ravel(), LEVELS)


def relative_change(recent: np.ndarray, current: np.ndarray) -> tuple[float, float, float] | None:
    """(α, β, residual) with ``recent ≈ α·current + β`` from two quantile vectors, or None.

    Only pairs where neither quantile is saturated are used; the slope is the median of the
    pairwise slopes over current-frame quantiles at least :data:`MIN_SPREAD` apart
    (Theil–Sen), the intercept the median of ``recent − α·current``. None when no usable
    slope exists or the slope is not positive.
    """
    fits = relative_changes(np.asarray(recent, dtype=np.float64)[None], current)
    if not np.isfinite(fits[0, 0]):
        return None
    return float(fits[0, 0]), float(fits[0, 1]), float(fits[0, 2])


def _unsaturated(q: np.ndarray) -> np.ndarray:
    return (q > SATURATION) & (q < 1.0 - SATURATION)


def _row_nanmedian(a: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (rows hold at least one number); numpy's is slow."""
    srt = np.sort(a, axis=1)  # NaN sorts last
    n = np.isfinite(a).sum(axis=1)
    rows = np.arange(a.shape[0])
    return 0.5 * (srt[rows, (n - 1) // 2] + srt[rows, n // 2])


def relative_changes(recent: np.ndarray, current: np.ndarray) -> np.ndarray:
    """Vectorised :func:`relative_change`: (N, L) quantiles → (N, 3) rows (α, β, residual).

    Rows that cannot be related are NaN.
    """
    r = np.asarray(recent, dtype=np.float64)
    c = np.asarray(current, dtype=np.float64)
    out = np.full((r.shape[0], 3), np.nan)
    ok = _unsaturated(r) & _unsaturated(c)[None]
    i, j = np.triu_indices(c.size, 1)
    dc = c[j] - c[i]
    valid = ok[:, i] & ok[:, j] & (dc >= MIN_SPREAD)[None]
    rows = valid.any(axis=1)
    if not rows.any():
        return out
    slopes = np.where(valid[rows], (r[rows][:, j] - r[rows][:, i]) / np.where(dc > 0, dc, 1.0),
                      np.nan)
    alpha = _row_nanmedian(slopes)
    resid = np.where(ok[rows], r[rows] - alpha[:, None] * c[None], np.nan)
    beta = _row_nanmedian(resid)
    misfit = np.nanmax(np.abs(resid - beta[:, None]), axis=1)
    good = np.isfinite(alpha) & (alpha > 0)
    out[np.flatnonzero(rows)[good]] = np.stack([alpha, beta, misfit], axis=1)[good]
    return out


def _outward32(lo: float, hi: float) -> tuple[float, float]:
    """Round an interval outward to float32-representable ends (kept as Python floats)."""
    lo32, hi32 = np.float32(lo), np.float32(hi)
    if float(lo32) > lo:
        lo32 = np.nextafter(lo32, np.float32(-np.inf))
    if float(hi32) < hi:
        hi32 = np.nextafter(hi32, np.float32(np.inf))
    return float(lo32), float(hi32)


class IntervalEstimator:
    """Sliding window of frame statistics → per-frame Θ (see the module docstring)."""

    def __init__(self, settings: IntervalSettings | None = None) -> None:
        """Start with an empty window."""
        self.settings = settings or IntervalSettings()
        self._window: deque[tuple[float, np.ndarray]] = deque()

    def configure(self, settings: IntervalSettings) -> None:
        """Swap settings; the window is kept (trimmed on the next frame)."""
        self.settings = settings

    def reset(self) -> None:
        """Forget every frame (e.g. after a jump back in time)."""
        self._window.clear()

    def __len__(self) -> int:
        """Frames currently in the window."""
        return len(self._window)

    def update(self, image: np.ndarray, stamp: float) -> IntervalEstimate:
        """Add ``image`` (taken at ``stamp`` seconds) and return Θ relative to it."""
        return self.update_quantiles(frame_quantiles(image), stamp)

    def update_quantiles(self, quantiles: np.ndarray, stamp: float) -> IntervalEstimate:
        """As :meth:`update`, for precomputed :func:`frame_quantiles`."""
        s = self.settings
        stamp = float(stamp)
        if self._window and stamp < self._window[-1][0]:
            self.reset()  # time went backwards (bag loop, sim restart): old frames are stale
        self._window.append((stamp, np.asarray(quantiles, dtype=np.float64)))
        while len(self._window) > s.max_frames or (stamp - self._window[0][0]) > s.window_s:
            self._window.popleft()

        # Every frame against the current one; the current frame's own row is (1, 0) when it
        # is measurable at all (a flat or saturated frame relates to nothing).
        fits = relative_changes(np.stack([q for _, q in self._window]), self._window[-1][1])
        related = np.isfinite(fits[:, 0])
        reliable = bool(related.all())
        other_scene = related & (s.max_residual > 0) & (fits[:, 2] > s.max_residual)
        used = related & ~other_scene
        pts = np.vstack([[1.0, 0.0], fits[:-1][used[:-1], :2]])
        residual = float(fits[used, 2].max()) if used.any() else 0.0

        if s.mode == 'fixed':
            alpha, beta = s.fixed_alpha, s.fixed_beta
        else:
            alpha = (float(pts[:, 0].min()) - s.margin_alpha,
                     float(pts[:, 0].max()) + s.margin_alpha)
            beta = (float(pts[:, 1].min()) - s.margin_beta,
                    float(pts[:, 1].max()) + s.margin_beta)
            if not reliable:
                alpha = (min(alpha[0], s.fixed_alpha[0]), max(alpha[1], s.fixed_alpha[1]))
                beta = (min(beta[0], s.fixed_beta[0]), max(beta[1], s.fixed_beta[1]))
            alpha = (max(alpha[0], MIN_ALPHA), alpha[1])
        return IntervalEstimate(_outward32(*alpha), _outward32(*beta), s.mode, len(self._window),
                                pts, residual, reliable, int(other_scene.sum()))

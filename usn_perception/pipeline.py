"""The per-frame core shared by the node, the bag evaluator and the CLI (no ROS in here).

One :class:`FramePipeline` turns a decoded frame and its stamp into one :class:`FrameResult`:
predict the keypoints, measure the brightness/contrast box Θ the camera is seeing
(:mod:`usn_perception.interval`), certify every keypoint over Θ within a budget, all in
input-image pixels (centre of the top-left pixel = (0, 0)), with per-stage timings.

Given the same frames and stamps the results are the same, timings aside, as long as the
certification has no wall-clock part (``budget_ms`` and ``deadline_ms`` None): a time limit
makes the refinement depth, and a deadline whether a frame is certified at all, depend on the
machine's speed, which is fine online and wrong for replays.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from usn_perception.allocator import keep_freed_memory
from usn_perception.bounds.rounding import PRECISIONS, resolve_precision
from usn_perception.certify import (
    EXACT_VALUES,
    LEVEL_NODES,
    METHODS,
    Budget,
    CertStatus,
    certify_keypoints,
    levels_possible,
)
from usn_perception.interval import IntervalEstimate, IntervalEstimator, IntervalSettings
from usn_perception.network import READOUTS
from usn_perception.preprocess import check_image

PIXEL_CONVENTION = ('image pixels; the centre of the top-left pixel is (0, 0), x right, '
                    'y down')
SCHEMA = 'usn_perception.keypoints/1'
#: Factor on the learned cost of a unit of level work after a level plan sized by it was cut
#: by the deadline (the certificates that finish pull it back).
LEVEL_BACKOFF = 1.25
#: Share of the hard limit of a frame's certificate (``budget_ms``, or what the frame has
#: left before its deadline) that its level plan is sized to when that limit binds: a
#: certificate's cost varies by ~20 % from frame to frame here, and one cut at the limit is
#: lost whole (a 10,000-frame node run planning to all of it: 95.4 % certified).
LEVEL_DEADLINE_SHARE = 0.85


@dataclass(frozen=True)
class PipelineSettings:
    """What the pipeline does per frame; validated on construction.

    ``certify``: run certification at all (else every status is SKIPPED). ``method``,
    ``max_subboxes``, ``budget_ms`` (wall-clock limit, None = none; with a limit the number of
    sub-boxes per frame follows the time the previous frames took, see
    :meth:`FramePipeline.subboxes_for_next_frame`), ``deadline_ms`` (None = none: the
    certificate must be done this long after the frame *arrived*, so a frame that waited or
    predicted slowly gets what is left, at most ``budget_ms``; one with nothing left, or
    whose certificate does not finish in what is left, is not certified, status
    OUT_OF_BUDGET: online, a late certificate is worth less than a timely keypoint),
    ``max_width_px``
    (wider boxes are NOT_CERTIFIED, None = no limit), ``exact_values``, ``level_nodes`` and
    ``precision`` go to
    :func:`~usn_perception.certify.certify_keypoints`. Keypoints scoring below
    ``score_threshold`` are not certified (SKIPPED, NaN box); when none is left, the
    certification is skipped. ``readout`` None uses the model's.
    """

    readout: str | None = None
    certify: bool = True
    method: str = 'forward'
    max_subboxes: int = 5
    budget_ms: float | None = None
    deadline_ms: float | None = None
    max_width_px: float | None = None
    exact_values: int = EXACT_VALUES
    level_nodes: int = LEVEL_NODES
    precision: str = 'auto'
    score_threshold: float = 0.0
    interval: IntervalSettings = field(default_factory=IntervalSettings)

    def __post_init__(self) -> None:
        """Refuse settings that make no sense, naming the setting."""
        if self.readout is not None and self.readout not in READOUTS:
            raise ValueError(f'readout must be one of {READOUTS}, got {self.readout!r}')
        if self.method not in METHODS:
            raise ValueError(f'method must be one of {METHODS}, got {self.method!r}')
        if self.budget_ms is not None and not (math.isfinite(self.budget_ms)
                                               and self.budget_ms > 0):
            raise ValueError(f'budget_ms must be positive or None, got {self.budget_ms}')
        if self.deadline_ms is not None and not (math.isfinite(self.deadline_ms)
                                                 and self.deadline_ms > 0):
            raise ValueError(f'deadline_ms must be positive or None, got {self.deadline_ms}')
        if self.max_width_px is not None and not (math.isfinite(self.max_width_px)
                                                  and self.max_width_px > 0):
            raise ValueError(f'max_width_px must be positive or None, got {self.max_width_px}')
        if not (isinstance(self.exact_values, int) and self.exact_values >= 0):
            raise ValueError(f'exact_values must be a non-negative integer, '
                             f'got {self.exact_values!r}')
        if not (isinstance(self.level_nodes, int) and self.level_nodes >= 0):
            raise ValueError(f'level_nodes must be a non-negative integer, '
                             f'got {self.level_nodes!r}')
        if self.precision not in PRECISIONS:
            raise ValueError(f'precision must be one of {PRECISIONS}, got {self.precision!r}')
        if not 0.0 <= float(self.score_threshold) <= 1.0:
            raise ValueError(f'score_threshold must lie in [0, 1], got {self.score_threshold}')
        if not isinstance(self.interval, IntervalSettings):
            raise ValueError('interval must be IntervalSettings')
        Budget(max_subboxes=self.max_subboxes, max_ms=self.budget_ms)  # validates both


@dataclass(frozen=True)
class FrameResult:
    """Everything the pipeline knows about one frame.

    ``keypoints`` (K, 2) nominal, ``scores`` (K,), ``boxes`` (K, 4) float64
    [u_lo, u_hi, v_lo, v_hi] (NaN where there is none), ``status`` (K,) uint8
    :class:`~usn_perception.certify.CertStatus` values, ``interval`` the Θ certified over,
    ``timings_ms`` per stage (infer, interval, certify, total).
    """

    stamp: float
    image_shape: tuple[int, ...]
    keypoints: np.ndarray
    scores: np.ndarray
    boxes: np.ndarray
    status: np.ndarray
    interval: IntervalEstimate
    timings_ms: dict[str, float]
    certify_stats: dict = field(default_factory=dict)

    @property
    def certified(self) -> np.ndarray:
        """(K,) bool: certified keypoints."""
        return self.status == int(CertStatus.CERTIFIED)

    @property
    def certified_fraction(self) -> float:
        """Fraction of the K keypoints that carry a certified box."""
        return float(self.certified.mean()) if self.status.size else 0.0

    def to_json(self, *, timings: bool = True) -> dict:
        """JSON form (NaN → null); ``timings=False`` gives a deterministic record."""
        def num(v: float) -> float | None:
            return float(v) if np.isfinite(v) else None

        doc = {
            'stamp': self.stamp,
            'image_shape': list(self.image_shape),
            'keypoints': [[num(v) for v in row] for row in self.keypoints],
            'scores': [num(v) for v in self.scores],
            'boxes': [[num(v) for v in row] for row in self.boxes],
            'status': [CertStatus(int(s)).name for s in self.status],
            'interval': self.interval.to_json(),
        }
        if timings:
            doc['timings_ms'] = dict(self.timings_ms)
        return doc


class FramePipeline:
    """Frame + stamp → :class:`FrameResult`; keeps the interval window between frames."""

    def __init__(self, detector, settings: PipelineSettings | None = None) -> None:
        """Wrap a loaded :class:`~usn_perception.detector.Detector`."""
        # Certificates allocate the same tensors frame after frame (per-leaf heatmap forms):
        # keep freed blocks instead of faulting them in again (measured ~9 ms a node frame).
        keep_freed_memory()
        self.detector = detector
        self._settings = settings or PipelineSettings()
        self.interval = IntervalEstimator(self._settings.interval)
        #: Smoothed certification milliseconds per sub-box of the recent frames (None: none
        #: measured yet); drives the sub-box count under a time limit.
        self.ms_per_subbox: float | None = None
        #: Smoothed certification milliseconds per unit of level work (``Budget.level_work``:
        #: a network image at a level node or radius row, or a leaf's readout bound) of the
        #: recent certificates bounded at level nodes (None: none yet); sizes the next level
        #: plan under a time limit, so that the clip segments get leaves of their own when
        #: the frame's time allows (on a node frame a leaf costs ~2 ms, its row and readout
        #: bound, against ~17 ms for a propagated sub-box).
        self.ms_per_level_work: float | None = None
        #: Smoothed stamp interval between frames (ms) and the frame's milliseconds outside
        #: certification (None: not measured yet): under a time limit the certificate is also
        #: sized to what the camera's frame period leaves.
        self.frame_period_ms: float | None = None
        self.other_ms: float | None = None
        self._last_stamp: float | None = None
        # True once a caller reports every arriving frame (note_arrival): the period is then
        # learned from the stream, not from the frames this pipeline got to process.
        self._arrivals_noted = False

    @property
    def settings(self) -> PipelineSettings:
        """The settings used for the next frame."""
        return self._settings

    def configure(self, settings: PipelineSettings | None = None, **changes) -> PipelineSettings:
        """Swap settings (whole, or ``changes`` to the current ones); validated first."""
        new = replace(settings or self._settings, **changes)
        self._settings = new
        self.interval.configure(new.interval)
        return new

    def reset(self) -> None:
        """Forget the interval window and the frame period (a new sequence starts)."""
        self.interval.reset()
        self.frame_period_ms = None
        self._last_stamp = None

    def subboxes_for_next_frame(self) -> int:
        """How many θ sub-boxes the next frame's certificate gets.

        Without a time limit, ``max_subboxes`` (deterministic). With one, the most that fit
        at the recent cost per sub-box (overhead included, so it errs low), between 1 and
        ``max_subboxes``: the first pass bounds every leaf of the partition at once and is
        lost whole when it misses the deadline, so it must be sized to fit. What must fit is
        ``budget_ms`` and, once the stamps show the camera's frame period, that period less
        the frame's other stages: more sub-boxes than the period leaves would make every
        frame wait for the one before (``budget_ms`` stays the hard cap of one frame).
        """
        s = self._settings
        if s.budget_ms is None:
            return s.max_subboxes
        if self.ms_per_subbox is None:
            return 1
        return int(max(1, min(s.max_subboxes, math.floor(self._plan_ms() / self.ms_per_subbox))))

    def level_work_for_next_frame(self, limit_ms: float | None) -> int | None:
        """``Budget.level_work`` for the next certificate, if it is bounded at level nodes.

        None (the plan takes ``max_subboxes`` leaves) without a time limit, or before a
        level certificate was measured; else the most units that fit what
        :meth:`subboxes_for_next_frame` plans for, or :data:`LEVEL_DEADLINE_SHARE` of
        ``limit_ms`` (what the frame has left) when that is less, at the recent cost per unit
        (overhead included, so it errs low on larger plans).
        """
        if self._settings.budget_ms is None or self.ms_per_level_work is None:
            return None
        plan_ms = self._plan_ms()
        if limit_ms is not None:
            plan_ms = min(plan_ms, LEVEL_DEADLINE_SHARE * limit_ms)
        return int(max(1, math.floor(plan_ms / self.ms_per_level_work)))

    def _plan_ms(self) -> float:
        """Milliseconds a certificate plans for under a time limit.

        ``budget_ms``, or less once the stamps show the camera's frame period (less the
        frame's other stages).
        """
        plan_ms = self._settings.budget_ms
        if self.frame_period_ms is not None and self.other_ms is not None:
            plan_ms = min(plan_ms, self.frame_period_ms - self.other_ms)
        return plan_ms

    def _learn_cost(self, subboxes: int, stats: dict) -> None:
        """Fold one certificate's cost into what it teaches (exponential averages).

        :attr:`ms_per_level_work` when it was bounded at level nodes, else
        :attr:`ms_per_subbox`.
        """
        work = stats.get('level_work', 0)
        if work:
            self.ms_per_level_work = _smooth(self.ms_per_level_work, stats['ms'] / work)
        else:
            self.ms_per_subbox = _smooth(self.ms_per_subbox, stats['ms'] / max(1, subboxes))

    def note_arrival(self, stamp: float) -> None:
        """A frame of the stream arrived (processed later, or dropped for a newer one).

        A caller that drops frames (the node keeps only the newest) reports every arrival
        here, so that the frame period is the camera's: learned from the processed frames
        alone it would be the processing interval, and a frame that overran would make the
        next ones plan even more work. Without such reports :meth:`process` learns the period
        from its own frames, as a replay that processes every frame should.
        """
        self._arrivals_noted = True
        self._learn_period(stamp)

    def _learn_period(self, stamp: float) -> None:
        """Fold one stamp interval into :attr:`frame_period_ms`.

        Intervals that are not positive or longer than a second (a replay restarting, a
        paused stream) are not a frame period and are left out.
        """
        last, self._last_stamp = self._last_stamp, float(stamp)
        if last is not None and 0.0 < stamp - last <= 1.0:
            self.frame_period_ms = _smooth(self.frame_period_ms, (stamp - last) * 1e3)

    def precision_in_use(self) -> str:
        """'float32' or 'float64': what ``precision`` means on the detector's device.

        Raises ValueError (with the reason) when 'float32' is asked for where it is not sound.
        """
        return resolve_precision(self._settings.precision, self.detector.device)

    @property
    def keypoint_names(self) -> tuple[str, ...]:
        """Names of the K keypoints, in output order."""
        return tuple(self.detector.keypoint_names)

    def describe(self) -> dict:
        """Static facts consumers need to read the outputs (the node's info topic)."""
        s = self._settings
        return {
            'schema': SCHEMA,
            'keypoint_names': list(self.keypoint_names),
            'model_sha256': self.detector.sha256,
            'model_source': self.detector.source,
            'input_size': list(self.detector.config.input_size),
            'readout': s.readout or self.detector.readout,
            'pixel_convention': PIXEL_CONVENTION,
            'status_codes': {c.name: int(c) for c in CertStatus},
            'certify': {'enabled': s.certify, 'method': s.method,
                        'max_subboxes': s.max_subboxes, 'budget_ms': s.budget_ms,
                        'deadline_ms': s.deadline_ms,
                        'max_width_px': s.max_width_px, 'exact_values': s.exact_values,
                        'level_nodes': s.level_nodes,
                        'score_threshold': s.score_threshold, 'precision': s.precision,
                        'precision_in_use': self.precision_in_use()},
            'interval': {'mode': s.interval.mode, 'fixed_alpha': list(s.interval.fixed_alpha),
                         'fixed_beta': list(s.interval.fixed_beta),
                         'margin_alpha': s.interval.margin_alpha,
                         'margin_beta': s.interval.margin_beta,
                         'window_s': s.interval.window_s,
                         'max_residual': s.interval.max_residual},
            'perturbation': "x' = clip(alpha * x + beta, 0, 1), x in [0, 1]",
        }

    def measure(self, image: np.ndarray, stamp: float) -> IntervalEstimate:
        """Validate ``image`` and fold it into the interval window: Θ relative to it.

        :meth:`process` does this itself; a caller that runs frames in several processes
        measures them here, in order, and hands each its Θ (``process(..., interval=...)``).
        Raises :class:`~usn_perception.errors.ImageError` on a bad frame (the window is
        left alone).
        """
        check_image(image)
        return self.interval.update(image, stamp)

    def _certify_ms(self, arrived: float) -> float | None:
        """Milliseconds the certificate may take now (None: no limit; 0: do not start).

        ``budget_ms`` caps it; ``deadline_ms`` after ``arrived`` ends it. A certificate starts
        whenever any time is left, even less than the recent ones took: skipping on the
        learned cost would lock certification out for good once a few slow frames raised it
        above what a frame has left, since a skipped frame teaches nothing.
        """
        s = self._settings
        if s.deadline_ms is None:
            return s.budget_ms
        left = s.deadline_ms - (time.monotonic() - arrived) * 1e3
        if left <= 0.0:
            return 0.0
        return left if s.budget_ms is None else min(s.budget_ms, left)

    @torch.inference_mode()  # every tensor of a frame is made and dropped here
    def process(self, image: np.ndarray, stamp: float, *,
                interval: IntervalEstimate | None = None,
                arrived: float | None = None) -> FrameResult:
        """Run one frame (HxW or HxWx3 RGB; uint8, uint16 or float in [0, 1]).

        ``interval``: Θ already measured for this frame (:meth:`measure`, possibly by
        another pipeline); None measures it here. ``arrived``: ``time.monotonic()`` when the
        frame arrived, which ``deadline_ms`` counts from (None: now). Raises
        :class:`~usn_perception.errors.ImageError` on a bad frame (nothing is kept from it),
        and whatever the certifier raises on an internal failure.
        """
        s = self._settings
        arrived = time.monotonic() if arrived is None else float(arrived)
        t0 = time.perf_counter()
        n = self.subboxes_for_next_frame()
        # validates the whole frame; the trace lets the level nodes skip one network run
        pred = self.detector.run(image, readout=s.readout, trace=s.certify and levels_possible(
            Budget(max_subboxes=n), s.level_nodes))
        t1 = time.perf_counter()
        estimate = self.interval.update(image, stamp) if interval is None else interval
        t2 = time.perf_counter()
        k = pred.keypoints.shape[0]
        boxes = np.full((k, 4), np.nan)
        status = np.full(k, int(CertStatus.SKIPPED), dtype=np.uint8)
        stats: dict = {}
        wanted = pred.scores >= s.score_threshold
        limit_ms = self._certify_ms(arrived) if s.certify and wanted.any() else None
        if limit_ms == 0.0:  # past the deadline: not started
            status[wanted] = int(CertStatus.OUT_OF_BUDGET)
            stats = {'stopped': 'deadline', 'ms': 0.0}
        elif s.certify and wanted.any():
            budget = Budget(max_subboxes=n, max_ms=limit_ms,
                            level_work=self.level_work_for_next_frame(limit_ms))
            cert = certify_keypoints(self.detector, image, estimate.as_box(), readout=s.readout,
                                     method=s.method, budget=budget,
                                     max_width_px=s.max_width_px,
                                     exact_values=s.exact_values, level_nodes=s.level_nodes,
                                     nominal=pred.keypoints,
                                     nominal_heatmaps=pred.heatmaps,
                                     nominal_trace=pred.trace, precision=s.precision)
            cut_by_deadline = cert.stats.get('stopped') == 'time' and limit_ms != s.budget_ms
            if not cut_by_deadline:  # a certificate cut short says nothing of what one costs
                self._learn_cost(n, cert.stats)
            elif cert.stats.get('level_work') and budget.level_work is not None and (
                    self.ms_per_level_work is not None):
                # ... except that a level plan sized by work was too big: back off, or every
                # frame would be planned from the same too-low cost and cut again.
                self.ms_per_level_work *= LEVEL_BACKOFF
            boxes[wanted] = cert.boxes[wanted]
            status[wanted] = cert.status[wanted]
            stats = cert.stats
        t3 = time.perf_counter()
        self.other_ms = _smooth(self.other_ms, (t2 - t0) * 1e3)
        if not self._arrivals_noted:
            self._learn_period(stamp)
        timings = {'infer': (t1 - t0) * 1e3, 'interval': (t2 - t1) * 1e3,
                   'certify': (t3 - t2) * 1e3, 'total': (t3 - t0) * 1e3}
        return FrameResult(float(stamp), tuple(np.shape(image)), pred.keypoints,
                           pred.scores.astype(np.float64), boxes, status, estimate, timings,
                           stats)


def _smooth(old: float | None, sample: float) -> float:
    """Exponential average of per-frame measurements (the first sample starts it)."""
    return sample if old is None else 0.7 * old + 0.3 * sample

"""``usn_perception_node``: keypoints plus certified bounds for the measured θ box, online.

A lifecycle node that autostarts (parameter ``autostart``), so ``usn_perception_node`` works
without a lifecycle manager. ``on_configure`` loads the model and builds the
:class:`~usn_perception.pipeline.FramePipeline` (and, with ``workers`` > 1, starts that many
worker processes, :mod:`usn_perception.workers`); ``on_activate`` subscribes. The image
callback only stores the newest message (an overwritten one counts as dropped); a thread
decodes it and runs the pipeline (or measures its Θ and hands it to an idle worker, a second
thread publishing the results in arrival order), so the executor never blocks on inference.
A bad message (encoding, size, NaN, undecodable) or a failing frame is warned about
(throttled), counted in ``/diagnostics`` and skipped: the node never dies on a message.

Topics (relative, so a namespace per camera works): in ``image`` (``sensor_msgs/Image``) or
``image/compressed``; out ``~/keypoints`` (PointCloud2, see :mod:`.pointcloud`),
``~/photometric_interval`` (PolygonStamped, see :mod:`.photometric`), ``~/keypoints/info``
(latched JSON), ``~/debug_image`` (only drawn while subscribed) and ``/diagnostics``.
See docs/node.md for parameters and QoS.
"""

from __future__ import annotations

import copy
import json
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from geometry_msgs.msg import PolygonStamped
from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import (
    DurabilityPolicy,
    HistoryPolicy,
    QoSProfile,
    ReliabilityPolicy,
)
from rclpy.qos_overriding_options import QoSOverridingOptions
from sensor_msgs.msg import CompressedImage, Image, PointCloud2
from std_msgs.msg import String

from usn_perception.bounds.rounding import PRECISIONS, resolve_precision
from usn_perception.certify import EXACT_VALUES, LEVEL_NODES, METHODS, CertStatus
from usn_perception.errors import ImageError
from usn_perception.interval import MODES, IntervalSettings
from usn_perception.network import READOUTS
from usn_perception.pipeline import FramePipeline, FrameResult, PipelineSettings
from usn_perception.ros.conversions import compressed_to_numpy, image_to_numpy, numpy_to_image
from usn_perception.ros.diagnostics import NodeStats
from usn_perception.ros.photometric import interval_to_polygon
from usn_perception.ros.pointcloud import KEYPOINT_DTYPE, pack_keypoints
from usn_perception.workers import Outcome, WorkerPool

NODE_NAME = 'usn_perception'
TRANSPORTS = ('raw', 'compressed')
#: Input: SensorData-like (best effort keeps up with any publisher), newest frame only.
INPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                       reliability=ReliabilityPolicy.BEST_EFFORT,
                       durability=DurabilityPolicy.VOLATILE)
#: Outputs: system default, reliable, as REP-2003 asks of publishers.
OUTPUT_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                        reliability=ReliabilityPolicy.RELIABLE)
#: Latched info: late subscribers get the last message.
LATCHED_QOS = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=1,
                         reliability=ReliabilityPolicy.RELIABLE,
                         durability=DurabilityPolicy.TRANSIENT_LOCAL)
WARN_EVERY_S = 2.0


@dataclass(frozen=True)
class Param:
    """One declared parameter: default, description, constraints."""

    default: Any
    description: str
    read_only: bool = False
    range: tuple[float, float] | None = None
    choices: tuple[str, ...] | None = None


PARAMETERS: dict[str, Param] = {
    'model_path': Param('', 'model .json or directory; empty = the shipped default '
                            '(share/usn_perception/models/default)', read_only=True),
    'device': Param('auto', 'auto | cpu | cuda[:N]; asking for cuda without CUDA fails '
                            'configure', read_only=True),
    'input_transport': Param('raw', "'raw': sensor_msgs/Image on `image`; 'compressed': "
                                    'sensor_msgs/CompressedImage on `image/compressed`',
                             read_only=True, choices=TRANSPORTS),
    'num_threads': Param(1, 'torch CPU threads (0 = torch default); 1 avoids thread '
                            'contention on shared CPUs', read_only=True, range=(0, 256)),
    'workers': Param(2, 'frames certified at once, each in its own process with its own copy '
                        'of the model (1 = one at a time, in this process)', read_only=True,
                     range=(1, 16)),
    'autostart': Param(True, 'configure and activate at start (no lifecycle manager needed)',
                       read_only=True),
    'diagnostics_period_s': Param(1.0, 'period of /diagnostics', read_only=True,
                                  range=(0.1, 60.0)),
    'enabled': Param(True, 'process frames; false = count and ignore them'),
    'readout': Param('', "keypoint readout: '' (the model's), " + ', '.join(READOUTS),
                     choices=('', *READOUTS)),
    'score_threshold': Param(0.0, 'keypoints scoring below this are not certified '
                                  '(status SKIPPED, NaN box)', range=(0.0, 1.0)),
    'publish_debug_image': Param(True, 'draw ~/debug_image (only while it has subscribers)'),
    'interval.mode': Param('measured', 'measured: θ box from the recent frames; fixed: '
                                       'interval.fixed_alpha x interval.fixed_beta',
                           choices=MODES),
    'interval.fixed_alpha': Param([0.8, 1.2], 'fixed contrast range [lo, hi] (holds 1); also '
                                              'the fallback when a measurement fails'),
    'interval.fixed_beta': Param([-0.1, 0.1], 'fixed brightness range [lo, hi] (holds 0)'),
    'interval.margin_alpha': Param(0.02, 'added on both sides of the measured α range',
                                   range=(0.0, 1.0)),
    'interval.margin_beta': Param(0.02, 'added on both sides of the measured β range',
                                  range=(0.0, 1.0)),
    'interval.window_s': Param(1.0, 'look-back of the measured interval (stamp seconds)',
                               range=(0.0, 60.0)),
    'interval.max_residual': Param(0.02, 'window frames whose intensity quantiles misfit the '
                                         'current frame by more than this show another scene '
                                         'and are left out of the box; 0 = off',
                                   range=(0.0, 1.0)),
    'certify.enabled': Param(True, 'certify keypoints (false: status SKIPPED)'),
    'certify.method': Param('forward', 'bound method: ' + ', '.join(METHODS), choices=METHODS),
    'certify.max_subboxes': Param(5, 'most θ sub-boxes propagated per frame (fewer under '
                                     'budget_ms when recent frames show they would not fit; '
                                     'the part of the box where no pixel clips is extra; '
                                     'leaves, where the frame is bounded at its clip levels)',
                                  range=(1, 4096)),
    'certify.budget_ms': Param(40.0, 'wall-clock limit of certification per frame; 0 = none '
                                     '(deterministic)', range=(0.0, 10000.0)),
    'certify.deadline_ms': Param(38.0, 'a frame\'s certificate must be done this long after the '
                                       'frame arrived: it gets what is left, at most '
                                       'budget_ms, and a frame with nothing left or whose '
                                       'certificate does not finish in it is published '
                                       'OUT_OF_BUDGET; 0 = none', range=(0.0, 10000.0)),
    'certify.max_width_px': Param(20.0, 'boxes wider than this (image pixels, either axis) '
                                        'are NOT_CERTIFIED; 0 = no limit',
                                  range=(0.0, 1e6)),
    'certify.exact_values': Param(EXACT_VALUES, 'clipped pixel values per sub-box bounded '
                                                'exactly through the first layer; 0 = relax '
                                                'each pixel (cheaper, looser)', range=(0, 256)),
    'certify.level_nodes': Param(LEVEL_NODES, 'most network runs at the clip levels of a frame '
                                              'where only dark or only bright pixels clip '
                                              '(then bounded at every level: exact input); '
                                              '0 = off', range=(0, 4096)),
    'certify.precision': Param('auto', 'auto: the θ-dependent part of the bounds in float32 '
                                       'with every rounding error bounded, where that is sound '
                                       '(x86-64 CPU); float64: float64 throughout; float32: '
                                       'refused where not sound', choices=PRECISIONS),
}


def _descriptor(name: str, spec: Param) -> ParameterDescriptor:
    text = spec.description
    if spec.choices:
        text += f' (one of: {", ".join(repr(c) for c in spec.choices)})'
    d = ParameterDescriptor(name=name, description=text, read_only=spec.read_only)
    if spec.choices:
        d.additional_constraints = 'one of: ' + ', '.join(repr(c) for c in spec.choices)
    if spec.range is not None:
        if isinstance(spec.default, bool):
            pass
        elif isinstance(spec.default, int):
            d.integer_range = [IntegerRange(from_value=int(spec.range[0]),
                                            to_value=int(spec.range[1]), step=1)]
        else:
            d.floating_point_range = [FloatingPointRange(from_value=float(spec.range[0]),
                                                         to_value=float(spec.range[1]),
                                                         step=0.0)]
    return d


def settings_from(values: dict[str, Any]) -> PipelineSettings:
    """Pipeline settings from parameter values; ValueError names what is wrong."""
    for name, spec in PARAMETERS.items():
        if spec.choices and name in values and values[name] not in spec.choices:
            raise ValueError(f'{name} must be one of {spec.choices}, got {values[name]!r}')
    interval = IntervalSettings(
        mode=values['interval.mode'],
        fixed_alpha=tuple(values['interval.fixed_alpha']),
        fixed_beta=tuple(values['interval.fixed_beta']),
        margin_alpha=values['interval.margin_alpha'],
        margin_beta=values['interval.margin_beta'],
        window_s=values['interval.window_s'],
        max_residual=values['interval.max_residual'])
    budget_ms = float(values['certify.budget_ms'])
    deadline_ms = float(values['certify.deadline_ms'])
    width = float(values['certify.max_width_px'])
    return PipelineSettings(
        readout=values['readout'] or None,
        certify=bool(values['certify.enabled']),
        method=values['certify.method'],
        max_subboxes=int(values['certify.max_subboxes']),
        budget_ms=budget_ms if budget_ms > 0 else None,
        deadline_ms=deadline_ms if deadline_ms > 0 else None,
        max_width_px=width if width > 0 else None,
        exact_values=int(values['certify.exact_values']),
        level_nodes=int(values['certify.level_nodes']),
        precision=values['certify.precision'],
        score_threshold=float(values['score_threshold']),
        interval=interval)


@dataclass
class _InFlight:
    """A frame handed to the worker pool, waiting to be published in arrival order."""

    msg: Any
    frame: np.ndarray
    arrived: float
    timings: dict
    started: float
    interval_ms: float = 0.0
    ticket: int | None = None
    outcome: Outcome | None = None
    done_at: float = 0.0


def _stamp_seconds(stamp) -> float:
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


class UsnPerceptionNode(LifecycleNode):
    """The certified keypoint node (see the module docstring)."""

    def __init__(self, node_name: str = NODE_NAME, **kwargs) -> None:
        """Declare the parameters (with descriptors) and the diagnostics publisher."""
        super().__init__(node_name, **kwargs)
        for name, spec in PARAMETERS.items():
            self.declare_parameter(name, spec.default, _descriptor(name, spec))
        self.add_on_set_parameters_callback(self._validate_parameters)
        self.add_post_set_parameters_callback(self._apply_parameters)

        self.stats = NodeStats()
        self.stats.info['state'] = 'unconfigured'
        self.pipeline: FramePipeline | None = None
        self.pool: WorkerPool | None = None  # with ``workers`` > 1
        self._inflight: deque[_InFlight] = deque()  # frames in the pool, in arrival order
        self._collector: threading.Thread | None = None
        self._subscription = None
        self._pubs: dict[str, Any] = {}
        self._cond = threading.Condition()
        self._pending: tuple[Any, float] | None = None
        self._stop = False
        self._worker: threading.Thread | None = None
        self._encoding = ''
        self._frame_id = ''

        self._diag_pub = self.create_publisher(DiagnosticArray, '/diagnostics', 10)
        period = float(self.get_parameter('diagnostics_period_s').value)
        self._diag_timer = self.create_timer(period, self.publish_diagnostics)

    # ----------------------------------------------------------------- parameters
    def _values(self) -> dict[str, Any]:
        return {name: self.get_parameter(name).value for name in PARAMETERS}

    def _validate_parameters(self, params: list[Parameter]) -> SetParametersResult:
        values = self._values()
        for p in params:
            if p.name in PARAMETERS:
                values[p.name] = p.value
        try:
            settings = settings_from(values)
            if self.pipeline is not None:  # e.g. 'float32' where it is not sound
                resolve_precision(settings.precision, self.pipeline.detector.device)
        except (ValueError, TypeError) as exc:
            return SetParametersResult(successful=False, reason=str(exc))
        return SetParametersResult(successful=True)

    def _apply_parameters(self, params: list[Parameter]) -> None:
        if self.pipeline is None or not any(p.name in PARAMETERS for p in params):
            return
        settings = self.pipeline.configure(settings_from(self._values()))
        if self.pool is not None:
            self.pool.configure(settings)
        self.get_logger().info('parameters applied: ' + ', '.join(
            f'{p.name}={p.value}' for p in params))
        self.publish_info()

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Load the model (failing loudly) and create the publishers."""
        from usn_perception.detector import load_detector, resolve_device

        values = self._values()
        try:
            if values['num_threads'] > 0:
                import torch

                torch.set_num_threads(int(values['num_threads']))
            device = str(resolve_device(values['device']))
            detector = load_detector(values['model_path'] or None, device=device)
            self.pipeline = FramePipeline(detector, settings_from(values))
            self.pipeline.precision_in_use()  # refuses 'float32' where it is not sound
            if values['workers'] > 1:
                self.pool = WorkerPool(str(detector.source), processes=int(values['workers']),
                                       settings=self.pipeline.settings, device=device,
                                       num_threads=int(values['num_threads']),
                                       sha256=detector.sha256)
                self.pool.wait_ready()
        except Exception as exc:  # noqa: BLE001 - any load failure must be reported, not raised
            self._close_pool()
            self.pipeline = None
            self.stats.error = f'configure failed: {exc}'
            self.get_logger().fatal(self.stats.error)
            return TransitionCallbackReturn.FAILURE
        self.stats.error = None
        self.stats.info.update(model_sha256=str(detector.sha256), device=device,
                               model=str(detector.source), workers=str(values['workers']))
        self._pubs = {
            'keypoints': self.create_lifecycle_publisher(
                PointCloud2, '~/keypoints', copy.copy(OUTPUT_QOS),
                qos_overriding_options=QoSOverridingOptions.with_default_policies()),
            'interval': self.create_lifecycle_publisher(
                PolygonStamped, '~/photometric_interval', copy.copy(OUTPUT_QOS),
                qos_overriding_options=QoSOverridingOptions.with_default_policies()),
            'debug': self.create_lifecycle_publisher(Image, '~/debug_image', 5),
            'info': self.create_publisher(String, '~/keypoints/info', copy.copy(LATCHED_QOS)),
        }
        self.stats.info['state'] = 'inactive'
        self.get_logger().info(f'model {detector!r} on {device}')
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Subscribe to the input and start the worker."""
        transport = self.get_parameter('input_transport').value
        base = self.resolve_topic_name('image')
        msg_type, topic = (Image, 'image') if transport == 'raw' else (
            CompressedImage, base + '/compressed')
        events = SubscriptionEventCallbacks(incompatible_qos=self._on_incompatible_qos,
                                            message_lost=self._on_message_lost)
        # A copy: rclpy applies qos_overrides by mutating the profile it is given, which would
        # leak one node's override into every later node of the process.
        self._subscription = self.create_subscription(
            msg_type, topic, self._on_image, copy.copy(INPUT_QOS), event_callbacks=events,
            qos_overriding_options=QoSOverridingOptions.with_default_policies())
        self._stop = False
        self._worker = threading.Thread(target=self._work, name='usn_perception_worker',
                                        daemon=True)
        self._worker.start()
        if self.pool is not None:
            self._collector = threading.Thread(target=self._collect,
                                               name='usn_perception_collector', daemon=True)
            self._collector.start()
        result = super().on_activate(state)
        self.publish_info()
        self.stats.info.update(state='active', input=self._subscription.topic_name,
                               transport=transport)
        self.get_logger().info(f'listening on {self._subscription.topic_name} ({transport})')
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Unsubscribe and stop the worker."""
        self._stop_worker()
        if self._subscription is not None:
            self.destroy_subscription(self._subscription)
            self._subscription = None
        self.stats.info['state'] = 'inactive'
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Drop the publishers and the model."""
        self._release()
        self.stats.info['state'] = 'unconfigured'
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything, from whatever state."""
        self._stop_worker()
        if self._subscription is not None:
            self.destroy_subscription(self._subscription)
            self._subscription = None
        self._release()
        self.stats.info['state'] = 'finalized'
        return TransitionCallbackReturn.SUCCESS

    def _release(self) -> None:
        for name, pub in self._pubs.items():
            if name == 'info':
                self.destroy_publisher(pub)
            else:
                self.destroy_lifecycle_publisher(pub)
        self._pubs = {}
        self._close_pool()
        self.pipeline = None

    def _close_pool(self) -> None:
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.close()

    def destroy_node(self) -> None:
        """Stop the threads and worker processes before the node's entities go away."""
        self._stop_worker()
        self._close_pool()
        super().destroy_node()

    # ------------------------------------------------------------------- input
    @property
    def input_subscription(self):
        """The image subscription while active (None otherwise)."""
        return self._subscription

    def _on_image(self, msg: Any) -> None:
        self.stats.arrived()
        if not self.get_parameter('enabled').value:
            return
        pipeline, stamp = self.pipeline, _stamp_seconds(msg.header.stamp)
        if pipeline is not None and stamp != 0.0:  # the camera's period, dropped frames too
            pipeline.note_arrival(stamp)
            pool = self.pool
            if pool is not None:
                pool.note_arrival(stamp)
        with self._cond:
            if self._pending is not None:
                self.stats.count('dropped')
            self._pending = (msg, time.monotonic())
            self._cond.notify()

    def _on_incompatible_qos(self, info: Any) -> None:
        self.stats.count('incompatible_qos', max(1, int(info.total_count_change)))
        kind = getattr(info.last_policy_kind, 'name', str(info.last_policy_kind))
        text = (f'a publisher on the input offers QoS incompatible with this subscription '
                f'(policy {kind}); override with qos_overrides.<topic>.subscription.*')
        self.stats.problem(text)
        self.get_logger().warning(text, throttle_duration_sec=WARN_EVERY_S)

    def _on_message_lost(self, info: Any) -> None:
        self.stats.count('message_lost', int(info.total_count_change))

    def _stop_worker(self) -> None:
        with self._cond:
            self._stop = True
            self._pending = None
            self._cond.notify_all()
        for name in ('_worker', '_collector'):
            thread = getattr(self, name)
            setattr(self, name, None)
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=30.0)
        with self._cond:
            self._inflight.clear()  # their outcomes, if any still come, are ignored

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._stop and (self._pending is None or (
                        self.pool is not None and not self.pool.idle())):
                    self._cond.wait()
                if self._stop:
                    return
                msg, arrived = self._pending
                self._pending = None
            try:
                if self.pool is None:
                    self.process_message(msg, arrived)
                else:
                    self._dispatch(msg, arrived)
            except Exception as exc:  # noqa: BLE001 - the worker must outlive any frame
                if self._stop or not self.context.ok():
                    return  # shutting down (e.g. SIGTERM): publishing fails, say nothing
                self._failed(f'{type(exc).__name__}: {exc}')

    def _failed(self, why: str) -> None:
        self.stats.count('errors')
        self.stats.problem(why)
        self.get_logger().error(f'frame failed: {why}', throttle_duration_sec=WARN_EVERY_S)

    # -------------------------------------------------------------- processing
    def _skip(self, why: str) -> None:
        self.stats.count('malformed')
        self.stats.problem(why)
        self.get_logger().warning(f'skipping frame: {why}', throttle_duration_sec=WARN_EVERY_S)

    def _decode(self, msg: Any) -> tuple[np.ndarray, float] | None:
        """The frame and its stamp (seconds; the clock's when unstamped), None if skipped."""
        try:
            if isinstance(msg, CompressedImage):
                self._encoding = f'compressed/{msg.format}'
                frame = compressed_to_numpy(msg)
            else:
                self._encoding = str(msg.encoding)
                frame = image_to_numpy(msg)
        except (ImageError, ValueError, TypeError) as exc:
            self._skip(str(exc))
            return None
        stamp = _stamp_seconds(msg.header.stamp)
        if stamp == 0.0:
            stamp = self.get_clock().now().nanoseconds * 1e-9  # unstamped input
        return frame, stamp

    def _take(self, msg: Any, arrived: float) -> tuple | None:
        """Decode a message: (frame, stamp, timings so far (ms), time decoded), None if skipped."""
        t0 = time.monotonic()
        decoded = self._decode(msg)
        if decoded is None:
            return None
        t1 = time.monotonic()
        return (*decoded, {'queue': (t0 - arrived) * 1e3, 'decode': (t1 - t0) * 1e3}, t1)

    def process_message(self, msg: Any, arrived: float | None = None) -> FrameResult | None:
        """Decode, run and publish one message here; None when it was skipped."""
        pipeline = self.pipeline
        if pipeline is None:
            return None
        arrived = time.monotonic() if arrived is None else arrived
        taken = self._take(msg, arrived)
        if taken is None:
            return None
        frame, stamp, timings, t1 = taken
        try:
            result = pipeline.process(frame, stamp, arrived=arrived)
        except ImageError as exc:
            self._skip(str(exc))
            return None
        timings['pipeline'] = (time.monotonic() - t1) * 1e3
        self._finish(msg, frame, result, timings, arrived)
        return result

    def _dispatch(self, msg: Any, arrived: float) -> None:
        """Decode a message, measure its Θ here (in arrival order) and hand it to the pool."""
        pipeline, pool = self.pipeline, self.pool
        if pipeline is None or pool is None:
            return
        taken = self._take(msg, arrived)
        if taken is None:
            return
        frame, stamp, timings, t1 = taken
        try:
            estimate = pipeline.measure(frame, stamp)
        except ImageError as exc:
            self._skip(str(exc))
            return
        entry = _InFlight(msg, frame, arrived, timings, t1,
                          interval_ms=(time.monotonic() - t1) * 1e3)
        with self._cond:  # the collector matches outcomes to entries under the same lock
            entry.ticket = pool.submit(frame, stamp, estimate, arrived)
            self._inflight.append(entry)

    def _collect(self) -> None:
        """Receive the pool's outcomes and publish them in arrival order."""
        seen = 0
        while not self._stop:
            pool = self.pool
            if pool is None:
                return
            outcomes = pool.collect(timeout=0.1)
            for why in pool.failures[seen:]:
                self._failed(why)
            seen = len(pool.failures)
            self.stats.info.update(workers_alive=str(pool.alive()),
                                   worker_restarts=str(pool.restarts))
            done_at = time.monotonic()
            ready: list[_InFlight] = []
            with self._cond:
                by_ticket = {e.ticket: e for e in self._inflight}
                for outcome in outcomes:
                    entry = by_ticket.get(outcome.ticket)
                    if entry is not None:
                        entry.outcome, entry.done_at = outcome, done_at
                while self._inflight and self._inflight[0].outcome is not None:
                    ready.append(self._inflight.popleft())
                self._cond.notify_all()  # a worker is idle again
            for entry in ready:
                try:
                    self._finish_outcome(entry)
                except Exception as exc:  # noqa: BLE001 - the collector must outlive any frame
                    if self._stop or not self.context.ok():
                        return
                    self._failed(f'{type(exc).__name__}: {exc}')

    def _finish_outcome(self, entry: _InFlight) -> None:
        outcome = entry.outcome
        if outcome.result is None:
            if outcome.bad_image:
                self._skip(outcome.error)
            else:
                self._failed(outcome.error)
            return
        timings = {**entry.timings, 'interval': entry.interval_ms,
                   'pipeline': (entry.done_at - entry.started) * 1e3}
        self._finish(entry.msg, entry.frame, outcome.result, timings, entry.arrived)

    def _finish(self, msg: Any, frame: np.ndarray, result: FrameResult, timings: dict,
                arrived: float) -> None:
        """Publish one frame's result and record its timings (ms) in the diagnostics."""
        t0 = time.monotonic()
        self._publish(msg.header, frame, result)
        t1 = time.monotonic()
        timings = {**{k: v for k, v in result.timings_ms.items() if k != 'total'}, **timings,
                   'publish': (t1 - t0) * 1e3, 'node': (t1 - arrived) * 1e3}
        if msg.header.stamp.sec or msg.header.stamp.nanosec:
            sent_ns = msg.header.stamp.sec * 10**9 + msg.header.stamp.nanosec
            timings['age'] = (self.get_clock().now().nanoseconds - sent_ns) * 1e-6
        self._frame_id = str(msg.header.frame_id)
        self.stats.processed(timings, keypoints=int(result.status.size),
                             certified=int(result.certified.sum()),
                             out_of_budget=int((result.status
                                                == int(CertStatus.OUT_OF_BUDGET)).sum()))

    def _publish(self, header: Any, frame: np.ndarray, result: FrameResult) -> None:
        pubs = self._pubs
        if not pubs:
            return
        pubs['keypoints'].publish(pack_keypoints(result.keypoints, result.scores, result.boxes,
                                                 result.status, header))
        est = result.interval
        pubs['interval'].publish(interval_to_polygon(est.alpha, est.beta, header))
        debug = pubs['debug']
        if self.get_parameter('publish_debug_image').value and debug.get_subscription_count():
            debug.publish(self.debug_image(frame, result, header))
            self.stats.count('debug_images')

    def debug_image(self, frame: np.ndarray, result: FrameResult, header: Any = None) -> Image:
        """bgr8 picture: nominal keypoints, certified boxes green, the rest red, Θ as text."""
        from usn_perception.visualize import draw_certificate

        est = result.interval
        canvas = draw_certificate(frame, result.keypoints, result.boxes, result.certified,
                                  est.alpha, est.beta, mode=est.mode)
        return numpy_to_image(canvas, 'bgr8', header)

    # ------------------------------------------------------------------ outputs
    def info(self) -> dict:
        """The JSON document of ``~/keypoints/info``."""
        doc = self.pipeline.describe() if self.pipeline is not None else {}
        doc.update(node=self.get_fully_qualified_name(),
                   device=self.stats.info.get('device', ''),
                   fields={name: KEYPOINT_DTYPE[name].str for name in KEYPOINT_DTYPE.names},
                   interval_message='geometry_msgs/PolygonStamped corners (x=alpha, y=beta)',
                   input_transport=self.get_parameter('input_transport').value,
                   workers=int(self.get_parameter('workers').value))
        return doc

    def publish_info(self) -> None:
        """Publish the latched info document (on activate and on parameter changes)."""
        pub = self._pubs.get('info')
        if pub is not None:
            pub.publish(String(data=json.dumps(self.info(), sort_keys=True)))

    def publish_diagnostics(self) -> None:
        """One DiagnosticArray for the last period."""
        self.stats.info['encoding'] = self._encoding
        status = self.stats.status(f'{self.get_name()}: certified keypoints',
                                   hardware_id=self._frame_id)
        msg = DiagnosticArray(status=[status])
        msg.header.stamp = self.get_clock().now().to_msg()
        self._diag_pub.publish(msg)


def main(args: list[str] | None = None) -> int:
    """Console entry point: start, autostart the lifecycle, spin until shut down."""
    rclpy.init(args=args)
    node = None
    code = 0
    try:
        node = UsnPerceptionNode()
        if node.get_parameter('autostart').value:
            if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal('configure failed; exiting')
                return 1
            if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                node.get_logger().fatal('activate failed; exiting')
                return 1
        executor = SingleThreadedExecutor()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:  # noqa: BLE001 - see below
        # A SIGTERM that lands while a frame is being processed shuts the context down
        # before the executor's next wait, which then raises RCLError instead of
        # ExternalShutdownException (rclpy race). After a shutdown that is a clean stop;
        # with the context still valid it is a real error.
        if rclpy.ok():
            raise
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return code


if __name__ == '__main__':
    raise SystemExit(main())

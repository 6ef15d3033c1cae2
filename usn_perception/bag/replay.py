"""Lockstep replay: each frame of a bag through a running ``usn_perception_node``, in order.

``ros2 bag play`` publishes at bag speed and never looks back: a slow node drops frames, a
fast one idles. This replayer closes the loop instead. For every frame it publishes
``/clock`` (the frame's log time, so a node with ``use_sim_time`` sees bag time) and then the
frame's own CDR bytes from the bag, and waits until the node's ``~/keypoints`` and
``~/photometric_interval`` for that header stamp have arrived before sending the next. Nothing
is dropped at any speed, and the node's raw outputs are recorded, at the input's log time,
into ``keypoints.mcap`` — the same layout the offline evaluator writes, so
:func:`~usn_perception.bag.outputs.compare_outputs` can check the two frame by frame.

Frames the node's own converters cannot decode are sent but not waited for (the node skips
them without output). The node's input subscription is best effort by default; a spawned node
(:func:`spawn_node`) gets a reliable override so no frame is lost on the way. Only this module
of :mod:`usn_perception.bag` starts an rclpy context, and it refuses to unless the loopback
DDS settings of ``env.sh`` are active.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usn_perception.bag.errors import CorruptBagError
from usn_perception.bag.messages import COMPRESSED, header_stamp, split_ns
from usn_perception.bag.outputs import INFO, INTERVAL, KEYPOINTS, OutputBagWriter, topics
from usn_perception.errors import UsnPerceptionError
from usn_perception.pipeline import PipelineSettings


class ReplayError(UsnPerceptionError, RuntimeError):
    """The replay could not run: no node answered, the node died, DDS not on loopback."""


def node_parameters(settings: PipelineSettings, model: str | None = None) -> dict[str, Any]:
    """Node parameters that make ``usn_perception_node`` compute what ``settings`` describe.

    Always ``use_sim_time`` and no debug image; ``budget_ms`` and ``deadline_ms`` None become
    0 (no clock limit).
    """
    s, iv = settings, settings.interval
    params: dict[str, Any] = {
        'use_sim_time': True, 'publish_debug_image': False,
        'readout': s.readout or '', 'score_threshold': float(s.score_threshold),
        'certify.enabled': bool(s.certify), 'certify.method': s.method,
        'certify.max_subboxes': int(s.max_subboxes),
        'certify.budget_ms': float(s.budget_ms or 0.0),
        'certify.deadline_ms': float(s.deadline_ms or 0.0),
        'certify.max_width_px': float(s.max_width_px or 0.0),
        'certify.exact_values': int(s.exact_values), 'certify.precision': s.precision,
        'certify.level_nodes': int(s.level_nodes),
        'interval.mode': iv.mode, 'interval.fixed_alpha': [float(v) for v in iv.fixed_alpha],
        'interval.fixed_beta': [float(v) for v in iv.fixed_beta],
        'interval.margin_alpha': float(iv.margin_alpha),
        'interval.margin_beta': float(iv.margin_beta), 'interval.window_s': float(iv.window_s),
        'interval.max_residual': float(iv.max_residual)}
    if model:
        params['model_path'] = str(model)
    return params


def settings_from_info(info: dict[str, Any]) -> PipelineSettings:
    """The pipeline settings a node reports in its ``~/keypoints/info`` document."""
    from usn_perception.interval import IntervalSettings

    try:
        c, iv = info['certify'], info['interval']
        return PipelineSettings(
            readout=info.get('readout') or None, certify=bool(c['enabled']),
            method=c['method'], max_subboxes=int(c['max_subboxes']),
            budget_ms=c['budget_ms'] or None, max_width_px=c['max_width_px'] or None,
            deadline_ms=c.get('deadline_ms') or None,  # nodes before it had no deadline
            score_threshold=float(c['score_threshold']),
            exact_values=int(c.get('exact_values', 0)),  # nodes before it had no exact stage
            level_nodes=int(c.get('level_nodes', 0)),  # nor level nodes
            precision=c.get('precision', 'float64'),  # nodes before it had float64 only
            interval=IntervalSettings(mode=iv['mode'], fixed_alpha=tuple(iv['fixed_alpha']),
                                      fixed_beta=tuple(iv['fixed_beta']),
                                      margin_alpha=iv['margin_alpha'],
                                      margin_beta=iv['margin_beta'], window_s=iv['window_s'],
                                      max_residual=iv.get('max_residual', 0.0)))
    except (KeyError, TypeError) as exc:
        raise ReplayError(f'the node info document lacks {exc}; is it a usn_perception node?'
                          ) from None


def _param_text(value: Any) -> str:
    if isinstance(value, bool):
        return 'true' if value else 'false'
    if isinstance(value, list):
        return '[' + ','.join(_param_text(v) for v in value) + ']'
    if isinstance(value, float):
        return repr(value)
    return str(value) if value != '' else "''"


def input_topics(topic: str, msgtype: str) -> tuple[str, str]:
    """(topic to publish on, the node's ``image`` remap) for an input topic of the bag."""
    if msgtype != COMPRESSED:
        return topic, topic
    if topic.endswith('/compressed'):
        return topic, topic[:-len('/compressed')]
    return topic + '/compressed', topic


def spawn_node(params: dict[str, Any], image_remap: str, publish_topic: str, name: str,
               log: Path) -> subprocess.Popen:
    """Start ``usn_perception_node`` (this interpreter) for a replay, logging to ``log``.

    The input subscription is overridden to reliable, so lockstep frames are never lost.
    """
    args = [sys.executable, '-m', 'usn_perception.ros.node', '--ros-args',
            '-r', f'__node:={name}', '-r', f'image:={image_remap}']
    # One frame at a time in lockstep: worker processes would only add their start-up.
    params = {**params, 'num_threads': 1, 'workers': 1,
              f'qos_overrides.{publish_topic}.subscription.reliability': 'reliable'}
    if publish_topic != image_remap:
        params['input_transport'] = 'compressed'
    for key, value in params.items():
        args += ['-p', f'{key}:={_param_text(value)}']
    env = {**os.environ, 'OMP_NUM_THREADS': os.environ.get('OMP_NUM_THREADS', '1')}
    return subprocess.Popen(args, stdout=log.open('w'), stderr=subprocess.STDOUT, env=env)


def stop_node(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """Stop a node started by :func:`spawn_node`: SIGINT, then SIGTERM, then SIGKILL."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        if proc.poll() is not None:
            break
        proc.send_signal(sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def _check_loopback() -> None:
    if os.environ.get('ROS_AUTOMATIC_DISCOVERY_RANGE') != 'LOCALHOST' or not os.environ.get(
            'FASTDDS_DEFAULT_PROFILES_FILE'):
        raise ReplayError('DDS is not restricted to loopback: source env.sh first '
                          '(ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST and the Fast DDS profile)')


@dataclass
class ReplayResult:
    """What a replay sent, got back and recorded."""

    out: Path
    summary: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        """Every decodable frame got its outputs and the bag was read to the end."""
        return not self.summary['missing'] and not self.summary['partial']


class _Session:
    """The replayer's rclpy node: /clock and image publishers, output subscriptions."""

    def __init__(self, context, topic: str, msgtype: str, ns: str) -> None:
        import rclpy
        from geometry_msgs.msg import PolygonStamped
        from rclpy.executors import SingleThreadedExecutor
        from rclpy.node import Node
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from rosgraph_msgs.msg import Clock
        from sensor_msgs.msg import CompressedImage, Image, PointCloud2
        from std_msgs.msg import String

        self.own = context is None
        if self.own:
            from rclpy.context import Context

            context = Context()
            rclpy.init(context=context)
        self.context = context
        self.node = Node('usn_perception_replay', context=context)
        self.executor = SingleThreadedExecutor(context=context)
        self.executor.add_node(self.node)
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE,
                             durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.Clock = Clock
        self.clock = self.node.create_publisher(Clock, '/clock', reliable)
        self.image = self.node.create_publisher(
            CompressedImage if msgtype == COMPRESSED else Image, topic,
            QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE))
        self.got: dict[str, list[bytes]] = {KEYPOINTS: [], INTERVAL: [], INFO: []}
        names = topics(ns)
        self.subs = {
            kind: self.node.create_subscription(
                msg, names[kind], self.got[kind].append,
                latched if kind == INFO else QoSProfile(
                    depth=100, reliability=ReliabilityPolicy.RELIABLE), raw=True)
            for kind, msg in ((KEYPOINTS, PointCloud2), (INTERVAL, PolygonStamped),
                              (INFO, String))}

    def spin_until(self, done: Callable[[], bool], timeout: float,
                   alive: Callable[[], None] | None = None) -> bool:
        deadline = time.monotonic() + timeout
        while not done():
            if time.monotonic() > deadline:
                return False
            if alive is not None:
                alive()
            self.executor.spin_once(timeout_sec=0.005)
        return True

    def connected(self) -> bool:
        return (self.image.get_subscription_count() > 0 and bool(self.got[INFO])
                and all(self.subs[k].get_publisher_count() > 0 for k in (KEYPOINTS, INTERVAL)))

    def send(self, log_time_ns: int, raw: bytes) -> None:
        from builtin_interfaces.msg import Time

        sec, nanosec = split_ns(log_time_ns)
        self.clock.publish(self.Clock(clock=Time(sec=sec, nanosec=nanosec)))
        self.image.publish(raw)

    def close(self) -> None:
        import rclpy

        self.executor.shutdown()
        self.node.destroy_node()
        if self.own:
            rclpy.try_shutdown(context=self.context)


def replay_bag(
    bag: str | Path, out: str | Path, *, topic: str, ns: str = '/usn_perception',
    publish_topic: str | None = None, timeout_s: float = 60.0, connect_timeout_s: float = 30.0,
    start: float | None = None, end: float | None = None, limit: int | None = None,
    context=None, progress: bool = False, alive: Callable[[], None] | None = None,
    command: str | None = None,
) -> ReplayResult:
    """Replay ``topic`` of ``bag`` in lockstep through the node ``ns``; record into ``out``.

    ``publish_topic`` (default ``topic``) is where the node listens. ``timeout_s`` bounds the
    wait for one frame's outputs; a frame that times out is recorded as missing and the
    replay goes on. ``context``: an initialised rclpy Context to use (tests run the node in
    the same process); None makes and shuts down one. ``alive`` is called while waiting and
    may raise (e.g. when a spawned node died). Writes ``keypoints.mcap`` and
    ``summary.json``; a bag that breaks part way raises
    :class:`~usn_perception.bag.evaluate.PartialEvaluationError` after they are written.
    """
    import json

    from tqdm import tqdm

    from usn_perception.bag.evaluate import PartialEvaluationError
    from usn_perception.bag.read import BagReader, iter_frames
    from usn_perception.reports import staged_output, write_json

    _check_loopback()
    out = Path(out)
    with BagReader(bag) as reader:
        info = reader.image_topic(topic)
        target = publish_topic or topic
        session = _Session(context, target, info.msgtype, ns)
        try:
            if not session.spin_until(session.connected, connect_timeout_s, alive):
                raise ReplayError(
                    f'no usn_perception node answered within {connect_timeout_s:g} s: '
                    f'{session.image.get_subscription_count()} subscriber(s) on {target}, '
                    f'{session.subs[KEYPOINTS].get_publisher_count()} publisher(s) of '
                    f'{topics(ns)[KEYPOINTS]}, info {"seen" if session.got[INFO] else "not seen"}'
                    '; start the node with use_sim_time:=true and -r image:=<topic>, or use '
                    '--spawn')
            node_info = json.loads(_string_data(session.got[INFO][-1]))
            warnings = []
            budget = node_info.get('certify', {}).get('budget_ms')
            if budget:
                warnings.append(f'the node certifies under a wall-clock budget ({budget} ms): '
                                'its outputs depend on machine load')
            deadline = node_info.get('certify', {}).get('deadline_ms')
            if deadline:
                warnings.append(f'the node certifies under a deadline ({deadline} ms after '
                                'each frame arrives): its outputs depend on machine load')
            with staged_output(out) as stage:
                summary = _run(session, reader, topic, stage, ns, node_info, timeout_s,
                               dict(start=start, end=end, limit=limit), progress, alive,
                               iter_frames, tqdm)
                summary.update(bag={'path': str(reader.path), 'storage': reader.storage,
                                    'topic': topic, 'msgtype': info.msgtype},
                               node=ns, input_topic=target, warnings=warnings,
                               command=command, node_info=node_info)
                write_json(stage / 'summary.json', summary)
        finally:
            session.close()
    if summary['partial']:
        raise PartialEvaluationError(bag, f'{summary["error"]}; outputs for the '
                                          f'{summary["frames_sent"]} frames sent are in {out}',
                                     summary['frames_sent'], out)
    return ReplayResult(out, summary, node_info)


def _string_data(raw: bytes) -> str:
    from rclpy.serialization import deserialize_message
    from std_msgs.msg import String

    return deserialize_message(raw, String).data


def _run(session: _Session, reader, topic: str, stage: Path, ns: str, node_info: dict,
         timeout_s: float, window: dict, progress: bool, alive, iter_frames, tqdm,
         ) -> dict[str, Any]:
    """The lockstep loop; returns the summary counts."""
    writer = OutputBagWriter(stage / 'keypoints.mcap', ns)
    log_time: dict[tuple[int, int], int] = {}  # header stamp → log time of the frame sent
    waiting: set[tuple[int, int]] = set()  # frames whose outputs have not all arrived
    have: dict[tuple[int, int], set[str]] = {}
    counts = {'frames_sent': 0, 'malformed': 0, 'late': 0, 'unexpected': 0}
    missing: list[int] = []
    failure = None
    info_written = False
    bar = tqdm(desc='replay', unit='frame', disable=not progress)
    t_start = time.perf_counter()

    def drain() -> None:
        for kind in (KEYPOINTS, INTERVAL):
            queue = session.got[kind]
            while queue:
                raw = queue.pop(0)
                key = header_stamp(raw)
                if key not in log_time:
                    counts['unexpected'] += 1
                    continue
                writer.write_raw(kind, log_time[key], raw)
                have.setdefault(key, set()).add(kind)
                if have[key] >= {KEYPOINTS, INTERVAL} and key not in waiting:
                    counts['late'] += 1  # outputs of a frame given up on, arriving late
                    stamp = key[0] * 10**9 + key[1]
                    if stamp in missing:
                        missing.remove(stamp)
                if have[key] >= {KEYPOINTS, INTERVAL}:
                    waiting.discard(key)

    try:
        for frame in iter_frames(reader, topic, **window):
            if not info_written:
                writer.write_raw(INFO, frame.log_time_ns, _info_raw(node_info))
                info_written = True
            key = (frame.sec, frame.nanosec)
            log_time[key] = frame.log_time_ns
            have.pop(key, None)
            if frame.image is not None:
                waiting.add(key)
            session.send(frame.log_time_ns, frame.raw)
            counts['frames_sent'] += 1
            if frame.image is None:
                counts['malformed'] += 1
            elif not session.spin_until(lambda k=key: (drain(), k not in waiting)[1], timeout_s,
                                        alive):
                waiting.discard(key)
                missing.append(frame.stamp_ns)
            bar.update()
    except CorruptBagError as exc:
        failure = exc.problem
    finally:
        bar.close()
    session.spin_until(lambda: False, 0.05)  # collect stragglers
    drain()
    wall = time.perf_counter() - t_start
    writer.close()
    sent = counts['frames_sent']
    return {'partial': failure is not None, 'error': failure, **counts,
            'outputs_recorded': sum(v >= {KEYPOINTS, INTERVAL} for v in have.values()),
            'missing': missing,
            'wall_s': wall, 'frames_per_s': sent / wall if wall > 0 else math.nan}


def _info_raw(doc: dict[str, Any]) -> bytes:
    import json

    from std_msgs.msg import String

    from usn_perception.bag.messages import STRING, serialize

    return serialize(String(data=json.dumps(doc, sort_keys=True)), STRING)


def check_alive(proc: subprocess.Popen, log: Path) -> Callable[[], None]:
    """A callback for :func:`replay_bag` that raises when the spawned node has exited."""
    def alive() -> None:
        if proc.poll() is not None:
            tail = log.read_text(errors='replace').strip().splitlines()[-8:] if log.exists() \
                else []
            raise ReplayError(f'the spawned node exited with status {proc.returncode}:\n'
                              + '\n'.join(tail))
    return alive


def offline_check(bag: Path, out: Path, topic: str, node_info: dict[str, Any],
                  window: dict, progress: bool = False) -> dict[str, Any]:
    """Evaluate the bag offline with the node's settings and model; compare with the replay.

    Writes ``out/offline/`` (a full eval-bag report) and returns the comparison document.
    """
    from usn_perception.bag.evaluate import evaluate_bag
    from usn_perception.bag.outputs import compare_outputs, read_outputs
    from usn_perception.detector import load_detector

    model = node_info.get('model_source')
    if not model or not Path(model).exists():
        raise ReplayError(f'cannot run the offline check: the node\'s model {model!r} is not '
                          'readable here')
    detector = load_detector(model)
    if detector.sha256 != node_info.get('model_sha256'):
        raise ReplayError(f'the model at {model} (sha256 {detector.sha256}) is not the one the '
                          f'node runs ({node_info.get("model_sha256")})')
    evaluate_bag(bag, out / 'offline', topic=topic, detector=detector,
                 settings=settings_from_info(node_info), progress=progress, **window)
    return compare_outputs(read_outputs(out / 'offline' / 'keypoints.mcap'),
                           read_outputs(out / 'keypoints.mcap'))

"""The keypoint output bag: write it offline, read it back from any run, compare two runs.

The evaluator writes, and the lockstep replay records, the node's output topics
(``<ns>/keypoints`` PointCloud2, ``<ns>/photometric_interval`` PolygonStamped, one
``<ns>/keypoints/info`` JSON String) at the input frame's log time, with the input header, so
a run opens in Foxglove next to the bag it came from. :func:`read_outputs` decodes either
kind with the node's own decoders, and :func:`compare_outputs` checks two runs frame by frame.

Comparison is exact on the wire values: ``x, y`` and ``score`` are float32 on the wire (the
float64 pipeline values rounded once), the box ends are float64, Θ's ends are float32
representable by construction. Two runs of the same computation therefore agree bit for bit,
and any difference — even one float32 ulp of ``x`` — is reported, not tolerated.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from usn_perception.bag.errors import BagError
from usn_perception.bag.messages import (
    POINTCLOUD,
    POLYGON,
    STRING,
    make_header,
    qos,
    serialize,
    typestore,
)

DEFAULT_NS = '/usn_perception'
KEYPOINTS, INTERVAL, INFO = 'keypoints', 'photometric_interval', 'keypoints/info'


def topics(ns: str = DEFAULT_NS) -> dict[str, str]:
    """Output topic names under the node namespace ``ns`` (the node's ``~/`` topics)."""
    ns = '/' + ns.strip('/')
    return {KEYPOINTS: f'{ns}/{KEYPOINTS}', INTERVAL: f'{ns}/{INTERVAL}', INFO: f'{ns}/{INFO}'}


class OutputBagWriter:
    """Writes the node's output messages for each frame into one bare ``.mcap`` file.

    rosbags writes rosbag2 folders; the storage file is moved out on :meth:`close`, so the
    result is a single file that ``ros2 bag play``, Foxglove, rosbags and ``mcap`` all read.
    """

    def __init__(self, path: Path, ns: str = DEFAULT_NS) -> None:
        """Open a writer for ``path`` (a ``.mcap`` file that must not exist yet)."""
        from rosbags.rosbag2 import StoragePlugin, Writer

        self.path = Path(path)
        if self.path.exists():
            raise BagError(self.path, 'exists already; not overwriting')
        self._stage = Path(tempfile.mkdtemp(prefix=f'.{self.path.stem}-', dir=self.path.parent))
        self._writer = Writer(self._stage / self.path.stem, version=9,
                              storage_plugin=StoragePlugin.MCAP)
        self._writer.open()
        self.topics = topics(ns)
        ts = typestore()
        self._conns = {
            KEYPOINTS: self._writer.add_connection(self.topics[KEYPOINTS], POINTCLOUD,
                                                   typestore=ts, offered_qos_profiles=[qos()]),
            INTERVAL: self._writer.add_connection(self.topics[INTERVAL], POLYGON, typestore=ts,
                                                  offered_qos_profiles=[qos()]),
            INFO: self._writer.add_connection(self.topics[INFO], STRING, typestore=ts,
                                              offered_qos_profiles=[qos(depth=1, latched=True)]),
        }
        self.count = 0

    def write_info(self, log_time_ns: int, doc: dict[str, Any]) -> None:
        """The latched info document (once, at the first frame's time)."""
        from std_msgs.msg import String

        self.write_raw(INFO, log_time_ns,
                       serialize(String(data=json.dumps(doc, sort_keys=True)), STRING))

    def write_result(self, log_time_ns: int, sec: int, nanosec: int, frame_id: str,
                     result) -> None:
        """The keypoints and interval messages the node publishes for ``result``."""
        from usn_perception.ros.photometric import interval_to_polygon
        from usn_perception.ros.pointcloud import pack_keypoints

        header = make_header(sec, nanosec, frame_id)
        cloud = pack_keypoints(result.keypoints, result.scores, result.boxes, result.status,
                               header)
        est = result.interval
        self.write_raw(KEYPOINTS, log_time_ns, serialize(cloud, POINTCLOUD))
        self.write_raw(INTERVAL, log_time_ns,
                       serialize(interval_to_polygon(est.alpha, est.beta, header), POLYGON))
        self.count += 1

    def write_raw(self, kind: str, log_time_ns: int, raw: bytes) -> None:
        """Already serialized CDR of output ``kind`` (as recorded from the node)."""
        self._writer.write(self._conns[kind], int(log_time_ns), raw)

    def close(self) -> Path:
        """Finish the file and move it to :attr:`path` (idempotent)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            (self._stage / self.path.stem / f'{self.path.stem}.mcap').replace(self.path)
            shutil.rmtree(self._stage, ignore_errors=True)
        return self.path

    def abort(self) -> None:
        """Drop everything written (on failure)."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer = None
                shutil.rmtree(self._stage, ignore_errors=True)


@dataclass
class OutputFrame:
    """One frame's outputs as they are on the wire (keypoints and Θ share the header)."""

    log_time_ns: int
    sec: int
    nanosec: int
    frame_id: str
    keypoints: np.ndarray | None = None  # (K, 2) float32 values
    boxes: np.ndarray | None = None  # (K, 4) float64
    scores: np.ndarray | None = None  # (K,) float32
    status: np.ndarray | None = None  # (K,) uint8
    kp_id: np.ndarray | None = None
    alpha: tuple[float, float] | None = None
    beta: tuple[float, float] | None = None

    @property
    def stamp_ns(self) -> int:
        """Header stamp in ns."""
        return self.sec * 10**9 + self.nanosec


@dataclass
class Outputs:
    """A run's outputs: frames in log-time order, and the info document."""

    path: Path
    frames: list[OutputFrame]
    info: dict[str, Any] = field(default_factory=dict)


def _find(names: list[str], suffix: str, path: Path) -> str:
    hits = [n for n in names if n.endswith('/' + suffix)]
    if len(hits) != 1:
        raise BagError(path, f'expected one topic ending in /{suffix}, found '
                             f'{hits or "none"} among {sorted(names)}')
    return hits[0]


def read_outputs(path: str | Path) -> Outputs:
    """Decode the keypoint, interval and info messages of an output bag (either run kind)."""
    from usn_perception.bag.read import BagReader
    from usn_perception.ros.photometric import polygon_to_interval
    from usn_perception.ros.pointcloud import decode_keypoints

    with BagReader(path) as reader:
        names = list(reader.topics)
        kp_topic = _find(names, KEYPOINTS, reader.path)
        iv_topic = _find(names, INTERVAL, reader.path)
        info_topics = [n for n in names if n.endswith('/' + INFO)]
        frames: dict[tuple[int, int, int], OutputFrame] = {}
        order: list[tuple[int, int, int]] = []

        def entry(t: int, msg) -> OutputFrame:
            key = (t, int(msg.header.stamp.sec), int(msg.header.stamp.nanosec))
            if key not in frames:
                frames[key] = OutputFrame(t, key[1], key[2], str(msg.header.frame_id))
                order.append(key)
            return frames[key]

        for t, raw in reader.messages(kp_topic):
            msg = reader.deserialize(raw, POINTCLOUD)
            kp = decode_keypoints(msg)
            f = entry(t, msg)
            f.keypoints, f.boxes, f.scores, f.status, f.kp_id = (
                kp.keypoints, kp.boxes, kp.scores, kp.status, kp.kp_id)
        for t, raw in reader.messages(iv_topic):
            msg = reader.deserialize(raw, POLYGON)
            f = entry(t, msg)
            f.alpha, f.beta = polygon_to_interval(msg)
        info: dict[str, Any] = {}
        for name in info_topics:
            for _, raw in reader.messages(name):
                info = json.loads(reader.deserialize(raw, STRING).data)
    return Outputs(Path(path), [frames[k] for k in sorted(order)], info)


def _same(a: np.ndarray | None, b: np.ndarray | None) -> bool:
    if a is None or b is None:
        return a is None and b is None
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and bool(np.array_equal(a, b, equal_nan=a.dtype.kind == 'f'))


def compare_outputs(expected: Outputs, actual: Outputs) -> dict[str, Any]:
    """Frame-by-frame comparison of two runs, keyed by (header stamp, frame id).

    Returns ``{'frames_expected', 'frames_actual', 'matched', 'identical', 'missing',
    'unexpected', 'differences': [{'stamp_ns', 'fields'}, …], 'equal'}``; ``equal`` is True
    when every frame is present in both with identical keypoints, boxes, scores, statuses,
    ids and Θ.
    """
    def key(f: OutputFrame) -> tuple[int, str]:
        return f.stamp_ns, f.frame_id

    exp = {key(f): f for f in expected.frames}
    act = {key(f): f for f in actual.frames}
    diffs = []
    for k in sorted(exp.keys() & act.keys()):
        a, b = exp[k], act[k]
        fields = [name for name in ('keypoints', 'boxes', 'scores', 'status', 'kp_id')
                  if not _same(getattr(a, name), getattr(b, name))]
        fields += [name for name in ('alpha', 'beta') if getattr(a, name) != getattr(b, name)]
        if fields:
            detail = {}
            both = a.keypoints is not None and b.keypoints is not None
            if 'keypoints' in fields and both and a.keypoints.shape == b.keypoints.shape:
                diff = np.abs(a.keypoints - b.keypoints)
                detail['max_keypoint_diff_px'] = float(np.nanmax(diff))
            diffs.append({'stamp_ns': k[0], 'frame_id': k[1], 'fields': fields, **detail})
    missing = sorted(k[0] for k in exp.keys() - act.keys())
    unexpected = sorted(k[0] for k in act.keys() - exp.keys())
    matched = len(exp.keys() & act.keys())
    return {'frames_expected': len(exp), 'frames_actual': len(act), 'matched': matched,
            'identical': matched - len(diffs), 'missing': missing, 'unexpected': unexpected,
            'differences': diffs,
            'equal': not diffs and not missing and not unexpected and matched > 0}

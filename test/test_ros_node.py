"""The node over real loopback DDS: frames in, keypoints out, parameters, bad input, debug.

Each test runs in its own ROS domain (``ros_domain``) and its own rclpy Context, and tears
both down, so the tests are parallel-safe. The model is a tiny random network saved to a
temporary directory; the certification budget is one θ box without a clock limit so that
outputs arrive quickly and the same on every machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('rclpy')

import rclpy  # noqa: E402
import torch  # noqa: E402
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus  # noqa: E402
from geometry_msgs.msg import PolygonStamped  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.node import Node  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image, PointCloud2  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from usn_perception.ros.conversions import (  # noqa: E402
    image_to_numpy,
    numpy_to_compressed,
    numpy_to_image,
)
from usn_perception.ros.diagnostics import status_values  # noqa: E402
from usn_perception.ros.node import (  # noqa: E402
    LATCHED_QOS,
    PARAMETERS,
    UsnPerceptionNode,
)
from usn_perception.ros.photometric import polygon_to_interval  # noqa: E402
from usn_perception.ros.pointcloud import decode_keypoints  # noqa: E402

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parent.parent
NS = '/usn_perception'
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
BEST_EFFORT = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
# The tiny random model's sound boxes are wide: the protocol tests report them CERTIFIED (no
# width limit); test_wide_boxes_are_not_certified_by_default checks the shipped limit.
FAST = {'certify.max_subboxes': 1, 'certify.budget_ms': 0.0, 'certify.deadline_ms': 0.0,
        'certify.max_width_px': 0.0,
        'diagnostics_period_s': 0.5, 'workers': 1}


def _frame(seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((48, 64)) * 255).astype(np.uint8)


class Harness:
    """The node plus a probe node in one Context, spun by one executor."""

    def __init__(self, model: Path, **params) -> None:
        self.ctx = Context()
        rclpy.init(context=self.ctx)
        values = {'model_path': str(model), **FAST, **params}
        self.node = UsnPerceptionNode(
            context=self.ctx, parameter_overrides=[Parameter(k, value=v)
                                                   for k, v in values.items()])
        self.probe = Node('probe', context=self.ctx)
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self.executor.add_node(self.probe)
        self.sent = 0

    def start(self) -> Harness:
        assert self.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert self.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        return self

    def listen(self, msg_type, topic: str, qos=RELIABLE) -> list:
        got: list = []
        self.probe.create_subscription(msg_type, topic, got.append, qos)
        return got

    def spin_until(self, done: Callable[[], bool], timeout: float = 20.0,
                   each: Callable[[], None] | None = None, period: float = 0.05) -> bool:
        deadline = time.monotonic() + timeout
        next_call = 0.0
        while time.monotonic() < deadline:
            if done():
                return True
            if each is not None and time.monotonic() >= next_call:
                each()
                next_call = time.monotonic() + period
            self.executor.spin_once(timeout_sec=0.02)
        return done()

    def image(self, array: np.ndarray | None = None, encoding: str = 'mono8',
              frame_id: str | None = None) -> Image:
        """A frame with a unique stamp (sec = running index) and frame id."""
        self.sent += 1
        msg = numpy_to_image(_frame(self.sent) if array is None else array, encoding)
        msg.header.stamp.sec = 1000 + self.sent
        msg.header.frame_id = frame_id or f'cam{self.sent}'
        return msg

    def sender(self, pub, sent: list) -> Callable[[], None]:
        """A function that publishes a fresh frame on ``pub`` and keeps it in ``sent``."""
        def send() -> None:
            sent.append(self.image())
            pub.publish(sent[-1])
        return send

    def close(self) -> None:
        self.executor.shutdown()
        self.node.destroy_node()
        self.probe.destroy_node()
        rclpy.shutdown(context=self.ctx)


@pytest.fixture
def harness(ros_domain, tiny_model):
    made: list[Harness] = []

    def make(**params) -> Harness:
        h = Harness(tiny_model, **params)
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


def _assert_boxes_hold_keypoints(dec) -> None:
    """Every certified box contains its nominal keypoint."""
    ok = dec.certified
    # x, y are float32: compare in float32, where rounding is monotone.
    b, p = dec.boxes[ok].astype(np.float32), dec.keypoints[ok].astype(np.float32)
    assert ((b[:, 0] <= p[:, 0]) & (p[:, 0] <= b[:, 1])
            & (b[:, 2] <= p[:, 1]) & (p[:, 1] <= b[:, 3])).all()


def _headers(msgs: list) -> set:
    return {(m.header.stamp.sec, m.header.stamp.nanosec, m.header.frame_id) for m in msgs}


def test_wide_boxes_are_not_certified_by_default(harness):
    """The shipped width limit: wider (sound) boxes are published as NOT_CERTIFIED."""
    limit = PARAMETERS['certify.max_width_px'].default
    assert limit > 0
    h = harness(**{'certify.max_width_px': limit}).start()
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    pub = h.probe.create_publisher(Image, 'image', RELIABLE)
    assert h.spin_until(lambda: len(clouds) >= 3, each=lambda: pub.publish(h.image()))
    statuses = set()
    for msg in clouds:
        dec = decode_keypoints(msg)
        wide = np.maximum(dec.boxes[:, 1] - dec.boxes[:, 0], dec.boxes[:, 3] - dec.boxes[:, 2])
        statuses |= set(dec.status.tolist())
        assert np.isfinite(dec.boxes).all()  # both kinds keep their box
        assert (wide[dec.status == 1] <= limit).all() and (wide[dec.status == 0] > limit).all()
    assert 0 in statuses


def test_frames_in_keypoints_out_with_headers_bounds_and_info(harness):
    h = harness().start()
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    boxes = h.listen(PolygonStamped, f'{NS}/photometric_interval')
    pub = h.probe.create_publisher(Image, 'image', RELIABLE)
    sent: list[Image] = []
    send = h.sender(pub, sent)

    assert h.spin_until(lambda: len(clouds) >= 3 and len(boxes) >= 3, each=send)
    assert _headers(clouds) <= _headers(sent)  # every output carries an input's header
    assert _headers(boxes) <= _headers(sent)
    certified = 0
    for msg in clouds:
        dec = decode_keypoints(msg)
        assert dec.keypoints.shape == (5, 2) and list(dec.kp_id) == [0, 1, 2, 3, 4]
        assert set(dec.status) <= {0, 1, 2, 3}
        certified += int(dec.certified.sum())
        _assert_boxes_hold_keypoints(dec)
    assert certified > 0
    alpha, beta = polygon_to_interval(boxes[-1])
    assert alpha[0] <= 1.0 <= alpha[1] and beta[0] <= 0.0 <= beta[1]

    info = h.listen(String, f'{NS}/keypoints/info', LATCHED_QOS)  # late joiner: latched
    assert h.spin_until(lambda: bool(info), timeout=10.0)
    doc = json.loads(info[-1].data)
    assert doc['keypoint_names'][0] == 'top_left' and len(doc['model_sha256']) == 64
    assert 'top-left pixel is (0, 0)' in doc['pixel_convention']
    assert doc['fields']['u_lo'] == '<f8'


def test_the_frame_period_is_the_streams_even_when_frames_are_dropped(harness):
    # Frames stamped 33 ms apart arrive every 10 ms, faster than they are processed: the node
    # keeps the newest and drops the rest, yet the period it sizes certificates to is the
    # camera's (the stamps'), not the interval between the frames it got to process.
    h = harness(**{'certify.max_subboxes': 4}).start()
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    pub = h.probe.create_publisher(Image, 'image', RELIABLE)
    big = (np.random.default_rng(1).random((240, 320)) * 255).astype(np.uint8)

    def send() -> None:
        i = h.sent
        msg = h.image(big)
        msg.header.stamp.sec, msg.header.stamp.nanosec = 500 + i // 30, (i % 30) * 33_333_333
        pub.publish(msg)

    assert h.spin_until(lambda: len(clouds) >= 3 and h.node.stats.counts['dropped'] > 0,
                        each=send, period=0.01)
    assert h.node.pipeline.frame_period_ms == pytest.approx(1000 / 30, rel=1e-6)


def test_worker_processes_publish_every_frame_in_order_with_its_header(harness):
    """``workers`` 2: frames certified in two processes, published in arrival order."""
    h = harness(workers=2, **{'certify.max_subboxes': 2}).start()
    assert h.node.pool is not None and h.node.pool.processes == 2
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    pub = h.probe.create_publisher(Image, 'image', RELIABLE)
    sent: list[Image] = []
    send = h.sender(pub, sent)

    assert h.spin_until(lambda: len(clouds) >= 8, each=send, period=0.01, timeout=60.0)
    assert _headers(clouds) <= _headers(sent)
    secs = [m.header.stamp.sec for m in clouds]
    assert secs == sorted(secs) and len(set(secs)) == len(secs)  # in order, once each
    for msg in clouds:
        _assert_boxes_hold_keypoints(decode_keypoints(msg))
    # A runtime change reaches the workers: uncertified keypoints from then on.
    assert h.node.set_parameters([Parameter('certify.enabled', value=False)])[0].successful
    before = len(clouds)
    assert h.spin_until(lambda: len(clouds) >= before + 6, each=send, period=0.01)
    assert (decode_keypoints(clouds[-1]).status == 3).all()  # SKIPPED
    assert h.node.stats.counts['errors'] == 0
    assert h.node.stats.info['workers_alive'] == '2'  # in /diagnostics
    assert h.node.stats.info['worker_restarts'] == '0'
    assert h.node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    assert h.node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert h.node.pool is None


def test_a_frame_past_its_deadline_is_published_uncertified_and_counted(harness):
    # A deadline no certificate can meet: the workers still publish every frame's keypoints,
    # at once, with status OUT_OF_BUDGET, and the node counts them; lifting it certifies again.
    h = harness(workers=2, **{'certify.deadline_ms': 0.001}).start()
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    pub = h.probe.create_publisher(Image, 'image', RELIABLE)
    send = h.sender(pub, [])
    assert h.spin_until(lambda: len(clouds) >= 4, each=send, period=0.01, timeout=60.0)
    for msg in clouds:
        dec = decode_keypoints(msg)
        assert (dec.status == 2).all() and np.isnan(dec.boxes).all()  # OUT_OF_BUDGET
        assert np.isfinite(dec.keypoints).all()
    assert h.node.stats.counts['out_of_budget'] >= 4 * len(dec.status)
    assert h.node.set_parameters([Parameter('certify.deadline_ms', value=0.0)])[0].successful
    before = len(clouds)
    assert h.spin_until(lambda: len(clouds) >= before + 6, each=send, period=0.01)
    assert (decode_keypoints(clouds[-1]).status == 1).all()  # CERTIFIED (no width limit)
    assert h.node.stats.counts['errors'] == 0


def test_reliable_and_best_effort_publishers_are_both_received(harness):
    h = harness().start()
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    pubs = {'reliable': h.probe.create_publisher(Image, 'image', RELIABLE),
            'best_effort': h.probe.create_publisher(Image, 'image', BEST_EFFORT)}
    seen = lambda: {m.header.frame_id for m in clouds}  # noqa: E731

    def send() -> None:
        # Publish from the kind not yet answered: alternating could alias with the node's
        # newest-frame-wins processing period and starve one kind under load.
        kind = 'reliable' if 'reliable' not in seen() else 'best_effort'
        pubs[kind].publish(h.image(frame_id=kind))

    assert h.spin_until(lambda: seen() == {'reliable', 'best_effort'}, each=send, period=0.1)


def test_qos_override_and_incompatible_publisher_is_reported(harness):
    h = harness(**{'qos_overrides./image.subscription.reliability': 'reliable'}).start()
    sub = h.node.input_subscription
    assert sub.qos_profile.reliability == ReliabilityPolicy.RELIABLE
    pub = h.probe.create_publisher(Image, 'image', BEST_EFFORT)  # cannot reach a reliable sub
    assert h.spin_until(lambda: h.node.stats.counts['incompatible_qos'] > 0, timeout=10.0,
                        each=lambda: pub.publish(h.image()))
    assert h.node.stats.counts['processed'] == 0
    status = h.node.stats.status('n')
    assert status.level == DiagnosticStatus.ERROR and 'RELIABILITY' in status.message
    # rclpy applies overrides by mutating the profile it is given: the node's shared default
    # must stay untouched, or every later node in this process would subscribe reliably.
    from usn_perception.ros import node as node_module

    assert node_module.INPUT_QOS.reliability == ReliabilityPolicy.BEST_EFFORT


def test_parameter_changes_apply_or_are_rejected_with_a_reason(harness):
    h = harness()
    assert h.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    node = h.node
    ok = node.set_parameters([Parameter('score_threshold', value=0.5),
                              Parameter('interval.mode', value='fixed'),
                              Parameter('interval.fixed_alpha', value=[0.9, 1.1])])
    assert all(r.successful for r in ok)
    settings = node.pipeline.settings
    assert settings.score_threshold == 0.5 and settings.interval.mode == 'fixed'
    assert settings.interval.fixed_alpha == (0.9, 1.1)

    rejected = {
        'score_threshold': (2.0, 'range'),
        'interval.mode': ('adaptive', 'mode'),
        'interval.fixed_alpha': ([1.2, 0.8], 'exceeds'),
        'interval.fixed_beta': ([0.1, 0.2], 'identity'),
        'certify.method': ('magic', 'method'),
        'readout': ('median', 'readout'),
        'model_path': ('/elsewhere.json', 'read-only'),
        'certify.max_subboxes': (0, 'range'),
        'certify.precision': ('half', 'precision'),
    }
    for name, (value, word) in rejected.items():
        result = node.set_parameters([Parameter(name, value=value)])[0]
        assert not result.successful, name
        assert word in result.reason.lower() or word in result.reason, (name, result.reason)
    assert node.pipeline.settings == settings  # nothing half-applied
    # float32 where it is not sound (here: float32 matmul precision lowered) is refused too.
    import torch
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('medium')
        result = node.set_parameters([Parameter('certify.precision', value='float32')])[0]
        assert not result.successful and 'matmul_precision' in result.reason, result.reason
    finally:
        torch.set_float32_matmul_precision(old)
    assert node.set_parameters([Parameter('certify.precision', value='float64')])[0].successful
    assert node.pipeline.settings.precision == 'float64'


def test_malformed_storm_is_counted_and_the_next_valid_frame_is_processed(harness):
    h = harness().start()
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    diags = h.listen(DiagnosticArray, '/diagnostics')
    pub = h.probe.create_publisher(Image, 'image', RELIABLE)
    nan = np.full((48, 64), 0.5, np.float32)
    nan[3, 4] = np.nan
    bad = [h.image(encoding='mono8') for _ in range(6)]
    bad[0].encoding = 'yuv422'
    bad[1].step = 10  # smaller than the width
    bad[2].data = bytes(100)  # size does not match height × step
    bad[3].height = 0
    bad[4] = h.image(nan, '32FC1')  # NaN pixels
    bad[5] = h.image(np.full((48, 64), 7.0, np.float32), '32FC1')  # not in [0, 1]
    stats = h.node.stats
    for i, msg in enumerate(bad, start=1):
        pub.publish(msg)  # one at a time, so none is dropped as stale
        assert h.spin_until(lambda i=i: stats.counts['malformed'] >= i, timeout=10.0), i
    good = h.image()
    assert h.spin_until(lambda: good.header.frame_id in {m.header.frame_id for m in clouds},
                        each=lambda: pub.publish(good), period=0.5)
    assert stats.counts['malformed'] == len(bad) and stats.counts['errors'] == 0

    def reported() -> bool:
        return any(status_values(d.status[0]).get('frames_malformed') == str(len(bad))
                   for d in diags)

    assert h.spin_until(reported, timeout=5.0)
    levels = {d.status[0].level for d in diags}
    assert DiagnosticStatus.WARN in levels


def test_debug_image_only_with_a_subscriber(harness):
    h = harness().start()
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    pub = h.probe.create_publisher(Image, 'image', RELIABLE)
    send = lambda: pub.publish(h.image())  # noqa: E731
    assert h.spin_until(lambda: len(clouds) >= 2, each=send)
    assert h.node.stats.counts['debug_images'] == 0
    debug = h.listen(Image, f'{NS}/debug_image')
    assert h.spin_until(lambda: bool(debug), each=send)
    img = debug[-1]
    assert img.encoding == 'bgr8' and (img.width, img.height) == (64, 48)
    assert image_to_numpy(img).shape == (48, 64, 3)
    assert img.header.frame_id.startswith('cam') and img.header.stamp.sec > 1000
    assert h.node.stats.counts['debug_images'] >= 1


def test_compressed_input_transport(harness):
    from sensor_msgs.msg import CompressedImage

    h = harness(input_transport='compressed').start()
    clouds = h.listen(PointCloud2, f'{NS}/keypoints')
    pub = h.probe.create_publisher(CompressedImage, 'image/compressed', RELIABLE)

    def send() -> None:
        msg = numpy_to_compressed(_frame(h.sent), 'png')
        h.sent += 1
        msg.header.frame_id = 'compressed'
        pub.publish(msg)

    assert h.spin_until(lambda: bool(clouds), each=send)
    assert clouds[0].header.frame_id == 'compressed'


def test_cuda_asked_for_but_absent_fails_configure(harness):
    if torch.cuda.is_available():
        pytest.skip('CUDA is available here')
    h = harness(device='cuda')
    assert h.node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert 'CUDA is not available' in (h.node.stats.error or '')


@pytest.mark.slow
def test_installed_node_runs_as_the_launch_file_starts_it(
        ros_domain, tiny_model, tmp_path: Path):
    """Build with colcon, start the installed executable with the params file and a remap."""
    colcon = Path(sys.prefix) / 'bin' / 'colcon'
    if not colcon.exists():
        pytest.skip('colcon is not installed in this environment')
    ws = tmp_path / 'ws'
    shutil.copytree(REPO, ws / 'src' / 'usn_perception', ignore=shutil.ignore_patterns(
        '.venv', 'build', 'install', 'log', '.git', '__pycache__', '*.egg-info'))
    env = {**os.environ, 'HOME': str(tmp_path), 'COLCON_HOME': str(tmp_path / 'colcon'),
           'PYTHONNOUSERSITE': '1'}
    build = subprocess.run([str(colcon), '--log-base', 'log', 'build', '--base-paths', 'src',
                            '--event-handlers', 'console_direct-'],
                           cwd=ws, env=env, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    prefix = ws / 'install' / 'usn_perception'
    exe = prefix / 'lib' / 'usn_perception' / 'usn_perception_node'
    params = prefix / 'share' / 'usn_perception' / 'config' / 'usn_perception.yaml'
    assert exe.is_file(), 'setup.py lacks the usn_perception_node console script'
    assert params.is_file()
    cmd = (f'source "{ws}/install/setup.bash" && exec "{exe}" --ros-args --params-file '
           f'"{params}" -r image:=/cam/image -p model_path:={tiny_model} '
           '-p certify.max_subboxes:=1 -p certify.budget_ms:=0.0 -p certify.deadline_ms:=0.0')
    proc = subprocess.Popen(['bash', '-c', cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    ctx = Context()
    rclpy.init(context=ctx)
    probe = Node('installed_probe', context=ctx)
    executor = SingleThreadedExecutor(context=ctx)
    executor.add_node(probe)
    try:
        clouds: list = []
        probe.create_subscription(PointCloud2, f'{NS}/keypoints', clouds.append, RELIABLE)
        pub = probe.create_publisher(Image, '/cam/image', RELIABLE)
        deadline = time.monotonic() + 60.0
        n = 0
        while time.monotonic() < deadline and not clouds and proc.poll() is None:
            n += 1
            msg = numpy_to_image(_frame(n), 'mono8')
            msg.header.frame_id, msg.header.stamp.sec = 'installed', n
            pub.publish(msg)
            executor.spin_once(timeout_sec=0.2)
        assert proc.poll() is None, proc.stdout.read()
        assert clouds and clouds[0].header.frame_id == 'installed'
        assert decode_keypoints(clouds[0]).keypoints.shape == (5, 2)
        # Stopped mid-stream (as ros2 launch stops it): a SIGTERM that lands while a frame is
        # processed must still be a clean exit, not a traceback.
        for k in range(10):
            msg = numpy_to_image(_frame(n + k), 'mono8')
            msg.header.frame_id, msg.header.stamp.sec = 'installed', n + k + 1
            pub.publish(msg)
            executor.spin_once(timeout_sec=0.02)
        workers = _children(proc.pid)  # the parameter file's two workers (+ multiprocessing's
        assert len(workers) >= 2, workers  # resource tracker): none may outlive the node
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and 'Traceback' not in out, out[-3000:]
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and any(_alive(w) for w in workers):
            time.sleep(0.1)
        assert not any(_alive(w) for w in workers), 'worker processes outlived the node'
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
        executor.shutdown()
        probe.destroy_node()
        rclpy.shutdown(context=ctx)


def _children(pid: int) -> list[int]:
    return [int(c) for task in Path(f'/proc/{pid}/task').glob('*/children')
            for c in task.read_text().split()]


def _alive(pid: int) -> bool:
    """Running (not gone, not a zombie waiting to be reaped)."""
    try:
        state = Path(f'/proc/{pid}/stat').read_text().rsplit(')', 1)[1].split()[0]
    except OSError:
        return False
    return state != 'Z'


_STOP_SCRIPT = '''
import sys
import rclpy
from rclpy.executors import SingleThreadedExecutor
from usn_perception.ros import node

def spin(self):
    if sys.argv[1] == 'shutdown-first':
        rclpy.shutdown()  # what a SIGTERM does, racing the executor's next wait
    raise RuntimeError('failed to initialize wait set: the given context is not valid')

SingleThreadedExecutor.spin = spin
sys.exit(node.main(['usn_perception_node', '--ros-args', '-p', 'model_path:=' + sys.argv[2]]))
'''


@pytest.mark.parametrize('mode', ['shutdown-first', 'real-error'])
def test_stop_during_a_frame_is_clean_and_real_errors_still_surface(
        ros_domain, tiny_model, mode):
    """rclpy raises RCLError, not ExternalShutdownException, when SIGTERM lands mid-frame."""
    run = subprocess.run([sys.executable, '-c', _STOP_SCRIPT, mode, str(tiny_model)],
                         capture_output=True, text=True, timeout=120, env=os.environ)
    if mode == 'shutdown-first':
        assert run.returncode == 0 and 'Traceback' not in run.stderr, run.stderr[-2000:]
    else:
        assert run.returncode != 0 and 'context is not valid' in run.stderr

"""Lockstep replay through the real node equals the offline evaluation, frame for frame.

The node runs in this process (its own rclpy Context and ROS domain, loopback DDS) on an
executor thread, as the replayer talks to it over real DDS: /clock plus the raw CDR of every
frame in, keypoints and Θ out. The comparison is exact on the wire values (float32 x, y and
score; float64 boxes; float32-representable Θ).
"""

from __future__ import annotations

import threading
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip('rclpy')

import rclpy  # noqa: E402
import torch  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import SingleThreadedExecutor  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402

from usn_perception.bag.evaluate import evaluate_bag  # noqa: E402
from usn_perception.bag.outputs import compare_outputs, read_outputs  # noqa: E402
from usn_perception.bag.replay import (  # noqa: E402
    ReplayError,
    input_topics,
    node_parameters,
    replay_bag,
    settings_from_info,
)
from usn_perception.bag.sources import synthetic_source  # noqa: E402
from usn_perception.bag.write import BagSpec, write_image_bag  # noqa: E402
from usn_perception.detector import load_detector  # noqa: E402
from usn_perception.model_io import save_model  # noqa: E402
from usn_perception.network import DetectorConfig, build_network  # noqa: E402
from usn_perception.pipeline import PipelineSettings  # noqa: E402
from usn_perception.ros.node import UsnPerceptionNode  # noqa: E402

pytestmark = pytest.mark.ros
SETTINGS = PipelineSettings(max_subboxes=1)


@pytest.fixture(scope='module')
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small random detector on disk."""
    torch.manual_seed(0)
    config = DetectorConfig(input_size=(64, 48), widths=(8,) * 9)
    return save_model(build_network(config).eval(), config,
                      tmp_path_factory.mktemp('model') / 'model.json')


class InProcessNode:
    """usn_perception_node in this process, listening where a replay will publish."""

    def __init__(self, model: Path, image: str, input_topic: str, compressed: bool) -> None:
        self.ctx = Context()
        rclpy.init(context=self.ctx)
        params = {**node_parameters(SETTINGS, str(model)),
                  f'qos_overrides.{input_topic}.subscription.reliability': 'reliable'}
        if compressed:
            params['input_transport'] = 'compressed'
        self.node = UsnPerceptionNode(
            context=self.ctx, cli_args=['--ros-args', '-r', f'image:={image}'],
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
        assert self.node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert self.node.trigger_activate() == TransitionCallbackReturn.SUCCESS
        self.executor = SingleThreadedExecutor(context=self.ctx)
        self.executor.add_node(self.node)
        self.thread = threading.Thread(target=self.executor.spin, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.executor.shutdown()
        self.thread.join(timeout=10)
        self.node.destroy_node()
        rclpy.shutdown(context=self.ctx)


@pytest.mark.parametrize('storage,compression', [('mcap', None), ('sqlite3', 'png')])
def test_lockstep_replay_equals_offline_frame_for_frame(ros_domain, model, tmp_path, storage,
                                                        compression):
    topic = '/cam/image_raw' + ('/compressed' if compression else '')
    src = synthetic_source(10, (96, 72), pattern='sine')
    bag = write_image_bag(tmp_path / 'bag', src.frames,
                          BagSpec(topic=topic, storage=storage, compression=compression))['bag']
    msgtype = 'sensor_msgs/msg/CompressedImage' if compression else 'sensor_msgs/msg/Image'
    publish, image = input_topics(topic, msgtype)
    node = InProcessNode(model, image, publish, bool(compression))
    try:
        res = replay_bag(bag, tmp_path / 'replay', topic=topic, publish_topic=publish,
                         context=node.ctx, timeout_s=30.0)
    finally:
        node.close()
    s = res.summary
    assert res.complete and s['frames_sent'] == 10 and s['outputs_recorded'] == 10
    assert s['unexpected'] == 0 and s['warnings'] == []
    # the info names the effective readout (the model's, soft-argmax, for readout None)
    assert settings_from_info(res.info) == replace(SETTINGS, readout='soft-argmax')

    evaluate_bag(bag, tmp_path / 'offline', topic=topic, detector=load_detector(model),
                 settings=SETTINGS, plots=False)
    offline = read_outputs(tmp_path / 'offline' / 'keypoints.mcap')
    replayed = read_outputs(tmp_path / 'replay' / 'keypoints.mcap')
    cmp = compare_outputs(offline, replayed)
    assert cmp['equal'], cmp
    assert cmp['identical'] == 10
    # recorded at the input's log time, with the input header
    assert [f.log_time_ns for f in replayed.frames] == [f.log_time_ns for f in offline.frames]
    # the measured interval moved: Θ differs between frames (the window saw the lighting)
    assert len({f.alpha for f in replayed.frames}) > 1


def test_replay_without_a_node_says_what_is_missing(ros_domain, model, tmp_path):
    src = synthetic_source(2, (64, 48))
    bag = write_image_bag(tmp_path / 'bag', src.frames, BagSpec())['bag']
    with pytest.raises(ReplayError, match=r'no usn_perception node answered within 0.5 s: '
                                          r'0 subscriber\(s\) on /camera/image_raw'):
        replay_bag(bag, tmp_path / 'out', topic='/camera/image_raw', connect_timeout_s=0.5)
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_cli_replay_spawns_the_node_and_checks_against_offline(ros_domain, model, tmp_path):
    """The whole CLI path: start usn_perception_node, replay, stop it, compare offline."""
    import json

    from usn_perception.cli import main as cli_main

    src = synthetic_source(4, (64, 48))
    bag = write_image_bag(tmp_path / 'bag', src.frames, BagSpec())['bag']
    out = tmp_path / 'replay'
    assert cli_main(['replay', str(bag), '--topic', '/camera/image_raw', '--spawn', '--model',
                     str(model), '--max-subboxes', '1', '--compare-offline', '--out',
                     str(out)]) == 0
    cmp = json.loads((out / 'comparison.json').read_text())
    assert cmp['equal'] and cmp['identical'] == 4
    assert 'listening on /camera/image_raw' in (out / 'node.log').read_text()
    assert (out / 'offline' / 'frames.csv').is_file()

"""Lockstep replay through the real node equals the offline evaluation, frame for frame.

The node and the replayer talk over real loopback DDS in a ROS domain of the test's own:
/clock plus the raw CDR of every frame in, keypoints and Θ out. They run in a child Python
process (this file run as a script: the node in-process on an executor thread, the replay
beside it). The pytest process never starts DDS itself: Fast DDS leaves native threads behind
(``dds.shm.wdog``), and a later test that forks (ament_flake8's worker pool) could then crash
in the child. The comparison is exact on the wire values (float32 x, y and score; float64
boxes; float32-representable Θ).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path

import pytest

pytest.importorskip('rclpy')

from usn_perception.pipeline import PipelineSettings  # noqa: E402

pytestmark = pytest.mark.ros
SETTINGS = PipelineSettings(max_subboxes=1)


def _child(args: dict) -> dict:
    """Child process: start the node (unless ``no_node``), replay, report as JSON."""
    import rclpy
    import torch
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.lifecycle import TransitionCallbackReturn
    from rclpy.parameter import Parameter

    from usn_perception.bag.replay import ReplayError, node_parameters, replay_bag
    from usn_perception.ros.node import UsnPerceptionNode

    torch.set_num_threads(1)
    ctx = Context()
    rclpy.init(context=ctx)
    node = executor = thread = None
    try:
        if not args['no_node']:
            params = {**node_parameters(SETTINGS, args['model']),
                      f'qos_overrides.{args["publish"]}.subscription.reliability': 'reliable'}
            if args['compressed']:
                params['input_transport'] = 'compressed'
            node = UsnPerceptionNode(
                context=ctx, cli_args=['--ros-args', '-r', f'image:={args["image"]}'],
                parameter_overrides=[Parameter(k, value=v) for k, v in params.items()])
            assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
            assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
            executor = SingleThreadedExecutor(context=ctx)
            executor.add_node(node)
            thread = threading.Thread(target=executor.spin, daemon=True)
            thread.start()
        try:
            res = replay_bag(args['bag'], args['out'], topic=args['topic'],
                             publish_topic=args['publish'], context=ctx, timeout_s=30.0,
                             connect_timeout_s=args['connect_timeout'])
            return {'summary': res.summary, 'complete': res.complete, 'info': res.info}
        except ReplayError as exc:
            return {'error': str(exc)}
    finally:
        if executor is not None:
            executor.shutdown()
            thread.join(timeout=10)
        if node is not None:
            node.destroy_node()
        rclpy.shutdown(context=ctx)


def replay_in_child(tmp_path: Path, **args) -> dict:
    """Run :func:`_child` in a fresh interpreter (inherits the test's ROS domain)."""
    spec = tmp_path / 'child.json'
    spec.write_text(json.dumps({'no_node': False, 'compressed': False, 'model': None,
                                'connect_timeout': 30.0, **args}, default=str))
    proc = subprocess.run([sys.executable, __file__, str(spec)], capture_output=True,
                          text=True, timeout=240, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope='module')
def model(tiny_model: Path) -> Path:
    """The shared tiny random detector (see conftest)."""
    return tiny_model


@pytest.mark.parametrize('storage,compression', [('mcap', None), ('sqlite3', 'png')])
def test_lockstep_replay_equals_offline_frame_for_frame(ros_domain, model, tmp_path, storage,
                                                        compression):
    from usn_perception.bag.evaluate import evaluate_bag
    from usn_perception.bag.outputs import compare_outputs, read_outputs
    from usn_perception.bag.replay import input_topics, settings_from_info
    from usn_perception.bag.sources import synthetic_source
    from usn_perception.bag.write import BagSpec, write_image_bag
    from usn_perception.detector import load_detector

    topic = '/cam/image_raw' + ('/compressed' if compression else '')
    src = synthetic_source(10, (96, 72), pattern='sine')
    bag = write_image_bag(tmp_path / 'bag', src.frames,
                          BagSpec(topic=topic, storage=storage, compression=compression))['bag']
    msgtype = 'sensor_msgs/msg/CompressedImage' if compression else 'sensor_msgs/msg/Image'
    publish, image = input_topics(topic, msgtype)
    res = replay_in_child(tmp_path, bag=bag, out=tmp_path / 'replay', topic=topic,
                          publish=publish, image=image, model=model,
                          compressed=bool(compression))
    s = res['summary']
    assert res['complete'] and s['frames_sent'] == 10 and s['outputs_recorded'] == 10
    assert s['unexpected'] == 0 and s['warnings'] == []
    # the info names the effective readout (the model's, for readout None)
    effective = load_detector(model).readout
    assert settings_from_info(res['info']) == replace(SETTINGS, readout=effective)

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


def test_replay_without_a_node_says_what_is_missing(ros_domain, tmp_path):
    from usn_perception.bag.sources import synthetic_source
    from usn_perception.bag.write import BagSpec, write_image_bag

    bag = write_image_bag(tmp_path / 'bag', synthetic_source(2, (64, 48)).frames,
                          BagSpec())['bag']
    res = replay_in_child(tmp_path, bag=bag, out=tmp_path / 'out', topic='/camera/image_raw',
                          publish='/camera/image_raw', image='', no_node=True,
                          connect_timeout=0.5)
    assert res['error'].startswith('no usn_perception node answered within 0.5 s: '
                                   '0 subscriber(s) on /camera/image_raw')
    assert not (tmp_path / 'out').exists()


@pytest.mark.slow
def test_cli_replay_spawns_the_node_and_checks_against_offline(ros_domain, model, tmp_path):
    """The whole CLI path: start usn_perception_node, replay, stop it, compare offline."""
    from usn_perception.bag.sources import synthetic_source
    from usn_perception.bag.write import BagSpec, write_image_bag

    bag = write_image_bag(tmp_path / 'bag', synthetic_source(4, (64, 48)).frames,
                          BagSpec())['bag']
    out = tmp_path / 'replay'
    proc = subprocess.run(
        [sys.executable, '-m', 'usn_perception.cli', 'replay', str(bag), '--topic',
         '/camera/image_raw', '--spawn', '--model', str(model), '--max-subboxes', '1',
         '--compare-offline', '--out', str(out)],
        capture_output=True, text=True, timeout=300, env={**os.environ, 'OMP_NUM_THREADS': '1'})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    cmp = json.loads((out / 'comparison.json').read_text())
    assert cmp['equal'] and cmp['identical'] == 4
    assert 'listening on /camera/image_raw' in (out / 'node.log').read_text()
    assert (out / 'offline' / 'frames.csv').is_file()


if __name__ == '__main__':
    print(json.dumps(_child(json.loads(Path(sys.argv[1]).read_text())), default=str))


def test_every_setting_survives_node_parameters_and_the_info_document(model):
    """Replays rebuild the pipeline from node parameters and from the node's info document:
    no setting may fall back to a default on the way (exact_values once did)."""
    from usn_perception.bag.replay import node_parameters, settings_from_info
    from usn_perception.detector import load_detector
    from usn_perception.interval import IntervalSettings
    from usn_perception.pipeline import FramePipeline
    from usn_perception.ros.node import PARAMETERS, settings_from

    odd = PipelineSettings(readout='argmax', certify=True, method='ibp', max_subboxes=7,
                           budget_ms=12.5, deadline_ms=30.0, max_width_px=3.5,
                           exact_values=3, level_nodes=5,
                           precision='float64', score_threshold=0.25,
                           interval=IntervalSettings(mode='fixed', fixed_alpha=(0.9, 1.3),
                                                     fixed_beta=(-0.05, 0.07),
                                                     margin_alpha=0.03, margin_beta=0.01,
                                                     window_s=2.5, max_residual=0.05))
    params = node_parameters(odd)
    values = {name: spec.default for name, spec in PARAMETERS.items()}
    values.update({k: v for k, v in params.items() if k in PARAMETERS})
    assert settings_from(values) == odd
    info = FramePipeline(load_detector(model), odd).describe()
    assert settings_from_info(json.loads(json.dumps(info))) == odd

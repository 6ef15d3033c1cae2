"""make-bag and eval-bag: storages, compression, determinism, labels, the output MCAP.

Bags are generated here (a 10-frame synthetic run with a scripted lighting change), the model
is a tiny random network, and certification bounds one θ box per frame, so every evaluation
takes about a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from usn_perception.bag.evaluate import evaluate_bag
from usn_perception.bag.outputs import compare_outputs, read_outputs
from usn_perception.bag.read import BagReader, iter_frames
from usn_perception.bag.sources import lighting, synthetic_source
from usn_perception.bag.write import BagSpec, write_image_bag
from usn_perception.cli import main as cli_main
from usn_perception.detector import load_detector
from usn_perception.pipeline import PipelineSettings

FAST = PipelineSettings(max_subboxes=1)
N = 10


@pytest.fixture(scope='module')
def model(tiny_model: Path) -> Path:
    """The shared tiny random detector (see conftest)."""
    return tiny_model


def make(out: Path, **spec) -> dict:
    src = synthetic_source(N, (96, 72), seed=1, pattern='step')
    return write_image_bag(out, src.frames, BagSpec(**spec), keypoint_names=src.keypoint_names,
                           info=src.info)


@pytest.fixture(scope='module')
def bags(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same frames as mcap/Image, sqlite3/Image and sqlite3/CompressedImage (png)."""
    root = tmp_path_factory.mktemp('bags')
    return {'mcap': make(root / 'mcap')['bag'],
            'sqlite3': make(root / 'db3', storage='sqlite3')['bag'],
            'png': make(root / 'png', storage='sqlite3', compression='png',
                        topic='/camera/image_raw/compressed')['bag']}


def run(bag: Path, out: Path, model: Path, topic: str = '/camera/image_raw', **kw):
    return evaluate_bag(bag, out, topic=topic, detector=load_detector(model), settings=FAST,
                        plots=False, **kw)


def test_make_bag_stamps_labels_and_known_lighting(bags):
    with BagReader(bags['mcap']) as r:
        assert r.storage == 'mcap'
        frames = list(iter_frames(r, '/camera/image_raw'))
    assert [f.index for f in frames] == list(range(N))
    assert [f.stamp_ns - frames[0].stamp_ns for f in frames] == [round(i * 1e9 / 30)
                                                                 for i in range(N)]
    assert all(f.log_time_ns == f.stamp_ns and f.frame_id == 'camera' for f in frames)
    assert frames[0].image.shape == (72, 96) and frames[0].image.dtype == np.uint8
    labels = json.loads((bags['mcap'] / 'labels.json').read_text())
    assert [im['stamp_ns'] for im in labels['images']] == [f.stamp_ns for f in frames]
    thetas = lighting('step', N, 0.3, 0.1)
    assert [(im['alpha'], im['beta']) for im in labels['images']] == thetas
    # frame i is clip(alpha_i * x + beta_i) of one frame x: the step shows in the pixels
    assert frames[-1].image.mean() > frames[0].image.mean()


def test_storages_and_compression_evaluate_identically(bags, model, tmp_path):
    outs = {name: run(bag, tmp_path / name, model,
                      topic='/camera/image_raw/compressed' if name == 'png'
                      else '/camera/image_raw')
            for name, bag in bags.items()}
    csv = {name: (tmp_path / name / 'frames.csv').read_bytes() for name in outs}
    assert csv['mcap'] == csv['sqlite3'] == csv['png']
    assert outs['sqlite3'].summary['bag']['storage'] == 'sqlite3'
    assert outs['png'].summary['bag']['msgtype'] == 'sensor_msgs/msg/CompressedImage'
    a, b = read_outputs(tmp_path / 'mcap' / 'keypoints.mcap'), read_outputs(
        tmp_path / 'png' / 'keypoints.mcap')
    assert compare_outputs(a, b)['equal']


def test_same_bag_and_options_give_byte_identical_outputs(bags, model, tmp_path):
    first = run(bags['mcap'], tmp_path / 'a', model)
    run(bags['mcap'], tmp_path / 'b', model)
    for name in ('frames.csv', 'keypoints.mcap'):
        assert (tmp_path / 'a' / name).read_bytes() == (tmp_path / 'b' / name).read_bytes()
    assert first.summary['frames'] == N and not first.partial
    header = (tmp_path / 'a' / 'frames.csv').read_text().splitlines()[0]
    assert 'ms' not in header and 'total' not in header  # timings live elsewhere
    assert (tmp_path / 'a' / 'timings.csv').read_text().startswith('frame,stamp_ns,')


def test_output_mcap_reads_back_with_rosbags_and_mcap(bags, model, tmp_path):
    ev = run(bags['mcap'], tmp_path / 'e', model)
    path = tmp_path / 'e' / 'keypoints.mcap'
    outs = read_outputs(path)  # rosbags
    assert len(outs.frames) == N and outs.info['keypoint_names'][0] == 'top_left'
    for f, rec in zip(outs.frames, ev.records, strict=True):
        assert f.stamp_ns == rec.stamp_ns == f.log_time_ns and f.frame_id == 'camera'
        np.testing.assert_array_equal(f.keypoints, rec.result.keypoints.astype(np.float32))
        np.testing.assert_array_equal(f.boxes, rec.result.boxes)
        assert (f.alpha, f.beta) == (rec.result.interval.alpha, rec.result.interval.beta)

    from mcap.reader import make_reader
    from mcap_ros2.decoder import DecoderFactory

    from usn_perception.ros.photometric import polygon_to_interval
    from usn_perception.ros.pointcloud import decode_keypoints

    seen: dict[str, list] = {}
    with open(path, 'rb') as fh:
        reader = make_reader(fh, decoder_factories=[DecoderFactory()])
        for _, channel, message, msg in reader.iter_decoded_messages():
            seen.setdefault(channel.topic, []).append((message.log_time, msg))
    assert sorted(seen) == ['/usn_perception/keypoints', '/usn_perception/keypoints/info',
                            '/usn_perception/photometric_interval']
    for (t, msg), f in zip(seen['/usn_perception/keypoints'], outs.frames, strict=True):
        kp = decode_keypoints(msg)
        assert t == f.log_time_ns
        np.testing.assert_array_equal(kp.boxes, f.boxes)
        np.testing.assert_array_equal(kp.keypoints, f.keypoints)
    t, msg = seen['/usn_perception/photometric_interval'][-1]
    assert polygon_to_interval(msg) == (outs.frames[-1].alpha, outs.frames[-1].beta)


def test_labels_scores_and_report(bags, model, tmp_path):
    ev = evaluate_bag(bags['mcap'], tmp_path / 'r', topic='/camera/image_raw',
                      detector=load_detector(model), settings=FAST,
                      labels=bags['mcap'] / 'labels.json', tolerances=(2.0, 50.0))
    s = ev.summary
    assert s['labels']['frames_labelled'] == N and s['labels']['keypoints'] == 5 * N
    assert set(s['labels']['pck']) == {'2', '50'}
    assert s['theta_truth']['pairs'] > N
    rows = (tmp_path / 'r' / 'frames.csv').read_text().splitlines()
    assert len(rows) == 1 + 5 * N and rows[1].split(',')[24] != ''  # error_px filled
    for name in ('report.md', 'summary.json', 'certified_over_time.png', 'theta_over_time.png',
                 'latency_hist.png', 'error_vs_box.png'):
        assert (tmp_path / 'r' / name).is_file(), name
    assert 'PARTIAL' not in (tmp_path / 'r' / 'report.md').read_text()


def test_cli_make_bag_and_eval_bag(model, tmp_path, capsys):
    bag = tmp_path / 'cli_bag'
    assert cli_main(['make-bag', '--synthetic', '4', '--size', '64,48', '--storage', 'sqlite3',
                     '--encoding', 'rgb8', '--rate', '10', '--out', str(bag)]) == 0
    assert cli_main(['eval-bag', str(bag), '--topic', '/camera/image_raw', '--model',
                     str(model), '--labels', str(bag / 'labels.json'), '--max-subboxes', '1',
                     '--start', '0.1', '--no-plots', '--out', str(tmp_path / 'ev')]) == 0
    summary = json.loads((tmp_path / 'ev' / 'summary.json').read_text())
    assert summary['frames'] == 3 and summary['bag']['start'] == 0.1  # --start 0.1 s skips one
    assert 'certified fraction' in capsys.readouterr().out
    assert cli_main(['make-bag', '--synthetic', '4', '--out', str(bag)]) == 1  # exists

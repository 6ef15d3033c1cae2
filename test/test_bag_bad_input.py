"""Bad input to eval-bag: every case fails with a precise error, or is kept and marked partial."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from usn_perception.bag.errors import (
    BagError,
    CorruptBagError,
    EmptyBagError,
    LabelMismatchError,
    MessageTypeError,
    TopicNotFoundError,
)
from usn_perception.bag.evaluate import PartialEvaluationError, evaluate_bag
from usn_perception.bag.messages import IMAGE, make_header, serialize, typestore
from usn_perception.bag.sources import synthetic_source
from usn_perception.bag.write import BagSpec, write_image_bag
from usn_perception.cli import main as cli_main
from usn_perception.detector import load_detector
from usn_perception.pipeline import PipelineSettings

FAST = PipelineSettings(max_subboxes=1)
TOPIC = '/camera/image_raw'


@pytest.fixture(scope='module')
def model(tiny_model: Path) -> Path:
    """The shared tiny random detector (see conftest)."""
    return tiny_model


@pytest.fixture(scope='module')
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A valid 4-frame bag with labels."""
    src = synthetic_source(4, (64, 48))
    return write_image_bag(tmp_path_factory.mktemp('good') / 'bag', src.frames, BagSpec(),
                           keypoint_names=src.keypoint_names, info=src.info)['bag']


def evaluate(bag: Path, out: Path, model: Path, topic: str = TOPIC, **kw):
    return evaluate_bag(bag, out, topic=topic, detector=load_detector(model), settings=FAST,
                        plots=False, **kw)


def raw_bag(path: Path, topics: dict[str, str], messages: list[tuple[str, int, bytes]],
            storage: str = 'mcap') -> Path:
    """A bag written message by message (for contents make-bag would never produce)."""
    from rosbags.rosbag2 import StoragePlugin, Writer

    plugin = StoragePlugin.MCAP if storage == 'mcap' else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as w:
        conns = {t: w.add_connection(t, ty, typestore=typestore()) for t, ty in topics.items()}
        for topic, t, raw in messages:
            w.write(conns[topic], t, raw)
    return path


def test_missing_topic_lists_the_topics_of_the_bag(good, model, tmp_path):
    with pytest.raises(TopicNotFoundError) as err:
        evaluate(good, tmp_path / 'out', model, topic='/camera/color/image_raw')
    text = str(err.value)
    assert str(good) in text and "'/camera/color/image_raw'" in text
    assert '/camera/image_raw (sensor_msgs/msg/Image, 4 msgs)' in text
    assert not (tmp_path / 'out').exists()


def test_wrong_message_type(model, tmp_path):
    from std_msgs.msg import String

    bag = raw_bag(tmp_path / 'strings', {'/chatter': 'std_msgs/msg/String'},
                  [('/chatter', 10**9, serialize(String(data='hi'), 'std_msgs/msg/String'))])
    with pytest.raises(MessageTypeError, match=r"'/chatter' carries std_msgs/msg/String, not "
                                               r'sensor_msgs/msg/Image'):
        evaluate(bag, tmp_path / 'out', model, topic='/chatter')


def test_empty_bag_and_empty_topic_and_empty_window(good, model, tmp_path):
    bag = raw_bag(tmp_path / 'nothing', {}, [], storage='sqlite3')
    with pytest.raises(EmptyBagError, match='holds no topics and no messages'):
        evaluate(bag, tmp_path / 'o1', model)
    bag = raw_bag(tmp_path / 'no_msgs', {TOPIC: IMAGE}, [])
    with pytest.raises(EmptyBagError, match=f"topic '{TOPIC}' holds no messages"):
        evaluate(bag, tmp_path / 'o2', model)
    with pytest.raises(EmptyBagError, match='between 100.0 s and None s'):
        evaluate(good, tmp_path / 'o3', model, start=100.0)
    assert not any((tmp_path / f'o{i}').exists() for i in (1, 2, 3))


def test_not_a_bag(tmp_path, model):
    (tmp_path / 'junk.mcap').write_bytes(b'definitely not mcap')
    with pytest.raises(CorruptBagError, match='junk.mcap: cannot open the bag'):
        evaluate(tmp_path / 'junk.mcap', tmp_path / 'o', model)
    with pytest.raises(BagError, match='no such bag'):
        evaluate(tmp_path / 'missing', tmp_path / 'o', model)
    (tmp_path / 'folder').mkdir()
    with pytest.raises(BagError, match='not a bag folder'):
        evaluate(tmp_path / 'folder', tmp_path / 'o', model)


@pytest.fixture(scope='module')
def truncated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 24-frame MCAP bag (two 1 MiB chunks) cut at 70 %: the recorder died mid-write."""
    src = synthetic_source(24, (320, 240))
    bag = write_image_bag(tmp_path_factory.mktemp('trunc') / 'bag', src.frames, BagSpec(),
                          keypoint_names=src.keypoint_names, info=src.info)['bag']
    data = (bag / 'bag.mcap').read_bytes()
    (bag / 'bag.mcap').write_bytes(data[:int(len(data) * 0.7)])
    return bag


def test_truncated_mcap_keeps_partial_outputs_marked_partial(truncated, model, tmp_path):
    out = tmp_path / 'out'
    with pytest.raises(PartialEvaluationError) as err:
        evaluate(truncated, out, model, labels=truncated / 'labels.json')
    frames = err.value.frames
    assert 0 < frames < 24 and f'{frames} frames processed' in str(err.value)
    assert 'truncated MCAP file' in str(err.value)
    summary = json.loads((out / 'summary.json').read_text())
    assert summary['partial'] and summary['frames'] == frames
    assert (out / 'PARTIAL').is_file() and '**PARTIAL RUN**' in (out / 'report.md').read_text()
    assert len((out / 'frames.csv').read_text().splitlines()) == 1 + 5 * frames
    from usn_perception.bag.outputs import read_outputs

    assert len(read_outputs(out / 'keypoints.mcap').frames) == frames
    # the CLI reports it and exits 2 (partial outputs written), not 0 or 1
    assert cli_main(['eval-bag', str(truncated), '--topic', TOPIC, '--model', str(model),
                     '--max-subboxes', '1', '--no-plots', '--out', str(tmp_path / 'cli')]) == 2


def test_truncated_sqlite_fails_without_outputs(good, model, tmp_path):
    import shutil

    bag = tmp_path / 'db'
    src = synthetic_source(4, (64, 48))
    write_image_bag(bag, src.frames, BagSpec(storage='sqlite3'))
    db = bag / 'db.db3'
    db.write_bytes(db.read_bytes()[:db.stat().st_size // 2])
    with pytest.raises(CorruptBagError, match='database disk image is malformed') as err:
        evaluate(bag, tmp_path / 'out', model)
    assert err.value.frames_read == 0 and not (tmp_path / 'out').exists()
    assert cli_main(['eval-bag', str(bag), '--topic', TOPIC, '--model', str(model),
                     '--out', str(tmp_path / 'cli')]) == 1
    shutil.rmtree(bag)


def test_folder_without_metadata_reads_its_storage_file(good, model, tmp_path):
    import shutil

    bag = tmp_path / 'killed'
    shutil.copytree(good, bag)
    (bag / 'metadata.yaml').unlink()
    assert evaluate(bag, tmp_path / 'out', model).summary['frames'] == 4


def test_labels_that_do_not_match_the_bag_stamps(good, model, tmp_path):
    other = write_image_bag(tmp_path / 'other', synthetic_source(4, (64, 48)).frames,
                            BagSpec(start_ns=5 * 10**18))  # same frames, other stamps
    src = synthetic_source(4, (64, 48))
    labelled = write_image_bag(tmp_path / 'labelled', src.frames, BagSpec(start_ns=5 * 10**18),
                               keypoint_names=src.keypoint_names)
    with pytest.raises(LabelMismatchError) as err:
        evaluate(good, tmp_path / 'out', model, labels=labelled['labels'])
    text = str(err.value)
    assert str(labelled['labels']) in text and str(good) in text
    assert 'none of its 4 labels is a frame' in text
    assert not (tmp_path / 'out').exists()
    assert other['frames'] == 4
    # labels at the right times but another rate: stamps fall between the frames
    src = synthetic_source(4, (64, 48))
    fast = write_image_bag(tmp_path / 'fast', src.frames, BagSpec(rate=60.0),
                           keypoint_names=src.keypoint_names)
    with pytest.raises(LabelMismatchError, match='2 of 4 labels name stamps between the frames'):
        evaluate(good, tmp_path / 'out', model, labels=fast['labels'])
    # a COCO file without stamps is refused with the reason
    from usn_perception.errors import DatasetError

    doc = json.loads(labelled['labels'].read_text())
    for im in doc['images']:
        del im['stamp_ns']
    (tmp_path / 'nostamp.json').write_text(json.dumps(doc))
    with pytest.raises(DatasetError, match='no integer stamp_ns'):
        evaluate(good, tmp_path / 'out', model, labels=tmp_path / 'nostamp.json')


def test_undecodable_frames_are_counted_and_the_rest_evaluated(model, tmp_path):
    from usn_perception.ros.conversions import numpy_to_image

    msgs = []
    for i in range(3):
        img = numpy_to_image(np.full((48, 64), 40 * i + 20, np.uint8), 'mono8',
                             make_header(100 + i, 0, 'cam'))
        if i == 1:
            img.encoding = 'bayer_rggb8'
        msgs.append((TOPIC, (100 + i) * 10**9, serialize(img, IMAGE)))
    bag = raw_bag(tmp_path / 'mixed', {TOPIC: IMAGE}, msgs)
    ev = evaluate(bag, tmp_path / 'out', model)
    assert ev.summary['frames'] == 3 and ev.summary['frames_malformed'] == 1
    rows = (tmp_path / 'out' / 'frames.csv').read_text().splitlines()
    bad = [r for r in rows if ',MALFORMED,' in r]
    assert len(bad) == 1 and "unsupported encoding 'bayer_rggb8'" in bad[0]

"""Training: a tiny real run lowers the loss, is deterministic, and writes a loadable model."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from usn_perception.data.coco import load_coco
from usn_perception.data.synthetic import make_dataset
from usn_perception.detector import load_detector
from usn_perception.network import DetectorConfig, build_network
from usn_perception.train import TrainOptions, keypoint_loss, prepare, train_detector

TINY = DetectorConfig(input_size=(64, 48), widths=(8, 8, 8, 8, 8, 8, 8, 8, 8))


@pytest.fixture(scope='module')
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp('data') / 'ds'
    paths = make_dataset(out, 40, seed=5, size=(128, 96), progress=False)
    return load_coco(paths['train']), load_coco(paths['val'])


@pytest.mark.parametrize('readout', ['soft-argmax', 'centroid'])
def test_loss_is_minimal_at_the_target(readout):
    hm = torch.zeros(1, 1, 12, 16)
    target = torch.tensor([[[5.0, 7.0]]])
    peaked = hm.clone()
    peaked[0, 0, 7, 5] = 30.0 if readout == 'soft-argmax' else 1.0
    shifted = torch.roll(peaked, 3, dims=-1)
    labelled = torch.ones(1, 1, dtype=torch.bool)
    loss = [keypoint_loss(h, target, labelled, 0.1, 1.0, readout) for h in (peaked, hm, shifted)]
    assert loss[0] < loss[1] and loss[0] < loss[2]
    assert keypoint_loss(hm, target, torch.zeros_like(labelled), 0.1, 1.0, readout) == 0


def test_tiny_training_lowers_the_loss_and_saves(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    data = prepare(train_set, TINY, progress=False)
    torch.manual_seed(0)
    before = keypoint_loss(build_network(TINY).eval()(data.images), data.targets,
                           data.labelled, 0.1, 1.0, TINY.readout).item()
    opts = TrainOptions(epochs=6, batch_size=8, lr=3e-3, seed=1)
    metrics = train_detector(train_set, val_set, tmp_path / 'm', config=TINY, options=opts,
                             progress=False, log=lambda s: None)
    losses = [h['train_loss'] for h in metrics['history']]
    assert losses[-1] < losses[0] and losses[-1] < before
    det = load_detector(tmp_path / 'm')
    assert det.config == TINY
    saved = json.loads((tmp_path / 'm' / 'metrics.json').read_text())
    assert len(saved['history']) == 6 and 'pck' in saved['val']
    assert det.predict(val_set.load_image(0)).shape == (5, 2)


def test_training_is_deterministic(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    opts = TrainOptions(epochs=1, batch_size=8, seed=3)
    kw = dict(config=TINY, options=opts, progress=False, log=lambda s: None)
    train_detector(train_set, val_set, tmp_path / 'a', **kw)
    train_detector(train_set, val_set, tmp_path / 'b', **kw)
    a = load_detector(tmp_path / 'a')
    b = load_detector(tmp_path / 'b')
    assert a.sha256 == b.sha256
    img = val_set.load_image(0)
    np.testing.assert_array_equal(a.predict(img), b.predict(img))


def test_empty_training_set_is_an_error(tiny_data, tmp_path):
    train_set, val_set = tiny_data
    empty = type(train_set)(**{**vars(train_set), 'samples': []})
    with pytest.raises(ValueError, match='empty'):
        train_detector(empty, val_set, tmp_path / 'm', config=TINY, progress=False)


def test_gain_weight_trains_a_smaller_radius_gain(tiny_data, tmp_path):
    """Certified training: λ·log(gain) lowers the radius gain the bound engine suffers."""
    train_set, val_set = tiny_data
    kw = dict(config=TINY, progress=False, log=lambda s: None)
    plain = train_detector(train_set, val_set, tmp_path / 'a',
                           options=TrainOptions(epochs=3, batch_size=8, seed=2), **kw)
    certified = train_detector(train_set, val_set, tmp_path / 'b',
                               options=TrainOptions(epochs=3, batch_size=8, seed=2,
                                                    gain_weight=5.0), **kw)
    assert certified['history'][-1]['log10_gain'] < plain['history'][-1]['log10_gain'] - 0.5

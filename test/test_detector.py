"""Detector.predict: input forms, pixel convention, and agreement between uint8 and float."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from usn_perception.detector import Detector, resolve_device
from usn_perception.errors import ImageError
from usn_perception.network import DetectorConfig, build_network
from usn_perception.preprocess import PixelMapping, area_weights, resize_area

CONFIG = DetectorConfig(input_size=(64, 48), widths=(6, 8, 8, 8, 8, 8, 8, 8, 8))


@pytest.fixture(scope='module')
def detector() -> Detector:
    torch.manual_seed(3)
    net = build_network(CONFIG)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return Detector(net.eval(), CONFIG)


def test_uint8_and_float_agree(detector):
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (90, 120), dtype=np.uint8)
    a = detector.predict(img)
    b = detector.predict(img.astype(np.float64) / 255.0)
    assert a.shape == (5, 2) and a.dtype == np.float64
    np.testing.assert_array_equal(a, b)
    c = detector.predict(img.astype(np.float32) / np.float32(255.0))
    np.testing.assert_allclose(a, c, atol=1e-4)


def test_the_trace_changes_nothing_and_ends_in_the_heatmaps(detector):
    img = np.random.default_rng(4).integers(0, 256, (90, 120), dtype=np.uint8)
    plain, traced = detector.run(img), detector.run(img, trace=True)
    assert plain.trace is None
    np.testing.assert_array_equal(plain.keypoints, traced.keypoints)
    torch.testing.assert_close(plain.heatmaps, traced.heatmaps, rtol=0, atol=0)
    assert len(traced.trace) == len([m for m in detector.net.modules()
                                     if not isinstance(m, torch.nn.Sequential)])
    assert traced.trace[-1][0] is traced.heatmaps or torch.equal(traced.trace[-1][0],
                                                                 traced.heatmaps)


def test_color_and_gray_inputs(detector):
    rng = np.random.default_rng(1)
    gray = rng.integers(0, 256, (48, 64), dtype=np.uint8)
    rgb = np.repeat(gray[:, :, None], 3, axis=2)
    np.testing.assert_allclose(detector.predict(rgb), detector.predict(gray), atol=1e-9)
    assert detector.predict(gray[:, :, None]).shape == (5, 2)


def test_any_size_is_mapped_to_image_pixels(detector):
    rng = np.random.default_rng(2)
    for shape in [(48, 64), (96, 128), (288, 384), (50, 77)]:
        kps = detector.predict(rng.integers(0, 256, shape, dtype=np.uint8))
        assert np.all(kps[:, 0] >= -0.5) and np.all(kps[:, 0] <= shape[1] - 0.5)
        assert np.all(kps[:, 1] >= -0.5) and np.all(kps[:, 1] <= shape[0] - 0.5)


def test_argmax_readout_returns_cell_centres(detector):
    img = np.zeros((48, 64), np.uint8)
    kps = detector.predict(img, readout='argmax')
    # heatmap cells are 2x2 input pixels here: centres at 0.5, 2.5, ...
    np.testing.assert_allclose((kps + 0.5) % 2.0, 1.0)


@pytest.mark.parametrize('bad, problem', [
    (np.zeros((0, 10), np.uint8), 'empty'),
    (np.zeros((10,), np.uint8), 'HxW'),
    (np.zeros((10, 10, 4), np.uint8), 'HxW'),
    (np.full((10, 10), np.nan), 'NaN'),
    (np.full((10, 10), 1.5), r'\[0, 1\]'),
    (np.zeros((10, 10), np.int64), 'dtype'),
    ([[0, 1], [1, 0]], 'numpy array'),
])
def test_bad_images_are_rejected(detector, bad, problem):
    with pytest.raises(ImageError, match=problem):
        detector.predict(bad)


def test_unknown_readout(detector):
    with pytest.raises(ValueError, match='readout'):
        detector.predict(np.zeros((48, 64), np.uint8), readout='mean')


def test_area_resize_is_a_convex_average():
    for n_in, n_out in [(384, 128), (288, 96), (100, 37), (10, 25)]:
        w = area_weights(n_in, n_out)
        assert np.all(w >= 0)
        np.testing.assert_allclose(w.sum(axis=1), 1.0)
    img = np.random.default_rng(0).random((30, 40))
    out = resize_area(img, (20, 15)).numpy()
    np.testing.assert_allclose(out, img.reshape(15, 2, 20, 2).mean(axis=(1, 3)))
    # commutes with the photometric affine map (before clipping)
    np.testing.assert_allclose(resize_area(0.7 * img + 0.1, (13, 11)).numpy(),
                               0.7 * resize_area(img, (13, 11)).numpy() + 0.1)


def test_pixel_mapping_convention():
    m = PixelMapping.for_image((384, 288), (64, 48))
    # heatmap cell 0 covers image pixels 0..5: its centre is at 2.5
    np.testing.assert_allclose(m.to_image(np.array([0.0, 0.0])), [2.5, 2.5])
    np.testing.assert_allclose(m.to_heatmap(m.to_image(np.array([3.3, 7.9]))), [3.3, 7.9])
    lo, hi = m.to_image_outward(np.array([1.0]), np.array([2.0]), axis=0)
    assert lo[0] < 8.5 < 14.5 < hi[0]


def test_device_resolution():
    assert resolve_device('cpu').type == 'cpu'
    assert resolve_device('auto').type in ('cpu', 'cuda')
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match='CUDA is not available'):
            resolve_device('cuda')
    with pytest.raises(ValueError):
        resolve_device('tpu')

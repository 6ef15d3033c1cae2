"""Free sub-boxes (usn_perception/bounds/free.py): no pixel clipped, bounded without propagation.

A free (τ, κ) sub-box is bounded from the nominal heatmaps with an image-independent radius.
These tests check the carve (exact tiling), the radius against the network itself (also on a
first filter that does *not* sum to zero, where the radius is all that keeps the bound
sound), that a free bound agrees with propagating the same sub-box, soundness on dense θ grids
plus the attack (shipped model and small homogeneous networks), and the budget accounting.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from test_certify import assert_sound
from torch import nn

import usn_perception.certify as certify_module
from usn_perception.bounds.box import Budget
from usn_perception.bounds.free import free_radius
from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import compile_network
from usn_perception.bounds.split import partition, refine
from usn_perception.bounds.thresholds import (
    ambiguous_mass,
    carve_free,
    free_mask,
    threshold_row,
    threshold_splits,
)
from usn_perception.certify import PhotometricBox, certify_keypoints
from usn_perception.detector import Detector, load_detector
from usn_perception.network import DetectorConfig, InputNormalization, ZeroMeanConv2d

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / 'models' / 'default' / 'model.json'
NODE_BOX = PhotometricBox((0.95, 1.05), (-0.03, 0.03))
OFFLINE_BOX = PhotometricBox((0.8, 1.2), (-0.1, 0.1))
F64 = torch.float64


def homogeneous_shallow(seed: int, readout: str = 'centroid') -> Detector:
    """Zero-sum first filter (replicate padding), no bias anywhere: threshold coordinates."""
    torch.manual_seed(seed)
    net = nn.Sequential(
        InputNormalization(0.0, 0.25),
        ZeroMeanConv2d(1, 6, 3, padding=1, padding_mode='replicate', bias=False), nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(8, 3, 1, bias=False)).double()
    with torch.no_grad():
        net[-1].weight.mul_(3.0)
    config = DetectorConfig(input_size=(32, 24), keypoint_names=('a', 'b', 'c'),
                            readout=readout)
    return Detector(net.eval(), config)


def mid_image(seed: int, lo: float = 0.2, hi: float = 0.74) -> np.ndarray:
    """Values in [lo, hi]: nothing clips on NODE_BOX or OFFLINE_BOX unless lo, hi are extreme."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:30, 0:40]
    blob = np.exp(-((yy - rng.uniform(8, 22)) ** 2 + (xx - rng.uniform(8, 32)) ** 2) / 18.0)
    return lo + (hi - lo) * np.clip(0.2 * rng.random((30, 40)) + 0.8 * blob, 0, 1)


# --- the carve --------------------------------------------------------------------------------

def _area(b: torch.Tensor) -> float:
    return float(((b[:, 1] - b[:, 0]) * (b[:, 3] - b[:, 2])).sum())


@pytest.mark.parametrize('seed', range(6))
def test_carve_tiles_the_root_and_only_the_free_part_is_free(seed):
    rng = np.random.default_rng(seed)
    values = torch.arange(256, dtype=F64) / 255.0
    weights = torch.zeros(256, dtype=F64)
    present = rng.choice(256, size=40, replace=False)
    weights[present] = torch.as_tensor(rng.random(40) + 0.1)
    v_min, v_max = present.min() / 255.0, present.max() / 255.0
    t_lo, k_hi = -rng.uniform(0.01, 0.2), 1.0 + rng.uniform(0.01, 0.3)
    root = torch.tensor([[t_lo, rng.uniform(0.0, 0.3), rng.uniform(0.7, 1.0), k_hi]], dtype=F64)
    free, rest = carve_free(root, values, weights)
    assert free.shape[0] == 1  # the interior holds the identity: never empty
    assert bool(free_mask(free, values, weights).all())
    assert not bool(free_mask(rest, values, weights).any())
    assert math.isclose(_area(torch.cat([free, rest])), _area(root), rel_tol=1e-12)
    # Exact tiling: every piece lies in the root and the cuts are the present extremes.
    pieces = torch.cat([free, rest])
    assert bool((pieces[:, 0] >= root[0, 0]).all() and (pieces[:, 1] <= root[0, 1]).all())
    assert bool((pieces[:, 2] >= root[0, 2]).all() and (pieces[:, 3] <= root[0, 3]).all())
    assert float(free[0, 1]) == min(v_min, float(root[0, 1]))
    assert float(free[0, 2]) == max(v_max, float(root[0, 2]))
    # Sampled points: inside the free piece no present value is clipped.
    for _ in range(50):
        tau = rng.uniform(float(free[0, 0]), float(free[0, 1]))
        kappa = rng.uniform(float(free[0, 2]), float(free[0, 3]))
        v = values[weights > 0]
        assert torch.equal(v.clamp(tau, kappa), v)


def test_carve_without_a_free_part_and_on_points():
    values = torch.arange(256, dtype=F64) / 255.0
    weights = torch.ones(256, dtype=F64)  # 0 and 1 present
    clipped = torch.tensor([[0.05, 0.1, 0.8, 0.9]], dtype=F64)  # every θ clips something
    free, rest = carve_free(clipped, values, weights)
    assert free.shape[0] == 0 and torch.equal(rest, clipped)
    point = torch.tensor([[-0.02, -0.02, 1.03, 1.03]], dtype=F64)
    free, rest = carve_free(point, values, weights)
    assert torch.equal(free, point) and rest.shape[0] == 0
    inside = torch.tensor([[0.02, 0.02, 1.03, 1.03]], dtype=F64)  # clips the value 0
    assert carve_free(inside, values, weights)[0].shape[0] == 0


def test_partition_carves_free_parts_without_adding_counted_leaves():
    values = torch.arange(256, dtype=F64) / 255.0
    root = threshold_row(NODE_BOX)
    for present in (values <= 0.5, torch.ones(256, dtype=torch.bool)):  # dark only; both ends
        weights = present.to(F64)
        how = dict(splitter=partial(threshold_splits, values=values, weights=weights),
                   priority=partial(ambiguous_mass, values=values, weights=weights))
        carve = partial(carve_free, values=values, weights=weights)
        is_free = partial(free_mask, values=values, weights=weights)
        for count in (1, 2, 3, 6):
            plain = partition(root, count, **how)
            leaves = partition(root, count, carve=carve, **how)
            assert int((~is_free(leaves)).sum()) == int((~is_free(plain)).sum()) == count
            assert math.isclose(_area(leaves), _area(root), rel_tol=1e-12)
            if not bool(present.all()):  # the rest is one box: carved from the root at once
                assert int(is_free(leaves).sum()) == 1
        # 0 and 1 present: the rest would be an L (two leaves), which one leaf cannot hold.
        if bool(present.all()):
            assert partition(root, 1, carve=carve, **how).shape[0] == 1


def test_refine_neither_counts_nor_splits_free_leaves():
    values = torch.arange(256, dtype=F64) / 255.0
    weights = (values <= 0.6).to(F64)  # no bright pixel: the free part comes off the root
    root = threshold_row(NODE_BOX)
    is_free = partial(free_mask, values=values, weights=weights)
    seen = []

    def evaluate(boxes, deadline):
        seen.append(boxes)
        n = boxes.shape[0]
        # Non-free leaves stick out past the estimates; free ones are exact.
        wide = torch.where(is_free(boxes), 0.0, 1.0)[:, None]
        bounds = torch.stack([5 - wide, 5 + wide, 5 - wide, 5 + wide], -1).expand(n, 2, 4)
        return bounds, torch.full((n, 2, 2), 5.0, dtype=F64)

    out = refine(evaluate, root, Budget(7), splitter=partial(threshold_splits, values=values,
                                                             weights=weights),
                 priority=partial(ambiguous_mass, values=values, weights=weights),
                 carve=partial(carve_free, values=values, weights=weights), free=is_free)
    assert out.evaluated == 7  # the free leaf costs nothing
    assert int(is_free(out.boxes).sum()) == 1  # and it is never split
    assert sum(int((~is_free(b)).sum()) for b in seen) == 7


# --- the radius ----------------------------------------------------------------------------

@pytest.mark.parametrize('zero_sum', [True, False])
@pytest.mark.parametrize('seed, colour', [(0, False), (1, False), (2, True)])
def test_free_radius_bounds_how_far_the_logits_move(seed, colour, zero_sum):
    det = homogeneous_shallow(seed)
    if not zero_sum:  # a first filter with a real response to brightness: R must cover it
        with torch.no_grad():
            det.net[1].weight.add_(0.05)
    image = mid_image(seed)
    if colour:  # the gray mix's weights join the resize weights' sum S
        image = np.stack([image, 0.9 * image + 0.03, 0.95 - image], -1)
    enc = ImageEncoding(image, det.config.input_size)
    radius = free_radius(compile_network(det.net, enc.shape), enc)
    nominal = det.heatmaps(image).flatten(1)
    worst = 0.0
    for a in np.linspace(0.8, 1.2, 9):
        for b in np.linspace(-0.1, 0.1, 9):  # θ where nothing clips: τ = −β/α, free
            moved = det.heatmaps(np.clip(a * image + b, 0, 1)).flatten(1) / a
            tau = abs(b / a)
            slack = 1e-12 * (1.0 + nominal.abs().max())
            assert bool(((moved - nominal).abs() <= tau * radius + slack).all())
            worst = max(worst, float(((moved - nominal).abs() / (tau * radius + 1e-300)).max()))
    if zero_sum:
        assert float(radius.max()) * 0.125 < 1e-9 * float(nominal.abs().max())
    else:
        assert worst > 1e-3  # the motion is real, and the radius is not vacuous about it


# --- certificates -----------------------------------------------------------------------------

@pytest.mark.parametrize('readout', ['centroid', 'local-centroid', 'argmax'])
@pytest.mark.parametrize('seed', [0, 1, 2])
def test_free_certificate_agrees_with_propagation_and_is_sound(seed, readout, monkeypatch):
    det = homogeneous_shallow(seed, readout)
    image = mid_image(seed)
    free = certify_keypoints(det, image, OFFLINE_BOX, budget=Budget(1))
    assert free.stats['free_leaves'] == 1 and free.stats['subboxes'] == 0
    monkeypatch.setattr(certify_module, 'FREE_TOLERANCE', -1.0)  # propagate everything
    propagated = certify_keypoints(det, image, OFFLINE_BOX, budget=Budget(1))
    assert propagated.stats['free_leaves'] == 0 and propagated.stats['subboxes'] == 1
    np.testing.assert_allclose(free.boxes, propagated.boxes, atol=1e-6)
    assert free.contains(free.nominal).all()
    assert_sound(det, image, OFFLINE_BOX, free, readout, grid=7)


@pytest.mark.parametrize('seed', [0, 1, 2, 3])
def test_partly_clipped_images_with_free_leaves_have_no_escapes(seed):
    det = homogeneous_shallow(seed, 'local-centroid')
    image = mid_image(seed, lo=0.0, hi=0.97)  # black pixels and near-white ones clip
    for box in (NODE_BOX, OFFLINE_BOX):
        for n in (1, 2, 4):
            cert = certify_keypoints(det, image, box, budget=Budget(n))
            assert cert.stats['subboxes'] <= n
            assert_sound(det, image, box, cert, 'local-centroid', grid=7)


@pytest.mark.parametrize('kind', ['rgb8', 'mono16'])
def test_free_leaves_on_rgb_and_16_bit_frames_have_no_escapes(kind):
    """Colour frames (the gray mix joins the resize weights) and 16-bit ones (many values)."""
    det = homogeneous_shallow(2, 'local-centroid')
    base = mid_image(5, lo=0.002, hi=0.9)
    if kind == 'rgb8':
        rgb = np.stack([base, 0.8 * base + 0.05, 0.9 - 0.85 * base], -1)  # none near white
        image = np.round(rgb * 255).astype(np.uint8)
    else:
        image = np.round(base * 65535).astype(np.uint16)
    for n in (1, 3):  # (level nodes would take the free part into their leaves)
        cert = certify_keypoints(det, image, NODE_BOX, budget=Budget(n), level_nodes=0)
        assert cert.stats['free_leaves'] >= 1
        assert_sound(det, image, NODE_BOX, cert, 'local-centroid', grid=7)


@pytest.mark.skipif(not DEFAULT.exists(), reason='shipped model not present')
def test_shipped_model_uses_free_leaves_soundly():
    from usn_perception.data.synthetic import SPLIT_BACKGROUNDS, render_sample

    det = load_detector(DEFAULT)
    rng = np.random.default_rng(7)
    for name in SPLIT_BACKGROUNDS['test'][:2]:
        render = render_sample(rng, name, (192, 144)).image
        # Pixel values 1..226, like a camera with a black level and no saturation: the node
        # box clips the darkest ones on part of it, and τ ≤ (darkest value) is free.
        x = render.astype(np.float64)
        img = np.round(1.0 + (x - x.min()) * (225.0 / (x.max() - x.min()))).astype(np.uint8)
        for n in (1, 3):  # (level nodes would take the free part into their leaves)
            cert = certify_keypoints(det, img, NODE_BOX, budget=Budget(n), level_nodes=0)
            assert cert.stats['free_leaves'] == 1 and 1 <= cert.stats['subboxes'] <= n
            assert_sound(det, img, NODE_BOX, cert, det.readout, grid=5)


def test_nominal_heatmaps_must_be_the_ones_nominal_was_read_from():
    det = homogeneous_shallow(0, 'local-centroid')
    image, other = mid_image(0), mid_image(1)
    pred = det.run(image)
    ok = certify_keypoints(det, image, NODE_BOX, budget=Budget(1), nominal=pred.keypoints,
                           nominal_heatmaps=pred.heatmaps)
    assert ok.stats['free_leaves'] == 1
    with pytest.raises(ValueError, match='do not read the nominal'):
        certify_keypoints(det, image, NODE_BOX, nominal=pred.keypoints,
                          nominal_heatmaps=det.run(other).heatmaps)
    with pytest.raises(ValueError, match='float64 tensor of shape'):
        certify_keypoints(det, image, NODE_BOX, nominal=pred.keypoints,
                          nominal_heatmaps=pred.heatmaps.float())
    with pytest.raises(ValueError, match='need the nominal'):
        certify_keypoints(det, image, NODE_BOX, nominal_heatmaps=pred.heatmaps)

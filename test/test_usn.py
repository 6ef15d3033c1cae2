"""USN scores: an unstable-by-construction channel ranks last, scores are reproducible."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from usn_perception.errors import UnsupportedLayerError
from usn_perception.network import DetectorConfig, build_network, prunable_layers
from usn_perception.usn import UsnScores, plot_scores, usn_scores

# The plain architecture: its channels differ in how brightness moves them, which is what
# these tests construct. (In the homogeneous one every unclipped channel scales with α.)
TINY = DetectorConfig(input_size=(32, 24), widths=(6,) * 9, arch='plain', norm_mean=0.5,
                      readout='soft-argmax')


def _images(n: int = 12, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 24, 32, generator=gen) * 0.6 + 0.2


def _stable_net() -> nn.Sequential:
    """Every channel sees only zero-sum (edge) filters, so brightness barely moves it."""
    torch.manual_seed(0)
    net = build_network(TINY).eval()
    with torch.no_grad():
        for _, conv, _ in prunable_layers(net):
            w = conv.weight
            w -= w.mean(dim=(2, 3), keepdim=True)  # zero spatial sum per (in, out) pair
    return net


def test_channel_unstable_by_construction_scores_lowest():
    net = _stable_net()
    first = prunable_layers(net)[0][1]
    with torch.no_grad():
        first.weight[2] = 1.0  # a pure brightness (DC) detector: β moves it like its signal
        for _, conv, _ in prunable_layers(net)[1:2]:
            conv.weight[:, 2] = 0.0  # do not pass the instability on
    scores = usn_scores(net, _images(), samples=6, max_images=None)
    flat = np.concatenate(scores.vectors())
    assert scores.layers[0].score[2] == flat.min()
    assert scores.layers[0].score[2] < 0.9 < np.delete(scores.layers[0].score, 2).min()
    layer = scores.layers[0]
    power = (layer.bias_sq + layer.variance) / layer.spread**2
    assert power[2] > 10 * np.delete(power, 2).max()


def test_channel_without_clean_signal_scores_zero():
    net = _stable_net()
    with torch.no_grad():
        prunable_layers(net)[3][1].weight[1] = 0.0  # constant pre-activation: no signal
    scores = usn_scores(net, _images(), samples=4, max_images=None)
    assert scores.layers[3].score[1] == 0.0
    assert (np.delete(scores.layers[3].score, 1) > 0).all()


def test_scores_are_deterministic_and_batch_invariant():
    net = build_network(TINY).eval()
    x = _images(10)
    a = usn_scores(net, x, samples=4, max_images=8, batch=3, seed=5)
    b = usn_scores(net, x, samples=4, max_images=8, batch=8, seed=5)
    c = usn_scores(net, x, samples=4, max_images=8, batch=3, seed=6)
    for u, v in zip(a.vectors(), b.vectors(), strict=True):
        np.testing.assert_allclose(u, v, rtol=1e-9, atol=1e-12)
    assert any(not np.allclose(u, v) for u, v in zip(a.vectors(), c.vectors(), strict=True))
    assert a.settings['images'] == 8 and all(0 <= s.score.min() <= s.score.max() <= 1
                                             for s in a.layers)


def test_json_round_trip_and_plot(tmp_path):
    scores = usn_scores(build_network(TINY).eval(), _images(4), samples=3, max_images=None)
    back = UsnScores.load(scores.save(tmp_path / 's.json'))
    assert back.settings == scores.settings
    for u, v in zip(scores.layers, back.layers, strict=True):
        np.testing.assert_array_equal(u.score, v.score)
        assert u.index == v.index and u.kind == v.kind
    png = plot_scores(scores, tmp_path / 's.png')
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
    with pytest.raises(ValueError, match='format'):
        UsnScores.from_json({'format': 'other'})


def test_clear_errors():
    net = build_network(TINY).eval()
    with pytest.raises(ValueError, match='empty'):
        usn_scores(net, torch.zeros(0, 1, 24, 32))
    with pytest.raises(ValueError, match='samples'):
        usn_scores(net, _images(2), samples=1)
    with pytest.raises(ValueError, match='box'):
        usn_scores(net, _images(2), alpha=(1.2, 0.8))
    bad = nn.Sequential(*list(net)[:4], nn.MaxPool2d(2), *list(net)[4:])
    with pytest.raises(UnsupportedLayerError, match='MaxPool2d'):
        usn_scores(bad, _images(2))
    with pytest.raises(UnsupportedLayerError):
        usn_scores(nn.Conv2d(1, 2, 3), _images(2))


def test_bound_score_bounds_contain_sampled_preactivations():
    pytest.importorskip('usn_perception.bounds.propagate')
    from usn_perception.detector import Detector
    from usn_perception.usn import bound_scores, layer_bounds

    net = _stable_net()
    det = Detector(net, TINY)
    image = (_images(1)[0, 0].numpy() * 255).round().astype(np.uint8)
    alpha, beta = (0.95, 1.05), (-0.02, 0.02)
    bounds = layer_bounds(det, image, alpha, beta)
    captured = []
    hooks = [bn.register_forward_hook(lambda m, i, o: captured.append(o[0]))
             for _, _, bn in prunable_layers(det.net)]
    x = image.astype(np.float64) / 255.0
    for a in np.linspace(*alpha, 4):
        for b in np.linspace(*beta, 4):
            captured.clear()
            out = det.heatmaps(np.clip(a * x + b, 0.0, 1.0))
            for (lo, hi), z in zip(bounds, [*captured, out], strict=True):
                assert torch.all(lo - 1e-9 <= z) and torch.all(z <= hi + 1e-9)
    for h in hooks:
        h.remove()
    point = bound_scores(det, [image], (1.0, 1.0), (0.0, 0.0))
    assert all(np.all(s.score == 1.0) for s in point.layers)  # no ReLU straddles 0 at a point
    wide = bound_scores(det, [image], alpha, beta)
    assert all(np.all((0 <= s.score) & (s.score <= 1)) for s in wide.layers)
    assert wide.method == 'bound' and np.concatenate(wide.vectors()).min() < 1.0


def test_homogeneous_network_has_no_unstable_relu_without_clipping():
    """Certifiable by construction: unclipped pixels never flip a ReLU, whatever θ."""
    from usn_perception.detector import Detector
    from usn_perception.usn import bound_scores

    config = replace(TINY, arch='homogeneous', norm_mean=0.0, readout='centroid')
    torch.manual_seed(0)
    det = Detector(build_network(config).eval(), config)
    image = (_images(1)[0, 0].numpy() * 255).round().astype(np.uint8)  # in [0.2, 0.8]
    scores = bound_scores(det, [image], (0.8, 1.2), (-0.1, 0.03))  # no pixel reaches 0 or 1
    assert all(np.all(s.score == 1.0) for s in scores.layers)
    clipped = bound_scores(det, [image], (0.8, 1.6), (-0.15, 0.15))
    assert np.concatenate(clipped.vectors()).min() < 1.0

"""Float32 forms with tracked rounding (usn_perception/bounds/rounding.py).

The bounds must hold at every θ of the sub-box, against the network evaluated in float64, on
random networks of several widths and seeds, dark and saturated inputs and degenerate boxes;
they must be as tight as the float64 engine's; the backends that would break the rounding
model must be refused; and oneDNN must run the convolutions as direct sums of products.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from usn_perception.bounds.forms import form_at
from usn_perception.bounds.layers import compile_network
from usn_perception.bounds.propagate import propagate
from usn_perception.bounds.rounding import (
    all_finite,
    float32_problem,
    gamma,
    propagate_float32,
    resolve_precision,
)
from usn_perception.certify import Budget, PhotometricBox, certify_keypoints
from usn_perception.detector import Detector, DetectorConfig, load_detector
from usn_perception.network import InputNormalization, build_network

F64 = torch.float64


def _network(seed: int, widths: tuple[int, ...], arch: str) -> nn.Module:
    torch.manual_seed(seed)
    config = DetectorConfig(input_size=(32, 24), widths=widths, arch=arch,
                            keypoint_names=('a', 'b', 'c'),
                            norm_mean=0.5 if arch == 'plain' else 0.0)
    net = build_network(config).double()
    gen = torch.Generator().manual_seed(seed)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_(0.0, 0.3, generator=gen)
            m.running_var.uniform_(0.5, 2.0, generator=gen)
    return net.eval()


def _input_forms(seed: int, kind: str, n: int) -> tuple[torch.Tensor, torch.Tensor,
                                                        torch.Tensor]:
    """(N, 3, 1, 24, 32) exact input forms c0 + c1·θ1 + c2·θ2 and their θ sub-boxes."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand((n, 1, 1, 24, 32), generator=gen, dtype=F64)
    if kind == 'dark':
        x = 0.05 * x
    elif kind == 'saturated':
        x = 0.95 + 0.05 * x
    c1 = 0.3 * torch.randn((n, 1, 1, 24, 32), generator=gen, dtype=F64)
    c2 = 0.3 * torch.randn((n, 1, 1, 24, 32), generator=gen, dtype=F64)
    lo = torch.rand((n, 2), generator=gen, dtype=F64) - 0.5
    width = 0.2 * torch.rand((n, 2), generator=gen, dtype=F64)
    width[0] = 0.0  # a degenerate sub-box (one θ)
    boxes = torch.stack([lo[:, 0], lo[:, 0] + width[:, 0], lo[:, 1], lo[:, 1] + width[:, 1]], 1)
    return torch.cat([x, c1, c2], 1), torch.zeros((n, 1, 1, 24, 32), dtype=F64), boxes


def _grid(boxes: torch.Tensor, k: int = 5) -> list[torch.Tensor]:
    """θ per sub-box on a k×k grid (corners and edges included): a list of (N, 2)."""
    t = torch.linspace(0.0, 1.0, k, dtype=F64)
    out = []
    for u in t:
        for v in t:
            out.append(torch.stack([boxes[:, 0] + u * (boxes[:, 1] - boxes[:, 0]),
                                    boxes[:, 2] + v * (boxes[:, 3] - boxes[:, 2])], 1))
    return out


@pytest.mark.parametrize('seed, widths, arch', [
    (0, (4, 6, 6, 8, 8, 8, 8, 6, 6), 'homogeneous'),
    (1, (8,) * 9, 'plain'),
    (2, (3, 4, 4, 4, 4, 4, 4, 4, 4), 'homogeneous'),
    (3, (6, 8, 8, 12, 12, 16, 16, 8, 8), 'plain'),
])
@pytest.mark.parametrize('kind', ['random', 'dark', 'saturated'])
def test_float32_forms_bound_the_network_at_every_theta(seed, widths, arch, kind):
    net = compile_network(_network(seed, widths, arch), (1, 24, 32))
    centre, radius, boxes = _input_forms(10 * seed + len(kind), kind, 4)
    out = propagate_float32(net, centre, radius, boxes)
    assert out is not None
    c32, r32, _ = out
    c64, r64, _ = propagate(net, centre, radius, boxes)
    assert c32.dtype == F64 and r32.shape[1] == 1
    _assert_contains(net, centre, c32, r32, boxes)
    # As tight as float64: the rounding terms scale with the variation, not the activations.
    w32 = float((r32[:, 0] + c32[:, 1:].abs().sum(1)).max())
    w64 = float((r64[:, 0] + c64[:, 1:].abs().sum(1)).max())
    assert w32 <= w64 * 1.01 + 1e-12  # (a neuron the slack makes unstable adds a little)


def _assert_contains(net, centre: torch.Tensor, c32: torch.Tensor, r32: torch.Tensor,
                     boxes: torch.Tensor) -> None:
    """The output forms contain the float64 network at every θ of a 5×5 grid per sub-box."""
    for theta in _grid(boxes):
        x = form_at(centre, theta)  # the exact input at θ
        z = net.forward(x)
        mid = form_at(c32, theta)
        # The float64 centre carries float64 rounding, as the rest of the engine does.
        tol = 1e-12 * (1.0 + z.abs())
        assert bool((z >= mid - r32[:, 0] - tol).all()), 'a value escapes below'
        assert bool((z <= mid + r32[:, 0] + tol).all()), 'a value escapes above'


@pytest.mark.parametrize('idle', ['kappa', 'tau'])
@pytest.mark.parametrize('kind', ['random', 'dark'])
def test_idle_axes_are_folded_into_the_radius_not_propagated(idle, kind):
    """κ when nothing bright clips (exactly 0), τ behind a zero-sum filter (rounding-level)."""
    net = compile_network(_network(0, (4, 6, 6, 8, 8, 8, 8, 6, 6), 'homogeneous'), (1, 24, 32))
    centre, radius, boxes = _input_forms(7 + len(kind), kind, 4)
    j = 2 if idle == 'kappa' else 1
    centre[:, j] *= 0.0 if idle == 'kappa' else 1e-20
    c32, r32, _ = propagate_float32(net, centre, radius, boxes)
    assert bool((c32[:, j] == 0).all())  # dropped: not a single coefficient propagated
    assert bool((c32[:, 3 - j] != 0).any())
    _assert_contains(net, centre, c32, r32, boxes)
    if idle == 'tau':  # the fold is what covers the tiny axis: the radius is not zero
        assert bool((r32[0, 0] > 0).any())


def test_every_supported_layer_kind_is_bounded_in_float32():
    """Average pooling, nearest upsampling, flatten and linear layers (fan-in 0 or not)."""
    torch.manual_seed(4)
    net = nn.Sequential(
        InputNormalization(0.5, 0.25), nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4),
        nn.ReLU(), nn.AvgPool2d(2), nn.Conv2d(4, 6, 3, padding=1), nn.ReLU(),
        nn.Upsample(scale_factor=2, mode='nearest'), nn.ConvTranspose2d(6, 4, 4, 2, 1),
        nn.ReLU(), nn.Flatten(), nn.Linear(4 * 48 * 64, 10), nn.ReLU(), nn.Linear(10, 3),
    ).double().eval()
    compiled = compile_network(net, (1, 24, 32))
    centre, radius, boxes = _input_forms(7, 'random', 3)
    c32, r32, _ = propagate_float32(compiled, centre, radius, boxes)
    c64, r64, _ = propagate(compiled, centre, radius, boxes)
    for theta in _grid(boxes):
        z = compiled.forward(form_at(centre, theta))
        mid, tol = form_at(c32, theta), 1e-12 * (1.0 + z.abs())
        assert bool((z >= mid - r32[:, 0] - tol).all()) and bool(
            (z <= mid + r32[:, 0] + tol).all())
    assert float(r32.max()) <= float(r64.max()) * 1.01 + 1e-12


def test_float32_errors_are_real_and_covered_on_a_linear_network():
    """Without ReLUs the bound has no relaxation slack: only the rounding terms are left.

    The float32 coefficients really miss the network's value at the sub-box corners (by far
    more than float64 rounding), and the radius covers every miss.
    """
    torch.manual_seed(5)
    net = nn.Sequential(InputNormalization(0.5, 0.25), nn.Conv2d(1, 8, 3, padding=1),
                        nn.Conv2d(8, 8, 3, padding=1), nn.ConvTranspose2d(8, 4, 4, 2, 1),
                        nn.Conv2d(4, 3, 3, stride=2, padding=1)).double().eval()
    compiled = compile_network(net, (1, 24, 32))
    centre, radius, boxes = _input_forms(8, 'random', 4)
    c32, r32, _ = propagate_float32(compiled, centre, radius, boxes)
    miss, uncovered = 0.0, 0.0
    for theta in _grid(boxes):
        z = compiled.forward(form_at(centre, theta))
        err = (z - form_at(c32, theta)).abs() / (1.0 + z.abs())
        miss = max(miss, float(err.max()))
        gap = (z - form_at(c32, theta)).abs() - r32[:, 0]
        uncovered = max(uncovered, float((gap / (1.0 + z.abs())).max()))
    assert miss > 1e-10, 'no float32 error to cover: the test would prove nothing'
    assert uncovered <= 1e-14, uncovered  # float64 rounding of the reference itself


def test_degenerate_boxes_stay_exact():
    """One θ: the float32 part is zero, so the bound is the float64 value itself."""
    net = compile_network(_network(0, (4, 6, 6, 8, 8, 8, 8, 6, 6), 'homogeneous'), (1, 24, 32))
    centre, radius, boxes = _input_forms(5, 'random', 3)
    boxes[:, 1], boxes[:, 3] = boxes[:, 0], boxes[:, 2]
    c32, r32, _ = propagate_float32(net, centre, radius, boxes)
    theta = boxes[:, [0, 2]]
    z = net.forward(form_at(centre, theta))
    assert float(r32.max()) < 1e-20
    assert torch.allclose(form_at(c32, theta), z, rtol=1e-12, atol=1e-12)


def test_all_finite_finds_every_nan_and_infinity():
    cl = torch.channels_last
    a = torch.rand(3, 5, 6, 4).contiguous(memory_format=cl)
    b = -torch.rand(2, 7)
    assert all_finite(a, b) and all_finite(a.double())
    for bad in (float('nan'), float('inf'), -float('inf')):
        for t in (a, b):
            c = t.clone()
            c[(-1,) * c.ndim] = bad
            assert not all_finite(a if t is b else c, c if t is b else b)
    pos, neg = a.clone(), b.clone()
    pos[0, 0, 0, 0], neg[0, 0] = float('inf'), -float('inf')  # inf + (-inf): NaN
    assert not all_finite(pos, neg)
    # Elements that overflow their sum are reported too (callers treat it as an overflow).
    assert not all_finite(torch.full((4,), 3e38))


def test_float32_overflow_returns_none_and_certify_falls_back():
    net = nn.Sequential(InputNormalization(0.0, 1.0), nn.Conv2d(1, 4, 3, padding=1, bias=False),
                        nn.ReLU(), nn.Conv2d(4, 2, 3, stride=2, padding=1, bias=False),
                        ).double().eval()
    with torch.no_grad():
        net[1].weight.fill_(1e25)
        net[3].weight.fill_(1e25)
    compiled = compile_network(net, (1, 16, 16))
    centre = torch.zeros((1, 3, 1, 16, 16), dtype=F64)
    centre[:, 0] = 0.5
    centre[:, 1] = 0.1
    boxes = torch.tensor([[0.0, 0.1, 0.0, 0.1]], dtype=F64)
    assert propagate_float32(compiled, centre, torch.zeros_like(centre[:, :1]), boxes) is None
    det = Detector(net, DetectorConfig(input_size=(16, 16), keypoint_names=('a', 'b'),
                                       readout='argmax'))
    image = np.random.default_rng(0).random((16, 16))
    box = PhotometricBox(alpha=(0.95, 1.05), beta=(-0.02, 0.02))
    auto = certify_keypoints(det, image, box, budget=Budget(2), coordinates='theta')
    f64 = certify_keypoints(det, image, box, budget=Budget(2), coordinates='theta',
                            precision='float64')
    assert auto.stats['precision'] == 'float32' and auto.stats['float32_fallbacks'] >= 1
    np.testing.assert_array_equal(auto.boxes, f64.boxes)


def test_precision_is_resolved_and_unsafe_modes_are_refused(monkeypatch):
    assert resolve_precision('float64', torch.device('cpu')) == 'float64'
    assert resolve_precision('auto', torch.device('cpu')) == 'float32'
    assert resolve_precision('float32', torch.device('cpu')) == 'float32'
    assert 'CPU only' in float32_problem(torch.device('cuda'))
    assert resolve_precision('auto', torch.device('cuda')) == 'float64'
    with pytest.raises(ValueError, match='precision must be one of'):
        resolve_precision('half', torch.device('cpu'))
    old = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision('medium')
        assert resolve_precision('auto', torch.device('cpu')) == 'float64'
        with pytest.raises(ValueError, match='matmul_precision'):
            resolve_precision('float32', torch.device('cpu'))
    finally:
        torch.set_float32_matmul_precision(old)
    monkeypatch.setattr('platform.machine', lambda: 'aarch64')
    assert resolve_precision('auto', torch.device('cpu')) == 'float64'
    with pytest.raises(ValueError, match='x86-64'):
        resolve_precision('float32', torch.device('cpu'))
    monkeypatch.undo()
    assert gamma(10) > 10 * 2.0 ** -24
    with pytest.raises(ValueError, match='too large'):
        gamma(2 ** 24)


ONEDNN_PROBE = '''
import numpy as np, torch
from usn_perception.certify import Budget, PhotometricBox, certify_keypoints
from usn_perception.detector import load_detector
torch.set_num_threads(1)
det = load_detector(None)
image = (np.random.default_rng(0).random((96, 128)) * 255).astype(np.uint8)
box = PhotometricBox(alpha=(0.95, 1.05), beta=(-0.03, 0.03))
with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
    cert = certify_keypoints(det, image, box, budget=Budget(2), precision='float32')
print('STATS', cert.stats['precision'])
'''


def test_onednn_runs_float32_convolutions_as_direct_sums():
    """The error model holds for direct (and im2col) convolutions, not Winograd: ask oneDNN."""
    run = subprocess.run([sys.executable, '-c', ONEDNN_PROBE], capture_output=True, text=True,
                         timeout=300, check=True)
    assert 'STATS float32' in run.stdout
    convs = [line for line in run.stdout.splitlines()
             if line.startswith('onednn_verbose') and ',exec,' in line
             and (',convolution,' in line or ',deconvolution,' in line)]
    if torch.backends.mkldnn.is_available():
        assert convs, 'no oneDNN convolution ran: the probe did not exercise float32'
    for line in convs:
        assert 'wino' not in line, line
        assert 'alg:convolution_direct' in line or 'alg:deconvolution_direct' in line, line
        assert 'f32' in line and 'bf16' not in line and 'tf32' not in line, line


def test_shipped_default_gives_the_same_boxes_in_both_precisions():
    """Node-sized certificates resolve ~0.1 px; float32 must not loosen them measurably.

    (Measured: +0.5–1.4 % on boxes of 0.015–0.03 px, +10 % on one of 0.003 px: the float32
    slack is ~3e-4 px there.)
    """
    det = load_detector(None)
    rng = np.random.default_rng(1)
    image = np.clip(0.45 + 0.1 * rng.standard_normal((96, 128)), 0, 1)
    image[20:76, 30:100] = 0.06
    for y, x in [(28, 38), (28, 92), (68, 92), (68, 38), (48, 65)]:
        image[y - 3:y + 4, x - 3:x + 4] = 0.95
    box = PhotometricBox(alpha=(0.95, 1.05), beta=(-0.03, 0.03))
    a = certify_keypoints(det, image, box, budget=Budget(6), precision='float32')
    b = certify_keypoints(det, image, box, budget=Budget(6), precision='float64')
    wa, wb = a.widths.max(1), b.widths.max(1)
    assert np.all(wa <= wb * 1.02 + 1e-3), json.dumps([wa.tolist(), wb.tolist()])
    assert a.contains(b.nominal).all()

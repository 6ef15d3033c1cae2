"""The bound engine on its own: boxes, forms, input stage, layers, readout programs, splitting.

Soundness is checked against sampled θ on networks that use every supported layer kind, with
random weights and batch-norm statistics (negative scales included) so that no layer is an
identity in disguise.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

from usn_perception.bounds import layers, spec
from usn_perception.bounds.box import Budget, PhotometricBox, split_boxes
from usn_perception.bounds.diagnostics import layer_bounds
from usn_perception.bounds.forms import form_at, form_corners, form_range, lower, upper
from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import SUPPORTED_LAYERS, compile_network, module_outputs
from usn_perception.bounds.propagate import BudgetExceeded, propagate
from usn_perception.bounds.spec import (
    LOCAL_CANDIDATES,
    _first_cells,
    argmax_bounds,
    centroid_bounds,
    coupled_max,
    lfp_max,
    local_centroid_bounds,
    possible_argmax,
)
from usn_perception.bounds.split import partition, refine
from usn_perception.bounds.thresholds import ambiguous_mass, threshold_splits
from usn_perception.detector import Detector
from usn_perception.errors import UnsupportedLayerError
from usn_perception.network import DetectorConfig, InputNormalization, build_network
from usn_perception.readout import centroid, local_centroid

F64 = torch.float64


def _randomise_bn(net: nn.Module, gen: torch.Generator) -> None:
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d,)):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen, dtype=F64) * 0.3)
            m.running_var.copy_(torch.rand(c, generator=gen, dtype=F64) * 1.5 + 0.3)
            m.weight.data.copy_(torch.randn(c, generator=gen, dtype=F64))  # signs mixed
            m.bias.data.copy_(torch.randn(c, generator=gen, dtype=F64) * 0.3)


def _sample_thetas(boxes: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """(N, n, 2) θ per sub-box: the 4 corners, edge midpoints and random interior points."""
    u = torch.rand(boxes.shape[0], n, 2, generator=gen, dtype=F64)
    fixed = torch.tensor([[0, 0], [0, 1], [1, 0], [1, 1], [0.5, 0], [0, 0.5], [1, 0.5],
                          [0.5, 1]], dtype=F64)
    u[:, :8] = fixed
    a = boxes[:, None, 0] + u[..., 0] * (boxes[:, None, 1] - boxes[:, None, 0])
    b = boxes[:, None, 2] + u[..., 1] * (boxes[:, None, 3] - boxes[:, None, 2])
    return torch.stack([a, b], -1)


SUB_BOXES = torch.tensor([[0.8, 1.2, -0.1, 0.1], [0.95, 1.05, -0.03, 0.03],
                          [1.0, 1.0, 0.05, 0.05], [0.5, 1.7, -0.4, 0.5],
                          [1.1, 1.2, -0.3, -0.2]], dtype=F64)


# --- boxes and budgets ---------------------------------------------------------------------

@pytest.mark.parametrize('alpha, beta', [
    ((1.2, 0.8), (0, 0)), ((0.0, 1.0), (0, 0)), ((-1.0, 1.0), (0, 0)), ((1, 1), (0.1, -0.1)),
    ((float('nan'), 1), (0, 0)), ((1, float('inf')), (0, 0)), ((1, 1), (0, float('nan'))),
    ((1,), (0, 0)), ('ab', (0, 0)),
])
def test_photometric_box_rejects_invalid(alpha, beta):
    with pytest.raises(ValueError):
        PhotometricBox(alpha, beta)


def test_photometric_box_helpers():
    box = PhotometricBox((0.8, 1.2), (-0.1, 0.1))
    assert box.corners() == [(0.8, -0.1), (0.8, 0.1), (1.2, -0.1), (1.2, 0.1)]
    assert box.scaled(0.5) == PhotometricBox((0.9, 1.1), (-0.05, 0.05))
    assert box.scaled(0.0).is_point and box.scaled(0.0).contains(1.0, 0.0)
    parts = box.split(3, 2)
    assert len(parts) == 6
    assert min(p.alpha[0] for p in parts) == 0.8 and max(p.alpha[1] for p in parts) == 1.2
    assert PhotometricBox.point(1.1, 0.02).widths == (0.0, 0.0)
    assert PhotometricBox.coerce(((0.9, 1.1), (0, 0))) == PhotometricBox((0.9, 1.1), (0, 0))
    with pytest.raises(ValueError):
        PhotometricBox.coerce('nope')
    with pytest.raises(ValueError):
        box.scaled(-1.0)
    with pytest.raises(ValueError):
        box.scaled(6.0)  # alpha_lo would be negative


@pytest.mark.parametrize('kwargs', [{'max_subboxes': 0}, {'max_subboxes': 1.5},
                                    {'max_subboxes': 1, 'max_ms': 0},
                                    {'max_subboxes': 1, 'max_ms': float('inf')}])
def test_budget_rejects_invalid(kwargs):
    with pytest.raises(ValueError):
        Budget(**kwargs)


def test_split_boxes_covers_parent_exactly():
    boxes = SUB_BOXES[:2]
    kids = split_boxes(boxes, torch.tensor([0, 1]))
    assert kids.shape == (4, 4)
    assert kids[0, 1] == kids[1, 0] and kids[0, 0] == boxes[0, 0] and kids[1, 1] == boxes[0, 1]
    assert kids[2, 3] == kids[3, 2] and kids[2, 2] == boxes[1, 2] and kids[3, 3] == boxes[1, 3]


# --- forms -----------------------------------------------------------------------------------

def test_form_range_is_exact_over_corners():
    gen = torch.Generator().manual_seed(0)
    form = torch.randn(5, 3, 7, generator=gen, dtype=F64)
    lo, hi = form_range(form, SUB_BOXES)
    corners = form_corners(form, SUB_BOXES)
    torch.testing.assert_close(lo, corners.min(1).values, rtol=0, atol=1e-14)
    torch.testing.assert_close(hi, corners.max(1).values, rtol=0, atol=1e-14)
    inner = form_at(form, _sample_thetas(SUB_BOXES, 50, gen)[:, 20])
    assert bool(((inner >= lo - 1e-14) & (inner <= hi + 1e-14)).all())


# --- input stage -----------------------------------------------------------------------------

def _det(input_size=(32, 24)) -> Detector:
    config = DetectorConfig(input_size=input_size, widths=(4,) * 9)
    return Detector(build_network(config).eval(), config)


def _random_image(rng: np.random.Generator, shape: tuple[int, ...], dtype) -> np.ndarray:
    """Uniform pixels over the dtype's range (float: [0, 1))."""
    if dtype == np.float64:
        return rng.random(shape)
    return rng.integers(0, np.iinfo(dtype).max + 1, shape).astype(dtype)


@pytest.mark.parametrize('shape, dtype', [((30, 40), np.uint8), ((30, 40, 3), np.uint8),
                                          ((50, 70), np.float64), ((23, 17, 3), np.float64),
                                          ((24, 32), np.uint16), ((24, 32, 1), np.uint8)])
def test_encoding_reproduces_preprocessing(shape, dtype):
    img = _random_image(np.random.default_rng(1), shape, dtype)
    det = _det()
    enc = ImageEncoding(img, det.config.input_size)
    xf = img.astype(np.float64) / (np.iinfo(dtype).max if dtype != np.float64 else 1.0)
    for a, b in [(1.0, 0.0), (0.7, 0.25), (1.4, -0.3)]:
        got = enc.evaluate(torch.tensor([[a, b]], dtype=F64))
        want = det.network_input(np.clip(a * xf + b, 0.0, 1.0))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-13)


@pytest.mark.parametrize('shape, dtype', [((30, 40), np.uint8), ((23, 17, 3), np.uint8),
                                          ((50, 70), np.float64), ((24, 32), np.uint16)])
def test_threshold_deviations_are_the_differences_of_the_inputs(shape, dtype):
    img = _random_image(np.random.default_rng(3), shape, dtype)
    img.flat[:40] = 0  # some pixels at the clip values
    img.flat[-40:] = 1 if dtype == np.float64 else np.iinfo(dtype).max
    enc = ImageEncoding(img, _det().config.input_size)
    v = enc.values
    lo, hi = float(v.min()), float(v.max())
    cases = [  # τ along the dark values, κ along the bright ones, both at once, one point
        (torch.stack([v[0], v[3], v[7], v[12]]), torch.full((4,), hi, dtype=F64)),
        (torch.full((3,), lo, dtype=F64), torch.stack([v[-1], v[-5], v[-2]])),
        (torch.tensor([0.0, 0.05, 0.2], dtype=F64), torch.tensor([1.0, 0.9, 0.97], dtype=F64)),
        (torch.tensor([0.1, 0.1], dtype=F64), torch.tensor([0.8, 0.8], dtype=F64)),
    ]
    for taus, kappas in cases:
        u = enc.threshold_inputs(taus, kappas, shift=False)
        got = enc.threshold_deviations(taus, kappas)
        torch.testing.assert_close(got, u[1:] - u[:1], rtol=0, atol=1e-14)
    assert not enc.threshold_deviations(*cases[3]).any()  # nothing moves: exactly zero


def test_rows_using_agrees_with_testing_every_source():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (40, 60)).astype(np.uint8)
    img[:10] = rng.integers(0, 4, (10, 60))  # a dark band: the lowest values sit in few rows
    enc = ImageEncoding(img, _det().config.input_size)
    n = enc.values.shape[0]
    masks = [torch.arange(n) < 3, torch.arange(n) > 250, (torch.arange(n) < 2) | (
        torch.arange(n) > 253), torch.zeros(n, dtype=torch.bool), torch.ones(n, dtype=torch.bool),
        (torch.arange(n) > 100) & (torch.arange(n) < 110), torch.rand(n) < 0.05]
    for moved in masks:
        want = torch.nonzero(moved[enc.index].any(1))[:, 0]
        got = enc.rows_using(moved)
        assert torch.equal(got, want)
    assert 0 < enc.rows_using(masks[0]).numel() < enc.index.shape[0]


@pytest.mark.parametrize('rgb', [False, True])
def test_input_bounds_contain_samples(rgb):
    rng = np.random.default_rng(2)
    img = rng.random((20, 28, 3) if rgb else (20, 28))
    img[:5] = 0.0  # exact zeros and ones: saturate for every θ on one side
    img[-5:] = 1.0
    enc = ImageEncoding(img, (16, 16))
    gen = torch.Generator().manual_seed(3)
    thetas = _sample_thetas(SUB_BOXES, 40, gen)
    centre, radius = enc.forms(SUB_BOXES)
    c_ibp, r_ibp = enc.intervals(SUB_BOXES)
    for i in range(thetas.shape[1]):
        x = enc.evaluate(thetas[:, i])  # (N, 1, H, W)
        lo = form_at(lower(centre, radius), thetas[:, i])
        hi = form_at(upper(centre, radius), thetas[:, i])
        assert lo.shape == x.shape
        assert bool(((x >= lo - 1e-12) & (x <= hi + 1e-12)).all())
        assert bool(((x >= (c_ibp - r_ibp)[:, 0] - 1e-12)
                     & (x <= (c_ibp + r_ibp)[:, 0] + 1e-12)).all())
        if i == 0:  # the input is exact where no pixel can clip
            assert float((hi - lo).min()) == 0.0


# --- layers ----------------------------------------------------------------------------------

def _zoo(seed: int) -> list[tuple[str, nn.Sequential, tuple[int, ...]]]:
    """Small networks that together use every supported layer kind."""
    torch.manual_seed(seed)
    conv_stack = nn.Sequential(
        InputNormalization(0.4, 0.3),
        nn.Conv2d(1, 4, 3, stride=2, padding=1, bias=True), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False), nn.ReLU(),
        nn.BatchNorm2d(6),  # standalone (not after a conv): an elementwise affine op
        nn.Conv2d(6, 6, 3, padding=1, groups=2, padding_mode='reflect'), nn.ReLU(),
        nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Sequential(nn.Conv2d(4, 3, 1), nn.Identity()),
    )
    pool_stack = nn.Sequential(
        InputNormalization(0.5, 0.25),
        nn.Conv2d(1, 5, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2),
        nn.Conv2d(5, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Upsample(scale_factor=2, mode='nearest'), nn.Conv2d(5, 2, 1),
    )
    dense = nn.Sequential(
        InputNormalization(0.5, 0.25), nn.Conv2d(1, 3, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(), nn.Linear(3 * 8 * 8, 20), nn.ReLU(), nn.Linear(20, 4),
    )
    gen = torch.Generator().manual_seed(seed)
    nets = [('conv', conv_stack, (1, 16, 16)), ('pool', pool_stack, (1, 16, 16)),
            ('dense', dense, (1, 16, 16))]
    for _, net, _ in nets:
        net.double().eval()
        _randomise_bn(net, gen)
    return nets


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('relu', ['parallel', 'adaptive', 'interval'])
def test_propagation_contains_samples_for_every_layer_kind(seed, relu):
    rng = np.random.default_rng(seed)
    img = rng.random((16, 16))
    img[:3] = 0.02  # dark rows: the clip at 0 is active for negative β
    img[-3:] = 0.97  # bright rows: the clip at 1 is active
    enc = ImageEncoding(img, (16, 16))
    gen = torch.Generator().manual_seed(seed + 10)
    thetas = _sample_thetas(SUB_BOXES, 24, gen)
    for name, net, shape in _zoo(seed):
        compiled = compile_network(net, shape)
        if relu == 'interval':
            c, r = enc.intervals(SUB_BOXES)
        else:
            c, r = enc.forms(SUB_BOXES)
        with torch.no_grad():
            centre, radius, _ = propagate(compiled, c, r, SUB_BOXES, relu=relu)
            lo_box = form_range(lower(centre, radius), SUB_BOXES)[0]
            hi_box = form_range(upper(centre, radius), SUB_BOXES)[1]
            for i in range(thetas.shape[1]):
                y = net(enc.evaluate(thetas[:, i]))
                lo = form_at(lower(centre, radius), thetas[:, i])
                hi = form_at(upper(centre, radius), thetas[:, i])
                tol = 1e-9 * (1 + y.abs())
                assert lo.shape == y.shape
                assert bool(((y >= lo - tol) & (y <= hi + tol)).all()), (name, relu)
                assert bool(((y >= lo_box - tol) & (y <= hi_box + tol)).all()), (name, relu)


def test_point_box_is_exact():
    img = np.random.default_rng(0).random((16, 16))
    enc = ImageEncoding(img, (16, 16))
    box = torch.tensor([[1.1, 1.1, -0.05, -0.05]], dtype=F64)
    for _, net, shape in _zoo(3):
        c, r = enc.forms(box)
        with torch.no_grad():
            centre, radius, unstable = propagate(compile_network(net, shape), c, r, box)
            y = net(enc.evaluate(box[:, [0, 2]]))
        assert int(unstable.sum()) == 0 and float(radius.abs().max()) == 0.0
        torch.testing.assert_close(form_at(centre, box[:, [0, 2]]), y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize('layer, name', [(nn.Sigmoid(), 'Sigmoid'), (nn.MaxPool2d(2), 'MaxPool2d'),
                                         (nn.Upsample(scale_factor=2, mode='bilinear'),
                                          'Upsample'), (nn.Dropout(), 'Dropout')])
def test_unsupported_layer_is_named(layer, name):
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(), layer, nn.Conv2d(2, 1, 1))
    with pytest.raises(UnsupportedLayerError) as err:
        compile_network(net.double().eval(), (1, 8, 8))
    msg = str(err.value)
    assert 'layer 2' in msg and name in msg and 'Conv2d' in msg and 'supported layers' in msg
    assert SUPPORTED_LAYERS[0] in msg


def test_nested_layer_name_and_training_batchnorm():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Sequential(nn.ReLU(), nn.Tanh())).double()
    with pytest.raises(UnsupportedLayerError, match=r'layer 1\.1 \(Tanh\)'):
        compile_network(net.eval(), (1, 8, 8))
    bn = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).double().train()
    with pytest.raises(UnsupportedLayerError, match='training mode'):
        compile_network(bn, (1, 8, 8))
    with pytest.raises(UnsupportedLayerError, match='Sequential'):
        compile_network(nn.Conv2d(1, 2, 3).double(), (1, 8, 8))


@pytest.mark.parametrize('seed', [0, 1])
def test_module_outputs_stand_for_every_op(seed):
    """Each op's value is a module's output (folded BatchNorm, Identity, nested Sequential)."""
    x = torch.rand((1, 1, 16, 16), generator=torch.Generator().manual_seed(seed), dtype=F64)
    for _, net, shape in _zoo(seed):
        compiled = compile_network(net, shape)
        with torch.no_grad():
            outputs = module_outputs(net, x)
            traced = compiled.trace(x)
            torch.testing.assert_close(outputs[-1], net(x), rtol=0, atol=0)
        assert len(compiled.sources) == len(compiled.ops) == len(traced)
        for op, mine, theirs in zip(compiled.ops, traced, compiled.op_values(outputs),
                                    strict=True):
            torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12, msg=op.name)
        with pytest.raises(ValueError, match='module outputs'):
            compiled.op_values(outputs[:-2])


@pytest.mark.parametrize('padding', [0, 'same'])
def test_pointwise_conv_matches_the_convolution_in_every_layout(padding):
    """A 1x1 convolution runs as a matrix product; its values are the convolution's."""
    gen = torch.Generator().manual_seed(4)
    conv = nn.Conv2d(6, 3, 1, padding=padding, bias=False).double().eval()
    strided = nn.Conv2d(6, 3, 1, stride=2, bias=False).double().eval()
    for m, pointwise in ((conv, True), (strided, False)):
        assert layers._pointwise(m) == pointwise
        op = compile_network(nn.Sequential(m), (6, 5, 7)).ops[0]
        assert op.fan_in == 6  # what the float32 rounding bounds use: C terms either way
        x = torch.randn((4, 6, 5, 7), generator=gen, dtype=F64)
        layouts = [x, x.contiguous(memory_format=torch.channels_last),
                   x.transpose(2, 3).contiguous().transpose(2, 3)]  # neither: the fallback
        for dtype in (torch.float64, torch.float32):
            w = m.weight.detach().to(dtype)
            for inp in (t.to(dtype) for t in layouts):
                for apply, weight in ((op.apply, w), (op.apply_abs, w.abs())):
                    want = torch.nn.functional.conv2d(inp, weight, stride=m.stride)
                    torch.testing.assert_close(apply(inp), want, rtol=1e-6, atol=1e-6)


def test_compile_cache_follows_in_place_changes():
    net = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.BatchNorm2d(2), nn.ReLU()).double()
    net.eval()
    first = compile_network(net, (1, 8, 8))
    assert compile_network(net, (1, 8, 8)) is first
    with torch.no_grad():
        net[0].weight.mul_(2.0)
    second = compile_network(net, (1, 8, 8))
    assert second is not first
    net[1].running_var.data.mul_(3.0)  # .data bypasses the version counter
    third = compile_network(net, (1, 8, 8))
    assert third is not second
    net[0].weight = nn.Parameter(net[0].weight.detach() * 0.5)  # a new tensor, same values
    fourth = compile_network(net, (1, 8, 8))
    assert fourth is not third
    net[0] = nn.Conv2d(1, 2, 3, padding=1).double()  # a new layer
    second = compile_network(net, (1, 8, 8))
    assert second is not fourth
    x = torch.rand(1, 1, 8, 8, dtype=F64)
    torch.testing.assert_close(second.forward(x), net(x))
    net.train()
    with pytest.raises(UnsupportedLayerError):
        compile_network(net, (1, 8, 8))


def test_deadline_interrupts_propagation():
    net = _zoo(0)[0][1]
    enc = ImageEncoding(np.random.default_rng(0).random((16, 16)), (16, 16))
    c, r = enc.forms(SUB_BOXES)
    with pytest.raises(BudgetExceeded):
        propagate(compile_network(net, (1, 16, 16)), c, r, SUB_BOXES, deadline=0.0)


# --- readout programs ------------------------------------------------------------------------

def _brute_lfp_max(dl: np.ndarray, du: np.ndarray, c: np.ndarray) -> float:
    best = -np.inf
    for bits in itertools.product([0, 1], repeat=len(c)):
        w = np.where(np.array(bits, bool), np.exp(du), np.exp(dl))
        best = max(best, float((w * c).sum() / w.sum()))
    return best


@pytest.mark.parametrize('seed', range(4))
def test_lfp_max_is_exact(seed):
    rng = np.random.default_rng(seed)
    n = 9
    dl = rng.normal(0, 2, (3, n))
    du = dl + rng.random((3, n)) * 3
    dl[:, 0] = du[:, 0] = 0.0
    coords = np.array([0, 1, 1, 2, 3, 5, 5, 5, 8], dtype=float)  # ties on purpose
    got = lfp_max(torch.tensor(dl), torch.tensor(du), torch.tensor(coords)).numpy()
    want = [_brute_lfp_max(dl[i], du[i], coords) for i in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    # Extreme ranges do not overflow into NaN: the bound degrades to the coordinate range.
    huge = lfp_max(torch.tensor(dl * 1e4), torch.tensor(du * 1e4), torch.tensor(coords))
    assert bool(torch.isfinite(huge).all()) and bool((huge <= 8.0).all())


@pytest.mark.parametrize('max_cells', [64, 4])
def test_coupled_max_bounds_sampled_softargmax(max_cells):
    gen = torch.Generator().manual_seed(5)
    n_box, k, n = 5, 2, 30
    dc = torch.randn(n_box, 3, k, n, generator=gen, dtype=F64) * 0.6
    dr = torch.rand(n_box, 3, k, n, generator=gen, dtype=F64) * 0.1
    dc[..., 0] = 0.0
    dr[..., 0] = 0.0
    coords = (torch.arange(n, dtype=F64) % 6) * 1.5
    upper = coupled_max(dc, dr, SUB_BOXES, coords, max_cells=max_cells)
    dl = form_range(dc - dr, SUB_BOXES)[0]
    du = form_range(dc + dr, SUB_BOXES)[1]
    assert bool((upper <= lfp_max(dl, du, coords) + 0.5).all())  # same ballpark as LFP
    thetas = _sample_thetas(SUB_BOXES, 64, gen)
    for i in range(thetas.shape[1]):
        mid = form_at(dc, thetas[:, i])
        rad = form_at(dr, thetas[:, i])
        for extreme in (-1.0, 1.0, 0.0):
            noise = torch.rand(mid.shape, generator=gen, dtype=F64) * 2 - 1
            d = mid + extreme * rad if extreme else mid + noise * rad
            x = (torch.softmax(d, -1) * coords).sum(-1)
            assert bool((x <= upper + 1e-9).all())


@pytest.mark.parametrize('batch', [True, False])  # possible_argmax: witnesses at once or not
def test_argmax_bounds_contain_sampled_argmax(batch, monkeypatch):
    gen = torch.Generator().manual_seed(6)
    n_box, k, h, w = 5, 2, 4, 5
    centre = torch.randn(n_box, 3, k, h * w, generator=gen, dtype=F64)
    centre[:, 0, :, 7] += 3.0  # a clear winner most of the time
    radius = torch.rand(n_box, 1, k, h * w, generator=gen, dtype=F64) * 0.3
    gv, gu = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64),
                            indexing='ij')
    grid = (gu.reshape(-1), gv.reshape(-1))
    mask = possible_argmax(centre, radius, SUB_BOXES)
    monkeypatch.setattr(spec, 'WITNESS_BATCH', 1 << 30 if batch else 0)
    assert torch.equal(possible_argmax(centre, radius, SUB_BOXES), mask)  # the same mask
    bounds = argmax_bounds(centre, radius, SUB_BOXES, grid)
    thetas = _sample_thetas(SUB_BOXES, 64, gen)
    for i in range(thetas.shape[1]):
        noise = (torch.rand(n_box, k, h * w, generator=gen, dtype=F64) * 2 - 1)
        logits = form_at(centre, thetas[:, i]) + noise * radius[:, 0]
        idx = logits.argmax(-1)
        u, v = grid[0][idx], grid[1][idx]
        assert bool(((u >= bounds[..., 0]) & (u <= bounds[..., 1])
                     & (v >= bounds[..., 2]) & (v <= bounds[..., 3])).all())
    assert float((bounds[..., 1] - bounds[..., 0]).min()) < w - 1  # not trivial everywhere


def _two_peak_forms(gen: torch.Generator, n_box: int, k: int, h: int, w: int,
                    spread: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Logit forms with two rival peaks far apart, a negative floor and θ-dependent slopes."""
    centre = torch.randn(n_box, 3, k, h * w, generator=gen, dtype=F64) * 0.05 - 0.2
    centre[:, 1:] = torch.randn(n_box, 2, k, h * w, generator=gen, dtype=F64) * 0.3
    gv, gu = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64),
                            indexing='ij')
    for (pu, pv), height in (((3.0, 2.0), 1.0), ((w - 3.0, h - 3.0), 0.95)):
        bump = torch.exp(-((gu - pu) ** 2 + (gv - pv) ** 2) / 2.0).reshape(-1)
        centre[:, 0] += 1.3 * height * bump
    radius = torch.rand(n_box, 1, k, h * w, generator=gen, dtype=F64) * spread
    return centre, radius


@pytest.mark.parametrize('readout', ['centroid', 'local-centroid'])
@pytest.mark.parametrize('spread', [0.0, 0.02, 0.3])
def test_centroid_bounds_contain_sampled_readouts(readout, spread):
    """Any logits inside the forms' bounds, at any θ of the sub-box, read inside the bound.

    Two rival peaks make the argmax (and so the local window) switch between sub-boxes and
    samples; spread 0 checks the exact case, 0.3 the vacuous-mass fallbacks.
    """
    gen = torch.Generator().manual_seed(11)
    centre, radius, grid = _two_peak_setting(gen, spread)
    bound, read = {'centroid': (centroid_bounds, centroid),
                   'local-centroid': (local_centroid_bounds, local_centroid)}[readout]
    bounds = bound(centre, radius, SUB_BOXES, grid)
    _assert_sampled_readouts_inside(gen, centre, radius, bounds, read, 48)
    if spread == 0.0:  # exact forms: the bound is the readout's own range, not the grid
        assert float((bounds[..., 1] - bounds[..., 0]).max()) < TWO_PEAK_HW[1] - 1


#: (K, H, W) of the two-peak heatmaps of the sampled readout tests.
TWO_PEAK_HW = (9, 14)


def _two_peak_setting(gen: torch.Generator, spread: float) -> tuple:
    """Two-peak forms on SUB_BOXES (2 keypoints, 9x14 cells) and their cell grid."""
    (h, w), k = TWO_PEAK_HW, 2
    centre, radius = _two_peak_forms(gen, SUB_BOXES.shape[0], k, h, w, spread)
    gv, gu = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64),
                            indexing='ij')
    return centre, radius, (gu.reshape(-1), gv.reshape(-1))


def _assert_sampled_readouts_inside(gen: torch.Generator, centre: torch.Tensor,
                                    radius: torch.Tensor, bounds: torch.Tensor, read,
                                    n_theta: int) -> None:
    """Logits inside the forms' bounds (each end, and noise between) at sampled θ read inside."""
    n_box, _, k, _ = centre.shape
    h, w = TWO_PEAK_HW
    thetas = _sample_thetas(SUB_BOXES, n_theta, gen)
    for i in range(thetas.shape[1]):
        for extreme in (-1.0, 1.0, 0.0):
            noise = torch.rand(n_box, k, h * w, generator=gen, dtype=F64) * 2 - 1
            scale = extreme if extreme else noise
            logits = form_at(centre, thetas[:, i]) + scale * radius[:, 0]
            uv = read(logits.view(n_box, k, h, w))
            assert bool(((uv[..., 0] >= bounds[..., 0]) & (uv[..., 0] <= bounds[..., 1])
                         & (uv[..., 1] >= bounds[..., 2]) & (uv[..., 1] <= bounds[..., 3])
                         ).all()), (i, extreme)


@pytest.mark.parametrize('spread', [0.02, 0.3])
def test_local_centroid_bounds_on_given_windows(spread):
    """Windows found by the caller (spec.local_windows) and the forms on their cells only.

    From the same forms: the same boxes, bit for bit. From forms that bound more (a box
    holding the sub-boxes, here a wider radius: more candidates, a larger scale), the
    readouts still read inside, on the sub-boxes' own forms at the windows' cells.
    """
    gen = torch.Generator().manual_seed(13)
    centre, radius, grid = _two_peak_setting(gen, spread)

    def on_windows(windows: spec.LocalWindows) -> torch.Tensor:
        flat = windows.cells.flatten(2)
        return local_centroid_bounds(spec._gather_many(centre, flat),
                                     spec._gather_many(radius, flat), SUB_BOXES, grid,
                                     windows=windows)

    same = on_windows(spec.local_windows(centre, radius, SUB_BOXES, grid))
    assert torch.equal(same, local_centroid_bounds(centre, radius, SUB_BOXES, grid))
    wider = spec.local_windows(centre, radius * 2.0 + 0.25, SUB_BOXES, grid)
    assert bool((wider.count >= spec.local_windows(centre, radius, SUB_BOXES, grid).count).all())
    assert bool((wider.count > 1).any())
    _assert_sampled_readouts_inside(gen, centre, radius, on_windows(wider), local_centroid, 32)


def test_first_cells_are_a_stable_sorts_first_cells():
    rng = torch.Generator().manual_seed(5)
    mask = torch.rand((3, 4, 50), generator=rng) < 0.2
    mask[0, 0] = False  # a row with no set cell
    mask[0, 1] = True  # a row with every cell set
    for count in (0, 1, 7, 50):
        index, valid = _first_cells(mask, count)
        order = mask.to(torch.int8).sort(dim=-1, descending=True, stable=True)
        assert torch.equal(valid, order.values[..., :count].bool())
        # The set cells in index order; padding is index 0, flagged unset.
        assert torch.equal(torch.where(valid, index, 0),
                           torch.where(valid, order.indices[..., :count], 0))
        assert not bool(index[~valid].any())


def test_local_centroid_bounds_beat_centroid_when_far_cells_are_uncertain():
    """The local window ignores far cells that may turn positive; the global centroid cannot."""
    gen = torch.Generator().manual_seed(12)
    n_box, k, h, w = 5, 1, 12, 16
    centre, radius = _two_peak_forms(gen, n_box, k, h, w, 0.0)
    centre[:, 1:] *= 0.01  # nearly exact in θ
    centre[:, 0, :, h * w // 2:] = -0.3  # one peak in the top half, a floor below it
    radius[:, 0, :, -w:] = 0.5  # but the bottom row may turn positive
    gv, gu = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64),
                            indexing='ij')
    grid = (gu.reshape(-1), gv.reshape(-1))
    glob = centroid_bounds(centre, radius, SUB_BOXES, grid)
    loc = local_centroid_bounds(centre, radius, SUB_BOXES, grid)
    assert float((loc[..., 3] - loc[..., 2]).max()) < 1.0
    assert float((glob[..., 3] - glob[..., 2]).min()) > 1.0


def test_local_centroid_bounds_with_many_candidates_stay_in_the_grown_box():
    """More argmax candidates than LOCAL_CANDIDATES: the candidates' box grown by the window."""
    n_box, k, h, w = 5, 1, 6, 30
    centre = torch.zeros(n_box, 3, k, h * w, dtype=F64)
    centre[:, 0, :, 2 * w:3 * w] = 1.0  # one row of equal peaks: all may be the argmax
    radius = torch.full((n_box, 1, k, h * w), 1e-3, dtype=F64)
    gv, gu = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64),
                            indexing='ij')
    grid = (gu.reshape(-1), gv.reshape(-1))
    assert w > LOCAL_CANDIDATES
    loc = local_centroid_bounds(centre, radius, SUB_BOXES, grid)
    torch.testing.assert_close(loc[..., 0], torch.zeros_like(loc[..., 0]))
    torch.testing.assert_close(loc[..., 1], torch.full_like(loc[..., 1], w - 1.0))
    assert float(loc[..., 2].min()) >= 0.0 and float(loc[..., 3].max()) <= 5.0


# --- splitting -------------------------------------------------------------------------------

def test_refine_never_widens_and_respects_budget():
    calls = []

    def evaluate(boxes, deadline):
        calls.append(boxes.shape[0])
        # A deliberately non-monotone bound: children can come out *wider* than the parent.
        width = (boxes[:, 1] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 2])
        wobble = 1.0 + 0.5 * torch.sin(boxes[:, 0] * 1000)
        lo = -width * wobble
        hi = width * wobble * 2
        b = torch.stack([lo, hi, lo, hi], -1)[:, None]
        est = torch.zeros(boxes.shape[0], 1, 2, dtype=F64)
        return b, est

    root = torch.tensor([[0.8, 1.2, -0.1, 0.1]], dtype=F64)
    one = refine(evaluate, root, Budget(1), intensity=0.5)
    many = refine(evaluate, root, Budget(20), intensity=0.5)
    assert one.evaluated == 1 and many.evaluated <= 20 and sum(calls) == 1 + many.evaluated
    h1, h2 = one.hull(), many.hull()
    assert bool((h2[..., 0] >= h1[..., 0]).all() and (h2[..., 1] <= h1[..., 1]).all())
    leaves = many.boxes
    area = ((leaves[:, 1] - leaves[:, 0]) * (leaves[:, 3] - leaves[:, 2])).sum()
    assert float(area) == pytest.approx(0.4 * 0.2, rel=1e-12)  # leaves tile the root


# (τ, κ) root and pixel values: 0.02 and 0.05 ambiguous in τ, 0.97 in κ, the rest never.
TK_ROOT = torch.tensor([[-0.03, 0.06, 0.95, 1.05]], dtype=F64)
TK_VALUES = torch.tensor([0.0 - 0.04, 0.02, 0.05, 0.5, 0.97, 1.06], dtype=F64)
TK_WEIGHTS = torch.tensor([1.0, 3.0, 1.0, 5.0, 2.0, 1.0], dtype=F64)


def _tk_tools():
    def splitter(b):
        return threshold_splits(b, TK_VALUES, TK_WEIGHTS)

    def priority(b):
        return ambiguous_mass(b, TK_VALUES, TK_WEIGHTS)

    return splitter, priority


def test_ambiguous_mass_counts_values_strictly_inside():
    boxes = torch.cat([TK_ROOT, torch.tensor([[0.02, 0.05, 0.97, 1.0], [0.0, 0.01, 0.96, 0.98]],
                                             dtype=F64)])
    mass = ambiguous_mass(boxes, TK_VALUES, TK_WEIGHTS)
    # Root: 0.02, 0.05 (τ) and 0.97 (κ). Values on an edge are exact (clipped or not, fixed).
    assert mass.tolist() == [6.0, 0.0, 2.0]


def test_partition_tiles_the_root_and_stops_when_exact():
    splitter, priority = _tk_tools()
    leaves = partition(TK_ROOT, 3, splitter, priority)
    assert leaves.shape == (3, 4)
    # Heaviest ambiguous value first: the τ cut at 0.02 (weight 3) comes before any κ cut.
    assert 0.02 in leaves[:, :2].flatten().tolist()
    many = partition(TK_ROOT, 50, splitter, priority)
    assert many.shape[0] == 6  # 3 τ pieces, each cut at κ = 0.97: all exact then
    assert float(priority(many).max()) == 0.0
    for part in (leaves, many):
        area = ((part[:, 1] - part[:, 0]) * (part[:, 3] - part[:, 2])).sum()
        assert float(area) == pytest.approx(0.09 * 0.1, rel=1e-12)
        pts = torch.rand(2000, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
        pts = TK_ROOT[0, ::2] + pts * (TK_ROOT[0, 1::2] - TK_ROOT[0, ::2])
        inside = ((pts[:, None, 0] >= part[None, :, 0]) & (pts[:, None, 0] <= part[None, :, 1])
                  & (pts[:, None, 1] >= part[None, :, 2]) & (pts[:, None, 1] <= part[None, :, 3]))
        assert bool((inside.sum(1) == 1).all())  # a tiling: every point in exactly one leaf
    assert partition(TK_ROOT, 1, splitter, priority).equal(TK_ROOT)


def test_refine_bounds_the_partition_first():
    splitter, priority = _tk_tools()
    calls = []

    def evaluate(boxes, deadline):
        calls.append(boxes.clone())
        width = (boxes[:, 1] - boxes[:, 0]) + (boxes[:, 3] - boxes[:, 2])
        b = torch.stack([-width, width, -width, width], -1)[:, None]
        return b, torch.zeros(boxes.shape[0], 1, 2, dtype=F64)

    out = refine(evaluate, TK_ROOT, Budget(3), splitter=splitter, priority=priority)
    assert len(calls) == 1 and calls[0].shape[0] == 3
    assert out.first_pass == 3 and out.evaluated == 3 and out.passes == 1
    calls.clear()
    # Six leaves make the input exact; the remaining budget is spent adaptively.
    out = refine(evaluate, TK_ROOT, Budget(10), splitter=splitter, priority=priority)
    assert calls[0].shape[0] == 6 and out.first_pass == 6
    assert out.evaluated == sum(c.shape[0] for c in calls) <= 10 and len(calls) > 1


def test_layer_bounds_reports_every_op():
    det = _det((32, 24))
    img = np.random.default_rng(0).random((24, 32))
    report = layer_bounds(det, img, PhotometricBox((0.9, 1.1), (-0.05, 0.05)))
    assert len(report) == len(compile_network(det.net, (1, 24, 32)).ops)
    relus = [r for r in report if r.kind == 'relu']
    assert len(relus) == 9 and all(r.unstable_per_channel.shape == (4,) for r in relus)
    assert all(r.unstable == int(r.unstable_per_channel.sum()) for r in relus)
    assert all(r.bound_width >= r.theta_width - 1e-12 for r in report)
    point = layer_bounds(det, img, PhotometricBox.point(1.0, 0.0))
    assert all(r.radius_width == 0.0 and r.unstable == 0 for r in point)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_local_centroid_bounds_with_window_moments_contain_sampled_readouts(seed):
    """Window moments (spec.WindowMoments) replace the stable cells' bands by three sums.

    The logits are the forms plus a deviation δ: on the stable cells one of a set of sampled
    vectors (the moments are their sums' exact range, so every sample is consistent with
    them), elsewhere anything within the radius. Every sample at every θ reads inside the
    bound, and the moments make the boxes narrower than the stable cells' bands do.
    """
    gen = torch.Generator().manual_seed(seed)
    n_box, k, h, w, window = SUB_BOXES.shape[0], 2, 9, 14, 3
    gv, gu = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64),
                            indexing='ij')
    grid = (gu.reshape(-1), gv.reshape(-1))
    centre = torch.zeros(n_box, 3, k, h * w, dtype=F64)
    centre[:, 1:] = torch.randn(n_box, 2, k, h * w, generator=gen, dtype=F64) * 0.02
    peaks = []
    # The first keypoint's window is positive throughout (all of it goes through the
    # moments); the second's only near its peak.
    for kk, (pu, pv, spread) in enumerate(((4, 4, 30.0), (w - 5, 3, 3.0))):
        bump = torch.exp(-((gu - pu) ** 2 + (gv - pv) ** 2) / spread).reshape(-1)
        centre[:, 0, kk] = 1.5 * bump - 0.05
        peaks.append(pv * w + pu)
    peak = torch.tensor(peaks)
    rho = 0.03  # the deviation's reach on every cell: the rows' band
    radius = torch.full((n_box, 1, k, h * w), rho, dtype=F64)
    # The window's cells, row-major around each peak; stable where positive on every box.
    off = torch.arange(-window, window + 1)
    dv, du = (t.reshape(-1) for t in torch.meshgrid(off, off, indexing='ij'))
    cells = (peak // w)[:, None] + dv, (peak % w)[:, None] + du  # (K, m) v, u
    inside = (cells[0] >= 0) & (cells[0] < h) & (cells[1] >= 0) & (cells[1] < w)
    flat = (cells[0].clamp(0, h - 1) * w + cells[1].clamp(0, w - 1))
    low = spec.logit_ranges(centre, radius, SUB_BOXES).lo  # (N, K, P)
    stable = inside & (low.amin(0).gather(1, flat) > 0.01)
    assert 5 < int(stable.sum()) < stable.numel()
    anchor = torch.randint(-32, 33, (k, 2), generator=gen).to(F64) / 64.0
    # Sampled deviations on the stable cells, and their sums' exact range per box: the ones
    # that push the centroid furthest (+-rho by the side of the anchor, on each axis, and
    # the mass up and down), then random ones.
    samples = (torch.rand(40, n_box, k, h * w, generator=gen, dtype=F64) * 2 - 1) * rho
    pushes = []
    for centred in (True, False):  # by the side of the anchor, and of the peak
        side_u = torch.zeros(k, h * w, dtype=F64)
        side_v = torch.zeros(k, h * w, dtype=F64)
        for kk in range(k):
            au, av = (anchor[kk, 0], anchor[kk, 1]) if centred else (0.0, 0.0)
            side_u[kk, flat[kk][inside[kk]]] = torch.sign(du[inside[kk]].to(F64) - au)
            side_v[kk, flat[kk][inside[kk]]] = torch.sign(dv[inside[kk]].to(F64) - av)
        pushes += [side_u, -side_u, side_v, -side_v]
        if not centred:  # one half of the window up: the mass and a moment together
            pushes += [(side_u >= 0) * 1.0, (side_u <= 0) * 1.0, (side_v >= 0) * 1.0,
                       (side_v <= 0) * 1.0]
    pushes += [torch.ones_like(side_u), -torch.ones_like(side_u)]
    extremes = len(pushes)
    for j, push in enumerate(pushes):
        samples[j] = rho * push
    on = torch.zeros(k, h * w, dtype=torch.bool)
    for kk in range(k):
        on[kk, flat[kk][stable[kk]]] = True
    weights = torch.zeros(k, 3, h * w, dtype=F64)
    for kk in range(k):
        at = flat[kk][stable[kk]]
        weights[kk, 0, at] = 1.0
        weights[kk, 1, at] = du[stable[kk]].to(F64) - anchor[kk, 0]
        weights[kk, 2, at] = dv[stable[kk]].to(F64) - anchor[kk, 1]
    gather = flat[None, None].expand(n_box, 3, -1, -1)
    exact = centre.gather(3, gather), torch.full((n_box, 1, k, flat.shape[1]), 1e-12, dtype=F64)

    def bounds_for(chosen: torch.Tensor) -> torch.Tensor:
        sums = torch.einsum('snkp,kfp->snkf', chosen, weights)  # (S, N, K, 3)
        moments = spec.WindowMoments(peak, anchor, stable, sums.amin(0), sums.amax(0), *exact)
        return local_centroid_bounds(centre, radius, SUB_BOXES, grid, window, moments=moments)

    # All samples (the extremes make the sums as wide as the bands allow: a test of the
    # scan's signs and anchors), and the random ones only (narrower sums).
    every, random = bounds_for(samples), bounds_for(samples[extremes:])
    # One half of the window up, alone: its sums are the extremes (a test of the anchor).
    halves = bounds_for(torch.cat([samples[8:12], samples[extremes:]]))
    plain = local_centroid_bounds(centre, radius, SUB_BOXES, grid, window)
    thetas = _sample_thetas(SUB_BOXES, 24, gen)
    for i in range(thetas.shape[1]):
        base = form_at(centre, thetas[:, i])
        for s in [*range(extremes), *range(extremes, samples.shape[0], 4)]:
            # the other cells: as the sample where it pushes (within the radius), else noise
            noise = (torch.rand(n_box, k, h * w, generator=gen, dtype=F64) * 2 - 1) * rho
            logits = base + torch.where(on | (s < extremes), samples[s], noise)
            uv = local_centroid(logits.view(n_box, k, h, w), window)
            chosen = [every, plain] + ([halves] if 8 <= s < 12 else [])
            for bounds in chosen if s < extremes else (every, random, halves, plain):
                assert bool(((uv[..., 0] >= bounds[..., 0]) & (uv[..., 0] <= bounds[..., 1])
                             & (uv[..., 1] >= bounds[..., 2])
                             & (uv[..., 1] <= bounds[..., 3])).all()), (seed, i, s)
    width = lambda b: (b[..., 1] - b[..., 0]) + (b[..., 3] - b[..., 2])  # noqa: E731
    assert float(width(random).sum()) < float(width(plain).sum())


@pytest.mark.parametrize('seed', range(6))
def test_threshold_scan_takes_the_moments_terms_exactly(seed):
    # Σ w_i·(c_i − t) + G − (t − a)·S ≤ 0 for every (S, G) in a box: the scan's answer is
    # the smallest such t (weights exact here, so it is the root, not only a bound).
    gen = torch.Generator().manual_seed(seed)
    values = torch.arange(-3, 4, dtype=F64)
    w = torch.rand(7, generator=gen, dtype=F64) + 0.1
    s_lo, s_hi = sorted((torch.randn(2, generator=gen, dtype=F64) * 0.5).tolist())
    g_lo, g_hi = sorted((torch.randn(2, generator=gen, dtype=F64) * 0.5).tolist())
    anchor = float(torch.randint(-96, 97, (1,), generator=gen)) / 64.0
    weights = w.flip(0).view(1, 1, 1, 7).expand(1, 4, 1, 7)  # descending coordinates
    c = values.flip(0).view(1, 1, 7)
    extra = tuple(torch.tensor([[x]], dtype=F64) for x in (g_hi, s_lo, s_hi, anchor))
    t = float(spec._smallest_threshold(weights, weights, weights, weights, c, values, 7,
                                       extra)[0, 0])

    def worst(t: float) -> float:  # the left side at its worst (S, G)
        s = s_lo if t >= anchor else s_hi
        return float((w * (values - t)).sum()) + g_hi - (t - anchor) * s

    assert worst(t) <= 1e-9
    if t > -3.0:
        assert worst(t - 1e-6) > 0  # the smallest: a hair less is infeasible

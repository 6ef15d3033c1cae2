"""The exact first linear stage in clip-threshold coordinates (usn_perception.bounds.prefix).

Its forms must contain the concrete first-stage output at every (τ, κ) of the sub-box (dense
grids plus every pixel value inside the box, where the kinks are), reduce to the per-value
relaxation when no value is kept exact, be exact when no pixel is clipped ambiguously, and
keep the cancellation a zero-mean filter sees over a uniformly clipped region.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from usn_perception.bounds.box import split_boxes
from usn_perception.bounds.forms import form_range
from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import apply_point, compile_network
from usn_perception.bounds.prefix import linear_prefix, prefix_forms
from usn_perception.bounds.propagate import propagate
from usn_perception.network import DetectorConfig, InputNormalization, build_network

F64 = torch.float64
#: Allowed float64 disagreement between the forms and a direct evaluation (real escapes from
#: a wrong relaxation are orders of magnitude larger; see the logit slack in docs).
ULP_SLACK = 1e-12
SIZE = (32, 24)  # network input (w, h)
BOXES = {
    'node': [-0.032, 0.032, 0.92, 1.09],
    'offline': [-0.13, 0.13, 0.73, 1.38],
    'darkening': [0.0, 0.12, 1.0, 1.3],
    'point': [0.05, 0.05, 1.1, 1.1],
    'thin': [0.01, 0.01 + 1e-12, 0.95, 1.05],
}


def biased_net(seed: int) -> nn.Sequential:
    """A non-homogeneous first stage (normalisation shift, conv bias, BatchNorm)."""
    torch.manual_seed(seed)
    net = nn.Sequential(InputNormalization(0.5, 0.25),
                        nn.Conv2d(1, 6, 3, padding=1, padding_mode='replicate'),
                        nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 3, 1)).double()
    with torch.no_grad():
        net[2].running_mean.uniform_(-0.5, 0.5)
        net[2].running_var.uniform_(0.5, 2.0)
    return net.eval()


def zero_mean_net(seed: int) -> nn.Sequential:
    """The product's homogeneous architecture (zero-mean first filter, no shifts)."""
    torch.manual_seed(seed)
    config = DetectorConfig(input_size=SIZE, widths=(6, 8, 8, 8, 8, 8, 8, 6, 6),
                            keypoint_names=('a', 'b', 'c'))
    return build_network(config).double().eval()


def image(kind: str, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = 30, 40
    if kind == 'dark':  # many pixels near black: ambiguous at the low threshold
        img = np.where(rng.random((h, w)) < 0.5, 0, rng.integers(0, 30, (h, w)))
    elif kind == 'saturated':
        img = np.where(rng.random((h, w)) < 0.5, 255, rng.integers(220, 256, (h, w)))
    elif kind == 'target':  # a black square on white, anti-aliased edges
        img = np.full((h, w), 250)
        img[8:22, 10:30] = 2
        img[8, 10:30] = 120
    else:
        img = rng.integers(0, 256, (h, w))
    return img.astype(np.uint8)


def first_stage(enc: ImageEncoding, net, n_ops: int, tau: float, kappa: float) -> torch.Tensor:
    x = enc.threshold_inputs(torch.tensor([tau], dtype=F64), torch.tensor([kappa], dtype=F64))
    for op in net.ops[:n_ops]:
        x = apply_point(op, x)
    return x[0]


def sample_points(row: list[float], values: torch.Tensor) -> list[tuple[float, float]]:
    """A dense grid of the box plus every pixel value inside it (the kinks) on both axes."""
    t_lo, t_hi, k_lo, k_hi = row
    taus = np.linspace(t_lo, t_hi, 9).tolist()
    kappas = np.linspace(k_lo, k_hi, 9).tolist()
    taus += [float(v) for v in values if t_lo < v < t_hi]
    kappas += [float(v) for v in values if k_lo < v < k_hi]
    grid = [(t, k) for t in taus[:9] for k in kappas[:9]]
    return grid + [(t, k_lo) for t in taus[9:]] + [(t_hi, k) for k in kappas[9:]] + [
        (t, k) for t in taus[9:] for k in kappas[9:]]


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('kind', ['dark', 'saturated', 'target', 'random'])
@pytest.mark.parametrize('make_net', [biased_net, zero_mean_net])
def test_prefix_forms_contain_the_first_stage_everywhere(seed, kind, make_net):
    img = image(kind, seed)
    enc = ImageEncoding(img, SIZE)
    net = compile_network(make_net(seed), enc.shape)
    n_ops = linear_prefix(net)
    assert n_ops == 2  # normalisation + first convolution (BatchNorm folded)
    rows = torch.tensor(list(BOXES.values()), dtype=F64)
    for exact in (0, 2, 1000):
        centre, radius = prefix_forms(enc, net, rows, n_ops, exact)
        for i, row in enumerate(rows.tolist()):
            for tau, kappa in sample_points(row, enc.values):
                z = first_stage(enc, net, n_ops, tau, kappa)
                c = centre[i, 0] + centre[i, 1] * tau + centre[i, 2] * kappa
                # Float64 rounding of the evaluations is ulp-level (the logit slack covers it).
                gap = (z - c).abs() - radius[i, 0] - ULP_SLACK * (1.0 + z.abs())
                assert float(gap.max()) <= 0.0, (kind, exact, row, tau, kappa, float(gap.max()))


def test_without_exact_values_it_is_the_input_relaxation_moved_through_the_prefix():
    enc = ImageEncoding(image('target', 0), SIZE)
    net = compile_network(zero_mean_net(0), enc.shape)
    rows = torch.tensor([BOXES['node'], BOXES['offline']], dtype=F64)
    centre, radius = prefix_forms(enc, net, rows, 2, exact=0)
    c_in, r_in = enc.threshold_forms(rows)
    net_prefix = type(net)(net.ops[:2], net.input_shape, net.output_shape, net.max_numel)
    c_ref, r_ref, _ = propagate(net_prefix, c_in, r_in, rows)
    torch.testing.assert_close(centre, c_ref, rtol=0, atol=1e-9)
    torch.testing.assert_close(radius, r_ref, rtol=0, atol=1e-9)


def test_no_ambiguous_value_means_an_exact_form():
    img = np.random.default_rng(0).integers(60, 200, (30, 40)).astype(np.uint8)
    enc = ImageEncoding(img, SIZE)
    net = compile_network(biased_net(0), enc.shape)
    rows = torch.tensor([BOXES['node']], dtype=F64)
    _, radius = prefix_forms(enc, net, rows, 2)
    assert float(radius.max()) == 0.0


def test_exact_values_keep_the_cancellation_over_a_clipped_region():
    """Zero-mean filter inside a black square: exactly 0 for every τ; the relaxation is not."""
    enc = ImageEncoding(image('target', 0), SIZE)
    net = compile_network(zero_mean_net(0), enc.shape)
    rows = torch.tensor([BOXES['node']], dtype=F64)
    _, exact = prefix_forms(enc, net, rows, 2)
    _, relaxed = prefix_forms(enc, net, rows, 2, exact=0)
    inside = (slice(None), slice(None), slice(None), slice(9, 13), slice(11, 20))
    assert float(exact[inside].max()) < 1e-8 < float(relaxed[inside].min())
    assert bool((exact <= relaxed + 1e-8).all())


def test_split_children_stay_sound_and_bad_prefix_lengths_are_refused():
    enc = ImageEncoding(image('dark', 3), SIZE)
    net = compile_network(zero_mean_net(3), enc.shape)
    rows = torch.tensor([BOXES['offline']], dtype=F64)
    for axis in (0, 1, 0):
        rows = split_boxes(rows, torch.full((rows.shape[0],), axis),
                           torch.full((rows.shape[0],), float('nan'), dtype=F64))
    centre, radius = prefix_forms(enc, net, rows, 2, exact=3)
    lo, hi = form_range(centre, rows)
    for i, row in enumerate(rows.tolist()):
        for tau, kappa in sample_points(row, enc.values):
            z = first_stage(enc, net, 2, tau, kappa)
            slack = radius[i, 0] + ULP_SLACK * (1.0 + z.abs())
            assert bool((z >= lo[i] - slack).all() and (z <= hi[i] + slack).all())
    for bad in (0, 3):
        with pytest.raises(ValueError, match='n_ops'):
            prefix_forms(enc, net, rows, bad)

"""Level nodes (usn_perception/bounds/levels.py): exact at the clip levels, sound between them.

The module's claim is checked directly (the network's logits at dense thresholds between the
nodes lie within the interpolant ± the segment's radius, float32 and float64, shared and
per-segment radii), then through ``certify_keypoints`` (dense θ grid + attack, three scale-free
readouts, several networks and budgets, the shipped model), and the cases where the plan must
not be used (both thresholds clip, a network whose |τ|·R is not negligible, too many nodes).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from test_certify import assert_sound, homogeneous_detector
from test_free import DEFAULT, F64, NODE_BOX, OFFLINE_BOX, homogeneous_shallow, mid_image

from usn_perception.bounds.fused import fused_prefix
from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import AffineOp, compile_network
from usn_perception.bounds.levels import (
    KAPPA,
    TAU,
    evaluation_points,
    leaf_forms,
    level_axis,
    level_bounds,
    level_logits,
    level_nodes,
    narrowest_merged,
    radius_groups,
    reference_unclipped,
)
from usn_perception.bounds.spec import logit_ranges
from usn_perception.bounds.thresholds import carve_free, threshold_row
from usn_perception.certify import (
    LEAF_WORK,
    NODE_BUDGET,
    NODES_PER_SUBBOX,
    OFFSET_LEAF_WORK,
    OFFSET_MIN_LEAVES,
    WINDOW_WORK,
    Budget,
    PhotometricBox,
    certify_keypoints,
)
from usn_perception.detector import Detector, load_detector
from usn_perception.network import DetectorConfig, build_network
from usn_perception.readout import LOCAL_RADIUS


def one_sided(seed: int, side: str) -> np.ndarray:
    """8-bit frame whose only clipped pixels (on the boxes used here) are dark or bright ones."""
    if side == 'dark':
        img = mid_image(seed, lo=0.0, hi=0.7)  # the darkest pixels reach 0
    else:
        img = np.clip(mid_image(seed, lo=0.15, hi=1.1), 0.0, 1.0)  # the blob saturates
    return np.round(img * 255).astype(np.uint8)


def _rest(enc: ImageEncoding, box: PhotometricBox) -> torch.Tensor:
    free, rest = carve_free(threshold_row(box), enc.values, enc.value_weights)
    assert rest.shape[0] == 1
    return rest[0]


def _net_logits(det, enc: ImageEncoding, taus: torch.Tensor, kappas: torch.Tensor):
    """The network's float64 logits on the unshifted inputs clip(x, τ, κ), (n, K, P)."""
    with torch.no_grad():
        return det.net(enc.threshold_inputs(taus, kappas, shift=False)).flatten(2)


# --- nodes ----------------------------------------------------------------------------------

def test_axis_and_nodes_follow_the_present_values():
    values = torch.tensor([0.0, 0.01, 0.02, 0.5, 0.97, 0.99, 1.0], dtype=F64)
    weights = torch.tensor([0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0], dtype=F64)  # 0 and 1 absent
    bright = torch.tensor([-0.03, 0.005, 0.95, 1.05], dtype=F64)
    assert level_axis(bright, values, weights) == KAPPA
    assert level_nodes(bright, values, weights, KAPPA).tolist() == [0.95, 0.97, 0.99, 1.05]
    dark = torch.tensor([-0.01, 0.03, 1.0, 1.05], dtype=F64)
    assert level_axis(dark, values, weights) == TAU
    assert level_nodes(dark, values, weights, TAU).tolist() == [-0.01, 0.01, 0.02, 0.03]
    assert level_axis(torch.tensor([0.0, 0.03, 0.95, 1.05], dtype=F64), values, weights) is None
    assert level_axis(torch.tensor([0.0, 0.005, 0.995, 1.05], dtype=F64), values,
                      weights) is None  # nothing clips: a free box
    point = torch.tensor([0.0, 0.0, 0.98, 0.98], dtype=F64)
    assert level_nodes(point, values, weights, KAPPA).tolist() == [0.98, 0.98]
    # Subdivided: every segment cut into equal parts, the natural nodes kept.
    halves = level_nodes(dark, values, weights, TAU, subdivide=2)
    np.testing.assert_allclose(halves.numpy(), [-0.01, 0.0, 0.01, 0.015, 0.02, 0.025, 0.03],
                               rtol=0, atol=1e-15)
    thirds = level_nodes(bright, values, weights, KAPPA, subdivide=3)
    assert thirds.shape[0] == 3 * 3 + 1 and bool((thirds[1:] > thirds[:-1]).all())
    assert set(level_nodes(bright, values, weights, KAPPA).tolist()) <= set(thirds.tolist())
    assert level_nodes(point, values, weights, KAPPA, subdivide=3).tolist() == [0.98, 0.98]


def test_radius_groups_are_contiguous_and_cover_every_segment():
    for segments in (1, 2, 7, 20):
        for groups in (None, 1, 3, 50):
            g = radius_groups(segments, groups)
            assert g.shape == (segments,) and int(g[0]) == 0
            assert bool((g[1:] - g[:-1] >= 0).all()) and bool((g[1:] - g[:-1] <= 1).all())
            assert int(g[-1]) + 1 == (segments if groups is None else min(groups, segments))


def test_narrowest_merged_joins_the_shortest_adjacent_spans_first():
    nodes = torch.tensor([0.0, 0.3, 0.31, 0.5, 0.52, 0.53, 1.0], dtype=F64)
    assert narrowest_merged(nodes, 6).tolist() == [0, 1, 2, 3, 4, 5]
    assert narrowest_merged(nodes, 5).tolist() == [0, 1, 2, 3, 3, 4]  # 0.50-0.53 first
    assert narrowest_merged(nodes, 4).tolist() == [0, 1, 1, 2, 2, 3]  # then 0.3-0.5
    assert narrowest_merged(nodes, 1).tolist() == [0] * 6
    assert narrowest_merged(nodes, 0).tolist() == [0] * 6
    g = narrowest_merged(nodes, 3)
    assert radius_groups(6, g) is g  # a map passes through
    with pytest.raises(ValueError, match='one entry per segment'):
        radius_groups(5, g)


# --- the nodal bound ---------------------------------------------------------------------------

@pytest.mark.parametrize('subdivide', [1, 3])  # 3: every segment cut in three
@pytest.mark.parametrize('reuse', [False, True])
@pytest.mark.parametrize('precision', ['float32', 'float64'])
@pytest.mark.parametrize('groups', [None, 1, 2])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright'), (2, 'dark'), (3, 'bright')])
def test_logits_between_nodes_stay_within_the_radius(seed, side, groups, precision, reuse,
                                                     subdivide):
    _check_radius(homogeneous_shallow(seed), one_sided(seed, side), side, groups, precision,
                  reuse, subdivide)


@pytest.mark.parametrize('offset', [False, True])
@pytest.mark.parametrize('groups', [None, 1, 'merged'])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright'), (2, 'dark'), (3, 'bright')])
def test_backward_window_moments_hold_and_narrow_the_rows(seed, side, groups, offset):
    # The window's moments bounded backward (bounds.backward): they hold between the nodes
    # (checked in _check_radius against the network's own deviations), the cells bounded one
    # by one stay within the rows' band, and the moments are narrower than what the rows'
    # bands give the same sums.
    det, image = homogeneous_shallow(seed, 'local-centroid'), one_sided(seed, side)
    rows = _check_radius(det, image, side, groups, 'float32', False, 1, offset=offset,
                         band=True)
    moments, lo, hi = _check_radius(det, image, side, groups, 'float32', False, 1,
                                    offset=offset, window=LOCAL_RADIUS, band='moments')
    assert bool((hi - lo <= (rows[1] - rows[0]) * (1 + 1e-9) + 1e-12).all())
    stable, m_lo, m_hi = moments[2:5]
    assert bool(stable.any())
    width, height = det.config.heatmap_size
    # The rows' bound of each sum: Σ |w|·(hi − lo) wide.
    weights = _window_weights(moments, height, width, LOCAL_RADIUS).abs()
    reach = torch.einsum('skp,kfp->skf', rows[1] - rows[0], weights)
    assert bool((m_hi - m_lo <= reach * (1 + 1e-6) + 1e-12).all())
    assert float((m_hi - m_lo).sum()) < 0.9 * float(reach.sum()), (m_hi - m_lo, reach)


@pytest.mark.parametrize('precision', ['float32', 'float64'])
@pytest.mark.parametrize('groups', [None, 1, 2])
@pytest.mark.parametrize('arch', ['linear-first', 'linear'])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright')])
def test_parts_interpolated_through_the_linear_start_stay_within_the_radius(seed, side, arch,
                                                                            groups, precision):
    # Cut segments' points skip the layers before the first ReLU (interpolated there from
    # the natural ones); 'linear' has no ReLU at all, so they are interpolated at the end.
    det = linear_first_shallow(seed, 'centroid')
    if arch == 'linear':
        det = Detector(torch.nn.Sequential(
            *(m for m in det.net if not isinstance(m, torch.nn.ReLU))).eval(), det.config)
    # linear-first: scale, conv, conv before the ReLU, which the level pass runs fused
    fused = fused_prefix(compile_network(det.net, (1, 24, 32)))
    assert (fused is not None) == (arch == 'linear-first')
    _check_radius(det, one_sided(seed, side), side, groups, precision, False, 3)


@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright')])
def test_the_fused_prefix_changes_the_level_pass_by_rounding_only(seed, side, monkeypatch):
    import usn_perception.bounds.levels as levels_module

    det, image = linear_first_detector(seed, 'local-centroid'), one_sided(seed, side)
    enc = ImageEncoding(image, det.config.input_size)
    net = compile_network(det.net, enc.shape)
    assert fused_prefix(net) is not None
    box = _rest(enc, OFFLINE_BOX)
    axis = level_axis(box, enc.values, enc.value_weights)
    nodes = level_nodes(box, enc.values, enc.value_weights, axis)
    fused = level_logits(net, enc, nodes, axis)
    monkeypatch.setattr(levels_module, 'fused_prefix', lambda net: None)
    plain = level_logits(net, enc, nodes, axis)
    scale = float(plain[0].abs().max())
    torch.testing.assert_close(fused[0], plain[0], rtol=0, atol=1e-5 * scale)
    ratio = float(fused[1].mean() / plain[1].mean())
    assert 0.8 < ratio < 1.25, ratio  # the same error terms, rounding bounded per output


@pytest.mark.parametrize('groups', [None, 1, 2, 'merged'])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright'), (2, 'dark')])
def test_offset_rows_hold_and_narrow_shared_rows(seed, side, groups):
    """The band stays sound without offset rows too, and the offset rows never widen it."""
    det, image = homogeneous_shallow(seed), one_sided(seed, side)
    plain = _check_radius(det, image, side, groups, 'float32', False, 1, offset=False)
    offset = _check_radius(det, image, side, groups, 'float32', False, 1, offset=True)
    # Rounding terms aside, a band centred on its offset is never wider than ± the wider side.
    assert bool((offset <= plain * (1 + 1e-4) + 1e-12).all())
    if groups == 1:  # one row over several segments: the gaps' one-sidedness pays
        assert float(offset.mean()) < 0.95 * float(plain.mean())


@pytest.mark.parametrize('offset', [False, True])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright')])
def test_offset_rows_through_a_scale_after_a_relu(seed, side, offset):
    # A shift-free BatchNorm after the first ReLU (an AffineOp, some scales negative): the
    # offset rows move through it with their signs.
    det = homogeneous_shallow(seed)
    bn = torch.nn.BatchNorm2d(6).double().eval()
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.5, -0.7, 0.3, -2.0, 1.0, 0.5], dtype=F64))
        bn.running_var.copy_(torch.linspace(0.5, 2.0, 6, dtype=F64))
    layers = list(det.net)
    net = torch.nn.Sequential(*layers[:3], bn, *layers[3:]).eval()
    det = Detector(net, det.config)
    enc = ImageEncoding(one_sided(seed, side), det.config.input_size)
    assert any(isinstance(op, AffineOp) for op in compile_network(det.net, enc.shape).ops[1:])
    for groups in (None, 1):
        _check_radius(det, one_sided(seed, side), side, groups, 'float32', False, 1,
                      offset=offset)


def _check_radius(det, image, side, groups, precision, reuse, subdivide, *, offset=True,
                  window=None, band=False):
    """The network's logits between the nodes lie within the interpolant + offset ± radius.

    Returns the radius (G − 1, K, P), or with ``band`` the band (lo, hi) around the
    interpolant.
    """
    enc = ImageEncoding(image, det.config.input_size)
    net = compile_network(det.net, enc.shape)
    box = _rest(enc, OFFLINE_BOX)
    axis = level_axis(box, enc.values, enc.value_weights)
    assert axis == (TAU if side == 'dark' else KAPPA)
    nodes = level_nodes(box, enc.values, enc.value_weights, axis, subdivide=subdivide)
    assert nodes.shape[0] >= 3 * subdivide + 1
    # The carved box starts where the free part ends: its reference node clips nothing.
    assert reference_unclipped(nodes, enc.values, enc.value_weights, axis)
    trace = det.run(image, trace=True).trace if reuse else None
    group = None if groups is None else radius_groups(
        nodes.shape[0] - 1,
        narrowest_merged(nodes, nodes.shape[0] - 2) if groups == 'merged' else groups)
    logits, radius, centre, _, moments = level_logits(net, enc, nodes, axis, group=group,
                                                      precision=precision, nominal=trace,
                                                      offset=offset, window=window)
    assert (moments is not None) == (window is not None and precision == 'float32')
    lo_v, hi_v = float(enc.values.min()), float(enc.values.max())
    scale = float(logits.abs().max())
    for s in range(nodes.shape[0] - 1):
        t = torch.linspace(float(nodes[s]), float(nodes[s + 1]), 9, dtype=F64)
        taus, kappas = (t, torch.full_like(t, hi_v)) if axis == TAU else (
            torch.full_like(t, lo_v), t)
        true = _net_logits(det, enc, taus, kappas)
        frac = ((t - nodes[s]) / (nodes[s + 1] - nodes[s])).view(-1, 1, 1)
        interp = logits[s] + frac * (logits[s + 1] - logits[s])
        gap = (true - interp - centre[s]).abs()
        assert bool((gap <= radius[s] + 1e-12 * scale).all()), float((gap - radius[s]).max())
        if moments is not None:
            sums = _window_sums(moments, true - interp, det.config.heatmap_size[0], window)
            slack = 1e-12 * scale
            assert bool((sums >= moments[3][s] - slack).all()), (sums, moments[3][s])
            assert bool((sums <= moments[4][s] + slack).all()), (sums, moments[4][s])
    if groups is None:  # per-segment radii: tight where the network is nearly linear
        assert float((radius + centre.abs()).max()) < 0.05 * scale
    if band == 'moments':
        return moments, centre - radius, centre + radius
    return (centre - radius, centre + radius) if band else radius


def _window_weights(moments, height, width, window):
    """(K, 3, H·W) the moments' weights: 1, Δu − a_u, Δv − a_v on each stable cell."""
    peak, anchor, stable = moments[:3]
    side = 2 * window + 1
    out = torch.zeros(peak.shape[0], 3, height * width, dtype=F64)
    for k in range(peak.shape[0]):
        pv, pu = divmod(int(peak[k]), width)
        for j in torch.nonzero(stable[k])[:, 0].tolist():
            dv, du = j // side - window, j % side - window
            at = (pv + dv) * width + pu + du
            out[k, :, at] = torch.tensor([1.0, du - float(anchor[k, 0]),
                                          dv - float(anchor[k, 1])], dtype=F64)
    return out


def _window_sums(moments, deviation, width, window):
    """(T, K, 3) Σ δ, Σ (Δu − a_u)·δ, Σ (Δv − a_v)·δ over each keypoint's stable cells."""
    weights = _window_weights(moments, deviation.shape[-1] // width, width, window)
    return torch.einsum('tkp,kfp->tkf', deviation, weights)


@pytest.mark.skipif(not DEFAULT.exists(), reason='shipped model not present')
def test_shipped_model_logits_stay_within_the_radius():
    from usn_perception.data.synthetic import SPLIT_BACKGROUNDS, render_sample

    det = load_detector(DEFAULT)
    image = render_sample(np.random.default_rng(2024), SPLIT_BACKGROUNDS['test'][1],
                          (192, 144)).image  # saturated sky: ~20 bright levels in NODE_BOX
    enc = ImageEncoding(image, det.config.input_size)
    net = compile_network(det.net, enc.shape)
    box = _rest(enc, NODE_BOX)
    axis = level_axis(box, enc.values, enc.value_weights)
    nodes = level_nodes(box, enc.values, enc.value_weights, axis)
    logits, radius, centre, _, moments = level_logits(
        net, enc, nodes, axis, group=radius_groups(nodes.shape[0] - 1, 3), window=LOCAL_RADIUS)
    assert moments is not None
    other = float(enc.values.min() if axis == KAPPA else enc.values.max())
    for s in range(0, nodes.shape[0] - 1, 3):
        t = torch.linspace(float(nodes[s]), float(nodes[s + 1]), 5, dtype=F64)
        fixed = torch.full_like(t, other)
        true = _net_logits(det, enc, *((fixed, t) if axis == KAPPA else (t, fixed)))
        frac = ((t - nodes[s]) / (nodes[s + 1] - nodes[s])).view(-1, 1, 1)
        interp = logits[s] + frac * (logits[s + 1] - logits[s])
        assert bool(((true - interp - centre[s]).abs() <= radius[s] + 1e-12).all())
        sums = _window_sums(moments, true - interp, det.config.heatmap_size[0], LOCAL_RADIUS)
        assert bool(((sums >= moments[3][s] - 1e-12) & (sums <= moments[4][s] + 1e-12)).all())


def test_segment_leaves_take_the_same_arithmetic_as_merged_ones():
    # One leaf per segment is computed for all segments at once (levels._segment_forms); a
    # group map that joins none of them goes through the same steps one leaf at a time.
    gen = torch.Generator().manual_seed(0)
    nodes = torch.tensor([0.0, 0.01, 0.013, 0.05, 0.05, 0.2], dtype=F64)  # one empty segment
    logits = torch.randn(6, 2, 7, generator=gen, dtype=F64)
    radius = torch.rand(5, 2, 7, generator=gen, dtype=F64) * 1e-3
    offset = torch.randn(5, 2, 7, generator=gen, dtype=F64) * 1e-3
    box = torch.tensor([0.0, 0.2, 0.9, 1.0], dtype=F64)
    import usn_perception.bounds.levels as levels_module

    for off in (None, offset):
        fast = leaf_forms(box, nodes, TAU, logits, radius, None, off)
        loop = levels_module._merged_forms(box, nodes, TAU, logits, radius, torch.arange(5),
                                           off)
        for a, b in zip(fast, loop, strict=True):
            assert torch.equal(a, b)
    # SegmentForms (a window's readout): the same forms on the cells asked for, and one
    # leaf over the whole box as a group map of one leaf gives it.
    forms = levels_module.SegmentForms(box, nodes, TAU, logits, radius, offset)
    part, centre, rad = leaf_forms(box, nodes, TAU, logits, radius, None, offset)
    assert torch.equal(forms.leaves(), part)
    cells = torch.tensor([[6, 0, 3], [2, 2, 5]])
    at = forms.at(cells)
    index = cells[None, None].expand(5, -1, -1, -1)
    assert torch.equal(at[0], centre.gather(3, index.expand(-1, 3, -1, -1)))
    assert torch.equal(at[1], rad.gather(3, index))
    # The hull holds every segment's range (its readout's candidates are the segments').
    hull_box, hull_c, hull_r = forms.hull()
    assert torch.equal(hull_box, box[None])
    hull = logit_ranges(hull_c, hull_r, hull_box)
    each = logit_ranges(centre, rad, part)
    slop = 1e-12  # (each side rounds outward by its own few ulps)
    assert bool((hull.lo[0] <= each.lo + slop).all() and (hull.hi[0] >= each.hi - slop).all())
    # ... and not much more: the widest segment's band is the hull's least width.
    assert bool((hull.hi - hull.lo <= (each.hi.amax(0) - each.lo.amin(0)) * 1.5 + 1e-12).all())


@pytest.mark.parametrize('leaves', [None, 1, 3])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright')])
def test_level_bounds_cover_the_whole_box_free_part_included(seed, side, leaves):
    """Nodes beyond the present values share their point's run; every leaf still holds."""
    det = homogeneous_shallow(seed)
    image = one_sided(seed, side)
    enc = ImageEncoding(image, det.config.input_size)
    net = compile_network(det.net, enc.shape)
    box = threshold_row(NODE_BOX)[0]  # not carved: its free part is part of the leaves
    axis = level_axis(box, enc.values, enc.value_weights)
    nodes = level_nodes(box, enc.values, enc.value_weights, axis)
    points, index = evaluation_points(nodes, enc.values, enc.value_weights, axis)
    assert points.shape[0] == nodes.shape[0] - 1  # one node lies in the free part
    assert int(index[0 if axis == TAU else -1]) == (0 if axis == TAU else points.shape[0] - 1)
    boxes, centre, radius, _, _ = level_bounds(net, enc, box, axis, leaves)
    lo_v, hi_v = float(enc.values.min()), float(enc.values.max())
    for i in range(boxes.shape[0]):
        t = torch.linspace(float(boxes[i, 2 * axis]), float(boxes[i, 2 * axis + 1]), 23,
                           dtype=F64)
        taus, kappas = (t, torch.full_like(t, hi_v)) if axis == TAU else (
            torch.full_like(t, lo_v), t)
        true = _net_logits(det, enc, taus, kappas)
        form = centre[i, 0] + centre[i, 1 + axis] * t.view(-1, 1, 1)
        assert bool(((true - form).abs() <= radius[i, 0] + 1e-12).all())


@pytest.mark.parametrize('leaves', [None, 1, 2, 5, 'merged'])
def test_leaf_forms_tile_the_box_and_contain_the_interpolant(leaves):
    rng = np.random.default_rng(0)
    nodes = torch.tensor([0.9, 0.92, 0.93, 0.97, 0.98, 1.0, 1.05], dtype=F64)
    if leaves == 'merged':  # 0.9-0.93 and 0.97-1.0: two leaves with an inner node
        leaves = narrowest_merged(nodes, 4)
        assert leaves.tolist() == [0, 0, 1, 2, 2, 3]
    logits = torch.as_tensor(rng.normal(size=(7, 2, 6)))
    radius = torch.as_tensor(rng.uniform(0.0, 0.01, size=(6, 2, 6)))
    box = torch.tensor([-0.03, 0.02, 0.9, 1.05], dtype=F64)
    boxes, centre, rad = leaf_forms(box, nodes, KAPPA, logits, radius, leaves)
    n = 6 if leaves is None else int(radius_groups(6, leaves)[-1]) + 1
    assert boxes.shape == (n, 4) and centre.shape == (n, 3, 2, 6) and rad.shape == (n, 1, 2, 6)
    assert float(boxes[0, 2]) == 0.9 and float(boxes[-1, 3]) == 1.05
    assert bool((boxes[1:, 2] == boxes[:-1, 3]).all())  # shared cuts: an exact tiling
    assert bool((boxes[:, :2] == box[:2]).all())
    assert bool((centre[:, 1] == 0).all())  # nothing in τ on a κ-axis box
    group = radius_groups(6, leaves)
    for s in range(6):
        leaf = int(group[s])
        for f in np.linspace(0.0, 1.0, 7):
            k = float(nodes[s] + f * (nodes[s + 1] - nodes[s]))
            value = centre[leaf, 0] + centre[leaf, 2] * k
            truth = logits[s] + f * (logits[s + 1] - logits[s])
            assert bool(((truth - value).abs() <= rad[leaf, 0] - radius[s] + 1e-12).all())


# --- certificates --------------------------------------------------------------------------

@pytest.mark.parametrize('readout', ['centroid', 'local-centroid', 'argmax'])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright'), (2, 'bright'), (3, 'dark')])
def test_level_certificates_have_no_escapes(seed, side, readout):
    det = homogeneous_shallow(seed, readout)
    image = one_sided(seed, side)
    for box in (NODE_BOX, OFFLINE_BOX):
        natural = 0
        for n in (1, 3, 8, 16):  # 16: spare leaves subdivide the segments
            cert = certify_keypoints(det, image, box, budget=Budget(n))
            if n == 8 or (n == 3 and box is NODE_BOX):  # (1 sub-box affords 16 nodes)
                assert cert.stats['level_nodes'] > 0, cert.stats
            if n == 3 and box is NODE_BOX:  # no leaf to spare: the natural nodes
                natural = cert.stats['level_nodes']
            if n == 16 and box is NODE_BOX:
                assert cert.stats['level_nodes'] > natural, cert.stats
                timed = certify_keypoints(det, image, box, budget=Budget(n, max_ms=1e6))
                assert timed.stats['level_nodes'] == natural  # time-limited: not subdivided
            if cert.stats['level_nodes']:
                assert cert.stats['subboxes'] <= n
            # No time limit: the local-centroid window is bounded backward (bounds.backward).
            assert cert.stats['backward'] == (readout == 'local-centroid'
                                              and cert.stats['level_nodes'] > 0)
            assert_sound(det, image, box, cert, readout, grid=7)


@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright')])
def test_window_readout_takes_each_segments_candidates_where_the_hulls_do_not_serve(
        seed, side, monkeypatch):
    # With the window's moments the segments' argmax candidates come from one leaf over the
    # whole box, and their forms are computed on those windows only; where that leaf has
    # more than one candidate every segment finds its own on the whole heatmap. Both sound,
    # and the same boxes up to the slack's scale (the hull's bounds the segments' from above).
    import usn_perception.certify as certify_module

    det = homogeneous_shallow(seed, 'local-centroid')
    image = one_sided(seed, side)
    budget = Budget(1, max_ms=1e6, level_work=10_000)
    real, served = certify_module.local_windows, []

    def seen(*args, **kwargs):
        windows = real(*args, **kwargs)
        served.append(bool((windows.count == 1).all()))
        return windows

    monkeypatch.setattr(certify_module, 'local_windows', seen)
    fast = certify_keypoints(det, image, NODE_BOX, backward=True, budget=budget)
    assert served == [True]  # the hull's windows served every segment

    def crowded(*args, **kwargs):
        windows = real(*args, **kwargs)
        return windows._replace(count=windows.count + 1)

    monkeypatch.setattr(certify_module, 'local_windows', crowded)
    slow = certify_keypoints(det, image, NODE_BOX, backward=True, budget=budget)
    assert fast.stats['backward'] and slow.stats['backward']
    assert fast.stats['leaves'] == slow.stats['leaves'] > 1
    assert_sound(det, image, NODE_BOX, fast, 'local-centroid', grid=7)
    assert_sound(det, image, NODE_BOX, slow, 'local-centroid', grid=7)
    np.testing.assert_allclose(fast.boxes, slow.boxes, rtol=0, atol=1e-5)


def test_window_readout_on_the_hulls_windows_gives_the_segments_own_boxes(monkeypatch):
    # The shipped model on the certify bench's renders at the node box: the hull's windows
    # (render 1: one candidate per keypoint) or the segments' own candidates (render 3: the
    # hull has two for some keypoints; its windows would give every segment the extra
    # candidate's window, ~20x wider) give the boxes the segments' own candidates give.
    import usn_perception.certify as certify_module
    from usn_perception.data.synthetic import SPLIT_BACKGROUNDS, render_sample

    det = load_detector(DEFAULT)
    rng = np.random.default_rng(2024)  # bench_certify.test_images
    names = SPLIT_BACKGROUNDS['test']
    renders = [render_sample(rng, names[i % len(names)], (384, 288)).image for i in range(4)]
    real, counts = certify_module.local_windows, []

    def seen(*args, **kwargs):
        windows = real(*args, **kwargs)
        counts.append(int(windows.count.max()))
        return windows

    def own(*args, **kwargs):  # every segment finds its own candidates
        windows = real(*args, **kwargs)
        return windows._replace(count=windows.count + 1)

    for index, hull_candidates in ((1, 1), (3, 2)):
        monkeypatch.setattr(certify_module, 'local_windows', seen)
        cert = certify_keypoints(det, renders[index], NODE_BOX, budget=NODE_BUDGET)
        assert cert.stats['backward'] and counts[-1] == hull_candidates
        monkeypatch.setattr(certify_module, 'local_windows', own)
        want = certify_keypoints(det, renders[index], NODE_BOX, budget=NODE_BUDGET)
        np.testing.assert_allclose(cert.boxes, want.boxes, rtol=0, atol=1e-5)


def test_window_moments_start_only_where_the_deadline_leaves_time_for_them(monkeypatch):
    # Under a deadline the moments start only where WINDOW_SHARE of the level pass's own
    # time is left; otherwise the plan ends with its rows' leaves (sound, a certificate).
    import usn_perception.bounds.levels as levels_module

    det = homogeneous_shallow(0, 'local-centroid')
    image = one_sided(0, 'dark')
    timed = Budget(1, max_ms=1e6, level_work=10_000)  # a deadline far away
    with_window = certify_keypoints(det, image, NODE_BOX, backward=True, budget=timed)
    assert with_window.stats['backward'] and with_window.stats['leaves'] > 1
    monkeypatch.setattr(levels_module, 'WINDOW_SHARE', 1e12)  # never enough time left
    skipped = certify_keypoints(det, image, NODE_BOX, backward=True, budget=timed)
    assert not skipped.stats['backward']
    assert skipped.stats['leaves'] == skipped.stats['rows'] == with_window.stats['rows']
    assert skipped.certified.all()
    assert_sound(det, image, NODE_BOX, skipped, 'local-centroid', grid=7)
    untimed = certify_keypoints(det, image, NODE_BOX, backward=True,
                                budget=Budget(1, level_work=10_000))  # no deadline: always
    assert untimed.stats['backward']


@pytest.mark.parametrize('readout', ['local-centroid', 'argmax'])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright'), (3, 'dark')])
def test_plans_sized_by_work_take_rows_then_offset_rows_then_parts_soundly(seed, side, readout):
    det = homogeneous_shallow(seed, readout)
    image = one_sided(seed, side)
    natural = certify_keypoints(det, image, NODE_BOX, budget=Budget(1, max_ms=1e6))
    g, segments = natural.stats['level_nodes'], natural.stats['rows']
    assert g > 0 and segments == 1  # one sub-box: one row over the natural nodes
    last, plans = None, []
    # (the natural segments here are as many as the nodes: g)
    assert g > OFFSET_MIN_LEAVES + 1
    few = g + OFFSET_LEAF_WORK * OFFSET_MIN_LEAVES  # the fewest leaves with offset rows
    for work in (1, g + LEAF_WORK, g + 2 * LEAF_WORK, few - 1, few,
                 g + OFFSET_LEAF_WORK * (g - 1), g + OFFSET_LEAF_WORK * g,
                 6 * g + OFFSET_LEAF_WORK * g, 10_000):
        cert = certify_keypoints(det, image, NODE_BOX, backward=False,
                                 budget=Budget(1, max_ms=1e6, level_work=work))
        st = cert.stats
        assert st['level_nodes'] >= g and st['budget']['level_work'] == work
        per_leaf = OFFSET_LEAF_WORK if st['offset_rows'] else LEAF_WORK
        assert st['level_work'] == st['level_nodes'] + per_leaf * st['rows']
        # at least one leaf, else within the work
        assert st['level_work'] <= max(work, g + LEAF_WORK)
        assert st['offset_rows'] or not st['merged_leaves']
        plan = (st['offset_rows'], st['rows'], st['level_nodes'], st['merged_leaves'])
        if work < few:  # radius rows only below OFFSET_MIN_LEAVES leaves with offset rows
            assert not plan[0]
        elif work == few:
            assert plan[:2] == (True, OFFSET_MIN_LEAVES) and plan[3]
        if last is not None:  # more work never plans less
            assert plan[:3] >= last[:3]
        last = plan
        plans.append(plan)
        assert_sound(det, image, NODE_BOX, cert, readout, grid=7)
        assert not st['backward'] and st['leaves'] == st['rows']
        # By default the local-centroid window's moments are bounded backward where the
        # work affords them on top of the smallest plan (and they come out of the plan's
        # work), with a readout leaf per segment; the rows stay the plan's.
        auto = certify_keypoints(det, image, NODE_BOX,
                                 budget=Budget(1, max_ms=1e6, level_work=work))
        windowed = readout == 'local-centroid' and work >= g + LEAF_WORK + WINDOW_WORK
        assert auto.stats['backward'] == windowed
        if windowed:
            assert auto.stats['leaves'] >= g - 1
            smaller = certify_keypoints(det, image, NODE_BOX, backward=False,
                                        budget=Budget(1, max_ms=1e6,
                                                      level_work=work - WINDOW_WORK))
            assert auto.stats['level_work'] == smaller.stats['level_work'] + WINDOW_WORK
            assert auto.stats['rows'] == smaller.stats['rows']
            assert_sound(det, image, NODE_BOX, auto, readout, grid=7)
        else:
            assert auto.stats['level_work'] == st['level_work']
        if readout == 'local-centroid' and work in (1, few, 10_000):  # asked for: sound
            back = certify_keypoints(det, image, NODE_BOX, backward=True,
                                     budget=Budget(1, max_ms=1e6, level_work=work))
            assert back.stats['backward'] and back.stats['rows'] == st['rows']
            assert_sound(det, image, NODE_BOX, back, readout, grid=7)
    assert last[2] > g and last[0]  # the most work cuts the segments into parts ...
    assert last[1] >= 2 and not last[3]  # ... each natural segment keeping a leaf of its own
    for offset, leaves, nodes, merged in plans:  # offset rows on merged leaves (the
        # narrowest segments joined), then one each; parts only with every leaf
        assert not offset or (leaves < last[1] if merged else leaves == last[1])
        assert offset and not merged or nodes == g
    assert any(merged for *_, merged in plans)  # offset rows on a merged leaf,
    assert any(offset and not merged and nodes == g for offset, _, nodes, merged in plans)


def test_level_work_must_be_a_positive_integer():
    for bad in (0, -3, 1.5):
        with pytest.raises(ValueError, match='level_work'):
            Budget(1, level_work=bad)
    assert Budget(2, level_work=7.0).level_work == 7


def linear_first_detector(seed: int, readout: str) -> Detector:
    """The homogeneous architecture without the first ReLU (``first_relu=False``)."""
    torch.manual_seed(seed)
    config = DetectorConfig(input_size=(32, 24), widths=(6, 8, 8, 8, 8, 8, 8, 6, 6),
                            keypoint_names=('a', 'b', 'c'), readout=readout, first_relu=False)
    net = build_network(config).double().eval()
    with torch.no_grad():
        x = torch.rand(1, 1, 24, 32, dtype=torch.float64) * 0.3 + 0.3
        net[-1].weight.mul_(1.0 / float(net(x).abs().max()))
    return Detector(net, config)


def linear_first_shallow(seed: int, readout: str) -> Detector:
    """:func:`homogeneous_shallow` without its first ReLU: the level nodes apply to it."""
    det = homogeneous_shallow(seed, readout)
    net = torch.nn.Sequential(*(m for i, m in enumerate(det.net) if i != 2))
    assert sum(isinstance(m, torch.nn.ReLU) for m in net) == 1
    return Detector(net.eval(), det.config)


@pytest.mark.parametrize('readout', ['local-centroid', 'argmax'])
@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright')])
def test_a_linear_first_stage_is_certified_soundly(seed, side, readout):
    image = one_sided(seed, side)
    levels_used = 0
    for det in (linear_first_detector(seed, readout), linear_first_shallow(seed, readout)):
        for box in (NODE_BOX, OFFLINE_BOX):
            for n in (1, 3, 16):
                cert = certify_keypoints(det, image, box, budget=Budget(n))
                levels_used += cert.stats['level_nodes'] > 0
                assert_sound(det, image, box, cert, readout, grid=7)
    assert levels_used  # the shallow one is bounded at its clip levels


def test_no_readout_bound_starts_after_a_late_level_pass(monkeypatch):
    # The level pass checks the deadline before each layer, so its last layer can end past
    # it; the readout bound must then not start (the frame is OUT_OF_BUDGET, not late).
    import usn_perception.certify as certify_module

    det = homogeneous_shallow(0, 'local-centroid')
    image = one_sided(0, 'dark')
    real, readouts = certify_module.level_bounds, []

    def late(*args, **kwargs):
        out = real(*args, **kwargs)
        deadline = kwargs['deadline']
        while time.perf_counter() <= deadline:
            time.sleep(0.001)
        return out

    monkeypatch.setattr(certify_module, 'level_bounds', late)
    monkeypatch.setitem(certify_module.READOUT_BOUNDS, 'local-centroid',
                        lambda *a, **k: readouts.append(1))
    cert = certify_keypoints(det, image, NODE_BOX, budget=Budget(3, max_ms=50.0))
    assert (cert.status == 2).all() and cert.stats['stopped'] == 'time'  # OUT_OF_BUDGET
    assert not readouts


def test_a_point_box_on_a_clip_level_is_exact():
    det = homogeneous_shallow(1, 'local-centroid')
    image = one_sided(1, 'bright')
    box = PhotometricBox((1.02, 1.02), (0.0, 0.0))  # κ = 1/1.02: the brightest pixels clip
    cert = certify_keypoints(det, image, box, budget=Budget(1))
    assert cert.stats['level_nodes'] == 1  # one distinct input: the network runs once
    assert_sound(det, image, box, cert, 'local-centroid', grid=1, attack=False)
    assert float(cert.widths.max()) < 1e-4  # the readout slack alone


@pytest.mark.parametrize('kind', ['rgb8', 'mono16'])
def test_level_certificates_on_rgb_and_16_bit_frames(kind):
    det = homogeneous_shallow(2, 'local-centroid')
    base = mid_image(5, lo=0.0, hi=0.8)
    if kind == 'rgb8':
        rgb = np.stack([base, 0.8 * base + 0.1, 0.9 * base], -1)
        image = np.round(rgb * 255).astype(np.uint8)
    else:  # few distinct values, so the nodes fit the budget
        image = (np.round(base * 40) * (65535 // 40)).astype(np.uint16)
    cert = certify_keypoints(det, image, NODE_BOX, budget=Budget(2))
    assert cert.stats['level_nodes'] > 0
    assert_sound(det, image, NODE_BOX, cert, 'local-centroid', grid=7)


@pytest.mark.skipif(not DEFAULT.exists(), reason='shipped model not present')
def test_shipped_model_level_certificates_are_sound_and_tighter():
    from usn_perception.data.synthetic import SPLIT_BACKGROUNDS, render_sample

    det = load_detector(DEFAULT)
    rng = np.random.default_rng(2024)
    names = SPLIT_BACKGROUNDS['test']
    for name in names[:2]:  # bright clips on the first render, dark on the second
        image = render_sample(rng, name, (192, 144)).image
        levels = certify_keypoints(det, image, NODE_BOX, budget=Budget(3))
        assert levels.stats['level_nodes'] > 0
        partition = certify_keypoints(det, image, NODE_BOX, budget=Budget(3), level_nodes=0)
        assert partition.stats['level_nodes'] == 0
        assert levels.widths.mean() <= partition.widths.mean()
        assert_sound(det, image, NODE_BOX, levels, det.readout, grid=5)


# --- when not to use them ----------------------------------------------------------------------

@pytest.mark.parametrize('seed, side', [(0, 'dark'), (1, 'bright')])
def test_reusing_the_prediction_trace_changes_no_certificate(seed, side):
    """The pipeline hands predict's module outputs on; the boxes are the ones without."""
    det = homogeneous_shallow(seed, 'local-centroid')
    image = one_sided(seed, side)
    pred = det.run(image, trace=True)
    for box, budget in ((NODE_BOX, Budget(3)), (OFFLINE_BOX, Budget(8))):
        alone = certify_keypoints(det, image, box, budget=budget)
        assert alone.stats['level_nodes'] > 0
        given = certify_keypoints(det, image, box, budget=budget, nominal=pred.keypoints,
                                  nominal_heatmaps=pred.heatmaps, nominal_trace=pred.trace)
        lazy = certify_keypoints(det, image, box, budget=budget, nominal=pred.keypoints)
        np.testing.assert_array_equal(given.boxes, alone.boxes)
        np.testing.assert_array_equal(lazy.boxes, alone.boxes)
    # A box whose reference node clips (it holds no unclipped point) runs its own reference.
    shifted = PhotometricBox((1.0, 1.02), (-0.06, -0.03) if side == 'dark' else (0.03, 0.06))
    cert = certify_keypoints(det, image, shifted, budget=Budget(3), nominal=pred.keypoints,
                             nominal_heatmaps=pred.heatmaps, nominal_trace=pred.trace)
    assert cert.stats['level_nodes'] > 0
    assert_sound(det, image, shifted, cert, 'local-centroid', grid=7)


def test_a_wrong_trace_is_refused():
    det = homogeneous_shallow(0, 'local-centroid')
    image = one_sided(0, 'dark')
    pred, other = det.run(image, trace=True), det.run(one_sided(1, 'dark'), trace=True)
    for bad in (other.trace, (), [pred.heatmaps]):
        with pytest.raises(ValueError, match='nominal_trace'):
            certify_keypoints(det, image, NODE_BOX, nominal=pred.keypoints,
                              nominal_heatmaps=pred.heatmaps, nominal_trace=bad)
    with pytest.raises(ValueError, match='nominal_trace'):  # without the heatmaps it reads
        certify_keypoints(det, image, NODE_BOX, nominal=pred.keypoints, nominal_trace=pred.trace)


@pytest.mark.parametrize('bad', [-1, 2.5, None])
def test_level_nodes_must_be_a_non_negative_integer(bad):
    det = homogeneous_shallow(0, 'local-centroid')
    with pytest.raises(ValueError, match='level_nodes'):
        certify_keypoints(det, one_sided(0, 'dark'), NODE_BOX, budget=Budget(3), level_nodes=bad)


def test_the_plan_is_not_used_where_it_does_not_apply():
    det = homogeneous_shallow(0, 'local-centroid')
    both = np.round(mid_image(0, lo=0.0, hi=1.0) * 255).astype(np.uint8)  # dark and bright
    assert certify_keypoints(det, both, NODE_BOX, budget=Budget(3)).stats['level_nodes'] == 0
    dark = one_sided(0, 'dark')
    assert certify_keypoints(det, dark, OFFLINE_BOX, budget=Budget(3),
                             level_nodes=0).stats['level_nodes'] == 0
    # More nodes than the budget affords (NODES_PER_SUBBOX per sub-box) or than allowed, or
    # a budget above LEVEL_MAX_SUBBOXES (offline budgets keep the partition).
    natural = certify_keypoints(det, dark, OFFLINE_BOX, budget=Budget(8, max_ms=1e6)).stats[
        'level_nodes']
    assert natural > 2 * NODES_PER_SUBBOX
    for n in (1, 2):
        assert certify_keypoints(det, dark, OFFLINE_BOX, budget=Budget(n)).stats[
            'level_nodes'] == 0
    assert certify_keypoints(det, dark, OFFLINE_BOX, budget=Budget(8),
                             level_nodes=5).stats['level_nodes'] == 0
    assert certify_keypoints(det, dark, OFFLINE_BOX, budget=Budget(64)).stats[
        'level_nodes'] == 0
    # A network whose |W| chain makes |τ|·R non-negligible (random, untrained): no free
    # sub-boxes, and no level nodes either (they leave the input's − τ to that bound).
    rough = homogeneous_detector(0)
    image = 0.3 + 0.3 * np.random.default_rng(0).random((30, 40))
    image[:, :8] = 0.0
    cert = certify_keypoints(rough, image, PhotometricBox((0.9, 1.1), (0.0, 0.05)),
                             readout='centroid', budget=Budget(1))
    assert cert.stats['level_nodes'] == 0 and float(cert.widths.max()) < 1e-4

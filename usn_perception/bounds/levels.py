"""Level nodes: the network evaluated exactly at the pixel values a sub-box clips.

On a (τ, κ) sub-box where only one threshold reaches present pixel values (bright pixels
clip at κ and no dark one at τ, or the reverse), the network input is a piecewise-linear
function of that threshold alone, with its breakpoints at the present pixel values
(:mod:`usn_perception.bounds.thresholds`). Between two adjacent *nodes* (the sub-box's ends and
every present value strictly inside) the input is exactly the linear interpolation of its
values at the nodes. So instead of relaxing the clip, this module runs the network at the
G nodes (one batched pass) and bounds only what interpolation misses inside the network:

    z(t) ∈ I(c)(t) ± r     for every t of the sub-box, at every neuron,

with c_j the neuron's value at node j, I(c) their piecewise-linear interpolant and r a
radius per neuron and *row* (a row serves a contiguous group of segments; every row costs one
image per layer). Linear maps keep interpolants exact (r moves through |W|). A ReLU maps the
nodal values to ReLU(c_j); it adds to r only where a neuron changes sign between two adjacent
nodes, by at most |a|·b / (|a| + b) for node values a < 0 < b (the gap between the chord of
ReLU over that segment and ReLU itself), and a segment keeps its r unless the neuron is off
at both its nodes, radius included. That gap is one-sided (ReLU lies below its chord), so each
row also carries an *offset row* o: the error is in the band o ± r, the offset moves through
W with its signs (where one-sided gaps of neighbouring neurons partly cancel) and the radius
through |W|, at one more image per row after the first ReLU.

Contiguous segments are then grouped into leaves, each an ordinary affine form in the active
threshold (the chord of its end nodes' logits, widened by its inner nodes' deviations from
that chord) with its rows' radius, which the readout bounds of
:mod:`usn_perception.bounds.spec` take like any other sub-box. No ReLU is relaxed as a
function of θ: with one node per clip level the input stage is exact and the only error left
is r.

Floating point: the reference node (the one that clips least: the lowest τ, the highest κ)
runs in float64 (its values are as large as the activations); where it clips nothing it *is*
the image's own prediction, whose module outputs the caller can hand on
(``Detector.run(..., trace=True)``), so the network is not run for it again. The others are
carried as float32 *deviations* D_j = c_j − c_0, so their rounding scales with how
much the clip moves the activations, not with the activations (a float32 reference was
measured: its own rounding, pushed through |W|, made node-sized boxes up to 40x wider). Every
float32 step bounds its own error and adds it to r, as :mod:`usn_perception.bounds.rounding`
does, whose checks of the float32 backend apply here too: a dot product of n terms is within
γ_n·|W|·max_j|D_j| of exact, the nodal ReLU within 4u·max_j|D_j| (a deviation can only flip
a neuron whose reference is smaller than it).

Points that cut a segment into parts (``level_nodes(subdivide=k)``) lie where the input is
linear between two natural nodes (the ends and the present values), and so is every layer
up to the first ReLU: they are interpolated there from the natural nodes' values instead of
being run through those layers (about a third of a node frame's level pass at k = 3).

The nodes are evaluated on ``clip(x, τ, κ)`` without the engine's − τ: that constant image
would make every deviation as large as the threshold's range on every pixel, and a
zero-sum first filter cancels it up to rounding anyway. The |τ|·R bound of
:mod:`usn_perception.bounds.free` (R = |N|(|P(S)|), computed once per network and frame
shape) covers leaving it out, so level nodes are used only where that bound is negligible,
as free sub-boxes are. The idle threshold is exactly idle: κ where nothing bright clips only
scales the input (the readout ignores scale), τ where nothing dark clips only shifts it.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import torch

from usn_perception.bounds.backward import BackwardTape, start_index, window_functionals
from usn_perception.bounds.fused import FusedPrefix, fused_prefix
from usn_perception.bounds.layers import AffineOp, CompiledNetwork, LinearOp
from usn_perception.bounds.propagate import BudgetExceeded
from usn_perception.bounds.rounding import TINY, U32, U64, all_finite, gamma
from usn_perception.bounds.spec import WindowMoments
from usn_perception.bounds.thresholds import present_range
from usn_perception.readout import window_offsets

#: Axis indices of a (τ, κ) sub-box row [τ_lo, τ_hi, κ_lo, κ_hi].
TAU, KAPPA = 0, 1
#: Under a deadline the window's moments (:mod:`.backward`, and the readout leaf per segment
#: they bring) start only when at least this share of the level pass's own time is left:
#: measured on node frames (session 20) they cost ~0.4-0.5 of it. Otherwise the plan ends as
#: it would without them (its rows' leaves): looser, but a certificate, where running them
#: would miss the deadline and leave none.
WINDOW_SHARE = 0.6


class LevelLogits(NamedTuple):
    """:func:`level_logits`'s result: nodal logits and per segment a band offset ± radius."""

    logits: torch.Tensor
    radius: torch.Tensor
    offset: torch.Tensor
    mixed: int
    #: The readout window's moments bounded backward (``window`` asked and able): (peak (K,),
    #: anchor (K, 2), stable (K, m), lo, hi (G' − 1, K, 3) per segment, cells (K, m) each
    #: window cell's v·W + u), see :class:`.spec.WindowMoments`.
    moments: tuple | None = None


def level_axis(box: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> int | None:
    """:data:`KAPPA` or :data:`TAU` when only that threshold of ``box`` (4,) clips, else None.

    A present value v is clipped somewhere on the sub-box by τ when v < τ_hi and by κ when
    v > κ_lo. None when both clip, or neither (a free sub-box, :func:`.thresholds.free_mask`).
    """
    v_min, v_max = present_range(values, weights)
    dark = float(box[1]) > v_min
    bright = float(box[2]) < v_max
    if bright and not dark:
        return KAPPA
    if dark and not bright:
        return TAU
    return None


def level_nodes(box: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
                axis: int, subdivide: int = 1) -> torch.Tensor:
    """(G,) sorted nodes along ``axis``: the sub-box's two ends and the present values inside.

    At least two nodes (a point sub-box repeats its end). Between two adjacent nodes no present
    value lies strictly inside, so the clipped input is linear there. ``subdivide`` > 1 cuts
    every such segment into that many equal parts: the input stays linear on each, and the
    only error left, a ReLU's chord gap where a neuron changes sign inside a segment, shrinks
    with the segment.
    """
    lo, hi = float(box[2 * axis]), float(box[2 * axis + 1])
    present = values[(weights > 0) & (values > lo) & (values < hi)]
    ends = values.new_tensor([lo, hi])
    nodes = torch.cat([ends[:1], present.sort().values, ends[1:]])
    if subdivide > 1 and hi > lo:
        step = torch.arange(subdivide, dtype=nodes.dtype, device=nodes.device) / subdivide
        inner = nodes[:-1, None] + step * (nodes[1:] - nodes[:-1])[:, None]
        nodes = torch.unique_consecutive(torch.cat([inner.reshape(-1), nodes[-1:]]))
    return nodes


def _nodal_inputs(enc, nodes: torch.Tensor, axis: int, *,
                  reference: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Network inputs ``clip(x, τ, κ)`` (*without* the − τ) at each node, float64.

    Returns node 0's (1, 1, H, W) (None when ``reference`` is False: the caller has its
    trace) and the others' deviations from it (G − 1, 1, H, W), gathered from the value
    tables' differences (:meth:`~usn_perception.bounds.inputs.ImageEncoding.threshold_deviations`).
    The other threshold sits where it clips nothing. Leaving out the − τ (a constant image,
    which a zero-sum first filter cancels up to rounding) keeps the deviations between nodes
    to the clipped pixels; the caller bounds its effect by |τ|·R (:func:`.free.tau_reach`).
    """
    lo, hi = float(enc.values.min()), float(enc.values.max())
    if axis == KAPPA:
        taus, kappas = torch.full_like(nodes, lo), nodes
    else:
        taus, kappas = nodes, torch.full_like(nodes, hi)
    v0 = enc.threshold_inputs(taus[:1], kappas[:1], shift=False) if reference else None
    return v0, enc.threshold_deviations(taus, kappas)


def _brackets(points: torch.Tensor, values: torch.Tensor,
              weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The natural points among ``points`` and how the others interpolate between them.

    Natural: the two ends and every present pixel value. Between two adjacent natural points
    no present value lies strictly inside, so the network input (and every layer's output up
    to the first ReLU) is linear there: a point at fraction w from its left natural point a
    to its right one b takes (1 − w)·(a's) + w·(b's). Returns the indices of the natural
    points (G_n,), and for points 1 … G' − 1 the positions of a and b among them and w (0 at a
    natural point, where a = b).
    """
    natural = torch.isin(points, values[weights > 0])
    natural[0] = natural[-1] = True
    index = torch.nonzero(natural)[:, 0]
    left = torch.cumsum(natural.long(), 0) - 1
    right = torch.where(natural, left, left + 1)
    at_left, at_right = points[index[left]], points[index[right]]
    weight = torch.where(natural, 0.0, (points - at_left) / (at_right - at_left))
    return index, left[1:], right[1:], weight[1:]


def _interpolate(d: torch.Tensor, r: torch.Tensor, left: torch.Tensor, right: torch.Tensor,
                 weight: torch.Tensor, unit: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Deviations of every point from the natural ones' ``d`` (see :func:`_brackets`).

    Natural point 0 is the reference (deviation 0). The result is within 16u·max|D| of the
    exact combination of the computed deviations (the weights' rounding in float64 and in
    ``d``'s dtype, two products and a sum), which ``r`` (one row) takes on; a natural point's
    deviation is copied exactly (weights 1 and 0).
    """
    last = _channels_last(d)
    rows = _rows(d, last)  # (G_n − 1, neurons) in memory order: a view
    # One matrix product with two weights per row (1 and 0 at a natural point); the zero
    # terms add exactly nothing.
    mix = rows.new_zeros((left.shape[0], rows.shape[0] + 1))
    at = torch.arange(left.shape[0], device=rows.device)
    mix[at, left] = (1.0 - weight).to(rows.dtype)
    mix[at, right] += weight.to(rows.dtype)
    out = mix[:, 1:] @ rows  # column 0 is the reference, whose deviation is 0
    r = r + _deviation(d).mul_(16.0 * unit).add_(TINY)
    return _unrows(out, d, last), r


def _deviation(d: torch.Tensor) -> torch.Tensor:
    """max_j |D_j| per neuron (1, …): what a deviation's rounding scales with.

    Reduced in memory order: over a channels-last batch, ``amax(0)`` strides through memory
    and took 3.5 ms instead of 0.24 ms on a node frame's first layer (12 nodes).
    """
    last = _channels_last(d)
    return _unrows(_rows(d, last).abs().amax(0, keepdim=True), d[:1], last)


def _linear(op: LinearOp, d: torch.Tensor, r: torch.Tensor, m: torch.Tensor | None,
            unit: float, o: torch.Tensor | None = None) -> tuple:
    """W·D for the deviations, |W| for the radii, W·o for offset rows (see :func:`_relu`).

    ``m`` ≥ max_j|D_j| when the previous op knows it (else computed here). The reference
    node is traced apart.
    """
    if op.fan_in == 0:  # moves values only: exact
        return op.apply(d), op.apply(r), None if o is None else op.apply(o)
    if m is None:
        m = _deviation(d)
    gam = gamma(op.fan_in + 1, unit)  # + 1: the weights' own rounding
    src = r + m.mul_(gam)
    if o is not None:  # W·o rounds like W·D: within γ·|W|·|o|
        src.add_(o.abs().mul_(gam))
        o = op.apply(o)
    d = op.apply(d)
    r = op.apply(src) if op.nonneg else op.apply_abs(src)
    return d, r.mul_(1.0 + 4.0 * gamma(op.fan_in + 16, unit)).add_(TINY), o


def _affine(op: AffineOp, d: torch.Tensor, r: torch.Tensor, unit: float,
            o: torch.Tensor | None = None) -> tuple:
    scale_d = torch.as_tensor(op.scale).to(d.dtype)
    src = r + _deviation(d).mul_(gamma(2, unit))  # the scale's rounding and the product's
    if o is not None:
        src.add_(o.abs().mul_(gamma(2, unit)))
        o = o * scale_d
    return (d * scale_d, (src * scale_d.abs()).mul_(1.0 + 4.0 * gamma(18, unit)).add_(TINY),
            o)


def _prefix(fused: FusedPrefix, d: torch.Tensor, r: torch.Tensor, unit: float,
            layout: torch.memory_format) -> tuple[torch.Tensor, torch.Tensor]:
    """The deviations and the radius row through the fused linear prefix (:mod:`.fused`).

    The radius holds the fused map's own rounding (:meth:`~.fused.FusedPrefix.radius`, from
    max_j |D_j|).
    """
    r = fused.radius(r, _deviation(d), unit).add_(TINY)
    return fused.apply(d).contiguous(memory_format=layout), r.contiguous(memory_format=layout)


def _relu(v0: torch.Tensor, d: torch.Tensor, r: torch.Tensor, group: torch.Tensor,
          unit: float, o: torch.Tensor | None = None, offset: bool = False,
          record: dict | None = None) -> tuple:
    """Nodal ReLU: node j is c_0 + D_j (D_0 = 0, not stored), c_0 = ``v0`` in float64.

    Returns the deviations ReLU(c_0 + D_j) − ReLU(c_0), the new radii, the bound m of the
    new deviations, the count of mixed neurons and the new offset rows (below). Per neuron:
    *on* (every node above every row's band: the ReLU is the identity on the whole sub-box,
    nothing changes), *off* (every node + band ≤ 0: everything becomes 0), or *mixed*,
    computed on the gathered mixed neurons only. There D_j' is max(D_j, −c) where c_0 ≥ 0
    and max(D_j + c, 0) where c_0 < 0, with c the reference rounded to D's precision: exact
    except where the result depends on that rounding, which happens only when
    |c_0| ≤ (1 + 3u)·max_j|D_j| = (1 + 3u)·m, so the error is below 4u·m. Segment s, whose
    error is in the band [o − r, o + r] of its row (o = 0 without offset rows), is off if
    both its nodes are, band included; else ReLU moves the error into [min(o − r, 0),
    max(o + r, 0)] (ReLU is monotone and 1-Lipschitz), and where its node values a, b differ
    in sign the chord of ReLU lies above ReLU by up to the gap |a|·b / (|a| + b) (ReLU is
    convex), so the band's low side grows by the gap. A row shared by a group of segments
    (``group``: segment → radius row) takes the widest band over them.

    Without ``offset`` the new band is symmetric, ± (its wider side). With ``offset`` it is
    kept as an *offset row* o (its centre) and a radius: the offset moves through the next
    linear layer with W's signs, where it cancels, and a radius only grows through |W|. The
    offset rows (``o`` in, the result out; None without ``offset``) need ``offset``.
    ``record``, when given, receives the on-mask ('keep', 1.0 where on, in memory order) and
    the mixed neurons' indices ('mixed') for :mod:`.backward`.
    """
    n_r = r.shape[0]
    last = _channels_last(d)  # neurons in the order of d's memory, whatever it is
    d2, r2 = _rows(d, last), _rows(r, last)
    o2 = None if o is None else _rows(o, last)
    c = _rows(v0.to(d.dtype, memory_format=torch.channels_last) if last else v0.to(d.dtype),
              last)[0]  # error ≤ u·|c_0|
    top = d2.amax(0).clamp_(min=0.0)  # over all nodes, D_0 = 0 included
    bottom = d2.amin(0).clamp_(max=0.0)
    m = torch.maximum(top, bottom.neg())
    if o2 is None:
        r_max = r2[0] if n_r == 1 else r2.amax(0)
        up_max = down_max = r_max
    else:  # each row's band [o − r, o + r]: its sides, each within u of exact. Every band
        # holds 0 (the nodes are exact), |o| ≤ r, so both sides are ≥ 0 and round up by ×(1 + 4u).
        up_max = (r2 + o2).amax(0).mul_(1.0 + 4.0 * unit)
        down_max = (r2 - o2).amax(0).mul_(1.0 + 4.0 * unit)
        r_max = torch.maximum(up_max.abs(), down_max.abs())
    # Node values computed as c + D_j are within u·|c_0| + u·|c_j| ≤ 3u·(|c| + m) of exact;
    # ``margin`` bounds that (the band's sides are added to it where they apply).
    margin = c.abs().add_(m).add_(r_max).mul_(8.0 * unit).add_(TINY)
    on = bottom.add_(c) >= down_max + margin
    off = top.add_(c).add_(up_max).add_(margin) <= 0
    keep = on.to(d.dtype)
    mixed = torch.nonzero(on.logical_or_(off).logical_not_())[:, 0]  # ``on`` is spent here
    n_mixed = int(mixed.numel())
    if record is not None:
        record.update(keep=keep, mixed=mixed)
    if n_mixed:  # gathered before d, r and m are zeroed in place
        dm, rm = d2.index_select(1, mixed), r2.index_select(1, mixed)
        cm, mm = c.index_select(0, mixed), m.index_select(0, mixed)
        om = None if o2 is None else o2.index_select(1, mixed)
    d_new = d2.mul_(keep)  # d and r are this call's own (fresh from the op before)
    r_new = r2.mul_(keep)
    if offset:
        o_new = torch.zeros_like(r_new) if o2 is None else o2.mul_(keep)
    # |ReLU(c_0 + D) − ReLU(c_0)| ≤ |D|: m still bounds the deviations where a neuron is on
    # or mixed; an off one has none.
    m_new = m.mul_(keep)
    if n_mixed:
        m_new.index_copy_(0, mixed, mm)
        d_new.index_copy_(1, mixed, torch.maximum(dm, cm.neg()).add_(cm.clamp(max=0.0)))
        nodes = torch.cat([cm[None], dm.add_(cm)])
        a, b = nodes[:-1], nodes[1:]
        # The chord gap |a|·b / (|a| + b) where a and b differ in sign, else 0: (|ab| − ab)
        # is 2|ab| or exactly 0.
        ab = a * b
        gap = (ab.abs().sub_(ab)).div_((a.abs().add_(b.abs())).clamp_(
            min=torch.finfo(d.dtype).tiny)).mul_(0.5 + 4.0 * unit)
        each = None if n_r == a.shape[0] else group  # segment → row, where rows are shared
        r_seg = rm if each is None else rm.index_select(0, each)
        if om is None:
            up = down = r_seg
        else:  # the band's sides per segment, rounded up (one operation each)
            o_seg = om if each is None else om.index_select(0, each)
            up = (r_seg + o_seg).mul_(1.0 + 4.0 * unit)
            down = (r_seg - o_seg).mul_(1.0 + 4.0 * unit)
        seg_off = torch.maximum(a, b).add_(up).add_(margin.index_select(0, mixed)) <= 0
        if om is None:  # the band [−r − gap, r]
            high = r_seg.masked_fill(seg_off, 0.0)
            low = high + gap
        else:  # the band [−low, high]
            high = up.clamp(min=0.0).masked_fill_(seg_off, 0.0)
            low = down.clamp(min=0.0).masked_fill_(seg_off, 0.0).add_(gap)
        if not offset:  # symmetric: ± the wider side
            high = low if om is None else torch.maximum(high, low)
        if n_r == 1:
            high, low = high.amax(0, keepdim=True), low.amax(0, keepdim=True)
        elif n_r != a.shape[0]:
            high = _group_reduce(high, group, rm.shape[0], 'amax')
            low = _group_reduce(low, group, rm.shape[0], 'amax')
        slack = mm.mul(16.0 * unit)
        if offset:  # centre (high − low)/2, half-width (high + low)/2, each rounded once
            centre = (high - low).mul_(0.5)
            slack = centre.abs().mul_(2.0 * unit).add_(slack)
            high = high.add_(low).mul_(0.5)
            o_new.index_copy_(1, mixed, centre)
        r_new.index_copy_(1, mixed, (high + slack).mul_(
            1.0 + 4.0 * gamma(20, unit)).add_(TINY))
    return (_unrows(d_new, d, last), _unrows(r_new, r, last),
            _unrows(m_new[None], d[:1], last), n_mixed,
            _unrows(o_new, r, last) if offset else None)


def _channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is an image batch stored channels-last (and not also plainly contiguous)."""
    return t.ndim == 4 and not t.is_contiguous() and t.is_contiguous(
        memory_format=torch.channels_last)


def _rows(t: torch.Tensor, last: bool) -> torch.Tensor:
    """(n, neurons) view of ``t`` (n, …) in its memory order (H, W, C for channels-last)."""
    return (t.permute(0, 2, 3, 1) if last else t).reshape(t.shape[0], -1)


def _unrows(rows: torch.Tensor, like: torch.Tensor, last: bool) -> torch.Tensor:
    """Inverse of :func:`_rows`: back to the shape (and memory order) of ``like``."""
    if not last:
        return rows.view(rows.shape[0], *like.shape[1:])
    n, c, h, w = rows.shape[0], *like.shape[1:]
    return rows.view(n, h, w, c).permute(0, 3, 1, 2)


def _group_reduce(src: torch.Tensor, group: torch.Tensor, n: int, how: str) -> torch.Tensor:
    """(n, …) max or min ('amax' / 'amin') of the rows of ``src`` per ``group`` index.

    Rows of a group that receives none are 0.
    """
    index = group.view(-1, *(1,) * (src.ndim - 1)).expand_as(src)
    out = src.new_zeros((n, *src.shape[1:]))
    return out.scatter_reduce_(0, index, src, how, include_self=False)


def radius_groups(segments: int, groups: int | torch.Tensor | None) -> torch.Tensor:
    """(segments,) radius row of each segment: ``groups`` contiguous groups (None: one each).

    A tensor ``groups`` is already such a map (e.g. :func:`narrowest_merged`) and is returned.
    """
    if isinstance(groups, torch.Tensor):
        if groups.shape != (segments,):
            raise ValueError(f'a group map needs one entry per segment ({segments}), got '
                             f'shape {tuple(groups.shape)}')
        return groups
    n = segments if groups is None else max(1, min(int(groups), segments))
    return torch.arange(segments) * n // segments


def narrowest_merged(nodes: torch.Tensor, groups: int) -> torch.Tensor:
    """(G − 1,) contiguous groups of the segments between ``nodes``, the narrowest merged first.

    Starting from one group per segment, the adjacent pair of groups that spans the shortest
    stretch of the axis joins until ``groups`` are left (the first such pair on ties). A
    merged leaf's chord bends where the pair meets, and the shorter the pair the less it
    bends: measured on node frames (``docs/certification.md``, "Merged leaves with offset
    rows"), one merge with offset rows costs ~7 % of the width of a leaf per segment, where
    :func:`radius_groups`' equal split costs ~20 %.
    """
    ends = nodes.tolist()
    spans = [[i, i + 1] for i in range(len(ends) - 1)]  # node indices of each group's ends
    while len(spans) > max(1, groups):
        j = min(range(len(spans) - 1), key=lambda k: ends[spans[k + 1][1]] - ends[spans[k][0]])
        spans[j] = [spans[j][0], spans.pop(j + 1)[1]]
    out = torch.empty(len(ends) - 1, dtype=torch.long)
    for leaf, (first, last) in enumerate(spans):
        out[first:last] = leaf
    return out


def evaluation_points(nodes: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
                      axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The distinct inputs among the nodes: (points (G',), index of each node's point (G,)).

    Beyond the present values (τ ≤ v_min, κ ≥ v_max) nothing clips: those nodes' unshifted
    inputs are the boundary value's, so the network runs once for all of them (the box's
    free part costs nothing and needs no leaf of its own).
    """
    v_min, v_max = present_range(values, weights)
    eff = nodes.clamp(min=v_min) if axis == TAU else nodes.clamp(max=v_max)
    points, index = torch.unique_consecutive(eff, return_inverse=True)
    return points, index


def reference_unclipped(points: torch.Tensor, values: torch.Tensor, weights: torch.Tensor,
                        axis: int) -> bool:
    """Whether the reference node (the lowest τ, the highest κ) of ``points`` clips nothing.

    Its network input is then the image's own (:func:`level_logits` can reuse its trace).
    """
    v_min, v_max = present_range(values, weights)
    return float(points[0]) <= v_min if axis == TAU else float(points[-1]) >= v_max


def level_logits(net: CompiledNetwork, enc, points: torch.Tensor, axis: int, *,
                 group: torch.Tensor | None = None, precision: str = 'float32',
                 deadline: float | None = None,
                 nominal: list[torch.Tensor] | tuple | None = None,
                 offset: bool = True, window: int | None = None) -> LevelLogits | None:
    """Heatmap logits at the ``points`` (distinct, ascending) and each segment's band.

    ``group`` (G' − 1,) maps each segment to its radius row, contiguous and from 0 (None: one
    row per segment, the tightest; all 0: one for all, the cheapest: every row costs one image
    per layer). Returns :class:`LevelLogits`: (G', K, P) float64 logits, and per segment
    (G' − 1, K, P) float64 an offset and a radius (the logits between the segment's nodes lie
    within interpolant + offset ± radius), and the count of mixed neurons; or None when a
    deviation overflowed (the caller bounds the sub-box another way). ``window``: the
    moments of the cells within this many of each keypoint's reference argmax are bounded
    by :mod:`.backward` (float32 only; ``LevelLogits.moments``, :func:`_window_moments`), the
    rest by the rows; under a ``deadline`` only where :data:`WINDOW_SHARE` of the pass's time
    is left for them. ``precision``: the deviations'
    dtype ('float32' needs :func:`~usn_perception.bounds.rounding.float32_problem` to have
    found nothing). ``offset``: every row also carries an offset row from the first ReLU on
    (:func:`_relu`), one more image per row in the layers after it, kept to the end:
    measured on node frames and renders to buy more tightness per unit of time than more
    rows or parts do (``docs/certification.md``, "Offset rows").

    The reference node (float64) is the point that clips least: the lowest τ, the highest κ.
    Where it clips nothing its input is the image's own network input, and ``nominal``, the
    module outputs of that input (:func:`~usn_perception.bounds.layers.module_outputs`, e.g.
    ``Detector.run(..., trace=True).trace``), saves running it again.
    """
    began = time.perf_counter()
    dtype, unit = (torch.float32, U32) if precision == 'float32' else (torch.float64, U64)
    if group is None:
        group = torch.arange(points.shape[0] - 1)
    reuse = nominal is not None and reference_unclipped(points, enc.values, enc.value_weights,
                                                        axis)
    flip = axis == KAPPA  # nodes from the reference on; rows stay contiguous from 0
    if flip:
        points = points.flip(0)
        group = int(group[-1]) - group.flip(0)
    # With a reused trace node 0's input is needed only if the network starts with a ReLU.
    starts_linear = bool(net.ops) and isinstance(net.ops[0], (LinearOp, AffineOp))
    # Only the natural nodes run through the linear layers before the first ReLU; the others
    # (segments cut into parts) are interpolated from them there.
    natural, left, right, weight = _brackets(points, enc.values, enc.value_weights)
    v0, diff = _nodal_inputs(enc, points[natural], axis,
                             reference=not (reuse and starts_linear))
    interpolate = natural.shape[0] < points.shape[0]
    group = group.to(diff.device)
    refs = net.op_values(nominal) if reuse else net.trace(v0)
    # Node 0 is the reference, in float64; the others are deviations D_j = c_j − c_0 rounded to
    # ``dtype`` (≤ u·|D_j|, which starts the radius; the float64 ones are ulp-level, covered by
    # the readout's logit slack like every other float64 step of the engine, and so is the
    # difference between the module's outputs and the compiled ops').
    # Channels-last images: the float32 convolutions run ~25 % faster on them (oneDNN).
    layout = torch.channels_last if diff.ndim == 4 else torch.contiguous_format
    d = diff.to(dtype, memory_format=layout)
    # Every row is the same until the first ReLU tells the segments apart (a linear map's
    # rounding is shared): carry one, and make the rows there.
    rows = int(group[-1]) + 1
    r = (_deviation(diff) * (2.0 * unit) + TINY).to(dtype).contiguous(memory_format=layout)
    unstable = 0
    m = None  # max_j |D_j| when the previous op provides it
    o = None  # offset rows from the first ReLU on (see _relu)
    # The linear ops before the first ReLU as one convolution where they compose (.fused).
    fused = fused_prefix(net)
    if fused is not None:
        d, r = _prefix(fused, d, r, unit, layout)
    start = start_index(net) if window is not None and dtype == torch.float32 else None
    tape = BackwardTape() if start is not None else None
    with torch.backends.nnpack.flags(enabled=False):  # NNPACK convolutions are Winograd
        for i, op in enumerate(net.ops):
            if fused is not None and i < fused.stop:
                continue
            if deadline is not None and time.perf_counter() > deadline:
                raise BudgetExceeded
            taped = tape is not None and i > start
            if isinstance(op, (LinearOp, AffineOp)):
                if taped:
                    m = _deviation(d) if m is None else m
                    tape.steps.append(_rounding_step(op, m, unit, d.shape[-2:]))
                if isinstance(op, LinearOp):
                    d, r, o = _linear(op, d, r, m, unit, o)
                else:
                    d, r, o = _affine(op, d, r, unit, o)
                m = None
            else:
                if interpolate:
                    d, r = _interpolate(d, r, left, right, weight, unit)
                    interpolate = False
                if r.shape[0] != rows:
                    r = r.repeat(rows, 1, 1, 1).contiguous(memory_format=layout)
                record = {} if taped else None
                d, r, m, n, o = _relu(refs[i - 1] if i else v0, d, r, group, unit, o,
                                      offset=offset, record=record)
                unstable += n
                if tape is not None and i == start:
                    tape.start = (o, r)
                elif taped:
                    tape.steps.append(_relu_step(record, d, o, r))
    if interpolate:  # a network without any ReLU
        d, r = _interpolate(d, r, left, right, weight, unit)
    if not all_finite(d, r) or (o is not None and not all_finite(o)):
        return None
    v0 = (refs[-1] if refs else v0)
    # The band at the logits per row, o ± r, in float64 (exact from float32).
    lo, hi = (-r.double(), r.double()) if o is None else (o.double() - r.double(),
                                                          o.double() + r.double())
    lo, hi = lo.flatten(1), hi.flatten(1)
    moments = None
    now = time.perf_counter()
    if tape is not None and tape.start is not None and (
            deadline is None or now + WINDOW_SHARE * (now - began) < deadline):
        nodal = d.double().flatten(1)
        upper = (v0.flatten(1) + nodal.amax(0).clamp(min=0.0) + hi.amax(0).clamp(min=0.0))
        lower = (v0.flatten(1) + nodal.amin(0).clamp(max=0.0) + lo.amin(0).clamp(max=0.0))
        moments = _window_moments(net, tape, v0[0], window, upper.view(v0.shape[1:]),
                                  lower.view(v0.shape[1:]), lo, hi)
    centre = (hi + lo) * 0.5
    radius = ((hi - lo) * 0.5 + (hi.abs() + lo.abs()) * (4.0 * U64)) * (1.0 + 4.0 * U64) + TINY
    v0 = v0.flatten(2)
    logits = torch.cat([v0, v0 + d.double().flatten(2)])
    pick = group if radius.shape[0] == rows else group * 0
    shape = (-1, *logits.shape[1:])
    radius = radius.index_select(0, pick).view(shape)
    centre = centre.index_select(0, pick).view(shape)
    if flip:
        logits, radius, centre = logits.flip(0), radius.flip(0), centre.flip(0)
    if moments is not None:
        peak, anchor, stable, m_lo, m_hi, cells = moments
        m_lo, m_hi = m_lo.index_select(0, pick), m_hi.index_select(0, pick)
        if flip:
            m_lo, m_hi = m_lo.flip(0), m_hi.flip(0)
        moments = (peak, anchor, stable, m_lo, m_hi, cells)
    return LevelLogits(logits, radius, centre, unstable, moments)


def _window_moments(net: CompiledNetwork, tape: BackwardTape, reference: torch.Tensor,
                    window: int, upper: torch.Tensor, lower: torch.Tensor, lo: torch.Tensor,
                    hi: torch.Tensor) -> tuple | None:
    """Per row, the local-centroid window's moments of the deviation, bounded backward.

    ``reference`` (K, H, W) the reference node's logits, ``upper``/``lower`` (K, H, W) bounds
    of every cell over all nodes and rows, ``lo``/``hi`` (R, K·H·W) the rows' bands. The
    window's cells that are positive throughout (``lower`` > 0) give the three moments
    Σ δ, Σ (Δu − a_u)·δ, Σ (Δv − a_v)·δ (Δ from the reference argmax, a the anchor;
    :class:`.spec.WindowMoments`); the
    others that may be positive are bounded one by one, and their rows' band narrowed to it
    in place. Returns (peak (K,), anchor (K, 2), stable (K, m), lo, hi (R, K, 3), cells
    (K, m): each window cell's flat v·W + u, clamped to the heatmap), or None where the
    backward bound cannot run.
    """
    k_kp, height, width = reference.shape
    peak = reference.reshape(k_kp, -1).argmax(1)
    pu, pv = peak % width, peak // width
    # The window's cells, row-major around each peak.
    du, dv = window_offsets(window)
    v, u = pv[:, None] + dv, pu[:, None] + du  # (K, m)
    inside = (v >= 0) & (v < height) & (u >= 0) & (u < width)
    flat = (torch.arange(k_kp)[:, None] * height + v.clamp(0, height - 1)) * width + (
        u.clamp(0, width - 1))
    # The moments' anchor: the reference's own local-centroid offset from its peak (any
    # anchor is sound; the scan's thresholds end up near this one), on a grid of 1/64 so
    # that the weights Δ − anchor are exact in float32.
    mass = reference.flatten()[flat].clamp(min=0.0) * inside  # (K, m)
    total = mass.sum(1, keepdim=True)
    offset = torch.stack([mass @ du.to(mass.dtype), mass @ dv.to(mass.dtype)], 1)
    offset = torch.where(total > 0, offset / torch.where(total > 0, total, 1.0), 0.0)
    anchor = torch.round(offset * 64.0) / 64.0
    # Those that may be positive (a relu weight of 0 needs no bound), and the peak.
    live = inside & ((upper.flatten()[flat] > 0) | ((du == 0) & (dv == 0)))
    stable = live & (lower.flatten()[flat] > 0)
    mixed = live & ~stable
    # Per keypoint three moments over its stable cells, then one item per other cell.
    coef = torch.stack([torch.ones_like(du, dtype=torch.float32).expand(k_kp, -1),
                        du - anchor[:, :1].float(), dv - anchor[:, 1:].float()], 1)  # (K, 3, m)
    rank = mixed.cumsum(1) - 1  # each mixed cell's item among its keypoint's, from 0
    per = 3 + int(mixed.sum(1).max())
    weights = torch.zeros(k_kp, per, v.shape[1])
    weights[:, :3] = coef * stable[:, None]
    kk, ii = mixed.nonzero(as_tuple=True)
    weights[kk, 3 + rank[kk, ii], ii] = 1.0
    cells = flat - torch.arange(k_kp)[:, None] * (height * width)  # per keypoint's map
    out = window_functionals(net, tape, (k_kp, height, width), cells, weights)
    if out is None:
        return None
    f_lo, f_hi = out  # (R, K, F): per keypoint its three moments, then its mixed cells
    if kk.numel():
        index = flat[kk, ii]
        b_lo = torch.maximum(lo[:, index], f_lo[:, kk, 3 + rank[kk, ii]])
        b_hi = torch.minimum(hi[:, index], f_hi[:, kk, 3 + rank[kk, ii]])
        if bool((b_lo > b_hi).any()):  # two sound bounds of one deviation must meet
            raise RuntimeError('internal soundness check failed: a backward window band '
                               'misses the rows\' band')
        lo[:, index], hi[:, index] = b_lo, b_hi
    rows = f_lo.shape[0]
    m_lo, m_hi = f_lo[:, :, :3], f_hi[:, :, :3]
    # The rows' bands bound the same sums (Σ of each term's extreme): never wider than that.
    at, kp = flat[stable], stable.nonzero()[:, 0]
    terms = coef.double().permute(1, 0, 2)[:, stable][None]  # (1, 3, M)
    ends = (terms * lo[:, None, at], terms * hi[:, None, at])
    size = (ends[0].abs() + ends[1].abs()) * ((at.shape[0] + 2) * U64)
    r_lo = torch.zeros(rows, 3, k_kp, dtype=lo.dtype).index_add_(
        2, kp, torch.minimum(*ends) - size)
    r_hi = torch.zeros(rows, 3, k_kp, dtype=hi.dtype).index_add_(
        2, kp, torch.maximum(*ends) + size)
    m_lo = torch.maximum(m_lo, r_lo.transpose(1, 2))
    m_hi = torch.minimum(m_hi, r_hi.transpose(1, 2))
    if bool((m_lo > m_hi).any()):  # two sound bounds of one sum must meet
        raise RuntimeError('internal soundness check failed: backward window moments miss '
                           'the rows\' bands')
    return peak, anchor, stable, m_lo, m_hi, cells


def _rounding_step(op: LinearOp | AffineOp, m: torch.Tensor, unit: float,
                   size: tuple[int, int]) -> tuple:
    """A tape step for :mod:`.backward`: the bound of the op's rounding of the nodal values.

    The level pass adds the same term to its radius (:func:`_linear`, :func:`_affine`).
    """
    if isinstance(op, AffineOp):
        scale = torch.as_tensor(op.scale).to(m.dtype).abs()
        eps = (m * gamma(2, unit)) * scale
        eps = eps.mul_(1.0 + 4.0 * gamma(18, unit)).add_(TINY)
        return ('affine', op, eps, tuple(size))
    src = m * gamma(op.fan_in + 1, unit)
    eps = op.apply(src) if op.nonneg else op.apply_abs(src)
    eps = eps.mul_(1.0 + 4.0 * gamma(op.fan_in + 16, unit)).add_(TINY)
    return ('linear', op, eps, tuple(size))


def _relu_step(record: dict, d: torch.Tensor, o: torch.Tensor | None,
               r: torch.Tensor) -> tuple:
    """A tape step for :mod:`.backward`: a ReLU's on-mask and its mixed neurons' bands o ± r.

    The new band is 0 on an off neuron and the old one on an on neuron: off the on-mask it
    is the mixed neurons' own.
    """
    keep = _unrows(record['keep'][None], d[:1], _channels_last(d))
    if not record['mixed'].numel():
        return ('relu', keep, None, None)
    other = 1.0 - keep
    return ('relu', keep, None if o is None else o * other, r * other)


def leaf_forms(box: torch.Tensor, nodes: torch.Tensor, axis: int, logits: torch.Tensor,
               radius: torch.Tensor,
               leaves: int | torch.Tensor | None = None,
               offset: torch.Tensor | None = None
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sub-boxes (leaves) of ``box`` made of contiguous segments, each with its chord form.

    ``logits`` (G, K, P) are the nodal values, ``radius`` (G − 1, K, P) each segment's, and
    ``leaves`` groups the segments as :func:`radius_groups` does (None: one leaf per segment,
    where the chord is exact; a tensor: that segment → leaf map). A leaf's centre form is the
    chord between its end nodes, moved to the middle of its inner nodes' deviations from that
    chord; its radius is its largest segment radius plus half that deviation spread (the
    interpolant is piecewise linear, so it deviates most at a node) plus the chord's own
    rounding. With ``offset`` (G − 1, K, P) a segment's band is offset ± radius: the leaf's
    centre moves to the middle of its segments' bands. Returns the leaves (L, 4) (they tile
    ``box``: adjacent leaves share their cut), centre forms (L, 3, K, P) affine in the
    active threshold, and radii (L, 1, K, P).
    """
    group = radius_groups(nodes.shape[0] - 1, leaves)
    if int(group[-1]) + 1 == nodes.shape[0] - 1:
        return _segment_forms(box, nodes, axis, logits, radius, offset)
    return _merged_forms(box, nodes, axis, logits, radius, group, offset)


def _merged_forms(box: torch.Tensor, nodes: torch.Tensor, axis: int, logits: torch.Tensor,
                  radius: torch.Tensor, group: torch.Tensor,
                  offset: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """:func:`leaf_forms` for a group map, one leaf at a time."""
    n_leaf = int(group[-1]) + 1
    # Each leaf's first segment and one past its last (groups are contiguous).
    cuts = torch.searchsorted(group, torch.arange(n_leaf + 1)).tolist()
    out = box.reshape(1, 4).repeat(n_leaf, 1)
    out[:, 2 * axis] = nodes[cuts[:-1]]
    out[:, 2 * axis + 1] = nodes[cuts[1:]]
    centre = logits.new_zeros((n_leaf, 3, *logits.shape[1:]))
    rad = logits.new_empty((n_leaf, *logits.shape[1:]))
    for i, (first, last) in enumerate(zip(cuts[:-1], cuts[1:], strict=True)):
        lo, hi = float(nodes[first]), float(nodes[last])
        a, b = logits[first], logits[last]
        slope = (b - a) / (hi - lo) if hi > lo else torch.zeros_like(a)
        c0 = a - slope * lo
        # Inner nodes' deviations from the chord (its ends deviate by rounding only).
        dev_hi = dev_lo = torch.zeros_like(a)
        if last - first > 1:
            inner = logits[first + 1:last] - (c0 + slope * nodes[first + 1:last].view(-1, 1, 1))
            dev_hi, dev_lo = inner.amax(0).clamp_(min=0.0), inner.amin(0).clamp_(max=0.0)
        # The segments' bands: [−radius, radius], or offset ± radius.
        if offset is None:
            band_hi = radius[first:last].amax(0)
            band_lo = -band_hi
        else:
            band_hi = (offset[first:last] + radius[first:last]).amax(0)
            band_lo = (offset[first:last] - radius[first:last]).amin(0)
        mid = 0.5 * (band_hi + band_lo)
        centre[i, 0] = c0 + 0.5 * (dev_hi + dev_lo) + mid
        centre[i, 1 + axis] = slope
        # The chord in floating point is within a few ulps of the exact one through (a, b);
        # the deviations were computed in float64 too, and so were the bands.
        reach = max(abs(lo), abs(hi))
        slop = (a.abs() + b.abs() + c0.abs() + slope.abs() * reach
                + dev_hi - dev_lo + band_hi.abs() + band_lo.abs()) * (32.0 * U64)
        spread = 0.5 * (dev_hi - dev_lo)
        rad[i] = ((0.5 * (band_hi - band_lo) + spread) * (1.0 + 16.0 * U64) + slop + 1e-300)
    return out, centre, rad[:, None]


def _segment_forms(box: torch.Tensor, nodes: torch.Tensor, axis: int, logits: torch.Tensor,
                   radius: torch.Tensor,
                   offset: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    """:func:`leaf_forms` where every segment is its own leaf: all segments at once.

    The same arithmetic as :func:`_merged_forms` (a chord has no inner nodes).
    """
    out = box.reshape(1, 4).repeat(nodes.shape[0] - 1, 1)
    out[:, 2 * axis] = nodes[:-1]
    out[:, 2 * axis + 1] = nodes[1:]
    view = (-1, *([1] * (logits.ndim - 1)))
    lo, hi = nodes[:-1].view(view), nodes[1:].view(view)
    a, b = logits[:-1], logits[1:]
    slope = torch.where(hi > lo, (b - a) / torch.where(hi > lo, hi - lo, 1.0), 0.0)
    c0 = a - slope * lo
    if offset is None:
        band_hi = radius
        band_lo = -band_hi
    else:
        band_hi, band_lo = offset + radius, offset - radius
    centre = logits.new_zeros((a.shape[0], 3, *logits.shape[1:]))
    centre[:, 0] = c0 + 0.5 * (band_hi + band_lo)
    centre[:, 1 + axis] = slope
    reach = torch.maximum(lo.abs(), hi.abs())
    slop = (a.abs() + b.abs() + c0.abs() + slope.abs() * reach
            + band_hi.abs() + band_lo.abs()) * (32.0 * U64)
    rad = (0.5 * (band_hi - band_lo)) * (1.0 + 16.0 * U64) + slop + 1e-300
    return out, centre, rad[:, None]


class SegmentForms(NamedTuple):
    """Every clip segment its own leaf, its forms computed on the cells a readout reads.

    A readout that reads a few cells per keypoint (the local centroid's windows) needs the
    segments' forms there only, and one leaf over the whole box (:meth:`hull`) to find
    which cells those are. ``logits`` (G, K, P) nodal, ``radius`` and ``offset`` (G − 1, K, P)
    each segment's band, as :func:`leaf_forms` takes them.
    """

    box: torch.Tensor
    nodes: torch.Tensor
    axis: int
    logits: torch.Tensor
    radius: torch.Tensor
    offset: torch.Tensor

    def leaves(self) -> torch.Tensor:
        """(G − 1, 4) the segments' sub-boxes."""
        out = self.box.reshape(1, 4).repeat(self.nodes.shape[0] - 1, 1)
        out[:, 2 * self.axis] = self.nodes[:-1]
        out[:, 2 * self.axis + 1] = self.nodes[1:]
        return out

    def at(self, cells: torch.Tensor | None = None, *,
           band: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Centre (G − 1, 3, K, S) and radius (G − 1, 1, K, S) forms at ``cells`` (K, S).

        ``cells`` None: every cell. ``band`` False: the interpolant's own forms, without the
        segments' bands (what backward moments add to).
        """
        logits, radius, offset = self.logits, self.radius, self.offset
        if cells is not None:
            def pick(t: torch.Tensor) -> torch.Tensor:
                return t.gather(2, cells[None].expand(t.shape[0], -1, -1))

            logits = pick(logits)
            radius, offset = (pick(radius), pick(offset)) if band else (None, None)
        if not band:
            radius, offset = torch.zeros_like(logits[1:]), None
        return _segment_forms(self.box, self.nodes, self.axis, logits, radius, offset)[1:]

    def hull(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One constant leaf over the whole box: (box (1, 4), centre (1, 3, K, P), radius).

        On a segment a logit is its nodes' interpolant, between their values, plus a
        deviation in the segment's band: over the box it lies between the least node value
        plus the lowest band side and the largest plus the highest (rounded outward). Enough
        to find the argmax candidates of every segment (a peak clear of the rest over the
        whole box), at a fraction of a chord leaf's cost.
        """
        lo = self.logits.amin(0) + (self.offset - self.radius).amin(0)
        hi = self.logits.amax(0) + (self.offset + self.radius).amax(0)
        slop = (self.logits.abs().amax(0) + (self.offset.abs() + self.radius).amax(0)) * (
            16.0 * U64)
        centre = lo.new_zeros((1, 3, *lo.shape))
        centre[0, 0] = 0.5 * (hi + lo)
        radius = ((0.5 * (hi - lo) + slop) * (1.0 + 4.0 * U64) + 1e-300)[None, None]
        return self.box.reshape(1, 4), centre, radius


def level_bounds(net: CompiledNetwork, enc, box: torch.Tensor, axis: int,
                 leaves: int | torch.Tensor | None = None, *,
                 nodes: torch.Tensor | None = None,
                 precision: str = 'float32', deadline: float | None = None,
                 nominal: list[torch.Tensor] | tuple | None = None,
                 offset: bool = True, window: int | None = None) -> tuple | None:
    """Leaves of ``box`` (4,) from its level nodes, their forms and what bounded them.

    Returns (leaves, centre forms, radii, mixed count, the window's
    :class:`~.spec.WindowMoments` or None). With the moments every segment is its own leaf:
    the interpolant is exact on it, and the rows' bands, which make merged leaves no worse,
    no longer bound the window; its forms then come as :class:`SegmentForms`, computed on
    the cells the readout reads (the radii None).

    The network runs once per distinct input (:func:`evaluation_points`); a node beyond the
    present values takes its point's logits, and a segment between two such nodes (constant
    input) the larger radius of the evaluated segments beside its point, which bounds that
    point's own error. The result still leaves out the input's − τ: the caller adds |τ|·R.
    None when :func:`level_logits` is. ``leaves`` as in :func:`leaf_forms`; ``nodes``:
    :func:`level_nodes` of the box, when the caller has them; ``nominal``: the image's module
    outputs, ``offset`` the offset rows and ``window`` the backward-bounded cells (see
    :func:`level_logits`).
    """
    values, weights = enc.values, enc.value_weights
    if nodes is None:
        nodes = level_nodes(box, values, weights, axis)
    points, index = evaluation_points(nodes, values, weights, axis)
    leaf_of = radius_groups(nodes.shape[0] - 1, leaves).to(nodes.device)
    live = index[1:] != index[:-1]  # segments with an evaluated segment of their own
    if points.shape[0] == 1:  # one input for the whole box (a point): run it as a segment
        points = points.repeat(2)
        group = torch.zeros(1, dtype=torch.long, device=nodes.device)
    else:
        _, group = torch.unique_consecutive(leaf_of[live], return_inverse=True)
    out = level_logits(net, enc, points, axis, group=group, precision=precision,
                       deadline=deadline, nominal=nominal, offset=offset, window=window)
    if out is None:
        return None
    logits, radius, centre, mixed, moments = out
    seg = index[:-1].clamp(max=radius.shape[0] - 1)  # live segment s is evaluated one index[s]
    before = (index[:-1] - 1).clamp(min=0)
    # A constant segment: its point's error, within the bands of the segments beside it.
    reach = radius + centre.abs()
    flat = torch.maximum(reach[before], reach[seg])
    live = live.view(-1, 1, 1)
    per_segment = torch.where(live, radius[seg], flat)
    per_offset = torch.where(live, centre[seg], torch.zeros_like(flat))
    if moments is None:
        return (*leaf_forms(box, nodes, axis, logits[index], per_segment, leaves, per_offset),
                mixed, None)
    peak, anchor, stable, m_lo, m_hi, cells = moments
    m_lo = torch.where(live, m_lo[seg], torch.minimum(m_lo[before], m_lo[seg]))
    m_hi = torch.where(live, m_hi[seg], torch.maximum(m_hi[before], m_hi[seg]))
    forms = SegmentForms(box, nodes, axis, logits[index], per_segment, per_offset)
    # The interpolant's own forms (no band) on the window cells (cells off the heatmap take
    # a clamped one: never stable, never used).
    c_exact, r_exact = forms.at(cells, band=False)
    return forms.leaves(), forms, None, mixed, WindowMoments(peak, anchor, stable, m_lo, m_hi,
                                                             c_exact, r_exact)

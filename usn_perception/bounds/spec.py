"""From heatmap-logit forms to bounds on the keypoint readouts (centroid, soft-argmax, argmax).

Everything works on logit *differences* d_i = h_i − h_m against a reference cell m, formed as
forms before concretising, so that variation common to all cells (which softmax and argmax
ignore) cancels. A relative slack is added to every difference here, once, to cover float64
rounding (see docs/certification.md).

Soft-argmax  x̂ = Σ_i e^{d_i} c_i / Σ_i e^{d_i}  is bounded two ways and the tighter side kept:

* ``lfp``: over the box of difference intervals [dl_i, du_i] the maximum of the linear-fractional
  program is attained with w_i = e^{du_i} for the cells with the largest coordinates and
  e^{dl_i} for the rest; one sorted prefix scan finds the best threshold exactly.
* ``coupled``: keeps θ. x̂ ≤ t for all θ iff Σ_i e^{d_i(θ)}(c_i − t) ≤ 0; bounding e^{d_i} by an
  affine chord (coefficient ≥ 0) or tangent (coefficient ≤ 0) of the form makes the left side
  affine in θ, so it is checked at the sub-box corners. For every threshold configuration the
  smallest feasible t is a ratio, again found in one prefix scan.

Argmax: cell i cannot be the argmax anywhere in a sub-box when some witness j has
min_θ (h_j − h_i)(θ) > slack; the readout lies in the bounding box of the other cells.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from usn_perception.bounds.forms import (
    box_view,
    corner_columns,
    form_at,
    form_corners,
    form_range,
    lower,
    upper,
)
from usn_perception.bounds.propagate import relu_forms
from usn_perception.readout import LOCAL_RADIUS, window_offsets

#: Relative slack on logit differences: rounding of float64 sums is ~1e-13 relative here.
LOGIT_SLACK = 1e-7
#: Absolute slack on readout coordinates (heatmap cells) for the readout's own rounding.
COORD_SLACK = 1e-7
#: Absolute margin in the coupled bound for exponentials that underflow to zero.
UNDERFLOW = 1e-280


def _box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 2) centre θ of each sub-box."""
    return torch.stack([0.5 * (boxes[:, 0] + boxes[:, 1]), 0.5 * (boxes[:, 2] + boxes[:, 3])], 1)


def reference_cells(centre: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, K) index of the cell with the largest centre form at each sub-box's centre θ."""
    return form_at(centre, _box_centres(boxes)).argmax(-1)


def _gather_cells(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather cells: t (N, k, K, n), idx (N, K) → (N, k, K, 1)."""
    return t.gather(3, idx[:, None, :, None].expand(t.shape[0], t.shape[1], -1, 1))


class LogitRanges(NamedTuple):
    """Each logit (N, K, n) over its sub-box.

    Its value at the box's centre θ, least and most values, and the magnitude
    max(|lo|, |hi|) that scales its rounding slack.
    """

    mid: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    mag: torch.Tensor


class WindowMoments(NamedTuple):
    """Backward bounds of each keypoint's local-centroid window moments, per sub-box.

    A level pass (:mod:`.levels`, :mod:`.backward`) bounds, over the window cells that are
    positive everywhere (``stable``), the sums of the logits' deviation δ from the nodes'
    interpolant that the centroid needs: Σ δ, Σ (Δu − a_u)·δ and Σ (Δv − a_v)·δ (Δ: the offset
    from the window's centre, the keypoint's reference argmax ``peak``; a: the ``anchor``,
    about the reference's own centroid offset, where the scan's thresholds end up). These
    cells then enter the threshold scan with the interpolant's forms only (``centre``,
    ``radius``, no band) and the sums as constants, instead of each cell with its own band:
    the signs with which neighbouring cells deviate cancel in the sums.

    ``peak`` (K,) flat cell indices; ``anchor`` (K, 2) (u, v) offsets; ``stable`` (K, m) over
    the window's row-major offsets; ``lo``, ``hi`` (N, K, 3); ``centre`` (N, 3, K, m),
    ``radius`` (N, 1, K, m) on the window's cells.
    """

    peak: torch.Tensor
    anchor: torch.Tensor
    stable: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor
    centre: torch.Tensor
    radius: torch.Tensor


def logit_ranges(centre: torch.Tensor, radius: torch.Tensor,
                 boxes: torch.Tensor) -> LogitRanges:
    """The exact range of every logit's bounds C ∓ R over its sub-box, with its centre value.

    A constant radius (k = 1, every level leaf and the parallel relaxation's) leaves the
    θ-coefficients to the centre form, so both ends share its centre value and spread
    (about a third of the whole-heatmap work of bounding C − R and C + R apart).
    """
    mid = form_at(centre, _box_centres(boxes))
    if radius.shape[1] == 1 and centre.shape[1] == 3:
        _, ar, _, br = box_view(boxes, centre.ndim - 1)
        spread = (centre[:, 1].abs() * ar).add_(centre[:, 2].abs() * br).add_(radius[:, 0])
        lo, hi = mid - spread, mid + spread
        return LogitRanges(mid, lo, hi, mid.abs().add_(spread))
    lo = form_range(lower(centre, radius), boxes)[0]
    hi = form_range(upper(centre, radius), boxes)[1]
    return LogitRanges(mid, lo, hi, torch.maximum(lo.abs(), hi.abs()))


def logit_range(centre: torch.Tensor, radius: torch.Tensor,
                boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K, n) each: the smallest and largest value of each logit over its sub-box."""
    ranges = logit_ranges(centre, radius, boxes)
    return ranges.lo, ranges.hi


def logit_slack(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """(N, K, n) magnitude bound max(|lower|, |upper|) of each logit over its sub-box."""
    return logit_ranges(centre, radius, boxes).mag


def difference_forms(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor,
                     ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centre/radius forms of d_i = h_i − h_ref, slack included; exactly 0 at the reference.

    ``centre`` (N, 3, K, n) and ``radius`` (N, 1 or 3, K, n) are the logit forms.
    """
    mag = logit_slack(centre, radius, boxes)
    mag_ref = mag.gather(2, ref[:, :, None])
    dc = centre - _gather_cells(centre, ref)
    dr = radius + _gather_cells(radius, ref)
    dr[:, 0] += LOGIT_SLACK * (1.0 + mag + mag_ref)
    at_ref = torch.zeros_like(mag, dtype=torch.bool).scatter_(2, ref[:, :, None], True)
    dc = dc.masked_fill(at_ref[:, None], 0.0)
    dr = dr.masked_fill(at_ref[:, None], 0.0)
    return dc, dr


#: Cells per heatmap that keep their θ-forms in the coupled soft-argmax bound.
SIGNIFICANT = 64


def _groups(coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct coordinate values (ascending) and each cell's group index."""
    values, index = torch.unique(coords, sorted=True, return_inverse=True)
    return values, index


def _group_sum(w: torch.Tensor, index: torch.Tensor, n_groups: int) -> torch.Tensor:
    """Sum the last axis of ``w`` into ``n_groups`` bins."""
    out = torch.zeros(*w.shape[:-1], n_groups, dtype=w.dtype, device=w.device)
    return out.index_add_(-1, index, w)


def _prefix_configs(top: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """Σ_{j<k} top_j + Σ_{j>=k} rest_j for k = 0..m along the last axis."""
    zero = torch.zeros_like(top[..., :1])
    head = torch.cat([zero, torch.cumsum(top, -1)], -1)
    tail = torch.cat([torch.flip(torch.cumsum(torch.flip(rest, [-1]), -1), [-1]), zero], -1)
    return head + tail


def lfp_max(dl: torch.Tensor, du: torch.Tensor, coords: torch.Tensor) -> torch.Tensor:
    """Exact max of Σ w_i c_i / Σ w_i over w_i ∈ [e^{dl_i}, e^{du_i}]; rows (..., n) → (...).

    The optimum takes the upper weight on the cells above the optimal value and the lower
    weight below it. Cells with equal coordinates always sit on the same side, so they are
    summed first (one heatmap column per u value); then the best of the prefix configurations
    in coordinate order is the exact maximum.
    """
    values, index = _groups(coords)
    g = values.shape[0]
    # Shift by the largest lower bound: every configuration then has a weight >= 1, so
    # weights that underflow (< 1e-308) cannot matter; rows that would overflow get no bound.
    shift = dl.max(-1, keepdim=True).values
    hopeless = (du - shift).max(-1).values > 690.0
    wu = _group_sum(torch.exp(torch.clamp(du - shift, max=690.0)), index, g).flip(-1)
    wl = _group_sum(torch.exp(dl - shift), index, g).flip(-1)
    c = values.flip(0)
    num = _prefix_configs(wu * c, wl * c)
    den = _prefix_configs(wu, wl)
    val = torch.where(den > 0, num / torch.where(den > 0, den, 1.0), torch.inf)
    best = torch.where(hopeless, torch.inf, val.max(-1).values)
    return torch.clamp(torch.nan_to_num(best, nan=torch.inf), max=float(c[0]))


def coupled_max(dc: torch.Tensor, dr: torch.Tensor, boxes: torch.Tensor,
                coords: torch.Tensor, max_cells: int = SIGNIFICANT) -> torch.Tensor:
    """Upper bound of soft-argmax along ``coords`` keeping the θ-dependence: (N, K).

    ``dc``/``dr`` are difference forms (N, 3, K, n) / (N, 1 or 3, K, n). The ``max_cells``
    cells with the largest upper bounds keep their forms; the others enter with their interval
    bounds, summed per coordinate value. The feasibility test carries an explicit bound on its
    own float64 error (evaluation of every relaxed exponential plus the prefix sums), because
    a sum of many exponentials can cancel to far below the size of its terms; where that error
    is too large the threshold is simply not accepted.
    """
    up_form = upper(dc, dr)
    lo_form = lower(dc, dr)
    ul, uh = form_range(up_form, boxes)
    ll, lh = form_range(lo_form, boxes)
    n = uh.shape[-1]
    m = min(max_cells, n)
    shift = uh.max(-1, keepdim=True).values  # >= 0: the reference difference is 0
    idx = uh.topk(m, -1).indices  # (N, K, m)
    rest = torch.ones_like(uh, dtype=torch.bool).scatter_(-1, idx, False)
    values, index = _groups(coords)
    g = values.shape[0]
    # Cells without forms: weights in [e^{ll}, e^{uh}], summed per coordinate value.
    rest_up = _group_sum(torch.where(rest, torch.exp(uh - shift), 0.0), index, g)
    rest_lo = _group_sum(torch.where(rest, torch.exp(ll - shift), 0.0), index, g)
    gather3 = idx[:, None].expand(-1, 3, -1, -1)
    up_form = up_form.gather(3, gather3)
    lo_form = lo_form.gather(3, gather3)
    ul, uh, ll, lh = (t.gather(-1, idx) for t in (ul, uh, ll, lh))
    a = torch.exp(ul - shift)
    b = torch.exp(uh - shift)
    width = uh - ul
    slope = torch.where(width > 0, (b - a) / torch.where(width > 0, width, 1.0), b)
    # Chord of exp over [ul, uh] applied to the upper form: a + slope·(U(θ) − ul).
    up_rel = up_form.clone()
    up_rel[:, 0] -= ul
    up_c = a[:, None] + slope[:, None] * form_corners(up_rel, boxes)
    up_err = a[:, None] + slope[:, None] * (_abs_corners(up_rel, boxes) + ul.abs()[:, None])
    # Tangent of exp at p applied to the lower form: e^p·(1 + L(θ) − p), a lower bound.
    p = 0.5 * (ll + lh)
    ep = torch.exp(p - shift)
    lo_rel = lo_form.clone()
    lo_rel[:, 0] -= p
    lo_c = ep[:, None] * (1.0 + form_corners(lo_rel, boxes))
    lo_err = ep[:, None] * (1.0 + _abs_corners(lo_rel, boxes) + p.abs()[:, None])
    # Merge kept cells and per-value remainders, ordered by coordinate (descending).
    n_rows = up_c.shape[0]
    k = up_c.shape[2]
    c_all = torch.cat([coords[idx], values.expand(n_rows, k, g)], -1)
    c, order = torch.sort(c_all, dim=-1, descending=True, stable=True)
    n_c = up_c.shape[1]  # corners
    order4 = order[:, None].expand(-1, n_c, -1, -1)

    def merged(kept: torch.Tensor, grouped: torch.Tensor) -> torch.Tensor:
        both = torch.cat([kept, grouped[:, None].expand(-1, n_c, -1, -1)], -1)
        return both.gather(-1, order4)

    up_all = merged(up_c, rest_up)
    lo_all = merged(lo_c, rest_lo)
    err_up = merged(up_err + up_c.abs(), 2.0 * rest_up)
    err_lo = merged(lo_err + lo_c.abs(), 2.0 * rest_lo)
    return _smallest_threshold(up_all, lo_all, err_up, err_lo, c, values, n)


def _smallest_threshold(up_all: torch.Tensor, lo_all: torch.Tensor, err_up: torch.Tensor,
                        err_lo: torch.Tensor, c: torch.Tensor, values: torch.Tensor,
                        n: int, extra: tuple | None = None) -> torch.Tensor:
    """Smallest t with ``Σ_i w_i(θ)·(c_i − t) ≤ 0`` for all θ of each sub-box: (N, K).

    Entries are ordered by coordinate ``c`` (descending, (N, K, m)); ``up_all``/``lo_all``
    (N, C, K, m) are each weight's upper/lower affine bound at the sub-box's C corners
    (with one configuration of upper and lower bounds fixed the sum is affine in θ, so the
    corners decide), ``err_up``/``err_lo`` the magnitudes that bound their float64 error.
    Configuration k (the first k entries on their upper bound) is exact for t in
    [c[k], c[k − 1]]; one prefix scan tries every k.

    ``extra`` = (a, b_pos, b_neg, t0), each (N, K): a term the sum has on top, bounded by
    a − (t − t0)·b_pos for t ≥ t0 and a − (t − t0)·b_neg for t ≤ t0 (a sum Σ (c_i − t)·δ_i
    over cells whose moments about t0 are known to lie in intervals: :class:`WindowMoments`).
    """
    c4 = c[:, None]
    p0 = _prefix_configs(up_all, lo_all)  # (N, 4 corners, K, m + 1)
    p1 = _prefix_configs(up_all * c4, lo_all * c4)
    err = _prefix_configs(err_up, err_lo)
    cmin, cmax = float(values[0]), float(values[-1])
    eps = 2.0 ** -52 * (n + 16)
    inf = torch.full_like(c[..., :1], torch.inf)
    t_lo = torch.cat([c, -inf], -1).clamp(min=cmin)
    t_hi = torch.cat([inf, c], -1).clamp(max=cmax)
    if extra is None:
        return torch.clamp(_feasible_min(p0, p1, err, t_lo, t_hi, cmin, cmax, eps), max=cmax)
    a, b_pos, b_neg, t0 = (t[:, None, :, None] for t in extra)
    err = err + a.abs() + (t0.abs() + 1.0) * torch.maximum(b_pos.abs(), b_neg.abs())
    # t ≥ t0 and t ≤ t0 separately: the extra term is affine in t on each side.
    t0 = t0[:, 0]
    best = torch.minimum(
        _feasible_min(p0 + b_pos, p1 + a + t0[:, None] * b_pos, err, torch.maximum(t_lo, t0),
                      t_hi, cmin, cmax, eps),
        _feasible_min(p0 + b_neg, p1 + a + t0[:, None] * b_neg, err, t_lo,
                      torch.minimum(t_hi, t0), cmin, cmax, eps))
    return torch.clamp(best, max=cmax)


def _feasible_min(p0: torch.Tensor, p1: torch.Tensor, err: torch.Tensor, t_lo: torch.Tensor,
                  t_hi: torch.Tensor, cmin: float, cmax: float, eps: float) -> torch.Tensor:
    """Smallest t in some [t_lo, t_hi] with p1 − t·p0 + margin ≤ 0 at every corner: (N, K).

    The margin bounds the float64 error of the computed sum and the exponentials that
    underflowed to zero; +inf where no configuration is feasible.
    """
    p1 = p1 + 2.0 * max(abs(cmin), abs(cmax)) * eps * err + UNDERFLOW
    pos = p0 > 0
    neg = p0 < 0
    ratio = p1 / torch.where(pos | neg, p0, 1.0)
    need_lo = torch.where(pos, ratio, -torch.inf).max(1).values
    need_hi = torch.where(neg, ratio, torch.inf).min(1).values
    blocked = ((p0 == 0) & (p1 > 0)).any(1) | torch.isnan(ratio).any(1)
    t = torch.maximum(need_lo, t_lo)
    feasible = (t <= torch.minimum(need_hi, t_hi)) & ~blocked
    return torch.where(feasible, t, torch.inf).min(-1).values


def _abs_corners(form: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """|c0| + |cα·α| + |cβ·β| at the corners: the scale of a corner value's rounding.

    The same corners as :func:`~.forms.form_corners` on ``boxes`` (|box| may be flatter).
    """
    return form_corners(form.abs(), boxes.abs(), corner_columns(boxes))


def soft_argmax_bounds(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor,
                       grid: tuple[torch.Tensor, torch.Tensor], *,
                       coupled: bool = True) -> torch.Tensor:
    """(N, K, 4) [u_lo, u_hi, v_lo, v_hi] in heatmap cells bounding soft-argmax per sub-box."""
    ref = reference_cells(centre, boxes)
    dc, dr = difference_forms(centre, radius, boxes, ref)
    dl = form_range(lower(dc, dr), boxes)[0]
    du = form_range(upper(dc, dr), boxes)[1]
    out = []
    for coords in grid:
        for sign in (-1.0, 1.0):
            cs = coords * sign
            best = lfp_max(dl, du, cs)
            if coupled and dc.shape[1] == 3:
                # Where the interval program already gives nothing, so will the coupled one.
                rows = best < float(cs.max())
                if bool(rows.any()):
                    sub = rows.any(1)
                    tight = coupled_max(dc[sub], dr[sub], boxes[sub], cs)
                    best[sub] = torch.minimum(best[sub], tight)
            out.append(sign * (best + COORD_SLACK))
    lo_u, hi_u, lo_v, hi_v = out
    return torch.stack([lo_u, hi_u, lo_v, hi_v], -1)


def _relu_weight_corners(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor,
                         mag: torch.Tensor | None = None,
                         scale: torch.Tensor | None = None,
                         relu: bool = True) -> tuple[torch.Tensor, ...]:
    """Upper/lower affine bounds of r_i = relu(h_i) at the sub-box corners, with error scales.

    Returns ``(up_c, lo_c, up_err, lo_err)``, each (N, C, K, n) (C corners,
    :func:`~.forms.form_corners`). The rounding slack of the
    logits is relative to the heatmap's largest logit magnitude (centroids ignore the scale).
    Everything is per cell, so a caller that needs only some cells may pass their gathered
    forms with their magnitudes ``mag`` and the whole heatmap's ``scale`` (N, K, 1). With
    ``relu`` False the forms' own bounds (cells known to be positive: relu is the identity).
    """
    if mag is None:
        mag = logit_slack(centre, radius, boxes)
    if scale is None:
        scale = mag.amax(-1, keepdim=True)
    radius = radius.clone()
    radius[:, 0] += LOGIT_SLACK * (mag + scale)
    if relu:
        centre, radius, _ = relu_forms(centre, radius, boxes, 'parallel')
    up_form, lo_form = upper(centre, radius), lower(centre, radius)
    up_c = form_corners(up_form, boxes)  # (N, C, K, n)
    lo_c = form_corners(lo_form, boxes)
    up_err = _abs_corners(up_form, boxes) + up_c.abs()
    lo_err = _abs_corners(lo_form, boxes) + lo_c.abs()
    return up_c, lo_c, up_err, lo_err


def _vanishing(lo_c: torch.Tensor, lo_err: torch.Tensor,
               extra: torch.Tensor | None = None) -> torch.Tensor:
    """(N, K) where the summed lower weights may be ≤ 0 at some corner (rounding included).

    ``extra`` (N, K): a lower bound of more mass on top (:class:`WindowMoments`' Σ δ).
    """
    eps = 2.0 ** -52 * (lo_c.shape[-1] + 16)
    mass, err = lo_c.sum(-1), lo_err.sum(-1)
    if extra is not None:
        mass, err = mass + extra[:, None], err + extra.abs()[:, None]
    return ((mass - 2.0 * eps * err) <= 0).any(1)


def centroid_bounds(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor,
                    grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(N, K, 4) box in heatmap cells bounding the ``centroid`` readout per sub-box.

    The weights r_i = relu(h_i) get affine bounds in θ from the ReLU relaxation of the logit
    forms (slack included), and ``centroid ≤ t`` for all θ iff ``Σ_i r_i(θ)·(c_i − t) ≤ 0``
    (when the mass Σ r_i is positive): the same threshold scan as the coupled soft-argmax
    bound, with no exponential to relax. For a homogeneous network without clipping the
    forms are exact and so is the bound. Where the mass may vanish the readout may fall back
    to argmax, so the argmax box is joined in.
    """
    up_c, lo_c, up_err, lo_err = _relu_weight_corners(centre, radius, boxes)
    n = up_c.shape[-1]
    may_vanish = _vanishing(lo_c, lo_err)  # (N, K)
    out = []
    for coords in grid:
        for sign in (-1.0, 1.0):
            values, index = _groups(coords * sign)
            g = values.shape[0]
            # Group per coordinate value, in descending coordinate order.
            grouped = [_group_sum(t, index, g).flip(-1) for t in (up_c, lo_c, up_err, lo_err)]
            c = values.flip(0).expand(up_c.shape[0], up_c.shape[2], g)
            best = _smallest_threshold(*grouped, c, values, n)
            out.append(sign * (best + COORD_SLACK))
    bounds = torch.stack(out, -1)
    if bool(may_vanish.any()):
        fallback = argmax_bounds(centre, radius, boxes, grid)
        bounds = torch.where(may_vanish[..., None], _hull(bounds, fallback), bounds)
    return bounds


def _hull(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Smallest [u_lo, u_hi, v_lo, v_hi] boxes holding both ``a`` and ``b`` (..., 4)."""
    return torch.stack([torch.minimum(a[..., 0], b[..., 0]), torch.maximum(a[..., 1], b[..., 1]),
                        torch.minimum(a[..., 2], b[..., 2]), torch.maximum(a[..., 3], b[..., 3])],
                       -1)


def _intersect(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Largest [u_lo, u_hi, v_lo, v_hi] boxes inside both ``a`` and ``b`` (..., 4)."""
    return torch.stack([torch.maximum(a[..., 0], b[..., 0]), torch.minimum(a[..., 1], b[..., 1]),
                        torch.maximum(a[..., 2], b[..., 2]), torch.minimum(a[..., 3], b[..., 3])],
                       -1)


#: Most argmax candidates per keypoint and sub-box that get their own window bound; with
#: more, the local centroid is bounded by the candidates' bounding box grown by the radius.
LOCAL_CANDIDATES = 16


class LocalWindows(NamedTuple):
    """Each keypoint's argmax candidates and their local-centroid windows, per sub-box.

    ``count``, ``few`` (N, K): the candidates, and whether they are at most
    :data:`LOCAL_CANDIDATES`; ``cand``, ``valid`` (N, K, L): the first L candidates' flat cells
    (padding flagged invalid, and all of a row without ``few``); ``grown`` (N, K, 4): the
    candidates' box grown by the window, clipped to the heatmap; ``cells``, ``inside``
    (N, K, L, m): each candidate's window cells, row-major (0 where off the heatmap);
    ``scale`` (N, K, 1): the heatmap's largest logit magnitude (the rounding slack's scale).
    """

    count: torch.Tensor
    few: torch.Tensor
    cand: torch.Tensor
    valid: torch.Tensor
    grown: torch.Tensor
    cells: torch.Tensor
    inside: torch.Tensor
    scale: torch.Tensor

    def expand(self, n: int) -> LocalWindows:
        """The same windows for ``n`` sub-boxes (from one: a box holding all of them)."""
        return LocalWindows(*(t.expand(n, *t.shape[1:]) for t in self))


def local_windows(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor,
                  grid: tuple[torch.Tensor, torch.Tensor], window: int = LOCAL_RADIUS,
                  ranges: LogitRanges | None = None) -> LocalWindows:
    """The local-centroid readout's windows per sub-box: around every possible argmax.

    Candidates found over a box are candidates over every box inside it, so the windows of
    a box that holds several sub-boxes serve each of them (:meth:`LocalWindows.expand`),
    with the heatmap's scale bounded over the larger box too.
    """
    gu, gv = grid
    width = int(gu.max().item()) + 1
    height = int(gv.max().item()) + 1
    if ranges is None:
        ranges = logit_ranges(centre, radius, boxes)
    possible = possible_argmax(centre, radius, boxes, ranges=ranges)  # (N, K, n)
    count = possible.sum(-1)  # (N, K)
    few = count <= LOCAL_CANDIDATES
    n_cand = int(count[few].max()) if bool(few.any()) else 0
    # The first n_cand possible cells of every row (padding flagged invalid).
    cand, valid = _first_cells(possible, n_cand)  # (N, K, L)
    pu, pv = cand % width, cand // width
    if bool(few.all()):  # the candidates' box from the candidates, not the whole heatmap
        cand_box = _cell_box(valid, (pu.to(gu.dtype), pv.to(gv.dtype)))
    else:
        cand_box = _cell_box(possible, grid)
    grown = torch.stack([(cand_box[..., 0] - window).clamp(min=0),
                         (cand_box[..., 1] + window).clamp(max=width - 1),
                         (cand_box[..., 2] - window).clamp(min=0),
                         (cand_box[..., 3] + window).clamp(max=height - 1)], -1)
    valid = valid & few[..., None]
    du, dv = window_offsets(window, centre.device)
    wu = pu[..., None] + du  # (N, K, L, m)
    wv = pv[..., None] + dv
    inside = (wu >= 0) & (wu < width) & (wv >= 0) & (wv < height)
    cells = torch.where(inside, wv * width + wu, 0)
    return LocalWindows(count, few, cand, valid, grown, cells, inside,
                        ranges.mag.amax(-1, keepdim=True))


def local_centroid_bounds(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor,
                          grid: tuple[torch.Tensor, torch.Tensor],
                          window: int = LOCAL_RADIUS,
                          moments: WindowMoments | None = None,
                          windows: LocalWindows | None = None) -> torch.Tensor:
    """(N, K, 4) box in heatmap cells bounding the ``local-centroid`` readout per sub-box.

    For every θ the readout is the relu centre of mass of the window around *some* cell p
    that may be the argmax (:func:`possible_argmax`). For each such p the window's centroid
    is bounded over the whole sub-box by the threshold scan of :func:`centroid_bounds` on
    the window's cells, in coordinates relative to p (so every window shares one grid), and p
    itself is joined where the window's mass may vanish. The certificate is the hull over
    the candidates. With more than :data:`LOCAL_CANDIDATES` candidates it is the candidates'
    bounding box grown by ``window`` cells (every window centroid lies in its window).

    With ``moments`` the window of a sub-box whose only candidate is the keypoint's
    reference argmax takes its stable cells as the interpolant's forms plus the moments'
    bounds (:class:`WindowMoments`), where every one of those cells is positive over the
    whole sub-box; the other windows are bounded as without.

    ``windows`` (:func:`local_windows`, computed by the caller, e.g. once over a box that holds
    every sub-box): then ``centre`` and ``radius`` are the forms on ``windows.cells`` only,
    (N, 3, K, L·m) and (N, 1, K, L·m), and the whole heatmap is never read.
    """
    if windows is None:
        ranges = logit_ranges(centre, radius, boxes)
        windows = local_windows(centre, radius, boxes, grid, window, ranges)
        if not bool(windows.few.any()):
            return windows.grown
        flat = windows.cells.flatten(2)  # (N, K, L·m)
        centre, radius = _gather_many(centre, flat), _gather_many(radius, flat)
        low, mag_w = ranges.lo.gather(2, flat), ranges.mag.gather(2, flat)
    else:
        if not bool(windows.few.any()):
            return windows.grown
        if windows.cells.shape[-1] != (2 * window + 1) ** 2:
            raise ValueError(f'windows of {windows.cells.shape[-1]} cells are not the '
                             f'{2 * window + 1}x{2 * window + 1} window')
        low, _, mag_w = logit_ranges(centre, radius, boxes)[1:]
    count, few, cand, valid, grown, cells, inside, scale = windows
    gu, gv = grid
    width = int(gu.max().item()) + 1
    pu, pv = cand % width, cand // width
    du, dv = window_offsets(window, centre.device)
    n_rows, k_kp, n_l, m = cells.shape
    # The relu weights are per cell: bound them on the window cells only.
    weights = _relu_weight_corners(centre, radius, boxes, mag_w, scale)
    extra = mass = None
    if moments is not None:
        stable = _moment_cells(moments, low - LOGIT_SLACK * (mag_w + scale), count, cand,
                               inside, few)
        use = stable.any(-1).any(-1)  # (N, K): windows that take the moments
        if bool(use.any()):
            # The moments' window is the first candidate's (the only one where used).
            first = mag_w.view(n_rows, k_kp, n_l, m)[:, :, 0]
            exact = _relu_weight_corners(moments.centre, moments.radius, boxes, first, scale,
                                         relu=False)
            take = stable[:, None, :, 0]  # (N, 1, K, m): only the first window has them

            def placed(e: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
                out = w.view(n_rows, -1, k_kp, n_l, m).clone()
                out[:, :, :, 0] = torch.where(take, e, out[:, :, :, 0])
                return out.view(w.shape)

            weights = tuple(placed(e, w) for e, w in zip(exact, weights, strict=True))
            extra, mass = _moment_terms(moments, use, n_l)

    def window_view(t: torch.Tensor) -> torch.Tensor:
        out = t.view(n_rows, -1, k_kp, n_l, m).masked_fill(~inside[:, None], 0.0)
        return out.reshape(n_rows, -1, k_kp * n_l, m)

    up_w, lo_w, up_e, lo_e = (window_view(t) for t in weights)
    vanish = _vanishing(lo_w, lo_e, mass).view(n_rows, k_kp, n_l)
    # The four scans (u and v, each side) in one batch. The window's offsets are the same
    # values on both axes and symmetric about 0, so every scan shares the coordinates and
    # only the grouped weights differ: on the negative side the groups of −offsets are the
    # positive side's in reverse order (``_groups``: values ascending).
    values, index_u = _groups(du.to(centre.dtype))
    _, index_v = _groups(dv.to(centre.dtype))
    g = values.shape[0]
    scans = []
    for index in (index_u, index_v):
        sums = [_group_sum(t, index, g) for t in (up_w, lo_w, up_e, lo_e)]
        scans.append(sums)  # sign −1: the groups of −offsets, in descending order
        scans.append([t.flip(-1) for t in sums])  # sign +1: descending coordinate order
    grouped = [torch.cat([scan[i] for scan in scans]) for i in range(4)]
    c = values.flip(0).expand(4 * n_rows, k_kp * n_l, g)
    best_all = _smallest_threshold(*grouped, c, values, m, extra).view(4, n_rows, k_kp, n_l)
    out = []
    for d, (base, sign) in enumerate(((pu, -1.0), (pu, 1.0), (pv, -1.0), (pv, 1.0))):
        best = sign * best_all[d]
        # The fallback (the window's own centre p, offset 0) where the mass may vanish.
        zero = torch.zeros_like(best)
        joined = torch.maximum(best, zero) if sign > 0 else torch.minimum(best, zero)
        best = torch.where(vanish, joined, best)
        coord = base.to(centre.dtype) + best + sign * COORD_SLACK
        fill = -torch.inf if sign > 0 else torch.inf
        coord = torch.where(valid, coord, fill)
        out.append(coord.amax(-1) if sign > 0 else coord.amin(-1))
    local = torch.stack(out, -1)
    # Each window's centroid also lies inside the window (clipped to the heatmap).
    return torch.where(few[..., None], _intersect(local, grown), grown)


def _moment_cells(moments: WindowMoments, low: torch.Tensor, count: torch.Tensor,
                  cand: torch.Tensor, inside: torch.Tensor, few: torch.Tensor) -> torch.Tensor:
    """(N, K, L, m) the window cells that enter the scan through ``moments``.

    A window takes them where its candidate is the keypoint's only one and the peak the
    moments were taken around, and every stable cell's lower bound ``low`` (N, K, L·m,
    slack included) is positive on the sub-box (relu is then the identity on all of them, so
    the moments are the sums the scan needs); otherwise none of its cells does.
    """
    n_rows, k_kp, n_l, m = inside.shape
    stable = torch.zeros_like(inside)
    if n_l == 0:
        return stable
    first = moments.stable[None] & inside[:, :, 0]  # (N, K, m)
    positive = (low.view(n_rows, k_kp, n_l, m)[:, :, 0] > 0) | ~first
    use = few & (count == 1) & (cand[..., 0] == moments.peak[None]) & positive.all(-1)
    use &= ~(moments.stable[None] & ~inside[:, :, 0]).any(-1)  # every summed cell is read
    stable[:, :, 0] = first & use[..., None]
    return stable


def _moment_terms(moments: WindowMoments, use: torch.Tensor, n_l: int) -> tuple:
    """The moments as the four scans' extra terms and the mass's lower bound.

    Scan d (u −, u +, v −, v +) has coordinates σ·Δ and the anchor σ·a: with
    G = Σ (Δ − a)·δ, Σ δ_i·(σΔ_i − t) = σ·G − (t − σa)·Σ δ, at most U(σG) − (t − σa)·L(Σ δ)
    for t ≥ σa and U(σG) − (t − σa)·U(Σ δ) below. Returns ((a, b_pos, b_neg, t0) each
    (4·N, K·L), mass (N, K·L)); zero where ``use`` is False and on every window but the first.
    """
    lo, hi = moments.lo, moments.hi  # (N, K, 3): Σ δ, Σ (Δu − a_u)·δ, Σ (Δv − a_v)·δ
    a = torch.stack([-lo[..., 1], hi[..., 1], -lo[..., 2], hi[..., 2]])  # (4, N, K)
    b_pos = lo[..., 0].expand(4, -1, -1)
    b_neg = hi[..., 0].expand(4, -1, -1)
    au, av = moments.anchor[:, 0], moments.anchor[:, 1]  # (K,)
    t0 = torch.stack([-au, au, -av, av])[:, None].expand(-1, lo.shape[0], -1)

    def windows(t: torch.Tensor) -> torch.Tensor:
        out = t.new_zeros((*t.shape, n_l))
        out[..., 0] = torch.where(use, t, 0.0)
        return out.reshape(t.shape[0], -1) if t.ndim == 2 else out.reshape(-1, t.shape[-1] * n_l)

    return tuple(windows(t) for t in (a, b_pos, b_neg, t0)), windows(lo[..., 0])


def _gather_many(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Gather cells: t (N, k, K, n), idx (N, K, S) → (N, k, K, S)."""
    return t.gather(3, idx[:, None].expand(-1, t.shape[1], -1, -1))


def _first_cells(mask: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices (N, K, count) of the first ``count`` set cells of each row, and which are set.

    The set cells come in index order (a stable sort's first ones); the rest of a row is
    padding, index 0 and flagged unset. One pass finds every set cell (``nonzero``), which
    costs far less than sorting or ranking whole heatmaps when few cells are set.
    """
    *lead, n = mask.shape
    flat = mask.reshape(-1, n)
    index = torch.zeros((flat.shape[0], count), dtype=torch.long, device=mask.device)
    valid = torch.zeros((flat.shape[0], count), dtype=torch.bool, device=mask.device)
    if count:
        row, col = flat.nonzero(as_tuple=True)  # row-major: each row's cells in order
        per_row = flat.sum(-1)
        first = torch.cumsum(per_row, 0) - per_row
        pos = torch.arange(row.shape[0], device=mask.device) - first[row]
        keep = pos < count
        row, pos = row[keep], pos[keep]
        index[row, pos] = col[keep]
        valid[row, pos] = True
    return index.view(*lead, count), valid.view(*lead, count)


#: Most form elements (sub-boxes × form terms × keypoints × survivors × witnesses) that
#: possible_argmax compares in one batch; beyond, one witness at a time (bounded memory).
WITNESS_BATCH = 1 << 18


def possible_argmax(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor, *,
                    witnesses: int = 4, ranges: LogitRanges | None = None) -> torch.Tensor:
    """(N, K, n) mask of the cells that may be the argmax somewhere in each sub-box.

    Cell i is excluded when a witness j (the reference cell and the ``witnesses`` best lower
    bounds at the box centre) satisfies min_θ (h_j − h_i)(θ) > slack. The comparison of
    concrete ranges, min h_j − max h_i > slack, implies that test and costs nothing per θ, so it
    runs first on the whole heatmap (all witnesses at once: cell i survives unless its
    max h_i + s·mag_i lies below some witness's min h_j − s·(scale + mag_j)) and the forms
    are compared on the survivors only: the mask is the same as testing every cell with forms.
    ``ranges`` is :func:`logit_ranges`, when the caller has it.
    """
    if ranges is None:
        ranges = logit_ranges(centre, radius, boxes)
    mid, lo, hi, mag = ranges
    k = min(witnesses, centre.shape[-1])
    # The best lower bounds at the box centre: C − R there (R's θ-terms when it has them).
    low_mid = mid - form_at(radius, _box_centres(boxes))
    cand = torch.cat([mid.argmax(-1, keepdim=True), low_mid.topk(k, -1).indices], -1)
    scale = mag.amax(-1, keepdim=True)
    # Argmax ignores the heatmap's scale: the slack is relative to its largest logit.
    mag_w = mag.gather(2, cand)  # (N, K, W)
    beat = (lo.gather(2, cand) - LOGIT_SLACK * (scale + mag_w)).amax(-1, keepdim=True)
    survive = hi.add(mag, alpha=LOGIT_SLACK) >= beat
    n_keep = int(survive.sum(-1).max())
    idx, valid = _first_cells(survive, n_keep)  # (N, K, S)
    c_i, r_i, mag_i = _gather_many(centre, idx), _gather_many(radius, idx), mag.gather(2, idx)
    possible = valid.clone()
    if centre.shape[1] * idx.numel() * cand.shape[-1] <= WITNESS_BATCH:
        # Every witness at once (witness × survivor pairs): a few operations instead of a
        # dozen per witness, the same values.
        gap = lower(_gather_many(centre, cand)[..., None] - c_i[..., None, :],
                    _gather_many(radius, cand)[..., None] + r_i[..., None, :])
        slack = LOGIT_SLACK * (scale[..., None] + mag_i[..., None, :] + mag_w[..., None])
        possible &= ~(form_range(gap, boxes)[0] > slack).any(-2)
    else:
        for w in range(cand.shape[-1]):
            j = cand[..., w]
            gap = lower(_gather_cells(centre, j) - c_i, _gather_cells(radius, j) + r_i)
            slack = LOGIT_SLACK * (scale + mag_i + mag_w[..., w:w + 1])
            possible &= ~(form_range(gap, boxes)[0] > slack)
    # Padding goes to a spare last column, dropped after: it cannot overwrite a real cell.
    n = survive.shape[-1]
    out = survive.new_zeros((*survive.shape[:-1], n + 1))
    return out.scatter_(2, torch.where(valid, idx, n), possible)[..., :n]


def _cell_box(mask: torch.Tensor, grid: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """(N, K, 4) bounding box [u_lo, u_hi, v_lo, v_hi] of the cells in ``mask`` (N, K, n)."""
    gu, gv = grid
    inf = torch.tensor(torch.inf, dtype=gu.dtype, device=gu.device)
    u_lo = torch.where(mask, gu, inf).min(-1).values
    u_hi = torch.where(mask, gu, -inf).max(-1).values
    v_lo = torch.where(mask, gv, inf).min(-1).values
    v_hi = torch.where(mask, gv, -inf).max(-1).values
    return torch.stack([u_lo, u_hi, v_lo, v_hi], -1)


def argmax_bounds(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor,
                  grid: tuple[torch.Tensor, torch.Tensor], *, witnesses: int = 4) -> torch.Tensor:
    """(N, K, 4) box in heatmap cells holding every cell that may be the argmax per sub-box."""
    return _cell_box(possible_argmax(centre, radius, boxes, witnesses=witnesses), grid)

"""Clip-threshold coordinates: exact inputs for homogeneous networks and scale-free readouts.

With τ = −β/α and κ = (1 − β)/α (the input values at which the camera clips to 0 and to 1),

    clip(α·x + β, 0, 1) = α · (clip(x, τ, κ) − τ)        for every pixel value x, α > 0.

A network without any bias or shift and with ReLUs is positively homogeneous, so its heatmaps
on the perturbed image are α times its heatmaps on ``u(τ, κ) = clip(x, τ, κ) − τ``, and a
readout that ignores the heatmap's scale (``centroid``, ``argmax``) reads the same keypoints
from both. Bounding that readout over the (τ, κ) box that covers Θ therefore certifies Θ.

Why bother: in (τ, κ) every pixel value's switching lines are axis-aligned (x = τ, x = κ) and
every unclipped pixel is a constant. Cutting a sub-box at the pixel values inside it makes the
network input exactly affine in (τ, κ) on each piece, with no relaxation at all, whereas in
(α, β) the clip lines of different values cross every sub-box diagonally.
"""

from __future__ import annotations

import math

import torch

from usn_perception.bounds.box import PhotometricBox
from usn_perception.bounds.layers import AffineOp, CompiledNetwork, LinearOp

#: Readouts that are invariant to scaling every heatmap by the same α > 0.
SCALE_FREE_READOUTS = ('centroid', 'local-centroid', 'argmax')


def is_homogeneous(net: CompiledNetwork) -> bool:
    """True when every op is linear without bias, a shift-free scale, or ReLU.

    Checked on the compiled ops (BatchNorm folded, in float64), exactly: a single non-zero
    bias or shift anywhere breaks ``net(α·u) = α·net(u)``.
    """
    for op in net.ops:
        if isinstance(op, LinearOp):
            if op.bias is not None and bool((op.bias != 0).any()):
                return False
        elif isinstance(op, AffineOp):
            if bool((torch.as_tensor(op.shift) != 0).any()):
                return False
    return True


def threshold_row(box: PhotometricBox) -> torch.Tensor | None:
    """(1, 4) [τ_lo, τ_hi, κ_lo, κ_hi] covering Θ (rounded outward), or None if unusable.

    τ and κ are monotone in α and in β on the box, so their extremes are at its corners. None
    when β can reach 1 (κ undefined) or the two ranges overlap (a pixel could then be clipped
    at both ends within one sub-box, which the input relaxation does not handle).
    """
    if box.beta[1] >= 1.0:
        return None
    taus = [-b / a for a, b in box.corners()]
    kappas = [(1.0 - b) / a for a, b in box.corners()]
    row = [min(taus), max(taus), min(kappas), max(kappas)]
    if not box.is_point:
        # A θ point stays a (τ, κ) point: its rounding is an input-stage ulp, which the logit
        # slack covers exactly as it covers the rounding of α·x + β itself.
        row = [math.nextafter(row[0], -math.inf), math.nextafter(row[1], math.inf),
               math.nextafter(row[2], -math.inf), math.nextafter(row[3], math.inf)]
    if not row[1] < row[2]:
        return None
    return torch.tensor([row], dtype=torch.float64)


def _inside(boxes: torch.Tensor, values: torch.Tensor,
            weights: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Per axis, (n, V) masks of the values strictly inside each sub-box's interval; weights."""
    v = values[None, :]
    w = torch.where(weights > 0, weights, torch.zeros_like(weights))[None, :]
    inside = [(v > boxes[:, 2 * d:2 * d + 1]) & (v < boxes[:, 2 * d + 1:2 * d + 2])
              for d in (0, 1)]
    return inside, w


def present_range(values: torch.Tensor, weights: torch.Tensor) -> tuple[float, float]:
    """(smallest, largest) pixel value present in the image (positive resize weight)."""
    present = values[weights > 0]
    return float(present.min()), float(present.max())


def free_mask(boxes: torch.Tensor, values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n,) bool: no present pixel value is clipped anywhere on the (τ, κ) sub-box.

    There the input is ``x − τ`` for every τ in the sub-box: a constant image minus a constant,
    which a homogeneous network with a zero-sum first filter maps to the nominal heatmaps. Such
    a *free* sub-box needs no propagation (:func:`usn_perception.bounds.free.free_forms`).
    """
    v_min, v_max = present_range(values, weights)
    return (boxes[:, 1] <= v_min) & (boxes[:, 2] >= v_max)


def carve_free(root: torch.Tensor, values: torch.Tensor,
               weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split ``root`` (1, 4) into its free part and the rest: ((0 or 1, 4), (0 to 2, 4)).

    The free part is ``[τ_lo, v_min] × [v_max, κ_hi]`` (no value clipped: see
    :func:`free_mask`); on a box whose interior holds the identity it is never empty. The rest
    is cut along the same lines (``[v_min, τ_hi] × [κ_lo, κ_hi]`` and
    ``[τ_lo, v_min] × [κ_lo, v_max]``), so the pieces tile the root exactly. No free part:
    ``(empty, root)``.
    """
    v_min, v_max = present_range(values, weights)
    t_lo, t_hi, k_lo, k_hi = (float(v) for v in root[0])
    a, b = min(v_min, t_hi), max(v_max, k_lo)
    empty = root[:0]
    usable_t = a > t_lo or (a == t_lo and t_lo == t_hi)
    usable_k = b < k_hi or (b == k_hi and k_lo == k_hi)
    if not (usable_t and usable_k):
        return empty, root
    free = root.new_tensor([[t_lo, a, b, k_hi]])
    rest = []
    if a < t_hi:
        rest.append([a, t_hi, k_lo, k_hi])
    if b > k_lo:
        rest.append([t_lo, a, k_lo, b])
    return free, root.new_tensor(rest).view(-1, 4)


def ambiguous_mass(boxes: torch.Tensor, values: torch.Tensor,
                   weights: torch.Tensor) -> torch.Tensor:
    """(n,) resize weight of the pixel values that are ambiguous on each (τ, κ) sub-box.

    A value strictly inside the τ or the κ interval is clipped on part of the sub-box only;
    it is the one thing that makes the input stage inexact there. 0 means the network input
    is exactly affine in (τ, κ) on the sub-box. Used to partition a box before bounding it.
    """
    inside, w = _inside(boxes, values, weights)
    return (w * (inside[0] | inside[1])).sum(1)


def threshold_splits(boxes: torch.Tensor, values: torch.Tensor,
                     weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where to cut each (τ, κ) sub-box: (dims (n,), cut positions (n,)).

    Cut the axis whose open interval holds more resize weight of present pixel values, at the
    weighted median value inside it: each child then holds fewer ambiguous values, and a cut
    exactly at a value makes that value exact on both sides. With no value inside either
    interval the input is already exact; bisect the wider axis (ReLUs may still flip).
    """
    inside, w = _inside(boxes, values, weights)
    mass = torch.stack([(w * m).sum(1) for m in inside], 1)  # (n, 2)
    dims = (mass[:, 1] > mass[:, 0]).long()
    widths = torch.stack([boxes[:, 1] - boxes[:, 0], boxes[:, 3] - boxes[:, 2]], 1)
    empty = mass.max(1).values <= 0
    dims = torch.where(empty, (widths[:, 1] > widths[:, 0]).long(), dims)
    chosen = torch.where(dims[:, None] == 1, inside[1], inside[0])
    cum = torch.cumsum(w * chosen, 1)
    half = 0.5 * cum[:, -1:]
    first = torch.argmax(((cum >= half) & chosen).to(torch.int8), 1)
    at = values[first]
    nan = torch.full_like(at, float('nan'))
    return dims, torch.where(empty, nan, at)


def threshold_table(values: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Per value and sub-box: forms of ``u_v(τ, κ) = clip(v, τ, κ) − τ`` as (4N, V) rows.

    Rows are [c0 (N), cτ (N), cκ (N), radius (N)]. Exact unless v lies strictly inside the τ
    or the κ interval; there ``max(v, τ)`` (convex in τ) or ``min(v, κ)`` (concave in κ) is
    relaxed by its chord and the parallel line through the kink, a constant half-width.
    Requires τ_hi < κ_lo on every sub-box (see :func:`threshold_row`).
    """
    v = values[None, :]
    t_lo, t_hi = boxes[:, 0:1], boxes[:, 1:2]
    k_lo, k_hi = boxes[:, 2:3], boxes[:, 3:4]
    zero = torch.zeros_like(v * t_lo)
    one = torch.ones_like(zero)
    # Never clipped on the sub-box: u = v − τ.
    c0, ct, ck, rad = v + zero, -one, zero.clone(), zero.clone()
    # Always clipped low (v <= τ): u = 0.
    low = v <= t_lo
    c0, ct = torch.where(low, zero, c0), torch.where(low, zero, ct)
    # Always clipped high (v >= κ): u = κ − τ.
    high = v >= k_hi
    c0, ck = torch.where(high, zero, c0), torch.where(high, one, ck)
    # Ambiguous low: u = relu(v − τ), slope s = −(v − τ_lo)/(τ_hi − τ_lo) in [−1, 0].
    amb = (v > t_lo) & (v < t_hi)
    span = torch.where(amb, t_hi - t_lo, one)
    s = -(v - t_lo) / span
    gap = (v - t_lo) * (1.0 + s)  # chord minus the parallel line through (v, 0)
    # lower = s·(τ − v) → c0 = −s·v, cτ = s; centre = lower + gap/2.
    c0 = torch.where(amb, -s * v + 0.5 * gap, c0)
    ct = torch.where(amb, s, ct)
    rad = torch.where(amb, 0.5 * gap, rad)
    # Ambiguous high: min(v, κ) − τ, chord slope t = (v − κ_lo)/(κ_hi − κ_lo) in [0, 1].
    amb = (v > k_lo) & (v < k_hi)
    span = torch.where(amb, k_hi - k_lo, one)
    t = (v - k_lo) / span
    gap = (v - k_lo) * (1.0 - t)  # parallel line through (v, v) minus the chord
    # lower = κ_lo + t·(κ − κ_lo) − τ → c0 = κ_lo·(1 − t), cκ = t, cτ = −1.
    c0 = torch.where(amb, k_lo * (1.0 - t) + 0.5 * gap, c0)
    ck = torch.where(amb, t, ck)
    rad = torch.where(amb, 0.5 * gap, rad)
    return torch.cat([c0, ct, ck, rad], 0)

"""Exact bounds of the network's first linear stage in clip-threshold coordinates.

In (τ, κ) coordinates (:mod:`usn_perception.bounds.thresholds`) a source value v enters the
network as ``clip(v, τ, κ) − τ``, which is ``max(v, τ) − τ`` for the values below κ_lo and
``min(v, κ) − τ`` for those above τ_hi (τ_hi < κ_lo on every sub-box). Every network input,
and every neuron z of the linear ops before the first ReLU, is therefore *separable*:

    z(τ, κ) = F(τ) + G(κ),

with F piecewise linear in τ, kinked only at the pixel values inside (τ_lo, τ_hi), and G the
same in κ. Evaluating the linear stage at those breakpoints gives F and G exactly; the chord
of each and the extreme deviations from it (attained at breakpoints) give an affine form in
(τ, κ) plus a constant radius that contains z on the whole sub-box and is exact where no
value is ambiguous.

The per-value relaxation of the input stage bounds each clipped pixel on its own and moves
the radii through |W|: it loses every cancellation between pixels and values that a filter
sees together (a zero-mean filter over a uniformly clipped region outputs exactly 0). The
concrete evaluations keep them. Each breakpoint costs one pass of the prefix, so only the
heaviest ambiguous values of a sub-box are breakpoints; the others keep the per-value
relaxation, moved through the prefix and added (the sum of two sound bounds of the two parts
of the input). Measured effect in docs/certification.md ("Exact first stage").
"""

from __future__ import annotations

import torch

from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import AffineOp, CompiledNetwork, LinearOp, apply_point
from usn_perception.bounds.thresholds import present_range

#: Ambiguous pixel values per sub-box that become exact breakpoints (the heaviest ones).
EXACT_VALUES = 12
#: Images per call of the prefix: float64 convolutions get several times slower per image
#: on large batches (their unfolded input falls out of cache).
POINT_CHUNK = 8
#: Axis spans below this get slope 0 (see :func:`_axis_plan`).
SPAN_FLOOR = 1e-9


def linear_prefix(net: CompiledNetwork) -> int:
    """Number of leading ops that are linear or elementwise affine (before the first ReLU)."""
    n = 0
    for op in net.ops:
        if not isinstance(op, (LinearOp, AffineOp)):
            break
        n += 1
    return n


def apply_prefix(net: CompiledNetwork, n_ops: int, x: torch.Tensor,
                 linear: bool = False) -> torch.Tensor:
    """The prefix ops on a concrete batch; ``linear`` drops every bias and shift."""
    for op in net.ops[:n_ops]:
        if not linear:
            x = apply_point(op, x)
        elif isinstance(op, LinearOp):
            x = op.apply(x)
        else:
            x = x * op.scale
    return x


def _apply_abs(net: CompiledNetwork, n_ops: int, x: torch.Tensor) -> torch.Tensor:
    """|W|·x through the prefix's linear part (moves a radius x ≥ 0)."""
    for op in net.ops[:n_ops]:
        if isinstance(op, LinearOp):
            x = op.apply(x) if op.nonneg else op.apply_abs(x)
        else:
            x = x * torch.as_tensor(op.scale).abs()
    return x


def _breakpoints(lo: float, hi: float, values: torch.Tensor) -> torch.Tensor:
    """[lo, ``values`` strictly inside (lo, hi) ascending, hi]; just [lo] for a point."""
    if not hi > lo:
        return values.new_tensor([lo])
    inside = values[(values > lo) & (values < hi)].sort().values
    return torch.cat([values.new_tensor([lo]), inside, values.new_tensor([hi])])


def _split_values(row: tuple[float, ...], enc: ImageEncoding,
                  exact: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(V,) masks: the ambiguous values kept exact (the ``exact`` heaviest) and the rest."""
    t_lo, t_hi, k_lo, k_hi = row
    v, w = enc.values, enc.value_weights
    amb = (w > 0) & (((v > t_lo) & (v < t_hi)) | ((v > k_lo) & (v < k_hi)))
    if int(amb.sum()) <= exact:
        return amb, torch.zeros_like(amb)
    keep = torch.zeros_like(amb)
    keep[torch.where(amb, w, -1.0).topk(exact).indices] = True
    return keep, amb & ~keep


def _axis_plan(points: torch.Tensor,
               inputs: torch.Tensor) -> tuple[torch.Tensor, float, torch.Tensor]:
    """Input-space rise and deviations from the chord along one axis.

    ``points`` (B,) ascending breakpoints, ``inputs`` (B, 1, H, W) the network inputs there.
    Returns ``(rise (1, 1, H, W), 1/span or 0, deviations (D, 1, H, W))``. The prefix is
    affine, so the deviation of its *output* from the chord is its linear part applied to
    these input deviations: the subtraction runs on one channel, not on the wider output.
    A tiny span keeps slope 0 (any slope is sound, the deviations are measured from it; a
    tiny span would only turn rounding of the ends into a huge slope).
    """
    if inputs.shape[0] == 1:
        return torch.zeros_like(inputs), 0.0, inputs[:0]
    span = float(points[-1] - points[0])
    rise = inputs[-1:] - inputs[:1]
    if span > SPAN_FLOOR:
        frac = ((points[1:-1] - points[0]) / span).view(-1, 1, 1, 1)
        return rise, 1.0 / span, inputs[1:-1] - inputs[:1] - frac * rise
    return rise, 0.0, inputs[1:] - inputs[:1]


def _deviation_range(net: CompiledNetwork, n_ops: int,
                     dev_in: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(min, max) over the batch of the prefix's linear part of ``dev_in``, a chunk at a time.

    (Float32 here was measured slower, not faster: the first convolution has one input
    channel, where oneDNN's float32 path costs more than the float64 im2col one.)
    """
    out = None
    for chunk in (dev_in.split(POINT_CHUNK) if dev_in.shape[0] else ()):
        y = apply_prefix(net, n_ops, chunk, linear=True)
        # amin + amax: torch.aminmax over dim 0 is ~10x slower here (torch 2.13, CPU).
        c_lo, c_hi = y.amin(0), y.amax(0)
        if out is not None:
            c_lo, c_hi = torch.minimum(out[0], c_lo), torch.maximum(out[1], c_hi)
        out = (c_lo, c_hi)
    return out


def prefix_forms(enc: ImageEncoding, net: CompiledNetwork, boxes: torch.Tensor, n_ops: int,
                 exact: int = EXACT_VALUES) -> tuple[torch.Tensor, torch.Tensor]:
    """Forms of the output of ``net.ops[:n_ops]`` over (τ, κ) sub-boxes ``boxes`` (N, 4).

    Returns a centre form (N, 3, *shape) in (τ, κ) and a constant radius (N, 1, *shape), in
    the engine's layout, so :func:`~usn_perception.bounds.propagate.propagate` continues
    from op ``n_ops``. ``n_ops`` must not exceed :func:`linear_prefix`. The ``exact``
    heaviest ambiguous values of each sub-box are breakpoints; any others keep the per-value
    relaxation of the input stage (its forms moved through the prefix, radius by |W|), so
    the cost per sub-box stays bounded on boxes that hold many pixel values.

    Floating point: the breakpoint evaluations are the prefix's own dot products at concrete
    inputs, with the same ulp-level error as every other float64 step of the engine; the slack
    on logit differences absorbs it (docs/certification.md, "Floating-point soundness").
    """
    if not 0 < n_ops <= linear_prefix(net):
        raise ValueError(f'n_ops must be in 1..{linear_prefix(net)}, got {n_ops}')
    n = boxes.shape[0]
    rows = [tuple(float(v) for v in row) for row in boxes]
    masks = [_split_values(row, enc, exact) for row in rows]
    keep = torch.stack([m[0] for m in masks])
    relaxed = torch.stack([m[1] for m in masks])  # (N, V)
    # Every breakpoint of every sub-box, evaluated with one gather. Where no present value
    # exceeds κ_lo nothing clips at the top on the sub-box: G(κ) is constant, one point.
    v_max = present_range(enc.values, enc.value_weights)[1]
    axes, taus, kappas, owner = [], [], [], []
    for i, (t_lo, t_hi, k_lo, k_hi) in enumerate(rows):
        t_pts = _breakpoints(t_lo, t_hi, enc.values[keep[i]])
        k_pts = _breakpoints(k_lo, k_lo if v_max <= k_lo else k_hi, enc.values[keep[i]])
        axes.append((t_pts, k_pts))
        taus += [t_pts, torch.full_like(k_pts, t_lo)]
        kappas += [torch.full_like(t_pts, k_lo), k_pts]
        owner.append(torch.full((t_pts.numel() + k_pts.numel(),), i, dtype=torch.long))
    owner_t = torch.cat(owner).to(enc.device)
    inputs = enc.threshold_inputs(torch.cat(taus), torch.cat(kappas), relaxed[owner_t])
    # Per sub-box: the reference input, the two rises and the deviations, in input space.
    refs, rises, inv_spans, devs = [], [], [], []
    start = 0
    for t_pts, k_pts in axes:
        along_t = inputs[start:start + t_pts.numel()]
        along_k = inputs[start + t_pts.numel():start + t_pts.numel() + k_pts.numel()]
        start += t_pts.numel() + k_pts.numel()
        refs.append(along_t[:1])
        for pts, along in ((t_pts, along_t), (k_pts, along_k)):
            rise, inv, dev = _axis_plan(pts, along)
            rises.append(rise)
            inv_spans.append(inv)
            devs.append(dev)
    # The affine part in input space: u0 + (τ − τ_lo)·rise_τ/span_τ + (κ − κ_lo)·rise_κ/span_κ,
    # plus the relaxed values' own forms; the prefix is linear, so one pass moves both.
    inv = torch.tensor(inv_spans, dtype=inputs.dtype, device=inputs.device).view(n, 2, 1, 1, 1)
    slope_in = torch.cat(rises).view(n, 2, *inputs.shape[1:]) * inv
    ref_in = torch.cat(refs) - slope_in[:, 0] * boxes[:, 0].view(-1, 1, 1, 1) - (
        slope_in[:, 1] * boxes[:, 2].view(-1, 1, 1, 1))
    form_in = torch.cat([ref_in[:, None], slope_in], 1)  # (N, 3, 1, H, W)
    some = relaxed.any(1)  # only sub-boxes with more ambiguous values than breakpoints
    r_in = radius = None
    if bool(some.any()):
        c_in, r_in = enc.threshold_forms(boxes[some], only=relaxed[some])
        form_in[some] += c_in
    centre = torch.cat([apply_prefix(net, n_ops, part, linear=True)
                        for part in form_in.flatten(0, 1).split(POINT_CHUNK)])
    centre = centre.view(n, 3, *centre.shape[1:])
    if r_in is not None:
        radius = torch.zeros_like(centre[:, 0])
        radius[some] = _apply_abs(net, n_ops, r_in[:, 0])
    centre[:, 0] += apply_prefix(net, n_ops, torch.zeros_like(inputs[:1]))[0]  # biases
    # Each axis' deviation from its chord: extremes over its breakpoints (the ends are 0);
    # the two axes add.
    shape = centre.shape[2:]
    lo = torch.zeros((n, *shape), dtype=centre.dtype, device=centre.device)
    hi = torch.zeros_like(lo)
    for j, dev_in in enumerate(devs):
        ext = _deviation_range(net, n_ops, dev_in)
        if ext is not None:
            lo[j // 2] += ext[0].clamp_(max=0.0)
            hi[j // 2] += ext[1].clamp_(min=0.0)
    centre[:, 0] += 0.5 * (lo + hi)
    spread = hi.sub_(lo).mul_(0.5)
    radius = spread if radius is None else radius.add_(spread)
    return centre, radius[:, None]

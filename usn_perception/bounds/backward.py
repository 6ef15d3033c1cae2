"""Backward bounds at a readout's few cells: the level pass's deviations, with W's signs.

A level pass (:mod:`.levels`) bounds every neuron's deviation from the nodes' interpolant by a
band per row, o ± r, and a band only grows through |W|: over the default detector's last
layers it grows six to eight times faster than the deviations it bounds, because |W| forgets
the signs with which neighbouring neurons' errors reach a logit. A local-centroid readout
reads a 7×7 window of cells per keypoint, so those few cells are bounded again here by
back-substitution, as CROWN bounds one output: from each cell back through the last
:data:`BACKWARD_RELUS` ReLU layers to the band the level pass computed after the layer before
them (the *start*), keeping the linear maps' signs. Per cell and row,

    x_L = Λ_s·x'_s + Σ_l Λ_l·μ_l + Σ_l Λ'_l·ρ_l,

with x'_s the start band (every neuron), μ_l the output band of each *mixed* neuron of a later
ReLU (a neuron on at every node and band passes its deviation unchanged, one off everywhere
has none: both exactly, so those enter Λ with slope 1 and 0), and ρ_l the nodal values'
float32 rounding at each linear layer (≤ γ_(n+1)·|W|·max_j|D_j|, as the level pass bounds
it). Each term is bounded by its signed coefficients: Σ max(λ, 0)·hi + min(λ, 0)·lo. The
bound holds wherever the level pass's bands hold, whatever the masks of other rows.

Cost: the cotangents run as one batch on crops (a window's cone covers a small part of each
layer): the crops of every keypoint have one size, their origins aligned so that strided and
transposed layers map them alike. A readout that needs only weighted sums of its cells (the
local centroid's moments, :func:`window_functionals`) takes one cotangent per sum, not per
cell, and the sum keeps the signs with which neighbouring cells' deviations cancel.

Floating point: the cotangents run in float32. Each adjoint step rounds within
γ_(n+1)·|Wᵀ|·|g|, so the computed cotangent differs from the exact one by at most
κ·a, with a the |W|-chain of the cells' indicators (run beside them, one image per keypoint)
and κ = Π(1 + γ) − 1 over the steps; every concretisation adds κ·Σ a·|band| (and its own
summation error) to both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from usn_perception.bounds.layers import AffineOp, CompiledNetwork, ConvGeometry, LinearOp
from usn_perception.bounds.rounding import TINY, U32, gamma

#: ReLU layers the backward bound passes through (counted from the output): measured on the
#: default detector's node frames (docs/certification.md, "Backward bounds at the window").
BACKWARD_RELUS = 3


@dataclass
class BackwardTape:
    """What the level pass records for :func:`window_bands` from the start ReLU on.

    ``start``: the rows' band (o, r) (R, C, H, W) after the start ReLU (o None: 0 ± r);
    ``steps``: per later op, in order, ``('linear' | 'affine', op, eps, (H_in, W_in))`` with
    eps (1, C, H, W) the nodal values' rounding bound at its output, or ``('relu', keep,
    positions, o, r)`` with keep (1, C, H, W) the on-mask, positions (3, n) the mixed
    neurons' (channel, y, x) and o, r (R, n) their output bands (o None: 0).
    """

    start: tuple[torch.Tensor | None, torch.Tensor] | None = None
    steps: list = field(default_factory=list)


def start_index(net: CompiledNetwork) -> int | None:
    """Op index of the ReLU whose output band starts the backward bound (None: no ReLU)."""
    relus = [i for i, op in enumerate(net.ops) if not isinstance(op, (LinearOp, AffineOp))]
    if not relus:
        return None
    return relus[max(0, len(relus) - BACKWARD_RELUS - 1)]


@dataclass(frozen=True)
class _Adjoint:
    """One linear op's adjoint on crops: kind 'conv', 'convT' or 'affine'."""

    kind: str
    weight: torch.Tensor  # float32 (conv weights) or (C, 1, 1) scale
    weight_abs: torch.Tensor
    geometry: ConvGeometry | None
    gamma: float


def _adjoints(net: CompiledNetwork, start: int) -> list[_Adjoint | None] | None:
    """Per op after ``start``: its adjoint (None for a ReLU), or None if one is unsupported.

    Supported: convolutions and transposed convolutions with zero padding, unit dilation and
    one group (every layer of the project's detectors), per-channel affine maps.
    """
    key = ('backward-adjoints', start)
    if key in net.memo:
        return net.memo[key]
    out: list[_Adjoint | None] | None = []
    for op in net.ops[start + 1:]:
        if isinstance(op, AffineOp):
            scale = torch.as_tensor(op.scale, dtype=torch.float64).float()
            out.append(_Adjoint('affine', scale, scale.abs(), None, gamma(2, U32)))
        elif isinstance(op, LinearOp):
            geo = op.conv if op.conv is not None else op.conv_transpose
            if (geo is None or geo.groups != 1 or geo.dilation != (1, 1)
                    or geo.padding_mode != 'zeros'):
                out = None
                break
            w = geo.weight.float()
            kind = 'conv' if op.conv is not None else 'convT'
            taps = w.shape[0] * w.shape[2] * w.shape[3] if kind == 'conv' else (
                w.shape[1] * w.shape[2] * w.shape[3])
            out.append(_Adjoint(kind, w, w.abs(), geo, gamma(taps + 1, U32)))
        else:
            out.append(None)
    net.memo[key] = out
    return out


def _alignment(adjoints: list[_Adjoint | None]) -> int | None:
    """Smallest origin modulus at the output that maps every keypoint's crop alike.

    A convolution's adjoint maps an output origin o to s·o − p (the modulus grows by s); a
    transposed one's to ⌈(o + p − k + 1)/s⌉, the same size for every o of one residue mod s
    (the modulus shrinks by s).
    """
    for align in (1, 2, 4, 8, 16, 32, 64):
        mod, ok = align, True
        for adj in reversed(adjoints):
            if adj is None or adj.kind == 'affine':
                continue
            sy, sx = adj.geometry.stride
            if sy != sx:
                return None
            if adj.kind == 'conv':
                mod *= sy
            elif mod % sy:
                ok = False
                break
            else:
                mod //= sy
        if ok:
            return align
    return None


def _crops(full: torch.Tensor, oy: list[int], ox: list[int], h: int, w: int) -> torch.Tensor:
    """(K, N·C, h, w) crops of ``full`` (N, C, H, W) at the K origins, zero outside it."""
    n, c, height, width = full.shape
    flat = full.reshape(1, n * c, height, width)
    out = []
    for y, x in zip(oy, ox, strict=True):
        y0, y1, x0, x1 = max(y, 0), min(y + h, height), max(x, 0), min(x + w, width)
        part = flat[:, :, y0:max(y0, y1), x0:max(x0, x1)]
        if (y0, y1, x0, x1) != (y, y + h, x, x + w):
            part = F.pad(part, (x0 - x, x + w - max(x0, x1), y0 - y, y + h - max(y0, y1)))
        out.append(part)
    return torch.cat(out)


def window_cells(reference: torch.Tensor, window: int,
                 upper: torch.Tensor | None = None) -> list[list[tuple[int, int]]]:
    """Per keypoint, the (v, u) cells of the window around its reference argmax.

    ``reference`` (K, H, W); with ``upper`` (K, H, W) only the cells whose upper bound is
    positive (a relu-weighted readout gives the others weight 0) and the argmax itself.
    """
    k, height, width = reference.shape
    peaks = reference.reshape(k, -1).argmax(1).tolist()
    out = []
    for kp, p in enumerate(peaks):
        v, u = divmod(p, width)
        ys = range(max(0, v - window), min(height, v + window + 1))
        xs = range(max(0, u - window), min(width, u + window + 1))
        if upper is None:
            out.append([(y, x) for y in ys for x in xs])
            continue
        live = (upper[kp, ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1] > 0).tolist()
        out.append([(y, x) for y, row in zip(ys, live, strict=True)
                    for x, keep in zip(xs, row, strict=True) if keep or (y, x) == (v, u)])
    return out


def window_bands(net: CompiledNetwork, tape: BackwardTape, heatmap: tuple[int, int, int],
                 cells: list[list[tuple[int, int]]]) -> tuple | None:
    """Bounds of the logits' deviation at ``cells`` per row: (index (M,), lo (R, M), hi (R, M)).

    ``index`` holds the cells' flat positions k·H·W + v·W + u in the (K, H, W) ``heatmap``;
    lo and hi are float64 and hold for every θ of the row's segments. None when an op on the
    way is unsupported or the crops cannot be aligned.
    """
    k_kp, height, width = heatmap
    weights = [torch.eye(len(c)) for c in cells]
    out = window_functionals(net, tape, heatmap, cells, weights)
    if out is None:
        return None
    index = torch.tensor([k * height * width + v * width + u
                          for k, c in enumerate(cells) for v, u in c], dtype=torch.long)
    return index, *out


def window_functionals(net: CompiledNetwork, tape: BackwardTape, heatmap: tuple[int, int, int],
                       cells: list[list[tuple[int, int]]],
                       weights: list[torch.Tensor]) -> tuple | None:
    """Bounds of linear functionals of the logits' deviation at each keypoint's ``cells``.

    ``weights[k]`` (F_k, n_k) weighs keypoint k's cells; item f of keypoint k is
    Σ_i weights[k][f, i]·δ(cells[k][i]) with δ the logits' deviation from the nodes'
    interpolant. Returns float64 (lo, hi), each (R, ΣF_k), items keypoint by keypoint, that
    hold for every θ of the row's segments; None when an op on the way is unsupported or the
    crops cannot be aligned. One cotangent per item: a readout that needs only a few sums of
    its window cells (the local centroid's moments) pays for those, not for every cell, and
    the signs of the cells' errors cancel in the sum as they do in the network.
    """
    start = start_index(net)
    adjoints = _adjoints(net, start)
    if adjoints is None or tape.start is None or not all(cells):
        return None
    if len(tape.steps) != len(adjoints):
        raise ValueError('backward tape does not match the network')
    align = _alignment(adjoints)
    if align is None:
        return None
    k_kp = heatmap[0]
    # Crop at the heatmap: aligned origins, a size that holds every keypoint's cells.
    spans = [(min(v for v, _ in c), max(v for v, _ in c), min(u for _, u in c),
              max(u for _, u in c)) for c in cells]
    size_y = max(s[1] - s[0] for s in spans) + align
    size_x = max(s[3] - s[2] for s in spans) + align
    oy = [align * (s[0] // align) for s in spans]
    ox = [align * (s[2] // align) for s in spans]
    # Cotangents (B, K, size_y, size_x), channels-last, one item per functional, keypoint by
    # keypoint; the float32 weights are taken as given (small integers here: exact).
    counts = [int(w.shape[0]) for w in weights]
    kp = torch.repeat_interleave(torch.arange(k_kp), torch.tensor(counts))
    g = torch.zeros(kp.shape[0], size_y, size_x, k_kp, dtype=torch.float32)
    first = 0
    for k, (c, w) in enumerate(zip(cells, weights, strict=True)):
        cy = torch.tensor([v - oy[k] for v, _ in c])
        cx = torch.tensor([u - ox[k] for _, u in c])
        g[first:first + counts[k], cy, cx, k] = w.float()
        first += counts[k]
    g = g.permute(0, 3, 1, 2)  # channels-last (N, C, H, W) view
    # The |W|-chain of each keypoint's cells together bounds every item's cotangent error,
    # scaled by the item's largest weight.
    ones = torch.zeros(k_kp, size_y, size_x, k_kp)
    for k, c in enumerate(cells):
        ones[k, [v - oy[k] for v, _ in c], [u - ox[k] for _, u in c], k] = 1.0
    a = ones.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last)
    scale = torch.cat([w.abs().amax(1) if w.numel() else w.new_zeros(0) for w in weights])
    acc = _Sums(counts, tape.start[1].shape[0], kp, scale.double())
    kappa = 0.0
    for step, adj in zip(reversed(tape.steps), reversed(adjoints), strict=True):
        h, w = g.shape[-2:]
        if step[0] == 'relu':
            _, keep, positions, mid, rad = step
            if positions.shape[1]:
                acc.mixed(g, a, positions, mid, rad, oy, ox)
            mask = _crops(keep, oy, ox, h, w)  # (K, C, h, w)
            g = g.mul_(_per_item(mask, kp))
            a = a.mul_(mask)
            continue
        _, _, eps, in_size = step
        acc.add(g, a, None, _crops(eps, oy, ox, h, w))
        g, a, oy, ox, valid = _adjoint_step(adj, g, a, oy, ox, in_size)
        kappa = (1.0 + kappa) * (1.0 + adj.gamma) - 1.0
        g = g.mul_(_per_item(valid, kp))
        a = a.mul_(valid)
    h, w = g.shape[-2:]
    mid, rad = tape.start
    acc.add(g, a, None if mid is None else _crops(mid, oy, ox, h, w), _crops(rad, oy, ox, h, w))
    return acc.result(kappa)


def _per_item(t: torch.Tensor, kp: torch.Tensor) -> torch.Tensor:
    """(K, C, h, w) per keypoint → (B, C, h, w) per batch item, channels-last."""
    if t.shape[0] == 1:
        return t
    return t.index_select(0, kp).contiguous(memory_format=torch.channels_last)


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) → (N, h·w·C): each item's values in channels-last order (a view if CL)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


def _memory_rows(t: torch.Tensor, rows: int) -> torch.Tensor:
    """(rows·C, h, w) → (rows, h·w·C): one keypoint's band crops in channels-last order."""
    return _memory_order(t.reshape(rows, -1, *t.shape[1:]))


class _Sums:
    """The bound's running sums per cell and row: Σ g·mid, Σ |g|·rad, and the magnitudes.

    A band is mid ± rad (the level pass's offset and radius rows, exact in float32), so
    Σ g·x over it is Σ g·mid ± Σ |g|·rad.
    """

    def __init__(self, counts: list[int], rows: int, kp: torch.Tensor,
                 scale: torch.Tensor) -> None:
        self.rows, self.kp, self.scale = rows, kp, scale  # scale: each item's largest |weight|
        ends = torch.tensor(counts).cumsum(0).tolist()
        self.ranges = list(zip([0, *ends[:-1]], ends, strict=True))
        self.centre = torch.zeros(kp.shape[0], rows, dtype=torch.float32)
        self.spread = torch.zeros(kp.shape[0], rows, dtype=torch.float32)
        self.mag = torch.zeros(len(counts), rows, dtype=torch.float64)  # Σ a·(|mid| + rad)
        self.terms = 0

    def add(self, g: torch.Tensor, a: torch.Tensor, mid: torch.Tensor | None,
            rad: torch.Tensor) -> None:
        """Every neuron of the crops against its band: mid, rad (K, R·C or C, h, w)."""
        gf, af = _memory_order(g), _memory_order(a)  # views: g, a are channels-last
        rows = rad.shape[1] // g.shape[1]
        for k, (lo, hi) in enumerate(self.ranges):
            rad_k = _memory_rows(rad[k], rows)
            self.spread[lo:hi].add_(gf[lo:hi].abs() @ rad_k.t())
            size = rad_k.double()
            if mid is not None:
                mid_k = _memory_rows(mid[k], rows)
                self.centre[lo:hi].add_(gf[lo:hi] @ mid_k.t())
                size = size + mid_k.double().abs()
            self.mag[k].add_(af[k].double() @ size.t())
        self.terms = max(self.terms, gf.shape[1])

    def mixed(self, g: torch.Tensor, a: torch.Tensor, positions: torch.Tensor,
              mid: torch.Tensor | None, rad: torch.Tensor, oy: list[int],
              ox: list[int]) -> None:
        """The mixed neurons at ``positions`` (3, n) against their bands mid, rad (R, n)."""
        c, y, x = positions
        ch, h, w = g.shape[1:]
        ry = y[None] - torch.tensor(oy)[:, None]  # (K, n)
        rx = x[None] - torch.tensor(ox)[:, None]
        inside = (ry >= 0) & (ry < h) & (rx >= 0) & (rx < w)
        if not bool(inside.any()):
            return
        flat = torch.where(inside, (ry * w + rx) * ch + c[None], 0)  # channels-last order
        gf = _memory_order(g)
        gm = gf.gather(1, flat.index_select(0, self.kp)) * inside.index_select(0, self.kp)
        am = _memory_order(a).gather(1, flat) * inside
        self.spread.add_(gm.abs() @ rad.t())
        size = rad.double()
        if mid is not None:
            self.centre.add_(gm @ mid.t())
            size = size + mid.double().abs()
        self.mag.add_(am.double() @ size.t())
        self.terms = max(self.terms, gm.shape[1])

    def result(self, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) (R, B) float64, every rounding included (module docstring)."""
        # Computed cotangents are within κ·a·(1 + 2κ) of exact (a itself within 2κ); the
        # float32 sums within γ_(n+1) of their magnitudes, plus a few additions per term.
        coef = (kappa * (1.0 + 2.0 * kappa) + (gamma(self.terms + 1, U32) + 64.0 * U32)
                * (1.0 + kappa) * (1.0 + 2.0 * kappa))
        err = (self.mag.index_select(0, self.kp) * self.scale[:, None]
               * (coef * (1.0 + 1e-6)) + TINY)  # (B, R)
        centre, spread = self.centre.double(), self.spread.double() + err
        return (centre - spread).t(), (centre + spread).t()


def _adjoint_step(adj: _Adjoint, g: torch.Tensor, a: torch.Tensor, oy: list[int],
                  ox: list[int], in_size: tuple[int, int]) -> tuple:
    """Cotangents at an op's input from those at its output, on crops; validity mask.

    A convolution's adjoint is the transposed convolution of the crop (the input crop starts
    at s·o − p); a transposed convolution's is the convolution of the crop padded so that
    its window reaches every input whose outputs meet the crop. Inputs outside the layer
    (its zero padding) are masked off by the returned validity (K, 1, h, w).
    """
    if adj.kind == 'affine':
        return g * adj.weight, a * adj.weight_abs, oy, ox, torch.ones(1, 1, 1, 1)
    geo = adj.geometry
    (sy, sx), (py, px) = geo.stride, geo.padding
    kh, kw = geo.weight.shape[2:]
    if adj.kind == 'conv':
        g = F.conv_transpose2d(g, adj.weight, stride=(sy, sx))
        a = F.conv_transpose2d(a, adj.weight_abs, stride=(sy, sx))
        oy = [sy * o - py for o in oy]
        ox = [sx * o - px for o in ox]
    else:
        if any((o - oy[0]) % sy for o in oy) or any((o - ox[0]) % sx for o in ox):
            raise ValueError('backward crops are not aligned')  # _alignment prevents this
        h, w = g.shape[-2:]
        iy0 = -((-(oy[0] + py - kh + 1)) // sy)
        iy1 = (oy[0] + h - 1 + py) // sy
        ix0 = -((-(ox[0] + px - kw + 1)) // sx)
        ix1 = (ox[0] + w - 1 + px) // sx
        left_y, left_x = oy[0] - (sy * iy0 - py), ox[0] - (sx * ix0 - px)
        pad = (left_x, sx * (ix1 - ix0) + kw - left_x - w,
               left_y, sy * (iy1 - iy0) + kh - left_y - h)
        g = F.conv2d(F.pad(g, pad), adj.weight, stride=(sy, sx))
        a = F.conv2d(F.pad(a, pad), adj.weight_abs, stride=(sy, sx))
        oy = [-((-(o + py - kh + 1)) // sy) for o in oy]
        ox = [-((-(o + px - kw + 1)) // sx) for o in ox]
    g, a = (t.contiguous(memory_format=torch.channels_last) for t in (g, a))
    valid = _crops(torch.ones(1, 1, *in_size, dtype=g.dtype), oy, ox, *g.shape[-2:])
    return g, a, oy, ox, valid

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

import numpy as np
import torch
import torch.nn.functional as F

from usn_perception.bounds.layers import AffineOp, CompiledNetwork, ConvGeometry, LinearOp
from usn_perception.bounds.rounding import TINY, U32, gamma

#: ReLU layers the backward bound passes through (counted from the output): measured on the
#: default detector's node frames with the window's moments (docs/certification.md, "Window
#: moments"): 3 / 4 / 5 give 1.67 / 1.46 / 1.35 at level work 7 for ~+0 / +1 / +4 ms.
BACKWARD_RELUS = 4


@dataclass
class BackwardTape:
    """What the level pass records for :func:`window_functionals` from the start ReLU on.

    ``start``: the rows' band (o, r) (R, C, H, W) after the start ReLU (o None: 0 ± r);
    ``steps``: per later op, in order, ``('linear' | 'affine', op, eps, (H_in, W_in))`` with
    eps (1, C, H, W) the nodal values' rounding bound at its output, or ``('relu', keep, o,
    r)`` with keep (1, C, H, W) the on-mask and o, r (R, C, H, W) the output bands of the
    mixed neurons, 0 on every other neuron (o None: 0; r None: no mixed neuron).
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


class _Crops:
    """The K crops of one layer (H, W) at origins ``oy``, ``ox`` of size (h, w), as rows.

    One index for every map cropped at the same place (the ReLU's mask and bands, a linear
    op's rounding): a crop is one gather, in channels-last memory order (y, x, c), the order
    of the cotangents' own memory. Cells off the layer read 0.
    """

    def __init__(self, oy: list[int], ox: list[int], h: int, w: int,
                 size: tuple[int, int]) -> None:
        height, width = size
        # (a few hundred small indices: numpy builds them for a fraction of torch's overhead)
        y = np.add.outer(oy, np.arange(h))  # (K, h)
        x = np.add.outer(ox, np.arange(w))  # (K, w)
        self.outside = None
        if min(oy) < 0 or max(oy) + h > height or min(ox) < 0 or max(ox) + w > width:
            inside = (((y >= 0) & (y < height))[:, :, None]
                      & ((x >= 0) & (x < width))[:, None, :])
            self.outside = torch.from_numpy(~inside.reshape(len(oy), 1, h * w, 1))
            y, x = np.minimum(np.maximum(y, 0), height - 1), np.minimum(np.maximum(x, 0),
                                                                        width - 1)
        self.index = torch.from_numpy((y[:, :, None] * width + x[:, None, :]).reshape(-1))
        self.k, self.hw, self.shape = len(oy), h * w, (h, w)

    def rows(self, full: torch.Tensor) -> torch.Tensor:
        """(K, n, h·w·C) crops of ``full`` (n, C, H, W), each row in (y, x, c) order."""
        n, c = full.shape[:2]
        flat = full.permute(0, 2, 3, 1).reshape(n, -1, c)  # a view where channels-last
        out = flat.index_select(1, self.index).view(n, self.k, self.hw, c).transpose(0, 1)
        if self.outside is not None:
            out = out.masked_fill(self.outside, 0.0)
        return out.reshape(self.k, n, self.hw * c)

    def image(self, full: torch.Tensor) -> torch.Tensor:
        """(K, n, C, h, w) crops of ``full`` (n, C, H, W) (a view of :meth:`rows`)."""
        n, c = full.shape[:2]
        return self.rows(full).view(self.k, n, self.hw, c).transpose(2, 3).unflatten(
            3, self.shape)


def window_bands(net: CompiledNetwork, tape: BackwardTape, heatmap: tuple[int, int, int],
                 cells: list[list[tuple[int, int]]]) -> tuple | None:
    """Bounds of the logits' deviation at ``cells`` per row: (index (M,), lo (R, M), hi (R, M)).

    ``cells[k]`` lists keypoint k's (v, u) cells; ``index`` holds their flat positions
    k·H·W + v·W + u in the (K, H, W) ``heatmap``; lo and hi are float64 and hold for every θ
    of the row's segments (:func:`window_functionals` with one functional per cell).
    """
    k_kp, height, width = heatmap
    n = max(len(c) for c in cells)
    flat = torch.zeros(k_kp, n, dtype=torch.long)
    weights = torch.zeros(k_kp, n, n)
    for k, c in enumerate(cells):
        flat[k, :len(c)] = torch.tensor([v * width + u for v, u in c], dtype=torch.long)
        weights[k, :len(c), :len(c)] = torch.eye(len(c))
    out = window_functionals(net, tape, heatmap, flat, weights)
    if out is None:
        return None
    real = torch.cat([torch.arange(len(c)) + k * n for k, c in enumerate(cells)])
    index = torch.cat([flat[k, :len(c)] + k * height * width for k, c in enumerate(cells)])
    lo, hi = (t.flatten(1)[:, real] for t in out)
    return index, lo, hi


def window_functionals(net: CompiledNetwork, tape: BackwardTape, heatmap: tuple[int, int, int],
                       cells: torch.Tensor, weights: torch.Tensor) -> tuple | None:
    """Bounds of linear functionals of the logits' deviation at each keypoint's ``cells``.

    ``cells`` (K, S): flat positions v·W + u in keypoint k's (H, W) heatmap; ``weights``
    (K, F, S): item f of keypoint k is Σ_i weights[k, f, i]·δ(cells[k, i]) with δ the logits'
    deviation from the nodes' interpolant (a cell whose weights are all 0 is padding, never
    read). Returns float64 (lo, hi), each (R, K, F), that hold for every θ of the row's
    segments; None when an op on the way is unsupported or the crops cannot be aligned. One
    cotangent per item: a readout that needs only a few sums of its window cells (the local
    centroid's moments) pays for those, not for every cell, and the signs of the cells'
    errors cancel in the sum as they do in the network.
    """
    start = start_index(net)
    adjoints = _adjoints(net, start)
    if adjoints is None or tape.start is None:
        return None
    if len(tape.steps) != len(adjoints):
        raise ValueError('backward tape does not match the network')
    align = _alignment(adjoints)
    if align is None:
        return None
    k_kp, height, width = heatmap
    per = weights.shape[1]
    real = weights.ne(0).any(1)  # (K, S) the cells some item reads
    if not bool(real.any(1).all()):
        raise ValueError('every keypoint needs a cell with a nonzero weight')
    v, u = cells // width, cells % width
    # Crop at the heatmap: aligned origins, a size that holds every keypoint's cells.
    big = height + width
    v_lo, v_hi = v.masked_fill(~real, big).amin(1), v.masked_fill(~real, -1).amax(1)
    u_lo, u_hi = u.masked_fill(~real, big).amin(1), u.masked_fill(~real, -1).amax(1)
    size_y = int((v_hi - v_lo).max()) + align
    size_x = int((u_hi - u_lo).max()) + align
    oy = (align * (v_lo // align)).tolist()
    ox = (align * (u_lo // align)).tolist()
    # Cotangents (K·F, K, size_y, size_x), channels-last, F items per keypoint; the float32
    # weights are taken as given (small integers here: exact). The |W|-chain a of each
    # keypoint's cells together bounds every item's cotangent error, scaled by the item's
    # largest weight.
    kk, ii = real.nonzero(as_tuple=True)
    cy = v[kk, ii] - torch.tensor(oy)[kk]
    cx = u[kk, ii] - torch.tensor(ox)[kk]
    item = kk[:, None] * per + torch.arange(per)
    g = torch.zeros(k_kp * per, size_y, size_x, k_kp, dtype=torch.float32)
    g[item, cy[:, None], cx[:, None], kk[:, None]] = weights[kk, :, ii].float()
    a = torch.zeros(k_kp, size_y, size_x, k_kp)
    a[kk, cy, cx, kk] = 1.0
    g = g.permute(0, 3, 1, 2)  # channels-last (N, C, H, W) views
    a = a.permute(0, 3, 1, 2)
    scale = weights.abs().amax(2).double().reshape(-1)  # each item's largest |weight|
    acc = _Sums(k_kp, per, tape.start[1].shape[0], scale)
    kappa = 0.0
    for step, adj in zip(reversed(tape.steps), reversed(adjoints), strict=True):
        h, w = g.shape[-2:]
        if step[0] == 'relu':
            _, keep, mid, rad = step
            crops = _Crops(oy, ox, h, w, keep.shape[-2:])
            if rad is not None:
                acc.add(g, a, None if mid is None else crops.rows(mid), crops.rows(rad))
            mask = crops.image(keep)  # (K, 1, C, h, w)
            _per_keypoint(g, k_kp).mul_(mask)
            a = a.mul_(mask[:, 0])
            continue
        _, _, eps, in_size = step
        acc.add(g, a, None, _Crops(oy, ox, h, w, eps.shape[-2:]).rows(eps))
        g, a, oy, ox, valid = _adjoint_step(adj, g, a, oy, ox, in_size)
        kappa = (1.0 + kappa) * (1.0 + adj.gamma) - 1.0
        if valid is not None:
            _per_keypoint(g, k_kp).mul_(valid[:, None])
            a = a.mul_(valid)
    h, w = g.shape[-2:]
    mid, rad = tape.start
    crops = _Crops(oy, ox, h, w, rad.shape[-2:])
    acc.add(g, a, None if mid is None else crops.rows(mid), crops.rows(rad))
    lo, hi = acc.result(kappa)
    return lo.view(-1, k_kp, per), hi.view(-1, k_kp, per)


def _per_keypoint(g: torch.Tensor, k_kp: int) -> torch.Tensor:
    """(K·F, C, h, w) channels-last items → a (K, F, C, h, w) view: keypoint by keypoint."""
    return g.view(k_kp, g.shape[0] // k_kp, *g.shape[1:])


def _memory_order(t: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) → (N, h·w·C): each item's values in channels-last order (a view if CL)."""
    return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)


class _Sums:
    """The bound's running sums per item and row: Σ g·mid, Σ |g|·rad, and the magnitudes.

    A band is mid ± rad (the level pass's offset and radius rows, exact in float32), so
    Σ g·x over it is Σ g·mid ± Σ |g|·rad. Items come F per keypoint (every keypoint's crops
    are one batch of matrix products).
    """

    def __init__(self, k_kp: int, per: int, rows: int, scale: torch.Tensor) -> None:
        self.k_kp, self.per, self.rows = k_kp, per, rows
        self.scale = scale  # each item's largest |weight|
        self.centre = torch.zeros(k_kp, per, rows, dtype=torch.float32)
        self.spread = torch.zeros(k_kp, per, rows, dtype=torch.float32)
        self.mag = torch.zeros(k_kp, 1, rows, dtype=torch.float64)  # Σ a·(|mid| + rad)
        self.terms = 0

    def add(self, g: torch.Tensor, a: torch.Tensor, mid: torch.Tensor | None,
            rad: torch.Tensor) -> None:
        """Every neuron of the crops against its band: mid, rad (K, R or 1, h·w·C) crops."""
        gf = _memory_order(g).view(self.k_kp, self.per, -1)  # g, a are channels-last
        af = _memory_order(a)[:, None]  # (K, 1, n)
        self.spread.add_(torch.bmm(gf.abs(), rad.transpose(1, 2)))
        size = rad.double()
        if mid is not None:
            self.centre.add_(torch.bmm(gf, mid.transpose(1, 2)))
            size = size + mid.double().abs()
        self.mag.add_(torch.bmm(af.double(), size.transpose(1, 2)))
        self.terms = max(self.terms, gf.shape[2])

    def result(self, kappa: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) (R, B) float64, every rounding included (module docstring)."""
        # Computed cotangents are within κ·a·(1 + 2κ) of exact (a itself within 2κ); the
        # float32 sums within γ_(n+1) of their magnitudes, plus a few additions per term.
        coef = (kappa * (1.0 + 2.0 * kappa) + (gamma(self.terms + 1, U32) + 64.0 * U32)
                * (1.0 + kappa) * (1.0 + 2.0 * kappa))
        mag = self.mag.expand(-1, self.per, -1).reshape(-1, self.rows)  # (B, R)
        err = mag * self.scale[:, None] * (coef * (1.0 + 1e-6)) + TINY
        centre = self.centre.view(-1, self.rows).double()
        spread = self.spread.view(-1, self.rows).double() + err
        return (centre - spread).t(), (centre + spread).t()


def _adjoint_step(adj: _Adjoint, g: torch.Tensor, a: torch.Tensor, oy: list[int],
                  ox: list[int], in_size: tuple[int, int]) -> tuple:
    """Cotangents at an op's input from those at its output, on crops; validity mask.

    A convolution's adjoint is the transposed convolution of the crop (the input crop starts
    at s·o − p); a transposed convolution's is the convolution of the crop padded so that
    its window reaches every input whose outputs meet the crop. Inputs outside the layer
    (its zero padding) are masked off by the returned validity (K, 1, h, w); None where every
    crop lies inside the layer.
    """
    if adj.kind == 'affine':
        return g * adj.weight, a * adj.weight_abs, oy, ox, None
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
    h, w = g.shape[-2:]
    if all(0 <= y and y + h <= in_size[0] for y in oy) and all(
            0 <= x and x + w <= in_size[1] for x in ox):
        return g, a, oy, ox, None  # every crop inside the layer
    valid = _Crops(oy, ox, h, w, in_size).image(torch.ones(1, 1, *in_size, dtype=g.dtype))
    return g, a, oy, ox, valid[:, 0]

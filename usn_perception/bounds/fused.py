"""The linear ops before the first ReLU as one convolution, for batches of deviations.

Level nodes (:mod:`usn_perception.bounds.levels`) push every node's deviation from the
reference through the whole network. Before the first ReLU the network is linear, and on the
shipped detector that stage is the input scale, a 3×3 convolution to 8 channels at full
resolution and a stride-2 3×3 convolution to 16. Their composition is one 5×5 stride-2
convolution from the single input channel: a quarter of the multiply-adds, and no 8-channel
full-resolution intermediate to write, scan for its largest deviation and read again.

The composition is exact except where the second convolution reads its zero padding: there
the composite would read the first convolution's output *beyond* the image instead of zeros.
Those output rows and columns (the first ones for a stride-2 layer with padding 1) take a
composite built without the second kernel's taps that read the padding, so every output is
the prefix's.

Rounding (float32, :meth:`FusedPrefix.radius`): an output is one dot product of at most
``C·kh·kw`` terms with weights composed in float64 and rounded once, within γ_{n+1}·(|W|·|x|)
of exact. The bound is per output, as an image, so it keeps what the zero-mean first filter
cancels: a single γ·|W₂|·|W₁|·|x| for the whole prefix (two dot products' worth of terms)
made node-frame boxes 2-4 % wider (measured).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from usn_perception.bounds.layers import AffineOp, CompiledNetwork, ConvGeometry, LinearOp
from usn_perception.bounds.prefix import apply_prefix, linear_prefix
from usn_perception.bounds.rounding import gamma

#: Relative agreement with the op-by-op prefix that a fused prefix must show on a random
#: float64 input before it is used (a misread geometry fails here, not in a certificate).
CHECK_TOLERANCE = 1e-10


@dataclass(frozen=True)
class _Plan:
    """Kernels and padding of a :class:`FusedPrefix` for one dtype and input size."""

    pad: tuple[int, int, int, int]  # left, right, top, bottom
    size: tuple[int, int]  # output height, width
    kernel: torch.Tensor  # the composite (O, C, kh, kw)
    bounds: torch.Tensor  # [|composite|; composite of |W₂| and |W₁|] (2·O, C, kh, kw)
    #: Per edge region ((row, col), None for a whole column or row): the composite with
    #: the second kernel's taps that read its zero padding removed, and the same of |W|.
    edges: tuple[tuple[tuple[int | None, int | None], torch.Tensor, torch.Tensor], ...]


@dataclass(frozen=True)
class FusedPrefix:
    """``ops[:stop]`` of a network (scales, convolution, convolution) as one linear map."""

    stop: int
    first: ConvGeometry  # the input scales folded in
    second: ConvGeometry
    composite: torch.Tensor  # (O, C, kh, kw) float64
    #: Terms of a composite output's dot product (input channels × kernel area).
    taps: int
    _plans: dict

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The prefix's linear part (no bias, no shift) on a batch (N, C, H, W), x's dtype.

        Channels-last out: the kernels are stored with channels-last strides, which makes
        oneDNN write that layout (and run 4x faster than on the single-channel contiguous
        input; a copy to channels-last afterwards cost more than the convolution).
        """
        plan = self._plan(x)
        padded = _pad(x, plan.pad, self.first.padding_mode)
        out = self._conv(padded, plan.kernel, plan)
        for region, kernel, _ in plan.edges:
            self._fill(out, padded, region, kernel)
        return out

    def radius(self, r: torch.Tensor, m: torch.Tensor, unit: float) -> torch.Tensor:
        """The radius row after the prefix (1, O, H', W'), from ``r`` and |deviations| ≤ ``m``.

        Both (1, C, H, W). The sum of two bounds, rounded up (the last factor):

        - |W₂|·|W₁|·r (the composite of the absolute kernels, edges as in :meth:`apply`);
        - :meth:`apply`'s rounding: an output is one dot product of at most n terms (the
          composite's taps), within γ_{n+1}·(|W|·m) (+1: the float32 weights' rounding; |W|
          the kernel it used), and |W| ≤ the composite of |W₂| and |W₁|. Four spare terms
          cover the float64 composition (~1e-14 relative).
        """
        n = self.taps
        plan = self._plan(m)
        o = self.composite.shape[0]
        padded = _pad(torch.cat([r, m]), plan.pad, self.first.padding_mode)
        both = self._conv(padded, plan.bounds, plan)  # (2, 2·O, H', W')
        reach, err = both[:1, o:], both[1:, :o]
        for region, _, kernel in plan.edges:
            edge = both.new_empty(both[:, :o].shape)
            self._fill(edge, padded, region, kernel)
            self._fill_from(reach, edge[:1], region)
            self._fill_from(err, edge[1:], region)
        return err.mul(gamma(n + 5, unit)).add_(reach).mul_(1.0 + 4.0 * gamma(n + 16, unit))

    def _conv(self, padded: torch.Tensor, kernel: torch.Tensor, plan: _Plan) -> torch.Tensor:
        h, w = plan.size
        return F.conv2d(padded, kernel, stride=self.second.stride)[:, :, :h, :w]

    def _fill(self, out: torch.Tensor, padded: torch.Tensor,
              region: tuple[int | None, int | None], kernel: torch.Tensor) -> None:
        """Overwrite an edge row, column or corner of ``out`` with ``kernel``'s outputs."""
        (sh, sw), (kh, kw) = self.second.stride, kernel.shape[2:]
        i, j = region
        if j is None:  # row i
            src, stride, view = padded.narrow(2, sh * i, kh), (1, sw), out[:, :, i:i + 1]
        elif i is None:  # column j
            src, stride, view = padded.narrow(3, sw * j, kw), (sh, 1), out[:, :, :, j:j + 1]
        else:
            src = padded.narrow(2, sh * i, kh).narrow(3, sw * j, kw)
            stride, view = (1, 1), out[:, :, i:i + 1, j:j + 1]
        view.copy_(F.conv2d(src, kernel, stride=stride)[:, :, :view.shape[2], :view.shape[3]])

    @staticmethod
    def _fill_from(out: torch.Tensor, src: torch.Tensor,
                   region: tuple[int | None, int | None]) -> None:
        i, j = region
        rows = slice(None) if i is None else slice(i, i + 1)
        cols = slice(None) if j is None else slice(j, j + 1)
        out[:, :, rows, cols] = src[:, :, rows, cols]

    def _plan(self, x: torch.Tensor) -> _Plan:
        key = (x.dtype, *x.shape[2:])
        if key not in self._plans:
            self._plans[key] = self._make_plan(x.dtype, *x.shape[2:])
        return self._plans[key]

    def _make_plan(self, dtype: torch.dtype, h: int, w: int) -> _Plan:
        g1, g2 = self.first, self.second
        w1, w2 = g1.weight, g2.weight
        (k1h, k1w), (k2h, k2w) = w1.shape[2:], w2.shape[2:]
        (p1h, p1w), (p2h, p2w), (sh, sw) = g1.padding, g2.padding, g2.stride
        h1, w1_out = h + 2 * p1h - k1h + 1, w + 2 * p1w - k1w + 1
        h2, w2_out = (h1 + 2 * p2h - k2h) // sh + 1, (w1_out + 2 * p2w - k2w) // sw + 1
        kch, kcw = self.composite.shape[2:]
        top, left = p1h + p2h, p1w + p2w
        pad = (left, max(0, sw * (w2_out - 1) + kcw - left - w),
               top, max(0, sh * (h2 - 1) + kch - top - h))

        def inside(index: int, stride: int, padding: int, k: int, size: int) -> torch.Tensor:
            """Taps of the second kernel that read the first's outputs inside the image."""
            at = stride * index - padding + torch.arange(k)
            return ((at >= 0) & (at < size)).to(w2.dtype)

        def masked(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, ...]:
            mask = rows.view(1, 1, -1, 1) * cols.view(1, 1, 1, -1)
            return (_channels_last(F.conv_transpose2d(w2 * mask, w1).to(dtype)),
                    _channels_last(F.conv_transpose2d(w2.abs() * mask, w1.abs()).to(dtype)))

        all_rows, all_cols = torch.ones(k2h, dtype=w2.dtype), torch.ones(k2w, dtype=w2.dtype)
        rows = [i for i in range(h2) if not bool(inside(i, sh, p2h, k2h, h1).all())]
        cols = [j for j in range(w2_out) if not bool(inside(j, sw, p2w, k2w, w1_out).all())]
        edges = ([((i, None), *masked(inside(i, sh, p2h, k2h, h1), all_cols)) for i in rows]
                 + [((None, j), *masked(all_rows, inside(j, sw, p2w, k2w, w1_out)))
                    for j in cols]
                 + [((i, j), *masked(inside(i, sh, p2h, k2h, h1),
                                     inside(j, sw, p2w, k2w, w1_out)))
                    for i in rows for j in cols])
        bounds = torch.cat([self.composite.abs(), F.conv_transpose2d(w2.abs(), w1.abs())])
        return _Plan(pad, (h2, w2_out), _channels_last(self.composite.to(dtype)),
                     _channels_last(bounds.to(dtype)), tuple(edges))


def _channels_last(w: torch.Tensor) -> torch.Tensor:
    """``w`` with channels-last strides, even with one input channel.

    There ``contiguous(memory_format=...)`` keeps the plain strides, which oneDNN reads as
    such.
    """
    return torch.empty(w.shape, dtype=w.dtype, memory_format=torch.channels_last).copy_(w)


def _pad(x: torch.Tensor, pad: tuple[int, int, int, int], mode: str) -> torch.Tensor:
    """``F.pad(x, pad, mode)`` for 'zeros', 'replicate', 'reflect' and 'circular'.

    Zero padding, then the bands copied in, rows first (padding is separable). F.pad's own
    replicate mode took 0.25 ms on six 96×128 deviation images, this 0.05 ms.
    """
    if not any(pad) or mode == 'zeros':
        return F.pad(x, pad) if any(pad) else x
    left, right, top, bottom = pad
    h, w = x.shape[2:]
    out = F.pad(x, pad)
    inner = out[..., left:left + w]  # the image's columns, every padded row

    if top:
        inner[:, :, :top] = _source(x, 2, top, h, mode, before=True)
    if bottom:
        inner[:, :, top + h:] = _source(x, 2, bottom, h, mode, before=False)
    if left:
        out[..., :left] = _source(out[..., left:left + w], 3, left, w, mode, before=True)
    if right:
        out[..., left + w:] = _source(out[..., left:left + w], 3, right, w, mode,
                                      before=False)
    return out


def _source(x: torch.Tensor, axis: int, count: int, size: int, mode: str, *,
            before: bool) -> torch.Tensor:
    """The values a ``count``-wide pad band takes before (or after) ``x`` along ``axis``."""
    if mode == 'replicate':
        edge = x.narrow(axis, 0 if before else size - 1, 1)
        shape = list(x.shape)
        shape[axis] = count
        return edge.expand(shape)
    if mode == 'reflect':
        return x.narrow(axis, 1 if before else size - 1 - count, count).flip(axis)
    if mode == 'circular':
        return x.narrow(axis, size - count if before else 0, count)
    raise ValueError(f'unsupported padding mode {mode!r}')


def _fusable(first: LinearOp, second: LinearOp) -> bool:
    g1, g2 = first.conv, second.conv
    return (g1 is not None and g2 is not None and g1.groups == g2.groups == 1
            and g1.stride == (1, 1) and g1.dilation == g2.dilation == (1, 1)
            and g2.padding_mode == 'zeros'
            and g1.padding_mode in ('zeros', 'replicate', 'reflect', 'circular'))


def fused_prefix(net: CompiledNetwork) -> FusedPrefix | None:
    """The network's ops before its first ReLU as one :class:`FusedPrefix`, or None.

    Fused: any elementwise scales, then two convolutions (the first with stride 1, the
    second with zero padding; no groups or dilation), and nothing else before the first
    ReLU. Memoised on ``net``; checked against the op-by-op prefix on a random input.
    """
    if 'fused_prefix' not in net.memo:
        net.memo['fused_prefix'] = _build(net)
    return net.memo['fused_prefix']


def _build(net: CompiledNetwork) -> FusedPrefix | None:
    stop = linear_prefix(net)
    ops = net.ops[:stop]
    if stop < 2 or not all(isinstance(op, AffineOp) for op in ops[:-2]) or not all(
            isinstance(op, LinearOp) for op in ops[-2:]) or not _fusable(*ops[-2:]):
        return None
    first, second = ops[-2:]
    g1, g2 = first.conv, second.conv
    w1 = g1.weight
    for op in ops[:-2]:  # the elementwise scales, folded into the first kernel's inputs
        scale = torch.as_tensor(op.scale, dtype=torch.float64).reshape(-1)
        w1 = w1 * scale.view(1, -1, 1, 1).expand(1, w1.shape[1], 1, 1)
    # The composite kernel: Σ_c1 (full convolution of W₂[o, c1] with W₁[c1, c]).
    composite = F.conv_transpose2d(g2.weight, w1)
    taps = composite.shape[1] * composite.shape[2] * composite.shape[3]
    fused = FusedPrefix(
        stop, ConvGeometry(w1, g1.stride, g1.padding, g1.padding_mode, g1.dilation, 1),
        g2, composite, taps, {})
    x = torch.rand((2, *net.input_shape), generator=torch.Generator().manual_seed(1),
                   dtype=torch.float64)
    want = apply_prefix(net, stop, x, linear=True)
    got = fused.apply(x)
    if got.shape != want.shape or not bool(
            ((got - want).abs() <= CHECK_TOLERANCE * (1.0 + want.abs().amax())).all()):
        return None  # a geometry this module misreads: the op-by-op path stays
    return fused

"""The input stage: image → affine bounds in θ of every network-input pixel.

The detector's preprocessing after the photometric clip is ``gray = Σ_c w_c·x_c`` followed by
an area resize ``Ry @ gray @ Rx.T``; all weights are non-negative, so a network-input pixel q
is ``Σ_m A[q, m] · clip(α·v(q, m) + β, 0, 1)`` over the few source (pixel, channel) entries m
that overlap it. Lower bounds of the clipped values therefore give a lower bound of q, and
upper bounds an upper bound, exactly. The clipped value depends on the source pixel only through
its value v, so the relaxation is computed once per *distinct value* (256 for uint8 frames)
and gathered with ``embedding_bag`` — the cost is independent of the camera resolution apart
from one gather.

Clip relaxation per value and sub-box (z = α·v + β ranges over [z_lo, z_hi]): exact where
0 ≤ z_lo and z_hi ≤ 1, constant where fully saturated, otherwise two *parallel* lines (a chord
and a parallel support line), so that the bound's half-width is a constant, not a form.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F

from usn_perception.bounds.forms import form_range
from usn_perception.bounds.thresholds import threshold_table
from usn_perception.preprocess import GRAY_WEIGHTS, area_weights, check_image, image_to_float


@functools.lru_cache(maxsize=8)
def _gather_plan(h: int, w: int, c: int, w_out: int,
                 h_out: int) -> tuple[np.ndarray, torch.Tensor]:
    """Flat source positions and weights ((Q, M) each) of every network-input pixel.

    Depends only on the frame's shape, so a camera stream computes it once: per frame only
    the pixel codes are gathered. Shared between encodings: never modified in place.
    """
    iy, wy = _band(area_weights(h, h_out))
    jx, wx = _band(area_weights(w, w_out))
    channel_w = np.ones(1) if c == 1 else np.asarray(GRAY_WEIGHTS, dtype=np.float64)
    pos = ((iy[:, None, :, None] * w + jx[None, :, None, :])[..., None] * c
           + np.arange(c)[None, None, None, None, :])
    weights = (wy[:, None, :, None, None] * wx[None, :, None, :, None]
               * channel_w[None, None, None, None, :])
    q = h_out * w_out
    pos = pos.reshape(q, -1)
    pos.setflags(write=False)
    return pos, torch.from_numpy(np.ascontiguousarray(weights.reshape(q, -1)))


def _band(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Row-wise non-zeros of a banded resize matrix, padded (index 0, weight 0)."""
    rows, cols = np.nonzero(weights)
    counts = np.bincount(rows, minlength=weights.shape[0])
    width = int(counts.max())
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos = np.arange(rows.size) - starts[rows]
    idx = np.zeros((weights.shape[0], width), dtype=np.int64)
    wts = np.zeros((weights.shape[0], width), dtype=np.float64)
    idx[rows, pos] = cols
    wts[rows, pos] = weights[rows, cols]
    return idx, wts


class ImageEncoding:
    """One image, prepared for bounding: distinct values and the gather that preprocesses.

    ``values`` (V,) are the distinct channel values in [0, 1]; network-input pixel q equals
    ``Σ_m weights[q, m] · f(values[index[q, m]])`` for the clipped value f. ``evaluate`` runs
    that same map at concrete θ, which must reproduce ``Detector.network_input`` of the
    perturbed image up to float64 rounding (checked in the tests).
    """

    def __init__(self, image: np.ndarray, input_size: tuple[int, int],
                 device: torch.device | str = 'cpu') -> None:
        raw = check_image(image)  # validates shape, dtype, finiteness, range; HxW or HxWx3
        if raw.dtype == np.uint8:
            values = np.arange(256, dtype=np.float64) / 255.0
            codes = raw  # gathered as uint8, widened after the gather
        else:
            xf = image_to_float(raw)
            values, codes = np.unique(xf, return_inverse=True)
            codes = codes.reshape(xf.shape)
        if codes.ndim == 2:
            codes = codes[:, :, None]
        h, w, c = codes.shape
        w_out, h_out = input_size
        pos, weights = _gather_plan(h, w, c, int(w_out), int(h_out))
        narrow = np.take(codes.reshape(-1), pos)  # (Q, M) value codes, in value order
        index = narrow.astype(np.int64, copy=False)
        self.device = torch.device(device)
        self.values = torch.as_tensor(values, dtype=torch.float64, device=self.device)
        self.index = torch.as_tensor(index, device=self.device)
        self.weights = weights.to(self.device)
        self.shape = (1, h_out, w_out)
        self.image_shape = raw.shape
        #: (V,) total resize weight of each distinct value over the network input.
        self.value_weights = torch.zeros_like(self.values).index_add_(
            0, self.index.reshape(-1), self.weights.reshape(-1))
        self._narrow = narrow
        self._code_range: tuple[torch.Tensor, torch.Tensor] | None = None

    def code_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q,) smallest and largest value code among each network-input pixel's sources.

        Codes index :attr:`values`, which ascend. Computed once, on a transposed copy (a
        reduction along contiguous memory is ~100x faster than along the short tap axis).
        """
        if self._code_range is None:
            taps = np.ascontiguousarray(self._narrow.T)
            self._code_range = (torch.as_tensor(taps.min(0).astype(np.int64), device=self.device),
                                torch.as_tensor(taps.max(0).astype(np.int64), device=self.device))
        return self._code_range

    def rows_using(self, moved: torch.Tensor) -> torch.Tensor:
        """Indices of the network-input pixels with a source value where ``moved`` (V,) holds.

        A ``moved`` made of the lowest and/or highest values (what a threshold clips) is
        answered from :meth:`code_range`; any other set by testing every source.
        """
        v = moved.shape[0]
        inner = torch.nonzero(~moved)[:, 0]
        if inner.numel() == 0:
            return torch.arange(self.index.shape[0], device=self.device)
        first, last = int(inner[0]), int(inner[-1])
        if int(inner.numel()) == last - first + 1:  # moved = [0, first) ∪ (last, V)
            lo, hi = self.code_range()
            hit = lo < first
            if last < v - 1:
                hit |= hi > last
        else:
            hit = moved[self.index].any(1)
        return torch.nonzero(hit)[:, 0]

    def _gather(self, table: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """(V, D) per-value table → (D, 1, H, W) preprocessed network inputs.

        ``rows``: gather only these network-input pixels; the others are 0.
        """
        if rows is None:
            out = F.embedding_bag(self.index, table, per_sample_weights=self.weights, mode='sum')
            return out.T.reshape(-1, *self.shape)
        out = table.new_zeros((table.shape[1], self.index.shape[0]))
        if rows.numel():
            part = F.embedding_bag(self.index.index_select(0, rows), table,
                                   per_sample_weights=self.weights.index_select(0, rows),
                                   mode='sum')
            out.index_copy_(1, rows, part.T)
        return out.reshape(-1, *self.shape)

    def evaluate(self, theta: torch.Tensor) -> torch.Tensor:
        """Network inputs (N, 1, H, W) of the perturbed image at each θ of ``theta`` (N, 2)."""
        z = self.values[None, :] * theta[:, :1] + theta[:, 1:]
        return self._gather(torch.clamp(z, 0.0, 1.0).T.contiguous())

    def mean_intensity(self) -> float:
        """Mean network-input intensity of the unperturbed image (for the split heuristic)."""
        one = torch.tensor([[1.0, 0.0]], dtype=torch.float64, device=self.device)
        return float(self.evaluate(one).mean())

    def _z_range(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v = self.values[None, :]
        # v >= 0, so α·v + β is smallest at (α_lo, β_lo) and largest at (α_hi, β_hi).
        return v * boxes[:, :1] + boxes[:, 2:3], v * boxes[:, 1:2] + boxes[:, 3:4]

    def intervals(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IBP input: centre and radius (N, 1, 1, H, W) each, as constant forms."""
        z_lo, z_hi = self._z_range(boxes)
        lo = torch.clamp(z_lo, 0.0, 1.0)
        hi = torch.clamp(z_hi, 0.0, 1.0)
        n = boxes.shape[0]
        table = torch.cat([0.5 * (lo + hi), 0.5 * (hi - lo)], 0).T.contiguous()
        out = self._gather(table)
        return out[:n, None], out[n:, None]

    def forms(self, boxes: torch.Tensor,
              generators: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward-mode input: centre form (N, 3 + G, 1, H, W), constant radius (N, 1, 1, H, W).

        With ``generators`` > 0 the clip relaxation's half-width of the (up to) that many
        clipped values that weigh most (half-width × total resize weight) becomes a generator
        of its own instead of radius: every pixel of that value shares one symbol, so the
        network sees the same unknown deviation for all of them (a zonotope over values).
        """
        z_lo, z_hi = self._z_range(boxes)
        v = self.values[None, :].expand_as(z_lo)
        zero = torch.zeros_like(z_lo)
        width = z_hi - z_lo
        safe = torch.where(width > 0, width, torch.ones_like(width))
        # Default: exact (0 <= z <= 1 on the whole sub-box).
        slope = torch.ones_like(z_lo)
        c0 = zero.clone()
        rad = zero.clone()
        # Crosses 0 only: chord s·(z − z_lo) above, parallel s·z below.
        m = (z_lo < 0) & (z_hi > 0) & (z_hi <= 1)
        s = z_hi / safe
        slope = torch.where(m, s, slope)
        c0 = torch.where(m, -0.5 * s * z_lo, c0)
        rad = torch.where(m, -0.5 * s * z_lo, rad)
        # Crosses 1 only: chord z_lo + s·(z − z_lo) below, parallel 1 + s·(z − 1) above.
        m = (z_lo >= 0) & (z_lo < 1) & (z_hi > 1)
        s = (1.0 - z_lo) / safe
        slope = torch.where(m, s, slope)
        c0 = torch.where(m, 0.5 * (1.0 - s) * (1.0 + z_lo), c0)
        rad = torch.where(m, 0.5 * (1.0 - s) * (1.0 - z_lo), rad)
        # Crosses both: s·z below and 1 + s·(z − 1) above with s = 1 / (z_hi − z_lo).
        m = (z_lo < 0) & (z_hi > 1)
        s = 1.0 / safe
        slope = torch.where(m, s, slope)
        c0 = torch.where(m, 0.5 * (1.0 - s), c0)
        rad = torch.where(m, 0.5 * (1.0 - s), rad)
        # Saturated on the whole sub-box: constants 0 or 1 (checked last: they win ties).
        dead = z_hi <= 0
        one = z_lo >= 1
        sat = dead | one
        slope = torch.where(sat, zero, slope)
        c0 = torch.where(one, torch.ones_like(c0), torch.where(dead, zero, c0))
        rad = torch.where(sat, zero, rad)
        n = boxes.shape[0]
        g = min(int(generators), int((rad > 0).sum(1).max())) if generators > 0 else 0
        gens = []
        if g > 0:
            pick = (rad * self.value_weights[None]).topk(g, dim=1).indices  # (N, G)
            onehot = torch.zeros(n, g, rad.shape[1], dtype=rad.dtype, device=rad.device)
            onehot.scatter_(2, pick[:, :, None], 1.0)
            gens = (onehot * rad[:, None]).permute(1, 0, 2).reshape(g * n, -1)
            rad = rad * (1.0 - onehot.sum(1))
            gens = [gens]
        table = torch.cat([c0, slope * v, slope, *gens, rad], 0).T.contiguous()
        out = self._gather(table).view(4 + g, n, *self.shape)
        centre = out[:3 + g].transpose(0, 1).contiguous()
        return centre, out[3 + g][:, None].contiguous()

    def threshold_forms(self, boxes: torch.Tensor,
                        only: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Forward-mode input in clip-threshold coordinates (see ``bounds.thresholds``).

        Rows of ``boxes`` are [τ_lo, τ_hi, κ_lo, κ_hi]; the input is ``clip(x, τ, κ) − τ``.
        ``only`` (V,) or (N, V) bool keeps the contribution of those values alone (the others
        count 0), for every sub-box or per sub-box.
        """
        n = boxes.shape[0]
        table = threshold_table(self.values, boxes)
        if only is not None:
            table = table * (only.repeat(4, 1) if only.ndim == 2 else only[None, :])
        table = table.T.contiguous()
        out = self._gather(table).view(4, n, *self.shape)
        return out[:3].transpose(0, 1).contiguous(), out[3][:, None].contiguous()

    def threshold_inputs(self, taus: torch.Tensor, kappas: torch.Tensor,
                         skip: torch.Tensor | None = None, *,
                         shift: bool = True) -> torch.Tensor:
        """Network inputs (P, 1, H, W) ``clip(x, τ, κ) − τ`` at the (τ, κ) points given.

        ``skip`` (V,) or (P, V) bool leaves those values out (they count 0). ``shift=False``
        leaves out the ``− τ`` (inputs ``clip(x, τ, κ)``).
        """
        u = torch.clamp(self.values[None, :], min=taus[:, None], max=kappas[:, None])
        if shift:
            u = u - taus[:, None]
        if skip is not None:
            u = u.masked_fill(skip if skip.ndim == 2 else skip[None, :], 0.0)
        return self._gather(u.T.contiguous())

    def threshold_deviations(self, taus: torch.Tensor, kappas: torch.Tensor) -> torch.Tensor:
        """(P − 1, 1, H, W) ``clip(x, τ_j, κ_j) − clip(x, τ_0, κ_0)`` for j = 1 … P − 1.

        The gather is linear in the value table, so the deviations are the gather of the
        tables' differences, which vanish except on the values some point clips differently
        from the first: only the network-input pixels with such a value among their sources
        are gathered (on a camera frame, the pixels near its darkest or brightest parts).
        """
        u = torch.clamp(self.values[None, :], min=taus[:, None], max=kappas[:, None])
        diff = u[1:] - u[:1]  # (P − 1, V)
        return self._gather(diff.T.contiguous(), rows=self.rows_using((diff != 0).any(0)))

    def threshold_intervals(self, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """IBP input in clip-threshold coordinates: constant centre and radius forms."""
        centre, radius = self.threshold_forms(boxes)
        lo, hi = form_range(centre, boxes)
        lo, hi = lo - radius[:, 0], hi + radius[:, 0]
        return (0.5 * (lo + hi))[:, None], (0.5 * (hi - lo))[:, None]

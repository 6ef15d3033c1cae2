"""Heatmaps → keypoint coordinates (in heatmap cells), the readouts that get certified.

``centroid`` (the default of homogeneous models) is the centre of mass of ``relu(heatmap)``:
``Σ_i relu(h_i)·c_i / Σ_i relu(h_i)``. It is invariant to scaling the heatmap by any α > 0,
which is what a homogeneous network does under contrast change, and its certificate needs
no exponential (see :mod:`usn_perception.bounds.spec`); when no cell is positive it falls
back to ``argmax``.
``local-centroid`` is the same centre of mass restricted to the (2R+1)² cells around the argmax
(R = :data:`LOCAL_RADIUS`). It reads the same value on a clean peak, but its certificate only
needs the argmax pinned to a few cells and the cells near them bounded, while the global
centroid also needs every far cell provably ≤ 0 — a margin ~10x smaller under lighting change.
``soft-argmax`` is the expectation of the cell coordinates under ``softmax`` of all the cells
of a heatmap (sub-cell precision, differentiable: it is what training optimises).
``argmax`` is the cell with the largest logit (first one on ties). Both return coordinates in
heatmap cells; :class:`usn_perception.preprocess.PixelMapping` maps them to image pixels.
"""

from __future__ import annotations

import torch

from usn_perception.network import READOUTS

#: Half-width in cells of the ``local-centroid`` window: the trained peak (Gaussian, σ = 1 cell,
#: lifted above a floor of −0.1) is positive within ~2.2 cells of its centre.
LOCAL_RADIUS = 3


def window_offsets(radius: int = LOCAL_RADIUS,
                   device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(du, dv), each (m,) with m = (2·radius + 1)²: a window's cell offsets, row-major."""
    off = torch.arange(-radius, radius + 1, device=device)
    dv, du = torch.meshgrid(off, off, indexing='ij')
    return du.reshape(-1), dv.reshape(-1)


def cell_grid(height: int, width: int, dtype: torch.dtype = torch.float64) -> tuple:
    """Flattened (u, v) coordinates of every heatmap cell, row-major like ``view(-1)``."""
    v, u = torch.meshgrid(
        torch.arange(height, dtype=dtype), torch.arange(width, dtype=dtype), indexing='ij'
    )
    return u.reshape(-1), v.reshape(-1)


def soft_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """(..., K, H, W) logits → (..., K, 2) expected (u, v) in heatmap cells."""
    h, w = heatmaps.shape[-2:]
    p = torch.softmax(heatmaps.flatten(-2), dim=-1)
    gu, gv = cell_grid(h, w, heatmaps.dtype)
    return torch.stack([p @ gu, p @ gv], dim=-1)


def hard_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """(..., K, H, W) logits → (..., K, 2) (u, v) of the largest cell, first on ties."""
    w = heatmaps.shape[-1]
    idx = heatmaps.flatten(-2).argmax(dim=-1)
    return torch.stack([idx % w, idx // w], dim=-1).to(heatmaps.dtype)


def _relu_moments(heatmaps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Σ relu(h)·(u, v) as (..., K, 2), Σ relu(h) as (..., K, 1)) over each heatmap."""
    h, w = heatmaps.shape[-2:]
    r = torch.relu(heatmaps.flatten(-2))
    gu, gv = cell_grid(h, w, heatmaps.dtype)
    first = torch.stack([r @ gu.to(r.device), r @ gv.to(r.device)], -1)
    return first, r.sum(-1, keepdim=True)


def centroid(heatmaps: torch.Tensor) -> torch.Tensor:
    """(..., K, H, W) logits → (..., K, 2) centre of mass of ``relu`` (argmax if all ≤ 0)."""
    first, mass = _relu_moments(heatmaps)
    safe = torch.where(mass > 0, mass, torch.ones_like(mass))
    return torch.where(mass > 0, first / safe, hard_argmax(heatmaps))


def _local_moments(heatmaps: torch.Tensor, radius: int) -> tuple[torch.Tensor, ...]:
    """(Σ r·(u, v), Σ r, argmax) with r = relu(h) on the window around each argmax."""
    h, w = heatmaps.shape[-2:]
    peak = hard_argmax(heatmaps)
    gu, gv = (g.to(heatmaps.device) for g in cell_grid(h, w, heatmaps.dtype))
    near = (((gu - peak[..., :1]).abs() <= radius)
            & ((gv - peak[..., 1:]).abs() <= radius))
    r = torch.relu(heatmaps.flatten(-2)) * near
    return torch.stack([r @ gu, r @ gv], -1), r.sum(-1, keepdim=True), peak


def local_centroid(heatmaps: torch.Tensor, radius: int = LOCAL_RADIUS) -> torch.Tensor:
    """(..., K, H, W) logits → (..., K, 2) centre of mass of ``relu`` around the argmax.

    Only cells within ``radius`` cells of the argmax (on both axes) count; when the peak is
    ≤ 0 the argmax cell itself is returned.
    """
    first, mass, peak = _local_moments(heatmaps, radius)
    safe = torch.where(mass > 0, mass, torch.ones_like(mass))
    return torch.where(mass > 0, first / safe, peak)


def centroid_train(heatmaps: torch.Tensor, eps: float = 1e-6, *,
                   local: bool = False) -> torch.Tensor:
    """Differentiable :func:`centroid` (or :func:`local_centroid`) for training.

    ``eps`` in the mass, no fallback; the local window follows the argmax without gradient.
    """
    first, mass = (_local_moments(heatmaps, LOCAL_RADIUS)[:2] if local
                   else _relu_moments(heatmaps))
    return first / (mass + eps)


def read_keypoints(heatmaps: torch.Tensor, readout: str) -> torch.Tensor:
    """Dispatch on the readout name."""
    if readout == 'centroid':
        return centroid(heatmaps)
    if readout == 'local-centroid':
        return local_centroid(heatmaps)
    if readout == 'soft-argmax':
        return soft_argmax(heatmaps)
    if readout == 'argmax':
        return hard_argmax(heatmaps)
    raise ValueError(f'unknown readout {readout!r}; choose one of {READOUTS}')


def peak_scores(heatmaps: torch.Tensor) -> torch.Tensor:
    """(..., K) confidence in [0, 1]: softmax mass in the 3x3 cells around the argmax."""
    shape = heatmaps.shape
    h, w = shape[-2:]
    flat = heatmaps.reshape(-1, h, w)
    p = torch.softmax(flat.flatten(-2), dim=-1).view(-1, 1, h, w)
    mass = torch.nn.functional.avg_pool2d(p, 3, stride=1, padding=1, count_include_pad=True) * 9
    idx = flat.flatten(-2).argmax(dim=-1)
    return mass.flatten(-3).gather(1, idx[:, None])[:, 0].view(shape[:-2])

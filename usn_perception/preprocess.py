"""Image → network-input preprocessing, and the pixel mapping back to image coordinates.

Everything here is *linear with non-negative weights* after the photometric clip, so the bound
engine can push certified affine bounds through it exactly: grayscale conversion is a convex
combination of channels, and resizing is an area-weighted average (each output pixel is a
convex combination of input pixels). Resizing is our own (not OpenCV's) so that ``predict`` and
``certify`` share one operator and one pixel convention: the centre of the top-left pixel is
(0, 0), x right, y down.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from usn_perception.errors import ImageError

#: ITU-R BT.601 luma weights (R, G, B); non-negative and summing to 1.
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def image_to_float(image: np.ndarray) -> np.ndarray:
    """Return ``image`` as float64 in [0, 1], shape HxW or HxWxC (C = 1 or 3).

    uint8 is scaled by 1/255, uint16 by 1/65535; float images are used as they are (no
    re-quantisation), so perturbing a float image and predicting on it is exactly the
    perturbation that certificates speak about. Raises :class:`ImageError` on empty images,
    wrong shapes, NaN/inf pixels or float values outside [0, 1].
    """
    image = check_image(image)
    if image.dtype == np.uint8:
        return image.astype(np.float64) / 255.0
    if image.dtype == np.uint16:
        return image.astype(np.float64) / 65535.0
    return image.astype(np.float64, copy=False)


def check_image(image: np.ndarray) -> np.ndarray:
    """Validate ``image`` as :func:`image_to_float` does and return it HxW or HxWx3, unconverted.

    For callers that read the integer codes themselves (the bound engine's value table) and
    need no float copy of the frame.
    """
    if not isinstance(image, np.ndarray):
        raise ImageError(f'image must be a numpy array, got {type(image).__name__}')
    if image.ndim == 3 and image.shape[2] == 1:
        image = image[:, :, 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] != 3):
        raise ImageError(f'image must be HxW or HxWx3, got shape {image.shape}')
    if image.shape[0] < 2 or image.shape[1] < 2:
        raise ImageError(f'image is empty or too small: shape {image.shape}')
    if image.dtype in (np.uint8, np.uint16):
        return image
    if np.issubdtype(image.dtype, np.floating):
        if not np.isfinite(image).all():
            raise ImageError('image holds NaN or infinite pixels')
        lo, hi = float(image.min()), float(image.max())
        if lo < 0.0 or hi > 1.0:
            raise ImageError(f'float image must lie in [0, 1], got range [{lo:g}, {hi:g}]')
        return image
    raise ImageError(f'unsupported image dtype {image.dtype} (use uint8, uint16 or float)')


def to_gray(image: np.ndarray) -> np.ndarray:
    """Convex combination of the colour channels (identity on gray images)."""
    if image.ndim == 2:
        return image
    w = np.asarray(GRAY_WEIGHTS, dtype=np.float64)
    return image @ w


@lru_cache(maxsize=64)
def area_weights(n_in: int, n_out: int) -> np.ndarray:
    """Area-resampling matrix (n_out × n_in): each row is non-negative and sums to 1.

    Output pixel j covers the input interval [j·s, (j+1)·s) in pixel-corner coordinates,
    s = n_in / n_out, and averages the input pixels by overlap length. Its centre maps to
    input coordinate (j + 0.5)·s − 0.5 in the pixel-centre convention.
    """
    if n_in < 1 or n_out < 1:
        raise ValueError(f'invalid resize {n_in} -> {n_out}')
    s = n_in / n_out
    weights = np.zeros((n_out, n_in), dtype=np.float64)
    for j in range(n_out):
        a, b = j * s, (j + 1) * s
        i0, i1 = int(np.floor(a)), min(int(np.ceil(b)), n_in)
        for i in range(i0, i1):
            overlap = min(b, i + 1) - max(a, i)
            if overlap > 0:
                weights[j, i] = overlap
    weights /= weights.sum(axis=1, keepdims=True)
    weights.setflags(write=False)
    return weights


def resize_area(gray: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a HxW (or NxHxW) gray image to ``size`` = (W, H) with :func:`area_weights`.

    Returns a float64 tensor. Being ``Ry @ img @ Rx.T`` with non-negative rows summing to 1,
    it commutes with ``alpha * x + beta`` and preserves the [0, 1] range.
    """
    t = torch.as_tensor(gray, dtype=torch.float64)
    h_in, w_in = t.shape[-2:]
    w_out, h_out = size
    if h_in % h_out == 0 and w_in % w_out == 0 and t.ndim in (2, 3):
        # Whole blocks (640x480 -> 128x96): every weight is 1/(fy·fx), a box average; the
        # pooling kernel is ~7x faster than the two matrix products (same weights, the sum
        # rounded in another order).
        fy, fx = h_in // h_out, w_in // w_out
        out = F.avg_pool2d(t.reshape(-1, 1, h_in, w_in), (fy, fx))
        return out.reshape(*t.shape[:-2], h_out, w_out)
    ry = torch.from_numpy(np.array(area_weights(h_in, h_out)))
    rx = torch.from_numpy(np.array(area_weights(w_in, w_out)))
    return ry @ t @ rx.T


@dataclass(frozen=True)
class PixelMapping:
    """Monotone affine map between heatmap cells and input-image pixels (both centre-origin).

    ``u_image = (u_heatmap + 0.5) * scale_x - 0.5`` with a positive scale, so lower and upper
    bounds map to lower and upper bounds; :meth:`to_image_outward` rounds them outward.
    """

    scale_x: float
    scale_y: float

    @classmethod
    def for_image(
        cls, image_size: tuple[int, int], heatmap_size: tuple[int, int]
    ) -> PixelMapping:
        """Mapping for an image of ``image_size`` (W, H) read out on ``heatmap_size`` (W, H)."""
        return cls(image_size[0] / heatmap_size[0], image_size[1] / heatmap_size[1])

    def to_image(self, uv: np.ndarray) -> np.ndarray:
        """Map (..., 2) heatmap coordinates to image pixels (nominal, no rounding)."""
        uv = np.asarray(uv, dtype=np.float64)
        scale = np.array([self.scale_x, self.scale_y])
        return (uv + 0.5) * scale - 0.5

    def to_heatmap(self, uv: np.ndarray) -> np.ndarray:
        """Inverse of :meth:`to_image` (used to build training targets)."""
        uv = np.asarray(uv, dtype=np.float64)
        scale = np.array([self.scale_x, self.scale_y])
        return (uv + 0.5) / scale - 0.5

    def to_image_outward(self, lo: np.ndarray, hi: np.ndarray, axis: int) -> tuple:
        """Map interval bounds on one axis (0 = u/x, 1 = v/y), rounding lo down and hi up."""
        scale = self.scale_x if axis == 0 else self.scale_y
        lo = np.asarray(lo, dtype=np.float64)
        hi = np.asarray(hi, dtype=np.float64)
        lo_img = (lo + 0.5) * scale - 0.5
        hi_img = (hi + 0.5) * scale - 0.5
        # Two roundings per bound at most: step two ulps outward.
        lo_img = np.nextafter(np.nextafter(lo_img, -np.inf), -np.inf)
        hi_img = np.nextafter(np.nextafter(hi_img, np.inf), np.inf)
        return lo_img, hi_img

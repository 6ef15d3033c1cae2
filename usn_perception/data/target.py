"""Geometry and exact rendering of the ViSP ``mire-2`` 5-dot visual-servoing target.

The real target (see ``docs/data.md``) is a matte black panel with four small white dots near
its corners and one large white dot in the middle, glued on a light cardboard box. Geometry is
in *target units*: origin at the centre dot, x right, y down, 1 unit = horizontal distance
between corner-dot centres. The numbers were measured on rectified real frames.

Rendering warps a high-resolution anti-aliased template with ``cv2.warpPerspective`` onto a
supersampled region and box-averages it back, so the exact label of a keypoint is the
homography applied to its dot centre (cv2 and this package both put integer coordinates at
pixel centres).
"""

from __future__ import annotations

from functools import lru_cache

import cv2
import numpy as np

KEYPOINT_NAMES: tuple[str, ...] = (
    'top_left',
    'top_right',
    'bottom_right',
    'bottom_left',
    'centre',
)

DOT_PITCH_X = 1.0
DOT_PITCH_Y = 0.83
CORNER_DOT_RADIUS = 0.0625
CENTRE_DOT_RADIUS = 0.23
PANEL_HALF_WIDTH = 0.75
PANEL_HALF_HEIGHT = 0.585

KEYPOINTS_TARGET = np.array(
    [
        [-DOT_PITCH_X / 2, -DOT_PITCH_Y / 2],
        [DOT_PITCH_X / 2, -DOT_PITCH_Y / 2],
        [DOT_PITCH_X / 2, DOT_PITCH_Y / 2],
        [-DOT_PITCH_X / 2, DOT_PITCH_Y / 2],
        [0.0, 0.0],
    ],
    dtype=np.float64,
)
"""Keypoints in target units, in ``KEYPOINT_NAMES`` order."""

DOT_RADII = np.array([CORNER_DOT_RADIUS] * 4 + [CENTRE_DOT_RADIUS], dtype=np.float64)

_TEMPLATE_PPU = 512.0  # template pixels per target unit
_TEMPLATE_PAD = 4  # empty template pixels around the panel


def panel_corners(margin: float = 0.0) -> np.ndarray:
    """Return the (4, 2) corners TL, TR, BR, BL of the panel grown by ``margin`` units."""
    hw, hh = PANEL_HALF_WIDTH + margin, PANEL_HALF_HEIGHT + margin
    return np.array([[-hw, -hh], [hw, -hh], [hw, hh], [-hw, hh]], dtype=np.float64)


def project_points(homography: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Apply a 3x3 homography to (N, 2) points, in float64."""
    h = np.asarray(homography, dtype=np.float64)
    p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    q = p @ h[:, :2].T + h[:, 2]
    if np.any(q[:, 2] <= 0):
        raise ValueError('homography maps a point behind the camera')
    return q[:, :2] / q[:, 2:3]


def target_keypoints(homography: np.ndarray) -> np.ndarray:
    """Return the exact (5, 2) image keypoints for a target-units -> pixels homography."""
    return project_points(homography, KEYPOINTS_TARGET)


@lru_cache(maxsize=1)
def _template() -> tuple[np.ndarray, np.ndarray]:
    """Build the (H, W) float32 template ``panel + dots`` and its unit->px matrix.

    Coverage is analytic (box filter for the panel, signed distance for the dots), so every
    dot is symmetric about its centre and its centroid is exactly the labelled point. One
    channel holds both layers (a value in [0, 1] is panel coverage, in [1, 2] is 1 + dot
    coverage): dot edges lie far inside the panel, so the two never mix under interpolation,
    and a single-channel warp is four times faster than a two-channel one.
    """
    wt = int(np.ceil(2 * PANEL_HALF_WIDTH * _TEMPLATE_PPU)) + 2 * _TEMPLATE_PAD
    ht = int(np.ceil(2 * PANEL_HALF_HEIGHT * _TEMPLATE_PPU)) + 2 * _TEMPLATE_PAD
    cx, cy = (wt - 1) / 2.0, (ht - 1) / 2.0
    to_px = np.array([[_TEMPLATE_PPU, 0, cx], [0, _TEMPLATE_PPU, cy], [0, 0, 1]], np.float64)
    xs = np.arange(wt, dtype=np.float64) - cx  # template px relative to the centre
    ys = np.arange(ht, dtype=np.float64) - cy

    def overlap(c: np.ndarray, half: float) -> np.ndarray:
        return np.clip(np.minimum(c + 0.5, half) - np.maximum(c - 0.5, -half), 0.0, 1.0)

    half_w, half_h = PANEL_HALF_WIDTH * _TEMPLATE_PPU, PANEL_HALF_HEIGHT * _TEMPLATE_PPU
    panel = np.outer(overlap(ys, half_h), overlap(xs, half_w))
    dots = np.zeros((ht, wt), np.float64)
    for (ux, uy), r in zip(KEYPOINTS_TARGET, DOT_RADII, strict=True):
        d = np.hypot(xs[None, :] - ux * _TEMPLATE_PPU, ys[:, None] - uy * _TEMPLATE_PPU)
        dots = np.maximum(dots, np.clip(r * _TEMPLATE_PPU - d + 0.5, 0.0, 1.0))
    template = np.ascontiguousarray((panel + dots).astype(np.float32))
    template.setflags(write=False)
    return template, to_px


def _block_mean(a: np.ndarray, s: int) -> np.ndarray:
    """Average s x s blocks (INTER_AREA at an integer factor is exactly a box average)."""
    return cv2.resize(a, (a.shape[1] // s, a.shape[0] // s), interpolation=cv2.INTER_AREA)


def composite_target(
    image: np.ndarray,
    homography: np.ndarray,
    *,
    panel_level: float,
    dot_level: float,
    card_level: float | None = None,
    card_margin: float = 0.0,
    supersample: int = 4,
) -> None:
    """Draw the target in place onto a float32 image in [0, 1] (pixel-centre coordinates).

    ``homography`` maps target units to image pixels. Layers are alpha-composited (card, then
    panel, then dots) at ``supersample`` x resolution and box-averaged, so edges are
    anti-aliased and each dot's intensity centroid stays on its projected centre to within
    perspective distortion (a small fraction of a pixel at realistic poses).
    """
    if image.ndim != 2 or image.dtype != np.float32:
        raise ValueError('image must be a 2-D float32 array')
    outline = panel_corners(card_margin if card_level is not None else 0.0)
    corners = project_points(homography, outline)
    hgt, wid = image.shape
    x0 = max(int(np.floor(corners[:, 0].min())) - 2, 0)
    y0 = max(int(np.floor(corners[:, 1].min())) - 2, 0)
    x1 = min(int(np.ceil(corners[:, 0].max())) + 3, wid)
    y1 = min(int(np.ceil(corners[:, 1].max())) + 3, hgt)
    if x1 <= x0 or y1 <= y0:
        return
    w, h = x1 - x0, y1 - y0
    # Enough supersampling that the template is never decimated by more than ~2x, capped.
    ppu = np.linalg.norm(corners[1] - corners[0]) / (outline[1, 0] - outline[0, 0])
    s = int(min(max(supersample, 1), max(2, np.ceil(_TEMPLATE_PPU / max(ppu, 1e-6) / 2))))
    # final pixel x <-> super-ROI pixel X = s * (x - x0) + (s - 1) / 2 (block centres).
    to_roi = np.array([[s, 0, (s - 1) / 2 - s * x0], [0, s, (s - 1) / 2 - s * y0], [0, 0, 1.0]])
    template, to_px = _template()
    warp = to_roi @ np.asarray(homography, np.float64) @ np.linalg.inv(to_px)
    cover = cv2.warpPerspective(
        template, warp, (w * s, h * s), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT
    )
    cover = _block_mean(cover, s)
    roi = image[y0:y1, x0:x1]
    if card_level is not None:
        shift = 8
        poly = corners * s + (s - 1) / 2 - np.array([s * x0, s * y0])
        poly_fixed = np.round(poly * (1 << shift)).astype(np.int32)
        mask = np.zeros((h * s, w * s), np.uint8)
        cv2.fillConvexPoly(mask, poly_fixed, 255, lineType=cv2.LINE_8, shift=shift)
        card = _block_mean(mask.astype(np.float32), s) / 255.0
        roi *= 1.0 - card
        roi += np.float32(card_level) * card
    panel, dots = np.minimum(cover, 1.0), np.maximum(cover - 1.0, 0.0)
    roi *= 1.0 - panel
    roi += np.float32(panel_level) * panel
    roi *= 1.0 - dots
    roi += np.float32(dot_level) * dots

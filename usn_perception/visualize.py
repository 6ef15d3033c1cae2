"""Pictures people look at: keypoints with their certified boxes drawn on the frame.

One drawing function serves the node's debug image, the demo and the reports, so a box means
the same thing everywhere: green = certified, red = not certified, nominal keypoint as a dot.
"""

from __future__ import annotations

from collections.abc import Sequence

import cv2
import numpy as np

GREEN = (60, 200, 60)
RED = (40, 40, 230)
YELLOW = (0, 220, 255)
WHITE = (255, 255, 255)


def to_bgr8(image: np.ndarray) -> np.ndarray:
    """Any HxW / HxWx3 uint8/uint16/float image → a contiguous BGR uint8 copy."""
    img = np.asarray(image)
    if img.dtype == np.uint16:
        img = (img >> 8).astype(np.uint8)
    elif img.dtype != np.uint8:
        img = (np.clip(np.nan_to_num(img.astype(np.float64)), 0, 1) * 255 + 0.5).astype(np.uint8)
    if img.ndim == 2:
        img = cv2.cvtColor(img, cv2.COLOR_GRAY2BGR)
    return np.ascontiguousarray(img)


def draw_keypoints(
    image: np.ndarray,
    keypoints: np.ndarray,
    *,
    boxes: np.ndarray | None = None,
    certified: Sequence[bool] | None = None,
    truth: np.ndarray | None = None,
    names: Sequence[str] | None = None,
    text: str | None = None,
    scale: int = 1,
) -> np.ndarray:
    """Draw nominal keypoints (K, 2), optional boxes (K, 4) [u_lo, u_hi, v_lo, v_hi] and truth.

    Coordinates use the pixel-centre convention, so pixel (x, y) is drawn at its centre.
    ``scale`` enlarges small frames (nearest) before drawing so boxes stay visible.
    """
    canvas = to_bgr8(image)
    if scale > 1:
        canvas = cv2.resize(canvas, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)

    def px(x: float, y: float) -> tuple[int, int]:
        return int(round((x + 0.5) * scale - 0.5)), int(round((y + 0.5) * scale - 0.5))

    kps = np.asarray(keypoints, dtype=np.float64)
    for k, (x, y) in enumerate(kps):
        ok = True if certified is None else bool(certified[k])
        colour = GREEN if ok else RED
        if boxes is not None and np.all(np.isfinite(boxes[k])):
            u_lo, u_hi, v_lo, v_hi = boxes[k]
            cv2.rectangle(canvas, px(u_lo, v_lo), px(u_hi, v_hi), colour, 1, cv2.LINE_AA)
        if np.isfinite(x) and np.isfinite(y):
            cv2.circle(canvas, px(x, y), 2, colour, -1, cv2.LINE_AA)
            if names is not None:
                cv2.putText(canvas, str(names[k]), px(x + 4, y - 4), cv2.FONT_HERSHEY_SIMPLEX,
                            0.35, colour, 1, cv2.LINE_AA)
    if truth is not None:
        for x, y in np.asarray(truth, dtype=np.float64):
            if np.isfinite(x) and np.isfinite(y):
                cx, cy = px(x, y)
                cv2.drawMarker(canvas, (cx, cy), YELLOW, cv2.MARKER_CROSS, 7, 1)
    if text:
        for i, line in enumerate(text.splitlines()):
            org = (6, 16 + 16 * i)
            # White on a dark band: a thick black outline under thin text smears small glyphs.
            (tw, th), base = cv2.getTextSize(line, cv2.FONT_HERSHEY_SIMPLEX, 0.45, 1)
            cv2.rectangle(canvas, (org[0] - 3, org[1] - th - 3), (org[0] + tw + 3, org[1] + base),
                          (0, 0, 0), -1)
            cv2.putText(canvas, line, org, cv2.FONT_HERSHEY_SIMPLEX, 0.45, WHITE, 1, cv2.LINE_AA)
    return canvas


def draw_certificate(
    frame: np.ndarray,
    keypoints: np.ndarray,
    boxes: np.ndarray,
    certified: Sequence[bool],
    alpha: Sequence[float],
    beta: Sequence[float],
    *,
    mode: str = '',
    scale: int = 1,
) -> np.ndarray:
    """The node's ``~/debug_image``: keypoints, boxes (green certified, red not), Θ as text.

    ``frame`` is gray or RGB (the node's decoded channel order); the result is BGR uint8.
    """
    bgr = frame[:, :, ::-1] if frame.ndim == 3 else frame
    ok = np.asarray(certified, dtype=bool)
    text = (f'alpha [{alpha[0]:.3f}, {alpha[1]:.3f}] beta [{beta[0]:+.3f}, {beta[1]:+.3f}]'
            + (f' {mode}' if mode else '') + f'\n{int(ok.sum())}/{ok.size} certified')
    return draw_keypoints(bgr, np.asarray(keypoints, np.float64), boxes=boxes, certified=ok,
                          text=text, scale=scale)


def tile(images: Sequence[np.ndarray], columns: int = 3) -> np.ndarray:
    """Tile equally-sized BGR images into a grid (blank cells pad the last row)."""
    if not images:
        raise ValueError('nothing to tile')
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * h, columns * w, 3), np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, columns)
        grid[r * h:(r + 1) * h, c * w:(c + 1) * w] = cv2.resize(to_bgr8(img), (w, h))
    return grid

"""Classical detector of the 5-dot target, used to pseudo-label real frames.

Threshold at a few global levels, take bright connected components, and look for the one
configuration the target makes: a large blob with four smaller, similar blobs around it whose
quadrilateral is convex, has its diagonals crossing at the large blob, and sits on a dark panel.
Corner centres are intensity-weighted centroids over each blob (grown by a couple of pixels,
background level subtracted); the centre keypoint is where the diagonals of the four corner
centres cross, which is exact under perspective where the big dot's centroid is not.
It returns nothing rather than a doubtful answer: labels that come out of it are called
*pseudo-labels* and must be right when present.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from usn_perception.data.coco import PIXEL_CENTRE, KeypointSample, save_coco
from usn_perception.data.target import KEYPOINT_NAMES, KEYPOINTS_TARGET
from usn_perception.errors import DatasetError, ImageError

DETECTOR_VERSION = 1

_N_LEVELS = 6  # global thresholds tried between the dark and bright intensity percentiles
_MIN_AREA = 4  # px, smallest corner dot
_MIN_CENTRE_AREA = 100  # px, smallest centre dot (about 11 px across)
_MIN_FILL = 0.45  # blob area / bounding-box area
_CORNER_AREA_RATIO = (0.02, 0.16)  # corner / centre blob area (nominal 0.074)
_CORNER_DIST = (1.7, 5.8)  # corner distance / centre equivalent radius (nominal 2.8)
_CORNER_AREA_SPREAD = 4.0  # max / min corner blob area
_MAX_DIAG_ERROR = 0.2  # diagonal crossing vs centre centroid, in centre radii (+ 1 px)
_MIN_CONTRAST = 25.0  # grey levels between the dimmest dot and the brightest panel sample
_MAX_CANDIDATES = 10  # corner candidates kept per centre blob
_MAX_ANGLE_ERROR = np.deg2rad(60.0)  # corner direction vs nominal TL/TR/BR/BL direction
_MIN_GAP, _MAX_GAP = np.deg2rad(12.0), np.deg2rad(168.0)  # between consecutive corners

_NOMINAL_ANGLES = np.arctan2(*(KEYPOINTS_TARGET[:4] - KEYPOINTS_TARGET[4]).T[::-1])
_CENTRE_QUAD_RATIO = (0.14, 0.27)  # centre dot area / corner quadrilateral area (nominal 0.2)
_CENTRE_FILL = (0.93, 1.07)  # area / moment-ellipse area of the centre dot
_CORNER_FILL = (0.6, 1.3)  # same, small dots (pixelised, so lenient)
_MIN_DOT_UNIFORMITY = 0.5  # (dimmest dot - panel) / (brightest dot - panel)
_PANEL_GROW = 1.15  # panel polygon = corners pushed out from the centre by this factor
# Sample points (fractions along centre->corner and between corners) that must be dark panel.
_DARK_ALONG = (0.6, 1.2)


@dataclass(frozen=True)
class _Blob:
    label: int
    centroid: np.ndarray  # (2,) x, y
    area: int
    bbox: tuple[int, int, int, int]  # x, y, w, h


def _as_gray_u8(gray: np.ndarray) -> np.ndarray:
    a = np.asarray(gray)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[..., 0]
    if a.ndim != 2 or a.size == 0:
        raise ImageError(f'expected a non-empty (H, W) grayscale image, got shape {a.shape}')
    if a.dtype != np.uint8:
        raise ImageError(f'expected a uint8 image, got dtype {a.dtype}')
    return np.ascontiguousarray(a)


def _thresholds(img: np.ndarray) -> list[float]:
    lo, hi = np.percentile(img, (5.0, 99.5))
    if hi - lo < 2 * _MIN_CONTRAST:
        return []
    otsu, _ = cv2.threshold(img, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    levels = [float(t) for t in np.linspace(lo, hi, _N_LEVELS + 2)[1:-1]]
    return [float(otsu), *sorted(levels, key=lambda t: abs(t - otsu))]


def _blobs(
    cc: tuple[int, np.ndarray, np.ndarray, np.ndarray], shape: tuple[int, ...]
) -> list[_Blob]:
    """Plausible dots among connected components: compact, not huge, not cut by the border."""
    n, _, stats, cents = cc
    h, w = shape
    out = []
    for i in range(1, n):
        x, y, bw, bh, area = (int(v) for v in stats[i])
        if area < _MIN_AREA or area > 0.25 * h * w:
            continue
        if x == 0 or y == 0 or x + bw == w or y + bh == h:
            continue
        if area < _MIN_FILL * bw * bh or max(bw, bh) > 5 * min(bw, bh):
            continue
        out.append(_Blob(i, cents[i].astype(np.float64), area, (x, y, bw, bh)))
    return out


def _line_intersection(
    p1: np.ndarray, p2: np.ndarray, p3: np.ndarray, p4: np.ndarray
) -> np.ndarray | None:
    """Intersection of line p1-p2 with line p3-p4 (None if parallel)."""
    d1, d2 = p2 - p1, p4 - p3
    den = d1[0] * d2[1] - d1[1] * d2[0]
    if abs(den) < 1e-9:
        return None
    t = ((p3[0] - p1[0]) * d2[1] - (p3[1] - p1[1]) * d2[0]) / den
    return p1 + t * d1


def _is_convex(quad: np.ndarray) -> bool:
    d = np.roll(quad, -1, axis=0) - quad
    cross = d[:, 0] * np.roll(d, -1, axis=0)[:, 1] - d[:, 1] * np.roll(d, -1, axis=0)[:, 0]
    return bool(np.all(cross > 0) or np.all(cross < 0))


def _sample(img: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """Median of the 3x3 neighbourhood at each point (points clipped into the image)."""
    h, w = img.shape
    xs = np.clip(np.rint(pts[:, 0]).astype(int), 1, w - 2)
    ys = np.clip(np.rint(pts[:, 1]).astype(int), 1, h - 2)
    patches = np.stack([img[ys + dy, xs + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1)])
    return np.median(patches, axis=0)


def _ellipse_fill(labels: np.ndarray, blob: _Blob) -> float:
    """Area over the area of the ellipse with the blob's second moments (1 for an ellipse)."""
    x, y, bw, bh = blob.bbox
    x1, y1 = x + bw, y + bh
    m = cv2.moments((labels[y:y1, x:x1] == blob.label).astype(np.uint8), True)
    det = m['mu20'] * m['mu02'] - m['mu11'] ** 2
    if m['m00'] <= 0 or det <= 0:
        return 0.0
    return float(m['m00'] ** 2 / (4 * np.pi * np.sqrt(det)))


def _panel_is_clean(
    binary: np.ndarray, centre: _Blob, corners: tuple[_Blob, ...], pts: np.ndarray
) -> bool:
    """Inside the panel (corners pushed out by 15 %) only the five dots may be bright."""
    poly = centre.centroid + _PANEL_GROW * (pts - centre.centroid)
    x0, y0 = np.floor(poly.min(axis=0)).astype(int)
    x1, y1 = np.ceil(poly.max(axis=0)).astype(int) + 1
    h, w = binary.shape
    x0, y0, x1, y1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    mask = np.zeros((y1 - y0, x1 - x0), np.uint8)
    cv2.fillConvexPoly(mask, np.rint(poly - [x0, y0]).astype(np.int32), 1)
    bright = int(np.count_nonzero(binary[y0:y1, x0:x1] & mask))
    dots = centre.area + sum(b.area for b in corners)
    return bright <= 1.1 * dots + 20


def _score(
    img: np.ndarray,
    binary: np.ndarray,
    labels: np.ndarray,
    thr: float,
    centre: _Blob,
    corners: tuple[_Blob, ...],
) -> tuple[float, np.ndarray] | None:
    """Return (score, ordered (4,) corner order) if the configuration passes all checks."""
    c = centre.centroid
    area_list = [b.area for b in corners]
    if max(area_list) > _CORNER_AREA_SPREAD * min(area_list):
        return None
    angles = [math.atan2(b.centroid[1] - c[1], b.centroid[0] - c[0]) for b in corners]
    order = sorted(range(4), key=angles.__getitem__)
    a = [angles[i] for i in order]
    gaps = [a[1] - a[0], a[2] - a[1], a[3] - a[2], a[0] + 2 * math.pi - a[3]]
    if min(gaps) < _MIN_GAP or max(gaps) > _MAX_GAP:
        return None
    order = np.array(order)
    pts = np.array([corners[i].centroid for i in order])
    ang = np.array(a)
    if not _is_convex(pts):
        return None
    areas = np.array([corners[i].area for i in order], dtype=np.float64)
    cross = _line_intersection(pts[0], pts[2], pts[1], pts[3])
    if cross is None:
        return None
    rc = np.sqrt(centre.area / np.pi)
    err = np.linalg.norm(cross - c)
    if err > _MAX_DIAG_ERROR * rc + 1.0:
        return None
    dark_pts = [c + f * (pts - c) for f in _DARK_ALONG]
    dark_pts.append((pts + np.roll(pts, -1, axis=0)) / 2)
    dark = _sample(img, np.concatenate(dark_pts))
    bright = _sample(img, np.concatenate([pts, c[None]]))
    if dark.max() >= thr or bright.min() - dark.max() < _MIN_CONTRAST:
        return None
    # All five dots are the same white paint: the dimmest is not much dimmer than the rest.
    if bright.min() - dark.max() < _MIN_DOT_UNIFORMITY * (bright.max() - dark.max()):
        return None
    # Assign TL/TR/BR/BL: the cyclic shift that best matches the nominal directions.
    best_shift, best_dev = 0, np.inf
    for k in range(4):
        diff = np.angle(np.exp(1j * (np.roll(ang, -k) - _NOMINAL_ANGLES)))
        dev = float(np.max(np.abs(diff)))
        if dev < best_dev:
            best_shift, best_dev = k, dev
    if best_dev > _MAX_ANGLE_ERROR:
        return None
    nxt = np.roll(pts, -1, axis=0)
    quad_area = 0.5 * abs(float(np.sum(pts[:, 0] * nxt[:, 1] - pts[:, 1] * nxt[:, 0])))
    if not _CENTRE_QUAD_RATIO[0] <= centre.area / quad_area <= _CENTRE_QUAD_RATIO[1]:
        return None
    if not _CENTRE_FILL[0] <= _ellipse_fill(labels, centre) <= _CENTRE_FILL[1]:
        return None
    if any(not _CORNER_FILL[0] <= _ellipse_fill(labels, b) <= _CORNER_FILL[1] for b in corners):
        return None
    if not _panel_is_clean(binary, centre, corners, pts):
        return None
    spread = float(np.log(areas.max() / areas.min()))
    score = err / rc + 0.1 * spread + 0.2 * best_dev
    return score, np.roll(order, -best_shift)


def _refine(img: np.ndarray, labels: np.ndarray, blob: _Blob, background: float) -> np.ndarray:
    """Intensity-weighted centroid over the blob grown by ~2 px, background subtracted."""
    x, y, bw, bh = blob.bbox
    grow = 2 + int(0.15 * max(bw, bh))
    h, w = img.shape
    x0, y0 = max(x - grow, 0), max(y - grow, 0)
    x1, y1 = min(x + bw + grow, w), min(y + bh + grow, h)
    mask = (labels[y0:y1, x0:x1] == blob.label).astype(np.uint8)
    k = 2 * grow + 1
    mask = cv2.dilate(mask, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    wgt = np.clip(img[y0:y1, x0:x1].astype(np.float64) - background, 0.0, None) * mask
    total = wgt.sum()
    if total <= 0:
        return blob.centroid
    ys, xs = np.mgrid[y0:y1, x0:x1]
    return np.array([(wgt * xs).sum() / total, (wgt * ys).sum() / total])


def _search(img: np.ndarray, thr: float) -> tuple[float, Any] | None:
    """Best configuration among the blobs above ``thr``, or None."""
    binary = (img > thr).astype(np.uint8)
    cc = cv2.connectedComponentsWithStats(binary, connectivity=8)
    blobs = _blobs(cc, img.shape)
    if len(blobs) < 5:
        return None
    cents = np.array([b.centroid for b in blobs])
    areas = np.array([b.area for b in blobs], dtype=np.float64)
    best: tuple[float, Any] | None = None
    for ci in np.argsort(-areas, kind='stable'):
        centre = blobs[ci]
        if centre.area < _MIN_CENTRE_AREA:
            break
        rc = np.sqrt(centre.area / np.pi)
        ratio = areas / centre.area
        dist = np.hypot(*(cents - centre.centroid).T) / rc
        ok = (
            (ratio >= _CORNER_AREA_RATIO[0])
            & (ratio <= _CORNER_AREA_RATIO[1])
            & (dist >= _CORNER_DIST[0])
            & (dist <= _CORNER_DIST[1])
        )
        idx = np.flatnonzero(ok)
        if idx.size < 4:
            continue
        idx = idx[np.argsort(np.abs(np.log(dist[idx] / 2.8)), kind='stable')[:_MAX_CANDIDATES]]
        for combo in itertools.combinations(idx.tolist(), 4):
            got = _score(img, binary, cc[1], thr, centre, tuple(blobs[i] for i in combo))
            if got is not None and (best is None or got[0] < best[0]):
                best = (got[0], (cc[1], thr, centre, [blobs[combo[i]] for i in got[1]]))
    return best


def detect_target(gray: np.ndarray) -> np.ndarray | None:
    """Find the 5-dot target; return (5, 2) float64 keypoints in ``KEYPOINT_NAMES`` order.

    Coordinates follow the package convention (centre of the top-left pixel is (0, 0)).
    Returns ``None`` when no configuration passes every geometric and photometric check.
    Thresholds are tried from Otsu's outwards; the first one that yields a configuration wins.
    """
    img = _as_gray_u8(gray)
    best = None
    for thr in _thresholds(img):
        best = _search(img, thr)
        if best is not None:
            break
    if best is None:
        return None
    labels, thr, centre, corners = best[1]
    c = centre.centroid
    pts = np.array([b.centroid for b in corners])
    dark_pts = np.concatenate([c + f * (pts - c) for f in _DARK_ALONG])
    background = float(np.median(_sample(img, dark_pts)))
    quad = np.array([_refine(img, labels, b, background) for b in corners])
    # The projected centre of the big dot is where the diagonals of the corner-dot centres
    # cross (incidence survives any homography); the big dot's own centroid is biased by
    # perspective (up to ~2 px at strong tilt), so it is only used as a check.
    cross = _line_intersection(quad[0], quad[2], quad[1], quad[3])
    big = _refine(img, labels, centre, background)
    if (
        cross is None
        or np.linalg.norm(cross - big) > _MAX_DIAG_ERROR * np.sqrt(centre.area / np.pi) + 1.0
    ):
        return None
    return np.vstack([quad, cross]).astype(np.float64)


def pseudo_label_frames(
    frames: Sequence[Path], out_json: Path, progress: bool = True
) -> dict[str, Any]:
    """Detect the target in each frame and write the labelled ones as COCO keypoints.

    ``file_name`` is relative to ``out_json``'s folder when the frame lies under it, absolute
    otherwise (frames usually stay in the cache; pass ``image_root`` to ``load_coco`` to move
    them). Returns ``{'total', 'labelled', 'unlabelled': [names], 'json'}``.
    """
    from tqdm import tqdm

    out_json = Path(out_json)
    base = out_json.parent.resolve()
    frames = [Path(f) for f in frames]
    if not frames:
        raise DatasetError(out_json, 'no frames to pseudo-label')
    samples: list[KeypointSample] = []
    unlabelled: list[str] = []
    bar = tqdm(frames, desc='pseudo-label', unit='frame', disable=not progress)
    for i, frame in enumerate(bar):
        img = cv2.imread(str(frame), cv2.IMREAD_GRAYSCALE)
        if img is None:
            raise DatasetError(frame, 'frame is missing or unreadable')
        kp = detect_target(img)
        if kp is None:
            unlabelled.append(frame.name)
            continue
        resolved = frame.resolve()
        try:
            file_name = resolved.relative_to(base).as_posix()
        except ValueError:
            file_name = os.fspath(resolved)
        samples.append(
            KeypointSample(
                image_id=i + 1,
                file_name=file_name,
                image_path=resolved,
                width=img.shape[1],
                height=img.shape[0],
                keypoints=kp,
                visibility=np.full(len(KEYPOINT_NAMES), 2, dtype=np.int64),
                extra={'frame': frame.name},
            )
        )
    info = {
        'description': 'pseudo-labels of the 5-dot target from a classical detector',
        'labels': 'pseudo-labels (usn_perception.data.pseudo_label.detect_target, not human)',
        'pseudo_labels': True,
        'detector_version': DETECTOR_VERSION,
        'frames_total': len(frames),
        'frames_labelled': len(samples),
        'pixel_convention': PIXEL_CENTRE,
    }
    save_coco(out_json, samples, KEYPOINT_NAMES, info)
    return {
        'total': len(frames),
        'labelled': len(samples),
        'unlabelled': unlabelled,
        'json': out_json,
    }

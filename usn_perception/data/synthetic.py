"""Procedural training data: the 5-dot target under random poses, backgrounds and lighting.

Every image is drawn from its own random stream ``default_rng([seed, image_id])``, so the output
is a pure function of (seed, count, size): the same call gives byte-identical files. Splits use
disjoint sets of background photos (``SPLIT_BACKGROUNDS``) so validation and test measure
generalisation to unseen scenes, not memorised backgrounds.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np

from usn_perception.data.coco import PIXEL_CENTRE, KeypointSample, save_coco
from usn_perception.data.target import (
    KEYPOINT_NAMES,
    composite_target,
    panel_corners,
    project_points,
    target_keypoints,
)
from usn_perception.errors import DatasetError

GENERATOR_VERSION = 1

SPLITS: tuple[str, ...] = ('train', 'val', 'test')

SPLIT_BACKGROUNDS: dict[str, tuple[str, ...]] = {
    'train': (
        'astronaut',
        'camera',
        'cell',
        'checkerboard',
        'clock',
        'coins',
        'grass',
        'hubble_deep_field',
        'immunohistochemistry',
        'page',
        'retina',
        'rocket',
        'text',
    ),
    'val': ('chelsea', 'gravel', 'moon'),
    'test': ('brick', 'coffee', 'motorcycle_left', 'motorcycle_right'),
}
"""scikit-image bundled photos (no network needed) used as backgrounds, disjoint per split."""

SPLIT_FRACTIONS: dict[str, float] = {'train': 0.8, 'val': 0.1, 'test': 0.1}

MIN_SIZE = 64
MAX_SIZE = 4096
MAX_COUNT = 999_999  # image ids are written with 6 digits

# Pose and photometric ranges (documented in docs/data.md).
ROLL_DEG = 30.0  # in-plane rotation: TL/TR/BR/BL stay unambiguous
PITCH_DEG = 50.0
YAW_DEG = 40.0
DISTANCE = (2.5, 8.0)  # camera distance in target units: perspective strength
PANEL_WIDTH_FRACTION = (0.25, 0.75)  # panel bounding-box width / image width
ASPECT_JITTER = 0.1  # pixel aspect ratio in [1 - j, 1 + j]
MARGIN_FRACTION = 0.03  # the panel stays this far (of the image size) inside the border


@cache
def load_background(name: str) -> np.ndarray:
    """Return a bundled scikit-image photo as float32 grayscale in [0, 1] (cached, offline)."""
    import skimage.data

    if name.startswith('motorcycle_'):
        left, right, _ = skimage.data.stereo_motorcycle()
        rgb = left if name == 'motorcycle_left' else right
    else:
        loader = getattr(skimage.data, name, None)
        if loader is None:
            raise ValueError(f'unknown scikit-image background {name!r}')
        rgb = loader()
    img = np.asarray(rgb)
    if img.ndim == 3:
        img = cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2GRAY)
    img = img.astype(np.float32)
    if img.max() > 1.0:
        img /= 255.0
    img.setflags(write=False)
    return img


def _background(rng: np.random.Generator, name: str, size: tuple[int, int]) -> np.ndarray:
    """Random crop (area 25-100 % of the largest crop with the output aspect), flip, resize."""
    src = load_background(name)
    w, h = size
    sh, sw = src.shape
    max_w = min(sw, sh * w / h)
    crop_w = max_w * np.sqrt(rng.uniform(0.25, 1.0))
    crop_h = crop_w * h / w
    cx = rng.uniform(crop_w / 2, sw - crop_w / 2)
    cy = rng.uniform(crop_h / 2, sh - crop_h / 2)
    scale = w / crop_w
    # Affine from output pixel centres to source pixel centres, sampled in one pass.
    m = np.array(
        [[1 / scale, 0, cx - (w - 1) / 2 / scale], [0, 1 / scale, cy - (h - 1) / 2 / scale]]
    )
    if scale < 1:
        src = cv2.GaussianBlur(src, (0, 0), sigmaX=0.5 / scale)
    out = cv2.warpAffine(
        src,
        m,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT,
    )
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


def _rotation(roll: float, pitch: float, yaw: float) -> np.ndarray:
    cr, sr = np.cos(roll), np.sin(roll)
    cp, sp = np.cos(pitch), np.sin(pitch)
    cyw, syw = np.cos(yaw), np.sin(yaw)
    rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    ry = np.array([[cyw, 0, syw], [0, 1, 0], [-syw, 0, cyw]])
    return rx @ ry @ rz


def sample_homography(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """Draw a target-units -> pixels homography with the panel fully inside the image.

    A pinhole camera views the planar target (roll, pitch, yaw, distance); a similarity then
    scales the panel to a random fraction of the image width and places it uniformly at random
    with a margin, which keeps the pose distribution independent of the image size.
    """
    w, h = size
    roll = np.deg2rad(rng.uniform(-ROLL_DEG, ROLL_DEG))
    pitch = np.deg2rad(rng.uniform(-PITCH_DEG, PITCH_DEG))
    yaw = np.deg2rad(rng.uniform(-YAW_DEG, YAW_DEG))
    rot = _rotation(roll, pitch, yaw)
    dist = rng.uniform(*DISTANCE)
    # Plane -> normalised camera: [r1 r2 t] with the target centre on the optical axis.
    plane = np.column_stack([rot[:, 0], rot[:, 1], [0.0, 0.0, dist]])
    aspect = rng.uniform(1 - ASPECT_JITTER, 1 + ASPECT_JITTER)
    plane = np.diag([1.0, aspect, 1.0]) @ plane
    corners = project_points(plane, panel_corners())
    lo, hi = corners.min(axis=0), corners.max(axis=0)
    extent = hi - lo
    margin = MARGIN_FRACTION * np.array([w, h], dtype=np.float64)
    avail = np.array([w, h], dtype=np.float64) - 1 - 2 * margin
    max_scale = float(np.min(avail / extent))
    scale = min(rng.uniform(*PANEL_WIDTH_FRACTION) * w / extent[0], max_scale)
    room = avail - scale * extent
    offset = margin + rng.uniform(0.0, 1.0, size=2) * room - scale * lo
    place = np.array([[scale, 0, offset[0]], [0, scale, offset[1]], [0, 0, 1.0]])
    return place @ plane


def _distractors(rng: np.random.Generator, img: np.ndarray) -> None:
    """Add a few bright or dark blobs/bars so that 'any bright blob' is not the target."""
    h, w = img.shape
    for _ in range(int(rng.integers(0, 4))):
        level = float(rng.choice([rng.uniform(0.0, 0.15), rng.uniform(0.8, 1.0)]))
        centre = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        if rng.random() < 0.6:
            axes = (int(rng.integers(2, max(3, w // 12))), int(rng.integers(2, max(3, w // 12))))
            cv2.ellipse(
                img, centre, axes, float(rng.uniform(0, 180)), 0, 360, level, -1, cv2.LINE_AA
            )
        else:
            half = np.array([rng.integers(3, max(4, w // 6)), rng.integers(3, max(4, h // 6))])
            p0, p1 = np.subtract(centre, half), np.add(centre, half)
            cv2.rectangle(img, tuple(map(int, p0)), tuple(map(int, p1)), level, -1)


@dataclass(frozen=True)
class Render:
    """One rendered image with its exact labels and the parameters that produced it."""

    image: np.ndarray  # (H, W) uint8
    keypoints: np.ndarray  # (5, 2) float64, pixel-centre convention
    homography: np.ndarray  # (3, 3) target units -> pixels
    contrast: float  # alpha of x' = clip(alpha * x + beta)
    brightness: float  # beta


def render_sample(
    rng: np.random.Generator, background: str, size: tuple[int, int], *, clean: bool = False
) -> Render:
    """Render one image of the target on ``background`` with exact keypoint labels.

    ``clean=True`` skips distractors, illumination gradient, blur and noise (used by tests
    that check label exactness).
    """
    w, h = size
    img = _background(rng, background, size)
    if not clean and rng.random() < 0.5:
        _distractors(rng, img)
    hom = sample_homography(rng, size)
    card = None if rng.random() < 0.15 else float(rng.uniform(0.45, 0.9))
    composite_target(
        img,
        hom,
        panel_level=float(rng.uniform(0.02, 0.15)),
        dot_level=float(rng.uniform(0.8, 1.0)),
        card_level=card,
        card_margin=float(rng.uniform(0.05, 0.4)),
    )
    if not clean and rng.random() < 0.5:
        # Smooth multiplicative illumination ramp across the frame.
        theta = rng.uniform(0, 2 * np.pi)
        grad = rng.uniform(-0.6, 0.6)
        xs = (np.arange(w, dtype=np.float32) - (w - 1) / 2) / w
        ys = (np.arange(h, dtype=np.float32) - (h - 1) / 2) / h
        ramp = np.float32(np.cos(theta)) * xs[None, :] + np.float32(np.sin(theta)) * ys[:, None]
        img *= np.clip(1.0 + np.float32(grad) * 2.0 * ramp, 0.2, None)
    alpha = float(rng.uniform(0.6, 1.4))
    beta = float(rng.uniform(-0.2, 0.2))
    img = np.clip(np.float32(alpha) * img + np.float32(beta), 0.0, 1.0)
    if not clean:
        if rng.random() < 0.7:
            img = cv2.GaussianBlur(img, (0, 0), sigmaX=float(rng.uniform(0.3, 1.5)))
        sigma = float(rng.uniform(0.0, 0.03))
        img = img + rng.standard_normal(img.shape, dtype=np.float32) * np.float32(sigma)
    image = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    return Render(image, target_keypoints(hom), hom, alpha, beta)


def split_counts(count: int) -> dict[str, int]:
    """Split ``count`` images 80/10/10 with at least one image per split."""
    val = max(1, round(count * SPLIT_FRACTIONS['val']))
    test = max(1, round(count * SPLIT_FRACTIONS['test']))
    return {'train': count - val - test, 'val': val, 'test': test}


def _plan(count: int) -> Iterator[tuple[str, int, str]]:
    """Yield (split, image_id, background) with backgrounds used round-robin within a split."""
    image_id = 1
    for split, n in split_counts(count).items():
        names = SPLIT_BACKGROUNDS[split]
        for i in range(n):
            yield split, image_id, names[i % len(names)]
            image_id += 1


def _check_args(out_dir: Path, count: object, seed: object, size: object) -> tuple[int, int]:
    if isinstance(count, bool) or not isinstance(count, int) or not 3 <= count <= MAX_COUNT:
        raise DatasetError(out_dir, f'count must be an integer in [3, {MAX_COUNT}], got {count!r}')
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(out_dir, f'seed must be a non-negative integer, got {seed!r}')
    try:
        w, h = (int(v) for v in size)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise DatasetError(out_dir, f'size must be (width, height), got {size!r}') from None
    if not (MIN_SIZE <= w <= MAX_SIZE and MIN_SIZE <= h <= MAX_SIZE):
        raise DatasetError(
            out_dir, f'size (width, height) must be within [{MIN_SIZE}, {MAX_SIZE}], got {size!r}'
        )
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DatasetError(out_dir, 'output directory exists and is not empty; refusing to mix')
    return w, h


def make_dataset(
    out_dir: Path,
    count: int,
    seed: int,
    size: tuple[int, int] = (384, 288),
    progress: bool = True,
) -> dict[str, Path]:
    """Render ``count`` images (80/10/10 train/val/test) into ``out_dir``; return split -> JSON.

    Layout: ``out_dir/<split>/annotations.json`` (COCO keypoints, pixel-centre convention) and
    ``out_dir/<split>/images/<6-digit id>.png`` (grayscale uint8). Files are written to a
    sibling staging folder first and moved into place at the end, so an interrupted run never
    leaves a half-written dataset behind.
    """
    out_dir = Path(out_dir)
    size_wh = _check_args(out_dir, count, seed, size)
    from tqdm import tqdm

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f'.{out_dir.name}.partial-', dir=out_dir.parent))
    staging.chmod(0o755)
    try:
        samples: dict[str, list[KeypointSample]] = {s: [] for s in SPLITS}
        for s in SPLITS:
            (staging / s / 'images').mkdir(parents=True)
        plan = list(_plan(count))

        def work(item: tuple[str, int, str]) -> KeypointSample:
            split, image_id, bg = item
            render = render_sample(np.random.default_rng([seed, image_id]), bg, size_wh)
            file_name = f'images/{image_id:06d}.png'
            if not cv2.imwrite(str(staging / split / file_name), render.image):
                raise DatasetError(staging / split / file_name, 'cv2.imwrite failed')
            return KeypointSample(
                image_id=image_id,
                file_name=file_name,
                image_path=out_dir / split / file_name,
                width=size_wh[0],
                height=size_wh[1],
                keypoints=render.keypoints,
                visibility=np.full(len(KEYPOINT_NAMES), 2, dtype=np.int64),
                extra={'background': bg},
            )

        # Each image has its own random stream, so threads (OpenCV and most numpy work release
        # the GIL) change the speed but never the bytes; results come back in plan order.
        workers = min(4, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = pool.map(work, plan)
            bar = tqdm(
                results, total=len(plan), desc='make-dataset', unit='img', disable=not progress
            )
            for (split, _, _), sample in zip(plan, bar, strict=True):
                samples[split].append(sample)
        for split in SPLITS:
            info = {
                'description': 'usn_perception procedural 5-dot target (ViSP mire-2 look-alike)',
                'generator': 'usn_perception.data.synthetic',
                'generator_version': GENERATOR_VERSION,
                'seed': seed,
                'split': split,
                'image_size': list(size_wh),
                'backgrounds': list(SPLIT_BACKGROUNDS[split]),
                'background_source': 'scikit-image bundled data (skimage.data)',
                'labels': 'exact (homography applied to the dot centres)',
                'pixel_convention': PIXEL_CENTRE,
            }
            save_coco(staging / split / 'annotations.json', samples[split], KEYPOINT_NAMES, info)
        if out_dir.exists():
            out_dir.rmdir()  # checked empty above
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {s: out_dir / s / 'annotations.json' for s in SPLITS}

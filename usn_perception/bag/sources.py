"""Frame sources for ``make-bag``: an image folder, a COCO file, the ViSP cache, a synthetic run.

Each source is a :class:`Source`: an iterator of :class:`SourceFrame` (pixels plus, where
known, keypoint labels and the photometric change applied) and the keypoint names, so one bag
writer serves them all. Frames load lazily; a 500-frame sequence never sits in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from usn_perception.errors import DatasetError

PATTERNS = ('sine', 'step', 'ramp', 'none')


@dataclass(frozen=True)
class SourceFrame:
    """One frame to record: gray HxW or RGB HxWx3 pixels, a name, optional labels."""

    image: np.ndarray
    name: str
    keypoints: np.ndarray | None = None  # (K, 2) pixel-centre convention
    visibility: np.ndarray | None = None  # (K,) COCO visibility
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Source:
    """Frames plus what the label sidecar needs to describe them."""

    frames: Iterator[SourceFrame]
    count: int
    keypoint_names: tuple[str, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)


def read_frame(path: Path) -> np.ndarray:
    """Gray or RGB pixels of an image file (8 or 16 bit); DatasetError names a bad file."""
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise DatasetError(path, 'image is missing or unreadable')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        img = np.ascontiguousarray(img[:, :, 2::-1])  # BGR(A) → RGB
    if img.dtype not in (np.uint8, np.uint16):
        raise DatasetError(path, f'unsupported pixel type {img.dtype} (need 8 or 16 bit)')
    return img


def _label_index(labels: Path, names: tuple[str, ...] | None):
    """COCO labels keyed by file base name (``file_name`` or the pseudo-labeller's ``frame``)."""
    from usn_perception.data.coco import load_coco

    ds = load_coco(labels, check_images=False, expected_keypoints=names)
    index: dict[str, Any] = {}
    for s in ds:
        for key in {Path(s.file_name).name, str(s.extra.get('frame', ''))} - {''}:
            index[key] = s
    return ds, index


def _files_source(files: list[Path], labels: Path | None, pseudo_label: bool,
                  info: dict[str, Any]) -> Source:
    if not files:
        raise DatasetError(info.get('source', '?'), 'no image files found')
    if labels is not None and pseudo_label:
        raise ValueError('give either a label file or pseudo-labelling, not both')
    names = None
    index: dict[str, Any] = {}
    if labels is not None:
        ds, index = _label_index(labels, None)
        names = ds.keypoint_names
        matched = sum(f.name in index for f in files)
        if matched == 0:
            raise DatasetError(labels, f'no label matches any of the {len(files)} frames by '
                                       f'file name (e.g. {files[0].name!r})')
        info = {**info, 'labels_from': str(labels), 'labels': ds.info.get('labels', ''),
                'pseudo_labels': bool(ds.info.get('pseudo_labels', False))}
    if pseudo_label:
        from usn_perception.data.pseudo_label import DETECTOR_VERSION
        from usn_perception.data.target import KEYPOINT_NAMES

        names = KEYPOINT_NAMES
        info = {**info, 'pseudo_labels': True, 'detector_version': DETECTOR_VERSION,
                'labels': 'pseudo-labels (usn_perception.data.pseudo_label.detect_target, '
                          'not human)'}

    def frames() -> Iterator[SourceFrame]:
        from usn_perception.preprocess import image_to_float, to_gray

        for f in files:
            img = read_frame(f)
            kp = vis = None
            if f.name in index:
                s = index[f.name]
                kp, vis = s.keypoints, s.visibility
            elif pseudo_label:
                from usn_perception.data.pseudo_label import detect_target

                gray = img if img.ndim == 2 and img.dtype == np.uint8 else np.clip(np.rint(
                    np.asarray(to_gray(image_to_float(img))) * 255), 0, 255).astype(np.uint8)
                kp = detect_target(gray)
                vis = None if kp is None else np.full(len(names), 2, dtype=np.int64)
            yield SourceFrame(img, f.name, kp, vis, {'source_file': f.name})

    return Source(frames(), len(files), names, info)


def folder_source(folder: Path, labels: Path | None = None,
                  pseudo_label: bool = False) -> Source:
    """Every image of ``folder`` in name order; labels matched by file name."""
    from usn_perception.data.visp import list_frames

    return _files_source(list_frames(folder), labels, pseudo_label,
                         {'source': f'image folder {folder}'})


def visp_source(sequence: str = 'mire-2', cache: Path | None = None,
                labels: Path | None = None, pseudo_label: bool = False) -> Source:
    """A ViSP sequence from the cache, fetched first when missing (GPL-2 frames, not ours)."""
    from usn_perception.data.visp import default_cache_dir, fetch_visp, list_frames

    folder = fetch_visp(cache or default_cache_dir(), sequence)
    return _files_source(list_frames(folder), labels, pseudo_label,
                         {'source': f'ViSP sequence {sequence} (visp-images-data, GPL-2)'})


def coco_source(path: Path) -> Source:
    """The images of a COCO keypoints file in file order, with their labels."""
    from usn_perception.data.coco import load_coco

    ds = load_coco(path)

    def frames() -> Iterator[SourceFrame]:
        for s in ds:
            yield SourceFrame(read_frame(s.image_path), s.file_name, s.keypoints,
                              s.visibility, {'source_file': s.file_name,
                                             'source_image_id': s.image_id})

    info = {'source': f'COCO file {path}', 'labels_from': str(path),
            'labels': ds.info.get('labels', ''),
            'pseudo_labels': bool(ds.info.get('pseudo_labels', False))}
    return Source(frames(), len(ds), ds.keypoint_names, info)


def lighting(pattern: str, count: int, amp_alpha: float, amp_beta: float,
             ) -> list[tuple[float, float]]:
    """The scripted θ(t) = (α, β) of each frame.

    ``sine``: one period over the run, β a quarter period behind α; ``step``: identity for the
    first half, then (1 + amp_alpha, amp_beta) (a light switched on); ``ramp``: linear from
    the identity to (1 + amp_alpha, amp_beta); ``none``: the identity throughout.
    """
    if pattern not in PATTERNS:
        raise ValueError(f'pattern must be one of {PATTERNS}, got {pattern!r}')
    out = []
    for i in range(count):
        u = i / max(1, count - 1)
        if pattern == 'sine':
            ph = 2 * math.pi * i / count
            a, b = 1 + amp_alpha * math.sin(ph), amp_beta * math.sin(ph - math.pi / 2)
        elif pattern == 'step':
            a, b = (1.0, 0.0) if i < count // 2 else (1 + amp_alpha, amp_beta)
        elif pattern == 'ramp':
            a, b = 1 + amp_alpha * u, amp_beta * u
        else:
            a, b = 1.0, 0.0
        if a <= 0:
            raise ValueError(f'contrast gain must stay positive; frame {i} has {a}')
        out.append((a, b))
    return out


def synthetic_source(count: int, size: tuple[int, int] = (160, 120), seed: int = 0,
                     pattern: str = 'sine', amp_alpha: float = 0.3, amp_beta: float = 0.1,
                     background: str = 'coffee') -> Source:
    """One rendered pose of the 5-dot target under a scripted lighting change.

    Frame i is ``clip(α_i·x + β_i, 0, 1)`` of the rendered frame x, rounded to uint8, so the
    true θ(t) is known (written to the label sidecar as ``alpha``/``beta``) and the labels are
    exact for every frame.
    """
    from usn_perception.data.synthetic import render_sample
    from usn_perception.data.target import KEYPOINT_NAMES

    if int(count) != count or count < 1:
        raise ValueError(f'count must be a positive integer, got {count}')
    thetas = lighting(pattern, count, amp_alpha, amp_beta)
    render = render_sample(np.random.default_rng(seed), background, size)
    base = render.image.astype(np.float64) / 255.0

    def frames() -> Iterator[SourceFrame]:
        for i, (a, b) in enumerate(thetas):
            img = np.clip(np.rint(np.clip(a * base + b, 0.0, 1.0) * 255), 0, 255)
            yield SourceFrame(img.astype(np.uint8), f'frame_{i:06d}', render.keypoints.copy(),
                              np.full(len(KEYPOINT_NAMES), 2, dtype=np.int64),
                              {'alpha': a, 'beta': b})

    info = {'source': f'synthetic 5-dot target, background {background!r}, seed {seed}',
            'labels': 'exact (rendered)', 'lighting': {
                'pattern': pattern, 'amp_alpha': amp_alpha, 'amp_beta': amp_beta,
                'model': "frame = clip(alpha * x + beta, 0, 1) of one rendered frame x"}}
    return Source(frames(), count, KEYPOINT_NAMES, info)

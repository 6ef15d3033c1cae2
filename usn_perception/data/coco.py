"""COCO keypoints JSON: the one dataset format every command reads and writes.

Loading is strict: anything malformed raises :class:`~usn_perception.errors.DatasetError`
naming the file and the entry (``annotations[3] (image_id=17)``), so a bad export fails at load
time instead of as a silent wrong label during training or certification.

Coordinates in memory are always in the *pixel-centre* convention: the centre of the top-left
pixel is (0, 0). Files say which convention they use in ``info.pixel_convention``; files that do
not say (CVAT, Label Studio exports) are read as pixel-corner (top-left corner of the top-left
pixel is (0, 0)) and shifted by -0.5 on load. See ``docs/data.md``.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from usn_perception.errors import DatasetError

PIXEL_CENTRE = 'pixel-centre-origin'
PIXEL_CORNER = 'pixel-corner-origin'
PIXEL_CONVENTIONS = (PIXEL_CENTRE, PIXEL_CORNER)
DEFAULT_FILE_CONVENTION = PIXEL_CORNER
"""Convention assumed for files whose ``info`` does not say (COCO/CVAT/Label Studio style)."""

OUTSIDE_TOLERANCE = 0.1
"""Labelled points may lie at most this fraction of the image size outside the image."""

_IMAGE_KEYS = ('id', 'file_name', 'width', 'height')


@dataclass(frozen=True, eq=False)
class KeypointSample:
    """One image and its keypoints (pixel-centre convention, NaN where unlabelled)."""

    image_id: int
    file_name: str
    image_path: Path
    width: int
    height: int
    keypoints: np.ndarray  # (K, 2) float64
    visibility: np.ndarray  # (K,) int: 0 unlabelled, 1 labelled but occluded, 2 visible
    extra: dict[str, Any] = field(default_factory=dict)  # other fields of the image entry

    @property
    def labelled(self) -> np.ndarray:
        """Return the (K,) boolean mask of labelled keypoints (v > 0)."""
        return self.visibility > 0


@dataclass(eq=False)
class KeypointDataset:
    """A loaded COCO keypoints file: one sample per annotated image."""

    path: Path
    keypoint_names: tuple[str, ...]
    samples: list[KeypointSample]
    info: dict[str, Any]

    def __len__(self) -> int:
        """Return the number of samples."""
        return len(self.samples)

    def __iter__(self) -> Iterator[KeypointSample]:
        """Iterate over samples in file order."""
        return iter(self.samples)

    def __getitem__(self, i: int) -> KeypointSample:
        """Return sample ``i``."""
        return self.samples[i]

    def load_image(self, i: int) -> np.ndarray:
        """Read sample ``i`` as (H, W) uint8 grayscale; check its size against the JSON."""
        return read_image(self.samples[i])


def read_image(sample: KeypointSample) -> np.ndarray:
    """Read ``sample.image_path`` as (H, W) uint8 grayscale, checking it matches the JSON."""
    img = cv2.imread(str(sample.image_path), cv2.IMREAD_GRAYSCALE)
    if img is None:
        raise DatasetError(sample.image_path, 'image file is missing or unreadable')
    if img.shape != (sample.height, sample.width):
        raise DatasetError(
            sample.image_path,
            f'image is {img.shape[1]}x{img.shape[0]} but the JSON says '
            f'{sample.width}x{sample.height} (image_id={sample.image_id})',
        )
    return img


def _image_size(path: Path) -> tuple[int, int] | None:
    """Return (width, height) from a PNG/PNM header without decoding, else by decoding."""
    try:
        with path.open('rb') as f:
            head = f.read(64)
    except OSError:
        return None
    if head[:8] == b'\x89PNG\r\n\x1a\n' and head[12:16] == b'IHDR':
        return int.from_bytes(head[16:20], 'big'), int.from_bytes(head[20:24], 'big')
    if head[:1] == b'P' and head[1:2] in b'123456':
        tokens: list[bytes] = []
        for line in head[2:].split(b'\n'):
            tokens += line.split(b'#', 1)[0].split()
            if len(tokens) >= 2:
                try:
                    return int(tokens[0]), int(tokens[1])
                except ValueError:
                    break
    img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return None if img is None else (img.shape[1], img.shape[0])


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _read_json(path: Path) -> Any:
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(path, 'file not found') from None
    except OSError as e:
        raise DatasetError(path, f'cannot read file: {e.strerror or e}') from None
    try:
        return json.loads(text)
    except UnicodeDecodeError as e:
        raise DatasetError(path, f'not UTF-8 text: {e.reason} at byte {e.start}') from None
    except json.JSONDecodeError as e:
        ended = e.pos >= len(text.rstrip()) or e.msg.startswith('Unterminated string')
        problem = 'truncated JSON' if ended else 'invalid JSON'
        raise DatasetError(
            path, f'{problem}: {e.msg} at line {e.lineno} column {e.colno}'
        ) from None


def _list_field(path: Path, doc: dict[str, Any], key: str) -> list[Any]:
    if key not in doc:
        raise DatasetError(path, f'missing top-level field {key!r}')
    value = doc[key]
    if not isinstance(value, list):
        raise DatasetError(path, f'{key!r} must be a list, got {type(value).__name__}')
    return value


def _keypoint_category(
    path: Path, categories: list[Any], expected: Sequence[str] | None
) -> tuple[int, tuple[str, ...], set[int]]:
    """Return (category id, names, ids of other categories) for the single keypoint category."""
    found: list[tuple[int, tuple[str, ...]]] = []
    others: set[int] = set()
    for i, cat in enumerate(categories):
        where = f'categories[{i}]'
        if not isinstance(cat, dict):
            raise DatasetError(path, 'category must be an object', entry=where)
        if not _is_int(cat.get('id')):
            raise DatasetError(path, "missing or non-integer 'id'", entry=where)
        if cat['id'] in others or any(cat['id'] == c for c, _ in found):
            raise DatasetError(path, f'duplicate category id {cat["id"]}', entry=where)
        names = cat.get('keypoints')
        if names is None:
            others.add(cat['id'])
            continue
        if (
            not isinstance(names, list)
            or not names
            or not all(isinstance(n, str) and n for n in names)
        ):
            raise DatasetError(
                path, "'keypoints' must be a non-empty list of non-empty names", entry=where
            )
        if len(set(names)) != len(names):
            raise DatasetError(path, f'duplicate keypoint names in {names}', entry=where)
        found.append((cat['id'], tuple(names)))
    if not found:
        raise DatasetError(path, "no category with a 'keypoints' list", entry='categories')
    if len(found) > 1:
        raise DatasetError(
            path,
            f'{len(found)} keypoint categories (ids {[c for c, _ in found]}); exactly one '
            'is supported',
            entry='categories',
        )
    cat_id, names = found[0]
    if expected is not None and tuple(expected) != names:
        if sorted(expected) != sorted(names):
            raise DatasetError(
                path,
                f'keypoint names {list(names)} do not match the expected {list(expected)}',
                entry='categories',
            )
    return cat_id, names, others


def _convention(path: Path, info: Any, default: str) -> str:
    if info is None:
        return default
    if not isinstance(info, dict):
        raise DatasetError(path, f"'info' must be an object, got {type(info).__name__}")
    conv = info.get('pixel_convention', default)
    if conv not in PIXEL_CONVENTIONS:
        raise DatasetError(
            path,
            f'unknown pixel_convention {conv!r}; expected one of {list(PIXEL_CONVENTIONS)}',
            entry='info',
        )
    return conv


def load_coco(
    path: str | Path,
    *,
    image_root: Path | None = None,
    expected_keypoints: Sequence[str] | None = None,
    check_images: bool = True,
    default_convention: str = DEFAULT_FILE_CONVENTION,
) -> KeypointDataset:
    """Load and validate a COCO keypoints file.

    ``image_root`` (default: the JSON's folder) resolves relative ``file_name``; absolute ones
    are used as is. ``expected_keypoints`` pins the keypoint names: a file with the same names
    in another order is reordered, other names are an error. ``check_images`` verifies every
    image exists and has the size the JSON states (header read only for PNG/PNM).
    ``default_convention`` applies to files whose ``info`` has no ``pixel_convention``.
    """
    path = Path(path)
    if default_convention not in PIXEL_CONVENTIONS:
        raise ValueError(f'default_convention must be one of {PIXEL_CONVENTIONS}')
    doc = _read_json(path)
    if not isinstance(doc, dict):
        raise DatasetError(path, f'top level must be an object, got {type(doc).__name__}')
    images = _list_field(path, doc, 'images')
    annotations = _list_field(path, doc, 'annotations')
    categories = _list_field(path, doc, 'categories')
    cat_id, file_names, other_cats = _keypoint_category(path, categories, expected_keypoints)
    names = tuple(expected_keypoints) if expected_keypoints is not None else file_names
    order = np.array([file_names.index(n) for n in names])
    k = len(names)
    convention = _convention(path, doc.get('info'), default_convention)
    shift = -0.5 if convention == PIXEL_CORNER else 0.0
    root = Path(image_root) if image_root is not None else path.parent

    entries: dict[int, tuple[int, dict[str, Any]]] = {}
    for i, img in enumerate(images):
        where = f'images[{i}]'
        if not isinstance(img, dict):
            raise DatasetError(path, 'image entry must be an object', entry=where)
        for key in _IMAGE_KEYS:
            if key not in img:
                raise DatasetError(path, f'missing field {key!r}', entry=where)
        if not _is_int(img['id']):
            raise DatasetError(path, f"'id' must be an integer, got {img['id']!r}", entry=where)
        where = f'images[{i}] (id={img["id"]})'
        if not isinstance(img['file_name'], str) or not img['file_name']:
            raise DatasetError(path, "'file_name' must be a non-empty string", entry=where)
        for key in ('width', 'height'):
            if not _is_int(img[key]) or img[key] <= 0:
                raise DatasetError(
                    path, f'{key!r} must be a positive integer, got {img[key]!r}', entry=where
                )
        if img['id'] in entries:
            first = entries[img['id']][0]
            raise DatasetError(
                path, f'duplicate image id {img["id"]} (also images[{first}])', entry=where
            )
        entries[img['id']] = (i, img)

    seen_ann_ids: dict[int, int] = {}
    by_image: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
    ignored = 0
    for i, ann in enumerate(annotations):
        where = f'annotations[{i}]'
        if not isinstance(ann, dict):
            raise DatasetError(path, 'annotation must be an object', entry=where)
        for key in ('id', 'image_id', 'category_id', 'keypoints'):
            if key not in ann:
                raise DatasetError(path, f'missing field {key!r}', entry=where)
        for key in ('id', 'image_id', 'category_id'):
            if not _is_int(ann[key]):
                raise DatasetError(
                    path, f'{key!r} must be an integer, got {ann[key]!r}', entry=where
                )
        where = f'annotations[{i}] (image_id={ann["image_id"]})'
        if ann['id'] in seen_ann_ids:
            first = seen_ann_ids[ann['id']]
            problem = f'duplicate annotation id {ann["id"]} (also annotations[{first}])'
            raise DatasetError(path, problem, entry=where)
        seen_ann_ids[ann['id']] = i
        if ann['image_id'] not in entries:
            raise DatasetError(path, f'unknown image_id {ann["image_id"]}', entry=where)
        if ann['category_id'] != cat_id:
            if ann['category_id'] in other_cats:
                ignored += 1
                continue
            raise DatasetError(path, f'unknown category_id {ann["category_id"]}', entry=where)
        flat = ann['keypoints']
        if not isinstance(flat, list) or len(flat) != 3 * k:
            got = len(flat) if isinstance(flat, list) else type(flat).__name__
            raise DatasetError(
                path,
                f"'keypoints' must be a list of 3*{k}={3 * k} numbers, got {got}",
                entry=where,
            )
        for j, v in enumerate(flat):
            if not _is_number(v) or not math.isfinite(v):
                raise DatasetError(
                    path,
                    f'keypoints[{j}] ({file_names[j // 3]} {"xyv"[j % 3]}) is {v!r}, '
                    'not a finite number',
                    entry=where,
                )
        arr = np.asarray(flat, dtype=np.float64).reshape(k, 3)[order]
        vis = arr[:, 2]
        bad = np.flatnonzero(~np.isin(vis, (0, 1, 2)))
        if bad.size:
            raise DatasetError(
                path,
                f'visibility of {names[bad[0]]!r} is {flat[3 * order[bad[0]] + 2]!r}; '
                'must be 0, 1 or 2',
                entry=where,
            )
        if ann['image_id'] in by_image:
            raise DatasetError(
                path,
                f'second annotation for image_id {ann["image_id"]} (first is '
                f'annotations[{by_image[ann["image_id"]][0]}]); one instance per image is '
                'supported',
                entry=where,
            )
        vis_i = vis.astype(np.int64)
        xy = arr[:, :2] + shift
        xy[vis_i == 0] = np.nan
        img = entries[ann['image_id']][1]
        lo = -0.5 - OUTSIDE_TOLERANCE * np.array([img['width'], img['height']])
        hi = np.array([img['width'], img['height']]) * (1 + OUTSIDE_TOLERANCE) - 0.5
        out = (vis_i > 0) & np.any((xy < lo) | (xy > hi), axis=1)
        if out.any():
            j = int(np.flatnonzero(out)[0])
            raise DatasetError(
                path,
                f'keypoint {names[j]!r} at ({xy[j, 0]:.1f}, {xy[j, 1]:.1f}) lies more than '
                f'{OUTSIDE_TOLERANCE:.0%} outside the {img["width"]}x{img["height"]} image',
                entry=where,
            )
        by_image[ann['image_id']] = (i, xy, vis_i)

    samples: list[KeypointSample] = []
    for image_id, (i, img) in entries.items():
        if image_id not in by_image:
            continue
        _, xy, vis_i = by_image[image_id]
        image_path = root / img['file_name']
        if check_images:
            where = f'images[{i}] (id={image_id})'
            if not image_path.is_file():
                raise DatasetError(path, f'image file not found: {image_path}', entry=where)
            got = _image_size(image_path)
            if got is None:
                raise DatasetError(path, f'image file unreadable: {image_path}', entry=where)
            if got != (img['width'], img['height']):
                raise DatasetError(
                    path,
                    f'{image_path} is {got[0]}x{got[1]} but the JSON says '
                    f'{img["width"]}x{img["height"]}',
                    entry=where,
                )
        xy.setflags(write=False)
        vis_i.setflags(write=False)
        samples.append(
            KeypointSample(
                image_id=image_id,
                file_name=img['file_name'],
                image_path=image_path,
                width=img['width'],
                height=img['height'],
                keypoints=xy,
                visibility=vis_i,
                extra={key: v for key, v in img.items() if key not in _IMAGE_KEYS},
            )
        )
    if not samples:
        raise DatasetError(path, 'dataset is empty: no image has a keypoint annotation')
    info = dict(doc.get('info') or {})
    info['pixel_convention'] = PIXEL_CENTRE
    info['source_pixel_convention'] = convention
    info['images_without_annotation'] = len(entries) - len(samples)
    info['ignored_annotations'] = ignored
    return KeypointDataset(path=path, keypoint_names=names, samples=samples, info=info)


def _num(x: float) -> float | int:
    """Round for stable, short JSON: 6 decimals, no negative zero, integers as ints."""
    r = round(float(x), 6) + 0.0
    return int(r) if r.is_integer() else r


def save_coco(
    path: str | Path,
    samples: Sequence[KeypointSample],
    keypoint_names: Sequence[str],
    info: dict[str, Any] | None = None,
    *,
    category_name: str = 'target',
) -> Path:
    """Write samples as deterministic COCO keypoints JSON in the pixel-centre convention.

    Keys are sorted and floats rounded to 6 decimals, so the same samples always give the same
    bytes. Unlabelled keypoints are written as ``0, 0, 0``. ``bbox`` is the box of the labelled
    keypoints in the same (pixel-centre) convention. The file is written atomically.
    """
    path = Path(path)
    names = list(keypoint_names)
    k = len(names)
    images, annotations = [], []
    for s in samples:
        kp = np.asarray(s.keypoints, dtype=np.float64)
        vis = np.asarray(s.visibility).astype(np.int64)
        if kp.shape != (k, 2) or vis.shape != (k,):
            raise DatasetError(
                path,
                f'sample has keypoints {kp.shape} / visibility {vis.shape}, expected ({k}, 2) / '
                f'({k},)',
                entry=f'image_id={s.image_id}',
            )
        labelled = vis > 0
        if not np.all(np.isfinite(kp[labelled])):
            raise DatasetError(path, 'labelled keypoint is not finite', f'image_id={s.image_id}')
        flat: list[float | int] = []
        for (x, y), v in zip(kp, vis, strict=True):
            flat += [_num(x), _num(y), int(v)] if v > 0 else [0, 0, 0]
        if labelled.any():
            lo, hi = kp[labelled].min(axis=0), kp[labelled].max(axis=0)
            bbox = [_num(lo[0]), _num(lo[1]), _num(hi[0] - lo[0]), _num(hi[1] - lo[1])]
        else:
            bbox = [0, 0, 0, 0]
        images.append(
            {
                **s.extra,
                'id': s.image_id,
                'file_name': s.file_name,
                'width': s.width,
                'height': s.height,
            }
        )
        annotations.append(
            {
                'id': s.image_id,
                'image_id': s.image_id,
                'category_id': 1,
                'keypoints': flat,
                'num_keypoints': int(labelled.sum()),
                'bbox': bbox,
                'area': _num(bbox[2] * bbox[3]),
                'iscrowd': 0,
            }
        )
    doc = {
        'info': {**(info or {}), 'pixel_convention': PIXEL_CENTRE},
        'images': images,
        'annotations': annotations,
        'categories': [
            {
                'id': 1,
                'name': category_name,
                'supercategory': category_name,
                'keypoints': names,
                'skeleton': [],
            }
        ],
    }
    text = json.dumps(doc, sort_keys=True, indent=1, ensure_ascii=False, allow_nan=False) + '\n'
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'.{path.name}.', suffix='.tmp', dir=path.parent)
    try:
        with os.fdopen(fd, 'w', encoding='utf-8') as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path

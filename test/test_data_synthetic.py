"""Procedural 5-dot target dataset: determinism, split hygiene, label exactness, arguments."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from usn_perception.data.coco import load_coco
from usn_perception.data.synthetic import (
    SPLIT_BACKGROUNDS,
    make_dataset,
    render_sample,
    split_counts,
)
from usn_perception.data.target import (
    CORNER_DOT_RADIUS,
    KEYPOINT_NAMES,
    KEYPOINTS_TARGET,
    composite_target,
    target_keypoints,
)
from usn_perception.errors import DatasetError


def _hashes(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob('*'))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    """Same seed: byte-identical files; another seed: different images."""
    a = make_dataset(tmp_path / 'a', count=20, seed=7, progress=False)
    make_dataset(tmp_path / 'b', count=20, seed=7, progress=False)
    make_dataset(tmp_path / 'c', count=20, seed=8, progress=False)
    ha, hb, hc = (_hashes(tmp_path / n) for n in 'abc')
    assert ha == hb
    assert len(ha) == 20 + 3  # images + one JSON per split
    assert ha.keys() == hc.keys()
    assert all(ha[k] != hc[k] for k in ha if k.endswith('.png'))
    assert set(a) == {'train', 'val', 'test'}


def test_layout_splits_and_backgrounds(tmp_path: Path) -> None:
    """Layout, 80/10/10 counts, unique ids and background-disjoint splits."""
    paths = make_dataset(tmp_path / 'ds', count=30, seed=1, size=(160, 120), progress=False)
    assert split_counts(30) == {'train': 24, 'val': 3, 'test': 3}
    seen: dict[str, set[str]] = {}
    ids: list[int] = []
    for split, path in paths.items():
        assert path == tmp_path / 'ds' / split / 'annotations.json'
        ds = load_coco(path, expected_keypoints=KEYPOINT_NAMES)  # also checks every image size
        assert len(ds) == split_counts(30)[split]
        assert ds.info['split'] == split
        assert ds.info['source_pixel_convention'] == 'pixel-centre-origin'
        for i, s in enumerate(ds):
            assert s.file_name == f'images/{s.image_id:06d}.png'
            img = ds.load_image(i)
            assert img.shape == (120, 160) and img.dtype == np.uint8
            raw = cv2.imread(str(s.image_path), cv2.IMREAD_UNCHANGED)
            assert raw.ndim == 2 and raw.dtype == np.uint8  # stored single-channel
            assert np.all(s.visibility == 2)
            assert np.all((s.keypoints > 0) & (s.keypoints < [159, 119]))
        seen[split] = {s.extra['background'] for s in ds}
        assert seen[split] <= set(SPLIT_BACKGROUNDS[split])
        ids += [s.image_id for s in ds]
    assert not seen['train'] & seen['val']
    assert not seen['train'] & seen['test']
    assert not seen['val'] & seen['test']
    assert len(set(ids)) == len(ids) == 30
    # The declared background lists themselves are disjoint.
    lists = [set(v) for v in SPLIT_BACKGROUNDS.values()]
    assert sum(map(len, lists)) == len(set().union(*lists))


def _dot_centroid(img: np.ndarray, xy: np.ndarray, radius_px: float, level: float) -> np.ndarray:
    """Centroid of (intensity - panel level) in a disc around ``xy`` (panel is uniform there)."""
    r = int(np.ceil(radius_px * 1.6)) + 2
    x0, y0 = int(round(xy[0])) - r, int(round(xy[1])) - r
    x1, y1 = x0 + 2 * r + 1, y0 + 2 * r + 1
    patch = img[y0:y1, x0:x1].astype(np.float64)
    ys, xs = np.mgrid[y0:y1, x0:x1]
    inside = np.hypot(xs - xy[0], ys - xy[1]) <= radius_px * 1.6
    w = np.clip(patch - level, 0, None) * inside
    return np.array([(w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()])


def test_frontal_render_is_centred_on_labels_with_pixel_centre_convention() -> None:
    """A frontal render is symmetric about its labels (pixel-centre convention)."""
    # Similarity (rotation 10 deg, 120 px per unit) putting the centre dot on pixel (100, 80).
    s, a = 120.0, np.deg2rad(10.0)
    hom = np.array(
        [[s * np.cos(a), -s * np.sin(a), 100.0], [s * np.sin(a), s * np.cos(a), 80.0], [0, 0, 1]]
    )
    img = np.full((200, 240), 0.5, np.float32)
    composite_target(img, hom, panel_level=0.1, dot_level=0.9, card_level=0.7, card_margin=0.2)
    kp = target_keypoints(hom)
    np.testing.assert_allclose(kp[4], [100.0, 80.0])
    # Point symmetry about the centre dot's label: row 80 read left/right of column 100.
    left, right = img[80, 70:100], img[80, 101:131]
    np.testing.assert_allclose(left, right[::-1], atol=1e-5)
    for k in range(5):
        radius = (CORNER_DOT_RADIUS if k < 4 else 0.23) * s
        c = _dot_centroid(img, kp[k], radius, 0.1)
        np.testing.assert_allclose(c, kp[k], atol=0.02)


def test_labels_match_rendered_dot_centroids_under_perspective() -> None:
    """Under perspective, corner-dot centroids sit on the labels."""
    errors = []
    for i in range(12):
        r = render_sample(np.random.default_rng([3, i]), 'camera', (384, 288), clean=True)
        img = r.image.astype(np.float64)
        # Panel level: median at the midpoint between the centre and each corner dot.
        mids = ((r.keypoints[:4] + r.keypoints[4]) / 2).round().astype(int)
        level = float(np.median(img[mids[:, 1], mids[:, 0]]))
        ys, xs = np.mgrid[0:288, 0:384]
        pix = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])
        back = np.linalg.inv(r.homography) @ pix
        units = (back[:2] / back[2]).T.reshape(288, 384, 2)  # target coordinates of each pixel
        for k in range(4):
            # Window: a disc of twice the dot radius in *target* units (inside the panel).
            inside = np.linalg.norm(units - KEYPOINTS_TARGET[k], axis=2) <= 2 * CORNER_DOT_RADIUS
            w = np.clip(img - level, 0, None) * inside
            c = np.array([(w * xs).sum(), (w * ys).sum()]) / w.sum()
            errors.append(np.linalg.norm(c - r.keypoints[k]))
    assert max(errors) < 0.15, max(errors)  # measured 0.07 (uint8 rounding, perspective)
    assert np.mean(errors) < 0.05


def test_target_stays_inside_with_margin_and_rotation_is_limited() -> None:
    """The target stays inside the frame and TL/TR/BR/BL stay unambiguous."""
    for i in range(200):
        r = render_sample(np.random.default_rng([4, i]), 'coins', (384, 288))
        kp = r.keypoints
        assert np.all(kp[:, 0] > 0.03 * 384) and np.all(kp[:, 0] < 0.97 * 384)
        assert np.all(kp[:, 1] > 0.03 * 288) and np.all(kp[:, 1] < 0.97 * 288)
        # TL is up-left of the centre, BR down-right: names stay unambiguous.
        assert kp[0, 0] < kp[4, 0] < kp[2, 0] or kp[0, 1] < kp[4, 1] < kp[2, 1]
        assert kp[0, 1] < kp[3, 1] and kp[1, 1] < kp[2, 1]
        assert kp[0, 0] < kp[1, 0] and kp[3, 0] < kp[2, 0]


@pytest.mark.parametrize(
    ('kwargs', 'message'),
    [
        ({'count': 2}, 'count must be an integer in [3,'),
        ({'count': True}, 'count must be an integer'),
        ({'size': (32, 288)}, 'size (width, height) must be within'),
        ({'size': 'big'}, 'size must be (width, height)'),
        ({'seed': -1}, 'seed must be a non-negative integer'),
    ],
)
def test_bad_arguments_are_refused(tmp_path: Path, kwargs: dict, message: str) -> None:
    """Bad count, size or seed is refused before anything is written."""
    args = {'count': 10, 'seed': 0, 'size': (384, 288)} | kwargs
    with pytest.raises(DatasetError) as e:
        make_dataset(tmp_path / 'out', progress=False, **args)
    assert message in str(e.value)
    assert str(tmp_path / 'out') in str(e.value)
    assert not (tmp_path / 'out').exists()


def test_non_empty_output_dir_is_refused_and_empty_one_accepted(tmp_path: Path) -> None:
    """A non-empty output folder is refused; an empty one is used."""
    out = tmp_path / 'out'
    out.mkdir()
    (out / 'keep.txt').write_text('x')
    with pytest.raises(DatasetError, match='exists and is not empty'):
        make_dataset(out, count=3, seed=0, progress=False)
    assert (out / 'keep.txt').read_text() == 'x'
    empty = tmp_path / 'empty'
    empty.mkdir()
    paths = make_dataset(empty, count=3, seed=0, size=(96, 72), progress=False)
    assert all(p.is_file() for p in paths.values())
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith('.')] == []  # no staging


def test_annotations_json_is_deterministic_and_declares_convention(tmp_path: Path) -> None:
    """The JSON is sorted, indented and declares the pixel convention."""
    paths = make_dataset(tmp_path / 'ds', count=5, seed=3, size=(128, 96), progress=False)
    doc = json.loads(paths['train'].read_text())
    assert doc['info']['pixel_convention'] == 'pixel-centre-origin'
    assert doc['info']['seed'] == 3
    assert doc['categories'][0]['keypoints'] == list(KEYPOINT_NAMES)
    assert paths['train'].read_text() == json.dumps(doc, sort_keys=True, indent=1) + '\n'

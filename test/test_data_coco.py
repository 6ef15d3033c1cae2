"""COCO keypoints loader/writer: round trip, conventions, and one test per malformed input."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from usn_perception.data.coco import KeypointSample, load_coco, save_coco
from usn_perception.errors import DatasetError

NAMES = ['a', 'b', 'c']


def _write_image(path: Path, w: int = 40, h: int = 30) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    img = (np.arange(w * h) % 251).astype(np.uint8).reshape(h, w)
    assert cv2.imwrite(str(path), img)


def _doc(n: int = 2, info: dict | None = None) -> dict[str, Any]:
    """Return a valid document (pixel-centre convention) with ``n`` annotated images."""
    return {
        'info': info if info is not None else {'pixel_convention': 'pixel-centre-origin'},
        'images': [
            {'id': 10 + i, 'file_name': f'img/{i}.png', 'width': 40, 'height': 30}
            for i in range(n)
        ],
        'annotations': [
            {
                'id': 100 + i,
                'image_id': 10 + i,
                'category_id': 1,
                'keypoints': [1.5, 2.0, 2, 20.25, 10.0, 1, 0, 0, 0],
            }
            for i in range(n)
        ],
        'categories': [{'id': 1, 'name': 'target', 'keypoints': list(NAMES)}],
    }


def _dump(tmp_path: Path, doc: Any, name: str = 'ann.json') -> Path:
    for i in range(3):
        _write_image(tmp_path / f'img/{i}.png')
    path = tmp_path / name
    path.write_text(doc if isinstance(doc, str) else json.dumps(doc))
    return path


def test_load_valid_file(tmp_path: Path) -> None:
    """A valid file loads with NaN for unlabelled points and readable images."""
    ds = load_coco(_dump(tmp_path, _doc()))
    assert len(ds) == 2 and ds.keypoint_names == tuple(NAMES)
    s = ds[0]
    assert (s.image_id, s.width, s.height) == (10, 40, 30)
    assert s.image_path == tmp_path / 'img/0.png'
    np.testing.assert_array_equal(s.visibility, [2, 1, 0])
    np.testing.assert_array_equal(s.keypoints[:2], [[1.5, 2.0], [20.25, 10.0]])
    assert np.all(np.isnan(s.keypoints[2]))  # unlabelled -> NaN, never (0, 0)
    img = ds.load_image(1)
    assert img.shape == (30, 40) and img.dtype == np.uint8
    assert [x.image_id for x in ds] == [10, 11]


def test_round_trip_is_exact_and_deterministic(tmp_path: Path) -> None:
    """Saving, loading and saving again gives the same values and bytes."""
    rng = np.random.default_rng(0)
    samples = []
    for i in range(3):
        _write_image(tmp_path / f'img/{i}.png')
        kp = rng.uniform(0, 29, size=(3, 2)).round(6)
        vis = np.array([2, 1, 0])
        kp[2] = np.nan
        samples.append(
            KeypointSample(
                i + 1,
                f'img/{i}.png',
                tmp_path / f'img/{i}.png',
                40,
                30,
                kp,
                vis,
                {'background': 'x'},
            )
        )
    p1 = save_coco(tmp_path / 'one.json', samples, NAMES, {'seed': 5})
    ds = load_coco(p1)
    assert ds.info['seed'] == 5 and ds.info['pixel_convention'] == 'pixel-centre-origin'
    for a, b in zip(samples, ds, strict=True):
        np.testing.assert_array_equal(a.keypoints, b.keypoints)
        np.testing.assert_array_equal(a.visibility, b.visibility)
        assert b.extra == {'background': 'x'}
    p2 = save_coco(tmp_path / 'two.json', list(ds), ds.keypoint_names, {'seed': 5})
    assert p1.read_bytes() == p2.read_bytes()
    doc = json.loads(p1.read_text())
    assert doc['annotations'][0]['keypoints'][6:] == [0, 0, 0]
    assert list(tmp_path.glob('*.tmp')) == []


def test_missing_info_means_corner_convention(tmp_path: Path) -> None:
    """Files without a convention (CVAT, Label Studio) are shifted by -0.5."""
    doc = _doc()
    del doc['info']  # CVAT / Label Studio exports
    ds = load_coco(_dump(tmp_path, doc))
    np.testing.assert_array_equal(ds[0].keypoints[:2], [[1.0, 1.5], [19.75, 9.5]])
    assert ds.info['source_pixel_convention'] == 'pixel-corner-origin'
    assert ds.info['pixel_convention'] == 'pixel-centre-origin'
    corner = _doc(info={'pixel_convention': 'pixel-corner-origin'})
    ds2 = load_coco(_dump(tmp_path, corner, 'c.json'))
    np.testing.assert_array_equal(ds2[0].keypoints, ds[0].keypoints)
    ds3 = load_coco(tmp_path / 'ann.json', default_convention='pixel-centre-origin')
    np.testing.assert_array_equal(ds3[0].keypoints[:2], [[1.5, 2.0], [20.25, 10.0]])


def test_expected_keypoints_reorders_same_names(tmp_path: Path) -> None:
    """Same names in another order are reordered to the expected order."""
    ds = load_coco(_dump(tmp_path, _doc()), expected_keypoints=['c', 'a', 'b'])
    assert ds.keypoint_names == ('c', 'a', 'b')
    np.testing.assert_array_equal(ds[0].visibility, [0, 2, 1])
    np.testing.assert_array_equal(ds[0].keypoints[1], [1.5, 2.0])


def test_unannotated_images_are_counted_and_other_categories_ignored(tmp_path: Path) -> None:
    """Unannotated images and non-keypoint categories are skipped but counted."""
    doc = _doc(3)
    doc['annotations'].pop()
    doc['categories'].append({'id': 2, 'name': 'box'})
    doc['annotations'].append({'id': 500, 'image_id': 12, 'category_id': 2, 'keypoints': []})
    ds = load_coco(_dump(tmp_path, doc))
    assert len(ds) == 2
    assert ds.info['images_without_annotation'] == 1
    assert ds.info['ignored_annotations'] == 1


def test_absolute_file_name_and_image_root(tmp_path: Path) -> None:
    """Absolute file names are used as is; image_root relocates relative ones."""
    doc = _doc(1)
    _write_image(tmp_path / 'elsewhere/x.png')
    doc['images'][0]['file_name'] = str(tmp_path / 'elsewhere/x.png')
    ds = load_coco(_dump(tmp_path, doc))
    assert ds[0].image_path == tmp_path / 'elsewhere/x.png'
    doc = _doc(1)
    path = tmp_path / 'json_only.json'
    path.write_text(json.dumps(doc))
    (tmp_path / 'moved').mkdir()
    _write_image(tmp_path / 'moved/img/0.png')
    ds = load_coco(path, image_root=tmp_path / 'moved')
    assert ds[0].image_path == tmp_path / 'moved/img/0.png'


def _mutate(fn):
    doc = _doc()
    fn(doc)
    return doc


def _set(doc: dict, keys: tuple, value: Any) -> None:
    target = doc
    for k in keys[:-1]:
        target = target[k]
    target[keys[-1]] = value


def _kp(doc: dict, j: int, value: Any) -> None:
    doc['annotations'][1]['keypoints'][j] = value


BAD_CASES: list[tuple[str, Any, str, str | None]] = [
    ('not-json', 'this is not json', 'invalid JSON', None),
    ('truncated', json.dumps(_doc())[:-40], 'truncated JSON', None),
    ('truncated after value', json.dumps(_doc())[:-2], 'truncated JSON', None),
    ('top-level list', '[]', 'top level must be an object', None),
    ('no images', _mutate(lambda d: d.pop('images')), "missing top-level field 'images'", None),
    (
        'annotations not list',
        _mutate(lambda d: _set(d, ('annotations',), {})),
        "'annotations' must be a list",
        None,
    ),
    (
        'no keypoint category',
        _mutate(lambda d: d['categories'][0].pop('keypoints')),
        "no category with a 'keypoints' list",
        'categories',
    ),
    (
        'two keypoint categories',
        _mutate(lambda d: d['categories'].append({'id': 2, 'keypoints': ['x']})),
        '2 keypoint categories',
        'categories',
    ),
    (
        'duplicate keypoint names',
        _mutate(lambda d: _set(d, ('categories', 0, 'keypoints'), ['a', 'a', 'b'])),
        'duplicate keypoint names',
        'categories[0]',
    ),
    (
        'image missing width',
        _mutate(lambda d: d['images'][1].pop('width')),
        "missing field 'width'",
        'images[1]',
    ),
    (
        'image bad height',
        _mutate(lambda d: _set(d, ('images', 1, 'height'), 0)),
        "'height' must be a positive integer",
        'images[1] (id=11)',
    ),
    (
        'image id string',
        _mutate(lambda d: _set(d, ('images', 0, 'id'), '10')),
        "'id' must be an integer",
        'images[0]',
    ),
    (
        'duplicate image id',
        _mutate(lambda d: _set(d, ('images', 1, 'id'), 10)),
        'duplicate image id 10 (also images[0])',
        'images[1] (id=10)',
    ),
    (
        'annotation missing keypoints',
        _mutate(lambda d: d['annotations'][1].pop('keypoints')),
        "missing field 'keypoints'",
        'annotations[1]',
    ),
    (
        'annotation unknown image',
        _mutate(lambda d: _set(d, ('annotations', 1, 'image_id'), 17)),
        'unknown image_id 17',
        'annotations[1] (image_id=17)',
    ),
    (
        'annotation unknown category',
        _mutate(lambda d: _set(d, ('annotations', 1, 'category_id'), 9)),
        'unknown category_id 9',
        'annotations[1] (image_id=11)',
    ),
    (
        'duplicate annotation id',
        _mutate(lambda d: _set(d, ('annotations', 1, 'id'), 100)),
        'duplicate annotation id 100',
        'annotations[1] (image_id=11)',
    ),
    (
        'two annotations one image',
        _mutate(lambda d: _set(d, ('annotations', 1, 'image_id'), 10)),
        'second annotation for image_id 10',
        'annotations[1] (image_id=10)',
    ),
    (
        'wrong keypoint count',
        _mutate(lambda d: d['annotations'][1]['keypoints'].pop()),
        'must be a list of 3*3=9 numbers, got 8',
        'annotations[1] (image_id=11)',
    ),
    (
        'string coordinate',
        _mutate(lambda d: _kp(d, 3, '20')),
        "keypoints[3] (b x) is '20', not a finite number",
        'annotations[1] (image_id=11)',
    ),
    (
        'null coordinate',
        _mutate(lambda d: _kp(d, 1, None)),
        'keypoints[1] (a y) is None',
        'annotations[1] (image_id=11)',
    ),
    (
        'bool coordinate',
        _mutate(lambda d: _kp(d, 0, True)),
        'keypoints[0] (a x) is True',
        'annotations[1] (image_id=11)',
    ),
    (
        'nan coordinate',
        json.dumps(_doc()).replace('20.25', 'NaN'),
        'keypoints[3] (b x) is nan',
        'annotations[0] (image_id=10)',
    ),
    (
        'infinite coordinate',
        json.dumps(_doc()).replace('20.25', 'Infinity'),
        'keypoints[3] (b x) is inf',
        'annotations[0] (image_id=10)',
    ),
    (
        'bad visibility',
        _mutate(lambda d: _kp(d, 5, 3)),
        "visibility of 'b' is 3; must be 0, 1 or 2",
        'annotations[1] (image_id=11)',
    ),
    (
        'point far outside',
        _mutate(lambda d: _kp(d, 3, 60.0)),
        "keypoint 'b' at (60.0, 10.0) lies more than 10% outside the 40x30 image",
        'annotations[1] (image_id=11)',
    ),
    (
        'point far above',
        _mutate(lambda d: _kp(d, 1, -4.0)),
        "keypoint 'a' at (1.5, -4.0)",
        'annotations[1] (image_id=11)',
    ),
    (
        'missing image file',
        _mutate(lambda d: _set(d, ('images', 1, 'file_name'), 'img/9.png')),
        'image file not found',
        'images[1] (id=11)',
    ),
    (
        'image size mismatch',
        _mutate(lambda d: _set(d, ('images', 1, 'width'), 41)),
        'is 40x30 but the JSON says 41x30',
        'images[1] (id=11)',
    ),
    ('empty dataset', _mutate(lambda d: _set(d, ('annotations',), [])), 'dataset is empty', None),
    (
        'unknown convention',
        _doc(info={'pixel_convention': 'centre'}),
        "unknown pixel_convention 'centre'",
        'info',
    ),
]


@pytest.mark.parametrize(
    ('label', 'doc', 'problem', 'entry'), BAD_CASES, ids=[c[0] for c in BAD_CASES]
)
def test_malformed_input_names_file_and_entry(
    tmp_path: Path, label: str, doc: Any, problem: str, entry: str | None
) -> None:
    """Every malformed input raises DatasetError naming the file and the entry."""
    path = _dump(tmp_path, copy.deepcopy(doc))
    with pytest.raises(DatasetError) as e:
        load_coco(path)
    msg = str(e.value)
    assert str(path) in msg, msg
    assert problem in msg, msg
    assert e.value.entry == entry, msg
    if entry:
        assert f'[{entry}]' in msg


def test_missing_file_and_wrong_expected_names(tmp_path: Path) -> None:
    """A missing JSON and foreign keypoint names are clear errors."""
    with pytest.raises(DatasetError, match='file not found'):
        load_coco(tmp_path / 'nope.json')
    path = _dump(tmp_path, _doc())
    with pytest.raises(DatasetError, match=r"do not match the expected \['a', 'b', 'z'\]"):
        load_coco(path, expected_keypoints=['a', 'b', 'z'])


def test_check_images_false_defers_to_load_image(tmp_path: Path) -> None:
    """With check_images=False, load_image still catches bad images."""
    doc = _doc()
    doc['images'][1]['width'] = 41
    ds = load_coco(_dump(tmp_path, doc), check_images=False)
    with pytest.raises(DatasetError) as e:
        ds.load_image(1)
    assert str(tmp_path / 'img/1.png') in str(e.value)
    assert 'JSON says 41x30' in str(e.value)
    (tmp_path / 'img/0.png').write_bytes(b'not a png')
    with pytest.raises(DatasetError, match='missing or unreadable'):
        ds.load_image(0)


def test_pgm_and_jpeg_sizes_are_checked(tmp_path: Path) -> None:
    """Image sizes are checked for formats other than PNG too."""
    doc = _doc(2)
    doc['images'][0]['file_name'] = 'img/0.pgm'
    doc['images'][1]['file_name'] = 'img/1.jpg'
    _write_image(tmp_path / 'img/0.pgm')
    _write_image(tmp_path / 'img/1.jpg', 41, 30)
    with pytest.raises(DatasetError, match=r'1\.jpg is 41x30'):
        load_coco(_dump(tmp_path, doc))

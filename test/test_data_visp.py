"""ViSP frames (fetch, cache, listing) and the classical pseudo-labeller."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import cv2
import numpy as np
import pytest

from usn_perception.data import visp
from usn_perception.data.coco import load_coco
from usn_perception.data.pseudo_label import detect_target, pseudo_label_frames
from usn_perception.data.synthetic import SPLIT_BACKGROUNDS, render_sample
from usn_perception.data.target import KEYPOINT_NAMES
from usn_perception.data.visp import (
    DataUnavailableError,
    cached_sequence,
    default_cache_dir,
    fetch_visp,
    list_frames,
)
from usn_perception.errors import DatasetError, ImageError, UsnPerceptionError


def test_default_cache_dir_respects_xdg(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The cache honours XDG_CACHE_HOME, else ~/.cache."""
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path / 'xdg'))
    assert default_cache_dir() == tmp_path / 'xdg' / 'usn_perception' / 'visp'
    monkeypatch.delenv('XDG_CACHE_HOME')
    monkeypatch.setenv('HOME', str(tmp_path / 'home'))
    assert default_cache_dir() == tmp_path / 'home' / '.cache' / 'usn_perception' / 'visp'


def test_no_apt_raises_data_unavailable(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Without apt-get the fetch fails with DataUnavailableError."""
    monkeypatch.setenv('PATH', str(tmp_path / 'empty-bin'))
    with pytest.raises(DataUnavailableError, match='apt-get not found') as e:
        fetch_visp(tmp_path / 'cache')
    assert isinstance(e.value, UsnPerceptionError)
    assert not (tmp_path / 'cache' / 'mire-2').exists()


def test_failed_download_raises_with_reason(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """apt-get's own error message is passed on."""

    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 100, '', 'E: Unable to locate package x\n')

    monkeypatch.setattr(visp.subprocess, 'run', fake_run)
    with pytest.raises(DataUnavailableError, match='Unable to locate package'):
        fetch_visp(tmp_path / 'cache')


def test_bad_sequence_name_is_refused(tmp_path: Path) -> None:
    """Sequence names cannot escape the cache folder."""
    with pytest.raises(ValueError, match='invalid sequence name'):
        fetch_visp(tmp_path, '../etc')


def test_cached_sequence_is_reused_without_download(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """A complete cached sequence is returned without running apt."""
    folder = tmp_path / 'mire-2'
    folder.mkdir()
    for i in (2, 1, 3):
        cv2.imwrite(str(folder / f'image.{i:04d}.pgm'), np.zeros((4, 4), np.uint8))
    (folder / visp.MARKER).write_text(json.dumps({'frames': 3, 'version': 'test'}))

    def no_run(*args, **kwargs):
        raise AssertionError('a cached sequence must not be downloaded again')

    monkeypatch.setattr(visp.subprocess, 'run', no_run)
    assert fetch_visp(tmp_path) == folder
    assert [p.name for p in list_frames(folder)] == [f'image.000{i}.pgm' for i in (1, 2, 3)]
    (folder / 'image.0003.pgm').unlink()  # incomplete: must not be taken as cached
    assert cached_sequence(tmp_path) is None


def test_list_frames_missing_folder(tmp_path: Path) -> None:
    """Listing a missing folder is a DatasetError."""
    with pytest.raises(DatasetError, match='frame folder not found'):
        list_frames(tmp_path / 'nope')


@pytest.mark.network
@pytest.mark.slow
def test_fetch_visp_real_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Real ``apt-get download`` (75 MB) into a temporary cache; skipped where apt cannot."""
    try:
        folder = fetch_visp(tmp_path / 'cache')
    except DataUnavailableError as e:
        pytest.skip(f'visp-images-data cannot be fetched here: {e}')
    frames = list_frames(folder)
    assert folder == tmp_path / 'cache' / 'mire-2'
    assert len(frames) == 501 and frames[0].name == 'image.0001.pgm'
    assert (folder / 'copyright').is_file()
    img = cv2.imread(str(frames[0]), cv2.IMREAD_UNCHANGED)
    assert img.shape == (288, 384) and img.dtype == np.uint8
    marker = json.loads((folder / visp.MARKER).read_text())
    assert marker['frames'] == 501 and marker['version']
    assert sorted(p.name for p in (tmp_path / 'cache').iterdir()) == ['mire-2']

    def no_run(*args, **kwargs):
        raise AssertionError('second fetch must not download')

    monkeypatch.setattr(visp.subprocess, 'run', no_run)
    assert fetch_visp(tmp_path / 'cache') == folder


# ---------------------------------------------------------------- pseudo-labeller


def test_detect_target_agrees_with_exact_synthetic_labels() -> None:
    """On augmented renders the detector is right within 1 px whenever it answers."""
    backgrounds = [b for names in SPLIT_BACKGROUNDS.values() for b in names]
    found, errors = 0, []
    for i in range(60):
        r = render_sample(
            np.random.default_rng([11, i]), backgrounds[i % len(backgrounds)], (384, 288)
        )
        kp = detect_target(r.image)
        if kp is None:
            continue
        found += 1
        errors.append(np.linalg.norm(kp - r.keypoints, axis=1).max())
    assert found >= 54, found  # recall on fully augmented renders (blur, noise, clutter)
    assert max(errors) < 1.0, max(errors)  # never a wrong label when it answers
    assert np.median(errors) < 0.25


def test_detect_target_returns_none_without_target() -> None:
    """Backgrounds without the target give None."""
    from usn_perception.data.synthetic import _background

    for i, name in enumerate(('camera', 'coins', 'text', 'checkerboard', 'brick', 'astronaut')):
        img = _background(np.random.default_rng(i), name, (384, 288))
        assert detect_target(np.rint(img * 255).astype(np.uint8)) is None, name
    assert detect_target(np.zeros((50, 60), np.uint8)) is None


def test_detect_target_rejects_bad_images() -> None:
    """Wrong dtype or channels raise ImageError."""
    with pytest.raises(ImageError, match='uint8'):
        detect_target(np.zeros((10, 10), np.float32))
    with pytest.raises(ImageError, match='grayscale'):
        detect_target(np.zeros((10, 10, 3), np.uint8))


def test_pseudo_label_frames_writes_loadable_coco(tmp_path: Path) -> None:
    """Pseudo-labelling writes a loadable COCO file and reports what it skipped."""
    frames = []
    for i in range(4):
        r = render_sample(np.random.default_rng([12, i]), 'moon', (384, 288), clean=True)
        frames.append(tmp_path / 'frames' / f'f{i}.png')
        frames[-1].parent.mkdir(exist_ok=True)
        cv2.imwrite(str(frames[-1]), r.image)
    blank = tmp_path / 'frames' / 'blank.png'
    cv2.imwrite(str(blank), np.full((288, 384), 90, np.uint8))
    out = tmp_path / 'labels' / 'pseudo.json'
    stats = pseudo_label_frames([*frames, blank], out, progress=False)
    assert stats['total'] == 5 and stats['labelled'] == 4
    assert stats['unlabelled'] == ['blank.png']
    ds = load_coco(out, expected_keypoints=KEYPOINT_NAMES)
    assert ds.info['pseudo_labels'] is True and 'pseudo-labels' in ds.info['labels']
    assert Path(ds[0].file_name).is_absolute()  # frames live outside the JSON's folder
    inside = tmp_path / 'frames' / 'pseudo.json'
    pseudo_label_frames(frames, inside, progress=False)
    assert load_coco(inside)[0].file_name == 'f0.png'  # relative when under the JSON's folder


def test_pseudo_label_real_mire2_frames(tmp_path: Path) -> None:
    """Runs on the real frames when the default cache already holds them (no download)."""
    folder = cached_sequence()
    if folder is None:
        pytest.skip(
            f'ViSP mire-2 frames not in {default_cache_dir()}; run `usn-perception fetch-visp`'
        )
    frames = list_frames(folder)
    stats = pseudo_label_frames(frames, tmp_path / 'mire2.json', progress=False)
    assert stats['total'] == 501
    assert stats['labelled'] >= 0.95 * stats['total'], stats['unlabelled']
    ds = load_coco(tmp_path / 'mire2.json', expected_keypoints=KEYPOINT_NAMES)
    kp = np.array([s.keypoints for s in ds])
    # Physical sanity: TL left of TR and above BL in every frame; the target moves smoothly.
    assert np.all(kp[:, 0, 0] < kp[:, 1, 0]) and np.all(kp[:, 0, 1] < kp[:, 3, 1])
    jumps = np.linalg.norm(np.diff(kp, axis=0), axis=2).max(axis=1)
    assert np.median(jumps) < 3.0

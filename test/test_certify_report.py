"""The certify command: a complete report, several models side by side, nothing half-written."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from usn_perception.certify import Budget
from usn_perception.cli import main
from usn_perception.data.synthetic import make_dataset
from usn_perception.model_io import save_model
from usn_perception.network import DetectorConfig, build_network

CONFIG = DetectorConfig(input_size=(64, 48), widths=(6, 6, 6, 6, 6, 6, 6, 6, 6))


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('cert')
    paths = make_dataset(root / 'ds', 30, seed=2, size=(128, 96), progress=False)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build_network(CONFIG).eval()
        models.append(save_model(net, CONFIG, root / f'm{seed}' / 'model.json'))
    return root, paths['test'], models


def test_certify_writes_a_complete_report(setup, tmp_path):
    _, data, models = setup
    out = tmp_path / 'report'
    code = main(['--quiet', 'certify', '--model', str(models[0]), '--model', str(models[1]),
                 '--data', str(data), '--alpha', '0.9,1.1', '--beta', '-0.05,0.05',
                 '--tolerance', '2,3', '--budget', '2', '--limit', '2', '--out', str(out),
                 '--sweep', '0.5,1', '--sweep-limit', '1'])
    assert code == 0
    for name in ('summary.json', 'keypoints.csv', 'report.md', 'box_width_hist.png',
                 'certified_accuracy_vs_size.png', 'examples.png'):
        assert (out / name).is_file(), name
    summary = json.loads((out / 'summary.json').read_text())
    for key in ('certified_accuracy', 'clean_pck', 'median_box_width_px', 'seconds_per_image',
                'box', 'method', 'model_sha256'):
        assert key in summary, key
    assert set(summary['certified_accuracy']) == {'2', '3'}
    assert len(summary['models']) == 2
    assert summary['box'] == {'alpha': [0.9, 1.1], 'beta': [-0.05, 0.05]}
    with open(out / 'keypoints.csv') as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * 2 * 5
    for r in rows:
        if r['status'] == 'certified':
            assert float(r['u_lo']) <= float(r['pred_x']) <= float(r['u_hi'])
            assert float(r['v_lo']) <= float(r['pred_y']) <= float(r['v_hi'])
    assert 'cert acc @2px' in (out / 'report.md').read_text()
    assert not list(tmp_path.glob('.report.partial-*'))


def test_exact_values_is_recorded_and_zero_reproduces_the_relaxed_engine(setup, tmp_path):
    """--exact-values reaches certify_keypoints: 0 gives the same boxes as exact_values=0."""
    from usn_perception.certify import EXACT_VALUES, PhotometricBox, certify_keypoints
    from usn_perception.data.coco import load_coco
    from usn_perception.detector import load_detector

    _, data, models = setup
    rows = {}
    for n in (None, 0):
        out = tmp_path / f'r{n}'
        extra = [] if n is None else ['--exact-values', str(n)]
        assert main(['--quiet', 'certify', '--model', str(models[0]), '--data', str(data),
                     '--alpha', '0.8,1.2', '--beta', '-0.1,0.1', '--budget', '3', '--limit', '1',
                     '--out', str(out), *extra]) == 0
        summary = json.loads((out / 'summary.json').read_text())
        assert summary['exact_values'] == (EXACT_VALUES if n is None else 0)
        with open(out / 'keypoints.csv') as f:
            rows[n] = [(r['u_lo'], r['u_hi'], r['v_lo'], r['v_hi']) for r in csv.DictReader(f)]
    det = load_detector(models[0])
    cert = certify_keypoints(det, load_coco(data).load_image(0),
                             PhotometricBox((0.8, 1.2), (-0.1, 0.1)), budget=Budget(3),
                             exact_values=0)
    got = np.array([[float(v) for v in r] for r in rows[0]])
    np.testing.assert_allclose(got, cert.boxes, rtol=1e-6)


def test_precision_is_recorded_and_reaches_the_engine(setup, tmp_path):
    """--precision float64 gives float64 boxes; the default (auto) is float32 on the CPU."""
    from usn_perception.certify import PhotometricBox, certify_keypoints
    from usn_perception.data.coco import load_coco
    from usn_perception.detector import load_detector

    _, data, models = setup
    rows = {}
    for precision in ('auto', 'float64'):
        out = tmp_path / precision
        assert main(['--quiet', 'certify', '--model', str(models[0]), '--data', str(data),
                     '--alpha', '0.8,1.2', '--beta', '-0.1,0.1', '--budget', '3', '--limit', '1',
                     '--precision', precision, '--out', str(out)]) == 0
        summary = json.loads((out / 'summary.json').read_text())
        assert summary['precision'] == ('float32' if precision == 'auto' else 'float64')
        assert f'precision {summary["precision"]}' in (out / 'report.md').read_text()
        with open(out / 'keypoints.csv') as f:
            rows[precision] = np.array([[float(r[k]) for k in ('u_lo', 'u_hi', 'v_lo', 'v_hi')]
                                        for r in csv.DictReader(f)])
    cert = certify_keypoints(load_detector(models[0]), load_coco(data).load_image(0),
                             PhotometricBox((0.8, 1.2), (-0.1, 0.1)), budget=Budget(3),
                             precision='float64')
    np.testing.assert_allclose(rows['float64'], cert.boxes, rtol=1e-6)


@pytest.mark.parametrize('args, problem', [
    (['--alpha', '1.2,0.8'], 'exceeds'),
    (['--alpha', '-1,1'], 'positive'),
    (['--budget', '0'], 'max_subboxes'),
    (['--exact-values', '-1'], 'exact-values'),
    (['--level-nodes', '-1'], 'level-nodes'),
])
def test_bad_box_or_budget_fails_cleanly(setup, tmp_path, capsys, args, problem):
    _, data, models = setup
    out = tmp_path / 'report'
    code = main(['--quiet', 'certify', '--model', str(models[0]), '--data', str(data),
                 '--out', str(out), *args])
    assert code == 1
    assert problem in capsys.readouterr().err
    assert not out.exists()
    assert not list(tmp_path.iterdir())


def test_missing_data_names_the_file(setup, tmp_path, capsys):
    _, _, models = setup
    code = main(['--quiet', 'certify', '--model', str(models[0]), '--data',
                 str(tmp_path / 'none.json'), '--out', str(tmp_path / 'r')])
    assert code == 1
    assert 'none.json' in capsys.readouterr().err


def test_models_are_labelled_by_name_and_numbered_only_when_names_repeat():
    from types import SimpleNamespace

    from usn_perception.certify_report import model_labels as _labels

    def det(path):
        return SimpleNamespace(source=path)

    assert _labels([det('m/default/model.json'), det('m/unpruned/model.json')]) == [
        'default', 'unpruned']
    assert _labels([det('a/default/model.json'), det('b/default/model.json'), det(None),
                    det('x/tiny.json')]) == ['default', 'default#1', 'model', 'tiny']


def test_time_interleaved_times_every_model_on_every_image(setup):
    """Round-robin timing: one certificate per (model, image), identical to a direct call."""
    from usn_perception.certify import PhotometricBox, certify_keypoints
    from usn_perception.certify_dataset import time_interleaved
    from usn_perception.data.coco import load_coco
    from usn_perception.detector import load_detector

    _, data, models = setup
    dataset = load_coco(data)
    dets = [load_detector(m) for m in models]
    images = [dataset.load_image(i) for i in range(2)]
    box = PhotometricBox((0.9, 1.1), (-0.05, 0.05))
    seconds, certs = time_interleaved(dets, images, box, Budget(2), warm=images[0],
                                      exact_values=0)
    assert seconds.shape == (2,) and (seconds > 0).all()
    assert [len(c) for c in certs] == [2, 2]
    for det, per_det in zip(dets, certs, strict=True):
        for image, cert in zip(images, per_det, strict=True):
            ref = certify_keypoints(det, image, box, budget=Budget(2), exact_values=0)
            np.testing.assert_array_equal(cert.boxes, ref.boxes)

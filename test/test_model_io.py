"""Model files: round trip, sha256, and refusal of corrupt, mismatched and pickled files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch

from usn_perception.detector import load_detector
from usn_perception.errors import ModelFileError
from usn_perception.model_io import load_model, resolve_model_path, save_model, sha256_file
from usn_perception.network import DetectorConfig, build_network

SMALL = DetectorConfig(input_size=(32, 24), widths=(4, 4, 4, 4, 4, 4, 4, 4, 4))


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    net = build_network(SMALL)
    return save_model(net, SMALL, tmp_path / 'm' / 'model.json', {'note': 'test'}), net


def test_round_trip_preserves_weights_and_config(tmp_path):
    path, net = _saved(tmp_path)
    net2, config, doc = load_model(path)
    assert config == SMALL
    assert doc['metadata'] == {'note': 'test'}
    assert doc['weights_sha256'] == sha256_file(path.with_suffix('.pt'))
    for (k, a), (_, b) in zip(net.state_dict().items(), net2.state_dict().items(), strict=True):
        assert torch.equal(a, b), k


@pytest.mark.parametrize('form', ['dir', 'json', 'pt'])
def test_model_path_forms(tmp_path, form):
    path, _ = _saved(tmp_path)
    given = {'dir': path.parent, 'json': path, 'pt': path.with_suffix('.pt')}[form]
    assert resolve_model_path(given) == path
    assert load_detector(given).sha256 == sha256_file(path.with_suffix('.pt'))


def test_truncated_weights_are_refused(tmp_path):
    path, _ = _saved(tmp_path)
    pt = path.with_suffix('.pt')
    data = pt.read_bytes()[:200]
    pt.write_bytes(data)
    doc = json.loads(path.read_text())
    doc['weights_sha256'] = sha256_file(pt)  # even with a matching hash
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match='refused to load weights'):
        load_model(path)


def test_modified_weights_fail_the_hash(tmp_path):
    path, _ = _saved(tmp_path)
    pt = path.with_suffix('.pt')
    data = bytearray(pt.read_bytes())
    data[-40] ^= 0xFF
    pt.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match='sha256'):
        load_model(path)


class Evil:
    """Unpickling this would run code: the loader must never do it."""

    def __reduce__(self):
        return (Path('/tmp/usn_pwned').write_text, ('pwned',))


def test_pickled_objects_are_refused_and_not_executed(tmp_path):
    path, _ = _saved(tmp_path)
    pt = path.with_suffix('.pt')
    torch.save({'payload': Evil()}, pt, pickle_module=pickle)
    doc = json.loads(path.read_text())
    doc['weights_sha256'] = sha256_file(pt)
    path.write_text(json.dumps(doc))
    marker = Path('/tmp/usn_pwned')
    marker.unlink(missing_ok=True)
    with pytest.raises(ModelFileError, match='refused'):
        load_model(path)
    assert not marker.exists()


def test_architecture_mismatch_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    doc = json.loads(path.read_text())
    doc['architecture']['widths'][2] = 5
    path.write_text(json.dumps(doc))
    with pytest.raises(ModelFileError, match='do not match the JSON architecture'):
        load_model(path)


@pytest.mark.parametrize('text, problem', [
    ('{not json', 'not a readable JSON'),
    ('[]', 'not a usn_perception model'),
    ('{"format": "usn_perception.model/1"}', "missing key 'architecture'"),
])
def test_bad_json_is_refused(tmp_path, text, problem):
    path, _ = _saved(tmp_path)
    path.write_text(text)
    with pytest.raises(ModelFileError, match=problem) as err:
        load_model(path)
    assert str(path) in str(err.value)


def test_missing_files(tmp_path):
    with pytest.raises(ModelFileError, match='not found'):
        load_model(tmp_path / 'nope.json')
    path, _ = _saved(tmp_path)
    path.with_suffix('.pt').unlink()
    with pytest.raises(ModelFileError, match='weights file not found'):
        load_model(path)


def test_files_without_arch_are_the_plain_network():
    """Model files written before ``arch`` existed keep loading as what they hold."""
    from usn_perception.network import DetectorConfig

    legacy = {'input_size': [64, 48], 'widths': [8] * 9, 'keypoint_names': ['a'],
              'norm_mean': 0.5, 'norm_std': 0.25, 'readout': 'soft-argmax'}
    config = DetectorConfig.from_json(legacy)
    assert (config.arch, config.norm_mean, config.readout) == ('plain', 0.5, 'soft-argmax')
    assert DetectorConfig.from_json(config.to_json()) == config
    new = DetectorConfig()
    assert (new.arch, new.readout, new.norm_mean) == ('homogeneous', 'centroid', 0.0)
    assert DetectorConfig.from_json(new.to_json()) == new
    with pytest.raises(ValueError, match='norm_mean'):
        DetectorConfig(norm_mean=0.5)
    with pytest.raises(ValueError, match='arch'):
        DetectorConfig(arch='resnet')

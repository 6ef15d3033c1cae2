"""The models shipped in models/: what the model card and `usn-perception models` promise."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from usn_perception.demo import _load_models
from usn_perception.detector import load_detector
from usn_perception.model_io import default_model_path, find_models, save_model, sha256_file
from usn_perception.network import DetectorConfig, build_network

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / 'models'
CARD = REPO / 'docs' / 'model_card.md'


def _recorded_sha256() -> dict[str, str]:
    """name → weights sha256 from the table in models/README.md."""
    table = (MODELS / 'README.md').read_text()
    return dict(re.findall(r'^\| `(\w+)` \|.*?\| `([0-9a-f]{64})` \|', table, re.M))


def test_every_shipped_model_is_recorded_with_its_sha256():
    shipped = {p.parent.name: p for p in MODELS.glob('*/model.json')}
    assert {'default', 'unpruned'} <= set(shipped)
    recorded = _recorded_sha256()
    assert set(recorded) == set(shipped)
    for name, json_path in shipped.items():
        assert sha256_file(json_path.with_suffix('.pt')) == recorded[name], name
        assert recorded[name] in CARD.read_text(), f'{name} is missing from the model card'
        assert json_path.with_suffix('.pt').stat().st_size < 4 * 2**20


def test_default_is_the_usn_pruned_unpruned_model():
    default = load_detector()
    assert Path(default.source) == default_model_path()
    unpruned = load_detector(MODELS / 'unpruned')
    pruning = default.metadata['pruning']
    assert pruning['criterion'] == 'usn' and pruning['rounds'] >= 2
    assert pruning['wasserstein'] > 0
    assert pruning['source']['sha256'] == unpruned.sha256
    assert default.num_parameters < 0.5 * unpruned.num_parameters
    assert default.config.arch == unpruned.config.arch == 'homogeneous'
    assert default.readout == unpruned.readout


def test_models_command_lists_the_shipped_models():
    names = {p.parent.name for p in find_models()}
    assert {'default', 'unpruned'} <= names


def test_demo_compares_the_default_with_its_unpruned_source(tmp_path, monkeypatch):
    torch.manual_seed(0)
    config = DetectorConfig(input_size=(32, 24), widths=(4,) * 9)
    source = load_detector(save_model(build_network(config).eval(), config,
                                      tmp_path / 'models' / 'parent' / 'model.json'))
    models = tmp_path / 'models'
    save_model(build_network(config).eval(), config, models / 'other' / 'model.json')
    save_model(build_network(config).eval(), config, models / 'default' / 'model.json',
               {'pruning': {'source': {'sha256': source.sha256}}})
    monkeypatch.setenv('USN_PERCEPTION_MODELS', str(models))
    chosen = _load_models(None)
    assert [Path(d.source).parent.name for d in chosen] == ['default', 'parent']


@pytest.mark.parametrize('name', ['default', 'unpruned'])
def test_shipped_model_card_numbers_name_the_model(name):
    text = CARD.read_text()
    assert f'models/{name}' in text

"""Model files: a weights-only state_dict plus a JSON sidecar, never a pickled object.

``NAME.pt`` holds tensors only and is read with ``torch.load(weights_only=True)``, which
refuses arbitrary pickled objects. ``NAME.json`` holds the architecture (per-layer widths,
keypoint names, input size, normalisation), the weights' sha256 and free-form metadata
(training data summary, metrics, pruning history). A file that is corrupt, truncated,
pickled, or does not match its JSON is refused with :class:`ModelFileError`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import torch
from torch import nn

from usn_perception.errors import ModelFileError
from usn_perception.network import DetectorConfig, build_network

FORMAT = 'usn_perception.model/1'
MODELS_ENV = 'USN_PERCEPTION_MODELS'


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 20), b''):
            h.update(chunk)
    return h.hexdigest()


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Return the JSON sidecar for a model given as directory, ``.json`` or ``.pt`` path."""
    p = Path(path)
    if p.is_dir():
        candidate = p / 'model.json'
        if candidate.is_file():
            return candidate
        jsons = sorted(p.glob('*.json'))
        models = [j for j in jsons if j.with_suffix('.pt').is_file()]
        if len(models) == 1:
            return models[0]
        raise ModelFileError(p, 'directory holds no single model (expected model.json + model.pt)')
    if p.suffix == '.pt':
        p = p.with_suffix('.json')
    if not p.is_file():
        raise ModelFileError(p, 'model file not found')
    return p


def save_model(
    net: nn.Module, config: DetectorConfig, path: str | os.PathLike, metadata: dict | None = None
) -> Path:
    """Write ``path`` (.json) and its ``.pt`` atomically; return the JSON path."""
    json_path = Path(path)
    if json_path.suffix != '.json':
        json_path = json_path / 'model.json' if json_path.suffix == '' else json_path
    json_path.parent.mkdir(parents=True, exist_ok=True)
    pt_path = json_path.with_suffix('.pt')
    state = {k: v.detach().to('cpu', torch.float32).clone() if v.is_floating_point()
             else v.detach().to('cpu').clone() for k, v in net.state_dict().items()}
    buffer = io.BytesIO()
    torch.save(state, buffer)  # in memory: the archive name does not depend on a file name
    payload = buffer.getvalue()
    doc = {
        'format': FORMAT,
        'architecture': config.to_json(),
        'weights': pt_path.name,
        'weights_sha256': hashlib.sha256(payload).hexdigest(),
        'metadata': metadata or {},
    }
    tmp = pt_path.with_suffix('.pt.tmp')
    tmp.write_bytes(payload)
    os.replace(tmp, pt_path)
    tmp_json = json_path.with_suffix('.json.tmp')
    tmp_json.write_text(json.dumps(doc, indent=2, sort_keys=True) + '\n')
    os.replace(tmp_json, json_path)
    return json_path


def read_model_json(json_path: Path) -> dict:
    """Parse and check a model's JSON sidecar."""
    try:
        doc = json.loads(json_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelFileError(json_path, f'not a readable JSON model description ({e})') from e
    if not isinstance(doc, dict) or doc.get('format') != FORMAT:
        raise ModelFileError(json_path, f'not a usn_perception model (format must be {FORMAT!r})')
    for key in ('architecture', 'weights', 'weights_sha256'):
        if key not in doc:
            raise ModelFileError(json_path, f'missing key {key!r}')
    return doc


def load_model(path: str | os.PathLike) -> tuple[nn.Sequential, DetectorConfig, dict]:
    """Load (network in eval mode, config, JSON document); refuse anything suspicious."""
    json_path = resolve_model_path(path)
    doc = read_model_json(json_path)
    try:
        config = DetectorConfig.from_json(doc['architecture'])
    except (TypeError, ValueError) as e:
        raise ModelFileError(json_path, f'invalid architecture: {e}') from e
    pt_path = json_path.parent / str(doc['weights'])
    if not pt_path.is_file():
        raise ModelFileError(pt_path, 'weights file not found')
    digest = sha256_file(pt_path)
    if digest != doc['weights_sha256']:
        raise ModelFileError(
            pt_path, f'sha256 {digest[:12]}… does not match the JSON '
            f'({str(doc["weights_sha256"])[:12]}…): corrupt or replaced weights')
    try:
        state = torch.load(pt_path, map_location='cpu', weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise ModelFileError(pt_path, f'refused to load weights ({type(e).__name__}: {e})') from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFileError(pt_path, 'weights file is not a state_dict of tensors')
    net = build_network(config)
    expected = net.state_dict()
    if set(state) != set(expected):
        missing = sorted(set(expected) - set(state))[:3]
        extra = sorted(set(state) - set(expected))[:3]
        raise ModelFileError(pt_path, f'weights do not match the JSON architecture '
                                      f'(missing {missing}, unexpected {extra})')
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise ModelFileError(pt_path, f'weights do not match the JSON architecture: {k} has '
                                          f'shape {tuple(v.shape)}, expected '
                                          f'{tuple(expected[k].shape)}')
        if v.is_floating_point() and not torch.isfinite(v).all():
            raise ModelFileError(pt_path, f'weights hold NaN or infinite values in {k}')
    net.load_state_dict(state)
    net.eval()
    doc['_json_path'] = str(json_path)
    return net, config, doc


def model_name(path: str | os.PathLike | None) -> str:
    """How reports name a model: its folder for ``…/NAME/model.json``, else the file stem."""
    if path is None:
        return 'model'
    p = Path(path)
    return p.parent.name if p.name == 'model.json' else p.stem if p.suffix else p.name


def default_model_dirs() -> list[Path]:
    """Where shipped models are looked for, in order.

    ``$USN_PERCEPTION_MODELS``, the installed share directory
    (``share/usn_perception/models``) and the source tree's ``models/``.
    """
    dirs: list[Path] = []
    if os.environ.get(MODELS_ENV):
        dirs.append(Path(os.environ[MODELS_ENV]))
    try:
        from ament_index_python.packages import get_package_share_directory

        dirs.append(Path(get_package_share_directory('usn_perception')) / 'models')
    except Exception:  # noqa: BLE001 - not installed through ament, or no AMENT_PREFIX_PATH
        pass
    dirs.append(Path(__file__).resolve().parent.parent / 'models')
    return dirs


def find_models() -> list[Path]:
    """JSON paths of every model under :func:`default_model_dirs` (deduplicated by content)."""
    found: list[Path] = []
    seen: set[str] = set()
    for d in default_model_dirs():
        if not d.is_dir():
            continue
        for j in sorted(d.glob('*/model.json')) + sorted(d.glob('*.json')):
            if not j.with_suffix('.pt').is_file():
                continue
            key = f'{j.parent.name}/{j.name}'
            if key in seen:
                continue
            seen.add(key)
            found.append(j)
    return found


def default_model_path() -> Path:
    """The shipped default model (``models/default/model.json``)."""
    for d in default_model_dirs():
        candidate = d / 'default' / 'model.json'
        if candidate.is_file():
            return candidate
    raise ModelFileError(
        'models/default/model.json',
        'no shipped default model found in ' + ', '.join(str(d) for d in default_model_dirs()))

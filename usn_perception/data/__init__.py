"""Datasets: COCO keypoints I/O, the procedural 5-dot target, and real ViSP frames.

ROS-free. Submodules are imported lazily so that loading a COCO file does not pull in
scikit-image (backgrounds) or subprocess machinery (ViSP fetch).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    'KeypointDataset': 'coco',
    'KeypointSample': 'coco',
    'PIXEL_CENTRE': 'coco',
    'PIXEL_CORNER': 'coco',
    'load_coco': 'coco',
    'read_image': 'coco',
    'save_coco': 'coco',
    'KEYPOINT_NAMES': 'target',
    'make_dataset': 'synthetic',
    'render_sample': 'synthetic',
    'SPLIT_BACKGROUNDS': 'synthetic',
    'DataUnavailableError': 'visp',
    'default_cache_dir': 'visp',
    'fetch_visp': 'visp',
    'list_frames': 'visp',
    'detect_target': 'pseudo_label',
    'pseudo_label_frames': 'pseudo_label',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'{__name__}.{module}'), name)

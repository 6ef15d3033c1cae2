"""ROS bag tools: record image bags, evaluate them offline, replay them through the node.

Bags are read and written with ``rosbags`` (no ROS install needed), in both rosbag2 storages
(MCAP and sqlite3). One module per job:

- :mod:`.sources`, :mod:`.write`: ``make-bag`` (image folder, COCO file, ViSP cache, or a
  synthetic run with a scripted lighting change) and the stamp-keyed label sidecar;
- :mod:`.read`: checked topic selection and a frame iterator (Image and CompressedImage),
  with recovery of truncated MCAP files;
- :mod:`.labels`: labels keyed by header stamp, checked against the bag;
- :mod:`.evaluate`, :mod:`.report`, :mod:`.plots`: ``eval-bag``, deterministic offline
  evaluation through the node's per-frame core;
- :mod:`.outputs`: the keypoint output bag (write, read back, compare two runs);
- :mod:`.replay`: lockstep replay through a running node over rclpy (the only module here
  that starts a ROS context).

Submodules are imported lazily, so importing the package pulls in neither torch nor rclpy.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    'BagError': 'errors',
    'CorruptBagError': 'errors',
    'EmptyBagError': 'errors',
    'LabelMismatchError': 'errors',
    'MessageTypeError': 'errors',
    'TopicNotFoundError': 'errors',
    'BagReader': 'read',
    'Frame': 'read',
    'iter_frames': 'read',
    'BagSpec': 'write',
    'write_image_bag': 'write',
    'folder_source': 'sources',
    'coco_source': 'sources',
    'visp_source': 'sources',
    'synthetic_source': 'sources',
    'load_bag_labels': 'labels',
    'evaluate_bag': 'evaluate',
    'PartialEvaluationError': 'evaluate',
    'read_outputs': 'outputs',
    'compare_outputs': 'outputs',
    'replay_bag': 'replay',
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Import the submodule that defines ``name`` on first use (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module(f'{__name__}.{module}'), name)

"""Labels for a bag: a COCO keypoints file whose images carry ``stamp_ns`` (header stamps).

``make-bag`` writes such a sidecar (``<bag>/labels.json``). Matching is exact on the integer
stamp in ns: a label whose stamp is not a frame of the topic means the file belongs to another
bag (or another rate, start time or topic), and evaluating against it would silently score the
wrong frames, so it is an error that names both files and shows stamps from each.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from usn_perception.bag.errors import LabelMismatchError
from usn_perception.data.coco import KeypointSample
from usn_perception.errors import DatasetError


@dataclass
class BagLabels:
    """Labels by header stamp (ns), and what the file says about itself."""

    path: Path
    keypoint_names: tuple[str, ...]
    by_stamp: dict[int, KeypointSample]
    pseudo: bool
    description: str

    def __len__(self) -> int:
        """Number of labelled frames."""
        return len(self.by_stamp)


def load_bag_labels(path: str | Path, keypoint_names: Sequence[str] | None = None) -> BagLabels:
    """Load a label sidecar; ``keypoint_names`` pins (and reorders to) the model's names."""
    from usn_perception.data.coco import load_coco

    path = Path(path)
    ds = load_coco(path, check_images=False, expected_keypoints=keypoint_names)
    by_stamp: dict[int, KeypointSample] = {}
    for s in ds:
        stamp = s.extra.get('stamp_ns')
        if not isinstance(stamp, int) or isinstance(stamp, bool):
            raise DatasetError(path, 'image has no integer stamp_ns: labels for a bag must be '
                                     'keyed by header stamp (make-bag writes such a file)',
                               entry=f'image_id={s.image_id}')
        if stamp in by_stamp:
            raise DatasetError(path, f'two images share stamp_ns {stamp}',
                               entry=f'image_id={s.image_id}')
        by_stamp[stamp] = s
    if not by_stamp:
        raise DatasetError(path, 'the label file holds no labelled images')
    return BagLabels(path, ds.keypoint_names, by_stamp, bool(ds.info.get('pseudo_labels')),
                     str(ds.info.get('labels') or ds.info.get('description') or ''))


def check_labels(labels: BagLabels, stamps: Iterable[int], bag: Path, topic: str) -> int:
    """Raise :class:`LabelMismatchError` unless the labels fit the topic's frame stamps.

    ``stamps`` are the frame stamps (ns) of the evaluated window (of the readable part of a
    damaged bag). Labels outside the window's first..last stamp are not checked (a window
    may cover part of a labelled run); every label inside must be a frame, and at least one
    label must match. Returns how many frames have a label.
    """
    frames = sorted(set(stamps))
    if not frames:
        return 0
    lo, hi = frames[0], frames[-1]
    have = set(frames)
    inside = [s for s in labels.by_stamp if lo <= s <= hi]
    missing = sorted(s for s in inside if s not in have)
    matched = len(inside) - len(missing)
    where = (f'{topic!r} of {bag} (frames {lo}..{hi} ns, {len(frames)} frames)')
    if missing:
        shown = ', '.join(str(s) for s in missing[:3])
        raise LabelMismatchError(
            labels.path, f'does not match {where}: {len(missing)} of {len(labels.by_stamp)} '
                         f'labels name stamps between the frames (e.g. {shown})')
    if matched == 0:
        span = f'{min(labels.by_stamp)}..{max(labels.by_stamp)} ns'
        raise LabelMismatchError(
            labels.path, f'does not match {where}: none of its {len(labels.by_stamp)} labels '
                         f'is a frame (labels span {span})')
    return matched

"""Write image bags (``make-bag``) and their label sidecar, with ``rosbags``.

Frame i is stamped ``start_ns + round(i · 1e9 / rate)`` in both the header and the log time,
so a bag is a pure function of its source and options. Labels go to a COCO sidecar next to
the storage file (``<bag>/labels.json``) whose images carry ``stamp_ns``: the evaluator
matches labels to frames by header stamp, the one key that survives re-recording, filtering
and conversion between storages. The bag is assembled in a hidden folder and renamed into
place when complete, so a failed run leaves nothing that looks like a bag.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from usn_perception.bag.errors import BagError
from usn_perception.bag.messages import COMPRESSED, IMAGE, make_header, qos, serialize, split_ns
from usn_perception.bag.sources import SourceFrame

STORAGES = ('mcap', 'sqlite3')
ENCODINGS = ('mono8', 'mono16', 'rgb8', 'bgr8')
COMPRESSIONS = ('png', 'jpeg')
LABELS_FILE = 'labels.json'
#: Default first stamp: 2023-11-14T22:13:20Z, a plausible recording time (never 0: an
#: unstamped header means "use the clock" to the node).
DEFAULT_START_NS = 1_700_000_000 * 10**9


@dataclass(frozen=True)
class BagSpec:
    """How frames become messages; validated on construction.

    ``compression`` None writes ``sensor_msgs/Image`` in ``encoding``; ``png``/``jpeg`` writes
    ``sensor_msgs/CompressedImage`` (gray or colour as the source is).
    """

    topic: str = '/camera/image_raw'
    frame_id: str = 'camera'
    rate: float = 30.0
    start_ns: int = DEFAULT_START_NS
    encoding: str = 'mono8'
    compression: str | None = None
    storage: str = 'mcap'

    def __post_init__(self) -> None:
        """Refuse options that cannot make a bag, naming the option."""
        if not self.topic.startswith('/') or ' ' in self.topic:
            raise ValueError(f'topic must be an absolute ROS name, got {self.topic!r}')
        if not (self.rate > 0 and np.isfinite(self.rate)):
            raise ValueError(f'rate must be a positive number of Hz, got {self.rate}')
        if int(self.start_ns) != self.start_ns or self.start_ns <= 0:
            raise ValueError(f'start stamp must be a positive integer ns, got {self.start_ns}')
        if self.encoding not in ENCODINGS:
            raise ValueError(f'encoding must be one of {ENCODINGS}, got {self.encoding!r}')
        if self.compression is not None and self.compression not in COMPRESSIONS:
            raise ValueError(f'compression must be one of {COMPRESSIONS}, got '
                             f'{self.compression!r}')
        if self.storage not in STORAGES:
            raise ValueError(f'storage must be one of {STORAGES}, got {self.storage!r}')

    @property
    def msgtype(self) -> str:
        """The message type recorded."""
        return IMAGE if self.compression is None else COMPRESSED

    def stamp_ns(self, index: int) -> int:
        """Header stamp (= log time) of frame ``index``."""
        return int(self.start_ns) + round(index * 1e9 / self.rate)


def to_encoding(image: np.ndarray, encoding: str) -> np.ndarray:
    """Gray or RGB pixels (8/16 bit) as an array in ``encoding``'s layout and depth."""
    img = np.asarray(image)
    if img.dtype == np.uint16 and encoding != 'mono16':
        img = (img >> 8).astype(np.uint8)
    gray = encoding.startswith('mono')
    if gray and img.ndim == 3:
        import cv2

        img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    if not gray and img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    if encoding == 'mono16' and img.dtype == np.uint8:
        img = img.astype(np.uint16) * 257
    if encoding == 'bgr8':
        img = img[:, :, ::-1]
    return np.ascontiguousarray(img)


def image_message(image: np.ndarray, spec: BagSpec, index: int):
    """The rclpy Image/CompressedImage message of frame ``index``."""
    from usn_perception.ros.conversions import numpy_to_compressed, numpy_to_image

    header = make_header(*split_ns(spec.stamp_ns(index)), spec.frame_id)
    if spec.compression is None:
        return numpy_to_image(to_encoding(image, spec.encoding), spec.encoding, header)
    img = np.asarray(image)
    if img.dtype == np.uint16 and spec.compression == 'jpeg':
        img = (img >> 8).astype(np.uint8)
    return numpy_to_compressed(img, spec.compression, header)


def _sidecar(path: Path, labelled: list[tuple[int, SourceFrame]], spec: BagSpec,
             names: tuple[str, ...], info: dict[str, Any]) -> None:
    from usn_perception.data.coco import PIXEL_CENTRE, KeypointSample, save_coco

    samples = []
    for index, frame in labelled:
        stamp = spec.stamp_ns(index)
        h, w = frame.image.shape[:2]
        samples.append(KeypointSample(
            image_id=index + 1, file_name=f'{spec.topic.strip("/")}/{stamp}', image_path=path,
            width=int(w), height=int(h), keypoints=np.asarray(frame.keypoints, np.float64),
            visibility=np.asarray(frame.visibility),
            extra={**frame.extra, 'stamp_ns': stamp, 'frame_index': index}))
    doc = {**info, 'bag_topic': spec.topic, 'stamp_key': 'stamp_ns',
           'description': 'labels of a bag, keyed by header stamp (images[].stamp_ns)',
           'pixel_convention': PIXEL_CENTRE}
    save_coco(path, samples, names, doc)


def write_image_bag(out: str | Path, frames: Iterable[SourceFrame], spec: BagSpec, *,
                    keypoint_names: tuple[str, ...] | None = None,
                    info: dict[str, Any] | None = None, progress: bool = False,
                    total: int | None = None) -> dict[str, Any]:
    """Record ``frames`` as a bag at ``out`` (must not exist), plus a label sidecar.

    The sidecar ``out/labels.json`` is written when any frame has labels. Returns a summary:
    ``{'bag', 'storage', 'topic', 'msgtype', 'frames', 'labelled', 'labels', 'first_ns',
    'last_ns'}``.
    """
    from rosbags.rosbag2 import StoragePlugin, Writer
    from tqdm import tqdm

    from usn_perception.bag.messages import typestore

    out = Path(out)
    if out.exists():
        raise BagError(out, 'exists already; not overwriting (choose a new --out)')
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f'.{out.name}.partial-', dir=out.parent))
    bag = stage / out.name
    plugin = StoragePlugin.MCAP if spec.storage == 'mcap' else StoragePlugin.SQLITE3
    labelled: list[tuple[int, SourceFrame]] = []
    count = 0
    try:
        with Writer(bag, version=9, storage_plugin=plugin) as writer:
            conn = writer.add_connection(spec.topic, spec.msgtype, typestore=typestore(),
                                         offered_qos_profiles=[qos(reliable=True)])
            for frame in tqdm(frames, total=total, desc='make-bag', unit='frame',
                              disable=not progress):
                msg = image_message(frame.image, spec, count)
                writer.write(conn, spec.stamp_ns(count), serialize(msg, spec.msgtype))
                if frame.keypoints is not None:
                    labelled.append((count, _strip(frame)))
                count += 1
        if count == 0:
            raise BagError(out, 'no frames to record')
        if labelled:
            names = keypoint_names or tuple(
                f'kp{i}' for i in range(len(labelled[0][1].keypoints)))
            _sidecar(bag / LABELS_FILE, labelled, spec, names, info or {})
        bag.rename(out)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return {'bag': out, 'storage': spec.storage, 'topic': spec.topic, 'msgtype': spec.msgtype,
            'frames': count, 'labelled': len(labelled),
            'labels': out / LABELS_FILE if labelled else None,
            'first_ns': spec.stamp_ns(0), 'last_ns': spec.stamp_ns(count - 1)}


def _strip(frame: SourceFrame) -> SourceFrame:
    """Keep labels and size, drop the pixels (the sidecar needs only the shape)."""
    shape = frame.image.shape[:2]
    return SourceFrame(np.empty(shape + (0,), np.uint8), frame.name, frame.keypoints,
                       frame.visibility, frame.extra)

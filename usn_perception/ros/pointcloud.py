"""The ``~/keypoints`` PointCloud2: one point per keypoint, packed and decoded with numpy.

Layout (little-endian, ``point_step`` 48, ``height`` 1, ``width`` K in model order):

====== ======= ====== =================================================================
field  type    offset meaning
====== ======= ====== =================================================================
x, y   float32 0, 4   nominal keypoint, input-image pixels (centre of top-left = (0, 0))
u_lo…  float64 8–39   certified box ``u_lo, u_hi, v_lo, v_hi``; NaN when not certified
score  float32 40     heatmap peak confidence in [0, 1]
status uint8   44     0 not certified, 1 certified, 2 out of budget, 3 skipped
kp_id  uint16  46     index into ``keypoint_names`` of ``~/keypoints/info``
====== ======= ====== =================================================================

The box stays float64 so that its outward-rounded ends are published exactly; ``x, y`` are
float32 display values (the float64 nominal lies inside the box; its float32 rounding may
sit up to one float32 ulp outside a degenerate box).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from sensor_msgs.msg import PointCloud2, PointField

#: PointField datatype code → numpy type character.
_NUMPY = {PointField.INT8: 'i1', PointField.UINT8: 'u1', PointField.INT16: 'i2',
          PointField.UINT16: 'u2', PointField.INT32: 'i4', PointField.UINT32: 'u4',
          PointField.FLOAT32: 'f4', PointField.FLOAT64: 'f8'}

KEYPOINT_DTYPE = np.dtype({
    'names': ['x', 'y', 'u_lo', 'u_hi', 'v_lo', 'v_hi', 'score', 'status', 'kp_id'],
    'formats': ['<f4', '<f4', '<f8', '<f8', '<f8', '<f8', '<f4', 'u1', '<u2'],
    'offsets': [0, 4, 8, 16, 24, 32, 40, 44, 46],
    'itemsize': 48,
})
_CODES = {v: k for k, v in _NUMPY.items()}


def dtype_fields(dtype: np.dtype) -> list[PointField]:
    """The PointField list describing a structured numpy dtype (count 1 each)."""
    fields = []
    for name in dtype.names:
        sub, offset = dtype.fields[name][:2]
        fields.append(PointField(name=name, offset=int(offset),
                                 datatype=_CODES[sub.str[1:]], count=1))
    return fields


def pack_points(points: np.ndarray, header=None) -> PointCloud2:
    """A 1-row, unorganised PointCloud2 from a little-endian structured array."""
    pts = np.ascontiguousarray(points)
    msg = PointCloud2()
    if header is not None:
        msg.header = header
    msg.height, msg.width = 1, int(pts.shape[0])
    msg.fields = dtype_fields(pts.dtype)
    msg.is_bigendian = False
    msg.point_step = int(pts.dtype.itemsize)
    msg.row_step = msg.point_step * msg.width
    msg.data = pts.tobytes()
    nan_fields = [n for n in pts.dtype.names if pts.dtype[n].kind == 'f']
    msg.is_dense = not any(np.isnan(pts[n]).any() for n in nan_fields)
    return msg


def pack_keypoints(keypoints: np.ndarray, scores: np.ndarray, boxes: np.ndarray,
                   status: np.ndarray, header=None) -> PointCloud2:
    """The ``~/keypoints`` message from (K, 2) keypoints, (K,) scores, (K, 4) boxes, status."""
    kps = np.asarray(keypoints, dtype=np.float64).reshape(-1, 2)
    k = kps.shape[0]
    bx = np.asarray(boxes, dtype=np.float64).reshape(k, 4)
    pts = np.zeros(k, dtype=KEYPOINT_DTYPE)
    pts['x'], pts['y'] = kps[:, 0], kps[:, 1]
    for i, name in enumerate(('u_lo', 'u_hi', 'v_lo', 'v_hi')):
        pts[name] = bx[:, i]
    pts['score'] = np.asarray(scores, dtype=np.float64).reshape(k)
    pts['status'] = np.asarray(status).reshape(k)
    pts['kp_id'] = np.arange(k)
    return pack_points(pts, header)


def cloud_to_numpy(msg: PointCloud2) -> np.ndarray:
    """Any PointCloud2 → (height × width,) structured array with its fields, native order.

    Honours ``offset``, ``datatype``, ``point_step``, ``row_step`` and ``is_bigendian``;
    fields with ``count`` > 1 become sub-arrays. Raises ValueError on inconsistent messages.
    """
    endian = '>' if msg.is_bigendian else '<'
    names, formats, offsets = [], [], []
    for f in msg.fields:
        if f.datatype not in _NUMPY:
            raise ValueError(f'field {f.name!r} has unknown datatype {f.datatype}')
        names.append(f.name)
        code = endian + _NUMPY[f.datatype]
        formats.append((code, (f.count,)) if f.count > 1 else code)
        offsets.append(f.offset)
    point_step, width, height = int(msg.point_step), int(msg.width), int(msg.height)
    dtype = np.dtype({'names': names, 'formats': formats, 'offsets': offsets,
                      'itemsize': point_step})
    row_step = int(msg.row_step)
    if row_step < width * point_step:
        raise ValueError(f'row_step {row_step} < width {width} x point_step {point_step}')
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size < height * row_step:
        raise ValueError(f'data holds {buf.size} bytes, expected {height * row_step}')
    rows = buf[:height * row_step].reshape(height, row_step)[:, :width * point_step]
    pts = np.ascontiguousarray(rows).view(dtype).reshape(-1)
    native = [(n, pts.dtype[n].newbyteorder('=')) for n in names]
    out = np.empty(pts.shape, dtype=native)
    for n in names:
        out[n] = pts[n]
    return out


@dataclass(frozen=True)
class DecodedKeypoints:
    """The fields of a ``~/keypoints`` message as plain arrays (K rows, model order)."""

    keypoints: np.ndarray  # (K, 2) float64 from float32 x, y
    boxes: np.ndarray  # (K, 4) float64 u_lo, u_hi, v_lo, v_hi
    scores: np.ndarray  # (K,) float32
    status: np.ndarray  # (K,) uint8
    kp_id: np.ndarray  # (K,) uint16

    @property
    def certified(self) -> np.ndarray:
        """(K,) bool: status == CERTIFIED."""
        return self.status == 1


def decode_keypoints(msg: PointCloud2) -> DecodedKeypoints:
    """Decode a ``~/keypoints`` message (any field order or padding) for consumers."""
    pts = cloud_to_numpy(msg)
    missing = set(KEYPOINT_DTYPE.names) - set(pts.dtype.names or ())
    if missing:
        raise ValueError(f'not a keypoints cloud: missing fields {sorted(missing)}')
    kps = np.stack([pts['x'], pts['y']], axis=1).astype(np.float64)
    boxes = np.stack([pts[n] for n in ('u_lo', 'u_hi', 'v_lo', 'v_hi')], axis=1)
    return DecodedKeypoints(kps, boxes.astype(np.float64), pts['score'].astype(np.float32),
                            pts['status'].astype(np.uint8), pts['kp_id'].astype(np.uint16))

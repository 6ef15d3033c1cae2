"""``sensor_msgs/Image`` and ``CompressedImage`` ↔ numpy, without cv_bridge.

Decoding honours ``step`` (row padding) and ``is_bigendian``, checks that ``data`` holds
exactly ``height × step`` bytes, and returns what the pipeline expects: HxW gray or HxWx3
**RGB** (bgr/bgra are reordered, alpha dropped), uint8, uint16 or float32. Anything else
raises :class:`~usn_perception.errors.ImageError` naming the problem, so a node can warn,
count and skip the frame. Encoding to a message always assigns ``bytes`` to ``data``
(assigning a numpy array or memoryview copies element by element: ~70 ms per VGA frame).
"""

from __future__ import annotations

import cv2
import numpy as np
from sensor_msgs.msg import CompressedImage, Image

from usn_perception.errors import ImageError

#: encoding → (numpy dtype, channels, channel order of the message)
ENCODINGS: dict[str, tuple[str, int, str]] = {
    'mono8': ('u1', 1, 'gray'),
    '8UC1': ('u1', 1, 'gray'),
    'mono16': ('u2', 1, 'gray'),
    '16UC1': ('u2', 1, 'gray'),
    'rgb8': ('u1', 3, 'rgb'),
    'bgr8': ('u1', 3, 'bgr'),
    'rgba8': ('u1', 4, 'rgb'),
    'bgra8': ('u1', 4, 'bgr'),
    '32FC1': ('f4', 1, 'gray'),
}


def image_to_numpy(msg: Image) -> np.ndarray:
    """Decode an Image message to HxW (gray) or HxWx3 (RGB) in its own dtype.

    The returned array may share memory with ``msg.data`` (no copy when rows are unpadded
    and the channel order already fits); treat it as read-only.
    """
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        raise ImageError(f'unsupported encoding {encoding!r} (supported: '
                         f'{", ".join(ENCODINGS)})')
    kind, channels, order = ENCODINGS[encoding]
    h, w, step = int(msg.height), int(msg.width), int(msg.step)
    if h < 1 or w < 1:
        raise ImageError(f'empty image: {w}x{h}')
    dtype = np.dtype(kind).newbyteorder('>' if msg.is_bigendian else '<')
    row_bytes = w * channels * dtype.itemsize
    if step < row_bytes:
        raise ImageError(f'step {step} is smaller than width {w} x {channels} channel(s) x '
                         f'{dtype.itemsize} byte(s) = {row_bytes}')
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size != h * step:
        raise ImageError(f'data holds {buf.size} bytes, expected height {h} x step {step} = '
                         f'{h * step}')
    if step % dtype.itemsize:
        # Rows would start unaligned for the element type: repack the rows byte-wise first.
        rows = buf.reshape(h, step)[:, :row_bytes]
        arr = np.ascontiguousarray(rows).view(dtype).reshape(h, w, channels)
    else:
        arr = np.ndarray((h, w, channels), dtype=dtype, buffer=buf,
                         strides=(step, channels * dtype.itemsize, dtype.itemsize))
    if not dtype.isnative:
        arr = arr.astype(dtype.newbyteorder('='))
    if channels == 1:
        out = arr[:, :, 0]
    elif order == 'bgr':
        out = arr[:, :, 2::-1]
    else:
        out = arr[:, :, :3]
    if kind == 'f4' and not np.isfinite(out).all():
        raise ImageError('image holds NaN or infinite pixels')
    return np.ascontiguousarray(out)


def numpy_to_image(array: np.ndarray, encoding: str, header=None) -> Image:
    """Encode HxW / HxWxC ``array`` (already in ``encoding``'s channel order) as an Image.

    ``data`` is assigned from ``bytes`` (fast path); rows are unpadded, little-endian.
    """
    if encoding not in ENCODINGS:
        raise ImageError(f'unsupported encoding {encoding!r}')
    kind, channels, _ = ENCODINGS[encoding]
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] != channels:
        raise ImageError(f'{encoding} needs {channels} channel(s), got shape {np.shape(array)}')
    arr = np.ascontiguousarray(arr, dtype=np.dtype(kind).newbyteorder('<'))
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(arr.shape[0]), int(arr.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = int(arr.shape[1] * arr.shape[2] * arr.itemsize)
    msg.data = arr.tobytes()
    return msg


def compressed_to_numpy(msg: CompressedImage) -> np.ndarray:
    """Decode a CompressedImage (jpeg, png, … as OpenCV reads them) to gray or RGB."""
    buf = np.frombuffer(msg.data, dtype=np.uint8)
    if buf.size == 0:
        raise ImageError(f'empty compressed image (format {msg.format!r})')
    img = cv2.imdecode(buf, cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ImageError(f'could not decode compressed image (format {msg.format!r}, '
                         f'{buf.size} bytes)')
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    if img.ndim == 3:
        img = img[:, :, 2::-1]  # OpenCV decodes to BGR(A); the pipeline wants RGB
    if img.dtype not in (np.uint8, np.uint16):
        raise ImageError(f'compressed image decodes to unsupported dtype {img.dtype}')
    return np.ascontiguousarray(img)


def numpy_to_compressed(array: np.ndarray, fmt: str = 'png', header=None) -> CompressedImage:
    """Encode a gray or RGB array as a CompressedImage (``png`` or ``jpeg``)."""
    arr = np.asarray(array)
    if arr.ndim == 3:
        arr = arr[:, :, ::-1]  # RGB → BGR for OpenCV
    ok, enc = cv2.imencode('.' + ('jpg' if fmt in ('jpeg', 'jpg') else fmt),
                           np.ascontiguousarray(arr))
    if not ok:
        raise ImageError(f'could not encode image as {fmt}')
    msg = CompressedImage()
    if header is not None:
        msg.header = header
    msg.format = 'jpeg' if fmt in ('jpeg', 'jpg') else fmt
    msg.data = enc.tobytes()
    return msg

"""Message ↔ numpy helpers: encodings, step padding, endianness, PointCloud2, θ polygon."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip('sensor_msgs.msg')

from diagnostic_msgs.msg import DiagnosticStatus  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from sensor_msgs.msg import CompressedImage, Image, PointCloud2  # noqa: E402

from usn_perception.errors import ImageError  # noqa: E402
from usn_perception.ros.conversions import (  # noqa: E402
    compressed_to_numpy,
    image_to_numpy,
    numpy_to_compressed,
    numpy_to_image,
)
from usn_perception.ros.diagnostics import NodeStats, status_values  # noqa: E402
from usn_perception.ros.photometric import interval_to_polygon, polygon_to_interval  # noqa: E402
from usn_perception.ros.pointcloud import (  # noqa: E402
    KEYPOINT_DTYPE,
    cloud_to_numpy,
    decode_keypoints,
    pack_keypoints,
)

RNG = np.random.default_rng(0)
GRAY8 = RNG.integers(0, 256, (5, 7), dtype=np.uint8)
RGB8 = RNG.integers(0, 256, (5, 7, 3), dtype=np.uint8)
GRAY16 = RNG.integers(0, 65536, (5, 7), dtype=np.uint16)
GRAYF = RNG.random((5, 7)).astype(np.float32)


def _message(raw: np.ndarray, encoding: str, pad: int = 0, bigendian: bool = False) -> Image:
    """Build an Image by hand: rows padded with ``pad`` junk bytes, chosen byte order."""
    arr = raw if raw.ndim == 3 else raw[:, :, None]
    arr = arr.astype(arr.dtype.newbyteorder('>' if bigendian else '<'))
    rows = arr.reshape(arr.shape[0], -1).view(np.uint8)
    padded = np.concatenate([rows, np.full((rows.shape[0], pad), 0xAB, np.uint8)], axis=1)
    return Image(height=arr.shape[0], width=arr.shape[1], encoding=encoding,
                 is_bigendian=int(bigendian), step=padded.shape[1], data=padded.tobytes())


@pytest.mark.parametrize('encoding, raw, expected', [
    ('mono8', GRAY8, GRAY8),
    ('8UC1', GRAY8, GRAY8),
    ('mono16', GRAY16, GRAY16),
    ('16UC1', GRAY16, GRAY16),
    ('rgb8', RGB8, RGB8),
    ('bgr8', RGB8[:, :, ::-1], RGB8),
    ('rgba8', np.dstack([RGB8, GRAY8]), RGB8),
    ('bgra8', np.dstack([RGB8[:, :, ::-1], GRAY8]), RGB8),
    ('32FC1', GRAYF, GRAYF),
])
@pytest.mark.parametrize('pad', [0, 3])
@pytest.mark.parametrize('bigendian', [False, True])
def test_every_encoding_decodes_with_padding_and_byte_order(
        encoding, raw, expected, pad, bigendian):
    out = image_to_numpy(_message(raw, encoding, pad, bigendian))
    assert out.dtype == expected.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize('encoding, array', [('mono8', GRAY8), ('bgr8', RGB8),
                                             ('mono16', GRAY16), ('32FC1', GRAYF)])
def test_encode_round_trips_through_serialisation(encoding, array):
    msg = numpy_to_image(array, encoding)
    assert isinstance(bytes(msg.data), bytes) and msg.is_bigendian == 0
    back = image_to_numpy(deserialize_message(serialize_message(msg), Image))
    expected = array[:, :, ::-1] if encoding == 'bgr8' else array
    np.testing.assert_array_equal(back, expected)


@pytest.mark.parametrize('change, word', [
    ({'encoding': 'yuv422'}, 'unsupported encoding'),
    ({'step': 3}, 'step'),
    ({'height': 6}, 'expected height'),
    ({'data': b'\x00' * 10}, 'bytes'),
    ({'width': 0}, 'empty'),
])
def test_malformed_images_raise_with_the_reason(change, word):
    msg = _message(GRAY8, 'mono8')
    for key, value in change.items():
        setattr(msg, key, value)
    with pytest.raises(ImageError, match=word):
        image_to_numpy(msg)


def test_nan_pixels_are_refused():
    bad = GRAYF.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ImageError, match='NaN'):
        image_to_numpy(_message(bad, '32FC1'))


def test_compressed_png_and_jpeg_decode_to_rgb_or_gray():
    np.testing.assert_array_equal(compressed_to_numpy(numpy_to_compressed(RGB8, 'png')), RGB8)
    np.testing.assert_array_equal(compressed_to_numpy(numpy_to_compressed(GRAY16, 'png')),
                                  GRAY16)
    smooth = np.tile(np.linspace(0, 255, 32, dtype=np.uint8), (16, 1))
    jpeg = compressed_to_numpy(numpy_to_compressed(smooth, 'jpeg'))
    assert jpeg.shape == smooth.shape and np.abs(jpeg.astype(int) - smooth).max() < 12
    with pytest.raises(ImageError, match='decode'):
        compressed_to_numpy(CompressedImage(format='png', data=b'not a png'))
    with pytest.raises(ImageError, match='empty'):
        compressed_to_numpy(CompressedImage(format='jpeg'))


def test_keypoint_cloud_packs_the_documented_fields_and_round_trips():
    kps = np.array([[1.25, 2.5], [10.0, 20.0], [np.nan, np.nan]])
    boxes = np.array([[1.0, 1.5, 2.0, 3.0], [np.nan] * 4, [np.nan] * 4])
    msg = pack_keypoints(kps, [0.9, 0.5, 0.1], boxes, [1, 2, 3])
    fields = {f.name: (f.offset, f.datatype) for f in msg.fields}
    assert fields == {'x': (0, 7), 'y': (4, 7), 'u_lo': (8, 8), 'u_hi': (16, 8),
                      'v_lo': (24, 8), 'v_hi': (32, 8), 'score': (40, 7), 'status': (44, 2),
                      'kp_id': (46, 4)}
    assert msg.point_step == 48 and msg.width == 3 and msg.height == 1 and not msg.is_dense
    dec = decode_keypoints(deserialize_message(serialize_message(msg), PointCloud2))
    np.testing.assert_array_equal(dec.keypoints, kps)
    np.testing.assert_array_equal(dec.boxes, boxes)  # float64: exact, NaN where none
    np.testing.assert_array_equal(dec.status, [1, 2, 3])
    np.testing.assert_array_equal(dec.kp_id, [0, 1, 2])
    np.testing.assert_array_equal(dec.certified, [True, False, False])
    assert dec.scores.dtype == np.float32


def test_cloud_decoder_honours_big_endian_and_padding():
    pts = np.zeros(2, dtype=KEYPOINT_DTYPE)
    pts['x'] = [1.5, -2.0]
    pts['u_hi'] = [3.25, 7.0]
    pts['kp_id'] = [4, 9]
    big = pts.astype(KEYPOINT_DTYPE.newbyteorder('>'))
    msg = pack_keypoints(np.zeros((2, 2)), [0, 0], np.zeros((2, 4)), [0, 0])
    rows = np.concatenate([big.view(np.uint8).reshape(1, -1), np.zeros((1, 8), np.uint8)], 1)
    msg.is_bigendian, msg.row_step, msg.data = True, rows.shape[1], rows.tobytes()
    out = cloud_to_numpy(msg)
    np.testing.assert_array_equal(out['x'], [1.5, -2.0])
    np.testing.assert_array_equal(out['u_hi'], [3.25, 7.0])
    np.testing.assert_array_equal(out['kp_id'], [4, 9])
    msg.data = rows.tobytes()[:-20]
    with pytest.raises(ValueError, match='bytes'):
        cloud_to_numpy(msg)


def test_interval_polygon_round_trips_float32_boxes_exactly():
    alpha = (float(np.float32(0.87)), float(np.float32(1.13)))
    beta = (float(np.float32(-0.05)), float(np.float32(0.07)))
    msg = interval_to_polygon(alpha, beta)
    assert len(msg.polygon.points) == 4
    assert polygon_to_interval(msg) == (alpha, beta)


def test_diagnostics_levels_and_values():
    stats = NodeStats(stale_s=1.0)
    assert stats.status('n', now=0.0).level == DiagnosticStatus.STALE
    for i in range(10):
        stats.arrived(now=i * 0.1)
        stats.processed({'infer': 10.0 + i, 'certify': 5.0}, keypoints=5, certified=4,
                        now=i * 0.1 + 0.05)
    status = stats.status('n', hardware_id='cam', now=1.0)
    values = status_values(status)
    assert status.level == DiagnosticStatus.OK and status.hardware_id == 'cam'
    assert float(values['input_hz']) == pytest.approx(10.0, rel=0.15)
    assert values['frames_processed'] == '10' and values['certified_fraction'] == '0.8000'
    assert float(values['latency_infer_p50_ms']) == pytest.approx(14.5)
    stats.count('malformed')
    stats.problem('unsupported encoding')
    stats.arrived(now=1.1)
    warn = stats.status('n', now=1.2)
    assert warn.level == DiagnosticStatus.WARN and 'unsupported encoding' in warn.message
    stats.count('incompatible_qos')
    assert stats.status('n', now=1.3).level == DiagnosticStatus.ERROR

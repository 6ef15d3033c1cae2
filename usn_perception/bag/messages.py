"""ROS messages of the bag tools: typestore, stamps, headers, QoS, rclpy serialization.

Output messages are built with the node's own builders (``pack_keypoints``,
``interval_to_polygon``, ``numpy_to_image``) and serialized with rclpy's serializer (then
given zeroed padding, see :func:`serialize`), so an offline ``keypoints.mcap`` holds exactly
the messages the node would publish for the same frames. Bags are read and written with
``rosbags`` (the typestore below supplies the message definitions the Writer embeds); CDR
from rclpy and rosbags is interchangeable. Importing rclpy here starts no ROS context and
sends nothing on the network.
"""

from __future__ import annotations

import struct
from functools import lru_cache

from rosbags.interfaces import Qos, QosDurability, QosHistory, QosLiveliness, QosReliability
from rosbags.interfaces import QosTime as _QosTime
from rosbags.typesys import Stores, get_typestore

IMAGE = 'sensor_msgs/msg/Image'
COMPRESSED = 'sensor_msgs/msg/CompressedImage'
POINTCLOUD = 'sensor_msgs/msg/PointCloud2'
POLYGON = 'geometry_msgs/msg/PolygonStamped'
STRING = 'std_msgs/msg/String'
CLOCK = 'rosgraph_msgs/msg/Clock'
IMAGE_TYPES = (IMAGE, COMPRESSED)

_ZERO = _QosTime(0, 0)  # rmw "unspecified": the player's defaults apply


def qos(reliable: bool = True, depth: int = 10, latched: bool = False) -> Qos:
    """An ``offered_qos_profiles`` entry for a connection (what ``ros2 bag play`` re-offers)."""
    return Qos(QosHistory.KEEP_LAST, depth,
               QosReliability.RELIABLE if reliable else QosReliability.BEST_EFFORT,
               QosDurability.TRANSIENT_LOCAL if latched else QosDurability.VOLATILE,
               _ZERO, _ZERO, QosLiveliness.AUTOMATIC, _ZERO, False)


@lru_cache(maxsize=1)
def typestore():
    """The ROS 2 Kilted type store: definitions for writing, and for bags that embed none."""
    return get_typestore(Stores.ROS2_KILTED)


def split_ns(stamp_ns: int) -> tuple[int, int]:
    """Nanoseconds → (sec, nanosec) as in ``builtin_interfaces/Time``."""
    sec, nanosec = divmod(int(stamp_ns), 10**9)
    return int(sec), int(nanosec)


def stamp_seconds(sec: int, nanosec: int) -> float:
    """Seconds from a header stamp, computed exactly as the node does (float sum)."""
    return float(sec) + float(nanosec) * 1e-9


def header_stamp(raw: bytes | memoryview) -> tuple[int, int]:
    """(sec, nanosec) of the leading ``std_msgs/Header`` of a CDR message, without decoding.

    Every stamped message starts with its header, so the stamp sits right after the 4-byte
    encapsulation (byte 1 says the endianness). Raises ValueError on a short buffer.
    """
    buf = bytes(raw[:12])
    if len(buf) < 12:
        raise ValueError(f'CDR message of {len(raw)} bytes is too short for a header')
    endian = '<' if buf[1] & 1 else '>'
    sec, nanosec = struct.unpack(endian + 'iI', buf[4:12])
    return sec, nanosec


def make_header(sec: int, nanosec: int, frame_id: str):
    """An rclpy ``std_msgs/Header``."""
    from builtin_interfaces.msg import Time
    from std_msgs.msg import Header

    return Header(stamp=Time(sec=int(sec), nanosec=int(nanosec)), frame_id=str(frame_id))


def serialize(msg, msgtype: str) -> bytes:
    """Canonical CDR bytes of an rclpy message of type ``msgtype``.

    rclpy's serializer leaves the alignment padding between fields uninitialised (seen here:
    stray bytes after ``frame_id``), so the same message can serialize to different bytes.
    The bytes are re-encoded with rosbags, which zeroes padding: same message, same bytes,
    and byte-identical output files. The values are untouched.
    """
    from rclpy.serialization import serialize_message

    return canonical_cdr(serialize_message(msg), msgtype)


def canonical_cdr(raw: bytes, msgtype: str) -> bytes:
    """CDR with zeroed padding: decoded and re-encoded with rosbags."""
    ts = typestore()
    return bytes(ts.serialize_cdr(ts.deserialize_cdr(raw, msgtype), msgtype))

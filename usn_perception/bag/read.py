"""Read image frames from a ROS bag (.mcap, .db3, or a rosbag2 folder) with ``rosbags``.

:class:`BagReader` opens a bag with ``rosbags.highlevel.AnyReader`` and checks the topic the
caller asks for (missing topic → the error lists the bag's topics; wrong type; empty).
:func:`iter_frames` yields every message of the topic once, in log-time order, decoded with the
node's own converters, so the offline evaluator sees exactly the pixels the node would.

Damaged bags: an MCAP file cut short (a recorder that died) has no footer, and rosbags refuses
it; such a file is read sequentially instead (``mcap``'s stream reader), which recovers every
complete chunk, and the iteration then ends with :class:`CorruptBagError` carrying the number
of frames delivered. A rosbag2 folder without ``metadata.yaml`` (also a killed recorder) is
read through its single storage file. Any other read failure ends the iteration the same way.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from usn_perception.bag.errors import (
    BagError,
    CorruptBagError,
    EmptyBagError,
    MessageTypeError,
    TopicNotFoundError,
)
from usn_perception.bag.messages import (
    COMPRESSED,
    IMAGE_TYPES,
    header_stamp,
    stamp_seconds,
    typestore,
)

STORAGE_SUFFIXES = {'.mcap': 'mcap', '.db3': 'sqlite3', '.bag': 'rosbag1'}


@dataclass(frozen=True)
class TopicInfo:
    """One topic of a bag: its type and message count (None when unknown)."""

    name: str
    msgtype: str
    count: int | None


@dataclass(frozen=True)
class Frame:
    """One image message: where it sits in the bag, its header, its raw CDR and its pixels.

    ``image`` is None and ``error`` says why when the message cannot be decoded (bad encoding,
    wrong size, undecodable compressed data); the node skips such frames too.
    """

    index: int
    log_time_ns: int
    sec: int
    nanosec: int
    frame_id: str
    msgtype: str
    raw: bytes
    image: np.ndarray | None
    error: str | None = None

    @property
    def stamped(self) -> bool:
        """Whether the header carries a stamp (the node falls back to its clock otherwise)."""
        return bool(self.sec or self.nanosec)

    @property
    def stamp_ns(self) -> int:
        """Header stamp in ns, or the log time for unstamped frames."""
        return self.sec * 10**9 + self.nanosec if self.stamped else self.log_time_ns

    @property
    def stamp(self) -> float:
        """The stamp the pipeline gets, in seconds, computed exactly as the node computes it.

        The node uses the header stamp, or its ROS clock for unstamped frames; in a lockstep
        replay that clock is /clock = the bag's log time, so the offline value is the same.
        """
        if self.stamped:
            return stamp_seconds(self.sec, self.nanosec)
        return self.log_time_ns * 1e-9


def resolve_bag(path: str | Path) -> Path:
    """The path rosbags should open: a rosbag2 folder or a single storage file.

    A folder without ``metadata.yaml`` (the recorder died before writing it) is read through
    its one storage file. Raises :class:`BagError` when there is nothing bag-like at ``path``.
    """
    path = Path(path)
    if not path.exists():
        raise BagError(path, 'no such bag (file or folder)')
    if path.is_dir():
        if (path / 'metadata.yaml').is_file():
            return path
        files = sorted(p for p in path.iterdir() if p.suffix in STORAGE_SUFFIXES)
        if len(files) == 1:
            return files[0]
        raise BagError(path, 'not a bag folder: no metadata.yaml and '
                             f'{len(files)} storage files (.mcap/.db3)')
    if path.suffix not in STORAGE_SUFFIXES:
        raise BagError(path, f'unknown bag file type {path.suffix!r} (expected '
                             f'{", ".join(STORAGE_SUFFIXES)} or a rosbag2 folder)')
    return path


def _storage_files(path: Path) -> list[Path]:
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in STORAGE_SUFFIXES)
    return [path]


def _storage(path: Path) -> str:
    found = {STORAGE_SUFFIXES.get(p.suffix, 'unknown') for p in _storage_files(path)}
    return found.pop() if len(found) == 1 else 'unknown'


def _is_mcap(path: Path) -> bool:
    with open(path, 'rb') as f:
        return f.read(5) == b'\x89MCAP'


class _McapSalvage:
    """Sequential reading of an MCAP file without a footer: every complete chunk counts."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.channels: dict[int, tuple[str, str]] = {}
        self.counts: dict[int, int] = {}
        self.start_ns: int | None = None
        self.problem = ''
        for rec in self._records():
            self.counts[rec.channel_id] = self.counts.get(rec.channel_id, 0) + 1
            t = int(rec.log_time)
            self.start_ns = t if self.start_ns is None else min(self.start_ns, t)

    def _records(self) -> Iterator:
        from mcap.records import Channel, Message, Schema
        from mcap.stream_reader import StreamReader

        schemas: dict[int, str] = {}
        with open(self.path, 'rb') as f:
            try:
                for rec in StreamReader(f).records:
                    if isinstance(rec, Schema):
                        schemas[rec.id] = rec.name
                    elif isinstance(rec, Channel):
                        self.channels[rec.id] = (rec.topic, schemas.get(rec.schema_id, ''))
                    elif isinstance(rec, Message):
                        yield rec
            except Exception as exc:  # noqa: BLE001 - any failure ends the readable part
                self.problem = (f'file ends or breaks at byte {f.tell()} '
                                f'({type(exc).__name__}{": " + str(exc) if str(exc) else ""})')
                return
        self.problem = self.problem or 'MCAP footer missing'

    def messages(self, channel_ids: set[int], start: int | None,
                 stop: int | None) -> Iterator[tuple[int, bytes]]:
        for rec in self._records():
            t = int(rec.log_time)
            if rec.channel_id in channel_ids and (start is None or t >= start) and (
                    stop is None or t < stop):
                yield t, bytes(rec.data)


class BagReader:
    """An open bag: its topics, checked topic selection, and raw messages in log-time order.

    Use as a context manager. ``salvaged`` is True when the file was damaged and is read
    sequentially (:attr:`damage` says how); the messages then end with CorruptBagError.
    """

    def __init__(self, path: str | Path) -> None:
        """Open the bag; raises BagError/CorruptBagError naming the file when it cannot."""
        from rosbags.highlevel import AnyReader

        self.path = resolve_bag(path)
        self.storage = _storage(self.path)
        self.damage: str | None = None
        self._salvage: _McapSalvage | None = None
        self._reader = None
        try:
            reader = AnyReader([self.path], default_typestore=typestore())
            reader.open()
            self._reader = reader
        except Exception as exc:  # noqa: BLE001 - rosbags raises several types for bad files
            files = _storage_files(self.path)
            if self.storage == 'mcap' and len(files) == 1 and 'magic' in str(exc) and (
                    _is_mcap(files[0])):
                self._salvage = _McapSalvage(files[0])
                self.damage = f'truncated MCAP file {files[0].name}: {self._salvage.problem}'
            else:
                raise CorruptBagError(self.path, f'cannot open the bag: {exc}') from None

    @property
    def salvaged(self) -> bool:
        """True when a damaged file is read sequentially (only complete chunks come back)."""
        return self._salvage is not None

    def __enter__(self) -> BagReader:
        """Context-manager entry."""
        return self

    def __exit__(self, *exc: object) -> None:
        """Close the underlying reader."""
        self.close()

    def close(self) -> None:
        """Close the underlying reader (idempotent)."""
        if self._reader is not None:
            self._reader.close()
            self._reader = None

    @property
    def start_ns(self) -> int:
        """Log time of the first message (0 for an empty bag)."""
        if self._salvage is not None:
            return self._salvage.start_ns or 0
        return int(self._reader.start_time) if self._reader.message_count else 0

    @property
    def topics(self) -> dict[str, TopicInfo]:
        """Every topic of the bag, by name."""
        out: dict[str, TopicInfo] = {}
        if self._salvage is not None:
            for cid, (topic, msgtype) in sorted(self._salvage.channels.items()):
                prev = out.get(topic)
                count = self._salvage.counts.get(cid, 0) + (prev.count if prev else 0)
                out[topic] = TopicInfo(topic, msgtype, count)
            return out
        for conn in self._reader.connections:
            prev = out.get(conn.topic)
            count = conn.msgcount + (prev.count if prev and prev.count is not None else 0)
            out[conn.topic] = TopicInfo(conn.topic, conn.msgtype, count)
        return out

    def describe_topics(self) -> str:
        """``/a (type, N msgs), /b (…)`` for error messages."""
        return ', '.join(f'{t.name} ({t.msgtype}, {t.count} msgs)'
                         for t in sorted(self.topics.values(), key=lambda t: t.name)) or 'none'

    def image_topic(self, topic: str) -> TopicInfo:
        """Check that ``topic`` exists, carries images and has messages; return it."""
        topics = self.topics
        if not topics:
            raise EmptyBagError(self.path, 'the bag holds no topics and no messages')
        info = topics.get(topic)
        if info is None:
            raise TopicNotFoundError(self.path, f'topic {topic!r} is not in the bag; its '
                                                f'topics are: {self.describe_topics()}')
        types = {c.msgtype for c in self._connections(topic)} if self._reader else {
            info.msgtype}
        if len(types) > 1:
            raise MessageTypeError(self.path, f'topic {topic!r} mixes message types '
                                              f'{sorted(types)}')
        if info.msgtype not in IMAGE_TYPES:
            images = [t.name for t in topics.values() if t.msgtype in IMAGE_TYPES]
            raise MessageTypeError(
                self.path, f'topic {topic!r} carries {info.msgtype}, not '
                           f'{" or ".join(IMAGE_TYPES)}; image topics in this bag: '
                           f'{", ".join(sorted(images)) or "none"}')
        if not info.count:
            raise EmptyBagError(self.path, f'topic {topic!r} holds no messages')
        return info

    def _connections(self, topic: str) -> list:
        return [c for c in self._reader.connections if c.topic == topic]

    def messages(self, topic: str, start_ns: int | None = None,
                 stop_ns: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(log time ns, raw CDR) of ``topic`` in ``[start_ns, stop_ns)``, in log-time order.

        Raises :class:`CorruptBagError` (with ``frames_read``) when reading fails part way,
        and at the end of the readable part of a salvaged file.
        """
        read = 0
        try:
            if self._salvage is not None:
                ids = {cid for cid, (t, _) in self._salvage.channels.items() if t == topic}
                source = self._salvage.messages(ids, start_ns, stop_ns)
            else:
                conns = self._connections(topic)
                source = ((t, raw) for _, t, raw in self._reader.messages(
                    connections=conns, start=start_ns, stop=stop_ns))
            for t, raw in source:
                yield int(t), bytes(raw)
                read += 1
        except CorruptBagError:
            raise
        except Exception as exc:  # noqa: BLE001 - any read failure means a damaged bag
            raise CorruptBagError(self.path, f'reading failed after {read} messages of '
                                             f'{topic!r}: {type(exc).__name__}: {exc}',
                                  read) from None
        if self._salvage is not None:
            raise CorruptBagError(self.path, f'{self.damage}; recovered {read} messages of '
                                             f'{topic!r} from the complete chunks', read)

    def deserialize(self, raw: bytes, msgtype: str):
        """A rosbags message object from CDR (the bag's own definitions where it has them)."""
        if self._reader is not None:
            return self._reader.deserialize(raw, msgtype)
        return typestore().deserialize_cdr(raw, msgtype)


def time_window(reader: BagReader, start: float | None, end: float | None,
                ) -> tuple[int | None, int | None]:
    """``--start/--end`` (seconds after the bag's first message) as a log-time ns window."""
    for name, value in (('start', start), ('end', end)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ValueError(f'{name} must be a non-negative number of seconds, got {value}')
    if start is not None and end is not None and end <= start:
        raise ValueError(f'end ({end} s) must be after start ({start} s)')
    base = reader.start_ns
    lo = None if start is None else base + round(start * 1e9)
    hi = None if end is None else base + round(end * 1e9)
    return lo, hi


def decode(reader: BagReader, raw: bytes, msgtype: str) -> tuple[object | None, str | None]:
    """(rosbags message, None) or (None, why) when the CDR does not deserialize."""
    try:
        return reader.deserialize(raw, msgtype), None
    except Exception as exc:  # noqa: BLE001 - a damaged message is a bad frame, not a crash
        return None, f'message does not deserialize as {msgtype}: {type(exc).__name__}: {exc}'


def to_numpy(msg: object, msgtype: str) -> np.ndarray:
    """Pixels of an Image/CompressedImage message, decoded with the node's converters."""
    from usn_perception.ros.conversions import compressed_to_numpy, image_to_numpy

    return compressed_to_numpy(msg) if msgtype == COMPRESSED else image_to_numpy(msg)


def iter_frames(reader: BagReader, topic: str, *, start: float | None = None,
                end: float | None = None, limit: int | None = None,
                decode_images: bool = True) -> Iterator[Frame]:
    """Every message of image ``topic`` once, in log-time order, as a :class:`Frame`.

    ``start``/``end`` are seconds after the bag's first message, ``limit`` caps the count.
    With ``decode_images=False`` only stamps and raw bytes are read (fast; for pre-passes).
    Raises the topic errors of :meth:`BagReader.image_topic`, :class:`EmptyBagError` when the
    window holds nothing, and :class:`CorruptBagError` when the bag breaks part way.
    """
    from usn_perception.errors import ImageError

    info = reader.image_topic(topic)
    if limit is not None and limit < 1:
        raise ValueError(f'limit must be at least 1, got {limit}')
    lo, hi = time_window(reader, start, end)
    count = 0
    for t, raw in reader.messages(topic, lo, hi):
        if limit is not None and count >= limit:
            return
        image, frame_id, error = None, '', None
        try:
            sec, nanosec = header_stamp(raw)
        except ValueError as exc:
            sec, nanosec, error = 0, 0, str(exc)
        if decode_images and error is None:
            msg, error = decode(reader, raw, info.msgtype)
            if msg is not None:
                frame_id = str(msg.header.frame_id)
                try:
                    image = to_numpy(msg, info.msgtype)
                except (ImageError, ValueError, TypeError) as exc:
                    error = str(exc)
        yield Frame(count, t, sec, nanosec, frame_id, info.msgtype, raw, image, error)
        count += 1
    if count == 0:
        window = '' if lo is None and hi is None else f' between {start} s and {end} s'
        raise EmptyBagError(reader.path, f'topic {topic!r} holds no messages{window}')

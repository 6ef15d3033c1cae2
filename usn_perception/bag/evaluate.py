"""``eval-bag``: every frame of an image topic once through the node's per-frame core, offline.

Frames are read with ``rosbags`` (see :mod:`.read`), decoded with the node's converters, given
the stamp the node would use, and run through one :class:`~usn_perception.pipeline.
FramePipeline` in log-time order; the outputs the node would publish go to
``keypoints.mcap`` and the report files are written by :mod:`.report`.

Determinism: with a certification budget that has no clock part (``budget_ms`` None, the
default here) every output is a function of the bag, the model and the options, so
``frames.csv`` and ``keypoints.mcap`` are byte-identical across runs; wall-clock numbers live
only in ``timings.csv`` and ``summary.json``. Torch runs single-threaded by default, as in the
node (``num_threads`` 1): a different thread count may change float summation order.

A bag that breaks part way (truncated, malformed) still gets its report for the frames read,
marked partial in ``summary.json``, ``report.md`` and a ``PARTIAL`` file, and
:class:`PartialEvaluationError` is raised after the outputs are in place.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from usn_perception.bag.errors import BagError, CorruptBagError
from usn_perception.bag.labels import BagLabels, check_labels, load_bag_labels
from usn_perception.bag.outputs import DEFAULT_NS, OutputBagWriter
from usn_perception.bag.read import BagReader, iter_frames
from usn_perception.data.coco import KeypointSample
from usn_perception.errors import ImageError
from usn_perception.pipeline import FramePipeline, FrameResult, PipelineSettings

TOLERANCES = (2.0, 3.0, 5.0)


class PartialEvaluationError(BagError):
    """The bag broke part way; outputs for the frames read are written and marked partial."""

    def __init__(self, path: object, problem: str, frames: int, out: Path) -> None:
        """Remember how many frames made it and where their outputs are."""
        self.frames = frames
        self.out = out
        super().__init__(path, problem)


@dataclass
class FrameRecord:
    """One evaluated frame: where it came from, what the pipeline said, its label."""

    index: int
    log_time_ns: int
    stamp_ns: int
    frame_id: str
    result: FrameResult | None
    error: str | None = None
    label: KeypointSample | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Evaluation:
    """What :func:`evaluate_bag` produced."""

    out: Path
    records: list[FrameRecord]
    summary: dict[str, Any]

    @property
    def partial(self) -> bool:
        """True when the bag broke part way."""
        return bool(self.summary.get('partial'))


def _label_pass(reader: BagReader, topic: str, labels: BagLabels, window: dict) -> int:
    """Check label stamps against the topic's stamps before the expensive pass."""
    stamps: list[int] = []
    try:
        for frame in iter_frames(reader, topic, decode_images=False, **window):
            stamps.append(frame.stamp_ns)
    except CorruptBagError:
        pass  # the evaluation pass reports it; check the labels of the readable part
    return check_labels(labels, stamps, reader.path, topic)


def evaluate_bag(
    bag: str | Path, out: str | Path, *, topic: str, detector,
    settings: PipelineSettings | None = None, labels: str | Path | None = None,
    tolerances: Sequence[float] = TOLERANCES, start: float | None = None,
    end: float | None = None, limit: int | None = None, ns: str = DEFAULT_NS,
    progress: bool = False, plots: bool = True, command: str | None = None,
) -> Evaluation:
    """Evaluate ``topic`` of ``bag`` into the report folder ``out`` (see the module docstring).

    ``settings`` default to :class:`PipelineSettings` () — the node's defaults without its
    wall-clock budget. ``labels`` is a stamp-keyed COCO file (``make-bag``'s sidecar).
    ``start``/``end`` are seconds after the bag's first message; ``limit`` caps the frames.
    Raises the bag errors of :mod:`.read` and :mod:`.labels` before any output exists, and
    :class:`PartialEvaluationError` after writing the partial outputs.
    """
    from tqdm import tqdm

    from usn_perception.bag.report import remove_stale, write_report
    from usn_perception.reports import staged_output

    settings = settings or PipelineSettings()
    out = Path(out)
    window = {'start': start, 'end': end, 'limit': limit}
    with BagReader(bag) as reader:
        info = reader.image_topic(topic)
        bag_labels = None
        if labels is not None:
            bag_labels = load_bag_labels(labels, detector.keypoint_names)
            _label_pass(reader, topic, bag_labels, window)
        pipeline = FramePipeline(detector, settings)
        records: list[FrameRecord] = []
        failure: str | None = None
        with staged_output(out) as stage:
            writer = OutputBagWriter(stage / 'keypoints.mcap', ns)
            total = min(info.count or 0, limit or (info.count or 0)) or None
            bar = tqdm(total=total, desc='eval-bag', unit='frame', disable=not progress)
            t_start = time.perf_counter()
            try:
                frames = iter_frames(reader, topic, **window)
                t0 = time.perf_counter()
                for frame in frames:
                    t1 = time.perf_counter()
                    if not records:
                        writer.write_info(frame.log_time_ns, {
                            **pipeline.describe(), 'producer': 'usn-perception eval-bag',
                            'input_topic': topic, 'input_type': info.msgtype})
                    label = bag_labels.by_stamp.get(frame.stamp_ns) if bag_labels else None
                    rec = FrameRecord(frame.index, frame.log_time_ns, frame.stamp_ns,
                                      frame.frame_id, None, frame.error, label)
                    if frame.image is not None:
                        try:
                            rec.result = pipeline.process(frame.image, frame.stamp)
                        except ImageError as exc:
                            rec.error = str(exc)
                    t2 = time.perf_counter()
                    if rec.result is not None:
                        writer.write_result(frame.log_time_ns, frame.sec, frame.nanosec,
                                            frame.frame_id, rec.result)
                    t3 = time.perf_counter()
                    rec.timings_ms = {'read_decode': (t1 - t0) * 1e3,
                                      **(rec.result.timings_ms if rec.result else {}),
                                      'pipeline': (t2 - t1) * 1e3, 'write': (t3 - t2) * 1e3,
                                      'frame': (t3 - t0) * 1e3}
                    records.append(rec)
                    bar.update()
                    t0 = time.perf_counter()
            except CorruptBagError as exc:
                failure = exc.problem
                if not records:
                    writer.abort()
                    raise CorruptBagError(reader.path, f'{exc.problem}; 0 frames processed',
                                          0) from None
            except KeyboardInterrupt:
                failure = 'interrupted by the user'
                if not records:
                    writer.abort()
                    raise
            except BaseException:
                writer.abort()
                raise
            finally:
                bar.close()
            wall = time.perf_counter() - t_start
            writer.close()
            summary = write_report(
                stage, records, topic=topic, bag=reader, msgtype=info.msgtype,
                frames_in_topic=info.count, pipeline=pipeline, labels=bag_labels,
                tolerances=tolerances, wall_s=wall, failure=failure, plots=plots,
                window=window, command=command)
            written = [p.name for p in stage.iterdir()]
    remove_stale(out, written)
    if failure is not None:
        raise PartialEvaluationError(bag, f'{failure}; outputs for the {len(records)} frames '
                                          f'processed are in {out} (marked partial)',
                                     len(records), out)
    return Evaluation(out, records, summary)

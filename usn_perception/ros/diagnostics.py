"""A small stand-in for ``diagnostic_updater``: counters, rates, latency percentiles.

:class:`NodeStats` is filled by the node as frames arrive and get processed (thread-safe),
and :meth:`NodeStats.status` turns it into one ``diagnostic_msgs/DiagnosticStatus``. The
node publishes a ``DiagnosticArray`` with it on ``/diagnostics`` once per period.

Level rules: ERROR when the model/pipeline failed or a publisher offered incompatible QoS in
the last period; STALE when no frame arrived for ``stale_s``; WARN when frames were malformed
or processing failed in the last period; OK otherwise.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable

import numpy as np
from diagnostic_msgs.msg import DiagnosticStatus, KeyValue

COUNTERS = ('received', 'processed', 'dropped', 'malformed', 'errors', 'message_lost',
            'incompatible_qos', 'debug_images', 'keypoints', 'certified', 'out_of_budget')


class NodeStats:
    """Thread-safe counters and a rolling window of per-stage latencies (ms)."""

    def __init__(self, window: int = 300, stale_s: float = 3.0) -> None:
        """Keep the last ``window`` samples per stage for the percentiles."""
        self._lock = threading.Lock()
        self._window = window
        self.stale_s = stale_s
        self.counts = dict.fromkeys(COUNTERS, 0)
        self._last_period = dict(self.counts)
        self._latency: dict[str, deque[float]] = {}
        self._arrivals: deque[float] = deque(maxlen=window)
        self._outputs: deque[float] = deque(maxlen=window)
        self.info: dict[str, str] = {}
        self.error: str | None = None
        self._last_problem = ''

    def count(self, name: str, n: int = 1) -> None:
        """Add ``n`` to a counter."""
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def problem(self, text: str) -> None:
        """Remember the latest problem text (shown in the status message)."""
        with self._lock:
            self._last_problem = text

    def arrived(self, now: float | None = None) -> None:
        """Count an arriving frame (for the input rate)."""
        with self._lock:
            self.counts['received'] += 1
            self._arrivals.append(time.monotonic() if now is None else now)

    def processed(self, timings_ms: dict[str, float], keypoints: int = 0, certified: int = 0,
                  out_of_budget: int = 0, now: float | None = None) -> None:
        """A frame was processed and published, with its stage timings."""
        with self._lock:
            self.counts['processed'] += 1
            self.counts['keypoints'] += keypoints
            self.counts['certified'] += certified
            self.counts['out_of_budget'] += out_of_budget
            self._outputs.append(time.monotonic() if now is None else now)
            for stage, ms in timings_ms.items():
                self._latency.setdefault(stage, deque(maxlen=self._window)).append(float(ms))

    @staticmethod
    def _rate(stamps: Iterable[float], now: float, horizon: float = 5.0) -> float:
        recent = [t for t in stamps if now - t <= horizon]
        if len(recent) < 2:
            return 0.0
        span = max(now - recent[0], recent[-1] - recent[0])
        return (len(recent) - 1) / span if span > 0 else 0.0

    def latency(self, stage: str) -> tuple[float, float]:
        """(p50, p95) in ms of a stage over the window; NaN when no sample."""
        with self._lock:
            samples = list(self._latency.get(stage, ()))
        if not samples:
            return float('nan'), float('nan')
        p50, p95 = np.percentile(samples, [50, 95])
        return float(p50), float(p95)

    def status(self, name: str, hardware_id: str = '',
               now: float | None = None) -> DiagnosticStatus:
        """The DiagnosticStatus for this period (and start the next period)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            counts = dict(self.counts)
            delta = {k: counts[k] - self._last_period.get(k, 0) for k in counts}
            self._last_period = counts
            arrivals, outputs = list(self._arrivals), list(self._outputs)
            stages = sorted(self._latency)
            problem = self._last_problem
            info = dict(self.info)
            error = self.error
        values = [KeyValue(key='input_hz', value=f'{self._rate(arrivals, now):.2f}'),
                  KeyValue(key='output_hz', value=f'{self._rate(outputs, now):.2f}')]
        framed = ('received', 'processed', 'dropped', 'malformed')
        values += [KeyValue(key=f'frames_{k}' if k in framed else k, value=str(v))
                   for k, v in counts.items()]
        cert = counts['certified'] / counts['keypoints'] if counts['keypoints'] else 0.0
        period_cert = (delta['certified'] / delta['keypoints']) if delta['keypoints'] else None
        values.append(KeyValue(key='certified_fraction', value=f'{cert:.4f}'))
        values.append(KeyValue(key='certified_fraction_last_period',
                               value='n/a' if period_cert is None else f'{period_cert:.4f}'))
        for stage in stages:
            p50, p95 = self.latency(stage)
            values.append(KeyValue(key=f'latency_{stage}_p50_ms', value=f'{p50:.2f}'))
            values.append(KeyValue(key=f'latency_{stage}_p95_ms', value=f'{p95:.2f}'))
        values += [KeyValue(key=k, value=str(v)) for k, v in info.items()]

        if error:
            level, message = DiagnosticStatus.ERROR, error
        elif delta['incompatible_qos']:
            level, message = DiagnosticStatus.ERROR, f'incompatible QoS on the input: {problem}'
        elif not arrivals or now - arrivals[-1] > self.stale_s:
            level, message = DiagnosticStatus.STALE, 'no frames received'
        elif delta['malformed'] or delta['errors']:
            level = DiagnosticStatus.WARN
            message = (f'{delta["malformed"]} malformed frame(s), {delta["errors"]} failure(s) '
                       f'in the last period: {problem}')
        else:
            level, message = DiagnosticStatus.OK, 'processing'
        return DiagnosticStatus(level=level, name=name, message=message,
                                hardware_id=hardware_id, values=values)


def status_values(status: DiagnosticStatus) -> dict[str, str]:
    """The key/value pairs of a status as a dict (for tests and consumers)."""
    return {kv.key: kv.value for kv in status.values}

"""Frames certified in several worker processes at once, each with its own pipeline.

One frame's certificate is a long chain of small torch operations on one core; a 30 Hz camera
gives it ~33 ms. Where a frame takes about that long, every frame that arrives while the
previous one finishes waits for it, and the latency doubles. Threads cannot share that work:
both would issue hundreds of small operations and hand the interpreter lock to each other at
every one (measured: each thread's CPU time doubled). Processes can: a :class:`WorkerPool`
runs ``processes`` workers, each loading the same model into its own
:class:`~usn_perception.pipeline.FramePipeline`, and gives each frame to an idle one. The
caller measures Θ for every frame in order (:meth:`FramePipeline.measure`), so a frame's
interval is the same whichever worker certifies it, and reports the stream's arrivals so
that each worker sizes its certificate to the camera's period.

Workers start with the ``spawn`` method (a fork of a process with DDS or torch threads is not
safe). A worker that dies is reported for the frame it had and replaced.
"""

from __future__ import annotations

import multiprocessing
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait

import numpy as np

from usn_perception.errors import ImageError
from usn_perception.interval import IntervalEstimate
from usn_perception.pipeline import FrameResult, PipelineSettings

#: Seconds a worker may take to import torch and load the model.
START_TIMEOUT_S = 120.0


class WorkerError(RuntimeError):
    """A worker failed on a frame, or could not start (the message says which and why)."""


def _serve(conn: Connection, model_path: str, device: str, num_threads: int,
           settings: PipelineSettings) -> None:
    """Worker process: load the model, then certify frames until told to stop."""
    # Ctrl-C reaches the whole process group: the parent shuts the workers down (or its end
    # of the pipe closes), so a worker ignores SIGINT instead of printing a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import torch

        from usn_perception.detector import load_detector
        from usn_perception.pipeline import FramePipeline

        if num_threads > 0:
            torch.set_num_threads(num_threads)
        detector = load_detector(model_path, device=device)
        pipeline = FramePipeline(detector, settings)
        pipeline.precision_in_use()
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which fails loudly
        conn.send(('failed', f'{type(exc).__name__}: {exc}'))
        return
    conn.send(('ready', detector.sha256))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if msg is None:
            return
        kind = msg[0]
        if kind == 'settings':
            pipeline.configure(msg[1])
            continue
        _, ticket, image, stamp, interval, arrived, arrivals = msg
        for arrival in arrivals:
            pipeline.note_arrival(arrival)
        try:
            result = pipeline.process(image, stamp, interval=interval, arrived=arrived)
        except ImageError as exc:
            conn.send(('error', ticket, True, str(exc)))
        except Exception as exc:  # noqa: BLE001 - one frame's failure, reported with it
            detail = traceback.format_exception_only(type(exc), exc)[-1].strip()
            conn.send(('error', ticket, False, detail))
        else:
            conn.send(('result', ticket, result))


@dataclass
class _Worker:
    process: multiprocessing.process.BaseProcess
    conn: Connection
    state: str = 'starting'  # starting | idle | busy | dead
    ticket: int | None = None


@dataclass(frozen=True)
class Outcome:
    """What became of one submitted frame: its result, or why there is none."""

    ticket: int
    result: FrameResult | None = None
    error: str | None = None
    bad_image: bool = False


class WorkerPool:
    """``processes`` worker processes certifying frames; thread-safe."""

    def __init__(self, model_path: str, *, processes: int, settings: PipelineSettings,
                 device: str = 'cpu', num_threads: int = 1, sha256: str | None = None) -> None:
        """Start the workers (not waiting for them: see :meth:`wait_ready`).

        ``sha256``: the model the caller loaded; a worker that loads another one (the file
        changed in between) fails to start.
        """
        if processes < 1:
            raise ValueError(f'processes must be at least 1, got {processes}')
        self._args = (str(model_path), str(device), int(num_threads))
        self._settings = settings
        self._sha256 = sha256
        self._ctx = multiprocessing.get_context('spawn')
        self._lock = threading.Lock()
        self._arrivals: list[list[float]] = [[] for _ in range(processes)]
        self._workers = [self._start() for _ in range(processes)]
        self._next_ticket = 0
        self._closed = False
        self.failures: list[str] = []  # start failures and deaths, newest last
        self.restarts = 0  # workers replaced after dying

    def _start(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_serve, args=(child, *self._args, self._settings),
                                    name='usn_perception_worker', daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    @property
    def processes(self) -> int:
        """Number of worker processes."""
        return len(self._workers)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        """Block until every worker has loaded the model; WorkerError if one cannot."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                starting = [w for w in self._workers if w.state == 'starting']
                if not starting:
                    return
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerError(f'{len(starting)} worker process(es) did not start within '
                                  f'{timeout:.0f} s')
            self.collect(timeout=min(left, 0.5))
            with self._lock:
                dead = [w for w in self._workers if w.state == 'dead']
            if dead:
                raise WorkerError('a worker process could not start: ' + self.failures[-1])

    def idle(self) -> bool:
        """Whether some worker can take a frame now."""
        with self._lock:
            return any(w.state == 'idle' for w in self._workers)

    def alive(self) -> int:
        """Workers that have started and not died."""
        with self._lock:
            return sum(w.state in ('idle', 'busy') for w in self._workers)

    def note_arrival(self, stamp: float) -> None:
        """A frame of the stream arrived: every worker learns the camera's period from it."""
        with self._lock:
            for pending in self._arrivals:
                pending.append(float(stamp))
                del pending[:-64]  # a worker far behind needs only the recent intervals

    def submit(self, image: np.ndarray, stamp: float, interval: IntervalEstimate,
               arrived: float | None = None) -> int:
        """Give a frame and its measured Θ to an idle worker; returns its ticket.

        ``arrived``: ``time.monotonic()`` when the frame arrived (None: now), which the
        settings' ``deadline_ms`` counts from (the clock is the machine's, the same in every
        process). Raises WorkerError when no worker is idle.
        """
        arrived = time.monotonic() if arrived is None else float(arrived)
        with self._lock:
            index = next((i for i, w in enumerate(self._workers) if w.state == 'idle'), None)
            if index is None:
                raise WorkerError('no worker process is idle')
            worker = self._workers[index]
            ticket = self._next_ticket
            self._next_ticket += 1
            arrivals, self._arrivals[index] = self._arrivals[index], []
            worker.state, worker.ticket = 'busy', ticket
            worker.conn.send(('frame', ticket, image, float(stamp), interval, arrived,
                              arrivals))
        return ticket

    def configure(self, settings: PipelineSettings) -> None:
        """New settings for every worker (a busy one applies them after its frame)."""
        with self._lock:
            self._settings = settings
            for w in self._workers:
                if w.state in ('idle', 'busy'):
                    w.conn.send(('settings', settings))

    def collect(self, timeout: float | None = 0.0) -> list[Outcome]:
        """Outcomes of the frames finished since the last call (waits up to ``timeout``)."""
        with self._lock:
            conns = {w.conn: w for w in self._workers if w.state != 'dead'}
        ready = wait(list(conns), timeout=timeout) if conns else []
        outcomes: list[Outcome] = []
        with self._lock:
            for conn in ready:
                worker = conns[conn]
                try:
                    while conn.poll():
                        outcomes.extend(self._receive(worker, conn.recv()))
                except (EOFError, OSError):
                    outcomes.extend(self._died(worker))
            for worker in list(self._workers):  # a worker killed between messages
                if worker.state != 'dead' and not worker.process.is_alive() and not _conn_ready(
                        worker.conn):
                    outcomes.extend(self._died(worker))
        return outcomes

    def _receive(self, worker: _Worker, msg: tuple) -> list[Outcome]:
        kind = msg[0]
        if kind == 'ready':
            if self._sha256 is not None and msg[1] != self._sha256:
                self.failures.append(f'the worker loaded model {msg[1]}, not {self._sha256}')
                worker.state = 'dead'
                return []
            worker.state = 'idle'
            worker.conn.send(('settings', self._settings))  # any change made while starting
            return []
        if kind == 'failed':
            self.failures.append(msg[1])
            worker.state = 'dead'
            return []
        worker.state, worker.ticket = 'idle', None
        if kind == 'result':
            return [Outcome(msg[1], result=msg[2])]
        return [Outcome(msg[1], error=msg[3], bad_image=msg[2])]

    def _died(self, worker: _Worker) -> list[Outcome]:
        """Report the frame a dead worker had and start a replacement.

        Only a worker that had started is replaced: one that dies while starting would die
        again (its failure stays in :attr:`failures` and :meth:`wait_ready` raises).
        """
        code = worker.process.exitcode
        self.failures.append(f'worker process {worker.process.pid} died (exit code {code})')
        lost = [] if worker.ticket is None else [Outcome(
            worker.ticket, error=f'the worker process died (exit code {code})')]
        was_running = worker.state in ('idle', 'busy')
        worker.state = 'dead'
        worker.conn.close()
        if was_running and not self._closed:
            index = self._workers.index(worker)
            self._workers[index] = self._start()
            self._arrivals[index] = []
            self.restarts += 1
        return lost

    def close(self, timeout: float = 5.0) -> None:
        """Stop every worker (after its current frame) and wait for them."""
        with self._lock:
            self._closed = True
            workers = list(self._workers)
        for w in workers:
            try:
                w.conn.send(None)
            except (OSError, ValueError):
                pass
        deadline = time.monotonic() + timeout
        for w in workers:
            w.process.join(max(0.0, deadline - time.monotonic()))
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(1.0)
            w.conn.close()


def _conn_ready(conn: Connection) -> bool:
    """Whether ``conn`` still has a message to read (False once it is closed or broken)."""
    try:
        return conn.poll()
    except (OSError, ValueError, EOFError):
        return False

"""Certified keypoint boxes under brightness/contrast change: the public entry point.

``certify_keypoints(detector, image, box)`` returns, per keypoint, an axis-aligned pixel box
that contains ``detector.predict(clip(α·x + β, 0, 1), readout=r)`` for *every* θ = (α, β) in
``box``. It bounds the network with the engine in :mod:`usn_perception.bounds` (forward-mode
linear bounds in θ by default), turns the heatmap bounds into readout bounds, refines by
splitting θ within a :class:`Budget`, and maps the hull to image pixels rounding outward.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from enum import IntEnum
from functools import partial

import numpy as np
import torch

from usn_perception.bounds.box import Budget, PhotometricBox, box_centres
from usn_perception.bounds.forms import collapse_generators, form_at
from usn_perception.bounds.free import free_forms, free_radius, tau_reach
from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import CompiledNetwork, compile_network
from usn_perception.bounds.levels import (
    evaluation_points,
    level_axis,
    level_bounds,
    level_nodes,
    narrowest_merged,
    reference_unclipped,
)
from usn_perception.bounds.prefix import EXACT_VALUES, linear_prefix, prefix_forms
from usn_perception.bounds.propagate import BudgetExceeded, propagate
from usn_perception.bounds.rounding import propagate_float32, resolve_precision
from usn_perception.bounds.spec import (
    argmax_bounds,
    centroid_bounds,
    local_centroid_bounds,
    local_windows,
    soft_argmax_bounds,
)
from usn_perception.bounds.split import RefineResult, refine
from usn_perception.bounds.thresholds import (
    SCALE_FREE_READOUTS,
    ambiguous_mass,
    carve_free,
    free_mask,
    is_homogeneous,
    threshold_row,
    threshold_splits,
)
from usn_perception.errors import UnsupportedLayerError
from usn_perception.network import READOUTS
from usn_perception.readout import LOCAL_RADIUS, cell_grid, read_keypoints

__all__ = [
    'Budget', 'CertStatus', 'EXACT_VALUES', 'KeypointCertificate', 'METHODS', 'NODE_BUDGET',
    'OFFLINE_BUDGET', 'PhotometricBox', 'certify_keypoints',
]

METHODS = ('forward', 'ibp')
COORDINATES = ('auto', 'theta', 'thresholds')
#: Clipped input values that keep a symbol of their own (see ``ImageEncoding.forms``).
GENERATORS = 0
#: Sub-boxes whose input stage and readout bound are computed together (memory: the input
#: forms of a group are ~4 · GROUP · network-input pixels float64 values). Measured at the
#: offline budget (session 7, both shipped models, identical boxes): 4 is 7–10 % faster than
#: 16, whose exact first stage streams tens of MB per call through memory.
GROUP = 4
#: A fixed per-frame amount of work (deterministic), the "node budget" of the benchmarks; the
#: node itself uses its certify.max_subboxes / certify.budget_ms parameters.
NODE_BUDGET = Budget(max_subboxes=3)
#: Free sub-boxes (no pixel clipped, :mod:`usn_perception.bounds.free`) are bounded from the
#: nominal heatmaps when their radius stays below this fraction of the largest logit, 100x
#: under the readouts' rounding slack (1e-7); otherwise (a network whose |W| chain amplifies
#: rounding too much) they are propagated like any other sub-box, which is then tighter.
FREE_TOLERANCE = 1e-9
#: Offline (reports, evaluation): tight boxes at a few seconds per image.
OFFLINE_BUDGET = Budget(max_subboxes=96)
#: Level nodes (bounds.levels) that cost about one propagated sub-box: a one-axis box is
#: bounded at its nodes when it has at most this many per sub-box of the budget. Measured on
#: 640x480 node frames: session 8, ~1.8 ms per node on ~16 ms of fixed cost against ~17 ms
#: per propagated sub-box (9); session 11, the bright bench scene (12 nodes, one sub-box)
#: 27.8 ms with level nodes against 31.4 ms for the partition's sub-box, every keypoint
#: within 20 px against 21 % (16).
NODES_PER_SUBBOX = 16
#: Most level nodes of one certificate, whatever the budget (16-bit frames can hold
#: thousands of values in a threshold's range): beyond it the partition bounds the box.
LEVEL_NODES = 64
#: Largest budget (sub-boxes) that uses level nodes. Measured on the node-box renders of
#: bench/bench_certify.py: at 3 and 8 sub-boxes level nodes are both tighter and faster
#: (session 8: median tightness 5.2 vs 119, 2.8 vs 7.4); beyond, with subdivided segments
#: (below), too (session 11: 1.33 vs 1.74 at 16 sub-boxes, in half the time; the partition
#: needs 32 sub-boxes, 124x predict, for 1.45). Offline budgets (96) keep the partition.
LEVEL_MAX_SUBBOXES = 32
#: Nodes per sub-box of the budget that subdividing segments may add up to (each segment cut
#: into at most LEVEL_SUBDIVIDE equal parts): a budget with more leaves than the natural
#: nodes can use spends them on shorter segments, whose chord gaps are smaller. Measured on
#: the same renders (session 11): 12 sub-boxes 1.40 (19.8x predict), 16 sub-boxes 1.33
#: (28.6x), against 2.2 (23x) for 16 sub-boxes on the natural nodes. Only budgets without a
#: time limit subdivide: a time-limited one is sized by its cost per sub-box, which
#: subdividing would change from one sub-box count to the next. LEVEL_SUBDIVIDE was 3 until
#: session 12: on the node's own frames (6-7 natural nodes, bench/bench_node_tightness.py)
#: that capped the curve at 1.56 from 24 sub-boxes on; with 6, 1.45 at 12 sub-boxes (~17x
#: predict) and 1.34 at 16.
SUBDIVIDE_NODES_PER_SUBBOX = 4
LEVEL_SUBDIVIDE = 6
#: ``Budget.level_work`` units of one leaf of a level plan, without and with offset rows:
#: its radius row (and offset row, from the first ReLU on) through the network and its
#: readout bound. Fitted on node frames (session 15: total ms ≈ a + 1.2·G + 1.2·rows +
#: 0.7·leaves, with offset rows 2.3–2.7·rows, G the network inputs): a leaf costs ~1.6 or
#: ~2.7 inputs.
LEAF_WORK = 2
OFFSET_LEAF_WORK = 3
#: Leaves with offset rows a plan sized by work needs before it takes them instead of a radius
#: row per segment (see _plan_by_work).
OFFSET_MIN_LEAVES = 3
#: ``Budget.level_work`` units of the local-centroid window's moments (bounds.backward) with a
#: readout leaf per segment. Measured on node frames (session 20, one thread, after the
#: window's readout read only its windows' cells): +5-7 ms a certificate against ~17 ms for
#: the smallest plan without them (9 units at the ~1.9 ms a unit the node learns from such
#: plans). Under a time limit the window runs only where the work affords it on top of the
#: smallest plan, and comes out of the work the plan gets; and under a deadline only where
#: the level pass leaves it time (bounds.levels.WINDOW_SHARE).
WINDOW_WORK = 3


def levels_possible(budget: Budget, level_nodes: int) -> bool:
    """Whether a certificate with this budget may use level nodes at all.

    Callers ask ``Detector.run`` for its layer outputs (which level nodes reuse) only then:
    the trace holds every layer's output for as long as the certificate runs.
    """
    return level_nodes > 0 and budget.max_subboxes <= LEVEL_MAX_SUBBOXES


#: The readout bound of each readout: (centre forms, radius, sub-boxes, cell grid) -> boxes.
READOUT_BOUNDS = {'centroid': centroid_bounds, 'local-centroid': local_centroid_bounds,
                  'soft-argmax': soft_argmax_bounds, 'argmax': argmax_bounds}

#: Per readout, the window around each keypoint's reference argmax whose moments level plans
#: bound backward (bounds.backward, bounds.spec.WindowMoments): the local centroid's.
#: Readouts that read the whole heatmap keep the rows' bands.
BACKWARD_WINDOW = {'local-centroid': LOCAL_RADIUS}


class CertStatus(IntEnum):
    """Per-keypoint verdict; the integer values go on the wire (PointCloud2 ``status``)."""

    NOT_CERTIFIED = 0
    CERTIFIED = 1
    OUT_OF_BUDGET = 2
    SKIPPED = 3


@dataclass(frozen=True)
class KeypointCertificate:
    """Certified boxes (K, 4) = [u_lo, u_hi, v_lo, v_hi] in image pixels, and provenance.

    ``nominal`` (K, 2) is ``predict(image, readout=readout)``. Boxes are NaN where the status
    is OUT_OF_BUDGET; a NOT_CERTIFIED keypoint still reports its (sound but too wide) box.
    """

    boxes: np.ndarray
    nominal: np.ndarray
    status: np.ndarray
    box: PhotometricBox
    readout: str
    stats: dict = field(default_factory=dict)

    @property
    def widths(self) -> np.ndarray:
        """Box extent along u and v in pixels, shape (K, 2)."""
        return np.stack([self.boxes[:, 1] - self.boxes[:, 0],
                         self.boxes[:, 3] - self.boxes[:, 2]], -1)

    @property
    def certified(self) -> np.ndarray:
        """(K,) bool: status is CERTIFIED."""
        return self.status == CertStatus.CERTIFIED

    def contains(self, points: np.ndarray) -> np.ndarray:
        """(K,) bool: each keypoint (x, y) of ``points`` (K, 2) lies in its box."""
        p = np.asarray(points, dtype=np.float64)
        b = self.boxes
        return ((b[:, 0] <= p[:, 0]) & (p[:, 0] <= b[:, 1])
                & (b[:, 2] <= p[:, 1]) & (p[:, 1] <= b[:, 3]))

    def to_json(self) -> dict:
        """JSON form (NaN boxes become null)."""
        boxes = [[None if not np.isfinite(v) else float(v) for v in row] for row in self.boxes]
        return {'box': self.box.to_json(), 'readout': self.readout, 'boxes': boxes,
                'nominal': self.nominal.tolist(),
                'status': [CertStatus(int(s)).name for s in self.status], 'stats': self.stats}


class _Evaluator:
    """Bounds the readout of one image on batches of θ sub-boxes.

    With ``ibp_root`` the first call (the whole box) is also bounded with IBP and the tighter
    side of each bound kept: children inherit it through the parent intersection, so a
    forward-mode certificate is never looser than the IBP one. Off in threshold coordinates,
    where IBP's input stage is so loose that the root's IBP bound changed none of 1,800
    keypoint boxes (both shipped models, four boxes, 1–8 sub-boxes; docs/certification.md)
    while costing a quarter of a one-sub-box certificate.
    """

    def __init__(self, net: CompiledNetwork, enc: ImageEncoding, method: str, readout: str,
                 heatmap_hw: tuple[int, int], relu: str, chunk: int, ibp_root: bool,
                 generators: int = 0, thresholds: bool = False, exact_values: int = 0,
                 float32: bool = False, free: Callable | None = None,
                 logits: Callable[[], torch.Tensor] | None = None,
                 trace: Callable[[], tuple] | None = None, backward: bool = False) -> None:
        self.net, self.enc, self.method, self.readout = net, enc, method, readout
        # Level plans: the readout window's cells bounded again backward (bounds.backward).
        self.window = BACKWARD_WINDOW.get(readout) if backward else None
        self.backward_ran = False  # a level plan ran with the window
        # Free sub-boxes (no pixel clipped, bounds.free): ``free(boxes)`` marks them and
        # ``logits()`` gives the nominal heatmaps they are bounded from; ``trace()`` the
        # nominal module outputs, which level nodes start from.
        self.free = free
        self.logits = logits
        self.trace = trace
        self.free_leaves = 0
        self.float32 = float32  # parallel-ReLU passes in float32 (bounds.rounding)
        self.float32_fallbacks = 0  # batches redone in float64 after a float32 overflow
        self.relu = 'interval' if method == 'ibp' else relu
        self.grid = tuple(g.to(enc.device) for g in cell_grid(*heatmap_hw))
        self.heatmap_hw = heatmap_hw
        self.chunk = chunk
        self.ibp_root = ibp_root and method != 'ibp'
        self.unstable = 0
        self.generators = generators
        self.thresholds = thresholds  # sub-boxes are (τ, κ) boxes, see bounds.thresholds
        # Exact first linear stage (bounds.prefix): threshold coordinates only.
        self.prefix = linear_prefix(net) if thresholds and exact_values > 0 else 0
        self.exact_values = exact_values

    def _inputs(self, part: torch.Tensor, relu: str) -> tuple[torch.Tensor, torch.Tensor]:
        if self.thresholds:
            stage = self.enc.threshold_intervals if relu == 'interval' else (
                self.enc.threshold_forms)
            return stage(part)
        if relu == 'interval':
            return self.enc.intervals(part)
        return self.enc.forms(part, self.generators)

    def _bound(self, part: torch.Tensor, relu: str, deadline: float | None) -> tuple:
        free = self.free(part) if self.free is not None and relu != 'interval' else None
        if free is None or not bool(free.any()):
            c, r = self._propagate(part, relu, deadline)
        else:
            self.free_leaves += int(free.sum())
            c, r = free_forms(self.logits(), part[free], free_radius(self.net, self.enc))
            if not bool(free.all()):
                cp, rp = self._propagate(part[~free], relu, deadline)
                if rp.shape[1] > r.shape[1]:  # a radius form (adaptive ReLU): θ-parts 0
                    r = torch.cat([r, r.new_zeros((r.shape[0], rp.shape[1] - 1,
                                                   *r.shape[2:]))], 1)
                order = torch.cat([torch.nonzero(~free)[:, 0], torch.nonzero(free)[:, 0]])
                back = torch.empty_like(order)
                back[order] = torch.arange(order.numel(), device=order.device)
                c, r = torch.cat([cp, c])[back], torch.cat([rp, r])[back]
        bounds = READOUT_BOUNDS[self.readout](c, r, part, self.grid)
        logits = form_at(c, box_centres(part)).view(part.shape[0], -1, *self.heatmap_hw)
        est = read_keypoints(logits, self.readout)
        return bounds, est

    def levels(self, plan: _LevelPlan, deadline: float | None) -> tuple | None:
        """Bound the plan's one-axis box at its level nodes (bounds.levels).

        Returns (leaves (L, 4), bounds (L, K, 4)), or None when a float32 deviation overflowed
        (the caller partitions instead).
        """
        reuse = self.trace is not None and reference_unclipped(
            plan.nodes, self.enc.values, self.enc.value_weights, plan.axis)
        out = level_bounds(self.net, self.enc, plan.box[0], plan.axis,
                           plan.groups(), nodes=plan.nodes,
                           precision='float32' if self.float32 else 'float64',
                           deadline=deadline, nominal=self.trace() if reuse else None,
                           offset=plan.offset, window=self.window if plan.window else None)
        if out is None:
            return None
        if deadline is not None and time.perf_counter() > deadline:
            raise BudgetExceeded  # the last layer ended late: start no readout bound after it
        part, c, r, mixed, moments = out
        self.unstable += mixed
        self.backward_ran = moments is not None
        # The nodes leave out the input's − τ, which moves the logits by ≤ |τ|·R (bounds.free).
        reach_of = free_radius(self.net, self.enc)
        reach = tau_reach(part, reach_of)[:, None]
        # The leaves' forms are constant along the idle threshold: the readout bounds them
        # on leaves flat there (two corners each instead of four, the same values).
        flat = _flat_along(part, 1 - plan.axis)
        if moments is None:
            return part, READOUT_BOUNDS[self.readout](c, r + reach, flat, self.grid)
        # The forms on window cells only (c: SegmentForms): the heatmap's largest reach.
        spread = reach.amax(-1, keepdim=True)
        moments = moments._replace(radius=moments.radius + spread)
        # The segments' argmax candidates from one leaf over the whole box (a candidate
        # anywhere in a segment is one over the box): where it has one per keypoint, so has
        # every segment, and the segments' forms are needed on that window only. With more,
        # each segment finds its own (the hull's extra ones would widen every segment's box).
        hull, c_hull, r_hull = c.hull()
        windows = local_windows(c_hull, r_hull + tau_reach(hull, reach_of)[:, None],
                                _flat_along(hull, 1 - plan.axis), self.grid)
        if bool((windows.count == 1).all()):
            windows = windows.expand(part.shape[0])
            cells = windows.cells[0].flatten(1)  # (K, L·m)
            c_w, r_w = c.at(cells)
            r_w = r_w + reach.gather(3, cells.expand(*reach.shape[:2], -1, -1))
            return part, local_centroid_bounds(c_w, r_w, flat, self.grid, moments=moments,
                                               windows=windows)
        c, r = c.at()
        return part, local_centroid_bounds(c, r + reach, flat, self.grid, moments=moments)

    def _propagate(self, part: torch.Tensor, relu: str, deadline: float | None) -> tuple:
        """Output forms (C (n, 3, K, P), R (n, kr, K, P)) of the network on sub-boxes ``part``."""
        # The input stage and the readout bound cost the same whatever the network's width,
        # so they run once per group of sub-boxes; the network, per chunk (see _chunk_size).
        skip = 0
        if self.prefix and relu != 'interval':
            skip = self.prefix
            c_in, r_in = prefix_forms(self.enc, self.net, part, skip, self.exact_values)
        else:
            c_in, r_in = self._inputs(part, relu)
        outs = []
        for start in range(0, part.shape[0], self.chunk):
            rows = slice(start, start + self.chunk)
            out = None
            if self.float32 and relu == 'parallel' and r_in.shape[1] == 1 and (
                    c_in.shape[1] >= 3):
                out = propagate_float32(self.net, c_in[rows], r_in[rows], part[rows],
                                        deadline=deadline, start=skip)
                self.float32_fallbacks += out is None
            if out is None:  # float64 asked for, or float32 overflowed
                out = propagate(self.net, c_in[rows], r_in[rows], part[rows], relu=relu,
                                deadline=deadline, start=skip)
            c, r, unstable = out
            self.unstable += int(unstable.sum())
            outs.append(collapse_generators(c.flatten(3), r.flatten(3)))
        return torch.cat([o[0] for o in outs]), torch.cat([o[1] for o in outs])

    def __call__(self, boxes: torch.Tensor, deadline: float | None) -> tuple:
        bounds, est = [], []
        for part in boxes.split(max(self.chunk, GROUP)):
            b, e = self._bound(part, self.relu, deadline)
            bounds.append(b)
            est.append(e)
        bounds = torch.cat(bounds)
        if self.ibp_root:
            # The first call covers the root (alone or as a partition): one IBP pass over the
            # root's hull holds for every one of its leaves.
            self.ibp_root = False
            root = torch.stack([boxes[:, 0].min(), boxes[:, 1].max(),
                                boxes[:, 2].min(), boxes[:, 3].max()])[None]
            other = self._bound(root, 'interval', deadline)[0]
            bounds = torch.stack([torch.maximum(bounds[..., 0], other[..., 0]),
                                  torch.minimum(bounds[..., 1], other[..., 1]),
                                  torch.maximum(bounds[..., 2], other[..., 2]),
                                  torch.minimum(bounds[..., 3], other[..., 3])], -1)
        return bounds, torch.cat(est)


@dataclass(frozen=True)
class _LevelPlan:
    """A one-axis (τ, κ) box to bound at its level nodes (bounds.levels)."""

    box: torch.Tensor  # (1, 4)
    axis: int
    nodes: torch.Tensor  # (G,) the box's ends and the present values between them
    points: int  # distinct network inputs among the nodes: what the plan costs
    leaves: int  # contiguous groups of segments, each a radius row and a readout bound
    offset: bool = True  # each row with its offset row (bounds.levels)
    merged: bool = False  # groups merge the narrowest segments (bounds.levels.narrowest_merged)
    window: bool = False  # the readout window's moments bounded backward (bounds.backward)

    @property
    def segments(self) -> int:
        """Pieces between adjacent nodes: the most leaves the plan can use."""
        return self.nodes.shape[0] - 1

    @property
    def work(self) -> int:
        """Network images and readout bounds it takes (``Budget.level_work``'s unit)."""
        return (self.points + (OFFSET_LEAF_WORK if self.offset else LEAF_WORK) * self.leaves
                + WINDOW_WORK * self.window)

    def groups(self) -> int | torch.Tensor:
        """The ``leaves`` argument of bounds.levels.level_bounds: a count, or the merged map."""
        return narrowest_merged(self.nodes, self.leaves) if self.merged else self.leaves


def _level_plan(root: torch.Tensor, enc: ImageEncoding, budget: Budget, max_nodes: int,
                tau_ok: bool, window: bool | None = False) -> _LevelPlan | None:
    """The level-node plan for ``root`` when only one threshold clips and it fits the budget.

    ``tau_ok``: the |τ|·R bound the nodes need (and free sub-boxes) is negligible.
    ``window``: bound the readout window's moments (True), never (False), or where the budget
    affords it (None: always without a time limit; under one, where its level work leaves
    :data:`WINDOW_WORK` for them on top of the smallest plan, taken out of the plan's work).
    """
    if not tau_ok or not levels_possible(budget, max_nodes):
        return None
    axis = level_axis(root[0], enc.values, enc.value_weights)
    if axis is None:
        return None  # both thresholds clip, or neither
    cap = min(max_nodes, NODES_PER_SUBBOX * budget.max_subboxes)
    nodes = level_nodes(root[0], enc.values, enc.value_weights, axis)
    points = evaluation_points(nodes, enc.values, enc.value_weights, axis)[0].shape[0]
    if points > cap:
        return None
    if window is None:
        timed = budget.max_ms is not None
        window = not timed or (budget.level_work is not None and budget.level_work
                               >= points + LEAF_WORK + WINDOW_WORK)
        spent = WINDOW_WORK if timed and window else 0
    else:
        spent = 0
    if budget.level_work is not None:
        plan = _plan_by_work(root, enc, axis, nodes, points, budget.level_work - spent,
                             max_nodes)
        return replace(plan, window=window)
    # Leaves to spare: cut every segment into k parts, as many nodes as the budget allows.
    spare = min(cap, SUBDIVIDE_NODES_PER_SUBBOX * budget.max_subboxes)
    if budget.max_ms is not None:
        spare = 0  # sized by time (the node): keep the cost per sub-box what was measured
    cut = _cut_segments(root, enc, axis, min(LEVEL_SUBDIVIDE, spare // points),
                        lambda count: count <= spare)
    if cut is not None:
        nodes, points = cut
    return _LevelPlan(root, axis, nodes, points, min(budget.max_subboxes, nodes.shape[0] - 1),
                      window=window)


def _cut_segments(root: torch.Tensor, enc: ImageEncoding, axis: int, most: int,
                  fits: Callable[[int], bool]) -> tuple[torch.Tensor, int] | None:
    """Every segment cut into the most equal parts, at most ``most``, that still fit.

    Returns (nodes, count of distinct network inputs) for the first cut whose count ``fits``,
    or None when none does.
    """
    for k in range(most, 1, -1):
        finer = level_nodes(root[0], enc.values, enc.value_weights, axis, subdivide=k)
        count = evaluation_points(finer, enc.values, enc.value_weights, axis)[0].shape[0]
        if fits(count):
            return finer, count
    return None


def _plan_by_work(root: torch.Tensor, enc: ImageEncoding, axis: int, nodes: torch.Tensor,
                  points: int, work: int, max_nodes: int) -> _LevelPlan:
    """Leaves (then offset rows, then parts of segments) for a plan sized by ``level_work``.

    Radius rows only (a leaf and row per segment, as many as the work allows, at least one)
    until :data:`OFFSET_MIN_LEAVES` leaves with offset rows fit, or, with fewer segments, a
    row per segment and offset rows on all segments but one. Then offset rows, on as many
    leaves as fit, the narrowest segments merged
    (:func:`~usn_perception.bounds.levels.narrowest_merged`) until every segment has its
    own; then every segment cut into the most equal parts that still fit, keeping one row and
    leaf per segment. Measured on node frames (``docs/certification.md``,
    "Merged leaves with offset rows"): at the same work, offset rows on 3 or more merged
    leaves beat radius rows without them (median tightness 2.91 against 3.82 at work 15,
    2.18 against 2.57 at 19), on 2 they do not (4.06 against 3.64 at work 13); offset rows
    on every segment and cuts then buy about the same, offset rows first.
    """
    segments = nodes.shape[0] - 1
    with_offsets = min(segments, (work - points) // OFFSET_LEAF_WORK)
    if with_offsets < 1 or with_offsets < OFFSET_MIN_LEAVES and (
            work - points < LEAF_WORK * segments or with_offsets < segments - 1):
        return _LevelPlan(root, axis, nodes, points,
                          max(1, min(segments, (work - points) // LEAF_WORK)), False)
    if with_offsets < segments:
        return _LevelPlan(root, axis, nodes, points, with_offsets, True, merged=True)
    cut = _cut_segments(root, enc, axis, LEVEL_SUBDIVIDE, lambda count: count <= max_nodes
                        and count + OFFSET_LEAF_WORK * segments <= work)
    if cut is not None:
        nodes, points = cut
    return _LevelPlan(root, axis, nodes, points, segments, True)


def _threshold_root(net: CompiledNetwork, box: PhotometricBox, readout: str, method: str,
                    coordinates: str) -> torch.Tensor | None:
    """The (τ, κ) root box when threshold coordinates are asked for (or 'auto') and valid."""
    if coordinates == 'theta':
        return None
    valid = method == 'forward' and readout in SCALE_FREE_READOUTS and is_homogeneous(net)
    row = threshold_row(box) if valid else None
    if row is None and coordinates == 'thresholds':
        raise ValueError('threshold coordinates need the forward method, a scale-free readout '
                         f'{SCALE_FREE_READOUTS}, a network without any bias or shift, and '
                         f'beta < 1 (got method {method!r}, readout {readout!r})')
    return row


def _chunk_size(net: CompiledNetwork, generators: int = 0) -> int:
    """Sub-boxes per batch: about 0.2 M form elements per layer call.

    Float64 convolutions on the CPU get slower *per image* as the batch grows past a few
    images (measured: one sub-box per call is fastest for the default 128x96 network), while
    small networks gain from batching because per-call overhead dominates.
    """
    return int(max(1, min(32, 200_000 // ((3 + generators) * net.max_numel))))


@torch.inference_mode()  # no autograd bookkeeping: ~6 % of a node frame is op overhead it saves
def certify_keypoints(
    detector,
    image: np.ndarray,
    box: PhotometricBox,
    *,
    readout: str | None = None,
    method: str = 'forward',
    budget: Budget | None = None,
    max_width_px: float | None = None,
    relu: str = 'parallel',
    generators: int = GENERATORS,
    coordinates: str = 'auto',
    exact_values: int = EXACT_VALUES,
    nominal: np.ndarray | None = None,
    precision: str = 'auto',
    nominal_heatmaps: torch.Tensor | None = None,
    level_nodes: int = LEVEL_NODES,
    nominal_trace: tuple[torch.Tensor, ...] | None = None,
    backward: bool | None = None,
) -> KeypointCertificate:
    """Certify every keypoint of ``detector`` on ``image`` over the photometric ``box``.

    ``method``: 'forward' (linear bounds in θ, default) or 'ibp' (intervals, the baseline).
    ``relu``: the forward-mode ReLU relaxation, 'parallel' (default: a θ-independent radius,
    cheapest) or 'adaptive' (CROWN's λ ∈ {0, 1}: often tighter per sub-box, ~1.4x the time).
    ``budget`` defaults to :data:`OFFLINE_BUDGET`. ``max_width_px`` marks keypoints whose box
    is wider than that (on either axis) NOT_CERTIFIED; the box is still reported.
    ``generators``: clipped input values that keep their own symbol instead of joining the
    radius (0 = off, the default: measured to cost ~5x the time for little gain when the
    clip ambiguity is what makes ReLUs unstable; see docs/certification.md).
    ``coordinates``: 'theta' bounds over (α, β); 'thresholds' over the clip thresholds
    (τ, κ) = (−β/α, (1 − β)/α), valid for a homogeneous network (no bias or shift anywhere)
    and a scale-free readout (centroid, local-centroid, argmax), where it is exact on pieces cut
    at pixel values; 'auto' (default) uses thresholds whenever they are valid.
    ``exact_values``: in threshold coordinates, the clipped pixel values per sub-box (the
    heaviest) whose effect on the first linear layers is bounded exactly, by evaluating them
    at their breakpoints (:mod:`usn_perception.bounds.prefix`), instead of relaxing each
    clipped pixel on its own; 0 relaxes them all (cheaper per sub-box, looser).
    ``level_nodes``: in threshold coordinates, when only one threshold clips pixels (only dark
    or only bright ones reach it), the box is bounded by running the network at every present
    pixel value in that threshold's range (:mod:`usn_perception.bounds.levels`, exact at
    each) when there are at most this many, at most :data:`NODES_PER_SUBBOX` per sub-box of
    the budget, and the budget is at most :data:`LEVEL_MAX_SUBBOXES`;
    ``budget.max_subboxes`` is then the number of leaves (radius rows and readout bounds),
    or ``budget.level_work`` sizes them (:class:`~usn_perception.bounds.box.Budget`).
    0 turns it off. ``backward``: level plans bound each keypoint's local-centroid window
    moments by back-substitution (:mod:`usn_perception.bounds.backward`,
    :class:`~usn_perception.bounds.spec.WindowMoments`) and give every clip segment a readout
    leaf of its own; True does so, False keeps the rows' bands, None (default) does so
    without a time limit and, under one, where the level work affords :data:`WINDOW_WORK`
    for it on top of the smallest plan and the deadline leaves it time (measured on the
    node's frames: 3.64 -> 1.18 median tightness at level work 13, 1.45 at work 7, at
    ~+5-7 ms).
    ``nominal``: the caller's ``detector.predict(image, readout=readout)`` (K, 2), which saves
    one forward pass per frame (the image is still validated); ``nominal_heatmaps``, only
    with it, the same call's heatmaps (``detector.run(...).heatmaps``), which free sub-boxes
    are bounded from (checked: they must read ``nominal``); ``nominal_trace``, only with
    both, the same call's module outputs (``detector.run(..., trace=True).trace``; checked:
    its last is ``nominal_heatmaps``), which level nodes start from. ``precision``: 'float32' runs
    the θ-dependent part of the parallel-ReLU passes in float32 with every rounding error
    added to the bounds (:mod:`usn_perception.bounds.rounding`), 'float64'
    in float64, 'auto' (default) float32 where that is sound (x86-64 CPU, no reduced-precision
    float32 modes). Raises
    ``ValueError`` on a bad box, method, readout, relu or budget,
    :class:`~usn_perception.errors.ImageError` on a bad image and
    :class:`~usn_perception.errors.UnsupportedLayerError` on a network the engine cannot bound.
    """
    t0 = time.perf_counter()
    box = PhotometricBox.coerce(box)
    readout = readout or detector.readout
    if readout not in READOUTS:
        raise ValueError(f'unknown readout {readout!r}; choose one of {READOUTS}')
    if method not in METHODS:
        raise ValueError(f'unknown method {method!r}; choose one of {METHODS}')
    if relu not in ('parallel', 'adaptive'):
        raise ValueError(f"relu must be 'parallel' or 'adaptive', got {relu!r}")
    budget = OFFLINE_BUDGET if budget is None else budget
    if not isinstance(budget, Budget):
        raise ValueError(f'budget must be a Budget, got {budget!r}')
    if coordinates not in COORDINATES:
        raise ValueError(f'coordinates must be one of {COORDINATES}, got {coordinates!r}')
    if not (isinstance(generators, int) and generators >= 0):
        raise ValueError(f'generators must be a non-negative integer, got {generators!r}')
    if not (isinstance(exact_values, int) and exact_values >= 0):
        raise ValueError(f'exact_values must be a non-negative integer, got {exact_values!r}')
    if not (isinstance(level_nodes, int) and level_nodes >= 0):
        raise ValueError(f'level_nodes must be a non-negative integer, got {level_nodes!r}')
    if max_width_px is not None and not max_width_px > 0:
        raise ValueError(f'max_width_px must be positive, got {max_width_px}')
    precision = resolve_precision(precision, detector.device)
    deadline = None if budget.max_ms is None else t0 + budget.max_ms / 1000.0
    k = len(detector.keypoint_names)
    if nominal is None:
        if nominal_heatmaps is not None or nominal_trace is not None:
            raise ValueError('nominal_heatmaps and nominal_trace need the nominal keypoints '
                             'they read')
        # validates the image too
        pred = detector.run(image, readout=readout, trace=levels_possible(budget, level_nodes))
        nominal, nominal_heatmaps, nominal_trace = pred.keypoints, pred.heatmaps, pred.trace
    else:
        nominal = np.asarray(nominal, dtype=np.float64)
        if nominal.shape != (k, 2):
            raise ValueError(f'nominal must be ({k}, 2) keypoints, got shape {nominal.shape}')
        if nominal_heatmaps is not None:
            _check_heatmaps(detector, image.shape, nominal_heatmaps, nominal, readout)
        if nominal_trace is not None and (
                nominal_heatmaps is None or not isinstance(nominal_trace, (tuple, list))
                or not nominal_trace or not torch.equal(nominal_trace[-1][0], nominal_heatmaps)):
            raise ValueError('nominal_trace must be the module outputs of the call that gave '
                             'nominal_heatmaps (Detector.run(..., trace=True).trace)')
    enc = ImageEncoding(image, detector.config.input_size, detector.device)
    net = compile_network(detector.net, enc.shape)
    w_h, h_h = detector.config.heatmap_size
    if net.output_shape != (k, h_h, w_h):
        raise UnsupportedLayerError(
            f'network output {net.output_shape} is not {k} heatmaps of {h_h}x{w_h}')
    root = _threshold_root(net, box, readout, method, coordinates)
    thresholds = root is not None
    heatmaps: list[torch.Tensor] = [] if nominal_heatmaps is None else [nominal_heatmaps]

    def logits() -> torch.Tensor:
        if not heatmaps:
            heatmaps.append(detector.heatmaps(image))
        return heatmaps[0].to(enc.device, torch.float64)

    traces: list[tuple] = [] if nominal_trace is None else [tuple(nominal_trace)]

    def trace() -> tuple:
        if not traces:
            traces.append(detector.run(image, readout=readout, trace=True).trace)
        return traces[0]

    # Free sub-boxes and level nodes both leave the input's − τ to the |τ|·R bound: usable
    # when it is negligible (bounds.free).
    tau_ok, has_free = False, False
    wants_levels = thresholds and method == 'forward' and relu == 'parallel' and level_nodes > 0
    if thresholds and method == 'forward':
        has_free = bool(carve_free(root, enc.values, enc.value_weights)[0].shape[0])
        if has_free or wants_levels:
            tau = float(root[0, :2].abs().max())
            tau_ok = tau * float(free_radius(net, enc).max()) <= FREE_TOLERANCE * float(
                logits().abs().max())
    is_free = None
    if tau_ok and has_free:
        is_free = partial(free_mask, values=enc.values, weights=enc.value_weights)
    evaluate = _Evaluator(net, enc, method, readout, (h_h, w_h), relu,
                          _chunk_size(net, 0 if thresholds else generators),
                          ibp_root=not thresholds,
                          generators=0 if thresholds else generators, thresholds=thresholds,
                          exact_values=exact_values, float32=precision == 'float32',
                          free=is_free, logits=logits, trace=trace,
                          backward=backward is not False)
    stats = {'method': method, 'readout': readout, 'relu': evaluate.relu,
             'backward': False,
             'precision': precision if evaluate.relu == 'parallel' else 'float64',
             'coordinates': 'thresholds' if thresholds else 'theta',
             'exact_values': exact_values if evaluate.prefix else 0,
             'budget': {'max_subboxes': budget.max_subboxes, 'max_ms': budget.max_ms,
                        'level_work': budget.level_work}}
    if thresholds:
        # Partition first by ambiguous pixel mass, then refine adaptively with what is left.
        how = {'splitter': partial(threshold_splits, values=enc.values,
                                   weights=enc.value_weights),
               'priority': partial(ambiguous_mass, values=enc.values, weights=enc.value_weights),
               'carve': partial(carve_free, values=enc.values, weights=enc.value_weights)
               if is_free is not None else None,
               'free': is_free}
    else:
        root = box.as_row()
        how = {'intensity': enc.mean_intensity()}
    plan = None
    if wants_levels:
        # (the moments are bounded from float32 deviations only: no window in float64)
        plan = _level_plan(root.to(enc.device), enc, budget, level_nodes, tau_ok,
                           backward if evaluate.window is not None and evaluate.float32
                           else False)
    stats['level_nodes'] = 0 if plan is None else plan.points
    stats['level_work'] = 0 if plan is None else plan.work
    stats['rows'] = 0 if plan is None else plan.leaves  # radius rows (leaves: readout bounds)
    stats['offset_rows'] = plan is not None and plan.offset
    stats['merged_leaves'] = plan is not None and plan.merged
    try:
        result = None if plan is None else _bound_levels(evaluate, plan, deadline)
        if result is None:
            stats['level_nodes'] = stats['level_work'] = stats['rows'] = 0
            stats['offset_rows'] = stats['merged_leaves'] = False
            result = refine(evaluate, root.to(enc.device), budget, deadline=deadline, **how)
    except BudgetExceeded:
        stats.update(subboxes=0, leaves=0, passes=0, stopped='time',
                     ms=(time.perf_counter() - t0) * 1000.0)
        status = np.full(k, int(CertStatus.OUT_OF_BUDGET), dtype=np.int64)
        return KeypointCertificate(np.full((k, 4), np.nan), nominal, status, box, readout,
                                   stats)
    boxes = _to_pixels(detector, image.shape, result)
    status = np.full(k, int(CertStatus.CERTIFIED), dtype=np.int64)
    cert = KeypointCertificate(boxes, nominal, status, box, readout, stats)
    if box.contains(1.0, 0.0) and not cert.contains(nominal).all():
        # Never publish a certificate that its own nominal output contradicts.
        raise RuntimeError('internal soundness check failed: the nominal prediction lies '
                           f'outside its certified box ({boxes.tolist()} vs {nominal.tolist()})')
    if max_width_px is not None:
        too_wide = (cert.widths > max_width_px).any(1)
        status[too_wide] = int(CertStatus.NOT_CERTIFIED)
    stats.update(backward=evaluate.backward_ran,
                 subboxes=result.evaluated, leaves=int(result.boxes.shape[0]),
                 passes=result.passes, first_pass=result.first_pass, stopped=result.stopped,
                 free_leaves=evaluate.free_leaves,
                 unstable_relus=evaluate.unstable, float32_fallbacks=evaluate.float32_fallbacks,
                 ms=(time.perf_counter() - t0) * 1000.0)
    return cert


def _flat_along(boxes: torch.Tensor, axis: int) -> torch.Tensor:
    """(N, 4) ``boxes`` made a point along ``axis`` (0: τ, 1: κ): its lower end."""
    out = boxes.clone()
    out[:, 2 * axis + 1] = out[:, 2 * axis]
    return out


def _bound_levels(evaluate: _Evaluator, plan: _LevelPlan,
                  deadline: float | None) -> RefineResult | None:
    """The whole certificate from the level nodes, in the plan's leaves."""
    out = evaluate.levels(plan, deadline)
    if out is None:
        return None
    stopped = 'converged' if plan.leaves == plan.segments else 'budget'
    return RefineResult(*out, plan.leaves, 1, stopped, plan.leaves)


def _check_heatmaps(detector, image_shape: tuple[int, ...], heatmaps: torch.Tensor,
                    nominal: np.ndarray, readout: str) -> None:
    """Refuse caller heatmaps that are not the ones ``nominal`` was read from."""
    w_h, h_h = detector.config.heatmap_size
    shape = (len(detector.keypoint_names), h_h, w_h)
    if not isinstance(heatmaps, torch.Tensor) or tuple(heatmaps.shape) != shape or (
            heatmaps.dtype != torch.float64):
        raise ValueError(f'nominal_heatmaps must be a float64 tensor of shape {shape}')
    uv = read_keypoints(heatmaps, readout).cpu().numpy()
    if not np.array_equal(detector.mapping(image_shape).to_image(uv), nominal):
        raise ValueError('nominal_heatmaps do not read the nominal keypoints given')


def _to_pixels(detector, image_shape: tuple[int, ...], result: RefineResult) -> np.ndarray:
    """Hull of the leaf bounds (heatmap cells) → image pixels, rounded outward."""
    hull = result.hull().cpu().numpy()
    mapping = detector.mapping(image_shape)
    u_lo, u_hi = mapping.to_image_outward(hull[:, 0], hull[:, 1], 0)
    v_lo, v_hi = mapping.to_image_outward(hull[:, 2], hull[:, 3], 1)
    return np.stack([u_lo, u_hi, v_lo, v_hi], -1)

"""Adaptive, batched θ-box splitting under a budget.

The certified box is the hull of the per-sub-box bounds, so only the sub-boxes whose bounds
stick out past the best estimate of the true range are worth splitting. Each pass scores the
current leaves by how far they stick out (normalised per keypoint and axis), bisects the worst
ones in one batch, and intersects every child's bound with its parent's: a child's θ-set lies
inside its parent's, so the parent's bound is valid for it too, and the hull can only shrink.

When the caller knows, before bounding anything, which sub-boxes are hard (in clip-threshold
coordinates: those holding ambiguous pixel values), :func:`partition` first cuts the root into
as many leaves as the budget allows, and only what is left is spent adaptively. Measured on the
shipped model: bounding the parents of an adaptive tree costs half of a small budget, and
their bounds rarely steer the splits better than the ambiguous mass does (see
docs/certification.md, "Partition first").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from usn_perception.bounds.box import Budget, split_boxes
from usn_perception.bounds.propagate import BudgetExceeded

#: evaluate(sub-boxes (n, 4), deadline) -> (bounds (n, K, 4), estimates (n, K, 2))
Evaluator = Callable[[torch.Tensor, float | None], tuple[torch.Tensor, torch.Tensor]]


@dataclass
class RefineResult:
    """Leaves, their bounds, and how the budget was spent."""

    boxes: torch.Tensor
    bounds: torch.Tensor
    evaluated: int
    passes: int
    stopped: str
    #: Leaves of the first pass (1 without a partition).
    first_pass: int = 1

    def hull(self) -> torch.Tensor:
        """(K, 4) [u_lo, u_hi, v_lo, v_hi] over all leaves."""
        b = self.bounds
        return torch.stack([b[..., 0].min(0).values, b[..., 1].max(0).values,
                            b[..., 2].min(0).values, b[..., 3].max(0).values], -1)


def split_dims(boxes: torch.Tensor, intensity: float) -> torch.Tensor:
    """Bisect α when its effect on pixels (width × mean intensity) beats β's width.

    A box whose β range straddles 0 is always cut along β (at 0, see :func:`split_points`).
    """
    wa = (boxes[:, 1] - boxes[:, 0]) * max(intensity, 1e-3)
    wb = boxes[:, 3] - boxes[:, 2]
    return ((wb > wa) | straddles_zero(boxes)).long()


def straddles_zero(boxes: torch.Tensor) -> torch.Tensor:
    """(n,) bool: β_lo < 0 < β_hi."""
    return (boxes[:, 2] < 0) & (boxes[:, 3] > 0)


def split_points(boxes: torch.Tensor) -> torch.Tensor:
    """Where to cut: β = 0 on boxes that straddle it, else the midpoint (NaN).

    Black pixels (x = 0) become ``max(β, 0)``: linear on each side of β = 0 and a kink across
    it, so one cut there makes all of them exact, which for a homogeneous network is often
    the difference between a loose and an exact certificate.
    """
    nan = torch.full_like(boxes[:, 0], float('nan'))
    return torch.where(straddles_zero(boxes), torch.zeros_like(nan), nan)


def _scores(bounds: torch.Tensor, est_lo: torch.Tensor, est_hi: torch.Tensor,
            splittable: torch.Tensor) -> torch.Tensor:
    """How far each leaf's bound sticks out past the estimated range, summed over (K, sides)."""
    lo = bounds[..., 0::2]
    hi = bounds[..., 1::2]
    hull = torch.stack([lo.min(0).values, hi.max(0).values])
    scale = (hull[1] - hull[0]).clamp(min=1e-6)
    out = (torch.relu(est_lo - lo) + torch.relu(hi - est_hi)) / scale
    out = torch.nan_to_num(out, nan=0.0, posinf=1e6).sum((1, 2))
    return torch.where(splittable, out, torch.zeros_like(out))


#: splitter(parents (n, 4)) -> (axis per box (n,), cut position or NaN for the midpoint (n,))
Splitter = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


#: priority(leaves (n, 4)) -> (n,) how much cutting each leaf should help; <= 0: not at all
Priority = Callable[[torch.Tensor], torch.Tensor]


#: carve(root (1, 4)) -> (free leaves (f, 4), the rest (m, 4)): free leaves cost no propagation
Carver = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def partition(root: torch.Tensor, count: int, splitter: Splitter,
              priority: Priority, carve: Carver | None = None) -> torch.Tensor:
    """Cut ``root`` (1, 4) into at most ``count`` leaves without bounding any of them.

    Greedy: the leaf of highest priority is cut (where ``splitter`` says) until there are
    ``count`` leaves or no leaf has a positive priority. The leaves tile the root exactly
    (every cut is shared by both children, :func:`split_boxes`). With ``carve``, free parts
    are split off where that adds no counted leaf: from the root first when the rest is one
    box, and afterwards from every leaf whose rest is one box. Free leaves do not count and
    come last. (Carving an L-shaped rest up front costs a leaf and fixes two cuts that the
    greedy would place elsewhere: measured worse at the offline budget, docs/certification.md.)
    """
    def carve_one(leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(kept (0 or 1, 4), freed (0 or 1, 4)): carve only where the rest stays one box."""
        carved, rest = carve(leaf)
        return (rest, carved) if carved.shape[0] and rest.shape[0] <= 1 else (leaf, leaf[:0])

    leaves, free = (root, root[:0]) if carve is None else carve_one(root)
    if leaves.shape[0]:
        score = priority(leaves)
        while leaves.shape[0] < count:
            i = int(score.argmax())
            if not float(score[i]) > 0.0:
                break
            children = split_boxes(leaves[i:i + 1], *splitter(leaves[i:i + 1]))
            keep = torch.arange(leaves.shape[0], device=leaves.device) != i
            leaves = torch.cat([leaves[keep], children])
            score = torch.cat([score[keep], priority(children)])
    if carve is not None:
        # (range, not split(1): split of an empty tensor yields one empty piece)
        pieces = [carve_one(leaves[i:i + 1]) for i in range(leaves.shape[0])]
        leaves = torch.cat([leaves[:0], *(k for k, _ in pieces)])
        free = torch.cat([free, *(f for _, f in pieces)])
    return torch.cat([leaves, free])


def refine(evaluate: Evaluator, root: torch.Tensor, budget: Budget, *, intensity: float = 0.5,
           deadline: float | None = None, splitter: Splitter | None = None,
           priority: Priority | None = None, carve: Carver | None = None,
           free: Callable[[torch.Tensor], torch.Tensor] | None = None) -> RefineResult:
    """Bound ``root`` (1, 4), then split adaptively until the budget is spent.

    ``splitter`` chooses the axis and cut of each box to split (default: :func:`split_dims`
    and :func:`split_points`, for (α, β) boxes, trading α against β by the image's mean
    ``intensity``). With ``priority`` the first pass bounds the
    :func:`partition` of the root into up to ``budget.max_subboxes`` leaves instead of the
    root alone (``carve``: see :func:`partition`). ``free(boxes) -> (n,) bool`` marks the
    sub-boxes ``evaluate`` bounds without propagation: they do not count against the budget.
    Raises :class:`BudgetExceeded` only when that first pass misses the deadline.
    """
    if splitter is None:
        def splitter(parents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return split_dims(parents, intensity), split_points(parents)

    def work(boxes: torch.Tensor) -> int:
        return int(boxes.shape[0] if free is None else (~free(boxes)).sum())

    if priority is not None:
        root = partition(root, budget.max_subboxes, splitter, priority, carve)
    t0 = time.perf_counter()
    bounds, est = evaluate(root, deadline)
    first_pass = root.shape[0]
    evaluated = work(root)
    per_box = (time.perf_counter() - t0) / max(1, evaluated)
    boxes, passes, stopped = root, 1, 'budget'
    est_lo, est_hi = est.min(0).values, est.max(0).values
    while True:
        room = budget.max_subboxes - evaluated
        if deadline is not None:
            room = min(room, int((deadline - time.perf_counter()) / max(per_box, 1e-6)))
        if room < 2:
            stopped = 'time' if budget.max_subboxes - evaluated >= 2 else 'budget'
            break
        splittable = ((boxes[:, 1] > boxes[:, 0]) | (boxes[:, 3] > boxes[:, 2]))
        if free is not None:  # bounded as tightly as the readout allows already
            splittable &= ~free(boxes)
        score = _scores(bounds, est_lo, est_hi, splittable)
        n_split = min(int((score > 0).sum()), room // 2)
        if n_split == 0:
            stopped = 'converged'
            break
        chosen = score.topk(n_split).indices
        parents = boxes[chosen]
        children = split_boxes(parents, *splitter(parents))
        t1 = time.perf_counter()
        try:
            child_bounds, child_est = evaluate(children, deadline)
        except BudgetExceeded:
            stopped = 'time'
            break
        per_box = (time.perf_counter() - t1) / max(1, work(children))
        parent = bounds[chosen].repeat_interleave(2, 0)
        child_bounds = torch.stack([
            torch.maximum(child_bounds[..., 0], parent[..., 0]),
            torch.minimum(child_bounds[..., 1], parent[..., 1]),
            torch.maximum(child_bounds[..., 2], parent[..., 2]),
            torch.minimum(child_bounds[..., 3], parent[..., 3])], -1)
        keep = torch.ones(boxes.shape[0], dtype=torch.bool, device=boxes.device)
        keep[chosen] = False
        boxes = torch.cat([boxes[keep], children])
        bounds = torch.cat([bounds[keep], child_bounds])
        est_lo = torch.minimum(est_lo, child_est.min(0).values)
        est_hi = torch.maximum(est_hi, child_est.max(0).values)
        evaluated += work(children)
        passes += 1
    return RefineResult(boxes, bounds, evaluated, passes, stopped, first_pass)

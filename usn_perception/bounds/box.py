"""The photometric parameter box Θ, the certification budget, and batched sub-boxes.

A sub-box batch is an ``(N, 4)`` float64 tensor of rows ``[a_lo, a_hi, b_lo, b_hi]``: that is
the one layout every part of the engine reads, so sub-boxes are split and bounded in batches
without Python objects per box.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PhotometricBox:
    """θ = (α, β) ∈ [α_lo, α_hi] × [β_lo, β_hi] for ``x' = clip(α·x + β, 0, 1)``.

    α is a contrast gain (must stay positive, so pixel order is kept), β a brightness offset.
    A box with lo == hi on both axes is a single θ and is allowed (degenerate certificates).
    """

    alpha: tuple[float, float]
    beta: tuple[float, float]

    def __post_init__(self) -> None:
        """Normalise to float pairs and refuse boxes that do not describe a photometric set."""
        for name in ('alpha', 'beta'):
            pair = getattr(self, name)
            try:
                lo, hi = (float(v) for v in pair)
            except (TypeError, ValueError) as exc:
                raise ValueError(f'{name} must be a (lo, hi) pair of numbers, '
                                 f'got {pair!r}') from exc
            if not (math.isfinite(lo) and math.isfinite(hi)):
                raise ValueError(f'{name} bounds must be finite, got ({lo}, {hi})')
            if lo > hi:
                raise ValueError(f'{name} lower bound {lo} exceeds upper bound {hi}')
            object.__setattr__(self, name, (lo, hi))
        if not self.alpha[0] > 0.0:
            raise ValueError(f'alpha must be positive (contrast gain), got lower bound '
                             f'{self.alpha[0]}')

    @classmethod
    def point(cls, alpha: float, beta: float) -> PhotometricBox:
        """The degenerate box holding the single θ = (alpha, beta)."""
        return cls((alpha, alpha), (beta, beta))

    @classmethod
    def coerce(cls, box: object) -> PhotometricBox:
        """Accept a PhotometricBox or ``((a_lo, a_hi), (b_lo, b_hi))``; anything else fails."""
        if isinstance(box, PhotometricBox):
            return box
        try:
            alpha, beta = box  # type: ignore[misc]
        except (TypeError, ValueError) as exc:
            raise ValueError('box must be a PhotometricBox or ((alpha_lo, alpha_hi), '
                             f'(beta_lo, beta_hi)), got {box!r}') from exc
        return cls(tuple(alpha), tuple(beta))

    @property
    def widths(self) -> tuple[float, float]:
        """(α_hi − α_lo, β_hi − β_lo)."""
        return self.alpha[1] - self.alpha[0], self.beta[1] - self.beta[0]

    @property
    def centre(self) -> tuple[float, float]:
        """Midpoint θ of the box."""
        return 0.5 * (self.alpha[0] + self.alpha[1]), 0.5 * (self.beta[0] + self.beta[1])

    @property
    def is_point(self) -> bool:
        """True when the box holds a single θ."""
        return self.widths == (0.0, 0.0)

    def contains(self, alpha: float, beta: float) -> bool:
        """Whether θ = (alpha, beta) lies in the (closed) box."""
        return (self.alpha[0] <= alpha <= self.alpha[1]
                and self.beta[0] <= beta <= self.beta[1])

    def corners(self) -> list[tuple[float, float]]:
        """The four corner θ (duplicates kept for degenerate boxes)."""
        return [(a, b) for a in self.alpha for b in self.beta]

    def scaled(self, factor: float) -> PhotometricBox:
        """The box scaled by ``factor`` about the identity θ = (1, 0) (for size sweeps)."""
        if not (math.isfinite(factor) and factor >= 0):
            raise ValueError(f'scale factor must be finite and >= 0, got {factor}')
        alpha = tuple(1.0 + factor * (a - 1.0) for a in self.alpha)
        beta = tuple(factor * b for b in self.beta)
        return PhotometricBox(alpha, beta)  # type: ignore[arg-type]

    def split(self, n_alpha: int = 2, n_beta: int = 2) -> list[PhotometricBox]:
        """A grid of ``n_alpha × n_beta`` sub-boxes whose union is exactly this box."""
        if n_alpha < 1 or n_beta < 1:
            raise ValueError('split counts must be >= 1')
        a = _edges(self.alpha, n_alpha)
        b = _edges(self.beta, n_beta)
        return [PhotometricBox((a[i], a[i + 1]), (b[j], b[j + 1]))
                for i in range(n_alpha) for j in range(n_beta)]

    def as_row(self) -> torch.Tensor:
        """The box as a ``(1, 4)`` float64 sub-box batch."""
        return torch.tensor([[*self.alpha, *self.beta]], dtype=torch.float64)

    def to_json(self) -> dict:
        """JSON form for reports and ROS messages."""
        return {'alpha': list(self.alpha), 'beta': list(self.beta)}


def _edges(pair: tuple[float, float], n: int) -> list[float]:
    lo, hi = pair
    inner = [lo + (hi - lo) * i / n for i in range(1, n)]
    return [lo, *inner, hi]  # exact end points: the union covers the box exactly


@dataclass(frozen=True)
class Budget:
    """How much work one certificate may take.

    ``max_subboxes`` counts every θ sub-box that gets bounded (the whole box or the leaves of
    its first partition, then every child), so it is proportional to the work done.
    ``max_ms`` is a wall-clock limit checked between layers: a first pass that cannot finish
    in time gives OUT_OF_BUDGET, a later pass that cannot finish is dropped and the previous
    (sound, looser) result is kept.

    ``level_work`` sizes a certificate bounded at level nodes (:mod:`.levels`) by its work
    instead: G + 3L for G network inputs (nodes) and L leaves (each a radius row and an
    offset row through the network and a readout bound), so a caller that learned what one
    unit costs (the node's pipeline) can give every clip segment its own leaf when the time
    allows it; None: L follows ``max_subboxes``.
    """

    max_subboxes: int = 1
    max_ms: float | None = None
    level_work: int | None = None

    def __post_init__(self) -> None:
        """Refuse budgets that cannot mean anything."""
        if int(self.max_subboxes) != self.max_subboxes or self.max_subboxes < 1:
            raise ValueError(f'max_subboxes must be an integer >= 1, got {self.max_subboxes}')
        object.__setattr__(self, 'max_subboxes', int(self.max_subboxes))
        if self.max_ms is not None and not (math.isfinite(self.max_ms) and self.max_ms > 0):
            raise ValueError(f'max_ms must be positive and finite or None, got {self.max_ms}')
        if self.level_work is not None:
            if int(self.level_work) != self.level_work or self.level_work < 1:
                raise ValueError(f'level_work must be an integer >= 1 or None, '
                                 f'got {self.level_work}')
            object.__setattr__(self, 'level_work', int(self.level_work))


def box_centres(boxes: torch.Tensor) -> torch.Tensor:
    """(N, 2) centre θ of a sub-box batch."""
    return torch.stack([0.5 * (boxes[:, 0] + boxes[:, 1]), 0.5 * (boxes[:, 2] + boxes[:, 3])], 1)


def split_boxes(boxes: torch.Tensor, dims: torch.Tensor,
                at: torch.Tensor | None = None) -> torch.Tensor:
    """Split each sub-box along ``dims`` (0 = α, 1 = β); children of box i are 2i, 2i + 1.

    The cut is the midpoint, or ``at`` where that is finite and strictly inside. Both children
    use the same computed cut, so their union is exactly the parent.
    """
    lo_col = 2 * dims
    hi_col = lo_col + 1
    rows = torch.arange(boxes.shape[0], device=boxes.device)
    lo, hi = boxes[rows, lo_col], boxes[rows, hi_col]
    mid = 0.5 * (lo + hi)
    if at is not None:
        mid = torch.where(torch.isfinite(at) & (at > lo) & (at < hi), at, mid)
    first = boxes.clone()
    second = boxes.clone()
    first[rows, hi_col] = mid
    second[rows, lo_col] = mid
    return torch.stack([first, second], 1).reshape(-1, 4)

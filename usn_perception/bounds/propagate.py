"""Forward-mode linear bounds in θ (and IBP) through a compiled network, batched over sub-boxes.

State per neuron and sub-box: a centre form C and a radius form R; the neuron z(θ) satisfies
``C(θ) − R(θ) ≤ z(θ) ≤ C(θ) + R(θ)`` for every θ in the sub-box. A linear layer maps
(C, R) to (W·C + b, |W|·R): algebraically the same as W⁺L + W⁻U for the lower bound and
W⁺U + W⁻L for the upper, but it needs two layer calls per layer instead of four. With the
*parallel* ReLU relaxation the radius never depends on θ (one channel of forms instead of three),
which is what makes the default mode cheap; the *adaptive* mode (CROWN's λ ∈ {0, 1}) carries a
full radius form. IBP is the same walk with constant forms and the exact interval ReLU.
"""

from __future__ import annotations

import time

import torch

from usn_perception.bounds.forms import box_view, collapse_generators, form_range, lower, upper
from usn_perception.bounds.layers import AffineOp, CompiledNetwork, LinearOp

RELU_MODES = ('parallel', 'adaptive', 'interval')


class BudgetExceeded(Exception):
    """The wall-clock deadline passed while a batch was being bounded."""


def _linear(op: LinearOp, centre: torch.Tensor, radius: torch.Tensor) -> tuple:
    n, k = centre.shape[:2]
    c = op.apply(centre.flatten(0, 1))
    c = c.view(n, k, *c.shape[1:])
    if op.bias is not None:
        c[:, 0] += op.bias
    kr = radius.shape[1]
    r = (op.apply if op.nonneg else op.apply_abs)(radius.flatten(0, 1))
    return c, r.view(n, kr, *r.shape[1:])


def _affine(op: AffineOp, centre: torch.Tensor, radius: torch.Tensor) -> tuple:
    c = centre * op.scale
    c[:, 0] += op.shift
    return c, radius * op.scale.abs()


def _relu_interval(centre: torch.Tensor, radius: torch.Tensor) -> tuple:
    lo = torch.relu(centre - radius)
    hi = torch.relu(centre + radius)
    return 0.5 * (lo + hi), 0.5 * (hi - lo)


def _parallel_relu(centre: torch.Tensor, radius: torch.Tensor,
                   boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The parallel relaxation for a constant radius, in as few passes over memory as it takes.

    With lo⁻ = min(lo, 0) and up⁺ = max(up, 0) the slope s = up⁺ / (up⁺ − lo⁻) is the chord
    slope on unstable neurons, exactly 1 on active and 0 on inactive ones, and the offset
    −s·lo⁻/2 vanishes off the unstable ones: one formula, no masks. (A neuron pinned to 0 on
    the whole sub-box, lo = up = 0, gets s = 0: the exact output 0.)
    """
    ac, ar, bc, br = box_view(boxes, centre.ndim - 1)
    mid = centre[:, 0] + centre[:, 1] * ac
    mid += centre[:, 2] * bc
    span = centre[:, 1].abs() * ar
    span += centre[:, 2].abs() * br
    if centre.shape[1] > 3:
        span += centre[:, 3:].abs().sum(1)
    span += radius[:, 0]
    lo_neg = (mid - span).clamp_(max=0.0)
    up_pos = (mid + span).clamp_(min=0.0)
    n_unstable = ((lo_neg < 0) & (up_pos > 0)).flatten(1).sum(1)
    s = up_pos / (up_pos - lo_neg).clamp_(min=torch.finfo(up_pos.dtype).tiny)
    offset = (s * lo_neg).mul_(-0.5)
    c = centre * s[:, None]
    c[:, 0] += offset
    r = radius * s[:, None]
    r[:, 0] += offset
    return c, r, n_unstable


def relu_forms(centre: torch.Tensor, radius: torch.Tensor, boxes: torch.Tensor,
               mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Relax ReLU on each sub-box from the concrete pre-activation range [lo, up]."""
    if mode == 'parallel' and radius.shape[1] == 1 and centre.shape[1] >= 3:
        return _parallel_relu(centre, radius, boxes)
    if radius.shape[1] == 1:
        cmin, cmax = form_range(centre, boxes)
        lo, up = cmin - radius[:, 0], cmax + radius[:, 0]
    else:
        lo = form_range(lower(centre, radius), boxes)[0]
        up = form_range(upper(centre, radius), boxes)[1]
    unstable = (lo < 0) & (up > 0)
    active = lo >= 0
    gap = torch.where(unstable, up - lo, torch.ones_like(up))
    # Chord slope up / (up − lo) on unstable neurons, 1 on active ones, 0 on inactive ones.
    s = torch.where(unstable, up / gap, active.to(up.dtype))
    n_unstable = unstable.flatten(1).sum(1)
    if mode == 'parallel':
        # Upper s·(U − lo) (chord), lower s·L (parallel): the radius stays what it was.
        offset = torch.where(unstable, -0.5 * s * lo, torch.zeros_like(lo))
        c = centre * s[:, None]
        c[:, 0] += offset
        r = radius * s[:, None]
        r[:, 0] += offset
        return c, r, n_unstable
    # Adaptive: upper s·(U − lo), lower λ·L with λ = 1 when up >= −lo else 0 (CROWN's choice).
    # Its radius becomes a θ-form, which has no room for generators: fold them in first.
    centre, radius = collapse_generators(centre, radius)
    lam = torch.where(unstable, (up >= -lo).to(up.dtype), s)
    hi_form = upper(centre, radius) * s[:, None]
    hi_form[:, 0] -= torch.where(unstable, s * lo, torch.zeros_like(lo))
    lo_form = lower(centre, radius) * lam[:, None]
    return 0.5 * (hi_form + lo_form), 0.5 * (hi_form - lo_form), n_unstable


def propagate(net: CompiledNetwork, centre: torch.Tensor, radius: torch.Tensor,
              boxes: torch.Tensor, *, relu: str = 'parallel', deadline: float | None = None,
              start: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Push (centre, radius) forms through ``net``; returns output forms and unstable counts.

    ``deadline`` is a ``time.perf_counter()`` value checked before every op; passing it raises
    :class:`BudgetExceeded` so a late batch is abandoned instead of overrunning the frame.
    ``start`` skips the first ops: the forms given are already the output of ``ops[:start]``.
    """
    if relu not in RELU_MODES:
        raise ValueError(f'relu must be one of {RELU_MODES}, got {relu!r}')
    unstable = torch.zeros(boxes.shape[0], dtype=torch.long, device=boxes.device)
    for op in net.ops[start:]:
        if deadline is not None and time.perf_counter() > deadline:
            raise BudgetExceeded
        if isinstance(op, LinearOp):
            centre, radius = _linear(op, centre, radius)
        elif isinstance(op, AffineOp):
            centre, radius = _affine(op, centre, radius)
        elif relu == 'interval':
            unstable += ((centre - radius < 0) & (centre + radius > 0)).flatten(1).sum(1)
            centre, radius = _relu_interval(centre, radius)
        else:
            centre, radius, n = relu_forms(centre, radius, boxes, relu)
            unstable += n
    return centre, radius, unstable

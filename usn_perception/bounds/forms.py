"""Affine forms in θ and their exact extremes over sub-boxes.

A *form* tensor has shape ``(N, k, *shape)`` for ``N`` sub-boxes: with ``k = 3`` its slices are
``c0, cα, cβ`` of ``c0 + cα·α + cβ·β``; with ``k = 1`` it is a constant (``c0`` only). With
``k > 3`` the extra slices are *generators*: coefficients of independent symbols ε_g ∈ [−1, 1]
(one per clipped input value, see :mod:`usn_perception.bounds.inputs`), so the form stands
for the set ``c0 + cα·α + cβ·β + Σ_g c_g·ε_g``. Linear layers move generators with their
signed weights, which keeps the cancellations that a radius (moved by |W|) loses. The
engine keeps a neuron as a centre form C and a radius form R, meaning the lower and upper
affine bounds ``C − R`` and ``C + R`` (see :mod:`usn_perception.bounds.propagate`).
"""

from __future__ import annotations

import torch


def box_view(boxes: torch.Tensor, ndim: int) -> tuple[torch.Tensor, ...]:
    """Centre and half-width of α and β, shaped to broadcast against an (N, *shape) tensor."""
    view = (-1,) + (1,) * (ndim - 1)
    ac = (0.5 * (boxes[:, 0] + boxes[:, 1])).view(view)
    ar = (0.5 * (boxes[:, 1] - boxes[:, 0])).view(view)
    bc = (0.5 * (boxes[:, 2] + boxes[:, 3])).view(view)
    br = (0.5 * (boxes[:, 3] - boxes[:, 2])).view(view)
    return ac, ar, bc, br


def form_range(form: torch.Tensor, boxes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact (min, max) of each affine form over its sub-box: ``(N, *shape)`` each.

    An affine function on a box attains its extremes at corners; with the box written as
    centre ± half-width this is ``value(centre) ∓ (|cα|·rα + |cβ|·rβ)``.
    """
    if form.shape[1] == 1:
        c = form[:, 0]
        return c, c
    ac, ar, bc, br = box_view(boxes, form.ndim - 1)
    mid = form[:, 0] + form[:, 1] * ac + form[:, 2] * bc
    rad = form[:, 1].abs() * ar + form[:, 2].abs() * br
    if form.shape[1] > 3:
        rad = rad + form[:, 3:].abs().sum(1)
    return mid - rad, mid + rad


def collapse_generators(centre: torch.Tensor,
                        radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold generators into the radius: (C, R) with C of k = 3 (for θ-only consumers)."""
    if centre.shape[1] <= 3:
        return centre, radius
    extra = centre[:, 3:].abs().sum(1)
    radius = radius.clone()
    radius[:, 0] += extra
    return centre[:, :3].contiguous(), radius


def form_min(form: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Exact minimum of each form over its sub-box."""
    return form_range(form, boxes)[0]


def form_max(form: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Exact maximum of each form over its sub-box."""
    return form_range(form, boxes)[1]


def form_at(form: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Value of each form at one θ per sub-box (``theta`` is (N, 2))."""
    if form.shape[1] == 1:
        return form[:, 0]
    view = (-1,) + (1,) * (form.ndim - 2)
    return form[:, 0] + form[:, 1] * theta[:, 0].view(view) + form[:, 2] * theta[:, 1].view(view)


def corner_columns(boxes: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The box columns whose pairs are the distinct corners of every box (α's, then β's).

    Both ends of an axis, or one where every box is flat along it (a one-threshold level
    leaf, a point θ): its two ends there are one corner.
    """
    a_cols = (0,) if bool((boxes[:, 0] == boxes[:, 1]).all()) else (0, 1)
    b_cols = (2,) if bool((boxes[:, 2] == boxes[:, 3]).all()) else (2, 3)
    return a_cols, b_cols


def form_corners(form: torch.Tensor, boxes: torch.Tensor,
                 columns: tuple[tuple[int, ...], tuple[int, ...]] | None = None) -> torch.Tensor:
    """Values at the distinct corners of each sub-box: ``(N, C, *shape)``.

    C = 4, or fewer where every box is flat along an axis (:func:`corner_columns`; a maximum
    or a test over the corners is the same). ``columns``: take these corners instead (another
    box's, e.g. the box that ``boxes`` is the absolute value of).
    """
    a_cols, b_cols = corner_columns(boxes) if columns is None else columns
    out = []
    for a_col in a_cols:
        for b_col in b_cols:
            theta = torch.stack([boxes[:, a_col], boxes[:, b_col]], 1)
            out.append(form_at(form, theta))
    return torch.stack(out, 1)


def offset(centre: torch.Tensor, radius: torch.Tensor, sign: float) -> torch.Tensor:
    """The form ``centre + sign·radius``; a constant radius (k = 1) only moves ``c0``.

    (Plain broadcasting would add a constant radius to the θ-coefficients too.)
    """
    if radius.shape[1] == centre.shape[1]:
        return centre + sign * radius
    out = centre.clone()
    out[:, 0] += sign * radius[:, 0]
    return out


def lower(centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Lower affine bound C − R."""
    return offset(centre, radius, -1.0)


def upper(centre: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Upper affine bound C + R."""
    return offset(centre, radius, 1.0)

"""Backward bounds at the readout window (usn_perception.bounds.backward).

Their soundness between the level nodes is checked where the level pass is
(``test_levels.py``: the dense between-node check with the window on). Here: the adjoint on
crops is the network's own linear map, for every layer kind of the detector, at the borders
too, and the bound covers the rows' band exactly as a linear map must.
"""

from __future__ import annotations

import pytest
import torch

from usn_perception.bounds.backward import (
    BACKWARD_RELUS,
    BackwardTape,
    _adjoints,
    _alignment,
    start_index,
    window_bands,
    window_functionals,
)
from usn_perception.bounds.layers import AffineOp, LinearOp, apply_point, compile_network
from usn_perception.network import DetectorConfig, build_network

WIDTHS = (4, 6, 6, 8, 8, 8, 8, 6, 6)


def _network(seed: int):
    torch.manual_seed(seed)
    config = DetectorConfig(input_size=(64, 48), widths=WIDTHS, keypoint_names=('a', 'b', 'c'),
                            first_relu=False)
    net = build_network(config).double().eval()
    with torch.no_grad():  # ScaleNorm in eval mode: give the scales some spread and sign
        for m in net.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(-1.5, 1.5)
                m.running_var.uniform_(0.5, 2.0)
    return compile_network(net, (1, 48, 64))


def _linear_tape(net, start: int, mid: torch.Tensor | None, rad: torch.Tensor) -> BackwardTape:
    """A tape whose later ReLUs are all on and nothing rounds: the backward is W's chain."""
    tape = BackwardTape(start=(mid, rad))
    x = torch.zeros_like(rad[:1])
    for op in net.ops[start + 1:]:
        if isinstance(op, (LinearOp, AffineOp)):
            size = tuple(x.shape[-2:])
            x = apply_point(op, x.double()).float()
            tape.steps.append(('linear' if isinstance(op, LinearOp) else 'affine', op,
                               torch.zeros_like(x[:1]), size))
        else:
            tape.steps.append(('relu', torch.ones_like(x[:1]), None, None))
    return tape


def _linear_map(net, start: int, x: torch.Tensor) -> torch.Tensor:
    """The ops after ``start`` with every ReLU replaced by the identity (no bias here)."""
    for op in net.ops[start + 1:]:
        if isinstance(op, (LinearOp, AffineOp)):
            x = apply_point(op, x)
    return x


def _cells(k: int, height: int, width: int) -> list[list[tuple[int, int]]]:
    """Windows at a corner, an edge and inside: crops reach past the layers' borders."""
    centres = [(0, 0), (height - 1, width // 2), (height // 2, width - 2)][:k]
    return [[(v, u) for v in range(max(0, cv - 3), min(height, cv + 4))
             for u in range(max(0, cu - 3), min(width, cu + 4))] for cv, cu in centres]


def _setting(net, start: int) -> tuple:
    """The start band's shape, the (K, H, W) heatmap, three windows' cells, their indices."""
    x = torch.zeros(1, 1, 48, 64, dtype=torch.float64)
    for op in net.ops[:start + 1]:
        x = apply_point(op, x)
    k, height, width = 3, 24, 32
    cells = _cells(k, height, width)
    index = torch.tensor([kk * height * width + v * width + u
                          for kk, c in enumerate(cells) for v, u in c])
    return x.shape, (k, height, width), cells, index


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_the_adjoint_on_crops_is_the_networks_linear_map(seed):
    net = _network(seed)
    start = start_index(net)
    assert _adjoints(net, start) is not None
    assert _alignment(_adjoints(net, start)) == 4  # two transposed convolutions, stride 2
    relus = [i for i, op in enumerate(net.ops) if not isinstance(op, (LinearOp, AffineOp))]
    assert sum(i > start for i in relus) == BACKWARD_RELUS
    shape, (k, height, width), cells, index = _setting(net, start)
    # Centre: Σ_j Λ_ij·mid_j is the linear map of mid.
    mid = torch.randn(shape, dtype=torch.float64)
    tape = _linear_tape(net, start, mid.float(), torch.zeros(shape))
    out_index, lo, hi = window_bands(net, tape, (k, height, width), cells)
    assert torch.equal(out_index, index)
    want = _linear_map(net, start, mid.float().double()).flatten()[index]
    centre = (lo[0] + hi[0]) / 2
    torch.testing.assert_close(centre, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # Spread: Σ_j |Λ_ij| for a unit band on every neuron, from the Jacobian's rows.
    tape = _linear_tape(net, start, None, torch.ones(shape))
    _, lo, hi = window_bands(net, tape, (k, height, width), cells)
    probe = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    out = _linear_map(net, start, probe).flatten()
    rows = torch.stack([torch.autograd.grad(out[i], probe, retain_graph=True)[0].abs().sum()
                        for i in index.tolist()])
    half = (hi[0] - lo[0]) / 2
    assert bool((half >= rows * (1 - 1e-6)).all())  # rounded outward
    # The rounding terms (the |W|-chain of a keypoint's 49 cells together, times ~1e-4) stay
    # a fraction of the bound even on a band as wide as this one, on every neuron: per cell
    # they are a cell's share of its whole window's chain (a functional over the window, what
    # the level pass asks for, pays its chain once).
    assert bool((half <= 3.0 * rows).all()), float((half / rows).max())
    assert float((half / rows).median()) < 1.4


@pytest.mark.parametrize('seed', [0, 1])
def test_functionals_are_the_weighted_sums_of_the_cells(seed):
    # One cotangent per functional: its centre is the weighted sum of the cells' linear maps,
    # its spread the absolute row sum of the weighted Jacobian (less than the cells' own
    # spreads weighted, where signs cancel), rounding included.
    net = _network(seed)
    start = start_index(net)
    shape, (k, height, width), cells, index = _setting(net, start)
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.randint(-3, 4, (3, len(c)), generator=gen).float() for c in cells]
    for w in weights:
        w[0] = w[0].masked_fill(w[0] == 0, 1.0)  # every cell read (zero columns are padding)
    # Padded to one cell count: the padding's zero weights are never read.
    n = max(len(c) for c in cells)
    flat = torch.zeros(k, n, dtype=torch.long)
    padded = torch.zeros(k, 3, n)
    for kk, (c, w) in enumerate(zip(cells, weights, strict=True)):
        flat[kk, :len(c)] = torch.tensor([v * width + u for v, u in c])
        padded[kk, :, :len(c)] = w
    mid = torch.randn(shape, dtype=torch.float64)
    tape = _linear_tape(net, start, mid.float(), torch.zeros(shape))
    lo, hi = window_functionals(net, tape, (k, height, width), flat, padded)
    assert lo.shape == (1, k, 3)
    lo, hi = lo.flatten(1), hi.flatten(1)
    per_cell = _linear_map(net, start, mid.float().double()).flatten()[index]
    want = torch.cat([w.double() @ part for w, part in
                      zip(weights, per_cell.split([len(c) for c in cells]), strict=True)])
    torch.testing.assert_close((lo[0] + hi[0]) / 2, want, rtol=1e-4,
                               atol=1e-4 * float(want.abs().max()))
    tape = _linear_tape(net, start, None, torch.ones(shape))
    lo, hi = (t.flatten(1) for t in window_functionals(net, tape, (k, height, width), flat,
                                                       padded))
    _, c_lo, c_hi = window_bands(net, tape, (k, height, width), cells)
    probe = torch.zeros(shape, dtype=torch.float64, requires_grad=True)
    out = _linear_map(net, start, probe).flatten()[index].split([len(c) for c in cells])
    rows = torch.stack([torch.autograd.grad((w[f].double() * part).sum(), probe,
                                            retain_graph=True)[0].abs().sum()
                        for w, part in zip(weights, out, strict=True) for f in range(3)])
    half = (hi[0] - lo[0]) / 2
    assert bool((half >= rows * (1 - 1e-6)).all())
    assert bool((half <= 1.25 * rows * 3).all())  # the rounding scaled by the largest weight
    # Never more than the cells' own spreads, weighted (the triangle inequality).
    cell_half = ((c_hi[0] - c_lo[0]) / 2).split([len(c) for c in cells])
    bound = torch.cat([w.abs().double() @ h for w, h in zip(weights, cell_half, strict=True)])
    assert bool((half <= bound * (1 + 1e-6)).all())
    assert float((half / bound).min()) < 0.9

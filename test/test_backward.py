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
    window_cells,
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
            tape.steps.append(('relu', torch.ones_like(x[:1]), torch.zeros(3, 0, dtype=torch.long),
                               None, torch.zeros(rad.shape[0], 0)))
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


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_the_adjoint_on_crops_is_the_networks_linear_map(seed):
    net = _network(seed)
    start = start_index(net)
    assert _adjoints(net, start) is not None
    assert _alignment(_adjoints(net, start)) == 4  # two transposed convolutions, stride 2
    relus = [i for i, op in enumerate(net.ops) if not isinstance(op, (LinearOp, AffineOp))]
    assert sum(i > start for i in relus) == BACKWARD_RELUS
    x = torch.zeros(1, 1, 48, 64, dtype=torch.float64)
    for op in net.ops[:start + 1]:
        x = apply_point(op, x)
    shape = x.shape
    k, height, width = 3, 24, 32
    cells = _cells(k, height, width)
    index = torch.tensor([kk * height * width + v * width + u
                          for kk, c in enumerate(cells) for v, u in c])
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
    # The rounding terms (the |W|-chain of a keypoint's cells together, times ~1e-4) add
    # little even on a band as wide as this one.
    assert bool((half <= 1.25 * rows).all()), float((half / rows).max())
    assert float((half / rows).median()) < 1.1


def test_window_cells_keep_the_peak_and_the_cells_that_may_be_positive():
    ref = torch.full((2, 10, 12), -1.0)
    ref[0, 5, 6] = 3.0
    ref[1, 0, 0] = 2.0
    upper = ref.clone()
    upper[0, 4, 6] = 0.5  # may be positive
    upper[0, 9, 9] = 1.0  # outside the window
    cells = window_cells(ref, 3, upper)
    assert cells[0] == [(4, 6), (5, 6)]
    assert cells[1] == [(0, 0)]
    everything = window_cells(ref, 1)
    assert len(everything[0]) == 9 and len(everything[1]) == 4

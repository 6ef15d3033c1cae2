"""Bound propagation over the photometric parameters θ = (α, β), in plain torch.

Modules, one job each: :mod:`box` (the θ box, budgets, sub-box batches), :mod:`forms`
(affine forms in θ and their exact extremes), :mod:`inputs` (image → bounds of the network
input), :mod:`layers` (network → supported ops, or a clear refusal), :mod:`propagate`
(forward-mode linear bounds and IBP), :mod:`spec` (heatmap bounds → readout bounds),
:mod:`split` (adaptive θ splitting), :mod:`thresholds` (clip-threshold coordinates for
homogeneous networks), :mod:`prefix` (the exact first linear stage in those coordinates),
:mod:`rounding` (the same propagation with its θ-dependent part in float32, every rounding
error bounded), :mod:`attack` (the empirical falsifier),
:mod:`diagnostics` (per-layer bound growth and unstable ReLUs).
"""

from usn_perception.bounds.attack import EmpiricalRange, empirical_range
from usn_perception.bounds.box import Budget, PhotometricBox
from usn_perception.bounds.diagnostics import LayerBound, layer_bounds
from usn_perception.bounds.inputs import ImageEncoding
from usn_perception.bounds.layers import SUPPORTED_LAYERS, CompiledNetwork, compile_network
from usn_perception.bounds.propagate import RELU_MODES, BudgetExceeded, propagate
from usn_perception.bounds.rounding import PRECISIONS, propagate_float32, resolve_precision

__all__ = [
    'Budget', 'BudgetExceeded', 'CompiledNetwork', 'EmpiricalRange', 'ImageEncoding',
    'LayerBound', 'PhotometricBox', 'RELU_MODES', 'SUPPORTED_LAYERS', 'compile_network',
    'empirical_range', 'layer_bounds', 'propagate', 'PRECISIONS', 'propagate_float32',
    'resolve_precision',
]

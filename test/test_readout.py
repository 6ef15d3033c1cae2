"""Readouts: heatmaps → keypoint coordinates in heatmap cells."""

from __future__ import annotations

import pytest
import torch

from usn_perception.readout import LOCAL_RADIUS, centroid, local_centroid, read_keypoints

F64 = torch.float64


def _peak(h: int, w: int, u: float, v: float, floor: float = -0.1) -> torch.Tensor:
    gv, gu = torch.meshgrid(torch.arange(h, dtype=F64), torch.arange(w, dtype=F64),
                            indexing='ij')
    return (1 + floor) * torch.exp(-((gu - u) ** 2 + (gv - v) ** 2) / 2) + floor


def test_local_centroid_matches_centroid_on_a_clean_peak():
    heat = _peak(24, 32, 10.3, 7.6)[None, None]
    torch.testing.assert_close(local_centroid(heat), centroid(heat), rtol=0, atol=1e-12)
    torch.testing.assert_close(local_centroid(heat), torch.tensor([[[10.3, 7.6]]], dtype=F64),
                               rtol=0, atol=0.05)


def test_local_centroid_ignores_positive_cells_outside_its_window():
    heat = _peak(24, 32, 10.0, 7.0)
    heat[20, 30] = 0.5  # a far spurious blob, below the peak
    loc = local_centroid(heat[None, None])[0, 0]
    glob = centroid(heat[None, None])[0, 0]
    torch.testing.assert_close(loc, torch.tensor([10.0, 7.0], dtype=F64), rtol=0, atol=1e-9)
    assert float(glob[0]) > 11.0  # the global centroid is pulled towards the blob


def test_local_centroid_window_is_clipped_at_the_border_and_falls_back_to_argmax():
    heat = _peak(10, 12, 0.0, 0.0, floor=-0.3)
    uv = local_centroid(heat[None, None])[0, 0]
    assert 0.0 <= float(uv[0]) < LOCAL_RADIUS and 0.0 <= float(uv[1]) < LOCAL_RADIUS
    negative = -torch.ones(1, 1, 10, 12, dtype=F64)
    negative[0, 0, 4, 9] = -0.5  # all ≤ 0: the argmax cell itself
    assert local_centroid(negative)[0, 0].tolist() == [9.0, 4.0]


def test_read_keypoints_dispatches_local_centroid_and_batches():
    heat = torch.stack([_peak(12, 16, 3.0, 4.0), _peak(12, 16, 12.0, 8.0)])[None]
    out = read_keypoints(heat, 'local-centroid')
    assert out.shape == (1, 2, 2)
    torch.testing.assert_close(out[0], torch.tensor([[3.0, 4.0], [12.0, 8.0]], dtype=F64),
                               rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match='local-centroid'):
        read_keypoints(heat, 'nearest')

"""Pictures: the debug drawing shared by the node, the demo and the reports."""

from __future__ import annotations

import numpy as np

from usn_perception.visualize import GREEN, RED, draw_certificate


def test_draw_certificate_colours_boxes_by_status_and_prints_the_box():
    frame = np.full((60, 80, 3), 128, np.uint8)
    frame[..., 0] = 200  # RGB in: red channel bright
    kps = np.array([[20.0, 40.0], [60.0, 40.0]])
    boxes = np.array([[15.0, 25.0, 35.0, 45.0], [55.0, 65.0, 35.0, 45.0]])
    canvas = draw_certificate(frame, kps, boxes, [True, False], (0.95, 1.05), (-0.03, 0.03),
                              mode='measured')

    assert canvas.shape == (60, 80, 3) and canvas.dtype == np.uint8

    def has(colour, region):  # some pixel of the region is (nearly) that colour
        return bool((np.abs(region.astype(int) - colour).max(-1) < 30).any())

    assert has(GREEN, canvas[44:47, 15:26]) and not has(RED, canvas[44:47, 15:26])
    assert has(RED, canvas[44:47, 55:66]) and not has(GREEN, canvas[44:47, 55:66])
    assert tuple(canvas[55, 5]) == (128, 128, 200)  # untouched pixel, now BGR
    assert (canvas[:20] != canvas[25]).any()  # the text band


def test_draw_certificate_scales_gray_frames():
    canvas = draw_certificate(np.zeros((10, 12), np.uint8), np.array([[5.0, 5.0]]),
                              np.array([[np.nan] * 4]), [False], (1, 1), (0, 0), scale=2)
    assert canvas.shape == (20, 24, 3)

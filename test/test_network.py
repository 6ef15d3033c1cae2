"""The detector network: the homogeneous architecture's invariances hold by construction."""

from __future__ import annotations

import pytest
import torch

from usn_perception.network import (
    DetectorConfig,
    ScaleNorm2d,
    ZeroMeanConv2d,
    apply_constraints,
    build_network,
    recalibrate_norms,
)
from usn_perception.readout import centroid

CONFIG = DetectorConfig(input_size=(32, 24), widths=(6,) * 9, keypoint_names=('a', 'b'))


def _trained_like(seed: int) -> torch.nn.Sequential:
    """Random weights, a few training-mode steps so the norms hold real statistics."""
    torch.manual_seed(seed)
    net = build_network(CONFIG)
    recalibrate_norms(net, torch.rand(16, 1, 24, 32))
    return net.double().eval()


def test_homogeneous_network_scales_with_contrast_and_ignores_brightness():
    for seed in (0, 1, 2):
        net = _trained_like(seed)
        apply_constraints(net)  # float64 zero mean
        x = torch.rand(2, 1, 24, 32, dtype=torch.float64) * 0.5 + 0.25
        for a, b in [(0.8, -0.1), (1.2, 0.1), (0.9, 0.2)]:
            y = a * x + b  # stays inside [0, 1]: no clipping
            assert 0 <= float(y.min()) and float(y.max()) <= 1
            torch.testing.assert_close(net(y), a * net(x), rtol=1e-9, atol=1e-12)
            torch.testing.assert_close(centroid(net(y)), centroid(net(x)))


def test_a_linear_first_stage_drops_only_the_first_relu_and_stays_homogeneous(tmp_path):
    from usn_perception.model_io import load_model, save_model

    config = DetectorConfig(input_size=(32, 24), widths=(6,) * 9, keypoint_names=('a', 'b'),
                            first_relu=False)
    net = build_network(config)
    relus = [i for i, m in enumerate(net) if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 8 and len(build_network(CONFIG)) == len(net) + 1  # 9 layers, one less
    assert not isinstance(net[3], torch.nn.ReLU) and isinstance(net[3], torch.nn.Conv2d)
    recalibrate_norms(net, torch.rand(16, 1, 24, 32))
    net = net.double().eval()
    apply_constraints(net)
    x = torch.rand(2, 1, 24, 32, dtype=torch.float64) * 0.5 + 0.25
    torch.testing.assert_close(net(1.2 * x - 0.1), 1.2 * net(x), rtol=1e-9, atol=1e-12)
    # The flag survives the JSON sidecar; files without it have the ReLU.
    assert DetectorConfig.from_json(config.to_json()) == config
    old = {k: v for k, v in config.to_json().items() if k != 'first_relu'}
    assert DetectorConfig.from_json(old).first_relu is True
    assert config.with_widths((5,) * 9).first_relu is False
    path = save_model(net.float(), config, tmp_path / 'model.json')
    loaded, back, _ = load_model(path)
    assert back == config and len(loaded) == len(net)
    with pytest.raises(ValueError, match='first_relu'):
        DetectorConfig(first_relu='no')


def test_constraints_survive_training_steps_and_eval_mode_is_a_plain_batchnorm():
    torch.manual_seed(0)
    net = build_network(CONFIG)
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.rand(4, 1, 24, 32)).pow(2).mean().backward()
        opt.step()
        apply_constraints(net)
    first = next(m for m in net.modules() if isinstance(m, ZeroMeanConv2d))
    assert first.padding_mode == 'replicate'
    assert float(first.weight.detach().sum((1, 2, 3)).abs().max()) < 1e-6
    for m in net.modules():
        if isinstance(m, ScaleNorm2d):
            assert not m.bias.requires_grad and float(m.bias.abs().max()) == 0.0
            assert float(m.running_mean.abs().max()) == 0.0
    net.eval()
    plain = torch.nn.BatchNorm2d(6).eval()
    norm = next(m for m in net.modules() if isinstance(m, ScaleNorm2d))
    plain.load_state_dict(norm.state_dict())
    x = torch.randn(2, 6, 5, 5)
    torch.testing.assert_close(norm(x), plain(x))
    assert net[-1].bias is None  # the head has no bias either


def test_recalibration_makes_eval_match_the_data_statistics():
    torch.manual_seed(0)
    net = build_network(CONFIG).eval()
    images = torch.rand(32, 1, 24, 32)
    recalibrate_norms(net, images, batch=32)
    assert not net.training  # the mode is restored
    norm = next(m for m in net.modules() if isinstance(m, ScaleNorm2d))
    assert norm.momentum == 0.1  # restored
    first = net[:2]  # normalisation + first conv: the first norm's input
    with torch.no_grad():
        ms = first(images).pow(2).mean((0, 2, 3))
    torch.testing.assert_close(norm.running_var, ms, rtol=1e-5, atol=1e-7)


def _abs_copy(net: torch.nn.Sequential) -> torch.nn.Sequential:
    """|net|: absolute weights, zero shifts, replicate padding (the gain's definition)."""
    import copy

    out = copy.deepcopy(net).eval()
    with torch.no_grad():
        for m in out.modules():
            if isinstance(m, (torch.nn.Conv2d, torch.nn.ConvTranspose2d)):
                m.weight.abs_()
                if isinstance(m, torch.nn.Conv2d) and m.padding != (0, 0):
                    m.padding_mode = 'replicate'
            elif isinstance(m, torch.nn.BatchNorm2d):
                m.weight.abs_()
                m.bias.zero_()
                m.running_mean.zero_()
    return out


def test_radius_gain_is_the_abs_network_on_ones_and_cannot_be_faked():
    from usn_perception.network import forward_with_gain

    net = _trained_like(0)
    x = torch.rand(3, 1, 24, 32, dtype=torch.float64)
    heatmaps, gain = forward_with_gain(net, x)
    torch.testing.assert_close(heatmaps, net(x))  # the forward pass is untouched
    ones = torch.ones(1, 1, 24, 32, dtype=torch.float64)
    torch.testing.assert_close(gain, _abs_copy(net)(ones).mean())
    # In training mode the batch's own scale is used: scaling a conv's weights changes the
    # activations and their normalisation together, so the gain stays put.
    torch.manual_seed(1)
    train_net = build_network(CONFIG).double().train()
    x = torch.rand(8, 1, 24, 32, dtype=torch.float64)
    g1 = forward_with_gain(train_net, x)[1]
    with torch.no_grad():
        train_net[4].weight.mul_(10.0)  # the second conv
    g2 = forward_with_gain(train_net, x)[1]
    torch.testing.assert_close(g1, g2, rtol=1e-6, atol=0)

"""Pruning: physical removal equals masking, L_W pulls only the selected gates, files load."""

from __future__ import annotations

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from usn_perception.detector import load_detector
from usn_perception.errors import UnsupportedLayerError
from usn_perception.model_io import load_model
from usn_perception.network import (
    DetectorConfig,
    build_network,
    count_macs,
    count_parameters,
    layer_widths,
    prunable_layers,
)
from usn_perception.preprocess import PixelMapping
from usn_perception.prune import (
    PruneOptions,
    channel_gates,
    channel_importance,
    plan_selection,
    prune_channels,
    prune_network,
    save_pruned,
    wasserstein_gate_loss,
    wasserstein_step,
    zero_channels,
)
from usn_perception.train import TensorSet

TINY = DetectorConfig(input_size=(32, 24), widths=(8,) * 9)


PLAIN = replace(TINY, arch='plain', readout='soft-argmax', norm_mean=0.5)


def _net(seed: int = 0, config: DetectorConfig = TINY) -> nn.Sequential:
    """A tiny net with non-trivial norm statistics (so masking is not a no-op).

    The homogeneous architecture keeps its shifts at 0 (pruning re-imposes that).
    """
    torch.manual_seed(seed)
    net = build_network(config)
    with torch.no_grad():
        for _, _, bn in prunable_layers(net):
            if config.arch == 'plain':
                bn.running_mean.uniform_(-0.2, 0.2)
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.uniform_(0.5, 1.5)
            if config.arch == 'plain':
                bn.bias.uniform_(-0.3, 0.3)
    return net.eval()


def _data(n: int = 16, seed: int = 0) -> TensorSet:
    """Blob images with the blob centre as every keypoint's target (learnable, tiny)."""
    gen = torch.Generator().manual_seed(seed)
    h, w = 24, 32
    centres = torch.rand(n, 2, generator=gen) * torch.tensor([w - 8.0, h - 8.0]) + 4
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing='ij')
    d2 = (xx - centres[:, 0, None, None]) ** 2 + (yy - centres[:, 1, None, None]) ** 2
    images = (0.2 + 0.6 * torch.exp(-d2 / 8.0))[:, None].float()
    k = TINY.num_keypoints
    mapping = PixelMapping.for_image((w, h), TINY.heatmap_size)
    kps = np.repeat(centres.double().numpy()[:, None], k, axis=1)
    targets = torch.from_numpy(np.stack([mapping.to_heatmap(p) for p in kps])).float()
    return TensorSet(images, targets, torch.ones(n, k, dtype=torch.bool), kps, [mapping] * n)


@pytest.mark.parametrize('config', [TINY, PLAIN], ids=['homogeneous', 'plain'])
def test_pruned_net_is_smaller_and_equals_the_masked_original(config):
    net = _net(config=config)
    selection = plan_selection(channel_importance(net, 'random', seed=3), config.widths, 0.5)
    pruned = prune_channels(copy.deepcopy(net), selection)
    masked = zero_channels(copy.deepcopy(net), selection)
    assert layer_widths(pruned) == (4,) * 9
    assert count_parameters(pruned) < 0.4 * count_parameters(net)
    assert count_macs(pruned, config.input_size) < 0.4 * count_macs(net, config.input_size)
    x = torch.rand(3, 1, 24, 32)
    with torch.no_grad():
        assert not torch.allclose(net(x), masked(x))  # the removed channels did carry signal
        torch.testing.assert_close(pruned(x), masked(x), rtol=1e-5, atol=1e-5)
        assert pruned(x).shape == net(x).shape  # K heatmaps kept


def test_selection_per_layer_global_and_progressive():
    imp = [np.arange(8.0)[::-1].copy() for _ in range(9)]  # channel 7 least important
    sel = plan_selection(imp, (8,) * 9, 0.25)
    assert all(list(s) == [6, 7] for s in sel)
    # Round 2 of a progressive run: 2 already gone, target 50% → 2 more.
    assert all(len(s) == 2 for s in plan_selection([v[:6] for v in imp], (8,) * 9, 0.5))
    per_layer = plan_selection(imp, (8,) * 9, tuple([0.5] + [0.0] * 8))
    assert [len(s) for s in per_layer] == [4] + [0] * 8
    low = [np.full(8, 1.0) for _ in range(9)]
    low[0] = np.full(8, 0.01)  # globally, layer 0 goes first but keeps min_channels
    glob = plan_selection(low, (8,) * 9, 0.1, 'global', min_channels=3)
    assert len(glob[0]) == 5 and sum(len(s) for s in glob) == round(0.1 * 72)


def test_wasserstein_gradient_moves_only_the_selected_gates_to_zero():
    net = _net(config=PLAIN)  # with a trainable shift, which the gate also counts
    selection = [np.array([0, 3])] + [np.array([], np.int64)] * 8
    bn = prunable_layers(net)[0][2]
    with torch.no_grad():
        bn.bias[[0, 3]] = 0.2  # a positive shift also leaks signal: it is pulled too
    loss = wasserstein_gate_loss(net, selection)
    loss.backward()
    grad_w, grad_b = bn.weight.grad, bn.bias.grad
    others = [j for j in range(8) if j not in (0, 3)]
    assert (grad_w[[0, 3]] * bn.weight.detach()[[0, 3]] > 0).all()  # descent shrinks |γ|
    assert (grad_b[[0, 3]] > 0).all()
    assert torch.all(grad_w[others] == 0) and torch.all(grad_b[others] == 0)
    for _, _, other in prunable_layers(net)[1:]:
        assert other.weight.grad is None or torch.all(other.weight.grad == 0)
    before = channel_gates(bn).detach().clone()
    optim = torch.optim.SGD([p for _, _, b in prunable_layers(net) for p in b.parameters()],
                            lr=0.05)
    for _ in range(200):
        optim.zero_grad()
        wasserstein_gate_loss(net, selection).backward()
        optim.step()
    after = channel_gates(bn).detach()
    assert after[[0, 3]].max() < 0.05 * before[[0, 3]].min()
    torch.testing.assert_close(after[others], before[others])


def test_decoupled_wasserstein_steps_silence_the_selection_in_one_over_lambda():
    net = _net()
    selection = [np.array([1]), np.array([], np.int64)] + [np.array([2, 5])] * 7
    before = [channel_gates(bn).detach().clone() for _, _, bn in prunable_layers(net)]
    first = wasserstein_step(net, selection, 0.25)
    for _ in range(7):  # 4 steps of η = 1/4 reach 0 for a typical gate; 8 for any
        wasserstein_step(net, selection, 0.25)
    assert first > 0 and wasserstein_gate_loss(net, selection).item() == 0.0
    for idxs, b, (_, _, bn) in zip(selection, before, prunable_layers(net), strict=True):
        after = channel_gates(bn).detach()
        assert torch.all(after[idxs] == 0)
        keep = np.setdiff1d(np.arange(8), idxs)
        torch.testing.assert_close(after[keep], b[keep], rtol=0, atol=0)


def test_prune_network_saves_a_loadable_smaller_model(tmp_path):
    data = _data()
    opts = PruneOptions(ratio=0.5, criterion='usn', rounds=2, wasserstein=1.0, epochs=2,
                        batch_size=8, score_images=8, score_samples=3, seed=1)
    result = prune_network(_net(), TINY, data, opts)
    assert result.config.widths == (4,) * 9 == layer_widths(result.net)
    assert [h['round'] for h in result.history] == [1, 2]
    assert result.history[0]['gate_mass_after'] < result.history[0]['gate_mass_before']
    path = save_pruned(result, tmp_path / 'p', source={'sha256': 'abc'})
    net, config, doc = load_model(path)
    assert config.widths == (4,) * 9
    meta = doc['metadata']['pruning']
    assert meta['criterion'] == 'usn' and meta['rounds'] == 2 and len(meta['history']) == 2
    x = data.images[:2].double()
    det = load_detector(path)
    with torch.no_grad():
        torch.testing.assert_close(det.net(x), result.net.double()(x), rtol=1e-5, atol=1e-5)
    again = prune_network(_net(), TINY, data, opts)  # deterministic for a seed
    torch.testing.assert_close(again.net(x.float()), result.net.float()(x.float()))


def test_pruned_model_certifies_soundly(tmp_path):
    certify = pytest.importorskip('usn_perception.certify')
    data = _data(8)
    opts = PruneOptions(ratio=0.5, criterion='l1', rounds=1, epochs=1, batch_size=8)
    det = load_detector(save_pruned(prune_network(_net(), TINY, data, opts), tmp_path / 'p'))
    image = (data.images[0, 0].numpy() * 255).round().astype(np.uint8)
    box = certify.PhotometricBox(alpha=(0.9, 1.1), beta=(-0.05, 0.05))
    cert = certify.certify_keypoints(det, image, box, budget=certify.Budget(max_subboxes=8))
    assert np.isfinite(cert.boxes).all()
    x = image.astype(np.float64) / 255.0
    for a in np.linspace(0.9, 1.1, 6):
        for b in np.linspace(-0.05, 0.05, 6):
            assert cert.contains(det.predict(np.clip(a * x + b, 0.0, 1.0))).all(), (a, b)


def test_clear_errors():
    for bad in (1.0, -0.1, float('nan'), 1.5):
        with pytest.raises(ValueError, match='ratio'):
            PruneOptions(ratio=bad)
    with pytest.raises(ValueError, match='criterion'):
        PruneOptions(criterion='magic')
    with pytest.raises(ValueError, match='rounds'):
        PruneOptions(rounds=0)
    imp = [np.ones(8) for _ in range(9)]
    with pytest.raises(ValueError, match='min_channels'):
        plan_selection(imp, (8,) * 9, 0.95)
    with pytest.raises(ValueError, match='per-layer'):
        plan_selection(imp, (8,) * 9, (0.5, 0.5))
    empty = TensorSet(torch.zeros(0, 1, 24, 32), torch.zeros(0, 5, 2),
                      torch.zeros(0, 5, dtype=torch.bool), np.zeros((0, 5, 2)), [])
    with pytest.raises(ValueError, match='empty'):
        prune_network(_net(), TINY, empty, PruneOptions(criterion='random'))
    net = _net()
    bad = nn.Sequential(*list(net)[:4], nn.MaxPool2d(1), *list(net)[4:])
    with pytest.raises(UnsupportedLayerError, match='MaxPool2d'):
        prune_channels(bad, [np.array([0])] * 9)
    with pytest.raises(ValueError, match='every channel'):
        prune_channels(net, [np.arange(8)] + [np.array([], np.int64)] * 8)
    with pytest.raises(ValueError, match='USN scores'):
        channel_importance(net, 'usn')


@pytest.fixture(scope='module')
def cli_files(tmp_path_factory):
    """A 12-image dataset and a tiny saved model whose keypoints match it."""
    from usn_perception.data.coco import load_coco
    from usn_perception.data.synthetic import make_dataset
    from usn_perception.model_io import save_model

    root = tmp_path_factory.mktemp('cli')
    paths = make_dataset(root / 'ds', 12, seed=2, size=(64, 64), progress=False)
    names = tuple(load_coco(paths['train']).keypoint_names)
    config = DetectorConfig(input_size=(32, 24), widths=(8,) * 9, keypoint_names=names)
    save_model(_net(), config, root / 'm' / 'model.json')
    return root


def test_cli_score_prune_and_compare(cli_files, tmp_path, capsys):
    from usn_perception.cli import main

    ds, model = str(cli_files / 'ds'), str(cli_files / 'm')
    assert main(['score', '--model', model, '--data', ds, '--score-images', '4',
                 '--score-samples', '3', '--out', str(tmp_path / 's.json')]) == 0
    assert (tmp_path / 's.json').is_file() and (tmp_path / 's.png').is_file()
    assert main(['prune', '--model', model, '--data', ds, '--ratio', '0.5', '--rounds', '2',
                 '--wasserstein', '0.5', '--epochs', '1', '--batch-size', '4',
                 '--score-images', '4', '--score-samples', '3',
                 '--out', str(tmp_path / 'p')]) == 0
    assert load_detector(tmp_path / 'p').config.widths == (4,) * 9
    assert main(['prune-compare', '--model', model, '--data', ds, '--ratios', '0.5',
                 '--seeds', '0', '--methods', 'unpruned,random,usn-progressive',
                 '--rounds', '2', '--epochs', '1', '--batch-size', '4', '--score-images', '4',
                 '--score-samples', '3', '--cert-images', '1', '--budget', '1',
                 '--out', str(tmp_path / 'cmp')]) == 0
    table = (tmp_path / 'cmp' / 'table.md').read_text()
    assert all(m in table for m in ('unpruned', 'random', 'usn-progressive'))
    assert (tmp_path / 'cmp' / 'tradeoff.png').is_file()
    capsys.readouterr()
    assert main(['prune', '--model', model, '--data', ds, '--ratio', '1.2',
                 '--out', str(tmp_path / 'bad')]) == 1
    assert 'ratio must be in [0, 1)' in capsys.readouterr().err


def test_fine_tuning_with_gain_weight_lowers_the_radius_gain():
    """Certified training also applies while a pruned network recovers."""
    from usn_perception.network import forward_with_gain
    from usn_perception.prune import _Schedule, fine_tune

    data = _data(16)
    gains = []
    for weight in (0.0, 5.0):
        net = _net()
        opts = PruneOptions(criterion='random', gain_weight=weight, lr=3e-3, batch_size=8)
        fine_tune(net, data, 30, options=opts, schedule=_Schedule(opts.lr, 30),
                  gen=torch.Generator().manual_seed(0), readout=TINY.readout)
        with torch.no_grad():
            gains.append(float(forward_with_gain(net.eval(), data.images[:2])[1]))
    assert gains[1] < 0.5 * gains[0]

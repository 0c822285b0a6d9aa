import pytest
import torch
from torch import nn
from torch.nn.utils import prune

from galore_opt.analysis.sparsity import ActivationSparsity, activation_sparsity, weight_sparsity


def test_weight_sparsity_counts_zeros_per_layer():
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Conv2d(2, 3, 2))
    with torch.no_grad():
        model[0].weight[:2] = 0  # 8 of 20
    mask = torch.ones(3, 2, 2, 2)
    mask[0] = 0  # 8 of 24
    out = weight_sparsity(model, {"2": mask})
    assert out["0"] == pytest.approx(8 / 20)
    assert out["2"] == pytest.approx(8 / 24)
    assert out["overall"] == pytest.approx(16 / 44)
    prune.l1_unstructured(model[2], "weight", amount=12)
    assert weight_sparsity(model)["2"] == pytest.approx(12 / 24)


def test_relu_activation_sparsity_exact_and_hooks_removable():
    model = nn.Sequential(nn.Linear(4, 4, bias=False), nn.ReLU(), nn.Linear(4, 4, bias=False), nn.ReLU())
    with torch.no_grad():
        model[0].weight.copy_(torch.eye(4))
        model[2].weight.copy_(-torch.eye(4))
    x = torch.tensor([[1.0, -1.0, 2.0, -3.0], [1.0, 1.0, 1.0, -1.0]])
    probe = ActivationSparsity(model)
    model(x)
    out = probe.compute()
    # first ReLU zeroes the negatives: 3 of 8; second sees -relu(x): zero wherever relu(x) >= 0: all 8
    assert out["1"] == pytest.approx(3 / 8)
    assert out["3"] == pytest.approx(1.0)
    assert out["overall"] == pytest.approx(11 / 16)
    model(x[:1])  # accumulates: first ReLU 3 + 2 zeros of 12
    assert probe.compute()["1"] == pytest.approx(5 / 12)
    probe.reset()
    assert all(c == 0 for c in probe.counts.values())
    probe.remove()
    assert all(len(m._forward_hooks) == 0 for m in model)
    model(x)
    assert all(c == 0 for c in probe.counts.values())


def test_one_shot_threshold_and_named_modules():
    model = nn.Sequential(nn.Linear(3, 3), nn.SiLU())
    x = torch.randn(10, 3)
    out = activation_sparsity(model, x, modules=["0"], threshold=1e9)
    assert out["0"] == 1.0
    assert len(model[0]._forward_hooks) == 0
    with pytest.raises(ValueError, match="-0.5"):
        ActivationSparsity(model, threshold=-0.5)
    with pytest.raises(ValueError, match="nope"):
        ActivationSparsity(model, modules=["nope"])


def test_activation_sparsity_sums_several_forwards_between_computes():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    x = torch.randn(6, 4)
    with torch.no_grad():
        zeros = int((model(x) == 0).sum())
    probe = ActivationSparsity(model)
    for _ in range(5):
        model(x)
    assert probe.compute()["1"] == pytest.approx(zeros / 24)
    assert probe.zeros["1"] == 5 * zeros and probe.counts["1"] == 5 * 24
    probe.remove()

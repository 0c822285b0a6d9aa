"""Bias-induced sparsity: the closed-form kernel H_B against independent formulas, the active fraction
at initialization against P(N(0,1) >= B), and the wide-network NTK against H_B."""

import math

import pytest
import torch
from scipy.stats import multivariate_normal
from torch import nn

from galore_opt.analysis.bias_sparsity import (
    BiasSparseMLP,
    active_probability,
    bias_ntk_limit,
    first_layer_ntk,
    orthant_probability,
    relu_activity,
)
from galore_opt.analysis.ntk import empirical_ntk

DT = torch.float64


def unit_inputs(n, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g, dtype=DT), dim=1)


def test_active_probability_values():
    got = active_probability(torch.tensor([0.0, 1.0, 2.0, 3.0]))
    torch.testing.assert_close(got, torch.tensor([0.5, 0.158655, 0.0227501, 0.0013499], dtype=DT), atol=1e-6, rtol=0)


@pytest.mark.parametrize("bias", [0.0, 0.5, 1.0, 2.0, 3.0, -1.0])
def test_orthant_probability_against_scipy(bias):
    rhos = torch.tensor([-0.99, -0.7, -0.2, 0.0, 0.3, 0.8, 0.95, 0.999], dtype=DT)
    got = orthant_probability(rhos, bias)
    for r, p in zip(rhos.tolist(), got.tolist()):
        # P(Z1 >= B, Z2 >= B) = P(-Z1 <= -B, -Z2 <= -B), and (-Z1, -Z2) has the same correlation
        ref = multivariate_normal(mean=[0, 0], cov=[[1, r], [r, 1]]).cdf([-bias, -bias])
        assert p == pytest.approx(ref, abs=2e-7), (bias, r)
    # the endpoints: rho = 1 gives Phi(-B); rho = -1 gives P(B <= Z <= -B)
    ends = orthant_probability(torch.tensor([1.0, -1.0], dtype=DT), bias)
    tail = float(active_probability(bias))
    assert float(ends[0]) == pytest.approx(tail, abs=1e-10)
    assert float(ends[1]) == pytest.approx(max(0.0, 2 * tail - 1), abs=1e-10)


def test_h0_is_the_arc_cosine_formula():
    x = unit_inputs(20, 5)
    rho = (x @ x.T).clamp(-1, 1)
    ref = (rho + 1) * (math.pi - torch.arccos(rho)) / (2 * math.pi)
    torch.testing.assert_close(bias_ntk_limit(x, bias=0.0), ref, atol=1e-12, rtol=0)
    torch.testing.assert_close(bias_ntk_limit(x, bias=0.0, train_bias=False), rho * ref / (rho + 1), atol=1e-12, rtol=0)


@pytest.mark.parametrize("bias", [0.0, 1.0, 2.0])
def test_active_fraction_at_init_matches_gaussian_tail(bias):
    net = BiasSparseMLP(16, 20000, bias, generator=torch.Generator().manual_seed(3), dtype=DT)
    stats = relu_activity(net, unit_inputs(64, 16, seed=4))
    assert abs(stats["active_fraction"] - float(active_probability(bias))) < 0.01
    assert stats["per_layer"] == {"act": stats["active_fraction"]}
    assert not net.act._forward_hooks  # the probe's hooks are gone


@pytest.mark.parametrize(("bias", "width", "tol"), [(0.0, 20000, 0.05), (1.0, 20000, 0.05), (2.0, 50000, 0.06)])
def test_wide_first_layer_ntk_approaches_h_b(bias, width, tol):
    # measured relative Frobenius errors (seed 1, d=10, 32 inputs): B=0: 0.009, B=1: 0.020 at
    # m=20000; B=2: 0.055 at m=20000, 0.032 at m=50000 (only ~2% of the units are active).
    x = unit_inputs(32, 10)
    net = BiasSparseMLP(10, width, bias, generator=torch.Generator().manual_seed(1), dtype=DT)
    theta = first_layer_ntk(net, x)
    h = bias_ntk_limit(x, bias=bias)
    assert float((theta - h).norm() / h.norm()) < tol


def test_first_layer_ntk_is_the_finite_width_formula():
    # exact at any width: (1/m) sum_r 1[w_r.x > B] 1[w_r.x' > B] (x.x' + 1)
    x = unit_inputs(6, 4)
    net = BiasSparseMLP(4, 50, 0.7, generator=torch.Generator().manual_seed(0), dtype=DT)
    act = (x @ net.hidden.weight.T + net.hidden.bias > 0).to(DT)
    ref = (act @ act.T) * (x @ x.T + 1) / 50
    torch.testing.assert_close(first_layer_ntk(net, x, chunk_size=4), ref, atol=1e-12, rtol=0)
    frozen = BiasSparseMLP(4, 50, 0.7, train_bias=False, generator=torch.Generator().manual_seed(0), dtype=DT)
    torch.testing.assert_close(first_layer_ntk(frozen, x), (act @ act.T) * (x @ x.T) / 50, atol=1e-12, rtol=0)
    # the readout as a buffer: the full NTK of the module equals the first-layer one
    torch.testing.assert_close(empirical_ntk(net, x), ref, atol=1e-12, rtol=0)


def test_activation_sparsity_on_hand_built_network():
    net = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 2), nn.ReLU()).to(DT)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
        net[2].bias.zero_()
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=DT)
    s = relu_activity(net, x)
    # layer 1: (1,2,-3) -> [1,1,0], (-1,.5,.5) -> [0,1,1]; layer 2: (1,2,0) -> (3,-1): [1,0],
    # (0,.5,.5) -> (.5,0): [1,0]
    assert s["per_layer"] == {"1": pytest.approx(4 / 6), "3": pytest.approx(2 / 4)}
    assert s["active_fraction"] == pytest.approx(6 / 10)
    assert s["dead_fraction"] == pytest.approx(1 / 5)  # unit 2 of layer 2
    assert s["max_sample_active_fraction"] == pytest.approx(3 / 5)


def test_validation():
    with pytest.raises(ValueError, match="width must be a positive int, got 0"):
        BiasSparseMLP(3, 0)
    with pytest.raises(ValueError, match="nan"):
        BiasSparseMLP(3, 4, float("nan"))
    with pytest.raises(ValueError, match="n_nodes.*4"):
        orthant_probability(torch.zeros(1), 1.0, n_nodes=4)
    with pytest.raises(ValueError, match="no nn.ReLU"):
        relu_activity(nn.Linear(2, 2), torch.zeros(1, 2))

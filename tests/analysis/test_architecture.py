"""Architecture metrics: curvature of linearly mapped circles (closed form), NNGP kernel from the
features, linear regions of 1-D-input networks against exact breakpoints."""

import math

import pytest
import torch
from torch import nn

from galore_opt.analysis.architecture import (
    activation_patterns,
    architecture_metrics,
    circle_basis,
    count_linear_regions,
    extrinsic_curvature,
    nngp_kernel,
    nngp_min_eigenvalue,
)

DT = torch.float64


def linear_map(d_in, a, b, d_out=5, seed=0):
    """f(x) = A x with A e1 = a u1, A e2 = b u2 (u1, u2 orthonormal in R^d_out), A e_k = 0 else."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(d_out, 2, generator=g, dtype=DT))
    lin = nn.Linear(d_in, d_out, bias=True).to(DT)
    with torch.no_grad():
        lin.weight.zero_()
        lin.weight[:, 0] = a * u[:, 0]
        lin.weight[:, 1] = b * u[:, 1]
        lin.bias.normal_()  # a translation does not change curvature
    return lin


def test_curvature_of_a_linearly_mapped_circle_is_one_over_radius():
    x0, x1 = torch.zeros(4, dtype=DT), torch.zeros(4, dtype=DT)
    x0[0], x1[1] = 1.0, 1.0
    r = 2.5
    out = extrinsic_curvature(linear_map(4, r, r), x0, x1, n_angles=64)
    torch.testing.assert_close(torch.tensor(out["curvature"], dtype=DT), torch.full((64,), 1 / r, dtype=DT))
    assert out["total_curvature"] == pytest.approx(64 / r, rel=1e-10)
    assert out["length"] == pytest.approx(2 * math.pi * r, rel=1e-10)
    assert out["length_weighted_curvature"] == pytest.approx(2 * math.pi, rel=1e-10)


def test_curvature_of_an_ellipse_matches_closed_form():
    x0, x1 = torch.zeros(3, dtype=DT), torch.zeros(3, dtype=DT)
    x0[0], x1[1] = 1.0, 1.0
    a, b = 3.0, 0.5
    out = extrinsic_curvature(linear_map(3, a, b), x0, x1, n_angles=128)
    t = torch.arange(128, dtype=DT) * 2 * math.pi / 128
    ref = a * b / (a**2 * torch.sin(t) ** 2 + b**2 * torch.cos(t) ** 2) ** 1.5
    torch.testing.assert_close(torch.tensor(out["curvature"], dtype=DT), ref, atol=1e-10, rtol=1e-10)
    # the total curvature of a closed convex curve is 2 pi (a Riemann sum of a smooth periodic function)
    assert out["length_weighted_curvature"] == pytest.approx(2 * math.pi, rel=1e-8)


def test_curvature_of_rotated_circle_through_tanh_net_is_finite_and_scalar_output_rejected():
    net = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 4)).to(DT)
    x0, x1 = circle_basis(6, 2.0, generator=torch.Generator().manual_seed(1), dtype=DT)
    assert float(x0 @ x1) == pytest.approx(0, abs=1e-12) and float(x0.norm()) == pytest.approx(2.0)
    out = extrinsic_curvature(net, x0, x1, n_angles=32)
    assert len(out["curvature"]) == 32 and all(math.isfinite(k) and k >= 0 for k in out["curvature"])
    with pytest.raises(ValueError, match="1 component"):
        extrinsic_curvature(nn.Linear(6, 1).to(DT), x0, x1)
    with pytest.raises(ValueError, match="n_angles.*2"):
        extrinsic_curvature(net, x0, x1, n_angles=2)


def test_nngp_kernel_is_feature_gram_matrix():
    net = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 9), nn.Tanh(), nn.Linear(9, 3)).to(DT)
    x = torch.randn(7, 5, dtype=DT)
    with torch.no_grad():
        f, f1 = net[:4](x), net[:2](x)
    torch.testing.assert_close(nngp_kernel(net, x), f @ f.T, atol=1e-12, rtol=0)
    assert nngp_min_eigenvalue(net, x) == pytest.approx(float(torch.linalg.eigvalsh(f @ f.T)[0]), abs=1e-10)
    torch.testing.assert_close(nngp_kernel(net, x, readout=net[2]), f1 @ f1.T, atol=1e-12, rtol=0)
    assert not net[4]._forward_pre_hooks


def exact_breakpoints(net, lo, hi):
    """Breakpoints in (lo, hi) of a 1-D-input ReLU MLP (Sequential of Linear/ReLU), layer by layer:
    between consecutive known breakpoints every earlier layer is linear, so each pre-activation of
    the next layer is linear there and its zero is found exactly."""
    linears = [m for m in net if isinstance(m, nn.Linear)]
    pts = [lo, hi]
    for depth in range(len(linears) - 1):
        upto = net[: 2 * depth + 1]  # ends with the Linear whose pre-activations are examined
        new = []
        for s, e in zip(pts[:-1], pts[1:]):
            zs = upto(torch.tensor([[s]], dtype=DT))[0]
            ze = upto(torch.tensor([[e]], dtype=DT))[0]
            cross = (zs * ze) < 0
            for k in torch.nonzero(cross).flatten().tolist():
                new.append(s + (e - s) * float(zs[k] / (zs[k] - ze[k])))
        pts = sorted(set(pts + new))
    return pts[1:-1]


@pytest.mark.parametrize("hidden", [[12], [8, 8, 6]])
def test_linear_regions_on_1d_input_against_exact_breakpoints(hidden):
    torch.manual_seed(3)
    layers, fan_in = [], 1
    for h in hidden:
        layers += [nn.Linear(fan_in, h), nn.ReLU()]
        fan_in = h
    net = nn.Sequential(*layers, nn.Linear(fan_in, 1)).to(DT)
    lo, hi = -3.0, 3.0
    bps = exact_breakpoints(net, lo, hi)
    if len(hidden) == 1:
        w, b = net[0].weight[:, 0], net[0].bias
        direct = sorted(x for x in (-b / w).tolist() if lo < x < hi)
        assert bps == pytest.approx(direct, abs=1e-12)
    # one input inside every region: exactly len(bps) + 1 regions
    edges = [lo, *bps, hi]
    mids = torch.tensor([(s + e) / 2 for s, e in zip(edges[:-1], edges[1:])], dtype=DT)[:, None]
    assert count_linear_regions(net, mids) == len(bps) + 1
    # a dense grid finer than the smallest gap finds the same count
    grid = torch.linspace(lo, hi, 200001, dtype=DT)[:, None]
    assert min(e - s for s, e in zip(edges[:-1], edges[1:])) > 2 * (hi - lo) / 200000
    assert count_linear_regions(net, grid) == len(bps) + 1
    assert activation_patterns(net, mids).shape == (len(mids), sum(hidden))


def test_architecture_metrics_keys_and_consistency():
    net = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(DT)
    x = torch.randn(10, 4, dtype=DT)
    m = architecture_metrics(net, x, n_angles=16)
    assert set(m) == {
        "total_curvature",
        "nngp_lambda_min",
        "ntk_lambda_min",
        "ntk_lambda_max",
        "ntk_condition_number",
        "ntk_trace",
        "linear_regions",
    }
    assert m["ntk_condition_number"] == pytest.approx(m["ntk_lambda_max"] / m["ntk_lambda_min"])
    assert m["nngp_lambda_min"] == pytest.approx(nngp_min_eigenvalue(net, x))
    assert 1 <= m["linear_regions"] <= 10

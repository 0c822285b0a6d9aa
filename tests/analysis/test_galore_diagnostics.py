import math

import pytest
import torch
from torch import nn

from galore_opt import GaLoreAdamW
from galore_opt import config as C
from galore_opt.analysis.galore_diagnostics import (
    GaLoreDiagnostics,
    basis_drift,
    optimal_energy,
    principal_angles,
    unwrap_optimizer,
)


@pytest.mark.parametrize("shape,side", [((6, 20), C.BASIS_LEFT), ((20, 6), C.BASIS_RIGHT)])
def test_captured_energy_equals_hand_formula_and_refreshes_are_counted(shape, side):
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=False)
    opt = GaLoreAdamW([{"params": [lin.weight], "rank": 2, "update_proj_gap": 5}], lr=1e-2)
    diag = GaLoreDiagnostics(opt, model=lin)
    x = torch.randn(32, shape[1])
    for step in range(20):
        opt.zero_grad()
        lin(x + 0.1 * step).square().mean().backward()
        opt.step()
        entry = diag.observe()["weight"]
        p = opt.state[lin.weight][side].double()
        g = lin.weight.grad.double()
        low = p.t() @ g if side == C.BASIS_LEFT else g @ p.t()
        assert entry["captured_energy"] == pytest.approx(float(low.square().sum() / g.square().sum()), rel=1e-5)
        assert entry["refreshed"] == float(step in (0, 5, 10, 15))  # cold start, then every 5 steps
    track = diag.tracks["weight"]
    assert track.refreshes == 4 and len(track.drift) == 3 and len(track.between) == 16
    s = diag.summary()["weight"]
    assert 0 <= s["drift"] <= 1 and s["energy_at_refresh"] <= s["optimal_energy"] + 1e-6


def test_drift_and_principal_angles_closed_form():
    e = torch.eye(5)
    old = e[:, :2]
    assert basis_drift(old, old) == pytest.approx(0.0, abs=1e-12)
    q = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    assert basis_drift(old, old @ q) == pytest.approx(0.0, abs=1e-6)  # same span, rotated (fp32 q)
    assert basis_drift(old, e[:, 2:4]) == pytest.approx(1.0)
    theta = 0.3
    new = torch.stack([math.cos(theta) * e[:, 0] + math.sin(theta) * e[:, 2], e[:, 1]], 1)
    assert basis_drift(old, new) == pytest.approx(math.sin(theta) ** 2 / 2)
    assert principal_angles(old, new).tolist() == pytest.approx([0.0, theta], abs=1e-7)
    assert basis_drift(old.t(), new.t(), C.RIGHT) == pytest.approx(math.sin(theta) ** 2 / 2)
    with pytest.raises(ValueError, match="'up'"):
        basis_drift(old, new, "up")


def test_optimal_energy():
    g = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
    assert optimal_energy(g, 1) == pytest.approx(9 / 14)
    assert optimal_energy(g, 2) == pytest.approx(13 / 14)


class _FakeOptimizer:
    """A GaLore-shaped optimizer whose basis the test sets by hand."""

    def __init__(self, p, basis):
        self.param_groups = [{"params": [p], "rank": basis.shape[1]}]
        self.state = {p: {C.BASIS_LEFT: basis, C.STEP: torch.tensor(1.0)}}


def _observe(diag, opt, p, grad, basis=None):
    if basis is not None:
        opt.state[p][C.BASIS_LEFT] = basis
    p.grad = grad
    return diag.observe()


def test_suggestions_trigger_on_constructed_cases():
    e = torch.eye(8)
    p = nn.Parameter(torch.zeros(8, 8))
    # low energy: a flat-spectrum gradient with a rank-1 basis
    opt = _FakeOptimizer(p, e[:, :1])
    diag = GaLoreDiagnostics(opt)
    _observe(diag, opt, p, torch.eye(8))
    assert any("larger rank" in s for s in diag.suggestions())
    # stale basis: the gradient moves out of the basis between refreshes; then an orthogonal refresh
    opt = _FakeOptimizer(p, e[:, :2])
    diag = GaLoreDiagnostics(opt)
    g_in = torch.outer(e[0], e[1]) + torch.outer(e[1], e[2])
    g_out = torch.outer(e[5], e[1]) + torch.outer(e[6], e[2])
    _observe(diag, opt, p, g_in)
    for _ in range(4):
        _observe(diag, opt, p, g_out)
    text = " ".join(diag.suggestions())
    assert "smaller update_proj_gap" in text and "stale" in text
    _observe(diag, opt, p, g_out, basis=e[:, 5:7])
    assert diag.tracks["param0"].drift == [pytest.approx(1.0)]
    assert any("nearly orthogonal" in s for s in diag.suggestions())
    # stable subspace, energy 1: longer gap, smaller rank
    opt = _FakeOptimizer(p, e[:, :2])
    diag = GaLoreDiagnostics(opt)
    q = torch.tensor([[0.6, -0.8], [0.8, 0.6]])
    for k in range(3):
        _observe(diag, opt, p, g_in, basis=e[:, :2] @ torch.linalg.matrix_power(q, k) if k else None)
        _observe(diag, opt, p, g_in)
    text = " ".join(diag.suggestions())
    assert diag.tracks["param0"].refreshes == 3
    assert "larger update_proj_gap" in text and "smaller rank" in text
    # refresh method shortfall: the basis at refresh misses the top direction
    opt = _FakeOptimizer(p, e[:, 1:2])
    diag = GaLoreDiagnostics(opt)
    _observe(diag, opt, p, torch.diag(torch.tensor([3.0, 2.0, 0, 0, 0, 0, 0, 0])))
    assert any("lags the exact SVD" in s for s in diag.suggestions())


def test_attach_hook_and_unwrap():
    lin = nn.Linear(10, 4, bias=False)
    opt = GaLoreAdamW([{"params": [lin.weight], "rank": 2, "update_proj_gap": 3}], lr=1e-2)

    class Wrapper:
        optimizer = opt

    assert unwrap_optimizer(Wrapper()) is opt
    diag = GaLoreDiagnostics(Wrapper()).attach()
    for _ in range(4):
        opt.zero_grad()
        lin(torch.randn(8, 10)).sum().backward()
        opt.step()
    assert diag.steps_observed == 4 and diag.tracks["param0"].refreshes == 2
    diag.detach()
    opt.step()
    assert diag.steps_observed == 4
    with pytest.raises(ValueError, match="1.5"):
        GaLoreDiagnostics(opt, low_energy=1.5)

"""GaLoreAdamW as a user meets it: schedules, robustness, shapes, the torch.optim protocol."""

import pytest
import torch
from torch import nn

import galore_opt.optim.base as base
from galore_opt import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from galore_opt import config as C


def _record_refreshes(monkeypatch):
    calls = []
    real = base.compute_basis

    def recording(grad, rank, side, method, **kwargs):
        calls.append((grad.data_ptr(), method, kwargs["prev_left"] is None and kwargs["prev_right"] is None))
        return real(grad, rank, side, method, **kwargs)

    monkeypatch.setattr(base, "compute_basis", recording)
    return calls


def _mats(n, shape=(12, 20)):
    return [nn.Parameter(torch.randn(shape)) for _ in range(n)]


def _step_with_random_grads(opt, params, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape)
        opt.step()


def test_refresh_schedule_galore_torch_numerics_is_every_gap_for_all(monkeypatch):
    params = _mats(4)
    opt = GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 5}], numerics="galore_torch")
    per_step = []
    calls = _record_refreshes(monkeypatch)
    for _ in range(16):
        before = len(calls)
        _step_with_random_grads(opt, params, 1)
        per_step.append(len(calls) - before)
    assert per_step == [4, 0, 0, 0, 0, 4, 0, 0, 0, 0, 4, 0, 0, 0, 0, 4]


def test_refresh_schedule_is_staggered_by_default(monkeypatch):
    params = _mats(4)
    opt = GaLoreAdamW([{"params": params, "rank": 3, "update_proj_gap": 8}])
    calls = _record_refreshes(monkeypatch)
    per_step = []
    for _ in range(26):
        before = len(calls)
        _step_with_random_grads(opt, params, 1)
        per_step.append(len(calls) - before)
    # step 0: every matrix gets its first (cold) basis; afterwards offsets 0, 2, 4, 6 spread the
    # refreshes: never more than one matrix per step.
    assert per_step[0] == 4
    assert max(per_step[1:]) == 1
    assert [i for i, n in enumerate(per_step) if n] == [0, 8, 10, 12, 14, 16, 18, 20, 22, 24]
    offsets = [int(opt.state[p].get(C.REFRESH_OFFSET, torch.tensor(0))) for p in params]
    assert offsets == [0, 2, 4, 6]
    # the cold start uses the randomized range finder, later refreshes the warm power method
    assert [(m, cold) for _, m, cold in calls[:4]] == [("power", True)] * 4
    assert all(not cold for _, _, cold in calls[4:])


def test_nan_gradient_does_not_poison_the_basis():
    w = nn.Parameter(torch.randn(10, 16))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2}], lr=1e-3)
    _step_with_random_grads(opt, [w], 2)
    basis = opt.state[w][C.BASIS_LEFT].clone()
    w.grad = torch.randn(10, 16)
    w.grad[0, 0] = float("nan")
    w.grad[1, 1] = float("inf")
    opt.step()  # step index 2: a refresh is due, the gradient is not finite -> basis kept
    assert torch.equal(opt.state[w][C.BASIS_LEFT], basis)
    # cold start on a non-finite gradient: finite basis from the finite entries
    v = nn.Parameter(torch.randn(10, 16))
    opt2 = GaLoreAdamW([{"params": [v], "rank": 3}])
    v.grad = torch.full((10, 16), float("nan"))
    v.grad[:, :4] = torch.randn(10, 4)
    opt2.step()
    assert torch.isfinite(opt2.state[v][C.BASIS_LEFT]).all()


def test_conv_weight_is_projected_as_a_matrix():
    conv = nn.Conv2d(4, 16, kernel_size=3)
    opt = GaLoreAdamW([{"params": [conv.weight], "rank": 4}, {"params": [conv.bias]}], lr=1e-2)
    x = torch.randn(2, 4, 8, 8)
    before = conv.weight.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        conv(x).square().mean().backward()
        opt.step()
    state = opt.state[conv.weight]
    # the (16, 36) matrix; std projects the smaller side: left basis (16, 4), moments (4, 36)
    assert state[C.BASIS_LEFT].shape == (16, 4) and state[C.EXP_AVG].shape == (4, 36)
    assert not torch.equal(before, conv.weight)


def test_closure_scheduler_and_params_without_grad():
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    frozen = nn.Parameter(torch.randn(4, 4))
    groups = galore_param_groups(model, rank=2, update_proj_gap=3)
    groups.append({"params": [frozen]})
    opt = GaLoreAdamW(groups, lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0 / (1 + step))
    x, y = torch.randn(32, 8), torch.randn(32, 4)

    def closure():
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    losses = [opt.step(closure).item() for _ in range(30)]
    for _ in range(3):
        sched.step()
    assert losses[-1] < losses[0]
    assert frozen not in opt.state  # no gradient, no state
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 4)


def test_galore_trains_a_model_comparably_to_adamw():
    torch.manual_seed(0)
    x = torch.randn(256, 32)
    teacher = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
    y = teacher(x).detach()

    def fit(make_opt):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))
        opt = make_opt(model)
        for _ in range(300):
            opt.zero_grad()
            loss = nn.functional.mse_loss(model(x), y)
            loss.backward()
            opt.step()
        return float(loss.detach())

    with torch.no_grad():
        start = float(nn.functional.mse_loss(nn.Sequential(nn.Linear(32, 64), nn.Tanh(), nn.Linear(64, 8))(x), y))
    adamw = fit(lambda m: torch.optim.AdamW(m.parameters(), lr=3e-3))
    galore = fit(lambda m: GaLoreAdamW(galore_param_groups(m, rank=4, update_proj_gap=50, scale=1.0), lr=3e-3))
    assert galore < 0.2 * start
    assert galore < 5 * adamw


def test_param_groups_take_the_parameter_of_a_pruned_linear():
    """torch.nn.utils.prune replaces ``weight`` by a computed tensor: the group holds ``weight_orig``,
    the optimizer builds, and (with the mask re-applied by the forward) the step trains."""
    import torch.nn.utils.prune as prune

    from galore_opt import GaLoreAdamW, galore_param_groups

    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    prune.random_unstructured(model[0], "weight", amount=0.5)
    groups = galore_param_groups(model, target_modules=["0"], rank=4)
    assert groups[0]["params"] == [model[0].weight_orig]
    opt = GaLoreAdamW(groups, lr=1e-2)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    assert (model[0].weight[model[0].weight_mask == 0] == 0).all()


@pytest.mark.parametrize("shape", [(10, 16), (16, 10)])  # left and right bases
def test_warm_refresh_takes_effect_from_the_next_step(shape):
    """Torch numerics: on a warm refresh step the update uses the current basis, and the new basis
    is the power method's result on that same gradient, seeded by the step it was due at."""
    from galore_opt.functional import galore_adamw_update
    from galore_opt.projector import compute_basis, refresh_seed

    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(shape))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 3, "stagger_refresh": False}],
                      lr=1e-2, weight_decay=0.1, seed=7)
    _step_with_random_grads(opt, [w], 3)  # steps 0 (cold), 1, 2
    state = opt.state[w]
    key = C.BASIS_LEFT if shape[0] <= shape[1] else C.BASIS_RIGHT
    old = state[key].clone()
    expect_w = w.detach().clone()
    m, v, step = state[C.EXP_AVG].clone(), state[C.EXP_AVG_SQ].clone(), state[C.STEP].clone()
    w.grad = torch.randn(shape)
    galore_adamw_update(expect_w, w.grad, m, v, step, old if key == C.BASIS_LEFT else None,
                        old if key == C.BASIS_RIGHT else None, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8,
                        weight_decay=0.1, scale=0.25)
    new = compute_basis(w.grad, 3, C.LEFT if key == C.BASIS_LEFT else C.RIGHT, "power",
                        prev_left=old if key == C.BASIS_LEFT else None,
                        prev_right=old if key == C.BASIS_RIGHT else None,
                        seed=refresh_seed(7, 0, 3), align=True)
    opt.step()  # step count 3: the refresh is due
    torch.testing.assert_close(w.detach(), expect_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(state[C.EXP_AVG], m, rtol=0, atol=1e-7)
    torch.testing.assert_close(state[C.EXP_AVG_SQ], v, rtol=0, atol=1e-9)
    torch.testing.assert_close(state[key], new[0] if key == C.BASIS_LEFT else new[1], rtol=0, atol=1e-5)
    assert not torch.allclose(state[key], old)


def test_galore_torch_numerics_refresh_before_the_update(monkeypatch):
    """galore_torch numerics keep galore-torch's order: refresh, then project with the new basis."""
    w = nn.Parameter(torch.randn(10, 16))
    opt = GaLoreAdamW([{"params": [w], "rank": 3, "update_proj_gap": 2}], numerics="galore_torch")
    import galore_opt.optim.galore_adamw as adamw_module

    order = []
    real_basis, real_update = base.compute_basis, adamw_module.galore_adamw_update
    monkeypatch.setattr(base, "compute_basis", lambda *a, **k: order.append("refresh") or real_basis(*a, **k))
    monkeypatch.setattr(adamw_module, "galore_adamw_update", lambda *a, **k: order.append("update") or real_update(*a, **k))
    _step_with_random_grads(opt, [w], 3)
    assert order == ["refresh", "update", "update", "refresh", "update"]
    # torch numerics: the cold refresh comes first, a warm one after the update
    order.clear()
    v = nn.Parameter(torch.randn(10, 16))
    opt = GaLoreAdamW([{"params": [v], "rank": 3, "update_proj_gap": 2, "stagger_refresh": False}])
    _step_with_random_grads(opt, [v], 3)
    assert order == ["refresh", "update", "update", "update", "refresh"]


@pytest.mark.parametrize("scale", [1e20, 1e30])
@pytest.mark.parametrize("method", ["power", "randomized", "svd"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_huge_finite_gradient_keeps_basis_and_weights_finite(cls, dtype, method, scale):
    # G G^T P overflowed from max|G| ~ 1e19 although G was finite: the basis, then the weights,
    # became NaN for good. The products are now scaled by a power of two set by max|G|.
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(8, 12, dtype=dtype))
    ref = nn.Parameter(w.detach().float().clone())
    opt = cls([{"params": [w], "rank": 2, "update_proj_gap": 2, "stagger_refresh": False, "proj_method": method}])
    adamw = torch.optim.AdamW([ref], lr=1e-3)
    for step in range(8):
        g = torch.randn(8, 12)
        if step in (2, 3):  # a warm refresh step and a steady one
            g = g * scale
        w.grad, ref.grad = g.to(dtype), g.clone()
        opt.step()
        adamw.step()
        stored = opt.state[w][C.BASIS_LEFT]  # the 8-bit optimizer stores it in bf16
        basis = stored.float()
        assert torch.isfinite(basis).all(), step
        tol = 2e-2 if stored.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(basis.t() @ basis, torch.eye(2), atol=tol, rtol=0)
        assert torch.isfinite(ref).all() and torch.isfinite(w).all(), step


def test_overflow_scale_is_an_exact_power_of_two():
    from galore_opt.projector import overflow_scale

    for value, want in ((0.0, 1.0), (0.5, 1.0), (0.999, 1.0), (1.0, 0.5), (3.0, 0.25), (1e20, 2.0**-67),
                        (3e38, 2.0**-126), (float("inf"), 1.0), (float("nan"), 1.0)):  # fmt: skip
        s = overflow_scale(torch.tensor(value))
        assert s.dtype == torch.float32 and s.dim() == 0
        assert float(s) == want, (value, float(s))
    # ordinary gradients (max |G| < 1) refresh exactly as without the scale
    g = torch.randn(30, 40) * 0.01
    prev = torch.linalg.qr(torch.randn(30, 4)).Q
    from galore_opt.projector import compute_basis

    left, _ = compute_basis(g, 4, "left", "power", prev_left=prev)
    q = torch.linalg.qr(g @ (g.t() @ prev)).Q
    assert torch.equal(left, q)

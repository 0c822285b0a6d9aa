"""Default numerics are torch.optim.AdamW's."""

import pytest
import torch

from galore_opt import GaLoreAdamW
from galore_opt import config as C
from galore_opt.testing import tolerance


def _grads(params, step):
    gen = torch.Generator().manual_seed(1000 + step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_galore_params_follow_torch_adamw_bit_for_bit(weight_decay, dtype):
    gen = torch.Generator().manual_seed(0)
    # (1100, 1000): more than one CPU slice of the full-size update (functional.adamw.CPU_SLICE)
    shapes = [(5, 7), (11,), (3, 4, 2), (1100, 1000)]
    ours = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    a = GaLoreAdamW(
        [{"params": ours[:2]}, {"params": ours[2:], "lr": 3e-3}], lr=1e-2, betas=(0.8, 0.99), weight_decay=weight_decay
    )
    b = torch.optim.AdamW(
        [{"params": theirs[:2]}, {"params": theirs[2:], "lr": 3e-3}],
        lr=1e-2,
        betas=(0.8, 0.99),
        weight_decay=weight_decay,
        foreach=False,
    )
    for step in range(30):
        _grads(ours, step)
        _grads(theirs, step)
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
    for p, q in zip(ours, theirs):
        for key in (C.EXP_AVG, C.EXP_AVG_SQ, C.STEP):
            assert torch.equal(a.state[p][key], b.state[q][key])


def test_identity_basis_equals_torch_adamw():
    """A GaLore parameter whose basis is the identity (and scale 1) gets AdamW's update."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(12, 12))
    w_ref = torch.nn.Parameter(w.detach().clone())
    opt = GaLoreAdamW(
        [{"params": [w], "rank": 11, "update_proj_gap": 10**6, "scale": 1.0, "proj_type": "left"}],
        lr=1e-2,
        weight_decay=0.1,
    )
    ref = torch.optim.AdamW([w_ref], lr=1e-2, weight_decay=0.1, foreach=False)
    # One step creates the state (rank 11 basis); then swap in the identity basis, reset the
    # moments to full size, and replay from the same starting point.
    w.grad = torch.zeros(12, 12)
    opt.step()
    state = opt.state[w]
    state[C.BASIS_LEFT] = torch.eye(12)
    state[C.EXP_AVG] = torch.zeros(12, 12)
    state[C.EXP_AVG_SQ] = torch.zeros(12, 12)
    state[C.STEP].zero_()
    with torch.no_grad():
        w.copy_(w_ref)
    for step in range(25):
        _grads([w], step)
        _grads([w_ref], step)
        opt.step()
        ref.step()
    torch.testing.assert_close(w, w_ref, **tolerance(torch.float32, "rewritten_ops"))
    torch.testing.assert_close(opt.state[w][C.EXP_AVG], ref.state[w_ref][C.EXP_AVG], rtol=0, atol=0)


def test_full_rank_route_equals_scaled_adamw():
    """rank >= min(m, n): updated in full with no basis; with scale 1 that is AdamW."""
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(6, 9))
    w_ref = torch.nn.Parameter(w.detach().clone())
    with pytest.warns(UserWarning, match="updated in full"):
        opt = GaLoreAdamW([{"params": [w], "rank": 6, "scale": 1.0}], lr=1e-2, weight_decay=0.05)
    ref = torch.optim.AdamW([w_ref], lr=1e-2, weight_decay=0.05, foreach=False)
    for step in range(20):
        _grads([w], step)
        _grads([w_ref], step)
        opt.step()
        ref.step()
    assert C.BASIS_LEFT not in opt.state[w] and C.BASIS_RIGHT not in opt.state[w]
    torch.testing.assert_close(w, w_ref, **tolerance(torch.float32, "rewritten_ops"))


@pytest.mark.parametrize("numerics", ["torch", "galore_torch"])
def test_full_size_update_in_cpu_slices_equals_update_at_once(numerics, monkeypatch):
    import galore_opt.functional.adamw as F

    gen = torch.Generator().manual_seed(0)
    n = 2 * F.CPU_SLICE + 12345  # two whole slices and a ragged one
    results = []
    for slice_size in (F.CPU_SLICE, 10 * n):
        monkeypatch.setattr(F, "CPU_SLICE", slice_size)
        gen.manual_seed(0)
        p, m, v = torch.randn(n, generator=gen), torch.zeros(n), torch.zeros(n)
        step = torch.tensor(0.0)
        for _ in range(3):
            F.adamw_update(p, torch.randn(n, generator=gen), m, v, step, lr=1e-2, beta1=0.9, beta2=0.99, eps=1e-8,
                           weight_decay=0.1, numerics=numerics)
        results.append((p, m, v))
    for a, b in zip(*results):
        assert torch.equal(a, b)

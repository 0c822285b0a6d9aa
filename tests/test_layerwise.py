"""Optimizer-in-backward: equal to the normal optimizer, with accumulation, clipping and resume."""

import io

import pytest
import torch
from torch import nn

from galore_opt import GaLoreAdamW, GaLoreAdamW8bit, galore_param_groups
from galore_opt.layerwise import LayerwiseOptimizer


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 48), nn.Tanh(), nn.Linear(48, 40), nn.Tanh(), nn.Linear(40, 8))


def _batch(t):
    gen = torch.Generator().manual_seed(t)
    return torch.randn(8, 16, generator=gen), torch.randn(8, 8, generator=gen)


def _loss(model, t, k):
    x, y = _batch(t)
    return nn.functional.mse_loss(model(x), y) / k


def _make(model, cls=GaLoreAdamW):
    # gap 3 with staggering: refreshes land inside accumulation windows, exercising both paths
    return cls(galore_param_groups(model, rank=6, update_proj_gap=3, weight_decay=0.01), lr=1e-2)


def _train_normal(model, opt, updates, k, start=0):
    norms = []
    for u in range(start, start + updates):
        for i in range(k):
            _loss(model, u * k + i, k).backward()
        norms.append(float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])))
        opt.step()
        opt.zero_grad()
    return norms


def _train_layerwise(model, lw, updates, k, start=0):
    norms = []
    for u in range(start, start + updates):
        for i in range(k):
            _loss(model, u * k + i, k).backward()
            lw.step()
            lw.zero_grad()
        norms.append(lw.grad_norm)
    return norms


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("cls", [GaLoreAdamW, GaLoreAdamW8bit])
def test_layerwise_equals_normal_optimizer_with_accumulation(k, cls):
    m1, m2 = _model(), _model()
    _train_normal(m1, _make(m1, cls), 10, k)
    lw = LayerwiseOptimizer(_make(m2, cls), accumulation_steps=k)
    _train_layerwise(m2, lw, 10, k)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        assert q.grad is None  # freed by the hooks


def test_projected_accumulation_keeps_only_low_rank_buffers():
    model = _model()
    lw = LayerwiseOptimizer(_make(model), accumulation_steps=3)
    _train_layerwise(model, lw, 1, 3)  # first update: cold bases, full accumulation
    _loss(model, 100, 3).backward()  # first micro-batch of update 2
    weights = [model[0].weight, model[2].weight, model[4].weight]
    buffers = lw._low_rank
    low_rank = [w for w in weights if id(w) in buffers]
    assert low_rank, "some GaLore weights accumulate their projection"
    for w in low_rank:
        assert w.grad is None and buffers[id(w)].numel() < w.numel()
    assert model[0].bias.grad is not None  # non-GaLore parameters accumulate in p.grad


def test_grad_norm_is_the_true_global_norm():
    m1, m2 = _model(), _model()
    expected = _train_normal(m1, _make(m1), 5, 1)
    actual = _train_layerwise(m2, LayerwiseOptimizer(_make(m2)), 5, 1)
    assert actual == pytest.approx(expected, rel=1e-5)
    assert all(n > 0 for n in actual)


def test_clipping_modes():
    m1, m2 = _model(), _model()
    lw = LayerwiseOptimizer(_make(m1), max_grad_norm=1e-3, clip_mode="parameter")
    _train_layerwise(m1, lw, 3, 1)
    unclipped = LayerwiseOptimizer(_make(m2))
    _train_layerwise(m2, unclipped, 3, 1)
    assert any(not torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    # "previous": the first update is unclipped (no previous norm), later ones are scaled
    m3 = _model()
    prev = LayerwiseOptimizer(_make(m3), max_grad_norm=1e-3)
    assert prev.clip_mode == "previous"
    _train_layerwise(m3, prev, 1, 1)
    m4 = _model()
    _train_layerwise(m4, LayerwiseOptimizer(_make(m4)), 1, 1)
    assert all(torch.equal(p, q) for p, q in zip(m3.parameters(), m4.parameters()))


def test_resume_is_bit_exact_and_weights_only():
    m1 = _model()
    lw1 = LayerwiseOptimizer(_make(m1), accumulation_steps=2)
    _train_layerwise(m1, lw1, 4, 2)
    buf = io.BytesIO()
    torch.save({"model": m1.state_dict(), "opt": lw1.state_dict()}, buf)
    _train_layerwise(m1, lw1, 5, 2, start=4)
    buf.seek(0)
    checkpoint = torch.load(buf, weights_only=True)
    m2 = _model()
    m2.load_state_dict(checkpoint["model"])
    lw2 = LayerwiseOptimizer(_make(m2), accumulation_steps=2)
    lw2.load_state_dict(checkpoint["opt"])
    _train_layerwise(m2, lw2, 5, 2, start=4)
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))


def test_scheduler_drives_every_group_and_hooks_are_removable():
    model = _model()
    lw = LayerwiseOptimizer(_make(model))
    sched = torch.optim.lr_scheduler.LambdaLR(lw, lambda step: 0.5**step)
    lw.step()
    sched.step()
    assert all(g["lr"] == pytest.approx(5e-3) for g in lw.optimizers[0].param_groups)
    lw.remove_hooks()
    _loss(model, 0, 1).backward()
    assert model[0].weight.grad is not None  # no hook consumed it


def test_plain_torch_optimizer_for_other_parameters():
    m1, m2 = _model(), _model()
    groups1 = galore_param_groups(m1, rank=6, update_proj_gap=3)
    groups2 = galore_param_groups(m2, rank=6, update_proj_gap=3)
    o1 = [GaLoreAdamW(groups1[:1], lr=1e-2), torch.optim.SGD(groups1[1:], lr=1e-2)]
    o2 = [GaLoreAdamW(groups2[:1], lr=1e-2), torch.optim.SGD(groups2[1:], lr=1e-2)]
    for u in range(4):
        _loss(m1, u, 1).backward()
        for o in o1:
            o.step()
            o.zero_grad()
    _train_layerwise(m2, LayerwiseOptimizer(o2), 4, 1)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_bad_arguments():
    model = _model()
    with pytest.raises(ValueError, match="Invalid accumulation_steps: 0"):
        LayerwiseOptimizer(_make(model), accumulation_steps=0)
    with pytest.raises(ValueError, match="Invalid clip_mode: 'global'"):
        LayerwiseOptimizer(_make(model), max_grad_norm=1.0, clip_mode="global")
    with pytest.raises(ValueError, match="needs max_grad_norm"):
        LayerwiseOptimizer(_make(model), clip_mode="parameter")
    opt = _make(model)
    with pytest.raises(ValueError, match="more than one optimizer"):
        LayerwiseOptimizer([opt, torch.optim.SGD(model.parameters(), lr=0.1)])

"""Optimizer-in-backward: equal to the normal optimizer, with accumulation, clipping and resume."""

import copy
import io
import pickle

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


# --- issue 16 item 4: the wrapper under torch.optim's contract -----------------------------------------


def _train_plain(model, opt, updates, k, start=0):
    """The normal optimizer's loop (no grad-norm: frozen parameters have no gradient)."""
    for u in range(start, start + updates):
        for i in range(k):
            _loss(model, u * k + i, k).backward()
        opt.step()
        opt.zero_grad()


def _set_frozen(model, frozen):
    for p in model[0].parameters():
        p.requires_grad_(not frozen)


@pytest.mark.parametrize("k", [1, 2])
def test_parameter_unfrozen_after_wrapping_is_trained(k):
    """Gradual unfreezing: the first layer is frozen when wrapped and unfrozen after 2 updates."""
    m1, m2 = _model(), _model()
    opt = _make(m1)  # built with every parameter (galore_param_groups skips frozen ones)
    lw = LayerwiseOptimizer(_make(m2), accumulation_steps=k)  # the constructor sees it frozen
    _set_frozen(m1, True)
    _set_frozen(m2, True)
    lw.remove_hooks()
    lw = LayerwiseOptimizer(lw.optimizers[0], accumulation_steps=k)
    _train_plain(m1, opt, 2, k)
    _train_layerwise(m2, lw, 2, k)
    _set_frozen(m1, False)
    _set_frozen(m2, False)
    start = m2[0].weight.detach().clone()
    _train_plain(m1, opt, 4, k, start=2)
    _train_layerwise(m2, lw, 4, k, start=2)
    assert not torch.equal(m2[0].weight, start)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        assert q.grad is None


def test_model_wrapped_fully_frozen_trains_once_unfrozen():
    """No hook fires in a backward where every parameter was frozen when wrapped: step() applies
    the gradients the hooks missed and counts the backward."""
    m1, m2 = _model(), _model()
    inner = _make(m2)
    m2.requires_grad_(False)
    lw = LayerwiseOptimizer(inner)
    m2.requires_grad_(True)
    opt = _make(m1)
    _train_plain(m1, opt, 3, 1)
    _train_layerwise(m2, lw, 3, 1)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
        assert q.grad is None
    assert lw.micro_step == 3


def test_add_param_group_reaches_the_inner_optimizer():
    m1, m2 = _model(), _model()
    groups = galore_param_groups(m2[:3], rank=6, update_proj_gap=3)
    lw = LayerwiseOptimizer(GaLoreAdamW(groups, lr=1e-2))
    lw.add_param_group({"params": list(m2[4].parameters())})
    assert lw.param_groups is not lw.optimizers[0].param_groups
    assert lw.param_groups == lw.optimizers[0].param_groups
    opt = GaLoreAdamW(galore_param_groups(m1[:3], rank=6, update_proj_gap=3), lr=1e-2)
    opt.add_param_group({"params": list(m1[4].parameters())})
    _train_plain(m1, opt, 3, 1)
    _train_layerwise(m2, lw, 3, 1)
    for p, q in zip(m1.parameters(), m2.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="more than one parameter group"):
        lw.add_param_group({"params": [m2[4].weight]})


def test_add_param_group_with_several_optimizers_is_refused():
    model = _model()
    groups = galore_param_groups(model[:3], rank=6, update_proj_gap=3)
    lw = LayerwiseOptimizer([GaLoreAdamW(groups, lr=1e-2), torch.optim.SGD(model[4].parameters(), lr=0.1)])
    with pytest.raises(ValueError, match="wraps 2 optimizers, so it cannot tell which one should own"):
        lw.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


def test_state_dict_and_load_state_dict_hooks_fire():
    model = _model()
    lw = LayerwiseOptimizer(_make(model))
    _train_layerwise(model, lw, 2, 1)
    calls = []
    lw.register_state_dict_pre_hook(lambda o: calls.append("save pre"))
    lw.register_state_dict_post_hook(lambda o, sd: {**sd, "extra": 1})
    saved = lw.state_dict()
    assert calls == ["save pre"] and saved["extra"] == 1
    fresh = LayerwiseOptimizer(_make(_model()))
    fresh.register_load_state_dict_pre_hook(lambda o, sd: calls.append("load pre"))
    fresh.register_load_state_dict_post_hook(lambda o: calls.append(("load post", o.micro_step, len(o.state))))
    fresh.load_state_dict(saved)
    assert calls == ["save pre", "load pre", ("load post", 2, 6)]


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("how", [copy.deepcopy, _pickled])
def test_copies_are_bound_to_the_copied_parameters(how):
    """deepcopy((model, optimizer)) and pickle give a pair that trains like the original; the
    original's hooks stay on the original's parameters."""
    model = _model()
    lw = LayerwiseOptimizer(_make(model), accumulation_steps=2)
    _train_layerwise(model, lw, 2, 2)
    model2, lw2 = how((model, lw))
    assert lw2.param_groups == lw2.optimizers[0].param_groups
    assert all(g2 is g for g2, g in zip(lw2.param_groups, lw2.optimizers[0].param_groups))
    _train_layerwise(model, lw, 3, 2, start=2)
    _train_layerwise(model2, lw2, 3, 2, start=2)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q) and q.grad is None
    _loss(model, 10, 2).backward()  # first micro-batch of an update
    with pytest.raises(RuntimeError, match="between updates, not in the middle of an accumulation"):
        how((model, lw))


def test_grad_scaler_is_refused_with_a_clear_error():
    model = _model()
    lw = LayerwiseOptimizer(_make(model))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(_loss(model, 0, 1)).backward()
    with pytest.raises(RuntimeError, match="does not work with torch.amp.GradScaler: each parameter is updated inside"):
        scaler.step(lw)


@pytest.mark.parametrize("k", [1, 2])
def test_failure_inside_backward_discards_the_window_and_training_goes_on(k, monkeypatch):
    """An out-of-memory error in a first basis computation inside backward: autograd drops the
    wrapper's end-of-backward callback; the window is discarded (gradients freed, counter reset)
    and the next batches train with correct bookkeeping."""
    import galore_opt.optim.base as base
    import galore_opt.projector as projector

    model = _model()
    lw = LayerwiseOptimizer(_make(model), accumulation_steps=k)
    if k == 2:
        _loss(model, 0, k).backward()  # a first micro-batch that succeeds

    def fail(*args, **kwargs):
        raise torch.OutOfMemoryError("injected")

    monkeypatch.setattr(base, "compute_basis", fail)
    monkeypatch.setattr(projector, "compute_basis", fail)
    with pytest.raises(torch.OutOfMemoryError, match="injected"):
        _loss(model, 1, k).backward()
    monkeypatch.undo()
    assert all(p.grad is None for p in model.parameters())
    assert lw.micro_step == 0 and not lw._low_rank
    norms = _train_layerwise(model, lw, 3, k)
    assert lw.micro_step == 3 * k and all(n is not None and n > 0 for n in norms)
    assert all(torch.isfinite(p).all() and p.grad is None for p in model.parameters())
    weights = [model[0].weight, model[2].weight, model[4].weight]
    assert all(lw.optimizers[0].state[w]["step"].item() == 3 for w in weights)

"""torch.optim's generic optimizer contract, for every galore-opt optimizer and the layer-wise
wrapper: the checks of PyTorch's ``test/test_optim.py`` that apply to any
``torch.optim.Optimizer`` (state-dict round trips, deepcopy, the six hook kinds, schedulers,
``swa_utils``, param-group changes, closures, ``zero_grad``, unknown keywords, requires_grad
flips, older state dicts), written for our optimizers. Each subject has a GaLore group (two
projected matrices) and a plain group (the biases)."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.optim import lr_scheduler, swa_utils
from torch.optim.optimizer import register_optimizer_step_post_hook

from galore_opt import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from galore_opt import config as C
from galore_opt.layerwise import LayerwiseOptimizer


def _groups(model, lr=None):
    extra = {} if lr is None else {"lr": lr}
    return [
        {"params": [model[0].weight, model[2].weight], "rank": 2, "update_proj_gap": 3, **extra},
        {"params": [model[0].bias, model[2].bias]},
    ]


SUBJECTS = {
    "adamw": lambda model, **kw: GaLoreAdamW(_groups(model), lr=1e-2, weight_decay=0.01, **kw),
    "adamw8bit": lambda model, **kw: GaLoreAdamW8bit(_groups(model), lr=1e-2, min_8bit_size=0, block_size=16, **kw),
    "adafactor": lambda model, **kw: GaLoreAdafactor(_groups(model), **kw),
    "layerwise-adamw": lambda model, **kw: LayerwiseOptimizer(GaLoreAdamW(_groups(model), lr=1e-2, **kw)),
    "layerwise-adafactor": lambda model, **kw: LayerwiseOptimizer(GaLoreAdafactor(_groups(model), **kw)),
}
NAMES = list(SUBJECTS)
INNER = {"adamw": GaLoreAdamW, "adamw8bit": GaLoreAdamW8bit, "adafactor": GaLoreAdafactor}


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 10), nn.Tanh(), nn.Linear(10, 4))


def _loss(model, t):
    gen = torch.Generator().manual_seed(1000 + t)
    x, y = torch.randn(5, 6, generator=gen), torch.randn(5, 4, generator=gen)
    return nn.functional.mse_loss(model(x), y)


def _train(model, opt, start, stop):
    """The loop every torch.optim user writes; under the layer-wise wrapper backward updates."""
    for t in range(start, stop):
        opt.zero_grad()
        _loss(model, t).backward()
        opt.step()


def _inner(opt):
    return opt.optimizers if isinstance(opt, LayerwiseOptimizer) else [opt]


def _assert_equal(a, b, path="state_dict"):
    """Recursive equality: tensors bit for bit, everything else with ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert set(a) == set(b), path
        for k in a:
            _assert_equal(a[k], b[k], f"{path}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def _assert_same_params(m1, m2):
    for p, q in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p, q)


# --- printing, unknown keywords, empty steps --------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_optimizer_can_be_printed(name):
    opt = SUBJECTS[name](_model())
    text = repr(opt)
    assert type(opt).__name__ in text and "Parameter Group 1" in text


@pytest.mark.parametrize("name", NAMES)
def test_unknown_keyword_is_a_type_error(name):
    with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
        SUBJECTS[name](_model(), foo=1)
    if name.startswith("layerwise"):
        with pytest.raises(TypeError, match="unexpected keyword argument 'foo'"):
            LayerwiseOptimizer(GaLoreAdamW(_groups(_model())), foo=1)


@pytest.mark.parametrize("name", NAMES)
def test_step_without_gradients_changes_nothing(name):
    model = _model()
    opt = SUBJECTS[name](model)
    before = copy.deepcopy(model.state_dict())
    opt.step()
    _assert_equal(model.state_dict(), before)
    assert all(not o.state for o in _inner(opt))


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor"])
def test_zero_gradients_change_nothing_without_weight_decay(name):
    model = _model()
    opt = INNER[name](_groups(model)) if name != "adamw8bit" else GaLoreAdamW8bit(_groups(model), min_8bit_size=0)
    before = copy.deepcopy(model.state_dict())
    for _ in range(4):  # through a refresh (gap 3) of a basis computed from zero gradients
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()
    _assert_equal(model.state_dict(), before)
    for p in model.parameters():
        assert float(opt.state[p][C.STEP]) == 4


@pytest.mark.parametrize("name", NAMES)
def test_training_goes_the_right_direction(name):
    model = _model()
    opt = SUBJECTS[name](model)
    first = float(_loss(model, 0).detach())
    for _ in range(30):  # the same batch: the loss must fall
        opt.zero_grad()
        _loss(model, 0).backward()
        opt.step()
    assert float(_loss(model, 0).detach()) < first


# --- state_dict round trips and copies --------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip_resumes_exactly_and_is_not_mutated(name):
    m1 = _model()
    o1 = SUBJECTS[name](m1)
    _train(m1, o1, 0, 4)
    m2 = copy.deepcopy(m1)
    o2 = SUBJECTS[name](m2)
    saved = o1.state_dict()
    given = copy.deepcopy(saved)
    o2.load_state_dict(given)
    _assert_equal(given, saved)  # load_state_dict did not mutate its argument
    _assert_equal(o2.state_dict(), saved)  # deterministic with equal, not identical, parameters
    _train(m1, o1, 4, 9)  # through refreshes (gap 3)
    _train(m2, o2, 4, 9)
    _assert_same_params(m1, m2)
    _assert_equal(o2.state_dict(), o1.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_save_load_with_weights_only(name):
    m1 = _model()
    o1 = SUBJECTS[name](m1)
    _train(m1, o1, 0, 3)
    buf = io.BytesIO()
    torch.save(o1.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=True)
    m2 = copy.deepcopy(m1)
    o2 = SUBJECTS[name](m2)
    o2.load_state_dict(loaded)
    _train(m1, o1, 3, 7)
    _train(m2, o2, 3, 7)
    _assert_same_params(m1, m2)


@pytest.mark.parametrize("name", NAMES)
def test_deepcopy_copies_public_attributes_and_trains_alike(name):
    m1 = _model()
    o1 = SUBJECTS[name](m1)
    _train(m1, o1, 0, 3)
    m2, o2 = copy.deepcopy((m1, o1))
    public = {k for k in o1.__dict__ if not k.startswith("_")}
    assert {k for k in o2.__dict__ if not k.startswith("_")} == public
    _train(m1, o1, 3, 7)
    _train(m2, o2, 3, 7)
    _assert_same_params(m1, m2)
    _assert_equal(o2.state_dict(), o1.state_dict())


@pytest.mark.parametrize("name", NAMES)
def test_can_load_older_state_dict(name):
    """torch's test_can_load_older_state_dict and test_load_nontensor_step: group keys a version
    lacks take the defaults, a step kept as a Python number loads, and the run continues as if
    nothing happened."""
    m1 = _model()
    o1 = SUBJECTS[name](m1)
    _train(m1, o1, 0, 4)
    saved = copy.deepcopy(o1.state_dict())
    inner_dicts = saved["optimizers"] if name.startswith("layerwise") else [saved]
    ours = set(C.EXTRA_DEFAULTS) | {"numerics", "impl", "seed", "correct_bias"}
    for sd in inner_dicts:
        for group in sd["param_groups"]:
            for key in ours:
                group.pop(key, None)
        for state in sd["state"].values():
            state[C.STEP] = state[C.STEP].item()
    m2 = copy.deepcopy(m1)
    o2 = SUBJECTS[name](m2)
    o2.load_state_dict(saved)
    _train(m1, o1, 4, 8)
    _train(m2, o2, 4, 8)
    _assert_same_params(m1, m2)


# --- hooks ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_step_pre_and_post_hooks(name):
    model = _model()
    opt = SUBJECTS[name](model)
    calls = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: calls.append(("pre", o is opt)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: calls.append(("post", o is opt)))
    # global hooks see every optimizer's steps: under the wrapper a plain inner optimizer (Adafactor
    # has no single-parameter step) is stepped once per parameter inside backward
    glob = register_optimizer_step_post_hook(lambda o, a, k: o is opt and calls.append(("global", True)))
    try:
        _train(model, opt, 0, 2)
    finally:
        glob.remove()
    assert calls == [("pre", True), ("post", True), ("global", True)] * 2
    pre.remove()
    post.remove()
    _train(model, opt, 2, 3)
    assert len(calls) == 6


@pytest.mark.parametrize("name", NAMES)
def test_step_pre_hook_may_replace_the_arguments(name):
    model = _model()
    opt = SUBJECTS[name](model)
    seen = []

    def closure():
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        seen.append(float(loss.detach()))
        return loss

    opt.register_step_pre_hook(lambda o, args, kwargs: ((o, closure), {}))  # args[0] is the optimizer
    loss = opt.step()
    assert seen and float(loss.detach()) == seen[0]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_pre_and_post_hooks(name):
    model = _model()
    opt = SUBJECTS[name](model)
    _train(model, opt, 0, 2)
    calls = []
    opt.register_state_dict_pre_hook(lambda o: calls.append("pre"))
    opt.register_state_dict_post_hook(lambda o, sd: {**sd, "note": "post"})
    opt.register_state_dict_post_hook(lambda o, sd: calls.append(sd["note"]), prepend=False)
    sd = opt.state_dict()
    assert calls == ["pre", "post"] and sd["note"] == "post"


@pytest.mark.parametrize("name", NAMES)
def test_load_state_dict_pre_and_post_hooks(name):
    m1 = _model()
    o1 = SUBJECTS[name](m1)
    _train(m1, o1, 0, 2)
    saved = o1.state_dict()
    m2 = copy.deepcopy(m1)
    o2 = SUBJECTS[name](m2)
    calls = []

    def pre(optimizer, state_dict):
        calls.append("pre")
        renamed = copy.deepcopy(state_dict)
        for sd in renamed["optimizers"] if "optimizers" in renamed else [renamed]:
            sd["param_groups"][1]["lr"] = 0.125  # the loaded state dict is the hook's
        return renamed

    def post(optimizer):
        groups = [g for o in _inner(optimizer) for g in o.param_groups]
        calls.append(("post", groups[1]["lr"], sum(len(o.state) for o in _inner(optimizer))))

    o2.register_load_state_dict_pre_hook(pre)
    o2.register_load_state_dict_post_hook(post)
    o2.register_load_state_dict_post_hook(lambda o: calls.append("first"), prepend=True)
    o2.load_state_dict(saved)
    assert calls == ["pre", "first", ("post", 0.125, 4)]
    assert saved != calls  # the caller's state dict was not changed by the hook
    groups = saved["optimizers"][0]["param_groups"] if "optimizers" in saved else saved["param_groups"]
    assert groups[1]["lr"] != 0.125


# --- schedulers, param-group changes, lr as a tensor ------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_lr_schedulers_drive_every_group(name):
    model = _model()
    opt = SUBJECTS[name](model)
    base = [g["lr"] for g in opt.param_groups]
    step_lr = lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    exp_lr = lr_scheduler.ExponentialLR(opt, gamma=0.9)
    chained = lr_scheduler.ChainedScheduler([step_lr, exp_lr])
    for t in range(5):
        _train(model, opt, t, t + 1)
        chained.step()
    expected = [lr * 0.5 ** (5 // 2) * 0.9**5 for lr in base]
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(expected, rel=1e-12)
    for o in _inner(opt):  # the wrapper's groups are the inner optimizers' groups
        assert all(any(g is h for h in opt.param_groups) for g in o.param_groups)


@pytest.mark.parametrize("name", NAMES)
def test_one_cycle_lr_with_betas(name):
    model = _model()
    opt = SUBJECTS[name](model)
    if "adafactor" in name:  # torch.optim.Adafactor has no betas either: torch's own refusal
        with pytest.raises(ValueError, match="optimizer must support momentum"):
            lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=6)
        sched = lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=6, cycle_momentum=False)
    else:
        sched = lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=6, base_momentum=0.85, max_momentum=0.95)
        assert all(g["betas"][0] == pytest.approx(0.95) for g in opt.param_groups)
    lrs = []
    for t in range(6):
        _train(model, opt, t, t + 1)
        lrs.append(opt.param_groups[0]["lr"])
        if t < 5:
            sched.step()
    assert 0.009 < max(lrs) <= 1e-2 and lrs[0] < max(lrs) and lrs[-1] < max(lrs)
    if "adafactor" not in name:
        assert opt.param_groups[0]["betas"][0] > 0.85  # cycled down and back up
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_swa_utils(name):
    model = _model()
    opt = SUBJECTS[name](model)
    averaged = swa_utils.AveragedModel(model)
    swa = swa_utils.SWALR(opt, swa_lr=0.005, anneal_epochs=2)
    snapshots = []
    for t in range(4):
        _train(model, opt, t, t + 1)
        averaged.update_parameters(model)
        snapshots.append([p.detach().clone() for p in model.parameters()])
        swa.step()
    assert all(g["lr"] == pytest.approx(0.005) for g in opt.param_groups)
    for i, p in enumerate(averaged.module.parameters()):
        torch.testing.assert_close(p, torch.stack([s[i] for s in snapshots]).mean(0))


@pytest.mark.parametrize("name", NAMES)
def test_param_group_lr_change_takes_effect(name):
    """lr = 0 on the GaLore group freezes its matrices (their state still advances, the basis
    still refreshes); the plain group keeps training."""
    model = _model()
    opt = SUBJECTS[name](model)
    _train(model, opt, 0, 1)
    opt.param_groups[0]["lr"] = 0.0
    if "adamw" in name:
        for g in opt.param_groups:
            g["weight_decay"] = 0.0
    frozen = [model[0].weight.detach().clone(), model[2].weight.detach().clone()]
    bias = model[0].bias.detach().clone()
    _train(model, opt, 1, 5)
    assert torch.equal(model[0].weight, frozen[0]) and torch.equal(model[2].weight, frozen[1])
    assert not torch.equal(model[0].bias, bias)


@pytest.mark.parametrize("name", ["adamw", "adamw8bit", "adafactor"])
def test_lr_as_a_tensor_is_refused_clearly(name):
    with pytest.raises(ValueError, match=r"Invalid learning rate: tensor\(0\.0100\) - must be a number >= 0"):
        INNER[name](_groups(_model()), lr=torch.tensor(0.01))


# --- closures, zero_grad, requires_grad flips -------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_closure_is_called_once_and_its_loss_returned(name):
    model = _model()
    opt = SUBJECTS[name](model)
    calls = []

    def closure():
        opt.zero_grad()
        loss = _loss(model, 0)
        loss.backward()
        calls.append(loss.detach())
        return loss

    before = model[0].weight.detach().clone()
    loss = opt.step(closure)
    assert len(calls) == 1 and torch.equal(loss.detach(), calls[0])
    assert not torch.equal(model[0].weight, before)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad(name, set_to_none):
    model = _model()
    opt = SUBJECTS[name](model)
    _loss(model, 0).backward()
    opt.step()
    opt.zero_grad(set_to_none=set_to_none)
    for p in model.parameters():
        if name.startswith("layerwise"):  # the hooks freed every gradient after its update
            assert p.grad is None
        elif set_to_none:
            assert p.grad is None
        else:
            assert p.grad is not None and not p.grad.any()
    _train(model, opt, 1, 3)  # and training goes on
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", NAMES)
def test_requires_grad_flips(name):
    """A parameter frozen mid-run is left alone (weights and state); unfrozen, it trains on."""
    model = _model()
    opt = SUBJECTS[name](model)
    _train(model, opt, 0, 2)
    w = model[0].weight
    inner = next(o for o in _inner(opt) if w in o.state)
    state = {k: v.clone() for k, v in inner.state[w].items()}
    frozen = w.detach().clone()
    w.requires_grad_(False)
    _train(model, opt, 2, 4)
    assert torch.equal(w, frozen) and w.grad is None
    _assert_equal({k: v for k, v in inner.state[w].items()}, state)
    w.requires_grad_(True)
    _train(model, opt, 4, 6)
    assert not torch.equal(w, frozen)
    assert float(inner.state[w][C.STEP]) == 4
    assert all(math.isfinite(float(p.detach().abs().max())) for p in model.parameters())

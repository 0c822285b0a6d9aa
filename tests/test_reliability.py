"""Faults and odd input (issue 16, items 2-10): every optimizer recovers the way torch.optim does,
or refuses with an error that says what happened and what to do."""

import copy
import io
import pickle
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import galore_opt.optim.base as base
import galore_opt.projector as projector
from galore_opt import GaLoreAdafactor, GaLoreAdamW, GaLoreAdamW8bit
from galore_opt import config as C
from galore_opt.testing import tolerance

OPTIMIZERS = {
    "adamw": lambda groups: GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01),
    # min_8bit_size=0: the tiny moments are 8-bit too, so the codes path is the one exercised
    "adamw8bit": lambda groups: GaLoreAdamW8bit(groups, lr=1e-2, min_8bit_size=0, block_size=16),
    "adafactor": lambda groups: GaLoreAdafactor(groups),
}


def _params(seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = nn.Parameter(torch.randn(12, 8, generator=gen))
    b = nn.Parameter(torch.randn(12, generator=gen))
    return w, b


def _groups(w, b, **galore):
    return [{"params": [w], "rank": 2, "update_proj_gap": 3, **galore}, {"params": [b]}]


def _grads(t, w, b):
    gen = torch.Generator().manual_seed(100 + t)
    w.grad = torch.randn(w.shape, generator=gen)
    b.grad = torch.randn(b.shape, generator=gen)


def _train(opt, w, b, start, stop):
    for t in range(start, stop):
        _grads(t, w, b)
        opt.step()


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _assert_same_run(opt_a, params_a, opt_b, params_b):
    for p, q in zip(params_a, params_b):
        assert torch.equal(p, q)
        assert set(opt_a.state[p]) == set(opt_b.state[q])
        for key, value in opt_a.state[p].items():
            assert torch.equal(value, opt_b.state[q][key]), key


# --- item 2: an exception during a parameter's first step ------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("error", [torch.OutOfMemoryError, KeyboardInterrupt])
def test_failed_first_basis_leaves_no_state_and_the_retry_equals_a_clean_run(name, error, monkeypatch):
    w, b = _params()
    opt = OPTIMIZERS[name](_groups(w, b))

    def fail(*args, **kwargs):
        raise error("injected")

    monkeypatch.setattr(base, "compute_basis", fail)
    monkeypatch.setattr(projector, "compute_basis", fail)
    _grads(0, w, b)
    w0 = w.detach().clone()
    with pytest.raises(error, match="injected"):
        opt.step()
    assert w not in opt.state and torch.equal(w, w0)
    monkeypatch.undo()
    _train(opt, w, b, 0, 5)  # the retry: step 0 again, then on through a refresh

    w2, b2 = _params()
    clean = OPTIMIZERS[name](_groups(w2, b2))
    _train(clean, w2, b2, 0, 5)
    _assert_same_run(opt, (w, b), clean, (w2, b2))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_wrong_shape_first_gradient_is_refused_before_any_state_exists(name):
    w, b = _params()
    opt = OPTIMIZERS[name](_groups(w, b))
    _grads(0, w, b)
    w.grad.data = torch.randn(8, 12)  # autograd refuses such an assignment; .data does not
    before = [w.detach().clone(), b.detach().clone()]
    with pytest.raises(RuntimeError, match=r"parameter of shape \(12, 8\) has shape \(8, 12\)"):
        opt.step()
    assert not opt.state and all(torch.equal(p, q) for p, q in zip((w, b), before))
    _train(opt, w, b, 0, 4)
    w2, b2 = _params()
    clean = OPTIMIZERS[name](_groups(w2, b2))
    _train(clean, w2, b2, 0, 4)
    _assert_same_run(opt, (w, b), clean, (w2, b2))


# --- item 3: a sparse gradient is refused before any parameter is updated ------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_sparse_gradient_is_refused_before_earlier_parameters_move(name):
    w, b = _params()
    e = nn.Parameter(torch.randn(5, 3))
    opt = OPTIMIZERS[name](_groups(w, b) + [{"params": [e]}])
    _grads(0, w, b)
    e.grad = torch.sparse_coo_tensor([[0, 2]], torch.ones(2, 3), (5, 3), check_invariants=True)
    before = [p.detach().clone() for p in (w, b, e)]
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        opt.step()
    assert not opt.state
    assert all(torch.equal(p, q) for p, q in zip((w, b, e), before))


# --- item 5: copies ---------------------------------------------------------------------------------


def _pickled(obj):
    return pickle.loads(pickle.dumps(obj))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", [copy.deepcopy, _pickled])
def test_copied_optimizer_steps_like_the_original_and_takes_new_groups(name, how):
    w, b = _params()
    opt = OPTIMIZERS[name](_groups(w, b))
    _train(opt, w, b, 0, 2)
    # copy the parameters with the optimizer, as deepcopy((model, opt)) does
    twin = how({"opt": opt, "params": (w, b)})
    opt2, (w2, b2) = twin["opt"], twin["params"]
    _train(opt, w, b, 2, 6)
    _train(opt2, w2, b2, 2, 6)
    _assert_same_run(opt, (w, b), opt2, (w2, b2))
    extra = nn.Parameter(torch.randn(6, 10))
    with warnings.catch_warnings(record=True):  # rank >= min(6, 10): the full-rank warning path
        warnings.simplefilter("always")
        opt2.add_param_group({"params": [extra], "rank": 6})
    extra.grad = torch.randn(6, 10)
    opt2.step()
    assert C.STEP in opt2.state[extra]


# --- item 6: old and foreign checkpoints ------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_state_dict_with_python_number_steps_loads_and_resumes_exactly(name):
    w, b = _params()
    opt = OPTIMIZERS[name](_groups(w, b))
    _train(opt, w, b, 0, 4)
    saved = copy.deepcopy(opt.state_dict())
    for state in saved["state"].values():
        state[C.STEP] = int(state[C.STEP].item())  # galore-torch / Hugging Face keep an int
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt2 = OPTIMIZERS[name](_groups(w2, b2))
    opt2.load_state_dict(saved)
    for state in opt2.state.values():
        assert state[C.STEP].dtype == torch.float32 and state[C.STEP].device.type == "cpu"
    _train(opt, w, b, 4, 8)  # through a refresh (gap 3)
    _train(opt2, w2, b2, 4, 8)
    _assert_same_run(opt, (w, b), opt2, (w2, b2))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_param_groups_without_our_keys_take_the_defaults(name):
    w, b = _params()
    opt = OPTIMIZERS[name](_groups(w, b))
    _train(opt, w, b, 0, 4)
    saved = copy.deepcopy(opt.state_dict())
    ours = set(C.EXTRA_DEFAULTS) | {"numerics", "impl", "seed", "correct_bias"}
    for group in saved["param_groups"]:
        for key in ours:
            group.pop(key, None)
    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt2 = OPTIMIZERS[name](_groups(w2, b2))
    opt2.load_state_dict(saved)
    assert [set(g) for g in opt2.param_groups] == [set(g) for g in opt.param_groups]
    _train(opt, w, b, 4, 8)
    _train(opt2, w2, b2, 4, 8)
    _assert_same_run(opt, (w, b), opt2, (w2, b2))


# --- item 7: load_state_dict hooks see the whole state ---------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_load_state_dict_hooks_see_bases_and_codes(name):
    w, b = _params()
    opt = OPTIMIZERS[name](_groups(w, b))
    _train(opt, w, b, 0, 2)
    expected = {k: v.dtype for k, v in opt.state[w].items()}
    assert C.BASIS_LEFT in expected or C.BASIS_RIGHT in expected
    seen = {}

    def pre(optimizer, state_dict):
        seen["pre"] = set(state_dict["state"][0])

    def post(optimizer):
        seen["post"] = {k: v.dtype for k, v in optimizer.state[w2].items()}

    w2, b2 = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
    opt2 = OPTIMIZERS[name](_groups(w2, b2))
    opt2.register_load_state_dict_pre_hook(pre)
    opt2.register_load_state_dict_post_hook(post)
    opt2.load_state_dict(_roundtrip(opt.state_dict()))
    assert seen["pre"] == set(expected)
    assert seen["post"] == expected  # the bases (and uint8 codes) are attached, in their dtypes


def test_load_state_dict_pre_hook_may_replace_the_state_dict():
    w, b = _params()
    opt = OPTIMIZERS["adamw"](_groups(w, b))
    _train(opt, w, b, 0, 2)
    saved = opt.state_dict()
    basis_key = C.BASIS_LEFT if C.BASIS_LEFT in opt.state[w] else C.BASIS_RIGHT
    marked = copy.deepcopy(saved)
    marked["state"][0][basis_key].fill_(0.5)
    w2, b2 = _params()
    opt2 = OPTIMIZERS["adamw"](_groups(w2, b2))
    opt2.register_load_state_dict_pre_hook(lambda optimizer, sd: marked)
    opt2.load_state_dict(saved)
    assert torch.all(opt2.state[w2][basis_key] == 0.5)


# --- item 8: numpy integers in groups ----------------------------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_numpy_group_values_work_and_are_stored_as_python_numbers(name):
    w, b = _params()
    groups = [
        {"params": [w], "rank": np.int64(2), "update_proj_gap": np.int32(3), "scale": np.float32(0.25),
         "oversample": np.int16(4)},
        {"params": [b]},
    ]  # fmt: skip
    opt = OPTIMIZERS[name](groups)
    group = opt.param_groups[0]
    assert [type(group[k]) for k in ("rank", "update_proj_gap", "scale", "oversample")] == [int, int, float, int]
    _train(opt, w, b, 0, 4)
    _roundtrip(opt.state_dict())  # loads with weights_only=True: no numpy scalars in the groups

    w2, b2 = _params()
    plain = OPTIMIZERS[name](_groups(w2, b2, scale=0.25, oversample=4))
    _train(plain, w2, b2, 0, 4)
    _assert_same_run(opt, (w, b), plain, (w2, b2))


def test_bools_and_fractional_numpy_values_are_still_refused():
    w, _ = _params()
    with pytest.raises(ValueError, match=r"Invalid rank: np.float64\(2.5\) - must be an int >= 1"):
        GaLoreAdamW([{"params": [w], "rank": np.float64(2.5)}])
    with pytest.raises(ValueError, match=r"Invalid update_proj_gap: True"):
        GaLoreAdamW([{"params": [w], "rank": 2, "update_proj_gap": True}])


# --- item 9: channels_last after the optimizer was built --------------------------------------------


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_channels_last_after_building_is_explained_before_any_update(name):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 8, 3)
    opt = OPTIMIZERS[name]([{"params": [conv.weight], "rank": 2}, {"params": [conv.bias]}])
    conv.to(memory_format=torch.channels_last)
    conv(torch.randn(2, 4, 6, 6).to(memory_format=torch.channels_last)).square().sum().backward()
    before = [p.detach().clone() for p in conv.parameters()]
    with pytest.raises(RuntimeError, match=r"channels_last.*Convert the model before building the optimizer"):
        opt.step()
    assert not opt.state and all(torch.equal(p, q) for p, q in zip(conv.parameters(), before))


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_non_contiguous_gradient_of_an_nd_galore_parameter_is_refused(name):
    w = nn.Parameter(torch.randn(4, 4, 2))
    opt = OPTIMIZERS[name]([{"params": [w], "rank": 2}])
    w.grad = torch.randn(4, 4, 2).transpose(0, 1)  # the right shape, not contiguous
    with pytest.raises(RuntimeError, match=r"gradient of the 3-D GaLore parameter of shape \(4, 4, 2\) is not contiguous"):
        opt.step()
    assert not opt.state


# --- item 10: parity with galore-torch where the README says bit-identical ---------------------------


def test_rank1_right_basis_matches_galore_torch_to_rounding():
    """galore-torch keeps ``Vh[:1]`` as a strided view of the whole ``Vh``; its projections then
    run BLAS on a strided vector, ours on the compact copy: the same values to an ulp, not the same
    bits (README: the one exception to bit-identical parity)."""
    galore_torch = pytest.importorskip("galore_torch")
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(300, 1000, generator=gen)
    grads = [torch.randn(300, 1000, generator=gen) for _ in range(4)]
    results = []
    for make in (
        lambda g: galore_torch.GaLoreAdamW(g, lr=1e-2),
        lambda g: GaLoreAdamW(g, lr=1e-2, numerics="galore_torch"),
    ):
        w = nn.Parameter(w0.clone())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            opt = make([{"params": [w], "rank": 1, "update_proj_gap": 2, "scale": 0.25, "proj_type": "right"}])
        for g in grads:
            w.grad = g.clone()
            opt.step()
        results.append(w.detach())
    torch.testing.assert_close(results[1], results[0], **tolerance(torch.float32, "galore_torch"))


# --- found by the property test (tests/test_property.py) -------------------------------------------


def test_adafactor_galore_torch_fp32_moments_of_bf16_params_survive_a_resume():
    """galore_torch numerics keep Adafactor's moments in fp32 for bf16 parameters; torch's
    load_state_dict would cast them to bf16, and the resumed run would drift."""
    w0 = torch.randn(6, 9).to(torch.bfloat16)

    def make():
        w = nn.Parameter(w0.clone())
        return w, GaLoreAdafactor([{"params": [w], "rank": 2, "update_proj_gap": 2}], numerics="galore_torch")

    grads = [torch.randn(6, 9).to(torch.bfloat16) for _ in range(5)]
    w, opt = make()
    for g in grads[:2]:
        w.grad = g.clone()
        opt.step()
    saved = _roundtrip({"w": w.detach().clone(), "opt": opt.state_dict()})
    for g in grads[2:]:
        w.grad = g.clone()
        opt.step()
    w2, opt2 = make()
    with torch.no_grad():
        w2.copy_(saved["w"])
    opt2.load_state_dict(saved["opt"])
    assert all(v.dtype == torch.float32 for k, v in opt2.state[w2].items() if k.startswith("exp_avg"))
    for g in grads[2:]:
        w2.grad = g.clone()
        opt2.step()
    assert torch.equal(w2, w)


@pytest.mark.parametrize("proj_type", ["std", "reverse_std", "left", "right", "full"])
def test_galore_torch_checkpoint_loads_and_continues_its_run(proj_type):
    """galore-torch keeps a projector object and an int step in its state: loaded into
    numerics="galore_torch", the run goes on as galore-torch's own does (through a refresh)."""
    galore_torch = pytest.importorskip("galore_torch")
    gen = torch.Generator().manual_seed(0)
    shapes = [(12, 8), (8, 12)]
    w0 = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(8)]

    def group(ws):
        return [{"params": ws, "rank": 2, "update_proj_gap": 3, "scale": 0.25, "proj_type": proj_type}]

    ref_w = [nn.Parameter(w.clone()) for w in w0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW(group(ref_w), lr=1e-2)
    for g in grads[:4]:
        for w, gi in zip(ref_w, g):
            w.grad = gi.clone()
        ref.step()
    saved = copy.deepcopy(ref.state_dict())
    ours_w = [nn.Parameter(w.detach().clone()) for w in ref_w]
    ours = GaLoreAdamW(group(ours_w), lr=1e-2, numerics="galore_torch")
    ours.load_state_dict(saved)
    for w in ours_w:
        assert all(isinstance(v, torch.Tensor) for v in ours.state[w].values())
    for g in grads[4:]:  # step 6 refreshes
        for w, v, gi in zip(ref_w, ours_w, g):
            w.grad, v.grad = gi.clone(), gi.clone()
        ref.step()
        ours.step()
    for w, v in zip(ref_w, ours_w):
        torch.testing.assert_close(v, w, **tolerance(torch.float32, "galore_torch"))

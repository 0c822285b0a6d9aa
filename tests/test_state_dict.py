"""Serialization: tensors-only state, weights_only loads, bit-exact resume across refreshes."""

import io
import pickle
import warnings

import pytest
import torch
from torch import nn

from galore_opt import GaLoreAdamW, galore_param_groups
from galore_opt import config as C


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8)).to(dtype)


def _train(model, opt, start, steps):
    for t in range(start, start + steps):
        gen = torch.Generator().manual_seed(t)
        x = torch.randn(8, 16, generator=gen).to(next(model.parameters()).dtype)
        opt.zero_grad()
        model(x).float().square().mean().backward()
        opt.step()


def _make_opt(model, numerics="torch", **group_kwargs):
    groups = galore_param_groups(model, target_modules="all-linear", rank=4, update_proj_gap=5, **group_kwargs)
    return GaLoreAdamW(groups, lr=1e-2, weight_decay=0.01, numerics=numerics)


def _roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize(
    "numerics,method", [("torch", "power"), ("torch", "randomized"), ("torch", "svd"), ("galore_torch", "svd")]
)
def test_resume_is_bit_exact_across_refreshes(numerics, method):
    # Save at step 7: the next refreshes (gap 5, staggered under torch numerics) fall after it.
    model, opt = _model(), None
    opt = _make_opt(model, numerics, proj_method=method)
    _train(model, opt, 0, 7)
    checkpoint = _roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    _train(model, opt, 7, 14)

    resumed = _model()
    resumed.load_state_dict(checkpoint["model"])
    opt2 = _make_opt(resumed, numerics, proj_method=method)
    opt2.load_state_dict(checkpoint["opt"])
    _train(resumed, opt2, 7, 14)
    for p, q in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[p].items():
            assert torch.equal(value, opt2.state[q][key]), key


def test_state_is_tensors_only():
    model = _model()
    opt = _make_opt(model)
    _train(model, opt, 0, 3)
    for state in opt.state.values():
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    # weights_only=True is torch.load's default: no argument needed
    buf = io.BytesIO()
    torch.save(opt.state_dict(), buf)
    buf.seek(0)
    loaded = torch.load(buf)
    assert set(loaded["state"]) == set(opt.state_dict()["state"])


def test_galore_torch_state_does_not_load_with_weights_only():
    """Why this matters: the reference keeps a Python projector object in its state."""
    galore_torch = pytest.importorskip("galore_torch")
    model = _model()
    groups = galore_param_groups(model, rank=4, update_proj_gap=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = galore_torch.GaLoreAdamW(groups, lr=1e-2)
    _train(model, ref, 0, 1)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        torch.load(buf, weights_only=True)


def test_fp32_basis_of_bf16_params_survives_load_state_dict():
    """torch's load_state_dict casts floating state to the parameter's dtype; the basis keeps
    the dtype it was saved in."""
    model = _model(torch.bfloat16)
    opt = _make_opt(model, basis_dtype="float32")
    _train(model, opt, 0, 2)
    weight = model[0].weight
    basis_key = C.BASIS_LEFT if C.BASIS_LEFT in opt.state[weight] else C.BASIS_RIGHT
    assert opt.state[weight][basis_key].dtype == torch.float32
    assert opt.state[weight][C.EXP_AVG].dtype == torch.bfloat16

    fresh = _make_opt(model, basis_dtype="float32")
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    assert fresh.state[weight][basis_key].dtype == torch.float32
    assert torch.equal(fresh.state[weight][basis_key], opt.state[weight][basis_key])
    assert fresh.state[weight][C.EXP_AVG].dtype == torch.bfloat16
    assert fresh.state[weight][C.STEP].device.type == "cpu"


def test_default_basis_dtype_is_the_parameter_dtype():
    model = _model(torch.bfloat16)
    opt = _make_opt(model)
    _train(model, opt, 0, 1)
    for p in (model[0].weight, model[2].weight):
        bases = [v for k, v in opt.state[p].items() if k in (C.BASIS_LEFT, C.BASIS_RIGHT)]
        assert bases and all(b.dtype == torch.bfloat16 for b in bases)


def test_load_keeps_refresh_offset_on_cpu_and_state_keys():
    model = _model()
    opt = _make_opt(model)
    _train(model, opt, 0, 2)
    offsets = [s[C.REFRESH_OFFSET] for s in opt.state.values() if C.REFRESH_OFFSET in s]
    assert offsets, "staggered refreshes store an offset for all but the first matrix"
    fresh = _make_opt(model)
    fresh.load_state_dict(_roundtrip(opt.state_dict()))
    for p in model.parameters():
        assert set(fresh.state[p]) == set(opt.state[p])
        if C.REFRESH_OFFSET in fresh.state[p]:
            assert fresh.state[p][C.REFRESH_OFFSET].device.type == "cpu"
            assert fresh.state[p][C.REFRESH_OFFSET].dtype == torch.int32
